"""Random-weight models in the real checkpoint layout, for tests, ``--preset tiny-random`` and benchmarks.

``write_random_model_dir`` writes ``config.json``, ``mimo_args.json``, the weights (single or
sharded safetensors, or ``pytorch_model.bin``) and a tokenizer, so the directory loads through the
same code path as the released checkpoint.

The tokenizer is built here with the ``tokenizers`` library (nothing is downloaded): byte-level
BPE whose 256 byte tokens encode any text, padded with filler tokens so that the special tokens
sit where the real SpeechGPT 2.0 tokenizer (Qwen2.5 vocabulary) has them for vocabularies of the
real size (152064)::

    151643 <|endoftext|>  151644 <|im_start|>  151645 <|im_end|>   (Qwen2.5's own ids)
    151646 <|sosp|>       151647 <|eosp|>                           (assumed, see below)
    151648 <|extra_0|>    151649 <|extra_1|>                        (placeholders)
    151650 <|empty|>      151651 <|end_empty|>                      (from the official greetings)

The official greetings' text channel pads words with runs of 151650 closed by 151651, which fixes
``<|empty|>`` and ``<|end_empty|>``; the ids of ``<|sosp|>``/``<|eosp|>`` are not in any public
file we could find, so they take the first free ids after Qwen's chat tokens. The runtime always
resolves special tokens by name, so the real tokenizer works whatever its ids are. Smaller
vocabularies put the same 9 tokens, in the same order, at the end of the vocabulary.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import LMConfig, preset_config
from .model import SG2Model

REAL_SPECIAL_BASE = 151643
SPECIAL_ORDER = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|sosp|>",
    "<|eosp|>",
    "<|extra_0|>",
    "<|extra_1|>",
    "<|empty|>",
    "<|end_empty|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def byte_alphabet() -> dict[int, str]:
    """Byte -> printable character map of byte-level BPE (printable Latin-1 bytes map to themselves,
    the rest to code points from 256 on, in byte order)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Where the random tokenizer puts its special tokens for a model vocabulary of ``vocab_size``."""
    n = len(SPECIAL_ORDER)
    if vocab_size >= REAL_SPECIAL_BASE + n:
        base = REAL_SPECIAL_BASE
    else:
        base = vocab_size - n
        if base < 256:
            raise ValueError(
                f"vocab_size {vocab_size} leaves no room for 256 byte tokens and {n} special tokens"
            )
    return {name: base + i for i, name in enumerate(SPECIAL_ORDER)}


def build_tokenizer(vocab_size: int) -> Any:
    """A ``tokenizers.Tokenizer`` as described in the module docstring."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    ids = special_token_ids(vocab_size)
    base = min(ids.values())
    vocab = {ch: b for b, ch in byte_alphabet().items()}
    for i in range(256, base):
        vocab[f"\u0120tok{i}"] = i  # "\u0120" is the byte-level space: fillers decode as " tokN"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_ORDER])
    got = {name: tok.token_to_id(name) for name in SPECIAL_ORDER}
    if got != ids:  # pragma: no cover - guards against a tokenizers behaviour change
        raise RuntimeError(f"special tokens landed at {got}, expected {ids}")
    return tok


def tokenizer_config(vocab_size: int) -> dict[str, Any]:
    ids = special_token_ids(vocab_size)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": ["<|sosp|>", "<|eosp|>", "<|empty|>", "<|end_empty|>", "<|im_start|>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "added_tokens_decoder": {
            str(tid): {
                "content": name,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for name, tid in ids.items()
        },
    }


def write_tokenizer(path: str | Path, vocab_size: int) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(vocab_size), indent=1))
    (path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "eos_token": EOS_TOKEN,
                "pad_token": PAD_TOKEN,
                "additional_special_tokens": tokenizer_config(vocab_size)["additional_special_tokens"],
            },
            indent=1,
        )
    )


def in_memory_tokenizer(vocab_size: int) -> Any:
    """The same tokenizer as a transformers fast tokenizer, without touching the disk."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(vocab_size),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=tokenizer_config(vocab_size)["additional_special_tokens"],
        clean_up_tokenization_spaces=False,
    )


def _init_std(config: LMConfig) -> float:
    # Tiny models get larger weights so greedy decoding wanders across tokens and modalities.
    return 0.15 if config.hidden_size <= 128 else 0.02


def random_tensors(
    config: LMConfig,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    include_tied_heads: bool = False,
    std: float | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every checkpoint entry, each from its own seeded generator (order-independent)."""
    std = _init_std(config) if std is None else std
    dev = torch.device(device)

    def randn(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=dev)

    with torch.device("meta"):
        meta = SG2Model(config)
    for name, param in meta.state_dict(keep_vars=True).items():
        if name.startswith("local_transformer_lm_heads."):
            continue
        # Drawn on the target device (fast for the 7B preset on a GPU); CPU and GPU draws differ.
        gen = torch.Generator(dev).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
        shape = tuple(param.shape)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * randn(shape, gen) if std > 0.05 else torch.ones(shape, device=dev)
        else:
            t = std * randn(shape, gen)
            if name.startswith("speech_embedddings."):
                t[config.zero_speech_id] = 0  # the zero-embedding index
        t = t.to(device=device, dtype=dtype)
        yield name, t
        if include_tied_heads and name.startswith("speech_embedddings."):
            yield name.replace("speech_embedddings.", "local_transformer_lm_heads."), t.clone()


