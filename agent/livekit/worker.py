"""The LiveKit agent worker (``sg2 agent``): an ``AgentServer`` whose jobs run SpeechGPT 2.0 in rooms.

Per room (one job, in its own process by default):

1. connect (audio only), start an ``AgentSession`` with :class:`~agent.livekit.model.RealtimeModel`
   on the least-loaded engine server: the agent's audio is published as a track everyone hears,
   its text channel goes out as ``lk.transcription`` text streams (paced with the audio), its state
   as the ``lk.agent.state`` attribute;
2. :class:`~agent.livekit.floor.FloorController` links the session's input to whoever holds the floor;
3. the call ends when the last human leaves, or — with an ``sg2.error`` data message and participant
   attribute — when its engine server fails (the model raises an unrecoverable error).

Worker-wide: explicit dispatch under ``livekit.agent_name`` (or automatic dispatch with ``''``);
``load_fnc`` reports the engine servers' share of used call slots, refreshed every
``agent.worker.load_probe_s`` and before answering each job request, so a full deployment gets no
jobs; job processes are started ahead (``num_idle_processes``) and prewarmed (imports) within
``initialize_timeout_s``; SIGTERM drains (no new jobs, running calls finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from typing import Any

from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    AutoSubscribe,
    JobContext,
    JobExecutorType,
    JobProcess,
    JobRequest,
)
from livekit.agents.voice import room_io
from livekit.agents.voice.events import CloseEvent, CloseReason

from .floor import FloorController
from .model import RealtimeModel, server_vad
from .servers import EnginePool, EngineServer
from .settings import AgentSettings

log = logging.getLogger("sg2.livekit.worker")

ERROR_TOPIC = "sg2.error"
ATTRIBUTE_ERROR = "sg2.error"
PARTICIPANT_WAIT_S = 120.0


def engine_servers(settings: AgentSettings) -> list[EngineServer]:
    a = settings.agent
    return [EngineServer(s.url, a.engine_key(s), s.name) for s in a.engine_servers]


def make_pool(settings: AgentSettings) -> EnginePool:
    a = settings.agent
    return EnginePool(
        engine_servers(settings), health_timeout_s=a.health_timeout_s, failure_cooldown_s=a.failure_cooldown_s
    )


def make_model(settings: AgentSettings, pool: EnginePool | None = None) -> RealtimeModel:
    a = settings.agent
    td = a.session.turn_detection
    return RealtimeModel(
        servers=pool or make_pool(settings),
        voice=a.session.voice,
        turn_detection=server_vad(
            threshold=td.threshold,
            prefix_padding_ms=td.prefix_padding_ms,
            silence_duration_ms=td.silence_duration_ms,
        )
        if td.enabled
        else None,
        max_output_tokens=a.session.max_output_tokens,
        connect_timeout_s=a.connect_timeout_s,
        keepalive_s=a.keepalive_s,
    )


# ---------------------------------------------------------------------------------------------- job side
def prewarm(settings_data: dict[str, Any], proc: JobProcess) -> None:
    """Runs once per job process before it takes a job: validate settings, import what calls need."""
    proc.userdata["settings"] = AgentSettings.model_validate(settings_data)
    from sg2_runtime.engine.vad import BatchedVAD

    BatchedVAD(1)  # loads onnxruntime's CPU provider and the Silero model once per process


async def entrypoint(settings_data: dict[str, Any], ctx: JobContext) -> None:
    settings = AgentSettings.model_validate(settings_data)
    call = RoomCall(ctx, settings)
    try:
        await call.run()
    except Exception as exc:
        log.exception("the call in room %s could not start", ctx.room.name)
        await call.fail(f"the agent could not start: {type(exc).__name__}: {exc}", code="agent_failed")


class RoomCall:
    """One room: the agent session, the floor, and how the call ends."""

    def __init__(self, ctx: JobContext, settings: AgentSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.model = make_model(settings)
        self.session: AgentSession | None = None
        self.floor: FloorController | None = None
        self._ending = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._paused_at: float | None = None
        self._resume_timer: asyncio.TimerHandle | None = None
        self._engine_heard_at: float | None = None  # the engine's latest speech start

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        ctx, a = self.ctx, self.settings.agent
        ctx.add_shutdown_callback(self._cleanup)
        await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
        session = AgentSession(
            llm=self.model,
            vad=None,  # turns and barge-in are detected by the engine server (its Silero VAD)
            turn_handling={"turn_detection": "realtime_llm"},
            aec_warmup_duration=None,  # callers' own echo cancellation: barge-in works from the first word
            user_away_timeout=None,
        )
        self.session = session
        session.on("close", self._on_close)
        session.on("agent_state_changed", self._on_agent_state)
        session.on("user_state_changed", self._on_user_state)
        self.floor = FloorController(
            ctx.room,
            a.floor,
            on_empty=lambda: self.end("everyone left"),
            on_onset=self._on_onset,
            on_fizzle=self._on_fizzle,
        )
        session.input.audio = self.floor.input  # the floor holder's voice (see floor.py)
        await session.start(
            Agent(instructions=a.session.instructions),
            room=ctx.room,
            room_options=room_io.RoomOptions(
                audio_input=False,  # the floor controller is the input, following the linked participant
                audio_output=room_io.AudioOutputOptions(sample_rate=24000, num_channels=1),
                text_output=room_io.TextOutputOptions(sync_transcription=True),
                close_on_disconnect=False,  # the floor controller ends the call with the last human
            ),
        )
        rio = session.room_io
        self.floor.start(
            rio.set_participant,
            lambda: p.identity if (p := rio.linked_participant) is not None else None,
        )
        if a.session.greet:
            session.generate_reply()
        self._spawn(self._no_show_watch())

    # ------------------------------------------------------------------ fast stop
    def _on_onset(self, identity: str) -> None:
        """The floor holder's first speech window while the agent speaks: pause its audio now.

        The engine server hears the same speech ~100-200 ms later (transport, its VAD's 64 ms,
        the way back); if it confirms (speech started), the framework interrupts the reply and the
        engine cuts its history to what was played; if not (a noise its VAD rejects), the audio
        resumes after ``confirm_ms``, where it stopped."""
        session = self.session
        if not self.settings.agent.floor.fast_stop or session is None or self._paused_at is not None:
            return
        out = session.output.audio
        if session.agent_state != "speaking" or out is None or not out.can_pause:
            return
        out.pause()
        self._paused_at = time.monotonic()
        log.info("%s spoke over the agent: its audio paused", identity)
        delay = self.settings.agent.floor.confirm_ms / 1000.0
        self._resume_timer = asyncio.get_running_loop().call_later(delay, self._resume, "not confirmed")

    def _on_fizzle(self, identity: str) -> None:
        """The sound that paused the agent did not become speech: play on, unless the engine heard
        speech meanwhile (then the framework is interrupting the reply)."""
        if self._paused_at is not None and (
            self._engine_heard_at is None or self._engine_heard_at < self._paused_at
        ):
            self._resume(f"{identity}'s sound was not speech")

    def _on_user_state(self, ev: Any) -> None:
        if ev.new_state == "speaking":
            self._engine_heard_at = time.monotonic()

    def _on_agent_state(self, ev: Any) -> None:
        if self._paused_at is not None and ev.new_state != "speaking":
            self._resume("the reply stopped")

    def _resume(self, why: str) -> None:
        if self._paused_at is None:
            return
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        paused_ms = (time.monotonic() - self._paused_at) * 1000
        self._paused_at = None
        out = self.session.output.audio if self.session is not None else None
        if out is not None:
            out.resume()
        log.info("agent audio resumed after %.0f ms (%s)", paused_ms, why)

    async def _no_show_watch(self) -> None:
        """End the job if nobody ever joins (a dispatch for a room its caller never entered)."""
        deadline = time.monotonic() + PARTICIPANT_WAIT_S
        while time.monotonic() < deadline:
            if self.floor is None or self.floor.humans() or self._ending:
                return
            await asyncio.sleep(1.0)
        if self.floor is not None and not self.floor.humans():
            self.end("nobody joined")

    def end(self, reason: str) -> None:
        if self._ending:
            return
        self._ending = True
        log.info("ending the call in room %s: %s", self.ctx.room.name, reason)
        self.ctx.shutdown(reason)

    def _on_close(self, ev: CloseEvent) -> None:
        if ev.reason == CloseReason.ERROR or ev.error is not None:
            message = str(getattr(ev.error, "error", None) or ev.error or "the call failed")
            log.error("call in room %s failed: %s", self.ctx.room.name, message)
            self._spawn(self.fail(message))
        else:
            self.end(f"session closed ({ev.reason.value})")

    async def fail(self, message: str, code: str = "engine_failed") -> None:
        """Tell the room the call failed (data topic ``sg2.error`` and the agent's attribute
        ``sg2.error``), then end the job."""
        if self.settings.agent.report_errors and self.ctx.room.isconnected():
            payload = json.dumps({"type": "error", "code": code, "message": message})
            lp = self.ctx.room.local_participant
            with contextlib.suppress(Exception):
                await lp.set_attributes({ATTRIBUTE_ERROR: message[:500]})
            with contextlib.suppress(Exception):
                await lp.publish_data(payload, reliable=True, topic=ERROR_TOPIC)
        self.end(f"engine failure: {message}")

    async def _cleanup(self, reason: str = "") -> None:
        if self.floor is not None:
            await self.floor.aclose()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.model.aclose()


# ---------------------------------------------------------------------------------------------- worker side
class LoadReporter:
    """The worker's view of the engine servers' load: probed in the background, read by ``load_fnc``
    (which the framework calls from a thread, so it only reads a number)."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.pool = make_pool(settings)
        self.value = 1.0  # nothing known yet: full
        self.server: AgentServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._full: bool | None = None

    def __call__(self) -> float:
        return self.value

    async def refresh(self) -> float:
        await self.pool.probe()
        self.value = self.pool.load()
        full = self.value >= self.settings.agent.worker.load_threshold
        if self._full is not None and full != self._full:
            self._announce()
        self._full = full
        return self.value

    def _announce(self) -> None:
        """Tell LiveKit now that the deployment became full or free again, instead of at the
        framework's next periodic status report (up to 2.5 s later): LiveKit offers a room's job once,
        so a stale "available" loses the calls it sends meanwhile and a stale "full" turns them away."""
        server = self.server
        update = getattr(server, "_update_worker_status", None)
        if server is None or update is None or getattr(server, "_closed", True):
            return
        task = asyncio.get_running_loop().create_task(update())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="sg2-engine-load")

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("engine load probe failed")
            await asyncio.sleep(self.settings.agent.worker.load_probe_s)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.pool.aclose()


