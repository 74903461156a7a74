"""OpenAI Realtime (GA) wire format: ids, server-event builders, and the mapping between the
protocol's session configuration and the engine's :class:`SessionOptions`.

Nothing here touches sockets or the engine; :mod:`sg2_runtime.server.realtime` drives it.

What the model can and cannot do decides the mapping (see README, "Network API"):

- audio is ``audio/pcm`` at 24 kHz, mono, 16-bit little-endian, both ways; other formats are refused
  with an error (the bytes would be misread);
- turn detection is the engine's Silero VAD: ``server_vad`` maps ``threshold``,
  ``prefix_padding_ms``, ``silence_duration_ms`` and ``create_response``; ``semantic_vad`` is served
  by the same VAD and reported as ``server_vad``; ``null`` gives client-controlled turns;
- a voice is a greeting (the greeting's speech sets the speaker): names come from the server config;
- ``max_output_tokens`` counts LM positions (120 ms of speech and one text token each);
- there is no input transcription, noise reduction, tool calling or speed control: such settings
  are accepted and ``session.updated`` reports what is actually in force (``null``, ``[]``, ``1.0``).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sg2_runtime.engine.options import SessionOptions

SAMPLE_RATE = 24000
AUDIO_FORMAT = {"type": "audio/pcm", "rate": SAMPLE_RATE}
POSITION_MS = 120  # one LM position: 3 codec frames, one text token
MIN_COMMIT_MS = 100  # as the OpenAI server: a commit needs at least this much buffered audio

CLIENT_EVENT_TYPES = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.truncate",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
)


class ProtocolError(Exception):
    """A client event that cannot be honoured: becomes an ``error`` server event."""

    def __init__(
        self, code: str, message: str, *, param: str | None = None, type_: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.type = type_


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def server_event(type_: str, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "event_id": new_id("event"), **fields}


def error_event(
    code: str,
    message: str,
    *,
    param: str | None = None,
    event_id: str | None = None,
    type_: str = "invalid_request_error",
) -> dict[str, Any]:
    return server_event(
        "error",
        error={"type": type_, "code": code, "message": message, "param": param, "event_id": event_id},
    )


def error_from(exc: ProtocolError, event_id: str | None) -> dict[str, Any]:
    return error_event(exc.code, exc.message, param=exc.param, event_id=event_id, type_=exc.type)


# ---------------------------------------------------------------------------------------------- audio
def decode_audio(payload: Any) -> bytes:
    """base64 PCM16 from ``input_audio_buffer.append`` (validated strictly)."""
    if not isinstance(payload, str):
        raise ProtocolError("invalid_value", "audio must be a base64 string", param="audio")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("invalid_base64", f"audio is not valid base64: {exc}", param="audio") from exc
    if len(raw) % 2:
        raise ProtocolError(
            "invalid_audio", f"{len(raw)} bytes is not whole 16-bit samples (audio/pcm)", param="audio"
        )
    return raw


def encode_audio(pcm: np.ndarray) -> str:
    """Engine float32 audio in [-1, 1] -> base64 little-endian PCM16 (clipped, rounded)."""
    scaled = np.rint(np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0) * 32767.0)
    return base64.b64encode(scaled.astype("<i2").tobytes()).decode("ascii")


def pcm_ms(n_bytes: int) -> float:
    return n_bytes / 2 / SAMPLE_RATE * 1000.0


# ---------------------------------------------------------------------------------------------- session
@dataclass
class ClientConfig:
    """What the protocol layer keeps beside the engine's options."""

    voice: str
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])


