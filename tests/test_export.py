"""ONNX export: golden parity through ONNX Runtime (per-call parity with eager across the
fill -> first eviction -> steady transitions is test_backends'), EMA and RoPE computed by graph
ops, the TensorRT audit of every variant, and clear errors for bad input or stale artifacts."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import GOLDEN_PIXELS, TRACES, golden_generate_args, golden_run, golden_trace
from safetensors.torch import load_file, save_file

from memrope.artifact import ArtifactMismatchError, load_artifact
from memrope.cache import CacheControls, memory_update
from memrope.contract import memory_key, past_key, present_memory_key
from memrope.engine.eager_backend import EagerBackend
from memrope.export.onnx_export import export_artifact
from memrope.export.validate import ExportMismatchError
from memrope.runtime.cli import main


@pytest.mark.parametrize("name", sorted(TRACES))
def test_onnxruntime_generate_reproduces_golden(name, artifacts, tmp_path):
    out = tmp_path / "latents.safetensors"
    assert main(golden_generate_args(out, policy=name, backend="onnxruntime", engine=artifacts[name])) == 0
    torch.testing.assert_close(load_file(str(out))["latents"], golden_trace(name)["output_latents"], atol=1e-4, rtol=0)


def test_validation_report_covers_every_phase(artifacts):
    report = json.loads((artifacts["memrope_ema"] / "validation.json").read_text())
    labels = " ".join(row["call"] for row in report["step"])
    assert "fill" in labels and "memory init" in labels and "memory update" in labels
    assert report["max_abs_error"] <= 1e-5


def _session(artifact):
    return ort.InferenceSession(str(artifact / "step.onnx"), providers=["CPUExecutionProvider"])


def test_ema_and_rope_are_computed_by_graph_ops(artifacts, golden_dit):
    """Feed the exported graph a hand-made cache state directly (no loop, no Python RoPE or EMA)
    and check the memory and the rotation it computes against the PyTorch core."""
    artifact = load_artifact(artifacts["memrope_ema"])
    contract, layout = artifact.contract, artifact.layout()
    g = torch.Generator().manual_seed(7)
    feeds = {}
    for spec in contract.step.inputs:
        feeds[spec.name] = torch.randn(spec.shape, generator=g) if spec.dtype == "float32" else None
    feeds["timestep"] = torch.full((1, 3), 937.5)
    controls = CacheControls.allocate(layout)
    controls.key_valid.fill_(True)
    controls.query_positions.copy_(torch.tensor([9, 10, 11]))
    controls.memory_ready.fill_(True)
    controls.memory_update.fill_(True)
    feeds.update(controls.as_dict())
    session = _session(artifact.path)

    def run(f):
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, {k: v.numpy() for k, v in f.items()}), strict=True))

    out = run(feeds)
    # EMA: the graph's memory equals the core's update from the parked (evicted) slots.
    n = layout.context_tokens
    for i in range(artifact.model.num_layers):
        past_v = feeds[f"past_key_values.{i}.value"]
        want_k, _ = memory_update(feeds[memory_key(i)], feeds[f"memory.{i}.value"], feeds[past_key(i)][:, n:],
                                  past_v[:, n:], controls.memory_init, controls.memory_update, layout.config,
                                  layout.frame_tokens)
        np.testing.assert_allclose(out[present_memory_key(i)], want_k.numpy(), atol=1e-6, rtol=0)
    # RoPE: the flow follows the eager core, moves when the positions are permuted, and
    # does not move under a uniform shift (rotations are relative).
    step = EagerBackend(golden_dit, artifact.run).module

    def eager_flow(f):
        c = CacheControls(*(f[k] for k in ("key_positions", "key_valid", "query_positions", "memory_ready",
                                           "memory_init", "memory_update")))
        L = artifact.model.num_layers
        with torch.no_grad():
            return step(f["latents"], f["timestep"], f["sigma"], [f[f"past_key_values.{i}.key"] for i in range(L)],
                        [f[f"past_key_values.{i}.value"] for i in range(L)],
                        [f[f"cross_key_values.{i}.key"] for i in range(L)],
                        [f[f"cross_key_values.{i}.value"] for i in range(L)], c,
                        [f[f"memory.{i}.key"] for i in range(L)], [f[f"memory.{i}.value"] for i in range(L)]).flow

    np.testing.assert_allclose(out["flow"], eager_flow(feeds).numpy(), atol=1e-5, rtol=0)
    permuted = dict(feeds, key_positions=feeds["key_positions"].flip(0).contiguous())
    out_permuted = run(permuted)["flow"]
    assert np.abs(out_permuted - out["flow"]).max() > 1e-3
    np.testing.assert_allclose(out_permuted, eager_flow(permuted).numpy(), atol=1e-5, rtol=0)
    shifted = dict(feeds, key_positions=feeds["key_positions"] + 7, query_positions=feeds["query_positions"] + 7)
    np.testing.assert_allclose(run(shifted)["flow"], out["flow"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tensorrt_audit_passes_for_every_variant(dtype, request):
    """Every graph of the shared exports (fp32: validated; bf16/fp16: with a VAE decoder) passed
    the TensorRT parser audit at export, as ``audit.json`` records, in the graph's own dtype."""
    path = (request.getfixturevalue("artifacts")["memrope_ema"] if dtype == "float32"
            else request.getfixturevalue("low_precision_exports")[dtype])
    audits = json.loads((path / "audit.json").read_text())
    contract = json.loads((path / "contract.json").read_text())
    assert sorted(audits) == sorted(f"{graph}.onnx" for graph in contract["graphs"])
    assert {"step.onnx", "text.onnx", "recache.onnx"} <= set(audits)
    for name, audit in audits.items():
        assert audit["problems"] == [] and audit["opset"] == 23, name
        assert "Attention" in audit["op_counts"] or name in ("text.onnx", "vae_decode.onnx")
    step = audits["step.onnx"]
    if dtype != "float32":
        low = {"bfloat16": "BF16", "float16": "FP16"}[dtype]
        assert step["dtypes_by_op"]["MatMul"] == [low] and low in step["dtypes_by_op"]["Attention"]
        # Deliberate fp32 islands (RMSNorm statistics, RoPE, timestep features) are explicit casts.
        assert step["fp32_islands"]["casts_to_float32"]
    assert contract["dtype"] == dtype