def random_model(
    config: LMConfig, seed: int = 0, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> SG2Model:
    """An :class:`SG2Model` with random weights built directly (no files), tensor by tensor."""
    from torch import nn

    with torch.device("meta"):
        model = SG2Model(config)
    for name, t in random_tensors(config, seed, dtype=dtype, device=device):
        owner_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner_name), leaf, nn.Parameter(t, requires_grad=False))
    model.tie_speech_heads()
    return model.eval()


def random_lm(size: str | dict[str, Any] = "tiny", seed: int = 0, **lm_options: Any):
    """An in-memory :class:`~sg2_runtime.lm.runtime.SG2LM` with random weights (benchmarks)."""
    from .runtime import SG2LM
    from .tokens import resolve_special_tokens

    config = preset_config(size) if isinstance(size, (str, dict)) else size
    device = torch.device(lm_options.pop("device", "cpu"))
    dtype = lm_options.pop("dtype", None) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = in_memory_tokenizer(config.vocab_size)
    config = config.replace(eos_token_id=tokenizer.eos_token_id)
    model = random_model(config, seed, device=device, dtype=dtype)
    return SG2LM(
        model, tokenizer, resolve_special_tokens(tokenizer), device=device, dtype=dtype, **lm_options
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_random_model_dir(
    path: str | Path,
    size: str | dict[str, Any] = "tiny",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    weights_format: str = "safetensors",
    shard_max_bytes: int | None = None,
    include_tied_heads: bool = False,
) -> Path:
    """Write a random-weight model directory in the released checkpoint's layout; returns ``path``.

    ``size``: "tiny", "0.5b", "7b", or a dict of :class:`LMConfig` fields (with an optional
    ``"base"`` preset, "tiny" by default). ``weights_format``: "safetensors" (sharded when
    ``shard_max_bytes`` is given, with ``model.safetensors.index.json``) or "bin".
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = size if isinstance(size, LMConfig) else preset_config(size)
    ids = special_token_ids(config.vocab_size)
    config = config.replace(eos_token_id=ids[EOS_TOKEN], torch_dtype=_dtype_name(dtype))
    (path / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
    (path / "mimo_args.json").write_text(json.dumps(config.local_overrides(), indent=1))
    write_tokenizer(path, config.vocab_size)
    tensors = random_tensors(config, seed, dtype=dtype, include_tied_heads=include_tied_heads)
    if weights_format == "bin":
        torch.save(dict(tensors), path / "pytorch_model.bin")
    elif weights_format == "safetensors":
        _write_safetensors(path, tensors, shard_max_bytes)
    else:
        raise ValueError(f"unknown weights_format {weights_format!r}")
    return path


def _write_safetensors(
    path: Path, tensors: Iterator[tuple[str, torch.Tensor]], shard_max_bytes: int | None
) -> None:
    from safetensors.torch import save_file

    if shard_max_bytes is None:
        save_file(dict(tensors), str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    # Shards are written as they fill, so a large model never sits in memory whole.
    shards: list[list[str]] = []
    tmp_names: list[str] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f"shard-tmp-{len(tmp_names)}.safetensors"
            save_file(current, str(path / name), metadata={"format": "pt"})
            tmp_names.append(name)
            shards.append(list(current))
            current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_max_bytes:
            flush()
        current[name] = t
        size += nbytes
        total += nbytes
    flush()
    count = len(tmp_names)
    weight_map = {}
    for i, (tmp, names) in enumerate(zip(tmp_names, shards, strict=True)):
        final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        (path / tmp).rename(path / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def parameter_count(config: LMConfig) -> int:
    """Parameters of the model (tied heads counted once)."""
    with torch.device("meta"):
        model = SG2Model(config)
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "build_tokenizer",
    "in_memory_tokenizer",
    "parameter_count",
    "random_lm",
    "random_model",
    "random_tensors",
    "special_token_ids",
    "write_random_model_dir",
    "write_tokenizer",
]
