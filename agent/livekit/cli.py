"""``sg2 agent``: the LiveKit agent worker.

    sg2 agent --url ws://livekit:7880 --api-key KEY --api-secret SECRET --engine http://gpu-1:8000
    sg2 agent --config configs/livekit.yaml               # the livekit: and agent: sections
    sg2 agent --config configs/livekit.yaml --auto-dispatch --set agent.worker.num_idle_processes=4

LiveKit credentials also come from $LIVEKIT_URL, $LIVEKIT_API_KEY, $LIVEKIT_API_SECRET; engine server
keys from $SG2_API_KEY. SIGTERM/SIGINT drain the worker (no new calls; running calls finish within
``agent.worker.drain_timeout_s``), a second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

log = logging.getLogger("sg2.agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file with livekit: and agent: sections")
    parser.add_argument("--url", default=None, help="LiveKit server URL (livekit.url, $LIVEKIT_URL)")
    parser.add_argument("--api-key", default=None, help="LiveKit API key (livekit.api_key)")
    parser.add_argument("--api-secret", default=None, help="LiveKit API secret (livekit.api_secret)")
    parser.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="URL",
        help="an sg2 serve engine server, http://host:port (repeatable; replaces agent.engine_servers)",
    )
    parser.add_argument(
        "--engine-key",
        default=None,
        help="API key of the engine servers (agent.engine_api_key, $SG2_API_KEY)",
    )
    dispatch = parser.add_mutually_exclusive_group()
    dispatch.add_argument(
        "--agent-name", default=None, help="explicit dispatch under this name (livekit.agent_name)"
    )
    dispatch.add_argument(
        "--auto-dispatch", action="store_true", help="automatic dispatch: join every new room (agent_name '')"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="worker health port (agent.worker.port, 0: any)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any setting (YAML value)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the effective settings and exit")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def settings_from_args(args: argparse.Namespace) -> Any:
    from sg2_runtime.server.config import parse_override

    from .settings import load_agent_settings

    overrides = [parse_override(text) for text in args.set]
    if args.url:
        overrides.append(("livekit.url", args.url))
    if args.api_key:
        overrides.append(("livekit.api_key", args.api_key))
    if args.api_secret:
        overrides.append(("livekit.api_secret", args.api_secret))
    if args.engine:
        overrides.append(("agent.engine_servers", [{"url": u} for u in args.engine]))
    if args.engine_key:
        overrides.append(("agent.engine_api_key", args.engine_key))
    if args.agent_name is not None:
        overrides.append(("livekit.agent_name", args.agent_name))
    if args.auto_dispatch:
        overrides.append(("livekit.agent_name", ""))
    if args.port is not None:
        overrides.append(("agent.worker.port", args.port))
    return load_agent_settings(args.config, overrides)


def _public(data: dict[str, Any]) -> dict[str, Any]:
    lk = data.get("livekit", {})
    if lk.get("api_secret"):
        lk["api_secret"] = "***"
    agent = data.get("agent", {})
    if agent.get("engine_api_key"):
        agent["engine_api_key"] = "***"
    for server in agent.get("engine_servers", []):
        if server.get("api_key"):
            server["api_key"] = "***"
    return data


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"sg2 agent: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(_public(settings.model_dump(mode="json")), sort_keys=False))
        return 0
    missing = settings.livekit.missing()
    if missing:
        print(f"sg2 agent: configuration error: LiveKit {', '.join(missing)} not set", file=sys.stderr)
        return 2
    os.environ.setdefault("LIVEKIT_LOG_LEVEL", args.log_level.upper())
    return asyncio.run(_run_worker(settings))


def _say(message: str) -> None:
    print(f"sg2 agent: {message}", file=sys.stderr, flush=True)


async def _run_worker(settings: Any) -> int:
    from .worker import build_server

    server, reporter = build_server(settings)
    lk, w = settings.livekit, settings.agent.worker
    # the load LiveKit sees from the first status report on (a job offered while the worker looks
    # full is not offered again)
    await reporter.refresh()
    _free, total = reporter.pool.capacity()
    for st in reporter.pool.statuses():
        state = f"{st.capacity_left}/{st.capacity} slots free" if st.ok else f"unavailable ({st.error})"
        _say(f"engine server {st.server.name}: {state}")
    if total == 0:
        _say("no engine server is reachable yet: the worker reports itself full until one is")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            _say("second signal: exiting now")
            os._exit(1)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    def registered(worker_id: str, info: Any) -> None:
        how = f"explicit dispatch as {lk.agent_name!r}" if lk.agent_name else "automatic dispatch"
        port = server.worker_info.http_port
        _say(
            f"registered worker {worker_id} with {lk.resolved_url()} ({how}, "
            f"{len(settings.agent.engine_servers)} engine server(s), health on http://{w.host}:{port}/)"
        )

    server.on("worker_registered", registered)
    run_task = asyncio.create_task(server.run(devmode=False), name="sg2-agent-worker")
    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({run_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    rc = 0
    if run_task in done:
        stop_task.cancel()
        exc = run_task.exception()
        if exc is not None:
            _say(f"worker stopped: {exc}")
            rc = 1
    else:
        active = len(server.active_jobs)
        _say(f"draining: {active} call(s) running; no new calls (second signal: exit now)")
        try:
            await server.drain(timeout=w.drain_timeout_s or None)
        except TimeoutError:
            _say(f"drain timed out after {w.drain_timeout_s} s; ending the remaining calls")
    await server.aclose()
    await reporter.aclose()
    if not run_task.done():
        run_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await run_task
    _say("stopped")
    return rc
