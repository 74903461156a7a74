"""Free loopback ports for servers started by tests.

The ports are checked by binding them and released again, so another process may in principle take
one before the server binds it; picking at random from a wide range keeps that unlikely even with
several test processes at once. Servers started by `tests.support` retry on a bind failure.
"""

from __future__ import annotations

import random
import socket

HOST = "127.0.0.1"
# Above the usual ephemeral range start (32768) is what the kernel hands out for port 0; we pick
# from a range below it so a random pick does not collide with outgoing connections' ports.
_RANGE = (20000, 32000)


def _can_bind(port: int, kind: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    # Servers may bind the wildcard address (livekit's RTC TCP port does): check that too.
    if host != "0.0.0.0":
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def free_port(
    *, tcp: bool = True, udp: bool = False, host: str = HOST, exclude: set[int] | None = None
) -> int:
    """A port that is currently free for TCP and/or UDP on `host` (and the wildcard address)."""
    if not (tcp or udp):
        raise ValueError("ask for tcp and/or udp")
    exclude = exclude or set()
    for _ in range(1000):
        port = random.randint(*_RANGE)
        if port in exclude:
            continue
        if tcp and not _can_bind(port, socket.SOCK_STREAM, host):
            continue
        if udp and not _can_bind(port, socket.SOCK_DGRAM, host):
            continue
        return port
    raise RuntimeError("no free port found")


def free_tcp_port(host: str = HOST) -> int:
    return free_port(tcp=True, host=host)


def free_udp_port(host: str = HOST) -> int:
    return free_port(tcp=False, udp=True, host=host)


def free_udp_port_range(count: int, host: str = HOST, exclude: set[int] | None = None) -> tuple[int, int]:
    """A contiguous range [start, end] of `count` UDP ports that are all free now."""
    exclude = exclude or set()
    for _ in range(200):
        start = random.randint(_RANGE[0], _RANGE[1] - count)
        ports = range(start, start + count)
        if any(p in exclude for p in ports):
            continue
        if all(_can_bind(p, socket.SOCK_DGRAM, host) for p in ports):
            return start, start + count - 1
    raise RuntimeError(f"no free range of {count} UDP ports found")


def port_is_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
