"""The agent's voice as a WebRTC track: 20 ms frames at 48 kHz, paced in real time.

The engine hands over 120 ms chunks of 24 kHz audio per reply, up to ``output_margin_ms`` ahead of
playback. This track queues them (resampled to 48 kHz by a streaming soxr resampler per reply) and
gives aiortc one 20 ms frame every 20 ms, silence when there is nothing to play. Because it knows
exactly which samples it has handed to the encoder, it is the source of the playback
acknowledgements (``flow_control="ack"``): the engine never runs more than its margin ahead, and
a barge-in cuts the history to what the caller actually heard.

Control follows the engine's events: ``pause``/``resume`` (OutputPaused/OutputResumed: the caller
started talking, keep the audio), ``drop`` (interrupted/cancelled: the unplayed queue goes at
once, the very next frame is silence).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import soxr
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

log = logging.getLogger("sg2.direct.outbound")

RATE = 48000
FRAME = 960  # 20 ms at 48 kHz
FRAME_S = FRAME / RATE
TIME_BASE = fractions.Fraction(1, RATE)
MAX_LAG_S = 0.2  # further behind real time than this (a stalled loop), the clock is re-anchored


@dataclass
class _Reply:
    id: str
    resampler: soxr.ResampleStream
    chunks: deque[np.ndarray] = field(default_factory=deque)  # 48 kHz float32, not yet sent
    buffered: int = 0  # samples in ``chunks``
    sent: int = 0  # 48 kHz samples handed to the encoder
    input_ms: int = 0  # ms of 24 kHz audio received from the engine
    marks: deque[tuple[int, str]] = field(default_factory=deque)  # (48 kHz position, text)
    pending_text: str = ""
    done: bool = False  # the engine will send no more audio for it
    paused: bool = False
    started: bool = False
    acked_ms: int = -1


class PlaybackListener:
    """What the track reports, on the event loop, as it plays (override what you need)."""

    def on_ack(self, response_id: str, played_ms: int) -> None: ...

    def on_started(self, response_id: str) -> None: ...

    def on_text(self, response_id: str, text: str) -> None: ...

    def on_finished(self, response_id: str, played_ms: int) -> None: ...


class AgentAudioTrack(MediaStreamTrack):
    """Outbound audio track fed by engine events (all methods are called on the event loop)."""

    kind = "audio"

    def __init__(self, listener: PlaybackListener, *, clock: Callable[[], float] | None = None) -> None:
        super().__init__()
        self.listener = listener
        self._clock = clock
        self._reply: _Reply | None = None
        self._start: float | None = None
        self._frames = 0
        self.frames_sent = 0
        self.audio_frames_sent = 0
        self.resyncs = 0
        self.early_starts = 0
        self._idle_wait: asyncio.Future[bool] | None = None

    # ------------------------------------------------------------------ engine side
    @property
    def current(self) -> str | None:
        return self._reply.id if self._reply is not None else None

    def begin(self, response_id: str) -> None:
        """A new reply: whatever was still queued from another one is dropped (see ``drop``)."""
        if self._reply is not None and self._reply.id == response_id:
            return
        self._reply = _Reply(response_id, soxr.ResampleStream(24000, RATE, 1, dtype="float32", quality="HQ"))

    def add_text(self, response_id: str, text: str) -> None:
        """Text generated with the next audio chunk; reported when that chunk starts playing."""
        r = self._match(response_id)
        if r is not None:
            r.pending_text += text

    def add_chunk(self, response_id: str, start_ms: int, pcm24: np.ndarray) -> None:
        r = self._match(response_id)
        if r is None or r.done:
            return
        if r.pending_text:
            r.marks.append((start_ms * RATE // 1000, r.pending_text))
            r.pending_text = ""
        r.input_ms += len(pcm24) * 1000 // 24000
        self._append(r, r.resampler.resample_chunk(np.asarray(pcm24, dtype=np.float32)))
        self._wake_idle()

    def finish(self, response_id: str) -> None:
        """The engine generated the whole reply: play out what is queued, then report it finished."""
        r = self._match(response_id)
        if r is None or r.done:
            return
        r.done = True
        self._append(r, r.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        if r.pending_text:
            r.marks.append((r.buffered + r.sent, r.pending_text))
            r.pending_text = ""

    def pause(self, response_id: str) -> None:
        r = self._match(response_id)
        if r is not None:
            r.paused = True

    def resume(self, response_id: str) -> None:
        r = self._match(response_id)
        if r is not None:
            r.paused = False
            self._wake_idle()

    def _wake_idle(self) -> None:
        """Audio to play while the track sits between silent frames: send it now, not at the next
        20 ms slot (the frame clock restarts from here; the receiver just sees an early packet)."""
        r = self._reply
        fut = self._idle_wait
        if fut is not None and not fut.done() and r is not None and r.buffered and not r.paused:
            fut.set_result(True)

    def drop(self, response_id: str | None = None) -> int | None:
        """Forget the reply's unplayed audio now (barge-in, cancel); returns the ms it had played
        (None if that reply was not queued)."""
        r = self._reply
        if r is None or (response_id is not None and r.id != response_id):
            return None
        self._reply = None
        return min(r.sent * 1000 // RATE, r.input_ms)

    def queued_ms(self) -> float:
        r = self._reply
        return 0.0 if r is None else r.buffered * 1000 / RATE

    def _match(self, response_id: str) -> _Reply | None:
        r = self._reply
        return r if r is not None and r.id == response_id else None

    @staticmethod
    def _append(r: _Reply, samples: np.ndarray) -> None:
        if samples.size:
            r.chunks.append(samples)
            r.buffered += samples.size

    # ------------------------------------------------------------------ aiortc side
    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self._now()
        if self._start is None:
            self._start = now
        else:
            self._frames += 1
            wait = self._start + self._frames * FRAME_S - now
            if wait > 0 and self._playing():
                await asyncio.sleep(wait)
            elif wait > 0:
                if await self._sleep_unless_woken(wait):
                    self._start = self._now() - self._frames * FRAME_S
                    self.early_starts += 1
            elif wait < -MAX_LAG_S:
                self._start = now - self._frames * FRAME_S  # do not burst to catch up
                self.resyncs += 1
            if self.readyState != "live":
                raise MediaStreamError
        # what this frame carries is decided after the wait: a pause or drop acts on the next frame
        samples = self._next_samples()
        frame = AudioFrame.from_ndarray(samples.reshape(1, FRAME), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._frames * FRAME
        frame.time_base = TIME_BASE
        self.frames_sent += 1
        return frame

    def _playing(self) -> bool:
        r = self._reply
        return r is not None and not r.paused and r.buffered > 0

    async def _sleep_unless_woken(self, seconds: float) -> bool:
        """Sleep ``seconds``; True if audio arrived first (see ``_wake_idle``)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._idle_wait = fut
        timer = loop.call_later(seconds, lambda: fut.done() or fut.set_result(False))
        try:
            return await fut
        finally:
            timer.cancel()
            self._idle_wait = None

    def _next_samples(self) -> np.ndarray:
        out = np.zeros(FRAME, dtype=np.int16)
        r = self._reply
        if r is None or r.paused:
            return out
        filled = 0
        while filled < FRAME and r.chunks:
            head = r.chunks[0]
            k = min(FRAME - filled, head.size)
            out[filled : filled + k] = np.clip(head[:k] * 32767.0, -32768, 32767).astype(np.int16)
            filled += k
            if k == head.size:
                r.chunks.popleft()
            else:
                r.chunks[0] = head[k:]
        if filled:
            r.buffered -= filled
            r.sent += filled
            self.audio_frames_sent += 1
            if not r.started:
                r.started = True
                self.listener.on_started(r.id)
            while r.marks and r.marks[0][0] < r.sent:
                self.listener.on_text(r.id, r.marks.popleft()[1])
        if r.done and not r.chunks:
            while r.marks:
                self.listener.on_text(r.id, r.marks.popleft()[1])
            self._reply = None
            self._ack(r, r.input_ms)  # everything the engine emitted has been sent
            self.listener.on_finished(r.id, r.input_ms)
        elif filled:
            self._ack(r, min(r.sent * 1000 // RATE, r.input_ms))
        return out

    def _ack(self, r: _Reply, ms: int) -> None:
        if ms != r.acked_ms:
            r.acked_ms = ms
            self.listener.on_ack(r.id, ms)
