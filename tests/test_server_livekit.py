"""livekit-plugins-openai 1.8.9's Realtime client, unchanged, against our server: the agent asks for
a reply, the caller speaks (server VAD) and is answered, and the plugin's mirror of the conversation
matches. (The LiveKit agent worker itself is another issue; this pins the wire compatibility.)"""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
from livekit import rtc
from livekit.plugins import openai as lk_openai
from openai.types.realtime.realtime_audio_input_turn_detection import ServerVad

from sg2_runtime.engine.options import EngineConfig
from tests.support.realtime import API_KEY, running_server
from tests.support.speech import load_reference_speech, pad_silence


async def _read(generation) -> list[tuple[str, int, str]]:
    out = []
    async for message in generation.message_stream:
        frames = [f async for f in message.audio_stream]
        text = "".join([t async for t in message.text_stream])
        assert all(f.sample_rate == 24000 and f.num_channels == 1 for f in frames)
        out.append((message.message_id, sum(f.samples_per_channel for f in frames), text))
    return out


async def test_livekit_realtime_model_talks_to_our_server(server_models, reference_dir) -> None:
    speech = load_reference_speech(reference_dir, "en", sample_rate=24000)[0][: 24000 * 2]
    pcm = (pad_silence(speech, 24000, 0.5, 1.0) * 32767).astype(np.int16)
    async with (
        running_server(server_models, EngineConfig(max_sessions=2, max_positions=1024)) as server,
        aiohttp.ClientSession() as http,
    ):
        model = lk_openai.realtime.RealtimeModel(
            base_url=f"{server.http_url}/v1",
            api_key=API_KEY,
            model="speechgpt-2.0-preview",
            http_session=http,
            input_audio_transcription=None,
            turn_detection=ServerVad(type="server_vad", silence_duration_ms=500, create_response=True),
        )
        session = model.session()
        errors: list[object] = []
        generations: asyncio.Queue = asyncio.Queue()
        session.on("error", errors.append)
        session.on("generation_created", generations.put_nowait)
        try:
            asked = await asyncio.wait_for(session.generate_reply(), 20)
            first = await asyncio.wait_for(_read(asked), 30)
            assert (await generations.get()) is asked
            for i in range(0, len(pcm), 2400):  # the caller speaks, 100 ms frames
                chunk = pcm[i : i + 2400]
                session.push_audio(rtc.AudioFrame(chunk.tobytes(), 24000, 1, len(chunk)))
            answered = await asyncio.wait_for(generations.get(), 30)
            second = await asyncio.wait_for(_read(answered), 30)
            roles = [getattr(item, "role", None) for item in session.chat_ctx.items]
            assert server.engine.live_sessions == 1
        finally:
            await session.aclose()

    assert asked.user_initiated and asked.response_id.startswith("resp_")
    assert not answered.user_initiated and answered.response_id != asked.response_id
    for messages in (first, second):
        assert len(messages) == 1
        _, samples, text = messages[0]
        assert samples == 8 * 2880 and text  # 8 positions of 120 ms (the test cap) and a transcript
    assert roles == ["assistant", "user", "assistant"]
    assert errors == []
