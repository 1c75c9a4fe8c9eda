"""Where a cluster's sessions go and how many engine replicas it runs: the decisions of
``memrope serve --ray``, kept apart from Ray so that they are plain code with plain tests.

Owns: reading a session id's owner (:func:`owner_of`), ranking engine replicas for a new session
(:class:`Placement`) and the replica count that follows the session count (:class:`ScalePolicy`).
Does not own calling replicas or starting and stopping them (``memrope.runtime.serve.cluster``).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

_ID = re.compile(r"^([A-Za-z0-9]{1,32})\.[A-Za-z0-9_-]{8,64}$")
# How long placement counts a session it saw created that no report of its replica lists yet (a
# session that ended before any report is forgotten then), and a create that was never answered.
CREATED_MEMORY_S = 10.0
IN_FLIGHT_MEMORY_S = 60.0


def owner_of(session_id: str) -> str | None:
    """The engine replica named by ``session_id`` (``<replica>.<token>``), or None for an id no
    replica made."""
    match = _ID.match(session_id)
    return match.group(1) if match else None


@dataclass(frozen=True)
class EngineReport:
    """What one engine replica last said about its slots (``Engine.slots``).

    engine: its application (one replica each); replica: the replica's id, which prefixes its
    session ids; session_ids: its live sessions, creates in progress included; reported_at: wall
    time of the report (seconds); draining: it takes no new sessions (about to be removed).
    """

    engine: str
    replica: str
    max_sessions: int
    session_ids: tuple[str, ...]
    reported_at: float
    draining: bool = False


@dataclass
class Placement:
    """Ranks engine replicas for a new session: most free slots first.

    Free slots: ``max_sessions`` less the sessions the replica's last report lists, those created
    on it after that report was taken (:meth:`created`) and the creates sent to it and not yet
    answered (:meth:`sending` / :meth:`answered`). So a burst of new sessions spreads at once, and
    a report taken while a create was in flight cannot hide it. A draining replica gets nothing.
    The replica's own admission has the last word: one that answers "full" is skipped and the next
    tried.
    """

    _in_flight: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (engine, wall time sent)
    _created: dict[str, tuple[str, float]] = field(default_factory=dict)    # session id -> (engine, wall time)

    def free_slots(self, report: EngineReport) -> int:
        later = {sid for sid, (engine, at) in self._created.items()
                 if engine == report.engine and at > report.reported_at}
        in_flight = sum(1 for engine, _ in self._in_flight.values() if engine == report.engine)
        return report.max_sessions - len(set(report.session_ids) | later) - in_flight

    def ranked(self, reports: list[EngineReport], exclude: set[str] = frozenset()) -> list[EngineReport]:
        """The replicas that may take a new session, best first (ties: the engine named first)."""
        usable = [r for r in reports if not r.draining and r.engine not in exclude]
        return sorted(usable, key=lambda r: (-self.free_slots(r), r.engine))

    def sending(self, token: str, engine: str) -> None:
        self._in_flight[token] = (engine, time.time())

    def answered(self, token: str, engine: str, session_id: str | None) -> None:
        """The create ``token`` sent to ``engine`` was answered, with ``session_id`` if it made one."""
        now = time.time()
        self._in_flight.pop(token, None)
        if session_id is not None:
            self._created[session_id] = (engine, now)
        for table, memory_s in ((self._created, CREATED_MEMORY_S), (self._in_flight, IN_FLIGHT_MEMORY_S)):
            for stale in [key for key, (_, at) in table.items() if at < now - memory_s]:
                del table[stale]


@dataclass(frozen=True)
class ScaleOptions:
    """The replica count's bounds and how it follows the sessions.

    min_replicas..max_replicas: the engine replicas kept (equal: a fixed count). spare_slots:
    free session slots kept for the next viewers, so that a new session does not wait for a
    replica to start. scale_down_delay_s: how long fewer replicas must suffice before an idle one
    is removed.
    """

    min_replicas: int = 2
    max_replicas: int = 2
    spare_slots: int = 1
    scale_down_delay_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("min_replicas", "max_replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"--max-replicas ({self.max_replicas}) must be at least --min-replicas "
                             f"({self.min_replicas})")
        if not isinstance(self.spare_slots, int) or self.spare_slots < 0:
            raise ValueError(f"--spare-slots must be an integer >= 0, got {self.spare_slots!r}")
        if not self.scale_down_delay_s >= 0:
            raise ValueError(f"--scale-down-delay must be >= 0 seconds, got {self.scale_down_delay_s!r}")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas


@dataclass(frozen=True)
class EngineState:
    """An engine replica as the scaler sees it: ``sessions`` None while it has not answered (still
    starting, or not reachable), which is never taken for idle."""

    engine: str
    sessions: int | None


@dataclass
class ScalePolicy:
    """The engine replica count that follows the session count, between the bounds.

    Wanted: enough replicas for the sessions plus ``spare_slots`` (at ``max_sessions`` each),
    within ``min_replicas..max_replicas``. More are started at once (one still starting counts
    as a replica with no session). Fewer must suffice for ``scale_down_delay_s`` without a break,
    with every replica answering; then only replicas that answered with no session are removed, the newest first, and never one that still has a session (the caller drains each
    before removing it, and keeps it if a session arrived meanwhile).
    """

    options: ScaleOptions
    max_sessions: int
    _fewer_since: float | None = None

    def wanted(self, engines: list[EngineState]) -> int:
        sessions = sum(e.sessions or 0 for e in engines)
        need = math.ceil((sessions + self.options.spare_slots) / self.max_sessions)
        return min(max(need, self.options.min_replicas), self.options.max_replicas)

    def decide(self, engines: list[EngineState], now: float) -> tuple[int, list[str]]:
        """``(replicas to start, engines to remove)`` for ``engines`` (oldest first) at monotonic
        time ``now``."""
        wanted = self.wanted(engines)
        if wanted > len(engines):
            self._fewer_since = None
            return wanted - len(engines), []
        if wanted == len(engines) or any(e.sessions is None for e in engines):
            self._fewer_since = None  # removals wait until every replica has answered
            return 0, []
        if self._fewer_since is None:
            self._fewer_since = now
        if now - self._fewer_since < self.options.scale_down_delay_s:
            return 0, []
        idle = [e.engine for e in reversed(engines) if e.sessions == 0]
        return 0, idle[:len(engines) - wanted]

    def removed(self, now: float) -> None:
        """A replica was removed: the next one waits a full delay again."""
        self._fewer_since = now
