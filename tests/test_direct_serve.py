"""`sg2 serve --preset tiny-random` serves browser calls out of the box: the page at '/', WebRTC
signalling beside the Realtime API; a Python aiortc caller talks to it; SIGTERM ends the call
gracefully. The real process, started the way a user starts it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import aiohttp
import numpy as np
import pytest

from agent.direct.client import DirectClient
from tests.support import REPO_ROOT
from tests.support.direct import silence, to_48k
from tests.support.ports import free_tcp_port
from tests.support.speech import load_reference_speech

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def web_client() -> None:
    proc = subprocess.run(["make", "web-client"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building the web client failed:\n{proc.stdout}\n{proc.stderr}"


async def _start_serve(*args: str) -> tuple[asyncio.subprocess.Process, str, list[str]]:
    port = free_tcp_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "serve", "--preset", "tiny-random", "--port", str(port), *args,
        cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines: list[str] = []
    while True:
        raw = await asyncio.wait_for(proc.stderr.readline(), 120)
        if not raw:
            raise AssertionError("sg2 serve exited before listening:\n" + "".join(lines))
        lines.append(raw.decode(errors="replace"))
        if "browser calls at" in lines[-1]:
            return proc, f"http://127.0.0.1:{port}", lines


async def test_sg2_serve_serves_the_page_and_browser_calls(web_client, reference_dir) -> None:
    session = json.dumps({"play_greeting": False, "max_response_ms": 1920})
    proc, url, _ = await _start_serve("--set", f"direct.session={session}", "--set", "direct.max_calls=2")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/") as resp:
                page = await resp.text()
                assert resp.status == 200 and "<title>SpeechGPT 2.0" in page
            script = page.split('src="', 2)[1].split('"')[0]
            async with http.get(url + script) as resp:
                assert resp.status == 200 and "v1/webrtc" in await resp.text()
            async with http.get(url + "/v1/webrtc/config") as resp:
                config = await resp.json()
                assert config["max_calls"] == 2 and not config["auth_required"]

        audio, rate = load_reference_speech(reference_dir, "zh", sample_rate=None)
        async with DirectClient(url) as client:
            await client.call()
            await client.wait_event(lambda m: m["type"] == "call")
            client.source.play(np.concatenate([silence(0.3), to_48k(audio, rate), silence(2.0)]))
            done = await client.wait_event(lambda m: m["type"] == "response_done", timeout=60)
            assert done["status"] == "length" and done["played_ms"] == 1920
            assert any(db > -45 for _, db in client.recorder.frame_levels())
            kinds = [e["type"] for e in client.events]
            assert kinds.index("turn_committed") < kinds.index("response_started") < kinds.index("latency")

            async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
                metrics = await resp.text()
            assert "sg2_direct_active_calls 1.0" in metrics
            assert 'sg2_direct_offers_total{outcome="answered"} 1.0' in metrics

            proc.send_signal(signal.SIGTERM)  # graceful shutdown: the call is told and closed
            ended = await client.wait_event(lambda m: m["type"] == "call_ended", timeout=30)
            assert ended["reason"] == "server shutdown"
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_direct_settings_errors_and_disabling(web_client) -> None:
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "serve", "--preset", "tiny-random", "--set", "direct.max_calls=0",
        cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    _, err = await asyncio.wait_for(bad.communicate(), 60)
    assert bad.returncode == 2 and b"configuration error" in err and b"max_calls" in err

    port = free_tcp_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "serve", "--preset", "tiny-random", "--port", str(port),
        "--set", "direct.enabled=false",
        cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        lines = []
        while not lines or "listening on" not in lines[-1]:
            raw = await asyncio.wait_for(proc.stderr.readline(), 120)
            assert raw, "sg2 serve exited:\n" + "".join(lines)
            lines.append(raw.decode(errors="replace"))
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/v1/webrtc/config") as resp,
        ):
            assert resp.status == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
