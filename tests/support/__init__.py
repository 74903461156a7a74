"""Reusable pytest helpers that start real components for tests (not tests themselves).

- `ports`: free TCP/UDP ports on loopback.
- `livekit_server`: `.tools/bin/livekit-server --dev` on free ports.
- `redis_server`: `redis-server` on a free port.
- `chromium`: headless Debian Chromium through Playwright, with a fake microphone fed from a WAV.
- `speech`: real synthetic speech from espeak-ng; the reference demo recordings.

A missing binary is an error with a clear message, never a skip: CI must run every test.
`scripts/install_system_deps.sh` (run by `make setup` / `make test`) installs all of them.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"


class MissingComponentError(RuntimeError):
    """A binary a test needs is not installed (run `make system-deps`)."""


def require_binary(name: str, path: str | Path | None = None) -> Path:
    """Return the path of an executable, or raise MissingComponentError with the install hint.

    `path` is checked first (e.g. `.tools/bin/livekit-server`); otherwise `name` is looked up in PATH.
    """
    import os
    import shutil

    if path is not None:
        p = Path(path)
        if p.is_file() and os.access(p, os.X_OK):
            return p
        raise MissingComponentError(
            f"{name}: {p} is missing or not executable; run `make system-deps` "
            "(scripts/install_system_deps.sh) to build/install it"
        )
    found = shutil.which(name)
    if not found:
        raise MissingComponentError(
            f"{name} not found in PATH; run `make system-deps` (scripts/install_system_deps.sh) to install it"
        )
    return Path(found)
