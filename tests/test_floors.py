"""pyproject.toml's floors are what CI tests: ``.ci/floors.py`` pins every direct dependency to its
lower bound (a self-reference such as ``memrope-engine[video]`` expands to that extra), refuses a
dependency without one, and ``--check`` says which installed versions are not their floors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "floors.py"
EXTRAS = "onnx,video,dev,rtx,serve,quantize,cluster"


def _floors():
    spec = importlib.util.spec_from_file_location("ci_floors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_direct_dependency_is_pinned_to_its_floor():
    pins = _floors().floors(EXTRAS.split(","))
    assert pins["torch"] == "2.13" and pins["numpy"] and pins["fastapi"]
    # serve's memrope-engine[video] brings the video extra's floors.
    assert "diffusers" in pins and "memrope-engine" not in pins
    out = subprocess.run([sys.executable, str(SCRIPT), EXTRAS], capture_output=True, text=True, check=True).stdout
    assert "torch==2.13" in out.splitlines() and all("==" in line for line in out.splitlines())


def test_a_dependency_without_a_floor_is_refused(tmp_path, monkeypatch):
    floors = _floors()
    project = tmp_path / "pyproject.toml"
    project.write_text('[project]\nname = "x"\ndependencies = ["numpy"]\n[project.optional-dependencies]\n')
    monkeypatch.setattr(floors, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="'numpy' has no lower bound"):
        floors.floors([])


def test_check_names_each_version_that_is_not_its_floor():
    proc = subprocess.run([sys.executable, str(SCRIPT), EXTRAS, "--check"], capture_output=True, text=True)
    assert proc.returncode in (0, 1)
    for line in proc.stderr.splitlines():
        assert ": installed " in line and ", floor " in line, line
    assert (proc.returncode == 1) == bool(proc.stderr.strip())
