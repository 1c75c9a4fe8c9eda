"""``memrope serve`` on a network: a STUN server for a server behind NAT (a real STUN server on
loopback that maps the server to another address) and HTTPS with a certificate (a self-signed
one made here). The real command in a child process on 127.0.0.1, Python aiortc viewers."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("aiortc", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")

from memrope.runtime.serve.client import ServerProcess, Viewer, http_json  # noqa: E402

PROMPT = "a small red boat on the blue sea at night"



class StunServer:
    """A STUN server on 127.0.0.1 (RFC 5389 binding requests, aioice's codec) that answers as if
    behind a NAT: every client is mapped to ``MAPPED_HOST`` (a documentation address)."""

    MAPPED_HOST = "203.0.113.7"

    def __init__(self):
        import threading

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        from aioice import stun

        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except OSError:
                continue
            try:
                request = stun.parse_message(data)
            except ValueError:
                continue
            if request.message_method == stun.Method.BINDING and request.message_class == stun.Class.REQUEST:
                self.requests += 1
                response = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                                        transaction_id=request.transaction_id)
                response.attributes["XOR-MAPPED-ADDRESS"] = (self.MAPPED_HOST, addr[1])
                self.sock.sendto(bytes(response), addr)

    def __enter__(self) -> StunServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_a_stun_server_is_used_by_the_server_and_given_to_clients():
    """``--stun``: the server gathers its NAT-mapped (server-reflexive) address from the STUN
    server and offers it in its answer, and clients get the same ICE servers in the session."""
    with StunServer() as stun_server, ServerProcess("--max-sessions", "1", "--stun",
                                                    f"stun:127.0.0.1:{stun_server.port}") as proc:
        async def watch() -> tuple[dict, str, int]:
            async with Viewer(proc.url) as viewer:
                session = await viewer.start(PROMPT)
                frames = await viewer.wait_frames(6, 90)
                answer = viewer.pc.remoteDescription.sdp
                await viewer.stop()
                return session, answer, frames

        session, answer, frames = asyncio.run(asyncio.wait_for(watch(), 180))
    assert session["ice_servers"] == [{"urls": f"stun:127.0.0.1:{stun_server.port}"}]
    srflx = [line for line in answer.splitlines() if "typ srflx" in line]
    assert srflx and all(StunServer.MAPPED_HOST in line for line in srflx), answer
    assert stun_server.requests >= 2  # the server's gathering and the viewer's
    assert frames >= 6  # and the video still plays over the host candidates


def _self_signed(folder) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files in ``folder``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("where", ["one process", pytest.param("ray cluster", marks=pytest.mark.slow)])
def test_https_with_a_certificate(where, tmp_path, request):
    """``--tls-cert/--tls-key``: the server speaks HTTPS (the URL it prints says so); a viewer that
    trusts the certificate plays; the watching client with ``--cafile`` runs, and without it fails
    at once naming the certificate problem. On a Ray cluster (``--ray``, the slow step), Ray's
    HTTP proxy serves the certificate."""
    import ssl

    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(cafile=cert)
    cluster = () if where == "one process" else (
        "--ray", "--ray-address", request.getfixturevalue("ray_cluster").address, "--replicas", "1")
    with ServerProcess(*cluster, "--max-sessions", "1", "--tls-cert", cert, "--tls-key", key,
                       start_timeout_s=300) as proc:
        assert proc.url.startswith("https://127.0.0.1:")
        assert http_json("GET", proc.url + "/healthz", ssl_context=context)[0] == 200

        async def watch() -> int:
            async with Viewer(proc.url, ssl_context=context) as viewer:
                await viewer.start(PROMPT)
                frames = await viewer.wait_frames(6, 90)
                await viewer.stop()
                return frames

        assert asyncio.run(asyncio.wait_for(watch(), 180)) >= 6
        client = [sys.executable, "-m", "memrope.runtime.serve.client", proc.url, "--seconds", "1", "--wait", "30"]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        trusted = subprocess.run([*client, "--cafile", cert], capture_output=True, text=True, timeout=120, cwd=root)
        assert trusted.returncode == 0 and '"session"' in trusted.stdout, trusted.stderr
        started = time.monotonic()
        untrusted = subprocess.run(client, capture_output=True, text=True, timeout=120, cwd=root)
        assert untrusted.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr
        assert time.monotonic() - started < 25 and len(untrusted.stderr.strip().splitlines()) == 1
