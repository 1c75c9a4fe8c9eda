"""``memrope serve --ray``: the same server on a Ray Serve cluster, many engine replicas behind one API.

Owns: the two deployments and how requests find their way between them.

* :class:`Engine`, N replicas: each is a whole :class:`memrope.runtime.serve.app.Server` (one model
  worker, its sessions' caches and their WebRTC peer connections), answering the API calls one
  by one (:meth:`Engine.call`). Media and the data channel go straight between a replica and its
  viewers; session ids are ``<replica>.<128 random bits>``, so an id names its owner and cannot be
  guessed.
* :class:`Ingress`, one replica behind Ray's HTTP proxy: the page, the ``/sessions`` API, the API
  key and the other guards, ``/healthz`` and ``/metrics``, served by the same routes as one process
  (:func:`memrope.runtime.serve.app.build_app`) over :class:`ClusterApi`, which forwards each call
  to the replica that owns the session.
* :class:`SessionRouter`, Ray Serve's request router for the engine: a call that names a replica
  goes to that replica; a new session goes to the replica with the most free slots (the sessions
  its routing stats list, plus those created or in flight since that report).

A replica that dies takes its sessions with it: their next control request, and the viewers'
liveness checks, get a 409 saying so; sessions on other replicas do not notice. Ray starts a
replacement, which takes new sessions once it is healthy.

Does not own sessions, the worker or the HTTP routes (``memrope.runtime.serve.app``). Importing
this module imports Ray; nothing else in the package does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import secrets
import time
import weakref
from contextlib import asynccontextmanager
from dataclasses import dataclass

from pydantic import BaseModel
from ray import serve
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from memrope.runtime.serve.app import (
    ApiError,
    CreateSession,
    Offer,
    PromptChange,
    Server,
    SessionRateLimit,
    build_app,
)
from memrope.runtime.serve.metrics import ServeStats, cluster_metrics
from memrope.runtime.serve.options import ServerOptions

logger = logging.getLogger(__name__)

APP_NAME = "memrope"
ENGINE = "MemropeEngine"
INGRESS = "MemropeIngress"
# How often each engine replica reports its free slots to the routers, and how long a call may
# wait for its replica before the ingress gives up on it (a replica that stopped answering).
ROUTING_STATS_PERIOD_S = 1.0
CALL_TIMEOUT_S = 30.0
# Calls a replica answers at once (no prompt to encode, no block to wait for) get less: a replica
# that stopped answering is reported sooner, and the caller asks again.
QUICK_OPS = frozenset({"get", "list", "heartbeat", "pause"})
QUICK_CALL_TIMEOUT_S = 5.0
# How long the router counts a session it saw created that no report of its replica lists yet (a
# session that ended before any report is forgotten then).
PLACEMENT_MEMORY_S = 10.0
# Calls one engine replica takes at once (creates, offers, prompt changes, heartbeats, metrics).
ENGINE_MAX_ONGOING = 256
_ID = re.compile(r"^([A-Za-z0-9]{1,32})\.[A-Za-z0-9_-]{8,64}$")
# The routers of this process (the ingress's handle makes one): the ingress reads the live
# replicas from them.
_ROUTERS: weakref.WeakSet = weakref.WeakSet()


def owner_of(session_id: str) -> str | None:
    """The engine replica named by ``session_id`` (``<replica>.<token>``), or None for an id no
    replica made."""
    match = _ID.match(session_id)
    return match.group(1) if match else None


@dataclass(frozen=True)
class ClusterOptions:
    """Where the cluster runs and how big it is.

    address: the Ray cluster to join (``auto``: the one ``ray start`` made here; None: start a
      local one for this command). replicas: engine replicas (fixed). replica_cpus /
      replica_gpus: what each reserves (one model worker: 1 GPU on a GPU cluster).
    """

    address: str | None = None
    replicas: int = 2
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"--replicas must be a positive integer, got {self.replicas!r}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError(f"--replica-cpus and --replica-gpus must be >= 0, got {self.replica_cpus:g} and "
                             f"{self.replica_gpus:g}")


class SessionRouter(RequestRouter):
    """Placement and affinity for :class:`Engine` calls.

    A call with ``replica=<id>`` goes to that replica only (a session's calls, and the ingress's
    fan-out for metrics and listings). A new session (``op="create"``) goes to the replica with
    the most free slots, skipping those in ``exclude`` (replicas that just answered "full").

    Free slots: the replica's ``max_sessions`` less its sessions, which are those its last routing
    stats listed, those the ingress saw it create after that report was taken (:meth:`placed`;
    forgotten after ``PLACEMENT_MEMORY_S``) and the creates sent to it and not yet answered. So a
    burst of new sessions spreads at once, and a report taken while a create was in flight
    cannot hide it. The replica's own admission has the last word: one that is full answers so,
    and the ingress tries the next.
    """

    def initialize_state(self, max_sessions: int = 4, **kwargs) -> None:
        self.max_sessions = max_sessions
        self._in_flight: dict[str, tuple[str, float]] = {}  # placement token -> (replica, wall time sent)
        self._created: dict[str, tuple[str, float]] = {}    # session id -> (replica, wall time answered)
        import memrope.runtime.serve.cluster as home  # the module itself, however this class was unpickled
        home._ROUTERS.add(self)

    def free_slots(self, replica: RunningReplica) -> int:
        stats = replica.routing_stats or {}
        uid = replica.replica_id.unique_id
        reported_at = float(stats.get("reported_at", 0.0))  # a report taken later knows the session, or its end
        sessions = set(stats.get("session_ids", ())) | {sid for sid, (owner, at) in self._created.items()
                                                         if owner == uid and at > reported_at}
        in_flight = sum(1 for owner, _ in self._in_flight.values() if owner == uid)
        return int(stats.get("max_sessions", self.max_sessions)) - len(sessions) - in_flight

    def placed(self, token: str, replica: str | None, session_id: str | None) -> None:
        """The ingress's create with ``token`` was answered (by ``replica``, with ``session_id``
        if it made one)."""
        self._in_flight.pop(token, None)
        now = time.time()
        if replica is not None and session_id is not None:
            self._created[session_id] = (replica, now)
        for table, memory_s in ((self._created, PLACEMENT_MEMORY_S), (self._in_flight, CALL_TIMEOUT_S + 5.0)):
            for stale in [key for key, (_, at) in table.items() if at < now - memory_s]:
                del table[stale]

    def replica_ids(self) -> set[str]:
        return {replica_id.unique_id for replica_id in self.curr_replicas}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no replica free: wait, do not spin
        target = kwargs.get("replica")
        if target is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        excluded = set(kwargs.get("exclude") or ())
        token = kwargs.get("placement")
        if token is not None:
            self._in_flight.pop(token, None)  # chosen again (after a backoff): counted once
        ranked = sorted((r for r in candidate_replicas if r.replica_id.unique_id not in excluded),
                        key=self.free_slots, reverse=True)
        if ranked and token is not None:
            self._in_flight[token] = (ranked[0].replica_id.unique_id, time.time())
        return [[r] for r in ranked]


_BODIES: dict[str, type[BaseModel]] = {"create": CreateSession, "offer": Offer, "prompt": PromptChange}
# The calls an engine replica answers: Server's api_* methods.
_OPS = frozenset({"create", "list", "get", "offer", "prompt", "pause", "heartbeat", "stop"})


class Engine:
    """One engine replica: a whole :class:`Server` (model worker, sessions, WebRTC) without HTTP."""

    async def __init__(self, request, options: ServerOptions):
        import ray

        from memrope.runtime.serve.model import load_serve_model

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        self.model = load_serve_model(request)
        # The ingress owns the rate limit (a client's sessions land on many replicas).
        options = _replace(options, sessions_per_minute=0.0)
        self.server = Server(self.model, options, id_prefix=f"{self.replica}.")
        if not (options.binds_all or options.binds_loopback):
            # --host names the head's address; this replica's media leaves from its own node.
            self.server.ice_host_addresses = [ray.util.get_node_ip_address()]
        self._lifespan = self.server.lifespan(None)
        await self._lifespan.__aenter__()  # worker started and warmed up: healthy from here
        logger.info("engine replica %s on node %s ready", self.replica, self.node)

    async def call(self, op: str, session_id: str | None = None, body: dict | None = None, client: str = "unknown",
                   replica: str | None = None, exclude: tuple[str, ...] = (), placement: str | None = None) -> dict:
        """The API call ``op`` (an ``api_*`` method of :class:`Server`), answered as
        ``{"status", "body"}`` or ``{"status", "error", "headers"}``; ``replica``, ``exclude``
        and ``placement`` are for the router."""
        if op not in _OPS:
            raise ValueError(f"unknown engine call {op!r}; expected one of {sorted(_OPS)}")
        try:
            args = [] if session_id is None else [session_id]
            if op in _BODIES:
                args.append(_BODIES[op].model_validate(body))
            elif op == "pause":
                args.append(bool(body))
            if op == "create":
                args.append(client)
            result = await getattr(self.server, f"api_{op}")(*args)
        except ApiError as exc:
            return {"status": exc.status, "error": exc.message, "headers": exc.headers or {}, "replica": self.replica}
        return {"status": 200, "body": result, "replica": self.replica}

    async def report(self, replica: str | None = None) -> dict:
        """What the ingress's ``/metrics`` and ``/healthz`` show for this replica."""
        server = self.server
        status, health = await server.health()
        return {"replica": self.replica, "node": self.node, "pid": os.getpid(), "healthy": status == 200, "health": health,
                "sessions": len(server.sessions), "max_sessions": server.options.max_sessions,
                "blocks_per_second": server.stats.blocks_per_second(), "block_seconds": server.stats.block_seconds(),
                "metrics": (await server.metrics()).decode()}

    def record_routing_stats(self) -> dict:
        """What the router places by: this replica's sessions (a few ids) and its limit."""
        server = self.server
        return {"max_sessions": server.options.max_sessions, "session_ids": list(server.sessions),
                "reported_at": time.time()}

    def check_health(self) -> None:
        if self.server.worker is None or not self.server.worker.alive:
            raise RuntimeError(f"engine replica {self.replica}: the model worker stopped ({self.server.worker.error})")

    async def __del__(self):
        await self._lifespan.__aexit__(None, None, None)  # every session ends: "the server is shutting down"
        self.model.close()


