"""WebRTC for one session (aiortc): the video track that plays the session's queue at the video
frame rate, and the answer to a client's offer.

Owns: :class:`SessionVideoTrack` (pulls frames from the session's bounded queue, paces them to
the frame rate, stamps them on a 90 kHz clock that follows wall time, so a stall shows as a
pause, not as a fast-forward) and :func:`answer_offer` (one peer connection per session: the
client's recvonly video transceiver gets the track, the client's data channel carries events
and heartbeats), with :func:`check_offer` (the offer's ICE candidates, DTLS fingerprints and ports
checked before aiortc sees them) and the host addresses the answer may offer (the interfaces the
operator bound the server to). Runs on the event loop. Does not own what the events say or when a session ends
(``memrope.runtime.serve.app``).
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import re
import time
from collections.abc import Callable
from fractions import Fraction

from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from memrope.runtime.serve.session import Frame, Session, SessionEnded

VIDEO_CLOCK_HZ = 90_000  # RTP video clock
# An offer is a few kB from one browser: a handful of candidates per network interface and
# transport, one or two media sections. More is not a browser's offer.
MAX_OFFER_CANDIDATES = 64
MAX_OFFER_MEDIA = 4
# DTLS fingerprint digest sizes in bytes (RFC 8122's hash names); aiortc verifies the sha-2 ones.
FINGERPRINT_BYTES = {"sha-1": 20, "sha-224": 28, "sha-256": 32, "sha-384": 48, "sha-512": 64}
VERIFIED_FINGERPRINTS = ("sha-256", "sha-384", "sha-512")
CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")
# An mDNS candidate name (draft-ietf-mmusic-mdns-ice-candidates), as browsers hide local addresses.
MDNS_NAME = re.compile(r"[A-Za-z0-9-]{1,63}\.local\.?")


def _port(text: str, low: int) -> bool:
    return text.isdigit() and low <= int(text) <= 65535


def _address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return MDNS_NAME.fullmatch(text) is not None
    return True


def _check_candidate(value: str) -> str | None:
    """What is wrong with one ``a=candidate:`` value (RFC 8839 grammar), or None."""
    bits = value.split()
    if len(bits) < 8 or bits[6] != "typ":
        return "expected 'FOUNDATION COMPONENT TRANSPORT PRIORITY ADDRESS PORT typ TYPE ...'"
    foundation, component, transport, priority, address, port, _, kind = bits[:8]
    if not re.fullmatch(r"[A-Za-z0-9+/]{1,32}", foundation):
        return f"foundation {foundation!r} is not 1 to 32 characters of [A-Za-z0-9+/]"
    if not (component.isdigit() and 1 <= int(component) <= 256):
        return f"component {component!r} is not an integer in [1, 256]"
    if transport.lower() not in ("udp", "tcp"):
        return f"transport {transport!r} is not udp or tcp"
    if not (priority.isdigit() and int(priority) < 2**32):
        return f"priority {priority!r} is not an integer in [0, 2**32)"
    if not _address(address):
        return f"address {address!r} is not an IP address or an mDNS .local name"
    if not _port(port, 1):
        return f"port {port!r} is not an integer in [1, 65535]"
    if kind not in CANDIDATE_TYPES:
        return f"type {kind!r} is not one of {', '.join(CANDIDATE_TYPES)}"
    extensions = bits[8:]
    if len(extensions) % 2:
        return "an extension attribute without a value"
    for name, extension in zip(extensions[::2], extensions[1::2], strict=True):
        if name == "raddr" and not _address(extension):
            return f"raddr {extension!r} is not an IP address or an mDNS .local name"
        if name == "rport" and not _port(extension, 0):
            return f"rport {extension!r} is not an integer in [0, 65535]"
        if name == "generation" and not extension.isdigit():
            return f"generation {extension!r} is not a non-negative integer"
    return None


def _check_fingerprint(value: str) -> str | None:
    """What is wrong with one ``a=fingerprint:`` value, or None."""
    bits = value.split()
    if len(bits) != 2:
        return "expected 'HASH XX:XX:...'"
    algorithm, digest = bits[0].lower(), bits[1]
    if algorithm not in FINGERPRINT_BYTES:
        return f"hash {bits[0]!r} is not one of {', '.join(FINGERPRINT_BYTES)}"
    size = FINGERPRINT_BYTES[algorithm]
    if not re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})*", digest) or len(digest) != 3 * size - 1:
        return f"the {algorithm} digest is not {size} colon-separated hex bytes (XX:XX:...)"
    return None


def check_offer(sdp: str) -> None:
    """Refuse, before aiortc parses it, an offer whose numbers aiortc would take on trust and fail
    on later, in a background task (a candidate on port 70000 reaches a datagram write as an
    OverflowError; a fingerprint of 'ZZ' fails the DTLS handshake once the session holds its slot).
    Raises ValueError naming the line and what was expected."""
    candidates = media = 0
    fingerprints: list[str] = []
    for number, line in enumerate(sdp.splitlines(), 1):
        line = line.strip()
        if line.startswith("m="):
            media += 1
            bits = line[2:].split()
            if media > MAX_OFFER_MEDIA:
                raise ValueError(f"the SDP offer has more than {MAX_OFFER_MEDIA} media sections; expected a "
                                 "video and a data channel section")
            if len(bits) < 3 or not _port(bits[1].split("/")[0], 0):
                raise ValueError(f"SDP line {number} {line[:80]!r}: expected 'm=MEDIA PORT PROTO FORMAT...' with a "
                                 "port in [0, 65535]")
        elif line.startswith("a=candidate:"):
            candidates += 1
            if candidates > MAX_OFFER_CANDIDATES:
                raise ValueError(f"the SDP offer has more than {MAX_OFFER_CANDIDATES} ICE candidates; a browser's "
                                 "offer has a few per network interface")
            problem = _check_candidate(line.removeprefix("a=candidate:"))
            if problem:
                raise ValueError(f"SDP line {number}: ICE candidate {line[:100]!r}: {problem}")
        elif line.startswith("a=fingerprint:"):
            problem = _check_fingerprint(line.removeprefix("a=fingerprint:"))
            if problem:
                raise ValueError(f"SDP line {number}: DTLS fingerprint {line[:100]!r}: {problem}")
            fingerprints.append(line.removeprefix("a=fingerprint:").split()[0].lower())
        elif line.startswith("a=sctp-port:") and not _port(line.removeprefix("a=sctp-port:").strip(), 1):
            raise ValueError(f"SDP line {number} {line[:80]!r}: the SCTP port must be an integer in [1, 65535]")
    if fingerprints and not any(f in VERIFIED_FINGERPRINTS for f in fingerprints):
        raise ValueError(f"the offer's DTLS fingerprints use {', '.join(sorted(set(fingerprints)))}; this server "
                         f"verifies {', '.join(VERIFIED_FINGERPRINTS)} (a browser sends sha-256)")


# The host addresses the answer offers (None: every interface, aioice's default). aioice reads
# them from one module-level function while a connection gathers; that runs inside
# setLocalDescription, in tasks that copy the caller's context, so a context variable scopes the
# choice to the answers made here and leaves any other aioice user in the process alone.
_HOST_ADDRESSES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "memrope_serve_ice_host_addresses", default=None)


def _restrict_ice_host_addresses() -> None:
    """Route aioice's host-address lookup through ``_HOST_ADDRESSES`` (once per process)."""
    import aioice.ice

    original = aioice.ice.get_host_addresses
    if getattr(original, "memrope_serve", False):
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        chosen = _HOST_ADDRESSES.get()
        if chosen is None:
            return original(use_ipv4, use_ipv6)
        return [a for a in chosen if (use_ipv4 if ipaddress.ip_address(a).version == 4 else use_ipv6)]

    get_host_addresses.memrope_serve = True
    aioice.ice.get_host_addresses = get_host_addresses


