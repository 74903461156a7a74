"""Signalling edge cases of the browser-call endpoint, and calls that end without a hang-up.

Bad input gets a clear HTTP error and leaves nothing behind; a caller that vanishes (process
killed: no DELETE, no DTLS close) is cleaned up by the media timeout; a closed tab (the peer
closes its connection) and a server shutdown end the call at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from agent.direct import DirectSettings
from agent.direct.client import DirectClient, SignallingFailed
from agent.direct.service import DirectService
from tests.support import REPO_ROOT
from tests.support.direct import direct_server

pytestmark = pytest.mark.timeout(120)

CALLS = "/v1/webrtc/calls"


async def _offer_sdp(audio: bool = True, extra: str | None = None) -> str:
    pc = RTCPeerConnection()
    try:
        if audio:
            pc.addTransceiver("audio", direction="sendrecv")
        else:
            pc.createDataChannel("events")
        if extra is not None:
            pc.addTransceiver(extra, direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


async def _post(url: str, body: bytes | str, ctype: str = "application/sdp", **headers: str):
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + CALLS, data=body, headers={"Content-Type": ctype, **headers}) as resp,
    ):
        text = await resp.text()
        return resp.status, text, dict(resp.headers)


def _code(text: str) -> str:
    return json.loads(text)["error"]["code"]


async def test_malformed_and_oversized_offers_get_clear_errors(tiny_models) -> None:
    async with direct_server(tiny_models, max_sdp_bytes=4096) as srv:
        good = await _offer_sdp()
        cases = [
            (b"hello, this is not SDP", "application/sdp", 400, "malformed_sdp"),
            (b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\nm=audio nonsense\r\n", "application/sdp", 400, "malformed_sdp"),
            (b"\xff\xfe\x00v=0", "application/sdp", 400, "malformed_sdp"),
            ((await _offer_sdp(audio=False)).encode(), "application/sdp", 400, "malformed_sdp"),
            (good.replace("opus", "xopus").encode(), "application/sdp", 400, "unsupported_offer"),
            (good.replace("a=sendrecv", "a=recvonly").encode(), "application/sdp", 400, "unsupported_offer"),
            ((await _offer_sdp(extra="video")).encode(), "application/sdp", 400, "unsupported_offer"),
            ((await _offer_sdp(extra="audio")).encode(), "application/sdp", 400, "unsupported_offer"),
            (good.encode(), "text/plain", 415, "unsupported_media_type"),
            (b"{not json", "application/json", 400, "malformed_request"),
            (json.dumps({"sdp": good, "options": {"flow_control": "none"}}).encode(), "application/json", 400,
             "invalid_options"),
            (json.dumps({"sdp": good, "options": {"max_response_ms": 5}}).encode(), "application/json", 400,
             "invalid_options"),
            (b"v=0\r\n" + b"a=x-padding:" + b"x" * 5000 + b"\r\n", "application/sdp", 413, "offer_too_large"),
        ]  # fmt: skip
        for body, ctype, status, code in cases:
            got, text, _ = await _post(srv.url, body, ctype)
            assert (got, _code(text)) == (status, code), (body[:60], text)
            assert "message" in json.loads(text)["error"]

        # an oversized body without Content-Length (chunked) is cut off at the limit too
        async def chunks():
            for _ in range(10):
                yield b"v=0\r\n" + b"a=x:" + b"y" * 1000 + b"\r\n"

        async with (
            aiohttp.ClientSession() as http,
            http.post(srv.url + CALLS, data=chunks(), headers={"Content-Type": "application/sdp"}) as resp,
        ):
            assert resp.status == 413 and _code(await resp.text()) == "offer_too_large"

        # nothing was left behind, and a good offer still works
        assert srv.service.calls == {} and srv.engine.live_sessions == 0
        offers = srv.service.metrics.registry.get_sample_value
        assert offers("sg2_direct_offers_total", {"outcome": "malformed_sdp"}) == 4
        assert offers("sg2_direct_offers_total", {"outcome": "offer_too_large"}) == 2
        got, answer, headers = await _post(srv.url, good)
        assert got == 201 and answer.startswith("v=0") and headers["Location"].startswith(CALLS + "/call_")
        assert headers["Content-Type"].startswith("application/sdp")
        call_id = headers["Location"].rsplit("/", 1)[1]
        async with aiohttp.ClientSession() as http:
            async with http.patch(srv.url + headers["Location"], data=b"a=candidate:x") as resp:
                assert resp.status == 405 and _code(await resp.text()) == "trickle_not_supported"
            async with http.delete(srv.url + headers["Location"]) as resp:
                assert resp.status == 204
            async with http.delete(srv.url + headers["Location"]) as resp:
                assert resp.status == 404 and _code(await resp.text()) == "no_such_call"
        assert call_id not in srv.service.calls and srv.engine.live_sessions == 0


async def test_access_key_is_required_when_configured(tiny_models) -> None:
    async with direct_server(tiny_models, access_key="s3cret-key") as srv:
        sdp = await _offer_sdp()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
            status, text, got = await _post(srv.url, sdp, **headers)
            assert status == 401 and _code(text) == "unauthorized"
            assert got["WWW-Authenticate"].startswith("Bearer")
        async with aiohttp.ClientSession() as http:
            async with http.get(srv.url + "/v1/webrtc/config") as resp:
                config = await resp.json()
                assert config["auth_required"] and not config["authorized"]
            async with http.get(srv.url + CALLS) as resp:
                assert resp.status == 401
        with pytest.raises(SignallingFailed) as refused:
            async with DirectClient(srv.url, key="nope") as client:
                await client.call()
        assert refused.value.status == 401
        async with DirectClient(srv.url, key="s3cret-key") as client:
            await client.call()
            await client.wait_event(lambda m: m["type"] == "call")
            assert await client.hangup() == 204
        assert srv.engine.live_sessions == 0


async def test_host_server_keys_protect_the_endpoint_unless_it_has_its_own(tiny_models) -> None:
    """Under `sg2 serve` the server's API keys apply when no direct.access_key is set."""
    api_keys = {"api-key-1"}
    async with direct_server(tiny_models, key_check=lambda k: k in api_keys) as srv:
        sdp = await _offer_sdp()
        assert (await _post(srv.url, sdp))[0] == 401
        assert (await _post(srv.url, sdp, Authorization="Bearer api-key-2"))[0] == 401
        async with DirectClient(srv.url, key="api-key-1") as client:
            await client.call()
            assert await client.hangup() == 204
    async with direct_server(tiny_models, key_check=lambda k: k in api_keys, access_key="own") as srv:
        sdp = await _offer_sdp()
        assert (await _post(srv.url, sdp, Authorization="Bearer api-key-1"))[0] == 401
        status, _, headers = await _post(srv.url, sdp, Authorization="Bearer own")
        assert status == 201
        async with aiohttp.ClientSession() as http:
            await http.delete(srv.url + headers["Location"], headers={"Authorization": "Bearer own"})
        assert srv.engine.live_sessions == 0


