"""Network-API latency: the engine in-process vs the same engine behind ``sg2 serve`` on loopback.

Each call streams real speech paced at real time (40 ms chunks) and measures the time from the last
chunk of speech sent to the first reply audio received, turn after turn:

- ``vad``: server-side turn detection; the speech is followed by silence, so the figure includes the
  end-of-turn silence (500 ms) the VAD waits for — the latency a caller actually gets;
- ``commit``: client-controlled turns; right after the last chunk the client commits and asks for
  a reply (``input_audio_buffer.commit`` + ``response.create``) — the pipeline without endpointing.

The in-process baseline drives :class:`Session` directly with the same audio, pacing and models; the
server run is a real ``sg2 serve`` process with a lean aiohttp WebSocket client in this process.
The overhead is the server's percentile minus the in-process one (same scenario, same concurrency).

    python benchmarks/server_bench.py                    # tiny random models on CPU, 1 and 8 calls
    python benchmarks/server_bench.py --calls 1,8 --turns 12 --scenarios vad,commit

Prints a table and writes ``benchmarks/results/server_bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK_MS = 40
SPEECH_S = 1.5
SILENCE_S = 0.8
REPLY_TOKENS = 4  # LM positions per reply (120 ms each): the figure is about the first one


def _reference_dir() -> Path:
    candidates = [Path(os.environ["SG2_REFERENCE_DIR"])] if os.environ.get("SG2_REFERENCE_DIR") else []
    candidates += [REPO / "shared" / "sg2_reference", REPO.parent / "shared" / "sg2_reference"]
    for path in candidates:
        if (path / "audio" / "demo_en.wav").is_file():
            return path
    raise SystemExit("sg2_reference not found (set SG2_REFERENCE_DIR)")


def _clips(count: int) -> list[np.ndarray]:
    """Different 1.5 s pieces of real speech (24 kHz float32)."""
    import soundfile as sf
    import soxr

    ref = _reference_dir() / "audio"
    en, sr_en = sf.read(ref / "demo_en.wav", dtype="float32")
    zh, sr_zh = sf.read(ref / "demo_zh.wav", dtype="float32")
    zh = soxr.resample(zh, sr_zh, 24000).astype(np.float32)
    sources = [en if sr_en == 24000 else soxr.resample(en, sr_en, 24000).astype(np.float32), zh]
    out = []
    n = int(SPEECH_S * 24000)
    for i in range(count):
        src = sources[i % 2]
        start = (i // 2) * 7919 % (len(src) - n)
        out.append(src[start : start + n])
    return out


def _chunks(audio: np.ndarray) -> list[bytes]:
    raw = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = 24000 * CHUNK_MS // 1000 * 2
    return [raw[i : i + step] for i in range(0, len(raw), step)]


async def _paced(chunks: list[bytes], send, t0: float) -> float:
    """Send chunk i at t0 + i * 40 ms; returns when the last one was sent."""
    loop = asyncio.get_running_loop()
    for i, chunk in enumerate(chunks):
        delay = t0 + i * CHUNK_MS / 1000 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(chunk)
    return time.perf_counter()


def _session_options(scenario: str) -> dict[str, Any]:
    return {
        "play_greeting": False,
        "flow_control": "none",
        "sampling": {"greedy": True},
        "max_response_ms": REPLY_TOKENS * 120,
        "turn_detection": {"enabled": scenario == "vad"},
        "auto_reply": scenario == "vad",
    }


# ------------------------------------------------------------------------------------ in-process
async def _engine_call(engine, clip: np.ndarray, scenario: str, turns: int) -> list[float]:
    from sg2_runtime.engine import events as ev

    session = engine.open_session(_session_options(scenario))
    speech = _chunks(clip)
    silence = _chunks(np.zeros(int(SILENCE_S * 24000), np.float32))
    latencies = []
    loop = asyncio.get_running_loop()
    try:
        for turn in range(turns):

            async def push(chunk: bytes) -> None:
                session.push_audio(chunk, 24000)

            t0 = loop.time()
            sent = await _paced(speech, push, t0)
            rid = f"resp_bench_{turn}"
            if scenario == "commit":
                session.commit()
                session.create_response(rid)
            pacing = asyncio.ensure_future(_paced(silence, push, t0 + len(speech) * CHUNK_MS / 1000))
            first = None
            while True:
                event = await asyncio.wait_for(session.next_event(), 60)
                if isinstance(event, ev.AudioChunk) and first is None:
                    first = time.perf_counter()
                if isinstance(event, ev.ResponseDone):
                    break
            await pacing
            latencies.append((first - sent) * 1000)
    finally:
        session.close()
    return latencies


async def _settle(live) -> None:
    """Wait until the previous run's sessions are closed (their slots are free again)."""
    for _ in range(1000):
        if await live() == 0:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("sessions did not close")


