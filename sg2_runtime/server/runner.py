"""Running the app: bind, announce, wait for SIGINT/SIGTERM, close calls gracefully."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterable

from aiohttp import web

from sg2_runtime.engine.engine import Engine

from .app import Extension, create_app
from .config import Settings


async def start_site(app: web.Application, settings: Settings) -> tuple[web.AppRunner, str, int]:
    """Start serving ``app`` on the configured host/port; returns the runner and the bound address.

    ``keepalive_timeout`` doubles as the handshake timeout: aiohttp closes a connection that has not
    sent a complete request within it (it is armed from the moment the connection opens)."""
    srv = settings.server
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=srv.handshake_timeout_s,
        shutdown_timeout=srv.shutdown_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, srv.host, srv.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, host, port


async def _serve(engine: Engine, settings: Settings, extensions: Iterable[Extension]) -> None:
    app = create_app(engine, settings, extensions=extensions)
    runner, host, port = await start_site(app, settings)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"sg2 serve: listening on http://{shown}:{port}  (realtime: ws://{shown}:{port}/v1/realtime, "
        f"auth {'on' if settings.auth.keys() else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    if any(
        r.resource is not None and r.resource.canonical == "/v1/webrtc/calls" for r in app.router.routes()
    ):
        print(f"sg2 serve: browser calls at http://{shown}:{port}/", file=sys.stderr, flush=True)
    if any(
        r.resource is not None and r.resource.canonical == "/v1/livekit/token" for r in app.router.routes()
    ):
        print(
            f"sg2 serve: LiveKit room tokens at http://{shown}:{port}/v1/livekit/token",
            file=sys.stderr,
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        print("sg2 serve: shutting down", file=sys.stderr, flush=True)
    finally:
        await runner.cleanup()


def serve(engine: Engine, settings: Settings, extensions: Iterable[Extension] = ()) -> None:
    if settings.server.gil_switch_interval_ms is not None:
        # the engine thread holds the GIL between model calls; Python hands it over only every
        # switch interval, which would add up to 5 ms to any event the network loop has to send
        sys.setswitchinterval(settings.server.gil_switch_interval_ms / 1000)
    asyncio.run(_serve(engine, settings, list(extensions)))
