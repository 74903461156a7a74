"""The real components the later tests rely on start and work here (tests/support helpers)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support import REPO_ROOT, TOOLS_BIN, MissingComponentError, require_binary
from tests.support.chromium import chromium_page, save_screenshot, serve_static
from tests.support.livekit_server import LiveKitServer, start_livekit_server
from tests.support.ports import free_port, free_udp_port_range, port_is_open
from tests.support.redis_server import RedisServer
from tests.support.speech import (
    espeak_audio,
    espeak_wav,
    load_reference_speech,
    read_wav,
    rms_dbfs,
    voiced_seconds,
)

pytestmark = pytest.mark.timeout(120)


def test_free_ports_are_bindable() -> None:
    import socket

    tcp = free_port(tcp=True, udp=True)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", tcp))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", tcp))
    start, end = free_udp_port_range(4)
    assert end - start == 3
    assert not port_is_open(tcp)


async def test_livekit_server_participant_joins_and_room_is_listed(livekit_server: LiveKitServer) -> None:
    from livekit import api, rtc

    room = rtc.Room()
    await room.connect(livekit_server.url, livekit_server.token("alice", "infra-room"))
    lkapi = livekit_server.api()
    try:
        assert room.connection_state == rtc.ConnectionState.CONN_CONNECTED
        assert room.local_participant.identity == "alice"
        rooms = (await lkapi.room.list_rooms(api.ListRoomsRequest())).rooms
        assert "infra-room" in [r.name for r in rooms]
        people = await lkapi.room.list_participants(api.ListParticipantsRequest(room="infra-room"))
        assert [p.identity for p in people.participants] == ["alice"]
    finally:
        await room.disconnect()
        await lkapi.aclose()


async def test_livekit_two_participants_exchange_audio(livekit_server: LiveKitServer) -> None:
    """Media really flows through the SFU over loopback: bob hears the tone alice publishes."""
    from livekit import rtc

    sr = 48000
    alice, bob = rtc.Room(), rtc.Room()
    got_track: asyncio.Future = asyncio.get_running_loop().create_future()

    @bob.on("track_subscribed")
    def _on_track(track, publication, participant):
        if track.kind == rtc.TrackKind.KIND_AUDIO and not got_track.done():
            got_track.set_result(track)

    source = rtc.AudioSource(sr, 1)

    async def push_tone() -> None:
        t = np.arange(sr // 100) / sr
        for i in range(300):  # up to 3 s of 10 ms frames
            pcm = (0.3 * np.sin(2 * np.pi * 440 * (t + i / 100)) * 32767).astype(np.int16)
            await source.capture_frame(rtc.AudioFrame(pcm.tobytes(), sr, 1, len(pcm)))

    pusher: asyncio.Task | None = None
    stream: rtc.AudioStream | None = None
    await bob.connect(livekit_server.url, livekit_server.token("bob", "media-room"))
    await alice.connect(livekit_server.url, livekit_server.token("alice", "media-room"))
    try:
        track = rtc.LocalAudioTrack.create_audio_track("tone", source)
        await alice.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        pusher = asyncio.create_task(push_tone())
        remote = await asyncio.wait_for(got_track, 15)
        stream = rtc.AudioStream(remote, sample_rate=sr, num_channels=1)
        loudest = -np.inf
        async with asyncio.timeout(15):
            async for event in stream:
                data = np.frombuffer(event.frame.data, dtype=np.int16).astype(np.float32) / 32768
                loudest = max(loudest, rms_dbfs(data))
                if loudest > -20:
                    break
        assert loudest > -20, f"bob heard only {loudest:.1f} dBFS"
    finally:
        # Close every native resource before the test's event loop goes away.
        if pusher is not None:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pusher
        if stream is not None:
            await stream.aclose()
        await source.aclose()
        await alice.disconnect()
        await bob.disconnect()


def test_redis_ping(redis_server: RedisServer) -> None:
    assert redis_server.ping()
    assert redis_server.command("SET", "k", "v") == "OK"
    assert redis_server.command("GET", "k") == "v"


async def test_livekit_server_with_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    """The configuration livekit-sip needs: livekit-server backed by Redis."""
    from livekit import api

    with start_livekit_server(tmp_path, redis_address=redis_server.address) as lk:
        lkapi = lk.api()
        try:
            await lkapi.room.create_room(api.CreateRoomRequest(name="redis-room"))
            rooms = (await lkapi.room.list_rooms(api.ListRoomsRequest())).rooms
            assert [r.name for r in rooms] == ["redis-room"]
        finally:
            await lkapi.aclose()
        assert "redis" in lk.log_text().lower()
    assert redis_server.command("DBSIZE") > 0  # livekit keeps its room/node state there


@pytest.mark.parametrize(
    ("voice", "text", "min_s", "max_s"),
    [
        ("en", "Hello, this is a test of the speech agent. How are you today?", 2.0, 8.0),
        ("cmn", "你好，欢迎使用语音助手。今天天气怎么样？", 2.0, 10.0),
    ],
)
def test_espeak_speech_is_audible_and_plausibly_long(voice, text, min_s, max_s, tmp_path: Path) -> None:
    path = espeak_wav(text, voice, tmp_path / f"{voice}.wav", sample_rate=24000)
    audio, sr = read_wav(path)
    assert sr == 24000
    assert min_s < len(audio) / sr < max_s
    assert rms_dbfs(audio) > -35
    assert voiced_seconds(audio, sr) > 0.5 * min_s
    # the "zh" alias gives the same Mandarin voice
    if voice == "cmn":
        np.testing.assert_allclose(espeak_audio(text, "zh", 24000), audio, atol=1e-3)


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_reference_speech_loads(reference_dir: Path, lang: str) -> None:
    audio, sr = load_reference_speech(reference_dir, lang, sample_rate=24000)
    assert sr == 24000 and audio.dtype == np.float32
    assert len(audio) / sr > 2.0
    assert rms_dbfs(audio) > -40


MIC_PAGE = """<!doctype html><html><body><h1>fake microphone</h1><pre id="out">starting</pre>
<script>
// Record `ms` of the microphone through WebAudio; return its level and the samples (int16, base64).
async function record(ms) {
  const stream = await navigator.mediaDevices.getUserMedia({audio: {
      echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
  const track = stream.getAudioTracks()[0];
  const ctx = new AudioContext({sampleRate: 48000});
  await ctx.resume();
  const src = ctx.createMediaStreamSource(stream);
  const analyser = ctx.createAnalyser();
  const proc = ctx.createScriptProcessor(4096, 1, 1);
  const mute = ctx.createGain(); mute.gain.value = 0;
  src.connect(analyser); src.connect(proc); proc.connect(mute); mute.connect(ctx.destination);
  const chunks = [];
  proc.onaudioprocess = e => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
  await new Promise(r => setTimeout(r, ms));
  proc.onaudioprocess = null;
  const n = chunks.reduce((a, c) => a + c.length, 0);
  const pcm = new Int16Array(n); let i = 0, s2 = 0;
  for (const c of chunks) for (const v of c) { s2 += v * v; pcm[i++] = Math.max(-1, Math.min(1, v)) * 32767; }
  let bin = ""; const bytes = new Uint8Array(pcm.buffer);
  for (let k = 0; k < bytes.length; k += 0x8000) bin += String.fromCharCode(...bytes.subarray(k, k + 0x8000));
  const result = {label: track.label, readyState: track.readyState, sampleRate: ctx.sampleRate,
                  samples: n, rms: Math.sqrt(s2 / Math.max(n, 1))};
  document.getElementById("out").textContent = JSON.stringify(result, null, 2);
  track.stop(); await ctx.close();
  return {...result, pcm: btoa(bin)};
}
</script></body></html>"""


def _best_normalized_xcorr(recorded: np.ndarray, reference: np.ndarray) -> float:
    """Normalized cross-correlation of `recorded` with the looped `reference` at the best lag (FFT)."""
    looped = np.tile(reference, int(np.ceil(len(recorded) / len(reference))) + 1)
    n = len(looped) + len(recorded)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(looped, size) * np.conj(np.fft.rfft(recorded, size)), size)
    lag = int(np.argmax(corr[: len(looped) - len(recorded) + 1]))
    seg = looped[lag : lag + len(recorded)]
    return float(np.dot(seg, recorded) / (np.linalg.norm(seg) * np.linalg.norm(recorded) + 1e-12))


def _fraction_matching_reference(recorded: np.ndarray, reference: np.ndarray, sr: int) -> float:
    """Share of the recording's voiced 250 ms chunks that match the reference file (correlation > 0.8).

    Chunk by chunk, so a dropout in the capture (a loaded machine) spoils only the chunks around it.
    """
    n = sr // 4
    chunks = [recorded[i : i + n] for i in range(0, len(recorded) - n + 1, n)]
    voiced = [c for c in chunks if rms_dbfs(c) > -40]
    if not voiced:
        return 0.0
    return sum(_best_normalized_xcorr(c, reference) > 0.8 for c in voiced) / len(voiced)


async def test_chromium_fake_microphone_plays_espeak_speech(tmp_path: Path) -> None:
    import base64

    wav = espeak_wav(
        "Hello there. Testing the fake microphone, one two three.",
        "en",
        tmp_path / "mic.wav",
        sample_rate=48000,
    )
    with serve_static(files={"index.html": MIC_PAGE}) as base_url:
        async with chromium_page(wav, name="fake-mic") as s:
            await s.page.goto(base_url + "/index.html")
            result = await s.page.evaluate("record(2500)")
            await save_screenshot(s.page, "infra-fake-mic")
    assert result["readyState"] == "live"
    assert result["sampleRate"] == 48000
    recorded = np.frombuffer(base64.b64decode(result["pcm"]), dtype=np.int16).astype(np.float32) / 32768
    assert len(recorded) > 48000, result["samples"]
    assert rms_dbfs(recorded) > -35, result
    # It is the WAV's speech (not the fake device's default beep): the recording matches the file.
    reference, _ = read_wav(wav)
    assert _fraction_matching_reference(recorded, reference, 48000) > 0.6


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingComponentError, match="make system-deps"):
        require_binary("no-such-tool-sg2")
    with (
        pytest.raises(MissingComponentError, match="livekit-server"),
        start_livekit_server(tmp_path, binary=tmp_path / "livekit-server"),
    ):
        pass


def test_livekit_sip_binary_runs() -> None:
    proc = subprocess.run([TOOLS_BIN / "livekit-sip", "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "LiveKit SIP" in proc.stdout


def test_sip_peers_installed() -> None:
    sipp = subprocess.run(["sipp", "-v"], capture_output=True, text=True, timeout=10)
    assert "SIPp v3" in sipp.stdout  # sipp -v exits 99 by design
    baresip = subprocess.run(["baresip", "-h"], capture_output=True, text=True, timeout=10)
    assert "Usage: baresip" in baresip.stdout + baresip.stderr


def test_system_deps_script_is_a_fast_noop() -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        [REPO_ROOT / "scripts" / "install_system_deps.sh"], capture_output=True, text=True, timeout=900
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", "everything is installed already, so nothing should be done"
    assert elapsed < 3.0
