"""``sg2 make-random-lm``: write a random-weight speech-text LM directory in the real checkpoint layout."""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="directory to write (created if missing)")
    parser.add_argument(
        "--size", default="tiny", choices=("tiny", "0.5b", "7b"), help="size preset (default: tiny)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="stored weight dtype")
    parser.add_argument(
        "--format", dest="weights_format", default="safetensors", choices=("safetensors", "bin")
    )
    parser.add_argument(
        "--shard-mb",
        type=int,
        default=None,
        help="shard safetensors weights at this many MiB (with an index)",
    )
    parser.add_argument(
        "--include-tied-heads",
        action="store_true",
        help="also store local_transformer_lm_heads.* (copies of the speech embeddings)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from .random_model import special_token_ids, write_random_model_dir

    path = write_random_model_dir(
        args.path,
        args.size,
        args.seed,
        dtype=getattr(torch, args.dtype),
        weights_format=args.weights_format,
        shard_max_bytes=None if args.shard_mb is None else args.shard_mb * 2**20,
        include_tied_heads=args.include_tied_heads,
    )
    from .config import preset_config

    ids = special_token_ids(preset_config(args.size).vocab_size)
    print(f"wrote a random {args.size} speech-text LM to {path}")
    print("special tokens: " + ", ".join(f"{k}={v}" for k, v in ids.items()))
    return 0
