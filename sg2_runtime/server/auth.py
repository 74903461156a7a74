"""API-key authentication of the Realtime WebSocket (and any route an extension protects).

Keys arrive as ``Authorization: Bearer <key>`` (the OpenAI SDK, livekit-plugins-openai) or, from
browsers that cannot set headers on a WebSocket, as the ``openai-insecure-api-key.<key>`` entry of
``Sec-WebSocket-Protocol``. With no key configured, the server is open (``sg2 serve`` refuses that on
a non-loopback address unless ``auth.allow_anonymous_remote`` is set).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from aiohttp import web

SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."


def presented_key(request: web.Request) -> str | None:
    """The key the client presented, if any (header first, then the subprotocol form)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(SUBPROTOCOL_KEY_PREFIX) and len(proto) > len(SUBPROTOCOL_KEY_PREFIX):
            return proto[len(SUBPROTOCOL_KEY_PREFIX) :]
    return None


class KeyChecker:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def accepts(self, key: str | None) -> bool:
        if not self._keys:
            return True
        if key is None:
            return False
        given = key.encode()
        # compare against every key (no early exit) so timing does not tell which one matched
        return any([hmac.compare_digest(given, k) for k in self._keys])

    def check(self, request: web.Request) -> web.Response | None:
        """None if the request may proceed, else the 401 response to send."""
        key = presented_key(request)
        if self.accepts(key):
            return None
        message = "missing API key" if key is None else "invalid API key"
        return web.json_response(
            {"error": {"type": "invalid_request_error", "code": "invalid_api_key", "message": message}},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="sg2"'},
        )
