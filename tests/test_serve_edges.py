"""``memrope serve`` against hostile clients, on raw sockets and real HTTP on loopback: connections
that never finish a request's head or body are answered 408 and closed; a client address past its
open-connection cap gets 429 and is closed, other addresses are not; session creation is
rate-limited per client address (429 with Retry-After, then allowed again); an extra allowed Host
name is answered and others are refused. The real command in a child process on 127.0.0.1, with
short timeouts and small limits so every wait here is a few seconds."""

from __future__ import annotations

import http.client
import json
import math
import socket
import time

import pytest

pytest.importorskip("aiortc", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")

from memrope.runtime.serve.client import ServerProcess, http_json  # noqa: E402

PROMPT = "a small red boat on the blue sea at night"
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
CLIENT_CONNECTIONS = 6
SESSIONS_PER_MINUTE = 30  # one every 2 s once the burst is spent
SESSION_BURST = 3
ALLOWED_NAME = "video.example.org"
OTHER_CLIENT = "127.0.0.2"  # another loopback address: another client to the server


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--max-sessions", "2", "--header-timeout", str(HEADER_TIMEOUT_S),
                       "--body-timeout", str(BODY_TIMEOUT_S), "--max-client-connections", str(CLIENT_CONNECTIONS),
                       "--sessions-per-minute", str(SESSIONS_PER_MINUTE), "--session-burst", str(SESSION_BURST),
                       "--allowed-hosts", ALLOWED_NAME) as proc:
        yield proc


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(_address(url), timeout=10, source_address=(source, 0))


