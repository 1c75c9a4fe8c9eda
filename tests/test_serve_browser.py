"""A real browser against a real server: headless Chromium (the Debian package, driven over the
Chrome DevTools Protocol with aiohttp's websocket client, so no browser download) opens the page
of ``memrope serve`` on 127.0.0.1, starts a session, decodes the WebRTC video (``getStats``
``framesDecoded``), changes the prompt and sees the new prompt's per-block events; its state
label and the server's session count follow the session (running after a prompt change, one
session while it plays, none once stopped). The server requires an API key, which the page takes
from its URL fragment."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")
aiohttp = pytest.importorskip("aiohttp", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")

from memrope.runtime.demo.evaluate import evaluate  # noqa: E402
from memrope.runtime.demo.world import parse_prompt  # noqa: E402
from memrope.runtime.serve.client import ServerProcess, http_json  # noqa: E402
from memrope.runtime.serve.options import API_KEY_ENV  # noqa: E402

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
    # Raw host candidates instead of mDNS names aiortc would have to resolve; the video plays
    # without a user gesture.
    "--disable-features=WebRtcHideLocalIpsWithMdns", "--autoplay-policy=no-user-gesture-required",
)
START_PROMPT = "a white triangle moving up quickly on a blue background"  # the page's own default
NEW_PROMPT = "a green square moving left on a white background"
# One decoded video frame as the page shows it: drawn to a canvas and read back as RGBA bytes.
FRAME_PIXELS = ("(() => { const v = document.getElementById('video'); const c = document.createElement('canvas'); "
                "c.width = v.videoWidth; c.height = v.videoHeight; const g = c.getContext('2d'); "
                "g.drawImage(v, 0, 0); return [c.width, c.height, "
                "Array.from(g.getImageData(0, 0, c.width, c.height).data)]; })()")
STATE = "document.getElementById('r-state').textContent"
PROMPT_VERSION = "document.getElementById('r-prompt').textContent"
MODEL_LINE = "document.getElementById('model').textContent"
API_KEY = "browser-test-key-0123456789"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium); the browser test needs it")


class DevTools:
    """The smallest CDP client this test needs: one page, Runtime.evaluate, Page.navigate."""

    def __init__(self, ws):
        self.ws = ws
        self._id = 0

    async def call(self, method: str, timeout_s: float = 30.0, **params) -> dict:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        deadline = time.monotonic() + timeout_s
        while True:
            message = await self.ws.receive(timeout=max(deadline - time.monotonic(), 0.01))
            if message.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed during {method}: {message}")
            reply = json.loads(message.data)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def evaluate(self, expression: str, timeout_s: float = 30.0):
        result = await self.call("Runtime.evaluate", timeout_s, expression=expression, awaitPromise=True,
                                 returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"{expression}: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout_s: float, what: str):
        """Evaluate every 0.2 s until truthy; fail naming ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = await self.evaluate("JSON.stringify({events: window.memrope.events.slice(-3), "
                                            "message: document.getElementById('message').textContent})")
                raise AssertionError(f"waited {timeout_s:g} s for {what}; page: {state}")
            await asyncio.sleep(0.2)


