"""The HTTP side of ``memrope serve``: REST control, WebRTC signalling, events, health, metrics,
the page, admission and the sessions' lifecycle.

Owns: :class:`Server` (the registry of live sessions, admission up to ``max_sessions`` with a
503 and ``Retry-After`` past it, session creation rate-limited per client with a 429, one prompt
change in flight per session, ending a session for every reason: stopped by its client,
disconnected, missed heartbeats, video never connected, failed in the worker, server shutdown;
the per-block events; the reaper), the ASGI guards :class:`RequestGuard` (400 for a Host header
the server does not answer to, a DNS-rebinding guard, or a repeated Authorization or Host
header), :class:`RequireApiKey` (401 without the key, everywhere but the page, ``/healthz``,
``/metrics`` and ``/favicon.ico``) and :class:`BodyLimit` (413 past 1 MiB, 408 for a body that
does not arrive in time), all before a body is read, :func:`guarded_protocol` (uvicorn's h11
protocol with a deadline for a request's head and a cap on each client's open connections),
:func:`create_app` (the FastAPI routes; no OpenAPI schema or docs pages) and :func:`run_server`
(uvicorn, HTTP or HTTPS, on a socket bound before it starts, so the printed URL is already
accepting connections).

Every error answer is ``{"error": "<one line>"}`` with a 4xx/5xx status. Everything here runs on
the event loop except prompt encoding (a one-thread pool, so the DiT worker keeps generating
while a prompt is encoded) and the model (``memrope.runtime.serve.worker``).

Does not own the model, scheduling, a session's queue (``memrope.runtime.serve.session``) or WebRTC
media (``memrope.runtime.serve.webrtc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

from memrope.runtime.serve.metrics import ServeStats, make_registry
from memrope.runtime.serve.model import ServeModel
from memrope.runtime.serve.options import (
    MAX_QUEUE_BLOCKS,
    MAX_TRANSITION_BLOCKS,
    SERVER_KEEPALIVE_S,
    ServerOptions,
    SessionOptions,
    host_of,
)
from memrope.runtime.serve.session import ENDED, PAUSED, RUNNING, STARTING, Frame, Session
from memrope.runtime.serve.webrtc import answer_offer
from memrope.runtime.serve.worker import ModelWorker, SessionGone

logger = logging.getLogger(__name__)

# An event channel holding more than this many unsent bytes is backed up: events are dropped
# (and counted) rather than buffered without bound.
EVENT_BUFFER_LIMIT_BYTES = 64 * 1024
ENDED_SESSIONS_REMEMBERED = 1024
# Requests are small JSON documents (a prompt, an SDP offer of a few kB): a larger body is refused
# before it is parsed. A prompt is refused past this many characters before it is tokenized (on
# the event loop): 32 per token of umT5's 512, far above any prompt that fits.
MAX_BODY_BYTES = 1 << 20
MAX_PROMPT_CHARS = 16_384
# What answers without the API key: the page (and its icon), health and metrics. Everything else,
# /sessions and any route added later, needs it.
OPEN_PATHS = frozenset({"/", "/healthz", "/metrics", "/favicon.ico"})
# Headers a request may carry once: with two, which one a component reads is up to the component.
SINGLE_HEADERS = (b"authorization", b"host")
# Session-rate buckets remembered at once; a full bucket is the same as none and is dropped first.
RATE_LIMIT_CLIENTS = 4096


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class CreateSession(BaseModel):
    """``POST /sessions``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    queue_blocks: int | None = Field(None, ge=1, le=MAX_QUEUE_BLOCKS)
    flush_on_prompt_change: bool = True
    memory_on_prompt_change: Literal["keep", "reset"] = "keep"
    recache_on_prompt_change: Literal["none", "recent", "all"] | None = None  # None: the server's --prompt-recache
    transition_blocks: int = Field(0, ge=0, le=MAX_TRANSITION_BLOCKS)


class PromptChange(BaseModel):
    """``POST /sessions/{id}/prompt``; unset options take the session's."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    flush: bool | None = None
    memory: Literal["keep", "reset"] | None = None
    transition_blocks: int | None = Field(None, ge=0, le=MAX_TRANSITION_BLOCKS)
    recache: Literal["none", "recent", "all"] | None = None


class Offer(BaseModel):
    """``POST /sessions/{id}/offer``: the client's SDP offer (ICE candidates gathered)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    sdp: str = Field(min_length=1)
    type: Literal["offer"]