async def run_engine(calls: int, scenario: str, turns: int, engine) -> list[float]:
    clips = _clips(calls)
    results = await asyncio.gather(*(_engine_call(engine, clips[i], scenario, turns) for i in range(calls)))

    async def live() -> int:
        return engine.live_sessions

    await _settle(live)
    return [x for r in results for x in r]


# ------------------------------------------------------------------------------------ server
async def _ws_call(
    url: str, clip: np.ndarray, scenario: str, turns: int, records: list[dict] | None = None
) -> list[float]:
    import aiohttp

    speech = _chunks(clip)
    silence = _chunks(np.zeros(int(SILENCE_S * 24000), np.float32))
    latencies = []
    loop = asyncio.get_running_loop()
    appended = created = 0
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        assert json.loads((await ws.receive()).data)["type"] == "session.created"
        update = {"type": "realtime", "max_output_tokens": REPLY_TOKENS}
        if scenario == "commit":
            update["audio"] = {"input": {"turn_detection": None}}
        await ws.send_str(json.dumps({"type": "session.update", "session": update}))
        while json.loads((await ws.receive()).data)["type"] != "session.updated":
            pass

        async def send(chunk: bytes) -> None:
            nonlocal appended
            await ws.send_str(
                json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()})
            )
            appended += 1

        for _ in range(turns):
            t0 = loop.time()
            sent = await _paced(speech, send, t0)
            last_input = ("audio", appended - 1)  # the turn's final message: its last speech chunk ...
            if scenario == "commit":
                created += 1
                await ws.send_str('{"type":"input_audio_buffer.commit"}')
                await ws.send_str('{"type":"response.create"}')
                sent_create = time.perf_counter()
                last_input = ("respond", created - 1)  # ... or the response.create
            pacing = asyncio.ensure_future(_paced(silence, send, t0 + len(speech) * CHUNK_MS / 1000))
            first = None
            while True:
                msg = await asyncio.wait_for(ws.receive(), 60)
                if first is None and '"response.output_audio.delta"' in msg.data[:80]:
                    first = time.perf_counter()
                    first_response = json.loads(msg.data)["response_id"]
                event_type = json.loads(msg.data)["type"]
                if event_type == "error":
                    raise RuntimeError(msg.data)
                if event_type == "response.done":
                    break
            await pacing
            latencies.append((first - sent) * 1000)
            if records is not None:
                records.append(
                    {
                        "kind": last_input[0],
                        "index": last_input[1],
                        "sent": sent_create if scenario == "commit" else sent,
                        "response_id": first_response,
                        "got": first,
                    }
                )
    return latencies


async def run_server(
    url: str, calls: int, scenario: str, turns: int, records: list[dict] | None = None
) -> list[float]:
    import aiohttp

    clips = _clips(calls)
    results = await asyncio.gather(*(_ws_call(url, clips[i], scenario, turns, records) for i in range(calls)))
    health = url.replace("ws://", "http://").replace("/v1/realtime", "/healthz")

    async def live() -> int:
        async with aiohttp.ClientSession() as http, http.get(health) as resp:
            return (await resp.json())["live_sessions"]

    await _settle(live)
    return [x for r in results for x in r]


