#!/usr/bin/env python
"""Conversation engine under load: simulated calls on one engine, real speech clips with pauses.

Each simulated caller streams real speech in real time (20 ms pieces), pauses, waits for the
agent's reply to play out (playback assumed in real time), and speaks again. For 1, 4, 8, 16
concurrent calls it reports: turn commit -> first reply audio (p50/p95, measured inside the
engine: the engine's own latency, endpointing excluded), LM step time and batch size, the
engine's busy share of wall time, reply audio that arrived later than real-time playout needs,
and input lag. A run "stays real time" when under 1% of reply chunks are late and input never
lags more than 500 ms.

    python benchmarks/engine_bench.py                      # tiny random models on CPU
    python benchmarks/engine_bench.py --models full --device cuda --sessions 16 32 64

Prints a table and writes benchmarks/results/engine_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sg2_runtime.engine import events as ev  # noqa: E402
from sg2_runtime.engine.engine import Engine  # noqa: E402
from sg2_runtime.engine.options import EngineConfig, SessionOptions  # noqa: E402

CHUNK_MS = 20
LATE_MS = 40  # a reply chunk later than this behind its real-time playout slot counts as late


def reference_clips() -> list[tuple[np.ndarray, int]]:
    import soundfile as sf

    candidates = [
        os.environ.get("SG2_REFERENCE_DIR", ""),
        ROOT / "shared/sg2_reference",
        ROOT.parent / "shared/sg2_reference",
    ]
    for base in candidates:
        path = Path(base) / "audio"
        if (path / "demo_zh.wav").is_file():
            zh, zr = sf.read(path / "demo_zh.wav", dtype="float32")
            en, er = sf.read(path / "demo_en.wav", dtype="float32")
            return [(zh, zr), (en[: 3 * er], er), (en[4 * er : 7 * er], er)]
    raise SystemExit("reference speech not found: set SG2_REFERENCE_DIR")


def build_models(kind: str, device: str, max_sessions: int, max_positions: int):
    if kind == "tiny":
        from sg2_runtime.engine.models import tiny_random_models

        return tiny_random_models(max_sessions=max_sessions, max_positions=max_positions, device=device)
    from sg2_runtime.codec import build_random_codec
    from sg2_runtime.codec.presets import codec_preset
    from sg2_runtime.engine.engine import EngineModels
    from sg2_runtime.engine.models import _greeting_resolver, random_greetings
    from sg2_runtime.engine.turn_format import SG2TurnFormat
    from sg2_runtime.lm.random_model import random_lm

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    codec = build_random_codec(codec_preset("sg2"), device=device, dtype=dtype)
    lm = random_lm(
        "7b", 0, max_sessions=max_sessions, max_positions=max_positions, device=device, dtype=dtype
    )
    greetings = random_greetings(lm)
    return EngineModels(
        codec, lm, SG2TurnFormat(lm.prompt), _greeting_resolver(greetings, lm.config.vocab_size)
    )


class CallStats:
    def __init__(self) -> None:
        self.commit_to_audio: list[float] = []
        self.endpointing: list[float] = []
        self.chunks = 0
        self.late = 0
        self.max_lag_ms = 0.0
        self.replies = 0


async def caller(
    engine: Engine, clips, index: int, seconds: float, start_delay: float, stats: CallStats, speculative: bool
) -> None:
    await asyncio.sleep(start_delay)
    opts = SessionOptions.model_validate(
        {
            "play_greeting": False,
            "flow_control": "realtime",
            "max_response_ms": 1200,
            "sampling": {"seed": index},
            "turn_detection": {"speculative_silence_ms": 250 if speculative else None},
        }
    )
    session = engine.open_session(opts)
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    turn = index
    reply_playout: dict[str, float] = {}

    async def consume() -> None:
        while True:
            event = await session.next_event()
            now = loop.time()
            if isinstance(event, ev.Metrics):
                stats.commit_to_audio.append(event.commit_to_first_audio_ms)
                if event.endpointing_ms is not None:
                    stats.endpointing.append(event.endpointing_ms)
            elif isinstance(event, ev.AudioChunk):
                start = reply_playout.setdefault(event.response_id, now)
                stats.chunks += 1
                if (now - start) * 1000 > event.index * 120 + LATE_MS:
                    stats.late += 1
            elif isinstance(event, ev.ResponseDone):
                stats.replies += 1
            elif isinstance(event, ev.SessionClosed):
                return

    consumer = asyncio.create_task(consume())
    while loop.time() < end:
        audio, rate = clips[turn % len(clips)]
        turn += 1
        piece = rate * CHUNK_MS // 1000
        silence = np.zeros(int(rate * 1.6), np.float32)
        t0 = loop.time()
        for i, pos in enumerate(range(0, len(audio) + len(silence), piece)):
            chunk = audio[pos : pos + piece] if pos < len(audio) else silence[:piece]
            session.push_audio(chunk, rate)
            stats.max_lag_ms = max(stats.max_lag_ms, session.pushed_ms - session.processed_ms)
            delay = t0 + (i + 1) * CHUNK_MS / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.sleep(1.2)  # listen to the reply
    session.close()
    await consumer


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def run_level(models, clips, n: int, seconds: float, max_positions: int, speculative: bool) -> dict:
    config = EngineConfig(max_sessions=n, max_positions=max_positions)
    async with Engine(models, config) as engine:
        stats = [CallStats() for _ in range(n)]
        period = 6.0
        t0 = time.perf_counter()
        await asyncio.gather(
            *(caller(engine, clips, i, seconds, i * period / n, stats[i], speculative) for i in range(n))
        )
        wall = time.perf_counter() - t0
        m = engine.metrics
        step = m.lm_step_seconds.collect()[0].samples
        step_sum = next(s.value for s in step if s.name.endswith("_sum"))
        step_count = next(s.value for s in step if s.name.endswith("_count"))
        batch = m.lm_step_batch.collect()[0].samples
        batch_sum = next(s.value for s in batch if s.name.endswith("_sum"))
        tick = m.tick_seconds.collect()[0].samples
        busy = next(s.value for s in tick if s.name.endswith("_sum"))
    c2a = [x for s in stats for x in s.commit_to_audio]
    chunks = sum(s.chunks for s in stats)
    late = sum(s.late for s in stats)
    max_lag = max(s.max_lag_ms for s in stats)
    return {
        "sessions": n,
        "speculative": speculative,
        "replies": sum(s.replies for s in stats),
        "commit_to_first_audio_ms_p50": percentile(c2a, 50),
        "commit_to_first_audio_ms_p95": percentile(c2a, 95),
        "endpointing_ms_p50": percentile([x for s in stats for x in s.endpointing], 50),
        "lm_step_ms_mean": 1000 * step_sum / step_count if step_count else None,
        "lm_step_batch_mean": batch_sum / step_count if step_count else None,
        "engine_busy_share": busy / wall,
        "reply_chunks": chunks,
        "late_chunk_share": late / chunks if chunks else None,
        "max_input_lag_ms": max_lag,
        "realtime": bool(chunks) and late / chunks < 0.01 and max_lag < 500,
    }


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", choices=["tiny", "full"], default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--seconds", type=float, default=20.0, help="simulated call length per level")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--speculation",
        choices=["on", "off", "both"],
        default="both",
        help="prepare replies during the end-of-turn silence (on), or only after the commit (off)",
    )
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/engine_bench.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clips = reference_clips()
    max_positions = 2048
    models = build_models(args.models, args.device, max(args.sessions), max_positions)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.speculation]
    rows = [
        asyncio.run(run_level(models, clips, n, args.seconds, max_positions, spec))
        for spec in modes
        for n in args.sessions
    ]
    header = "spec | sessions | replies | commit->audio p50 | p95 ms | step ms | batch | busy | late chunks | max lag ms | real time"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{'on ' if r['speculative'] else 'off'}  | {r['sessions']:8d} | {r['replies']:7d} | {fmt(r['commit_to_first_audio_ms_p50']):>17} | "
            f"{fmt(r['commit_to_first_audio_ms_p95']):>6} | {fmt(r['lm_step_ms_mean']):>7} | "
            f"{fmt(r['lm_step_batch_mean']):>5} | {r['engine_busy_share']:.2f} | "
            f"{fmt(100 * (r['late_chunk_share'] or 0)):>10}% | {r['max_input_lag_ms']:10.0f} | {r['realtime']}"
        )
    best = max((r["sessions"] for r in rows if r["realtime"] and r["speculative"] == modes[0]), default=0)
    print(f"largest session count in real time: {best}")
    info = {
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "loadavg": os.getloadavg(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "models": args.models,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"machine": info, "rows": rows, "largest_realtime": best}, indent=2)
    )


if __name__ == "__main__":
    main()
