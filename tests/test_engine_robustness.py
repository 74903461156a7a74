"""Input robustness and long calls: formats, bad samples, monologues, the context limit, bad requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from sg2_runtime.engine import events as ev
from sg2_runtime.engine.engine import Engine
from sg2_runtime.engine.options import EngineConfig, SessionOptions
from sg2_runtime.engine.session import BackpressureError, SessionClosedError
from tests.support.engine_calls import collect_until, of_type, push, reply_done
from tests.support.speech import load_reference_speech, resample

CFG = EngineConfig(max_sessions=4, max_positions=1024)


def _opts(**kw) -> SessionOptions:
    base = dict(play_greeting=False, flow_control="none", sampling={"greedy": True}, max_response_ms=480)
    base.update(kw)
    return SessionOptions.model_validate(base)


@pytest.fixture(scope="module")
def speech(reference_dir) -> np.ndarray:
    """demo_en, first 3 s, with silence around it, at 48 kHz float."""
    en, rate = load_reference_speech(reference_dir, "en", sample_rate=48000)
    z = np.zeros
    return np.concatenate([z(24000, np.float32), en[: 3 * rate], z(48000, np.float32)])


def _convert(audio48: np.ndarray, rate: int, dtype: str, channels: int) -> np.ndarray:
    x = resample(audio48, 48000, rate)
    if dtype == "int16":
        x = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    if channels == 2:
        x = np.stack([x, x], axis=1).reshape(-1)
    return x


async def _one_turn(engine: Engine, audio: np.ndarray, rate: int, channels: int = 1, **kw) -> list[ev.Event]:
    session = engine.open_session(_opts(**kw))
    push(session, audio, rate, channels=channels)
    events = await collect_until(session, reply_done())
    session.close()
    return events


@pytest.mark.parametrize(
    ("rate", "dtype", "channels"),
    [(8000, "int16", 1), (16000, "float32", 1), (44100, "int16", 2), (48000, "float32", 2)],
)
async def test_any_common_format_gives_the_same_turn(tiny_models, speech, rate, dtype, channels) -> None:
    async with Engine(tiny_models, CFG) as engine:
        ref = of_type(await _one_turn(engine, speech, 48000), ev.TurnCommitted)
        got = await _one_turn(engine, _convert(speech, rate, dtype, channels), rate, channels)
    commits = of_type(got, ev.TurnCommitted)
    assert len(commits) == len(ref) == 1
    assert abs(commits[0].audio_start_ms - ref[0].audio_start_ms) <= 120
    assert abs(commits[0].audio_end_ms - ref[0].audio_end_ms) <= 160
    assert of_type(got, ev.ResponseDone)[0].status == "length"


async def test_empty_pushes_and_non_finite_samples_never_reach_the_model(tiny_models, speech) -> None:
    bad = speech.copy()
    bad[30000:30100] = np.nan
    bad[40000:40010] = np.inf
    async with Engine(tiny_models, CFG) as engine:
        session = engine.open_session(_opts())
        session.push_audio(np.zeros(0, np.float32), 48000)
        session.push_audio(b"", 16000)
        push(session, bad, 48000)
        events = await collect_until(session, reply_done())
        history = await session.history()
    warnings = of_type(events, ev.ErrorEvent)
    assert len(warnings) == 1 and warnings[0].code == "invalid_audio" and not warnings[0].fatal
    assert "non-finite samples replaced by silence" in warnings[0].message
    assert len(of_type(events, ev.TurnCommitted)) == 1
    speech_tokens = history[1:][history[1:] != 1024]
    assert speech_tokens.numel() > 0 and int(speech_tokens.max()) < 1024 and int(speech_tokens.min()) >= 0


async def test_a_monologue_is_committed_at_the_turn_cap(tiny_models, reference_dir) -> None:
    en, rate = load_reference_speech(reference_dir, "en", sample_rate=24000)  # 11 s of continuous speech
    async with Engine(tiny_models, CFG) as engine:
        events = await _one_turn(engine, en, rate, turn_detection={"max_turn_ms": 4000})
    commit = of_type(events, ev.TurnCommitted)[0]
    assert commit.reason == "max_turn"
    assert 3900 <= commit.audio_end_ms - commit.audio_start_ms <= 4100


async def test_a_long_call_crosses_the_context_limit_without_a_gap(tiny_models) -> None:
    config = EngineConfig(max_sessions=2, max_positions=256)
    async with Engine(tiny_models, config) as engine:
        session = engine.open_session(_opts(play_greeting=False, max_response_ms=600))
        system = None
        for turn in range(16):
            session.push_text(f"第{turn}个问题：今天天气怎么样？")
            events = await collect_until(session, reply_done())
            assert of_type(events, ev.ResponseDone)[-1].status == "length"
            state = await session.inspect(
                lambda conv: (
                    conv.history.length,
                    conv.cache_len,
                    dict(conv.stats),
                    conv.history.turns[0].end,
                )
            )
            length, _cache_len, stats, system_end = state
            assert length <= 256
            history = await session.history()
            system = history[:, : 3 * system_end] if system is None else system
            assert torch.equal(history[:, : 3 * system_end], system)  # system text + greeting always kept
        stats = await session.inspect(lambda conv: dict(conv.stats))
        assert stats["trims"] >= 1
        # after the rebuild, the cache still matches the (shortened) history
        lm = engine.models.lm

        def check(conv):
            need = (
                conv.prefill_need()
            )  # a rebuild may still be streaming in: finish it as the scheduler would
            if need:
                lm.prefill(conv.lm_session, conv.prefill_slice(need))
                conv.on_prefilled(need)
            n = conv.cache_len
            if not conv.lm_session.has_pending:  # e.g. every old turn was dropped: re-derive the last state
                lm.rollback(conv.lm_session, n - 1)
                lm.prefill(conv.lm_session, conv.history.matrix(n - 1, n))
            fresh = lm.open_session()
            try:
                lm.prefill(fresh, conv.history.matrix(0, conv.cache_len))
                return float((lm.pending_hidden(fresh) - lm.pending_hidden(conv.lm_session)).abs().max())
            finally:
                lm.close_session(fresh)

        assert await session.inspect(check) < 1e-4


async def test_greeting_is_spoken_first_and_talking_over_it_keeps_it_in_the_prompt(
    tiny_models, speech
) -> None:
    async with Engine(tiny_models, CFG) as engine:
        session = engine.open_session(_opts(play_greeting=True, flow_control="ack", greeting=1))
        first = await collect_until(session, lambda e: isinstance(e, ev.AudioChunk))
        assert isinstance(first[0], ev.ResponseStarted) and first[0].greeting
        g = tiny_models.resolve_greeting(_opts(greeting=1))[0]
        words = tiny_models.fmt.decode_text(list(g.text_ids)).rstrip("\ufffd").strip()
        assert isinstance(first[1], ev.TextDelta) and first[1].text == words  # its words, for transcripts
        session.playback_ack(120, first[0].response_id)
        push(session, speech[24000:], 48000)  # speech right away, over the greeting
        events = await collect_until(session, reply_done())
        history = await session.history()
    greeting_done = next(
        e for e in events if isinstance(e, ev.ResponseDone) and e.response_id.startswith("greet")
    )
    assert greeting_done.status == "interrupted"
    g = tiny_models.resolve_greeting(_opts(greeting=1))[0]
    head = tiny_models.lm.prompt.system_and_greeting(g)
    assert torch.equal(history[:, : head.shape[1]], head)  # the whole greeting stays: it is the voice prompt


async def test_bad_requests_are_reported_and_the_call_goes_on(tiny_models, speech) -> None:
    with pytest.raises(ValidationError):
        SessionOptions.model_validate({"sampling": {"temperature": -1}})
    with pytest.raises(ValidationError):
        SessionOptions.model_validate({"turn_detection": {"silence_ms": 300, "speculative_silence_ms": 400}})
    async with Engine(
        tiny_models, EngineConfig(max_sessions=2, max_positions=1024, max_input_backlog_ms=2000)
    ) as eng:
        with pytest.raises(ValueError, match="greeting index"):
            eng.open_session(_opts(greeting=99))
        session = eng.open_session(_opts())
        with pytest.raises(ValueError):
            session.push_text("   ")
        session.commit()  # nothing to commit yet
        err = await collect_until(session, lambda e: isinstance(e, ev.ErrorEvent))
        assert err[-1].code == "invalid_request" and not err[-1].fatal
        with pytest.raises(BackpressureError, match="real time"):
            for _ in range(10):
                session.push_audio(np.zeros(48000, np.float32), 48000)  # 10 s at once, limit 2 s
        refused = await session.update({"instructions": "Speak briefly."})
        assert refused == []  # no turn yet: the prompt head can still change
        session.close()
        with pytest.raises(SessionClosedError):
            session.push_audio(np.zeros(480, np.float32), 48000)
        assert eng.live_sessions == 0 or (
            await collect_until(session, lambda e: isinstance(e, ev.SessionClosed))
        )
