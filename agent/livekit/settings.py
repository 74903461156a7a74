"""Settings of the LiveKit transport: the ``livekit:`` section (the LiveKit deployment, agent dispatch
and the token service of ``sg2 serve``) and the ``agent:`` section (the ``sg2 agent`` worker).

One YAML file may hold both (plus the ``sg2 serve`` sections); ``sg2 serve`` reads ``livekit:`` only,
``sg2 agent`` reads both. The LiveKit URL, key and secret fall back to ``$LIVEKIT_URL``,
``$LIVEKIT_API_KEY`` and ``$LIVEKIT_API_SECRET``; engine server keys to ``$SG2_API_KEY``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$|^$")
ROOM_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenServiceSection(_Strict):
    enabled: bool = Field(True, description="serve POST /v1/livekit/token from sg2 serve")
    ttl_s: int = Field(
        600, ge=10, le=86400, description="lifetime of a minted token (it only has to last until joining)"
    )
    room_prefix: str = Field("sg2-", description="rooms the service mints tokens for start with this")
    allow_room_choice: bool = Field(
        True,
        description="a caller may name the room (to join others there); else every token opens a new room",
    )
    identity_prefix: str = Field("user-", description="identities the service makes up start with this")

    @field_validator("room_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and not ROOM_NAME_RE.match(v):
            raise ValueError(f"room_prefix {v!r} may hold only letters, digits and _.:-")
        return v


class LiveKitSection(_Strict):
    """The LiveKit deployment: what the worker connects to, how the agent is dispatched, tokens."""

    url: str | None = Field(None, description="LiveKit server URL (ws(s)://...); default $LIVEKIT_URL")
    public_url: str | None = Field(
        None, description="LiveKit URL handed to browsers by the token service (default: url)"
    )
    api_key: str | None = Field(None, description="LiveKit API key; default $LIVEKIT_API_KEY")
    api_secret: SecretStr | None = Field(
        None, description="LiveKit API secret; default $LIVEKIT_API_SECRET (never sent to clients)"
    )
    agent_name: str = Field(
        "sg2",
        description=(
            "explicit dispatch: the worker registers under this name and the token service's tokens "
            "dispatch it; '' = automatic dispatch (LiveKit sends the agent to every new room)"
        ),
    )
    token_service: TokenServiceSection = Field(default_factory=TokenServiceSection)

    @field_validator("agent_name")
    @classmethod
    def _agent_name(cls, v: str) -> str:
        if not AGENT_NAME_RE.match(v):
            raise ValueError(f"agent_name {v!r}: letters, digits and _.- (at most 64), or '' for automatic")
        return v

    @field_validator("url", "public_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(wss?|https?)://[^/\s]+", v):
            raise ValueError(f"{v!r} is not a ws(s):// or http(s):// URL")
        return v

    # values with the environment fallbacks applied
    def resolved_url(self) -> str | None:
        return self.url or os.environ.get("LIVEKIT_URL") or None

    def resolved_public_url(self) -> str | None:
        return self.public_url or self.resolved_url()

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("LIVEKIT_API_KEY") or None

    def resolved_api_secret(self) -> str | None:
        if self.api_secret is not None:
            return self.api_secret.get_secret_value()
        return os.environ.get("LIVEKIT_API_SECRET") or None

    def missing(self) -> list[str]:
        """What is needed to talk to LiveKit and is not configured (here or in the environment)."""
        out = []
        if not self.resolved_url():
            out.append("url ($LIVEKIT_URL)")
        if not self.resolved_api_key():
            out.append("api_key ($LIVEKIT_API_KEY)")
        if not self.resolved_api_secret():
            out.append("api_secret ($LIVEKIT_API_SECRET)")
        return out


class EngineServerSection(_Strict):
    url: str = Field(description="http(s)://host:port of an sg2 serve instance")
    api_key: SecretStr | None = Field(None, description="its API key (default: agent.engine_api_key)")
    name: str = ""


class TurnDetectionSection(_Strict):
    """Server VAD settings sent with each call (null: the engine server's own defaults)."""

    enabled: bool = Field(True, description="false: the framework must commit turns (needs a local VAD)")
    threshold: float | None = Field(None, gt=0, lt=1)
    prefix_padding_ms: int | None = Field(None, ge=0, le=2000)
    silence_duration_ms: int | None = Field(None, ge=100, le=5000)


class SessionSection(_Strict):
    """How each call is set up on the engine server."""

    voice: str = Field("default", description="a voice name the engine servers know (realtime.voices)")
    instructions: str = Field("", description="extra instructions appended to the model's system line")
    max_output_tokens: int | Literal["inf"] = Field(
        "inf", description="cap per reply in 120 ms units ('inf': the engine server's cap)"
    )
    turn_detection: TurnDetectionSection = Field(default_factory=TurnDetectionSection)
    greet: bool = Field(
        False, description="the agent speaks first when a call starts (a reply with no user turn)"
    )

    @field_validator("max_output_tokens")
    @classmethod
    def _cap(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 4096:
            raise ValueError("max_output_tokens must be 1..4096 or 'inf'")
        return v


class FloorSection(_Strict):
    """Who the agent listens to in a room with several people (see agent/livekit/floor.py), and
    how fast its audio stops when someone talks over it."""

    threshold: float = Field(0.5, gt=0, lt=1, description="Silero speech probability that counts as speech")
    release_threshold: float = Field(0.35, gt=0, lt=1, description="under this a participant counts as quiet")
    start_ms: int = Field(64, ge=32, le=1000, description="speech this long claims a free floor")
    release_ms: int = Field(
        600, ge=100, le=5000, description="the floor is free once its holder has been quiet this long"
    )
    preroll_ms: int = Field(
        300, ge=0, le=2000, description="a newcomer's audio from before the floor switch sent to the model"
    )
    fast_stop: bool = Field(
        True,
        description=(
            "pause the agent's audio on the first likely speech window of the floor holder, before the "
            "engine confirms the barge-in (resumed if the sound does not turn into speech)"
        ),
    )
    onset_threshold: float = Field(
        0.2, gt=0, lt=1, description="speech probability of a window that pauses the agent (fast stop)"
    )
    onset_dbfs: float = Field(-45.0, le=0, description="... if the window is also louder than this (RMS)")
    confirm_ms: int = Field(
        700, ge=100, le=5000, description="how long a fast stop waits for the engine's barge-in decision"
    )

    @model_validator(mode="after")
    def _order(self) -> FloorSection:
        if self.release_threshold > self.threshold:
            raise ValueError("release_threshold must not exceed threshold")
        if self.onset_threshold > self.threshold:
            raise ValueError("onset_threshold must not exceed threshold")
        return self


class WorkerSection(_Strict):
    num_idle_processes: int = Field(
        2, ge=0, le=64, description="job processes kept started and prewarmed, ready for the next calls"
    )
    job_executor: Literal["process", "thread"] = Field(
        "process", description="one process per call (isolation) or one thread per call (light)"
    )
    initialize_timeout_s: float = Field(
        60.0, gt=0, description="a job process must import and prewarm within this (busy CPUs are slow)"
    )
    shutdown_timeout_s: float = Field(30.0, gt=0, description="a call must wind down within this")
    drain_timeout_s: int = Field(
        3600, ge=0, description="on SIGTERM, running calls may finish for this long (0: no limit)"
    )
    load_threshold: float = Field(
        1.0,
        gt=0,
        le=1.0,
        description="the worker stops taking calls when the engine servers' share of used slots reaches this",
    )
    load_probe_s: float = Field(
        2.0, ge=0.2, description="the engine servers' load is refreshed this often (and before every job)"
    )
    host: str = Field("127.0.0.1", description="the worker's health endpoint (GET / and /worker)")
    port: int = Field(8081, ge=0, le=65535, description="0 picks a free port")
    memory_warn_mb: float = 1000
    memory_limit_mb: float = 0


class AgentSection(_Strict):
    """The ``sg2 agent`` worker."""

    engine_servers: list[EngineServerSection] = Field(
        default_factory=lambda: [EngineServerSection(url="http://127.0.0.1:8000")],
        min_length=1,
        description="sg2 serve instances; each new call goes to the least-loaded reachable one",
    )
    engine_api_key: SecretStr | None = Field(
        None, description="API key for engine servers that set none (default $SG2_API_KEY)"
    )
    health_timeout_s: float = Field(
        2.0, gt=0, description="an engine server must answer /healthz within this"
    )
    connect_timeout_s: float = Field(
        10.0, gt=0, description="... and accept the call's WebSocket within this"
    )
    failure_cooldown_s: float = Field(
        30.0, ge=0, description="a server that failed a call is tried last by new calls for this long"
    )
    keepalive_s: float = Field(
        60.0, ge=0, description="an empty session.update after this long without client events (0: off)"
    )
    session: SessionSection = Field(default_factory=SessionSection)
    floor: FloorSection = Field(default_factory=FloorSection)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    report_errors: bool = Field(
        True, description="tell the room (data topic 'sg2.error', attribute 'sg2.error') when a call fails"
    )

    def engine_key(self, server: EngineServerSection) -> str | None:
        if server.api_key is not None:
            return server.api_key.get_secret_value()
        if self.engine_api_key is not None:
            return self.engine_api_key.get_secret_value()
        return os.environ.get("SG2_API_KEY") or None


class AgentSettings(BaseModel):
    """Everything ``sg2 agent`` reads: the ``livekit:`` and ``agent:`` sections (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    livekit: LiveKitSection = Field(default_factory=LiveKitSection)
    agent: AgentSection = Field(default_factory=AgentSection)

    @model_validator(mode="after")
    def _names(self) -> AgentSettings:
        names = [s.name or s.url.rstrip("/") for s in self.agent.engine_servers]
        if len(set(names)) != len(names):
            raise ValueError(f"agent.engine_servers: duplicates in {names}")
        return self


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def load_agent_settings(
    path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None
) -> AgentSettings:
    """Defaults, then the YAML file, then dotted overrides (``agent.worker.port=0``), validated once."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
        data = loaded
    for name, value in overrides or []:
        _set_dotted(data, name, value)
    return AgentSettings.model_validate(data)