def max_output_tokens(options: SessionOptions) -> int:
    return max(2, options.max_response_ms // POSITION_MS)


def turn_detection_object(options: SessionOptions) -> dict[str, Any] | None:
    td = options.turn_detection
    if not td.enabled:
        return None
    return {
        "type": "server_vad",
        "threshold": td.threshold,
        "prefix_padding_ms": td.prefix_padding_ms,
        "silence_duration_ms": td.silence_ms,
        "create_response": options.auto_reply,
        "interrupt_response": True,
        "idle_timeout_ms": None,
    }


def session_object(session_id: str, model: str, options: SessionOptions, cfg: ClientConfig) -> dict[str, Any]:
    """The effective configuration, as ``session.created`` / ``session.updated`` report it."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": list(cfg.output_modalities),
        "instructions": options.instructions or "",
        "audio": {
            "input": {
                "format": dict(AUDIO_FORMAT),
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": turn_detection_object(options),
            },
            "output": {"format": dict(AUDIO_FORMAT), "voice": cfg.voice, "speed": 1.0},
        },
        "tools": [],
        "tool_choice": "none",
        "max_output_tokens": max_output_tokens(options),
        "temperature": options.sampling.temperature,
        "truncation": "auto",
        "tracing": None,
        "prompt": None,
        "include": None,
    }


def check_format(value: Any, param: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ProtocolError("invalid_value", f"{param} must be an object", param=param)
    kind = value.get("type", "audio/pcm")
    rate = value.get("rate", SAMPLE_RATE)
    if kind != "audio/pcm" or rate != SAMPLE_RATE:
        raise ProtocolError(
            "unsupported_audio_format",
            f"only audio/pcm at {SAMPLE_RATE} Hz (mono PCM16) is supported, not {kind} at {rate} Hz",
            param=param,
        )


def check_modalities(value: Any, param: str) -> list[str]:
    if value not in (["audio"], ["text"]):
        raise ProtocolError("invalid_value", 'output_modalities must be ["audio"] or ["text"]', param=param)
    return list(value)


def _turn_detection_patch(td: Any, options: SessionOptions) -> dict[str, Any]:
    param = "session.audio.input.turn_detection"
    current = options.turn_detection.model_dump()
    if td is None:
        return {"turn_detection": {**current, "enabled": False}, "auto_reply": False}
    if not isinstance(td, dict):
        raise ProtocolError("invalid_value", "turn_detection must be an object or null", param=param)
    kind = td.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise ProtocolError("invalid_value", f"unknown turn_detection type {kind!r}", param=param + ".type")
    new = {**current, "enabled": True}
    if td.get("threshold") is not None:
        new["threshold"] = td["threshold"]
        new["release_threshold"] = None
    if td.get("prefix_padding_ms") is not None:
        new["prefix_padding_ms"] = td["prefix_padding_ms"]
    if td.get("silence_duration_ms") is not None:
        new["silence_ms"] = td["silence_duration_ms"]
        spec = new.get("speculative_silence_ms")
        if spec is not None and spec >= new["silence_ms"]:
            half = int(new["silence_ms"]) // 2
            new["speculative_silence_ms"] = half if half >= 32 else None
    create = td.get("create_response")
    return {"turn_detection": new, "auto_reply": True if create is None else bool(create)}


def session_update_patch(
    update: Any,
    options: SessionOptions,
    cfg: ClientConfig,
    voices: dict[str, int | None],
    default_max_ms: int,
) -> tuple[dict[str, Any], ClientConfig, list[str]]:
    """``session.update`` -> (partial SessionOptions, new ClientConfig, settings not honoured).

    Raises :class:`ProtocolError` for malformed values and for what would be misread (audio formats,
    both modalities at once); nothing is applied then. Settings the model cannot honour (transcription,
    tools, other voices, speed...) are listed in the third value and reported as they really are.
    """
    if not isinstance(update, dict):
        raise ProtocolError("invalid_value", "session must be an object", param="session")
    kind = update.get("type", "realtime")
    if kind != "realtime":
        raise ProtocolError(
            "unsupported_session_type",
            f"only realtime sessions are served, not {kind!r}",
            param="session.type",
        )
    patch: dict[str, Any] = {}
    ignored: list[str] = []
    new_cfg = ClientConfig(voice=cfg.voice, output_modalities=list(cfg.output_modalities))
    if "instructions" in update:
        text = update["instructions"]
        if text is not None and not isinstance(text, str):
            raise ProtocolError(
                "invalid_value", "instructions must be a string", param="session.instructions"
            )
        patch["instructions"] = text or None
    if update.get("output_modalities") is not None:
        new_cfg.output_modalities = check_modalities(update["output_modalities"], "session.output_modalities")
    if "max_output_tokens" in update:
        value = update["max_output_tokens"]
        if value is None or value == "inf":
            patch["max_response_ms"] = default_max_ms
        elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096:
            patch["max_response_ms"] = max(2, value) * POSITION_MS
        else:
            raise ProtocolError(
                "invalid_value",
                "max_output_tokens must be 1..4096 or 'inf'",
                param="session.max_output_tokens",
            )
    if "temperature" in update and update["temperature"] is not None:  # the beta API's sampling field
        patch["sampling"] = {**options.sampling.model_dump(), "temperature": update["temperature"]}
    audio = update.get("audio") or {}
    if not isinstance(audio, dict):
        raise ProtocolError("invalid_value", "audio must be an object", param="session.audio")
    audio_in = audio.get("input") or {}
    audio_out = audio.get("output") or {}
    if not isinstance(audio_in, dict) or not isinstance(audio_out, dict):
        raise ProtocolError("invalid_value", "audio.input/output must be objects", param="session.audio")
    check_format(audio_in.get("format"), "session.audio.input.format")
    check_format(audio_out.get("format"), "session.audio.output.format")
    if "turn_detection" in audio_in:
        patch.update(_turn_detection_patch(audio_in["turn_detection"], options))
    if audio_in.get("transcription") is not None:
        ignored.append("audio.input.transcription")
    if audio_in.get("noise_reduction") is not None:
        ignored.append("audio.input.noise_reduction")
    if audio_out.get("voice") is not None:
        voice = audio_out["voice"]
        name = voice.get("id") if isinstance(voice, dict) else voice
        if isinstance(name, str) and name in voices:
            new_cfg.voice = name
            patch["greeting"] = voices[name]
        else:
            ignored.append("audio.output.voice")
    if audio_out.get("speed") not in (None, 1, 1.0):
        ignored.append("audio.output.speed")
    if update.get("tools"):
        ignored.append("tools")
    for name in ("tracing", "prompt", "reasoning"):
        if update.get(name):
            ignored.append(name)
    return patch, new_cfg, ignored


def response_object(
    response_id: str,
    *,
    status: str,
    conversation_id: str,
    modalities: list[str],
    voice: str,
    max_tokens: int,
    output: list[dict[str, Any]],
    metadata: dict[str, Any] | None,
    status_details: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "object": "realtime.response",
        "id": response_id,
        "status": status,
        "status_details": status_details,
        "output": output,
        "conversation_id": conversation_id,
        "output_modalities": list(modalities),
        "max_output_tokens": max_tokens,
        "audio": {"output": {"format": dict(AUDIO_FORMAT), "voice": voice}},
        "usage": usage,
        "metadata": metadata,
    }


# engine status -> (response status, status_details)
def response_status(engine_status: str, error: str | None) -> tuple[str, dict[str, Any] | None]:
    if engine_status == "completed":
        return "completed", None
    if engine_status == "length":
        return "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
    if engine_status == "interrupted":
        return "cancelled", {"type": "cancelled", "reason": "turn_detected"}
    if engine_status == "cancelled":
        return "cancelled", {"type": "cancelled", "reason": "client_cancelled"}
    return "failed", {
        "type": "failed",
        "error": {"type": "server_error", "code": "engine_error", "message": error or "reply failed"},
    }


def usage_object(context_positions: int, generated_positions: int, speech_positions: int) -> dict[str, Any]:
    """Usage in LM positions: each is one text token plus 120 ms of speech (3 frames x 3 codebooks)."""
    out = max(generated_positions, speech_positions)
    return {
        "total_tokens": context_positions + out,
        "input_tokens": context_positions,
        "output_tokens": out,
        "output_token_details": {"text_tokens": out - speech_positions, "audio_tokens": speech_positions},
    }


def user_item(item_id: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "user",
        "status": "completed",
        "content": content,
    }


def assistant_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def user_text_from_item(item: Any) -> str:
    """The text of a ``conversation.item.create`` user message (``input_text`` parts only)."""
    if not isinstance(item, dict):
        raise ProtocolError("invalid_value", "item must be an object", param="item")
    if item.get("type", "message") != "message":
        raise ProtocolError(
            "unsupported_item_type",
            f"items of type {item.get('type')!r} are not supported (no tool calling)",
            param="item.type",
        )
    if item.get("role") != "user":
        raise ProtocolError(
            "unsupported_item_role",
            f"only user messages can be added, not {item.get('role')!r} ones (the model's turns are its own)",
            param="item.role",
        )
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise ProtocolError("invalid_value", "item.content must be a non-empty list", param="item.content")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "text"):
            raise ProtocolError(
                "unsupported_content_type",
                f"only input_text content can be added, not {kind!r} (send audio with input_audio_buffer)",
                param="item.content",
            )
        if not isinstance(part.get("text"), str):
            raise ProtocolError("invalid_value", "input_text needs a text string", param="item.content")
        texts.append(part["text"])
    text = " ".join(t.strip() for t in texts if t.strip())
    if not text:
        raise ProtocolError("invalid_value", "the message has no text", param="item.content")
    return text
