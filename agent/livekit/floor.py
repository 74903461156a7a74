"""Who the agent listens to in a room with several people, and a fast stop when someone talks over it.

The model hears one voice at a time. Everyone in the room hears the agent; :class:`FloorController`
decides whom it hears, and is the ``AgentSession``'s audio input (:class:`FloorInput`):

- it receives every human's microphone track (24 kHz, 20 ms frames) and runs Silero VAD on each
  (the ONNX model the engine uses, :class:`~sg2_runtime.engine.vad.BatchedVAD`, one slot per
  participant, 32 ms windows at 16 kHz);
- the floor holder is the framework's linked participant (``RoomIO.set_participant``, the
  framework's participant linking); its frames go to the model;
- a participant who starts speaking (``start_ms`` of windows over ``threshold``) takes the floor
  when it is free: nobody linked yet, or the holder has been quiet (under ``release_threshold``) for
  ``release_ms``. That holds while the agent listens and while it speaks — a newcomer's speech over
  the agent then reaches the model, which treats it as barge-in like any speech over its reply.
  While the holder is talking, others cannot take the floor. On a switch the newcomer's last
  ``preroll_ms`` go to the model first, so the start of what they said is not lost;
- participants joining change nothing until they speak; when the holder leaves, the floor goes to
  whoever is speaking (else the latest speaker, else the earliest to join);
- when the last human leaves, ``on_empty`` is called (the worker then ends the session).

``on_onset(identity)`` fires on the first likely speech window (``onset_threshold``, louder than
``onset_dbfs``) of a participant who holds or may take the floor, ``on_fizzle(identity)`` when such
an onset did not become speech: the worker pauses the agent's audio on the first and resumes it on
the second, while the engine decides whether it is a barge-in (see ``agent.livekit.worker``). The
holder is published as the agent's participant attribute ``sg2.floor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import soxr
from livekit import rtc
from livekit.agents import utils
from livekit.agents.voice import io

from sg2_runtime.engine.vad import BatchedVAD

from .settings import FloorSection

log = logging.getLogger("sg2.livekit.floor")

ATTRIBUTE_FLOOR = "sg2.floor"
HUMAN_KINDS = (
    rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
    rtc.ParticipantKind.PARTICIPANT_KIND_SIP,
    rtc.ParticipantKind.PARTICIPANT_KIND_CONNECTOR,
)
RATE = 24000  # what the model takes
FRAME_MS = 20
VAD_RATE = 16000
WINDOW = 512  # Silero's window at 16 kHz
WINDOW_MS = 32
MAX_MONITORED = 32  # VAD slots per room


def is_human(participant: rtc.RemoteParticipant) -> bool:
    return participant.kind in HUMAN_KINDS and not participant.attributes.get("lk.publish_on_behalf")


class FloorInput(io.AudioInput):
    """The session's audio input: the floor holder's frames (and a newcomer's pre-roll)."""

    def __init__(self) -> None:
        super().__init__(label="sg2-floor")
        self._ch = utils.aio.Chan[rtc.AudioFrame]()

    async def __anext__(self) -> rtc.AudioFrame:
        try:
            return await self._ch.recv()
        except utils.aio.ChanClosed:
            raise StopAsyncIteration from None

    def push(self, frame: rtc.AudioFrame) -> None:
        with contextlib.suppress(utils.aio.ChanClosed):
            self._ch.send_nowait(frame)

    def close(self) -> None:
        self._ch.close()


class _Voice:
    """One participant: speech activity from their VAD probabilities, and their latest frames."""

    def __init__(self, options: FloorSection, slot: int | None) -> None:
        self.options = options
        self.slot = slot
        self.run_ms = 0  # consecutive ms over the threshold
        self.speaking = False
        self.last_voice: float | None = None  # monotonic time of the latest window over release
        self.onset_ms: int | None = None  # ms since a likely onset that has not become speech yet
        self.joined = time.monotonic()
        self.recent: deque[rtc.AudioFrame] = deque(maxlen=max(1, options.preroll_ms // FRAME_MS))
        self.resampler = soxr.ResampleStream(RATE, VAD_RATE, 1, dtype="float32", quality="QQ")
        self.pending = np.zeros(0, dtype=np.float32)

    def feed(self, prob: float, dbfs: float, now: float) -> tuple[bool, bool, bool]:
        """(onset, started, fizzled) for one window: the first likely speech window (low bar, for
        the fast stop); ``start_ms`` of speech windows; an onset that did not become speech."""
        o = self.options
        onset = started = fizzled = False
        if prob >= o.release_threshold:
            self.last_voice = now
        if not self.speaking and self.onset_ms is None and prob >= o.onset_threshold and dbfs > o.onset_dbfs:
            self.onset_ms = 0
            onset = True
        if prob >= o.threshold:
            self.run_ms += WINDOW_MS
            if not self.speaking and self.run_ms >= o.start_ms:
                self.speaking = True
                started = True
                self.onset_ms = None
        else:
            self.run_ms = 0
            if self.speaking and self.quiet_ms(now) >= o.release_ms:
                self.speaking = False
        if self.onset_ms is not None and not onset:
            self.onset_ms += WINDOW_MS
            # the engine's VAD (the same model) needs start_ms of speech windows; give it that
            # plus three windows to get there
            if self.onset_ms > o.start_ms + 3 * WINDOW_MS:
                self.onset_ms = None
                fizzled = True
        return onset, started, fizzled

    def quiet_ms(self, now: float) -> float:
        return float("inf") if self.last_voice is None else (now - self.last_voice) * 1000.0


class FloorController:
    def __init__(
        self,
        room: rtc.Room,
        options: FloorSection,
        *,
        on_empty: Callable[[], Any],
        on_onset: Callable[[str], Any] | None = None,
        on_fizzle: Callable[[str], Any] | None = None,
    ) -> None:
        self.room = room
        self.options = options
        self.input = FloorInput()
        self._set_participant: Callable[[str], None] = lambda identity: None
        self._linked_identity: Callable[[], str | None] = lambda: None
        self._on_empty = on_empty
        self._on_onset = on_onset
        self._on_fizzle = on_fizzle
        self._vad = BatchedVAD(MAX_MONITORED)
        self._free_slots = list(range(MAX_MONITORED))
        self._voices: dict[str, _Voice] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # track sid -> monitor
        self._streams: dict[str, rtc.AudioStream] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._attr_task: asyncio.Task[None] | None = None
        self._published: str | None = None
        self._seen_human = False
        self._empty_called = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(
        self, set_participant: Callable[[str], None], linked_identity: Callable[[], str | None]
    ) -> None:
        """Begin following the room. ``set_participant``/``linked_identity``: the framework's
        participant linking (``RoomIO``)."""
        self._set_participant = set_participant
        self._linked_identity = linked_identity
        self.room.on("participant_connected", self._on_participant_connected)
        self.room.on("participant_disconnected", self._on_participant_disconnected)
        self.room.on("track_subscribed", self._on_track_subscribed)
        self.room.on("track_unsubscribed", self._on_track_unsubscribed)
        for participant in self.room.remote_participants.values():
            self._on_participant_connected(participant)
            for pub in participant.track_publications.values():
                if pub.track is not None:
                    self._on_track_subscribed(pub.track, pub, participant)
        if (holder := self._linked_identity()) is not None:
            self._publish(holder)
        self._check_empty()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.input.close()
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
        if not is_human(participant) or participant.identity in self._voices:
            return
        self._seen_human = True
        slot = self._free_slots.pop(0) if self._free_slots else None
        if slot is None:
            log.warning(
                "more than %d people in the room: %s is not monitored", MAX_MONITORED, participant.identity
            )
        else:
            self._vad.reset(slot)
        self._voices[participant.identity] = _Voice(self.options, slot)
        if self._linked_identity() is None:
            self._link(participant.identity, "first participant")

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        voice = self._voices.pop(participant.identity, None)
        if voice is not None and voice.slot is not None:
            self._free_slots.append(voice.slot)
        for sid in list(participant.track_publications):
            self._stop_monitor(sid)
        if self._closed or not is_human(participant):
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
            or publication.source != rtc.TrackSource.SOURCE_MICROPHONE
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
            closing = asyncio.create_task(stream.aclose())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _monitor(self, identity: str, stream: rtc.AudioStream) -> None:
        async for event in stream:
            voice = self._voices.get(identity)
            if voice is None:
                continue
            frame = event.frame
            voice.recent.append(frame)
            if identity == self._linked_identity():
                self.input.push(frame)
            if voice.slot is None:
                continue
            pcm = np.frombuffer(frame.data, dtype=np.int16).astype(np.float32) / 32768.0
            down = voice.resampler.resample_chunk(pcm)
            voice.pending = np.concatenate([voice.pending, down]) if voice.pending.size else down
            while voice.pending.size >= WINDOW:
                window, voice.pending = voice.pending[:WINDOW], voice.pending[WINDOW:]
                prob = float(self._vad.run([voice.slot], window[None, :])[0])
                rms = float(np.sqrt(np.mean(window * window)))
                dbfs = 20.0 * np.log10(rms) if rms > 0 else -200.0
                onset, started, fizzled = voice.feed(prob, dbfs, time.monotonic())
                if onset or started:
                    self._on_voice(identity, onset, started)
                if fizzled and self._on_fizzle is not None:
                    self._on_fizzle(identity)

    # ------------------------------------------------------------------ decisions
    def _may_take(self, identity: str, now: float) -> bool:
        holder = self._linked_identity()
        if holder is None or holder == identity:
            return True
        held = self._voices.get(holder)
        return held is None or held.quiet_ms(now) >= self.options.release_ms

    def _on_voice(self, identity: str, onset: bool, started: bool) -> None:
        if not self._may_take(identity, time.monotonic()):
            return
        if onset and self._on_onset is not None:
            self._on_onset(identity)
        holder = self._linked_identity()
        if started and holder != identity:
            self._link(identity, "started speaking" if holder is None else f"took the floor from {holder}")

    def _successor(self, humans: list[rtc.RemoteParticipant]) -> rtc.RemoteParticipant:
        now = time.monotonic()

        def rank(p: rtc.RemoteParticipant) -> tuple[int, float, float]:
            voice = self._voices.get(p.identity)
            if voice is None:
                return (2, 0.0, 0.0)
            speaking = voice.quiet_ms(now) < self.options.release_ms
            return (0 if speaking else 1, voice.quiet_ms(now), voice.joined)

        return min(humans, key=rank)

    def _link(self, identity: str, why: str) -> None:
        log.info("listening to %s (%s)", identity, why)
        self._set_participant(identity)
        voice = self._voices.get(identity)
        if voice is not None:
            for frame in voice.recent:  # what they said before their speech was recognised
                self.input.push(frame)
        self._publish(identity)

    def _publish(self, identity: str) -> None:
        if self._published == identity or not self.room.isconnected():
            return
        self._published = identity
        previous = self._attr_task

        async def _set() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            try:
                await self.room.local_participant.set_attributes({ATTRIBUTE_FLOOR: identity})
            except Exception as exc:
                log.warning("could not publish the floor holder %s: %s", identity, exc)

        self._attr_task = asyncio.create_task(_set())

    def _check_empty(self) -> None:
        if self._seen_human and not self._empty_called and not self.humans():
            self._empty_called = True
            log.info("the last participant left")
            self._on_empty()
