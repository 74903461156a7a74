"""The LiveKit side of the stack for tests: ``sg2 agent`` and ``sg2 serve`` as real processes, tokens
from our token service, the agent settings file.

    worker = await start_agent_worker(tmp_path, lk, engines=[server.http_url])
    ...
    assert await worker.stop() == 0

All waiting is on conditions (a log line, an HTTP answer) polled without blocking the event loop,
since the engine server under test may run on that same loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from . import REPO_ROOT
from ._process import ServerProcess
from .livekit_server import LiveKitServer
from .ports import free_port

REGISTERED = re.compile(r"registered worker (\S+) .*health on http://[\d.]+:(\d+)/")
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
ENGINE_KEY = "sk-test-sg2"


async def wait_log(
    proc: ServerProcess, pattern: re.Pattern[str] | str, timeout: float = 60.0
) -> re.Match[str]:
    """Wait (without blocking the loop) until the process log matches ``pattern``."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        text = proc.log_text()
        if m := rx.search(text):
            return m
        if not proc.running():
            raise AssertionError(
                f"{proc.name} exited ({proc.proc.returncode}) before {rx.pattern!r}:\n{proc.log_tail(80)}"
            )
        if loop.time() > deadline:
            raise AssertionError(
                f"{proc.name}: no {rx.pattern!r} within {timeout:.0f} s:\n{proc.log_tail(80)}"
            )
        await asyncio.sleep(0.05)  # polling a log file for a condition


async def wait_until(predicate: Any, what: str, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll an (async or sync) condition until it is truthy; returns its value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)  # polling a condition


@dataclass
class AgentWorker:
    process: ServerProcess
    worker_id: str
    health_port: int
    config_path: Path

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    def log_text(self) -> str:
        return self.process.log_text()

    async def info(self) -> dict[str, Any]:
        """The framework's ``GET /worker`` (agent name, active jobs, load)."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.health_url}/worker") as r:
            return await r.json(content_type=None)

    async def healthy(self) -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(self.health_url + "/") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal the worker (not its process group) and wait for it to exit; returns its exit code."""
        proc = self.process.proc
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while proc.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.05)  # polling the exit
        rc = proc.poll()
        self.process.stop()  # whatever is left of the group
        return rc


def write_agent_config(
    path: Path,
    lk: LiveKitServer,
    engines: list[str],
    *,
    agent_name: str = "sg2",
    max_output_tokens: int | str = 30,
    idle_processes: int = 1,
    extra: dict[str, Any] | None = None,
) -> Path:
    agent: dict[str, Any] = {
        "engine_servers": [{"url": u} for u in engines],
        "engine_api_key": ENGINE_KEY,
        "health_timeout_s": 2.0,
        "failure_cooldown_s": 30.0,
        "session": {"max_output_tokens": max_output_tokens},
        "worker": {
            "num_idle_processes": idle_processes,
            "port": 0,
            "load_probe_s": 0.5,
            "initialize_timeout_s": 60,
            "drain_timeout_s": 120,
        },
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(agent.get(key), dict):
            agent[key] = {**agent[key], **value}
        else:
            agent[key] = value
    config = {
        "livekit": {
            "url": lk.url,
            "api_key": lk.api_key,
            "api_secret": lk.api_secret,
            "agent_name": agent_name,
        },
        "agent": agent,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def start_agent_worker(
    tmp_dir: Path, lk: LiveKitServer, engines: list[str], *, name: str = "agent", **config: Any
) -> AgentWorker:
    """``sg2 agent --config <file>`` as a process; returns once it has registered with LiveKit."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    cfg = write_agent_config(tmp_dir / f"{name}.yaml", lk, engines, **config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = ServerProcess(
        name,
        [sys.executable, "-m", "agent.cli", "agent", "--config", cfg],
        tmp_dir / f"{name}.log",
        cwd=REPO_ROOT,
        env=env,
    ).start()
    try:
        m = await wait_log(proc, REGISTERED, timeout=120)
    except BaseException:
        proc.dump_log("did not register")
        proc.stop()
        raise
    return AgentWorker(proc, m.group(1), int(m.group(2)), cfg)


@dataclass
class EngineProcess:
    """``sg2 serve --preset tiny-random`` as a process on a fixed port (so it can be restarted there)."""

    process: ServerProcess
    port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        assert self.process.proc is not None
        os.killpg(self.process.proc.pid, signal.SIGKILL)
        self.process.proc.wait(10)


async def start_engine_process(
    tmp_dir: Path,
    *,
    port: int | None = None,
    max_sessions: int = 2,
    name: str = "engine",
    session: dict | None = None,
) -> EngineProcess:
    port = port or free_port()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    session = session or {"flow_control": "realtime", "sampling": {"greedy": True}, "max_response_ms": 6000}
    proc = ServerProcess(
        name,
        [
            sys.executable,
            "-m",
            "agent.cli",
            "serve",
            "--preset",
            "tiny-random",
            "--port",
            str(port),
            "--api-key",
            ENGINE_KEY,
            "--set",
            f"engine.max_sessions={max_sessions}",
            "--set",
            "engine.max_positions=1024",
            "--set",
            "realtime.session=" + yaml.safe_dump(session, default_flow_style=True).strip(),
            "--set",
            "direct.enabled=false",
        ],
        tmp_dir / f"{name}.log",
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ).start()
    try:
        await wait_log(proc, LISTENING, timeout=120)
    except BaseException:
        proc.dump_log("did not start")
        proc.stop()
        raise
    return EngineProcess(proc, port)


async def mint_token(
    http_url: str, api_key: str | None = ENGINE_KEY, **body: Any
) -> tuple[int, dict[str, Any]]:
    """``POST /v1/livekit/token`` on an ``sg2 serve``; returns (status, JSON body)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{http_url}/v1/livekit/token", json=body, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None)
