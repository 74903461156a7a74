"""``sg2 serve``: load the models, start the engine, serve the network API until SIGINT/SIGTERM.

    sg2 serve --preset tiny-random                 # the whole stack without weights (make serve)
    sg2 serve --config configs/default.yaml        # the real checkpoints named in the file
    sg2 serve --config configs/default.yaml --port 9000 --api-key "$KEY" --set engine.max_sessions=16

Imports stay light until ``run`` (the ``sg2`` parser imports every subcommand module).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger("sg2.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML settings file (e.g. configs/default.yaml)")
    parser.add_argument(
        "--preset",
        choices=("tiny-random",),
        default=None,
        help="build tiny random-weight models in memory instead of loading checkpoints",
    )
    parser.add_argument("--host", default=None, help="address to bind (overrides server.host)")
    parser.add_argument("--port", type=int, default=None, help="TCP port, 0 for any free one (server.port)")
    parser.add_argument(
        "--api-key", action="append", default=[], metavar="KEY", help="accept this API key (repeatable)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any setting; the value is read as YAML (repeatable)",
    )
    parser.add_argument(
        "--extension", action="append", default=[], metavar="MODULE:FUNCTION", help="add an app extension"
    )
    parser.add_argument("--print-config", action="store_true", help="print the effective settings and exit")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def settings_from_args(args: argparse.Namespace) -> Any:
    from .config import load_settings, parse_override

    overrides = [parse_override(text) for text in args.set]
    if args.preset:
        overrides.append(("models.preset", args.preset))
    if args.host is not None:
        overrides.append(("server.host", args.host))
    if args.port is not None:
        overrides.append(("server.port", args.port))
    settings = load_settings(args.config, overrides)
    if args.api_key:
        settings.auth.api_keys = [*settings.auth.api_keys, *args.api_key]
        settings = type(settings).model_validate(settings.model_dump(mode="python"))
    if args.extension:
        settings.server.extensions = [*settings.server.extensions, *args.extension]
    return settings


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(_public(settings.model_dump(mode="json")), sort_keys=False))
            return 0
        settings.check_secure()
        settings.models.check_loadable()
        extension_names = _with_builtin_extensions(settings)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"sg2 serve: configuration error: {exc}", file=sys.stderr)
        return 2

    from .loading import build_engine, resolve_extensions
    from .runner import serve

    try:
        extensions = resolve_extensions(extension_names)
        engine = build_engine(settings)
    except (ValueError, OSError, ImportError) as exc:
        print(f"sg2 serve: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        serve(engine, settings, extensions)
    finally:
        engine.shutdown()
    return 0


DIRECT_EXTENSION = "agent.direct:install"
LIVEKIT_TOKEN_EXTENSION = "agent.livekit.token_service:install"


def _with_builtin_extensions(settings: Any) -> list[str]:
    """The configured extensions, plus browser calls (``direct:`` section, on unless
    ``direct.enabled: false``): the web client at ``/`` and WebRTC signalling under ``/v1/webrtc``;
    plus LiveKit room tokens (``POST /v1/livekit/token``) when a ``livekit:`` section is present
    (unless ``livekit.token_service.enabled: false``). The sections are validated here so a mistake
    is a configuration error, before models load."""
    names = list(settings.server.extensions)
    section = settings.section("direct")
    if section.get("enabled", True) and DIRECT_EXTENSION not in names:
        from agent.direct.settings import DirectSettings

        DirectSettings.model_validate(section)
        names.insert(0, DIRECT_EXTENSION)
    if (settings.model_extra or {}).get("livekit") is not None and LIVEKIT_TOKEN_EXTENSION not in names:
        from agent.livekit.settings import LiveKitSection

        livekit = LiveKitSection.model_validate(settings.section("livekit"))
        if livekit.token_service.enabled:
            missing = livekit.missing()
            if missing:
                raise ValueError(f"livekit: {', '.join(missing)} not set (needed for room tokens)")
            names.append(LIVEKIT_TOKEN_EXTENSION)
    return names


def _public(data: dict[str, Any]) -> dict[str, Any]:
    """Settings for printing: API keys masked."""
    auth = data.get("auth", {})
    if auth.get("api_keys"):
        auth["api_keys"] = ["***"] * len(auth["api_keys"])
    direct = data.get("direct")
    if isinstance(direct, dict) and direct.get("access_key"):
        direct["access_key"] = "***"
    livekit = data.get("livekit")
    if isinstance(livekit, dict) and livekit.get("api_secret"):
        livekit["api_secret"] = "***"
    return data