def _validation_error(exc: RequestValidationError) -> tuple[int, str]:
    """FastAPI's validation errors as one line: 400 for a body that is not JSON, else 422."""
    problems = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "not JSON")
            return 400, f"malformed JSON body ({detail}); expected a JSON object"
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "body"
        if where == "body" and error.get("type") == "missing":
            return 422, "missing request body; expected a JSON object"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return 422, "; ".join(problems)


async def _refuse(send, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """An ASGI error answer, ``{"error": message}``, closing the connection."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _raw_refusal(status: int, reason: str, message: str, headers: str = "") -> bytes:
    """The same answer as bytes, for a connection refused before any request was parsed."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{headers}connection: close\r\n\r\n").encode() + body


class BodyLimit:
    """ASGI middleware: a request body over ``limit_bytes`` gets a 413 before the app reads it
    (by its Content-Length, or while a chunked body arrives); a body not received within
    ``timeout_s`` of the request's head gets a 408 (a client trickling a body would otherwise
    hold its connection and a task for ever); complete bodies are passed on."""

    def __init__(self, app, limit_bytes: int = MAX_BODY_BYTES, timeout_s: float = 30.0,
                 stats: ServeStats | None = None):
        self.app, self.limit, self.timeout_s, self.stats = app, limit_bytes, timeout_s, stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await self._too_large(send)
        received, size = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                if self.stats is not None:
                    self.stats.count_refused("body_timeout")
                return await _refuse(send, 408, f"request body not received within {self.timeout_s:g} s "
                                                f"(--body-timeout); got {size} bytes; send the body with the head")
            received.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._too_large(send)
            if not message.get("more_body"):
                break

        async def replay():
            return received.pop(0) if received else await receive()
        return await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        await _refuse(send, 413, f"request body over {self.limit} bytes (or a bad Content-Length); requests are "
                                 "JSON documents of a few kB")


class RequireApiKey:
    """ASGI middleware: every request but those for ``OPEN_PATHS`` (the page and its icon,
    ``/healthz``, ``/metrics``) needs ``Authorization: Bearer <key>``. A missing or wrong key gets
    a one-line 401."""

    def __init__(self, app, key: str, stats: ServeStats):
        self.app, self.expected, self.stats = app, f"Bearer {key}".encode(), stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        self.stats.add("unauthorized")
        what = "wrong API key" if given else "no API key"
        await _refuse(send, 401, f"{what}: this server's /sessions API needs 'Authorization: Bearer <key>' (the key "
                                 "in the server's $MEMROPE_SERVE_API_KEY; the page takes it as /#key=<key>)",
                      headers=((b"www-authenticate", b'Bearer realm="memrope serve"'),))


