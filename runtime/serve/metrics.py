"""Server counters and their Prometheus exposition.

Owns: :class:`ServeStats`, the counters and sliding windows the worker and the event loop update
(thread-safe), and :func:`make_registry`, a prometheus-client registry whose collector reads them
at scrape time (so the numbers are computed once per scrape, not once per block), plus the
process collector (resident memory, CPU). Does not own what is counted (the worker, the app).

Names: ``memrope_serve_*``; times in seconds, sizes in bytes, queues in blocks.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque

# Blocks/s is averaged over this window; latency quantiles over the last LATENCY_WINDOW blocks.
RATE_WINDOW_S = 10.0
LATENCY_WINDOW = 512
# Why sessions end (the ``kind`` label of memrope_serve_sessions_ended_total).
ENDED_KINDS = ("stopped", "heartbeat", "connect_timeout", "connection", "error", "cancelled", "shutdown")
# Why requests or connections were refused at the edge (the ``kind`` label of
# memrope_serve_requests_refused_total): an offer that fails the SDP checks (400), a Host header
# the server does not answer to (400), a repeated Authorization or Host header (400), session
# creation past the client's rate (429), a client past its open-connection cap (429), a request
# head or body not received in time (408), a request HTTP/1.1 cannot parse (400).
REFUSED_KINDS = ("bad_offer", "bad_host", "repeated_header", "rate_limited", "too_many_connections",
                 "header_timeout", "body_timeout", "malformed_request")


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated ``q``-quantile (0..1) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class ServeStats:
    """What ``/metrics`` reports. Every method may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started_at = time.monotonic()
        self.sessions_created = 0
        self.sessions_rejected = 0
        self.sessions_failed = 0
        self.blocks = 0
        self.frames_sent = 0
        self.frames_dropped = 0
        self.events_dropped = 0
        self.prompt_changes_refused = 0  # 429: a change already in flight for the session
        self.unauthorized = 0            # 401: a /sessions request without the API key
        self.sessions_ended = dict.fromkeys(ENDED_KINDS, 0)
        self.refused = dict.fromkeys(REFUSED_KINDS, 0)
        self.cache_bytes = 0  # KV cache bytes of the streams the worker has open
        self._block_times: deque[tuple[float, float]] = deque(maxlen=LATENCY_WINDOW)  # (done_at, seconds)
        self._lags: deque[float] = deque(maxlen=LATENCY_WINDOW)
        # Every stream the worker opened and that is still alive anywhere: a weak set, so the
        # count drops only when the last reference to the session's cache is gone.
        self.live_streams: weakref.WeakSet = weakref.WeakSet()
        self.sessions = list  # set by the app: the live sessions

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def count_ended(self, kind: str) -> None:
        if kind not in ENDED_KINDS:
            raise ValueError(f"unknown session end kind {kind!r}; expected one of {ENDED_KINDS}")
        with self._lock:
            self.sessions_ended[kind] += 1

    def count_refused(self, kind: str) -> None:
        if kind not in REFUSED_KINDS:
            raise ValueError(f"unknown refusal kind {kind!r}; expected one of {REFUSED_KINDS}")
        with self._lock:
            self.refused[kind] += 1

    def record_block(self, seconds: float) -> None:
        with self._lock:
            self.blocks += 1
            self._block_times.append((time.monotonic(), seconds))

    def record_lag(self, seconds: float) -> None:
        with self._lock:
            self._lags.append(seconds)

    def block_seconds(self) -> list[float]:
        with self._lock:
            return [s for _, s in self._block_times]

    def lags(self) -> list[float]:
        with self._lock:
            return list(self._lags)

    def blocks_per_second(self) -> float:
        now = time.monotonic()
        window = min(RATE_WINDOW_S, max(now - self.started_at, 1e-3))
        with self._lock:
            recent = sum(1 for done, _ in self._block_times if done >= now - window)
        return recent / window


