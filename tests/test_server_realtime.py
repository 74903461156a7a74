"""The network API with the official ``openai`` SDK client: real speech in, a reply out, barge-in and
truncation, client-controlled turns, session settings as they are really in force.

Our server runs on loopback around a real engine with tiny random models. Random models babble, so
replies are capped (``max_output_tokens``) and the assertions are about the protocol: which events
arrive, in which order, with which ids and shapes, and what the engine's history holds afterwards.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from sg2_runtime.engine.options import EngineConfig
from tests.support.engine_calls import check_cache_matches_history
from tests.support.realtime import (
    decode_delta,
    of_type,
    running_server,
    send_audio,
    server_settings,
    until,
)
from tests.support.speech import load_reference_speech, pad_silence

CONFIG = EngineConfig(max_sessions=4, max_positions=1024)


@pytest.fixture(scope="module")
def en24(reference_dir) -> np.ndarray:
    return load_reference_speech(reference_dir, "en", sample_rate=24000)[0][: 24000 * 4]


@pytest.fixture(scope="module")
def zh24(reference_dir) -> np.ndarray:
    return load_reference_speech(reference_dir, "zh", sample_rate=24000)[0]


def _types(events) -> list[str]:
    return [e.type for e in events if e.type not in ("response.output_audio.delta",)]


def _index(events, type_: str, start: int = 0) -> int:
    return next(i for i, e in enumerate(events) if i >= start and e.type == type_)


async def test_sdk_streams_speech_and_gets_a_spoken_reply(server_models, en24) -> None:
    clip = pad_silence(en24, 24000, 0.5, 1.2)
    async with running_server(server_models, CONFIG) as server:
        client = server.sdk_client()
        async with client.realtime.connect(model="speechgpt-2.0-preview") as conn:
            created = await conn.recv()
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 8})
            updated = (await until(conn, lambda e: e.type == "session.updated"))[-1]
            await send_audio(conn, clip)
            events = await until(conn, lambda e: e.type == "response.done")
            assert server.engine.live_sessions == 1

    assert created.type == "session.created"
    session = created.session
    assert session.model == "speechgpt-2.0-preview" and session.output_modalities == ["audio"]
    assert session.audio.input.format.type == "audio/pcm" and session.audio.input.format.rate == 24000
    assert session.audio.output.format.rate == 24000 and session.audio.output.voice == "default"
    td = session.audio.input.turn_detection
    assert (td.type, td.silence_duration_ms, td.prefix_padding_ms, td.create_response) == (
        "server_vad",
        500,
        300,
        True,
    )
    assert session.audio.input.transcription is None and session.tools == []
    assert updated.session.max_output_tokens == 8

    order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    positions, at = [], 0
    for type_ in order:
        at = _index(events, type_, at)
        positions.append(at)
        at += 1
    assert positions == sorted(positions)
    started, stopped, committed = (of_type(events, t)[0] for t in order[:3])
    assert abs(started.audio_start_ms - 200) <= 250  # 500 ms of lead silence, 300 ms prefix padding
    assert 500 + 3000 <= stopped.audio_end_ms <= 500 + 4000 + 100
    user_item = of_type(events, "conversation.item.added")[0].item
    assert started.item_id == stopped.item_id == committed.item_id == user_item.id
    assert user_item.role == "user" and user_item.content[0].type == "input_audio"

    response = of_type(events, "response.created")[0].response
    done = events[-1].response
    item = of_type(events, "response.output_item.added")[0].item
    assert (
        response.id == done.id and response.status == "in_progress" and response.object == "realtime.response"
    )
    assert item.type == "message" and item.role == "assistant" and item.status == "in_progress"
    assert of_type(events, "conversation.item.added")[1].previous_item_id == user_item.id
    assert of_type(events, "response.content_part.added")[0].part.type == "audio"
    first_delta = _index(events, "response.output_audio.delta")
    assert positions[8] < first_delta < positions[9]

    deltas = of_type(events, "response.output_audio.delta")
    assert all(d.response_id == done.id and d.item_id == item.id for d in deltas)
    audio = np.concatenate([decode_delta(d.delta) for d in deltas])
    assert len(deltas) == 8 and audio.size == 8 * 2880  # 8 positions of 120 ms at 24 kHz
    assert np.sqrt(np.mean(audio.astype(np.float64) ** 2)) > 30 and np.abs(audio).max() > 300  # not silence
    texts = of_type(events, "response.output_audio_transcript.delta")
    transcript = "".join(t.delta for t in texts)
    assert texts and transcript == of_type(events, "response.output_audio_transcript.done")[0].transcript
    assert done.status == "incomplete" and done.status_details.reason == "max_output_tokens"
    assert done.output[0].id == item.id and done.output[0].content[0].transcript == transcript
    assert done.output[0].status == "incomplete"
    assert done.usage.output_tokens == 8 and done.usage.input_tokens > 100
    assert done.usage.total_tokens == done.usage.input_tokens + 8


async def test_truncate_after_the_reply_cuts_history_while_the_next_turn_is_open(
    server_models, en24, zh24
) -> None:
    first = pad_silence(en24[: 24000 * 2], 24000, 0.5, 1.0)
    second = zh24[: 24000 * 2]
    async with running_server(server_models, CONFIG) as server:
        client = server.sdk_client()
        async with client.realtime.connect(model="sg2") as conn:
            sid = (await conn.recv()).session.id
            engine_session = server.engine_session(sid)
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 8})
            await send_audio(conn, first)
            events = await until(conn, lambda e: e.type == "response.done")
            reply = events[-1].response
            before = await engine_session.history()
            await send_audio(conn, second)  # the user talks again: a new turn opens in the history
            await until(conn, lambda e: e.type == "input_audio_buffer.speech_started")
            await conn.conversation.item.truncate(
                item_id=reply.output[0].id, content_index=0, audio_end_ms=300
            )
            truncated = (await until(conn, lambda e: e.type == "conversation.item.truncated"))[-1]
            await send_audio(conn, np.zeros(24000 * 3 // 2, np.float32))
            events = await until(conn, lambda e: e.type == "response.done")
            history = await engine_session.history()
            await check_cache_matches_history(engine_session, server.engine)

    assert (truncated.item_id, truncated.audio_end_ms, truncated.content_index) == (
        reply.output[0].id,
        300,
        0,
    )
    fmt = server_models.lm.prompt
    start = reply.usage.input_tokens  # the reply's first position (its <|sosp|>)
    keep = start + 1 + 300 // 120
    assert torch.equal(history[:, : 3 * keep], before[:, : 3 * keep])
    kept_ids = before[0, 3 * start : 3 * keep : 3].tolist()
    special = server_models.lm.special
    closing = fmt.agent_turn_closing(kept_ids.count(special.sosp) > kept_ids.count(special.eosp))
    end = 3 * keep + closing.shape[1]
    assert torch.equal(history[:, 3 * keep : end], closing)
    prefix = fmt.user_turn_prefix()
    assert torch.equal(history[:, end : end + prefix.shape[1]], prefix)  # the next turn follows at once
    assert events[-1].response.usage.input_tokens > end // 3


async def test_barge_in_mid_reply_then_truncate_gives_the_exact_cut(server_models, en24, zh24) -> None:
    session_defaults = {
        "flow_control": "realtime",
        "output_margin_ms": 480,
        "sampling": {"greedy": True},
        "max_response_ms": 12000,
    }
    settings = server_settings(**{"realtime.session": session_defaults})
    first = pad_silence(en24[: 24000 * 2], 24000, 0.5, 1.0)
    interruption = pad_silence(zh24[: 24000 * 3 // 2], 24000, 0.0, 1.5)
    async with running_server(server_models, CONFIG, settings) as server:
        client = server.sdk_client()
        async with client.realtime.connect(model="sg2") as conn:
            sid = (await conn.recv()).session.id
            engine_session = server.engine_session(sid)
            await send_audio(conn, first)
            deltas = 0

            def eighth_delta(e) -> bool:
                nonlocal deltas
                deltas += e.type == "response.output_audio.delta"
                return deltas == 8

            events = await until(conn, eighth_delta)  # ~1 s into a 12 s reply, paced at real time
            item_id = of_type(events, "response.output_item.added")[0].item.id
            reply_id = of_type(events, "response.created")[0].response.id
            before = await engine_session.history()
            talking = asyncio.create_task(send_audio(conn, interruption, chunk_ms=40, realtime=True))
            events += await until(conn, lambda e: e.type == "input_audio_buffer.speech_started")
            # the client stops playback on speech_started and says how much was heard
            await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=300)
            events += await until(conn, lambda e: e.type == "conversation.item.truncated")
            events += await until(conn, lambda e: e.type == "input_audio_buffer.committed")
            await talking
            history = await engine_session.history()
            await check_cache_matches_history(engine_session, server.engine)

    done = [e for e in of_type(events, "response.done") if e.response.id == reply_id]
    assert len(done) == 1 and done[0].response.status == "cancelled"
    done_at = events.index(done[0])
    assert not [
        e for e in events[done_at:] if e.type == "response.output_audio.delta" and e.response_id == reply_id
    ]
    assert done[0].response.output[0].status == "incomplete"
    assert of_type(events, "conversation.item.truncated")[0].audio_end_ms == 300
    start = done[0].response.usage.input_tokens
    keep = start + 1 + 2
    assert torch.equal(history[:, : 3 * keep], before[:, : 3 * keep])
    fmt = server_models.lm.prompt
    kept_ids = before[0, 3 * start : 3 * keep : 3].tolist()
    special = server_models.lm.special
    closing = fmt.agent_turn_closing(kept_ids.count(special.sosp) > kept_ids.count(special.eosp))
    end = 3 * keep + closing.shape[1]
    assert torch.equal(history[:, 3 * keep : end], closing)
    prefix = fmt.user_turn_prefix()
    assert torch.equal(history[:, end : end + prefix.shape[1]], prefix)  # the interruption is the next turn


async def test_client_controlled_turns_commit_create_and_cancel(server_models, en24) -> None:
    settings = server_settings(
        **{
            "realtime.session": {
                "flow_control": "realtime",
                "sampling": {"greedy": True},
                "max_response_ms": 960,
            }
        }
    )
    async with running_server(server_models, CONFIG, settings) as server:
        client = server.sdk_client()
        async with client.realtime.connect(model="sg2") as conn:
            sid = (await conn.recv()).session.id
            engine_session = server.engine_session(sid)
            await conn.session.update(
                session={
                    "type": "realtime",
                    "audio": {"input": {"turn_detection": None}},
                    "max_output_tokens": 6,
                }
            )
            updated = (await until(conn, lambda e: e.type == "session.updated"))[-1]
            await conn.input_audio_buffer.commit()  # nothing appended yet
            empty = (await until(conn, lambda e: e.type == "error"))[-1]
            await send_audio(conn, en24[: 24000 * 3 // 2])
            await conn.input_audio_buffer.commit()
            turn = await until(conn, lambda e: e.type == "conversation.item.done")
            idle = await engine_session.inspect(lambda conv: conv.response is None)
            await conn.response.create(response={"metadata": {"client_event_id": "mine"}})
            first = await until(conn, lambda e: e.type == "response.done")

            await conn.session.update(session={"type": "realtime", "max_output_tokens": 200})
            await until(conn, lambda e: e.type == "session.updated")
            await conn.response.create()
            long = await until(conn, lambda e: e.type == "response.output_audio.delta")
            await conn.response.create()  # one at a time
            busy = (await until(conn, lambda e: e.type == "error"))[-1]
            await conn.response.cancel()
            cancelled = await until(conn, lambda e: e.type == "response.done")
            await conn.response.cancel()  # nothing left to cancel
            nothing = (await until(conn, lambda e: e.type == "error"))[-1]
            await send_audio(conn, en24[24000 : 24000 * 2])
            await conn.input_audio_buffer.clear()
            cleared = await until(conn, lambda e: e.type == "input_audio_buffer.cleared")
            await conn.input_audio_buffer.commit()
            after_clear = (await until(conn, lambda e: e.type == "error"))[-1]

    assert updated.session.audio.input.turn_detection is None
    assert empty.error.code == "input_audio_buffer_commit_empty"
    assert [e.type for e in turn] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert turn[0].item_id == turn[1].item.id and turn[1].item.role == "user"
    assert idle  # committed, and no reply until the client asks
    created = of_type(first, "response.created")
    assert len(created) == 1 and created[0].response.metadata == {"client_event_id": "mine"}
    assert first[-1].response.status == "incomplete" and first[-1].response.usage.output_tokens == 6
    assert of_type(first, "conversation.item.added")[0].previous_item_id == turn[1].item.id
    assert busy.error.code == "conversation_already_has_active_response"
    active_id = of_type(long, "response.created")[0].response.id
    done = cancelled[-1].response
    assert done.id == active_id and done.status == "cancelled"
    assert done.status_details.reason == "client_cancelled"
    assert nothing.error.code == "response_cancel_not_active"
    assert nothing.error.message.startswith("Cancellation failed")  # what livekit-plugins-openai ignores
    assert [e.type for e in cleared] == ["input_audio_buffer.cleared"]
    assert after_clear.error.code == "input_audio_buffer_commit_empty"


async def test_typed_user_message_then_reply_and_text_only_output(server_models) -> None:
    async with running_server(server_models, CONFIG) as server:
        client = server.sdk_client()
        async with client.realtime.connect(model="sg2") as conn:
            await conn.recv()
            await conn.conversation.item.create(
                item={
                    "id": "msg_typed_1",
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "你好，请介绍一下你自己。"}],
                },
                previous_item_id="root",
            )
            added = await until(conn, lambda e: e.type == "conversation.item.done")
            await conn.response.create(response={"output_modalities": ["text"]})
            reply = await until(conn, lambda e: e.type == "response.done")
            await conn.conversation.item.retrieve(item_id="msg_typed_1")
            retrieved = (await until(conn, lambda e: e.type == "conversation.item.retrieved"))[-1]
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "hi"}],
                }
            )
            refused = (await until(conn, lambda e: e.type == "error"))[-1]
            await conn.conversation.item.delete(item_id="msg_typed_1")
            not_deletable = (await until(conn, lambda e: e.type == "error"))[-1]
            await conn.conversation.item.delete(item_id=reply[-1].response.output[0].id)
            deleted = (await until(conn, lambda e: e.type == "conversation.item.deleted"))[-1]

    assert [e.type for e in added] == ["conversation.item.added", "conversation.item.done"]
    assert added[0].item.id == "msg_typed_1" and added[0].item.content[0].text == "你好，请介绍一下你自己。"
    assert not of_type(reply, "response.output_audio.delta")
    part = of_type(reply, "response.content_part.added")[0].part
    assert part.type == "text"
    text = "".join(e.delta for e in of_type(reply, "response.output_text.delta"))
    assert text and of_type(reply, "response.output_text.done")[0].text == text
    assert reply[-1].response.output_modalities == ["text"]
    assert reply[-1].response.output[0].content[0].type == "output_text"
    assert retrieved.item.id == "msg_typed_1"
    assert refused.error.code == "unsupported_item_role"
    assert not_deletable.error.code == "item_delete_unsupported"
    assert deleted.item_id == reply[-1].response.output[0].id


async def test_session_update_reports_what_is_really_in_force(server_models) -> None:
    livekit_like = {
        "type": "realtime",
        "model": "gpt-realtime",
        "output_modalities": ["audio"],
        "instructions": "Answer briefly.",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "noise_reduction": {"type": "near_field"},
                "transcription": {"model": "gpt-4o-mini-transcribe"},
                "turn_detection": {
                    "type": "semantic_vad",
                    "eagerness": "medium",
                    "create_response": True,
                    "interrupt_response": True,
                },
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.2},
        },
        "max_output_tokens": "inf",
        "tool_choice": "auto",
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}],
    }
    async with running_server(server_models, CONFIG) as server:
        client = server.sdk_client()
        async with client.realtime.connect(model="sg2") as conn:
            sid = (await conn.recv()).session.id
            engine_session = server.engine_session(sid)
            await conn.session.update(session=livekit_like)
            updated = (await until(conn, lambda e: e.type == "session.updated"))[-1].session
            instructions = engine_session.options.instructions
            await conn.session.update(
                session={"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}
            )
            bad_format = (await until(conn, lambda e: e.type == "error"))[-1]
            await conn.session.update(
                session={
                    "type": "realtime",
                    "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 1.5}}},
                }
            )
            bad_value = (await until(conn, lambda e: e.type == "error"))[-1]
            await conn.session.update(
                session={
                    "type": "realtime",
                    "audio": {
                        "input": {
                            "turn_detection": {
                                "type": "server_vad",
                                "silence_duration_ms": 200,
                                "threshold": 0.6,
                            }
                        }
                    },
                }
            )
            vad = (await until(conn, lambda e: e.type == "session.updated"))[
                -1
            ].session.audio.input.turn_detection
            await conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
            )
            await until(conn, lambda e: e.type == "conversation.item.done")
            await conn.session.update(session={"type": "realtime", "instructions": "Now be verbose."})
            late = await until(conn, lambda e: e.type == "error")
            final = engine_session.options

    assert updated.instructions == "Answer briefly." and instructions == "Answer briefly."
    td = updated.audio.input.turn_detection
    assert td.type == "server_vad" and td.silence_duration_ms == 500 and td.create_response is True
    assert updated.audio.input.transcription is None and updated.audio.input.noise_reduction is None
    assert updated.audio.output.voice == "default" and updated.audio.output.speed == 1.0
    assert updated.tools == [] and updated.model == "speechgpt-2.0-preview"
    assert updated.max_output_tokens == 960 // 120  # "inf" is the server's cap on one reply
    assert bad_format.error.code == "unsupported_audio_format"
    assert bad_format.error.param == "session.audio.input.format"
    assert bad_value.error.code == "invalid_value" and "threshold" in bad_value.error.message
    assert (vad.silence_duration_ms, vad.threshold) == (200, 0.6)
    assert (final.turn_detection.silence_ms, final.turn_detection.threshold) == (200, 0.6)
    assert (
        final.turn_detection.speculative_silence_ms is not None
        and final.turn_detection.speculative_silence_ms < 200
    )
    updated_late = of_type(late, "session.updated")[-1].session
    assert updated_late.instructions == "Answer briefly." and final.instructions == "Answer briefly."
    assert late[-1].error.code == "session_field_locked"


async def test_greeting_mode_speaks_first_as_a_server_initiated_response(server_models) -> None:
    settings = server_settings(**{"realtime.play_greeting": True})
    async with running_server(server_models, CONFIG, settings) as server:
        client = server.sdk_client()
        async with client.realtime.connect(model="sg2") as conn:
            events = await until(conn, lambda e: e.type == "response.done")
    assert events[0].type == "session.created" and events[1].type == "response.created"
    assert events[1].response.metadata is None
    transcript = "".join(e.delta for e in of_type(events, "response.output_audio_transcript.delta"))
    greeting = server_models.resolve_greeting(settings.realtime.session_defaults())[0]
    words = server_models.fmt.decode_text(list(greeting.text_ids)).rstrip("\ufffd").strip()
    assert transcript == words and transcript  # the engine sends the greeting's words as its text
    audio_ms = sum(decode_delta(e.delta).size for e in of_type(events, "response.output_audio.delta")) / 24
    assert audio_ms == greeting.num_frames // 3 * 120
    assert events[-1].response.status == "completed"
