"""Twenty concurrent Realtime calls on one server: every call is answered, every reply is delivered
whole to the right call, and every engine session is released afterwards."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from sg2_runtime.engine.options import EngineConfig
from tests.support.realtime import decode_delta, of_type, running_server, send_audio, until
from tests.support.speech import load_reference_speech, pad_silence

CALLS = 20
REPLY_POSITIONS = 4


async def test_twenty_concurrent_calls_all_get_their_reply(server_models, reference_dir) -> None:
    en = load_reference_speech(reference_dir, "en", sample_rate=24000)[0]
    zh = load_reference_speech(reference_dir, "zh", sample_rate=24000)[0]
    clips = []
    for i in range(CALLS):  # a different 1.5 s piece of real speech per caller
        source = en if i % 2 == 0 else zh
        start = (i // 2) * 24000 * 3 // 10 % (len(source) - 24000 * 2)
        clips.append(pad_silence(source[start : start + 24000 * 3 // 2], 24000, 0.3, 0.8))
    config = EngineConfig(max_sessions=CALLS, max_positions=1024)
    async with running_server(server_models, config) as server:
        client = server.sdk_client()

        async def call(i: int) -> dict:
            async with client.realtime.connect(model="sg2") as conn:
                session_id = (await conn.recv()).session.id
                await conn.session.update(session={"type": "realtime", "max_output_tokens": REPLY_POSITIONS})
                await until(conn, lambda e: e.type == "session.updated")
                await send_audio(conn, clips[i])
                events = await until(conn, lambda e: e.type == "response.done", timeout=120)
            return {"session": session_id, "events": events}

        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(CALLS))), 180)
        elapsed = time.monotonic() - t0
        registry = server.engine.metrics.registry
        batched = registry.get_sample_value("sg2_lm_step_batch_sum") / registry.get_sample_value(
            "sg2_lm_step_batch_count"
        )
        async with asyncio.timeout(10):
            while server.engine.live_sessions:
                await asyncio.sleep(0.01)

    assert len({r["session"] for r in results}) == CALLS
    response_ids = set()
    for r in results:
        events = r["events"]
        done = events[-1].response
        response_ids.add(done.id)
        deltas = of_type(events, "response.output_audio.delta")
        assert all(d.response_id == done.id for d in deltas)
        audio = np.concatenate([decode_delta(d.delta) for d in deltas])
        assert audio.size == REPLY_POSITIONS * 2880 and np.abs(audio).max() > 0
        assert done.status == "incomplete" and done.usage.output_tokens == REPLY_POSITIONS
        assert len(of_type(events, "input_audio_buffer.committed")) == 1
        transcript = "".join(e.delta for e in of_type(events, "response.output_audio_transcript.delta"))
        assert done.output[0].content[0].transcript == transcript
    assert len(response_ids) == CALLS
    assert server.engine.live_sessions == 0 and server.engine.capacity_left == CALLS
    assert batched > 1.0  # LM steps batched several calls together
    assert elapsed < 150