def build_server(settings: AgentSettings) -> tuple[AgentServer, LoadReporter]:
    lk, a = settings.livekit, settings.agent
    w = a.worker
    reporter = LoadReporter(settings)
    data = settings.model_dump(mode="json")
    # secrets must reach the job processes (they connect to the engine servers)
    data["agent"]["engine_api_key"] = a.engine_api_key.get_secret_value() if a.engine_api_key else None
    for out, src in zip(data["agent"]["engine_servers"], a.engine_servers, strict=True):
        out["api_key"] = a.engine_key(src)
    data["livekit"]["api_secret"] = None
    server = AgentServer(
        job_executor_type=JobExecutorType.PROCESS if w.job_executor == "process" else JobExecutorType.THREAD,
        load_threshold=w.load_threshold,
        load_fnc=reporter,
        job_memory_warn_mb=w.memory_warn_mb,
        job_memory_limit_mb=w.memory_limit_mb,
        drain_timeout=w.drain_timeout_s,
        num_idle_processes=w.num_idle_processes,
        shutdown_process_timeout=w.shutdown_timeout_s,
        initialize_process_timeout=w.initialize_timeout_s,
        ws_url=lk.resolved_url(),
        api_key=lk.resolved_api_key(),
        api_secret=lk.resolved_api_secret(),
        host=w.host,
        port=w.port,
        setup_fnc=functools.partial(prewarm, data),
        preload_modules=["agent.livekit.worker"],
    )

    async def on_request(req: JobRequest) -> None:
        load = await reporter.refresh()
        if load >= w.load_threshold:
            free, total = reporter.pool.capacity()
            log.warning(
                "declining the job for room %s: engine servers full (%d of %d slots free)",
                req.room.name,
                free,
                total,
            )
            await req.reject(terminate=False)
            return
        await req.accept(name="SpeechGPT 2.0", identity=f"sg2-agent-{req.id}")

    server.rtc_session(functools.partial(entrypoint, data), agent_name=lk.agent_name, on_request=on_request)
    server.on("worker_started", reporter.start)
    reporter.server = server
    return server, reporter
