#!/usr/bin/env python
"""Pauses inside utterances, as the engine's VAD sees them: the basis of the end-of-turn default.

An end-of-turn silence shorter than the pauses people make mid-sentence cuts them off; every
millisecond longer is latency on every turn. This measures, with the engine's own Silero VAD
(release threshold 0.35, 32 ms windows), the silent gaps inside single utterances of real speech
(the reference clips) and of espeak-ng sentences with commas, semicolons and question marks, at
two speaking rates, in Mandarin and English. Prints the distribution and, for candidate
end-of-turn silences, how many mid-utterance pauses each would wrongly end a turn on.

    python benchmarks/turn_pauses.py   # writes benchmarks/results/turn_pauses.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sg2_runtime.engine.vad import WINDOW, WINDOW_MS, BatchedVAD  # noqa: E402
from tests.support.speech import espeak_audio, load_reference_speech  # noqa: E402

SENTENCES = [
    (
        "en",
        "Hello, I would like to book a table for two, tomorrow evening, around seven o'clock. Is that possible?",
    ),
    ("en", "Well, let me think. First, we need the tickets; then, we take the train, and finally, we walk."),
    ("cmn", "你好，我想问一下，明天的天气怎么样？如果下雨的话，我们就不去公园了，好吗？"),
    ("cmn", "首先，我们需要买票；然后，坐火车去上海，最后，走路到酒店。谢谢你的帮助。"),
]
CANDIDATES_MS = (200, 300, 400, 500, 600, 800)


def gaps_ms(audio16: np.ndarray, release: float = 0.35) -> list[int]:
    vad = BatchedVAD(1)
    probs = np.array(
        [vad.run([0], audio16[None, i * WINDOW : (i + 1) * WINDOW])[0] for i in range(audio16.size // WINDOW)]
    )
    voiced = np.flatnonzero(probs >= release)
    gaps = np.diff(voiced) - 1
    return [int(g) * WINDOW_MS for g in gaps if g > 0]


def reference_dir() -> Path:
    for base in (ROOT, *ROOT.parents):
        if (base / "shared/sg2_reference/audio/demo_zh.wav").is_file():
            return base / "shared/sg2_reference"
    raise SystemExit("reference speech not found")


def main() -> None:
    pad = np.zeros(8000, np.float32)
    gaps: list[int] = []
    sources = []
    for voice, text in SENTENCES:
        for wpm in (150, 175):
            g = gaps_ms(np.concatenate([pad, espeak_audio(text, voice, 16000, speed_wpm=wpm), pad]))
            sources.append({"source": f"espeak {voice} {wpm} wpm", "gaps_ms": g})
            gaps += g
    for lang in ("zh", "en"):
        audio, _ = load_reference_speech(reference_dir(), lang, 16000)
        g = gaps_ms(audio)
        sources.append({"source": f"demo_{lang}.wav", "gaps_ms": g})
        gaps += g
    arr = np.array(gaps)
    summary = {
        "pauses": int(arr.size),
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "max_ms": int(arr.max()),
        "wrong_ends": {str(c): int((arr >= c).sum()) for c in CANDIDATES_MS},
    }
    print(
        f"{arr.size} pauses inside utterances: p50 {summary['p50_ms']:.0f} ms, p90 {summary['p90_ms']:.0f} ms, "
        f"max {summary['max_ms']} ms"
    )
    print("end-of-turn silence | mid-utterance pauses that would end the turn")
    for c in CANDIDATES_MS:
        n = summary["wrong_ends"][str(c)]
        print(f"{c:>19} ms | {n:3d} ({100 * n / arr.size:.0f}%)")
    out = ROOT / "benchmarks/results/turn_pauses.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "sources": sources}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
