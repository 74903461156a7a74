"""Failures and shutdown with real processes: ``sg2 serve`` killed in the middle of a reply ends that
call with an error the room is told about, the worker stays healthy and serves the next call once the
engine server is back; SIGTERM drains the worker (no new calls, the running one goes on to its end).
"""

from __future__ import annotations

import json
import signal

import pytest
import pytest_asyncio
from livekit import api

from tests.support.livekit_agent import (
    AgentWorker,
    EngineProcess,
    start_agent_worker,
    start_engine_process,
    wait_until,
)
from tests.support.livekit_participant import RoomParticipant
from tests.support.livekit_server import LiveKitServer, livekit_server_fixture
from tests.support.speech import load_reference_speech, pad_silence

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(150)]

lk_server = livekit_server_fixture(scope="module", log_level="info")


def room_token(lk: LiveKitServer, identity: str, room: str) -> str:
    """A participant token that dispatches the agent (what the token service mints)."""
    grants = api.VideoGrants(
        room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True
    )
    config = api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name="sg2")])
    return (
        api.AccessToken(lk.api_key, lk.api_secret)
        .with_identity(identity)
        .with_grants(grants)
        .with_room_config(config)
        .to_jwt()
    )


@pytest.fixture(scope="module")
def clip(reference_dir):
    return pad_silence(load_reference_speech(reference_dir, "en", 24000)[0][: 24000 * 2], 24000, 0.2, 0.0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployment(lk_server: LiveKitServer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failover")
    engine = await start_engine_process(tmp, max_sessions=2)
    worker = await start_agent_worker(tmp, lk_server, [engine.http_url], max_output_tokens=40)
    state = {"engine": engine}
    try:
        yield worker, state, tmp
    finally:
        await worker.stop()
        state["engine"].process.stop()


async def _ready(p: RoomParticipant) -> None:
    await p.expect(
        lambda: p.agent is not None and p.agent_attribute("lk.agent.state") == "listening" and p.heard,
        "the agent listening",
    )


async def _load(worker: AgentWorker) -> float:
    return (await worker.info()).get("worker_load", 0.0)


async def test_engine_killed_mid_call_ends_it_with_an_error_and_a_restarted_engine_serves_again(
    deployment, lk_server: LiveKitServer, clip
) -> None:
    worker, state, tmp = deployment
    engine: EngineProcess = state["engine"]
    async with RoomParticipant.join(
        lk_server.url, room_token(lk_server, "alice", "doomed"), "alice"
    ) as alice:
        await _ready(alice)
        sent = await alice.say(clip)
        await alice.expect(lambda: alice.voiced_ms(sent.voiced_end) >= 300, "the reply to begin")
        engine.kill()  # SIGKILL, mid-reply (4.8 s replies)

        packet = await alice.expect(
            lambda: next((d for _, topic, d in alice.data if topic == "sg2.error"), None), "the error message"
        )
        error = json.loads(packet)
        assert error["type"] == "error" and error["code"] == "engine_failed"
        assert "lost mid-call" in error["message"]
        await alice.expect(lambda: alice.agent_left is not None, "the agent to leave the room")
        errors = [changed["sg2.error"] for _, who, changed in alice.attributes if "sg2.error" in changed]
        assert errors and "lost mid-call" in errors[0]

    # the worker lives on, and with no engine server reachable it reports itself full
    assert worker.process.running() and await worker.healthy()
    assert await wait_until(lambda: _is(_load(worker), 1.0), "the worker to report no capacity") == 1.0
    assert "failed: " in worker.log_text()  # the pool marked the server failed

    state["engine"] = engine = await start_engine_process(
        tmp, port=engine.port, max_sessions=2, name="engine2"
    )
    available = worker.log_text().count("marking as available")
    await wait_until(lambda: _below(_load(worker), 1.0), "the worker to see the engine server again")
    await wait_until(
        lambda: worker.log_text().count("marking as available") > available, "the worker to tell LiveKit"
    )
    async with RoomParticipant.join(lk_server.url, room_token(lk_server, "bob", "after"), "bob") as bob:
        await _ready(bob)
        sent = await bob.say(clip)
        await bob.expect(lambda: bob.voiced_ms(sent.voiced_end) >= 500, "the reply after the restart")
        assert not any(topic == "sg2.error" for _, topic, _ in bob.data)


async def test_sigterm_drains_the_worker_the_running_call_goes_on(
    deployment, lk_server: LiveKitServer, clip
) -> None:
    worker, _state, _tmp = deployment
    async with RoomParticipant.join(lk_server.url, room_token(lk_server, "carol", "drain"), "carol") as carol:
        await _ready(carol)
        worker.process.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: "draining: 1 call(s) running" in worker.log_text(), "the worker to drain")
        refusals = lk_server.log_text().count("failed to send job request")
        # a new room gets no agent from a draining worker ...
        async with RoomParticipant.join(lk_server.url, room_token(lk_server, "dave", "late"), "dave") as dave:
            await wait_until(
                lambda: lk_server.log_text().count("failed to send job request") > refusals,
                "LiveKit to find no worker for the new room",
            )
            assert dave.agent is None
        # ... while the running call is still served
        sent = await carol.say(clip)
        await carol.expect(lambda: carol.voiced_ms(sent.voiced_end) >= 500, "a reply during the drain")
        assert worker.process.running()
    # the last call ended: the worker exits by itself, cleanly
    await wait_until(
        lambda: not worker.process.running(), "the worker to exit after its last call", timeout=60
    )
    assert worker.process.proc.returncode == 0
    assert "stopped" in worker.log_text().splitlines()[-1]


async def _is(value, expected: float):
    v = await value
    return v if v == expected else None


async def _below(value, limit: float):
    v = await value
    return v < limit
