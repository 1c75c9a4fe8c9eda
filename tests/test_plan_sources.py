"""A TensorRT plan records the SHA-256 of the graph it was built from (and of its external
weights) and of itself: ``memrope build`` rebuilds a plan copied from another export of the same
config instead of calling it up to date, and loading refuses it (or a plan whose bytes are not
the ones its sidecar describes) before deserializing it. Real TensorRT-RTX builds of the tiny
text graph (half a second each), no GPU needed."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import shutil
from pathlib import Path

import pytest
from test_integrity import _contract, _copy, _pin, _swap_weights, _write_contract

from memrope.artifact import load_artifact
from memrope.engine.sidecar import EngineMismatchError, plan_path, read_sidecar, sidecar_path
from memrope.runtime.cli import main

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed (pip install -e '.[rtx]'; "
                                                   "TensorRT-RTX builds engines with no GPU)")


def _build_text(art: Path, *extra: str) -> str:
    """``memrope build ART --target rtx --graph text`` in this process (the tiny fp32 text graph:
    half a second); what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["build", str(art), "--target", "rtx", "--graph", "text", *extra]) == 0
    return printed.getvalue()


@pytest.fixture()
def two_exports(artifacts, tmp_path):
    """(a, b): the same config exported twice with other weights (b's text graph doubled); a has
    a text plan built."""
    a, b = _copy(artifacts, tmp_path, "a"), _copy(artifacts, tmp_path, "b")
    _swap_weights(b / "text.onnx")
    doc = _contract(b)
    doc["files"]["text.onnx"] = _pin(b / "text.onnx")
    _write_contract(b, doc)
    assert load_artifact(a).contract.config_hash == load_artifact(b).contract.config_hash
    _build_text(a)
    return a, b


def _plan_files(art: Path) -> tuple[Path, Path]:
    plan = plan_path(art, "text")
    return plan, sidecar_path(plan)


@needs_rtx
def test_a_plan_records_the_sha256_of_its_graph_and_of_itself(two_exports):
    a, _ = two_exports
    plan, sidecar = _plan_files(a)
    recorded = read_sidecar(sidecar)
    assert recorded.source_sha256 == {"text.onnx": _contract(a)["files"]["text.onnx"]["sha256"]}
    assert recorded.plan_sha256 == hashlib.sha256(plan.read_bytes()).hexdigest()


@needs_rtx
def test_build_rebuilds_a_plan_copied_from_another_export_of_the_same_config(two_exports):
    """Its sidecar's config hash matched, so `memrope build` called the copied plan up to date."""
    a, b = two_exports
    for file in _plan_files(a):
        shutil.copy(file, b / file.name)
    printed = _build_text(b)
    assert "up to date" not in printed and f"{plan_path(b, 'text')}: " in printed
    assert read_sidecar(sidecar_path(plan_path(b, "text"))).source_sha256 == {
        "text.onnx": _contract(b)["files"]["text.onnx"]["sha256"]}
    assert "up to date" in _build_text(b)
    # The plan alone copied over (its sidecar kept): not the plan that sidecar describes.
    shutil.copy(plan_path(a, "text"), plan_path(b, "text"))
    assert "up to date" not in _build_text(b)


@needs_rtx
def test_loading_refuses_a_plan_of_another_export_before_deserializing_it(two_exports):
    from memrope.engine.tensorrt_backend import open_plans

    a, b = two_exports
    for file in _plan_files(a):
        shutil.copy(file, b / file.name)
    with pytest.raises(EngineMismatchError) as err:
        open_plans(load_artifact(b), ("text",))
    message = str(err.value)
    assert "source_sha256: the plan was built from another text.onnx" in message and "\n" not in message, message
    assert message.endswith(f"`memrope build {b} --target rtx --force`"), message

    _build_text(b)  # a plan of b's own graph, then a's plan bytes under b's sidecar
    shutil.copy(plan_path(a, "text"), plan_path(b, "text"))
    with pytest.raises(EngineMismatchError, match=r"text\.plan is not the plan its sidecar describes \(SHA-256"):
        open_plans(load_artifact(b), ("text",))