async def test_call_limit_and_engine_capacity_answer_503(tiny_models) -> None:
    async with direct_server(tiny_models, max_calls=1) as srv:
        async with DirectClient(srv.url) as first:
            await first.call()
            status, text, headers = await _post(srv.url, await _offer_sdp())
            assert status == 503 and _code(text) == "call_limit" and headers["Retry-After"]
            assert await first.hangup() == 204
        async with DirectClient(srv.url) as again:  # the slot is free again
            await again.call()
            assert await again.hangup() == 204

    # offers answered at the same time count once each against the limit
    async with (
        direct_server(tiny_models, max_calls=2) as srv,
        DirectClient(srv.url) as a,
        DirectClient(srv.url) as b,
    ):
        await asyncio.gather(a.call(), b.call())
        assert len(srv.service.calls) == 2
        status, text, _ = await _post(srv.url, await _offer_sdp())
        assert status == 503 and _code(text) == "call_limit"

    async with direct_server(tiny_models, max_sessions=1, max_calls=4) as srv:
        async with DirectClient(srv.url) as first:
            await first.call()
            status, text, _ = await _post(srv.url, await _offer_sdp())
            assert status == 503 and _code(text) == "engine_full"
            assert len(srv.service.calls) == 1 and srv.engine.live_sessions == 1
            await first.hangup()
        assert srv.engine.live_sessions == 0


