"""Helpers for driving engine sessions in tests: feed audio, collect events, rebuild expectations."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sg2_runtime.engine import events as ev
from sg2_runtime.engine.audio_input import AudioNormaliser

EVENT_TIMEOUT = 60.0


def push(session: Any, audio: np.ndarray, rate: int, chunk_ms: int = 20, channels: int = 1) -> None:
    """Push audio in transport-sized pieces (as fast as the engine takes it)."""
    step = rate * chunk_ms // 1000 * channels
    for i in range(0, len(audio), step):
        session.push_audio(audio[i : i + step], rate, channels)


def engine_view_24k(audio: np.ndarray, rate: int, chunk_ms: int = 20) -> np.ndarray:
    """The 24 kHz samples the engine sees for ``audio`` pushed with :func:`push`."""
    norm = AudioNormaliser()
    step = rate * chunk_ms // 1000
    return np.concatenate([norm.push(audio[i : i + step], rate).codec for i in range(0, len(audio), step)])


async def collect_until(
    session: Any, stop: Callable[[ev.Event], bool], timeout: float = EVENT_TIMEOUT
) -> list[ev.Event]:
    """Events up to and including the first one for which ``stop`` is true."""
    out: list[ev.Event] = []
    while True:
        try:
            event = await asyncio.wait_for(session.next_event(), timeout)
        except TimeoutError as exc:
            seen = [e for e in out if not isinstance(e, ev.AudioChunk)]
            raise AssertionError(
                f"no expected event within {timeout} s; got {len(out)} events: {seen}"
            ) from exc
        out.append(event)
        if stop(event):
            return out
        if isinstance(event, ev.SessionClosed):
            raise AssertionError(f"session closed before the expected event: {out[-3:]}")


def of_type(events: list[ev.Event], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def reply_done(response_id: str | None = None) -> Callable[[ev.Event], bool]:
    def stop(e: ev.Event) -> bool:
        return (
            isinstance(e, ev.ResponseDone)
            and e.response_id.startswith("resp_")
            and (response_id is None or e.response_id == response_id)
        )

    return stop


def codec_frames(codec: Any, audio24: np.ndarray) -> torch.Tensor:
    """Whole-utterance codec tokens of 24 kHz audio as (frames, 3)."""
    n = len(audio24) // 960 * 960
    tokens = codec.encode(torch.from_numpy(audio24[:n]).float().view(1, 1, -1))
    return tokens[:, 0, :].T.contiguous()


def decode_frames(codec: Any, frames: torch.Tensor) -> np.ndarray:
    """Streaming decode of (frames, 3) tokens from a fresh state, 3 frames per call (as the engine)."""
    dec = codec.streaming_decoder(num_slots=1)
    dec.reset([0])
    out = [dec.step(frames[i : i + 3].T.reshape(3, 1, -1)) for i in range(0, len(frames), 3)]
    return torch.cat(out, dim=-1)[0, 0].float().numpy()


def ms_to_frame_ceil(ms: int) -> int:
    return -(-ms // 40)


async def check_cache_matches_history(session: Any, engine: Any) -> None:
    """On the engine thread: the session's KV cache equals a fresh prefill of the history it covers.

    First waits (engine round trips, no sleeps) until the engine has prefilled what the last cut or
    closing appended, so the cache has a pending position to compare."""
    lm = engine.models.lm
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EVENT_TIMEOUT
    while not await session.inspect(lambda conv: conv.cache_len > 0 and conv.lm_session.has_pending):
        assert loop.time() < deadline, "the LM cache never caught up with the history"

    def check(conv: Any) -> tuple[float, bool, int, int]:
        n = conv.cache_len
        assert n > 0 and conv.lm_session.position == n
        cached = conv.lm_session.history(0, n)
        assert torch.equal(cached, conv.history.matrix(0, n))
        fresh = lm.open_session()
        try:
            lm.prefill(fresh, conv.history.matrix(0, n))
            a = lm.pending_hidden(conv.lm_session).float()
            b = lm.pending_hidden(fresh).float()
            return float((a - b).abs().max()), bool(conv.lm_session.has_pending), n, conv.history.length
        finally:
            lm.close_session(fresh)

    diff, pending, cached, length = await session.inspect(check)
    assert pending and cached <= length
    assert diff < 1e-4
