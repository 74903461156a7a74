"""A scripted human in a LiveKit room (``livekit.rtc``): speaks a clip, records what the agent says.

    async with RoomParticipant.join(lk.url, token, "alice") as alice:
        await alice.wait_for(lambda: alice.agent is not None, "the agent to join")
        sent = await alice.say(clip, 24000)                       # paced like a microphone
        await alice.wait_for(lambda: alice.heard_after(sent.end), "the agent's reply")

Everything the participant observes is recorded with ``time.monotonic()`` timestamps: agent audio
frames (24 kHz mono), ``lk.transcription`` text, data packets, the agent's attributes. Tests wait on
conditions over these records with :meth:`RoomParticipant.wait_for`, which wakes on every new
observation (no sleeps). ``aclose`` (run by the context manager) closes every native object it made
before disconnecting, so no livekit.rtc resource outlives the test's event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from livekit import rtc

RATE = 24000
FRAME_MS = 10
FRAME = RATE * FRAME_MS // 1000
SILENCE_MS = 20  # between clips: half the native calls of 10 ms frames (the same process runs an engine)
VOICED_DBFS = -45.0


def dbfs(pcm: np.ndarray) -> float:
    x = pcm.astype(np.float32) / 32768.0
    energy = float(np.dot(x, x)) / x.size if x.size else 0.0
    return 10.0 * np.log10(energy) if energy > 0 else float("-inf")


@dataclass
class Sent:
    start: float  # monotonic time the first frame began to play into the track
    end: float  # ... the last frame finished
    voiced_start: float | None  # the start of the first frame above VOICED_DBFS
    voiced_end: float | None  # the end of the last frame above VOICED_DBFS


@dataclass
class Heard:
    t: float
    pcm: np.ndarray  # int16, 24 kHz mono
    level: float = field(init=False)  # dBFS, computed once: queries run on every observation

    def __post_init__(self) -> None:
        self.level = dbfs(self.pcm)

    @property
    def voiced(self) -> bool:
        return self.level > VOICED_DBFS


@dataclass
class Transcript:
    t: float
    participant: str
    text: str
    attributes: dict[str, str] = field(default_factory=dict)


class RoomParticipant:
    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.room = rtc.Room()
        self.source = rtc.AudioSource(RATE, 1, queue_size_ms=30)
        self.track: rtc.LocalAudioTrack | None = None
        self.agent: rtc.RemoteParticipant | None = None
        self.agents_seen: list[str] = []
        self.agent_left: float | None = None
        self.heard: list[Heard] = []
        self.transcripts: list[Transcript] = []
        self.data: list[tuple[float, str | None, bytes]] = []
        self.attributes: list[tuple[float, str, dict[str, str]]] = []  # (t, identity, changed)
        self.disconnected: float | None = None
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._streams: list[rtc.AudioStream] = []
        self._silence_task: asyncio.Task[None] | None = None
        self._speaking = asyncio.Lock()  # held for a whole clip: no silence in between
        self._capture = asyncio.Lock()  # one capture at a time (the native source refuses overlaps)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    @contextlib.asynccontextmanager
    async def join(cls, url: str, token: str, identity: str, *, silence: bool = True) -> AsyncIterator[Any]:
        """Connect, publish a microphone track (streaming silence between clips, as a real
        microphone does, unless ``silence`` is false) and yield the participant; close on exit."""
        p = cls(identity)
        try:
            await p.connect(url, token, silence=silence)
            yield p
        finally:
            await p.aclose()

    async def connect(self, url: str, token: str, *, silence: bool = True) -> None:
        room = self.room
        room.on("participant_connected", self._on_participant)
        room.on("participant_disconnected", self._on_participant_left)
        room.on("track_subscribed", self._on_track)
        room.on("data_received", self._on_data)
        room.on("participant_attributes_changed", self._on_attributes)
        room.on("disconnected", self._on_disconnected)
        room.register_text_stream_handler("lk.transcription", self._on_text)
        await room.connect(url, token)
        for participant in room.remote_participants.values():
            self._on_participant(participant)
            for pub in participant.track_publications.values():
                if pub.track is not None:
                    self._on_track(pub.track, pub, participant)
        self.track = rtc.LocalAudioTrack.create_audio_track("microphone", self.source)
        await room.local_participant.publish_track(
            self.track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        if silence:
            self._silence_task = asyncio.create_task(self._stream_silence())

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        if self._silence_task is not None:
            tasks.append(self._silence_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for stream in self._streams:
            with contextlib.suppress(Exception):
                await stream.aclose()
        self._streams.clear()
        with contextlib.suppress(Exception):
            self.room.unregister_text_stream_handler("lk.transcription")
        with contextlib.suppress(Exception):
            await self.room.disconnect()
        with contextlib.suppress(Exception):
            await self.source.aclose()

    # ------------------------------------------------------------------ speaking
    async def _stream_silence(self) -> None:
        """A live microphone never stops sending: silence between the clips."""
        samples = RATE * SILENCE_MS // 1000
        zero = rtc.AudioFrame(np.zeros(samples, np.int16).tobytes(), RATE, 1, samples)
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        while True:
            if not self._speaking.locked():
                async with self._capture:
                    await self.source.capture_frame(zero)
            n += 1
            delay = start + n * SILENCE_MS / 1000 - loop.time()
            if delay < -0.5:  # fell behind (busy machine): do not burst to catch up
                start, n = loop.time(), 0
            elif delay > 0:
                await asyncio.sleep(delay)  # pacing like a microphone, not synchronisation

    async def say(
        self, audio: np.ndarray, rate: int = RATE, *, on_frame: Callable[[int, float], None] | None = None
    ) -> Sent:
        """Send ``audio`` (float mono in [-1, 1] at ``rate``) in 10 ms frames at real-time pace."""
        if rate != RATE:
            import soxr

            audio = soxr.resample(audio, rate, RATE)
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
        pcm = np.pad(pcm, (0, -len(pcm) % FRAME))
        loop = asyncio.get_running_loop()
        first = last = None
        voiced_first = voiced_last = None
        async with self._speaking:
            start = loop.time()
            for i in range(0, len(pcm), FRAME):
                chunk = pcm[i : i + FRAME]
                async with self._capture:
                    await self.source.capture_frame(rtc.AudioFrame(chunk.tobytes(), RATE, 1, FRAME))
                # when this frame starts and ends leaving the source's playout queue: as a microphone
                # would have produced it (what latencies are measured from: speech starts at the
                # start of its first frame and ends at the end of its last)
                end = time.monotonic() + self.source.queued_duration
                begin = end - FRAME_MS / 1000
                first = begin if first is None else first
                last = end
                if dbfs(chunk) > VOICED_DBFS:
                    voiced_first = begin if voiced_first is None else voiced_first
                    voiced_last = end
                if on_frame is not None:
                    on_frame(i // FRAME, begin)
                delay = start + (i // FRAME + 1) * FRAME_MS / 1000 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing like a microphone, not synchronisation
        assert first is not None and last is not None
        return Sent(first, last, voiced_first, voiced_last)

    # ------------------------------------------------------------------ observations
    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _poke(self) -> None:
        task = asyncio.create_task(self._notify())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked on every observation); return its value.
        Raises TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            while not (value := predicate()):
                await self._changed.wait()
            return value

    async def expect(self, predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
        """:meth:`wait_for` with a readable failure message."""
        try:
            return await self.wait_for(predicate, what, timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.identity}: no {what} within {timeout:.0f} s "
                f"(heard {self.voiced_ms(0):.0f} ms of agent audio, transcripts {self.transcript_text()!r}, "
                f"data {[(t, d[:200]) for _, t, d in self.data]}, agent {self.agent and self.agent.identity})"
            ) from None

    def _on_participant(self, participant: rtc.RemoteParticipant) -> None:
        if participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            self.agent = participant
            self.agents_seen.append(participant.identity)
            self.agent_left = None
        self._poke()

    def _on_participant_left(self, participant: rtc.RemoteParticipant) -> None:
        if self.agent is not None and participant.identity == self.agent.identity:
            self.agent_left = time.monotonic()
        self._poke()

    def _on_track(
        self, track: rtc.Track, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant
    ) -> None:
        if (
            track.kind != rtc.TrackKind.KIND_AUDIO
            or participant.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ):
            return
        stream = rtc.AudioStream.from_track(
            track=track, sample_rate=RATE, num_channels=1, frame_size_ms=FRAME_MS
        )
        self._streams.append(stream)
        task = asyncio.create_task(self._record(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, stream: rtc.AudioStream) -> None:
        async for event in stream:
            heard = Heard(time.monotonic(), np.frombuffer(event.frame.data, dtype=np.int16).copy())
            self.heard.append(heard)
            await self._notify()

    def _on_text(self, reader: rtc.TextStreamReader, participant_identity: str) -> None:
        async def read() -> None:
            async for chunk in reader:
                self.transcripts.append(
                    Transcript(
                        time.monotonic(), participant_identity, chunk, dict(reader.info.attributes or {})
                    )
                )
                await self._notify()

        task = asyncio.create_task(read())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_data(self, packet: rtc.DataPacket) -> None:
        self.data.append((time.monotonic(), packet.topic, bytes(packet.data)))
        self._poke()

    def _on_attributes(self, changed: dict[str, str], participant: rtc.Participant) -> None:
        self.attributes.append((time.monotonic(), participant.identity, dict(changed)))
        self._poke()

    def _on_disconnected(self, reason: Any) -> None:
        self.disconnected = time.monotonic()
        self._poke()

    # ------------------------------------------------------------------ queries
    def _heard_since(self, since: float) -> list[Heard]:
        """The frames received at or after ``since`` (``heard`` is in arrival order: a bisection,
        since the tests' conditions are re-checked on every frame and calls grow long)."""
        return self.heard[bisect.bisect_left(self.heard, since, key=lambda h: h.t) :]

    def voiced_frames(self, since: float, until: float | None = None) -> list[Heard]:
        return [h for h in self._heard_since(since) if (until is None or h.t <= until) and h.voiced]

    def voiced_ms(self, since: float, until: float | None = None) -> float:
        return len(self.voiced_frames(since, until)) * FRAME_MS

    def first_voiced(self, since: float) -> float | None:
        return next((h.t for h in self._heard_since(since) if h.voiced), None)

    def last_voiced(self, since: float = 0.0) -> float | None:
        frames = self.voiced_frames(since)
        return frames[-1].t if frames else None

    def silent_since(self, since: float, quiet_ms: float) -> float | None:
        """The time agent audio went quiet after ``since`` and stayed so for ``quiet_ms`` of received
        frames (None if it has not yet)."""
        last = None
        quiet = 0
        for h in self._heard_since(since):
            if h.voiced:
                last, quiet = h.t, 0
            else:
                quiet += FRAME_MS
                if quiet >= quiet_ms:
                    return last if last is not None else since
        return None

    def transcript_text(self, since: float = 0.0) -> str:
        return "".join(t.text for t in self.transcripts if t.t >= since)

    def agent_attribute(self, key: str) -> str | None:
        return self.agent.attributes.get(key) if self.agent is not None else None
