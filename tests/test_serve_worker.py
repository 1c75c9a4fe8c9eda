"""The model worker and the server in this process (so the test can reach inside): round-robin
is fair and a full queue stops generation; released sessions leave no stream alive; a session
whose generation fails (real NaN noise through the real DiT, caught by
``BlockResult.check_finite``) ends alone with a message while the others keep playing and new
sessions still start; a stall of the server's own event loop is not blamed on clients whose
heartbeats wait in the socket backlog; a session whose video never connects is freed."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("aiortc", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")

from memrope.runtime.serve.client import Viewer  # noqa: E402
from memrope.runtime.serve.metrics import ServeStats  # noqa: E402
from memrope.runtime.serve.options import ServerOptions, SessionOptions  # noqa: E402
from memrope.runtime.serve.session import RUNNING, Session  # noqa: E402
from memrope.runtime.serve.worker import ModelWorker  # noqa: E402
from memrope.sampler import NoiseSource  # noqa: E402

PROMPT = "a small red boat on the blue sea at night"


@pytest.fixture(scope="module")
def model():
    from memrope.runtime.load import LoadRequest
    from memrope.runtime.serve.model import load_serve_model

    served = load_serve_model(LoadRequest())
    yield served
    served.close()


class NaNNoise(NoiseSource):
    """Noise that is all NaN: what a numerical blow-up looks like to the loop."""

    def draw(self, block: int, out: torch.Tensor) -> None:
        out.fill_(float("nan"))


def test_round_robin_is_fair_and_a_full_queue_stops_generation(model):
    loop = asyncio.new_event_loop()  # never run: the sessions' wake-ups just queue up
    failures: list[str] = []
    stats = ServeStats()
    worker = ModelWorker(model, stats, on_failure=lambda session, message: failures.append(message))
    worker.start()
    try:
        queue_blocks = 3
        sessions = [Session(f"s{i}", PROMPT, SessionOptions(seed=i, queue_blocks=queue_blocks), loop)
                    for i in range(3)]
        embeds = model.text.encode(PROMPT)
        for session in sessions:
            assert worker.open(session, embeds).result(60) is True
            assert session.state == RUNNING
        spreads, deadline = [], time.monotonic() + 120
        while any(s.blocks_generated < queue_blocks for s in sessions) and time.monotonic() < deadline:
            counts = [s.blocks_generated for s in sessions]
            spreads.append(max(counts) - min(counts))
            time.sleep(0.02)
        assert [s.blocks_generated for s in sessions] == [queue_blocks] * 3
        # Every session had its turn before any had a second: the spread never exceeds one block
        # (sessions opened while the first already ran account for the rest).
        assert max(spreads[len(spreads) // 3:]) <= 1, spreads
        # Nobody reads: the worker stays idle instead of growing the queues.
        blocks = stats.blocks
        time.sleep(1.0)
        assert stats.blocks == blocks == 3 * queue_blocks
        assert len(stats.live_streams) == 3 and stats.cache_bytes == 3 * sessions[0].cache_bytes > 0
        for session in sessions:
            session.set_state("ended", "test over")
            worker.release(session).result(30)
        assert stats.cache_bytes == 0 and all(s.stream is None and s.decode is None for s in sessions)
        assert len(stats.live_streams) == 0  # no reference to any session's stream survives
        assert failures == []
    finally:
        worker.close()
        loop.close()
    assert not worker.alive


class InProcessServer:
    """``create_app`` under uvicorn on a thread of this process, on 127.0.0.1."""

    def __init__(self, model, options: ServerOptions):
        import uvicorn

        from memrope.runtime.serve.app import create_app, uvicorn_config

        self.app = create_app(model, options)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._uvicorn = uvicorn.Server(uvicorn_config(self.app))
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> InProcessServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._uvicorn.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(30)


def test_a_failing_session_ends_alone_with_a_message(model):
    with InProcessServer(model, ServerOptions(max_sessions=2, heartbeat_timeout_s=10)) as srv:
        server = srv.app.state.server

        async def scenario() -> dict:
            a, b, c = Viewer(srv.url), Viewer(srv.url), Viewer(srv.url)
            try:
                await asyncio.gather(a.start(PROMPT, seed=1), b.start(PROMPT, seed=2))
                await asyncio.gather(a.wait_frames(12, 90), b.wait_frames(12, 90))
                doomed = server.sessions[a.id]
                # From its next noise draw on, session a's latents are NaN (between blocks, on the
                # worker thread, as every touch of a stream is).
                await asyncio.wrap_future(server.worker.submit(lambda: setattr(doomed.stream, "noise", NaNNoise())))
                ended = await a.wait_event(lambda e: e.get("type") == "ended", 60, "session a to fail")
                frames_b = b.frames
                await b.wait_frames(frames_b + 12, 60)  # b kept playing
                status_a = await b.request("GET", f"/sessions/{a.id}")
                await c.start(PROMPT, seed=3)  # the freed slot takes a new session
                await c.wait_frames(5, 90)
                live = len(server.stats.live_streams)
                await asyncio.gather(b.stop(), c.stop())
                return dict(ended=ended, status_a=status_a, live=live, failed=server.stats.sessions_failed)
            finally:
                await asyncio.gather(a.close(), b.close(), c.close())

        seen = asyncio.run(asyncio.wait_for(scenario(), 300))
        deadline = time.monotonic() + 10
        while (server.sessions or len(server.stats.live_streams)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server.sessions and len(server.stats.live_streams) == 0
    reason = seen["ended"]["reason"]
    assert reason.startswith("error: NonFiniteError: block ") and "NaN or Inf" in reason, reason
    assert seen["status_a"]["state"] == "ended" and seen["status_a"]["reason"] == reason
    assert seen["failed"] == 1
    assert seen["live"] == 2  # b and c; a's stream is gone


def test_sessions_decode_with_the_exported_vae_and_release_its_bindings(demo_artifact):
    """``memrope serve --engine ART --backend onnxruntime --vae-backend onnxruntime``: a session's
    frames come from the artifact's vae_decode graph (equal to the eager decode within one level),
    a real WebRTC session plays them, and an ended session leaves no binding in the shared backend."""
    from memrope.runtime.load import LoadRequest
    from memrope.runtime.serve.model import close_decoder, load_serve_model
    from memrope.runtime.vae import StreamingVAEDecoder

    demo, art = demo_artifact
    served = load_serve_model(LoadRequest(engine=art, backend="onnxruntime", vae_backend="onnxruntime",
                                          model_dir=demo))
    try:
        assert served.description["vae_backend"] == "onnxruntime" and served.description["backend"] == "onnxruntime"
        latents = torch.randn(1, 6, 16, 8, 12, generator=torch.Generator().manual_seed(5))
        expected = StreamingVAEDecoder.from_model_dir(demo).decode(latents)[0]
        decode = served.open_decoder()
        got = [torch.from_numpy(decode(latents[:, i:i + 3])) for i in (0, 3)]
        assert [g.shape[0] for g in got] == [9, 12]  # the video's first block drops its padding frames
        assert (torch.cat(got).int() - expected.int()).abs().max() <= 1
        assert len(served.vae._bindings) == 2
        close_decoder(decode)
        assert len(served.vae._bindings) == 0

        with InProcessServer(served, ServerOptions(max_sessions=1, heartbeat_timeout_s=10)) as srv:
            server = srv.app.state.server

            async def scenario() -> int:
                async with Viewer(srv.url) as viewer:
                    await viewer.start(PROMPT, seed=1)
                    await viewer.wait_frames(21, 90)  # past the first block: steady-state decode steps
                    bound = len(served.vae._bindings)
                    await viewer.stop()
                    return bound

            bound = asyncio.run(asyncio.wait_for(scenario(), 180))
            deadline = time.monotonic() + 10
            while (server.sessions or served.vae._bindings) and time.monotonic() < deadline:
                time.sleep(0.1)
        assert bound == 2 and not server.sessions and len(served.vae._bindings) == 0
    finally:
        served.close()


def test_a_stalled_event_loop_is_not_blamed_on_the_clients(model):
    """The server's own event loop stops for twice the heartbeat timeout (a long call on it). A
    client kept sending heartbeats (REST, every 0.5 s), which wait in the socket backlog meanwhile;
    when the loop resumes, the reaper must not end the session before it has read them. A client
    that falls silent is still freed afterwards."""
    from memrope.runtime.serve.client import http_json

    with InProcessServer(model, ServerOptions(max_sessions=2, heartbeat_timeout_s=2)) as srv:
        server = srv.app.state.server
        status, _, session = http_json("POST", srv.url + "/sessions", {"prompt": PROMPT})
        assert status == 201
        sid, beating = session["id"], threading.Event()
        beating.set()

        def heartbeats() -> None:
            deadline = time.monotonic() + 60
            while beating.is_set() and time.monotonic() < deadline:
                http_json("POST", f"{srv.url}/sessions/{sid}/heartbeat", timeout_s=20)
                time.sleep(0.5)

        client = threading.Thread(target=heartbeats, daemon=True)
        client.start()
        time.sleep(1.0)
        server.loop.call_soon_threadsafe(time.sleep, 4.0)  # the stall, on the server's loop
        time.sleep(6.0)
        after_stall = server.sessions[sid].state if sid in server.sessions else server.ended[sid]["reason"]
        beating.clear()
        client.join(30)
        deadline = time.monotonic() + 15
        while sid in server.sessions and time.monotonic() < deadline:
            time.sleep(0.2)
    assert after_stall == RUNNING
    assert server.ended[sid]["reason"] == "no heartbeat for 2 s"


def test_a_session_whose_video_never_connects_is_freed(model):
    """A client creates a session and keeps it alive with REST heartbeats but never offers: past
    the connect timeout its slot is freed. A viewer that connected plays on past that timeout."""
    from memrope.runtime.serve.client import http_json

    connect_timeout_s = 5.0
    with InProcessServer(model, ServerOptions(max_sessions=2, heartbeat_timeout_s=10,
                                              connect_timeout_s=connect_timeout_s)) as srv:
        server = srv.app.state.server

        async def scenario() -> tuple[str, dict, int]:
            async with Viewer(srv.url) as viewer:
                await viewer.start(PROMPT, seed=1)
                await viewer.wait_frames(1, 60)  # its video is connected
                created = time.monotonic()
                status, _, silent = await asyncio.to_thread(http_json, "POST", srv.url + "/sessions", {"prompt": PROMPT})
                assert status == 201
                deadline = time.monotonic() + 4 * connect_timeout_s
                while silent["id"] in server.sessions and time.monotonic() < deadline:
                    await asyncio.to_thread(http_json, "POST", f"{srv.url}/sessions/{silent['id']}/heartbeat")
                    await asyncio.sleep(0.3)
                ended_after = time.monotonic() - created
                frames = viewer.frames
                await viewer.wait_frames(frames + 6, 60)  # the connected viewer plays on
                state = (await viewer.status())["state"]
                await viewer.stop()
                return state, server.ended.get(silent["id"], {}), ended_after

        state, silent_ended, ended_after = asyncio.run(asyncio.wait_for(scenario(), 180))
    assert state == RUNNING
    assert silent_ended.get("reason", "").startswith(f"no video connection within {connect_timeout_s:g} s"), silent_ended
    assert ended_after >= connect_timeout_s
    assert server.stats.sessions_ended["connect_timeout"] == 1 and server.stats.sessions_ended["stopped"] == 1
