"""A real HTTP server with the browser-call transport on a free loopback port, for tests.

    async with direct_server(tiny_models, max_calls=2) as srv:    # srv.url, srv.service, srv.engine
        async with DirectClient(srv.url) as client: ...

The app is the transport's own extension on a bare aiohttp app (what ``sg2 serve`` adds to its
app), served by aiohttp's runner in the test's event loop; the engine runs its own thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from agent.direct import DirectSettings, setup_direct
from agent.direct.service import DirectService
from sg2_runtime.engine.engine import Engine
from sg2_runtime.engine.options import EngineConfig
from sg2_runtime.server.config import ServerSection

from .gil import serve_switch_interval
from .ports import HOST, free_tcp_port

# Replies of the random tiny models are capped; the greeting is off unless a test wants it.
TEST_SESSION = {
    "play_greeting": False,
    "max_response_ms": 2400,
    "sampling": {"seed": 1234},
}


@dataclass
class DirectServer:
    url: str
    service: DirectService
    engine: Engine
    runner: web.AppRunner


@contextlib.asynccontextmanager
async def direct_server(
    models: Any,
    *,
    max_sessions: int = 4,
    session: dict[str, Any] | None = None,
    key_check: Any = None,
    **settings: Any,
) -> AsyncIterator[DirectServer]:
    with serve_switch_interval(ServerSection().gil_switch_interval_ms):
        engine = Engine(models, EngineConfig(max_sessions=max_sessions, max_positions=1024)).start()
        direct = DirectSettings.model_validate({"session": {**TEST_SESSION, **(session or {})}, **settings})
        app = web.Application()
        service = setup_direct(app, engine, direct, key_check=key_check)
        runner = web.AppRunner(app, shutdown_timeout=5.0)
        await runner.setup()
        site = None
        for _ in range(5):
            port = free_tcp_port()
            site = web.TCPSite(runner, HOST, port)
            try:
                await site.start()
                break
            except OSError:
                site = None
        assert site is not None, "no free port for the test server"
        try:
            yield DirectServer(f"http://{HOST}:{port}", service, engine, runner)
        finally:
            await runner.cleanup()  # on_shutdown closes every call first
            engine.shutdown()


def to_48k(audio: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return audio if rate == 48000 else soxr.resample(audio, rate, 48000).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 48000), np.float32)


def onset_sample(audio: np.ndarray, threshold_dbfs: float = -40.0, frame: int = 480) -> int:
    """First sample of the first 10 ms block louder than ``threshold_dbfs`` (speech onset)."""
    n = len(audio) // frame
    x = audio[: n * frame].reshape(n, frame).astype(np.float64)
    rms = np.sqrt(np.mean(x * x, axis=1))
    loud = np.nonzero(rms > 10 ** (threshold_dbfs / 20))[0]
    if loud.size == 0:
        raise ValueError("no onset: the clip is silent")
    return int(loud[0]) * frame
