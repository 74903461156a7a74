"""SpeechGPT 2.0 as a livekit-agents ``RealtimeModel``, talking to ``sg2 serve`` over its Realtime API.

``sg2 serve`` speaks the OpenAI Realtime protocol, so this builds on the framework's own client
(``livekit.plugins.openai.realtime.RealtimeModel`` / ``RealtimeSession``): event parsing, message
and audio streams, truncation, metrics and the mirrored chat context are theirs. What is ours:

- **which server**: every session asks the configured engine servers for their load
  (:class:`~agent.livekit.servers.EnginePool`) and connects to the least-loaded one; a server that
  refuses (full, unhealthy, unreachable) is skipped for the next; the call starts only once the
  server has answered ``session.created``;
- **no silent reconnects**: the conversation (audio history, KV cache) lives on the engine server,
  so a connection lost mid-call cannot be replayed elsewhere. The call ends with an unrecoverable
  ``error`` (``AgentSession`` closes; the worker tells the room) and the server is marked as
  failed, so new calls avoid it for ``failure_cooldown_s``. No periodic reconnection either
  (``max_session_duration`` is off);
- **capabilities stated as they are** (see :data:`SG2_CAPABILITIES`) and the requests the model
  cannot honour handled explicitly instead of being sent to fail:

  ============================  =================================================================
  ``push_audio``                yes (resampled to 24 kHz mono PCM16, 100 ms appends)
  ``commit_audio``/``clear``    yes (client-controlled turns when server turn detection is off)
  ``interrupt``                 yes (``response.cancel``; the engine cuts its history to what was
                                played)
  ``truncate``                  yes for audio (``audio_end_ms`` cuts the reply in the model's
                                history; 0 deletes it); text-only truncation: ignored
  ``generate_reply``            yes; per-reply ``instructions``/``tools`` are not supported (ignored,
                                with a warning)
  ``update_instructions``       before the first user turn only (they head the model's prompt);
                                later: kept as they were, with a warning
  ``update_chat_ctx``           appending user text messages only; edits and deletions of earlier
                                items, assistant or tool items: ignored, with a warning
  ``update_tools``              no tool calling (an empty tool list is accepted)
  ``push_video``, ``say``       no
  user transcription            no (the model hears speech directly; nothing transcribes it)
  ============================  =================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal

import aiohttp
from livekit import rtc
from livekit.agents import APIConnectionError, APIError, llm, utils
from livekit.agents.types import NOT_GIVEN, APIConnectOptions, NotGivenOr
from livekit.plugins.openai import realtime as oai_realtime
from livekit.plugins.openai.realtime.realtime_model import NUM_CHANNELS, SAMPLE_RATE, process_base_url
from openai.types.realtime import RealtimeAudioInputTurnDetection
from openai.types.realtime.realtime_audio_input_turn_detection import ServerVad

from .servers import EnginePool, EngineServer, NoEngineServerError

log = logging.getLogger("sg2.livekit.model")

DEFAULT_MODEL = "speechgpt-2.0-preview"
DEFAULT_VOICE = "default"
APPEND_SAMPLES = 480  # 20 ms of 24 kHz input per input_audio_buffer.append

SG2_CAPABILITIES = llm.RealtimeCapabilities(
    message_truncation=True,  # conversation.item.truncate cuts the reply in the model's history
    turn_detection=True,  # the engine's Silero VAD detects turns and barge-in server-side
    user_transcription=False,  # no transcript of the caller's speech exists
    auto_tool_reply_generation=False,
    audio_output=True,
    manual_function_calls=False,  # no tool calling
    can_disable_turn_detection=True,  # turn_detection null: the client commits turns itself
    supports_overlapping_speech=False,  # the caller speaking over a reply interrupts it
    mutable_chat_context=False,  # only user text can be appended (see the table above)
    mutable_instructions=False,  # only before the first user turn
    mutable_tools=False,
    per_response_tool_choice=False,
    supports_say=False,
)


def server_vad(
    *,
    threshold: float | None = None,
    prefix_padding_ms: int | None = None,
    silence_duration_ms: int | None = None,
) -> ServerVad:
    """Server turn detection; unset values keep the engine server's configured defaults."""
    kwargs: dict[str, Any] = {"type": "server_vad", "create_response": True, "interrupt_response": True}
    if threshold is not None:
        kwargs["threshold"] = threshold
    if prefix_padding_ms is not None:
        kwargs["prefix_padding_ms"] = prefix_padding_ms
    if silence_duration_ms is not None:
        kwargs["silence_duration_ms"] = silence_duration_ms
    return ServerVad(**kwargs)


