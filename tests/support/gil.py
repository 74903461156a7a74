"""The thread switch interval `sg2 serve` sets, for servers the tests run in their own process."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def serve_switch_interval(ms: float | None) -> Iterator[None]:
    """Python's GIL switch interval as ``sg2 serve`` sets it (``server.gil_switch_interval_ms``)
    while an in-process server runs, restored after: the engine thread hands the GIL to the event
    loop (and back) at this interval, so timings here match the real server's."""
    previous = sys.getswitchinterval()
    if ms is not None:
        sys.setswitchinterval(ms / 1000)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)
