"""Who the agent listens to in a room with several people.

The model hears one voice at a time: ``AgentSession``'s room input is linked to one participant
(``RoomIO.set_participant``, the framework's participant linking). Everyone in the room hears the
agent. :class:`FloorController` decides whom it hears:

- it watches every human's microphone track (the level of 20 ms frames, see ``FloorSection``);
- a participant who starts speaking takes the floor when it is free: nobody linked yet, or the
  linked participant has been quiet for ``release_ms``. That holds while the agent listens and
  while it speaks — a newcomer's speech over the agent then reaches the model, which treats it as
  barge-in like any speech over its reply. While the linked participant is talking, others
  cannot take the floor;
- participants joining change nothing until they speak; when the linked participant leaves, the
  floor goes to whoever is speaking (else the latest speaker, else the earliest to join);
- when the last human leaves, ``on_empty`` is called (the worker then ends the session).

The current holder is published as the agent's participant attribute ``sg2.floor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from livekit import rtc

from .settings import FloorSection

log = logging.getLogger("sg2.livekit.floor")

ATTRIBUTE_FLOOR = "sg2.floor"
HUMAN_KINDS = (
    rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
    rtc.ParticipantKind.PARTICIPANT_KIND_SIP,
    rtc.ParticipantKind.PARTICIPANT_KIND_CONNECTOR,
)
FRAME_MS = 20
RATE = 16000


def is_human(participant: rtc.RemoteParticipant) -> bool:
    return participant.kind in HUMAN_KINDS and not participant.attributes.get("lk.publish_on_behalf")


class _Level:
    """Speech activity of one participant from the level of their 20 ms frames."""

    def __init__(self, options: FloorSection) -> None:
        self.options = options
        self.run_ms = 0  # consecutive loud ms
        self.speaking = False
        self.last_voice: float | None = None  # monotonic time of the latest loud frame
        self.joined = time.monotonic()

    def feed(self, pcm: np.ndarray, now: float) -> bool:
        """True when this frame starts a speech run (``start_ms`` of consecutive loud frames)."""
        x = pcm.astype(np.float32) / 32768.0
        rms = float(np.sqrt(np.mean(x * x))) if x.size else 0.0
        loud = rms > 0 and 20.0 * np.log10(rms) > self.options.speech_dbfs
        if not loud:
            self.run_ms = 0
            if self.speaking and self.quiet_ms(now) >= self.options.release_ms:
                self.speaking = False
            return False
        self.last_voice = now
        self.run_ms += FRAME_MS
        if not self.speaking and self.run_ms >= self.options.start_ms:
            self.speaking = True
            return True
        return False

    def quiet_ms(self, now: float) -> float:
        return float("inf") if self.last_voice is None else (now - self.last_voice) * 1000.0


class FloorController:
    def __init__(
        self,
        room: rtc.Room,
        set_participant: Callable[[str], None],
        linked_identity: Callable[[], str | None],
        options: FloorSection,
        *,
        on_empty: Callable[[], Any],
    ) -> None:
        self.room = room
        self.options = options
        self._set_participant = set_participant
        self._linked_identity = linked_identity
        self._on_empty = on_empty
        self._levels: dict[str, _Level] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # track sid -> level monitor
        self._streams: dict[str, rtc.AudioStream] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._attr_task: asyncio.Task[None] | None = None
        self._published: str | None = None
        self._seen_human = False
        self._empty_called = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.room.on("participant_connected", self._on_participant_connected)
        self.room.on("participant_disconnected", self._on_participant_disconnected)
        self.room.on("track_subscribed", self._on_track_subscribed)
        self.room.on("track_unsubscribed", self._on_track_unsubscribed)
        for participant in self.room.remote_participants.values():
            self._on_participant_connected(participant)
            for pub in participant.track_publications.values():
                if pub.track is not None:
                    self._on_track_subscribed(pub.track, pub, participant)
        self._check_empty()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.room.off("participant_connected", self._on_participant_connected)
        self.room.off("participant_disconnected", self._on_participant_disconnected)
        self.room.off("track_subscribed", self._on_track_subscribed)
        self.room.off("track_unsubscribed", self._on_track_unsubscribed)
        tasks = list(self._tasks.values())
        if self._attr_task is not None:
            tasks.append(self._attr_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for stream in list(self._streams.values()):
            with contextlib.suppress(Exception):
                await stream.aclose()
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task
        self._tasks.clear()
        self._streams.clear()

    @property
    def holder(self) -> str | None:
        return self._linked_identity()

    def humans(self) -> list[rtc.RemoteParticipant]:
        return [p for p in self.room.remote_participants.values() if is_human(p)]

    # ------------------------------------------------------------------ room events
    def _on_participant_connected(self, participant: rtc.RemoteParticipant) -> None:
        if is_human(participant) and participant.identity not in self._levels:
            self._seen_human = True
            self._levels[participant.identity] = _Level(self.options)
            if self._linked_identity() is None:
                self._link(participant.identity, "first participant")

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        self._levels.pop(participant.identity, None)
        for sid in list(participant.track_publications):
            self._stop_monitor(sid)
        if self._closed:
            return
        humans = self.humans()
        if not humans:
            self._check_empty()
            return
        if self._linked_identity() in (None, participant.identity):
            self._link(self._successor(humans).identity, f"{participant.identity} left")

    def _on_track_subscribed(
        self, track: rtc.Track, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant
    ) -> None:
        if (
            self._closed
            or track.kind != rtc.TrackKind.KIND_AUDIO
            or not is_human(participant)
            or publication.sid in self._tasks
        ):
            return
        stream = rtc.AudioStream.from_track(
            track=track, sample_rate=RATE, num_channels=1, frame_size_ms=FRAME_MS
        )
        self._streams[publication.sid] = stream
        self._tasks[publication.sid] = asyncio.create_task(
            self._monitor(participant.identity, stream), name=f"sg2-floor-{participant.identity}"
        )

    def _on_track_unsubscribed(
        self, track: rtc.Track, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant
    ) -> None:
        self._stop_monitor(publication.sid)

    def _stop_monitor(self, sid: str) -> None:
        task = self._tasks.pop(sid, None)
        if task is not None:
            task.cancel()
        stream = self._streams.pop(sid, None)
        if stream is not None:
            task = asyncio.create_task(stream.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _monitor(self, identity: str, stream: rtc.AudioStream) -> None:
        async for event in stream:
            level = self._levels.get(identity)
            if level is None:
                continue
            pcm = np.frombuffer(event.frame.data, dtype=np.int16)
            if level.feed(pcm, time.monotonic()):
                self._on_speech_started(identity)

    # ------------------------------------------------------------------ decisions
    def _on_speech_started(self, identity: str) -> None:
        holder = self._linked_identity()
        if holder == identity:
            return
        now = time.monotonic()
        held = self._levels.get(holder) if holder is not None else None
        if holder is None or held is None or held.quiet_ms(now) >= self.options.release_ms:
            self._link(identity, "started speaking" if holder is None else f"took the floor from {holder}")

    def _successor(self, humans: list[rtc.RemoteParticipant]) -> rtc.RemoteParticipant:
        now = time.monotonic()

        def rank(p: rtc.RemoteParticipant) -> tuple[int, float, float]:
            level = self._levels.get(p.identity)
            if level is None:
                return (2, 0.0, 0.0)
            speaking = level.quiet_ms(now) < self.options.release_ms
            return (0 if speaking else 1, level.quiet_ms(now), level.joined)

        return min(humans, key=rank)

    def _link(self, identity: str, why: str) -> None:
        log.info("listening to %s (%s)", identity, why)
        self._set_participant(identity)
        self._publish(identity)

    def _publish(self, identity: str) -> None:
        if self._published == identity or not self.room.isconnected():
            return
        self._published = identity

        async def _set() -> None:
            with contextlib.suppress(Exception):
                await self.room.local_participant.set_attributes({ATTRIBUTE_FLOOR: identity})

        if self._attr_task is not None and not self._attr_task.done():
            previous = self._attr_task

            async def _after() -> None:
                with contextlib.suppress(Exception):
                    await previous
                await _set()

            self._attr_task = asyncio.create_task(_after())
        else:
            self._attr_task = asyncio.create_task(_set())

    def _check_empty(self) -> None:
        if self._seen_human and not self._empty_called and not self.humans():
            self._empty_called = True
            log.info("the last participant left")
            self._on_empty()
