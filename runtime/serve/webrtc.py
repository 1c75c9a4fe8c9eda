"""WebRTC for one session (aiortc): the video track that plays the session's queue at the video
frame rate, and the answer to a client's offer.

Owns: :class:`SessionVideoTrack` (pulls frames from the session's bounded queue, paces them to
the frame rate, stamps them on a 90 kHz clock that follows wall time, so a stall shows as a
pause, not as a fast-forward) and :func:`answer_offer` (one peer connection per session: the
client's recvonly video transceiver gets the track, the client's data channel carries events
and heartbeats). Runs on the event loop. Does not own what the events say or when a session ends
(``memrope.runtime.serve.app``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from fractions import Fraction

from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from memrope.runtime.serve.session import Frame, Session, SessionEnded

VIDEO_CLOCK_HZ = 90_000  # RTP video clock


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
                       ice_servers: list[dict] = ()) -> RTCSessionDescription:
    """Accept the client's offer for ``session``; returns the answer (ICE candidates included, so
    the client needs no trickle). Raises ValueError for an offer this server cannot answer.
    ``ice_servers`` (browser format) are the server's STUN/TURN servers; with none, the answer
    has the host addresses only (aiortc would otherwise ask a public STUN server every time)."""
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
    await pc.setLocalDescription(await pc.createAnswer())
    return pc.localDescription
