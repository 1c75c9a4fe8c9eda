"""Quantized artifacts (bf16 base) built by the real TensorRT-RTX builder for an RTX 4090 (compute
capability 8.9), ahead of time on this CPU: the sidecar's report counts the engine layers that read
FP8, INT8 or INT4 from the engine's layer listing, a MatMul the builder ran in bf16 instead fails the
build naming it, and a plan of one quantization is refused for an artifact of another."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("modelopt", reason="NVIDIA ModelOpt is not installed (pip install -e '.[quantize]')")
pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install -e '.[rtx]')")

from test_quantize import check_placement, expected_layers, export_quantized  # noqa: E402

from memrope.engine.build import EngineBuildError, build_engines  # noqa: E402

ENGINE_TYPE = {"fp8": "FP8", "int8": "Int8", "int4-wo": "Int4"}


@pytest.mark.parametrize("mode", ["fp8", "int4-wo", "int8"])
def test_quantized_artifact_builds_in_low_precision(tmp_path, mode):
    result = export_quantized(tmp_path / mode, mode, dtype="bfloat16")
    layers = expected_layers(result.contract.model.num_layers)
    check_placement(result.path, mode, result.contract.model.num_layers)
    plans = build_engines(result.path, target="rtx", compute_capabilities=["8.9"])
    assert [p.graph for p in plans] == ["step", "text", "recache"]
    for built in plans:
        sidecar = built.sidecar
        assert sidecar.quantization == result.contract.quantization
        report = sidecar.report["quantization"]
        assert report["verified"] and report["quantized_matmuls"] == len(layers[built.graph])
        # Counted from the engine's layers: each reads the quantized type; the builder may fuse
        # several MatMuls (q, k and v) into one GEMM, never zero.
        assert set(report["layers_reading"]) == {ENGINE_TYPE[mode]}
        assert 1 <= report["low_precision_layers"] <= report["quantized_matmuls"]


def test_a_plan_of_another_quantization_is_refused(tmp_path):
    from memrope.artifact import load_artifact
    from memrope.engine.sidecar import EngineMismatchError
    from memrope.engine.tensorrt_backend import open_plans

    fp8 = export_quantized(tmp_path / "fp8", "fp8", dtype="bfloat16")
    int4 = export_quantized(tmp_path / "int4", "int4-wo", dtype="bfloat16")
    build_engines(fp8.path, target="rtx", compute_capabilities=["8.9"], graphs=["text"])
    for name in ("text.plan", "text.plan.json"):
        shutil.copy(fp8.path / name, int4.path / name)
    with pytest.raises(EngineMismatchError, match=r"quantization: engine fp8 \(ModelOpt .*, calibration \w+\), "
                                                  r"artifact int4-wo \(ModelOpt .*, weight-only\)"):
        open_plans(load_artifact(int4.path), ("text",), target="rtx")


def test_a_build_that_ignores_the_q_dq_fails_naming_the_layers(tmp_path):
    """TensorRT-RTX 1.7 fuses the self-attention's q, k and v of an int8 weight-only graph into one
    GEMM by dequantizing their weights first: that GEMM runs in bf16, so the build fails, naming
    them, and writes nothing."""
    result = export_quantized(tmp_path / "int8-wo", "int8-wo", dtype="bfloat16", validate=False)
    before = sorted(p.name for p in result.path.iterdir())
    with pytest.raises(EngineBuildError, match=r"ignored the Q/DQ of \d+ of the step graph's 16 quantized MatMuls "
                                               r"\(node_\w+ \(blocks\.0\.self_attn\.[qkv]\)"):
        build_engines(result.path, target="rtx", compute_capabilities=["8.9"])
    assert sorted(p.name for p in result.path.iterdir()) == before
