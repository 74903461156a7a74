"""Shared helpers for the codec tests: cached codecs, golden tensors and real speech.

Plain functions with process-wide caches (not fixtures) so that each codec test module can wrap
them in its own fixtures without touching the shared conftest.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from safetensors.torch import load_file

from sg2_runtime.codec import CodecConfig, SG2Codec, build_random_codec, load_codec

FRAME = 960


@functools.cache
def golden(reference_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(reference_dir / "codec_tiny_golden.safetensors"))


@functools.cache
def tiny_config(reference_dir: Path) -> CodecConfig:
    return CodecConfig.from_yaml(reference_dir / "codec_tiny_config.yaml")


@functools.cache
def golden_codec(reference_dir: Path) -> SG2Codec:
    """The tiny reference checkpoint through the public loader."""
    return load_codec(reference_dir / "codec_tiny_ckpt.pkl", reference_dir / "codec_tiny_config.yaml")


@functools.cache
def random_codec(reference_dir: Path, seed: int = 1234) -> SG2Codec:
    """A tiny codec with weights from our own random builder."""
    return build_random_codec(tiny_config(reference_dir), seed=seed)


@functools.cache
def speech(reference_dir: Path, name: str) -> torch.Tensor:
    """Real speech at 24 kHz, cut to whole 960-sample frames, shaped (1, 1, N) float32."""
    data, rate = sf.read(str(reference_dir / "audio" / name), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != 24000:
        mono = soxr.resample(mono, rate, 24000).astype(np.float32)
    n = (len(mono) // FRAME) * FRAME
    return torch.from_numpy(np.ascontiguousarray(mono[:n])).view(1, 1, n)


def stream_encode(codec: SG2Codec, audio: torch.Tensor, chunk: int) -> torch.Tensor:
    """Whole signal (B, 1, N) through a fresh streaming encoder, `chunk` samples per call."""
    enc = codec.streaming_encoder(audio.shape[0])
    return torch.cat([enc.step(audio[:, :, s : s + chunk]) for s in range(0, audio.shape[-1], chunk)], dim=-1)


def stream_decode(codec: SG2Codec, tokens: torch.Tensor, frames_per_call: int = 1) -> torch.Tensor:
    """Tokens (3, B, T) through a fresh streaming decoder, `frames_per_call` frames per call."""
    dec = codec.streaming_decoder(tokens.shape[1])
    t = tokens.shape[-1]
    return torch.cat(
        [dec.step(tokens[:, :, s : s + frames_per_call]) for s in range(0, t, frames_per_call)], dim=-1
    )
