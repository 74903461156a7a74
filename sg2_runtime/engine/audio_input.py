"""Caller audio -> clean 24 kHz mono float32 for the codec and 16 kHz for the VAD.

Transports hand us whatever they have: 8 kHz telephony, 16 kHz, 44.1/48 kHz WebRTC, int16 or
float, mono or interleaved stereo. Everything is normalised here, once, with soxr's streaming
resampler (stateful per call, so chunk boundaries leave no clicks), before it reaches the engine
thread. Bad samples never propagate: non-finite values become 0 and are counted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import soxr

CODEC_RATE = 24000
VAD_RATE = 16000
SUPPORTED_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)
MAX_CHANNELS = 8


class AudioFormatError(ValueError):
    """The pushed audio cannot be interpreted (shape, dtype, rate or channel count)."""


@dataclass
class NormalisedAudio:
    codec: np.ndarray  # float32 mono at 24 kHz
    vad: np.ndarray  # float32 mono at 16 kHz
    non_finite: int  # samples that were NaN/inf and replaced by 0


class AudioNormaliser:
    """Per-session converter; keeps the resampler state between pushes."""

    def __init__(self) -> None:
        self._in_rate: int | None = None
        self._to_codec: soxr.ResampleStream | None = None
        self._to_vad = soxr.ResampleStream(CODEC_RATE, VAD_RATE, 1, dtype="float32", quality="HQ")

    def push(self, pcm: np.ndarray | bytes, sample_rate: int, channels: int = 1) -> NormalisedAudio:
        mono, bad = to_mono_float(pcm, sample_rate, channels)
        codec = self._resample_to_codec(mono, sample_rate)
        vad = self._to_vad.resample_chunk(codec) if codec.size else codec
        return NormalisedAudio(codec=codec, vad=vad, non_finite=bad)

    def _resample_to_codec(self, mono: np.ndarray, rate: int) -> np.ndarray:
        if rate != self._in_rate:
            self._in_rate = rate
            self._to_codec = (
                None
                if rate == CODEC_RATE
                else soxr.ResampleStream(rate, CODEC_RATE, 1, dtype="float32", quality="HQ")
            )
        if self._to_codec is None or mono.size == 0:
            return mono
        return self._to_codec.resample_chunk(mono)


def to_mono_float(pcm: np.ndarray | bytes, sample_rate: int, channels: int) -> tuple[np.ndarray, int]:
    """Validate and convert to float32 mono in [-1, 1]; returns (samples, non-finite count).

    ``bytes`` are little-endian int16 (what WebSockets and most telephony carry). Arrays may be
    int16 (full scale 32768), int32 (full scale 2**31) or float (already in [-1, 1]); multi-channel
    audio is either interleaved 1-D or shaped ``(samples, channels)``, and is averaged to mono.
    """
    if sample_rate not in SUPPORTED_RATES:
        raise AudioFormatError(f"unsupported sample rate {sample_rate} Hz; supported: {SUPPORTED_RATES}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioFormatError(f"channels must be 1..{MAX_CHANNELS}, got {channels}")
    if isinstance(pcm, bytes | bytearray | memoryview):
        if len(pcm) % (2 * channels):
            raise AudioFormatError(
                f"{len(pcm)} bytes is not a whole number of int16 frames of {channels} channels"
            )
        pcm = np.frombuffer(pcm, dtype="<i2")
    arr = np.asarray(pcm)
    if arr.ndim == 2:
        if arr.shape[1] != channels:
            raise AudioFormatError(f"array has {arr.shape[1]} channels, expected {channels}")
    elif arr.ndim == 1:
        if arr.size % channels:
            raise AudioFormatError(f"{arr.size} samples is not a whole number of {channels}-channel frames")
        arr = arr.reshape(-1, channels)
    else:
        raise AudioFormatError(
            f"audio must be 1-D (interleaved) or (samples, channels), got shape {arr.shape}"
        )
    samples = _to_float(arr)
    bad = 0
    finite = np.isfinite(samples)
    if not finite.all():
        bad = int((~finite).sum())
        samples = np.where(finite, samples, 0.0).astype(np.float32)
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
    return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False), bad


def _to_float(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.int16:
        return arr.astype(np.float32) / 32768.0
    if arr.dtype == np.int32:
        return arr.astype(np.float32) / 2147483648.0
    if arr.dtype in (np.float32, np.float64, np.float16):
        return arr.astype(np.float32, copy=False)
    raise AudioFormatError(f"unsupported sample dtype {arr.dtype}; use int16, int32 or float")


class SampleQueue:
    """FIFO of float32 samples fed in arbitrary pieces and consumed in fixed-size blocks."""

    def __init__(self) -> None:
        self._parts: deque[np.ndarray] = deque()
        self.size = 0

    def push(self, samples: np.ndarray) -> None:
        if samples.size:
            self._parts.append(samples)
            self.size += samples.size

    def take(self, n: int) -> np.ndarray | None:
        if self.size < n:
            return None
        out = np.empty(n, dtype=np.float32)
        filled = 0
        while filled < n:
            head = self._parts[0]
            k = min(n - filled, head.size)
            out[filled : filled + k] = head[:k]
            filled += k
            if k == head.size:
                self._parts.popleft()
            else:
                self._parts[0] = head[k:]
        self.size -= n
        return out
