"""Probe: does TensorRT-RTX build FP8 Q/DQ convolutions (the VAE decoder's) into FP8 kernels?

Builds one-convolution ONNX graphs with the real TensorRT-RTX builder, ahead of time (no GPU), for
each compute capability asked (default 8.9 and 12.0): 2D (``[1, C, 16, 16]``, 3x3) and 3D
(``[1, C, 8, 16, 16]``, 3x3x3, the decoder's causal convolutions), 32 and 96 channels, in fp16 and
bf16, each with

- ``weight+input``: ``Q -> DQ -> Conv`` with ``DequantizeLinear`` on an FP8 E4M3 weight (what
  ``memrope export --quantize fp8`` writes for the VAE), and
- ``weight only``: the FP8 weight dequantized, the input in the base dtype.

For each build it lists the engine layers (from the builder's layer listing) with the datatypes
they read, and whether the convolution layer (``correlation``) reads FP8.

Results: ``bench/results/vae_fp8_probe.json`` and ``docs/vae_fp8_probe.md``.

Usage: python bench/vae_fp8_probe.py [--compute-capability 8.9,12.0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "vae_fp8_probe.json"
DOC = ROOT / "docs" / "vae_fp8_probe.md"
CONV_TYPES = ("correlation", "convolution")


def conv_graph(dims: int, channels: int, base: str, quantize_input: bool):
    """One convolution over ``[1, channels, (8,) 16, 16]`` with an FP8 E4M3 weight (per tensor)."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((channels, channels, *(3,) * dims)).astype(np.float32)
    weight_scale = np.float32(np.abs(weight).max() / 448.0)
    dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[base]
    elem = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[base]
    initializers = [
        numpy_helper.from_array((weight / weight_scale).astype(ml_dtypes.float8_e4m3fn), "weight_q"),
        numpy_helper.from_array(np.array(weight_scale, dtype), "weight_scale"),
        numpy_helper.from_array(np.array(0.05, dtype), "input_scale"),
        numpy_helper.from_array(np.zeros(channels, dtype), "bias"),
        numpy_helper.from_array(np.array(0, ml_dtypes.float8_e4m3fn), "zero_point"),
    ]
    nodes, source = [], "x"
    if quantize_input:
        nodes += [helper.make_node("QuantizeLinear", ["x", "input_scale", "zero_point"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "input_scale", "zero_point"], ["x_dq"])]
        source = "x_dq"
    nodes += [helper.make_node("DequantizeLinear", ["weight_q", "weight_scale", "zero_point"], ["weight"]),
              helper.make_node("Conv", [source, "weight", "bias"], ["y"], pads=[1] * (2 * dims), name="conv")]
    spatial = (8, 16, 16)[-dims:]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", elem, [1, channels, *spatial])],
                              [helper.make_tensor_value_info("y", elem, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def build(model, cc: str) -> dict:
    """Build ``model`` for compute capability ``cc``; the engine layers and what they read."""
    import tensorrt_rtx as trt

    from memrope.engine.build import collecting_logger, layer_records, strongly_typed

    log = collecting_logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(strongly_typed(trt))
    parser = trt.OnnxParser(network, log)
    if not parser.parse(model.SerializeToString()):
        return {"built": False, "error": "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))}
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")), 0)
    if builder.build_serialized_network(network, config) is None:
        return {"built": False, "error": " | ".join(log.errors)[:500]}
    layers = [{"name": r["name"], "type": r["type"], "reads": sorted(r["reads"])}
              for r in layer_records(log.layer_listing or "")]
    convs = [layer for layer in layers if layer["type"] in CONV_TYPES]
    return {"built": True, "layers": layers, "conv_reads_fp8": bool(convs) and all("FP8" in c["reads"] for c in convs)}


def write_markdown(doc: dict) -> None:
    meta = doc["machine"]
    lines = ["# TensorRT-RTX and FP8 convolutions", "",
             f"Measured {meta['date']} on {meta['cpu']} (no GPU: ahead-of-time builds), TensorRT-RTX "
             f"{meta['tensorrt_rtx']}, by `python bench/vae_fp8_probe.py`. One convolution per graph, with an FP8 "
             "E4M3 weight (per tensor); the convolution layer is the engine's `correlation` layer.", "",
             "| compute capability | conv | channels | base | FP8 Q/DQ on | convolution reads FP8 | engine layers (type: reads) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["results"]:
        layers = "; ".join(f"{layer['type']}: {'/'.join(layer['reads'])}" for layer in r.get("layers", []))
        verdict = "**yes**" if r.get("conv_reads_fp8") else ("no" if r["built"] else f"build failed: {r['error']}")
        lines.append(f"| {r['cc']} | {r['dims']}D | {r['channels']} | {r['base']} | {r['quantized']} | {verdict} | "
                     f"{layers} |")
    lines += ["", "So `memrope export --quantize fp8` quantizes the VAE decoder's convolutions with both their "
              "inputs and their weights in FP8 (docs/quantization.md); a weight-only FP8 convolution would "
              "dequantize the weight and convolve in the base dtype.", ""]
    DOC.write_text("\n".join(lines))


def main(argv=None) -> int:
    import tensorrt_rtx as trt

    from memrope.runtime.bench import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute-capability", default="8.9,12.0", help="comma-separated (default 8.9,12.0)")
    args = parser.parse_args(argv)
    results = []
    for cc in args.compute_capability.split(","):
        for dims in (2, 3):
            for channels in (32, 96):
                for base in ("float16", "bfloat16"):
                    for quantize_input in (True, False):
                        built = build(conv_graph(dims, channels, base, quantize_input), cc)
                        row = {"cc": cc, "dims": dims, "channels": channels, "base": base,
                               "quantized": "weight+input" if quantize_input else "weight only", **built}
                        print(cc, f"{dims}D", channels, base, row["quantized"], "->",
                              row.get("conv_reads_fp8", row.get("error")), flush=True)
                        results.append(row)
    doc = {"machine": {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "platform": platform.platform(),
                       "tensorrt_rtx": trt.__version__}, "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc)
    print(DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
