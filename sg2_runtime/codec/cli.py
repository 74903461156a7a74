"""`sg2 make-random-codec`: write a random-weight codec checkpoint (any config), released format.

The checkpoint is a `torch.save`d flat dict of tensors with exactly the released key scheme, so
it loads through the same path as the real `sg2_codec_ckpt.pkl`; the config is written next to it
(same YAML format) unless it already sits there.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="codec YAML config (released format)")
    parser.add_argument("--out", required=True, help="checkpoint path to write (e.g. codec_ckpt.pkl)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--config-out",
        default=None,
        help="where to copy the config (default: <out dir>/<out stem>_config.yaml)",
    )


def run(args: argparse.Namespace) -> int:
    from .checkpoint import build_random_codec_checkpoint, save_codec_checkpoint
    from .config import CodecConfig

    config = CodecConfig.from_yaml(args.config)
    out = Path(args.out)
    state_dict = build_random_codec_checkpoint(config, seed=args.seed)
    save_codec_checkpoint(state_dict, out)
    config_out = Path(args.config_out) if args.config_out else out.with_name(out.stem + "_config.yaml")
    config.to_yaml(config_out)
    params = sum(t.numel() for t in state_dict.values())
    print(f"wrote {out} ({len(state_dict)} entries, {params:,} values) and {config_out}")
    return 0
