"""bench/gpu_check.py, the GPU check anyone with a CUDA machine runs, runs its sections on the CPU (--smoke):
the plumbing is checked here, so a lease is not spent finding a broken argument.

The compiled sections are left out (torch.compile takes minutes on two cores); they run the same
code as the eager ones with another backend name. The smoke run is a benchmark run (about a minute
here), so it is in CI's slow step.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_runs_the_sections_and_records_each(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out),
                           "--only", "gpu_tests,bench_eager,bf16_error"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["environment"]["torch"] and doc["preset"] == "tiny" and doc["device"] == "cpu"
    sections = doc["sections"]
    assert set(sections) == {"gpu_tests", "bench_eager", "bf16_error"}
    assert sections["gpu_tests"]["rc"] == 0  # collected; on this machine every gpu test skips
    assert any("skipped" in line for line in sections["gpu_tests"]["output"])

    bench = sections["bench_eager"]
    assert bench["rc"] == 0
    (eager,) = bench["results"]
    assert eager["backend"] == "eager" and eager["available"] and eager["block_ms_median"] > 0
    assert 0 < bench["frame_path_targets"]["overlap_vs_max"]["eager"] < 10
    assert json.loads((out / "bench_eager.json").read_text())["meta"]["dtype"] == "bfloat16"
    assert (out / "bench_eager.png").stat().st_size > 0

    error = sections["bf16_error"]
    assert error["rc"] == 0 and error["all_finite"]
    assert len(error["rel_l2_by_block"]) == error["blocks"] == 3
    # bf16 keeps about 3 significant digits: the first block's error is rounding, not zero (the two
    # runs really differ in dtype) and far from 1 (they really share weights, prompt and noise).
    assert all(math.isfinite(e) for e in error["rel_l2_by_block"])
    assert 1e-4 < error["rel_l2_first_block"] < 0.1

    # Six files at most: a small, fixed set of results.
    assert sorted(p.name for p in out.iterdir()) == ["bench_eager.json", "bench_eager.png", "gpu_check.json",
                                                     "gpu_check.log"]
    assert proc.stdout.splitlines()[-1].startswith("bf16_error: rc 0")  # the summary, last


def test_an_unknown_section_is_refused_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path / "o"),
                           "--only", "bench_eager,warp_drive"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown sections ['warp_drive']" in proc.stderr
    assert not (tmp_path / "o").exists()
