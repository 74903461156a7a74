"""Model configuration of the speech-text LM, read from an unchanged checkpoint directory.

The checkpoint's ``config.json`` is a Qwen2 config plus ``speech_vocab_size``, ``n_vq`` and
``group_size``. The patch decoder ("local transformer") sizes are not part of it in the released
checkpoint; they come from an optional ``mimo_args.json`` (keys ``local_dim``, ``local_layers``,
``local_attn_heads``, ``local_ffn_dim``) and otherwise default to the released model's sizes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# Sizes of the released patch decoder, used when a checkpoint directory does not override them.
DEFAULT_LOCAL_DIM = 1024
DEFAULT_LOCAL_LAYERS = 8
DEFAULT_LOCAL_HEADS = 16
DEFAULT_LOCAL_FFN = 4096

LOCAL_OVERRIDE_FILES = ("mimo_args.json", "local_transformer.json")


class LMConfigError(ValueError):
    """The checkpoint's configuration is missing a field or describes an unsupported model."""


@dataclass(frozen=True)
class LMConfig:
    """Everything needed to build the backbone, the patch decoder and the speech embeddings."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    speech_vocab_size: int = 1025
    n_vq: int = 3
    group_size: int = 3
    local_dim: int = DEFAULT_LOCAL_DIM
    local_layers: int = DEFAULT_LOCAL_LAYERS
    local_heads: int = DEFAULT_LOCAL_HEADS
    local_ffn_dim: int = DEFAULT_LOCAL_FFN
    eos_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise LMConfigError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.num_heads % self.num_kv_heads:
            raise LMConfigError(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads} KV heads")
        if self.local_dim % self.local_heads:
            raise LMConfigError(f"local_dim {self.local_dim} is not divisible by {self.local_heads} heads")
        if self.speech_vocab_size < 2:
            raise LMConfigError("speech_vocab_size must be at least 2 (codes plus the zero-embedding index)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def local_head_dim(self) -> int:
        return self.local_dim // self.local_heads

    @property
    def zero_speech_id(self) -> int:
        """The speech index whose embedding is the zero vector ("no speech here"): the last one."""
        return self.speech_vocab_size - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> LMConfig:
        data = self.to_dict()
        unknown = set(changes) - set(data)
        if unknown:
            raise LMConfigError(f"unknown LM config fields: {sorted(unknown)}")
        data.update(changes)
        return LMConfig(**data)

    # -- checkpoint-directory format ---------------------------------------------------------------
    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` content a checkpoint directory for this model carries."""
        return {
            "architectures": ["MIMOLlamaForCausalLM"],
            "model_type": "qwen2",
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": 32768,
            "max_window_layers": self.num_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "sliding_window": None,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "vocab_size": self.vocab_size,
            "speech_vocab_size": self.speech_vocab_size,
            "n_vq": self.n_vq,
            "group_size": self.group_size,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype or "float32",
            "use_cache": True,
        }

    def local_overrides(self) -> dict[str, Any]:
        """The ``mimo_args.json`` content that carries the patch-decoder sizes."""
        return {
            "speech_vocab_size": self.speech_vocab_size,
            "n_vq": self.n_vq,
            "group_size": self.group_size,
            "local_dim": self.local_dim,
            "local_layers": self.local_layers,
            "local_attn_heads": self.local_heads,
            "local_ffn_dim": self.local_ffn_dim,
        }

    @classmethod
    def from_dir(cls, model_dir: str | Path, **overrides: Any) -> LMConfig:
        """Read ``config.json`` (+ optional ``mimo_args.json``) of a checkpoint directory."""
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.is_file():
            raise LMConfigError(f"{model_dir} has no config.json")
        raw = json.loads(path.read_text())
        local: dict[str, Any] = {}
        for name in LOCAL_OVERRIDE_FILES:
            extra = model_dir / name
            if extra.is_file():
                local.update(json.loads(extra.read_text()))
                break
        return cls.from_hf_dict(raw, local, **overrides)

    @classmethod
    def from_hf_dict(
        cls, raw: dict[str, Any], local: dict[str, Any] | None = None, **overrides: Any
    ) -> LMConfig:
        local = dict(local or {})
        model_type = raw.get("model_type")
        if model_type not in (None, "qwen2"):
            raise LMConfigError(f"expected a qwen2 backbone config, got model_type={model_type!r}")
        if raw.get("rope_scaling") not in (None, {}):
            raise LMConfigError(f"rope_scaling={raw['rope_scaling']!r} is not supported")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise LMConfigError(f"rope type {rope.get('rope_type')!r} is not supported")
        if raw.get("use_sliding_window"):
            raise LMConfigError("sliding-window attention is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise LMConfigError(f"hidden_act={raw.get('hidden_act')!r} is not supported")
        required = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        missing = [k for k in required if k not in raw]
        if missing:
            raise LMConfigError(f"config.json lacks {missing}")
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None

        def pick(key: str, default: Any) -> Any:
            # The checkpoint's config wins for the speech fields; mimo_args.json only adds to it.
            if key in raw and raw[key] is not None:
                return raw[key]
            if key in local and local[key] not in (None, -1):
                return local[key]
            return default

        data: dict[str, Any] = {
            "vocab_size": int(raw["vocab_size"]),
            "hidden_size": int(raw["hidden_size"]),
            "num_layers": int(raw["num_hidden_layers"]),
            "num_heads": int(raw["num_attention_heads"]),
            "num_kv_heads": int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
            "intermediate_size": int(raw["intermediate_size"]),
            "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(raw.get("rope_theta", rope.get("rope_theta", 1_000_000.0))),
            "speech_vocab_size": int(pick("speech_vocab_size", 1025)),
            "n_vq": int(pick("n_vq", 3)),
            "group_size": int(pick("group_size", 3)),
            "local_dim": int(local.get("local_dim", DEFAULT_LOCAL_DIM)),
            "local_layers": int(local.get("local_layers", DEFAULT_LOCAL_LAYERS)),
            "local_heads": int(local.get("local_attn_heads", DEFAULT_LOCAL_HEADS)),
            "local_ffn_dim": int(local.get("local_ffn_dim", DEFAULT_LOCAL_FFN)),
            "eos_token_id": None if eos is None else int(eos),
            "torch_dtype": raw.get("torch_dtype") or raw.get("dtype"),
        }
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise LMConfigError(f"unknown LM config overrides: {sorted(unknown)}")
        data.update(overrides)
        return cls(**data)


# Size presets of random-weight models (see random_model.py). The real model is "7b".
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=152064,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        local_dim=32,
        local_layers=2,
        local_heads=4,
        local_ffn_dim=64,
    ),
    # Qwen2.5-0.5B backbone sizes with the released patch decoder.
    "0.5b": dict(
        vocab_size=152064,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
    ),
    # Qwen2.5-7B(-Instruct) backbone sizes with the released patch decoder: the real model.
    "7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
    ),
}


def preset_config(size: str | dict[str, Any] = "tiny", **overrides: Any) -> LMConfig:
    """A config from a preset name, or from ``{"base": preset, **field overrides}`` / plain overrides."""
    if isinstance(size, dict):
        spec = dict(size)
        base = spec.pop("base", "tiny")
        spec.update(overrides)
        return preset_config(base, **spec)
    if size not in PRESETS:
        raise LMConfigError(f"unknown size preset {size!r}; choose from {sorted(PRESETS)}")
    data: dict[str, Any] = dict(PRESETS[size])
    data.update(overrides)
    return LMConfig(**data)
