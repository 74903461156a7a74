"""Helpers for the network-API tests: our server on loopback around a real engine, the official
``openai`` SDK as the client, and raw WebSocket access for malformed input.

    async with running_server(models, engine_config, settings_overrides) as server:
        client = server.sdk_client()
        async with client.realtime.connect(model="sg2") as conn:
            events = await until(conn, lambda e: e.type == "response.done")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from sg2_runtime.engine.engine import Engine
from sg2_runtime.engine.options import EngineConfig
from sg2_runtime.server.app import CALLS_KEY, create_app
from sg2_runtime.server.config import Settings, load_settings
from sg2_runtime.server.runner import start_site

from .gil import serve_switch_interval

EVENT_TIMEOUT = 60.0
API_KEY = "sk-test-sg2"


@dataclass
class RunningServer:
    engine: Engine
    app: web.Application
    settings: Settings
    host: str
    port: int

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/realtime"

    @property
    def calls(self) -> dict[str, Any]:
        return self.app[CALLS_KEY]

    def sdk_client(self, api_key: str = API_KEY) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            api_key=api_key,
            base_url=f"{self.http_url}/v1",
            websocket_base_url=f"ws://{self.host}:{self.port}/v1",
            max_retries=0,
        )

    def engine_session(self, session_id: str) -> Any:
        """The engine session behind the call whose ``session.created`` had this id."""
        return self.calls[session_id].session


def server_settings(**overrides: Any) -> Settings:
    """Server settings for tests: loopback, a free port, one API key, deterministic short replies."""
    base: list[tuple[str, Any]] = [
        ("server.host", "127.0.0.1"),
        ("server.port", 0),
        ("auth.api_keys", [API_KEY]),
        ("auth.api_keys_env", None),
        ("realtime.session", {"flow_control": "none", "sampling": {"greedy": True}, "max_response_ms": 960}),
    ]
    base += list(overrides.items())
    return load_settings(None, base)


@contextlib.asynccontextmanager
async def running_server(
    models: Any,
    engine_config: EngineConfig | None = None,
    settings: Settings | None = None,
    extensions: Iterable[Callable[[web.Application], None]] = (),
) -> AsyncIterator[RunningServer]:
    settings = settings or server_settings()
    with serve_switch_interval(settings.server.gil_switch_interval_ms):
        engine = Engine(models, engine_config or EngineConfig(max_sessions=4, max_positions=1024)).start()
        try:
            app = create_app(engine, settings, extensions=extensions)
            runner, host, port = await start_site(app, settings)
            try:
                yield RunningServer(engine, app, settings, host, port)
            finally:
                await runner.cleanup()
        finally:
            await asyncio.to_thread(engine.shutdown)


async def until(conn: Any, stop: Callable[[Any], bool], timeout: float = EVENT_TIMEOUT) -> list[Any]:
    """SDK events up to and including the first for which ``stop`` is true."""
    out: list[Any] = []
    while True:
        try:
            event = await asyncio.wait_for(conn.recv(), timeout)
        except TimeoutError as exc:
            seen = [e.type for e in out if e.type != "response.output_audio.delta"]
            raise AssertionError(f"no expected event within {timeout} s; got {seen}") from exc
        out.append(event)
        if stop(event):
            return out


def of_type(events: list[Any], type_: str) -> list[Any]:
    return [e for e in events if e.type == type_]


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a cheap in-process condition (engine counters) until true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def b64_chunks(audio: np.ndarray, chunk_ms: int = 100) -> list[str]:
    """24 kHz float audio -> base64 PCM16 pieces of ``chunk_ms`` (what a client appends)."""
    raw = pcm16(audio)
    step = 24000 * chunk_ms // 1000 * 2
    return [base64.b64encode(raw[i : i + step]).decode() for i in range(0, len(raw), step)]


async def send_audio(conn: Any, audio: np.ndarray, chunk_ms: int = 100, realtime: bool = False) -> None:
    """Append audio through the SDK, as fast as possible or paced at real time."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, chunk in enumerate(b64_chunks(audio, chunk_ms)):
        if realtime:
            delay = start + i * chunk_ms / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the input like a microphone, not synchronisation
        await conn.input_audio_buffer.append(audio=chunk)


def decode_delta(delta: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(delta), dtype="<i2")
