"""Calls in LiveKit rooms, end to end: a real ``livekit-server --dev`` on loopback, ``sg2 serve`` (our
engine with tiny random models, and its token service) and ``sg2 agent`` as a real worker process;
the humans are ``livekit.rtc`` participants speaking real recorded speech in real time.

One server of each kind serves the whole module (each test opens its own rooms). Replies are capped
at 30 positions (3.6 s) by the worker's session settings; the random models babble, so the checks are
about audio, text, timing and the engine's history, not what is said.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest
import pytest_asyncio
import torch

from agent.direct import install as direct_calls
from agent.livekit.token_service import install as token_service
from sg2_runtime.engine.models import tiny_random_models
from sg2_runtime.engine.options import EngineConfig
from tests.support import REPO_ROOT
from tests.support.chromium import chromium_page, save_screenshot
from tests.support.livekit_agent import AgentWorker, mint_token, start_agent_worker, wait_until
from tests.support.livekit_participant import RoomParticipant
from tests.support.livekit_server import LiveKitServer, livekit_server_fixture
from tests.support.realtime import API_KEY, RunningServer, running_server, server_settings
from tests.support.speech import espeak_audio, load_reference_speech, pad_silence, write_wav

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

CAP_POSITIONS = 30  # the worker's max_output_tokens: 3.6 s replies
WEB_DIST = REPO_ROOT / "web_client" / "dist"
lk_server = livekit_server_fixture(scope="module", log_level="warn")


@dataclass
class Stack:
    lk: LiveKitServer
    server: RunningServer
    worker: AgentWorker

    async def token(self, **body) -> dict:
        status, out = await mint_token(self.server.http_url, **body)
        assert status == 200, out
        return out

    def only_call(self):
        calls = list(self.server.calls.values())
        assert len(calls) == 1, f"{len(calls)} calls on the engine server"
        return calls[0]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(lk_server: LiveKitServer, tmp_path_factory):
    models = tiny_random_models(max_sessions=4, max_positions=1024, seed=0)
    settings = server_settings(
        **{
            "realtime.session": {
                "flow_control": "realtime",
                "sampling": {"greedy": True},
                "max_response_ms": 6000,
            },
            "livekit": {
                "url": lk_server.url,
                "api_key": lk_server.api_key,
                "api_secret": lk_server.api_secret,
                "agent_name": "sg2",
            },
            "direct": {"web_client_dir": str(WEB_DIST)},  # the page at "/" (its room mode here)
        }
    )
    config = EngineConfig(max_sessions=4, max_positions=1024)
    extensions = [direct_calls, token_service]
    async with running_server(models, config, settings, extensions=extensions) as server:
        worker = await start_agent_worker(
            tmp_path_factory.mktemp("agent"), lk_server, [server.http_url], idle_processes=2
        )
        try:
            yield Stack(lk_server, server, worker)
        finally:
            rc = await worker.stop()
            assert rc == 0, worker.process.log_tail(60)


def _trim(audio: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Starting at the first loud sample (so the first 10 ms frame sent is speech)."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    return audio[loud[0] :] if loud.size else audio


@pytest.fixture(scope="module")
def en_clip(reference_dir) -> np.ndarray:
    audio = load_reference_speech(reference_dir, "en", sample_rate=24000)[0]
    return pad_silence(_trim(audio)[: 24000 * 5 // 2], 24000, 0.2, 0.0)


@pytest.fixture(scope="module")
def zh_interruption(reference_dir) -> np.ndarray:
    return _trim(load_reference_speech(reference_dir, "zh", sample_rate=24000)[0])[: 24000 * 3 // 2]


@pytest.fixture(scope="module")
def bob_clip() -> np.ndarray:
    return pad_silence(
        espeak_audio("Hello there, can you tell me what time it is?", "en", 24000), 24000, 0.2, 0.0
    )


async def _ready(p: RoomParticipant) -> None:
    """The agent is in the room, listening, and its audio track reaches ``p``."""
    await p.expect(
        lambda: p.agent is not None and p.agent_attribute("lk.agent.state") == "listening" and p.heard,
        "the agent listening, its audio track subscribed",
    )


async def _turn_spans(session) -> list[tuple[str, int, int | None]]:
    return await session.inspect(lambda conv: [(t.role, t.start, t.end) for t in conv.history.turns])


def _speech_positions(history: torch.Tensor, start: int, end: int) -> int:
    """Positions in [start, end) that carry agent audio (codec frames other than the empty 1024)."""
    frames = history[1:, 3 * start : 3 * end].reshape(3, end - start, 3)
    return int((frames != 1024).any(dim=(0, 2)).sum())


async def test_token_dispatches_the_agent_which_answers_and_stops_when_talked_over(
    stack: Stack, en_clip, zh_interruption
) -> None:
    tok = await stack.token(room="solo")
    assert tok["room"] == "sg2-solo" and tok["url"] == stack.lk.url and tok["agent_name"] == "sg2"
    async with RoomParticipant.join(tok["url"], tok["token"], tok["identity"]) as alice:
        await _ready(alice)
        assert alice.agent_attribute("sg2.floor") in (None, tok["identity"])
        sent = await alice.say(en_clip)
        first = await alice.expect(lambda: alice.first_voiced(sent.voiced_end), "the agent's reply")
        assert not alice.voiced_frames(0, sent.voiced_end), "the agent spoke before the turn ended"
        await alice.expect(lambda: alice.voiced_ms(first) >= 800, "800 ms of reply")
        agent = alice.agent.identity
        await alice.expect(
            lambda: any(t.participant == agent and t.text.strip() for t in alice.transcripts),
            "the agent's transcription",
        )
        assert alice.agent_attribute("lk.agent.state") == "speaking"
        call = stack.only_call()
        before = await call.session.history()

        talk: dict[str, float] = {}
        talking = asyncio.create_task(
            alice.say(zh_interruption, on_frame=lambda i, t: talk.setdefault("t", t))
        )
        stopped = await alice.expect(
            lambda: "t" in talk and alice.silent_since(talk["t"], 500), "the agent to stop", timeout=20
        )
        sent2 = await talking
        latency_ms = (stopped - talk["t"]) * 1000
        assert latency_ms <= 300, f"agent audio went on for {latency_ms:.0f} ms of talking over it"
        assert not alice.voiced_frames(stopped + 0.001, sent2.voiced_end), "the agent spoke over the caller"

        # the engine's history: the reply cut to what was played, closed, the interruption next
        fmt = stack.server.engine.models.lm.prompt
        spans = await wait_until(
            lambda: _closed_agent_turn_then_user(call.session),
            "the cut reply closed and a user turn after it",
        )
        history = await call.session.history()
        _, s, e = spans
        ids = history[0, 3 * s : 3 * e : 3].tolist()
        special = stack.server.engine.models.lm.special
        tail = e - 1
        while ids[tail - s] != special.eos:
            tail -= 1
        closing = None
        for in_speech in (True, False):
            c = fmt.agent_turn_closing(in_speech)
            n = c.shape[1] // 3
            if torch.equal(history[:, 3 * (tail + 1 - n) : 3 * (tail + 1)], c):
                closing = n
                break
        assert closing is not None, "the cut reply is not closed as the engine closes a cut"
        kept_end = tail + 1 - closing
        assert torch.equal(history[:, : 3 * kept_end], before[:, : 3 * kept_end])  # cut, nothing rewritten
        kept_ms = _speech_positions(history, s, kept_end) * 120
        heard_ms = (stopped - first) * 1000
        assert 120 <= kept_ms < CAP_POSITIONS * 120, f"kept {kept_ms} ms of a {CAP_POSITIONS * 120} ms reply"
        assert abs(kept_ms - heard_ms) <= 400, f"history keeps {kept_ms} ms, {heard_ms:.0f} ms were heard"

        # the interruption was heard as the next turn and is answered
        await alice.expect(lambda: alice.first_voiced(sent2.voiced_end), "the answer to the interruption")
    # the last human left: the call ends, the engine slot is free again
    await wait_until(
        lambda: stack.server.engine.live_sessions == 0, "the call to end after the last human left"
    )


def _closed_agent_turn_then_user(session):
    async def check():
        spans = await _turn_spans(session)
        agent = [i for i, (role, _, _) in enumerate(spans) if role == "agent"]
        if agent and spans[agent[0]][2] is not None and any(r == "user" for r, _, _ in spans[agent[0] + 1 :]):
            return spans[agent[0]]
        return None

    return check()


async def test_two_humans_the_second_speaker_takes_the_floor_and_is_answered(
    stack: Stack, en_clip, bob_clip
) -> None:
    ta = await stack.token(room="duo", identity="alice")
    tb = await stack.token(room="duo", identity="bob")
    async with RoomParticipant.join(ta["url"], ta["token"], "alice") as alice:
        await _ready(alice)
        async with RoomParticipant.join(tb["url"], tb["token"], "bob") as bob:
            await _ready(bob)
            s1 = await alice.say(en_clip)
            await alice.expect(lambda: alice.agent_attribute("sg2.floor") == "alice", "the floor with alice")
            a1 = await alice.expect(lambda: alice.first_voiced(s1.voiced_end), "the reply to alice")
            await bob.expect(lambda: bob.first_voiced(s1.voiced_end), "bob hearing the reply to alice")
            await alice.expect(lambda: alice.silent_since(a1, 600), "the reply to alice to end")

            s2 = await bob.say(bob_clip)
            await bob.expect(lambda: bob.agent_attribute("sg2.floor") == "bob", "the floor with bob")
            b1 = await bob.expect(lambda: bob.first_voiced(s2.voiced_end), "the reply to bob")
            await alice.expect(lambda: alice.first_voiced(s2.voiced_end), "alice hearing the reply to bob")
            assert not bob.voiced_frames(s2.start, s2.voiced_end), "the agent spoke while bob did"
            await bob.expect(lambda: bob.voiced_ms(b1) >= 500, "500 ms of the reply to bob")
            spans = await _turn_spans(stack.only_call().session)
            assert [r for r, _, _ in spans].count("user") == 2, spans


async def test_a_third_participant_joining_mid_reply_changes_nothing(stack: Stack, en_clip) -> None:
    ta = await stack.token(room="trio", identity="alice")
    tb = await stack.token(room="trio", identity="bob")
    tc = await stack.token(room="trio", identity="carol")
    async with (
        RoomParticipant.join(ta["url"], ta["token"], "alice") as alice,
        RoomParticipant.join(tb["url"], tb["token"], "bob") as bob,
    ):
        await _ready(alice)
        await _ready(bob)
        sent = await alice.say(en_clip)
        first = await alice.expect(lambda: alice.first_voiced(sent.voiced_end), "the reply")
        assert alice.agent_attribute("sg2.floor") == "alice"
        await alice.expect(lambda: alice.voiced_ms(first) >= 500, "500 ms of reply")
        floor_changes = len([a for a in alice.attributes if "sg2.floor" in a[2]])
        log_before = len(stack.worker.log_text())
        async with RoomParticipant.join(tc["url"], tc["token"], "carol") as carol:
            await carol.expect(lambda: carol.agent is not None, "carol seeing the agent")
            # the reply plays out: the agent is back to listening (its audio fully played)
            await alice.expect(lambda: _back_to_listening(alice, first), "the reply to end", timeout=30)
            end = alice.last_voiced(first)
            assert end is not None
            await carol.expect(lambda: carol.voiced_ms(0) > 0, "carol hearing the rest of the reply")
        # carol's arrival did not pause the agent's audio (the worker's fast stop), move the floor
        # or cut the reply: everyone heard it whole, as the engine generated it, to its cap
        assert "spoke over the agent" not in stack.worker.log_text()[log_before:]
        for p in (alice, bob):
            frames = p.voiced_frames(first - 0.05, end)
            span = frames[-1].t - frames[0].t
            assert span >= CAP_POSITIONS * 0.12 - 0.5, f"{p.identity} heard {span:.2f} s of a 3.6 s reply"
        assert len([a for a in alice.attributes if "sg2.floor" in a[2]]) == floor_changes
        assert alice.agent_attribute("sg2.floor") == "alice"
        session = stack.only_call().session
        spans = await _turn_spans(session)
        assert [r for r, _, _ in spans] == ["system", "user", "agent"], spans
        history = await session.history()
        _, s, e = spans[-1]
        assert e is not None and _speech_positions(history, s, e) == CAP_POSITIONS  # played to its cap


def _back_to_listening(p: RoomParticipant, since: float) -> bool:
    return any(t > since and changed.get("lk.agent.state") == "listening" for t, _, changed in p.attributes)


async def test_one_worker_serves_two_rooms_at_once(stack: Stack, en_clip, bob_clip) -> None:
    t1 = await stack.token()
    t2 = await stack.token()
    assert t1["room"] != t2["room"] and t1["room"].startswith("sg2-")
    async with (
        RoomParticipant.join(t1["url"], t1["token"], t1["identity"]) as p1,
        RoomParticipant.join(t2["url"], t2["token"], t2["identity"]) as p2,
    ):
        await asyncio.gather(_ready(p1), _ready(p2))
        assert p1.agent.identity != p2.agent.identity
        info = await stack.worker.info()
        assert info["active_jobs"] == 2 and info["agent_name"] == "sg2"
        await wait_until(lambda: stack.server.engine.live_sessions == 2, "both calls on the engine server")
        # 2 of the engine server's 4 slots (the worker refreshes its report periodically: a first
        # report may still show one call)
        await wait_until(
            lambda: _load_is(stack.worker, 0.5), "the worker to report the engine's load as 2 of 4 slots"
        )
        s1, s2 = await asyncio.gather(p1.say(en_clip), p2.say(bob_clip))
        await asyncio.gather(
            p1.expect(lambda: p1.voiced_ms(s1.voiced_end) >= 500, "room 1's reply"),
            p2.expect(lambda: p2.voiced_ms(s2.voiced_end) >= 500, "room 2's reply"),
        )
    await wait_until(lambda: stack.server.engine.live_sessions == 0, "both calls to end")
    await wait_until(lambda: _no_jobs(stack.worker), "the worker to report no job")


async def _load_is(worker: AgentWorker, expected: float) -> bool:
    return await _load(worker) == pytest.approx(expected)


async def _load(worker: AgentWorker) -> float | None:
    value = (await worker.info()).get("worker_load", 0.0)  # protobuf JSON leaves out zeros
    return value if value > 0 else None


async def _no_jobs(worker: AgentWorker) -> bool:
    return (await worker.info()).get("active_jobs", 0) == 0  # protobuf JSON leaves out zeros


@pytest.fixture(scope="module")
def web_client() -> None:
    proc = subprocess.run(["make", "web-client"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building the web client failed:\n{proc.stdout}\n{proc.stderr}"
    assert (WEB_DIST / "index.html").is_file()


@pytest.fixture
def caller_wav(reference_dir, tmp_path):
    audio, rate = load_reference_speech(reference_dir, "zh", sample_rate=48000)
    lead, tail = np.zeros(int(2.0 * rate), np.float32), np.zeros(int(8.0 * rate), np.float32)
    return write_wav(tmp_path / "caller.wav", np.concatenate([lead, audio[: rate * 3], tail]), rate)


async def test_browser_room_mode_completes_a_turn(stack: Stack, web_client, caller_wav) -> None:
    async with chromium_page(fake_audio_wav=caller_wav, name="livekit-browser") as s:
        page = s.page
        await page.goto(stack.server.http_url + "/?room=browser")
        await page.wait_for_selector("#mode-row:not([hidden])")
        assert await page.is_checked('input[name="mode"][value="room"]')
        assert await page.input_value("#room-name") == "browser"
        await page.wait_for_selector("#key-row:not([hidden])")  # the server has API keys: the page asks
        await page.fill("#access-key", API_KEY)
        await page.click("#call")

        await page.wait_for_function("document.getElementById('room-info').dataset.room === 'sg2-browser'")
        # the agent answered: its words in the transcript, its voice playing, its state shown
        await page.wait_for_function(
            """() => [...document.querySelectorAll('#transcript li.agent')]
                    .some(li => li.querySelector('.text').textContent.trim())""",
            timeout=60_000,
        )
        await page.wait_for_function(
            """() => { const a = document.getElementById('agent-audio');
                       return a.srcObject && !a.paused && a.currentTime > 0.5
                           && document.getElementById('state').dataset.state === 'speaking'
                           && Number(document.getElementById('agent-meter').dataset.level) > 20; }""",
            timeout=30_000,
        )
        you = page.locator("#transcript li.user .who")
        assert await you.count() >= 1 and (await you.first.text_content()) == "You"  # whose turn it was
        info = await page.text_content("#room-info")
        assert info is not None and "sg2-browser" in info and "listens to you" in info
        assert int(await page.get_attribute("#mic-meter", "data-peak")) > 20
        assert not await page.is_visible("#error")
        await save_screenshot(page, "livekit-browser-room")
        assert stack.server.engine.live_sessions == 1

        # leaving the room ends the call: the agent leaves with the last human
        await page.click("#call")
        await page.wait_for_function("document.getElementById('state').dataset.state === 'ended'")
        await wait_until(lambda: stack.server.engine.live_sessions == 0, "the call to end")
        assert s.page_errors == []