def _drain(socks: list[socket.socket], timeout_s: float) -> list[tuple[bytes, float | None]]:
    """What each socket received until the server closed it, and when (seconds from now; None if
    still open after ``timeout_s``). Closes them all."""
    import selectors

    start = time.monotonic()
    got: dict[socket.socket, bytes] = dict.fromkeys(socks, b"")
    closed_at: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(closed_at) < len(socks) and (left := start + timeout_s - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = key.fileobj
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    got[sock] += chunk
                else:
                    closed_at[sock] = time.monotonic() - start
                    selector.unregister(sock)
    for sock in socks:
        sock.close()
    return [(got[sock], closed_at.get(sock)) for sock in socks]


def _status_and_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    doc = json.loads(body)
    assert set(doc) == {"error"} and "\n" not in doc["error"], answer
    return int(head.split()[1]), doc["error"]


def _wait_refused(server, kind: str, at_least: int, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        if m[f'memrope_serve_requests_refused_total{{kind="{kind}"}}'] >= at_least or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_idle_connections_time_out_and_each_client_has_a_connection_cap(server):
    """Twenty connections from one address that send nothing, and one from another address: the
    first ``CLIENT_CONNECTIONS`` and the other address's are held until the header timeout (then
    408 and closed); the rest are refused at once with 429 and closed. Nothing stays open."""
    extra = 14
    socks = [_connect(server.url) for _ in range(CLIENT_CONNECTIONS + extra)] + [_connect(server.url, OTHER_CLIENT)]
    answers = _drain(socks, HEADER_TIMEOUT_S + 8)
    assert all(closed is not None for _, closed in answers), [closed for _, closed in answers]
    statuses = [_status_and_error(answer) for answer, _ in answers]
    refused = [(s, e, closed) for (s, e), (_, closed) in zip(statuses, answers, strict=True) if s == 429]
    timed_out = [(s, e, closed) for (s, e), (_, closed) in zip(statuses, answers, strict=True) if s == 408]
    assert len(refused) == extra and len(timed_out) == CLIENT_CONNECTIONS + 1, statuses
    assert statuses[-1][0] == 408  # the other address is not capped by this one's connections
    assert all(e.startswith(f"too many connections from 127.0.0.1: {CLIENT_CONNECTIONS} open, at most "
                            f"{CLIENT_CONNECTIONS} per client") and closed < HEADER_TIMEOUT_S for _, e, closed in refused)
    assert all(e.startswith(f"request head not received within {HEADER_TIMEOUT_S:g} s")
               and HEADER_TIMEOUT_S * 0.5 <= closed <= HEADER_TIMEOUT_S + 5 for _, e, closed in timed_out)
    m = _wait_refused(server, "header_timeout", CLIENT_CONNECTIONS + 1)
    assert m['memrope_serve_requests_refused_total{kind="header_timeout"}'] >= CLIENT_CONNECTIONS + 1
    assert m['memrope_serve_requests_refused_total{kind="too_many_connections"}'] >= extra
    assert server.get("/healthz")[0] == 200


def test_a_request_head_or_body_that_trickles_is_cut_off(server):
    """Half a request head, and a head whose announced body stops after 10 bytes: each gets a 408
    soon after its timeout and is closed, and the server keeps serving."""
    host, port = _address(server.url)
    head = _connect(server.url)
    head.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n".encode())
    body = _connect(server.url)
    body.sendall(f"POST /sessions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 100\r\n\r\n{{\"prompt\":".encode())
    (head_answer, head_closed), (body_answer, body_closed) = _drain([head, body], max(HEADER_TIMEOUT_S,
                                                                                      BODY_TIMEOUT_S) + 8)
    assert head_closed is not None and _status_and_error(head_answer)[0] == 408, head_answer
    assert HEADER_TIMEOUT_S * 0.5 <= head_closed <= HEADER_TIMEOUT_S + 5
    assert body_closed is not None, body_answer
    status, error = _status_and_error(body_answer)
    assert status == 408 and error.startswith(f"request body not received within {BODY_TIMEOUT_S:g} s"), error
    assert BODY_TIMEOUT_S * 0.5 <= body_closed <= BODY_TIMEOUT_S + 5
    m = _wait_refused(server, "body_timeout", 1)
    assert m['memrope_serve_requests_refused_total{kind="body_timeout"}'] >= 1
    assert server.get("/healthz")[0] == 200


def test_a_kept_alive_connection_is_not_cut_by_the_header_timeout(server):
    """The head deadline counts from a request's first byte, not across the idle wait between
    requests (that is the keep-alive's)."""
    host, port = _address(server.url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() and conn.sock is not None
        local = conn.sock.getsockname()
        time.sleep(HEADER_TIMEOUT_S * 2)
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200 and response.read()
        assert conn.sock is not None and conn.sock.getsockname() == local
    finally:
        conn.close()


def _get(url: str, path: str, host_header: str) -> tuple[int, dict]:
    host, port = _address(url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host_header)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_allowed_hosts_add_names_and_other_hosts_are_refused(server):
    _, port = _address(server.url)
    for name in (f"{ALLOWED_NAME}:{port}", f"{ALLOWED_NAME.upper()}.", f"localhost:{port}", f"127.0.0.1:{port}",
                 f"[::1]:{port}"):
        assert _get(server.url, "/healthz", name)[0] == 200, name
    status, doc = _get(server.url, "/healthz", f"rebound.attacker.example:{port}")
    assert status == 400 and doc["error"].startswith(f"Host 'rebound.attacker.example:{port}' is not a host this "
                                                     "server answers to (expected"), doc
    assert ALLOWED_NAME in doc["error"] and "--allowed-hosts" in doc["error"]


def _create(url: str, source: str = "127.0.0.1", prompt: str = PROMPT) -> tuple[int, dict, dict]:
    host, port = _address(url)
    conn = http.client.HTTPConnection(host, port, timeout=30, source_address=(source, 0))
    try:
        conn.request("POST", "/sessions", json.dumps({"prompt": prompt}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
    finally:
        conn.close()


def test_session_creation_is_rate_limited_per_client(server):
    """Every POST /sessions that passes the schema takes a token, a refused prompt too (it was
    tokenized): a burst of ``SESSION_BURST`` passes, the next is refused with 429 and a
    Retry-After, another address is not limited by it, and after the Retry-After one more passes."""
    answers = [_create(server.url, prompt="   ") for _ in range(SESSION_BURST + 1)]
    assert [a[0] for a in answers] == [422] * SESSION_BURST + [429], [a[::2] for a in answers]
    _, headers, doc = answers[-1]
    retry = int(headers["retry-after"])
    assert 1 <= retry <= math.ceil(60 / SESSIONS_PER_MINUTE)
    assert doc["error"] == (f"too many new sessions from 127.0.0.1: at most {SESSION_BURST} at once, then "
                            f"{SESSIONS_PER_MINUTE} a minute (--sessions-per-minute); retry in {retry} s"), doc
    other = _create(server.url, source=OTHER_CLIENT)
    time.sleep(retry)
    again = _create(server.url)
    for status, _, session in (other, again):
        assert status == 201, session
        assert http_json("DELETE", f"{server.url}/sessions/{session['id']}")[0] == 200
    m = server.metrics()
    assert m['memrope_serve_requests_refused_total{kind="rate_limited"}'] == 1


def test_a_full_server_refuses_before_the_rate_limit_spends_a_token(server):
    """A client retrying while the server is full gets 503s, not a 429 once its burst is spent, and
    is admitted at once when a slot frees: the capacity check comes before the rate limit."""
    filled = []
    for source in ("127.0.0.4", "127.0.0.5"):  # other clients take both slots (--max-sessions 2)
        status, _, session = _create(server.url, source=source)
        assert status == 201, session
        filled.append(session["id"])
    try:
        polite = [_create(server.url, source="127.0.0.3")[0] for _ in range(SESSION_BURST + 2)]
        assert polite == [503] * (SESSION_BURST + 2), polite
    finally:
        for session_id in filled:
            http_json("DELETE", f"{server.url}/sessions/{session_id}")
    status, _, session = _create(server.url, source="127.0.0.3")  # its burst is intact
    assert status == 201, session
    assert http_json("DELETE", f"{server.url}/sessions/{session['id']}")[0] == 200
