"""Caller audio normalisation: any common rate, int16/float, stereo, bad samples."""

from __future__ import annotations

import numpy as np
import pytest

from sg2_runtime.engine.audio_input import AudioFormatError, AudioNormaliser, to_mono_float


def _tone(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100, 48000])
def test_streamed_resampling_gives_24k_of_the_right_length_and_pitch(rate: int) -> None:
    norm = AudioNormaliser()
    tone = _tone(rate, 2.0)
    chunk = rate // 50  # 20 ms pieces, as WebRTC delivers them
    outs = [norm.push(tone[i : i + chunk], rate) for i in range(0, tone.size, chunk)]
    codec = np.concatenate([o.codec for o in outs])
    vad = np.concatenate([o.vad for o in outs])
    # streaming resamplers hold back a few ms; the rest must be there
    assert 48000 - 1500 <= codec.size <= 48000
    assert 32000 - 1500 <= vad.size <= 32000
    segment = codec[4000:28000]
    peak_hz = np.argmax(np.abs(np.fft.rfft(segment))) * 24000 / segment.size
    assert abs(peak_hz - 440) < 3


def test_int16_bytes_and_arrays_are_scaled_to_unit_range() -> None:
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    a, bad_a = to_mono_float(pcm, 24000, 1)
    b, bad_b = to_mono_float(pcm.tobytes(), 24000, 1)
    np.testing.assert_allclose(a, [0.0, 0.5, -1.0, 32767 / 32768], atol=1e-6)
    np.testing.assert_array_equal(a, b)
    assert bad_a == bad_b == 0


def test_stereo_interleaved_and_2d_are_averaged() -> None:
    left = np.full(480, 0.2, dtype=np.float32)
    right = np.full(480, -0.6, dtype=np.float32)
    inter = np.stack([left, right], axis=1).reshape(-1)
    a, _ = to_mono_float(inter, 48000, 2)
    b, _ = to_mono_float(np.stack([left, right], axis=1), 48000, 2)
    np.testing.assert_allclose(a, -0.2, atol=1e-6)
    np.testing.assert_array_equal(a, b)


def test_non_finite_samples_are_replaced_and_counted() -> None:
    x = np.array([0.1, np.nan, np.inf, -np.inf, 0.2], dtype=np.float32)
    y, bad = to_mono_float(x, 16000, 1)
    assert bad == 3
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, [0.1, 0.0, 0.0, 0.0, 0.2], atol=1e-7)
    out = AudioNormaliser().push(np.full(16000, np.nan, dtype=np.float32), 16000)
    assert out.non_finite == 16000 and np.isfinite(out.codec).all()


def test_empty_push_is_harmless() -> None:
    out = AudioNormaliser().push(np.zeros(0, dtype=np.int16), 48000)
    assert out.codec.size == 0 and out.vad.size == 0


@pytest.mark.parametrize(
    ("pcm", "rate", "channels", "message"),
    [
        (np.zeros(10, np.float32), 12345, 1, "sample rate"),
        (np.zeros(9, np.float32), 48000, 2, "whole number"),
        (b"\x00\x01\x02", 24000, 1, "int16"),
        (np.zeros((4, 3), np.float32), 24000, 2, "channels"),
        (np.zeros(4, np.uint8), 24000, 1, "dtype"),
        (np.zeros((2, 2, 2), np.float32), 24000, 1, "1-D"),
        (np.zeros(4, np.float32), 24000, 0, "channels"),
    ],
)
def test_bad_audio_is_refused_with_a_clear_error(pcm, rate, channels, message) -> None:
    with pytest.raises(AudioFormatError, match=message):
        to_mono_float(pcm, rate, channels)