def test_export_rejects_bad_resolution_and_leaves_nothing(golden_dit, tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        export_artifact(golden_dit, golden_run("memrope_ema"), tmp_path / "art", height=30, width=48)
    assert list(tmp_path.iterdir()) == []


def test_failed_validation_leaves_no_directory(golden_dit, tmp_path):
    with pytest.raises(ExportMismatchError, match="max abs error"):
        export_artifact(golden_dit, golden_run("memrope_ema"), tmp_path / "art", validation_blocks=1,
                        validation_atol=0.0, **GOLDEN_PIXELS)
    assert list(tmp_path.iterdir()) == []


def test_stale_or_edited_artifacts_are_refused(artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifacts["memrope_ema"], art)
    config = json.loads((art / "config.json").read_text())
    config["run"]["cache"]["alpha_long"] = 0.02
    (art / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactMismatchError, match="config hash"):
        load_artifact(art)
    shutil.rmtree(art)
    shutil.copytree(artifacts["memrope_ema"], art)
    contract = json.loads((art / "contract.json").read_text())
    contract["graphs"]["step"]["inputs"][0]["shape"] = [1, 3, 16, 4, 8]
    (art / "contract.json").write_text(json.dumps(contract))
    with pytest.raises(ArtifactMismatchError, match="contract"):
        load_artifact(art)
    shutil.rmtree(art)
    shutil.copytree(artifacts["memrope_ema"], art)
    shutil.copy(artifacts["memrope_eviction"] / "step.onnx", art / "step.onnx")
    with pytest.raises(ArtifactMismatchError, match="step.onnx has .* bytes, the export wrote"):
        load_artifact(art)


def test_contract_and_config_must_be_json_objects_in_utf8(artifacts, tmp_path, capsys):
    for name, data, says in (("contract.json", b"[]", "artifact contract {} holds a JSON list; expected a JSON object"),
                             ("config.json", b"[]", "artifact config {} holds a JSON list; expected a JSON object"),
                             ("contract.json", b'{"note": "caf\xe9"}', "artifact contract {} is not UTF-8 text")):
        art = tmp_path / "art"
        shutil.rmtree(art, ignore_errors=True)
        shutil.copytree(artifacts["memrope_ema"], art)
        (art / name).write_bytes(data)
        with pytest.raises(ValueError, match="expected a"):
            load_artifact(art)
        assert _generate(art, tmp_path) == 2
        err = capsys.readouterr().err
        assert says.format(art / name) in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out.safetensors").exists()


def test_a_file_given_as_the_artifact_is_called_a_file(tmp_path, capsys):
    step = tmp_path / "step.onnx"
    step.write_bytes(b"a graph file, not the artifact folder")
    for args in (["build", str(step), "--target", "rtx"], None):
        code = main(args) if args else _generate(step, tmp_path)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"artifact {step} is a file, not an artifact directory" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.onnx"]


def test_a_graph_from_another_export_is_refused_by_name(artifacts, golden_dit, tmp_path, capsys):
    """Same architecture, another alpha: step.onnx has the same size and names, only constants
    differ. The contract's SHA-256 of every graph file catches it."""
    run = golden_run("memrope_ema")
    other = export_artifact(golden_dit, replace(run, cache=replace(run.cache, alpha_long=0.02)), tmp_path / "other",
                            validate=False, **GOLDEN_PIXELS).path
    art = tmp_path / "art"
    shutil.copytree(artifacts["memrope_ema"], art)
    pinned = art / "step.onnx"
    assert pinned.stat().st_size == (other / "step.onnx").stat().st_size
    assert pinned.read_bytes() != (other / "step.onnx").read_bytes()
    original = pinned.stat()
    shutil.copy(other / "step.onnx", pinned)
    os.utime(pinned, ns=(original.st_atime_ns, original.st_mtime_ns))  # no mtime tells the swap apart
    for verify in (False, True):
        with pytest.raises(ArtifactMismatchError, match=r"step.onnx differs .*SHA-256"):
            load_artifact(art, verify=verify)
    assert _generate(art, tmp_path, **{"--verify-artifact": ""}) == 2
    err = capsys.readouterr().err
    assert "step.onnx differs" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def _generate(artifact, tmp_path, **override):
    return main(golden_generate_args(tmp_path / "out.safetensors", backend="onnxruntime", engine=artifact,
                                     **override))


def test_generate_errors_with_an_artifact(artifacts, golden_dir, tmp_path, capsys):
    save_file({"prompt_embeds": torch.zeros(1, 17, 32)}, str(tmp_path / "long.safetensors"))
    assert _generate(artifacts["memrope_ema"], tmp_path, **{"--text-embeds": tmp_path / "long.safetensors"}) == 2
    assert "expected [B, L <= 16, 32]" in capsys.readouterr().err
    save_file({"prompt_embeds": torch.zeros(2, 16, 32)}, str(tmp_path / "b2.safetensors"))
    assert _generate(artifacts["memrope_ema"], tmp_path, **{"--text-embeds": tmp_path / "b2.safetensors"}) == 2
    assert "batch" in capsys.readouterr().err
    assert _generate(artifacts["memrope_ema"], tmp_path, **{"--config": golden_dir / "memrope_eviction.yaml"}) == 2
    assert "exported for a different configuration" in capsys.readouterr().err
    assert _generate(None, tmp_path) == 2
    assert "needs --engine" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
