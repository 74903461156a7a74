"""The handle a transport holds for one call.

All methods are safe to call from an asyncio loop (they never wait for the model): input is
validated and resampled right here, then queued for the engine thread. Events come back through
``events()`` (async iterator) or ``next_event()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import events as ev
from .audio_input import AudioNormaliser
from .options import SessionOptions

if TYPE_CHECKING:
    from .engine import Engine


class SessionClosedError(RuntimeError):
    """The session has ended; no more input is accepted."""


class BackpressureError(RuntimeError):
    """Audio is arriving faster than the engine processes it, beyond the configured backlog."""


class Session:
    def __init__(self, engine: Engine, session_id: str, options: SessionOptions, max_backlog_ms: int) -> None:
        self.id = session_id
        self.options = options
        self._engine = engine
        self._normaliser = AudioNormaliser()
        self._lock = threading.Lock()
        self._closed = False
        self._max_backlog_ms = max_backlog_ms
        self.pushed_ms = 0.0
        self.processed_ms = 0.0  # updated by the engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._aqueue: asyncio.Queue[ev.Event] | None = asyncio.Queue() if self._loop else None
        self._squeue: queue.Queue[ev.Event] | None = None if self._loop else queue.Queue()

    # ---------------------------------------------------------------- input
    def push_audio(self, pcm: np.ndarray | bytes, sample_rate: int = 24000, channels: int = 1) -> None:
        """Queue caller audio (any supported rate, int16/int32/float, mono or interleaved)."""
        with self._lock:
            self._check_open()
            audio = self._normaliser.push(pcm, sample_rate, channels)
            if audio.codec.size == 0 and audio.non_finite == 0:
                return
            backlog = self.pushed_ms - self.processed_ms
            if backlog > self._max_backlog_ms:
                raise BackpressureError(
                    f"{backlog:.0f} ms of audio not yet processed (limit {self._max_backlog_ms} ms): "
                    "send audio no faster than real time"
                )
            self.pushed_ms += audio.codec.size / 24.0
            self._engine._submit(self.id, "audio", audio)

    def push_text(self, text: str, respond: bool = True) -> None:
        """A typed user turn (interrupting a reply in progress). ``respond=False``: it only enters the
        history, and the reply waits for :meth:`create_response`."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text turn must be a non-empty string")
        self._submit("text", (text, bool(respond)))

    def commit(self) -> None:
        """End the user's turn now, at the end of the audio pushed so far."""
        self._submit("commit", None)

    def create_response(self, response_id: str | None = None) -> None:
        """Start a reply now: to the user turn waiting for one (``auto_reply`` off), or the agent
        speaking first or again. ``response_id`` names it (else the engine picks one); a failure is an
        ``ErrorEvent`` whose ``ref`` is that id."""
        if response_id is not None and not (isinstance(response_id, str) and 0 < len(response_id) <= 64):
            raise ValueError("response_id must be a string of 1..64 characters")
        self._submit("respond", response_id)

    def truncate_reply(self, response_id: str, audio_ms: int) -> None:
        """The listener heard exactly ``audio_ms`` of this reply (the current or the latest finished
        one): cut its turn in history to that; answered by ``HistoryTruncated`` (or an ``ErrorEvent``
        whose ``ref`` is ``response_id``)."""
        if audio_ms < 0:
            raise ValueError("audio_ms must be >= 0")
        self._submit("truncate", (response_id, int(audio_ms)))

    def clear(self) -> None:
        """Drop user audio not yet committed."""
        self._submit("clear", None)

    def interrupt(self) -> None:
        """Cancel the reply in progress, keeping in history what was played."""
        self._submit("interrupt", None)

    def playback_ack(self, ms: int, response_id: str | None = None) -> None:
        """Report how much of a reply (default: the current one) the listener has heard."""
        if ms < 0:
            raise ValueError("played milliseconds must be >= 0")
        self._submit("ack", (int(ms), response_id))

    async def update(self, options: SessionOptions | dict) -> list[str]:
        """Change options mid-call; returns the fields that could not be changed now (see
        ``Conversation.update_options``). Invalid options raise ValueError and change nothing."""
        merged = (
            options.model_dump()
            if isinstance(options, SessionOptions)
            else {**self.options.model_dump(), **options}
        )
        new = SessionOptions.model_validate(merged)
        greeting = self._engine.models.resolve_greeting(new)
        refused, effective = await self._engine.call(
            self.id, lambda conv: (self._engine._update(self.id, conv, new, greeting), conv.opts)
        )
        self.options = effective  # what is in force: refused fields keep their old values
        return refused

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._engine._submit(self.id, "close", None)

    @property
    def closed(self) -> bool:
        return self._closed

    # ---------------------------------------------------------------- inspection (tests, server)
    async def history(self) -> torch.Tensor:
        """A copy of the conversation history matrix (4, 3*positions)."""
        return await self._engine.call(self.id, lambda conv: conv.history.matrix().clone())

    async def inspect(self, fn: Any) -> Any:
        """Run ``fn(conversation)`` on the engine thread and return its result."""
        return await self._engine.call(self.id, fn)

    # ---------------------------------------------------------------- output
    async def events(self) -> AsyncIterator[ev.Event]:
        """All events until the session closes (the last one is ``SessionClosed``)."""
        while True:
            event = await self.next_event()
            yield event
            if isinstance(event, ev.SessionClosed):
                return

    async def next_event(self, timeout: float | None = None) -> ev.Event:
        if self._aqueue is None:
            raise RuntimeError("this session was opened outside an event loop; use get_event()")
        return await asyncio.wait_for(self._aqueue.get(), timeout)

    def get_event(self, timeout: float | None = None) -> ev.Event:
        """Blocking variant for sessions opened outside asyncio (benchmarks, scripts)."""
        if self._squeue is None:
            raise RuntimeError("this session was opened inside an event loop; use next_event()")
        return self._squeue.get(timeout=timeout)

    def _deliver(self, event: ev.Event) -> None:
        """Called on the engine thread."""
        if isinstance(event, ev.SessionClosed):
            self._closed = True
        if self._aqueue is not None and self._loop is not None:
            # a RuntimeError means the transport's loop is gone: nobody is listening any more
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
        elif self._squeue is not None:
            self._squeue.put(event)

    def _submit(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._check_open()
        self._engine._submit(self.id, kind, payload)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError(f"session {self.id} is closed")
