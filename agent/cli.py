"""The `sg2` command line.

Each subcommand lives in the module that owns the feature and registers itself
here through a small ``(name, module path)`` table, so the CLI never imports
heavy dependencies (torch, aiortc, livekit) until a subcommand that needs them runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import sg2_runtime

# name -> module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-random-codec": (
        "sg2_runtime.codec.cli",
        "Write a random-weight codec checkpoint (any config) in the released format",
    ),
    "make-random-lm": (
        "sg2_runtime.lm.cli",
        "Write a random-weight speech-text LM directory (tests, benchmarks)",
    ),
    "serve": (
        "sg2_runtime.server.cli",
        "Serve the engine: OpenAI-Realtime WebSocket API (/v1/realtime), /healthz, /metrics",
    ),
    "download": (
        "agent.download",
        "Download the released weights (Hugging Face) and greetings into the layout configs/default.yaml uses",
    ),
    "agent": (
        "agent.livekit.cli",
        "LiveKit agent worker: SpeechGPT 2.0 in LiveKit rooms, calls spread over sg2 serve engine servers",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="sg2", description="sg2-live: SpeechGPT 2.0 on live calls.")
    parser.add_argument("--version", action="version", version=f"sg2-live {sg2_runtime.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sg2`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
