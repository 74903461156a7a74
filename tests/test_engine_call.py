"""The engine on scripted calls: turns, replies, barge-in, speculation — tiny random models, real speech.

Random models babble, so every reply is forced to start with <|sosp|> and capped in length; the
assertions are about the conversation machinery: what enters the history, what leaves as audio,
when, and that the LM cache always matches the history.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

from sg2_runtime.engine import events as ev
from sg2_runtime.engine.engine import Engine
from sg2_runtime.engine.options import EngineConfig, SessionOptions
from tests.support.engine_calls import (
    codec_frames,
    collect_until,
    decode_frames,
    engine_view_24k,
    ms_to_frame_ceil,
    of_type,
    push,
    reply_done,
)
from tests.support.speech import load_reference_speech


def _opts(**kw) -> SessionOptions:
    base = dict(
        play_greeting=False,
        flow_control="none",
        sampling={"greedy": True},
        max_response_ms=960,
    )
    base.update(kw)
    return SessionOptions.model_validate(base)


@pytest.fixture(scope="module")
def zh(reference_dir) -> tuple[np.ndarray, int]:
    return load_reference_speech(reference_dir, "zh", sample_rate=None)


@pytest.fixture(scope="module")
def en(reference_dir) -> tuple[np.ndarray, int]:
    return load_reference_speech(reference_dir, "en", sample_rate=None)


def _padded(audio: np.ndarray, rate: int, lead: float, tail: float) -> np.ndarray:
    z = np.zeros
    return np.concatenate([z(int(lead * rate), np.float32), audio, z(int(tail * rate), np.float32)])


async def _check_cache_matches_history(session, engine: Engine) -> None:
    """On the engine thread: the session's KV cache equals a fresh prefill of its history."""
    lm = engine.models.lm

    def check(conv):
        n = conv.cache_len
        assert n > 0 and conv.lm_session.position == n
        cached = conv.lm_session.history(0, n)
        assert torch.equal(cached, conv.history.matrix(0, n))
        fresh = lm.open_session()
        try:
            lm.prefill(fresh, conv.history.matrix(0, n))
            a = lm.pending_hidden(conv.lm_session).float()
            b = lm.pending_hidden(fresh).float()
            return float((a - b).abs().max()), bool(conv.lm_session.has_pending)
        finally:
            lm.close_session(fresh)

    diff, pending = await session.inspect(check)
    assert pending
    assert diff < 1e-4


async def test_scripted_call_one_turn_reply_and_reference_history(tiny_models, zh) -> None:
    audio, rate = zh
    pcm = _padded(audio, rate, 1.0, 1.5)
    async with Engine(tiny_models, EngineConfig(max_sessions=2, max_positions=1024)) as engine:
        session = engine.open_session(_opts(play_greeting=True))
        greeting = await collect_until(session, lambda e: isinstance(e, ev.ResponseDone))
        assert greeting[0] == ev.ResponseStarted(greeting[0].response_id, None, greeting=True)
        assert greeting[-1].status == "completed" and len(of_type(greeting, ev.AudioChunk)) >= 1
        push(session, pcm, rate)
        events = await collect_until(session, reply_done())
        await _check_cache_matches_history(session, engine)
        history = await session.history()
        exposed = generate_latest(engine.metrics.registry).decode()

    # the reply's latency figures reached the Prometheus registry
    assert 'sg2_replies_total{status="length"} 1.0' in exposed
    assert "sg2_commit_to_first_audio_seconds_count 1.0" in exposed
    assert "sg2_active_sessions 1.0" in exposed
    commits = of_type(events, ev.TurnCommitted)
    assert len(commits) == 1 and commits[0].reason == "vad"
    assert of_type(events, ev.SpeechStarted)[0].audio_start_ms == pytest.approx(1000 + 64 * 0, abs=250)
    started = of_type(events, ev.ResponseStarted)
    assert len(started) == 1 and events.index(started[0]) > events.index(commits[0])
    chunks = of_type(events, ev.AudioChunk)
    assert all(events.index(c) > events.index(started[0]) for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) == 8
    metrics = of_type(events, ev.Metrics)[0]
    assert metrics.steps_after_commit <= 1  # first audio within one LM step of the commit
    done = events[-1]
    assert done.status == "length" and done.generated_ms == 960
    assert done.realtime_factor is not None and done.realtime_factor > 0

    # the history is exactly the reference prompt format built from the same tokens
    fmt = tiny_models.lm.prompt
    g = tiny_models.resolve_greeting(_opts())[0]
    first = fmt.system_and_greeting(g)
    frames = codec_frames(tiny_models.codec, engine_view_24k(pcm, rate))
    start, end = commits[0].audio_start_ms // 40, ms_to_frame_ceil(commits[0].audio_end_ms)
    user = fmt.user_speech_turn(frames[start:end])
    head = torch.cat([first, user], dim=1)
    assert torch.equal(history[:, : head.shape[1]], head)
    reply = history[:, head.shape[1] :]
    text = reply[0, ::3].tolist()
    special = tiny_models.lm.special
    assert text[0] == special.sosp
    closing = fmt.agent_turn_closing(True)
    assert torch.equal(reply[:, -closing.shape[1] :], closing)
    audio_part = reply[:, 3 : 3 * 9]  # the 8 generated positions after <|sosp|>
    assert (audio_part[1:] < 1024).all()
    # what was emitted is what the history holds: text and audio
    assert "".join(d.text for d in of_type(events, ev.TextDelta)) == fmt.tokenizer.decode(
        text[1:9], skip_special_tokens=True
    )
    expected_pcm = decode_frames(tiny_models.codec, audio_part[1:].T)
    np.testing.assert_allclose(np.concatenate([c.pcm for c in chunks]), expected_pcm, atol=1e-5)


