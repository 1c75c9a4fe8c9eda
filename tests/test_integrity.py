"""What an artifact's integrity rests on: every graph the contract names, and every file it
loads (external weights too), is pinned in ``contract.json`` under a plain file name inside the
artifact, and the bytes that load are the bytes that were pinned. A graph edited in place (its
mtime put back, as disk corruption keeps it) or swapped in from another export never runs: a
one-line ``ArtifactMismatchError`` (exit 2) names the file, and nothing is written.
(TensorRT plans and the graphs they were built from: test_plan_sources.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from memrope.artifact import ArtifactMismatchError, load_artifact, pin_files
from memrope.runtime.cli import main

GOLDEN = Path(__file__).parent / "data" / "golden"


def _copy(artifacts, tmp_path: Path, name: str = "art") -> Path:
    art = tmp_path / name
    shutil.copytree(artifacts["memrope_ema"], art)
    return art


def _contract(art: Path) -> dict:
    return json.loads((art / "contract.json").read_text())


def _write_contract(art: Path, doc: dict) -> None:
    (art / "contract.json").write_text(json.dumps(doc, indent=1))


def _pin(file: Path) -> dict:
    return {"bytes": file.stat().st_size, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def _externalise(art: Path, graph: str = "step") -> None:
    """Move ``graph``'s weights into ``<graph>.onnx.data`` (as exports past 2 GB are written) and pin it."""
    model = onnx.load(str(art / f"{graph}.onnx"))
    onnx.save_model(model, str(art / f"{graph}.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{graph}.onnx.data", size_threshold=1024)
    doc = _contract(art)
    doc["files"] = pin_files(art)
    _write_contract(art, doc)


def _edit_in_place(file: Path, weights: bytes) -> None:
    """Overwrite 64 float32 values of ``weights`` (found in ``file``) with 1e4 .. 1e38, size and
    mtime unchanged: what a bad sector or an in-place edit leaves."""
    data = file.read_bytes()
    offset = data.find(weights)
    assert offset >= 0 and len(weights) >= 256
    stat = file.stat()
    with open(file, "r+b") as handle:
        handle.seek(offset)
        handle.write(np.logspace(4, 38, 64, dtype=np.float32).tobytes())
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_size == stat.st_size and file.stat().st_mtime_ns == stat.st_mtime_ns


def _largest_weights(model: onnx.ModelProto) -> onnx.TensorProto:
    return max(model.graph.initializer, key=lambda t: len(t.raw_data))


def _generate(art: Path, tmp_path: Path, *extra: str) -> int:
    return main(["generate", "--no-decode", "--no-progress", "--engine", str(art), "--backend", "onnxruntime",
                 "--config", str(GOLDEN / "memrope_ema.yaml"), "--text-embeds", str(GOLDEN / "inputs.safetensors"),
                 "--noise", str(GOLDEN / "inputs.safetensors"), "--latents-out", str(tmp_path / "out.safetensors"),
                 *extra])


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _swap_weights(file: Path) -> None:
    """Another export's graph of the same shape: the same file with its weights doubled."""
    model = onnx.load(str(file))
    tensor = _largest_weights(model)
    values = onnx.numpy_helper.to_array(tensor) * 2
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    onnx.save_model(model, str(file))


# --- every graph is pinned, under a plain name --------------------------------------------------------

def test_a_graph_whose_pin_was_removed_is_refused_not_ignored(artifacts, tmp_path, capsys):
    """Deleting step.onnx's entry from contract.json switched its check off: a swapped step.onnx ran,
    even with --verify-artifact, under a warning that called it "ignored"."""
    art = _copy(artifacts, tmp_path)
    _swap_weights(art / "step.onnx")
    doc = _contract(art)
    del doc["files"]["step.onnx"]
    _write_contract(art, doc)
    for verify in (False, True):
        with pytest.raises(ArtifactMismatchError, match=r"contract\.json pins no step\.onnx \(the step graph runs "
                                                        r"from it\)"):
            load_artifact(art, verify=verify)
    assert _generate(art, tmp_path, "--verify-artifact") == 2
    _one_line(capsys, "pins no step.onnx")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name", ["../other/step.onnx", "/etc/hostname", "sub/step.onnx", "..", ""])
def test_pin_names_are_plain_file_names_inside_the_artifact(artifacts, tmp_path, name):
    art = _copy(artifacts, tmp_path)
    target = Path("/etc/hostname") if name == "/etc/hostname" else art / "step.onnx"
    doc = _contract(art)
    doc["files"][name] = _pin(target)
    _write_contract(art, doc)
    with pytest.raises(ArtifactMismatchError, match=r"contract\.json pins .*, which is not a plain file name inside "
                                                    r"the artifact"):
        load_artifact(art)


# --- the bytes that load are the bytes that were pinned -------------------------------------------------

def test_a_graph_edited_in_place_with_its_mtime_kept_is_refused_by_default(artifacts, tmp_path, capsys):
    art = _copy(artifacts, tmp_path)
    _edit_in_place(art / "step.onnx", _largest_weights(onnx.load(str(art / "step.onnx"))).raw_data)
    with pytest.raises(ArtifactMismatchError, match=r"step\.onnx differs from the file the export wrote \(SHA-256"):
        load_artifact(art)
    assert _generate(art, tmp_path) == 2
    _one_line(capsys, "step.onnx differs from the file the export wrote")
    assert not (tmp_path / "out.safetensors").exists()


def test_external_weights_are_pinned_and_checked_before_their_graph_loads(artifacts, tmp_path, capsys):
    art = _copy(artifacts, tmp_path)
    _externalise(art)
    assert {"step.onnx", "step.onnx.data"} <= set(_contract(art)["files"])
    assert load_artifact(art).graph_path("step") == art / "step.onnx"
    assert _generate(art, tmp_path) == 0, capsys.readouterr().err
    (tmp_path / "out.safetensors").unlink()

    _edit_in_place(art / "step.onnx.data", _largest_weights(onnx.load(str(art / "step.onnx"))).raw_data)
    artifact = load_artifact(art)  # the weights are hashed in the background meanwhile
    assert artifact.graph_path("text") == art / "text.onnx"  # a graph that does not load them is not held up
    with pytest.raises(ArtifactMismatchError, match=r"step\.onnx\.data differs from the file the export wrote"):
        artifact.graph_path("step")
    with pytest.raises(ArtifactMismatchError, match=r"step\.onnx\.data differs"):
        load_artifact(art, verify=True)
    for extra in ((), ("--verify-artifact",)):
        assert _generate(art, tmp_path, *extra) == 2
        _one_line(capsys, "step.onnx.data differs from the file the export wrote")
        assert not (tmp_path / "out.safetensors").exists()


def test_external_weights_must_be_pinned_and_inside_the_artifact(artifacts, tmp_path, caplog):
    art = _copy(artifacts, tmp_path)
    _externalise(art)
    doc = _contract(art)
    pin = doc["files"].pop("step.onnx.data")
    _write_contract(art, doc)
    with pytest.raises(ArtifactMismatchError, match=r"step\.onnx loads step\.onnx\.data, which contract\.json does "
                                                    "not pin"):
        load_artifact(art)

    # The graph points its weights outside the artifact (pinned under a plain name, so that the
    # pins alone look fine).
    model = onnx.load(str(art / "step.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save_model(model, str(art / "step.onnx"))
    shutil.move(art / "step.onnx.data", tmp_path / "outside.data")
    shutil.copy(tmp_path / "outside.data", art / "outside.data")
    doc["files"]["step.onnx"] = _pin(art / "step.onnx")
    doc["files"]["outside.data"] = pin
    _write_contract(art, doc)
    with pytest.raises(ArtifactMismatchError, match=r"step\.onnx loads '\.\./outside\.data', which is not a plain file "
                                                    "name inside the artifact"):
        load_artifact(art)


def test_files_no_graph_loads_are_named_as_not_loaded(artifacts, tmp_path, caplog):
    art = _copy(artifacts, tmp_path)
    shutil.copy(art / "step.onnx", art / "step_old.onnx")
    with caplog.at_level("WARNING"):
        load_artifact(art)
    assert "files no graph of it loads (not read): step_old.onnx" in caplog.text
