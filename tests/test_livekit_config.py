"""The LiveKit pieces that need no room: the token service of ``sg2 serve`` (what a token grants, who
may get one, what never leaves the server), ``sg2 serve``/``sg2 agent`` configuration, the engine
pool's choice of server, and the floor controller's speech decisions."""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
import jwt
import pytest

from agent.livekit.floor import WINDOW_MS, _Voice
from agent.livekit.servers import EnginePool, EngineServer, ServerStatus
from agent.livekit.settings import FloorSection, load_agent_settings
from agent.livekit.token_service import install as token_service
from sg2_runtime.engine.options import EngineConfig
from tests.conftest import REPO_ROOT
from tests.support.livekit_agent import mint_token
from tests.support.realtime import API_KEY, running_server, server_settings

pytestmark = pytest.mark.timeout(120)

SECRET = "a-livekit-secret-of-32-characters!!"
LIVEKIT = {"url": "ws://livekit.internal:7880", "public_url": "wss://rooms.example.org", "api_key": "APIkey1"}


def _settings(**livekit):
    return server_settings(livekit={**LIVEKIT, "api_secret": SECRET, **livekit})


async def test_tokens_are_room_scoped_short_lived_and_dispatch_the_agent(server_models) -> None:
    async with running_server(
        server_models, EngineConfig(max_sessions=1, max_positions=1024), _settings(), [token_service]
    ) as srv:
        status, tok = await mint_token(srv.http_url, room="standup", identity="alice", name="Alice")
        assert status == 200
        status2, fresh = await mint_token(srv.http_url)
        status3, pre = await mint_token(srv.http_url, room="sg2-standup")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{srv.http_url}/v1/livekit/config") as r:
                anonymous = await r.json()
            async with http.get(
                f"{srv.http_url}/v1/livekit/config", headers={"Authorization": f"Bearer {API_KEY}"}
            ) as r:
                keyed = await r.json()
            async with http.get(f"{srv.http_url}/metrics") as r:
                metrics = await r.text()

    assert (
        tok["url"] == "wss://rooms.example.org"
        and tok["room"] == "sg2-standup"
        and tok["identity"] == "alice"
    )
    assert tok["agent_name"] == "sg2" and tok["ttl_s"] == 600
    claims = jwt.decode(tok["token"], SECRET, algorithms=["HS256"], options={"verify_aud": False})
    assert claims["iss"] == "APIkey1" and claims["sub"] == "alice" and claims["name"] == "Alice"
    assert 590 <= claims["exp"] - time.time() <= 601
    video = claims["video"]
    assert video["room"] == "sg2-standup" and video["roomJoin"] is True
    assert video["canPublishSources"] == ["microphone"] and video["canSubscribe"] and video["canPublishData"]
    assert not any(video.get(k) for k in ("roomAdmin", "roomCreate", "roomList", "roomRecord", "agent"))
    assert claims["roomConfig"]["agents"][0]["agentName"] == "sg2"
    assert SECRET not in str(tok) and SECRET not in str(fresh)  # the secret only signs
    assert status2 == 200 and fresh["room"].startswith("sg2-") and fresh["identity"].startswith("user-")
    assert fresh["room"] != tok["room"]
    assert status3 == 200 and pre["room"] == "sg2-standup"  # the prefix is not doubled
    assert anonymous == {**keyed, "authorized": False} and keyed["authorized"] and keyed["auth_required"]
    assert keyed["token_endpoint"] == "/v1/livekit/token" and keyed["agent_name"] == "sg2"
    assert 'sg2_livekit_tokens_total{outcome="issued"} 3.0' in metrics


async def test_token_requests_need_the_api_key_and_valid_fields(server_models) -> None:
    settings = _settings(agent_name="", token_service={"allow_room_choice": False, "ttl_s": 60})
    async with running_server(
        server_models, EngineConfig(max_sessions=1, max_positions=1024), settings, [token_service]
    ) as srv:
        assert (await mint_token(srv.http_url, api_key=None))[0] == 401
        assert (await mint_token(srv.http_url, api_key="wrong"))[0] == 401
        ok, tok = await mint_token(srv.http_url)
        bad = [
            await mint_token(srv.http_url, room="mine"),  # rooms are not chosen here
            await mint_token(srv.http_url, identity="sg2-agent-x"),  # the agent's identities
            await mint_token(srv.http_url, identity="a b"),
            await mint_token(srv.http_url, metadata="x" * 3000),
            await mint_token(srv.http_url, admin=True),
        ]
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with http.post(f"{srv.http_url}/v1/livekit/token", data="[1]", headers=headers) as r:
                not_object = r.status
            async with http.post(f"{srv.http_url}/v1/livekit/token", data="x" * 9000, headers=headers) as r:
                too_big = r.status

    assert ok == 200 and tok["agent_name"] is None and tok["ttl_s"] == 60
    claims = jwt.decode(tok["token"], SECRET, algorithms=["HS256"], options={"verify_aud": False})
    assert "roomConfig" not in claims  # automatic dispatch: no agent named in the token
    assert [status for status, _ in bad] == [400] * 5
    assert "cannot be chosen" in bad[0][1]["error"]["message"]
    assert bad[4][1]["error"]["code"] == "unknown_field"
    assert not_object == 400 and too_big == 413


