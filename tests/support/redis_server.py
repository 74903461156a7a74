"""Start a real `redis-server` (Debian package) on a free loopback port.

Usage:

    with start_redis_server(tmp_path) as redis:
        assert redis.command("PING") == "PONG"
        start_livekit_server(..., redis_address=redis.address)
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import require_binary
from ._process import ServerProcess, ServerStartError
from .ports import free_tcp_port


def _encode(*args: str | bytes | int) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _read_reply(f) -> Any:
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(f"redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RuntimeError(f"unexpected redis reply: {line!r}")


def redis_command(host: str, port: int, *args: str | bytes | int, timeout: float = 2.0) -> Any:
    """Send one command over RESP (no client library needed) and return the decoded reply."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(_encode(*args))
        with s.makefile("rb") as f:
            return _read_reply(f)


@dataclass
class RedisServer:
    host: str
    port: int
    log_path: Path
    process: ServerProcess

    @property
    def address(self) -> str:
        """ "127.0.0.1:PORT" (LiveKit's `redis.address`)."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self, *args: str | bytes | int) -> Any:
        return redis_command(self.host, self.port, *args)

    def ping(self) -> bool:
        return self.command("PING") == "PONG"


@contextlib.contextmanager
def start_redis_server(
    tmp_dir: Path | None = None, *, startup_timeout: float = 15.0
) -> Iterator[RedisServer]:
    """Run a throw-away redis-server (no persistence, loopback only) until the block exits."""
    exe = require_binary("redis-server")
    own_tmp = None
    if tmp_dir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="redis-")
        tmp_dir = Path(own_tmp.name)
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = None
        last_error: Exception | None = None
        for attempt in range(3):
            port = free_tcp_port()
            log_path = tmp_dir / f"redis-{attempt}.log"
            argv = [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(tmp_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ]
            proc = ServerProcess("redis-server", argv, log_path, cwd=tmp_dir).start()
            try:
                proc.wait_ready(
                    lambda p=port: redis_command("127.0.0.1", p, "PING", timeout=0.5) == "PONG",
                    startup_timeout,
                )
            except ServerStartError as exc:
                proc.stop()
                last_error = exc
                if "Address already in use" in proc.log_text():
                    continue
                raise
            server = RedisServer("127.0.0.1", port, log_path, proc)
            break
        if server is None:
            raise ServerStartError(f"redis-server could not start: {last_error}")
        try:
            yield server
        except BaseException:
            server.process.dump_log("the block using it raised")
            raise
        finally:
            server.process.stop()
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def redis_server_fixture(scope: str = "function", **kwargs: Any):
    """A pytest fixture (assign it to a name in a test module or conftest) yielding a RedisServer."""

    @pytest.fixture(scope=scope)
    def _redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
        with start_redis_server(tmp_path_factory.mktemp("redis"), **kwargs) as server:
            yield server

    return _redis_server
