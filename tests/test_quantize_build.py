"""Quantized artifacts (bf16 base) built by the real TensorRT-RTX builder for an RTX 4090 (compute
capability 8.9), ahead of time on this CPU: the sidecar's report counts the engine layers that read
FP8, INT8 or INT4 from the engine's layer listing (fp8's VAE decoder convolutions included), a
MatMul the builder ran in bf16 instead fails the build naming it, and a plan of one quantization is
refused for an artifact of another."""

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
    """fp8 with the VAE decoder: its 27 quantized convolutions build as FP8 convolutions too."""
    vae = mode == "fp8"
    result = export_quantized(tmp_path / mode, mode, dtype="bfloat16", decode=vae)
    layers = expected_layers(result.contract.model.num_layers)
    check_placement(result.path, mode, result.contract.model.num_layers)
    plans = build_engines(result.path, target="rtx", compute_capabilities=["8.9"])
    assert [p.graph for p in plans] == ["step", "text", "recache"] + (["vae_decode"] if vae else [])
    if vae:
        assert result.contract.quantization["vae"]["quantized_convs"] == 27
        report = plans.pop().sidecar.report["quantization"]
        assert report["verified"] and report["quantized_convs"] == 27 and report["quantized_matmuls"] == 0
        # Each convolution runs in an engine convolution reading FP8 ("correlation"), none in bf16.
        assert report["layers_reading"] == {"FP8": report["low_precision_layers"]}
        assert report["layer_types"]["correlation"] == 27
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


@pytest.mark.parametrize("quantize_input", [True, False])
def test_a_convolution_left_in_the_base_dtype_fails_the_build_report(tmp_path, quantize_input):
    """The VAE's check, on a one-convolution graph built for cc 8.9: with its input and its FP8
    weight Q/DQ the convolution runs in FP8; with the weight alone TensorRT-RTX dequantizes it and
    convolves in bf16, and the report refuses the build naming the convolution and its layer."""
    import ml_dtypes
    import numpy as np
    import onnx
    import tensorrt_rtx as trt
    from onnx import TensorProto, helper, numpy_helper

    from memrope.engine.build import collecting_logger, quantized_layer_report, strongly_typed

    weight = np.random.default_rng(0).standard_normal((32, 32, 3, 3, 3)).astype(np.float32)
    scale = np.abs(weight).max() / 448
    bf16 = ml_dtypes.bfloat16
    inits = [numpy_helper.from_array((weight / scale).astype(ml_dtypes.float8_e4m3fn),
                                     "decoder.up_blocks.0.resnets.0.conv1.weight_q"),
             numpy_helper.from_array(np.array(scale, bf16), "w_s"), numpy_helper.from_array(np.array(0.05, bf16), "x_s"),
             numpy_helper.from_array(np.array(0, ml_dtypes.float8_e4m3fn), "zp")]
    nodes = [helper.make_node("DequantizeLinear", ["decoder.up_blocks.0.resnets.0.conv1.weight_q", "w_s", "zp"], ["w"])]
    source = "x"
    if quantize_input:
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_s", "zp"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "x_s", "zp"], ["x_dq"])]
        source = "x_dq"
    nodes.append(helper.make_node("Conv", [source, "w"], ["y"], pads=[1] * 6, name="node_conv3d"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 32, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, None)], inits)
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))

    log = collecting_logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(strongly_typed(trt))
    assert trt.OnnxParser(network, log).parse_from_file(str(path))
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM89, 0)
    assert builder.build_serialized_network(network, config) is not None
    if quantize_input:
        report = quantized_layer_report("vae_decode", path, log.layer_listing)
        assert report["quantized_convs"] == 1 and report["layer_types"] == {"correlation": 1}
    else:
        with pytest.raises(EngineBuildError, match=r"ignored the Q/DQ of 1 of the vae_decode graph's 1 quantized "
                                                   r"convolutions \(node_conv3d \(decoder\.up_blocks\.0\.resnets\.0\.conv1\)\)"):
            quantized_layer_report("vae_decode", path, log.layer_listing)
