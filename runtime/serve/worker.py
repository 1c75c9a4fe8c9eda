"""The one model worker: a thread that owns the backend and the weights and runs every session's
block loop, one block at a time, round-robin.

Owns: :class:`ModelWorker`: the thread, its command queue (opening a session's stream, changing
its prompt, releasing it: everything that touches a ``BlockStream`` runs on this thread, so the
loop needs no locks), the fair schedule (each turn goes to the next session after the last one
served that is running and has room in its playout queue; a paused or full session is skipped,
which paces generation to playout), per-session failure (an exception in one session's block
ends that session and frees its cache; the worker keeps serving the others), and giving freed
memory back to the operating system.

Does not own the block loop (``memrope.pipeline.BlockStream.next_block``, the same loop as
``memrope generate``), the model (``memrope.runtime.serve.model``), or the sessions' lifecycle towards
clients (``memrope.runtime.serve.app``).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from memrope.runtime.serve.metrics import ServeStats
from memrope.runtime.serve.model import ServeModel, close_decoder
from memrope.runtime.serve.session import Chunk, Session

logger = logging.getLogger(__name__)

_LIBC: ctypes.CDLL | None | bool = None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS. glibc keeps freed blocks below its mmap threshold in
    its arenas; without this a server whose sessions came and went keeps their peak footprint."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return f"out of memory while generating ({str(exc).splitlines()[0]}); other sessions keep running"
    return f"{type(exc).__name__}: {exc}"


class SessionGone(Exception):
    """A command arrived for a session whose stream is already released."""


class ModelWorker:
    """Runs sessions block by block on one thread.

    Args:
        model: what the thread runs (nothing else touches the model's pipeline).
        stats: counters it updates (blocks, latency, failures, open cache bytes, live streams).
        on_failure: ``(session, message)``, called on the worker thread after a session's block
            failed and its stream was released; the app ends the session towards its client.
    """

    def __init__(self, model: ServeModel, stats: ServeStats, on_failure: Callable[[Session, str], None]):
        self.model = model
        self.stats = stats
        self._on_failure = on_failure
        self._cv = threading.Condition()
        self._commands: deque[tuple[Callable[[], object], Future]] = deque()
        self._sessions: list[Session] = []  # worker thread only
        self._turn = 0
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="memrope-serve-worker", daemon=True)

    # -- any thread ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop after the current block; every open stream is released first."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout_s)

    def submit(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the worker thread between blocks; its result or exception in the future."""
        future: Future = Future()
        with self._cv:
            if self._stopping or (self.error is not None):
                future.set_exception(RuntimeError("the model worker has stopped"))
                return future
            self._commands.append((fn, future))
            self._cv.notify()
        return future

    def wake(self) -> None:
        """A session may have become runnable (room in its queue, resumed)."""
        with self._cv:
            self._cv.notify()

    def warm_up(self) -> float:
        """Worker thread (submit it): the model's warm-up, then its memory back to the OS."""
        seconds = self.model.warm_up()
        _trim_heap()
        return seconds

    def open(self, session: Session, prompt_embeds: torch.Tensor) -> Future:
        """Open the session's stream (its cache) and decoder; the session starts running."""
        def run() -> bool:
            if session.ended:
                return False
            stream = self.model.open_stream(prompt_embeds, session.options.seed)
            session.stream, session.decode = stream, self.model.open_decoder()
            session.cache_bytes = stream.cache.nbytes()
            self.stats.add("cache_bytes", session.cache_bytes)
            self.stats.live_streams.add(stream)
            self._sessions.append(session)
            session.start_running()
            return True
        return self.submit(run)

    def change_prompt(self, session: Session, prompt: str, prompt_embeds: torch.Tensor, *, flush: bool,
                      memory: str, transition_blocks: int, recache: str = "none") -> Future:
        """Switch the session's prompt at its next block boundary (``BlockStream.set_prompt``).
        The future gives ``(applies_at_block, prompt_version, frames_dropped)``."""
        def run() -> tuple[int, int, int]:
            stream = session.stream
            if stream is None or session.ended:
                raise SessionGone(session.id)
            stream.set_prompt(prompt_embeds, memory=memory, transition_blocks=transition_blocks, recache=recache)
            dropped = session.switch_prompt(prompt, flush)
            self.stats.add("frames_dropped", dropped)
            return stream.block_index, session.prompt_version, dropped
        return self.submit(run)

    def release(self, session: Session) -> Future:
        """Close the session's stream and drop every reference the worker holds to it."""
        return self.submit(lambda: self._release(session))

    # -- worker thread ---------------------------------------------------------------------------

    def _release(self, session: Session) -> None:
        if session in self._sessions:
            self._sessions.remove(session)
        stream, decode, session.stream, session.decode = session.stream, session.decode, None, None
        close_decoder(decode)
        if stream is not None:
            stream.close()
            self.stats.add("cache_bytes", -session.cache_bytes)
            session.cache_bytes = 0
            del stream
            _trim_heap()

    def _runnable(self) -> bool:
        return any(s.wants_block() for s in self._sessions)

    def _pick(self) -> Session | None:
        """The next runnable session after the one served last (round-robin)."""
        n = len(self._sessions)
        for k in range(n):
            i = (self._turn + k) % n
            session = self._sessions[i]
            if session.wants_block():
                self._turn = i + 1
                return session
        return None

    def _run_block(self, session: Session) -> None:
        start = time.perf_counter()
        try:
            result = session.stream.next_block()
            frames = session.decode(result.x0)
            result.check_finite()
            index = result.index
            del result
        except Exception as exc:  # noqa: BLE001 - one session's failure must not stop the others
            message = _failure_message(exc)
            del exc
            logger.warning("session %s failed: %s", session.id, message)
            self.stats.add("sessions_failed")
            self._release(session)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._on_failure(session, message)
            return
        seconds = time.perf_counter() - start
        self.stats.record_block(seconds)
        session.push(Chunk(index, frames, 1e3 * seconds, time.monotonic(), session.prompt_version))

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._commands or self._runnable()):
                        # The timeout is a safety net; wake() is the normal path.
                        self._cv.wait(0.5)
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for fn, future in commands:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as exc:  # noqa: BLE001 - handed to the caller
                            future.set_exception(exc)
                session = self._pick()
                if session is not None:
                    self._run_block(session)
        except BaseException as exc:
            self.error = exc
            logger.exception("the model worker stopped")
        finally:
            for session in list(self._sessions):
                self._release(session)
            with self._cv:
                self._stopping = True
                pending = list(self._commands)
                self._commands.clear()
            for _, future in pending:
                if future.set_running_or_notify_cancel():
                    future.set_exception(RuntimeError("the model worker has stopped"))
