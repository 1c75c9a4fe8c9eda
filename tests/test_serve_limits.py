"""The server's edge limits without a server: the new ``memrope serve`` flags refused in one line
naming the flag, what the Host check accepts for each kind of bind, the session-rate token bucket
on a clock the test moves, and the offer checks accepting what browsers send (mDNS names, TCP
candidates, srflx with a hidden related address) while naming what is wrong otherwise."""

from __future__ import annotations

import pytest

from memrope.runtime.serve.options import ServerOptions, host_of

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")


@pytest.mark.parametrize("field, value, message", [
    ("allowed_hosts", ("bad host",), "--allowed-hosts: 'bad host' is not a host name or IP address"),
    ("allowed_hosts", "example.org", "--allowed-hosts must be a list of host names"),
    ("header_timeout_s", 0, "--header-timeout must be a positive number, got 0"),
    ("body_timeout_s", -1.0, "--body-timeout must be a positive number, got -1.0"),
    ("max_client_connections", 0, "--max-client-connections must be an integer >= 1, got 0"),
    ("sessions_per_minute", -1.0, "--sessions-per-minute must be a number >= 0 (0: no limit), got -1.0"),
    ("sessions_per_minute", float("nan"), "--sessions-per-minute must be a number >= 0"),
    ("session_burst", 0, "--session-burst must be an integer >= 1, got 0"),
])
def test_bad_edge_limits_are_refused_naming_the_flag(field, value, message):
    with pytest.raises(ValueError) as error:
        ServerOptions(**{field: value})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_host_check_follows_the_bind_and_the_allowed_names():
    loopback = ServerOptions(host="127.0.0.1")
    assert loopback.host_check() == (frozenset({"127.0.0.1", "::1", "localhost"}), False)
    assert loopback.bound_addresses() == ["127.0.0.1"]
    assert ServerOptions(host="localhost").bound_addresses() == ["127.0.0.1", "::1"]
    lan = ServerOptions(host="192.0.2.2", allowed_hosts=("Video.Example.org.",))
    assert lan.host_check() == (frozenset({"192.0.2.2", "video.example.org"}), False)
    everywhere = ServerOptions(host="0.0.0.0")
    names, any_ip = everywhere.host_check()
    assert any_ip and "localhost" in names and everywhere.bound_addresses() is None
    # With an API key the key is the guard, unless names are given; '*' turns the check off.
    assert ServerOptions(api_key="k" * 16).host_check() is None
    assert ServerOptions(api_key="k" * 16, allowed_hosts=("a.example",)).host_check() is not None
    assert ServerOptions(allowed_hosts=("*",)).host_check() is None
    for header, host in (("a.example:80", "a.example"), ("[::1]:8000", "::1"), ("::1", "::1"),
                         ("LOCALHOST.", "localhost"), ("[0:0::1]", "::1")):
        assert host_of(header) == host, header


def test_the_session_rate_is_a_token_bucket_per_client():
    from memrope.runtime.serve.app import SessionRateLimit

    now = [100.0]
    limit = SessionRateLimit(per_minute=30, burst=2, clock=lambda: now[0])
    assert [limit.take("a"), limit.take("a")] == [0.0, 0.0]
    assert limit.take("a") == pytest.approx(2.0)  # one token every 2 s
    assert limit.take("b") == 0.0  # another client has its own bucket
    now[0] += 1.0
    assert limit.take("a") == pytest.approx(1.0)
    now[0] += 1.0
    assert limit.take("a") == 0.0
    assert SessionRateLimit(per_minute=0, burst=1).take("a") == 0.0  # no limit


BROWSER_CANDIDATES = [
    # Chromium hides local addresses behind mDNS names; Firefox; a TCP active candidate; srflx.
    "a=candidate:3172538321 1 udp 2113937151 6a5c4f6e-1d2b-4c3a-9e8f-0123456789ab.local 54400 typ host "
    "generation 0 network-cost 999",
    "a=candidate:0 1 UDP 2122252543 192.168.1.2 52312 typ host",
    "a=candidate:2 1 tcp 1518280447 192.168.1.2 9 typ host tcptype active generation 0",
    "a=candidate:842163049 1 udp 1677729535 203.0.113.7 61000 typ srflx raddr 0.0.0.0 rport 0 generation 0",
    "a=candidate:1 1 udp 2122262783 fd00::2 40000 typ host",
]
FINGERPRINT = "a=fingerprint:sha-256 " + ":".join(["AB"] * 32)


def _offer(*lines: str) -> str:
    return "\r\n".join(["v=0", "m=video 9 UDP/TLS/RTP/SAVPF 96", *lines, FINGERPRINT, "a=setup:actpass", ""])


def test_offer_checks_accept_browser_candidates():
    pytest.importorskip("aiortc", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")
    from memrope.runtime.serve.webrtc import check_offer

    check_offer(_offer(*BROWSER_CANDIDATES))


@pytest.mark.parametrize("line, message", [
    ("a=candidate:1 1 udp 2122262783 10.0.0.1 65536 typ host", "port '65536' is not an integer in [1, 65535]"),
    ("a=candidate:1 1 udp 2122262783 10.0.0.1 5000", "expected 'FOUNDATION COMPONENT TRANSPORT PRIORITY ADDRESS"),
    ("a=candidate:1 1 sctp 2122262783 10.0.0.1 5000 typ host", "transport 'sctp' is not udp or tcp"),
    ("a=candidate:1 0 udp 2122262783 10.0.0.1 5000 typ host", "component '0' is not an integer in [1, 256]"),
    ("a=candidate:1 1 udp 4294967296 10.0.0.1 5000 typ host", "priority '4294967296' is not"),
    ("a=candidate:1 1 udp 1 10.0.0.1 5000 typ host raddr", "an extension attribute without a value"),
    ("a=fingerprint:sha-256 AB:CD", "the sha-256 digest is not 32 colon-separated hex bytes"),
    ("a=fingerprint:sha-1 " + ":".join(["AB"] * 20), "this server verifies sha-256, sha-384, sha-512"),
    ("m=application 70000 UDP/DTLS/SCTP webrtc-datachannel", "with a port in [0, 65535]"),
])
def test_offer_checks_name_what_is_wrong(line, message):
    pytest.importorskip("aiortc", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")
    from memrope.runtime.serve.webrtc import check_offer

    sdp = _offer(line)
    if line.startswith("a=fingerprint:"):
        sdp = sdp.replace(FINGERPRINT + "\r\n", "")
    with pytest.raises(ValueError) as error:
        check_offer(sdp)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
