"""One Realtime WebSocket = one engine session.

Three coroutines per call: the reader (client events -> engine commands), the pump (engine events
-> server events) and the sender (the only writer of the socket, fed by one queue so server events
keep their order). When the client goes away — a close frame, a dropped TCP connection, missed
heartbeats, an idle or send timeout — the engine session is closed at once, so its slot is free
for the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from pydantic import ValidationError

from sg2_runtime.engine import events as ev
from sg2_runtime.engine.audio_input import AudioFormatError
from sg2_runtime.engine.engine import CapacityError, Engine
from sg2_runtime.engine.session import BackpressureError, Session, SessionClosedError

from .config import Settings
from .metrics import ServerMetrics
from .protocol import (
    MIN_COMMIT_MS,
    POSITION_MS,
    SAMPLE_RATE,
    ClientConfig,
    ProtocolError,
    assistant_item,
    check_format,
    check_modalities,
    decode_audio,
    encode_audio,
    error_event,
    error_from,
    max_output_tokens,
    new_id,
    pcm_ms,
    response_object,
    response_status,
    server_event,
    session_object,
    session_update_patch,
    usage_object,
    user_item,
    user_text_from_item,
)

log = logging.getLogger("sg2.server.realtime")

THROTTLED_ERROR_INTERVAL_S = 1.0


@dataclass
class _Close:
    code: int
    reason: str


@dataclass
class _Requested:
    event_id: str | None
    metadata: dict[str, Any] | None
    modalities: list[str]


@dataclass
class _Reply:
    id: str
    item_id: str
    modalities: list[str]
    metadata: dict[str, Any] | None
    context_positions: int
    previous_item_id: str | None
    commit_time: float | None
    transcript: list[str] = field(default_factory=list)
    audio_ms: float = 0.0
    first_audio_sent: bool = False

    @property
    def audio(self) -> bool:
        return "audio" in self.modalities


@dataclass
class _Item:
    item: dict[str, Any]
    previous_item_id: str | None
    response_id: str | None = None  # assistant items
    audio_ms: float = 0.0  # assistant audio sent so far

    @property
    def role(self) -> str:
        return self.item["role"]


class _RateMeter:
    """Input audio admitted at most ``rate`` x real time since the call began, plus a burst."""

    def __init__(self, rate: float, burst_ms: float) -> None:
        self.rate = rate
        self.burst_ms = burst_ms
        self.start = time.monotonic()
        self.admitted_ms = 0.0

    def admit(self, ms: float) -> bool:
        allowed = (time.monotonic() - self.start) * 1000.0 * self.rate + self.burst_ms
        if self.admitted_ms + ms > allowed:
            return False
        self.admitted_ms += ms
        return True


class _EventBucket:
    """Token bucket on client events per second (any type)."""

    def __init__(self, per_s: float, burst: float) -> None:
        self.per_s = per_s
        self.burst = burst
        self.tokens = burst
        self.last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_s)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class RealtimeCall:
    """The server side of one Realtime WebSocket."""

    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        engine: Engine,
        settings: Settings,
        metrics: ServerMetrics,
        registry: dict[str, RealtimeCall],
    ) -> None:
        self.request = request
        self.ws = ws
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.id = new_id("sess")
        self.conversation_id = new_id("conv")
        rt = settings.realtime
        self.options = rt.session_defaults()
        self._default_max_ms = self.options.max_response_ms
        self.cfg = ClientConfig(voice=rt.default_voice)
        self.session: Session | None = None
        self._out: asyncio.Queue[tuple[str, float | None] | _Close] = asyncio.Queue()
        self._closing = False
        self._engine_closed: str | None = None
        self._meter = _RateMeter(rt.input_rate_limit, rt.input_burst_ms)
        srv = settings.server
        self._events = _EventBucket(srv.max_client_events_per_s, srv.max_client_events_per_s * 4)
        self._throttled: dict[str, float] = {}
        # conversation state as the client sees it
        self._items: OrderedDict[str, _Item] = OrderedDict()
        self._last_item_id: str | None = None
        self._pending_user_item: str | None = None
        self._pending_text: deque[dict[str, Any]] = deque()
        self._requested: dict[str, _Requested] = {}
        self._reply: _Reply | None = None
        self._truncations: dict[str, tuple[str | None, str, int]] = {}
        self._deletions: dict[str, tuple[str | None, str]] = {}
        self._buffered_ms = 0.0
        self._last_commit_time: float | None = None
        self._handlers = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.retrieve": self._item_retrieve,
            "conversation.item.truncate": self._item_truncate,
            "conversation.item.delete": self._item_delete,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "output_audio_buffer.clear": self._output_clear,
        }

    # ================================================================== lifecycle
    async def run(self) -> None:
        try:
            self.session = self.engine.open_session(self.options)
        except CapacityError as exc:
            self.metrics.connections.labels("refused_capacity").inc()
            await self._refuse("session_capacity_exceeded", f"{exc}; try again later", 1013)
            return
        except ValueError as exc:  # the configured session defaults do not fit these models
            self.metrics.connections.labels("refused_config").inc()
            await self._refuse("server_misconfigured", f"cannot open a session: {exc}", 1011)
            return
        self.metrics.connections.labels("accepted").inc()
        self.metrics.active.inc()
        self.registry[self.id] = self
        log.info("call %s opened (engine session %s)", self.id, self.session.id)
        sender = asyncio.create_task(self._sender(), name=f"sg2-send-{self.id}")
        pump = asyncio.create_task(self._pump(), name=f"sg2-pump-{self.id}")
        self._emit(server_event("session.created", session=self._session_object()))
        reason = "error"
        try:
            reason = await self._read_loop()
        finally:
            self.session.close()  # frees the engine slot now, whatever happens next
            self.registry.pop(self.id, None)
            self.metrics.active.dec()
            self.metrics.closes.labels(reason).inc()
            pump.cancel()
            if not sender.done():
                code = {"idle_timeout": 1000, "shutdown": 1001}.get(reason, 1000)
                if self._engine_closed is not None and reason == "engine_closed":
                    code = 1011 if self._engine_closed.startswith("error") else 1000
                self._out.put_nowait(_Close(code, reason))
                try:
                    await asyncio.wait_for(sender, self.settings.server.send_timeout_s)
                except (TimeoutError, asyncio.CancelledError):
                    sender.cancel()
                    self._abort()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            log.info("call %s closed: %s", self.id, reason)

    async def shutdown(self) -> None:
        """Server shutdown: tell the client, then close (the reader loop ends on the close)."""
        if self._closing:
            return
        self._emit(error_event("server_shutting_down", "the server is shutting down", type_="server_error"))
        self._out.put_nowait(_Close(1001, "server shutting down"))

    async def _refuse(self, code: str, message: str, close_code: int) -> None:
        self.metrics.errors.labels(code).inc()
        with contextlib.suppress(Exception):
            await self.ws.send_str(json.dumps(error_event(code, message, type_="server_error")))
            await self.ws.close(code=close_code, message=message[:120].encode())

    def _abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def _read_loop(self) -> str:
        idle = self.settings.server.idle_timeout_s
        while True:
            try:
                async with asyncio.timeout(idle):
                    msg = await self.ws.receive()
            except TimeoutError:
                self._emit_error("idle_timeout", f"no client event for {idle:g} s; closing the call")
                return "idle_timeout"
            if msg.type == WSMsgType.TEXT:
                await self._handle_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self._emit_error(
                    "invalid_message", "binary frames are not part of the protocol; send JSON text"
                )
            elif msg.type == WSMsgType.ERROR:
                log.info("call %s: websocket error %s", self.id, msg.data)
                return "protocol_error"
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return (
                    "engine_closed"
                    if self._engine_closed is not None
                    else ("shutdown" if self._closing else "client_closed")
                )

    async def _sender(self) -> None:
        timeout = self.settings.server.send_timeout_s
        while True:
            item = await self._out.get()
            if isinstance(item, _Close):
                self._closing = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.ws.close(code=item.code, message=item.reason.encode()), timeout
                    )
                return
            data, t_engine = item
            try:
                await asyncio.wait_for(self.ws.send_str(data), timeout)
            except TimeoutError:
                log.warning("call %s: client not reading for %.0f s; dropping it", self.id, timeout)
                self.metrics.closes.labels("send_timeout").inc()
                self._abort()
                return
            except (ConnectionError, RuntimeError):
                return  # the client is gone; the reader sees the close
            if t_engine is not None:
                self.metrics.send_lag.observe(time.perf_counter() - t_engine)

    def _emit(self, event: dict[str, Any], t_engine: float | None = None) -> None:
        if self._out.qsize() >= self.settings.server.max_outbound_events:
            if not self._closing:
                log.warning(
                    "call %s: %d server events unread; dropping the client", self.id, self._out.qsize()
                )
                self._closing = True
                self._abort()
            return
        if event["type"] == "error":
            self.metrics.errors.labels(event["error"]["code"]).inc()
        self._out.put_nowait((json.dumps(event, ensure_ascii=False), t_engine))

    def _emit_error(self, code: str, message: str, **kw: Any) -> None:
        self._emit(error_event(code, message, **kw))

    def _emit_throttled(self, code: str, message: str) -> None:
        now = time.monotonic()
        if now - self._throttled.get(code, -1e9) >= THROTTLED_ERROR_INTERVAL_S:
            self._throttled[code] = now
            self._emit_error(code, message)

    # ================================================================== client events
    async def _handle_text(self, data: str) -> None:
        if len(data) > self.settings.server.max_message_bytes:
            self.metrics.client_event("oversized")
            self._emit_error(
                "message_too_large",
                f"event of {len(data)} bytes exceeds the {self.settings.server.max_message_bytes}-byte limit; "
                "ignored (send audio in smaller appends)",
            )
            return
        if not self._events.take():
            self._emit_throttled("rate_limit_exceeded", "too many client events per second; events dropped")
            return
        try:
            event = json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            self.metrics.client_event("invalid")
            self._emit_error("invalid_json", f"event is not valid JSON: {exc}")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.metrics.client_event("invalid")
            self._emit_error("invalid_event", "an event must be a JSON object with a string 'type'")
            return
        type_ = event["type"]
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        self.metrics.client_event(type_)
        handler = self._handlers.get(type_)
        if handler is None:
            self._emit_error(
                "unknown_event",
                f"unknown or unsupported client event type {type_!r}",
                param="type",
                event_id=event_id,
            )
            return
        try:
            result = handler(event, event_id)
            if asyncio.iscoroutine(result):
                await result
        except ProtocolError as exc:
            self._emit(error_from(exc, event_id))
        except BackpressureError as exc:
            self._emit_throttled("input_audio_backlog", str(exc))
        except (SessionClosedError, KeyError):
            pass  # the engine ended the call; the pump closes the socket
        except (ValueError, AudioFormatError) as exc:
            self._emit_error("invalid_value", str(exc), event_id=event_id)
        except Exception:  # a bug must cost this one event, not the call
            log.exception("call %s: handling %s failed", self.id, type_)
            self._emit_error(
                "server_error", f"internal error handling {type_}", event_id=event_id, type_="server_error"
            )

    async def _session_update(self, event: dict[str, Any], event_id: str | None) -> None:
        assert self.session is not None
        rt = self.settings.realtime
        patch, cfg, ignored = session_update_patch(
            event.get("session"), self.options, self.cfg, rt.voices, self._default_max_ms
        )
        try:
            refused = await self.session.update(patch) if patch else []
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'session'}: {e['msg']}" for e in exc.errors()
            )
            raise ProtocolError(
                "invalid_value", f"invalid session settings: {problems}", param="session"
            ) from exc
        self.options = self.session.options
        if "greeting" in refused:
            cfg.voice = self.cfg.voice
        self.cfg = cfg
        self._emit(server_event("session.updated", session=self._session_object()))
        if ignored:
            log.info("call %s: settings not supported, reported as in force: %s", self.id, ", ".join(ignored))
        if refused:
            names = ["voice" if f == "greeting" else f for f in refused]
            self._emit_error(
                "session_field_locked",
                f"{', '.join(names)} can only change before the first user turn (they head the model's "
                "prompt); the current value is kept",
                param="session",
                event_id=event_id,
            )

    def _append(self, event: dict[str, Any], event_id: str | None) -> None:
        assert self.session is not None
        raw = decode_audio(event.get("audio"))
        if not raw:
            return
        ms = pcm_ms(len(raw))
        if not self._meter.admit(ms):
            self._emit_throttled(
                "input_audio_rate_exceeded",
                f"audio is arriving faster than {self._meter.rate:g}x real time beyond a "
                f"{self._meter.burst_ms / 1000:g} s burst; the excess is dropped",
            )
            return
        self.session.push_audio(raw, SAMPLE_RATE)
        self._buffered_ms += ms
        self.metrics.input_audio.inc(ms / 1000.0)

    def _commit(self, event: dict[str, Any], event_id: str | None) -> None:
        assert self.session is not None
        if self._buffered_ms < MIN_COMMIT_MS:
            raise ProtocolError(
                "input_audio_buffer_commit_empty",
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, "
                f"but the buffer has {self._buffered_ms:.0f} ms",
            )
        if self._pending_user_item is None:
            self._pending_user_item = new_id("item")
        self.session.commit()
        self._buffered_ms = 0.0

    def _clear(self, event: dict[str, Any], event_id: str | None) -> None:
        assert self.session is not None
        self.session.clear()
        self._buffered_ms = 0.0
        self._pending_user_item = None
        self._emit(server_event("input_audio_buffer.cleared"))

    def _item_create(self, event: dict[str, Any], event_id: str | None) -> None:
        assert self.session is not None
        item = event.get("item")
        text = user_text_from_item(item)
        prev = event.get("previous_item_id")
        tail = self._pending_text[-1]["id"] if self._pending_text else self._last_item_id
        if prev is not None and prev != tail and not (prev == "root" and tail is None):
            raise ProtocolError(
                "unsupported_insertion",
                "items can only be appended at the end of the conversation "
                f"(previous_item_id must be {tail or 'root'!r})",
                param="previous_item_id",
            )
        item_id = item.get("id") or new_id("item")
        if not isinstance(item_id, str) or len(item_id) > 64:
            raise ProtocolError(
                "invalid_value", "item.id must be a string of at most 64 characters", param="item.id"
            )
        if item_id in self._items or any(p["id"] == item_id for p in self._pending_text):
            raise ProtocolError(
                "item_create_duplicate_item_id",
                f"an item with id {item_id!r} already exists",
                param="item.id",
            )
        self.session.push_text(text, respond=False)
        self._pending_text.append(user_item(item_id, [{"type": "input_text", "text": text}]))

    def _item_retrieve(self, event: dict[str, Any], event_id: str | None) -> None:
        rec = self._item_or_error(event.get("item_id"))
        self._emit(server_event("conversation.item.retrieved", item=rec.item))

    def _item_or_error(self, item_id: Any) -> _Item:
        rec = self._items.get(item_id) if isinstance(item_id, str) else None
        if rec is None:
            raise ProtocolError("item_not_found", f"no item with id {item_id!r}", param="item_id")
        return rec

    def _item_truncate(self, event: dict[str, Any], event_id: str | None) -> None:
        assert self.session is not None
        item_id = event.get("item_id")
        rec = self._item_or_error(item_id)
        if rec.role != "assistant" or rec.response_id is None:
            raise ProtocolError("invalid_value", "only assistant messages can be truncated", param="item_id")
        if event.get("content_index", 0) != 0:
            raise ProtocolError("invalid_value", "content_index must be 0", param="content_index")
        ms = event.get("audio_end_ms")
        if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
            raise ProtocolError("invalid_value", "audio_end_ms must be an integer >= 0", param="audio_end_ms")
        if ms > rec.audio_ms + 1:
            raise ProtocolError(
                "invalid_value",
                f"audio_end_ms {ms} is greater than the audio sent for this item ({rec.audio_ms:.0f} ms)",
                param="audio_end_ms",
            )
        self._truncations[rec.response_id] = (event_id, item_id, ms)
        self.session.truncate_reply(rec.response_id, ms)

    def _item_delete(self, event: dict[str, Any], event_id: str | None) -> None:
        assert self.session is not None
        item_id = event.get("item_id")
        rec = self._item_or_error(item_id)
        if rec.role != "assistant" or rec.response_id is None:
            raise ProtocolError(
                "item_delete_unsupported",
                "user turns are part of the model's context and cannot be deleted; only the latest "
                "assistant reply can (it is cut to nothing)",
                param="item_id",
            )
        self._deletions[rec.response_id] = (event_id, item_id)
        self.session.truncate_reply(rec.response_id, 0)

    def _response_create(self, event: dict[str, Any], event_id: str | None) -> None:
        assert self.session is not None
        params = event.get("response") or {}
        if not isinstance(params, dict):
            raise ProtocolError("invalid_value", "response must be an object", param="response")
        if params.get("conversation") not in (None, "auto"):
            raise ProtocolError(
                "unsupported_value",
                "out-of-band responses are not supported: every reply is part of the conversation",
                param="response.conversation",
            )
        if params.get("input") is not None:
            raise ProtocolError(
                "unsupported_value", "a custom response input is not supported", param="response.input"
            )
        modalities = list(self.cfg.output_modalities)
        if params.get("output_modalities") is not None:
            modalities = check_modalities(params["output_modalities"], "response.output_modalities")
        out_audio = (
            ((params.get("audio") or {}).get("output") or {}) if isinstance(params.get("audio"), dict) else {}
        )
        check_format(
            out_audio.get("format") if isinstance(out_audio, dict) else None, "response.audio.output.format"
        )
        metadata = params.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ProtocolError("invalid_value", "metadata must be an object", param="response.metadata")
        if self._reply is not None:
            raise ProtocolError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self._reply.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        response_id = new_id("resp")
        self._requested[response_id] = _Requested(event_id, metadata, modalities)
        self.session.create_response(response_id)

    def _response_cancel(self, event: dict[str, Any], event_id: str | None) -> None:
        assert self.session is not None
        target = event.get("response_id")
        active = self._reply.id if self._reply is not None else None
        if target is None:
            if active is None and not self._requested:
                raise ProtocolError(
                    "response_cancel_not_active", "Cancellation failed: no active response found"
                )
        elif target != active and target not in self._requested:
            raise ProtocolError(
                "response_cancel_not_active",
                f"Cancellation failed: no active response found with id {target!r}",
                param="response_id",
            )
        self.session.interrupt()

    def _output_clear(self, event: dict[str, Any], event_id: str | None) -> None:
        raise ProtocolError(
            "unsupported_event",
            "output_audio_buffer.clear is for WebRTC/SIP connections; over a WebSocket, stop playback "
            "locally, then send response.cancel and conversation.item.truncate",
            param="type",
        )

    # ================================================================== engine events
    async def _pump(self) -> None:
        assert self.session is not None
        try:
            async for event in self.session.events():
                try:
                    self._on_engine_event(event, time.perf_counter())
                except Exception:  # a bug here must not leave the client hanging silently
                    log.exception("call %s: failed to translate %s", self.id, event.type)
                    self._emit_error(
                        "server_error", "internal error translating an engine event", type_="server_error"
                    )
        except asyncio.CancelledError:
            raise

    def _on_engine_event(self, e: ev.Event, t: float) -> None:
        if isinstance(e, ev.AudioChunk):
            self._on_audio(e, t)
        elif isinstance(e, ev.TextDelta):
            self._on_text(e.response_id, e.text, t)
        elif isinstance(e, ev.SpeechStarted):
            if self._pending_user_item is None:
                self._pending_user_item = new_id("item")
            start = max(0, e.audio_start_ms - self.options.turn_detection.prefix_padding_ms)
            self._emit(
                server_event(
                    "input_audio_buffer.speech_started", audio_start_ms=start, item_id=self._pending_user_item
                ),
                t,
            )
        elif isinstance(e, ev.SpeechStopped):
            if self._pending_user_item is None:
                self._pending_user_item = new_id("item")
            self._emit(
                server_event(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=e.audio_end_ms,
                    item_id=self._pending_user_item,
                ),
                t,
            )
        elif isinstance(e, ev.TurnCommitted):
            self._on_turn(e, t)
        elif isinstance(e, ev.TurnDiscarded):
            self._pending_user_item = None
        elif isinstance(e, ev.ResponseStarted):
            self._on_response_started(e, t)
        elif isinstance(e, ev.ResponseDone):
            self._on_response_done(e, t)
        elif isinstance(e, ev.HistoryTruncated):
            self._on_truncated(e, t)
        elif isinstance(e, ev.ErrorEvent):
            self._on_engine_error(e)
        elif isinstance(e, ev.SessionClosed):
            self._engine_closed = e.reason
            if not self._closing:
                if e.reason == "shutdown":
                    self._emit_error(
                        "server_shutting_down", "the server is shutting down", type_="server_error"
                    )
                code = 1011 if e.reason.startswith("error") else 1001 if e.reason == "shutdown" else 1000
                self._out.put_nowait(_Close(code, "session ended"))

    def _add_item(self, item: dict[str, Any], response_id: str | None = None) -> _Item:
        rec = _Item(item, self._last_item_id, response_id)
        self._items[item["id"]] = rec
        self._last_item_id = item["id"]
        return rec

    def _on_turn(self, e: ev.TurnCommitted, t: float) -> None:
        self._last_commit_time = t
        if e.kind == "text":
            item = self._pending_text.popleft() if self._pending_text else None
            if item is None:
                return
            rec = self._add_item(item)
        else:
            item_id = self._pending_user_item or new_id("item")
            self._pending_user_item = None
            self._buffered_ms = 0.0
            self._emit(
                server_event(
                    "input_audio_buffer.committed", item_id=item_id, previous_item_id=self._last_item_id
                ),
                t,
            )
            rec = self._add_item(user_item(item_id, [{"type": "input_audio", "transcript": None}]))
        self._emit(
            server_event("conversation.item.added", previous_item_id=rec.previous_item_id, item=rec.item), t
        )
        self._emit(
            server_event("conversation.item.done", previous_item_id=rec.previous_item_id, item=rec.item), t
        )

    def _response(
        self, reply: _Reply, status: str, output: list[dict[str, Any]], **kw: Any
    ) -> dict[str, Any]:
        return response_object(
            reply.id,
            status=status,
            conversation_id=self.conversation_id,
            modalities=reply.modalities,
            voice=self.cfg.voice,
            max_tokens=max_output_tokens(self.options),
            output=output,
            metadata=reply.metadata,
            **kw,
        )

    def _on_response_started(self, e: ev.ResponseStarted, t: float) -> None:
        req = self._requested.pop(e.response_id, None)
        reply = _Reply(
            id=e.response_id,
            item_id=new_id("item"),
            modalities=req.modalities if req else list(self.cfg.output_modalities),
            metadata=req.metadata if req else None,
            context_positions=e.context_positions,
            previous_item_id=self._last_item_id,
            commit_time=None if e.greeting else self._last_commit_time,
        )
        self._reply = reply
        item = assistant_item(reply.item_id, "in_progress", [])
        self._add_item(item, response_id=reply.id)
        self._emit(server_event("response.created", response=self._response(reply, "in_progress", [])), t)
        where = {"response_id": reply.id, "output_index": 0}
        self._emit(server_event("response.output_item.added", item=item, **where), t)
        self._emit(
            server_event("conversation.item.added", previous_item_id=reply.previous_item_id, item=item), t
        )
        part = {"type": "audio", "transcript": ""} if reply.audio else {"type": "text", "text": ""}
        self._emit(
            server_event(
                "response.content_part.added", item_id=reply.item_id, content_index=0, part=part, **where
            ),
            t,
        )

    def _on_text(self, response_id: str, text: str, t: float) -> None:
        reply = self._reply
        if reply is None or reply.id != response_id:
            return
        reply.transcript.append(text)
        kind = "response.output_audio_transcript.delta" if reply.audio else "response.output_text.delta"
        self._emit(
            server_event(
                kind, response_id=reply.id, item_id=reply.item_id, output_index=0, content_index=0, delta=text
            ),
            t,
        )

    def _on_audio(self, e: ev.AudioChunk, t: float) -> None:
        reply = self._reply
        if reply is None or reply.id != e.response_id or not reply.audio:
            return
        ms = len(e.pcm) * 1000.0 / e.sample_rate
        reply.audio_ms += ms
        rec = self._items.get(reply.item_id)
        if rec is not None:
            rec.audio_ms = reply.audio_ms
        self._emit(
            server_event(
                "response.output_audio.delta",
                response_id=reply.id,
                item_id=reply.item_id,
                output_index=0,
                content_index=0,
                delta=encode_audio(e.pcm),
            ),
            t,
        )
        self.metrics.output_audio.inc(ms / 1000.0)
        if not reply.first_audio_sent:
            reply.first_audio_sent = True
            if reply.commit_time is not None:
                self.metrics.first_audio.observe(time.perf_counter() - reply.commit_time)

    def _on_response_done(self, e: ev.ResponseDone, t: float) -> None:
        reply = self._reply
        if reply is None or reply.id != e.response_id:
            return
        self._reply = None
        status, details = response_status(e.status, e.error)
        transcript = "".join(reply.transcript)
        where = {"response_id": reply.id, "item_id": reply.item_id, "output_index": 0, "content_index": 0}
        if reply.audio:
            self._emit(server_event("response.output_audio.done", **where), t)
            self._emit(
                server_event("response.output_audio_transcript.done", transcript=transcript, **where), t
            )
            part = {"type": "audio", "transcript": transcript}
            content = [{"type": "output_audio", "transcript": transcript}]
        else:
            self._emit(server_event("response.output_text.done", text=transcript, **where), t)
            part = {"type": "text", "text": transcript}
            content = [{"type": "output_text", "text": transcript}]
        self._emit(server_event("response.content_part.done", part=part, **where), t)
        item = assistant_item(reply.item_id, "completed" if status == "completed" else "incomplete", content)
        rec = self._items.get(reply.item_id)
        if rec is not None:
            rec.item = item
        self._emit(
            server_event("response.output_item.done", response_id=reply.id, output_index=0, item=item), t
        )
        self._emit(
            server_event("conversation.item.done", previous_item_id=reply.previous_item_id, item=item), t
        )
        usage = usage_object(reply.context_positions, e.generated_positions, e.generated_ms // POSITION_MS)
        response = self._response(reply, status, [item], status_details=details, usage=usage)
        self._emit(server_event("response.done", response=response), t)

    def _on_truncated(self, e: ev.HistoryTruncated, t: float) -> None:
        if e.response_id in self._deletions:
            _, item_id = self._deletions.pop(e.response_id)
            self._truncations.pop(e.response_id, None)
            rec = self._items.pop(item_id, None)
            if rec is not None and self._last_item_id == item_id:
                self._last_item_id = rec.previous_item_id
            self._emit(server_event("conversation.item.deleted", item_id=item_id), t)
        elif e.response_id in self._truncations:
            _, item_id, ms = self._truncations.pop(e.response_id)
            self._emit(
                server_event(
                    "conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=ms
                ),
                t,
            )
        # a cut the engine made itself (barge-in during a reply's tail) has no protocol event

    def _on_engine_error(self, e: ev.ErrorEvent) -> None:
        event_id = None
        if e.ref is not None:
            if e.ref in self._requested:
                event_id = self._requested.pop(e.ref).event_id
            elif e.ref in self._deletions:
                event_id = self._deletions.pop(e.ref)[0]
            elif e.ref in self._truncations:
                event_id = self._truncations.pop(e.ref)[0]
        type_ = "server_error" if e.fatal else "invalid_request_error"
        self._emit(error_event(e.code, e.message, event_id=event_id, type_=type_))

    def _session_object(self) -> dict[str, Any]:
        return session_object(self.id, self.settings.realtime.model_name, self.options, self.cfg)
