"""Options of the server and of one session, validated where they are made.

Owns: :class:`ServerOptions` (the ``memrope serve`` flags that are not about the model) and
:class:`SessionOptions` (what a client may choose per session). Both are frozen dataclasses that
raise ``ValueError`` naming the field, the value and the rule. Does not own the HTTP request
schema (``memrope.runtime.serve.app`` maps request bodies onto these) or the model's run config (one
per server: every session shares the worker's pipeline, so the cache layout, latent size and
sampler are the server's, not the session's).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field

MEMORY_ON_PROMPT_CHANGE = ("keep", "reset")
RECACHE_ON_PROMPT_CHANGE = ("none", "recent", "all")
MAX_QUEUE_BLOCKS = 16
MAX_TRANSITION_BLOCKS = 64
# Idle HTTP keep-alive, in seconds. A client should drop an idle pooled connection before the
# server does: otherwise a request sent as the server closes the connection is reset (ECONNRESET),
# which uvicorn's default 5 s made likely for a viewer whose only REST call after the offer is a
# stop some seconds later. The Python viewer pools for 15 s (aiohttp's default, stated here);
# browsers keep idle sockets longer but resend a request whose reused connection was reset. A
# proxy in front of the server should time idle connections out in less than SERVER_KEEPALIVE_S.
SERVER_KEEPALIVE_S = 75
CLIENT_KEEPALIVE_S = 15.0
# The environment variable holding the API key (not a flag: a flag's value is in every process list).
API_KEY_ENV = "MEMROPE_SERVE_API_KEY"
MIN_API_KEY_CHARS = 16
# ICE servers for a server behind NAT: one STUN and one TURN server (what aiortc uses), shared with
# the clients in the session so both ends gather the same kinds of candidates. TURN credentials
# come from the environment, as the API key does.
STUN_URL = re.compile(r"stun:[^\s?:/@\[\]]+(:\d{1,5})?")
TURN_URL = re.compile(r"(turn:[^\s?:/@\[\]]+(:\d{1,5})?(\?transport=(udp|tcp))?|turns:[^\s?:/@\[\]]+(:\d{1,5})?(\?transport=tcp)?)")
TURN_USERNAME_ENV = "MEMROPE_SERVE_TURN_USERNAME"
TURN_CREDENTIAL_ENV = "MEMROPE_SERVE_TURN_CREDENTIAL"
# Names a loopback-bound server answers to besides its --host (a browser on the same machine).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# A host name as a Host header carries it (RFC 1123 labels), for --allowed-hosts.
HOST_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def host_of(header: str) -> str:
    """The host part of a Host header (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``),
    lower-case, without a trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        host = header[1:header.index("]")] if "]" in header else header[1:]
    elif header.count(":") == 1:
        host = header.split(":")[0]
    else:
        host = header  # a bare IPv6 address, or a name
    return normal_host(host)


def normal_host(host: str) -> str:
    """A host name lower-case without a trailing dot, an IP address in its standard form."""
    ip = _ip(host)
    return str(ip) if ip is not None else host.strip().lower().rstrip(".")


