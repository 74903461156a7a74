"""Turn detection: the hysteresis state machine on scripted VAD timelines and on real speech."""

from __future__ import annotations

import numpy as np
import soundfile as sf
import soxr

from sg2_runtime.engine.options import TurnDetection
from sg2_runtime.engine.turns import Signal, TurnDetector
from sg2_runtime.engine.vad import WINDOW, WINDOW_MS, BatchedVAD


def _run(det: TurnDetector, probs: list[float]) -> list[tuple[Signal, int]]:
    out = []
    for i, p in enumerate(probs):
        out += [(s.kind, s.time_ms) for s in det.feed(p, (i + 1) * WINDOW_MS)]
    return out


def _windows(ms: int) -> int:
    return ms // WINDOW_MS


def test_speech_then_silence_gives_onset_speculation_and_end_of_turn() -> None:
    opts = TurnDetection(silence_ms=480, speculative_silence_ms=224, min_speech_ms=64)
    probs = [0.0] * 5 + [0.9] * 20 + [0.0] * 20
    signals = _run(TurnDetector(opts), probs)
    assert signals == [
        (Signal.ONSET, 5 * WINDOW_MS),
        (Signal.SPECULATE, 25 * WINDOW_MS),
        (Signal.END_OF_TURN, 25 * WINDOW_MS),
    ]


def test_a_pause_shorter_than_the_silence_keeps_the_turn_open_and_cancels_speculation() -> None:
    opts = TurnDetection(silence_ms=480, speculative_silence_ms=224)
    probs = [0.9] * 10 + [0.0] * _windows(320) + [0.9] * 10 + [0.0] * 20
    signals = [s for s, _ in _run(TurnDetector(opts), probs)]
    assert signals == [Signal.ONSET, Signal.SPECULATE, Signal.RESUME, Signal.SPECULATE, Signal.END_OF_TURN]


def test_blips_shorter_than_min_speech_are_ignored() -> None:
    opts = TurnDetection(min_speech_ms=96)
    probs = [0.9, 0.9, 0.0, 0.9, 0.0, 0.9, 0.9, 0.0] * 5
    assert _run(TurnDetector(opts), probs) == []


def test_hysteresis_keeps_speech_between_release_and_threshold() -> None:
    opts = TurnDetection(threshold=0.6, release_threshold=0.3, silence_ms=192, speculative_silence_ms=None)
    probs = [0.9] * 4 + [0.45] * 30 + [0.1] * 6
    signals = _run(TurnDetector(opts), probs)
    assert [s for s, _ in signals] == [Signal.ONSET, Signal.END_OF_TURN]
    assert signals[-1][1] == 34 * WINDOW_MS


def test_barge_in_long_speech_interrupts_short_sound_resumes() -> None:
    opts = TurnDetection(interruption_min_speech_ms=320, min_speech_ms=64)
    det = TurnDetector(opts)
    det.agent_speaking = True
    short = _run(det, [0.9] * 5 + [0.0] * 10)
    assert [s for s, _ in short] == [Signal.ONSET, Signal.SHORT_SOUND_OVER]
    long = _run(det, [0.9] * 12)
    assert [s for s, _ in long] == [Signal.ONSET, Signal.INTERRUPTION]


def test_real_speech_clip_is_one_turn_with_default_options(reference_dir) -> None:
    wav, rate = sf.read(reference_dir / "audio" / "demo_en.wav", dtype="float32")
    x = soxr.resample(
        np.concatenate([np.zeros(rate // 2, np.float32), wav, np.zeros(rate, np.float32)]), rate, 16000
    )
    vad = BatchedVAD(1)
    det = TurnDetector(TurnDetection())
    signals = []
    for i in range(x.size // WINDOW):
        p = float(vad.run([0], x[None, i * WINDOW : (i + 1) * WINDOW])[0])
        signals += [(s.kind, s.time_ms) for s in det.feed(p, (i + 1) * WINDOW_MS)]
    kinds = [k for k, _ in signals]
    assert kinds.count(Signal.ONSET) == 1
    assert kinds.count(Signal.END_OF_TURN) == 1
    onset = signals[kinds.index(Signal.ONSET)][1]
    end = signals[kinds.index(Signal.END_OF_TURN)][1]
    assert 400 <= onset <= 1000  # the clip starts after 0.5 s of padding
    speech_end_ms = 500 + len(wav) * 1000 // rate
    assert speech_end_ms - 1500 <= end <= speech_end_ms + 100
