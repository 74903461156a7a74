"""Browser-style calls over real WebRTC (aiortc on both ends, Opus, DTLS, SCTP), tiny random models,
real speech: a turn and its reply, then a caller talking over the reply.

Two timelines are compared: the client's sent audio (each 20 ms frame stamped when it left) and
the agent's audio as received (each frame stamped on arrival), both on the same loop clock.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.direct.client import RATE, DirectClient
from tests.support.direct import direct_server, onset_sample, silence, to_48k
from tests.support.speech import load_reference_speech, rms_dbfs

pytestmark = pytest.mark.timeout(120)

LOUD_DBFS = -45.0  # the tiny codec's babble sits around -20 dBFS; the track sends exact zeros otherwise


@pytest.fixture(scope="module")
def zh48(reference_dir) -> np.ndarray:
    audio, rate = load_reference_speech(reference_dir, "zh", sample_rate=None)
    return to_48k(audio, rate)


@pytest.fixture(scope="module")
def en48(reference_dir) -> np.ndarray:
    audio, rate = load_reference_speech(reference_dir, "en", sample_rate=None)
    return to_48k(audio, rate)


def _quiet_after_reply(rec) -> bool:
    """The reply has arrived: audio was heard and 200 ms of silence followed it."""
    levels = [db > LOUD_DBFS for _, db in rec.frame_levels()]
    return any(levels) and len(levels) - 1 - max(i for i, x in enumerate(levels) if x) >= 10


def _types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


async def test_call_turn_and_reply_over_webrtc(tiny_models, zh48) -> None:
    async with direct_server(tiny_models) as srv, DirectClient(srv.url) as client:
        await client.call()
        hello = await client.wait_event(lambda m: m["type"] == "call")
        assert hello["call_id"] == client.call_id and client.call_id in srv.service.calls
        await client.wait_event(lambda m: m == {"type": "state", "state": "listening"})

        start = client.source.play(np.concatenate([silence(0.5), zh48, silence(3.0)]))
        speech_end = start + int(0.5 * RATE) + len(zh48)
        done = await client.wait_event(lambda m: m["type"] == "response_done")
        t_speech_end = client.source.time_of(speech_end)
        assert t_speech_end is not None

        # data-channel events: the turn, then the reply, in order
        events = client.events
        kinds = _types(events)
        for k in ("speech_started", "turn_committed", "response_started", "latency", "agent_text"):
            assert k in kinds, kinds
        assert kinds.index("speech_started") < kinds.index("turn_committed") < kinds.index("response_started")
        turn = next(e for e in events if e["type"] == "turn_committed")
        assert turn["reason"] == "vad"
        # the turn ends where the speech ended on the sent timeline (VAD resolution: 32 ms windows)
        sent_end_ms = (speech_end - start) * 1000 / RATE
        assert abs(turn["end_ms"] - sent_end_ms) <= 200, (turn, sent_end_ms)
        states = [e["state"] for e in events if e["type"] == "state"]
        assert states[:4] == ["listening", "thinking", "speaking", "listening"], states
        assert done["status"] == "length" and done["played_ms"] == 2400
        texts = [e["text"] for e in events if e["type"] == "agent_text"]
        assert "".join(texts) == done["text"] and done["text"]
        latency = next(e for e in events if e["type"] == "latency")
        assert latency["response_id"] == done["response_id"]
        assert latency["total_ms"] >= latency["endpointing_ms"] > 0

        # the agent's audio: 48 kHz, silent until the caller's turn ended, then the whole reply
        await client.recorder.wait_for(_quiet_after_reply)
        assert client.recorder.sample_rates == {48000}
        levels = client.recorder.frame_levels()
        loud = [t for t, db in levels if db > LOUD_DBFS]
        assert loud, "no agent audio received"
        assert loud[0] > t_speech_end, "agent audio began before the caller's turn ended"
        reply = client.recorder.audio(since=loud[0] - 0.001)
        assert len(reply) >= int(2.4 * RATE) - 960
        assert rms_dbfs(reply[: int(2.4 * RATE)]) > -30.0
        assert len(loud) * 20 >= 2400 - 60  # ~every frame of the 2.4 s reply was audible
        assert client.recorder.audio(since=None)[: int(0.5 * RATE)].max(initial=0.0) == 0.0

        # the page's own messages: ping, a malformed one, a typed turn, then an interruption
        n = len(client.events)
        client.send({"type": "ping", "t": 42})
        assert (await client.wait_event(lambda m: m["type"] == "pong", after=n))["t"] == 42
        client.channel.send("not json")
        bad = await client.wait_event(lambda m: m["type"] == "error", after=n)
        assert bad["code"] == "invalid_message" and not bad["fatal"]
        client.send({"type": "text", "text": "你好"})
        typed = await client.wait_event(lambda m: m["type"] == "turn_committed", after=n)
        assert typed["kind"] == "text" and typed["reason"] == "text"
        typed_latency = await client.wait_event(lambda m: m["type"] == "latency", after=n)
        assert typed_latency["endpointing_ms"] == 0 and 0 < typed_latency["total_ms"] < 5000
        await client.wait_event(lambda m: m["type"] == "state" and m["state"] == "speaking", after=n)
        m = len(client.events)
        client.send({"type": "interrupt"})
        cut = await client.wait_event(lambda e: e["type"] == "response_done", after=m)
        assert cut["status"] == "cancelled" and cut["played_ms"] < 2400

        status = await client.hangup()
        assert status == 204
        assert srv.service.calls == {} and srv.engine.live_sessions == 0
        assert srv.service.ended[-1]["reason"] == "hung up (DELETE)"
        metric = srv.service.metrics.registry.get_sample_value
        assert metric("sg2_direct_calls_ended_total", {"reason": "hangup"}) == 1
        assert metric("sg2_direct_input_audio_seconds_total") >= 0.5 + len(zh48) / RATE
        assert metric("sg2_direct_output_audio_seconds_total") >= 2.4
        assert metric("sg2_direct_first_audio_seconds_count") == 2  # the spoken and the typed turn


async def test_talking_over_the_reply_stops_the_agent_within_300_ms(tiny_models, zh48, en48) -> None:
    async with (
        direct_server(tiny_models) as srv,
        DirectClient(srv.url, options={"max_response_ms": 12000}) as client,
    ):
        await client.call()
        await client.wait_event(lambda m: m["type"] == "call")
        start = client.source.play(np.concatenate([silence(0.3), zh48, silence(0.1)]))
        speech_end = start + int(0.3 * RATE) + len(zh48)
        t_end = await client.source.wait_sent(speech_end)

        def heard(seconds: float):
            def check(rec) -> bool:
                return (
                    sum(1 for t, db in rec.frame_levels() if t > t_end and db > LOUD_DBFS) * 0.02 >= seconds
                )

            return check

        await client.recorder.wait_for(heard(1.0))  # the agent has been talking for a second

        # talk over it: 2.5 s of English speech, then silence
        clip = en48[: int(2.5 * RATE)]
        first = client.source.play(np.concatenate([clip, silence(2.0)]))
        t_onset = await client.source.wait_sent(first + onset_sample(clip))
        done = await client.wait_event(lambda m: m["type"] == "response_done")
        await client.recorder.wait_for(lambda rec: rec.frames[-1][0] > t_onset + 1.0)

        levels = client.recorder.frame_levels()
        loud_before = [t for t, db in levels if t_onset - 0.1 <= t <= t_onset and db > LOUD_DBFS]
        assert loud_before, "the agent was not talking when the caller started"
        loud_after = [t for t, db in levels if t_onset < t <= t_onset + 1.0 and db > LOUD_DBFS]
        stop = (max(loud_after) + 0.02 if loud_after else t_onset) - t_onset
        print(f"\nagent audio stopped {stop * 1000:.0f} ms after the interrupting speech onset")
        assert stop <= 0.300
        # and it stayed quiet while the caller spoke
        assert not [t for t, db in levels if t_onset + stop + 0.05 < t <= t_onset + 1.0 and db > LOUD_DBFS]

        kinds = _types(client.events)
        assert "output_paused" in kinds
        assert done["status"] == "interrupted" and 960 <= done["played_ms"] < 12000
        assert [e["state"] for e in client.events if e["type"] == "state"][-1] in ("listening", "thinking")
        # the caller's interrupting speech became the next turn
        nxt = await client.wait_event(
            lambda m: m["type"] == "turn_committed", after=kinds.index("output_paused")
        )
        assert nxt["start_ms"] <= (first - start + onset_sample(clip)) * 1000 / RATE + 100
