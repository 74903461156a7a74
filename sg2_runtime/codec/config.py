"""Codec configuration: the released YAML (`generator_params: ...`) as typed dataclasses.

The YAML format is the one shipped with the real checkpoint (`sg2_codec_config.yaml`), so a
released config loads unchanged. Only the variant the released model uses is implemented
(causal mode, residual VQ, RoPE transformers without gating, learnt causal resamplers, grouped
HiFi-GAN residual blocks); anything else is refused here with a message naming the field, rather
than failing later with a shape error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class CodecConfigError(ValueError):
    """The configuration is malformed or asks for a variant this runtime does not implement."""


@dataclass(frozen=True)
class MelConfig:
    fs: int = 24000
    fft_size: int = 1024
    hop_size: int = 240
    win_length: int | None = None
    window: str = "hann_window"
    num_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None
    normalized: bool = False
    onesided: bool = True
    eps: float = 1e-10
    log_base: float | None = None

    @property
    def window_length(self) -> int:
        return self.fft_size if self.win_length is None else self.win_length

    @property
    def pad_length(self) -> int:
        """Left context (samples) each STFT frame needs before the first hop: win - hop."""
        return self.window_length - self.hop_size


@dataclass(frozen=True)
class ConvNeXtConfig:
    input_channels: int
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    drop_path_rate: float = 0.0
    kernel_size: int = 7
    padding_mode: str = "zeros"
    layer_scale_init_value: float = 1e-6


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    input_dimension: int
    output_dimensions: tuple[int, ...]
    causal: bool = True
    layer_scale: float | None = 0.01
    context: int | None = None
    conv_layout: bool = True
    max_period: float = 10000.0
    gating: str = "none"
    norm: str = "layer_norm"
    positional_embedding: str = "rope"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


@dataclass(frozen=True)
class DownsampleConfig:
    stride: int
    dimension: int
    learnt: bool = True
    causal: bool = True
    channel_wise: bool = False


@dataclass(frozen=True)
class QuantizerConfig:
    code_dim: int
    codebook_num: int
    codebook_size: int
    train_codebook: bool = True
    kmeans_init: bool = True
    kmeans_iters: int = 10
    decay: float = 0.99
    threshold_ema_dead_code: float = 0.5


@dataclass(frozen=True)
class ProjectorConfig:
    input_channels: int
    output_channels: int
    stride: int = 1
    bias: bool = False
    model: str = "conv1d"


@dataclass(frozen=True)
class UpsampleConfig:
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    bias: bool = False


@dataclass(frozen=True)
class HiFiGANConfig:
    in_channels: int
    channels: int
    kernel_size: int
    upsample_scales: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilations: tuple[tuple[int, ...], ...]
    groups: int = 1
    bias: bool = True
    use_additional_convs: bool = True
    nonlinear_activation: str = "LeakyReLU"
    nonlinear_activation_params: dict[str, float] = field(default_factory=lambda: {"negative_slope": 0.1})
    stats: Any = None

    @property
    def negative_slope(self) -> float:
        return float(self.nonlinear_activation_params.get("negative_slope", 0.01))

    @property
    def upsample_factor(self) -> int:
        return math.prod(self.upsample_scales)


@dataclass(frozen=True)
class CodecConfig:
    """All of `generator_params`; field names follow the released YAML keys."""

    mel_kwargs: MelConfig
    encoder_convnext_kwargs: ConvNeXtConfig
    encoder_transformer_kwargs: TransformerConfig
    encoder_extra_down_sample_kwargs: DownsampleConfig
    quantizer_type: str
    quantizer_kwargs: QuantizerConfig
    post_projecter_kwargs: ProjectorConfig
    vq_transformer_kwargs: TransformerConfig
    post_projecter_of_vq_transformer_kwargs: ProjectorConfig
    decoder_extra_up_sample_kwargs: UpsampleConfig
    decoder_transformer_kwargs: TransformerConfig
    decoder_convnext_kwargs: ConvNeXtConfig
    decoder_hifigan_kwargs: HiFiGANConfig
    mode: str = "causal"
    use_weight_norm: bool = True

    # ---- derived facts the runtime relies on ----
    @property
    def sample_rate(self) -> int:
        return int(self.mel_kwargs.fs)

    @property
    def downsample_stride(self) -> int:
        """Time reduction of the two learnt resamplers together (100 Hz -> 25 Hz: 4)."""
        return self.encoder_extra_down_sample_kwargs.stride**2

    @property
    def frame_samples(self) -> int:
        """Audio samples per token frame (960 = 40 ms at 24 kHz)."""
        return self.mel_kwargs.hop_size * self.downsample_stride

    @property
    def n_q(self) -> int:
        return self.quantizer_kwargs.codebook_num

    @property
    def codebook_size(self) -> int:
        return self.quantizer_kwargs.codebook_size

    # ---- construction ----
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecConfig:
        """Build from the parsed YAML (with or without the top-level `generator_params`)."""
        if not isinstance(data, dict):
            raise CodecConfigError(f"codec config must be a mapping, got {type(data).__name__}")
        params = data.get("generator_params", data)
        if not isinstance(params, dict):
            raise CodecConfigError("codec config: `generator_params` must be a mapping")
        sections = {
            "mel_kwargs": MelConfig,
            "encoder_convnext_kwargs": ConvNeXtConfig,
            "encoder_transformer_kwargs": TransformerConfig,
            "encoder_extra_down_sample_kwargs": DownsampleConfig,
            "quantizer_kwargs": QuantizerConfig,
            "post_projecter_kwargs": ProjectorConfig,
            "vq_transformer_kwargs": TransformerConfig,
            "post_projecter_of_vq_transformer_kwargs": ProjectorConfig,
            "decoder_extra_up_sample_kwargs": UpsampleConfig,
            "decoder_transformer_kwargs": TransformerConfig,
            "decoder_convnext_kwargs": ConvNeXtConfig,
            "decoder_hifigan_kwargs": HiFiGANConfig,
        }
        kwargs: dict[str, Any] = {}
        for name, section_cls in sections.items():
            if name not in params:
                raise CodecConfigError(f"codec config: missing section `{name}`")
            kwargs[name] = _build_section(name, section_cls, params[name])
        for name in ("quantizer_type", "mode", "use_weight_norm"):
            if name in params:
                kwargs[name] = params[name]
        if "quantizer_type" not in kwargs:
            raise CodecConfigError("codec config: missing `quantizer_type`")
        unknown = set(params) - set(sections) - {"quantizer_type", "mode", "use_weight_norm"}
        if unknown:
            raise CodecConfigError(f"codec config: unknown keys {sorted(unknown)}")
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> CodecConfig:
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise CodecConfigError(f"codec config {path}: not valid YAML: {exc}") from exc
        try:
            return cls.from_dict(data)
        except CodecConfigError as exc:
            raise CodecConfigError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The YAML structure (`{"generator_params": {...}}`), lists instead of tuples."""

        def plain(value: Any) -> Any:
            if isinstance(value, tuple | list):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        params: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                params[f.name] = {k: plain(v) for k, v in dataclasses.asdict(value).items()}
            else:
                params[f.name] = value
        return {"generator_params": params}

    def to_yaml(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    def validate(self) -> None:
        """Refuse variants that the released model does not use (and we do not implement)."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise CodecConfigError(f"codec config: {msg}")

        need(self.mode == "causal", f"mode={self.mode!r}: only 'causal' is supported")
        need(self.use_weight_norm is True, "use_weight_norm must be true (released checkpoint format)")
        need(self.quantizer_type == "residual_vq", f"quantizer_type={self.quantizer_type!r} unsupported")
        mel = self.mel_kwargs
        need(mel.window == "hann_window", f"mel window {mel.window!r} unsupported")
        need(mel.log_base in (None, 2.0, 10.0), f"mel log_base {mel.log_base!r} unsupported")
        need(mel.window_length == mel.fft_size, "mel win_length must equal fft_size")
        need(mel.pad_length >= 0, "mel hop_size larger than the window")
        ce, cd = self.encoder_convnext_kwargs, self.decoder_convnext_kwargs
        need(ce.input_channels == mel.num_mels, "encoder_convnext input_channels must equal num_mels")
        for name, c in (("encoder_convnext", ce), ("decoder_convnext", cd)):
            need(len(c.depths) == len(c.dims) and len(c.dims) > 0, f"{name}: depths/dims length mismatch")
            need(c.padding_mode == "zeros", f"{name}: padding_mode must be 'zeros'")
            need(c.layer_scale_init_value > 0, f"{name}: layer scale must be enabled")
        for name, t in (
            ("encoder_transformer", self.encoder_transformer_kwargs),
            ("vq_transformer", self.vq_transformer_kwargs),
            ("decoder_transformer", self.decoder_transformer_kwargs),
        ):
            need(t.causal, f"{name}: only causal transformers are supported")
            need(t.gating == "none", f"{name}: gating {t.gating!r} unsupported")
            need(t.norm == "layer_norm", f"{name}: norm {t.norm!r} unsupported")
            need(t.positional_embedding == "rope", f"{name}: positional_embedding must be 'rope'")
            need(t.conv_layout, f"{name}: conv_layout must be true")
            need(t.context is not None and t.context > 0, f"{name}: a finite attention context is required")
            need(t.d_model % t.num_heads == 0 and t.head_dim % 2 == 0, f"{name}: bad head dimension")
            need(len(t.output_dimensions) == 1, f"{name}: exactly one output dimension is supported")
        down = self.encoder_extra_down_sample_kwargs
        need(
            down.learnt and down.causal and not down.channel_wise,
            "down-sampler must be learnt, causal, dense",
        )
        need(down.dimension == ce.dims[-1], "down-sampler dimension must equal the encoder width")
        q = self.quantizer_kwargs
        need(q.code_dim == down.dimension, "quantizer code_dim must equal the encoder width")
        for name, p in (
            ("post_projecter", self.post_projecter_kwargs),
            ("post_projecter_of_vq_transformer", self.post_projecter_of_vq_transformer_kwargs),
        ):
            need(p.model == "conv1d" and p.stride == 1, f"{name}: only model=conv1d, stride=1 supported")
        up = self.decoder_extra_up_sample_kwargs
        need(up.kernel_size == 2 * up.stride, "decoder up-sampler kernel_size must be 2*stride")
        need(up.in_channels == up.out_channels, "decoder up-sampler must keep the channel count")
        need(up.stride == down.stride, "decoder up-sampler stride must mirror the down-sampler")
        h = self.decoder_hifigan_kwargs
        need(h.kernel_size % 2 == 1, "hifigan kernel_size must be odd")
        need(
            len(h.upsample_scales) == len(h.upsample_kernel_sizes), "hifigan upsample lists differ in length"
        )
        need(
            all(k == 2 * s for k, s in zip(h.upsample_kernel_sizes, h.upsample_scales, strict=True)),
            "hifigan upsample_kernel_sizes must be 2*upsample_scales",
        )
        need(
            len(h.resblock_kernel_sizes) == 1 and len(h.resblock_dilations) == 1 and h.groups > 1,
            "hifigan: only the grouped residual block (one kernel size, groups > 1) is supported",
        )
        need(h.resblock_kernel_sizes[0] % 2 == 1, "hifigan resblock kernel size must be odd")
        need(h.nonlinear_activation == "LeakyReLU", "hifigan activation must be LeakyReLU")
        need(h.stats is None, "hifigan input statistics are not supported")
        need(h.channels % (2 ** len(h.upsample_scales)) == 0, "hifigan channels not divisible")
        need(
            h.upsample_factor == mel.hop_size,
            f"hifigan upsampling {h.upsample_factor} must equal the mel hop {mel.hop_size}",
        )


def _build_section(name: str, section_cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise CodecConfigError(f"codec config: section `{name}` must be a mapping")
    known = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise CodecConfigError(f"codec config: `{name}` has unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        values[key] = value
    try:
        return section_cls(**values)
    except TypeError as exc:
        raise CodecConfigError(f"codec config: `{name}`: {exc}") from exc
