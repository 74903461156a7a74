"""The network API under hostile or broken clients: authentication, capacity, malformed input,
flooding, vanished clients, timeouts, shutdown — and the engine never leaks a session.

Malformed input is sent over a raw aiohttp WebSocket (the SDK only sends well-formed events).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sg2_runtime.engine.options import EngineConfig
from tests.support.realtime import (
    API_KEY,
    b64_chunks,
    running_server,
    send_audio,
    server_settings,
    until,
    wait_until,
)
from tests.support.speech import load_reference_speech, pad_silence

CONFIG = EngineConfig(max_sessions=2, max_positions=1024)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def en24(reference_dir) -> np.ndarray:
    return load_reference_speech(reference_dir, "en", sample_rate=24000)[0][: 24000 * 3]


async def _next_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 30.0) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type} {msg.data!r}"
    return json.loads(msg.data)


async def _until_json(ws, type_: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    out = []
    while True:
        event = await _next_json(ws, timeout)
        out.append(event)
        if event["type"] == type_:
            return out


async def _metric(server, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{server.http_url}/metrics") as resp:
        text = await resp.text()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


async def test_api_keys_header_and_browser_subprotocol(server_models) -> None:
    async with running_server(server_models, CONFIG) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}/v1/realtime") as resp:  # no key at all
            assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
            body = await resp.json()
            assert (
                body["error"]["code"] == "invalid_api_key" and body["error"]["message"] == "missing API key"
            )
        with pytest.raises(aiohttp.WSServerHandshakeError) as no_key:
            await http.ws_connect(server.ws_url)
        assert no_key.value.status == 401
        with pytest.raises(InvalidStatus) as wrong:
            async with server.sdk_client(api_key="sk-wrong").realtime.connect(model="sg2") as conn:
                await conn.recv()
        assert wrong.value.response.status_code == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as wrong_proto:
            await http.ws_connect(server.ws_url, protocols=("realtime", "openai-insecure-api-key.sk-wrong"))
        assert wrong_proto.value.status == 401
        # browsers put the key in Sec-WebSocket-Protocol; the server answers with "realtime" only
        ws = await http.ws_connect(
            server.ws_url, protocols=("realtime", f"openai-insecure-api-key.{API_KEY}")
        )
        assert ws.protocol == "realtime"
        assert (await _next_json(ws))["type"] == "session.created"
        await ws.close()
        async with server.sdk_client().realtime.connect(model="sg2") as conn:
            assert (await conn.recv()).type == "session.created"
        async with http.get(f"{server.http_url}/v1/realtime", headers=AUTH) as resp:  # not a WebSocket
            assert resp.status == 426
        await wait_until(lambda: server.engine.live_sessions == 0, what="sessions closed")
        assert await _metric(server, "sg2_server_connections_total", outcome="unauthorized") == 4
        assert await _metric(server, "sg2_server_connections_total", outcome="accepted") == 2


async def test_capacity_full_gets_a_clear_error_and_close(server_models) -> None:
    async with running_server(server_models, EngineConfig(max_sessions=1, max_positions=1024)) as server:
        async with aiohttp.ClientSession() as http:
            first = await http.ws_connect(server.ws_url, headers=AUTH)
            assert (await _next_json(first))["type"] == "session.created"
            second = await http.ws_connect(server.ws_url, headers=AUTH)
            refused = await _next_json(second)
            closing = await asyncio.wait_for(second.receive(), 10)
            assert refused["type"] == "error" and refused["error"]["code"] == "session_capacity_exceeded"
            assert refused["error"]["type"] == "server_error" and "capacity" in refused["error"]["message"]
            assert closing.type == aiohttp.WSMsgType.CLOSE and second.close_code == 1013
            assert server.engine.metrics.sessions_refused._value.get() == 1
            await first.close()
            await wait_until(lambda: server.engine.live_sessions == 0, what="the slot freed")
            third = await http.ws_connect(server.ws_url, headers=AUTH)
            assert (await _next_json(third))["type"] == "session.created"
            await third.close()
        await wait_until(lambda: server.engine.live_sessions == 0, what="sessions closed")


async def test_malformed_input_gets_error_events_and_the_call_goes_on(server_models) -> None:
    settings = server_settings(**{"server.max_message_bytes": 64 * 1024})
    async with running_server(server_models, CONFIG, settings) as server, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(server.ws_url, headers=AUTH)
        assert (await _next_json(ws))["type"] == "session.created"
        cases = [
            ("{not json", "invalid_json"),
            ("[" * 30_000 + "]" * 30_000, "invalid_json"),  # nesting deep enough to break the parser
            ("[1, 2, 3]", "invalid_event"),
            (json.dumps({"type": "response.fly", "event_id": "evt_1"}), "unknown_event"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}), "invalid_base64"),
            (
                json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
                "invalid_audio",
            ),
            (json.dumps({"type": "input_audio_buffer.append", "audio": 42}), "invalid_value"),
            (
                json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (80 * 1024)}),
                "message_too_large",
            ),
            (
                json.dumps({"type": "session.update", "session": {"type": "transcription"}}),
                "unsupported_session_type",
            ),
            (
                json.dumps({"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 10}),
                "item_not_found",
            ),
            (
                json.dumps({"type": "response.create", "response": {"conversation": "none"}}),
                "unsupported_value",
            ),
            (json.dumps({"type": "output_audio_buffer.clear"}), "unsupported_event"),
        ]
        for text, code in cases:
            await ws.send_str(text)
            event = await _next_json(ws)
            assert event["type"] == "error" and event["error"]["code"] == code, (text[:60], event)
        await ws.send_bytes(b"\x00\x01")
        assert (await _next_json(ws))["error"]["code"] == "invalid_message"
        await ws.send_str(json.dumps({"type": "response.fly", "event_id": "evt_42"}))
        assert (await _next_json(ws))["error"]["event_id"] == "evt_42"
        # still alive and well
        await ws.send_str(
            json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "hi"}})
        )
        updated = await _next_json(ws)
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "hi"
        assert not ws.closed and server.engine.live_sessions == 1
        # a message beyond the hard limit closes the connection (1009), and the session is freed
        with contextlib.suppress(ConnectionError):  # the server may hang up before all of it is sent
            await ws.send_str("x" * (settings.server.hard_max_message_bytes + 10))
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        await wait_until(lambda: server.engine.live_sessions == 0, what="session freed")
        assert await _metric(server, "sg2_server_disconnects_total", reason="protocol_error") == 1
        assert await _metric(server, "sg2_server_errors_total", code="invalid_json") == 2


async def test_audio_and_event_flooding_is_bounded(server_models, en24) -> None:
    settings = server_settings(
        **{
            "realtime.input_burst_ms": 2000,
            "realtime.input_rate_limit": 1.0,
            "server.max_client_events_per_s": 50,
        }
    )
    async with running_server(server_models, CONFIG, settings) as server, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(server.ws_url, headers=AUTH)
        await _next_json(ws)
        t0 = time.monotonic()
        audio = np.tile(en24, 2)[: 24000 * 6]  # 6 s of speech sent at once: 4 s too many
        for chunk in b64_chunks(audio, chunk_ms=500):
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        rate = await _until_json(ws, "error")
        assert rate[-1]["error"]["code"] == "input_audio_rate_exceeded"
        admitted = await _metric(server, "sg2_server_input_audio_seconds_total")
        elapsed = time.monotonic() - t0
        assert 2.0 <= admitted <= 2.0 + elapsed * 1.0 + 0.5  # the burst, plus real time since the start
        # many tiny events in a burst: the event bucket (50/s, burst 200) drops the excess
        tiny = base64.b64encode(b"\x00\x00" * 24).decode()  # 1 ms of silence
        for _ in range(400):
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": tiny}))
        events = await _until_json(ws, "error")
        assert events[-1]["error"]["code"] == "rate_limit_exceeded"
        # the call survives: as soon as the bucket has a token again, events are answered
        deadline = time.monotonic() + 10
        answered = False
        while not answered and time.monotonic() < deadline:
            await ws.send_str(json.dumps({"type": "input_audio_buffer.clear"}))
            with contextlib.suppress(TimeoutError):
                while not answered:  # (VAD events of the admitted speech may come first)
                    answered = (await _next_json(ws, timeout=0.1))["type"] == "input_audio_buffer.cleared"
        assert answered
        assert not ws.closed and server.engine.live_sessions == 1
        await ws.close()
        await wait_until(lambda: server.engine.live_sessions == 0, what="session freed")


async def test_client_vanishing_mid_reply_frees_its_session_at_once(server_models, en24) -> None:
    settings = server_settings(
        **{
            "realtime.session": {
                "flow_control": "realtime",
                "max_response_ms": 12000,
                "sampling": {"greedy": True},
            }
        }
    )
    async with running_server(server_models, CONFIG, settings) as server:
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(server.ws_url, headers=AUTH)
        await _next_json(ws)
        for chunk in b64_chunks(pad_silence(en24, 24000, 0.3, 1.0)):
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        await _until_json(ws, "response.output_audio.delta")
        assert server.engine.live_sessions == 1
        t0 = time.monotonic()
        await http.close()  # the TCP connection drops: no close frame, mid-reply
        await wait_until(lambda: server.engine.live_sessions == 0, timeout=5, what="session freed")
        assert time.monotonic() - t0 < 2.0 and not server.calls
        assert server.engine.capacity_left == 2


async def test_silent_peer_is_dropped_by_heartbeat_and_idle_client_by_timeout(server_models) -> None:
    settings = server_settings(**{"server.heartbeat_s": 0.4, "server.idle_timeout_s": 1.0})
    async with running_server(server_models, CONFIG, settings) as server, aiohttp.ClientSession() as http:
        # a peer that neither reads nor answers pings (a frozen or unplugged machine)
        silent = await http.ws_connect(server.ws_url, headers=AUTH, autoping=False)
        await wait_until(lambda: server.engine.live_sessions == 1, what="session opened")
        await wait_until(lambda: server.engine.live_sessions == 0, timeout=5, what="heartbeat drop")
        await silent.close()
        # a connected client that sends nothing: error event, then close
        idle = await http.ws_connect(server.ws_url, headers=AUTH, heartbeat=0.2)
        t0 = time.monotonic()
        events = await _until_json(idle, "error", timeout=10)
        msg = await asyncio.wait_for(idle.receive(), 10)
        assert events[-1]["error"]["code"] == "idle_timeout" and 0.9 <= time.monotonic() - t0 < 5
        assert msg.type == aiohttp.WSMsgType.CLOSE
        await wait_until(lambda: server.engine.live_sessions == 0, what="idle session freed")


async def test_handshake_timeout_closes_slow_connections(server_models) -> None:
    settings = server_settings(**{"server.handshake_timeout_s": 0.5})
    async with running_server(server_models, CONFIG, settings) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # never finished
        await writer.drain()
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert 0.4 <= time.monotonic() - t0 < 5
        writer.close()


async def test_health_metrics_and_graceful_shutdown(server_models, en24) -> None:
    async with running_server(server_models, CONFIG) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}/healthz") as resp:
            health = await resp.json()
        assert resp.status == 200 and health["ok"] is True
        assert (health["live_sessions"], health["capacity"], health["capacity_left"]) == (0, 2, 2)
        assert health["model"]["name"] == "speechgpt-2.0-preview" and health["model"]["preset"] is None
        async with server.sdk_client().realtime.connect(model="sg2") as conn:
            await conn.recv()
            await send_audio(conn, pad_silence(en24, 24000, 0.3, 1.0))
            await until(conn, lambda e: e.type == "response.done")
            async with http.get(f"{server.http_url}/healthz") as resp:
                assert (await resp.json())["live_sessions"] == 1
            async with http.get(f"{server.http_url}/metrics") as resp:
                text = await resp.text()
                assert resp.headers["Content-Type"].startswith("text/plain")
            for name in (
                "sg2_active_sessions 1.0",
                'sg2_server_connections_total{outcome="accepted"} 1.0',
                'sg2_server_client_events_total{type="input_audio_buffer.append"}',
                "sg2_server_send_lag_seconds_count",
                "sg2_server_commit_to_first_audio_seconds_count 1.0",
                'sg2_replies_total{status="length"} 1.0',
                "sg2_commit_to_first_audio_seconds_count 1.0",
            ):
                assert name in text, name
            await server.app.shutdown()  # what SIGTERM does: open calls are told and closed
            events = await until(conn, lambda e: e.type == "error")
            assert events[-1].error.code == "server_shutting_down"
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(conn.recv(), 10)
            assert closed.value.rcvd.code == 1001
        await wait_until(lambda: server.engine.live_sessions == 0, what="sessions closed")