def _replace(options: ServerOptions, **changes) -> ServerOptions:
    import dataclasses
    return dataclasses.replace(options, **changes)


class ClusterApi:
    """What the ingress answers: the calls of :class:`Server`, each forwarded to its replica."""

    def __init__(self, engine, options: ServerOptions):
        self.engine, self.options = engine, options
        self.stats = ServeStats()  # the edge's counters (401s, refused requests)
        self.rate_limit = SessionRateLimit(options.sessions_per_minute, options.session_burst)
        self.placements: dict[str, int] = {}
        self.refusals = {"full": 0, "rate_limited": 0}
        self.lost = {"replica_gone": 0, "replica_timeout": 0}

    @asynccontextmanager
    async def lifespan(self, app):
        yield

    def _router(self) -> SessionRouter | None:
        return next(iter(_ROUTERS), None)

    async def _call(self, op: str, **kwargs) -> dict:
        """``Engine.call`` through the router, within CALL_TIMEOUT_S; a replica that died or did
        not answer is a one-line ApiError."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        replica, session_id = kwargs.get("replica"), kwargs.get("session_id")
        retry = {"Retry-After": str(self.options.retry_after_s)}
        timeout_s = QUICK_CALL_TIMEOUT_S if op in QUICK_OPS else CALL_TIMEOUT_S
        try:
            return await asyncio.wait_for(self.engine.call.remote(op=op, **kwargs), timeout_s)
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            self.lost["replica_gone"] += 1
            if session_id is not None:
                raise self._gone(session_id, replica) from None
            raise ApiError(503, "the engine replica answering this request stopped; retry",
                           headers=retry) from None
        except asyncio.TimeoutError:
            self.lost["replica_timeout"] += 1
            what = f"engine replica {replica} did not answer" if replica else "no engine replica answered"
            raise ApiError(503, f"{what} within {timeout_s:g} s; retry later", headers=retry) from None

    @staticmethod
    def _gone(session_id: str | None, replica: str | None) -> ApiError:
        return ApiError(409, f"session {session_id} has ended (its engine replica {replica} stopped: the process "
                             "exited, ran out of memory or its node left the cluster); create a new one with "
                             "POST /sessions")

    async def _session_call(self, op: str, session_id: str, body=None):
        replica = owner_of(session_id)
        if replica is None:
            raise ApiError(404, f"unknown session {session_id!r}; create one with POST /sessions")
        router = self._router()
        if router is not None and router.curr_replicas and replica not in router.replica_ids():
            self.lost["replica_gone"] += 1
            raise self._gone(session_id, replica)
        return _answer(await self._call(op, session_id=session_id, body=body, replica=replica))

    async def _replicas(self) -> list[str]:
        """The live engine replicas (the router learns them on its first call)."""
        router = self._router()
        if router is None or not router.curr_replicas:
            await self._call("list")
            router = self._router()
        return sorted(router.replica_ids()) if router is not None else []

    async def _fan_out(self, method: str) -> list[dict]:
        """``method`` on every replica, one after another: calls made for one HTTP request share
        its request id, and the router pairs concurrent calls with the same id to replicas
        interchangeably."""
        async def one(replica: str):
            try:
                return await asyncio.wait_for(getattr(self.engine, method).remote(replica=replica), CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - one replica's failure is reported, the others answer
                return {"replica": replica, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        return [await one(r) for r in await self._replicas()]

    # -- the API ----------------------------------------------------------------------------------

    async def api_create(self, body: CreateSession, client: str) -> dict:
        router = self._router()
        replicas = list(router.curr_replicas.values()) if router is not None else []
        wait_s = self.rate_limit.take(client)
        if wait_s > 0:
            self.refusals["rate_limited"] += 1
            self.stats.count_refused("rate_limited")
            retry = math.ceil(wait_s)
            raise ApiError(429, f"too many new sessions from {client}: at most {self.options.session_burst} at once, "
                                f"then {self.options.sessions_per_minute:g} a minute (--sessions-per-minute); "
                                f"retry in {retry} s", headers={"Retry-After": str(retry)})
        tried: list[str] = []
        for _ in range(max(len(replicas), 1) + 1):
            token, answer = secrets.token_hex(8), {}
            try:
                answer = await self._call("create", body=body.model_dump(), client=client, exclude=tuple(tried),
                                          placement=token)
            finally:  # answered or not, the create is no longer in flight
                router = self._router()  # made by the first call, if this is the ingress's first
                if router is not None:
                    router.placed(token, answer.get("replica"), (answer.get("body") or {}).get("id"))
            if answer["status"] != 503:
                break
            tried.append(answer["replica"])  # full since its last report: the next one
            if router is None or not router.replica_ids() - set(tried):
                break
        if answer["status"] == 503:
            # Every replica said "full" (their own admission decides, not the reports): as from one
            # process, a refused client keeps its token for when a slot frees.
            self.rate_limit.give_back(client)
            raise self._full(len(tried))
        doc = _answer(answer)
        self.placements[answer["replica"]] = self.placements.get(answer["replica"], 0) + 1
        return doc

    def _full(self, replicas: int) -> ApiError:
        self.refusals["full"] += 1
        retry = self.options.retry_after_s
        return ApiError(503, f"cluster full: every session slot of {replicas} engine replica(s) is in use "
                             f"({self.options.max_sessions} each); retry in {retry} s", headers={"Retry-After": str(retry)})

    async def api_list(self) -> dict:
        sessions, max_sessions = [], 0
        for answer in await self._fan_out_calls("list"):
            if answer.get("status") == 200:
                sessions.extend(answer["body"]["sessions"])
                max_sessions += answer["body"]["max_sessions"]
        return {"sessions": sessions, "max_sessions": max_sessions}

    async def _fan_out_calls(self, op: str) -> list[dict]:
        async def one(replica: str):
            try:
                return await self._call(op, replica=replica)
            except ApiError as exc:
                return {"status": exc.status, "error": exc.message, "replica": replica}
        return [await one(r) for r in await self._replicas()]

    async def api_get(self, session_id: str) -> dict:
        return await self._session_call("get", session_id)

    async def api_offer(self, session_id: str, body: Offer) -> dict:
        return await self._session_call("offer", session_id, body.model_dump())

    async def api_prompt(self, session_id: str, body: PromptChange) -> dict:
        return await self._session_call("prompt", session_id, body.model_dump())

    async def api_pause(self, session_id: str, paused: bool) -> dict:
        return await self._session_call("pause", session_id, paused)

    async def api_heartbeat(self, session_id: str) -> None:
        await self._session_call("heartbeat", session_id)

    async def api_stop(self, session_id: str) -> dict:
        return await self._session_call("stop", session_id)

    async def health(self) -> tuple[int, dict]:
        reports = await self._fan_out("report")
        healthy = [r for r in reports if r.get("healthy")]
        doc = {"status": "ok" if healthy else "no healthy engine replica", "ingress_pid": os.getpid(),
               "replicas": len(reports),
               "healthy_replicas": len(healthy), "sessions": sum(r.get("sessions", 0) for r in reports),
               "max_sessions": sum(r.get("max_sessions", 0) for r in healthy),
               "engine_replicas": [{k: r.get(k) for k in ("replica", "node", "pid", "healthy", "sessions", "error")}
                                   for r in reports]}
        if healthy:
            first = healthy[0]["health"]
            doc.update({k: first[k] for k in ("fps", "width", "height", "heartbeat_timeout_s", "connect_timeout_s",
                                              "model")})
        return (200 if healthy else 503), doc

    async def metrics(self) -> bytes:
        return cluster_metrics(await self._fan_out("report"), self.placements, self.refusals, self.lost, self.stats)


def _answer(answer: dict):
    if answer["status"] >= 400:
        raise ApiError(answer["status"], answer["error"], headers=answer.get("headers") or None)
    return answer["body"]


@serve.ingress()
class Ingress:
    """The HTTP side: the same app as one process, over :class:`ClusterApi`."""

    def __init__(self, engine, options: ServerOptions):
        self.api, self.options = ClusterApi(engine, options), options

    def __serve_build_asgi_app__(self):
        return build_app(self.api, self.options)


def run_cluster(request, options: ServerOptions, cluster: ClusterOptions, *, on_ready=None) -> None:
    """Deploy the server on Ray Serve (joining ``cluster.address``, or starting Ray here) and
    serve until SIGINT/SIGTERM; then every session ends and the application is deleted.
    ``on_ready(url)`` is called once every engine replica has warmed up and the proxy answers."""
    import signal
    import threading

    import ray
    from ray.serve.config import RequestRouterConfig

    ray.init(address=cluster.address, include_dashboard=False, namespace="memrope", log_to_driver=False,
             logging_level=logging.WARNING)
    # After ray.init (it installs its own SIGTERM handler, which aborts), before the deployment: a
    # SIGTERM during start-up stops the server cleanly once it is up, not half-way.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        http = {"host": options.host, "port": options.port, "location": "HeadOnly"}
        if options.tls_cert:
            http.update(ssl_certfile=options.tls_cert, ssl_keyfile=options.tls_key)
        serve.start(http_options=http)
        engine = serve.deployment(
            Engine, name=ENGINE, num_replicas=cluster.replicas, max_ongoing_requests=ENGINE_MAX_ONGOING,
            ray_actor_options={"num_cpus": cluster.replica_cpus, "num_gpus": cluster.replica_gpus},
            request_router_config=RequestRouterConfig(
                request_router_class=SessionRouter, request_router_kwargs={"max_sessions": options.max_sessions},
                request_routing_stats_period_s=ROUTING_STATS_PERIOD_S, request_routing_stats_timeout_s=5.0),
            health_check_period_s=5.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=15.0)
        ingress = serve.deployment(Ingress, name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0},
                                   max_ongoing_requests=1024)
        serve.run(ingress.bind(engine.bind(request, options), options), name=APP_NAME, route_prefix="/",
                  blocking=False)
        if on_ready is not None:
            on_ready(f"{options.scheme}://{options.host}:{options.port}/")
        stop.wait()
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()
