"""`SG2Codec`: the public codec object (whole-utterance and streaming), and `load_codec`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import CodecCheckpointError, build_model, load_state_dict_file
from .config import CodecConfig, CodecConfigError
from .model import CodecModel, Intermediates
from .streaming import StreamingDecoder, StreamingEncoder

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SG2Codec:
    """24 kHz audio <-> (n_q=3, batch, frames) tokens at 25 frames/s.

    Whole-utterance `encode`/`decode` and slot-batched streaming (`streaming_encoder`,
    `streaming_decoder`). Built by :func:`load_codec`; weights are folded, cast and packed once.
    """

    def __init__(self, model: CodecModel, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.config: CodecConfig = model.config
        self.device = device
        self.dtype = dtype
        self.sample_rate = self.config.sample_rate
        self.frame_samples = self.config.frame_samples
        self.frame_rate = self.sample_rate / self.frame_samples
        self.n_q = self.config.n_q
        self.codebook_size = self.config.codebook_size
        self.hop_samples = self.config.mel_kwargs.hop_size

    def __repr__(self) -> str:
        return (
            f"SG2Codec(sample_rate={self.sample_rate}, frame_samples={self.frame_samples}, n_q={self.n_q}, "
            f"codebook_size={self.codebook_size}, device={self.device}, dtype={self.dtype})"
        )

    def num_frames(self, num_samples: int) -> int:
        """Token frames `encode` returns for `num_samples` samples: ceil((N // 240) / 4)."""
        return -(-(num_samples // self.hop_samples) // self.config.downsample_stride)

    def check_tokens(self, tokens: Tensor, batch: int | None = None) -> Tensor:
        """Validate a (n_q, batch, frames) integer token tensor and move it to the device."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[0] != self.n_q:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be ({self.n_q}, batch, frames), got {shape}")
        if batch is not None and tokens.shape[1] != batch:
            raise ValueError(f"tokens must cover {batch} slots on dim 1, got {tokens.shape[1]}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
        tokens = tokens.to(device=self.device, dtype=torch.long)
        if tokens.numel() and bool(((tokens < 0) | (tokens >= self.codebook_size)).any()):
            raise ValueError(f"token values must lie in [0, {self.codebook_size - 1}]")
        return tokens

    @torch.no_grad()
    def encode(
        self, audio: Tensor, *, return_intermediates: bool = False
    ) -> Tensor | tuple[Tensor, Intermediates]:
        """Whole utterance: audio (B, 1, N) float in [-1, 1] -> tokens (n_q, B, T) int64.

        T = ceil((N // 240) / 4): every complete 960-sample frame gives one token frame, exactly
        the tokens streaming gives; a trailing partial frame of at least one 240-sample hop gives
        one more frame whose missing 100 Hz steps are the last one repeated (the reference's
        offline behaviour); fewer than 240 trailing samples are ignored.
        With `return_intermediates=True` also returns the encoder's activations
        (mel, encoder_convnext, encoder_transformer, down_sample_1, z) as (B, C, time) float32.
        """
        if not isinstance(audio, Tensor) or audio.dim() != 3 or audio.shape[1] != 1:
            shape = tuple(audio.shape) if isinstance(audio, Tensor) else type(audio).__name__
            raise ValueError(f"audio must be (batch, 1, samples), got {shape}")
        x = audio.reshape(audio.shape[0], -1).to(device=self.device, dtype=torch.float32)
        store: Intermediates | None = {} if return_intermediates else None
        if self.num_frames(x.shape[-1]) == 0:
            tokens = torch.zeros(self.n_q, x.shape[0], 0, dtype=torch.long, device=self.device)
        else:
            tokens = self.model.encode(x, store)
        return (tokens, store) if store is not None else tokens

    @torch.no_grad()
    def decode(
        self, tokens: Tensor, *, return_intermediates: bool = False
    ) -> Tensor | tuple[Tensor, Intermediates]:
        """Whole utterance: tokens (n_q, B, T) -> audio (B, 1, T * 960) float32.

        With `return_intermediates=True` also returns the decoder's activations (zq,
        post_projector, vq_transformer, post_projector_of_vq_transformer, up_sample_1,
        up_sample_2, decoder_transformer, decoder_convnext) as (B, C, time) float32.
        """
        tokens = self.check_tokens(tokens)
        b, t = tokens.shape[1], tokens.shape[2]
        store: Intermediates | None = {} if return_intermediates else None
        if t == 0:
            audio = torch.zeros(b, 1, 0, device=self.device)
        else:
            audio = self.model.decode(tokens, store).view(b, 1, -1)
        return (audio, store) if store is not None else audio

    def streaming_encoder(self, num_slots: int = 1) -> StreamingEncoder:
        """Per-slot streaming encoder; every slot starts fresh."""
        return StreamingEncoder(self, num_slots)

    def streaming_decoder(self, num_slots: int = 1) -> StreamingDecoder:
        """Per-slot streaming decoder; every slot starts fresh."""
        return StreamingDecoder(self, num_slots)


def load_codec(
    checkpoint: str | Path | Mapping[str, Tensor],
    config: str | Path | CodecConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SG2Codec:
    """Load a released-format codec checkpoint (path or state dict) with its YAML config.

    The checkpoint is read with `weights_only=True`; its keys and shapes must be exactly those the
    config implies (else :class:`CodecCheckpointError` naming the entries). Weight normalisation is
    folded once; the model is cast to `dtype` except the float32-pinned parts (mel, codebooks,
    output conv) and put in eval mode.
    """
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {_SUPPORTED_DTYPES}, got {dtype}")
    device = torch.device(device)
    if isinstance(config, CodecConfig):
        cfg, cfg_name = config, "the given config"
    else:
        try:
            cfg = CodecConfig.from_yaml(config)
        except (CodecConfigError, OSError) as exc:
            raise CodecCheckpointError(f"cannot read codec config: {exc}") from exc
        cfg_name = f"config {config}"
    sd = checkpoint if isinstance(checkpoint, Mapping) else load_state_dict_file(checkpoint)
    model = build_model(cfg, sd, device, dtype, cfg_name)
    return SG2Codec(model, device, dtype)
