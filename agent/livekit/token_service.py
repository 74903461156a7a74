"""Room tokens from ``sg2 serve``: ``POST /v1/livekit/token`` mints a short-lived LiveKit access token;
``GET /v1/livekit/config`` tells a page that room calls are offered (and whether a key is needed).

Enabled by a ``livekit:`` section (URL, API key and secret, here or in ``$LIVEKIT_*``); behind the
same API keys as the rest of the server (``Authorization: Bearer <key>``). The LiveKit API secret
signs the token here and never leaves the server.

Request (JSON body, every field optional)::

    {"room": "standup", "identity": "alice", "name": "Alice", "metadata": "..."}

Response::

    {"url": "wss://livekit.example.org", "token": "<JWT>", "room": "sg2-standup",
     "identity": "alice", "agent_name": "sg2", "expires_at": "2025-...Z", "ttl_s": 600}

The token lets its holder join that one room only (microphone publishing, subscribing, data for
chat), for ``token_service.ttl_s`` seconds (a participant who joined stays connected past it). Room
names always carry ``token_service.room_prefix`` (added when missing), so the service cannot be used
to enter rooms outside it; with no room given, a new room is made up, and with
``allow_room_choice: false`` every token opens a new room. With explicit dispatch
(``livekit.agent_name``), the token's room configuration dispatches the agent when its holder
creates the room by joining it.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web
from prometheus_client import Counter
from pydantic import ValidationError

from sg2_runtime.server.app import AUTH_KEY, METRICS_KEY, SETTINGS_KEY

from .settings import ROOM_NAME_RE, LiveKitSection

log = logging.getLogger("sg2.livekit.tokens")

TOKEN_ROUTE = "/v1/livekit/token"
CONFIG_ROUTE = "/v1/livekit/config"
IDENTITY_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
RESERVED_IDENTITY_PREFIX = "sg2-agent-"
MAX_BODY = 8192
MAX_METADATA = 2048

TOKEN_SERVICE_KEY = web.AppKey("sg2_livekit_token_service", object)


class TokenService:
    def __init__(self, section: LiveKitSection, registry: Any | None = None) -> None:
        missing = section.missing()
        if missing:
            raise ValueError(f"livekit: {', '.join(missing)} not set (needed for the token service)")
        self.section = section
        self.url = section.resolved_public_url()
        self._api_key = section.resolved_api_key()
        self._api_secret = section.resolved_api_secret()
        self.tokens = Counter(
            "sg2_livekit_tokens",
            "LiveKit room tokens requested, by outcome",
            ["outcome"],
            registry=registry,
        )

    def mint(self, body: dict[str, Any]) -> dict[str, Any]:
        """The response for a valid request; raises ValueError with a message for the caller."""
        from livekit import api

        opts = self.section.token_service
        room = body.get("room")
        if room is not None and not opts.allow_room_choice:
            raise ValueError("this server opens a new room for every token ('room' cannot be chosen)")
        if room is None:
            room = f"{opts.room_prefix}{secrets.token_hex(6)}"
        else:
            if not isinstance(room, str) or not ROOM_NAME_RE.match(room):
                raise ValueError("room: 1-128 characters among letters, digits and _.:-")
            if not room.startswith(opts.room_prefix):
                room = opts.room_prefix + room
            if len(room) > 128:
                raise ValueError("room: too long with the room prefix (128 characters at most)")
        identity = body.get("identity")
        if identity is None:
            identity = f"{opts.identity_prefix}{secrets.token_hex(5)}"
        elif (
            not isinstance(identity, str)
            or not IDENTITY_RE.match(identity)
            or identity.startswith(RESERVED_IDENTITY_PREFIX)
        ):
            raise ValueError(
                f"identity: 1-128 characters among letters, digits and _.:@- (not starting with "
                f"{RESERVED_IDENTITY_PREFIX!r})"
            )
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 128):
            raise ValueError("name: a string of at most 128 characters")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, str) or len(metadata) > MAX_METADATA):
            raise ValueError(f"metadata: a string of at most {MAX_METADATA} characters")

        grants = api.VideoGrants(
            room_join=True,
            room=room,
            can_publish=True,
            can_publish_sources=["microphone"],
            can_subscribe=True,
            can_publish_data=True,
            can_update_own_metadata=False,
        )
        ttl = timedelta(seconds=opts.ttl_s)
        token = (
            api.AccessToken(self._api_key, self._api_secret)
            .with_identity(identity)
            .with_grants(grants)
            .with_ttl(ttl)
        )
        if name:
            token = token.with_name(name)
        if metadata:
            token = token.with_metadata(metadata)
        agent_name = self.section.agent_name
        if agent_name:
            dispatch = api.RoomAgentDispatch(
                agent_name=agent_name, metadata=json.dumps({"identity": identity})
            )
            token = token.with_room_config(api.RoomConfiguration(agents=[dispatch]))
        expires = datetime.now(timezone.utc) + ttl
        return {
            "url": self.url,
            "token": token.to_jwt(),
            "room": room,
            "identity": identity,
            "agent_name": agent_name or None,
            "expires_at": expires.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "ttl_s": opts.ttl_s,
        }


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"type": "invalid_request_error", "code": code, "message": message}}, status=status
    )


async def token_handler(request: web.Request) -> web.Response:
    service: TokenService = request.app[TOKEN_SERVICE_KEY]  # type: ignore[assignment]
    denied = request.app[AUTH_KEY].check(request)
    if denied is not None:
        service.tokens.labels("unauthorized").inc()
        return denied
    if request.content_length is not None and request.content_length > MAX_BODY:
        service.tokens.labels("invalid").inc()
        return _error(413, "body_too_large", f"the request body must be at most {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        service.tokens.labels("invalid").inc()
        return _error(413, "body_too_large", f"the request body must be at most {MAX_BODY} bytes")
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        service.tokens.labels("invalid").inc()
        return _error(400, "invalid_json", "the body must be a JSON object")
    if not isinstance(body, dict):
        service.tokens.labels("invalid").inc()
        return _error(400, "invalid_json", "the body must be a JSON object")
    unknown = set(body) - {"room", "identity", "name", "metadata"}
    if unknown:
        service.tokens.labels("invalid").inc()
        return _error(400, "unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
    t0 = time.perf_counter()
    try:
        out = service.mint(body)
    except ValueError as exc:
        service.tokens.labels("invalid").inc()
        return _error(400, "invalid_value", str(exc))
    service.tokens.labels("issued").inc()
    log.info(
        "token for %s in room %s (%.1f ms)", out["identity"], out["room"], (time.perf_counter() - t0) * 1000
    )
    return web.json_response(out, headers={"Cache-Control": "no-store"})


async def config_handler(request: web.Request) -> web.Response:
    """``GET /v1/livekit/config``: what a page needs to offer room calls (no secret, no token)."""
    service: TokenService = request.app[TOKEN_SERVICE_KEY]  # type: ignore[assignment]
    checker = request.app[AUTH_KEY]
    opts = service.section.token_service
    return web.json_response(
        {
            "available": True,
            "auth_required": checker.enabled,
            "authorized": checker.check(request) is None,
            "token_endpoint": TOKEN_ROUTE,
            "agent_name": service.section.agent_name or None,
            "room_prefix": opts.room_prefix,
            "allow_room_choice": opts.allow_room_choice,
        },
        headers={"Cache-Control": "no-store"},
    )


def setup_token_service(app: web.Application, section: LiveKitSection) -> TokenService:
    """Add ``POST /v1/livekit/token`` and ``GET /v1/livekit/config`` to an ``sg2 serve`` app (built
    by ``create_app``)."""
    service = TokenService(section, registry=app[METRICS_KEY].registry)
    app[TOKEN_SERVICE_KEY] = service
    app.router.add_post(TOKEN_ROUTE, token_handler)
    app.router.add_get(CONFIG_ROUTE, config_handler)
    return service


def install(app: web.Application) -> None:
    """The ``sg2 serve`` extension ``agent.livekit.token_service:install``: reads the ``livekit:``
    section of the server settings."""
    try:
        section = LiveKitSection.model_validate(app[SETTINGS_KEY].section("livekit"))
    except ValidationError as exc:
        raise ValueError(f"livekit: {exc}") from exc
    if not section.token_service.enabled:
        return
    setup_token_service(app, section)
