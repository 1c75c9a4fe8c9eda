"""``memrope serve --ray`` on a real two-node Ray cluster on 127.0.0.1 (``ray start`` twice): two
engine replicas of the demo model, one per node, behind the ingress.

Six aiortc viewers spread three and three over the replicas; a prompt change reaches the
replica that owns the session (its own per-session state and its block events say so); a
seventh session past capacity gets a 503 with Retry-After; the metrics count the placements and
the refusal. Then one replica process is killed while every viewer watches: its viewers learn
that their session ended, and why, within 10 s; the other replica's viewers keep receiving
frames; Ray starts a replacement, and a session placed once it is healthy plays.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

pytest.importorskip("aiortc", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")
pytest.importorskip("ray.serve", reason="the cluster extra is not installed (pip install 'memrope-engine[cluster]')")

from memrope.runtime.serve.client import ServeError, ServerProcess, SessionEnded, Viewer  # noqa: E402

pytestmark = pytest.mark.slow  # a cluster test: CI's slow step, one test at a time

PROMPTS = ("a red ball bouncing on a blue background", "a green square moving left on a white background",
           "a yellow triangle drifting right on a black background")
NEW_PROMPT = "a blue ball moving up on a yellow background"


@pytest.fixture(scope="module")
def cluster_server(ray_cluster):
    with ServerProcess("--ray", "--ray-address", ray_cluster, "--replicas", "2", "--max-sessions", "3",
                       "--heartbeat-timeout", "5", "--sessions-per-minute", "0", start_timeout_s=300,
                       stop_timeout_s=60) as proc:
        yield proc


def _replicas(server) -> dict[str, dict]:
    status, _, health = server.get("/healthz")
    return {r["replica"]: r for r in health.get("engine_replicas", []) if r.get("healthy")}


def test_sessions_spread_follow_their_replica_and_survive_another_replicas_death(cluster_server):
    server = cluster_server
    replicas = _replicas(server)
    assert len(replicas) == 2, replicas
    assert len({r["node"] for r in replicas.values()}) == 2, f"both replicas on one node: {replicas}"

    async def run() -> dict:
        seen: dict = {}
        viewers = [Viewer(server.url, heartbeat_s=0.5) for _ in range(6)]
        try:
            for i, viewer in enumerate(viewers):
                await viewer.start(PROMPTS[i % len(PROMPTS)])
            await asyncio.gather(*(v.wait_frames(8, 120) for v in viewers))
            seen["owners"] = [v.id.split(".")[0] for v in viewers]

            # A prompt change reaches the owner: its per-session state and its blocks.
            target = viewers[0]
            seen["change"] = await target.change_prompt(NEW_PROMPT)
            seen["target_status"] = await target.status()
            seen["new_block"] = await target.wait_event(
                lambda e: e.get("type") == "block" and e.get("prompt_version") == 1, 60, "a block of the new prompt")
            seen["other_status"] = await viewers[1].status()
            listing = await target.request("GET", "/sessions")
            seen["listing"] = {s["id"]: s for s in listing["sessions"]}

            # Past capacity: 503 with Retry-After.
            extra = Viewer(server.url)
            try:
                await extra.create(PROMPTS[0])
                seen["seventh"] = None
            except ServeError as exc:
                seen["seventh"] = (exc.status, exc.message, exc.retry_after)
            finally:
                await extra.close()
            seen["metrics_before"] = server.metrics()

            # Kill the replica that owns viewer 0, while everyone watches.
            victim = seen["owners"][0]
            pid = _replicas(server)[victim]["pid"]
            doomed = [v for v, owner in zip(viewers, seen["owners"], strict=True) if owner == victim]
            spared = [v for v, owner in zip(viewers, seen["owners"], strict=True) if owner != victim]
            spared_frames = [v.frames for v in spared]
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)

            async def ended(viewer: Viewer) -> tuple[float, str]:
                try:
                    await viewer.wait_for(lambda: False, 10, "the session to end")
                except SessionEnded as exc:
                    return time.monotonic() - killed_at, exc.reason
                raise AssertionError("unreachable")
            seen["ended"] = await asyncio.gather(*(ended(v) for v in doomed))
            await asyncio.gather(*(v.wait_frames(n + 16, 30) for v, n in zip(spared, spared_frames, strict=True)))
            seen["spared_ended"] = [v.ended_reason for v in spared]
            seen["victim"] = victim

            # Ray restarts the replica; once healthy, a new session on it plays.
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                fresh = await asyncio.to_thread(_replicas, server)
                if len(fresh) == 2 and victim not in fresh:
                    break
                await asyncio.sleep(1)
            seen["after_restart"] = fresh
            newcomer = Viewer(server.url)
            viewers.append(newcomer)
            await newcomer.start(PROMPTS[1])
            await newcomer.wait_frames(8, 120)
            seen["newcomer_owner"] = newcomer.id.split(".")[0]
            seen["metrics_after"] = server.metrics()
            return seen
        finally:
            for viewer in viewers:
                await viewer.close()

    seen = asyncio.run(asyncio.wait_for(run(), 600))

    owners = seen["owners"]
    assert sorted(owners.count(r) for r in set(owners)) == [3, 3], f"sessions not spread evenly: {owners}"
    assert set(owners) == set(replicas)

    # The owner applied the change: its own state for the session, and its blocks.
    assert seen["change"]["prompt_version"] == 1
    assert seen["target_status"]["prompt"] == NEW_PROMPT
    assert seen["target_status"]["prompt_version"] == 1
    assert seen["new_block"]["block"] >= seen["change"]["applies_at_block"]
    assert seen["other_status"]["prompt"] == PROMPTS[1] and seen["other_status"]["prompt_version"] == 0
    assert len(seen["listing"]) == 6

    status, message, retry_after = seen["seventh"]
    assert status == 503 and "cluster full" in message and retry_after and int(retry_after) > 0, seen["seventh"]
    before = seen["metrics_before"]
    assert before["memrope_cluster_sessions"] == 6
    assert before['memrope_cluster_sessions_refused_total{kind="full"}'] == 1
    assert sum(before[f'memrope_cluster_placements_total{{replica="{r}"}}'] for r in replicas) == 6
    for replica in replicas:
        assert before[f'memrope_serve_sessions{{replica="{replica}"}}'] == 3

    # The killed replica's viewers were told, within 10 s, and why; the others did not notice.
    assert len(seen["ended"]) == 3
    for after_s, reason in seen["ended"]:
        assert after_s <= 10, seen["ended"]
        assert f"engine replica {seen['victim']} stopped" in reason, reason
    assert seen["spared_ended"] == [None, None, None]

    assert len(seen["after_restart"]) == 2 and seen["victim"] not in seen["after_restart"]
    assert seen["newcomer_owner"] in seen["after_restart"]
    after = seen["metrics_after"]
    assert after["memrope_cluster_replicas"] == 2
    assert after['memrope_cluster_calls_lost_total{kind="replica_gone"}'] >= 3
