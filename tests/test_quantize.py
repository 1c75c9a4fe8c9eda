"""Quantized exports (``memrope export --quantize``): ModelOpt's result carried exactly, Q/DQ on
exactly the attention and FFN Linear layers of each graph, the quantization recorded in the
artifact, and an INT8 artifact checked against eager by ONNX Runtime and driven by its backend.
The TensorRT-RTX builds of the same exports: tests/test_quantize_build.py."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

pytest.importorskip("modelopt", reason="NVIDIA ModelOpt is not installed (pip install -e '.[quantize]')")

from memrope.export.quantize import (  # noqa: E402
    MODES,
    QDQLinear,
    QuantizationError,
    _modelopt_config,
    int4_block_size,
    pack_int4_weights,
    qdq_census,
    quantize_dit,
    quantized_layer_names,
)

# Two world prompts, two blocks each (the switch to the other prompt, with a re-cache, after one).
CALIBRATION = ["a red ball bouncing on a blue background",
               "A green square moves slowly to the left over a white background."]
WEIGHT_TYPES = {"fp8": "FLOAT8E4M3FN", "int8": "INT8", "int8-wo": "INT8", "int4-wo": "INT4"}
STEP_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
               "ffn.0", "ffn.2")


def export_quantized(out, mode, *, dtype="float32", validate=True, decode=False, **options):
    from memrope.runtime.api import export_model
    from memrope.runtime.load import LoadRequest

    return export_model(LoadRequest(preset="tiny", height=64, width=96, decode=decode, dtype=dtype), out,
                        quantize=mode, calibration_prompts=CALIBRATION, calibration_blocks=2, validate=validate,
                        **options)


def expected_layers(num_layers: int) -> dict[str, set[str]]:
    """The quantized Linear layers each graph runs: every block's in the step; the cross-attention
    keys and values in the text graph; the re-cache runs all but the last block's output side."""
    step = {f"blocks.{i}.{name}" for i in range(num_layers) for name in STEP_LAYERS}
    text = {f"blocks.{i}.cross_attn.{kv}" for i in range(num_layers) for kv in "kv"}
    last = num_layers - 1
    recache = {n for n in step if not n.startswith(f"blocks.{last}.")} | {f"blocks.{last}.self_attn.{kv}" for kv in "kv"}
    return {"step": step, "text": text, "recache": recache}


def check_placement(directory, mode: str, num_layers: int) -> None:
    """Q/DQ on exactly the intended Linear layers, in the mode's types; the rest stays float."""
    import onnx

    for graph, layers in expected_layers(num_layers).items():
        census = qdq_census(directory / f"{graph}.onnx")
        assert set(census["quantized_matmuls"].values()) == layers, graph
        assert census["weights"] == {WEIGHT_TYPES[mode]: len(layers)}, graph
        model = onnx.load(str(directory / f"{graph}.onnx"))
        producers = {out: node for node in model.graph.node for out in node.output}
        for node in model.graph.node:
            if node.name in census["quantized_matmuls"]:
                activation = producers.get(node.input[0])
                if MODES[mode].weight_only:  # the activation comes straight from float math
                    assert activation is None or activation.op_type != "DequantizeLinear", node.name
                else:  # Q -> DQ -> MatMul
                    assert activation.op_type == "DequantizeLinear", node.name
                    assert producers[activation.input[0]].op_type == "QuantizeLinear", node.name
        if MODES[mode].weight_only:
            assert census["QuantizeLinear"] == 0, graph
        floats = {init.name: init.data_type for init in model.graph.initializer}
        kept = [name for name in floats if any(k in name for k in ("time_embedding", "time_projection", "head.",
                                                                   "text_embedding", "modulation", "norm"))]
        assert kept or graph == "text"
        assert all(floats[name] in (onnx.TensorProto.FLOAT, onnx.TensorProto.BFLOAT16) for name in kept), graph


