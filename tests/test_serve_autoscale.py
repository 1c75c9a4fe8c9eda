"""``memrope serve --ray --min-replicas 1 --max-replicas 2`` on a real two-node Ray cluster on
127.0.0.1: the engine replica count follows the sessions.

One replica at first. Two sessions fill it (2 slots each, one spare slot kept), so a second replica
starts, on the other node, and the next session is placed there. Then the first replica's sessions
stop: fewer replicas suffice, and after the scale-down delay the idle replica is removed, the older
one, while the replica that still has a session keeps it, its viewer receiving frames throughout.
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("aiortc", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")
pytest.importorskip("ray.serve", reason="the cluster extra is not installed (pip install 'memrope-engine[cluster]')")

from memrope.runtime.serve.client import ServerProcess, Viewer  # noqa: E402

pytestmark = pytest.mark.slow  # a cluster test: CI's slow step, one test at a time

PROMPTS = ("a red ball bouncing on a blue background", "a green square moving left on a white background",
           "a yellow triangle drifting right on a black background")


def _engines(server) -> list[dict]:
    return server.get("/healthz")[2].get("engine_replicas", [])


async def _until(server, condition, timeout_s: float, what: str) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        engines = await asyncio.to_thread(_engines, server)
        if condition(engines):
            return engines
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s:g} s: {engines}")


def test_replicas_follow_the_sessions_and_only_an_idle_one_is_removed(ray_cluster):
    with ServerProcess("--ray", "--ray-address", ray_cluster.address, "--min-replicas", "1", "--max-replicas", "2",
                       "--max-sessions", "2", "--spare-slots", "1", "--scale-down-delay", "3",
                       "--heartbeat-timeout", "5", "--sessions-per-minute", "0", start_timeout_s=300,
                       stop_timeout_s=60) as server:
        async def run() -> dict:
            seen: dict = {"first": await asyncio.to_thread(_engines, server)}
            first, second, third = (Viewer(server.url, heartbeat_s=0.5) for _ in range(3))
            try:
                for viewer, prompt in ((first, PROMPTS[0]), (second, PROMPTS[1])):
                    await viewer.start(prompt)
                    await viewer.wait_frames(4, 120)
                seen["full_owners"] = [first.id.split(".")[0], second.id.split(".")[0]]
                seen["grown"] = await _until(server, lambda e: sum(bool(r.get("healthy")) for r in e) == 2, 180,
                                             "a second replica answering")
                await third.start(PROMPTS[2])
                await third.wait_frames(4, 120)
                seen["third_owner"] = third.id.split(".")[0]
                seen["metrics_grown"] = server.metrics()

                await first.close()
                await second.close()
                frames = third.frames
                seen["shrunk"] = await _until(server, lambda e: len(e) == 1, 60, "back to one replica")
                await third.wait_frames(frames + 32, 30)  # played on through the removal
                seen["third_ended"] = third.ended_reason
                seen["third_status"] = await third.status()
                seen["metrics_shrunk"] = server.metrics()
                return seen
            finally:
                for viewer in (first, second, third):
                    await viewer.close()

        seen = asyncio.run(asyncio.wait_for(run(), 600))
        log = "".join(server.output)

    (start,) = seen["first"]
    assert start["healthy"] and start["sessions"] == 0, seen["first"]
    # Both sessions on the one replica; full, so a second one started, on the other node.
    assert seen["full_owners"] == [start["replica"]] * 2, seen
    grown = {r["replica"]: r for r in seen["grown"]}
    assert len(grown) == 2 and len({r["node"] for r in grown.values()}) == 2, seen["grown"]
    (added,) = set(grown) - {start["replica"]}
    assert seen["third_owner"] == added  # the most free slots
    assert seen["metrics_grown"]["memrope_cluster_engines"] == 2
    assert seen["metrics_grown"]["memrope_cluster_sessions"] == 3

    # The idle replica went (the older one); the one with a session stayed, and its session with it.
    (kept,) = seen["shrunk"]
    assert kept["replica"] == added and kept["sessions"] == 1, seen["shrunk"]
    assert seen["third_ended"] is None and seen["third_status"]["state"] != "ended", seen["third_status"]
    assert seen["metrics_shrunk"]["memrope_cluster_engines"] == 1
    assert f"engine replica {start['engine']} drained with no session: removing it" in log, log[-3000:]
