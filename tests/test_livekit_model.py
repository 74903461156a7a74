"""The SpeechGPT 2.0 livekit-agents RealtimeModel against real ``sg2 serve`` apps (no room needed):
server choice by load, a refusal for capacity, a server failing mid-call, a spoken turn through the
framework's generation streams, and what the model cannot do handled as documented."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import llm

from agent.livekit.model import EngineCallError, RealtimeModel
from agent.livekit.servers import EnginePool, EngineServer, NoEngineServerError
from sg2_runtime.engine.models import tiny_random_models
from sg2_runtime.engine.options import EngineConfig
from tests.support.realtime import API_KEY, running_server, server_settings
from tests.support.speech import load_reference_speech, pad_silence

pytestmark = pytest.mark.timeout(120)

SESSION = {"flow_control": "none", "sampling": {"greedy": True}, "max_response_ms": 960}


@pytest.fixture(scope="module")
def models_pair():
    return (
        tiny_random_models(max_sessions=4, max_positions=1024, seed=0),
        tiny_random_models(max_sessions=4, max_positions=1024, seed=0),
    )


@pytest.fixture(scope="module")
def en24(reference_dir) -> np.ndarray:
    return load_reference_speech(reference_dir, "en", sample_rate=24000)[0][: 24000 * 2]


@contextlib.asynccontextmanager
async def two_servers(models_pair, slots: int = 4):
    settings = server_settings(**{"realtime.session": SESSION})
    config = EngineConfig(max_sessions=slots, max_positions=1024)
    async with (
        running_server(models_pair[0], config, settings) as a,
        running_server(models_pair[1], config, settings) as b,
    ):
        yield a, b


async def _connected(sess, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while sess.server is None:
            await asyncio.sleep(0.01)  # polling the session's connection state


async def _hold_calls(server, n: int, stack: contextlib.AsyncExitStack) -> None:
    client = server.sdk_client()
    for _ in range(n):
        conn = await stack.enter_async_context(client.realtime.connect(model="sg2"))
        assert (await conn.recv()).type == "session.created"


def _frames(audio: np.ndarray, ms: int = 20) -> list[rtc.AudioFrame]:
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    n = 24000 * ms // 1000
    pcm = np.pad(pcm, (0, -len(pcm) % n))
    return [rtc.AudioFrame(pcm[i : i + n].tobytes(), 24000, 1, n) for i in range(0, len(pcm), n)]


def test_capabilities_are_stated_as_they_are() -> None:
    model = RealtimeModel(servers=["http://127.0.0.1:9"], api_key="k")
    caps = model.capabilities
    assert caps.turn_detection and caps.message_truncation and caps.audio_output
    assert caps.can_disable_turn_detection
    assert (
        not caps.user_transcription and not caps.manual_function_calls and not caps.auto_tool_reply_generation
    )
    assert not caps.mutable_chat_context and not caps.mutable_instructions and not caps.mutable_tools
    assert not caps.supports_say and not caps.supports_overlapping_speech
    assert model.provider == "sg2" and model.model == "speechgpt-2.0-preview"
    off = RealtimeModel(servers=["http://127.0.0.1:9"], api_key="k", turn_detection=None)
    assert not off.capabilities.turn_detection


async def test_a_new_call_goes_to_the_least_loaded_server(models_pair) -> None:
    async with two_servers(models_pair) as (a, b), contextlib.AsyncExitStack() as stack:
        await _hold_calls(a, 1, stack)
        await _hold_calls(b, 2, stack)
        model = RealtimeModel(servers=[EngineServer(a.http_url, API_KEY), EngineServer(b.http_url, API_KEY)])
        sess = model.session()
        try:
            await _connected(sess)
            assert sess.server.url == a.http_url
            assert (a.engine.live_sessions, b.engine.live_sessions) == (2, 2)
            statuses = {s.server.url: s for s in model.pool.statuses()}
            assert statuses[a.http_url].capacity_left == 3 and statuses[b.http_url].capacity_left == 2
            assert model.pool.capacity() == (5, 8)  # as last probed, before this call
        finally:
            await sess.aclose()
            await model.aclose()


async def test_a_server_full_by_the_time_of_connecting_is_skipped(models_pair, monkeypatch) -> None:
    async with two_servers(models_pair, slots=1) as (a, b), contextlib.AsyncExitStack() as stack:
        await _hold_calls(a, 1, stack)
        pool = EnginePool([EngineServer(a.http_url, API_KEY), EngineServer(b.http_url, API_KEY)])
        # a stale view (another worker took the last slot after the probe): the full server first
        monkeypatch.setattr(pool, "order", lambda statuses: [pool.servers[0], pool.servers[1]])
        model = RealtimeModel(servers=pool)
        sess = model.session()
        try:
            await _connected(sess)
            assert sess.server.url == b.http_url and b.engine.live_sessions == 1
            assert pool.statuses()[0].capacity_left == 0  # the refusal was noted
        finally:
            await sess.aclose()
            await model.aclose()


async def test_no_usable_server_is_an_unrecoverable_error() -> None:
    pool = EnginePool([EngineServer("http://127.0.0.1:9", "k")], health_timeout_s=0.5)
    with pytest.raises(NoEngineServerError, match=r"127\.0\.0\.1:9"):
        await pool.candidates()
    assert pool.load() == 1.0
    model = RealtimeModel(servers=pool, connect_timeout_s=1.0)  # re-probes the silent server for 1 s
    sess = model.session()
    errors: list[llm.RealtimeModelError] = []
    sess.on("error", errors.append)
    try:
        async with asyncio.timeout(10):
            while not errors:
                await asyncio.sleep(0.01)  # polling the emitted errors
        assert not errors[0].recoverable and "no engine server" in str(errors[0].error)
    finally:
        await sess.aclose()
        await model.aclose()


async def test_a_server_failing_mid_call_ends_the_call_and_new_calls_avoid_it(models_pair) -> None:
    async with two_servers(models_pair) as (a, b), contextlib.AsyncExitStack() as stack:
        await _hold_calls(a, 1, stack)
        model = RealtimeModel(servers=[EngineServer(a.http_url, API_KEY), EngineServer(b.http_url, API_KEY)])
        first = model.session()
        errors: list[llm.RealtimeModelError] = []
        first.on("error", errors.append)
        try:
            await _connected(first)
            assert first.server.url == b.http_url
            for call in list(b.calls.values()):
                call._abort()  # the connection drops as if the server died
            async with asyncio.timeout(10):
                while not errors:
                    await asyncio.sleep(0.01)  # polling the emitted errors
            assert not errors[-1].recoverable
            assert isinstance(errors[-1].error, EngineCallError) and "lost mid-call" in str(errors[-1].error)
            assert errors[-1].error.server.url == b.http_url
            # b is still up and emptier than a, but failed a call moments ago: new calls go to a
            second = model.session()
            await _connected(second)
            assert second.server.url == a.http_url
            await second.aclose()
        finally:
            await first.aclose()
            await model.aclose()


async def test_a_spoken_turn_through_the_framework_streams_and_the_unsupported_requests(
    models_pair, en24, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="sg2.livekit.model")
    async with two_servers(models_pair) as (a, _b):
        model = RealtimeModel(servers=[a.http_url], api_key=API_KEY, max_output_tokens=6)
        sess = model.session()
        generations: list[llm.GenerationCreatedEvent] = []
        speech: list[str] = []
        sess.on("generation_created", generations.append)
        sess.on("input_speech_started", lambda _e: speech.append("started"))
        sess.on("input_speech_stopped", lambda e: speech.append(f"stopped:{e.user_transcription_enabled}"))
        try:
            await _connected(sess)
            await sess.update_instructions("Answer briefly.")  # before the first turn: applied
            for frame in _frames(pad_silence(en24, 24000, 0.3, 1.2)):
                sess.push_audio(frame)
            async with asyncio.timeout(30):
                while not generations:
                    await asyncio.sleep(0.01)  # polling the emitted generations
            gen = generations[0]
            assert not gen.user_initiated and speech[:2] == ["started", "stopped:False"]
            message = await anext(aiter(gen.message_stream))
            frames = [f async for f in message.audio_stream]
            text = "".join([t async for t in message.text_stream])
            assert await message.modalities == ["audio", "text"]
            pcm = np.concatenate([np.frombuffer(f.data, np.int16) for f in frames])
            assert len(pcm) == 6 * 2880 and np.abs(pcm).max() > 300 and text

            call = next(iter(a.calls.values()))
            assert call.options.instructions == "Answer briefly."
            await sess.update_instructions("Now answer at length.")  # after a turn: kept, warned
            await sess.update_chat_ctx(
                llm.ChatContext(
                    [
                        llm.ChatMessage(role="user", content=["What is the weather like?"], id="typed-1"),
                        llm.ChatMessage(role="assistant", content=["Sunny."], id="made-up-1"),
                    ]
                )
            )
            reply = await asyncio.wait_for(sess.generate_reply(instructions="Be cheerful."), 10)
            assert reply.user_initiated
            message = await anext(aiter(reply.message_stream))
            assert len([f async for f in message.audio_stream]) == 6
            history = await call.session.history()
            text_ids = history[0, ::3].tolist()
            typed = a.engine.models.fmt.decode_text(text_ids)
            assert "What is the weather like?" in typed and "Sunny." not in typed
            assert call.options.instructions == "Answer briefly."
        finally:
            await sess.aclose()
            await model.aclose()
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "instructions can change only before the first user turn" in warnings
    assert "only user text messages can be added" in warnings
    assert "no per-reply instructions" in warnings
