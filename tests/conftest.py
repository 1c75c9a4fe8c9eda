"""Shared fixtures: the golden tiny model and inputs copied from the authors' traces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memrope.checkpoint import load_dit_state_dict
from memrope.config import WanConfig, load_run_config
from memrope.model import WanCausalDiT, build_dit

GOLDEN = Path(__file__).parent / "data" / "golden"
GOLDEN_PIXELS = dict(height=32, width=48)  # latent 4 x 6
TRACES = {
    "memrope_ema": "trace_memrope_ema.safetensors",
    "memrope_eviction": "trace_memrope_eviction.safetensors",
    "global_noevict": "trace_global_noevict.safetensors",
}


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_config() -> WanConfig:
    return WanConfig.from_json(GOLDEN / "config.json")


@pytest.fixture(scope="session")
def golden_dit(tiny_config: WanConfig) -> WanCausalDiT:
    state = load_dit_state_dict(GOLDEN / "tiny_selfforcing.pt", tiny_config, use_ema=True)
    return build_dit(tiny_config, state)


@pytest.fixture(scope="session")
def golden_inputs() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "inputs.safetensors"))


def golden_run(name: str):
    return load_run_config(GOLDEN / f"{name}.yaml")


def golden_trace(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / TRACES[name]))


@pytest.fixture(scope="session")
def artifacts(golden_dit, tmp_path_factory):
    """fp32 ONNX artifacts of the golden model, one per trace's cache policy (validated)."""
    from export.onnx_export import export_artifact

    root = tmp_path_factory.mktemp("artifacts")
    return {name: export_artifact(golden_dit, golden_run(name), root / name, **GOLDEN_PIXELS).path
            for name in TRACES}


@pytest.fixture(scope="session")
def low_precision_exports(golden_dit, tiny_config, tmp_path_factory) -> dict[str, Path]:
    """dtype name -> the golden model's ``memrope_ema`` export in bf16 / fp16 with a tiny VAE
    decoder (``vae_decode``), not validated (ONNX Runtime on CPU has no bf16 kernels); audited,
    as every export is. Shared by the audit test and the TensorRT-RTX builds."""
    from diffusers import AutoencoderKLWan

    from export.onnx_export import export_artifact
    from memrope.vae import WanStreamingDecoder
    from runtime.vae import tiny_vae_config

    root = tmp_path_factory.mktemp("low_precision")
    out = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        torch.manual_seed(0)
        vae = WanStreamingDecoder.from_diffusers(AutoencoderKLWan(**tiny_vae_config()).eval()).to(dtype)
        dit = build_dit(tiny_config, golden_dit.state_dict(), dtype=dtype)
        out[name] = export_artifact(dit, golden_run("memrope_ema"), root / f"memrope_ema_{name}", validate=False,
                                    vae=vae, **GOLDEN_PIXELS).path
    return out


@pytest.fixture(scope="session")
def tiny_bench_doc():
    """One ``memrope bench`` document on the tiny preset (eager, ONNX Runtime, and TensorRT,
    which says why it cannot run here), frame path included: what the bench tests read."""
    from runtime.bench import BENCH_PRESETS, run_bench

    return run_bench(BENCH_PRESETS["tiny"], ["eager", "onnxruntime", "tensorrt"], blocks=8, warmup_blocks=1,
                     e2e_blocks=2)


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory):
    """``(demo model folder, artifact)``: the embedded demo model (built in a private folder)
    exported with its VAE at 64x96 through the CLI (validated)."""
    from runtime.cli import main
    from runtime.t2v import ensure_demo_model

    demo = ensure_demo_model(tmp_path_factory.mktemp("memrope-cache") / "demo")
    out = tmp_path_factory.mktemp("art") / "demo"
    assert main(["export", "--preset", "tiny", "--model-dir", str(demo), "--height", "64", "--width", "96",
                 "--out", str(out)]) == 0
    return demo, out
