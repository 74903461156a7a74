"""`sg2 download`: fetch the released weights into the layout `configs/default.yaml` expects.

    weights/SpeechGPT-2.0-preview-Codec/   sg2_codec_ckpt.pkl, sg2_codec_config.yaml  (Hugging Face)
    weights/SpeechGPT-2.0-preview-7B/      config.json, safetensors shards, tokenizer (Hugging Face)
    weights/greetings.jsonl                the official greetings (the model's GitHub repository)

Downloads go through huggingface_hub (resumable, with progress bars, honouring HF_TOKEN,
HF_ENDPOINT and the local cache); the greetings file is not on the hub, so it is fetched from the
reference repository's raw URL.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

CODEC_REPO = "fnlp/SpeechGPT-2.0-preview-Codec"
LM_REPO = "fnlp/SpeechGPT-2.0-preview-7B"
GREETINGS_URL = "https://raw.githubusercontent.com/OpenMOSS/SpeechGPT-2.0-preview/main/extra/greetings.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dest", type=Path, default=Path("weights"), help="target folder (default: weights/)"
    )
    parser.add_argument(
        "--revision", default=None, help="hub revision (branch, tag or commit) for both repos"
    )
    parser.add_argument("--skip-greetings", action="store_true", help="do not fetch greetings.jsonl")


def download(dest: Path, revision: str | None = None, greetings: bool = True) -> dict[str, Path]:
    """Fetch everything; returns the local paths (what a config's ``models:`` section needs)."""
    from huggingface_hub import snapshot_download

    dest.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, repo in (("codec_dir", CODEC_REPO), ("lm_dir", LM_REPO)):
        target = dest / repo.split("/", 1)[1]
        snapshot_download(repo_id=repo, revision=revision, local_dir=str(target))
        paths[key] = target
    if greetings:
        target = dest / "greetings.jsonl"
        with urllib.request.urlopen(GREETINGS_URL, timeout=60) as response:
            target.write_bytes(response.read())
        paths["greetings"] = target
    return paths


def run(args: argparse.Namespace) -> int:
    try:
        paths = download(args.dest, args.revision, greetings=not args.skip_greetings)
    except Exception as exc:  # network, auth or disk: say what failed and how to retry
        print(f"sg2 download: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(
            "sg2 download: re-run to resume; set HF_TOKEN / HF_ENDPOINT if the hub needs them",
            file=sys.stderr,
        )
        return 1
    codec = paths["codec_dir"]
    print("sg2 download: done. In the config's `models:` section:")
    print(f"  codec_checkpoint: {codec / 'sg2_codec_ckpt.pkl'}")
    print(f"  codec_config: {codec / 'sg2_codec_config.yaml'}")
    print(f"  lm_dir: {paths['lm_dir']}")
    if "greetings" in paths:
        print(f"  greetings: {paths['greetings']}")
    return 0
