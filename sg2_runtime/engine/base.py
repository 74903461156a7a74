"""Small pieces shared by the conversation modules: frame constants, ids, the per-call failure."""

from __future__ import annotations

import itertools

FRAME = 960  # codec samples per frame (40 ms at 24 kHz)
FRAME_MS = 40
GROUP = 3  # codec frames per LM position (120 ms)

_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    """Process-unique ids for turns and replies (``turn_000001``, ``resp_000002``...)."""
    return f"{prefix}_{next(_ids):06d}"


class SessionFailure(RuntimeError):
    """Something went wrong for this call only; the engine ends it with an error event."""
