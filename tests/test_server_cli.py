"""``sg2 serve`` as a real process: the tiny-random preset, the real-checkpoint layout from a config
file (tiny checkpoints in the released formats), command-line overrides, configuration errors,
and a clean shutdown on SIGINT."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.support.realtime import until

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


class ServeProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, output: list[str]) -> None:
        self.proc = proc
        self.port = port
        self.output = output

    def sdk_client(self, api_key: str) -> object:
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            api_key=api_key,
            base_url=f"http://127.0.0.1:{self.port}/v1",
            websocket_base_url=f"ws://127.0.0.1:{self.port}/v1",
            max_retries=0,
        )


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", "serve", *args]


async def _drain(stream: asyncio.StreamReader, output: list[str]) -> None:
    while line := await stream.readline():
        output.append(line.decode(errors="replace").rstrip())


async def _start(*args: str) -> AsyncIterator[ServeProcess]:
    proc = await asyncio.create_subprocess_exec(
        *_cmd(*args),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    assert proc.stdout is not None
    port = None
    try:
        async with asyncio.timeout(120):
            while port is None:
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError("sg2 serve exited before listening:\n" + "\n".join(output))
                output.append(line.decode(errors="replace").rstrip())
                if m := LISTENING.search(output[-1]):
                    port = int(m.group(1))
        drain = asyncio.create_task(_drain(proc.stdout, output))
        yield ServeProcess(proc, port, output)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "\n".join(output)
        await drain
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


serve_process = __import__("contextlib").asynccontextmanager(_start)


async def test_preset_tiny_random_serves_the_sdk_and_stops_cleanly_on_sigint() -> None:
    async with serve_process("--preset", "tiny-random", "--port", "0", "--api-key", "k1") as server:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{server.port}/healthz") as resp:
                health = await resp.json()
            assert health["ok"] and health["model"]["preset"] == "tiny-random" and health["auth"] is True
            async with http.get(f"http://127.0.0.1:{server.port}/v1/realtime") as resp:
                assert resp.status == 401
        async with server.sdk_client("k1").realtime.connect(model="sg2") as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
            )
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 3})
            await conn.response.create()
            events = await until(conn, lambda e: e.type == "response.done")
            assert any(e.type == "response.output_audio.delta" for e in events)
            assert events[-1].response.usage.output_tokens == 3
    text = "\n".join(server.output)
    assert "building tiny random-weight models" in text and "shutting down" in text


def _tiny_greetings(path: Path) -> Path:
    rng = random.Random(0)
    lines = [
        json.dumps(
            {
                "text": [rng.randrange(10, 500) for _ in range(6)],
                "audio": [rng.randrange(1024) for _ in range(90)],
            }
        )
        for _ in range(2)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def test_config_file_loads_checkpoints_in_the_released_layout(tmp_path, reference_dir) -> None:
    # the real layout, with tiny checkpoints: codec .pkl + YAML, LM directory, greetings JSONL;
    # relative paths are relative to the config file
    (tmp_path / "weights").symlink_to(reference_dir)
    _tiny_greetings(tmp_path / "greetings.jsonl")
    config = {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"api_keys": ["from-file"], "api_keys_env": None},
        "engine": {"max_sessions": 2, "max_positions": 512},
        "models": {
            "codec_checkpoint": "weights/codec_tiny_ckpt.pkl",
            "codec_config": "weights/codec_tiny_config.yaml",
            "lm_dir": "weights/mimo_tiny",
            "greetings": "greetings.jsonl",
        },
        "realtime": {"voices": {"default": 0, "second": 1}, "session": {"flow_control": "none"}},
        "direct": {"enabled": False},  # an extension's section is kept, not rejected
    }
    path = tmp_path / "sg2.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    async with serve_process("--config", str(path), "--set", "engine.max_sessions=1") as server:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{server.port}/healthz") as resp,
        ):
            health = await resp.json()
        assert health["capacity"] == 1  # the --set override won over the file
        assert health["model"]["lm_dir"] == str((reference_dir / "mimo_tiny").resolve())
        async with server.sdk_client("from-file").realtime.connect(model="sg2") as conn:
            assert (await conn.recv()).session.audio.output.voice == "default"
            await conn.session.update(session={"type": "realtime", "audio": {"output": {"voice": "second"}}})
            updated = await until(conn, lambda e: e.type == "session.updated")
            assert updated[-1].session.audio.output.voice == "second"
    text = "\n".join(server.output)
    for step in ("[1/3] codec", "[2/3] speech-text LM", "[3/3] greetings", "models loaded in"):
        assert step in text, text


@pytest.mark.parametrize(
    ("args", "rc", "message"),
    [
        ((), 2, "preset: tiny-random"),
        (("--preset", "tiny-random", "--host", "0.0.0.0"), 2, "no API key configured"),
        (("--preset", "tiny-random", "--set", "server.port=70000"), 2, "less than or equal to 65535"),
        (("--preset", "tiny-random", "--set", "realtime.default_voice=nope"), 2, "default_voice"),
        (
            (
                "--set",
                "models.lm_dir=/nonexistent",
                "--set",
                "models.codec_checkpoint=/nonexistent.pkl",
                "--set",
                "models.codec_config=/nonexistent.yaml",
            ),
            1,
            "does not exist",
        ),
    ],
)
def test_configuration_errors_are_reported_before_serving(args, rc, message, capsys) -> None:
    from agent.cli import main

    assert main(["serve", *args]) == rc
    assert message in capsys.readouterr().err


def test_shipped_configs_are_valid_and_resolve_paths_next_to_the_repo() -> None:
    from sg2_runtime.server.config import load_settings

    default = load_settings(REPO_ROOT / "configs" / "default.yaml")
    assert default.models.preset is None and default.models.device == "cuda"
    assert default.models.lm_dir == REPO_ROOT / "weights" / "SpeechGPT-2.0-preview-7B"
    default.models.check_loadable()
    default.realtime.session_defaults()
    tiny = load_settings(REPO_ROOT / "configs" / "tiny-random.yaml", [("server.port", 0)])
    assert tiny.models.preset == "tiny-random" and tiny.server.port == 0
    assert tiny.realtime.session_defaults().max_response_ms == 6000
