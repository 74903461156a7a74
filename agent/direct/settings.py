"""Settings of the browser-call transport (the ``direct:`` section of the server settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from sg2_runtime.engine.options import SessionOptions

DEFAULT_WEB_CLIENT_DIR = Path(__file__).resolve().parents[2] / "web_client" / "dist"

# Fields of SessionOptions a caller may choose per call (in a JSON offer). Flow control, the output
# margin and the call length cap stay the server's choice.
CLIENT_OPTION_FIELDS = frozenset(
    {"greeting", "play_greeting", "instructions", "sampling", "turn_detection", "max_response_ms"}
)


class IceServer(BaseModel):
    """One STUN or TURN server, as in the WebRTC ``RTCIceServer`` dictionary."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(
        min_length=1, description="stun:host:port, turn:host:port?transport=udp, turns:..."
    )
    username: str | None = None
    credential: SecretStr | None = None

    @field_validator("urls", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("urls")
    @classmethod
    def _schemes(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("stun:", "turn:", "turns:")):
                raise ValueError(f"ICE server URL {url!r} must start with stun:, turn: or turns:")
        return v

    def public(self) -> dict[str, Any]:
        """The RTCIceServer dict handed to browsers (credentials included: TURN needs them)."""
        out: dict[str, Any] = {"urls": list(self.urls)}
        if self.username is not None:
            out["username"] = self.username
        if self.credential is not None:
            out["credential"] = self.credential.get_secret_value()
        return out


class DirectSettings(BaseModel):
    """Browser calls over WebRTC, served by ``sg2 serve`` without an SFU."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    access_key: SecretStr | None = Field(
        None, description="if set, signalling requests need 'Authorization: Bearer <key>'"
    )
    max_calls: int = Field(8, ge=1, le=1024, description="concurrent calls on this transport")
    max_sdp_bytes: int = Field(16384, ge=1024, le=1 << 20, description="largest accepted offer body")
    ice_servers: list[IceServer] = Field(
        default_factory=list, description="STUN/TURN for real networks; host candidates always work on a LAN"
    )
    connect_timeout_s: float = Field(
        15.0, gt=0, description="a call whose ICE/DTLS has not connected by then is dropped"
    )
    media_timeout_s: float = Field(
        10.0, gt=0, description="a connected call that receives no audio for this long is ended (peer gone)"
    )
    inbound_jitter_packets: int = Field(
        0,
        ge=0,
        le=8,
        description=(
            "20 ms packets the server holds back before decoding caller audio: 0 = none (the audio feeds "
            "a model, not a speaker: late packets are dropped); aiortc's own default is 4 (80 ms)"
        ),
    )
    max_event_backlog: int = Field(256, ge=16, description="data-channel events kept while it is not open")
    session: dict[str, Any] = Field(
        default_factory=dict, description="SessionOptions defaults for every call (flow_control is 'ack')"
    )
    web_client_dir: Path | None = Field(
        DEFAULT_WEB_CLIENT_DIR, description="built web client served at '/'; None serves no page"
    )

    @field_validator("session")
    @classmethod
    def _valid_session(cls, v: dict[str, Any]) -> dict[str, Any]:
        SessionOptions.model_validate({**v, "flow_control": "ack"})
        return v

    def session_options(self, overrides: dict[str, Any] | None = None) -> SessionOptions:
        """Options for one call: server defaults, then the caller's allowed overrides."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - CLIENT_OPTION_FIELDS
        if unknown:
            raise ValueError(f"options not settable per call: {', '.join(sorted(unknown))}")
        merged = {**self.session, **overrides, "flow_control": "ack"}
        return SessionOptions.model_validate(merged)

    def key_matches(self, presented: str | None) -> bool:
        import hmac

        if self.access_key is None:
            return True
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode(), self.access_key.get_secret_value().encode())