class Probe:
    """Hooks on the in-process server's engine side: when each client message reached the engine's
    session API, and when each reply's first audio chunk left the engine thread. With the client's
    own send/receive times (same process, same clock) that gives the server's added latency, turn
    by turn: (engine got the turn's last message - client sent it) + (client got the first audio
    delta - engine emitted that chunk)."""

    def __init__(self, app) -> None:
        from sg2_runtime.engine import events as ev
        from sg2_runtime.engine.session import Session
        from sg2_runtime.server.app import CALLS_KEY

        self.calls = app[CALLS_KEY]
        self.audio_times: dict[str, list[float]] = {}
        self.respond_times: dict[str, list[float]] = {}
        self.emitted: dict[str, float] = {}
        self.session_of: dict[str, str] = {}
        self.samples: list[dict[str, float]] = []
        probe = self
        push, respond, deliver = Session.push_audio, Session.create_response, Session._deliver

        def push_audio(session, *args, **kw):
            probe.audio_times.setdefault(session.id, []).append(time.perf_counter())
            return push(session, *args, **kw)

        def create_response(session, *args, **kw):
            probe.respond_times.setdefault(session.id, []).append(time.perf_counter())
            return respond(session, *args, **kw)

        def _deliver(session, event):
            if isinstance(event, ev.AudioChunk) and event.index == 0:
                probe.emitted.setdefault(event.response_id, time.perf_counter())
                probe.session_of[event.response_id] = session.id
            return deliver(session, event)

        Session.push_audio, Session.create_response, Session._deliver = push_audio, create_response, _deliver
        self._restore = (push, respond, deliver)
        from sg2_runtime.server.realtime import RealtimeCall

        self.loop_got: dict[str, float] = {}
        on_audio = RealtimeCall._on_audio
        self._on_audio = on_audio

        def _on_audio(call, event, t):
            if event.index == 0:
                probe.loop_got.setdefault(event.response_id, t)
            return on_audio(call, event, t)

        RealtimeCall._on_audio = _on_audio

    def close(self) -> None:
        from sg2_runtime.engine.session import Session

        Session.push_audio, Session.create_response, Session._deliver = self._restore
        from sg2_runtime.server.realtime import RealtimeCall

        RealtimeCall._on_audio = self._on_audio

    def turn(self, record: dict) -> None:
        """One client turn (perf_counter times: CLOCK_MONOTONIC, the same in every process)."""
        response_id = record["response_id"]
        sid = self.session_of[response_id]
        kind, index = record["kind"], record["index"]
        engine_got = (self.audio_times if kind == "audio" else self.respond_times)[sid][index]
        inbound = (engine_got - record["sent"]) * 1000
        client_got = record["got"]
        outbound = (client_got - self.emitted[response_id]) * 1000
        handoff = (self.loop_got[response_id] - self.emitted[response_id]) * 1000
        self.samples.append(
            {"in_ms": inbound, "out_ms": outbound, "handoff_ms": handoff, "total_ms": inbound + outbound}
        )


class ThreadServer:
    """Our app on its own event loop thread, around an engine of this process (for the Probe)."""

    def __init__(self, engine, max_sessions: int) -> None:
        import threading

        from sg2_runtime.server.app import create_app
        from sg2_runtime.server.config import load_settings

        self.settings = load_settings(
            None,
            [
                ("server.port", 0),
                ("realtime.session", {"flow_control": "none", "sampling": {"greedy": True},
                                      "max_response_ms": REPLY_TOKENS * 120}),
            ],
        )  # fmt: skip
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-server", daemon=True)
        self.thread.start()
        self.app = create_app(engine, self.settings)
        self.probe = Probe(self.app)

    def start(self) -> int:
        from sg2_runtime.server.runner import start_site

        self.runner, _, port = asyncio.run_coroutine_threadsafe(
            start_site(self.app, self.settings), self.loop
        ).result()
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.probe.close()


