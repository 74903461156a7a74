"""The aiohttp application: ``GET /v1/realtime`` (WebSocket), ``GET /healthz``, ``GET /metrics``.

``create_app(engine, settings, extensions=...)`` builds it around an engine the caller owns (started
before, shut down after). Extensions are callables ``(app) -> None`` that add routes, startup and
cleanup hooks — the browser WebRTC transport and the static web client plug in this way. They find
what they need under the app keys below::

    def install(app: web.Application) -> None:
        engine = app[ENGINE_KEY]
        options = app[SETTINGS_KEY].section("direct")
        app.router.add_post("/v1/direct/offer", handler)
        app[METRICS_KEY].registry  # register extra Prometheus collectors here
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import sg2_runtime
from sg2_runtime.engine.engine import Engine

from .auth import KeyChecker
from .config import Settings
from .metrics import ServerMetrics
from .realtime import RealtimeCall

log = logging.getLogger("sg2.server")

Extension = Callable[[web.Application], None]

ENGINE_KEY = web.AppKey("sg2_engine", Engine)
SETTINGS_KEY = web.AppKey("sg2_settings", Settings)
METRICS_KEY = web.AppKey("sg2_server_metrics", ServerMetrics)
AUTH_KEY = web.AppKey("sg2_auth", KeyChecker)
CALLS_KEY = web.AppKey("sg2_realtime_calls", dict)  # session id -> RealtimeCall (open calls)
STARTED_KEY = web.AppKey("sg2_started_at", float)


def create_app(
    engine: Engine,
    settings: Settings,
    *,
    extensions: Iterable[Extension] = (),
    metrics: ServerMetrics | None = None,
) -> web.Application:
    srv = settings.server
    app = web.Application(client_max_size=srv.max_message_bytes)
    app[ENGINE_KEY] = engine
    app[SETTINGS_KEY] = settings
    app[METRICS_KEY] = metrics or ServerMetrics()
    app[AUTH_KEY] = KeyChecker(settings.auth.keys())
    app[CALLS_KEY] = {}
    app[STARTED_KEY] = time.monotonic()
    app.router.add_get("/v1/realtime", realtime_handler)
    app.router.add_get("/healthz", healthz_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.on_shutdown.append(_close_calls)
    for extension in extensions:
        extension(app)
    return app


async def realtime_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS_KEY]
    metrics = app[METRICS_KEY]
    denied = app[AUTH_KEY].check(request)
    if denied is not None:
        metrics.connections.labels("unauthorized").inc()
        return denied
    srv = settings.server
    ws = web.WebSocketResponse(
        protocols=("realtime",),
        heartbeat=srv.heartbeat_s,
        max_msg_size=srv.hard_max_message_bytes,
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        metrics.connections.labels("bad_request").inc()
        return web.json_response(
            {
                "error": {
                    "type": "invalid_request_error",
                    "code": "websocket_required",
                    "message": "this endpoint speaks the OpenAI Realtime protocol over a WebSocket",
                }
            },
            status=426,
            headers={"Upgrade": "websocket"},
        )
    await ws.prepare(request)
    call = RealtimeCall(request, ws, app[ENGINE_KEY], settings, metrics, app[CALLS_KEY])
    await call.run()
    return ws


async def healthz_handler(request: web.Request) -> web.Response:
    app = request.app
    engine = app[ENGINE_KEY]
    settings = app[SETTINGS_KEY]
    ok = engine.running
    body: dict[str, Any] = {
        "ok": ok,
        "version": sg2_runtime.__version__,
        "uptime_s": round(time.monotonic() - app[STARTED_KEY], 1),
        "live_sessions": engine.live_sessions,
        "capacity": engine.config.max_sessions,
        "capacity_left": engine.capacity_left,
        "realtime_calls": len(app[CALLS_KEY]),
        "model": {"name": settings.realtime.model_name, **settings.models.describe()},
        "auth": app[AUTH_KEY].enabled,
    }
    return web.json_response(body, status=200 if ok else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    app = request.app
    body = generate_latest(app[ENGINE_KEY].metrics.registry) + generate_latest(app[METRICS_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _close_calls(app: web.Application) -> None:
    calls = list(app[CALLS_KEY].values())
    if calls:
        log.info("closing %d open realtime call(s)", len(calls))
        await asyncio.gather(*(call.shutdown() for call in calls), return_exceptions=True)
