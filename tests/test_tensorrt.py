"""TensorRT path: engine sidecars (round trip, refusal of stale engines, atomic writes), output
buffer planning, and clear errors without TensorRT or without built plans; on a GPU with
TensorRT, building the tiny bf16 artifact, per-call parity with eager under the bf16 ratio rule,
and CUDA-graph replay identical to plain execution."""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.sidecar import (
    EngineMismatchError,
    EngineSidecar,
    check_sidecar,
    plan_path,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from engine.tensorrt_backend import TensorRTBackend, plan_buffers
from memrope.backend import Backend
from memrope.cache import CacheLayout
from memrope.config import RunConfig, WanConfig, load_run_config, model_preset
from memrope.contract import step_contract
from memrope.model import build_dit, random_state_dict

GOLDEN = Path(__file__).parent / "data" / "golden"
PIXELS = dict(height=32, width=48)  # latent 4 x 6

SIDECAR = EngineSidecar(tensorrt_version="10.15.1.29", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                        contract_hash="abc123", graph="step", dtype="bfloat16",
                        build_flags={"strongly_typed": True, "timing_cache": "/tmp/trt.cache",
                                     "builder_optimization_level": 3, "workspace_bytes": None})
ENV = dict(tensorrt_version=SIDECAR.tensorrt_version, gpu_name=SIDECAR.gpu_name,
           compute_capability=SIDECAR.compute_capability, contract_hash=SIDECAR.contract_hash)


def _tiny_dit(dtype: torch.dtype = torch.bfloat16):
    cfg = WanConfig.from_json(GOLDEN / "config.json")
    return build_dit(cfg, random_state_dict(cfg), dtype=dtype)  # seeded: same weights every time


def _export(out_dir: Path) -> Path:
    from export.onnx_export import export_artifact

    run = load_run_config(GOLDEN / "memrope_ema.yaml")
    return export_artifact(_tiny_dit(), run, out_dir, validate=False, **PIXELS).path


@pytest.fixture(scope="module")
def bf16_artifact(tmp_path_factory) -> Path:
    """The tiny model exported in bf16 (no plans built). Tests must not write into it."""
    return _export(tmp_path_factory.mktemp("trt") / "tiny_bf16")


# --- sidecars (pure Python) ---------------------------------------------------------------------

def test_sidecar_round_trip(tmp_path):
    path = sidecar_path(plan_path(tmp_path, "step"))
    assert path.name == "step.plan.json"
    write_sidecar(path, SIDECAR)
    assert read_sidecar(path) == SIDECAR
    assert SIDECAR.created  # ISO timestamp filled in
    check_sidecar(read_sidecar(path), **ENV)  # matches: no error


@pytest.mark.parametrize("field,value", [("gpu_name", "NVIDIA GeForce RTX 4090"), ("compute_capability", "8.9"),
                                         ("tensorrt_version", "11.5.0.1"), ("contract_hash", "def456")])
def test_check_sidecar_refuses_each_mismatching_field(field, value):
    with pytest.raises(EngineMismatchError) as err:
        check_sidecar(SIDECAR, **{**ENV, field: value})
    message = str(err.value)
    assert field in message and value in message and "memrope build" in message
    assert isinstance(err.value, ValueError)


def test_check_sidecar_names_every_differing_field():
    with pytest.raises(EngineMismatchError) as err:
        check_sidecar(SIDECAR, **{**ENV, "gpu_name": "other", "tensorrt_version": "11.0"}, artifact_dir="/a/b")
    message = str(err.value)
    assert "gpu_name" in message and "tensorrt_version" in message and "compute_capability" not in message
    assert "memrope build /a/b" in message


def test_sidecar_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "text.plan.json"
    write_sidecar(path, SIDECAR)
    write_sidecar(path, replace(SIDECAR, graph="text"))  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.plan.json"]
    assert read_sidecar(path).graph == "text"

    with pytest.raises(TypeError):  # json cannot serialise it mid-write: the old file must survive intact
        write_sidecar(path, replace(SIDECAR, build_flags={"bad": object()}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.plan.json"]
    assert read_sidecar(path).graph == "text"


def test_read_sidecar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="memrope build"):
        read_sidecar(tmp_path / "step.plan.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EngineMismatchError, match="memrope build"):
        read_sidecar(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text('{"tensorrt_version": "10.0"}')
    with pytest.raises(EngineMismatchError, match="memrope build"):
        read_sidecar(tmp_path / "old.json")


# --- output buffers ------------------------------------------------------------------------------

def test_plan_buffers_matches_contract_shapes():
    model = model_preset("tiny")
    run = RunConfig(num_output_frames=30, latent_height=4, latent_width=6)
    layout = CacheLayout.build(run.cache, 6, 30)
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        contract = step_contract(model, run, layout, dtype, 1)
        sizes = plan_buffers(contract)
        assert set(sizes) == set(contract.output_names) | {"total"}
        for spec in contract.outputs:
            n = 1
            for d in spec.shape:
                n *= d
            element = 4 if spec.dtype == "float32" else size
            assert sizes[spec.name] == n * element == spec.zeros().numel() * spec.zeros().element_size()
        assert sizes["total"] == sum(v for k, v in sizes.items() if k != "total")
        flow = contract.output("flow").shape  # [B, F, C, H, W]
        assert flow[0] == 1 and flow[3:] == (4, 6)
        assert sizes["flow"] == flow[0] * flow[1] * flow[2] * 4 * 6 * size


# --- errors without TensorRT / without plans ---------------------------------------------------

def test_build_engines_without_tensorrt_names_the_extra(bf16_artifact):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed: the missing-TensorRT error cannot be observed")
    from engine.build import build_engines

    with pytest.raises(ImportError, match=r"\[tensorrt\]") as err:
        build_engines(bf16_artifact)
    assert "NVIDIA GPU" in str(err.value)
    assert not list(bf16_artifact.glob("*.plan*")) and not list(bf16_artifact.glob(".*.tmp"))


def test_tensorrt_backend_without_plans_says_memrope_build(bf16_artifact):
    with pytest.raises(FileNotFoundError, match="memrope build") as err:
        TensorRTBackend(bf16_artifact)
    assert str(bf16_artifact) in str(err.value)


# --- gated: TensorRT on a CUDA GPU -----------------------------------------------------------------

def _require_trt_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install -e '.[tensorrt]' "
                                                 "on a machine with an NVIDIA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT engines need an NVIDIA GPU")
    return trt


@pytest.fixture(scope="module")
def built_artifact(bf16_artifact, tmp_path_factory) -> Path:
    _require_trt_gpu()
    from engine.build import build_engines

    path = tmp_path_factory.mktemp("trt_built") / "tiny_bf16"
    shutil.copytree(bf16_artifact, path)
    plans = build_engines(path, timing_cache=tmp_path_factory.mktemp("cache") / "trt.cache")
    assert [p.name for p in plans] == ["step.plan", "text.plan"]
    return path


class _PerCallComparison(Backend):
    """Wraps the TensorRT backend; on every call runs eager bf16 and eager fp32 on the same feeds."""

    def __init__(self, trt_backend, eager_bf16, eager_fp32):
        self.trt, self.bf16, self.fp32 = trt_backend, eager_bf16, eager_fp32
        self.name, self.model, self.layout = "compare", trt_backend.model, trt_backend.layout
        self.dtype, self.device = trt_backend.dtype, trt_backend.device
        self.calls = 0

    def encode_text(self, prompt_embeds):
        return self.trt.encode_text(prompt_embeds)

    def step(self, feeds):
        out = self.trt.step(feeds)
        ref = self.fp32.step({k: v.float() if v.is_floating_point() else v for k, v in feeds.items()})
        low = self.bf16.step(feeds)
        for name, got in out.items():
            err_trt = (got.float() - ref[name].float()).abs().max().item()
            err_eager = (low[name].float() - ref[name].float()).abs().max().item()
            assert err_trt <= 2 * err_eager + 1e-3, (
                f"call {self.calls} {name}: TensorRT error vs fp32 {err_trt:.3g} > 2 x eager-bf16 {err_eager:.3g}")
        self.calls += 1
        return out


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_matches_eager_per_call_within_bf16_ratio(built_artifact, golden_inputs):
    _require_trt_gpu()
    from engine.eager_backend import EagerBackend
    from memrope.artifact import load_artifact
    from memrope.pipeline import MemRoPEPipeline
    from memrope.sampler import TensorNoise

    artifact = load_artifact(built_artifact)
    run = artifact.run
    eager_bf16 = EagerBackend(_tiny_dit().cuda(), run)
    # The fp32 reference holds the same (bf16-rounded) weights, widened exactly.
    eager_fp32 = EagerBackend(_tiny_dit(torch.float32).cuda(), run)
    eager_fp32.dit.load_state_dict({k: v.float() if v.is_floating_point() else v
                                    for k, v in eager_bf16.dit.state_dict().items()})
    noise = TensorNoise(golden_inputs["noise"], golden_inputs["intermediate_noise"], artifact.layout().block_frames)
    prompt = golden_inputs["prompt_embeds"].to("cuda", torch.bfloat16)
    with TensorRTBackend(built_artifact, cuda_graph=False) as trt_backend:
        compare = _PerCallComparison(trt_backend, eager_bf16, eager_fp32)
        pipeline = MemRoPEPipeline(compare, run)
        pipeline.generate(prompt, noise)
        blocks = run.num_output_frames // pipeline.layout.block_frames
        assert compare.calls == blocks * (pipeline.schedule.num_steps + 1)  # every call was compared


@pytest.mark.trt
@pytest.mark.gpu
def test_cuda_graph_replay_matches_plain_execution(built_artifact):
    _require_trt_gpu()
    from memrope.artifact import load_artifact

    contract = load_artifact(built_artifact).contract.step
    gen = torch.Generator().manual_seed(1)

    def fill(feeds):  # new contents, same addresses
        for spec in contract.inputs:
            t = feeds[spec.name]
            if t.is_floating_point():
                t.copy_(torch.randn(spec.shape, generator=gen))
            elif t.dtype == torch.bool:
                t.fill_(spec.name == "key_valid")
            else:
                t.copy_(torch.arange(t.numel()).reshape(spec.shape))

    feeds = {spec.name: spec.zeros("cuda") for spec in contract.inputs}
    with TensorRTBackend(built_artifact, cuda_graph=False) as plain, \
            TensorRTBackend(built_artifact, cuda_graph=True) as graphed:
        for call in range(4):  # call 0 = warm-up + capture, later calls replay
            fill(feeds)
            a = {k: v.clone() for k, v in plain.step(feeds).items()}
            b = {k: v.clone() for k, v in graphed.step(feeds).items()}
            for name in a:
                assert torch.equal(a[name], b[name]), f"call {call}: {name} differs under CUDA-graph replay"
        assert graphed._graph is not None, "the step was never captured"
