"""Settings of ``sg2 serve``: one YAML file (``configs/*.yaml``) plus command-line overrides.

Sections: ``server`` (network and limits), ``auth`` (API keys), ``realtime`` (the OpenAI-Realtime
API: model name, voices, session defaults, input rate limit), ``engine`` (:class:`EngineConfig`)
and ``models`` (a preset, or the checkpoint paths). Any other top-level section is kept as is for
app extensions (e.g. ``direct:`` for browser calls); read it with :meth:`Settings.section`.

Relative paths in a file are relative to that file's directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from sg2_runtime.engine.options import EngineConfig, SessionOptions

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSection(_Strict):
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    handshake_timeout_s: float = Field(
        10.0, gt=0, description="a connection must send a complete HTTP request (or upgrade) within this"
    )
    idle_timeout_s: float = Field(
        300.0, gt=0, description="a WebSocket with no client event for this long is closed"
    )
    heartbeat_s: float | None = Field(
        20.0, gt=0, description="WebSocket ping interval; a peer that stops answering is dropped (None: off)"
    )
    send_timeout_s: float = Field(
        10.0, gt=0, description="a client that does not read for this long (socket buffers full) is dropped"
    )
    max_message_bytes: int = Field(
        1 << 20, ge=1024, description="larger client events get an error event and are ignored"
    )
    hard_max_message_bytes: int = Field(
        16 << 20, ge=1024, description="larger WebSocket messages close the connection (1009)"
    )
    max_outbound_events: int = Field(
        4096,
        ge=64,
        description="server events queued for a client that reads too slowly, before it is dropped",
    )
    max_client_events_per_s: float = Field(
        500.0,
        gt=0,
        description="client events per second (burst: 4x) before events are dropped with an error",
    )
    shutdown_timeout_s: float = Field(10.0, gt=0, description="grace period for open calls on shutdown")
    gil_switch_interval_ms: float | None = Field(
        1.0,
        gt=0,
        description=(
            "Python's thread switch interval in the sg2 serve process (default 5 ms): shorter lets the "
            "network loop take over from the engine thread sooner (lower p95 latency); None: leave it"
        ),
    )
    extensions: list[str] = Field(
        default_factory=list,
        description="'module:function' entries called with the aiohttp app (extra routes, static files)",
    )

    @model_validator(mode="after")
    def _limits(self) -> ServerSection:
        if self.hard_max_message_bytes < self.max_message_bytes:
            raise ValueError("hard_max_message_bytes must be >= max_message_bytes")
        return self


class AuthSection(_Strict):
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="accepted API keys (Bearer header or openai-insecure-api-key.*)"
    )
    api_keys_env: str | None = Field(
        "SG2_API_KEYS", description="environment variable with more keys, comma-separated (None: none)"
    )
    allow_anonymous_remote: bool = Field(
        False, description="serve without any API key on a non-loopback address (refused otherwise)"
    )

    def keys(self) -> list[str]:
        out = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_env and os.environ.get(self.api_keys_env):
            out += [k.strip() for k in os.environ[self.api_keys_env].split(",") if k.strip()]
        return out


class RealtimeSection(_Strict):
    model_name: str = Field("speechgpt-2.0-preview", description="reported as the session's model")
    play_greeting: bool = Field(
        False,
        description=(
            "speak the greeting when a call starts, as a server-initiated response (Realtime clients do "
            "not expect one, so off by default; the greeting always primes the model either way)"
        ),
    )
    voices: dict[str, int | None] = Field(
        default_factory=lambda: {"default": 0},
        description="voice name -> greeting index (the greeting sets the speaker); None: no greeting",
    )
    default_voice: str = "default"
    input_rate_limit: float = Field(
        1.5, ge=1.0, description="sustained input audio a client may send, in multiples of real time"
    )
    input_burst_ms: int = Field(
        30000, ge=1000, description="input audio a client may send ahead of real time before it is refused"
    )
    session: dict[str, Any] = Field(
        default_factory=lambda: {"flow_control": "realtime", "output_margin_ms": 960},
        description="SessionOptions defaults for every call (flow control, margins, sampling, caps)",
    )

    @field_validator("session")
    @classmethod
    def _valid_session(cls, v: dict[str, Any]) -> dict[str, Any]:
        SessionOptions.model_validate(v)
        return v

    @model_validator(mode="after")
    def _voice(self) -> RealtimeSection:
        if self.default_voice not in self.voices:
            raise ValueError(
                f"default_voice {self.default_voice!r} is not one of the voices {list(self.voices)}"
            )
        return self

    def session_defaults(self) -> SessionOptions:
        return SessionOptions.model_validate(
            {
                **self.session,
                "play_greeting": self.play_greeting,
                "greeting": self.voices[self.default_voice],
            }
        )


class ModelsSection(_Strict):
    preset: Literal["tiny-random"] | None = Field(
        None, description="'tiny-random': tiny random-weight models built in memory (no files needed)"
    )
    codec_checkpoint: Path | None = Field(None, description="sg2_codec_ckpt.pkl")
    codec_config: Path | None = Field(None, description="sg2_codec_config.yaml")
    lm_dir: Path | None = Field(None, description="the SpeechGPT-2.0-preview-7B directory")
    greetings: Path | None = Field(None, description="greetings JSONL (voices index into it)")
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = Field(0, ge=0, description="weight seed of the tiny-random preset")

    def describe(self) -> dict[str, Any]:
        if self.preset:
            return {"preset": self.preset, "seed": self.seed, "device": self.device}
        return {
            "preset": None,
            "codec_checkpoint": str(self.codec_checkpoint),
            "lm_dir": str(self.lm_dir),
            "greetings": None if self.greetings is None else str(self.greetings),
            "device": self.device,
            "dtype": self.dtype,
        }

    def check_loadable(self) -> None:
        if self.preset:
            return
        missing = [n for n in ("codec_checkpoint", "codec_config", "lm_dir") if getattr(self, n) is None]
        if missing:
            raise ValueError(
                f"models: set {', '.join(missing)} (the real checkpoints) or preset: tiny-random "
                "(e.g. `sg2 serve --preset tiny-random`)"
            )


class Settings(BaseModel):
    """Everything ``sg2 serve`` needs. Unknown top-level sections are kept for extensions."""

    model_config = ConfigDict(extra="allow")

    server: ServerSection = Field(default_factory=ServerSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    realtime: RealtimeSection = Field(default_factory=RealtimeSection)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    models: ModelsSection = Field(default_factory=ModelsSection)

    def section(self, name: str) -> dict[str, Any]:
        """An extension's own section (``{}`` when absent)."""
        value = (self.model_extra or {}).get(name)
        return dict(value) if isinstance(value, dict) else {}

    def check_secure(self) -> None:
        """Refuse to serve anonymously beyond loopback unless explicitly allowed."""
        if (
            not self.auth.keys()
            and self.server.host not in LOOPBACK_HOSTS
            and not self.auth.allow_anonymous_remote
        ):
            raise ValueError(
                f"no API key configured but host is {self.server.host!r}: set auth.api_keys (or "
                f"${self.auth.api_keys_env}), or auth.allow_anonymous_remote: true"
            )


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    models = data.get("models")
    if isinstance(models, dict):
        for key in ("codec_checkpoint", "codec_config", "lm_dir", "greetings"):
            value = models.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                models[key] = str((base / value).resolve())
            elif isinstance(value, str):
                models[key] = str(Path(value).expanduser())


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ValueError(f"bad setting name {dotted!r}")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with the value read as YAML (``server.port=9000``, ``auth.api_keys=[a,b]``)."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    return name.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_settings(path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None) -> Settings:
    """Defaults, then the YAML file (if any), then ``overrides`` (dotted names), validated once."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
        data = loaded
        _resolve_paths(data, path.resolve().parent)
    for name, value in overrides or []:
        _set_dotted(data, name, value)
    return Settings.model_validate(data)