async def test_speculative_start_is_rolled_back_when_the_user_resumes(tiny_models, zh) -> None:
    audio, rate = zh  # demo_zh has a ~320 ms pause mid-utterance
    pcm = _padded(audio, rate, 0.5, 1.5)
    opts = _opts(turn_detection={"silence_ms": 500, "speculative_silence_ms": 224})
    async with Engine(tiny_models, EngineConfig(max_sessions=2, max_positions=1024)) as engine:
        session = engine.open_session(opts)
        push(session, pcm, rate)
        events = await collect_until(session, reply_done())
        stats = await session.inspect(lambda conv: dict(conv.stats))
        history = await session.history()
        await _check_cache_matches_history(session, engine)
    assert stats["speculation_rollbacks"] >= 1
    assert stats["speculations"] == stats["speculation_rollbacks"] + 1 and stats["speculative_hits"] == 1
    assert len(of_type(events, ev.TurnCommitted)) == 1
    assert len(of_type(events, ev.ResponseStarted)) == 1
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, ev.AudioChunk))
    assert first_audio > events.index(of_type(events, ev.TurnCommitted)[0])
    # the history holds the whole user turn, as if no speculation had happened
    fmt = tiny_models.lm.prompt
    commit = of_type(events, ev.TurnCommitted)[0]
    frames = codec_frames(tiny_models.codec, engine_view_24k(pcm, rate))
    head = torch.cat(
        [
            fmt.system_and_greeting(tiny_models.resolve_greeting(opts)[0]),
            fmt.user_speech_turn(frames[commit.audio_start_ms // 40 : ms_to_frame_ceil(commit.audio_end_ms)]),
        ],
        dim=1,
    )
    assert torch.equal(history[:, : head.shape[1]], head)
    assert of_type(events, ev.Metrics)[0].speculative_hit


async def test_barge_in_cuts_history_to_the_played_chunks(tiny_models, zh, en) -> None:
    audio, rate = zh
    opts = _opts(flow_control="ack", max_response_ms=12000, output_margin_ms=480)
    async with Engine(tiny_models, EngineConfig(max_sessions=2, max_positions=1024)) as engine:
        session = engine.open_session(opts)
        push(session, _padded(audio, rate, 0.5, 0.8), rate)
        events = await collect_until(session, lambda e: isinstance(e, ev.AudioChunk) and e.index == 3)
        reply_id = of_type(events, ev.ResponseStarted)[0].response_id
        before = await session.history()
        # generation waits for playback: 4 chunks (480 ms margin) and no more without acks
        assert await session.inspect(lambda conv: len(conv.response.audio_positions)) == 4
        session.playback_ack(360, reply_id)  # 3 chunks heard
        more = await collect_until(session, lambda e: isinstance(e, ev.AudioChunk) and e.index == 6)
        en_audio, en_rate = en
        interrupting = _padded(en_audio[: int(2.0 * en_rate)], en_rate, 0.0, 1.2)
        pushed_ms_before = await session.inspect(lambda conv: conv.input_ms)
        push(session, interrupting, en_rate)
        rest = await collect_until(session, lambda e: isinstance(e, ev.TurnCommitted))
        history = await session.history()
        await _check_cache_matches_history(session, engine)

    all_events = events + more + rest
    assert any(isinstance(e, ev.OutputPaused) and e.response_id == reply_id for e in rest)
    done = [e for e in rest if isinstance(e, ev.ResponseDone) and e.response_id == reply_id]
    assert len(done) == 1 and done[0].status == "interrupted" and done[0].played_ms == 360
    assert max(c.index for c in of_type(all_events, ev.AudioChunk)) <= 7  # never ran past the margin
    # history: reply = <|sosp|> + exactly the 3 played positions, then the closing markers
    fmt = tiny_models.lm.prompt
    user_commit = of_type(events, ev.TurnCommitted)[0]
    reply_start = before.shape[1] // 3 - 5  # <|sosp|> + 4 generated positions in the snapshot
    kept = reply_start + 4
    assert torch.equal(history[:, : 3 * kept], before[:, : 3 * kept])
    closing = fmt.agent_turn_closing(True)
    assert torch.equal(history[:, 3 * kept : 3 * kept + closing.shape[1]], closing)
    # and the next user turn starts with the interrupting speech (prefix padding included)
    nxt = 3 * kept + closing.shape[1]
    prefix = fmt.user_turn_prefix()
    assert torch.equal(history[:, nxt : nxt + prefix.shape[1]], prefix)
    second = of_type(rest, ev.TurnCommitted)[0]
    assert second.turn_id != user_commit.turn_id
    onset = next(e for e in rest if isinstance(e, ev.SpeechStarted)).audio_start_ms
    assert pushed_ms_before - 100 <= onset <= pushed_ms_before + 400
    assert second.audio_start_ms == (onset - 300) // 40 * 40


async def test_short_noise_pauses_and_resumes_without_losing_audio(tiny_models, zh, en) -> None:
    audio, rate = zh
    opts = _opts(flow_control="ack", max_response_ms=1920)
    async with Engine(tiny_models, EngineConfig(max_sessions=2, max_positions=1024)) as engine:
        session = engine.open_session(opts)
        push(session, _padded(audio, rate, 0.5, 0.8), rate)
        events = await collect_until(session, lambda e: isinstance(e, ev.AudioChunk) and e.index == 3)
        reply_id = of_type(events, ev.ResponseStarted)[0].response_id
        session.playback_ack(240, reply_id)
        en_audio, en_rate = en
        blip = _padded(en_audio[int(1.0 * en_rate) : int(1.25 * en_rate)], en_rate, 0.0, 0.6)
        push(session, blip, en_rate)
        events += await collect_until(session, lambda e: isinstance(e, ev.OutputResumed))
        session.playback_ack(max(c.index + 1 for c in of_type(events, ev.AudioChunk)) * 120, reply_id)

        def ack_and_stop(e: ev.Event) -> bool:
            if isinstance(e, ev.AudioChunk):  # the listener hears each chunk as it arrives
                session.playback_ack((e.index + 1) * 120, reply_id)
            return reply_done(reply_id)(e)

        events += await collect_until(session, ack_and_stop)
        stats = await session.inspect(lambda conv: (conv.turn is None, len(conv.history.turns)))
    kinds = [type(e) for e in events]
    assert kinds.index(ev.OutputPaused) < kinds.index(ev.OutputResumed)
    chunks = [c for c in of_type(events, ev.AudioChunk) if c.response_id == reply_id]
    assert [c.index for c in chunks] == list(range(16))  # no chunk lost, none repeated
    done = events[-1]
    assert done.status == "length" and done.generated_ms == 1920
    assert stats == (True, 3)  # system, user, agent: the noise did not become a turn
