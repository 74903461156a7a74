"""Codec configurations built in code: the released architecture ("sg2") and a tiny one ("tiny").

Tests, benchmarks and ``sg2 serve --preset tiny-random`` need a codec config without any
download; real deployments load the released YAML next to the checkpoint instead. Both paths
produce the same :class:`CodecConfig` schema (the released YAML's section names).
"""

from __future__ import annotations

from typing import Any

from .config import CodecConfig


def _transformer(d: int, heads: int, layers: int, ffn: int, context: int) -> dict[str, Any]:
    return {
        "d_model": d,
        "num_heads": heads,
        "num_layers": layers,
        "causal": True,
        "layer_scale": 0.01,
        "context": context,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": ffn,
        "input_dimension": d,
        "output_dimensions": [d],
    }


def _convnext(channels_in: int, dims: list[int], depths: list[int]) -> dict[str, Any]:
    return {
        "input_channels": channels_in,
        "depths": depths,
        "dims": dims,
        "drop_path_rate": 0.0,
        "kernel_size": 7,
        "padding_mode": "zeros",
    }


def _config(
    *,
    mels: int,
    enc_dims: list[int],
    depths: list[int],
    d: int,
    d_vq: int,
    heads: int,
    layers: int,
    hifigan_channels: int,
) -> dict[str, Any]:
    return {
        "mel_kwargs": {
            "fs": 24000,
            "fft_size": 1024,
            "hop_size": 240,
            "win_length": None,
            "window": "hann_window",
            "num_mels": mels,
            "fmin": 0,
            "fmax": None,
            "normalized": False,
            "onesided": True,
            "eps": 1.0e-10,
            "log_base": None,
        },
        "encoder_convnext_kwargs": _convnext(mels, enc_dims, depths),
        "encoder_transformer_kwargs": _transformer(d, heads, layers, 4 * d, 500),
        "encoder_extra_down_sample_kwargs": {"stride": 2, "dimension": d, "learnt": True, "causal": True},
        "quantizer_type": "residual_vq",
        "quantizer_kwargs": {
            "train_codebook": True,
            "code_dim": d,
            "codebook_num": 3,
            "codebook_size": 1024,
            "kmeans_init": True,
            "kmeans_iters": 10,
            "decay": 0.99,
            "threshold_ema_dead_code": 0.5,
        },
        "post_projecter_kwargs": {
            "input_channels": d,
            "output_channels": d_vq,
            "stride": 1,
            "bias": False,
            "model": "conv1d",
        },
        "vq_transformer_kwargs": _transformer(d_vq, heads, layers, 4 * d_vq, 125),
        "post_projecter_of_vq_transformer_kwargs": {
            "input_channels": d_vq,
            "output_channels": d,
            "stride": 1,
            "bias": False,
            "model": "conv1d",
        },
        "decoder_extra_up_sample_kwargs": {
            "in_channels": d,
            "out_channels": d,
            "kernel_size": 4,
            "stride": 2,
            "bias": False,
        },
        "decoder_transformer_kwargs": _transformer(d, heads, layers, 4 * d, 500),
        "decoder_convnext_kwargs": _convnext(d, [d] * 4, depths),
        "decoder_hifigan_kwargs": {
            "in_channels": d,
            "channels": hifigan_channels,
            "kernel_size": 7,
            "upsample_scales": [5, 4, 4, 3],
            "upsample_kernel_sizes": [10, 8, 8, 6],
            "resblock_kernel_sizes": [11],
            "resblock_dilations": [[1, 3, 5]],
            "groups": 3,
            "bias": True,
            "use_additional_convs": True,
            "nonlinear_activation": "LeakyReLU",
            "nonlinear_activation_params": {"negative_slope": 0.1},
            "stats": None,
        },
        "mode": "causal",
        "use_weight_norm": True,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # The released SpeechGPT 2.0 codec (237.5 M parameters).
    "sg2": dict(
        mels=128,
        enc_dims=[128, 256, 384, 512],
        depths=[3, 3, 9, 3],
        d=512,
        d_vq=1024,
        heads=8,
        layers=8,
        hifigan_channels=512,
    ),
    # Same architecture, a few thousand times cheaper: tests and the tiny-random preset.
    "tiny": dict(
        mels=32,
        enc_dims=[16, 16, 24, 32],
        depths=[1, 1, 2, 1],
        d=32,
        d_vq=48,
        heads=2,
        layers=2,
        hifigan_channels=48,
    ),
}


def codec_preset(name: str) -> CodecConfig:
    """The :class:`CodecConfig` of a named preset ("sg2" or "tiny")."""
    if name not in PRESETS:
        raise ValueError(f"unknown codec preset {name!r}; choose from {sorted(PRESETS)}")
    return CodecConfig.from_dict({"generator_params": _config(**PRESETS[name])})
