"""A Python caller for the browser-call endpoint: what the tests, the benchmark and a smoke check use.

    async with DirectClient("http://127.0.0.1:8080", key=...) as client:
        await client.call()                       # offer -> answer, ICE, DTLS, data channel
        start = client.source.play(speech_48k)    # queue audio on the outgoing (real-time) track
        await client.wait_event(lambda m: m["type"] == "response_done")
        agent = client.recorder.audio()           # everything received, 48 kHz mono float32

Both timelines are kept: ``source.time_of(sample)`` is the loop time a sent sample left, and
``recorder.frames`` holds each received frame with its arrival time, so latencies are measured
between what was said and what was heard, as a caller would.

Command line (a smoke check against a running ``sg2 serve``)::

    python -m agent.direct.client http://127.0.0.1:8080 --wav hello.wav --out reply.wav
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from .rtc import tune_audio_jitter_buffer

RATE = 48000
FRAME = 960
TIME_BASE = fractions.Fraction(1, RATE)


class SignallingFailed(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class PacedSource(MediaStreamTrack):
    """Outgoing audio: queued clips played back to back in real time, silence in between."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[np.ndarray] = deque()
        self._queued = 0
        self.sent = 0  # samples handed to the encoder
        self.frame_times: list[float] = []  # loop time each 20 ms frame was handed over
        self._start: float | None = None
        self._sent_cond: asyncio.Condition | None = None

    def play(self, audio: np.ndarray) -> int:
        """Queue 48 kHz mono float audio; returns the sample index (on the sent timeline) it starts at."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        start = self.sent + self._queued
        if audio.size:
            self._queue.append(audio)
            self._queued += audio.size
        return start

    @property
    def idle(self) -> bool:
        return self._queued == 0

    def time_of(self, sample: int) -> float | None:
        """Loop time at which sample ``sample`` of the sent timeline was "spoken" (None if its frame
        has not left yet). Like a microphone, a frame leaves when its last sample is captured, so a
        sample was spoken ``(FRAME - offset)`` samples before its frame left: packetisation delay
        is part of what a caller experiences and is counted, not hidden."""
        i = sample // FRAME
        if i >= len(self.frame_times):
            return None
        return self.frame_times[i] - (FRAME - sample % FRAME) / RATE

    async def wait_sent(self, sample: int, timeout: float = 60.0) -> float:
        cond = self._condition()
        async with cond:
            await asyncio.wait_for(cond.wait_for(lambda: self.sent > sample), timeout)
        t = self.time_of(sample)
        assert t is not None
        return t

    def _condition(self) -> asyncio.Condition:
        if self._sent_cond is None:
            self._sent_cond = asyncio.Condition()
        return self._sent_cond

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        else:
            wait = self._start + len(self.frame_times) * FRAME / RATE - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        out = np.zeros(FRAME, dtype=np.float32)
        filled = 0
        while filled < FRAME and self._queue:
            head = self._queue[0]
            k = min(FRAME - filled, head.size)
            out[filled : filled + k] = head[:k]
            filled += k
            if k == head.size:
                self._queue.popleft()
            else:
                self._queue[0] = head[k:]
        self._queued -= filled
        pcm = np.clip(out * 32767.0, -32768, 32767).astype(np.int16).reshape(1, FRAME)
        frame = AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = len(self.frame_times) * FRAME
        frame.time_base = TIME_BASE
        self.frame_times.append(loop.time())
        self.sent += FRAME
        cond = self._condition()
        async with cond:
            cond.notify_all()
        return frame


class Recorder:
    """Incoming audio: every received frame, mono float32, with its arrival (loop) time."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, np.ndarray]] = []
        self.sample_rates: set[int] = set()
        self._cond = asyncio.Condition()
        self.ended = False

    async def run(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await track.recv()
                channels = len(frame.layout.channels)
                pcm = frame.to_ndarray().reshape(-1, channels).astype(np.float32) / 32768.0
                self.sample_rates.add(frame.sample_rate)
                self.frames.append((loop.time(), pcm.mean(axis=1)))
                async with self._cond:
                    self._cond.notify_all()
        except MediaStreamError:
            pass
        finally:
            self.ended = True
            async with self._cond:
                self._cond.notify_all()

    def audio(self, since: float | None = None) -> np.ndarray:
        parts = [pcm for t, pcm in self.frames if since is None or t >= since]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def frame_levels(self) -> list[tuple[float, float]]:
        """(arrival time, RMS in dBFS) of each received frame."""
        out = []
        for t, pcm in self.frames:
            rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if pcm.size else 0.0
            out.append((t, 20 * np.log10(rms) if rms > 0 else -200.0))
        return out

    async def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = 60.0) -> None:
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: predicate(self) or self.ended), timeout)
        if not predicate(self):
            raise AssertionError("the agent's audio track ended first")