@pytest.mark.parametrize("mode", ["int8", "int4-wo"])
def test_quantized_export_matches_eager_and_records_its_quantization(tmp_path, mode, caplog):
    from memrope.artifact import load_artifact

    weight_only = MODES[mode].weight_only
    with caplog.at_level(logging.WARNING, logger="memrope.runtime.api"):
        result = export_quantized(tmp_path / mode, mode, **({"calibration_dtype": "model"} if weight_only else {}))
    unused = [r.getMessage() for r in caplog.records if "is weight-only" in r.getMessage()]
    # The calibration options a weight-only mode cannot use are named, and only then.
    assert unused == ([f"--quantize {mode} is weight-only: ModelOpt reads the weights' ranges, so --calibration-prompts "
                       "and --calibration-blocks and --calibration-dtype are not used"] if weight_only else [])
    check_placement(result.path, mode, result.contract.model.num_layers)
    record = result.contract.quantization
    assert record["mode"] == mode and record["modelopt"]
    assert record["quantized_layers"] == len(quantized_layer_names_of(result.contract.model))
    if MODES[mode].weight_only:  # ModelOpt reads the weights: no calibration run
        assert record["calibration_sha256"] is None and "weights_only" in record["calibration"]
    else:
        assert len(record["calibration_sha256"]) == 64
        assert record["calibration"] == {"prompts": 2, "blocks_per_prompt": 2, "seed": result.contract.run.seed,
                                         "dtype": "float32"}
    # Recorded in the contract and the config, and covered by the hash: the artifact loads as written.
    assert json.loads((result.path / "config.json").read_text())["quantization"] == record
    assert load_artifact(result.path).contract.quantization == record
    validation = result.validation
    assert validation["calls"] > 0
    if MODES[mode].weight_only:  # ONNX Runtime dequantizes exactly as eager
        assert validation["rel_l2"] is None and validation["max_abs_error"] < 1e-4
    else:  # rounding flips at code boundaries, bounded per call
        assert 0 < validation["max_relative_l2"] <= validation["rel_l2"]


def quantized_layer_names_of(config) -> list[str]:
    from memrope.model import WanCausalDiT

    return quantized_layer_names(WanCausalDiT(config))


def test_an_edited_quantization_record_is_refused(tmp_path):
    from memrope.artifact import ArtifactMismatchError, load_artifact

    result = export_quantized(tmp_path / "a", "int8-wo", validate=False)
    config = json.loads((result.path / "config.json").read_text())
    config["quantization"]["mode"] = "fp8"
    (result.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactMismatchError, match="config hash"):
        load_artifact(result.path)


def test_int8_artifact_runs_under_the_onnxruntime_backend(tmp_path):
    """The ONNX Runtime backend drives an INT8 (weights and activations) artifact through the loop; its
    video stays near the unquantized model's (6 blocks, the demo's first evaluation prompt)."""
    from memrope.artifact import load_artifact
    from memrope.backend import StepModuleBackend
    from memrope.engine.onnxruntime_backend import OnnxRuntimeBackend
    from memrope.model import MemRoPEStep
    from memrope.pipeline import MemRoPEPipeline
    from memrope.runtime.load import LoadRequest, resolve
    from memrope.sampler import StreamingSeededNoise

    result = export_quantized(tmp_path / "int8", "int8", validate=False)
    artifact = load_artifact(result.path)
    resolved = resolve(LoadRequest(preset="tiny", height=64, width=96, decode=False))
    embeds = resolved.encode_prompts(["a yellow ball falling on a blue background"])[0]

    def rollout(backend, seed=3):
        pipeline = MemRoPEPipeline(backend, artifact.run)
        noise = StreamingSeededNoise(seed, 1, pipeline.latent_frame_shape(), artifact.layout().block_frames)
        with torch.no_grad():
            return torch.cat([block.x0.clone() for block in pipeline.blocks(embeds, noise, 6)], dim=1)

    eager = StepModuleBackend(MemRoPEStep(resolved.load_dit(), artifact.layout(), artifact.run.latent_height,
                                          artifact.run.latent_width).eval())
    quantized = rollout(OnnxRuntimeBackend(result.path, provider="cpu"))
    reference = rollout(eager)
    error = float((quantized - reference).norm() / reference.norm())
    # How far apart two different videos of the same prompt are: another noise seed.
    another = float((rollout(eager, seed=4) - reference).norm() / reference.norm())
    assert torch.isfinite(quantized).all()
    # Measured 0.30 with this small calibration set, against 1.1 for another seed (a wrong scale
    # or axis is as far as another video, or farther).
    assert 0 < error < 0.5 * another, (error, another)


def test_the_graph_carries_modelopt_s_own_quantization():
    """Each QDQLinear computes exactly what ModelOpt's fake-quantized layer computes (same
    calibration), for every mode: the graph stores ModelOpt's result, not a re-derivation."""
    import modelopt.torch.quantization as mtq
    from torch import nn

    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    calibration = torch.randn(16, 64)
    x = torch.randn(8, 64) * 0.8
    for name, mode in MODES.items():
        reference = copy.deepcopy(layer)
        mtq.quantize(nn.ModuleDict({"layer": reference}), _modelopt_config(mode, 32),
                     lambda _m, ref=reference: ref(calibration))
        holder = nn.Module()
        holder.layer = copy.deepcopy(layer)

        class Calib:
            prompts, prompt_embeds, blocks, seed, dtype = ["p"], [torch.zeros(1)], 1, 0, None

            def sha256(self):
                return "0" * 64

        # quantize_dit selects blocks.*; wrap the layer as one block's FFN input layer.
        dit = nn.Module()
        dit.blocks = nn.ModuleList([nn.Module()])
        dit.blocks[0].ffn = nn.Sequential(holder.layer)
        quantize_dit(dit, name, lambda dit=dit: dit.blocks[0].ffn[0](calibration), Calib())
        converted = dit.blocks[0].ffn[0]
        assert isinstance(converted, QDQLinear)
        with torch.no_grad():
            want, got = reference(x), converted(x)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (name, float((got - want).abs().max()))


