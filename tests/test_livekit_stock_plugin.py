"""The stock ``livekit-plugins-openai`` RealtimeModel, pointed at ``sg2 serve`` with nothing but its base
URL and key, drives an ``AgentSession`` in a real LiveKit room: a human speaks and hears the reply and
its transcription (one full turn). This is what users with an existing OpenAI-realtime agent get by
changing its URL; ``agent.livekit.RealtimeModel`` adds load balancing and the model's real limits."""

from __future__ import annotations

import contextlib

import pytest
from livekit import api, rtc
from livekit.agents import Agent, AgentSession
from livekit.agents.voice import room_io
from livekit.plugins import openai as lk_openai

from sg2_runtime.engine.options import EngineConfig
from tests.support.livekit_participant import RoomParticipant
from tests.support.livekit_server import LiveKitServer
from tests.support.realtime import API_KEY, running_server, server_settings
from tests.support.speech import load_reference_speech, pad_silence

pytestmark = pytest.mark.timeout(120)


def _agent_token(lk: LiveKitServer, room: str) -> str:
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        agent=True,
        can_publish=True,
        can_subscribe=True,
        can_publish_data=True,
        can_update_own_metadata=True,  # the agent's state attribute
    )
    token = api.AccessToken(lk.api_key, lk.api_secret).with_identity("stock-agent").with_kind("agent")
    return token.with_grants(grants).to_jwt()


async def test_stock_openai_realtime_plugin_serves_one_turn_in_a_room(
    livekit_server: LiveKitServer, server_models, reference_dir
) -> None:
    clip = pad_silence(load_reference_speech(reference_dir, "en", 24000)[0][: 24000 * 2], 24000, 0.2, 0.0)
    settings = server_settings(
        **{
            "realtime.session": {
                "flow_control": "realtime",
                "sampling": {"greedy": True},
                "max_response_ms": 2400,
            }
        }
    )
    async with running_server(
        server_models, EngineConfig(max_sessions=2, max_positions=1024), settings
    ) as server:
        model = lk_openai.realtime.RealtimeModel(base_url=f"{server.http_url}/v1", api_key=API_KEY)
        session = AgentSession(
            llm=model, vad=None, turn_handling={"turn_detection": "realtime_llm"}, aec_warmup_duration=None
        )
        agent_room = rtc.Room()
        errors: list[object] = []
        session.on("error", lambda ev: errors.append(ev.error))
        try:
            await agent_room.connect(livekit_server.url, _agent_token(livekit_server, "stock"))
            async with RoomParticipant.join(
                livekit_server.url, livekit_server.token("alice", "stock"), "alice"
            ) as alice:
                await session.start(
                    Agent(instructions="You are a helpful voice assistant."),
                    room=agent_room,
                    room_options=room_io.RoomOptions(close_on_disconnect=False),
                )
                await alice.expect(
                    lambda: (
                        alice.agent is not None
                        and alice.agent_attribute("lk.agent.state") == "listening"
                        and alice.heard
                    ),
                    "the stock agent listening",
                )
                sent = await alice.say(clip)
                first = await alice.expect(lambda: alice.first_voiced(sent.voiced_end), "the reply")
                assert not alice.voiced_frames(0, sent.voiced_end)
                await alice.expect(lambda: alice.voiced_ms(first) >= 1000, "a second of reply")
                await alice.expect(
                    lambda: any(t.participant == "stock-agent" and t.text.strip() for t in alice.transcripts),
                    "the reply's transcription",
                )
                assert server.engine.live_sessions == 1
                call = next(iter(server.calls.values()))
                assert call.options.turn_detection.enabled  # semantic_vad served by the engine's VAD
        finally:
            with contextlib.suppress(Exception):
                await session.aclose()
            await agent_room.disconnect()
            await model.aclose()
    assert errors == []
