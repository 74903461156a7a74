"""LiveKit room latency: end of the caller's speech → first agent audio, through livekit-server and the
``sg2 agent`` worker, against the same ``sg2 serve`` reached directly over its Realtime WebSocket.

Everything runs on this machine over loopback, as real processes: ``livekit-server --dev``,
``sg2 serve --preset tiny-random`` (replies capped at 960 ms, greedy) and ``sg2 agent``; the caller
is a ``livekit.rtc`` participant in this process. Two calls are open on the same engine server:

- **direct**: a WebSocket client (aiohttp) streaming 20 ms chunks at real time, silence between turns;
  latency = last speech chunk sent → first ``response.output_audio.delta`` received;
- **room**: the participant publishes the same audio (10 ms frames at real time, silence between
  turns); latency = the moment the clip's last frame leaves the participant's audio source → the
  first agent audio frame louder than -55 dBFS received from the agent's track.

Turns alternate between the two calls (same clip, one after the other), so both see the same load.
Each figure includes the engine's 500 ms end-of-turn silence; the difference is what LiveKit adds:
participant → SFU → worker (decode, 24 kHz, 20 ms appends) → WebSocket → engine, and back through
the worker's audio output and the SFU (Opus both ways, jitter buffers).

    python benchmarks/livekit_bench.py --turns 20

Prints a table and writes ``benchmarks/results/livekit_bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from livekit import api  # noqa: E402

from tests.support.livekit_agent import ENGINE_KEY, start_agent_worker, start_engine_process  # noqa: E402
from tests.support.livekit_participant import RoomParticipant, dbfs  # noqa: E402
from tests.support.livekit_server import start_livekit_server  # noqa: E402

RATE = 24000
CHUNK_MS = 20
SPEECH_S = 1.5
FIRST_AUDIO_DBFS = -55.0
SESSION = {"flow_control": "realtime", "sampling": {"greedy": True}, "max_response_ms": 960}


def _reference_dir() -> Path:
    candidates = [Path(os.environ["SG2_REFERENCE_DIR"])] if os.environ.get("SG2_REFERENCE_DIR") else []
    candidates += [ROOT / "shared" / "sg2_reference", ROOT.parent / "shared" / "sg2_reference"]
    for path in candidates:
        if (path / "audio" / "demo_en.wav").is_file():
            return path
    raise SystemExit("sg2_reference not found (set SG2_REFERENCE_DIR)")


def _clips(count: int) -> list[np.ndarray]:
    """Different 1.5 s pieces of the reference speech, cut abruptly (the last sample ends the speech)."""
    from tests.support.speech import load_reference_speech

    sources = [load_reference_speech(_reference_dir(), lang, RATE)[0] for lang in ("en", "zh")]
    n = int(SPEECH_S * RATE)
    out = []
    for i in range(count):
        src = sources[i % 2]
        start = (i // 2) * 7919 % (len(src) - n)
        out.append(src[start : start + n])
    return out


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


class WsCaller:
    """A Realtime WebSocket call that behaves like a microphone: silence unless speaking."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[tuple[float, str]] = []
        self._speech: asyncio.Queue[np.ndarray] = asyncio.Queue()
        self._spoken: asyncio.Queue[float] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._mic()), asyncio.create_task(self._read())]

    async def _send(self, pcm: np.ndarray) -> None:
        raw = (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()
        await self.ws.send_str(
            json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(raw).decode()})
        )

    async def _mic(self) -> None:
        loop = asyncio.get_running_loop()
        step = RATE * CHUNK_MS // 1000
        zero = np.zeros(step, np.float32)
        start, n = loop.time(), 0
        current: np.ndarray | None = None
        pos = 0
        while True:
            if current is None and not self._speech.empty():
                current, pos = self._speech.get_nowait(), 0
            if current is not None:
                await self._send(current[pos : pos + step])
                pos += step
                if pos >= len(current):
                    current = None
                    self._spoken.put_nowait(time.monotonic())
            else:
                await self._send(zero)
            n += 1
            delay = start + n * CHUNK_MS / 1000 - loop.time()
            if delay < -0.5:
                start, n = loop.time(), 0
            elif delay > 0:
                await asyncio.sleep(delay)  # pacing like a microphone

    async def _read(self) -> None:
        async for msg in self.ws:
            event = json.loads(msg.data)
            self.events.append((time.monotonic(), event["type"]))
            self._changed.set()

    async def _wait(self, since: float, kind: str, timeout: float = 30.0) -> float:
        async with asyncio.timeout(timeout):
            while True:
                for t, k in self.events:
                    if t >= since and k == kind:
                        return t
                self._changed.clear()
                await self._changed.wait()

    async def turn(self, clip: np.ndarray) -> float:
        self._speech.put_nowait(clip)
        end = await self._spoken.get()
        first = await self._wait(end, "response.output_audio.delta")
        await self._wait(first, "response.done")
        return (first - end) * 1000

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def room_turn(p: RoomParticipant, clip: np.ndarray) -> float:
    sent = await p.say(clip)

    def first() -> float | None:
        return next((h.t for h in p.heard if h.t >= sent.end and dbfs(h.pcm) > FIRST_AUDIO_DBFS), None)

    t = await p.wait_for(first, "the first agent audio", 30)
    await p.wait_for(lambda: p.silent_since(t, 400), "the reply to end", 30)
    return (t - sent.end) * 1000


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {
        "n": len(values),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


async def one_way(lk: Any, bursts: int = 12) -> list[float]:
    """LiveKit alone: a tone burst published by one livekit.rtc participant → its onset received by
    another (same SDK, same SFU, no agent): the transport's share in each direction."""
    from livekit import rtc

    async with contextlib.AsyncExitStack() as stack:
        sender = await stack.enter_async_context(
            RoomParticipant.join(lk.url, lk.token("probe-a", "one-way"), "probe-a")
        )
        receiver = await stack.enter_async_context(
            RoomParticipant.join(lk.url, lk.token("probe-b", "one-way"), "probe-b")
        )
        track = await _first_remote_audio(receiver.room)
        stream = rtc.AudioStream.from_track(track=track, sample_rate=RATE, num_channels=1, frame_size_ms=10)
        stack.push_async_callback(stream.aclose)
        heard: list[tuple[float, float]] = []

        async def record() -> None:
            async for ev in stream:
                heard.append((time.monotonic(), dbfs(np.frombuffer(ev.frame.data, np.int16))))

        task = asyncio.create_task(record())
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(RATE // 2) / RATE)).astype(np.float32)
        out = []
        try:
            for _ in range(bursts):
                await sender.say(np.zeros(RATE * 3 // 4, np.float32))
                sent = await sender.say(tone)
                t = await sender.wait_for(
                    lambda s=sent: next((h for h, level in heard if h >= s.start and level > -40), None),
                    "the tone",
                    10,
                )
                out.append((t - sent.start) * 1000)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return out


async def _first_remote_audio(room: Any) -> Any:
    from livekit import rtc

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        for p in room.remote_participants.values():
            for pub in p.track_publications.values():
                if pub.track is not None and pub.track.kind == rtc.TrackKind.KIND_AUDIO:
                    return pub.track
        await asyncio.sleep(0.05)  # polling for the subscription
    raise TimeoutError("no remote audio track")


async def run(turns: int, tmp: Path) -> dict[str, Any]:
    import aiohttp

    clips = _clips(turns)
    with start_livekit_server(tmp / "livekit", log_level="warn") as lk:
        engine = await start_engine_process(tmp, max_sessions=4, session=SESSION)
        worker = await start_agent_worker(
            tmp, lk, [engine.http_url], max_output_tokens="inf", idle_processes=1
        )
        grants = api.VideoGrants(room_join=True, room="bench", can_publish=True, can_subscribe=True)
        dispatch = api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name="sg2")])
        token = (
            (api.AccessToken(lk.api_key, lk.api_secret).with_identity("caller").with_grants(grants))
            .with_room_config(dispatch)
            .to_jwt()
        )
        direct: list[float] = []
        room: list[float] = []
        oneway = await one_way(lk)
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(
                    f"ws://127.0.0.1:{engine.port}/v1/realtime",
                    headers={"Authorization": f"Bearer {ENGINE_KEY}"},
                ) as ws,
            ):
                first = json.loads((await ws.receive()).data)
                assert first["type"] == "session.created", first
                caller = WsCaller(ws)
                try:
                    async with RoomParticipant.join(lk.url, token, "caller") as p:
                        await p.wait_for(
                            lambda: (
                                p.agent is not None
                                and p.agent_attribute("lk.agent.state") == "listening"
                                and p.heard
                            ),
                            "the agent",
                            60,
                        )
                        for i, clip in enumerate(clips):
                            direct.append(await caller.turn(clip))
                            room.append(await room_turn(p, clip))
                            print(
                                f"turn {i + 1:2d}: direct {direct[-1]:7.1f} ms   room {room[-1]:7.1f} ms",
                                flush=True,
                            )
                finally:
                    await caller.aclose()
        finally:
            await worker.stop()
            engine.process.stop()
    paired = [r - d for r, d in zip(room, direct, strict=True)]
    return {
        "direct": _stats(direct),
        "room": _stats(room),
        "paired_added": _stats(paired),
        "livekit_one_way": _stats(oneway),
        "raw": {"direct": direct, "room": room, "livekit_one_way": oneway},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "livekit_bench.json"))
    args = parser.parse_args()
    load_before = _uptime()
    with tempfile.TemporaryDirectory(prefix="livekit-bench-") as tmp:
        results = asyncio.run(run(args.turns, Path(tmp)))
    load_after = _uptime()
    d, r = results["direct"], results["room"]
    added = {"p50": r["p50"] - d["p50"], "p95": r["p95"] - d["p95"]}
    rows = [
        ("sg2 serve, WebSocket (direct)", d),
        ("LiveKit room (participant → SFU → sg2 agent → sg2 serve)", r),
        ("added, turn by turn (room − direct, same clip)", results["paired_added"]),
        ("reference: LiveKit alone, one way (participant → participant)", results["livekit_one_way"]),
    ]
    print(f"\nend of speech → first agent audio, ms ({args.turns} turns each, tiny random models, CPU)")
    print(f"{'':58s} {'p50':>8s} {'p95':>8s} {'mean':>8s} {'min':>8s} {'max':>8s}")
    for name, s in rows:
        print(f"{name:58s} {s['p50']:8.1f} {s['p95']:8.1f} {s['mean']:8.1f} {s['min']:8.1f} {s['max']:8.1f}")
    print(f"{'added by LiveKit (room p50/p95 − direct p50/p95)':58s} {added['p50']:8.1f} {added['p95']:8.1f}")
    print(f"target: ≤ 80 ms p95 added on loopback → {'met' if added['p95'] <= 80 else 'missed'}")
    print(f"load: before: {load_before}\n      after:  {load_after}")
    out = {
        "benchmark": "livekit_bench",
        "turns": args.turns,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "uptime_before": load_before,
        "uptime_after": load_after,
        "session": SESSION,
        "results_ms": {**results, "added": added},
        "target_added_p95_ms": 80,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
