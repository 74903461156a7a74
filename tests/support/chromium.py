"""Headless Debian Chromium driven by Playwright, with a fake microphone fed from a WAV file.

    async with chromium_page(fake_audio_wav=wav) as s:      # s.page, s.context, s.browser, s.console
        await s.page.goto(url)
        await save_screenshot(s.page, "my-test")            # -> test-artifacts/my-test.png

Playwright's own browser download does not work here; the system Chromium (`apt-get install
chromium`, done by scripts/install_system_deps.sh) is used through `executable_path`. Every launch
gets a fresh, empty profile (Playwright makes a new temporary user-data-dir per launch).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ARTIFACTS_DIR, require_binary

CHROMIUM_EXECUTABLE = Path("/usr/bin/chromium")

# Needed on these machines (root, no GPU, closed network): without the background-networking flags
# Chromium keeps trying to reach Google's hosts.
CHROMIUM_BASE_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--autoplay-policy=no-user-gesture-required",  # AudioContext / <audio> start without a click
)
# WebRTC against servers on this machine: real host candidates (no mDNS names), loopback allowed.
CHROMIUM_WEBRTC_ARGS = (
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)


def chromium_args(
    fake_audio_wav: str | Path | None = None,
    *,
    fake_media: bool = True,
    loop_audio: bool = True,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """Command-line switches for Chromium.

    With `fake_media`, getUserMedia is granted without a prompt and served by fake devices; with
    `fake_audio_wav` the fake microphone plays that WAV (16-bit PCM; looped unless `loop_audio` is
    false, then it plays once and continues with silence).
    """
    args = [*CHROMIUM_BASE_ARGS, *CHROMIUM_WEBRTC_ARGS]
    if fake_media:
        args += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    if fake_audio_wav is not None:
        wav = Path(fake_audio_wav).resolve()
        if not wav.is_file():
            raise FileNotFoundError(f"fake microphone WAV {wav} not found")
        args.append(f"--use-file-for-fake-audio-capture={wav}{'' if loop_audio else '%noloop'}")
    args += list(extra_args)
    return args


@contextlib.asynccontextmanager
async def launch_chromium(
    fake_audio_wav: str | Path | None = None,
    *,
    headless: bool = True,
    loop_audio: bool = True,
    extra_args: Sequence[str] = (),
    executable: str | Path = CHROMIUM_EXECUTABLE,
    **launch_kwargs: Any,
) -> AsyncIterator[Any]:
    """Start Playwright and the system Chromium; yields a `playwright.async_api.Browser`."""
    exe = require_binary("chromium", executable)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(exe),
            headless=headless,
            args=chromium_args(fake_audio_wav, loop_audio=loop_audio, extra_args=extra_args),
            **launch_kwargs,
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class ChromiumSession:
    browser: Any  # playwright.async_api.Browser
    context: Any  # playwright.async_api.BrowserContext
    page: Any  # playwright.async_api.Page
    console: list[str] = field(default_factory=list)  # "type: text" of every console message
    page_errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page


@contextlib.asynccontextmanager
async def chromium_page(
    fake_audio_wav: str | Path | None = None,
    *,
    name: str = "chromium",
    permissions: Sequence[str] = ("microphone",),
    context_kwargs: Mapping[str, Any] | None = None,
    **launch_kwargs: Any,
) -> AsyncIterator[ChromiumSession]:
    """A browser, a context with `permissions` granted, and one page that records its console.

    If the block raises, a screenshot is saved as test-artifacts/<name>-failure.png and the page's
    console is written to stderr.
    """
    async with launch_chromium(fake_audio_wav, **launch_kwargs) as browser:
        context = await browser.new_context(permissions=list(permissions), **dict(context_kwargs or {}))
        page = await context.new_page()
        session = ChromiumSession(browser, context, page)
        page.on("console", lambda msg: session.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda err: session.page_errors.append(str(err)))
        try:
            yield session
        except BaseException:
            with contextlib.suppress(Exception):
                shot = await save_screenshot(page, f"{name}-failure")
                sys.stderr.write(f"\nscreenshot: {shot}\n")
            sys.stderr.write(
                "\n----- browser console -----\n"
                + "\n".join(session.console + [f"pageerror: {e}" for e in session.page_errors])
                + "\n----- end of browser console -----\n"
            )
            raise
        finally:
            await context.close()


def artifact_path(name: str, suffix: str = ".png") -> Path:
    """A path in test-artifacts/ (gitignored) for `name`, made filesystem-safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "artifact"
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR / f"{safe}{suffix}"


async def save_screenshot(page: Any, name: str, *, full_page: bool = True) -> Path:
    """Save a PNG screenshot of `page` as test-artifacts/<name>.png and return its path."""
    path = artifact_path(name, ".png")
    await page.screenshot(path=str(path), full_page=full_page)
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@contextlib.contextmanager
def serve_static(
    directory: str | Path | None = None, files: Mapping[str, str | bytes] | None = None
) -> Iterator[str]:
    """Serve a directory (or a dict of path -> content written into a temp dir) on a free loopback
    port; yields the base URL `http://127.0.0.1:PORT` (a secure context, so getUserMedia works)."""
    import tempfile

    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="static-"))
        root = Path(directory)
        for rel, content in (files or {}).items():
            target = root / rel.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        handler = functools.partial(_QuietHandler, directory=str(root))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, name="serve_static", daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
