"""The parts of ``memrope serve --ray`` that need no cluster: the one-process server imports no
Ray; bad cluster options are one-line errors before anything starts; session ids name their
replica and nothing else parses as one; the cluster's ``/metrics`` merges real replica
expositions (made by the one-process server's own registry) with a replica label and totals."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("prometheus_client", reason="the serve extra is not installed (pip install 'memrope-engine[serve]')")

from memrope.runtime.cli import main  # noqa: E402


def test_one_process_serving_imports_no_ray():
    code = ("import sys, memrope.runtime.serve, memrope.runtime.serve.app, memrope.runtime.serve.client; "
            "loaded = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; "
            "assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("flags", "match"), [
    (["--replicas", "0"], "--replicas must be a positive integer, got 0"),
    (["--replica-cpus", "-1"], "--replica-cpus and --replica-gpus must be >= 0"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--max-replicas (2) must be at least --min-replicas (3)"),
    (["--replicas", "2", "--max-replicas", "3"], "--replicas is a fixed count and --max-replicas autoscales"),
    (["--max-replicas", "3", "--spare-slots", "-1"], "--spare-slots must be an integer >= 0, got -1"),
    (["--max-replicas", "3", "--scale-down-delay", "-5"], "--scale-down-delay must be >= 0 seconds, got -5"),
])
def test_bad_cluster_options_are_one_line_errors(flags, match, capsys):
    pytest.importorskip("ray.serve", reason="the cluster extra is not installed (pip install 'memrope-engine[cluster]')")
    assert main(["serve", "--ray", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


def test_session_ids_name_their_replica():
    import secrets

    from memrope.runtime.serve.placement import owner_of

    token = secrets.token_urlsafe(16)
    assert owner_of(f"ab12cd34.{token}") == "ab12cd34"
    for bad in (token, f".{token}", "ab12cd34.", "ab12cd34.short", f"a/b.{token}", f"ab12cd34.{token}/x", ""):
        assert owner_of(bad) is None, bad


def test_cluster_metrics_label_each_replica_and_add_totals():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from memrope.runtime.serve.metrics import ServeStats, cluster_metrics, make_registry

    reports = []
    for name, blocks in (("aaaa1111", [0.2, 0.4]), ("bbbb2222", [0.6])):
        stats = ServeStats()
        stats.sessions = lambda: []
        for seconds in blocks:
            stats.record_block(seconds)
        text = generate_latest(make_registry(stats, max_sessions=3)).decode()
        reports.append({"replica": name, "node": "n", "sessions": len(blocks), "max_sessions": 3,
                        "blocks_per_second": stats.blocks_per_second(), "block_seconds": stats.block_seconds(),
                        "metrics": text})
    reports.append({"replica": "cccc3333", "error": "ActorDiedError: the actor died"})  # not answering
    edge = ServeStats()
    edge.count_refused("bad_host")
    text = cluster_metrics(reports, {"aaaa1111": 2, "bbbb2222": 1}, {"full": 1, "rate_limited": 0},
                           {"replica_gone": 4, "replica_timeout": 0}, edge).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("memrope_serve_blocks_total", (("replica", "aaaa1111"),))] == 2
    assert samples[("memrope_serve_blocks_total", (("replica", "bbbb2222"),))] == 1
    assert samples[("memrope_cluster_engines", ())] == 3
    assert samples[("memrope_cluster_replicas", ())] == 2
    assert samples[("memrope_cluster_sessions", ())] == 3
    assert samples[("memrope_cluster_max_sessions", ())] == 6
    assert samples[("memrope_cluster_block_latency_seconds", (("quantile", "0.5"),))] == pytest.approx(0.4)
    assert samples[("memrope_cluster_placements_total", (("replica", "aaaa1111"),))] == 2
    assert samples[("memrope_cluster_sessions_refused_total", (("kind", "full"),))] == 1
    assert samples[("memrope_cluster_calls_lost_total", (("kind", "replica_gone"),))] == 4
    assert samples[("memrope_cluster_requests_refused_total", (("kind", "bad_host"),))] == 1
    # Every replica's process metrics, told apart by the label.
    assert {dict(labels)["replica"] for name, labels in samples if name == "process_resident_memory_bytes"} == {
        "aaaa1111", "bbbb2222"}


def _report(engine: str, sessions: int, *, at: float = 0.0, draining: bool = False, max_sessions: int = 3):
    from memrope.runtime.serve.placement import EngineReport

    return EngineReport(engine, f"r{engine}", max_sessions, tuple(f"r{engine}.s{i}" for i in range(sessions)), at,
                        draining)


def test_placement_ranks_by_free_slots_counting_creates_the_reports_do_not_show_yet():
    import time

    from memrope.runtime.serve.placement import Placement

    placement = Placement()
    reports = [_report("e0", 1), _report("e1", 0), _report("e2", 0, draining=True)]
    assert [r.engine for r in placement.ranked(reports)] == ["e1", "e0"]  # a draining replica gets nothing
    placement.sending("t1", "e1")  # in flight: e1 has 2 free now, as e0; a tie goes to the engine named first
    assert [placement.free_slots(r) for r in reports[:2]] == [2, 2]
    assert placement.ranked(reports)[0].engine == "e0"
    placement.answered("t1", "e1", "re1.new")  # created after e1's report: still counted
    assert placement.free_slots(reports[1]) == 2
    placement.sending("t2", "e0")
    placement.answered("t2", "e0", None)  # refused: nothing counted
    assert placement.free_slots(reports[0]) == 2
    newer = _report("e1", 0, at=time.time() + 1)  # a later report no longer lists it (the session ended)
    assert placement.free_slots(newer) == 3
    assert [r.engine for r in placement.ranked(reports, exclude={"e0"})] == ["e1"]


def test_scale_policy_follows_the_sessions_and_removes_only_idle_replicas():
    from memrope.runtime.serve.placement import EngineState, ScaleOptions, ScalePolicy

    policy = ScalePolicy(ScaleOptions(min_replicas=1, max_replicas=3, spare_slots=1, scale_down_delay_s=10),
                         max_sessions=2)

    def engines(*sessions):
        return [EngineState(f"e{i}", n) for i, n in enumerate(sessions)]

    assert policy.decide(engines(0), 0) == (0, [])
    assert policy.decide(engines(1), 1) == (0, [])  # 1 session + 1 spare slot fit one replica
    assert policy.decide(engines(2), 2) == (1, [])  # full: one more
    assert policy.decide(engines(2, None), 3) == (0, [])  # starting: counted, not idle
    assert policy.decide(engines(2, 2, 2), 4) == (0, [])  # at max_replicas
    assert policy.decide([], 5) == (1, [])  # none left (min_replicas)
    # Fewer suffice (1 session: one replica), for the delay without a break; only idle ones go,
    # the newest first, never the one with a session.
    assert policy.decide(engines(0, 1, 0), 10) == (0, [])
    assert policy.decide(engines(0, 1, 0), 19.9) == (0, [])
    assert policy.decide(engines(0, 1, 0), 20) == (0, ["e2", "e0"])
    policy.removed(20)
    assert policy.decide(engines(0, 1, 2), 21) == (0, [])  # more again: the clock restarts
    assert policy.decide(engines(1, 1, 1), 40) == (0, [])  # 3 sessions want 2, but none is idle
    assert policy.decide(engines(1, 1, 1), 60) == (0, [])
    assert policy.decide(engines(None, 0, 0), 80) == (0, [])  # one not answering: nothing is removed
    assert policy.decide(engines(None, 0, 0), 100) == (0, [])
    assert policy.decide(engines(0, 0, 0), 101) == (0, [])  # answering again: the delay starts over
    assert policy.decide(engines(0, 0, 0), 111) == (0, ["e2", "e1"])
    fixed = ScalePolicy(ScaleOptions(min_replicas=2, max_replicas=2), max_sessions=2)
    assert fixed.decide(engines(0, 0), 0) == (0, []) and fixed.decide(engines(2, 2), 1) == (0, [])
