"""Several ``sg2 serve`` engine servers behind one agent worker: health, load, choice, failures.

Each server reports its state at ``GET /healthz`` (``ok``, ``capacity``, ``capacity_left``,
``live_sessions``). :class:`EnginePool` probes all of them in parallel and:

- orders the candidates for a new call: reachable, healthy servers with room first, least loaded
  first (share of capacity in use, then most free slots, then configuration order); servers that
  failed a call recently (``failure_cooldown_s``) go last, as a fallback only; unreachable ones are
  left out;
- sums the free capacity of the whole deployment for the worker's ``load_fnc``.

The pool keeps no connection open; a probe is a few small HTTP requests (``health_timeout_s`` each,
all at once), cheap enough to run before every call and every few seconds for the load report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp

log = logging.getLogger("sg2.livekit.servers")


@dataclass(frozen=True)
class EngineServer:
    """One ``sg2 serve`` endpoint: its HTTP base URL (``http://host:port``) and API key."""

    url: str
    api_key: str | None = field(default=None, repr=False)
    name: str = ""

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https", "ws", "wss") or not parsed.netloc:
            raise ValueError(f"engine server URL {self.url!r} must be http(s)://host:port")
        base = self.url.rstrip("/")
        if parsed.scheme.startswith("ws"):
            base = "http" + base[2:]
        object.__setattr__(self, "url", base)
        if not self.name:
            object.__setattr__(self, "name", urlparse(base).netloc)

    @property
    def health_url(self) -> str:
        return f"{self.url}/healthz"

    @property
    def realtime_url(self) -> str:
        """The Realtime WebSocket (``ws(s)://host:port/v1/realtime``)."""
        return "ws" + self.url[4:] + "/v1/realtime"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class ServerStatus:
    server: EngineServer
    reachable: bool = False
    ok: bool = False
    capacity: int = 0
    capacity_left: int = 0
    live_sessions: int = 0
    error: str | None = None
    checked_at: float = 0.0

    @property
    def usable(self) -> bool:
        return self.reachable and self.ok and self.capacity_left > 0

    @property
    def utilisation(self) -> float:
        return 1.0 if self.capacity <= 0 else (self.capacity - self.capacity_left) / self.capacity

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.server.name,
            "reachable": self.reachable,
            "ok": self.ok,
            "capacity": self.capacity,
            "capacity_left": self.capacity_left,
            "live_sessions": self.live_sessions,
            "error": self.error,
        }


class NoEngineServerError(RuntimeError):
    """No configured engine server can take a call now."""


