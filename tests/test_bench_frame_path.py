"""``memrope bench``'s frame path on the tiny preset: per-block DiT, VAE and end-to-end stages,
time to first frame with text encoding, the target ratios, the table and the plot panel. Values
are not asserted (speed is measured by benchmarks); counts and identities between them are."""

from __future__ import annotations

import math

import pytest

from memrope.runtime.bench import plot, print_table

E2E_BLOCKS = 2  # the fewest that have a steady state (block 0 is the first frames): tiny_bench_doc's


@pytest.fixture(scope="module")
def doc(tiny_bench_doc):
    assert tiny_bench_doc["meta"]["e2e_blocks"] == E2E_BLOCKS
    return tiny_bench_doc


def test_frame_path_stages(doc):
    by_name = {r["backend"]: r for r in doc["results"]}
    assert by_name["eager"]["frame_path"]["vae_backend"] == "eager"
    assert by_name["onnxruntime"]["frame_path"]["vae_backend"] == "onnxruntime"
    assert "vae_reference_ms_median" in by_name["eager"]["frame_path"]  # diffusers, eager worker only
    assert not by_name["tensorrt"]["available"]  # no GPU here: no frame path either
    for r in (by_name["eager"], by_name["onnxruntime"]):
        f = r["frame_path"]
        assert f["vae_ms_median"] > 0 and len(f["vae_block_ms"]) == E2E_BLOCKS - 1
        assert f["vae_cache_bytes"] > 0
        # One segment per mode (fewer blocks than a segment); its first block is not steady-state.
        assert (f["segment_blocks"], f["rounds"]) == (E2E_BLOCKS, 1)
        for label in ("serial", "overlap"):
            run = f[label]
            # Blocks of 3 latent frames: 1 + 4 * (3 * blocks - 1) video frames; one steady block.
            assert run["video_frames"] == 1 + 4 * (3 * E2E_BLOCKS - 1) and len(run["block_ms"]) == E2E_BLOCKS - 1
            assert all(math.isfinite(x) and x > 0 for x in run["block_ms"])
            assert run["video_fps"] == pytest.approx(12 / (run["block_ms_median"] / 1e3))
        t = f["ttff"]
        assert t["ttff_cold_ms"] == pytest.approx(t["text_cold_ms"] + t["first_frames_ms"])
        assert t["ttff_cached_ms"] == pytest.approx(t["text_cached_ms"] + t["first_frames_ms"])
        assert t["text_cached_ms"] < t["text_cold_ms"]  # a file read against loading an encoder
    targets = doc["frame_path_targets"]
    assert targets["onnxruntime_vae_vs_eager"] > 0
    assert set(targets["overlap_vs_max"]) == set(targets["overlap_vs_serial"]) == {"eager", "onnxruntime"}
    for name in ("eager", "onnxruntime"):
        serial = by_name[name]["frame_path"]["serial"]
        assert targets["overlap_vs_max"][name] == pytest.approx(
            by_name[name]["frame_path"]["overlap"]["block_ms_median"]
            / max(serial["dit_ms_median"], serial["vae_ms_median"]))
        # One round: the per-round ratio is the whole run's.
        ratio = targets["overlap_vs_max"][name]
        assert by_name[name]["frame_path"]["overlap_vs_max_by_round"] == [pytest.approx(ratio)]
        assert targets["overlap_vs_max_rounds"][name] == pytest.approx(
            {"min": ratio, "median": ratio, "max": ratio, "rounds": 1})


def test_table_and_plot(doc, tmp_path, capsys):
    print_table(doc)
    out = capsys.readouterr().out
    assert "e2e overlap ms" in out and "targets:" in out
    path = tmp_path / "frame_path.png"
    plot(doc, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
