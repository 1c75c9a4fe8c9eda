"""``memrope bench`` on the tiny preset: the JSON schema, finite and mutually consistent numbers,
the plot, skipped backends with reasons, and the work model against the real module. Values are
not asserted (speed is measured by benchmarks, not tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memrope.cache import CacheLayout
from memrope.config import VAE_TEMPORAL_STRIDE, CacheConfig, model_preset
from memrope.model import WanCausalDiT
from runtime.bench import BENCH_PRESETS, run_bench, work_per_call
from runtime.cli import main

REQUIRED = ("call_ms_median", "block_ms_median", "first_block_ms", "latent_fps", "video_fps", "host_overhead_pct",
            "peak_host_mb", "flatness", "block_ms")


@pytest.fixture(scope="module")
def doc():
    return run_bench(BENCH_PRESETS["tiny"], ["eager", "onnxruntime", "tensorrt"], blocks=8, warmup_blocks=1)


def test_schema_and_consistency(doc):
    meta = doc["meta"]
    assert meta["machine"]["cores"] and meta["versions"]["torch"] and meta["date"]
    by_name = {r["backend"]: r for r in doc["results"]}
    assert not by_name["tensorrt"]["available"] and "GPU" in by_name["tensorrt"]["skipped_reason"]
    for name in ("eager", "onnxruntime"):
        r = by_name[name]
        assert r["available"]
        for key in REQUIRED:
            assert key in r, key
        scalars = [r[k] for k in REQUIRED if k != "block_ms"] + r["block_ms"]
        assert all(math.isfinite(v) and v >= 0 for v in scalars)
        assert len(r["block_ms"]) == 8 and all(len(c) == 5 for c in r["call_ms"])
        assert r["first_block_ms"] == r["block_ms"][0]
        assert r["latent_fps"] == pytest.approx(3 / (r["block_ms_median"] / 1e3))
        assert r["video_fps"] == pytest.approx(VAE_TEMPORAL_STRIDE * r["latent_fps"])
        assert r["call_ms_p90"] >= r["call_ms_median"] > 0
        # Calls happen inside blocks: five calls can never take longer than their block.
        for block, calls in zip(r["block_ms"], r["call_ms"]):
            assert sum(calls) <= block
        assert r["host_overhead_pct"] == pytest.approx(100 * r["host_overhead_ms_per_call"] / r["call_ms_median"])
        assert set(r["stage_ms_median"]) == {"step0", "step1", "step2", "step3", "context"}
        assert r["achieved_tflops"] == pytest.approx(r["work_per_call"]["flops"] / (r["call_ms_median"] / 1e3) / 1e12)


def test_work_model_counts_the_real_linear_layers():
    cfg = model_preset("tiny")
    layout = CacheLayout.build(CacheConfig(), 6)
    work = work_per_call(cfg, layout, 4)
    with torch.device("meta"):
        dit = WanCausalDiT(cfg)
    per_call = 0
    for block in dit.blocks:
        for lin in (block.self_attn.q, block.self_attn.k, block.self_attn.v, block.self_attn.o,
                    block.cross_attn.q, block.cross_attn.o, block.ffn[0], block.ffn[2]):
            per_call += lin.weight.numel()
    assert work["linear_flops"] == 2 * layout.block_tokens * per_call
    keys = layout.context_tokens + layout.block_tokens
    assert work["attention_flops"] == cfg.num_layers * 4 * layout.block_tokens * cfg.dim * (keys + cfg.text_len)


def test_cli_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--preset", "tiny", "--backends", "eager,tensorrt", "--blocks", "5", "--warmup-blocks", "1",
                 "--json-out", str(out), "--plot", str(png), "--peak-tflops", "1.0", "--e2e-blocks", "0"]) == 0
    doc = json.loads(out.read_text())
    eager = doc["results"][0]
    assert eager["backend"] == "eager" and 0 < eager["peak_fraction"] < 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)[0]["backend"] == "eager"


def test_bad_bench_arguments(capsys):
    assert main(["bench", "--backends", "eager,fast", "--blocks", "5"]) == 2
    assert "unknown backends" in capsys.readouterr().err
    assert main(["bench", "--height", "30", "--blocks", "5", "--backends", "eager"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
