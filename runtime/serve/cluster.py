"""``memrope serve --ray``: the same server on a Ray Serve cluster, many engine replicas behind one API.

Owns: the applications on Ray Serve, how requests find their way between them, and starting and
removing engine replicas as the sessions come and go.

* :class:`Engine`, one Ray Serve application per engine replica (``memrope-engine-<n>``, one
  replica each): a whole :class:`memrope.runtime.serve.app.Server` (one model worker, its
  sessions' caches and their WebRTC peer connections), answering the API calls one by one
  (:meth:`Engine.call`). Media and the data channel go straight between a replica and its viewers;
  session ids are ``<replica>.<128 random bits>``, so an id names its owner and cannot be guessed.
* :class:`Ingress`, the ``memrope`` application, one replica behind Ray's HTTP proxy: the page,
  the ``/sessions`` API, the API key and the other guards, ``/healthz`` and ``/metrics``, served by
  the same routes as one process (:func:`memrope.runtime.serve.app.build_app`) over
  :class:`ClusterApi`, which places each new session (:class:`memrope.runtime.serve.placement.Placement`)
  and forwards each later call to the replica that owns the session.
* :func:`run_cluster`, the ``memrope serve --ray`` process: deploys both, then keeps the replica
  count where :class:`memrope.runtime.serve.placement.ScalePolicy` wants it, starting engine
  applications and removing idle ones (drained first).

Why one application per replica: Ray Serve's own autoscaler picks which replica of a deployment to
stop by node and age, and a live session is not a request it would wait for; a replica that still
has sessions must never be removed, so the removal is ours, of a replica we chose and drained.
Ray Serve still places each replica on a node with the resources, restarts one that dies and
carries the control calls.

A replica that dies takes its sessions with it: their next control request, and the viewers'
liveness checks, get a 409 saying so; sessions on other replicas do not notice. Ray starts a
replacement in the same application, which takes new sessions once it is healthy.

Does not own sessions, the worker or the HTTP routes (``memrope.runtime.serve.app``). Importing
this module imports Ray; nothing else in the package does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
import weakref
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

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
from memrope.runtime.serve.placement import (
    EngineReport,
    EngineState,
    Placement,
    ScaleOptions,
    ScalePolicy,
    owner_of,
)

logger = logging.getLogger(__name__)

APP_NAME = "memrope"  # the ingress's application
ENGINE_APP = "memrope-engine-"  # + a number: one application per engine replica
ENGINE = "MemropeEngine"
INGRESS = "MemropeIngress"
# How often the ingress and the scaler ask every engine replica for its slots, and how long a call
# may wait for its replica before the ingress gives up on it (a replica that stopped answering).
REPORT_PERIOD_S = 2.0
# How often the ingress asks Ray Serve which engine applications exist (and whenever a new session
# finds no replica with a free slot): they change only when the scaler starts or removes one.
DISCOVERY_PERIOD_S = 5.0
CALL_TIMEOUT_S = 30.0
# Calls a replica answers at once (no prompt to encode, no block to wait for) get less: a replica
# that stopped answering is reported sooner, and the caller asks again.
QUICK_OPS = frozenset({"get", "list", "heartbeat", "pause"})
QUICK_CALL_TIMEOUT_S = 5.0
# Calls one engine replica takes at once (creates, offers, prompt changes, heartbeats, metrics).
ENGINE_MAX_ONGOING = 256
# This process's routers, one per engine application its handles call: Ray's own view of which
# replica runs where, updated as replicas start and die.
_ROUTERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class ClusterOptions:
    """Where the cluster runs and how big it is.

    address: the Ray cluster to join (``auto``: the one ``ray start`` made here; None: start a
      local one for this command). scale: the engine replica count's bounds and how it follows
      the sessions (:class:`ScaleOptions`). replica_cpus / replica_gpus: what each replica
      reserves (one model worker: 1 GPU on a GPU cluster).
    """

    address: str | None = None
    scale: ScaleOptions = field(default_factory=ScaleOptions)
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError(f"--replica-cpus and --replica-gpus must be >= 0, got {self.replica_cpus:g} and "
                             f"{self.replica_gpus:g}")


class EngineRouter(RequestRouter):
    """The request router of one engine application: its one replica takes every call. Kept in
    ``_ROUTERS`` so that this process knows which replica each application runs now."""

    def initialize_state(self, **kwargs) -> None:
        import memrope.runtime.serve.cluster as home  # the module itself, however this class was unpickled
        home._ROUTERS[self.app_name] = self

    def replica_ids(self) -> set[str]:
        return {replica_id.unique_id for replica_id in self.curr_replicas}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no replica yet: wait, do not spin
        return [candidate_replicas]


def _live_replicas(engine: str) -> set[str] | None:
    """The replicas Ray runs for ``engine`` now, or None before this process has called it."""
    router = _ROUTERS.get(engine)
    return None if router is None else router.replica_ids()


_BODIES: dict[str, type[BaseModel]] = {"create": CreateSession, "offer": Offer, "prompt": PromptChange}
# The calls an engine replica answers: Server's api_* methods.
_OPS = frozenset({"create", "list", "get", "offer", "prompt", "pause", "heartbeat", "stop"})


class Engine:
    """One engine replica: a whole :class:`Server` (model worker, sessions, WebRTC) without HTTP."""

    async def __init__(self, request, options: ServerOptions):
        import dataclasses

        import ray

        from memrope.runtime.serve.model import load_serve_model

        replica_id = serve.get_replica_context().replica_id
        self.replica, self.engine = replica_id.unique_id, replica_id.deployment_id.app_name
        self.node = ray.get_runtime_context().get_node_id()
        self.draining = False
        self.model = load_serve_model(request)
        # The ingress owns the rate limit (a client's sessions land on many replicas).
        options = dataclasses.replace(options, sessions_per_minute=0.0)
        self.server = Server(self.model, options, id_prefix=f"{self.replica}.")
        if not (options.binds_all or options.binds_loopback):
            # --host names the head's address; this replica's media leaves from its own node.
            self.server.ice_host_addresses = [ray.util.get_node_ip_address()]
        self._lifespan = self.server.lifespan(None)
        await self._lifespan.__aenter__()  # worker started and warmed up: healthy from here
        logger.info("engine replica %s (%s) on node %s ready", self.replica, self.engine, self.node)

    async def call(self, op: str, session_id: str | None = None, body: dict | None = None, client: str = "unknown",
                   replica: str | None = None) -> dict:
        """The API call ``op`` (an ``api_*`` method of :class:`Server`), answered as
        ``{"status", "body"}`` or ``{"status", "error", "headers"}``. ``replica``: the replica the
        caller means (a session's owner); another replica of this application answers 409 (the
        one meant has been replaced)."""
        if op not in _OPS:
            raise ValueError(f"unknown engine call {op!r}; expected one of {sorted(_OPS)}")
        if replica is not None and replica != self.replica:
            return {"status": 409, "error": _gone(session_id, replica).message, "replica": self.replica}
        if op == "create" and self.draining:  # checked before any await: a drain counts every create
            return {"status": 503, "error": f"engine replica {self.replica} is being removed",
                    "replica": self.replica}
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

    async def slots(self) -> dict:
        """What placement and the scaler go by (an :class:`EngineReport`). Async, so it runs on the
        replica's event loop with the session calls (Ray Serve runs plain methods in threads)."""
        return {"engine": self.engine, "replica": self.replica, "max_sessions": self.server.options.max_sessions,
                "session_ids": tuple(self.server.sessions), "reported_at": time.time(), "draining": self.draining}

    async def drain(self, on: bool) -> int:
        """Take no new session (``on``), or take them again; returns the sessions this replica
        has, creates in progress included: 0 means nothing is lost by removing it. On the event
        loop, as :meth:`call`: no create can be between its check and its session's registration."""
        self.draining = bool(on)
        return len(self.server.sessions)

    async def report(self) -> dict:
        """What the ingress's ``/metrics`` and ``/healthz`` show for this replica."""
        server = self.server
        status, health = await server.health()
        return {"engine": self.engine, "replica": self.replica, "node": self.node, "pid": os.getpid(),
                "healthy": status == 200, "health": health, "draining": self.draining,
                "sessions": len(server.sessions), "max_sessions": server.options.max_sessions,
                "blocks_per_second": server.stats.blocks_per_second(), "block_seconds": server.stats.block_seconds(),
                "metrics": (await server.metrics()).decode()}

    def check_health(self) -> None:
        if self.server.worker is None or not self.server.worker.alive:
            raise RuntimeError(f"engine replica {self.replica}: the model worker stopped ({self.server.worker.error})")

    async def __del__(self):
        await self._lifespan.__aexit__(None, None, None)  # every session ends: "the server is shutting down"
        self.model.close()


