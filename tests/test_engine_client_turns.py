"""Client-controlled turns and exact truncation: ``auto_reply=False`` + ``create_response``, typed
turns without a reply, commits that take all audio pushed before them, ``truncate_reply`` on the
reply in progress and on the latest finished one — tiny random models, real speech.

The network API (OpenAI Realtime) needs these: ``turn_detection: null`` means the client commits and
asks for replies itself, and ``conversation.item.truncate`` says exactly how much of a reply was heard.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sg2_runtime.engine import events as ev
from sg2_runtime.engine.engine import Engine
from sg2_runtime.engine.options import EngineConfig, SessionOptions
from sg2_runtime.lm.prompt import AGENT_PREFIX
from tests.support.engine_calls import (
    check_cache_matches_history,
    codec_frames,
    collect_until,
    engine_view_24k,
    ms_to_frame_ceil,
    of_type,
    push,
    reply_done,
)
from tests.support.speech import load_reference_speech, pad_silence

CONFIG = EngineConfig(max_sessions=2, max_positions=1024)


def _opts(**kw) -> SessionOptions:
    base = dict(
        play_greeting=False,
        flow_control="none",
        sampling={"greedy": True},
        max_response_ms=480,
        turn_detection={"enabled": False},
        auto_reply=False,
    )
    base.update(kw)
    return SessionOptions.model_validate(base)


@pytest.fixture(scope="module")
def zh(reference_dir) -> tuple[np.ndarray, int]:
    return load_reference_speech(reference_dir, "zh", sample_rate=None)  # 32 kHz: resampled inside


@pytest.fixture(scope="module")
def en24(reference_dir) -> np.ndarray:
    return load_reference_speech(reference_dir, "en", sample_rate=24000)[0]


@pytest.fixture(scope="module")
def zh24(reference_dir) -> np.ndarray:
    return load_reference_speech(reference_dir, "zh", sample_rate=24000)[0]


def _head(models, opts: SessionOptions) -> torch.Tensor:
    return models.lm.prompt.system_and_greeting(models.resolve_greeting(opts)[0])


def _sosp(models) -> torch.Tensor:
    return models.lm.prompt.text_segment([models.lm.special.sosp])


async def test_commit_takes_all_audio_pushed_before_it_and_the_reply_waits_for_create_response(
    tiny_models, zh
) -> None:
    audio, rate = zh
    opts = _opts()
    async with Engine(tiny_models, CONFIG) as engine:
        session = engine.open_session(opts)
        push(session, audio, rate)  # far faster than the encoder: the commit must wait for it
        session.commit()
        events = await collect_until(session, lambda e: isinstance(e, ev.TurnCommitted))
        idle = await session.inspect(lambda conv: (conv.response is None, conv.turn is None))
        session.create_response("resp_client_1")
        events += await collect_until(session, reply_done("resp_client_1"))
        history = await session.history()
        await check_cache_matches_history(session, engine)
        session.commit()  # nothing new since the last turn
        error = (await collect_until(session, lambda e: isinstance(e, ev.ErrorEvent)))[-1]

    view = engine_view_24k(audio, rate)
    n_frames = len(view) // 960
    commit = of_type(events, ev.TurnCommitted)[0]
    assert (commit.reason, commit.audio_start_ms, commit.audio_end_ms) == ("commit", 0, n_frames * 40)
    assert idle == (True, True)  # committed, and no reply started on its own
    started = of_type(events, ev.ResponseStarted)
    assert [(s.response_id, s.turn_id) for s in started] == [("resp_client_1", commit.turn_id)]
    done = events[-1]
    assert (done.status, done.generated_ms, done.generated_positions) == ("length", 480, 4)
    fmt = tiny_models.lm.prompt
    frames = codec_frames(tiny_models.codec, view)
    head = torch.cat(
        [_head(tiny_models, opts), fmt.user_speech_turn(frames[:n_frames]), _sosp(tiny_models)], 1
    )
    assert torch.equal(history[:, : head.shape[1]], head)
    assert started[0].context_positions == head.shape[1] // 3 - 1  # the reply starts at its <|sosp|>
    assert error.code == "invalid_request" and not error.fatal and "nothing to commit" in error.message


async def test_typed_turns_without_replies_get_an_empty_agent_turn_between_them(tiny_models) -> None:
    opts = _opts()
    async with Engine(tiny_models, CONFIG) as engine:
        session = engine.open_session(opts)
        session.push_text("你好", respond=False)
        session.push_text("请介绍一下你自己", respond=False)
        commits = await collect_until(session, lambda e: isinstance(e, ev.TurnCommitted) and e.turn_id != "")
        commits += await collect_until(session, lambda e: isinstance(e, ev.TurnCommitted))
        session.create_response("resp_typed")
        events = await collect_until(session, reply_done("resp_typed"))
        history = await session.history()
        await check_cache_matches_history(session, engine)
    assert [c.kind for c in of_type(commits, ev.TurnCommitted)] == ["text", "text"]
    assert not of_type(commits, ev.ResponseStarted)
    assert of_type(events, ev.ResponseStarted)[0].turn_id == of_type(commits, ev.TurnCommitted)[1].turn_id
    fmt = tiny_models.lm.prompt
    expected = torch.cat(
        [
            _head(tiny_models, opts),
            fmt.user_text_turn("你好"),
            fmt.agent_turn_closing(False),  # the agent said nothing to the first
            fmt.user_text_turn("请介绍一下你自己"),
            _sosp(tiny_models),
        ],
        1,
    )
    assert torch.equal(history[:, : expected.shape[1]], expected)


async def test_agent_speaks_first_second_request_is_refused_and_cancel_keeps_what_was_heard(
    tiny_models,
) -> None:
    opts = _opts(flow_control="ack", max_response_ms=2400)  # without acks generation waits at the margin
    async with Engine(tiny_models, CONFIG) as engine:
        session = engine.open_session(opts)
        session.create_response("resp_first")
        events = await collect_until(session, lambda e: isinstance(e, ev.AudioChunk) and e.index == 1)
        session.create_response("resp_second")
        error = (await collect_until(session, lambda e: isinstance(e, ev.ErrorEvent)))[-1]
        session.playback_ack(120, "resp_first")
        session.interrupt()
        done = (await collect_until(session, reply_done("resp_first")))[-1]
        history = await session.history()
        await check_cache_matches_history(session, engine)
    fmt = tiny_models.lm.prompt
    prefix = fmt.text_segment(AGENT_PREFIX)
    assert of_type(events, ev.ResponseStarted)[0] == ev.ResponseStarted(
        "resp_first", None, context_positions=(_head(tiny_models, opts).shape[1] + prefix.shape[1]) // 3
    )
    assert (error.ref, error.fatal) == ("resp_second", False) and "already in progress" in error.message
    assert (done.status, done.played_ms) == ("cancelled", 120)
    head = torch.cat([_head(tiny_models, opts), prefix, _sosp(tiny_models)], 1)
    n = head.shape[1]
    assert torch.equal(history[:, :n], head)
    closing = fmt.agent_turn_closing(True)
    assert torch.equal(history[:, n + 3 : n + 3 + closing.shape[1]], closing)  # one heard position kept
    assert history.shape[1] == n + 3 + closing.shape[1]


async def test_truncating_the_reply_in_progress_cuts_history_at_the_heard_chunk(tiny_models, en24) -> None:
    opts = _opts(flow_control="ack", max_response_ms=2400, auto_reply=True)
    async with Engine(tiny_models, CONFIG) as engine:
        session = engine.open_session(opts)
        push(session, en24, 24000)
        session.commit()
        events = await collect_until(session, lambda e: isinstance(e, ev.AudioChunk) and e.index == 3)
        reply = of_type(events, ev.ResponseStarted)[0]
        before = await session.history()
        session.truncate_reply(reply.response_id, 300)  # 2.5 chunks heard: 2 kept
        events += await collect_until(session, lambda e: isinstance(e, ev.HistoryTruncated))
        history = await session.history()
        await check_cache_matches_history(session, engine)
    done = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert [(d.status, d.played_ms) for d in done] == [("cancelled", 240)]
    assert events[-1] == ev.HistoryTruncated(reply.response_id, 240)
    assert events.index(done[0]) < len(events) - 1
    keep = reply.context_positions + 1 + 2
    assert torch.equal(history[:, : 3 * keep], before[:, : 3 * keep])
    closing = tiny_models.lm.prompt.agent_turn_closing(True)
    assert torch.equal(history[:, 3 * keep :], closing)


async def test_truncating_the_latest_reply_after_the_next_turn_began_splices_the_history(
    tiny_models, en24, zh24
) -> None:
    opts = _opts(turn_detection={"enabled": True}, auto_reply=True, max_response_ms=960)
    first = pad_silence(en24, 24000, 0.5, 1.0)
    second = pad_silence(zh24[: 24000 * 2], 24000, 0.0, 0.0)
    tail = np.zeros(24000 * 3 // 2, np.float32)
    async with Engine(tiny_models, CONFIG) as engine:
        session = engine.open_session(opts)
        push(session, first, 24000)
        events = await collect_until(session, reply_done())
        reply = of_type(events, ev.ResponseStarted)[0]
        before = await session.history()
        push(session, second, 24000)
        events += await collect_until(session, lambda e: isinstance(e, ev.SpeechStarted))
        # the next user turn is open in the history; the listener says it heard 300 ms of the reply
        assert await session.inspect(lambda conv: conv.turn is not None and not conv.turn.committed)
        session.truncate_reply(reply.response_id, 300)
        events += await collect_until(session, lambda e: isinstance(e, ev.HistoryTruncated))
        push(session, tail, 24000)
        events += await collect_until(
            session, lambda e: reply_done()(e) and e.response_id != reply.response_id
        )
        history = await session.history()
        await check_cache_matches_history(session, engine)
        session.truncate_reply(reply.response_id, 0)  # no longer the latest reply
        error = (await collect_until(session, lambda e: isinstance(e, ev.ErrorEvent)))[-1]

    assert of_type(events, ev.HistoryTruncated) == [ev.HistoryTruncated(reply.response_id, 240)]
    commits = of_type(events, ev.TurnCommitted)
    assert len(commits) == 2
    fmt = tiny_models.lm.prompt
    keep = reply.context_positions + 1 + 2
    kept_ids = before[0, 3 * reply.context_positions : 3 * keep : 3].tolist()
    in_speech = kept_ids.count(tiny_models.lm.special.sosp) > kept_ids.count(tiny_models.lm.special.eosp)
    frames = codec_frames(tiny_models.codec, np.concatenate([first, second, tail]))
    user = fmt.user_speech_turn(
        frames[commits[1].audio_start_ms // 40 : ms_to_frame_ceil(commits[1].audio_end_ms)]
    )
    expected = torch.cat(
        [before[:, : 3 * keep], fmt.agent_turn_closing(in_speech), user, _sosp(tiny_models)], 1
    )
    assert torch.equal(history[:, : expected.shape[1]], expected)
    second_reply = [e for e in events if isinstance(e, ev.ResponseStarted)][1]
    assert second_reply.context_positions == expected.shape[1] // 3 - 1
    assert error.ref == reply.response_id and "latest reply" in error.message


async def test_cancelling_a_reply_during_a_barge_in_makes_the_sound_the_next_turn(tiny_models, en24) -> None:
    # a 300 ms sound over the reply is too short to interrupt on its own (400 ms); the client cancels
    # the reply as soon as it hears about it, so the sound is the user's next turn and is answered
    opts = _opts(turn_detection={"enabled": True}, auto_reply=True, flow_control="ack", max_response_ms=2400)
    first = pad_silence(en24, 24000, 0.5, 1.0)
    blip = pad_silence(en24[24000 : 24000 + 7200], 24000, 0.0, 1.2)
    async with Engine(tiny_models, CONFIG) as engine:
        session = engine.open_session(opts)
        push(session, first, 24000)
        events = await collect_until(session, lambda e: isinstance(e, ev.AudioChunk) and e.index == 3)
        reply = of_type(events, ev.ResponseStarted)[0].response_id
        session.playback_ack(480, reply)
        push(session, blip[: 24000 * 3 // 10], 24000)
        events += await collect_until(session, lambda e: isinstance(e, ev.OutputPaused))
        session.interrupt()
        push(session, blip[24000 * 3 // 10 :], 24000)
        events += await collect_until(
            session, lambda e: isinstance(e, ev.ResponseStarted) and e.response_id != reply
        )
    done = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert (done[0].response_id, done[0].status, done[0].played_ms) == (reply, "cancelled", 480)
    commits = of_type(events, ev.TurnCommitted)
    assert len(commits) == 2 and commits[1].reason == "vad"
    onset = [e for e in events if isinstance(e, ev.SpeechStarted)][-1].audio_start_ms
    assert commits[1].audio_start_ms == max(onset - 300, commits[0].audio_end_ms) // 40 * 40