async def test_an_offer_that_never_connects_is_dropped(tiny_models) -> None:
    async with direct_server(tiny_models, connect_timeout_s=1.0) as srv:
        status, _, headers = await _post(srv.url, await _offer_sdp())  # that peer is already gone
        assert status == 201
        call = srv.service.calls[headers["Location"].rsplit("/", 1)[1]]
        await asyncio.wait_for(call.wait_closed(), 15)
        assert call.end_kind == "connect_timeout" and call.end_reason == "not connected within 1 s"
        assert srv.service.calls == {} and srv.engine.live_sessions == 0


async def test_vanished_caller_is_cleaned_up(tiny_models) -> None:
    """The caller's process is killed mid-call: no DELETE, no DTLS close, its packets just stop."""
    async with direct_server(tiny_models, media_timeout_s=1.5) as srv:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.direct.client", srv.url, "--seconds", "60",
            cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            placed = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            assert placed["type"] == "placed"
            assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) == {"type": "connected"}
            call = srv.service.calls[placed["call_id"]]
            assert srv.engine.live_sessions == 1
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await asyncio.wait_for(call.wait_closed(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert "no audio from the caller" in call.end_reason
        assert srv.service.calls == {} and srv.engine.live_sessions == 0
        metric = srv.service.metrics.registry.get_sample_value
        assert metric("sg2_direct_calls_ended_total", {"reason": "media_timeout"}) == 1
        assert metric("sg2_direct_active_calls") == 0


async def test_closed_tab_and_server_shutdown_end_calls(tiny_models) -> None:
    async with direct_server(tiny_models) as srv:
        # a closed tab: the browser closes its peer connection (DTLS close_notify), no DELETE
        async with DirectClient(srv.url) as tab:
            await tab.call()
            await tab.wait_event(lambda m: m["type"] == "call")
            call = srv.service.calls[tab.call_id]
            await tab.pc.close()
            await asyncio.wait_for(call.wait_closed(), 15)
        assert call.end_reason == "connection closed by the peer"
        assert srv.engine.live_sessions == 0

        # server shutdown: every call is told and closed, every session released
        async with DirectClient(srv.url) as a, DirectClient(srv.url) as b:
            for c in (a, b):
                await c.call()
                await c.wait_event(lambda m: m["type"] == "call")
            assert srv.engine.live_sessions == 2
            await srv.runner.shutdown()  # aiohttp's graceful-shutdown phase (on_shutdown)
            for c in (a, b):
                ended = await c.wait_event(lambda m: m["type"] == "call_ended")
                assert ended["reason"] == "server shutdown"
            assert srv.service.calls == {} and srv.engine.live_sessions == 0
            status, text, _ = await _post(srv.url, await _offer_sdp())
            assert status == 503 and _code(text) == "shutting_down"
        metric = srv.service.metrics.registry.get_sample_value
        assert metric("sg2_direct_calls_ended_total", {"reason": "peer_closed"}) == 1
        assert metric("sg2_direct_calls_ended_total", {"reason": "shutdown"}) == 2


async def test_ice_servers_reach_authorized_pages_only(tiny_models) -> None:
    ice = [
        {"urls": "stun:stun.invalid:3478"},
        {"urls": ["turn:turn.invalid:3478?transport=udp"], "username": "u", "credential": "p"},
    ]
    async with (
        direct_server(tiny_models, ice_servers=ice, access_key="k") as srv,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(srv.url + "/v1/webrtc/config") as resp:
            assert (await resp.json())["ice_servers"] == []  # no TURN credentials without the key
        async with http.get(srv.url + "/v1/webrtc/config", headers={"Authorization": "Bearer k"}) as resp:
            config = await resp.json()
        assert config["authorized"] and config["ice_servers"] == [
            {"urls": ["stun:stun.invalid:3478"]},
            {"urls": ["turn:turn.invalid:3478?transport=udp"], "username": "u", "credential": "p"},
        ]
        service_ice = srv.service._ice_servers()
        assert [s.urls for s in service_ice] == [
            ["stun:stun.invalid:3478"],
            ["turn:turn.invalid:3478?transport=udp"],
        ]
        assert service_ice[1].username == "u" and service_ice[1].credential == "p"
    with pytest.raises(ValueError, match="must start with stun:, turn: or turns:"):
        DirectSettings(ice_servers=[{"urls": "http://example.org"}])
    # no ICE servers configured: an explicit empty list, so aiortc does not fall back to a public STUN server
    assert DirectService(None, DirectSettings())._ice_servers() == []