class EngineCallError(APIConnectionError):
    """The engine server of a live call went away or failed: the call cannot go on."""

    def __init__(self, message: str, server: EngineServer | None) -> None:
        super().__init__(message, retryable=False)
        self.server = server


class RealtimeModel(oai_realtime.RealtimeModel):
    """SpeechGPT 2.0 served by one or more ``sg2 serve`` engine servers.

    >>> model = RealtimeModel(servers=["http://gpu-1:8000", "http://gpu-2:8000"], api_key="sk-...")
    >>> session = AgentSession(llm=model)

    ``servers``: URLs, :class:`EngineServer` objects (each with its own key) or an :class:`EnginePool`
    to share with the worker's load reporting. ``api_key``: the key for servers given as plain URLs.
    ``max_output_tokens``: cap per reply in 120 ms units (``"inf"``: the server's cap).
    ``turn_detection``: :func:`server_vad` (default: the server's VAD settings) or ``None`` for
    client-committed turns.
    """

    def __init__(
        self,
        *,
        servers: Sequence[str | EngineServer] | EnginePool,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        voice: str = DEFAULT_VOICE,
        turn_detection: NotGivenOr[RealtimeAudioInputTurnDetection | None] = NOT_GIVEN,
        max_output_tokens: int | Literal["inf"] = "inf",
        connect_timeout_s: float = 10.0,
        keepalive_s: float = 60.0,
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        if isinstance(servers, EnginePool):
            pool = servers
        else:
            pool = EnginePool(
                [s if isinstance(s, EngineServer) else EngineServer(s, api_key) for s in servers],
                http_session=http_session,
            )
        first = pool.servers[0]
        super().__init__(
            model=model,
            voice=voice,
            modalities=["text", "audio"],
            input_audio_transcription=None,
            input_audio_noise_reduction=None,
            turn_detection=server_vad() if not utils.is_given(turn_detection) else turn_detection,
            tool_choice=None,
            api_key=first.api_key or api_key or "sg2",
            base_url=first.url + "/v1",
            http_session=http_session,
            max_session_duration=None,
            conn_options=APIConnectOptions(max_retry=0, timeout=connect_timeout_s),
        )
        self._opts.max_response_output_tokens = max_output_tokens
        self._capabilities = replace(
            SG2_CAPABILITIES,
            turn_detection=self._opts.turn_detection is not None,
        )
        self._provider_label = "SpeechGPT 2.0 engine server"
        self.pool = pool
        self.keepalive_s = keepalive_s

    @property
    def provider(self) -> str:
        return "sg2"

    def session(self, *, turn_detection_disabled: bool = False) -> RealtimeSession:
        sess = RealtimeSession(self, turn_detection_disabled=turn_detection_disabled)
        self._sessions.add(sess)
        return sess

    async def aclose(self) -> None:
        await super().aclose()
        await self.pool.aclose()


class RealtimeSession(oai_realtime.RealtimeSession):
    """One call on one engine server (chosen when the session connects)."""

    def __init__(self, realtime_model: RealtimeModel, *, turn_detection_disabled: bool = False) -> None:
        self._sg2_model = realtime_model
        self.server: EngineServer | None = None
        self.server_session_id: str | None = None
        self._last_sent = time.monotonic()
        self._user_turns = 0
        self._warned: set[str] = set()
        super().__init__(realtime_model, turn_detection_disabled=turn_detection_disabled)
        # 20 ms appends instead of the framework's 100 ms: the engine hears speech (and barge-in)
        # up to 80 ms sooner; 50 small events a second are well within the server's limits
        self._bstream = utils.audio.AudioByteStream(
            SAMPLE_RATE, NUM_CHANNELS, samples_per_channel=APPEND_SAMPLES
        )
        self._capabilities = replace(
            realtime_model.capabilities,
            turn_detection=not turn_detection_disabled and realtime_model.capabilities.turn_detection,
        )
        self._keepalive_atask = asyncio.create_task(self._keepalive(), name="sg2-realtime-keepalive")

    # ------------------------------------------------------------------ connection
    async def _create_ws_conn(self) -> aiohttp.ClientWebSocketResponse:
        """Connect to the best engine server that accepts the call (it answers ``session.created``)."""
        if self.server is not None:
            # a connection was already made: the conversation lives on that server, nothing to resume
            raise EngineCallError("the engine server connection was lost; the call cannot resume", None)
        pool = self._sg2_model.pool
        try:
            candidates = await pool.candidates(wait_s=self._opts.conn_options.timeout)
        except NoEngineServerError as exc:
            raise APIConnectionError(str(exc), retryable=False) from exc
        problems: list[str] = []
        timeout = self._opts.conn_options.timeout
        for server in candidates:
            url = process_base_url(server.url + "/v1", self._opts.model)
            headers = {"User-Agent": "sg2-livekit", **server.headers()}
            t0 = time.perf_counter()
            ws: aiohttp.ClientWebSocketResponse | None = None
            try:
                ws = await asyncio.wait_for(
                    self._realtime_model._ensure_http_session().ws_connect(url=url, headers=headers), timeout
                )
                msg = await ws.receive(timeout=timeout)
                first = json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                if ws is not None:
                    await ws.close()
                pool.mark_failed(server, f"connect: {type(exc).__name__}: {exc}")
                problems.append(f"{server.name}: {type(exc).__name__} {exc}")
                continue
            if isinstance(first, dict) and first.get("type") == "session.created":
                self.server = server
                self.server_session_id = (first.get("session") or {}).get("id")
                self._report_connection_acquired(time.perf_counter() - t0)
                self.emit("openai_server_event_received", first)
                log.info("call connected to engine server %s (%s)", server.name, self.server_session_id)
                return ws
            await ws.close()
            error = (first or {}).get("error") or {} if isinstance(first, dict) else {}
            code = error.get("code") or "no session"
            if code == "session_capacity_exceeded":
                pool.mark_full(server)
            else:
                pool.mark_failed(server, f"refused the call: {code}: {error.get('message', '')}")
            problems.append(f"{server.name}: {code}")
        raise APIConnectionError(
            "no engine server accepted the call (" + "; ".join(problems) + ")", retryable=False
        )

    async def _run_ws(self, ws_conn: aiohttp.ClientWebSocketResponse) -> None:
        try:
            await super()._run_ws(ws_conn)
        except APIError as exc:
            server = self.server
            reason = f"connection to engine server {server.name if server else '?'} lost mid-call: {exc}"
            if server is not None and not self._closing:
                self._sg2_model.pool.mark_failed(server, str(exc))
            raise EngineCallError(reason, server) from exc

    def send_event(self, event: Any) -> None:
        self._last_sent = time.monotonic()
        super().send_event(event)

    async def _keepalive(self) -> None:
        """An empty ``session.update`` after ``keepalive_s`` without any client event (the engine
        server closes calls that stay silent longer than its idle timeout, e.g. everyone muted)."""
        interval = self._sg2_model.keepalive_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(max(0.5, self._last_sent + interval - time.monotonic()))
            if time.monotonic() - self._last_sent >= interval:
                self.send_event({"type": "session.update", "session": {"type": "realtime"}})

    async def aclose(self) -> None:
        self._keepalive_atask.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._keepalive_atask
        try:
            await super().aclose()
        except APIError as exc:  # the connection's end, already reported as an error event
            log.debug("realtime session closed after: %s", exc)

    # ------------------------------------------------------------------ what the model cannot do
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    async def update_instructions(self, instructions: str) -> None:
        if self._user_turns and instructions != (self._instructions or ""):
            self._warn_once(
                "instructions",
                "SpeechGPT 2.0: instructions can change only before the first user turn (they head the "
                "model's prompt); the current ones are kept",
            )
            return
        await super().update_instructions(instructions)

    async def update_chat_ctx(self, chat_ctx: llm.ChatContext) -> None:
        """Append new user text messages; anything else the model cannot take is reported, not sent."""
        remote = self._remote_chat_ctx.to_chat_ctx()
        known = {item.id for item in remote.items}
        wanted = chat_ctx.copy(exclude_handoff=True, exclude_config_update=True, exclude_instructions=True)
        appended: list[llm.ChatItem] = []
        skipped: list[str] = []
        for item in wanted.items:
            if item.id in known:
                continue
            if item.type == "message" and item.role == "user" and item.text_content:
                appended.append(item)
            elif item.type == "message" and item.role in ("system", "developer"):
                continue  # instructions go through update_instructions
            else:
                skipped.append(f"{item.type}:{getattr(item, 'role', '')}")
        missing = [item.id for item in remote.items if wanted.get_by_id(item.id) is None]
        if skipped or missing:
            self._warn_once(
                "chat_ctx",
                "SpeechGPT 2.0: only user text messages can be added to a live conversation (the model's "
                f"context is its own audio history); not applied: {', '.join(skipped) or 'none'} added, "
                f"{len(missing)} removed",
            )
        if appended:
            await super().update_chat_ctx(llm.ChatContext([*remote.items, *appended]))

    async def update_tools(self, tools: list[llm.Tool]) -> None:
        if tools:
            self._warn_once("tools", "SpeechGPT 2.0 has no tool calling; the tools are ignored")
        self._tools = llm.ToolContext.empty()

    def push_video(self, frame: rtc.VideoFrame) -> None:
        self._warn_once("video", "SpeechGPT 2.0 takes no video; frames are dropped")

    def generate_reply(
        self,
        *,
        instructions: NotGivenOr[str] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        tools: NotGivenOr[list[llm.Tool]] = NOT_GIVEN,
    ) -> asyncio.Future[llm.GenerationCreatedEvent]:
        if utils.is_given(instructions) and instructions:
            self._warn_once(
                "reply_instructions",
                "SpeechGPT 2.0 has no per-reply instructions; generate_reply(instructions=...) replies "
                "without them",
            )
        if utils.is_given(tools) and tools:
            self._warn_once("tools", "SpeechGPT 2.0 has no tool calling; the tools are ignored")
        return super().generate_reply()

    def truncate(
        self,
        *,
        message_id: str,
        modalities: list[Literal["text", "audio"]],
        audio_end_ms: int,
        audio_transcript: NotGivenOr[str] = NOT_GIVEN,
    ) -> None:
        if "audio" not in modalities:
            return  # a text-only reply is not cut in the model's history
        super().truncate(
            message_id=message_id,
            modalities=modalities,
            audio_end_ms=audio_end_ms,
            audio_transcript=audio_transcript,
        )

    # ------------------------------------------------------------------ server events
    def _handle_response_done(self, event: Any) -> None:
        generation = self._current_generation
        super()._handle_response_done(event)
        # a reply cut by its length cap or cancelled by barge-in is an ordinary outcome here; the
        # framework records it as the generation's exception, which nothing else awaits
        done = getattr(generation, "_done_fut", None)
        if done is not None and done.done() and not done.cancelled():
            done.exception()

    def _handle_conversion_item_added(self, event: Any) -> None:
        item = getattr(event, "item", None)
        if getattr(item, "role", None) == "user":
            self._user_turns += 1
        super()._handle_conversion_item_added(event)


def servers_from(urls: Iterable[str], api_key: str | None) -> list[EngineServer]:
    return [EngineServer(u, api_key) for u in urls]
