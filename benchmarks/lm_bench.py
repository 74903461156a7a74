#!/usr/bin/env python
"""Speech-text LM speed: per-position decode time at several batch sizes, and prefill throughput.

One decode step = one LM position = 120 ms of agent audio: sample the text token from the
pending state, run the patch decoder 3 times (3 frames x 3 codebooks) with sampling, then the
backbone on the new position. Sessions are held in speech mode (the text channel is forced to
``<|empty|>`` after the ``<|sosp|>``), so every step includes the patch decoder.

The model is a random-weight model built in memory: Qwen2.5-0.5B-like on CPU (float32), the
7B-like real size on CUDA (bfloat16, static step + CUDA graphs). Prints a table and writes
``benchmarks/results/lm_bench.json``.

    python benchmarks/lm_bench.py                  # CPU, 0.5b, 2 threads, batches 1 4 16
    python benchmarks/lm_bench.py --device cuda    # GPU, 7b
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sg2_runtime.lm.config import preset_config  # noqa: E402
from sg2_runtime.lm.random_model import parameter_count, random_lm  # noqa: E402
from sg2_runtime.lm.sampling import SamplingParams  # noqa: E402

SECTIONS = ("backbone", "text_head", "patch_decoder", "sampling")


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with contextlib.suppress(OSError):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def speech_positions(lm, n: int, gen: torch.Generator) -> torch.Tensor:
    """n positions of user speech (text <|empty|>, random codec frames), like a streamed user turn."""
    frames = torch.randint(0, 1024, (n * lm.group_size, lm.n_vq), generator=gen)
    return lm.prompt.user_speech(frames)


def bench_prefill(lm, length: int, repeats: int, gen: torch.Generator) -> dict:
    sess = lm.open_session(SamplingParams(), seed=1)
    matrix = torch.cat([lm.prompt.user_turn_prefix(), speech_positions(lm, length - 3, gen)], dim=1)
    lm.prefill(sess, matrix[:, :30])  # warm-up
    times = []
    for _ in range(repeats):
        lm.rollback(sess, 0)
        t0 = time.perf_counter()
        lm.prefill(sess, matrix)
        times.append(time.perf_counter() - t0)
    lm.close_session(sess)
    best = min(times)
    return {
        "positions": matrix.shape[1] // lm.group_size,
        "seconds": best,
        "positions_per_s": matrix.shape[1] / 3 / best,
    }


def bench_streaming_prefill(lm, batch: int, repeats: int, gen: torch.Generator) -> dict:
    """One 120 ms user-audio position for each of ``batch`` listening sessions in one prefill_many."""
    sessions = [lm.open_session(seed=i) for i in range(batch)]
    base = torch.cat([lm.prompt.user_turn_prefix(), speech_positions(lm, 60, gen)], dim=1)
    lm.prefill_many([(s, base) for s in sessions])
    times = []
    for _ in range(repeats):
        chunk = speech_positions(lm, 1, gen)
        t0 = time.perf_counter()
        lm.prefill_many([(s, chunk) for s in sessions])
        times.append(time.perf_counter() - t0)
    for s in sessions:
        lm.close_session(s)
    best = min(times)
    return {"batch": batch, "ms_per_call": best * 1e3, "positions_per_s": batch / best}


def prepare_decode(lm, batch: int, prompt: int, gen: torch.Generator, seed0: int) -> list:
    """``batch`` sessions with different prompt lengths, each put in speech mode."""
    sessions = [lm.open_session(SamplingParams(), seed=seed0 + i) for i in range(batch)]
    items = []
    for i, s in enumerate(sessions):
        n = prompt + 7 * i  # different lengths, as on live calls
        items.append((s, torch.cat([lm.prompt.user_turn_prefix(), speech_positions(lm, n, gen)], dim=1)))
    lm.prefill_many(items)
    for s in sessions:
        s.force_next_text = lm.special.sosp
    lm.step(sessions)
    return sessions


def decode_round(lm, sessions: list, warmup: int, steps: int) -> list[tuple[float, dict]]:
    """(seconds, {section: seconds}) of each timed step."""
    per_step = []
    for i in range(warmup + steps):
        for s in sessions:
            s.force_next_text = lm.special.empty  # stay in speech mode: every step runs the patch decoder
        lm.profiler.reset()
        # Section timing synchronises the device; with CUDA graphs the step is one replay anyway.
        lm.profiler.enabled = i >= warmup and not lm.cuda_graphs
        t0 = time.perf_counter()
        outs = lm.step(sessions)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        assert all(o.has_speech for o in outs)
        if i >= warmup:
            per_step.append((elapsed, dict(lm.profiler.totals)))
    lm.profiler.enabled = False
    return per_step


def summarise(batch: int, rounds: list[list[tuple[float, dict]]]) -> dict:
    """The machine is shared: take each round's median step, then the round with the lowest median
    (with that step's own breakdown); all step times are kept in the JSON."""
    medians = []
    for steps in rounds:
        ordered = sorted(steps, key=lambda x: x[0])
        medians.append(ordered[len(ordered) // 2])
    total, totals = min(medians, key=lambda x: x[0])
    step_ms = total * 1e3
    if totals:
        sections = {k: totals.get(k, 0.0) * 1e3 for k in SECTIONS}
        sections["bookkeeping"] = max(0.0, step_ms - sum(sections.values()))
        outside = (sections["sampling"] + sections["bookkeeping"]) / step_ms
    else:  # CUDA graphs: no breakdown
        sections = {k: float("nan") for k in (*SECTIONS, "bookkeeping")}
        outside = float("nan")
    return {
        "batch": batch,
        "ms_per_step": step_ms,
        "ms_per_position_per_session": step_ms / batch,
        "sections_ms": sections,
        "outside_forward_fraction": outside,
        "round_median_ms": [m[0] * 1e3 for m in medians],
        "all_step_ms": [[t * 1e3 for t, _ in steps] for steps in rounds],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default=None, help="model preset (default: 0.5b on CPU, 7b on CUDA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt", type=int, default=100, help="prompt positions per session before decoding")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=256, help="positions in the prefill-throughput test")
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_bench.json"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    size = args.size or ("7b" if device.type == "cuda" else "0.5b")
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)

    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    options = {"max_sessions": sum(batches), "max_positions": args.max_positions, "device": device}
    lm = random_lm(size, seed=0, **options)
    build_s = time.perf_counter() - t0
    cfg = preset_config(size)
    print(
        f"# {size} random model ({parameter_count(cfg) / 1e6:.0f}M parameters, {lm.dtype}) on {device}, "
        f"{torch.get_num_threads()} threads, attn={lm.attn_impl}, static_step={lm.static_step}, "
        f"cuda_graphs={lm.cuda_graphs}; built in {build_s:.1f}s; KV pool {lm.kv_cache_bytes / 2**20:.0f} MiB"
    )

    prefill = bench_prefill(lm, args.prefill, repeats=3, gen=gen)
    print(
        f"prefill: {prefill['positions']} positions in {prefill['seconds'] * 1e3:.0f} ms = "
        f"{prefill['positions_per_s']:.0f} positions/s"
    )
    streaming = bench_streaming_prefill(lm, max(batches), repeats=3, gen=gen)
    print(
        f"streaming prefill: 1 position x {streaming['batch']} sessions in {streaming['ms_per_call']:.0f} ms"
    )

    groups = {b: prepare_decode(lm, b, args.prompt, gen, seed0=100 * b) for b in batches}
    rounds: dict[int, list] = {b: [] for b in batches}
    for _ in range(args.rounds):  # interleaved, so a busy spell on the shared machine hits all sizes alike
        for b in batches:
            rounds[b].append(decode_round(lm, groups[b], args.warmup, args.steps))
    rows = [summarise(b, rounds[b]) for b in batches]
    base = rows[0]["ms_per_position_per_session"] if rows and rows[0]["batch"] == 1 else None
    header = (
        "| batch | ms/step | ms/position/session | vs batch 1 | backbone | text head | patch decoder "
        "| sampling | bookkeeping | outside forwards |"
    )
    print()
    print(header)
    print("|---" * 10 + "|")
    for r in rows:
        s = r["sections_ms"]
        ratio = f"{r['ms_per_position_per_session'] / base:.2f}x" if base else "-"
        r["per_session_vs_batch1"] = r["ms_per_position_per_session"] / base if base else None
        print(
            f"| {r['batch']} | {r['ms_per_step']:.1f} | {r['ms_per_position_per_session']:.1f} | {ratio} "
            f"| {s['backbone']:.1f} | {s['text_head']:.1f} | {s['patch_decoder']:.1f} | {s['sampling']:.1f} "
            f"| {s['bookkeeping']:.1f} | {100 * r['outside_forward_fraction']:.1f}% |"
        )
    result = {
        "model": size,
        "parameters": parameter_count(cfg),
        "dtype": str(lm.dtype),
        "device": str(device),
        "attn_impl": lm.attn_impl,
        "static_step": lm.static_step,
        "cuda_graphs": lm.cuda_graphs,
        "machine": machine_info(device),
        "loadavg_at_start": load_start,
        "prompt_positions": args.prompt,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "prefill": prefill,
        "streaming_prefill": streaming,
        "decode": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nload average (1/5/15 min): {load_start} at start, {result['machine'].get('loadavg')} at end")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
