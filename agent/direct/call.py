"""One browser call: an RTCPeerConnection, an engine session and the tracks between them.

Inbound: the caller's Opus track is decoded by aiortc and pushed to the session as it arrives.
Outbound: the session's events drive an :class:`AgentAudioTrack`, which paces the reply in real
time and acknowledges what it has sent. A data channel (opened by the page, label ``events``)
carries the JSON messages of :mod:`agent.direct.protocol`.

A call ends (``close``) on: DELETE, the peer closing its connection (tab closed), ICE/DTLS
failure, no media from the caller for ``media_timeout_s`` (the peer vanished), no connection
within ``connect_timeout_s``, the engine closing the session, or server shutdown. Closing is
idempotent and always releases the engine session.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from sg2_runtime.engine import events as ev
from sg2_runtime.engine.session import BackpressureError, Session, SessionClosedError

from . import protocol
from .metrics import DirectMetrics
from .outbound import AgentAudioTrack, PlaybackListener
from .settings import DirectSettings

log = logging.getLogger("sg2.direct.call")

CUT_STATUSES = ("interrupted", "cancelled", "error")
INPUT_TIMELINE_S = 120.0
SESSION_CLOSE_TIMEOUT_S = 5.0  # how far back arrival times of caller audio are remembered


@dataclass
class _ReplyInfo:
    response_id: str
    speech_end_wall: float | None = None  # loop time the end of the caller's turn arrived
    first_chunk_wall: float | None = None  # loop time the reply's first audio left the engine
    metrics: ev.Metrics | None = None
    first_audio_wall: float | None = None
    latency_sent: bool = False
    done: ev.ResponseDone | None = None


class DirectCall(PlaybackListener):
    def __init__(
        self,
        call_id: str,
        pc: RTCPeerConnection,
        session: Session,
        settings: DirectSettings,
        on_closed: Callable[[DirectCall], None],
        metrics: DirectMetrics | None = None,
    ) -> None:
        self.metrics = metrics or DirectMetrics()
        self.id = call_id
        self.pc = pc
        self.session = session
        self.settings = settings
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self.track = AgentAudioTrack(self)
        self.channel: Any = None
        self._backlog: deque[str] = deque(maxlen=settings.max_event_backlog)
        self.state: str | None = None
        self.created = self._loop.time()
        self.created_wall = time.time()
        self.connected_at: float | None = None
        self.last_media: float | None = None
        self.end_reason: str | None = None
        self.end_kind: str | None = None  # a short category of end_reason (metrics label)
        self._closing = False
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._pump_task: asyncio.Task[Any] | None = None
        self._closer: asyncio.Task[Any] | None = None
        self._pushed_ms = 0.0
        self._arrivals: deque[tuple[float, float]] = deque()  # (input ms at the end of a frame, loop time)
        self._turn_end_wall: dict[str, float | None] = {}
        self._replies: dict[str, _ReplyInfo] = {}
        self.latencies: list[dict[str, Any]] = []
        self._backpressure_reported = False
        self.inbound_frames = 0
        self._reading = False
        self._last_ack: tuple[str | None, int] = (None, 0)

        pc.on("connectionstatechange", self._on_connection_state)
        pc.on("datachannel", self._on_datachannel)
        pc.on("track", self._on_track)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the event pump and the watchdog (after the answer is set)."""
        self._send(protocol.encode("call", call_id=self.id, session_id=self.session.id))
        self._set_state("listening")
        self._pump_task = self._spawn(self._pump(), "pump")
        self._spawn(self._watchdog(), "watchdog")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro, name=f"direct-{self.id}-{name}")
        self._tasks.append(task)
        return task

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self, reason: str, kind: str = "other") -> None:
        """End the call (idempotent): tell the page, release the session, close the connection."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.end_reason = reason
        self.end_kind = kind
        log.info("call %s ending: %s", self.id, reason)
        try:
            self._send(protocol.encode("call_ended", reason=reason))
            await self._flush_channel()
            with contextlib.suppress(SessionClosedError):
                self.session.close()
            self.track.stop()
            current = asyncio.current_task()
            # the pump ends with the engine's SessionClosed: once it has, the engine slot is free
            pump = self._pump_task
            if pump is not None and pump is not current:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(pump), SESSION_CLOSE_TIMEOUT_S)
            for task in self._tasks:
                if task is not current:
                    task.cancel()
            for task in self._tasks:
                if task is not current:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            try:
                await asyncio.wait_for(self.pc.close(), 5.0)
            except Exception:  # the connection is gone either way
                log.exception("closing the peer connection of call %s failed", self.id)
        finally:
            self._closed.set()
            self._on_closed(self)

    async def _flush_channel(self, timeout: float = 0.25) -> None:
        """Give the last data-channel messages a moment to leave before the connection closes."""
        ch = self.channel
        if ch is None or ch.readyState != "open":
            return
        deadline = self._loop.time() + timeout
        while ch.bufferedAmount > 0 and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # let SCTP transmit what left the channel buffer

    def _close_soon(self, reason: str, kind: str) -> None:
        if not self._closing and self._closer is None:
            self._closer = self._loop.create_task(self.close(reason, kind), name=f"direct-{self.id}-close")

    async def _watchdog(self) -> None:
        s = self.settings
        period = min(0.25, s.media_timeout_s / 4, s.connect_timeout_s / 4)
        while not self._closing:
            now = self._loop.time()
            if self.connected_at is None:
                if now - self.created > s.connect_timeout_s:
                    self._close_soon(f"not connected within {s.connect_timeout_s:g} s", "connect_timeout")
                    return
            else:
                last = max(self.last_media or 0.0, self.connected_at)
                if now - last > s.media_timeout_s:
                    self._close_soon(
                        f"no audio from the caller for {s.media_timeout_s:g} s (peer gone)", "media_timeout"
                    )
                    return
            await asyncio.sleep(period)

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session_id": self.session.id,
            "connection": self.pc.connectionState,
            "state": self.state,
            "age_s": round(self._loop.time() - self.created, 3),
            "inbound_frames": self.inbound_frames,
            "outbound_frames": self.track.frames_sent,
            "data_channel": self.channel is not None and self.channel.readyState == "open",
        }

    # ------------------------------------------------------------------ peer connection
    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.connected_at is None:
            self.connected_at = self._loop.time()
        elif state == "failed":
            self._close_soon("connection failed (ICE/DTLS)", "connection_failed")
        elif state == "closed":
            self._close_soon("connection closed by the peer", "peer_closed")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not self._reading:
            self._reading = True  # one caller voice per call: the first audio section
            self._spawn(self._read_inbound(track), "inbound")

    def _on_datachannel(self, channel: Any) -> None:
        if self.channel is not None:
            return  # one events channel per call; others are ignored
        self.channel = channel
        channel.on("message", self._on_client_message)
        if channel.readyState == "open":
            self._flush_backlog()
        else:
            channel.on("open", self._flush_backlog)

    def _flush_backlog(self) -> None:
        while self._backlog and self.channel is not None and self.channel.readyState == "open":
            self.channel.send(self._backlog.popleft())

    def _send(self, message: str) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            self._flush_backlog()
            ch.send(message)
        else:
            self._backlog.append(message)

    def _on_client_message(self, raw: str | bytes) -> None:
        try:
            msg = protocol.decode_client_message(raw)
            if msg["type"] == "ping":
                self._send(protocol.encode("pong", t=msg.get("t")))
            elif msg["type"] == "interrupt":
                self.session.interrupt()
            elif msg["type"] == "text":
                self.session.push_text(msg["text"])
        except (protocol.ClientMessageError, UnicodeDecodeError, ValueError) as exc:
            self._send(protocol.encode("error", code="invalid_message", message=str(exc), fatal=False))
        except SessionClosedError:
            pass

    # ------------------------------------------------------------------ caller audio
    async def _read_inbound(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = self._loop.time()
            self.last_media = now
            self.inbound_frames += 1
            pcm = frame.to_ndarray().reshape(-1)
            channels = len(frame.layout.channels)
            try:
                self.session.push_audio(pcm, frame.sample_rate, channels)
            except BackpressureError as exc:
                if not self._backpressure_reported:
                    self._backpressure_reported = True
                    log.warning("call %s: %s", self.id, exc)
                    self._send(protocol.encode("error", code="overloaded", message=str(exc), fatal=False))
                continue  # audio the engine cannot take is dropped
            except SessionClosedError:
                return
            self._pushed_ms += frame.samples * 1000.0 / frame.sample_rate
            self.metrics.input_audio.inc(frame.samples / frame.sample_rate)
            self._arrivals.append((self._pushed_ms, now))
            while self._arrivals and now - self._arrivals[0][1] > INPUT_TIMELINE_S:
                self._arrivals.popleft()

    def _arrival_of(self, input_ms: float) -> float | None:
        """Loop time at which caller audio up to ``input_ms`` had arrived."""
        if not self._arrivals or input_ms < self._arrivals[0][0] - 20:
            return None
        i = bisect.bisect_left(self._arrivals, (input_ms, float("-inf")))
        return self._arrivals[min(i, len(self._arrivals) - 1)][1]

    # ------------------------------------------------------------------ engine events
    async def _pump(self) -> None:
        reason = "session closed"
        try:
            async for event in self.session.events():
                if isinstance(event, ev.SessionClosed):
                    reason = f"session closed: {event.reason}"
                    break
                try:
                    self._on_event(event)
                except Exception:
                    log.exception("call %s: handling %s failed", self.id, event.type)
        finally:
            self._close_soon(reason, "session_closed")

    def _on_event(self, e: ev.Event) -> None:
        send = self._send
        if isinstance(e, ev.AudioChunk):
            if e.index == 0:
                info = self._replies.get(e.response_id)
                if info is not None and info.first_chunk_wall is None:
                    info.first_chunk_wall = self._loop.time()
            self.track.add_chunk(e.response_id, e.start_ms, e.pcm)
        elif isinstance(e, ev.TextDelta):
            self.track.add_text(e.response_id, e.text)
        elif isinstance(e, ev.SpeechStarted):
            send(protocol.encode("speech_started", audio_ms=e.audio_start_ms))
        elif isinstance(e, ev.SpeechStopped):
            send(protocol.encode("speech_stopped", audio_ms=e.audio_end_ms))
        elif isinstance(e, ev.TurnCommitted):
            # latency counts from the end of the caller's speech as it arrived (a typed turn: now)
            end = self._arrival_of(e.audio_end_ms) if e.kind == "audio" else self._loop.time()
            self._turn_end_wall[e.turn_id] = end
            send(
                protocol.encode(
                    "turn_committed",
                    turn_id=e.turn_id,
                    kind=e.kind,
                    start_ms=e.audio_start_ms,
                    end_ms=e.audio_end_ms,
                    reason=e.reason,
                )
            )
            self._set_state("thinking")
        elif isinstance(e, ev.TurnDiscarded):
            send(protocol.encode("turn_discarded", turn_id=e.turn_id))
        elif isinstance(e, ev.ResponseStarted):
            old = self.track.current
            if old is not None and old != e.response_id:
                # a reply still queued (e.g. a greeting cut by the caller after it was fully
                # generated, which the engine does not report again) ends here
                played = self.track.drop(old)
                self._reply_ended(old, "interrupted", played or 0, None)
            self.track.begin(e.response_id)
            info = _ReplyInfo(e.response_id)
            if e.turn_id is not None:
                info.speech_end_wall = self._turn_end_wall.pop(e.turn_id, None)
            self._replies[e.response_id] = info
            send(
                protocol.encode(
                    "response_started", response_id=e.response_id, turn_id=e.turn_id, greeting=e.greeting
                )
            )
        elif isinstance(e, ev.OutputPaused):
            self.track.pause(e.response_id)
            send(protocol.encode("output_paused", response_id=e.response_id))
            self._set_state("listening")
        elif isinstance(e, ev.OutputResumed):
            self.track.resume(e.response_id)
            send(protocol.encode("output_resumed", response_id=e.response_id))
            if self.track.current == e.response_id:
                self._set_state("speaking")
        elif isinstance(e, ev.ResponseDone):
            self._on_response_done(e)
        elif isinstance(e, ev.HistoryTruncated):
            if self.track.drop(e.response_id) is not None:
                self._reply_ended(e.response_id, "interrupted", e.played_ms, None)
        elif isinstance(e, ev.Metrics):
            info = self._replies.get(e.response_id)
            if info is not None:
                info.metrics = e
                self._maybe_send_latency(info)
        elif isinstance(e, ev.ErrorEvent):
            send(protocol.encode("error", code=e.code, message=e.message, fatal=e.fatal))

    def _on_response_done(self, e: ev.ResponseDone) -> None:
        info = self._replies.get(e.response_id)
        if e.status in CUT_STATUSES or info is None or self.track.current != e.response_id:
            self.track.drop(e.response_id)
            self._reply_ended(e.response_id, e.status, e.played_ms, e.text)
            return
        info.done = e
        self.track.finish(e.response_id)  # response_done is sent once it has played out

    def _reply_ended(self, response_id: str, status: str, played_ms: int, text: str | None) -> None:
        self._replies.pop(response_id, None)
        self._send(
            protocol.encode(
                "response_done", response_id=response_id, status=status, played_ms=played_ms, text=text
            )
        )
        if self.track.current is None and self.state != "thinking":
            self._set_state("listening")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._send(protocol.encode("state", state=state))

    # ------------------------------------------------------------------ playback (from the track)
    def on_ack(self, response_id: str, played_ms: int) -> None:
        last_id, last_ms = self._last_ack
        sent = played_ms - (last_ms if last_id == response_id else 0)
        self._last_ack = (response_id, played_ms)
        if sent > 0:
            self.metrics.output_audio.inc(sent / 1000.0)
        with contextlib.suppress(SessionClosedError):
            self.session.playback_ack(played_ms, response_id)

    def on_started(self, response_id: str) -> None:
        self._set_state("speaking")
        info = self._replies.get(response_id)
        if info is not None:
            info.first_audio_wall = self._loop.time()
            self._maybe_send_latency(info)

    def on_text(self, response_id: str, text: str) -> None:
        self._send(protocol.encode("agent_text", response_id=response_id, text=text))

    def on_finished(self, response_id: str, played_ms: int) -> None:
        info = self._replies.get(response_id)
        done = info.done if info is not None else None
        status = done.status if done is not None else "completed"
        text = done.text if done is not None else None
        self._reply_ended(response_id, status, played_ms, text)

    def _maybe_send_latency(self, info: _ReplyInfo) -> None:
        """Per reply, on the server's clock: the end of the caller's speech arrived -> the reply's
        first frame went to the encoder (``total_ms``) = endpointing (the VAD's silence wait, on the
        audio timeline) + engine (everything else until the first audio left the engine: input
        framing, VAD, commit, prefill/steps/decode not done speculatively) + transport (the outbound
        track: queue and pacing). ``model_ms`` is the engine's own commit -> first audio figure."""
        m = info.metrics
        if (
            info.latency_sent
            or m is None
            or info.first_audio_wall is None
            or info.speech_end_wall is None
            or info.first_chunk_wall is None
        ):
            return
        info.latency_sent = True
        total = (info.first_audio_wall - info.speech_end_wall) * 1000.0
        endpointing = m.endpointing_ms or 0.0
        transport = (info.first_audio_wall - info.first_chunk_wall) * 1000.0
        record = {
            "response_id": info.response_id,
            "total_ms": round(total, 1),
            "endpointing_ms": round(endpointing, 1),
            "engine_ms": round(total - endpointing - transport, 1),
            "transport_ms": round(transport, 1),
            "model_ms": round(m.commit_to_first_audio_ms, 1),
        }
        self.latencies.append(record)
        self.metrics.first_audio.observe(total / 1000.0)
        self.metrics.track_delay.observe(transport / 1000.0)
        self._send(protocol.encode("latency", **record))
