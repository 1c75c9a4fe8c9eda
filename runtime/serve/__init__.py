"""``memrope serve``: live video to browsers over WebRTC, many sessions on one model worker.

Owns: the ``serve`` subcommand (its arguments and :func:`cmd_serve`). The parts:

* :mod:`memrope.runtime.serve.model`: what the worker owns (the block loop over one backend, the text
  encoder, the VAE), loaded with the same resolution as ``memrope generate``;
* :mod:`memrope.runtime.serve.worker`: the one model thread, round-robin over sessions, block by block;
* :mod:`memrope.runtime.serve.session`: one session's state and bounded playout queue;
* :mod:`memrope.runtime.serve.app`: HTTP (FastAPI), admission, events, health, metrics, the page;
* :mod:`memrope.runtime.serve.webrtc`: the video track and the offer/answer (aiortc);
* :mod:`memrope.runtime.serve.client`: a Python viewer (tests, the benchmark, scripts).

Importing this package imports no web or WebRTC library; they load when the server starts, and
a missing one names the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "aiortc": "aiortc", "prometheus_client":
                  "prometheus-client", "aiohttp": "aiohttp", "av": "av"}


def require_serve_packages() -> None:
    """ImportError naming the extra if a package the server needs is missing."""
    missing = [pip for module, pip in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"memrope serve needs {', '.join(missing)}: pip install 'memrope-engine[serve]'")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``memrope serve`` (model and execution options shared with ``memrope generate``;
    ``common`` carries the options every subcommand takes, such as ``-v``)."""
    from memrope.runtime.args import Formatter, add_execution_args, add_model_args
    from memrope.runtime.load import VAE_BACKENDS

    p = sub.add_parser("serve", parents=[common], formatter_class=Formatter, help="serve live video to browsers over WebRTC (many sessions, one model)",
                       description="Serve text-to-video live: each browser session gets its own cache and a "
                                   "WebRTC video track; one model worker runs every session block by block. "
                                   "Without model options it serves the embedded demo model (trained on a toy world of "
                                   "coloured shapes moving over plain backgrounds). "
                                   "With $MEMROPE_SERVE_API_KEY set, every /sessions request needs "
                                   "'Authorization: Bearer <key>' (the page takes it as /#key=<key>).")
    add_model_args(p)
    run = p.add_argument_group("run")
    run.add_argument("--config", type=Path, help="run YAML (the authors' format); default: the preset's demo run")
    run.add_argument("--model-dir", type=Path,
                     help="Wan2.1 folder: text encoder + tokenizer and VAE (and the DiT unless --checkpoint/--engine)")
    run.add_argument("--memory-dtype", choices=("cache", "float32"),
                     help="EMA memory accumulator (default cache dtype, as the authors)")
    add_execution_args(p)
    p.add_argument("--vae-backend", choices=VAE_BACKENDS, default="eager",
                   help="what decodes the sessions' frames: eager (the VAE in --model-dir) or the artifact's "
                        "vae_decode graph (--engine; onnxruntime, or tensorrt after `memrope build`)")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port; the URL is printed)")
    srv.add_argument("--max-sessions", type=int, default=4, help="sessions at once; past that HTTP 503")
    srv.add_argument("--queue-blocks", type=int, default=2,
                     help="decoded blocks a session may hold ahead of playout (paces generation; bounds lag)")
    srv.add_argument("--heartbeat-timeout", type=float, default=5.0,
                     help="seconds without a heartbeat before a session and its cache are freed")
    srv.add_argument("--connect-timeout", type=float, default=30.0,
                     help="seconds a session may run without its WebRTC video connected before it is freed")
    srv.add_argument("--stun", metavar="URL", help="STUN server for a server behind NAT (stun:HOST[:PORT]); "
                                                  "clients are told to use it too")
    srv.add_argument("--turn", metavar="URL",
                     help="TURN server (turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]) with the "
                          "credentials in $MEMROPE_SERVE_TURN_USERNAME and $MEMROPE_SERVE_TURN_CREDENTIAL; "
                          "clients are given them to relay through it")
    srv.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain (with --tls-key)")
    srv.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (with --tls-cert)")
    srv.add_argument("--retry-after", type=int, default=5, help="Retry-After seconds sent with a 503")
    srv.add_argument("--allowed-hosts", metavar="NAMES",
                     help="comma-separated host names (or addresses) the Host header of a request may name, "
                          "besides --host itself (and localhost, 127.0.0.1, ::1 for a loopback --host; any IP "
                          "address for 0.0.0.0 or ::); other requests get 400. Guards against DNS rebinding (a "
                          "web page on another site reaching this server through its own name); checked when no "
                          "API key is set, and always when this flag is given; '*' turns the check off")
    srv.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection has to send a request's line and headers (from connecting, or "
                          "from the next request's first byte); past that HTTP 408 and the connection closes")
    srv.add_argument("--body-timeout", type=float, default=30.0,
                     help="seconds a request's body may take to arrive after its headers; past that HTTP 408")
    srv.add_argument("--max-client-connections", type=int, default=32,
                     help="open HTTP connections per client address; the next gets HTTP 429 and is closed "
                          "(clients are TCP peers: X-Forwarded-For is not trusted, a reverse proxy is one client)")
    srv.add_argument("--sessions-per-minute", type=float, default=30.0,
                     help="new sessions a client address may start per minute, after a burst of "
                          "--session-burst (a token bucket); past that HTTP 429 with Retry-After; 0: no limit")
    srv.add_argument("--session-burst", type=int, default=10,
                     help="new sessions a client address may start at once before --sessions-per-minute applies")
    srv.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                     help="accept clients at once instead of running two blocks first")
    srv.add_argument("--prompt-recache", choices=("none", "recent", "all"), default="none",
                     help="what a prompt change re-caches when the session does not say: 'recent' re-encodes "
                          "the window's tail under the new prompt (LongLive's re-cache, one extra call); "
                          "anything but 'none' keeps the backend's recache graph loaded")
    ray = p.add_argument_group("cluster (Ray Serve; the 'cluster' extra)")
    ray.add_argument("--ray", action="store_true",
                     help="serve from engine replicas on a Ray Serve cluster: each replica is a whole server (model "
                          "worker, sessions, WebRTC media); one ingress answers the page and the API at --host:--port "
                          "and forwards each session's calls to the replica that owns it (docs/cluster.md)")
    ray.add_argument("--ray-address", metavar="ADDR",
                     help="the Ray cluster to join (HOST:PORT of its head, or 'auto' for the one `ray start` made "
                          "here); default: start a one-machine Ray for this command")
    ray.add_argument("--replicas", type=int,
                     help="a fixed count of engine replicas (default 2 without --max-replicas)")
    ray.add_argument("--min-replicas", type=int, default=1,
                     help="with --max-replicas: the fewest engine replicas kept (default 1)")
    ray.add_argument("--max-replicas", type=int,
                     help="autoscale on sessions: start engine replicas as sessions fill them, up to this many, and "
                          "remove idle ones, never one with a session (docs/cluster.md)")
    ray.add_argument("--spare-slots", type=int, default=1,
                     help="with --max-replicas: free session slots kept for the next viewers (default 1)")
    ray.add_argument("--scale-down-delay", type=float, default=30.0, metavar="S",
                     help="with --max-replicas: seconds fewer replicas must suffice before an idle one is removed "
                          "(default 30)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each engine replica reserves (default 1)")
    ray.add_argument("--replica-gpus", type=float,
                     help="GPUs each engine replica reserves (default 1 with --device cuda, else 0)")
    p.set_defaults(func=cmd_serve, no_decode=False)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from memrope.runtime.serve.options import API_KEY_ENV, TURN_CREDENTIAL_ENV, TURN_USERNAME_ENV, ServerOptions

    options = ServerOptions(host=args.host, port=args.port, max_sessions=args.max_sessions,
                            queue_blocks=args.queue_blocks, heartbeat_timeout_s=args.heartbeat_timeout,
                            connect_timeout_s=args.connect_timeout,
                            retry_after_s=args.retry_after, warm_up=args.warm_up,
                            prompt_recache=args.prompt_recache, api_key=os.environ.get(API_KEY_ENV) or None,
                            stun=args.stun, turn=args.turn, turn_username=os.environ.get(TURN_USERNAME_ENV) or None,
                            turn_credential=os.environ.get(TURN_CREDENTIAL_ENV) or None,
                            tls_cert=args.tls_cert, tls_key=args.tls_key,
                            allowed_hosts=None if args.allowed_hosts is None
                            else tuple(name.strip() for name in args.allowed_hosts.split(",") if name.strip()),
                            header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                            max_client_connections=args.max_client_connections,
                            sessions_per_minute=args.sessions_per_minute, session_burst=args.session_burst)
    options.check_tls()
    require_serve_packages()
    if args.ray:
        return _serve_cluster(args, options)
    from memrope.runtime.args import load_request
    from memrope.runtime.serve.app import listen, run_server
    from memrope.runtime.serve.model import load_serve_model

    request = load_request(args, recache=args.prompt_recache != "none")
    sock = listen(options)  # a taken port fails here, before the models load
    try:
        model = load_serve_model(request)
    except BaseException:
        sock.close()
        raise

    def ready(url: str) -> None:
        d = model.description
        width, height = model.frame_size
        print(f"memrope serve: {url} ({d['backend']} on {d['device']}, {width}x{height} at {model.fps} fps, "
              f"up to {options.max_sessions} sessions{', API key required' if options.api_key else ''})",
              flush=True)

    try:
        run_server(model, options, on_ready=ready, sock=sock)
    finally:
        model.close()
    return 0


