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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sg2_runtime.codec import CodecConfig, SG2Codec, build_random_codec  # noqa: E402


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


def _time_ms(fn, device: torch.device, repeat: int, warmup: int) -> tuple[float, float]:
    """(best, median) wall time of `fn` in ms. Best-of-N is the figure used in the table: on a
    shared machine other jobs only ever add time, so the minimum is the closest to the codec's
    own cost; the median is kept in the JSON."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return min(times), statistics.median(times)


def _speechlike(batch: int, samples: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Noise with a slow amplitude envelope: the codec's cost does not depend on content."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 1, samples, generator=g) * 0.1
    env = 0.5 + 0.5 * torch.sin(torch.linspace(0, 20, samples)).abs()
    return (noise * env).to(device)


def _row(mode: str, op: str, batch: int, frames: int, times: tuple[float, float], floor: float) -> dict:
    best, median = times
    per_stream = best / (batch * frames)
    return {
        "mode": mode,
        "op": op,
        "batch": batch,
        "frames_per_call": frames,
        "ms_per_call": best,
        "ms_per_call_median": median,
        "ms_per_stream_frame": per_stream,
        "rtf": best / (frames * FRAME_MS),  # whole call vs the audio time it advances every stream
        "ratio_vs_whole": per_stream / floor,
    }


def bench_device(
    codec: SG2Codec,
    batches: list[int],
    chunk_frames: list[int],
    seconds: float,
    steady_seconds: float,
    steps: int,
    repeat: int,
) -> list[dict]:
    device = codec.device
    fs = codec.frame_samples
    frames = round(seconds * codec.frame_rate)
    rows: list[dict] = []
    audio = _speechlike(1, frames * fs, device)
    tokens = codec.encode(audio)
    enc_t = _time_ms(lambda: codec.encode(audio), device, repeat, 1)
    dec_t = _time_ms(lambda: codec.decode(tokens), device, repeat, 1)
    floor = {"encode": enc_t[0] / frames, "decode": dec_t[0] / frames}
    rows.append(_row("whole", "encode", 1, frames, enc_t, floor["encode"]))
    rows.append(_row("whole", "decode", 1, frames, dec_t, floor["decode"]))
    if steady_seconds > 0:
        # Long enough that every attention window is full, as it is in a long streaming call.
        long_frames = round(steady_seconds * codec.frame_rate)
        long_audio = _speechlike(1, long_frames * fs, device, seed=1)
        long_tokens = codec.encode(long_audio)
        t = _time_ms(lambda: codec.encode(long_audio), device, 1, 0)
        rows.append(_row("whole", "encode", 1, long_frames, t, floor["encode"]))
        t = _time_ms(lambda: codec.decode(long_tokens), device, 1, 0)
        rows.append(_row("whole", "decode", 1, long_frames, t, floor["decode"]))
    for batch in batches:
        enc = codec.streaming_encoder(batch)
        dec = codec.streaming_decoder(batch)
        chunk = _speechlike(batch, fs, device, seed=batch)
        for k in chunk_frames:
            audio_k = _speechlike(batch, k * fs, device, seed=batch)
            tokens_k = torch.randint(0, codec.codebook_size, (codec.n_q, batch, k), device=device)
            for name, stream, arg in (("encode", enc, audio_k), ("decode", dec, tokens_k)):
                stream.reset()
                # Warm past the first (fresh-slot) calls, then time `steps` steady-state calls.
                t = _time_ms(lambda s=stream, a=arg: s.step(a), device, steps, 3)
                rows.append(_row("stream", name, batch, k, t, floor[name]))
        if device.type == "cuda" and batch == max(batches):

            def both(e=enc, d=dec, a=chunk) -> None:
                d.step(e.step(a))

            t = _time_ms(both, device, steps, 3)
            rows.append(_row("stream", "encode+decode", batch, 1, t, floor["encode"] + floor["decode"]))
    return rows


def format_table(device_name: str, rows: list[dict], steps: int, repeat: int) -> str:
    lines = [
        f"**{device_name}** (best of {repeat} whole-utterance runs / {steps} streaming calls)",
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
    p.add_argument("--steps", type=int, default=12, help="timed streaming calls per row")
    p.add_argument("--repeat", type=int, default=5, help="timed whole-utterance runs (2 s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--config", default=_default_config(), help="codec YAML (default: the released config)")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "codec_bench.json"))
    args = p.parse_args(argv)

    if not args.config:
        p.error("released sg2_codec_config.yaml not found; set SG2_REFERENCE_DIR or pass --config")
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    config = CodecConfig.from_yaml(args.config)
    results: dict = {
        "config": str(args.config),
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
            codec, batches, chunks, args.seconds, args.steady_seconds, args.steps, args.repeat
        )
        results["devices"][dev] = {"name": name, "rows": rows}
        print(format_table(name, rows, args.steps, args.repeat), flush=True)
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