async def _serve(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        *args,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def test_sg2_serve_and_sg2_agent_configuration(tmp_path) -> None:
    cfg = tmp_path / "lk.yaml"
    cfg.write_text(
        "livekit:\n  url: ws://127.0.0.1:7880\n  api_key: k\n  api_secret: s3cret\n"
        "agent:\n  engine_servers: [{url: 'http://gpu-1:8000', api_key: e1}, {url: 'http://gpu-2:8000'}]\n"
        "  engine_api_key: shared\n"
    )
    rc, out = await _serve("serve", "--preset", "tiny-random", "--config", str(cfg), "--print-config")
    assert rc == 0 and "api_secret: '***'" in out and "s3cret" not in out
    rc, out = await _serve("serve", "--preset", "tiny-random", "--set", "livekit.url=ws://x:1", "--port", "0")
    assert rc == 2 and "livekit: api_key ($LIVEKIT_API_KEY), api_secret ($LIVEKIT_API_SECRET) not set" in out
    rc, out = await _serve("agent", "--config", str(cfg), "--print-config")
    assert rc == 0 and "s3cret" not in out and "e1" not in out and "shared" not in out
    assert out.count("'***'") == 3 and "http://gpu-2:8000" in out and "agent_name: sg2" in out
    rc, out = await _serve("agent", "--engine", "http://127.0.0.1:9")
    assert rc == 2 and "LiveKit url ($LIVEKIT_URL)" in out
    rc, out = await _serve(
        "agent", "--config", str(cfg), "--set", "agent.floor.release_threshold=0.9", "--print-config"
    )
    assert rc == 2 and "release_threshold must not exceed threshold" in out

    settings = load_agent_settings(cfg, [("livekit.agent_name", "")])
    assert settings.livekit.agent_name == "" and settings.livekit.resolved_api_secret() == "s3cret"
    a = settings.agent
    assert [a.engine_key(s) for s in a.engine_servers] == ["e1", "shared"]


def _status(name: str, capacity: int, left: int, ok: bool = True) -> ServerStatus:
    return ServerStatus(EngineServer(f"http://{name}:8000"), True, ok, capacity, left, capacity - left)


def test_pool_prefers_the_least_loaded_then_falls_back_to_recently_failed_servers() -> None:
    pool = EnginePool([EngineServer(f"http://{n}:8000") for n in ("a", "b", "c", "d")])
    statuses = [_status("a", 8, 2), _status("b", 64, 40), _status("c", 8, 8), _status("d", 8, 0)]
    assert [s.name for s in pool.order(statuses)] == ["c:8000", "b:8000", "a:8000"]  # d is full
    pool.mark_failed(pool.servers[2], "connection lost")
    assert [s.name for s in pool.order(statuses)] == ["b:8000", "a:8000", "c:8000"]  # c only as a fallback
    down = [_status("a", 8, 8, ok=False), ServerStatus(EngineServer("http://b:8000"), error="refused")]
    assert pool.order(down) == []
    with pytest.raises(ValueError, match="distinct"):
        EnginePool([EngineServer("http://a:8000"), EngineServer("ws://a:8000")])
    with pytest.raises(ValueError, match="http"):
        EngineServer("gpu-1:8000")
    assert EngineServer("ws://gpu:1/").realtime_url == "ws://gpu:1/v1/realtime"


def test_voice_onset_speech_and_fizzle() -> None:
    opts = FloorSection()
    v = _Voice(opts, slot=0)
    t = 0.0

    def feed(prob: float, dbfs: float = -20.0):
        nonlocal t
        t += WINDOW_MS / 1000
        return v.feed(prob, dbfs, t)

    assert feed(0.05) == (False, False, False)
    assert feed(0.3, dbfs=-60.0) == (False, False, False)  # too quiet for an onset
    assert feed(0.3) == (True, False, False)  # a likely onset: the fast stop
    assert feed(0.9) == (False, False, False)
    assert feed(0.9) == (False, True, False)  # 64 ms of speech: it has started
    assert v.speaking and v.quiet_ms(t) == 0
    for _ in range(opts.release_ms // WINDOW_MS + 1):
        feed(0.1)
    assert not v.speaking
    assert feed(0.25) == (True, False, False)  # an onset that never becomes speech ...
    results = [feed(0.2) for _ in range(6)]
    assert (False, False, True) in results  # ... fizzles (the worker resumes the agent's audio)
    assert not v.speaking
