"""Signalling for browser calls (WHIP style) and the web client, as an aiohttp extension.

Routes (``Authorization: Bearer <access_key>`` on the ``/v1/webrtc`` ones when a key is set):

- ``GET  /v1/webrtc/config``      ICE servers for the page and whether a key is needed.
- ``POST /v1/webrtc/calls``       body: an SDP offer (``application/sdp``, as WHIP), or JSON
  ``{"sdp": "...", "options": {...}}``. Answer: ``201 Created``, ``Location: /v1/webrtc/calls/<id>``,
  the SDP answer (or JSON ``{"call_id", "sdp", "type": "answer"}`` for a JSON offer).
- ``DELETE /v1/webrtc/calls/<id>`` hang up (``204``).
- ``PATCH  /v1/webrtc/calls/<id>`` ``405``: candidates are not trickled; offers must carry them
  (the page waits for ICE gathering to complete, which is instant on a LAN).
- ``GET  /v1/webrtc/calls``        live calls and recently ended ones (operators, tests).
- ``GET  /`` and ``/assets/*``     the built web client (``web_client/dist``).

Errors are JSON ``{"error": {"code", "message"}}``: 400 malformed/unsupported SDP or options,
401 missing/wrong key, 404 unknown call, 413 offer larger than ``max_sdp_bytes``, 415 wrong content
type, 503 call limit reached (``max_calls`` or no engine capacity; with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.sdp import SessionDescription

from sg2_runtime.engine.engine import CapacityError

from .call import DirectCall
from .metrics import DirectMetrics
from .rtc import tune_audio_jitter_buffer
from .settings import DirectSettings

log = logging.getLogger("sg2.direct")

API = "/v1/webrtc"
RECENT_ENDED = 32


class SignallingError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = json.dumps({"error": {"code": self.code, "message": self.message}})
        return web.Response(
            status=self.status, text=body, content_type="application/json", headers=self.headers
        )


class DirectService:
    """Every browser call of one server process."""

    def __init__(
        self,
        engine: Any,
        settings: DirectSettings,
        key_check: Callable[[str | None], bool] | None = None,
        metrics: DirectMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics or DirectMetrics()
        # the transport's own access key if set; else whatever the host server accepts (API keys)
        self.key_check = (
            settings.key_matches if settings.access_key is not None or key_check is None else key_check
        )
        self.auth_required = settings.access_key is not None or key_check is not None
        self.calls: dict[str, DirectCall] = {}
        self.ended: deque[dict[str, Any]] = deque(maxlen=RECENT_ENDED)
        self._pending = 0  # offers being answered (count against max_calls)
        self._closing = False

    # ------------------------------------------------------------------ wiring
    def install(self, app: web.Application) -> None:
        r = app.router
        r.add_get(f"{API}/config", self.handle_config)
        r.add_post(f"{API}/calls", self.handle_offer)
        r.add_get(f"{API}/calls", self.handle_list)
        r.add_delete(f"{API}/calls/{{call_id}}", self.handle_delete)
        r.add_patch(f"{API}/calls/{{call_id}}", self.handle_patch)
        r.add_route("OPTIONS", f"{API}/calls", self.handle_options)
        web_dir = self.settings.web_client_dir
        r.add_get("/", self.handle_index)
        if web_dir is not None and (web_dir / "assets").is_dir():
            r.add_static("/assets", web_dir / "assets")
        app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, _app: web.Application) -> None:
        await self.close_all("server shutdown")

    async def close_all(self, reason: str) -> None:
        self._closing = True
        calls = list(self.calls.values())
        if calls:
            log.info("closing %d browser call(s): %s", len(calls), reason)
        await asyncio.gather(*(c.close(reason, "shutdown") for c in calls), return_exceptions=True)

    # ------------------------------------------------------------------ handlers
    async def handle_index(self, request: web.Request) -> web.StreamResponse:
        web_dir = self.settings.web_client_dir
        index = web_dir / "index.html" if web_dir is not None else None
        if index is None or not index.is_file():
            return web.Response(
                status=503,
                text=(
                    "The web client is not built. Build it with `make web-client` "
                    "(or `npm ci && npm run build` in web_client/), then restart the server.\n"
                ),
            )
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

    async def handle_config(self, request: web.Request) -> web.Response:
        authorized = self.key_check(_bearer(request))
        body: dict[str, Any] = {
            "auth_required": self.auth_required,
            "authorized": authorized,
            "calls_endpoint": f"{API}/calls",
            "max_calls": self.settings.max_calls,
        }
        # TURN credentials are only handed to callers who may place calls
        body["ice_servers"] = [s.public() for s in self.settings.ice_servers] if authorized else []
        return web.json_response(body)

    async def handle_options(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Accept-Post": "application/sdp, application/json"})

    async def handle_list(self, request: web.Request) -> web.Response:
        try:
            self._authorize(request)
        except SignallingError as err:
            return err.response()
        return web.json_response(
            {
                "calls": [c.info() for c in self.calls.values()],
                "max_calls": self.settings.max_calls,
                "ended": list(self.ended),
            }
        )

    async def handle_patch(self, request: web.Request) -> web.Response:
        try:
            self._authorize(request)
            self._get_call(request)
        except SignallingError as err:
            return err.response()
        return SignallingError(
            405,
            "trickle_not_supported",
            "trickled ICE candidates are not supported: send an offer with all candidates",
            {"Allow": "DELETE"},
        ).response()

    async def handle_delete(self, request: web.Request) -> web.Response:
        try:
            self._authorize(request)
            call = self._get_call(request)
        except SignallingError as err:
            return err.response()
        await call.close("hung up (DELETE)", "hangup")
        return web.Response(status=204)

    async def handle_offer(self, request: web.Request) -> web.Response:
        try:
            self._authorize(request)
            sdp, overrides, as_json = await self._read_offer(request)
            options = self._options(overrides)
            self._reserve()
        except SignallingError as err:
            self.metrics.offers.labels(err.code).inc()
            return err.response()
        try:
            call, answer = await self._answer(sdp, options)
        except SignallingError as err:
            self.metrics.offers.labels(err.code).inc()
            return err.response()
        finally:
            self._pending -= 1
        self.metrics.offers.labels("answered").inc()
        self.metrics.active.set(len(self.calls))
        location = f"{API}/calls/{call.id}"
        headers = {"Location": location}
        links = [
            f'<{url}>; rel="ice-server"'
            for s in self.settings.ice_servers
            for url in s.urls
            if url.startswith("stun:")
        ]
        if links:
            headers["Link"] = ", ".join(links)
        if as_json:
            return web.json_response(
                {"type": "answer", "sdp": answer, "call_id": call.id, "location": location},
                status=201,
                headers=headers,
            )
        return web.Response(status=201, text=answer, content_type="application/sdp", headers=headers)

    # ------------------------------------------------------------------ the offer
    def _authorize(self, request: web.Request) -> None:
        if not self.key_check(_bearer(request)):
            raise SignallingError(
                401,
                "unauthorized",
                "missing or wrong access key (send 'Authorization: Bearer <key>')",
                {"WWW-Authenticate": 'Bearer realm="sg2"'},
            )

    def _get_call(self, request: web.Request) -> DirectCall:
        call = self.calls.get(request.match_info["call_id"])
        if call is None:
            raise SignallingError(404, "no_such_call", "no such call (it may have ended)")
        return call

    async def _read_offer(self, request: web.Request) -> tuple[str, dict[str, Any], bool]:
        limit = self.settings.max_sdp_bytes
        if request.content_length is not None and request.content_length > limit:
            raise SignallingError(413, "offer_too_large", f"the offer is larger than {limit} bytes")
        ctype = request.content_type
        if ctype not in ("application/sdp", "application/json"):
            raise SignallingError(
                415, "unsupported_media_type", "send the offer as application/sdp (or application/json)"
            )
        body = await request.content.read(limit + 1)
        if len(body) > limit:
            raise SignallingError(413, "offer_too_large", f"the offer is larger than {limit} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SignallingError(400, "malformed_sdp", "the offer is not UTF-8 text") from exc
        overrides: dict[str, Any] = {}
        if ctype == "application/json":
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SignallingError(400, "malformed_request", f"invalid JSON: {exc}") from exc
            if not isinstance(doc, dict) or not isinstance(doc.get("sdp"), str):
                raise SignallingError(400, "malformed_request", 'JSON offers look like {"sdp": "v=0..."}')
            if doc.get("type", "offer") != "offer":
                raise SignallingError(400, "malformed_request", "only offers can be posted")
            overrides = doc.get("options") or {}
            if not isinstance(overrides, dict):
                raise SignallingError(400, "invalid_options", "'options' must be an object")
            text = doc["sdp"]
        _check_sdp(text)
        return text, overrides, ctype == "application/json"

    def _options(self, overrides: dict[str, Any]) -> Any:
        try:
            return self.settings.session_options(overrides)
        except ValueError as exc:
            raise SignallingError(400, "invalid_options", str(exc)) from exc

    def _reserve(self) -> None:
        if self._closing:
            raise SignallingError(503, "shutting_down", "the server is shutting down")
        if len(self.calls) + self._pending >= self.settings.max_calls:
            raise SignallingError(
                503,
                "call_limit",
                f"all {self.settings.max_calls} call slots are in use; try again later",
                {"Retry-After": "5"},
            )
        self._pending += 1

    async def _answer(self, sdp: str, options: Any) -> tuple[DirectCall, str]:
        try:
            session = self.engine.open_session(options)
        except CapacityError as exc:
            raise SignallingError(503, "engine_full", str(exc), {"Retry-After": "5"}) from exc
        except ValueError as exc:
            raise SignallingError(400, "invalid_options", str(exc)) from exc
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers()))
        call = DirectCall(
            _new_call_id(),
            pc,
            session,
            self.settings,
            self._forget,
            metrics=self.metrics,
        )
        try:
            transceiver = pc.addTransceiver(call.track, direction="sendrecv")
            opus = [
                c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"
            ]
            transceiver.setCodecPreferences(opus)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except Exception as exc:
                raise SignallingError(400, "unsupported_offer", _offer_problem(exc)) from exc
            if transceiver.mid is None:
                raise SignallingError(400, "unsupported_offer", "the offer has no usable audio section")
            tune_audio_jitter_buffer(transceiver.receiver, self.settings.inbound_jitter_packets)
            await pc.setLocalDescription(await pc.createAnswer())
            answer = pc.localDescription.sdp
        except BaseException as exc:
            await call.close(
                "signalling failed" if isinstance(exc, SignallingError) else f"signalling error: {exc}",
                "signalling_failed",
            )
            if isinstance(exc, SignallingError | asyncio.CancelledError):
                raise
            log.exception("answering an offer failed")
            raise SignallingError(500, "internal_error", f"could not answer the offer: {exc}") from exc
        if self._closing:  # shutdown began while this offer was being answered
            await call.close("server shutdown", "shutdown")
            raise SignallingError(503, "shutting_down", "the server is shutting down")
        # registered only now, in the same step that releases its reservation (no double count)
        self.calls[call.id] = call
        call.start()
        log.info("call %s started (session %s)", call.id, session.id)
        return call, answer

    def _ice_servers(self) -> list[RTCIceServer]:
        # an explicit empty list: aiortc would otherwise query a public STUN server
        return [
            RTCIceServer(
                urls=list(s.urls),
                username=s.username,
                credential=s.credential.get_secret_value() if s.credential is not None else None,
            )
            for s in self.settings.ice_servers
        ]

    def _forget(self, call: DirectCall) -> None:
        if self.calls.get(call.id) is call:
            del self.calls[call.id]
            self.metrics.active.set(len(self.calls))
            self.metrics.ended.labels(call.end_kind or "other").inc()
            self.ended.append(
                {"id": call.id, "reason": call.end_reason, "kind": call.end_kind, "latencies": call.latencies}
            )


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(12)


def _check_sdp(text: str) -> None:
    """Reject what is not an SDP offer with audio before aiortc sees it."""
    if not text.lstrip().startswith("v=0"):
        raise SignallingError(400, "malformed_sdp", "an SDP offer starts with 'v=0'")
    try:
        desc = SessionDescription.parse(text)
    except Exception as exc:
        raise SignallingError(400, "malformed_sdp", f"the SDP offer does not parse: {exc}") from exc
    audio = [m for m in desc.media if m.kind == "audio"]
    if not audio:
        raise SignallingError(400, "malformed_sdp", "the offer has no audio section")
    if len(audio) > 1 or any(m.kind == "video" for m in desc.media):
        raise SignallingError(
            400, "unsupported_offer", "send one audio section (and a data channel); no video"
        )
    if audio[0].direction not in (None, "sendrecv"):
        raise SignallingError(
            400, "unsupported_offer", f"the offer's audio must be sendrecv, not {audio[0].direction}"
        )
    if not any(c.mimeType.lower() == "audio/opus" for m in audio for c in m.rtp.codecs):
        raise SignallingError(400, "unsupported_offer", "the offer's audio does not include Opus")
    if not all(m.ice.usernameFragment and m.ice.password for m in desc.media):
        raise SignallingError(400, "malformed_sdp", "the offer lacks ICE credentials (a=ice-ufrag/ice-pwd)")
    if not all(m.dtls is not None and m.dtls.fingerprints for m in desc.media):
        raise SignallingError(400, "malformed_sdp", "the offer lacks a DTLS fingerprint")


def _offer_problem(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"the offer cannot be used: {text}"


def setup_direct(
    app: web.Application,
    engine: Any,
    settings: DirectSettings | dict[str, Any] | None = None,
    *,
    key_check: Callable[[str | None], bool] | None = None,
    registry: Any = None,
) -> DirectService:
    """Add browser calls to an aiohttp app: signalling routes, the web client at '/', shutdown hook.

    ``engine`` is a started :class:`sg2_runtime.engine.engine.Engine` whose lifetime the caller owns
    (calls are closed in ``on_shutdown``, which aiohttp runs before ``on_cleanup``). ``key_check``
    (optional) accepts or refuses a presented key when ``settings.access_key`` is not set, e.g. the
    host server's API keys; ``registry`` is the Prometheus registry for the transport's metrics
    (a private one if None).
    """
    if not isinstance(settings, DirectSettings):
        settings = DirectSettings.model_validate(settings or {})
    service = DirectService(engine, settings, key_check, DirectMetrics(registry))
    service.install(app)
    app[DIRECT_SERVICE] = service
    return service


def direct_extension(
    engine: Any,
    settings: DirectSettings | dict[str, Any] | None = None,
    *,
    key_check: Callable[[str | None], bool] | None = None,
) -> Callable[[web.Application], None]:
    """The same as an extension for ``create_app(engine, settings, extensions=[...])``."""

    def extend(app: web.Application) -> None:
        setup_direct(app, engine, settings, key_check=key_check)

    return extend


def install(app: web.Application) -> None:
    """The ``sg2 serve`` extension (``agent.direct:install``): engine and settings from the app.

    Reads the ``direct:`` section of the server settings (:class:`DirectSettings`); without a
    ``direct.access_key`` the server's own API keys (``auth:``) protect the signalling routes.
    """
    from sg2_runtime.server.app import AUTH_KEY, ENGINE_KEY, METRICS_KEY, SETTINGS_KEY

    settings = DirectSettings.model_validate(app[SETTINGS_KEY].section("direct"))
    if not settings.enabled:
        log.info("browser calls are disabled (direct.enabled: false)")
        return
    auth = app.get(AUTH_KEY)
    key_check = auth.accepts if auth is not None and auth.enabled else None
    metrics = app.get(METRICS_KEY)
    registry = metrics.registry if metrics is not None else None
    setup_direct(app, app[ENGINE_KEY], settings, key_check=key_check, registry=registry)


DIRECT_SERVICE: web.AppKey[DirectService] = web.AppKey("sg2_direct_service", DirectService)
