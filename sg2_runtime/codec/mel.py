"""Causal log-mel front end (100 Hz at 24 kHz), always computed in float32.

Each frame is the FFT of the `fft_size` samples ending at its hop, so a frame never looks
ahead; the first `win - hop` samples of left context are the utterance's first sample repeated
(the reference's replicate padding). Streaming keeps the last `win - hop` samples per slot.
Magnitudes are clamped at `eps` before the square root and again after the mel projection,
then the (natural by default) log is taken.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from .config import MelConfig
from .kernels import Linear
from .layers import ReleasedLayer
from .state import StateSpec, StepContext

REF = "mel_transform"


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's default)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    freq = np.asarray(freq, dtype=np.float64)
    log_part = min_log_mel + np.log(np.maximum(freq, min_log_hz) / min_log_hz) / logstep
    return np.where(freq >= min_log_hz, log_part, freq / f_sp)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mels = np.asarray(mels, dtype=np.float64)
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> Tensor:
    """Slaney-normalised triangular filters, (n_fft//2 + 1, n_mels) float32.

    Same construction as librosa's default `filters.mel` (which produced the released `melmat`);
    only needed to build random checkpoints — real ones carry their `melmat`.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return torch.from_numpy(weights.T.copy())


class MelFrontend(ReleasedLayer):
    KEEP_FLOAT32 = ("window",)

    def __init__(self, cfg: MelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_fft, self.hop, self.pad = cfg.fft_size, cfg.hop_size, cfg.pad_length
        self.n_bins = cfg.fft_size // 2 + 1
        self.register_buffer("window", torch.hann_window(cfg.window_length))
        self.proj = Linear(self.n_bins, cfg.num_mels, bias=False)  # weight = melmat^T
        self.proj.keep_float32 = True
        self._log = {None: torch.log, 2.0: torch.log2, 10.0: torch.log10}[cfg.log_base]

    def released_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            f"{REF}.window": (self.cfg.window_length,),
            f"{REF}.melmat": (self.n_bins, self.cfg.num_mels),
            f"{REF}.pad_buffer": (1, self.pad),
        }

    def load_released(self, sd: Mapping[str, Tensor]) -> None:
        self.window.copy_(sd[f"{REF}.window"])
        self.proj.weight.copy_(sd[f"{REF}.melmat"].t())

    def export_released(self) -> dict[str, Tensor]:
        return {
            f"{REF}.window": self.window.float().clone(),
            f"{REF}.melmat": self.proj.weight.float().t().contiguous(),
            f"{REF}.pad_buffer": torch.zeros(1, self.pad),
        }

    def state_specs(self) -> dict[str, StateSpec]:
        return {f"{REF}.ctx": StateSpec((self.pad,), float32=True)}

    def _log_mel(self, signal: Tensor) -> Tensor:
        """(B, L) left-padded signal -> (B, frames, n_mels) float32."""
        frames = signal.unfold(-1, self.n_fft, self.hop) * self.window
        spec = torch.fft.rfft(frames, n=self.n_fft)
        power = spec.real**2 + spec.imag**2
        amp = torch.sqrt(torch.clamp(power, min=self.cfg.eps))
        return self._log(torch.clamp(self.proj(amp), min=self.cfg.eps))

    def forward(self, audio: Tensor) -> Tensor:
        """Whole utterance (B, N) -> (B, N // hop, n_mels): one frame per complete hop."""
        x = audio.float()
        n_frames = x.shape[-1] // self.hop
        if n_frames == 0:
            return x.new_zeros(x.shape[0], 0, self.cfg.num_mels)
        padded = torch.cat([x[:, :1].expand(-1, self.pad), x], dim=1)
        return self._log_mel(padded)[:, :n_frames]

    def step(self, audio: Tensor, ctx: StepContext) -> Tensor:
        """Streaming (n, N) with N a multiple of hop -> (n, N // hop, n_mels)."""
        x = audio.float()
        key = f"{REF}.ctx"
        buf = ctx.replicate_first_if_fresh(ctx.read(key), x)
        signal = torch.cat([buf, x], dim=1)
        ctx.write(key, signal[:, signal.shape[1] - self.pad :])
        return self._log_mel(signal)
