"""The protocol mapping on its own (no sockets, no models): audio conversion both ways, and what a
``session.update`` becomes in the engine's options and in the reported session."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from sg2_runtime.engine.options import SessionOptions
from sg2_runtime.server.protocol import (
    ClientConfig,
    ProtocolError,
    decode_audio,
    encode_audio,
    response_status,
    session_object,
    session_update_patch,
    usage_object,
    user_text_from_item,
)

VOICES = {"default": 0, "bright": 2, "none": None}


def _apply(
    update: dict, options: SessionOptions | None = None
) -> tuple[SessionOptions, ClientConfig, list[str]]:
    options = options or SessionOptions()
    patch, cfg, ignored = session_update_patch(update, options, ClientConfig("default"), VOICES, 30000)
    return SessionOptions.model_validate({**options.model_dump(), **patch}), cfg, ignored


def test_output_audio_is_clipped_rounded_pcm16() -> None:
    pcm = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.7, -3.0, 1e-5], dtype=np.float32)
    out = np.frombuffer(base64.b64decode(encode_audio(pcm)), dtype="<i2")
    assert out.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767, 0]


def test_input_audio_is_strict_base64_of_whole_samples() -> None:
    raw = np.arange(-5, 5, dtype="<i2").tobytes()
    assert decode_audio(base64.b64encode(raw).decode()) == raw
    for bad, code in [("@@@@", "invalid_base64"), ("QUJD", "invalid_audio"), (12, "invalid_value")]:
        with pytest.raises(ProtocolError) as exc:
            decode_audio(bad)
        assert exc.value.code == code and exc.value.param == "audio"


def test_turn_detection_mapping() -> None:
    opts, _, _ = _apply({"audio": {"input": {"turn_detection": None}}})
    assert not opts.turn_detection.enabled and not opts.auto_reply
    td = {"type": "server_vad", "threshold": 0.7, "prefix_padding_ms": 200, "silence_duration_ms": 200}
    opts, _, _ = _apply({"audio": {"input": {"turn_detection": {**td, "create_response": False}}}})
    t = opts.turn_detection
    assert (t.enabled, t.threshold, t.prefix_padding_ms, t.silence_ms) == (True, 0.7, 200, 200)
    assert t.release_threshold is None and t.speculative_silence_ms == 100 and not opts.auto_reply
    opts, _, _ = _apply(
        {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}
    )
    assert opts.turn_detection == SessionOptions().turn_detection and opts.auto_reply
    reported = session_object("s", "m", opts, ClientConfig("default"))["audio"]["input"]["turn_detection"]
    assert reported["type"] == "server_vad" and reported["silence_duration_ms"] == 500
    with pytest.raises(ProtocolError):
        _apply({"audio": {"input": {"turn_detection": {"type": "push_to_talk"}}}})


def test_settings_we_cannot_honour_are_reported_as_they_are() -> None:
    update = {
        "instructions": "Be brief.",
        "max_output_tokens": 8,
        "temperature": 0.6,
        "tools": [{"type": "function", "name": "f"}],
        "audio": {
            "input": {"transcription": {"model": "whisper-1"}, "noise_reduction": {"type": "far_field"}},
            "output": {"voice": "alloy", "speed": 1.3},
        },
    }
    opts, cfg, ignored = _apply(update)
    assert (
        opts.instructions == "Be brief." and opts.max_response_ms == 960 and opts.sampling.temperature == 0.6
    )
    assert cfg.voice == "default"
    assert set(ignored) == {
        "audio.input.transcription",
        "audio.input.noise_reduction",
        "audio.output.voice",
        "audio.output.speed",
        "tools",
    }
    session = session_object("sess_1", "speechgpt", opts, cfg)
    assert session["tools"] == [] and session["tool_choice"] == "none" and session["max_output_tokens"] == 8
    assert session["audio"]["input"]["transcription"] is None and session["audio"]["output"]["speed"] == 1.0
    opts, cfg, ignored = _apply({"audio": {"output": {"voice": "bright"}}, "max_output_tokens": "inf"})
    assert (opts.greeting, cfg.voice, ignored, opts.max_response_ms) == (2, "bright", [], 30000)


@pytest.mark.parametrize(
    ("update", "code"),
    [
        ({"type": "transcription"}, "unsupported_session_type"),
        ({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "unsupported_audio_format"),
        ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "unsupported_audio_format"),
        ({"output_modalities": ["audio", "text"]}, "invalid_value"),
        ({"max_output_tokens": 0}, "invalid_value"),
        ({"instructions": 5}, "invalid_value"),
    ],
)
def test_what_would_be_misread_is_refused(update: dict, code: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        _apply(update)
    assert exc.value.code == code


def test_statuses_usage_and_typed_items() -> None:
    assert response_status("length", None) == (
        "incomplete",
        {"type": "incomplete", "reason": "max_output_tokens"},
    )
    assert response_status("interrupted", None)[1]["reason"] == "turn_detected"
    assert response_status("cancelled", None)[1]["reason"] == "client_cancelled"
    status, details = response_status("error", "boom")
    assert status == "failed" and details["error"]["message"] == "boom"
    assert usage_object(100, 10, 8) == {
        "total_tokens": 110,
        "input_tokens": 100,
        "output_tokens": 10,
        "output_token_details": {"text_tokens": 2, "audio_tokens": 8},
    }
    item = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": " hi "}, {"type": "input_text", "text": "there"}],
    }
    assert user_text_from_item(item) == "hi there"
    for bad in (
        {"type": "function_call_output", "output": "x"},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "x"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": ""}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "  "}]},
    ):
        with pytest.raises(ProtocolError):
            user_text_from_item(bad)
