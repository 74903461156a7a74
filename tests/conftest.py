"""Shared test fixtures: where the reference golden data lives, deterministic torch settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support.livekit_server import livekit_server_fixture
from tests.support.redis_server import redis_server_fixture

REPO_ROOT = Path(__file__).resolve().parents[1]

# The test process hosts engines next to WebRTC peers and LiveKit participants on a 2-core
# machine: torch's intra-op pool (one thread per core) waits at every op for a core the event
# loop holds, which made the engine several times slower there. The tiny models gain nothing
# from it. Benchmarks choose their own thread counts.
torch.set_num_threads(1)


def _find_reference_dir() -> Path:
    """Locate `sg2_reference/` (golden tensors, tiny checkpoints, real speech).

    Looked up in $SG2_REFERENCE_DIR, then `shared/` inside the checkout, then `shared/` beside
    the checkout or beside any directory above it. A missing directory is an error, never a skip: CI must run every test.
    """
    candidates = []
    if os.environ.get("SG2_REFERENCE_DIR"):
        candidates.append(Path(os.environ["SG2_REFERENCE_DIR"]))
    # `shared/` inside the checkout, or beside it, or beside any folder above it
    candidates += [base / "shared" / "sg2_reference" for base in (REPO_ROOT, *REPO_ROOT.parents)]
    for path in candidates:
        if (path / "README.md").is_file():
            return path
    raise FileNotFoundError(
        "sg2_reference golden data not found; set SG2_REFERENCE_DIR. Looked in: "
        + ", ".join(str(p) for p in candidates)
    )


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _find_reference_dir()


# Real servers, a fresh one per test: `livekit_server` (LiveKitServer) and `redis_server` (RedisServer).
# For another scope, make your own with the factories: `lk = livekit_server_fixture(scope="module")`.
livekit_server = livekit_server_fixture(scope="function")
redis_server = redis_server_fixture(scope="function")


@pytest.fixture(scope="session")
def tiny_models():
    """Tiny random codec + LM + greetings, shared by the engine tests (each test makes its own Engine)."""
    import torch

    from sg2_runtime.engine.models import tiny_random_models

    torch.manual_seed(0)
    return tiny_random_models(max_sessions=8, max_positions=1024, seed=0)


@pytest.fixture(scope="session")
def server_models():
    """Tiny random models with 24 KV slots (the 20-call server test); each server test makes its Engine."""
    import torch

    from sg2_runtime.engine.models import tiny_random_models

    torch.manual_seed(0)
    return tiny_random_models(max_sessions=24, max_positions=1024, seed=0)