class RequestGuard:
    """ASGI middleware, outermost: a request with a repeated Authorization or Host header, or
    (when ``options.host_check()`` says so) a Host header naming a host this server does not
    answer to, gets a one-line 400. The Host check is the DNS-rebinding guard: a page on another
    site whose name was re-pointed at this server's address reaches it with that site's name."""

    def __init__(self, app, options: ServerOptions, stats: ServeStats):
        self.app, self.stats = app, stats
        self.hosts = options.host_check()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counts = Counter(name for name, _ in scope["headers"] if name in SINGLE_HEADERS)
        for name, count in counts.items():
            if count > 1:
                self.stats.count_refused("repeated_header")
                return await _refuse(send, 400, f"{count} {name.decode().title()} headers; expected at most one")
        if self.hosts is not None:
            names, any_ip = self.hosts
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            host = host_of(header) if header else ""
            if not (host in names or (any_ip and _is_ip(host))):
                self.stats.count_refused("bad_host")
                expected = ", ".join(sorted(names)) + (", or an IP address" if any_ip else "")
                what = f"Host {header[:100]!r} is not" if header else "no Host header: it must name"
                return await _refuse(send, 400, f"{what} a host this server answers to (expected {expected}; "
                                                "add names with --allowed-hosts)")
        return await self.app(scope, receive, send)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class SessionRateLimit:
    """Session creation per client address: a token bucket of ``burst`` tokens refilled at
    ``per_minute`` (0: no limit). :meth:`take` spends a token, or says how long until one."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate_per_s, self.burst, self.clock = per_minute / 60.0, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def take(self, client: str) -> float:
        """0.0 if ``client`` may create a session now (a token is spent), else the seconds until it may."""
        if self.rate_per_s == 0:
            return 0.0
        now = self.clock()
        tokens, at = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        if tokens >= 1.0:
            self.buckets[client] = (tokens - 1.0, now)
            wait_s = 0.0
        else:
            self.buckets[client] = (tokens, now)
            wait_s = (1.0 - tokens) / self.rate_per_s
        if len(self.buckets) > RATE_LIMIT_CLIENTS:
            self._forget(now)
        return wait_s

    def give_back(self, client: str) -> None:
        """Return the token a refused request spent (up to the burst)."""
        if client in self.buckets:
            tokens, at = self.buckets[client]
            self.buckets[client] = (min(float(self.burst), tokens + 1.0), at)

    def _forget(self, now: float) -> None:
        """Drop the buckets that have refilled; then, if still too many, the least recently used
        (forgetting a client only ever gives it a full bucket)."""
        for client, (tokens, at) in list(self.buckets.items()):
            if tokens + (now - at) * self.rate_per_s >= self.burst:
                del self.buckets[client]
        while len(self.buckets) > RATE_LIMIT_CLIENTS:
            del self.buckets[next(iter(self.buckets))]


class Server:
    """The live sessions and everything that happens to them on the event loop."""

    def __init__(self, model: ServeModel, options: ServerOptions, on_started: Callable[[], None] | None = None,
                 id_prefix: str = ""):
        self.model, self.options, self.on_started = model, options, on_started
        self.id_prefix = id_prefix  # a cluster replica's name: its sessions' ids say who owns them
        self.stats = ServeStats()
        self.sessions: dict[str, Session] = {}
        self.ended: OrderedDict[str, dict] = OrderedDict()
        self.registry = make_registry(self.stats, options.max_sessions)
        self.stats.sessions = lambda: list(self.sessions.values())
        self.worker: ModelWorker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._text_pool: ThreadPoolExecutor | None = None
        self.rate_limit = SessionRateLimit(options.sessions_per_minute, options.session_burst)
        self.ice_host_addresses = options.bound_addresses()  # resolved once: the answers' host candidates
        self._answering: set[str] = set()  # sessions whose offer is being answered (one at a time)
        self._prompting: set[str] = set()  # sessions whose prompt change is in flight (one at a time)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.loop = asyncio.get_running_loop()
        self._text_pool = ThreadPoolExecutor(1, thread_name_prefix="memrope-serve-text")
        self.worker = ModelWorker(self.model, self.stats, on_failure=self._failed_in_worker)
        self.worker.start()
        if self.options.warm_up:
            seconds = await asyncio.wrap_future(self.worker.submit(self.worker.warm_up))
            logger.info("warmed up in %.2f s", seconds)
        if self.on_started is not None:
            self.on_started()
        reaper = asyncio.create_task(self._reap())
        try:
            yield
        finally:
            reaper.cancel()
            for session in list(self.sessions.values()):
                await self.end(session, "the server is shutting down", "shutdown")
            await asyncio.to_thread(self.worker.close)
            self._text_pool.shutdown(wait=True)

    # -- sessions ----------------------------------------------------------------------------------

    def live(self, session_id: str, touch: bool = True) -> Session:
        """The live session ``session_id`` (and, with ``touch``, it was just heard from), or 404 /
        409. Reading a session's status is not a sign of life: a dashboard polling it must not keep
        a dead viewer's session."""
        session = self.sessions.get(session_id)
        if session is None:
            if session_id in self.ended:
                reason = self.ended[session_id]["reason"]
                raise ApiError(409, f"session {session_id} has ended ({reason}); create a new one with POST /sessions")
            raise ApiError(404, f"unknown session {session_id!r}; create one with POST /sessions")
        if touch:
            session.touch()
        return session

    async def create(self, body: CreateSession, client: str) -> Session:
        """A new session for ``client`` (its address: the rate limit's key)."""
        try:
            options = SessionOptions(seed=body.seed, queue_blocks=body.queue_blocks or self.options.queue_blocks,
                                     flush_on_prompt_change=body.flush_on_prompt_change,
                                     memory_on_prompt_change=body.memory_on_prompt_change,
                                     recache_on_prompt_change=body.recache_on_prompt_change
                                     or self.options.prompt_recache,
                                     transition_blocks=body.transition_blocks)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        # A full server refuses before the rate limit spends a token: a client retrying politely after
        # 503s keeps its burst for when a slot frees.
        if len(self.sessions) >= self.options.max_sessions:
            self.stats.add("sessions_rejected")
            retry = self.options.retry_after_s
            raise ApiError(503, f"server full: {len(self.sessions)} of {self.options.max_sessions} sessions in use; "
                                f"retry in {retry} s", headers={"Retry-After": str(retry)})
        wait_s = self.rate_limit.take(client)
        if wait_s > 0:
            self.stats.count_refused("rate_limited")
            retry = math.ceil(wait_s)
            raise ApiError(429, f"too many new sessions from {client}: at most {self.options.session_burst} at once, "
                                f"then {self.options.sessions_per_minute:g} a minute (--sessions-per-minute); "
                                f"retry in {retry} s", headers={"Retry-After": str(retry)})
        prompt = self._check_prompt(body.prompt)
        # 128 random bits: a session id is the only thing naming a session on the API key's side.
        session = Session(self.id_prefix + secrets.token_urlsafe(16), prompt, options, self.loop)
        self.sessions[session.id] = session  # holds the slot while the prompt encodes
        try:
            embeds = await self.loop.run_in_executor(self._text_pool, self.model.text.encode, prompt)
            opened = await asyncio.wrap_future(self.worker.open(session, embeds))
        except asyncio.CancelledError:  # the request went away: so does its session
            asyncio.ensure_future(self.end(session, "the creating request was cancelled", "cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client, the server keeps serving
            message = f"could not start the session: {type(exc).__name__}: {exc}"
            await self.end(session, message, "error")
            raise ApiError(500, message) from None
        session.touch()  # the heartbeat clock starts when the session runs, and so does the connect clock
        session.connect_by = session.last_seen + self.options.connect_timeout_s
        if not opened:
            raise ApiError(409, f"session {session.id} ended while starting ({session.reason})")
        self.stats.add("sessions_created")
        return session

    def _check_prompt(self, prompt: str) -> str:
        try:
            return self.model.text.check(prompt)
        except (TypeError, ValueError) as exc:
            raise ApiError(422, str(exc)) from None

    async def change_prompt(self, session: Session, body: PromptChange) -> dict:
        """One change in flight per session (a bad prompt is refused first): the text encoder is
        one thread shared by every session, so a client firing changes at once would queue ahead
        of everyone else's."""
        prompt = self._check_prompt(body.prompt)
        if session.id in self._prompting:
            self.stats.add("prompt_changes_refused")
            raise ApiError(429, f"session {session.id} has a prompt change in flight; send the next one when it "
                                "is answered", headers={"Retry-After": "1"})
        self._prompting.add(session.id)  # before the first await
        try:
            return await self._change_prompt(session, prompt, body)
        finally:
            self._prompting.discard(session.id)

    async def _change_prompt(self, session: Session, prompt: str, body: PromptChange) -> dict:
        embeds = await self.loop.run_in_executor(self._text_pool, self.model.text.encode, prompt)
        opts = session.options
        future = self.worker.change_prompt(
            session, prompt, embeds, flush=opts.flush_on_prompt_change if body.flush is None else body.flush,
            memory=body.memory or opts.memory_on_prompt_change,
            transition_blocks=opts.transition_blocks if body.transition_blocks is None else body.transition_blocks,
            recache=body.recache or opts.recache_on_prompt_change)
        try:
            at_block, version, dropped = await asyncio.wrap_future(future)
        except SessionGone:
            raise ApiError(409, f"session {session.id} has ended ({session.reason}); its prompt cannot change") from None
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        event = {"type": "prompt", "prompt": prompt, "prompt_version": version, "applies_at_block": at_block,
                 "frames_dropped": dropped}
        self.send(session, event)
        return event

    def set_paused(self, session: Session, paused: bool) -> dict:
        current, wanted = session.state, PAUSED if paused else RUNNING
        if current == STARTING:
            raise ApiError(409, f"session {session.id} is still starting; pause or resume it once it runs")
        if session.set_state(wanted):
            self.send(session, {"type": "state", "state": wanted})
            if not paused:
                self.worker.wake()
        return session.snapshot()

    async def end(self, session: Session, reason: str, kind: str) -> None:
        """End ``session`` for ``reason`` (a sentence; ``kind``, one of metrics' ``ENDED_KINDS``, labels
        the metric): its slot is free at once, its cache once the worker has closed its stream
        (within a block); the client hears why."""
        if not session.set_state(ENDED, reason):
            return
        self.stats.count_ended(kind)
        self.sessions.pop(session.id, None)
        self.ended[session.id] = {**session.snapshot(), "connected": False}
        while len(self.ended) > ENDED_SESSIONS_REMEMBERED:
            self.ended.popitem(last=False)
        self.worker.release(session)
        delivered = self.send(session, {"type": "ended", "reason": reason})
        pc, session.pc, session.channel = session.pc, None, None
        if pc is not None:
            if delivered:
                await asyncio.sleep(0.1)  # let the last event leave before the connection closes
            await pc.close()
        logger.info("session %s ended: %s", session.id, reason)

    def _failed_in_worker(self, session: Session, message: str) -> None:
        """Worker thread: a session's block failed and its stream is released."""
        def end() -> None:
            asyncio.ensure_future(self.end(session, f"error: {message}", "error"))
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping anyway
            self.loop.call_soon_threadsafe(end)

    async def _reap(self) -> None:
        """End sessions not heard from for the heartbeat timeout, and sessions whose video did not
        connect within the connect timeout (a client that creates sessions and heartbeats over REST
        but never offers, or whose offer never connects, would otherwise hold a slot for ever)."""
        timeout, connect_timeout = self.options.heartbeat_timeout_s, self.options.connect_timeout_s
        period = min(0.5, timeout / 4)
        while True:
            slept_from = time.monotonic()
            await asyncio.sleep(period)
            now = time.monotonic()
            stalled = now - slept_from - period
            if stalled > period:
                # This loop did not run for a while (a long call on the event loop): heartbeats
                # that arrived meanwhile are still queued, so the stall is not the clients'.
                for session in self.sessions.values():
                    session.last_seen += stalled
                    if session.connect_by is not None:
                        session.connect_by += stalled
                continue
            for session in list(self.sessions.values()):
                if session.state == STARTING or session.connect_by is None:  # create() has not returned yet
                    continue
                if now - session.last_seen > timeout:
                    await self.end(session, f"no heartbeat for {timeout:g} s", "heartbeat")
                elif session.connected_at is None and session.connect_by is not None and now > session.connect_by:
                    await self.end(session, f"no video connection within {connect_timeout:g} s "
                                            "(no WebRTC offer, or it did not connect)", "connect_timeout")

    # -- events ------------------------------------------------------------------------------------

    def send(self, session: Session, event: dict) -> bool:
        """Send an event on the session's channel. Until the channel opens (video can start a
        moment earlier), the last few events wait in the session. False if not sent now."""
        channel = session.channel
        if channel is None or channel.readyState != "open":
            if len(session.early_events) == session.early_events.maxlen:
                self.stats.add("events_dropped")
            session.early_events.append(event)
            return False
        if channel.bufferedAmount > EVENT_BUFFER_LIMIT_BYTES:
            self.stats.add("events_dropped")
            return False
        channel.send(json.dumps(event))
        return True

    def on_channel(self, session: Session) -> None:
        """The client's event channel opened: send what waited for it."""
        while session.early_events:
            self.send(session, session.early_events.popleft())

    def on_frame(self, session: Session, frame: Frame, sent_at: float) -> None:
        self.stats.add("frames_sent")
        chunk = frame.chunk
        if frame.index == 0:
            lag_s = sent_at - chunk.ready_at
            self.stats.record_lag(lag_s)
            event = {"type": "block", "block": chunk.block, "prompt_version": chunk.prompt_version,
                     "generation_ms": round(chunk.generation_ms, 2), "queue_depth": frame.queue_depth,
                     "lag_ms": round(1e3 * lag_s, 2), "frames": int(chunk.frames.shape[0])}
            if session.first_frame_at is not None and session.frames_sent == 1:
                event["ttff_ms"] = round(1e3 * (session.first_frame_at - session.created_at), 2)
            self.send(session, event)
        if chunk.frames_left == 0:
            self.worker.wake()  # the chunk left the queue: room for the next block

    def on_message(self, session: Session, message) -> None:
        try:
            kind = json.loads(message).get("type") if isinstance(message, str) else None
        except (ValueError, AttributeError):
            kind = None
        if kind == "heartbeat":
            session.touch()
        else:
            self.send(session, {"type": "error", "message": f"unknown message {str(message)[:80]!r}; the channel "
                                                            "takes {\"type\": \"heartbeat\"}; control is REST"})

    def on_closed(self, session: Session, reason: str) -> None:
        if not session.ended:
            asyncio.ensure_future(self.end(session, reason, "connection"))

    async def answer(self, session: Session, offer: Offer) -> dict:
        if session.pc is not None or session.id in self._answering:
            raise ApiError(409, f"session {session.id} already has a connection; one viewer per session")
        self._answering.add(session.id)  # before the first await: a concurrent offer gets the 409
        try:
            answer = await answer_offer(session, offer.sdp, self.model.fps, on_frame=self.on_frame,
                                        on_channel=self.on_channel, on_message=self.on_message,
                                        on_closed=self.on_closed, ice_servers=self.options.ice_servers(),
                                        host_addresses=self.ice_host_addresses)
        except ValueError as exc:
            self.stats.count_refused("bad_offer")
            raise ApiError(400, str(exc)) from None
        finally:
            self._answering.discard(session.id)
        if session.ended:  # ended while the answer was being made
            pc, session.pc = session.pc, None
            if pc is not None:
                await pc.close()
            raise ApiError(409, f"session {session.id} has ended ({session.reason})")
        # An answered offer gets the whole connect timeout to connect (once: one offer per session).
        session.connect_by = max(session.connect_by or 0.0, time.monotonic() + self.options.connect_timeout_s)
        return {"sdp": answer.sdp, "type": answer.type}

    # -- the API, one method per route (the HTTP routes and the cluster's replicas call these) --------

    async def api_create(self, body: CreateSession, client: str) -> dict:
        session = await self.create(body, client)
        width, height = self.model.frame_size
        return {**session.snapshot(), "fps": self.model.fps, "width": width, "height": height,
                "heartbeat_timeout_s": self.options.heartbeat_timeout_s,
                "connect_timeout_s": self.options.connect_timeout_s, "ice_servers": self.options.ice_servers()}

    async def api_list(self) -> dict:
        return {"sessions": [s.snapshot() for s in self.sessions.values()], "max_sessions": self.options.max_sessions}

    async def api_get(self, session_id: str) -> dict:
        if session_id in self.ended and session_id not in self.sessions:
            return self.ended[session_id]
        return self.live(session_id, touch=False).snapshot()

    async def api_offer(self, session_id: str, body: Offer) -> dict:
        return await self.answer(self.live(session_id), body)

    async def api_prompt(self, session_id: str, body: PromptChange) -> dict:
        return await self.change_prompt(self.live(session_id), body)

    async def api_pause(self, session_id: str, paused: bool) -> dict:
        return self.set_paused(self.live(session_id), paused)

    async def api_heartbeat(self, session_id: str) -> None:
        self.live(session_id)

    async def api_stop(self, session_id: str) -> dict:
        await self.end(self.live(session_id), "stopped by the client", "stopped")
        return self.ended[session_id]

    async def metrics(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)

    async def health(self) -> tuple[int, dict]:
        alive = self.worker is not None and self.worker.alive
        width, height = self.model.frame_size
        doc = {"status": "ok" if alive else "model worker stopped", "sessions": len(self.sessions),
               "max_sessions": self.options.max_sessions, "fps": self.model.fps, "width": width, "height": height,
               "heartbeat_timeout_s": self.options.heartbeat_timeout_s,
               "connect_timeout_s": self.options.connect_timeout_s, "model": self.model.description}
        if self.worker is not None and self.worker.error is not None:
            doc["error"] = f"{type(self.worker.error).__name__}: {self.worker.error}"
        return (200 if alive else 503), doc


def _page() -> str:
    return resources.files("memrope.runtime.serve").joinpath("static", "index.html").read_text(encoding="utf-8")


def create_app(model: ServeModel, options: ServerOptions, on_started: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` in this process. The model worker starts (and warms up)
    with the app's lifespan; ``on_started()`` is called once it is ready for clients."""
    return build_app(Server(model, options, on_started), options)


def build_app(api, options: ServerOptions) -> FastAPI:
    """The HTTP face of ``api``: a :class:`Server` (one process) or the cluster's ingress
    (``memrope.runtime.serve.cluster``), which answer the same calls (``lifespan``, ``stats``,
    ``health()``, ``metrics()`` and the ``api_*`` methods), so both are served by the same routes,
    guards and error shapes."""
    # No OpenAPI schema or docs pages: they would be open routes describing the API
    # (docs/serving.md documents it).
    app = FastAPI(title="memrope serve", lifespan=api.lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.server = api
    # The last added is the outermost, checked first: Host and repeated headers, then the key,
    # then the body.
    app.add_middleware(BodyLimit, timeout_s=options.body_timeout_s, stats=api.stats)
    if options.api_key:
        app.add_middleware(RequireApiKey, key=options.api_key, stats=api.stats)
    app.add_middleware(RequestGuard, options=options, stats=api.stats)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        """The framework's own errors (no such route, method not allowed, a body it cannot
        decode) in the same one-line shape as ours."""
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see docs/serving.md for the memrope serve API"
        elif exc.status_code == 405:
            # Every route on this path (the framework's Allow header names only the first).
            methods = sorted({m for route in request.app.router.routes
                              if route.matches(request.scope)[0] != Match.NONE for m in getattr(route, "methods", ())})
            allowed = ", ".join(methods)
            headers = {**(exc.headers or {}), "Allow": allowed}
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
            return JSONResponse({"error": message}, status_code=405, headers=headers)
        elif exc.status_code == 400:
            message = f"cannot read the request body ({exc.detail}); expected a UTF-8 JSON object"
        else:
            message = str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        status, message = _validation_error(exc)
        return JSONResponse({"error": message}, status_code=status)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page())

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"], status_code=204)
    async def favicon():
        """No icon (a browser asks for one with every page load): an empty answer, cached for a day."""
        return Response(status_code=204, headers={"Cache-Control": "public, max-age=86400"})

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        status, doc = await api.health()
        return JSONResponse(doc, status_code=status)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(await api.metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/sessions", status_code=201)
    async def create_session(body: CreateSession, request: Request):
        return await api.api_create(body, request.client.host if request.client else "unknown")

    @app.get("/sessions")
    async def list_sessions():
        return await api.api_list()

    @app.get("/sessions/{session_id}")
    async def get_session(session_id: str):
        return await api.api_get(session_id)

    @app.post("/sessions/{session_id}/offer")
    async def offer(session_id: str, body: Offer):
        return await api.api_offer(session_id, body)

    @app.post("/sessions/{session_id}/prompt")
    async def prompt(session_id: str, body: PromptChange):
        return await api.api_prompt(session_id, body)

    @app.post("/sessions/{session_id}/pause")
    async def pause(session_id: str):
        return await api.api_pause(session_id, True)

    @app.post("/sessions/{session_id}/resume")
    async def resume(session_id: str):
        return await api.api_pause(session_id, False)

    @app.post("/sessions/{session_id}/heartbeat", status_code=204)
    async def heartbeat(session_id: str):
        await api.api_heartbeat(session_id)
        return Response(status_code=204)

    async def stop(session_id: str):
        return await api.api_stop(session_id)

    app.post("/sessions/{session_id}/stop")(stop)
    app.delete("/sessions/{session_id}")(stop)
    return app


def listen(options: ServerOptions) -> socket.socket:
    """The server's listening socket, bound now: a taken port or an unknown host fails in one line
    before the models load (connections made meanwhile wait in the backlog)."""
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    try:
        return socket.create_server((options.host, options.port), family=family, backlog=128)
    except OSError as exc:
        raise ValueError(f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}") from None


def run_server(model: ServeModel, options: ServerOptions, *, on_ready: Callable[[str], None] | None = None,
               sock: socket.socket | None = None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM end every session and stop the worker), on ``sock``
    (default: :func:`listen`). ``on_ready(url)`` is called once clients are served (after the
    warm-up)."""
    import uvicorn

    sock = sock if sock is not None else listen(options)
    host, port = sock.getsockname()[:2]
    url = f"{options.scheme}://{host if sock.family == socket.AF_INET else f'[{host}]'}:{port}/"
    app = create_app(model, options, on_started=None if on_ready is None else lambda: on_ready(url))
    uvicorn.Server(uvicorn_config(app, options)).run(sockets=[sock])


def guarded_protocol(options: ServerOptions, stats: ServeStats):
    """Uvicorn's h11 HTTP protocol with two guards below the ASGI app, where a request that never
    completes its head is invisible to it: a connection must deliver each request's head within
    ``options.header_timeout_s`` (counted from the connection, or from the first byte of the next
    request on a kept-alive one; the idle wait between requests is the keep-alive's) or gets a 408
    and is closed; and each remote address may hold ``options.max_client_connections`` open
    connections, the next one getting a 429 and closed. A request h11 cannot parse (two Host
    headers, a bad request line) gets the same one-line JSON 400 as every other error, naming what
    h11 found, instead of uvicorn's plain "Invalid HTTP request received.". A class per server
    (its own counts)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_by_client: Counter[str] = Counter()
    limit, timeout_s = options.max_client_connections, options.header_timeout_s

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _counted: str | None = None
        _parse_error = "not HTTP/1.1"

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            next_event = self.conn.next_event

            def next_event_noting_errors():
                try:
                    return next_event()
                except h11.RemoteProtocolError as exc:
                    self._parse_error = str(exc)
                    raise
            self.conn.next_event = next_event_noting_errors
            client = self.client[0] if self.client else None
            if client is not None:
                if open_by_client[client] >= limit:
                    stats.count_refused("too_many_connections")
                    transport.write(_raw_refusal(429, "Too Many Requests",
                                                 f"too many connections from {client}: {open_by_client[client]} "
                                                 f"open, at most {limit} per client (--max-client-connections); "
                                                 "close idle ones and retry", "retry-after: 1\r\n"))
                    transport.close()
                    return
                open_by_client[client] += 1
                self._counted = client
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            if self._counted is not None:
                open_by_client[self._counted] -= 1
                if open_by_client[self._counted] <= 0:
                    del open_by_client[self._counted]
                self._counted = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm_head_timer()  # a head has begun and is not complete
            else:
                self._cancel_head_timer()

        def send_400_response(self, msg: str) -> None:
            stats.count_refused("malformed_request")
            self.transport.write(_raw_refusal(400, "Bad Request", f"malformed HTTP request ({self._parse_error}); "
                                                                  "expected an HTTP/1.1 request line and headers"))
            self.transport.close()

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            stats.count_refused("header_timeout")
            self.transport.write(_raw_refusal(408, "Request Timeout",
                                              f"request head not received within {timeout_s:g} s "
                                              "(--header-timeout); send the request line and headers at once"))
            self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app: FastAPI, options: ServerOptions | None = None):
    """How uvicorn serves ``app`` (also for servers run inside a test): idle connections are
    kept for ``SERVER_KEEPALIVE_S``, longer than clients pool them; request heads have a
    deadline and clients a connection cap (:func:`guarded_protocol`); HTTPS with the options'
    certificate. ``X-Forwarded-For`` is not trusted (uvicorn trusts it from loopback by default,
    which would let any local process pick the address the per-client limits count): the limits
    count the TCP peer, so a reverse proxy is one client."""
    import uvicorn

    options = options if options is not None else app.state.server.options
    tls = {} if not options.tls_cert else {"ssl_certfile": options.tls_cert, "ssl_keyfile": options.tls_key}
    return uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
                          timeout_keep_alive=SERVER_KEEPALIVE_S, proxy_headers=False,
                          http=guarded_protocol(options, app.state.server.stats), **tls)