async def _devtools_url(profile: Path, browser: subprocess.Popen, timeout_s: float = 30.0) -> str:
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while not port_file.is_file() or not port_file.read_text().strip():
        if browser.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Chromium did not open its DevTools port (exit code {browser.poll()})")
        await asyncio.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                pages = [t for t in await response.json() if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            await asyncio.sleep(0.1)
    raise RuntimeError("Chromium has no page target")


@pytest.fixture(scope="module", params=["one process", "ray cluster"])
def server(request):
    """The server the browser opens: ``memrope serve``, and ``memrope serve --ray`` with one
    engine replica on the two-node Ray cluster of ``conftest.ray_cluster`` (the same page and API;
    the media comes from the replica)."""
    cluster = () if request.param == "one process" else (
        "--ray", "--ray-address", request.getfixturevalue("ray_cluster").address, "--replicas", "1")
    with ServerProcess(*cluster, "--max-sessions", "2", "--heartbeat-timeout", "4", start_timeout_s=300,
                       env=dict(os.environ, **{API_KEY_ENV: API_KEY})) as proc:
        yield proc


def _scene_of(pixels: list) -> dict:
    """The background and object colours the evaluator reads in one page frame ``[w, h, rgba]``."""
    width, height, data = pixels
    frame = np.asarray(data, dtype=np.uint8).reshape(height, width, 4)[..., :3]
    report = evaluate(frame[None])
    return {"background": report.background, "colors": sorted(o.color for o in report.objects)}


@pytest.mark.slow  # a browser test: CI's slow step
def test_browser_plays_the_stream_and_changes_the_prompt(server, tmp_path):
    chromium = _chromium()
    profile = tmp_path / "profile"
    browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def drive() -> dict:
        ws_url = await _devtools_url(profile, browser)
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
            page = DevTools(ws)
            # Without the key the page says what is missing, and starts nothing.
            await page.call("Page.navigate", url=server.url + "/")
            await page.until("typeof window.memrope === 'object'", 30, "the page to load")
            keyless = await page.evaluate("window.memrope.start().then(() => 'started', e => e.message)",
                                          timeout_s=30)
            await page.call("Page.navigate", url="about:blank")  # a fragment change alone would not reload
            await page.until("location.href === 'about:blank'", 30, "the page to unload")
            await page.call("Page.navigate", url=f"{server.url}/#key={API_KEY}")
            await page.until("typeof window.memrope === 'object' && "
                             "document.getElementById('model').textContent.includes('fps')", 30, "the page to load")
            session_id = await page.evaluate("window.memrope.start()", timeout_s=60)
            # A frame of the first block (9 frames), before the demo model's drift.
            await page.until("window.memrope.stats().then(s => s.framesDecoded >= 2 && s)", 90, "the first frames")
            start_frame = await page.evaluate(FRAME_PIXELS)
            first = await page.until("window.memrope.stats().then(s => s.framesDecoded > 10 && s)", 90,
                                     "more than 10 decoded frames")
            await page.until("window.memrope.events.some(e => e.type === 'block' && e.ttff_ms !== undefined)", 30,
                             "the first block's event")
            playing = await page.until(f"{STATE} === 'running' && {MODEL_LINE}.includes('1/2 sessions') && "
                                       f"[{STATE}, {MODEL_LINE}]", 10,
                                       "the state label and the session count to show the running session")
            change = await page.evaluate(f"window.memrope.changePrompt({json.dumps(NEW_PROMPT)})", timeout_s=60)
            new_block = await page.until(
                f"window.memrope.events.find(e => e.type === 'block' && e.prompt_version === "
                f"{change['prompt_version']})", 90, "a block event of the new prompt")
            later = await page.until(f"window.memrope.stats().then(s => s.framesDecoded > {first['framesDecoded']}"
                                     " && s)", 30, "frames after the prompt change")
            readout = await page.evaluate("document.getElementById('r-lag').textContent")
            # The label says the session's state, not the last prompt event's text.
            changed = await page.until(f"{STATE} === 'running' && {PROMPT_VERSION}.startsWith('v1 ') && "
                                       f"[{STATE}, {PROMPT_VERSION}]", 10, "the state label back to running")
            status = http_json("GET", f"{server.url}/sessions/{session_id}", api_key=API_KEY)[2]
            await page.evaluate("window.memrope.stop()")
            stopped = await page.until(f"{MODEL_LINE}.includes('0/2 sessions') && [{STATE}, {MODEL_LINE}]", 10,
                                       "the session count to drop once stopped")
            return dict(start_frame=start_frame, keyless=keyless, session_id=session_id, first=first, change=change, new_block=new_block, later=later,
                        readout=readout, status=status, playing=playing, changed=changed, stopped=stopped)

    try:
        seen = asyncio.run(asyncio.wait_for(drive(), 240))
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()

    assert seen["keyless"] == "this server needs an API key: open the page as /#key=YOUR_KEY", seen["keyless"]
    assert seen["first"]["framesDecoded"] > 10
    width, height = server.get("/healthz")[2]["width"], server.get("/healthz")[2]["height"]
    assert (seen["first"]["frameWidth"], seen["first"]["frameHeight"]) == (width, height)
    assert seen["change"]["prompt_version"] == 1 and seen["change"]["prompt"] == NEW_PROMPT
    assert seen["new_block"]["block"] >= seen["change"]["applies_at_block"]
    assert seen["later"]["framesDecoded"] > seen["first"]["framesDecoded"]
    assert seen["readout"].endswith(" ms"), seen["readout"]
    assert seen["playing"][0] == "running" and "1/2 sessions" in seen["playing"][1]
    assert seen["changed"][0] == "running" and seen["changed"][1].startswith("v1 from block ")
    assert seen["stopped"][0] == "stopped" and "0/2 sessions" in seen["stopped"][1]
    assert seen["status"]["prompt"] == NEW_PROMPT and seen["status"]["frames_sent"] > 10
    # The picture: a frame of the first block, read from the page's video element, shows the
    # prompt's background. (The demo model draws no objects yet and drifts after its first blocks,
    # so a prompt switch does not show in its pictures: docs/demo_quality.md.)
    shown = _scene_of(seen["start_frame"])
    assert shown["background"] == parse_prompt(START_PROMPT).background, shown
    # Stopping from the page frees the session.
    deadline = time.monotonic() + 10
    while server.get("/healthz")[2]["sessions"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.get("/healthz")[2]["sessions"] == 0
    assert server.get(f"/sessions/{seen['session_id']}")[2]["reason"] == "stopped by the client"