def _counts(name: str, doc: str, label: str, counts: dict[str, float]):
    """A counter family with one sample per ``label`` value."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


def _quantiles(name: str, doc: str, values: list[float]):
    """A gauge family of the p50 and p90 of ``values`` (NaN when there are none)."""
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, doc, labels=["quantile"])
    for q in (0.5, 0.9):
        value = percentile(values, q)
        family.add_metric([str(q)], float("nan") if value is None else value)
    return family


def make_registry(stats: ServeStats, max_sessions: int):
    """A prometheus-client registry exposing ``stats`` (and this process's memory and CPU)."""
    from prometheus_client import CollectorRegistry, ProcessCollector
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self):
            sessions = stats.sessions()
            depths = [s.queue_depth() for s in sessions]
            yield GaugeMetricFamily("memrope_serve_sessions", "Sessions admitted and not yet ended",
                                    value=len(sessions))
            yield GaugeMetricFamily("memrope_serve_max_sessions", "Admission limit (--max-sessions)",
                                    value=max_sessions)
            for name, doc, value in (
                    ("sessions_created", "Sessions admitted", stats.sessions_created),
                    ("sessions_rejected", "Session requests refused with 503 (server full)", stats.sessions_rejected),
                    ("sessions_failed", "Sessions ended by an error in their generation", stats.sessions_failed),
                    ("blocks", "Blocks generated and decoded", stats.blocks),
                    ("frames_sent", "Video frames handed to viewers", stats.frames_sent),
                    ("frames_dropped", "Queued frames dropped (prompt-change flushes)", stats.frames_dropped),
                    ("events_dropped", "Events not sent because a client's channel was backed up",
                     stats.events_dropped),
                    ("prompt_changes_refused", "Prompt changes refused with 429 (one in flight per session)",
                     stats.prompt_changes_refused),
                    ("unauthorized_requests", "/sessions requests refused with 401 (no or wrong API key)",
                     stats.unauthorized)):
                yield CounterMetricFamily(f"memrope_serve_{name}", doc, value=value)
            yield _counts("memrope_serve_sessions_ended", "Sessions ended, by why", "kind", stats.sessions_ended)
            yield _counts("memrope_serve_requests_refused", "Requests and connections refused at the edge, by why",
                          "kind", stats.refused)
            yield GaugeMetricFamily("memrope_serve_blocks_per_second",
                                    f"Blocks generated per second over the last {RATE_WINDOW_S:.0f} s",
                                    value=stats.blocks_per_second())
            for name, doc, values in (
                    ("block_latency_seconds", "Per-block generation + decode time", stats.block_seconds()),
                    ("lag_seconds", "Time from a block's decode to its first frame's playout", stats.lags())):
                yield _quantiles(f"memrope_serve_{name}", f"{doc} (quantiles of the last {LATENCY_WINDOW})", values)
            yield GaugeMetricFamily("memrope_serve_queue_depth_blocks", "Decoded blocks queued, all sessions",
                                    value=sum(depths))
            yield GaugeMetricFamily("memrope_serve_queue_depth_max_blocks", "Longest session queue",
                                    value=max(depths, default=0))
            yield GaugeMetricFamily("memrope_serve_live_streams",
                                    "Block streams (session caches) still referenced anywhere",
                                    value=len(stats.live_streams))
            yield GaugeMetricFamily("memrope_serve_cache_bytes", "KV cache bytes of open sessions",
                                    value=stats.cache_bytes)

    registry = CollectorRegistry()
    registry.register(_Collector())
    ProcessCollector(registry=registry)
    return registry


def cluster_metrics(reports: list[dict], placements: dict[str, int], refusals: dict[str, int],
                    lost: dict[str, int], edge: ServeStats) -> bytes:
    """The cluster's ``/metrics`` in Prometheus text: every engine replica's own metrics with a
    ``replica`` label (from ``reports``, one per replica: its id, node, session counts, recent
    block times and its exposition text; one that did not answer has no ``metrics``), then the
    cluster's totals (``memrope_cluster_*``): engine replicas wanted and answering, sessions, blocks/s and p50/p90 block latency over every replica's recent blocks,
    placements per replica, new sessions refused (``full``: every slot in use; ``rate_limited``),
    calls lost to a replica that died or did not answer, and the ingress's own edge refusals."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    class _Collector:
        def collect(self):
            families: dict[str, Metric] = {}
            for report in reports:
                if "metrics" not in report:
                    continue
                for family in text_string_to_metric_families(report["metrics"]):
                    merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                    for sample in family.samples:
                        merged.add_sample(sample.name, {"replica": report["replica"], **sample.labels}, sample.value)
            yield from families.values()
            live = [r for r in reports if "metrics" in r]
            yield GaugeMetricFamily("memrope_cluster_engines", "Engine replicas wanted (answering, starting or gone)",
                                    value=len(reports))
            yield GaugeMetricFamily("memrope_cluster_replicas", "Engine replicas answering", value=len(live))
            yield GaugeMetricFamily("memrope_cluster_sessions", "Sessions on every replica",
                                    value=sum(r["sessions"] for r in live))
            yield GaugeMetricFamily("memrope_cluster_max_sessions", "Session slots on every replica",
                                    value=sum(r["max_sessions"] for r in live))
            yield GaugeMetricFamily("memrope_cluster_blocks_per_second",
                                    f"Blocks per second on every replica (each over its last {RATE_WINDOW_S:.0f} s)",
                                    value=sum(r["blocks_per_second"] for r in live))
            yield _quantiles("memrope_cluster_block_latency_seconds", "Per-block generation + decode time over "
                             f"every replica's last {LATENCY_WINDOW} blocks",
                             [s for r in live for s in r["block_seconds"]])
            yield _counts("memrope_cluster_placements", "New sessions placed, by replica", "replica",
                          dict(sorted(placements.items())))
            yield _counts("memrope_cluster_sessions_refused", "New sessions refused, by why", "kind", refusals)
            yield _counts("memrope_cluster_calls_lost", "Calls whose replica died or did not answer", "kind", lost)
            yield _counts("memrope_cluster_requests_refused", "Requests refused at the ingress, by why", "kind",
                          edge.refused)
            yield CounterMetricFamily("memrope_cluster_unauthorized_requests",
                                      "/sessions requests refused with 401 at the ingress", value=edge.unauthorized)

    registry = CollectorRegistry()
    registry.register(_Collector())
    return generate_latest(registry)
