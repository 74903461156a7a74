#!/usr/bin/env python
"""Browser-call transport on loopback: end of the caller's speech -> first agent audio received.

One real WebRTC call (aiortc client <-> the `agent.direct` server in the same process, Opus both
ways, DTLS/SCTP, real HTTP signalling) over loopback, tiny random models on CPU. The client plays
real speech in real time, turn after turn; for each turn it measures, on its own clock, from the
moment the last sample of speech left its sender to the arrival of the first agent audio frame.
That total is split into:

- endpointing: the silence the VAD waits for before it ends the turn (engine ``Metrics``);
- engine: turn commit -> first reply audio inside the engine (``commit_to_first_audio_ms``);
- transport: the rest = caller audio into the server (Opus, jitter buffer, push) + engine input
  lag + the outbound track (queue, 20 ms pacing, Opus) + the way back (jitter buffer, decode).
  ``server`` is the server's own share (caller audio arrived -> first reply frame handed to the
  encoder, minus endpointing and engine), ``network+client`` the remainder.

    python benchmarks/direct_bench.py --turns 20

Prints a table and writes benchmarks/results/direct_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from agent.direct import DirectSettings, setup_direct  # noqa: E402
from agent.direct.client import RATE, DirectClient  # noqa: E402
from sg2_runtime.engine.engine import Engine  # noqa: E402
from sg2_runtime.engine.models import tiny_random_models  # noqa: E402
from sg2_runtime.engine.options import EngineConfig  # noqa: E402

AUDIBLE_DBFS = -70.0  # the server sends exact zeros between replies: any sound is the reply


def reference_speech() -> list[np.ndarray]:
    import soundfile as sf
    import soxr

    for base in (
        os.environ.get("SG2_REFERENCE_DIR", ""),
        ROOT / "shared/sg2_reference",
        ROOT.parent / "shared/sg2_reference",
    ):
        path = Path(base) / "audio"
        if (path / "demo_zh.wav").is_file():
            zh, zr = sf.read(path / "demo_zh.wav", dtype="float32")
            en, er = sf.read(path / "demo_en.wav", dtype="float32")
            zh48 = soxr.resample(zh, zr, RATE).astype(np.float32)
            en48 = soxr.resample(en, er, RATE).astype(np.float32)
            return [zh48[: int(2.2 * RATE)], en48[: int(2.5 * RATE)], en48[int(4 * RATE) : int(6.5 * RATE)]]
    raise SystemExit("reference speech not found: set SG2_REFERENCE_DIR")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


async def run(turns: int, jitter_packets: int, client_jitter_packets: int) -> dict:
    models = tiny_random_models(max_sessions=2, max_positions=2048, seed=0)
    engine = Engine(models, EngineConfig(max_sessions=2, max_positions=2048)).start()
    settings = DirectSettings(
        inbound_jitter_packets=jitter_packets,
        session={"play_greeting": False, "max_response_ms": 960, "sampling": {"seed": 7}},
    )
    app = web.Application()
    service = setup_direct(app, engine, settings)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    clips = reference_speech()
    rows = []
    try:
        async with DirectClient(f"http://127.0.0.1:{port}", jitter_packets=client_jitter_packets) as client:
            await client.call()
            await client.wait_event(lambda m: m["type"] == "call", timeout=30)
            client.source.play(np.zeros(int(0.5 * RATE), np.float32))
            for turn in range(turns):
                clip = clips[turn % len(clips)]
                n_events = len(client.events)
                start = client.source.play(clip)
                client.source.play(np.zeros(int(1.2 * RATE), np.float32))
                end_sample = start + len(clip)
                t_end = await client.source.wait_sent(end_sample - 1)
                latency = await client.wait_event(
                    lambda m: m["type"] == "latency", after=n_events, timeout=60
                )
                rid = latency["response_id"]
                turn_ev = next(m for m in client.events[n_events:] if m["type"] == "turn_committed")
                clip_end_ms = end_sample * 1000 / RATE  # the sent timeline = the server input timeline
                vad_end_ms = turn_ev["end_ms"]
                await client.wait_event(
                    lambda m, rid=rid: m["type"] == "response_done" and m["response_id"] == rid,
                    after=n_events,
                    timeout=60,
                )

                def first_audio_after(rec, t):
                    return next((ta for ta, db in rec.frame_levels() if ta > t and db > AUDIBLE_DBFS), None)

                def played_out(rec, t=t_end) -> bool:
                    after = [db > AUDIBLE_DBFS for ta, db in rec.frame_levels() if ta > t]
                    if not any(after):
                        return False
                    last = max(i for i, x in enumerate(after) if x)
                    return len(after) - 1 - last >= 10

                await client.recorder.wait_for(played_out, timeout=30)
                # the end of speech in the sent audio: the clip's last sample (clips end abruptly).
                # Endpointing is audio time: from there to where the VAD decided (the VAD's own
                # release lag + its silence wait); the sent and the server's input timelines are the
                # same samples (loopback, no loss: checked by the frame counts below).
                t_speech_end = client.source.time_of(end_sample - 1)
                t_first = first_audio_after(client.recorder, t_speech_end)
                total = (t_first - t_speech_end) * 1000.0
                endpointing = vad_end_ms + latency["endpointing_ms"] - clip_end_ms
                transport = total - endpointing - latency["engine_ms"]
                rows.append(
                    {
                        "turn": turn,
                        "total_ms": total,
                        "endpointing_ms": endpointing,
                        "engine_ms": latency["engine_ms"],
                        "transport_ms": transport,
                        "server_transport_ms": latency["transport_ms"],
                        "network_ms": transport - latency["transport_ms"],
                        "model_ms": latency["model_ms"],
                        "vad_release_lag_ms": vad_end_ms - clip_end_ms,
                    }
                )
                print(
                    f"turn {turn:2d}: total {total:6.1f} ms = endpointing {endpointing:5.1f}"
                    f" + engine {latency['engine_ms']:5.1f} + transport {transport:5.1f}"
                    f" (server track {latency['transport_ms']:4.1f}, packetisation+network {transport - latency['transport_ms']:5.1f})",
                    flush=True,
                )
            call = next(iter(service.calls.values()))
            frames_match = call.inbound_frames <= len(client.source.frame_times)
            lost = len(client.source.frame_times) - call.inbound_frames
            await client.hangup()
    finally:
        await runner.cleanup()
        engine.shutdown()
    return {"rows": rows, "client_frames_not_yet_received": lost, "frames_match": frames_match}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--jitter-packets", type=int, default=DirectSettings().inbound_jitter_packets)
    p.add_argument("--client-jitter-packets", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/direct_bench.json"))
    args = p.parse_args()

    load_before = load()
    t0 = time.time()
    result = asyncio.run(run(args.turns, args.jitter_packets, args.client_jitter_packets))
    rows = result["rows"]
    keys = [
        "total_ms",
        "endpointing_ms",
        "engine_ms",
        "transport_ms",
        "server_transport_ms",
        "network_ms",
        "model_ms",
        "vad_release_lag_ms",
    ]
    summary = {k: {"p50": pct([r[k] for r in rows], 50), "p95": pct([r[k] for r in rows], 95)} for k in keys}
    info = {
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": load(),
        "seconds": round(time.time() - t0, 1),
        "turns": len(rows),
        "server_jitter_packets": args.jitter_packets,
        "client_jitter_packets": args.client_jitter_packets,
        "client_frames_in_flight_at_end": result["client_frames_not_yet_received"],
    }
    print()
    print(f"{len(rows)} turns, loopback call, tiny random models on CPU")
    print(f"| {'ms':22s} | {'p50':>7s} | {'p95':>7s} |")
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 9}|")
    for k in keys:
        print(f"| {k[:-3]:22s} | {summary[k]['p50']:7.1f} | {summary[k]['p95']:7.1f} |")
    target = summary["transport_ms"]["p50"] <= 60.0
    print(
        f"\ntransport p50 {summary['transport_ms']['p50']:.1f} ms: {'within' if target else 'OVER'} the 60 ms target"
    )
    print(info["load_before"])
    print(info["load_after"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": info, "summary": summary, "turns": rows}, indent=2))


if __name__ == "__main__":
    main()
