"""One loop for all calls: batched sessions compute what they would alone; limits and failures stay local."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch

from sg2_runtime.codec.streaming import StreamingEncoder
from sg2_runtime.engine import events as ev
from sg2_runtime.engine.engine import MAX_ENCODE_FRAMES, CapacityError, Engine
from sg2_runtime.engine.options import EngineConfig, SessionOptions
from sg2_runtime.engine.session import SessionClosedError
from tests.support.engine_calls import collect_until, engine_view_24k, of_type, push, reply_done
from tests.support.speech import load_reference_speech

CFG = EngineConfig(max_sessions=4, max_positions=1024)


def _opts(**kw) -> SessionOptions:
    base = dict(play_greeting=False, flow_control="none", sampling={"greedy": True}, max_response_ms=720)
    base.update(kw)
    return SessionOptions.model_validate(base)


@pytest.fixture(scope="module")
def clips(reference_dir) -> list[tuple[np.ndarray, int]]:
    zh, zr = load_reference_speech(reference_dir, "zh", sample_rate=None)
    en, er = load_reference_speech(reference_dir, "en", sample_rate=None)
    z = np.zeros
    return [
        (np.concatenate([z(zr // 2, np.float32), zh, z(zr, np.float32)]), zr),
        (np.concatenate([z(er // 4, np.float32), en[: 3 * er], z(er, np.float32)]), er),
        (np.concatenate([z(er, np.float32), en[4 * er : 6 * er], z(er, np.float32)]), er),
    ]


async def _run_call(session, clip) -> tuple[torch.Tensor, np.ndarray]:
    audio, rate = clip
    push(session, audio, rate)
    events = await collect_until(session, reply_done())
    history = await session.history()
    pcm = np.concatenate([c.pcm for c in of_type(events, ev.AudioChunk)])
    return history, pcm


async def _alone(models, clip) -> tuple[torch.Tensor, np.ndarray]:
    async with Engine(models, CFG) as engine:
        return await _run_call(engine.open_session(_opts()), clip)


async def test_sessions_batched_together_match_each_alone(tiny_models, clips) -> None:
    alone = [await _alone(tiny_models, clip) for clip in clips]
    async with Engine(tiny_models, CFG) as engine:
        sessions = [engine.open_session(_opts()) for _ in clips]
        together = await asyncio.gather(*(_run_call(s, c) for s, c in zip(sessions, clips, strict=True)))
        batch_sizes = engine.metrics.lm_step_batch.collect()[0].samples
    for (h1, p1), (h2, p2) in zip(alone, together, strict=True):
        assert torch.equal(h1, h2)  # same turns, same greedy tokens
        np.testing.assert_allclose(p1, p2, atol=1e-5)
    # the steps really were shared: some LM step ran more than one session
    counts = {s.labels.get("le"): s.value for s in batch_sizes if s.name.endswith("_bucket")}
    assert counts["1.0"] < max(counts.values())


async def test_joining_and_leaving_mid_reply_does_not_change_a_call(tiny_models, clips) -> None:
    reference = await _alone(tiny_models, clips[0])
    async with Engine(tiny_models, CFG) as engine:
        main = engine.open_session(_opts(max_response_ms=1440))
        leaver = engine.open_session(_opts())
        push(leaver, *clips[1])
        audio, rate = clips[0]
        push(main, audio, rate)
        first = await collect_until(main, lambda e: isinstance(e, ev.AudioChunk) and e.index == 1)
        joiner = engine.open_session(_opts())  # joins while main is replying
        push(joiner, *clips[2])
        leaver.close()  # leaves, maybe mid-reply
        rest = await collect_until(main, reply_done())
        history = await main.history()
        await collect_until(joiner, reply_done())
    pcm = np.concatenate([c.pcm for c in of_type(first + rest, ev.AudioChunk)])
    ref_history, ref_pcm = reference
    # main's reply is longer (1440 ms cap) than the reference's (720 ms): compare the common part
    n = ref_pcm.size
    np.testing.assert_allclose(pcm[:n], ref_pcm, atol=1e-5)
    closing = tiny_models.lm.prompt.agent_turn_closing(True).shape[1]
    common = ref_history.shape[1] - closing  # everything up to the reference's capped reply end
    assert torch.equal(history[:, :common], ref_history[:, :common])


async def test_a_call_behind_catches_up_in_multi_frame_codec_calls_with_the_same_tokens(
    tiny_models, clips
) -> None:
    """Audio that piles up (a busy moment, a burst from the network) is encoded several frames per
    codec call, and the tokens are those of encoding it frame by frame."""
    audio, rate = clips[1]
    seen: list[tuple[int, np.ndarray]] = []  # (frames in the call, (k, 3) tokens of our slot)
    async with Engine(tiny_models, CFG) as engine:
        encode = engine.runner.encode

        def recording(slots, pcm):
            tokens = encode(slots, pcm)
            seen.append((pcm.shape[1] // 960, tokens[0]))
            return tokens

        engine.runner.encode = recording
        session = engine.open_session(_opts())
        session.push_audio(audio, rate)  # the whole clip at once: the engine is seconds behind
        await collect_until(session, reply_done())
    sizes = [k for k, _ in seen]
    assert sizes[0] == MAX_ENCODE_FRAMES and max(sizes) == MAX_ENCODE_FRAMES
    got = np.concatenate([t for _, t in seen])
    # the same audio through a fresh streaming encoder, one frame per call
    view = torch.from_numpy(engine_view_24k(audio, rate, chunk_ms=len(audio) * 1000 // rate + 1))
    ref = StreamingEncoder(tiny_models.codec, 1)
    frames = [ref.step(view[i * 960 : (i + 1) * 960].view(1, 1, -1)) for i in range(len(got))]
    np.testing.assert_array_equal(got, torch.cat(frames, dim=-1)[:, 0].T.numpy())


async def test_capacity_is_refused_clearly_and_freed_on_close(tiny_models) -> None:
    async with Engine(tiny_models, EngineConfig(max_sessions=2, max_positions=1024)) as engine:
        a = engine.open_session(_opts())
        engine.open_session(_opts())
        with pytest.raises(CapacityError, match="capacity"):
            engine.open_session(_opts())
        assert engine.capacity_left == 0
        a.close()
        await collect_until(a, lambda e: isinstance(e, ev.SessionClosed))
        c = engine.open_session(_opts())
        assert engine.live_sessions == 2 and not c.closed


async def test_one_session_failing_leaves_the_others_running(tiny_models, clips) -> None:
    reference = await _alone(tiny_models, clips[1])
    async with Engine(tiny_models, CFG) as engine:
        doomed = engine.open_session(_opts(max_call_ms=1500))  # fails once its input passes 1.5 s
        healthy = engine.open_session(_opts())
        with contextlib.suppress(SessionClosedError):  # the engine may end it while we are still pushing
            push(doomed, *clips[0])
        result = asyncio.create_task(_run_call(healthy, clips[1]))
        events = await collect_until(doomed, lambda e: isinstance(e, ev.SessionClosed))
        history, pcm = await result
        assert engine.live_sessions == 1
    errors = of_type(events, ev.ErrorEvent)
    assert errors and errors[-1].fatal and "maximum call length" in errors[-1].message
    assert torch.equal(history, reference[0])
    np.testing.assert_allclose(pcm, reference[1], atol=1e-5)
