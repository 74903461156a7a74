"""The web client in real headless Chromium, against the real transport: a fake microphone plays a
WAV of real speech, the page calls, the agent answers (tiny random models), and the page shows it.

The page is the built client (web_client/dist), served by the transport's own route at '/';
`make web-client` builds it (a no-op when it is up to date).
"""

from __future__ import annotations

import asyncio
import subprocess

import numpy as np
import pytest

from tests.support import REPO_ROOT
from tests.support.chromium import chromium_page, save_screenshot
from tests.support.direct import direct_server
from tests.support.speech import load_reference_speech, write_wav

pytestmark = pytest.mark.timeout(180)

WEB_DIST = REPO_ROOT / "web_client" / "dist"

# Records every state the indicator shows (the page changes it through data-state).
RECORD_STATES = """
window.__states = [];
new MutationObserver(() => window.__states.push(document.getElementById('state').dataset.state))
  .observe(document.getElementById('state'), { attributes: true, attributeFilter: ['data-state'] });
"""


# Records the constraints the page asks getUserMedia for.
RECORD_GUM = """() => {
    const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
    navigator.mediaDevices.getUserMedia = (c) => { window.__gum = c; return gum(c); };
}"""


@pytest.fixture(scope="module")
def web_client() -> None:
    proc = subprocess.run(["make", "web-client"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building the web client failed:\n{proc.stdout}\n{proc.stderr}"
    assert (WEB_DIST / "index.html").is_file()


@pytest.fixture
def speech_wav(reference_dir, tmp_path):
    audio, rate = load_reference_speech(reference_dir, "zh", sample_rate=48000)
    lead, tail = np.zeros(int(3.0 * rate), np.float32), np.zeros(int(6.0 * rate), np.float32)
    return write_wav(tmp_path / "caller.wav", np.concatenate([lead, audio, tail]), rate)


async def test_browser_call_shows_transcript_state_and_plays_agent_audio(
    tiny_models, web_client, speech_wav
) -> None:
    session = {"play_greeting": True, "max_response_ms": 2400}
    async with (
        direct_server(tiny_models, session=session, web_client_dir=WEB_DIST) as srv,
        chromium_page(fake_audio_wav=speech_wav, name="direct-browser") as s,
    ):
        page = s.page
        await page.goto(srv.url + "/")
        assert await page.get_attribute("#state", "data-state") == "idle"
        assert await page.get_attribute("#call", "aria-label") == "Start a call"
        await page.evaluate(RECORD_STATES)
        await page.evaluate(RECORD_GUM)
        await page.click("#call")

        # a user turn was heard and answered: the transcript has it, with its latency
        await page.wait_for_function(
            """() => {
                const items = [...document.querySelectorAll('#transcript li')];
                const user = items.findIndex(li => li.classList.contains('user'));
                return user >= 0 && items.slice(user).some(li => li.classList.contains('agent')
                    && li.querySelector('.text').textContent.trim() && li.dataset.latencyMs);
            }""",
            timeout=60_000,
        )
        # the agent's voice plays in the page's audio element, and the reply moves its level meter
        await page.wait_for_function(
            """() => { const a = document.getElementById('agent-audio');
                       return a.srcObject && !a.paused && a.currentTime > 1.0
                           && document.getElementById('state').dataset.state === 'speaking'
                           && Number(document.getElementById('agent-meter').dataset.level) > 20; }""",
            timeout=30_000,
        )
        states = await page.evaluate("window.__states")
        for state in ("connecting", "listening", "thinking", "speaking"):
            assert state in states, states
        greeting = page.locator("#transcript li.agent").first
        assert (await greeting.locator(".who").text_content()) == "Agent (greeting)"
        expected = tiny_models.fmt.decode_text(
            list(tiny_models.resolve_greeting(srv.service.settings.session_options())[0].text_ids)
        )
        assert (await greeting.locator(".text").text_content()) == expected.rstrip("\ufffd").strip() != ""
        # its end was reported: played out, or cut because the caller spoke over it
        assert await greeting.get_attribute("data-status") in ("completed", "interrupted")
        assert not await page.is_visible("#key-row") and not await page.is_visible("#error")
        latency = await page.text_content("#latency")
        assert latency is not None and latency.strip().endswith(")") and " ms" in latency
        assert int(await page.get_attribute("#mic-meter", "data-peak")) > 20  # the fake mic's speech
        assert await page.get_attribute("#mute", "aria-pressed") == "false"
        audio = (await page.evaluate("window.__gum"))["audio"]
        assert audio["echoCancellation"] and audio["noiseSuppression"] and audio["autoGainControl"]
        await save_screenshot(page, "direct-browser-call")

        # mute, then hang up: the server ends the call and frees the engine session
        await page.click("#mute")
        assert await page.get_attribute("#mute", "aria-pressed") == "true"
        assert (await page.evaluate("navigator.mediaDevices !== undefined")) is True
        (call,) = srv.service.calls.values()
        await page.click("#call")
        await page.wait_for_function("document.getElementById('state').dataset.state === 'ended'")
        await asyncio.wait_for(call.wait_closed(), 15)
        assert call.end_reason == "hung up (DELETE)"
        assert srv.engine.live_sessions == 0
        assert await page.get_attribute("#call", "aria-label") == "Start a call"
        assert s.page_errors == []

        # call again, then close the tab: the server ends that call too
        await page.click("#call")
        await page.wait_for_function(
            "['listening', 'speaking'].includes(document.getElementById('state').dataset.state)"
        )
        (call,) = srv.service.calls.values()
        await page.close()
        await asyncio.wait_for(call.wait_closed(), 15)
        assert call.end_reason in ("hung up (DELETE)", "connection closed by the peer")
        assert srv.engine.live_sessions == 0


async def test_browser_shows_a_clear_message_when_the_microphone_is_denied(tiny_models, web_client) -> None:
    deny = """navigator.mediaDevices.getUserMedia = () =>
        Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));"""
    async with (
        direct_server(tiny_models, web_client_dir=WEB_DIST, access_key="k3y") as srv,
        chromium_page(
            name="direct-browser-denied", context_kwargs={"viewport": {"width": 375, "height": 740}}
        ) as s,
    ):
        await s.context.add_init_script(deny)
        await s.page.goto(srv.url + "/")
        # the server needs a key: the page asks for it, and refuses to call without it
        await s.page.wait_for_selector("#key-row:not([hidden])")
        await s.page.click("#call")
        await s.page.wait_for_selector("#error:not([hidden])")
        assert "access key" in (await s.page.text_content("#error"))
        await s.page.fill("#access-key", "k3y")
        await s.page.click("#call")
        await s.page.wait_for_function(
            "document.getElementById('error').textContent.includes('Microphone access was denied')"
        )
        assert await s.page.get_attribute("#state", "data-state") == "idle"
        assert await s.page.get_attribute("#call", "aria-label") == "Start a call"
        assert srv.service.calls == {} and srv.engine.live_sessions == 0
        # a phone-sized viewport: nothing overflows horizontally
        assert await s.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        await save_screenshot(s.page, "direct-browser-mic-denied")