def _gone(session_id: str | None, replica: str | None) -> ApiError:
    return ApiError(409, f"session {session_id} has ended (its engine replica {replica} stopped: the process "
                         "exited, ran out of memory or its node left the cluster); create a new one with "
                         "POST /sessions")


def _engine_apps() -> list[str]:
    """The engine applications Ray Serve runs (not those being deleted), oldest first."""
    from ray.serve.schema import ApplicationStatus

    apps = serve.status().applications
    names = [name for name, app in apps.items()
             if name.startswith(ENGINE_APP) and app.status != ApplicationStatus.DELETING]
    return sorted(names, key=_engine_number)


def _engine_number(name: str) -> int:
    suffix = name[len(ENGINE_APP):]
    return int(suffix) if suffix.isdigit() else -1


class ClusterApi:
    """What the ingress answers: the calls of :class:`Server`, each forwarded to its replica.

    Every ``DISCOVERY_PERIOD_S`` it learns the engine applications from Ray Serve, and every
    ``REPORT_PERIOD_S`` it asks each for its slots (:meth:`Engine.slots`): placement goes by those reports, and a session's owner by
    Ray's own view of the replicas (:class:`EngineRouter`).
    """

    def __init__(self, options: ServerOptions):
        self.options = options
        self.stats = ServeStats()  # the edge's counters (401s, refused requests)
        self.rate_limit = SessionRateLimit(options.sessions_per_minute, options.session_burst)
        self.placement = Placement()
        self.handles: dict = {}  # engine application -> its DeploymentHandle
        self.reports: dict[str, EngineReport] = {}  # engine application -> its last report
        self.placements: dict[str, int] = {}
        self.refusals = {"full": 0, "rate_limited": 0}
        self.lost = {"replica_gone": 0, "replica_timeout": 0}
        self._reported: asyncio.Event | None = None
        self._watcher: asyncio.Task | None = None

    @asynccontextmanager
    async def lifespan(self, app):
        self._start()
        try:
            yield
        finally:
            self._watcher.cancel()
            with suppress(asyncio.CancelledError):
                await self._watcher

    def _start(self) -> None:
        if self._watcher is None:
            self._reported = asyncio.Event()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        discovered = -math.inf
        while True:
            try:
                now = time.monotonic()
                discover = now - discovered >= DISCOVERY_PERIOD_S
                await self._refresh(discover)
                if discover:
                    discovered = now
            except Exception:  # noqa: BLE001 - Ray Serve's controller restarting: the next round asks again
                logger.exception("could not learn the engine replicas")
            await asyncio.sleep(REPORT_PERIOD_S)

    async def _refresh(self, discover: bool = True) -> None:
        """Each engine application's slots; with ``discover``, first which applications exist."""
        if discover:
            apps = await asyncio.to_thread(_engine_apps)
            for gone in set(self.handles) - set(apps):
                self.handles.pop(gone)
                self.reports.pop(gone, None)
            for app in apps:
                if app not in self.handles:
                    self.handles[app] = serve.get_deployment_handle(ENGINE, app_name=app)
        apps = list(self.handles)

        async def slots(app: str) -> None:
            if _live_replicas(app) == set():  # starting, or restarting: nothing to ask yet
                self.reports.pop(app, None)
                return
            try:
                report = await asyncio.wait_for(self.handles[app].slots.remote(), QUICK_CALL_TIMEOUT_S)
                if app in self.handles:  # not removed meanwhile
                    self.reports[app] = EngineReport(**report)
            except Exception:  # noqa: BLE001 - not answering: no new session goes there
                self.reports.pop(app, None)
        await asyncio.gather(*(slots(app) for app in apps))
        self._reported.set()

    async def _ready(self) -> None:
        """Wait (a little) for the first round of reports, as after the ingress (re)starts."""
        self._start()
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._reported.wait(), CALL_TIMEOUT_S)

    async def _call(self, engine: str, op: str, **kwargs) -> dict:
        """``Engine.call`` on ``engine``, within its timeout; a replica that died or did not
        answer is a one-line ApiError."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        replica, session_id = kwargs.get("replica"), kwargs.get("session_id")
        retry = {"Retry-After": str(self.options.retry_after_s)}
        timeout_s = QUICK_CALL_TIMEOUT_S if op in QUICK_OPS else CALL_TIMEOUT_S
        try:
            handle = self.handles[engine]
            return await asyncio.wait_for(handle.call.remote(op=op, **kwargs), timeout_s)
        except (KeyError, ActorDiedError, ActorUnavailableError, RayActorError):  # KeyError: removed meanwhile
            self.lost["replica_gone"] += 1
            if session_id is not None:
                raise _gone(session_id, replica) from None
            raise ApiError(503, "the engine replica answering this request stopped; retry",
                           headers=retry) from None
        except asyncio.TimeoutError:
            self.lost["replica_timeout"] += 1
            raise ApiError(503, f"engine replica {replica or engine} did not answer within {timeout_s:g} s; "
                                "retry later", headers=retry) from None

    def _engine_of(self, replica: str) -> str | None:
        """The engine application whose running replica is ``replica``, by Ray's own view."""
        for engine in self.handles:
            if replica in (_live_replicas(engine) or ()):
                return engine
        return None

    async def _session_call(self, op: str, session_id: str, body=None):
        replica = owner_of(session_id)
        if replica is None:
            raise ApiError(404, f"unknown session {session_id!r}; create one with POST /sessions")
        await self._ready()
        engine = self._engine_of(replica)
        if engine is None:
            self.lost["replica_gone"] += 1
            raise _gone(session_id, replica)
        return _answer(await self._call(engine, op, session_id=session_id, body=body, replica=replica))

    async def _each(self, method: str, *args) -> list[dict]:
        """``method`` of every engine application, at once; one that fails is reported as such."""
        await self._ready()

        async def one(engine: str):
            if _live_replicas(engine) == set():
                return {"engine": engine, "replica": None, "error": "no replica running yet (starting or restarting)"}
            try:
                return await asyncio.wait_for(getattr(self.handles[engine], method).remote(*args), CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - one replica's failure is reported, the others answer
                return {"engine": engine, "replica": None, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        return list(await asyncio.gather(*(one(e) for e in list(self.handles))))

    # -- the API ----------------------------------------------------------------------------------

    async def api_create(self, body: CreateSession, client: str) -> dict:
        await self._ready()
        wait_s = self.rate_limit.take(client)
        if wait_s > 0:
            self.refusals["rate_limited"] += 1
            self.stats.count_refused("rate_limited")
            retry = math.ceil(wait_s)
            raise ApiError(429, f"too many new sessions from {client}: at most {self.options.session_burst} at once, "
                                f"then {self.options.sessions_per_minute:g} a minute (--sessions-per-minute); "
                                f"retry in {retry} s", headers={"Retry-After": str(retry)})
        tried: set[str] = set()
        refreshed = False
        while True:
            ranked = self.placement.ranked(list(self.reports.values()), exclude=tried)
            if not ranked and not refreshed:  # a replica may have come up since the last round: ask now
                await self._refresh()
                refreshed = True
                continue
            if not ranked:
                break
            engine, token, answer = ranked[0].engine, secrets.token_hex(8), {}
            self.placement.sending(token, engine)
            try:
                answer = await self._call(engine, "create", body=body.model_dump(), client=client)
            except ApiError as exc:  # stopped, or did not answer: the next one
                if exc.status != 503:
                    raise
                answer = {"status": 503}
            finally:  # answered or not, the create is no longer in flight
                self.placement.answered(token, engine, (answer.get("body") or {}).get("id"))
            if answer["status"] != 503:
                doc = _answer(answer)
                self.placements[answer["replica"]] = self.placements.get(answer["replica"], 0) + 1
                return doc
            tried.add(engine)  # full (or being removed) since its last report: the next one
        # Every replica said "full" (their own admission decides, not the reports): as from one
        # process, a refused client keeps its token for when a slot frees.
        self.rate_limit.give_back(client)
        raise self._full(len(self.reports))

    def _full(self, replicas: int) -> ApiError:
        self.refusals["full"] += 1
        retry = self.options.retry_after_s
        if not replicas:
            return ApiError(503, f"no engine replica is ready (starting or restarting); retry in {retry} s",
                            headers={"Retry-After": str(retry)})
        return ApiError(503, f"cluster full: every session slot of {replicas} engine replica(s) is in use "
                             f"({self.options.max_sessions} each); retry in {retry} s", headers={"Retry-After": str(retry)})

    async def api_list(self) -> dict:
        sessions, max_sessions = [], 0
        for answer in await self._each("call", "list"):
            if answer.get("status") == 200:
                sessions.extend(answer["body"]["sessions"])
                max_sessions += answer["body"]["max_sessions"]
        return {"sessions": sessions, "max_sessions": max_sessions}

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
        reports = await self._each("report")
        healthy = [r for r in reports if r.get("healthy")]
        doc = {"status": "ok" if healthy else "no healthy engine replica", "ingress_pid": os.getpid(),
               "replicas": len(reports),
               "healthy_replicas": len(healthy), "sessions": sum(r.get("sessions", 0) for r in reports),
               "max_sessions": sum(r.get("max_sessions", 0) for r in healthy),
               "engine_replicas": [{k: r.get(k) for k in ("engine", "replica", "node", "pid", "healthy", "draining",
                                                          "sessions", "error")}
                                   for r in reports]}
        if healthy:
            first = healthy[0]["health"]
            doc.update({k: first[k] for k in ("fps", "width", "height", "heartbeat_timeout_s", "connect_timeout_s",
                                              "model")})
        return (200 if healthy else 503), doc

    async def metrics(self) -> bytes:
        return cluster_metrics(await self._each("report"), self.placements, self.refusals, self.lost, self.stats)


def _answer(answer: dict):
    if answer["status"] >= 400:
        raise ApiError(answer["status"], answer["error"], headers=answer.get("headers") or None)
    return answer["body"]


@serve.ingress()
class Ingress:
    """The HTTP side: the same app as one process, over :class:`ClusterApi`."""

    def __init__(self, options: ServerOptions):
        self.api, self.options = ClusterApi(options), options

    def __serve_build_asgi_app__(self):
        return build_app(self.api, self.options)


class Scaler:
    """The engine applications of this ``memrope serve --ray``: starts them, and removes idle ones,
    as :class:`ScalePolicy` says. Runs in the command's own process, one round per
    ``REPORT_PERIOD_S``."""

    def __init__(self, request, options: ServerOptions, cluster: ClusterOptions):
        from ray.serve.config import RequestRouterConfig

        self.request, self.options = request, options
        self.policy = ScalePolicy(cluster.scale, options.max_sessions)
        self.deployment = serve.deployment(
            Engine, name=ENGINE, num_replicas=1, max_ongoing_requests=ENGINE_MAX_ONGOING,
            ray_actor_options={"num_cpus": cluster.replica_cpus, "num_gpus": cluster.replica_gpus},
            request_router_config=RequestRouterConfig(request_router_class=EngineRouter),
            health_check_period_s=5.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=15.0)
        self.engines: dict = {}  # engine application -> its DeploymentHandle, oldest first
        self._number = 0

    def start(self, count: int, wait: bool) -> None:
        """``count`` more engine applications (``wait``: until each replica is up and warm)."""
        targets = []
        for _ in range(count):
            name = f"{ENGINE_APP}{self._number}"
            self._number += 1
            targets.append(serve.RunTarget(self.deployment.bind(self.request, self.options), name=name, route_prefix=None))
        handles = serve.run_many(targets, wait_for_ingress_deployment_creation=wait,
                                 wait_for_applications_running=wait)
        for target, handle in zip(targets, handles, strict=True):
            self.engines[target.name] = handle
            logger.warning("memrope serve: engine replica %s started (%d in all)", target.name, len(self.engines))

    def states(self) -> list[EngineState]:
        """Every engine application's sessions (None: it did not answer within the round)."""
        asked = {name: handle.slots.remote() for name, handle in self.engines.items()
                 if _live_replicas(name) != set()}
        deadline = time.monotonic() + REPORT_PERIOD_S
        states = []
        for name in self.engines:
            sessions = None
            if name in asked:
                try:
                    sessions = len(asked[name].result(timeout_s=max(deadline - time.monotonic(), 0.05))["session_ids"])
                except Exception:  # noqa: BLE001 - starting, restarting or unreachable: not idle
                    asked[name].cancel()
            states.append(EngineState(name, sessions))
        return states

    def step(self) -> None:
        start, remove = self.policy.decide(self.states(), time.monotonic())
        if start:
            self.start(start, wait=False)
        for name in remove:
            self.remove(name)

    def remove(self, name: str) -> bool:
        """Drain ``name`` and delete it if it has no session then; True if it was removed."""
        handle = self.engines[name]
        try:
            sessions = handle.drain.remote(True).result(timeout_s=QUICK_CALL_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - not answering: kept, asked again next round
            return False
        if sessions:
            handle.drain.remote(False).result(timeout_s=QUICK_CALL_TIMEOUT_S)
            return False
        del self.engines[name]
        logger.warning("memrope serve: engine replica %s drained with no session: removing it (%d left)", name,
                       len(self.engines))
        serve.delete(name)
        self.policy.removed(time.monotonic())
        return True

    def delete_all(self) -> None:
        for name in list(self.engines):
            serve.delete(name)
            del self.engines[name]


def run_cluster(request, options: ServerOptions, cluster: ClusterOptions, *, on_ready=None) -> None:
    """Deploy the server on Ray Serve (joining ``cluster.address``, or starting Ray here), keep the
    engine replica count where the sessions want it, and serve until SIGINT/SIGTERM; then every
    session ends and the applications are deleted. ``on_ready(url)`` is called once the first
    ``min_replicas`` engine replicas have warmed up and the proxy answers."""
    import signal
    import threading

    import ray

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
        for stale in _engine_apps():  # left by an earlier server on this Ray cluster: their sessions are gone
            serve.delete(stale)
        scaler = Scaler(request, options, cluster)
        scaler.start(cluster.scale.min_replicas, wait=True)
        ingress = serve.deployment(Ingress, name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0},
                                   max_ongoing_requests=1024)
        serve.run(ingress.bind(options), name=APP_NAME, route_prefix="/", blocking=False)
        if on_ready is not None:
            on_ready(f"{options.scheme}://{options.host}:{options.port}/")
        while not stop.wait(REPORT_PERIOD_S):
            if cluster.scale.autoscaling:
                try:
                    scaler.step()
                except Exception:  # noqa: BLE001 - Ray Serve busy or restarting: the next round tries again
                    logger.exception("memrope serve: a scaling round failed")
        serve.delete(APP_NAME)
        scaler.delete_all()
        serve.shutdown()
    finally:
        ray.shutdown()
