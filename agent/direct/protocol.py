"""JSON messages on the call's data channel (label ``events``), both directions.

Server → page (every message has ``type``; times ``*_ms`` on the caller's audio timeline are
milliseconds of audio received since the call started):

- ``call`` {call_id, session_id}: sent first.
- ``state`` {state: listening | thinking | speaking}: the agent's state as the caller hears it
  (``speaking`` from the first audio frame of a reply actually sent, back to ``listening`` when the
  reply has played out or was cut).
- ``speech_started`` {audio_ms}, ``speech_stopped`` {audio_ms}: the caller's voice activity.
- ``turn_committed`` {turn_id, kind, start_ms, end_ms, reason}: a user turn ended.
- ``response_started`` {response_id, turn_id, greeting}.
- ``agent_text`` {response_id, text}: text of the reply, sent when the audio it belongs to starts
  playing (not when it is generated).
- ``response_done`` {response_id, status, played_ms, text}: the reply finished playing
  (``completed``/``length``) or was cut (``interrupted``/``cancelled``; ``text`` is then what was
  heard).
- ``latency`` {response_id, total_ms, endpointing_ms, engine_ms, transport_ms, model_ms}: per reply,
  from the end of the caller's speech as received by the server to the reply's first audio frame
  sent = endpointing (VAD silence wait) + engine (input framing, VAD, commit, generation not done
  ahead) + transport (outbound queue and pacing); ``model_ms`` is the engine's commit -> first audio.
- ``error`` {code, message, fatal}.
- ``call_ended`` {reason}: the server is closing the call.
- ``pong`` {t}: answer to ``ping``.

Page → server: ``ping`` {t}, ``interrupt`` {} (stop the agent), ``text`` {text} (a typed turn).
"""

from __future__ import annotations

import json
from typing import Any

STATES = ("listening", "thinking", "speaking")
CLIENT_MESSAGE_TYPES = ("ping", "interrupt", "text")
MAX_CLIENT_MESSAGE = 8192


def encode(message_type: str, /, **fields: Any) -> str:
    return json.dumps({"type": message_type, **fields}, ensure_ascii=False, separators=(",", ":"))


class ClientMessageError(ValueError):
    pass


def decode_client_message(raw: str | bytes) -> dict[str, Any]:
    """Parse and validate one page → server message."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="strict")
    if len(raw) > MAX_CLIENT_MESSAGE:
        raise ClientMessageError(f"message longer than {MAX_CLIENT_MESSAGE} characters")
    try:
        msg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ClientMessageError(f"not JSON: {exc}") from exc
    if not isinstance(msg, dict) or msg.get("type") not in CLIENT_MESSAGE_TYPES:
        raise ClientMessageError(f"unknown message; expected one of {', '.join(CLIENT_MESSAGE_TYPES)}")
    if msg["type"] == "text" and (not isinstance(msg.get("text"), str) or not msg["text"].strip()):
        raise ClientMessageError("'text' needs a non-empty string field 'text'")
    return msg