async def client_process(url: str, calls: int, scenario: str, turns: int) -> list[dict]:
    """The WebSocket clients in a child process (as remote callers would be): its turn records."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", url, "--calls", str(calls), "--scenarios", scenario,
        "--turns", str(turns), cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode:
        raise RuntimeError(f"client process failed ({proc.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])


async def client_main(args: argparse.Namespace) -> None:
    records: list[dict] = []
    await run_server(args.client, int(args.calls), args.scenarios, args.turns, records)
    print(json.dumps(records))


async def start_serve(max_sessions: int) -> tuple[asyncio.subprocess.Process, int]:
    # the same options as the in-process runs; turn detection is switched per call by session.update
    session = json.dumps(
        {"flow_control": "none", "sampling": {"greedy": True}, "max_response_ms": REPLY_TOKENS * 120}
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "serve", "--preset", "tiny-random", "--port", "0",
        "--set", f"engine.max_sessions={max_sessions}", "--set", "engine.max_positions=2048",
        "--set", f"realtime.session={session}", "--log-level", "warning",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        if not line:
            raise RuntimeError("sg2 serve exited early")
        if m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
            return proc, int(m.group(1))


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sg2_runtime.engine.engine import Engine
    from sg2_runtime.engine.models import tiny_random_models
    from sg2_runtime.engine.options import EngineConfig

    calls_list = [int(c) for c in args.calls.split(",")]
    scenarios = args.scenarios.split(",")
    max_calls = max(calls_list)
    rows: list[dict[str, Any]] = []

    modes = args.modes.split(",")
    torch.manual_seed(0)
    models = tiny_random_models(max_sessions=max_calls, max_positions=2048, seed=0)
    async with Engine(models, EngineConfig(max_sessions=max_calls, max_positions=2048)) as engine:
        for scenario in scenarios if "in-process" in modes else []:
            for calls in calls_list:
                turns = max(args.turns // calls, 4) if calls > 1 else args.turns
                await run_engine(1, scenario, 1, engine)  # warm-up
                lat = await run_engine(calls, scenario, turns, engine)
                rows.append({"mode": "in-process", "scenario": scenario, "calls": calls, "samples": lat})
                print(f"in-process {scenario:6s} calls={calls}: p50 {_pct(lat, 50):7.1f} ms", flush=True)

    decomposition = []
    async with Engine(models, EngineConfig(max_sessions=max_calls, max_positions=2048)) as engine:
        if "added" not in modes:
            scenarios_added: list[str] = []
        else:
            scenarios_added = scenarios
        server = ThreadServer(engine, max_calls)
        port = server.start()
        try:
            url = f"ws://127.0.0.1:{port}/v1/realtime"
            for scenario in scenarios_added:
                for calls in calls_list:
                    turns = max(args.turns // calls, 4) if calls > 1 else args.turns
                    await run_server(url, 1, scenario, 1)  # warm-up (no probe samples)
                    server.probe.samples.clear()
                    for record in await client_process(url, calls, scenario, turns):
                        server.probe.turn(record)
                    totals = [x["total_ms"] for x in server.probe.samples]
                    decomposition.append(
                        {
                            "scenario": scenario,
                            "calls": calls,
                            "n": len(totals),
                            "p50_ms": _pct(totals, 50),
                            "p95_ms": _pct(totals, 95),
                            "in_p95_ms": _pct([x["in_ms"] for x in server.probe.samples], 95),
                            "out_p95_ms": _pct([x["out_ms"] for x in server.probe.samples], 95),
                            "handoff_p95_ms": _pct([x["handoff_ms"] for x in server.probe.samples], 95),
                        }
                    )
                    print(
                        f"added by server {scenario:6s} calls={calls}: p95 {_pct(totals, 95):6.2f} ms",
                        flush=True,
                    )
        finally:
            server.stop()

    proc, port = await start_serve(max_calls) if "server" in modes else (None, 0)
    try:
        url = f"ws://127.0.0.1:{port}/v1/realtime"
        for scenario in scenarios if "server" in modes else []:
            for calls in calls_list:
                turns = max(args.turns // calls, 4) if calls > 1 else args.turns
                await run_server(url, 1, scenario, 1)  # warm-up
                lat = await run_server(url, calls, scenario, turns)
                rows.append({"mode": "server", "scenario": scenario, "calls": calls, "samples": lat})
                print(f"server     {scenario:6s} calls={calls}: p50 {_pct(lat, 50):7.1f} ms", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)

    for row in rows:
        s = row["samples"]
        row.update(n=len(s), p50_ms=_pct(s, 50), p95_ms=_pct(s, 95), mean_ms=statistics.fmean(s))
    overhead = []
    for scenario in scenarios if {"in-process", "server"} <= set(modes) else []:
        for calls in calls_list:
            a = next(
                r for r in rows if (r["mode"], r["scenario"], r["calls"]) == ("in-process", scenario, calls)
            )
            b = next(r for r in rows if (r["mode"], r["scenario"], r["calls"]) == ("server", scenario, calls))
            overhead.append(
                {
                    "scenario": scenario,
                    "calls": calls,
                    "p50_ms": b["p50_ms"] - a["p50_ms"],
                    "p95_ms": b["p95_ms"] - a["p95_ms"],
                }
            )
    return {
        "benchmark": "server_bench",
        "what": "last speech chunk sent -> first reply audio received (ms)",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_before": LOAD_BEFORE,
            "loadavg_after": list(os.getloadavg()),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gil_switch_interval_ms": sys.getswitchinterval() * 1000,
        },
        "models": "tiny-random (CPU)",
        "chunk_ms": CHUNK_MS,
        "speech_s": SPEECH_S,
        "silence_s": SILENCE_S,
        "rows": [{k: v for k, v in r.items() if k != "samples"} for r in rows],
        "overhead": overhead,
        "server_added": decomposition,
        "samples": {
            f"{r['mode']}/{r['scenario']}/{r['calls']}": [round(x, 2) for x in r["samples"]] for r in rows
        },
    }


LOAD_BEFORE = list(os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default="1,8", help="concurrent calls, comma-separated")
    parser.add_argument("--turns", type=int, default=24, help="turns measured (split across the calls)")
    parser.add_argument("--scenarios", default="vad,commit")
    parser.add_argument(
        "--modes",
        default="in-process,added,server",
        help="in-process: engine baseline; added: server overhead turn by turn; server: sg2 serve end to end",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "server_bench.json"))
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)  # child: run clients against URL
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=1.0,
        help="this process's GIL switch interval, as sg2 serve sets it (server.gil_switch_interval_ms)",
    )
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.client:
        asyncio.run(client_main(args))
        return 0
    result = asyncio.run(main_async(args))
    print()
    print(f"{'mode':11s} {'scenario':8s} {'calls':>5s} {'n':>4s} {'p50 ms':>8s} {'p95 ms':>8s}")
    for r in result["rows"]:
        print(
            f"{r['mode']:11s} {r['scenario']:8s} {r['calls']:5d} {r['n']:4d} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f}"
        )
    print()
    print(f"{'overhead':11s} {'scenario':8s} {'calls':>5s} {'Δp50 ms':>9s} {'Δp95 ms':>9s}")
    for o in result["overhead"]:
        print(f"{'server-eng':11s} {o['scenario']:8s} {o['calls']:5d} {o['p50_ms']:9.1f} {o['p95_ms']:9.1f}")
    print()
    print("added by the server, measured turn by turn (client send -> engine API, engine emit -> client):")
    print(
        f"{'scenario':8s} {'calls':>5s} {'n':>4s} {'p50 ms':>8s} {'p95 ms':>8s} {'in p95':>8s} {'out p95':>8s}"
        f" {'handoff p95':>12s}"
    )
    for d in result["server_added"]:
        print(
            f"{d['scenario']:8s} {d['calls']:5d} {d['n']:4d} {d['p50_ms']:8.2f} {d['p95_ms']:8.2f} "
            f"{d['in_p95_ms']:8.2f} {d['out_p95_ms']:8.2f} {d['handoff_p95_ms']:12.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