def test_a_bf16_model_calibrated_in_float32_keeps_its_weights_and_gets_its_own_ranges():
    """The default calibration computes in float32 (fast on a CPU): the DiT comes back in bf16 with
    exactly its weights, and every activation scale is within 2^-5 (relative) of the scales of a
    calibration in bf16 itself, on the real block loop of the demo model."""
    from memrope.artifact import specialise_run
    from memrope.cache import CacheLayout
    from memrope.export.quantize import Calibration, calibration_loop
    from memrope.model import MemRoPEStep
    from memrope.runtime.load import LoadRequest, resolve

    resolved = resolve(LoadRequest(preset="tiny", dtype="bfloat16", height=64, width=96))
    run = specialise_run(resolved.run, resolved.model, 64, 96, 1)
    layout = CacheLayout.for_run(resolved.model, run)
    embeds = resolved.encode_prompts(CALIBRATION, flag="--calibration-prompts")
    quantized = {}
    for dtype in (None, torch.float32):
        dit = resolved.load_dit()
        step = MemRoPEStep(dit, layout, run.latent_height, run.latent_width).eval()
        calibration = Calibration(CALIBRATION, embeds, 2, seed=run.seed, dtype=dtype)
        record = quantize_dit(dit, "fp8", calibration_loop(step, run, calibration), calibration)
        assert record.calibration["dtype"] == ("bfloat16" if dtype is None else "float32")
        assert all(p.dtype == torch.bfloat16 for p in dit.parameters())
        quantized[dtype] = {name: b.clone() for name, b in dit.named_buffers() if name.endswith(("_q", "_scale"))}
        assert calibration.latents and calibration.latents[0].dtype == (dtype or torch.bfloat16)
    bf16, fp32 = quantized[None], quantized[torch.float32]
    assert bf16.keys() == fp32.keys() and len(bf16) == 3 * len(record.layers)
    for name, value in bf16.items():
        if name.endswith("input_scale"):  # ranges of the same function, computed in two precisions
            assert torch.allclose(fp32[name].float(), value.float(), rtol=2 ** -5), name
        else:  # weights and their scales: the same numbers
            assert torch.equal(fp32[name], value), name
    # The two calibrations are different runs: their hashes differ.
    assert (Calibration(CALIBRATION, embeds, 2, dtype=None).sha256()
            != Calibration(CALIBRATION, embeds, 2, dtype=torch.float32).sha256())


def test_int4_blocks_and_packing(tmp_path):
    from torch import nn

    dit = nn.Module()
    dit.blocks = nn.ModuleList([nn.Module()])
    dit.blocks[0].ffn = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    names = quantized_layer_names(dit)
    assert names == ["blocks.0.ffn.0", "blocks.0.ffn.2"]
    assert int4_block_size(dit, names) == 32  # two or more blocks along every input width
    dit.blocks[0].ffn[0] = nn.Linear(24, 128)
    with pytest.raises(QuantizationError, match="divisible by 16"):
        int4_block_size(dit, names)
    # pack_int4_weights refuses int8 codes outside int4's range instead of wrapping them.
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    codes = np.full((64, 8), 9, dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=0, block_size=32)], "g", [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 8])],
        [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(np.ones((2, 8), np.float32), "s")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(path))
    with pytest.raises(QuantizationError, match=r"outside int4's \[-8, 7\]"):
        pack_int4_weights(path)