def _serve_cluster(args: argparse.Namespace, options) -> int:
    """``memrope serve --ray``: the same server on Ray Serve (memrope.runtime.serve.cluster)."""
    import dataclasses

    from memrope.runtime.args import load_request
    from memrope.runtime.serve.app import listen

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise ImportError("memrope serve --ray needs Ray Serve: pip install 'memrope-engine[cluster]'")
    gpus = args.replica_gpus if args.replica_gpus is not None else (1.0 if str(args.device).startswith("cuda") else 0.0)
    from memrope.runtime.serve.cluster import ClusterOptions, run_cluster
    from memrope.runtime.serve.placement import ScaleOptions

    if args.max_replicas is None:
        replicas = 2 if args.replicas is None else args.replicas
        if replicas < 1:
            raise ValueError(f"--replicas must be a positive integer, got {replicas}")
        scale = ScaleOptions(min_replicas=replicas, max_replicas=replicas)
    elif args.replicas is not None:
        raise ValueError("--replicas is a fixed count and --max-replicas autoscales: give one of them")
    else:
        scale = ScaleOptions(min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                             spare_slots=args.spare_slots, scale_down_delay_s=args.scale_down_delay)
    cluster = ClusterOptions(address=args.ray_address, scale=scale, replica_cpus=args.replica_cpus, replica_gpus=gpus)
    with listen(options) as sock:  # a taken port fails here, before Ray starts; port 0 picks one
        options = dataclasses.replace(options, port=sock.getsockname()[1])
    request = load_request(args, recache=args.prompt_recache != "none")
    # Replicas may run on other machines, in other directories: every path is made absolute.
    request = dataclasses.replace(request, **{f.name: getattr(request, f.name).resolve()
                                             for f in dataclasses.fields(request)
                                             if isinstance(getattr(request, f.name), Path)})

    def ready(url: str) -> None:
        count = (f"{scale.min_replicas} to {scale.max_replicas} engine replicas, following the sessions"
                 if scale.autoscaling else f"{scale.min_replicas} engine replicas")
        print(f"memrope serve: {url} (Ray Serve: {count}, up to {options.max_sessions} "
              f"sessions each{', API key required' if options.api_key else ''})", flush=True)

    run_cluster(request, options, cluster, on_ready=ready)
    return 0
