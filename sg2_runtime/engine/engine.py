"""The engine: one device's models, one scheduler thread, every live call.

Transports call into :class:`Session` handles from their asyncio loops; commands reach the engine
thread through a queue, and each scheduler tick runs, batched across sessions:

1. codec encode of every session's new audio (one frame per session per round) and Silero VAD
   over the matching 32 ms windows; turn-taking reacts to the VAD;
2. LM prefill of history not yet in the cache, within a budget that shrinks while replies stream
   (decode has priority, so no reply stutters);
3. one batched LM step for every session whose reply is within its playback margin;
4. codec decode of the new 120 ms chunks.

A failure inside one session's logic ends that session with an error event; a failure of a
batched model call ends only the sessions in that batch. The loop itself keeps running.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import events as ev
from .base import FRAME
from .conversation import Conversation, SessionFailure
from .metrics import EngineMetrics
from .options import EngineConfig, SessionOptions
from .runner import Runner
from .session import Session

log = logging.getLogger("sg2.engine")

MAX_ENCODE_FRAMES = 25  # frames (40 ms each) encoded per session per tick at most: 1 s of backlog
MAX_DECODE_ROUNDS = 2
# commands that act at a point of the caller's audio timeline: they wait until every frame pushed
# before them is encoded and judged by the VAD (later commands of that session queue behind them)
TIMELINE_COMMANDS = frozenset({"text", "commit", "clear", "respond"})


class CapacityError(RuntimeError):
    """All session slots of this engine are in use."""


@dataclass
class EngineModels:
    """What the engine needs from the model side (see ``sg2_runtime.engine.models``)."""

    codec: Any
    lm: Any
    fmt: Any  # TurnFormat
    resolve_greeting: Callable[[SessionOptions], tuple[Any, torch.Tensor | None]]


@dataclass
class _Live:
    handle: Session
    slot: int
    conv: Conversation | None = None
    lm_session: Any = None
    deferred: deque[tuple[str, Any]] = field(default_factory=deque)  # commands waiting on the encoder


class Engine:
    def __init__(self, models: EngineModels, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.models = models
        lm = models.lm
        if self.config.max_sessions > lm.max_sessions or self.config.max_positions > lm.max_positions:
            raise ValueError(
                f"engine limits ({self.config.max_sessions} sessions x {self.config.max_positions} positions) "
                f"exceed the LM's KV pool ({lm.max_sessions} x {lm.max_positions})"
            )
        self.metrics = EngineMetrics()
        self.metrics.capacity.set(self.config.max_sessions)
        self.runner = Runner(models.codec, models.lm, self.config.max_sessions, self.config.vad_threads)
        self._commands: queue.SimpleQueue[tuple[str, str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._free_slots = list(range(self.config.max_sessions))
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._busy = 0.0
        self._busy_window_start = time.perf_counter()
        self.lm_steps = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sg2-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Close every session gracefully, then stop the thread."""
        with self._lock:
            ids = list(self._live)
        for sid in ids:
            self._submit(sid, "close", "shutdown")
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def __aenter__(self) -> Engine:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.shutdown)

    @property
    def running(self) -> bool:
        """The scheduler thread is alive (health checks)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def live_sessions(self) -> int:
        with self._lock:
            return len(self._live)

    @property
    def capacity_left(self) -> int:
        with self._lock:
            return len(self._free_slots)

    # ------------------------------------------------------------------ sessions
    def open_session(self, options: SessionOptions | dict | None = None) -> Session:
        """Open a call. Raises CapacityError when full, ValueError for invalid options."""
        if options is None:
            options = SessionOptions()
        elif isinstance(options, dict):
            options = SessionOptions.model_validate(options)
        greeting = self.models.resolve_greeting(options)  # validates the greeting choice now
        with self._lock:
            if not self._free_slots:
                self.metrics.sessions_refused.inc()
                raise CapacityError(f"engine at capacity ({self.config.max_sessions} live sessions)")
            slot = self._free_slots.pop(0)
            sid = f"sess_{next(self._ids):06d}"
            handle = Session(self, sid, options, self.config.max_input_backlog_ms)
            self._live[sid] = _Live(handle, slot)
        self.metrics.sessions_opened.inc()
        self.metrics.active_sessions.set(self.live_sessions)
        self._submit(sid, "open", greeting)
        return handle

    async def call(self, session_id: str, fn: Callable[[Conversation], Any]) -> Any:
        """Run ``fn(conversation)`` on the engine thread (inspection from asyncio code)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._submit(session_id, "call", (fn, loop, fut))
        return await fut

    def _submit(self, session_id: str, kind: str, payload: Any) -> None:
        self._commands.put((session_id, kind, payload))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while not self._stop or not self._commands.empty():
                self._drain_commands()
                t0 = time.perf_counter()
                worked = self._tick()
                self._account(time.perf_counter() - t0, worked)
                if not worked:
                    self._wake.wait(0.005 if self._any_clock_waiting() else 0.05)
                    self._wake.clear()
            self._close_all("shutdown")

    def _account(self, seconds: float, worked: bool) -> None:
        if worked:
            self._busy += seconds
            self.metrics.tick_seconds.observe(seconds)
        now = time.perf_counter()
        if now - self._busy_window_start >= 1.0:
            self.metrics.realtime_factor.set(self._busy / (now - self._busy_window_start))
            self._busy = 0.0
            self._busy_window_start = now

    def _any_clock_waiting(self) -> bool:
        return any(live.conv is not None and live.conv.response is not None for live in self._live.values())

    def _drain_commands(self) -> None:
        depth = 0
        while True:
            try:
                sid, kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            depth += 1
            live = self._live.get(sid)
            if kind == "call":
                self._run_call(live, payload)
                continue
            if live is None:
                continue
            if kind == "open":
                self._open(sid, live, payload)
            elif kind == "close":
                self._close(sid, payload or "closed by client")
            elif live.conv is not None:
                if live.deferred or (kind in TIMELINE_COMMANDS and live.conv.input_pending()):
                    live.deferred.append((kind, payload))
                else:
                    self._apply_client(sid, kind, payload)
        self.metrics.queue_depth.set(depth)

    def _apply_client(self, sid: str, kind: str, payload: Any) -> None:
        ref = payload if kind == "respond" else payload[0] if kind == "truncate" else None
        self._guard(sid, lambda conv: self._apply(conv, kind, payload), client=True, ref=ref)

    def _run_deferred(self, lives: list[tuple[str, _Live]]) -> None:
        """Apply queued commands whose audio has been fully processed, in order."""
        for sid, live in lives:
            while live.deferred and sid in self._live and live.conv is not None:
                kind, payload = live.deferred[0]
                if kind in TIMELINE_COMMANDS and live.conv.input_pending():
                    break
                live.deferred.popleft()
                self._apply_client(sid, kind, payload)

    @staticmethod
    def _apply(conv: Conversation, kind: str, payload: Any) -> None:
        if kind == "audio":
            conv.push_audio(payload)
        elif kind == "text":
            conv.push_text(*payload)
        elif kind == "commit":
            conv.commit()
        elif kind == "clear":
            conv.clear()
        elif kind == "interrupt":
            conv.interrupt()
        elif kind == "ack":
            conv.playback_ack(*payload)
        elif kind == "respond":
            conv.create_response(payload)
        elif kind == "truncate":
            conv.truncate_reply(*payload)

    def _run_call(self, live: _Live | None, payload: Any) -> None:
        fn, loop, fut = payload
        try:
            if live is None or live.conv is None:
                raise KeyError("no such live session")
            result, error = fn(live.conv), None
        except Exception as exc:  # delivered to the caller
            result, error = None, exc

        def finish() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        loop.call_soon_threadsafe(finish)

    def _open(self, sid: str, live: _Live, greeting: tuple[Any, torch.Tensor | None]) -> None:
        opts = live.handle.options
        try:
            seed = (
                opts.sampling.seed if opts.sampling.seed is not None else int(np.random.randint(0, 2**31 - 1))
            )
            live.lm_session = self.models.lm.open_session(sampling=_sampling_params(opts), seed=seed)
            self.runner.reset_slot(live.slot)
            live.conv = Conversation(
                session_id=sid,
                slot=live.slot,
                options=opts,
                fmt=self.models.fmt,
                capacity=self.config.max_positions,
                greeting=greeting[0],
                greeting_frames=greeting[1],
                emit=lambda event, handle=live.handle: self._observe(event, handle),
                lm_rollback=lambda pos, s=live: self.models.lm.rollback(s.lm_session, pos),
                high_water=self.config.context_high_water,
            )
            live.conv.lm_session = live.lm_session
        except Exception as exc:
            log.exception("opening session %s failed", sid)
            self._fail(sid, exc)

    def _observe(self, event: ev.Event, handle: Session) -> None:
        """Every conversation event passes here on its way out: the reply metrics are taken from it."""
        if isinstance(event, ev.Metrics):
            self.metrics.commit_to_first_audio.observe(event.commit_to_first_audio_ms / 1000)
            self.metrics.first_step.observe(event.first_step_ms / 1000)
            if event.endpointing_ms is not None:
                self.metrics.endpointing.observe(max(0.0, event.endpointing_ms) / 1000)
        elif isinstance(event, ev.ResponseDone):
            self.metrics.replies.labels(event.status).inc()
        handle._deliver(event)

    def _update(self, sid: str, conv: Conversation, new: SessionOptions, greeting: Any) -> list[str]:
        """Engine-thread half of ``Session.update``."""
        refused = conv.update_options(new, greeting[0])
        live = self._live[sid]
        live.lm_session.sampling = _sampling_params(new)
        return refused

    # ------------------------------------------------------------------ the tick
    def _tick(self) -> bool:
        lives = [(sid, live) for sid, live in self._live.items() if live.conv is not None]
        if not lives:
            return False
        worked = self._phase_encode(lives)
        worked |= self._phase_vad(lives)
        self._run_deferred(lives)
        worked |= self._phase_prefill(lives)
        worked |= self._phase_step(lives)
        worked |= self._phase_decode(lives)
        for sid, live in lives:
            if sid in self._live:
                self._guard(sid, lambda conv: conv.poll())
                live.handle.processed_ms = live.conv.frames_encoded * 40.0 if live.conv else 0.0
        return worked

    def _alive(self, lives: list[tuple[str, _Live]]) -> list[tuple[str, _Live]]:
        return [(sid, live) for sid, live in lives if sid in self._live and live.conv is not None]

    def _phase_encode(self, lives: list[tuple[str, _Live]]) -> bool:
        """Encode every session's pending audio, up to MAX_ENCODE_FRAMES frames each, with one codec
        call per distinct frame count. A session that fell behind (a busy moment, a burst of
        audio) catches up in one multi-frame call: per frame that costs a fraction of single
        frames (per-call overhead dominates a streaming step), so a backlog shrinks instead of
        making every following tick slower."""
        groups: dict[int, list[tuple[str, int, np.ndarray]]] = {}  # frames -> (sid, slot, audio)
        for sid, live in self._alive(lives):
            audio = live.conv.next_encode_input(MAX_ENCODE_FRAMES)
            if audio is not None:
                groups.setdefault(audio.size // FRAME, []).append((sid, live.slot, audio))
        for batch in groups.values():
            tokens = self._batched(
                [sid for sid, _, _ in batch],
                lambda b=batch: self.runner.encode([s for _, s, _ in b], np.stack([a for _, _, a in b])),
            )
            if tokens is None:
                continue
            for (sid, _, _), tok in zip(batch, tokens, strict=True):
                self._guard(sid, lambda conv, t=tok: conv.add_frames(t))
        return bool(groups)

    def _phase_vad(self, lives: list[tuple[str, _Live]]) -> bool:
        worked = False
        for _ in range(MAX_ENCODE_FRAMES * 2):
            batch = [(sid, live, live.conv.next_vad_window()) for sid, live in self._alive(lives)]
            batch = [(sid, live, w) for sid, live, w in batch if w is not None]
            if not batch:
                break
            worked = True
            probs = self._batched(
                [sid for sid, _, _ in batch],
                lambda b=batch: self.runner.vad_probs(
                    [lv.slot for _, lv, _ in b], np.stack([w for _, _, w in b])
                ),
            )
            if probs is None:
                continue
            for (sid, _live, _), p in zip(batch, probs, strict=True):
                self._guard(sid, lambda conv, p=float(p): conv.on_vad(p))
        return worked

    def _phase_prefill(self, lives: list[tuple[str, _Live]]) -> bool:
        alive = self._alive(lives)
        streaming = any(lv.conv.response is not None and lv.conv.response.generating for _, lv in alive)
        budget = self.config.prefill_budget_while_decoding if streaming else self.config.prefill_budget
        # replies waiting for their prompt tail go first: that wait is user-visible latency
        needy = sorted(
            ((sid, lv) for sid, lv in alive if lv.conv.prefill_need() > 0),
            key=lambda x: (x[1].conv.response is None, x[1].conv.prefill_need()),
        )
        items = []
        for sid, lv in needy:
            if budget <= 0:
                break
            n = min(lv.conv.prefill_need(), budget)
            items.append((sid, lv, n))
            budget -= n
        if not items:
            return False
        done = self._batched(
            [sid for sid, _, _ in items],
            lambda: self.runner.prefill([(lv.lm_session, lv.conv.prefill_slice(n)) for _, lv, n in items]),
            ok_none=True,
        )
        if done is not False:
            for sid, _lv, n in items:
                self._guard(sid, lambda conv, n=n: conv.on_prefilled(n))
                self.metrics.prefill_positions.inc(n)
        return True

    def _phase_step(self, lives: list[tuple[str, _Live]]) -> bool:
        batch = [(sid, lv) for sid, lv in self._alive(lives) if lv.conv.wants_step()]
        if not batch:
            return False
        t0 = time.perf_counter()
        outs = self._batched(
            [sid for sid, _ in batch], lambda: self.runner.step([lv.lm_session for _, lv in batch])
        )
        step_ms = (time.perf_counter() - t0) * 1000
        if outs is None:
            return True
        self.lm_steps += 1
        self.metrics.lm_step_seconds.observe(step_ms / 1000)
        self.metrics.lm_step_batch.observe(len(batch))
        for (sid, _lv), out in zip(batch, outs, strict=True):
            self._guard(sid, lambda conv, o=out: conv.on_step(o.text_id, o.speech.cpu(), o.finish, step_ms))
        return True

    def _phase_decode(self, lives: list[tuple[str, _Live]]) -> bool:
        worked = False
        for _ in range(MAX_DECODE_ROUNDS):
            batch = []
            for sid, lv in self._alive(lives):
                item = self._guard(sid, lambda conv: conv.next_decode())
                if item is not None:
                    batch.append((sid, lv, item[0], item[1]))
            if not batch:
                break
            worked = True
            pcm = self._batched(
                [sid for sid, *_ in batch],
                lambda b=batch: self.runner.decode(
                    [lv.slot for _, lv, _, _ in b],
                    [s for _, _, s, _ in b],
                    [lv.slot for _, lv, _, r in b if r],
                ),
            )
            if pcm is None:
                continue
            for (sid, _lv, _s, _r), chunk in zip(batch, pcm, strict=True):
                self._guard(sid, lambda conv, c=chunk: conv.on_decoded(c))
        return worked

    # ------------------------------------------------------------------ failures and closing
    def _batched(self, sids: list[str], fn: Callable[[], Any], ok_none: bool = False) -> Any:
        """Run one batched model call; on failure end only the sessions that were in the batch."""
        try:
            result = fn()
            return True if (ok_none and result is None) else result
        except Exception as exc:
            log.exception("batched model call failed for sessions %s", sids)
            for sid in sids:
                self._fail(sid, exc)
            return None if not ok_none else False

    def _guard(
        self, sid: str, fn: Callable[[Conversation], Any], client: bool = False, ref: str | None = None
    ) -> Any:
        """Run per-session logic; an exception ends this session only.

        With ``client=True`` (applying a client command) a ValueError is the client's mistake: it is
        reported as a non-fatal error event and the call goes on.
        """
        live = self._live.get(sid)
        if live is None or live.conv is None:
            return None
        try:
            return fn(live.conv)
        except ValueError as exc:
            if not client:
                log.exception("session %s failed", sid)
                self._fail(sid, exc)
                return None
            live.handle._deliver(ev.ErrorEvent("invalid_request", str(exc), ref=ref))
        except Exception as exc:
            log.exception("session %s failed", sid)
            self._fail(sid, exc)
        return None

    def _fail(self, sid: str, exc: Exception) -> None:
        live = self._live.get(sid)
        if live is None:
            return
        self.metrics.session_errors.inc()
        code = "session_limit" if isinstance(exc, SessionFailure) else "engine_error"
        conv = live.conv
        if conv is not None and conv.response is not None and not conv.response.done_sent:
            resp = conv.response
            live.handle._deliver(
                ev.ResponseDone(
                    resp.id,
                    "error",
                    resp.generated_ms,
                    resp.clock.played_ms(),
                    resp.text_emitted,
                    str(exc),
                    generated_positions=resp.generated_positions,
                )
            )
        live.handle._deliver(ev.ErrorEvent(code, f"{type(exc).__name__}: {exc}", fatal=True))
        self._close(sid, f"error: {exc}")

    def _close(self, sid: str, reason: str) -> None:
        with self._lock:
            live = self._live.pop(sid, None)
            if live is None:
                return
        try:
            if live.lm_session is not None:
                self.models.lm.close_session(live.lm_session)
        except Exception:  # the slot is gone either way
            log.exception("closing LM session of %s failed", sid)
        with self._lock:
            self._free_slots.append(live.slot)
            self._free_slots.sort()
        self.metrics.active_sessions.set(self.live_sessions)
        live.handle._closed = True
        live.handle._deliver(ev.SessionClosed(reason))

    def _close_all(self, reason: str) -> None:
        for sid in list(self._live):
            self._close(sid, reason)


def _sampling_params(opts: SessionOptions) -> Any:
    from sg2_runtime.lm import SamplingParams

    s = opts.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, greedy=s.greedy)
