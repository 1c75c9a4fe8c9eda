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
])
def test_bad_cluster_options_are_one_line_errors(flags, match, capsys):
    pytest.importorskip("ray.serve", reason="the cluster extra is not installed (pip install 'memrope-engine[cluster]')")
    assert main(["serve", "--ray", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


def test_session_ids_name_their_replica():
    pytest.importorskip("ray.serve", reason="the cluster extra is not installed (pip install 'memrope-engine[cluster]')")
    import secrets

    from memrope.runtime.serve.cluster import owner_of

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
