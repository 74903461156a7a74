"""Start a real `livekit-server --dev` (built into .tools/bin by scripts/install_system_deps.sh).

    with start_livekit_server(tmp_path) as lk:
        token = lk.token("alice", "room-1")
        await rtc.Room().connect(lk.url, token)

or, as a pytest fixture:

    livekit = livekit_server_fixture(scope="module")

The server listens on loopback only, on free ports (HTTP/WebSocket, RTC over TCP and one UDP
port), advertises only 127.0.0.1 ICE candidates and uses no STUN servers.
"""

from __future__ import annotations

import contextlib
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import TOOLS_BIN, require_binary
from ._process import ServerProcess, ServerStartError
from .ports import free_port

LIVEKIT_SERVER_BIN = TOOLS_BIN / "livekit-server"
DEV_API_KEY = "devkey"
DEV_API_SECRET = "secret"  # livekit-server --dev's placeholder secret


@dataclass
class LiveKitServer:
    url: str  # ws://127.0.0.1:PORT — what livekit.rtc / agents connect to
    http_url: str  # http://127.0.0.1:PORT — what livekit.api.LiveKitAPI uses
    api_key: str
    api_secret: str
    port: int
    rtc_tcp_port: int
    rtc_udp_port: int
    config_path: Path
    log_path: Path
    process: ServerProcess

    def token(
        self,
        identity: str,
        room: str,
        *,
        name: str | None = None,
        ttl: timedelta = timedelta(hours=1),
        can_publish: bool = True,
        can_subscribe: bool = True,
        agent: bool = False,
        metadata: str | None = None,
    ) -> str:
        """An access token (JWT) that lets `identity` join `room`."""
        from livekit import api

        grants = api.VideoGrants(
            room_join=True,
            room=room,
            can_publish=can_publish,
            can_subscribe=can_subscribe,
            can_publish_data=True,
            agent=agent,
        )
        tok = api.AccessToken(self.api_key, self.api_secret).with_identity(identity).with_grants(grants)
        tok = tok.with_ttl(ttl)
        if name:
            tok = tok.with_name(name)
        if metadata:
            tok = tok.with_metadata(metadata)
        return tok.to_jwt()

    def api(self):
        """A `livekit.api.LiveKitAPI` client (create it inside a running event loop; `await .aclose()`)."""
        from livekit import api

        return api.LiveKitAPI(self.http_url, self.api_key, self.api_secret)

    def env(self) -> dict[str, str]:
        """LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET for an agent worker process."""
        return {
            "LIVEKIT_URL": self.url,
            "LIVEKIT_API_KEY": self.api_key,
            "LIVEKIT_API_SECRET": self.api_secret,
        }

    def log_text(self) -> str:
        return self.process.log_text()


def _healthy(http_url: str) -> bool:
    # GET / answers 200 "OK" once the node has published its stats (406 "Not Ready" before).
    with urllib.request.urlopen(http_url + "/", timeout=1) as resp:
        return resp.status == 200


def _config(
    port: int,
    tcp_port: int,
    udp_port: int,
    api_key: str,
    api_secret: str,
    redis_address: str | None,
    log_level: str,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "port": port,
        "bind_addresses": ["127.0.0.1"],
        "keys": {api_key: api_secret},
        "rtc": {
            "tcp_port": tcp_port,
            "udp_port": udp_port,
            # Loopback only: a fixed node IP (no STUN lookups) and only 127.0.0.1 ICE candidates.
            "node_ip": "127.0.0.1",
            "use_external_ip": False,
            "enable_loopback_candidate": True,
            "ips": {"includes": ["127.0.0.1/32"]},
        },
        "logging": {"level": log_level},
    }
    if redis_address:
        conf["redis"] = {"address": redis_address}
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(conf.get(key), dict):
            conf[key] = {**conf[key], **value}
        else:
            conf[key] = value
    return conf


@contextlib.contextmanager
def start_livekit_server(
    tmp_dir: Path | None = None,
    *,
    api_key: str = DEV_API_KEY,
    api_secret: str = DEV_API_SECRET,
    redis_address: str | None = None,
    log_level: str = "info",
    extra_config: dict[str, Any] | None = None,
    startup_timeout: float = 30.0,
    binary: Path = LIVEKIT_SERVER_BIN,
) -> Iterator[LiveKitServer]:
    """Run `livekit-server --dev --config <tmp>/livekit.yaml` on free loopback ports until the block exits.

    `redis_address` ("127.0.0.1:PORT", e.g. from `start_redis_server`) makes it use Redis (needed by
    livekit-sip). `extra_config` is merged into the YAML config (one level deep). The process group
    is killed on exit; if the block raises, the server's log is written to stderr.
    """
    exe = require_binary("livekit-server", binary)
    own_tmp = None
    if tmp_dir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="livekit-")
        tmp_dir = Path(own_tmp.name)
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = None
        last_error: Exception | None = None
        for attempt in range(3):  # a port picked as free may be taken before the server binds it
            port = free_port(tcp=True)
            tcp_port = free_port(tcp=True, exclude={port})
            udp_port = free_port(tcp=False, udp=True, exclude={port, tcp_port})
            config_path = tmp_dir / f"livekit-{attempt}.yaml"
            config_path.write_text(
                yaml.safe_dump(
                    _config(
                        port, tcp_port, udp_port, api_key, api_secret, redis_address, log_level, extra_config
                    )
                )
            )
            log_path = tmp_dir / f"livekit-server-{attempt}.log"
            proc = ServerProcess(
                "livekit-server", [exe, "--dev", "--config", config_path], log_path, cwd=tmp_dir
            ).start()
            http_url = f"http://127.0.0.1:{port}"
            try:
                proc.wait_ready(lambda u=http_url: _healthy(u), startup_timeout)
            except ServerStartError as exc:
                proc.stop()
                last_error = exc
                if "address already in use" in proc.log_text():
                    continue
                raise
            server = LiveKitServer(
                url=f"ws://127.0.0.1:{port}",
                http_url=http_url,
                api_key=api_key,
                api_secret=api_secret,
                port=port,
                rtc_tcp_port=tcp_port,
                rtc_udp_port=udp_port,
                config_path=config_path,
                log_path=log_path,
                process=proc,
            )
            break
        if server is None:
            raise ServerStartError(f"livekit-server could not start: {last_error}")
        try:
            yield server
        except BaseException:
            server.process.dump_log("the block using it raised")
            raise
        finally:
            server.process.stop()
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def livekit_server_fixture(scope: str = "function", **kwargs: Any):
    """A pytest fixture (assign it to a name in a test module or conftest) yielding a LiveKitServer."""

    @pytest.fixture(scope=scope)
    def _livekit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
        with start_livekit_server(tmp_path_factory.mktemp("livekit"), **kwargs) as server:
            yield server

    return _livekit_server
