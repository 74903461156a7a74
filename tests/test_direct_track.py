"""The agent's outbound track on its own: what each 20 ms frame carries, and what it reports.

A manual clock stands in for the loop's (each frame is due exactly when it is asked for), so the
frame sequence is deterministic: no network, no engine.
"""

from __future__ import annotations

import numpy as np

from agent.direct.outbound import FRAME, RATE, AgentAudioTrack, PlaybackListener


class Recorder(PlaybackListener):
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def on_ack(self, response_id: str, played_ms: int) -> None:
        self.log.append(("ack", response_id, played_ms))

    def on_started(self, response_id: str) -> None:
        self.log.append(("started", response_id))

    def on_text(self, response_id: str, text: str) -> None:
        self.log.append(("text", response_id, text))

    def on_finished(self, response_id: str, played_ms: int) -> None:
        self.log.append(("finished", response_id, played_ms))

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.log if e[0] == kind]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _chunk(value: float = 0.5) -> np.ndarray:
    return np.full(2880, value, np.float32)  # 120 ms at 24 kHz


async def _frames(track: AgentAudioTrack, clock: Clock, n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        frame = await track.recv()
        assert frame.sample_rate == RATE and frame.samples == FRAME and frame.format.name == "s16"
        out.append(frame.to_ndarray().reshape(-1))
        clock.t += FRAME / RATE
    return out


def _loud(frames: list[np.ndarray]) -> list[bool]:
    return [bool(np.abs(f).max() > 1000) for f in frames]


async def test_reply_plays_in_20ms_frames_with_text_and_exact_acks() -> None:
    rec, clock = Recorder(), Clock()
    track = AgentAudioTrack(rec, clock=clock)
    assert _loud(await _frames(track, clock, 2)) == [False, False]  # silence before any reply
    track.begin("r1")
    track.add_text("r1", "你好")
    track.add_chunk("r1", 0, _chunk())
    track.add_text("r1", " world")
    track.add_chunk("r1", 120, _chunk())
    track.finish("r1")
    frames = await _frames(track, clock, 16)
    # 240 ms of audio = 12 frames (the resampler's few-sample delay is flushed at the end)
    assert _loud(frames)[:11] == [True] * 11 and not any(_loud(frames)[13:])
    assert rec.of("started") == [("started", "r1")]
    assert rec.of("text") == [("text", "r1", "你好"), ("text", "r1", " world")]
    # " world" belongs to the second chunk: reported once its first sample went out
    i_world = rec.log.index(("text", "r1", " world"))
    assert [e for e in rec.log[:i_world] if e[0] == "ack"][-1][2] in (100, 120)
    acks = [e[2] for e in rec.of("ack")]
    assert acks == sorted(acks) and acks[-1] == 240  # everything the engine emitted, exactly
    assert rec.of("finished") == [("finished", "r1", 240)]
    assert track.current is None
    # the level: 0.5 full scale at 48 kHz after soxr (checked on a frame in the middle)
    assert abs(int(np.median(frames[5])) - 16383) < 200


async def test_pause_keeps_the_audio_and_drop_silences_the_very_next_frame() -> None:
    rec, clock = Recorder(), Clock()
    track = AgentAudioTrack(rec, clock=clock)
    track.begin("r1")
    for i in range(3):
        track.add_chunk("r1", i * 120, _chunk())
    assert _loud(await _frames(track, clock, 3)) == [True] * 3
    track.pause("r1")
    assert _loud(await _frames(track, clock, 5)) == [False] * 5  # paused: silence, audio kept
    queued = track.queued_ms()
    assert 280 <= queued <= 300
    track.resume("r1")
    assert _loud(await _frames(track, clock, 2)) == [True, True]  # continues where it stopped
    assert rec.of("ack")[-1][2] == 100
    assert track.drop("r1") == 100  # played so far
    assert _loud(await _frames(track, clock, 3)) == [False] * 3
    assert rec.of("finished") == []  # a cut reply is not reported as finished
    # audio for a reply that is not the current one is ignored
    track.add_chunk("r1", 360, _chunk())
    assert _loud(await _frames(track, clock, 2)) == [False] * 2


async def test_a_new_reply_replaces_the_old_one_and_a_stalled_clock_is_reanchored() -> None:
    rec, clock = Recorder(), Clock()
    track = AgentAudioTrack(rec, clock=clock)
    track.begin("r1")
    track.add_chunk("r1", 0, _chunk(0.2))
    await _frames(track, clock, 1)
    track.begin("r2")
    track.add_chunk("r2", 0, _chunk(-0.5))
    frames = await _frames(track, clock, 2)
    assert all(f.max() < 0 for f in frames)  # r2's audio, r1's rest dropped
    clock.t += 1.0  # the loop stalled for a second: no burst of catch-up frames
    await _frames(track, clock, 1)
    assert track.resyncs == 1
    frame = await track.recv()
    assert frame.pts == track._frames * FRAME
