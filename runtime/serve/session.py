"""One viewer's session: its state, its bounded playout queue, its counters and its heartbeat.

Owns: :class:`Session` and :class:`Chunk`. A session is shared by two threads, and every field
says whose it is:

* the model worker (``memrope.runtime.serve.worker``) owns ``stream`` (the session's
  :class:`memrope.pipeline.BlockStream`, i.e. its cache) and ``decode`` (its VAE decoder state),
  and pushes each decoded block as a :class:`Chunk`;
* the event loop (``memrope.runtime.serve.app``, ``memrope.runtime.serve.webrtc``) pulls frames at playout rate,
  changes the state, and talks to the client.

The queue holds at most ``options.queue_blocks`` chunks: the worker skips a session whose queue
is full, so generation is paced to playout and a viewer that stops reading costs nothing more.
Everything shared is read and written under ``lock``.

Does not own scheduling (the worker), HTTP or WebRTC (the app), or the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from memrope.runtime.serve.options import SessionOptions

logger = logging.getLogger(__name__)

STARTING, RUNNING, PAUSED, ENDED = "starting", "running", "paused", "ended"
EARLY_EVENTS = 32  # events kept for a client whose event channel has not opened yet


class SessionEnded(Exception):
    """The session ended while a consumer waited for its frames."""


@dataclass
class Chunk:
    """One decoded block waiting for playout.

    frames: ``[T, H, W, 3]`` uint8 video frames of the block.
    ready_at: ``time.monotonic()`` when the block was decoded (lag is measured from here).
    played: frames of this chunk already handed to the viewer.
    """

    block: int
    frames: np.ndarray
    generation_ms: float
    ready_at: float
    prompt_version: int
    played: int = 0

    @property
    def frames_left(self) -> int:
        return self.frames.shape[0] - self.played


@dataclass(frozen=True)
class Frame:
    """One frame handed to the viewer, with what its block's event needs."""

    pixels: np.ndarray
    chunk: Chunk
    index: int           # within the chunk
    queue_depth: int     # chunks left in the queue after this frame, the current one included


class Session:
    """A viewer's session. Created by the app, run by the worker, freed when it ends."""

    def __init__(self, session_id: str, prompt: str, options: SessionOptions, loop: asyncio.AbstractEventLoop):
        self.id = session_id
        self.options = options
        self.created_at = self.last_seen = time.monotonic()
        self.lock = threading.Lock()
        self.state = STARTING
        self.reason: str | None = None
        self.prompt, self.prompt_version = prompt, 0
        self.blocks_generated = 0
        self.frames_sent = 0
        self.frames_dropped = 0
        self.first_frame_at: float | None = None
        self._chunks: deque[Chunk] = deque()
        self._loop = loop
        self._frame_ready = asyncio.Event()
        # Worker-owned: the session's cache and decoder state.
        self.stream = None
        self.decode = None
        self.cache_bytes = 0
        # Event-loop-owned: the WebRTC connection and the event channel.
        self.pc = None
        self.channel = None
        self.connected_at: float | None = None  # when the peer connection first reached "connected"
        self.connect_by: float | None = None    # the reaper's deadline for that; set once running
        self.early_events: deque[dict] = deque(maxlen=EARLY_EVENTS)

    # -- both threads ------------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.state == ENDED

    def queue_depth(self) -> int:
        with self.lock:
            return len(self._chunks)

    def snapshot(self) -> dict:
        """What ``GET /sessions/{id}`` shows."""
        with self.lock:
            ttff = None if self.first_frame_at is None else round(1e3 * (self.first_frame_at - self.created_at), 1)
            return {"id": self.id, "state": self.state, "reason": self.reason, "prompt": self.prompt,
                    "prompt_version": self.prompt_version, "blocks_generated": self.blocks_generated,
                    "frames_sent": self.frames_sent, "frames_dropped": self.frames_dropped,
                    "queue_depth": len(self._chunks), "queue_blocks": self.options.queue_blocks,
                    "ttff_ms": ttff, "connected": self.pc is not None, "seed": self.options.seed,
                    "age_s": round(time.monotonic() - self.created_at, 3)}

    def _signal(self) -> None:
        """Wake a consumer waiting in :meth:`next_frame` (from any thread)."""
        with contextlib.suppress(RuntimeError):  # the event loop has shut down: nobody is waiting
            self._loop.call_soon_threadsafe(self._frame_ready.set)

    # -- worker side -------------------------------------------------------------------------------

    def wants_block(self) -> bool:
        """Running, with its stream open and room in its queue."""
        with self.lock:
            return self.state == RUNNING and self.stream is not None and len(self._chunks) < self.options.queue_blocks

    def start_running(self) -> None:
        """The worker opened the stream: a starting session begins to run."""
        with self.lock:
            if self.state == STARTING:
                self.state = RUNNING

    def push(self, chunk: Chunk) -> bool:
        """Queue a decoded block; False (and nothing kept) if the session ended meanwhile."""
        with self.lock:
            if self.state == ENDED:
                return False
            self._chunks.append(chunk)
            self.blocks_generated += 1
        self._signal()
        return True

    def switch_prompt(self, prompt: str, flush: bool) -> int:
        """The worker applied a new prompt: later blocks carry the new version; with ``flush`` the
        old prompt's queued frames are dropped. Returns the frames dropped."""
        with self.lock:
            self.prompt = prompt
            self.prompt_version += 1
            dropped = 0
            if flush:
                dropped = sum(c.frames_left for c in self._chunks)
                self._chunks.clear()
                self.frames_dropped += dropped
        return dropped

    # -- event-loop side ---------------------------------------------------------------------------

    def touch(self) -> None:
        """The client was heard from (a heartbeat or any request for this session)."""
        self.last_seen = time.monotonic()

    def set_state(self, state: str, reason: str | None = None) -> bool:
        """Move to ``state`` (not out of ENDED); True if it changed. Ending clears the queue."""
        with self.lock:
            if self.state == ENDED or self.state == state:
                return False
            self.state = state
            if state == ENDED:
                self.reason = reason
                self._chunks.clear()
        self._signal()
        return True

    async def next_frame(self, poll_s: float = 0.5) -> Frame:
        """The next frame to show, waiting while the queue is empty or the session is paused.
        Raises :class:`SessionEnded` once the session has ended."""
        while True:
            with self.lock:
                if self.state == ENDED:
                    raise SessionEnded(self.reason or "ended")
                if self.state != PAUSED and self._chunks:
                    chunk = self._chunks[0]
                    index = chunk.played
                    chunk.played += 1
                    depth = len(self._chunks)
                    if chunk.frames_left == 0:
                        self._chunks.popleft()
                    self.frames_sent += 1
                    if self.first_frame_at is None:
                        self.first_frame_at = time.monotonic()
                    return Frame(chunk.frames[index], chunk, index, depth)
                self._frame_ready.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._frame_ready.wait(), poll_s)