class DirectClient:
    def __init__(
        self,
        base_url: str,
        *,
        key: str | None = None,
        options: dict[str, Any] | None = None,
        jitter_packets: int | None = 0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.options = options
        self.jitter_packets = jitter_packets
        self.pc: RTCPeerConnection | None = None
        self.source = PacedSource()
        self.recorder = Recorder()
        self.events: list[dict[str, Any]] = []
        self.location: str | None = None
        self.call_id: str | None = None
        self._events_cond = asyncio.Condition()
        self._tasks: list[asyncio.Task[Any]] = []
        self._http: aiohttp.ClientSession | None = None
        self.channel: Any = None

    async def __aenter__(self) -> DirectClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        h = {}
        if self.key is not None:
            h["Authorization"] = f"Bearer {self.key}"
        if content_type:
            h["Content-Type"] = content_type
        return h

    async def call(self) -> None:
        """Place the call: returns once the answer is applied (media flows shortly after)."""
        loop = asyncio.get_running_loop()
        self._http = aiohttp.ClientSession()
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        transceiver = pc.addTransceiver(self.source, direction="sendrecv")
        if self.jitter_packets is not None:
            tune_audio_jitter_buffer(transceiver.receiver, self.jitter_packets)
        self.channel = pc.createDataChannel("events")
        self.channel.on("message", self._on_message)

        @pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(loop.create_task(self.recorder.run(track)))

        await pc.setLocalDescription(await pc.createOffer())
        if self.options is None:
            body: str = pc.localDescription.sdp
            ctype = "application/sdp"
        else:
            body = json.dumps({"sdp": pc.localDescription.sdp, "options": self.options})
            ctype = "application/json"
        async with self._http.post(
            f"{self.base_url}/v1/webrtc/calls", data=body, headers=self._headers(ctype)
        ) as resp:
            text = await resp.text()
            if resp.status != 201:
                raise SignallingFailed(resp.status, text)
            self.location = resp.headers["Location"]
            answer = json.loads(text)["sdp"] if self.options is not None else text
        self.call_id = self.location.rsplit("/", 1)[-1]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    def _on_message(self, raw: str | bytes) -> None:
        msg = json.loads(raw)
        self.events.append(msg)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._events_cond:
            self._events_cond.notify_all()

    async def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0, after: int = 0
    ) -> dict[str, Any]:
        """The first event (from index ``after`` on) matching ``predicate``; waits for it."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.events[after:] if predicate(e)), None)

        async with self._events_cond:
            try:
                await asyncio.wait_for(self._events_cond.wait_for(lambda: found() is not None), timeout)
            except TimeoutError as exc:
                kinds = [e.get("type") for e in self.events]
                raise AssertionError(f"no matching event within {timeout} s; got {kinds}") from exc
        event = found()
        assert event is not None
        return event

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(json.dumps(message))

    async def hangup(self) -> int:
        """DELETE the call resource, then close; returns the HTTP status of the DELETE."""
        status = 0
        if self.location is not None and self._http is not None:
            async with self._http.delete(f"{self.base_url}{self.location}", headers=self._headers()) as resp:
                status = resp.status
        await self.close()
        return status

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None


def _load_wav_48k(path: Path) -> np.ndarray:
    import soundfile as sf
    import soxr

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    return soxr.resample(mono, rate, RATE).astype(np.float32) if rate != RATE else mono


async def _main(args: argparse.Namespace) -> int:
    async with DirectClient(args.url, key=args.key) as client:
        try:
            await client.call()
        except SignallingFailed as exc:
            print(f"call refused: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"type": "placed", "call_id": client.call_id}), flush=True)
        await client.wait_event(lambda m: m["type"] == "call", timeout=args.timeout)
        print(json.dumps({"type": "connected"}), flush=True)
        if args.wav:
            client.source.play(_load_wav_48k(Path(args.wav)))
        printed = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.seconds
        while loop.time() < deadline:
            with contextlib.suppress(AssertionError):
                await client.wait_event(
                    lambda m: True, timeout=max(0.05, deadline - loop.time()), after=printed
                )
            for event in client.events[printed:]:
                print(json.dumps(event, ensure_ascii=False), flush=True)
            printed = len(client.events)
        if args.out:
            import soundfile as sf

            sf.write(args.out, client.recorder.audio(), RATE, subtype="PCM_16")
        await client.hangup()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Place a browser-style WebRTC call to an sg2 server.")
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--key", help="access key (Authorization: Bearer)")
    p.add_argument("--wav", help="audio to speak (any rate; mixed to mono)")
    p.add_argument("--out", help="write the agent's audio (48 kHz) to this WAV")
    p.add_argument("--seconds", type=float, default=15.0, help="how long to stay on the call")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the connection")
    return asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
