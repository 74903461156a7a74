"""A full deployment takes no more calls: the worker reports the engine servers' load to LiveKit
(``load_fnc``), so with every engine slot taken it is marked full and LiveKit dispatches no agent;
once a slot frees, the next room is served. Real livekit-server, ``sg2 agent`` process, an engine
server with one call slot."""

from __future__ import annotations

import pytest
import pytest_asyncio

from agent.livekit.token_service import install as token_service
from sg2_runtime.engine.models import tiny_random_models
from sg2_runtime.engine.options import EngineConfig
from tests.support.livekit_agent import mint_token, start_agent_worker, wait_until
from tests.support.livekit_participant import RoomParticipant
from tests.support.livekit_server import LiveKitServer, livekit_server_fixture
from tests.support.realtime import running_server, server_settings
from tests.support.speech import load_reference_speech, pad_silence

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

lk_server = livekit_server_fixture(scope="module", log_level="info")
NO_WORKER = "failed to send job request"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def one_slot(lk_server: LiveKitServer, tmp_path_factory):
    models = tiny_random_models(max_sessions=2, max_positions=1024, seed=0)
    settings = server_settings(
        **{
            "realtime.session": {
                "flow_control": "realtime",
                "sampling": {"greedy": True},
                "max_response_ms": 2400,
            },
            "livekit": {
                "url": lk_server.url,
                "api_key": lk_server.api_key,
                "api_secret": lk_server.api_secret,
            },
        }
    )
    config = EngineConfig(max_sessions=1, max_positions=1024)
    async with running_server(models, config, settings, extensions=[token_service]) as server:
        worker = await start_agent_worker(tmp_path_factory.mktemp("agent"), lk_server, [server.http_url])
        try:
            yield server, worker
        finally:
            assert await worker.stop() == 0, worker.process.log_tail(60)


async def _load(worker) -> float:
    return (await worker.info()).get("worker_load", 0.0)


async def test_no_dispatch_while_the_engines_are_full_and_the_next_room_after_a_slot_frees(
    one_slot, lk_server: LiveKitServer, reference_dir
) -> None:
    server, worker = one_slot
    clip = pad_silence(load_reference_speech(reference_dir, "en", 24000)[0][: 24000 * 2], 24000, 0.2, 0.0)
    t1 = (await mint_token(server.http_url, room="first"))[1]
    async with RoomParticipant.join(t1["url"], t1["token"], t1["identity"]) as alice:
        await alice.expect(lambda: alice.agent is not None, "the agent in the first room")
        await wait_until(lambda: server.engine.live_sessions == 1, "the first call on the engine")
        assert await wait_until(lambda: _full(worker), "the worker to report a full deployment") == 1.0
        await wait_until(
            lambda: "worker is at full capacity, marking as unavailable" in worker.log_text(),
            "the worker to tell LiveKit it is full",
        )
        refusals = lk_server.log_text().count(NO_WORKER)
        t2 = (await mint_token(server.http_url, room="second"))[1]
        async with RoomParticipant.join(t2["url"], t2["token"], t2["identity"]) as bob:
            await wait_until(
                lambda: lk_server.log_text().count(NO_WORKER) > refusals,
                "LiveKit to find no worker for the second room",
            )
            assert bob.agent is None and server.engine.live_sessions == 1
            assert "received job request" not in worker.log_text().split("marking as unavailable")[-1]
    # the first call ended with its last human: the slot is free, the worker available again
    await wait_until(lambda: server.engine.live_sessions == 0, "the first call to end")
    await wait_until(
        lambda: (
            "worker is below capacity, marking as available"
            in worker.log_text().split("worker is at full capacity")[-1]
        ),
        "the worker to tell LiveKit it is available",
    )
    t3 = (await mint_token(server.http_url, room="third"))[1]
    async with RoomParticipant.join(t3["url"], t3["token"], t3["identity"]) as carol:
        await carol.expect(
            lambda: (
                carol.agent is not None
                and carol.agent_attribute("lk.agent.state") == "listening"
                and carol.heard
            ),
            "the agent in the third room",
        )
        sent = await carol.say(clip)
        await carol.expect(lambda: carol.voiced_ms(sent.voiced_end) >= 300, "the reply in the third room")


async def _full(worker) -> float | None:
    load = await _load(worker)
    return load if load >= 1.0 else None
