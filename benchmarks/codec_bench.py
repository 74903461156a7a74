"""Codec speed: whole-utterance vs streaming (one 40 ms frame per call) at several batch sizes.

Full-size config (the released `sg2_codec_config.yaml`), random weights built in memory, so no
download is needed. Prints a table and writes JSON (default `benchmarks/results/codec_bench.json`).

Reported per row: ms per call, ms per frame per stream, real-time factor of the call (its compute
time / the audio duration it covers; < 1 keeps up with every stream in the batch), and the ratio
of the cost per stream-frame to the whole-utterance cost per frame of a 2 s utterance (the floor).

    python benchmarks/codec_bench.py                      # CPU (+ CUDA if available)
    python benchmarks/codec_bench.py --device cuda --batches 1,4,16,64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sg2_runtime.codec import CodecConfig, SG2Codec, build_random_codec  # noqa: E402
from sg2_runtime.codec.presets import codec_preset  # noqa: E402


def _default_config() -> str:
    """The released config in the reference data (same lookup as the tests' fixture)."""
    candidates = [Path(os.environ["SG2_REFERENCE_DIR"])] if os.environ.get("SG2_REFERENCE_DIR") else []
    candidates += [REPO / "shared" / "sg2_reference", REPO.parent / "shared" / "sg2_reference"]
    for path in candidates:
        if (path / "sg2_codec_config.yaml").is_file():
            return str(path / "sg2_codec_config.yaml")
    return ""


FRAME_MS = 40.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times_ms(fn, device: torch.device, calls: int, warmup: int) -> list[float]:
    """Wall times of `calls` calls of `fn`, in ms, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _speechlike(batch: int, samples: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Noise with a slow amplitude envelope: the codec's cost does not depend on content."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 1, samples, generator=g) * 0.1
    env = 0.5 + 0.5 * torch.sin(torch.linspace(0, 20, samples)).abs()
    return (noise * env).to(device)


@dataclass
class Case:
    mode: str
    op: str
    batch: int
    frames: int
    fn: Callable[[], object]
    calls: int
    times: list[float] = field(default_factory=list)


def bench_device(
    codec: SG2Codec,
    batches: list[int],
    chunk_frames: list[int],
    seconds: float,
    steady_seconds: float,
    steps: int,
    repeat: int,
    rounds: int,
) -> list[dict]:
    """Time every case `rounds` times, interleaved, and keep the best time of each.

    On a shared machine other jobs only ever add time, so the minimum over interleaved rounds is
    the closest estimate of the codec's own cost; medians are kept in the JSON.
    """
    device = codec.device
    fs = codec.frame_samples
    frames = round(seconds * codec.frame_rate)
    audio = _speechlike(1, frames * fs, device)
    tokens = codec.encode(audio)
    cases = [
        Case("whole", "encode", 1, frames, lambda: codec.encode(audio), repeat),
        Case("whole", "decode", 1, frames, lambda: codec.decode(tokens), repeat),
    ]
    if steady_seconds > 0:
        # Long enough that every attention window is full, as it is in a long streaming call.
        long_frames = round(steady_seconds * codec.frame_rate)
        long_audio = _speechlike(1, long_frames * fs, device, seed=1)
        long_tokens = codec.encode(long_audio)
        cases.append(Case("whole", "encode", 1, long_frames, lambda: codec.encode(long_audio), 1))
        cases.append(Case("whole", "decode", 1, long_frames, lambda: codec.decode(long_tokens), 1))
    for batch in batches:
        for k in chunk_frames:
            enc, dec = codec.streaming_encoder(batch), codec.streaming_decoder(batch)
            audio_k = _speechlike(batch, k * fs, device, seed=batch)
            tokens_k = torch.randint(0, codec.codebook_size, (codec.n_q, batch, k), device=device)
            cases.append(Case("stream", "encode", batch, k, lambda e=enc, a=audio_k: e.step(a), steps))
            cases.append(Case("stream", "decode", batch, k, lambda d=dec, t=tokens_k: d.step(t), steps))
            if device.type == "cuda" and batch == max(batches) and k == 1:
                cases.append(
                    Case(
                        "stream",
                        "encode+decode",
                        batch,
                        1,
                        lambda e=enc, d=dec, a=audio_k: d.step(e.step(a)),
                        steps,
                    )
                )
    for r in range(rounds):
        for case in cases:
            # First round only: warm past the fresh-slot calls and lazy initialisation.
            warmup = (3 if case.mode == "stream" else 1) if r == 0 else 0
            case.times += _times_ms(case.fn, device, case.calls, warmup)
    floor = {c.op: min(c.times) / c.frames for c in cases if c.mode == "whole" and c.frames == frames}
    floor["encode+decode"] = floor["encode"] + floor["decode"]
    rows = []
    for c in cases:
        best = min(c.times)
        per_stream = best / (c.batch * c.frames)
        rows.append(
            {
                "mode": c.mode,
                "op": c.op,
                "batch": c.batch,
                "frames_per_call": c.frames,
                "timed_calls": len(c.times),
                "ms_per_call": best,
                "ms_per_call_median": statistics.median(c.times),
                "ms_per_stream_frame": per_stream,
                "rtf": best / (c.frames * FRAME_MS),  # the call vs the audio time it advances each stream
                "ratio_vs_whole": per_stream / floor[c.op],
            }
        )
    return rows


def format_table(device_name: str, rows: list[dict]) -> str:
    calls = sorted({r["timed_calls"] for r in rows})
    lines = [
        f"**{device_name}** (best of {'/'.join(str(c) for c in calls)} timed calls per row)",
        "",
        "| mode | op | streams | ms per call | ms per stream-frame | RTF (call) | vs whole 2 s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["mode"] == "whole":
            label = f"whole {r['frames_per_call'] * FRAME_MS / 1000:g} s"
        else:
            k = r["frames_per_call"]
            label = f"stream, {k} frame{'s' if k > 1 else ''}/call"
        lines.append(
            f"| {label} | {r['op']} | {r['batch']} | {r['ms_per_call']:.1f} | "
            f"{r['ms_per_stream_frame']:.2f} | {r['rtf']:.3f} | {r['ratio_vs_whole']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cpu + cuda if available)")
    p.add_argument("--batches", default=None, help="comma-separated streaming batch sizes")
    p.add_argument("--frames-per-call", default="1,3", help="comma-separated streaming chunk sizes (frames)")
    p.add_argument("--seconds", type=float, default=2.0, help="whole-utterance length (the floor)")
    p.add_argument(
        "--steady-seconds", type=float, default=20.0, help="also time a whole utterance this long (0: skip)"
    )
    p.add_argument("--steps", type=int, default=5, help="timed streaming calls per row and round")
    p.add_argument("--repeat", type=int, default=2, help="timed whole-utterance (2 s) runs per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all rows (best kept)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--config",
        default=_default_config(),
        help="codec YAML (default: the released config if found, else the built-in 'sg2' preset, same sizes)",
    )
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "codec_bench.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    config = CodecConfig.from_yaml(args.config) if args.config else codec_preset("sg2")
    results: dict = {
        "config": str(args.config or "preset:sg2"),
        "seconds": args.seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "devices": {},
    }
    for dev in devices:
        device = torch.device(dev)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        default_batches = "1,4,16,64" if device.type == "cuda" else "1,4,16"
        batches = [int(b) for b in (args.batches or default_batches).split(",")]
        codec = build_random_codec(config, seed=0, device=dev, dtype=dtype)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{args.threads} threads"
        name = f"{name}, {str(dtype).replace('torch.', '')}"
        chunks = [int(k) for k in args.frames_per_call.split(",")]
        rows = bench_device(
            codec, batches, chunks, args.seconds, args.steady_seconds, args.steps, args.repeat, args.rounds
        )
        results["devices"][dev] = {"name": name, "rows": rows}
        print(format_table(name, rows), flush=True)
        print()
        del codec
    results["loadavg_after"] = os.getloadavg()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"load average before/after: {results['loadavg_before']} / {results['loadavg_after']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
