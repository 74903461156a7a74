"""Real speech for tests: synthetic speech from espeak-ng and the reference demo recordings.

Usage:

    path = espeak_wav("Hello, how are you today?", "en", tmp_path / "hello.wav", sample_rate=24000)
    audio, sr = load_reference_speech(reference_dir, "zh", sample_rate=24000)
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from . import require_binary

# espeak-ng voice names: Mandarin is "cmn" (alias "zh"), English "en" / "en-us".
VOICE_ALIASES = {"zh": "cmn", "zh-cn": "cmn", "mandarin": "cmn", "english": "en"}


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample mono or (samples, channels) float audio with soxr (high quality)."""
    if sr_in == sr_out:
        return audio
    return soxr.resample(audio, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def espeak_audio(
    text: str,
    voice: str = "en",
    sample_rate: int = 24000,
    *,
    speed_wpm: int | None = None,
    pitch: int | None = None,
    amplitude: int | None = None,
) -> np.ndarray:
    """Synthesise `text` with espeak-ng; mono float32 in [-1, 1] at `sample_rate`."""
    exe = require_binary("espeak-ng")
    voice = VOICE_ALIASES.get(voice.lower(), voice)
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp:
        raw = Path(tmp) / "raw.wav"
        cmd = [str(exe), "-v", voice, "-w", str(raw)]
        if speed_wpm is not None:
            cmd += ["-s", str(speed_wpm)]
        if pitch is not None:
            cmd += ["-p", str(pitch)]
        if amplitude is not None:
            cmd += ["-a", str(amplitude)]
        cmd += ["--", text]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 or not raw.is_file():
            raise RuntimeError(
                f"espeak-ng failed (voice {voice!r}, rc {proc.returncode}): {proc.stderr.strip()}"
            )
        audio, sr = sf.read(raw, dtype="float32", always_2d=False)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if audio.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {text!r} (voice {voice!r})")
    return resample(audio, sr, sample_rate)


def espeak_wav(
    text: str,
    voice: str = "en",
    path: str | Path | None = None,
    sample_rate: int = 24000,
    *,
    lead_silence_s: float = 0.0,
    tail_silence_s: float = 0.0,
    **espeak_kwargs,
) -> Path:
    """Write espeak-ng speech of `text` to a 16-bit mono WAV at `sample_rate` and return its path.

    `voice`: espeak-ng voice ("en", "en-us", "cmn"; "zh" means "cmn"). Without `path` a temp file
    is made (the caller deletes it). Optional silence can be padded before/after the speech.
    """
    audio = espeak_audio(text, voice, sample_rate, **espeak_kwargs)
    audio = pad_silence(audio, sample_rate, lead_silence_s, tail_silence_s)
    if path is None:
        fd, name = tempfile.mkstemp(prefix="espeak-", suffix=".wav")
        os.close(fd)
        path = name
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, audio, sample_rate)
    return path


def pad_silence(audio: np.ndarray, sample_rate: int, lead_s: float = 0.0, tail_s: float = 0.0) -> np.ndarray:
    lead = np.zeros(round(lead_s * sample_rate), dtype=np.float32)
    tail = np.zeros(round(tail_s * sample_rate), dtype=np.float32)
    return np.concatenate([lead, audio.astype(np.float32, copy=False), tail])


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM WAV (what browsers' fake capture and most tools read)."""
    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return Path(path)


def read_wav(path: str | Path, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 audio and its rate (resampled to `sample_rate` if given)."""
    audio, sr = sf.read(str(path), dtype="float32", always_2d=False)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if sample_rate is not None and sr != sample_rate:
        audio, sr = resample(audio, sr, sample_rate), sample_rate
    return audio, sr


def reference_speech_path(reference_dir: str | Path, lang: str) -> Path:
    """`<reference_dir>/audio/demo_zh.wav` (32 kHz) or `demo_en.wav` (24 kHz): real recorded speech."""
    lang = {"cmn": "zh", "en-us": "en"}.get(lang, lang)
    path = Path(reference_dir) / "audio" / f"demo_{lang}.wav"
    if not path.is_file():
        raise FileNotFoundError(f"reference speech {path} not found (lang must be 'zh' or 'en')")
    return path


def load_reference_speech(
    reference_dir: str | Path, lang: str = "zh", sample_rate: int | None = 24000
) -> tuple[np.ndarray, int]:
    """Load demo_zh.wav / demo_en.wav from the reference dir as mono float32 at `sample_rate`."""
    return read_wav(reference_speech_path(reference_dir, lang), sample_rate)


def rms_dbfs(audio: np.ndarray) -> float:
    """RMS level in dB relative to full scale (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")


def voiced_seconds(
    audio: np.ndarray, sample_rate: int, frame_s: float = 0.02, threshold_dbfs: float = -40.0
) -> float:
    """Seconds of 20 ms frames louder than `threshold_dbfs` (a crude voice-activity measure)."""
    n = int(sample_rate * frame_s)
    frames = len(audio) // n
    if frames == 0:
        return 0.0
    x = audio[: frames * n].reshape(frames, n).astype(np.float64)
    rms = np.sqrt(np.mean(x * x, axis=1))
    return float(np.sum(rms > 10 ** (threshold_dbfs / 20)) * frame_s)
