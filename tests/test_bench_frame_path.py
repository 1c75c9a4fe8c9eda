"""``memrope bench``'s frame path on the tiny preset: per-block DiT, VAE and end-to-end stages,
time to first frame with text encoding, the target ratios, the table and the plot panel. Speeds
are not asserted (benchmarks measure them); what must hold between measured numbers is: frame
counts the writer saw, a serial block no shorter than its own DiT and decode, cold text
encoding slower than a cache read, per-round and whole-run ratios that agree."""

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
            assert run["dit_ms_median"] > 0 and run["vae_ms_median"] > 0
            # The rate is the frames the writer received per steady block (the first block writes
            # 1 + 4 * 2), over a steady block's measured time.
            per_block = (run["video_frames"] - (1 + 4 * 2)) / len(run["block_ms"])
            assert run["video_fps"] == pytest.approx(per_block / (run["block_ms_median"] / 1e3))
        # Serial: a steady block's arrival-to-arrival time holds its DiT calls and then its
        # decode, each timed on its own (one steady block: the medians are that block's).
        serial = f["serial"]
        assert serial["block_ms"][0] >= serial["dit_ms_median"] + serial["vae_ms_median"], serial
        t = f["ttff"]
        assert t["first_frames_ms"] == serial["first_frames_ms"]  # the serial run's first block
        assert t["text_cached_ms"] < t["text_cold_ms"]  # a file read against loading an encoder
        assert t["first_frames_ms"] < t["ttff_cached_ms"] < t["ttff_cold_ms"]
    targets = doc["frame_path_targets"]
    assert targets["onnxruntime_vae_vs_eager"] > 0
    assert set(targets["overlap_vs_max"]) == set(targets["overlap_vs_serial"]) == {"eager", "onnxruntime"}
    for name in ("eager", "onnxruntime"):
        # Serial DiT + VAE can be no faster than the two stages' sum (see above).
        assert targets["serial_vs_sum"][name] >= 1
        # One round: the per-round ratio (from the round's own series) is the whole run's.
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
