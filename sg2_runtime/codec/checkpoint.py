"""Released checkpoint format: safe loading, strict validation, random checkpoints.

The released `sg2_codec_ckpt.pkl` is a `torch.save`d flat dict of float tensors whose keys are
those of the reference module tree (weight-normalised layers as `...parametrizations.weight.
original0/1`, plus registered buffers such as `pad_buffer`, mel `window`/`melmat` and the VQ
`inited`/`cluster_size`/`embed`/`embed_avg`). We read it with `weights_only=True` (no code is
ever executed), check it against the keys and shapes the config implies before touching any
weight, and refuse anything else with a message that names the offending entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import CodecConfig
from .layers import WN_G, WN_V
from .mel import mel_filterbank
from .model import CodecModel

_MAX_LISTED = 8


class CodecCheckpointError(ValueError):
    """The checkpoint cannot be used with this config (unsafe, malformed or mismatched)."""


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """`torch.load(..., weights_only=True)` plus a check that it is a flat dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise CodecCheckpointError(f"codec checkpoint {path} does not exist")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises several types; all mean "refused"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CodecCheckpointError(
            f"codec checkpoint {path} cannot be loaded with weights_only=True (it is not a plain "
            f"tensor state dict, or it holds non-tensor objects): {first}"
        ) from exc
    return check_tensor_dict(obj, str(path))


def check_tensor_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """Refuse anything but a mapping of str -> floating-point Tensor."""
    if not isinstance(obj, Mapping):
        raise CodecCheckpointError(
            f"codec {source}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}"
        )
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in obj.items()
        if not isinstance(k, str) or not isinstance(v, Tensor)
    ]
    if bad:
        raise CodecCheckpointError(f"codec {source}: non-tensor entries in the state dict: {_listing(bad)}")
    not_float = [f"{k} ({v.dtype})" for k, v in obj.items() if not v.is_floating_point()]
    if not_float:
        raise CodecCheckpointError(
            f"codec {source}: entries that are not floating point: {_listing(not_float)}"
        )
    return dict(obj)


def released_shapes(config: CodecConfig) -> dict[str, tuple[int, ...]]:
    """All keys and shapes of a released checkpoint for `config` (built on the meta device)."""
    with torch.device("meta"):
        model = CodecModel(config)
    return model.released_shapes()


def validate_state_dict(
    sd: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], config_name: str = "the config"
) -> None:
    """Raise :class:`CodecCheckpointError` listing missing, unexpected and mis-shaped entries."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} (checkpoint {list(sd[k].shape)}, expected {list(shape)})"
        for k, shape in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {_listing(wrong)}")
    if problems:
        raise CodecCheckpointError(
            f"codec checkpoint does not match {config_name} ({len(expected)} entries expected): "
            + "; ".join(problems)
        )


def build_model(
    config: CodecConfig,
    state_dict: Mapping[str, Tensor],
    device: torch.device,
    dtype: torch.dtype,
    config_name: str = "the config",
) -> CodecModel:
    """Validate, fold weight norm once, move/cast and pack: an eval-mode inference model."""
    sd = check_tensor_dict(state_dict)
    validate_state_dict(sd, released_shapes(config), config_name)  # before allocating anything
    model = CodecModel(config)
    model.load_released(sd)
    return model.to_runtime(device, dtype)


def build_random_codec_checkpoint(config: CodecConfig, seed: int = 0) -> dict[str, Tensor]:
    """A random-weight state dict in the released format for any config (tests, benchmarks).

    Scales are chosen so activations stay O(1) through the network: weight-normalised weights get
    unit-norm rows, layer scales and ConvNeXt gammas 0.1, LayerNorms near identity. Codebooks are
    then fitted to the random encoder: each stage's codewords are drawn around the per-dimension
    mean/spread of that stage's residual on a synthetic calibration signal, so tokens vary with
    the audio instead of collapsing onto a few codewords (which would make token tests vacuous).
    """
    gen = torch.Generator().manual_seed(seed)
    mel = config.mel_kwargs

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    out: dict[str, Tensor] = {}
    for key, shape in released_shapes(config).items():
        if key == "mel_transform.window":
            value = torch.hann_window(mel.window_length)
        elif key == "mel_transform.melmat":
            value = mel_filterbank(mel.fs, mel.fft_size, mel.num_mels, mel.fmin, mel.fmax)
        elif key.endswith("pad_buffer"):
            value = torch.zeros(shape)
        elif key.endswith(WN_G):
            value = normal(shape, 0.05, 1.0)
        elif key.endswith(WN_V):
            value = normal(shape, 1.0)
        elif key.endswith("in_proj_weight"):
            value = normal(shape, 1.0 / math.sqrt(shape[1]))
        elif key.endswith((".inited", ".cluster_size")):
            value = torch.ones(shape)
        elif key.endswith(".embed"):
            value = normal(shape, 1.0)  # replaced by _fit_codebooks
        elif key.endswith(".embed_avg"):
            continue  # copied from embed below
        elif key.endswith((".gamma", ".scale")):
            value = normal(shape, 0.02, 0.1)
        elif key.endswith(".weight"):  # LayerNorm gains
            value = normal(shape, 0.05, 1.0)
        elif key.endswith(".bias"):
            value = normal(shape, 0.02)
        else:  # pragma: no cover - guards against a new key kind slipping through
            raise CodecCheckpointError(f"random checkpoint: no rule for key {key}")
        out[key] = value.float().contiguous()
    _fit_codebooks(config, out, gen)
    for key in list(out):
        if key.endswith(".embed"):
            out[key[: -len("embed")] + "embed_avg"] = out[key].clone()
    expected = released_shapes(config)
    return {k: out[k] for k in expected}


@torch.no_grad()
def _fit_codebooks(config: CodecConfig, sd: dict[str, Tensor], gen: torch.Generator) -> None:
    """Draw each RVQ stage's codewords around the statistics of its residual (see caller)."""
    model = CodecModel(config)
    model.load_released(sd)
    model.to_runtime(torch.device("cpu"), torch.float32)
    rate, n = config.sample_rate, config.frame_samples * 100
    t = torch.arange(n, dtype=torch.float32) / rate
    tone = sum(
        torch.sin(2 * math.pi * f * t * (1 + 0.3 * torch.sin(2 * math.pi * 0.7 * t))) for f in (140, 310, 900)
    )
    noise = torch.randn(n, generator=gen) * 0.05
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 1.3 * t).abs()
    audio = (0.1 * tone + noise) * envelope
    residual = model.latent(audio.view(1, -1)).reshape(-1, config.quantizer_kwargs.code_dim).float()
    vq = model.quantizer
    for i, lin in enumerate(vq.codebooks):
        mean, spread = residual.mean(0), residual.std(0) + 1e-6
        embed = mean + 0.7 * spread * torch.randn(vq.size, vq.dim, generator=gen)
        sd[f"quantizer.codebook.layers.{i}.embed"] = embed.contiguous()
        lin.weight.copy_(embed)
        lin.prepare()
        vq.embed_sq[i].copy_(embed.t().pow(2).sum(0, keepdim=True))
        dist = residual.pow(2).sum(1, keepdim=True) - 2 * lin(residual) + vq.embed_sq[i]
        residual = residual - embed[dist.argmin(dim=-1)]


def save_codec_checkpoint(state_dict: Mapping[str, Tensor], path: str | Path) -> None:
    """Write a state dict exactly as the released checkpoint is stored (`torch.save` of a dict)."""
    sd = check_tensor_dict(state_dict)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, path)