class SessionVideoTrack(MediaStreamTrack):
    """The session's frames, one per ``1 / fps`` at most; ``on_frame(frame, sent_at)`` sees each."""

    kind = "video"

    def __init__(self, session: Session, fps: int, on_frame: Callable[[Session, Frame, float], None]):
        super().__init__()
        self.session = session
        self._period_s = 1.0 / fps
        self._on_frame = on_frame
        self._start: float | None = None
        self._due = 0.0

    async def recv(self):
        import av

        try:
            frame = await self.session.next_frame()
        except SessionEnded:
            self.stop()
            raise MediaStreamError from None
        now = time.monotonic()
        if self._start is None:
            self._start = self._due = now
        if self._due > now:
            await asyncio.sleep(self._due - now)
            now = time.monotonic()
        self._due = max(self._due, now) + self._period_s
        video = av.VideoFrame.from_ndarray(frame.pixels, format="rgb24")
        video.pts = round((now - self._start) * VIDEO_CLOCK_HZ)
        video.time_base = Fraction(1, VIDEO_CLOCK_HZ)
        self._on_frame(self.session, frame, now)
        return video


async def answer_offer(session: Session, sdp: str, fps: int, *, on_frame: Callable[[Session, Frame, float], None],
                       on_channel: Callable[[Session], None], on_message: Callable[[Session, object], None],
                       on_closed: Callable[[Session, str], None],
                       ice_servers: list[dict] = (),
                       host_addresses: list[str] | None = None) -> RTCSessionDescription:
    """Accept the client's offer for ``session``; returns the answer (ICE candidates included, so
    the client needs no trickle). Raises ValueError for an offer this server cannot answer.
    ``ice_servers`` (browser format) are the server's STUN/TURN servers; with none, the answer
    has the host addresses only (aiortc would otherwise ask a public STUN server every time).
    ``host_addresses`` are the local addresses it gathers host candidates on (None: every
    interface but loopback, aioice's default): a server bound to loopback offers loopback only."""
    check_offer(sdp)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**server) for server in ice_servers]))
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as exc:  # noqa: BLE001 - aiortc raises several types for bad SDP
        await pc.close()
        raise ValueError(f"cannot parse the SDP offer: {exc}") from None
    if not any(t.kind == "video" for t in pc.getTransceivers()):
        await pc.close()
        raise ValueError("the offer has no video section: add a recvonly video transceiver before createOffer()")
    # aiortc accepts an offer without DTLS parameters, then fails in a background task when the
    # connection starts (a traceback in the log, a session stuck "connecting"): refuse it here.
    for media in SessionDescription.parse(sdp).media:
        if media.dtls is None or not media.dtls.fingerprints:
            await pc.close()
            raise ValueError(f"the offer's {media.kind} section has no DTLS fingerprint and setup role "
                             "(a=fingerprint, a=setup); a WebRTC offer carries both")

    @pc.on("datachannel")
    def _channel(channel) -> None:
        session.channel = channel
        channel.on("message", lambda message: on_message(session, message))
        if channel.readyState == "open":
            on_channel(session)
        else:
            channel.on("open", lambda: on_channel(session))

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState == "connected" and session.connected_at is None:
            session.connected_at = time.monotonic()
        if pc.connectionState in ("failed", "closed"):
            on_closed(session, f"client connection {pc.connectionState}")

    pc.addTrack(SessionVideoTrack(session, fps, on_frame))
    session.pc = pc
    _restrict_ice_host_addresses()
    scope = _HOST_ADDRESSES.set(None if host_addresses is None else tuple(host_addresses))
    try:
        await pc.setLocalDescription(await pc.createAnswer())  # gathers the candidates
    finally:
        _HOST_ADDRESSES.reset(scope)
    return pc.localDescription