def _int_in(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {rule}, got {value!r}")


def _positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ServerOptions:
    """How the server admits, paces and frees sessions.

    host/port: where HTTP listens (port 0: a free port, printed at start).
    max_sessions: sessions admitted at once; past that, HTTP 503 with ``Retry-After``.
    queue_blocks: decoded blocks a session may hold ahead of playout (default for sessions that
      do not choose): generation pauses for a session whose queue is full, so a slow or absent
      viewer never grows memory; lag is at most about this many blocks of video.
    heartbeat_timeout_s: a session that has not been heard from for this long is freed.
    connect_timeout_s: a session whose video connection (WebRTC) is not up this long after it
      started running is freed, heartbeats or not: a client that never connects holds no slot.
    retry_after_s: the ``Retry-After`` a refused client is given.
    warm_up: run two blocks and their decode before accepting clients, so the first session
      does not pay for kernel selection and allocator warm-up.
    prompt_recache: what a prompt change re-caches for sessions that do not choose (``none``,
      ``recent``, ``all``); anything but ``none`` keeps the backend's recache graph loaded.
    api_key: when set, every ``/sessions`` request must carry ``Authorization: Bearer <api_key>``
      (the page, ``/healthz`` and ``/metrics`` stay open); from ``$MEMROPE_SERVE_API_KEY``.
    stun / turn: a STUN URL (``stun:HOST[:PORT]``) and a TURN URL (``turn:HOST[:PORT][?transport=
      udp|tcp]`` or ``turns:...``) for the server and its clients; without them the server offers
      its host addresses only, enough on a LAN or with a public address, not behind NAT.
    turn_username / turn_credential: the TURN server's long-term credentials (from
      ``$MEMROPE_SERVE_TURN_USERNAME`` and ``$MEMROPE_SERVE_TURN_CREDENTIAL``).
    tls_cert / tls_key: PEM certificate chain and private key: serve HTTPS (both or neither).
    allowed_hosts: host names a request's ``Host`` header may name besides the defaults (the
      --host address; for a loopback --host also ``localhost``, ``127.0.0.1``, ``::1``; for
      0.0.0.0 or ``::`` any IP address): a DNS-rebinding guard, checked when no API key is set
      and always once names are given; ``("*",)`` turns the check off.
    header_timeout_s / body_timeout_s: a connection must deliver a request's head within
      ``header_timeout_s`` of opening (or of its first byte after an idle keep-alive), and its
      body within ``body_timeout_s`` of the head; otherwise 408 and the connection is closed.
    max_client_connections: open HTTP connections per remote address; past that the new
      connection gets a 429 and is closed.
    sessions_per_minute / session_burst: session creation per remote address, as a token
      bucket of ``session_burst`` tokens refilled at ``sessions_per_minute``; past it, 429 with
      ``Retry-After``. 0 sessions per minute: no limit.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_sessions: int = 4
    queue_blocks: int = 2
    heartbeat_timeout_s: float = 5.0
    connect_timeout_s: float = 30.0
    retry_after_s: int = 5
    warm_up: bool = True
    prompt_recache: str = "none"
    api_key: str | None = field(default=None, repr=False)  # never printed
    stun: str | None = None
    turn: str | None = None
    turn_username: str | None = None
    turn_credential: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_client_connections: int = 32
    sessions_per_minute: float = 30.0
    session_burst: int = 10

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def check_tls(self) -> None:
        """Load the certificate and key once (cheap; before the models load): ValueError naming
        the files if they are missing, unreadable or do not match."""
        if self.tls_cert is None:
            return
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (exc.reason or exc)
            raise ValueError(f"cannot load the TLS certificate {self.tls_cert} with key {self.tls_key}: {reason} "
                             "(expected PEM files, the key matching the certificate)") from None

    def ice_servers(self) -> list[dict]:
        """The ICE servers as a browser's ``RTCPeerConnection`` takes them (``urls``, and for TURN
        ``username`` and ``credential``)."""
        servers = [{"urls": self.stun}] if self.stun else []
        if self.turn:
            servers.append({"urls": self.turn, "username": self.turn_username, "credential": self.turn_credential})
        return servers

    @property
    def binds_all(self) -> bool:
        """Bound to every interface (0.0.0.0, ``::`` or an empty host)."""
        ip = _ip(self.host)
        return self.host == "" or (ip is not None and ip.is_unspecified)

    @property
    def binds_loopback(self) -> bool:
        ip = _ip(self.host)
        return self.host.lower() == "localhost" or (ip is not None and ip.is_loopback)

    def bound_addresses(self) -> list[str] | None:
        """The IP addresses --host names (None: every interface), in the order the resolver
        gives them. A name is resolved once, here."""
        if self.binds_all:
            return None
        if self.binds_loopback and _ip(self.host) is None:
            return ["127.0.0.1", "::1"]
        ip = _ip(self.host)
        if ip is not None:
            return [str(ip)]
        try:
            infos = socket.getaddrinfo(self.host, None, proto=socket.IPPROTO_UDP)
        except OSError as exc:
            raise ValueError(f"--host {self.host!r} does not resolve: {exc.strerror or exc}") from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def host_check(self) -> tuple[frozenset[str], bool] | None:
        """What the ``Host`` header may name: ``(names, any_ip)``, or None when it is not checked
        (an API key is set and no --allowed-hosts given, or --allowed-hosts is ``*``)."""
        if self.allowed_hosts is not None and "*" in self.allowed_hosts:
            return None
        if self.api_key and self.allowed_hosts is None:
            return None
        names = {normal_host(name) for name in self.allowed_hosts or ()}
        names.add(normal_host(self.host))
        if self.binds_loopback or self.binds_all:
            names.update(normal_host(name) for name in LOOPBACK_NAMES)
        if self.binds_all:
            names.add(socket.gethostname().lower())
        names.discard("")
        return frozenset(names), self.binds_all

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"--host must be a host name or address, got {self.host!r}")
        if self.allowed_hosts is not None:
            if isinstance(self.allowed_hosts, str) or not all(isinstance(h, str) for h in self.allowed_hosts):
                raise ValueError(f"--allowed-hosts must be a list of host names, got {self.allowed_hosts!r}")
            for name in self.allowed_hosts:
                if name != "*" and _ip(name) is None and not HOST_NAME.fullmatch(name.lower().rstrip(".")):
                    raise ValueError(f"--allowed-hosts: {name!r} is not a host name or IP address (expected "
                                     "comma-separated names such as video.example.org,10.0.0.5, or *)")
        _positive_number("--header-timeout", self.header_timeout_s)
        _positive_number("--body-timeout", self.body_timeout_s)
        _int_in("--max-client-connections", self.max_client_connections, 1)
        if isinstance(self.sessions_per_minute, bool) or not isinstance(self.sessions_per_minute, (int, float)) \
                or not self.sessions_per_minute >= 0 or self.sessions_per_minute == float("inf"):
            raise ValueError(f"--sessions-per-minute must be a number >= 0 (0: no limit), "
                             f"got {self.sessions_per_minute!r}")
        _int_in("--session-burst", self.session_burst, 1)
        _int_in("--port", self.port, 0, 65535)
        _int_in("--max-sessions", self.max_sessions, 1)
        if self.prompt_recache not in RECACHE_ON_PROMPT_CHANGE:
            raise ValueError(f"--prompt-recache must be one of {RECACHE_ON_PROMPT_CHANGE}, got {self.prompt_recache!r}")
        _int_in("--queue-blocks", self.queue_blocks, 1, MAX_QUEUE_BLOCKS)
        _positive_number("--heartbeat-timeout", self.heartbeat_timeout_s)
        _positive_number("--connect-timeout", self.connect_timeout_s)
        _int_in("--retry-after", self.retry_after_s, 1)
        key = self.api_key
        if key is not None and (not isinstance(key, str) or len(key) < MIN_API_KEY_CHARS
                                or not all(33 <= ord(c) <= 126 for c in key)):
            raise ValueError(f"${API_KEY_ENV} must be at least {MIN_API_KEY_CHARS} printable ASCII characters "
                             "without spaces (make one with: python -c 'import secrets; "
                             "print(secrets.token_urlsafe(24))')")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: the certificate chain and its private key (PEM)")
        if self.stun is not None and not STUN_URL.fullmatch(self.stun):
            raise ValueError(f"--stun must be stun:HOST[:PORT] (e.g. stun:stun.example.org:3478), got {self.stun!r}")
        if self.turn is not None:
            if not TURN_URL.fullmatch(self.turn):
                raise ValueError(f"--turn must be turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT], "
                                 f"got {self.turn!r}")
            if not self.turn_username or not self.turn_credential:
                raise ValueError(f"--turn needs the TURN server's credentials in ${TURN_USERNAME_ENV} and "
                                 f"${TURN_CREDENTIAL_ENV}")


@dataclass(frozen=True)
class SessionOptions:
    """What one client chose for its session.

    seed: the session's noise seed (block-by-block seeded noise, constant memory).
    queue_blocks: this session's playout queue, in blocks (see :class:`ServerOptions`).
    flush_on_prompt_change: drop the old prompt's queued frames when a new prompt takes effect,
      so the viewer sees the new prompt one block later instead of a queue later.
    memory_on_prompt_change: ``keep`` or ``reset`` the EMA memory when the prompt changes.
    recache_on_prompt_change: re-encode the window under the new prompt (``recent``, ``all``) or
      not (``none``); see :meth:`memrope.pipeline.BlockStream.set_prompt`.
    transition_blocks: blend old and new prompt over this many blocks (0: switch at once).
    """

    seed: int = 0
    queue_blocks: int = 2
    flush_on_prompt_change: bool = True
    memory_on_prompt_change: str = "keep"
    transition_blocks: int = 0
    recache_on_prompt_change: str = "none"

    def __post_init__(self) -> None:
        _int_in("seed", self.seed, 0, 2**63 - 1)
        _int_in("queue_blocks", self.queue_blocks, 1, MAX_QUEUE_BLOCKS)
        if not isinstance(self.flush_on_prompt_change, bool):
            raise ValueError(f"flush_on_prompt_change must be true or false, got {self.flush_on_prompt_change!r}")
        if self.memory_on_prompt_change not in MEMORY_ON_PROMPT_CHANGE:
            raise ValueError(f"memory_on_prompt_change must be one of {MEMORY_ON_PROMPT_CHANGE}, "
                             f"got {self.memory_on_prompt_change!r}")
        _int_in("transition_blocks", self.transition_blocks, 0, MAX_TRANSITION_BLOCKS)
        if self.recache_on_prompt_change not in RECACHE_ON_PROMPT_CHANGE:
            raise ValueError(f"recache_on_prompt_change must be one of {RECACHE_ON_PROMPT_CHANGE}, "
                             f"got {self.recache_on_prompt_change!r}")