def test_bad_quantize_requests_fail_before_loading(tmp_path, capsys):
    from memrope.runtime.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--preset", "tiny", "--height", "64", "--width", "96", "--out", str(tmp_path / "a"),
              "--quantize", "int2"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int2'" in capsys.readouterr().err
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing\n\n")
    assert main(["export", "--preset", "tiny", "--height", "64", "--width", "96", "--out", str(tmp_path / "b"),
                 "--quantize", "fp8", "--calibration-prompts", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no prompts (expected one prompt per line)" in err and "Traceback" not in err
    assert main(["export", "--preset", "tiny", "--height", "64", "--width", "96", "--out", str(tmp_path / "c"),
                 "--quantize", "fp8", "--calibration-blocks", "0"]) == 2
    assert "--calibration-blocks must be at least 1" in capsys.readouterr().err
    # Random weights without a text encoder: no prompts to calibrate activations on.
    assert main(["export", "--preset", "mid", "--height", "64", "--width", "96", "--out", str(tmp_path / "d"),
                 "--quantize", "int8"]) == 2
    assert "needs a text encoder: pass --model-dir WAN_DIR (int8-wo and int4-wo need none)" in capsys.readouterr().err
    assert not any(tmp_path.glob("[abcd]"))


def test_default_calibration_prompts_are_not_evaluation_prompts():
    from memrope.runtime.demo.world import EVAL_PROMPTS, parse_prompt
    from memrope.runtime.prompts import CALIBRATION_PROMPTS, calibration_prompts

    demo = calibration_prompts(demo=True)
    assert len(demo) == 8 and len(set(demo)) == 8 and not set(demo) & set(EVAL_PROMPTS)
    assert all(parse_prompt(p).objects for p in demo)  # sentences of the demo world, which it reads
    assert calibration_prompts(demo=False) == list(CALIBRATION_PROMPTS)


# The demo VAE decoder's convolutions: fp8 quantizes all but these (module names).
VAE_KEPT_CONVS = {"post_quant_conv", "decoder.conv_in", "decoder.mid_block.attentions.0.to_qkv",
                  "decoder.mid_block.attentions.0.proj", "decoder.conv_out"}


def test_fp8_runs_the_vae_decoder_s_convolutions_in_fp8(tmp_path):
    """``fp8`` quantizes the VAE decoder's residual, shortcut and upsampling convolutions (input and
    weight: ``Q -> DQ -> Conv`` with a dequantized FP8 weight), calibrated on real latents (the
    demo VAE's own encoding of two world clips), and keeps the first, the last and the attention's
    convolutions in float; ONNX Runtime computes what the eager quantized decoder computes, and the
    pixels stay near the float decoder's."""
    import numpy as np
    import onnx

    from memrope.config import RunConfig
    from memrope.contract import vae_decode_contract
    from memrope.export.quantize import (
        QDQConv,
        quantize_vae,
        translation_table,
        vae_calibration_loop,
        vae_quantized_conv_names,
    )
    from memrope.export.vae_export import export_vae_graph, validate_vae_graph
    from memrope.export.validate import QDQ_RELATIVE_L2
    from memrope.runtime.demo import world
    from memrope.runtime.demo.train_dit import WanVAECodec
    from memrope.runtime.t2v import shipped_demo_model
    from memrope.runtime.vae import load_vae, streaming_decoder_module
    from memrope.vae import VAEConv

    demo = shipped_demo_model()
    clips = np.stack([world.render(prompt, 21, height=64, width=96) for prompt in CALIBRATION])  # 6 latent frames
    latents = WanVAECodec(load_vae(demo)).encode(clips)
    vae = streaming_decoder_module(demo)
    reference = copy.deepcopy(vae)
    names = vae_quantized_conv_names(vae)
    record = quantize_vae(vae, "fp8", vae_calibration_loop(vae, list(latents.split(1))))
    assert record["quantized_convs"] == len(names) == 27
    assert all(isinstance(vae.get_submodule(name), QDQConv) for name in names)
    assert {name for name, m in vae.named_modules() if isinstance(m, VAEConv)} == VAE_KEPT_CONVS
    assert quantize_vae(streaming_decoder_module(demo), "int4-wo", lambda: None) is None  # weight-only: float VAE

    contract = vae_decode_contract(vae.config, RunConfig(num_output_frames=6, latent_height=8, latent_width=12),
                                   "float32", 1)
    path = tmp_path / "vae_decode.onnx"
    export_vae_graph(vae, contract, path, translation_table())
    census = qdq_census(path)
    assert sorted(census["quantized_convs"].values()) == sorted(names) and not census["quantized_matmuls"]
    assert census["weights"] == {"FLOAT8E4M3FN": 27} and census["QuantizeLinear"] == 27
    model = onnx.load(str(path))
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.name in census["quantized_convs"]:  # Q -> DQ -> Conv
            assert producers[node.input[0]].op_type == "DequantizeLinear", node.name
            assert producers[producers[node.input[0]].input[0]].op_type == "QuantizeLinear", node.name
    report = validate_vae_graph(path, vae, contract, rel_l2=QDQ_RELATIVE_L2)
    assert report["pixels_max_relative_l2"] <= QDQ_RELATIVE_L2

    # Against the float decoder, on the calibration clips' latents: near, and not identical.
    def decode(module):
        caches, t = module.zero_caches(1, 8, 12), module.latent_frames
        pixels = []
        with torch.no_grad():
            for k in range(0, 6, t):
                out = module(latents[:1, k:k + t], torch.tensor([k == 0]), *caches)
                caches = list(out[2:])
                pixels.append(out[1])
        return torch.cat(pixels, dim=2)

    got, want = decode(vae), decode(reference)
    mse = float(((got - want) ** 2).mean())
    psnr = 10 * np.log10(4.0 / mse)  # pixels in [-1, 1]: peak-to-peak 2
    assert 25 < psnr < 80, psnr