class EnginePool:
    """The engine servers a worker (or one call) may use. Safe to share within one event loop."""

    def __init__(
        self,
        servers: Iterable[EngineServer],
        *,
        health_timeout_s: float = 2.0,
        failure_cooldown_s: float = 30.0,
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.servers: list[EngineServer] = list(servers)
        if not self.servers:
            raise ValueError("at least one engine server is needed")
        names = [s.name for s in self.servers]
        if len(set(names)) != len(names):
            raise ValueError(f"engine servers must be distinct: {names}")
        self.health_timeout_s = health_timeout_s
        self.failure_cooldown_s = failure_cooldown_s
        self._session = http_session
        self._own_session = False
        self._failed_at: dict[str, float] = {}
        self._status: dict[str, ServerStatus] = {s.name: ServerStatus(s) for s in self.servers}

    # ------------------------------------------------------------------ probing
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    async def _probe_one(self, server: EngineServer) -> ServerStatus:
        status = ServerStatus(server, checked_at=time.monotonic())
        try:
            timeout = aiohttp.ClientTimeout(total=self.health_timeout_s)
            async with self._http().get(server.health_url, headers=server.headers(), timeout=timeout) as r:
                status.reachable = True
                if r.status == 401:
                    status.error = "unauthorized (check the engine server's API key)"
                    return status
                body = await r.json(content_type=None)
            status.ok = bool(body.get("ok")) and r.status == 200
            status.capacity = int(body.get("capacity", 0))
            status.capacity_left = int(body.get("capacity_left", 0))
            status.live_sessions = int(body.get("live_sessions", 0))
            if not status.ok:
                status.error = f"unhealthy (HTTP {r.status})"
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, AttributeError) as exc:
            status.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return status

    async def probe(self) -> list[ServerStatus]:
        """Ask every server for its state now (in parallel); remembered for :meth:`load`."""
        results = await asyncio.gather(*(self._probe_one(s) for s in self.servers))
        for status in results:
            self._status[status.server.name] = status
            if status.usable and self._recently_failed(status.server) is None:
                self._failed_at.pop(status.server.name, None)
        return list(results)

    def statuses(self) -> list[ServerStatus]:
        """The last probe's results (no I/O)."""
        return [self._status[s.name] for s in self.servers]

    # ------------------------------------------------------------------ choice
    def _recently_failed(self, server: EngineServer) -> float | None:
        at = self._failed_at.get(server.name)
        if at is None or time.monotonic() - at > self.failure_cooldown_s:
            return None
        return at

    def order(self, statuses: Sequence[ServerStatus]) -> list[EngineServer]:
        """Servers for a new call, best first (see the module docstring); unusable ones left out."""
        index = {s.name: i for i, s in enumerate(self.servers)}
        usable = [st for st in statuses if st.usable]
        fresh = [st for st in usable if self._recently_failed(st.server) is None]
        cooling = [st for st in usable if self._recently_failed(st.server) is not None]

        def key(st: ServerStatus) -> tuple[float, int, int]:
            return (st.utilisation, -st.capacity_left, index[st.server.name])

        return [st.server for st in sorted(fresh, key=key)] + [st.server for st in sorted(cooling, key=key)]

    async def candidates(self, wait_s: float = 0.0) -> list[EngineServer]:
        """Probe now and return the servers to try for a new call, best first.

        While no server can take the call but some did not answer (a busy or restarting server),
        probe again for up to ``wait_s``; servers that answered "full" are not waited for. Raises
        :class:`NoEngineServerError` (with every server's state) when none can take a call."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            statuses = await self.probe()
            ordered = self.order(statuses)
            if ordered or loop.time() >= deadline or all(st.reachable for st in statuses):
                break
            await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))
        if not ordered:
            raise NoEngineServerError(
                "no engine server can take a call: "
                + "; ".join(
                    f"{st.server.name}: {st.error or f'{st.capacity_left}/{st.capacity} slots free'}"
                    for st in statuses
                )
            )
        return ordered

    def mark_failed(self, server: EngineServer, reason: str) -> None:
        """A call on ``server`` failed (connection lost, refused, ...): new calls avoid it for a while."""
        log.warning("engine server %s failed: %s", server.name, reason)
        self._failed_at[server.name] = time.monotonic()
        st = self._status.get(server.name)
        if st is not None:
            st.ok = False
            st.error = reason

    def mark_full(self, server: EngineServer) -> None:
        """``server`` refused a call for capacity (another worker took its last slot first)."""
        st = self._status.get(server.name)
        if st is not None:
            st.capacity_left = 0

    # ------------------------------------------------------------------ load
    def capacity(self) -> tuple[int, int]:
        """(free slots, total slots) over the servers that answered the last probe and are healthy."""
        free = total = 0
        for st in self.statuses():
            if st.reachable and st.ok:
                free += max(0, st.capacity_left)
                total += max(0, st.capacity)
        return free, total

    def load(self) -> float:
        """Share of the deployment's call slots in use, in [0, 1]: 1.0 when no slot is free anywhere
        (including when no server answers), so LiveKit sends no more jobs to this worker."""
        free, total = self.capacity()
        if total <= 0 or free <= 0:
            return 1.0
        return 1.0 - free / total

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
        self._session = None
        self._own_session = False
