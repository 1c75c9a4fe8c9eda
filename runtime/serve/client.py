"""A Python viewer for ``memrope serve``: what the page does, in aiortc, for scripts, the tests
and the benchmark.

Owns: :class:`Viewer` (create a session over REST, receive its video over WebRTC, count and time
the frames, record the events, send heartbeats on the data channel, change the prompt, pause,
resume, stop), :class:`ServeError` (an HTTP error answer: status, message, ``Retry-After``),
:class:`ServerProcess` (``memrope serve`` in a child process: start, wait for its URL, read its
metrics, stop) and :func:`http_json` (one blocking request). ``python -m memrope.runtime.serve.client URL``
watches one session and prints a JSON line per second.

Does not own the server. Every wait takes a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from memrope.runtime.serve.options import API_KEY_ENV, CLIENT_KEEPALIVE_S


class ServeError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


class SessionEnded(RuntimeError):
    """The session ended (the server said why) while the viewer was waiting on it."""

    def __init__(self, session_id: str, reason: str):
        super().__init__(f"session {session_id} ended: {reason}")
        self.session_id, self.reason = session_id, reason


class Viewer:
    """One client of one session.

    The server tells a viewer why its session ended with an ``ended`` event on the data channel.
    A server that can no longer send it (a cluster replica that died) is noticed by silence: with
    nothing received for ``silence_s`` (no frame, no event), the viewer asks the API for the
    session, which answers why it ended; a failed request (the API restarting) is not an answer,
    and the viewer keeps watching. Once the session has ended, :meth:`wait_for` raises
    :class:`SessionEnded` instead of waiting out its timeout.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        read: pull the received video (False: connect but never read a frame).
        heartbeat_s: heartbeat period on the data channel (REST before the channel opens).
        silence_s: quiet seconds before the viewer asks whether its session still exists
          (default: three heartbeats, at least 2 s).
        api_key: sent as ``Authorization: Bearer`` to a server that requires one.
        ssl_context: how to verify an HTTPS server (default: the system's CAs).
    """

    def __init__(self, base_url: str, *, read: bool = True, heartbeat_s: float = 1.0, api_key: str | None = None,
                 ssl_context=None, silence_s: float | None = None):
        import aiohttp

        self.base_url = base_url.rstrip("/")
        self.read = read
        self.heartbeat_s = heartbeat_s
        self.silence_s = silence_s if silence_s is not None else max(3 * heartbeat_s, 2.0)
        self.ended_reason: str | None = None  # why the session ended, once known
        self.last_heard = time.monotonic()  # the last frame or event
        self._asking: asyncio.Future | None = None  # a liveness question to the API in flight
        # Idle pooled connections close before the server's keep-alive ends (see SERVER_KEEPALIVE_S).
        connector = aiohttp.TCPConnector(keepalive_timeout=CLIENT_KEEPALIVE_S,
                                         ssl=True if ssl_context is None else ssl_context)
        self.http = aiohttp.ClientSession(connector=connector, headers=_auth(api_key))
        self.session: dict | None = None
        self.pc = None
        self.channel = None
        self.events: list[dict] = []
        self.frame_times: list[float] = []   # time.monotonic() of every frame received
        self.created_at: float | None = None  # just before POST /sessions
        self._tasks: list[asyncio.Task] = []
        self._changed = asyncio.Event()

    @property
    def id(self) -> str:
        if self.session is None:
            raise RuntimeError("no session yet: call create() or start()")
        return self.session["id"]

    @property
    def frames(self) -> int:
        return len(self.frame_times)

    # -- REST --------------------------------------------------------------------------------------

    async def request(self, method: str, path: str, body=None, *, raw: bytes | None = None) -> dict:
        """``method path`` with a JSON ``body`` (or ``raw`` bytes); the JSON answer, or ServeError."""
        kwargs = {"data": raw, "headers": {"Content-Type": "application/json"}} if raw is not None else {"json": body}
        async with self.http.request(method, self.base_url + path, **kwargs) as response:
            text = await response.text()
            data = json.loads(text) if text else {}
            if response.status >= 400:
                raise ServeError(response.status, data.get("error", text), response.headers.get("Retry-After"))
            return data

    async def create(self, prompt: str, **options) -> dict:
        self.created_at = time.monotonic()
        self.session = await self.request("POST", "/sessions", {"prompt": prompt, **options})
        return self.session

    async def change_prompt(self, prompt: str, **options) -> dict:
        return await self.request("POST", f"/sessions/{self.id}/prompt", {"prompt": prompt, **options})

    async def pause(self) -> dict:
        return await self.request("POST", f"/sessions/{self.id}/pause")

    async def resume(self) -> dict:
        return await self.request("POST", f"/sessions/{self.id}/resume")

    async def status(self) -> dict:
        return await self.request("GET", f"/sessions/{self.id}")

    async def stop(self) -> dict:
        return await self.request("POST", f"/sessions/{self.id}/stop")

    # -- WebRTC ------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Offer a recvonly video transceiver and an event channel; start reading and heartbeats."""
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

        # The server's STUN/TURN servers (none: host candidates only).
        ice = [RTCIceServer(**server) for server in (self.session or {}).get("ice_servers", [])]
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        pc.addTransceiver("video", direction="recvonly")
        self.channel = pc.createDataChannel("events")
        self.channel.on("message", self._on_message)

        @pc.on("track")
        def _track(track) -> None:
            if self.read:
                self._tasks.append(asyncio.ensure_future(self._read(track)))

        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers every candidate here
        answer = await self.request("POST", f"/sessions/{self.id}/offer",
                                    {"sdp": pc.localDescription.sdp, "type": "offer"})
        await pc.setRemoteDescription(RTCSessionDescription(**answer))
        self._tasks.append(asyncio.ensure_future(self._heartbeat()))

    async def start(self, prompt: str, **options) -> dict:
        await self.create(prompt, **options)
        await self.connect()
        return self.session

    async def _read(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                await track.recv()
                self.last_heard = time.monotonic()
                self.frame_times.append(self.last_heard)
                self._changed.set()
        except MediaStreamError:
            pass

    async def _heartbeat(self) -> None:
        import aiohttp

        while self.ended_reason is None:
            if self.channel is not None and self.channel.readyState == "open":
                self.channel.send('{"type": "heartbeat"}')
                if time.monotonic() - self.last_heard > self.silence_s and (self._asking is None or self._asking.done()):
                    # Its own task: an API that is slow to answer must not hold up the heartbeats.
                    self._asking = asyncio.ensure_future(self._ask_if_ended())
                    self._tasks.append(self._asking)
            elif self.session is not None:  # no channel (yet, or any more): over REST
                try:
                    await self.request("POST", f"/sessions/{self.id}/heartbeat")
                except ServeError as exc:
                    if exc.status in (404, 409):
                        self._ended(exc.message)
                    # anything else (the API restarting, a replica not answering): try again
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    pass
            await asyncio.sleep(self.heartbeat_s)

    async def _ask_if_ended(self) -> None:
        """The server has been silent: ask the API whether the session still exists."""
        import aiohttp

        self.last_heard = time.monotonic()  # one question per silent period
        try:
            # Unanswered within the silent period, it is asked again: a server that died may hold a
            # request until its cluster notices, and the next one is then answered.
            status = await asyncio.wait_for(self.status(), self.silence_s)
        except ServeError as exc:
            if exc.status in (404, 409):
                self._ended(exc.message)
            return
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return  # the API is not answering (restarting): not a sign the session ended
        if status.get("state") == "ended":
            self._ended(status.get("reason") or "ended")

    def _ended(self, reason: str) -> None:
        if self.ended_reason is None:
            self.events.append({"type": "ended", "reason": reason, "from": "api"})
            self.ended_reason = reason
            self._changed.set()

    def _on_message(self, message) -> None:
        event = json.loads(message)
        self.last_heard = time.monotonic()
        self.events.append(event)
        if event.get("type") == "ended":
            self.ended_reason = event.get("reason") or "ended"
        self._changed.set()

    # -- waiting -----------------------------------------------------------------------------------

    async def wait_for(self, condition: Callable[[], object], timeout_s: float, what: str):
        """Wait until ``condition()`` is truthy (checked on every frame and event); TimeoutError
        naming ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if self.ended_reason is not None:
                raise SessionEnded(self.session["id"] if self.session else "?", self.ended_reason)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"waited {timeout_s:g} s for {what}; got {self.frames} frames, "
                                   f"{len(self.events)} events (last: {self.events[-1:]})")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.25))

    async def wait_frames(self, count: int, timeout_s: float) -> int:
        return await self.wait_for(lambda: self.frames >= count and self.frames, timeout_s, f"{count} frames")

    async def wait_event(self, predicate: Callable[[dict], bool], timeout_s: float, what: str) -> dict:
        return await self.wait_for(lambda: next((e for e in self.events if predicate(e)), None), timeout_s, what)

    def block_events(self) -> list[dict]:
        return [e for e in self.events if e.get("type") == "block"]

    async def close(self) -> None:
        """Close the connection (the server ends the session when it notices) and the HTTP client."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.pc is not None:
            await self.pc.close()
        await self.http.close()

    async def __aenter__(self) -> Viewer:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def http_json(method: str, url: str, body=None, *, raw: bytes | None = None, timeout_s: float = 30.0,
              api_key: str | None = None, ssl_context=None) -> tuple[int, dict, dict]:
    """One blocking request: ``(status, headers, JSON answer)``; error statuses are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {**({"Content-Type": "application/json"} if data is not None else {}), **_auth(api_key)}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=ssl_context) as response:
            status, headers, text = response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        status, headers, text = error.code, dict(error.headers), error.read().decode()
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        doc = {"text": text}
    return status, headers, doc


class ServerProcess:
    """``memrope serve --port 0 ARGS`` in a child process, as a context manager.

    ``url`` is the server's address once it printed it; ``output`` every line it wrote;
    :meth:`metrics` its ``/metrics`` as ``{name or name{labels}: value}``. Stopping sends SIGTERM
    (the server ends its sessions and its worker), then SIGKILL after ``stop_timeout_s``.
    """

    def __init__(self, *args: str, start_timeout_s: float = 180.0, stop_timeout_s: float = 20.0,
                 env: dict[str, str] | None = None):
        self.args = ["--port", "0", *args]
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.env = env
        self.output: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen([sys.executable, "-m", "memrope", "serve", *self.args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=self.env if self.env is not None else dict(os.environ))
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(self.start_timeout_s) or self.url is None:
            self.__exit__(None, None, None)
            raise RuntimeError(f"memrope serve did not start within {self.start_timeout_s:g} s:\n"
                               + "".join(self.output[-40:]))
        return self

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            if self.url is None and line.startswith("memrope serve: http"):
                self.url = line.split()[2].rstrip("/")
                self._ready.set()
        self._ready.set()  # exited

    @property
    def api_key(self) -> str | None:
        """The key the server requires (its ``$MEMROPE_SERVE_API_KEY``), if any."""
        return (self.env if self.env is not None else os.environ).get(API_KEY_ENV) or None

    def get(self, path: str) -> tuple[int, dict, dict]:
        return http_json("GET", self.url + path, api_key=self.api_key)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as response:
            text = response.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def __exit__(self, *exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _watch(url: str, prompt: str, seconds: float, ssl_context=None) -> int:
    async with Viewer(url, api_key=os.environ.get(API_KEY_ENV) or None, ssl_context=ssl_context) as viewer:
        await viewer.start(prompt)
        print(json.dumps({"session": viewer.id}), flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
            blocks = viewer.block_events()
            print(json.dumps({"frames": viewer.frames, "blocks": len(blocks),
                              "last": blocks[-1] if blocks else None}), flush=True)
        await viewer.stop()
    return 0


def wait_until_serving(url: str, timeout_s: float, poll_s: float = 0.5, ssl_context=None) -> None:
    """Poll ``GET /healthz`` until the server answers 200, for at most ``timeout_s`` seconds
    (a server that was just started loads its model and warms up first). A certificate that
    does not verify fails at once."""
    import ssl

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if http_json("GET", url.rstrip("/") + "/healthz", timeout_s=poll_s * 4, ssl_context=ssl_context)[0] == 200:
                return
        except OSError as exc:  # not listening yet, unless the TLS handshake failed
            if isinstance(getattr(exc, "reason", exc), ssl.SSLError):
                raise
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not answer GET /healthz with 200 within {timeout_s:g} s")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memrope.runtime.serve.client",
                                     description="Watch one memrope serve session and print progress as JSON lines "
                                                 f"(with ${API_KEY_ENV} set, it is sent as the API key).")
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--prompt", default="a small red boat on the blue sea at night")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to watch")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="wait up to this many seconds for the server to be ready (e.g. one just started)")
    parser.add_argument("--cafile", help="PEM certificate(s) to trust for an https:// server (e.g. its self-signed one)")
    args = parser.parse_args(argv)
    try:
        context = None
        if args.cafile:
            import ssl

            context = ssl.create_default_context(cafile=args.cafile)
        if args.wait > 0:
            wait_until_serving(args.url, args.wait, ssl_context=context)
        return asyncio.run(_watch(args.url, args.prompt, args.seconds, context))
    except (ServeError, TimeoutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
