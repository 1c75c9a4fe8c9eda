"""The Python API (``memrope.VideoPipeline``) and the loader behind it and the CLI: streams with a
prompt change, ``generate`` on the CLI's own write path, an exported artifact, ``--height/--width``, and the
installed package (``python -m memrope``, a wheel beside foreign top-level modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import memrope
from memrope.runtime.cli import main

PROMPT = "a red fox trotting through fresh snow at dawn"
OTHER = "a white owl flying over the snow"


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A fresh cache for this module: the demo model is built in it, prompts are cached in it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMROPE_CACHE", str(tmp_path_factory.mktemp("memrope-cache")))
        yield


@pytest.fixture(scope="module")
def pipe(cache):
    with memrope.VideoPipeline.from_pretrained("tiny") as p:
        yield p


def _blocks(video, n: int, switch_at: int | None = None) -> list[np.ndarray]:
    out = []
    for i, frames in enumerate(video):
        out.append(frames)
        if i == switch_at:
            video.set_prompt(OTHER)
        if len(out) == n:
            return out
    raise AssertionError("the stream ended")


def test_a_stream_follows_a_prompt_change_from_the_next_block(pipe):
    with pipe.stream(PROMPT, seed=3) as video:
        plain = _blocks(video, 4)
    with pipe.stream(PROMPT, seed=3) as video:
        switched = _blocks(video, 4, switch_at=1)
    width, height = pipe.frame_size
    assert [b.shape for b in plain] == [(9, height, width, 3)] + [(12, height, width, 3)] * 3
    assert all(b.dtype == np.uint8 for b in plain)
    for i in (0, 1):  # before the change: the same video, bit for bit
        np.testing.assert_array_equal(plain[i], switched[i])
    for i in (2, 3):  # after it: another prompt's frames
        assert np.abs(plain[i].astype(int) - switched[i]).mean() > 0.5, f"block {i} ignored the new prompt"


def test_streams_are_independent_and_reproducible(pipe):
    a, b = pipe.stream(PROMPT, seed=1), pipe.stream(PROMPT, seed=1)
    try:
        for _ in range(3):  # interleaved on one pipeline: each keeps its own cache
            np.testing.assert_array_equal(next(a), next(b))
    finally:
        a.close()
        b.close()


def test_generate_writes_what_the_cli_writes(pipe, tmp_path):
    """``pipe.generate`` runs the CLI's write path: the same latents as ``memrope generate`` for
    the same prompt and seed, and an MP4 of the expected frames."""
    api_latents, cli_latents = tmp_path / "api.safetensors", tmp_path / "cli.safetensors"
    result = pipe.generate(PROMPT, seconds=2, out=tmp_path / "api.mp4", latents_out=api_latents)
    assert result.video_frames == 33 and (tmp_path / "api.mp4").stat().st_size > 0
    assert main(["generate", "--preset", "tiny", "--prompt", PROMPT, "--seconds", "2", "--no-progress",
                 "--no-decode", "--latents-out", str(cli_latents)]) == 0
    torch.testing.assert_close(load_file(str(api_latents))["latents"], load_file(str(cli_latents))["latents"],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="nothing to write"):
        pipe.generate(PROMPT, seconds=1)
    only = pipe.generate(PROMPT, seconds=2, latents_out=tmp_path / "only.safetensors")  # no decode at all
    assert only.video_frames == 0
    torch.testing.assert_close(load_file(str(tmp_path / "only.safetensors"))["latents"],
                               load_file(str(api_latents))["latents"], rtol=0, atol=0)


def test_an_exported_artifact_streams_like_eager(pipe, demo_artifact):
    demo, art = demo_artifact
    with memrope.VideoPipeline.from_pretrained(art, model_dir=demo) as exported:
        assert exported.pipeline.backend.name == "onnxruntime"
        with exported.stream(PROMPT, seed=2) as video, pipe.stream(PROMPT, seed=2) as reference:
            for _ in range(2):
                got, want = next(video).astype(int), next(reference).astype(int)
                assert np.abs(got - want).max() <= 2


def test_from_pretrained_names_a_bad_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a preset"):
        memrope.VideoPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="--backend must be one of"):
        memrope.VideoPipeline.from_pretrained("tiny", backend="onnx")


def test_generate_takes_a_resolution(tmp_path, capsys):
    import av

    out = tmp_path / "small.mp4"
    assert main(["generate", "--preset", "tiny", "--prompt", PROMPT, "--seconds", "1", "--height", "32",
                 "--width", "48", "--out", str(out), "--no-progress"]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (48, 32)
    for extra, message in ((["--height", "30", "--width", "48"], "--height must be a positive multiple of 16"),
                           (["--height", "32"], "pass --height and --width together")):
        capsys.readouterr()
        assert main(["generate", "--preset", "tiny", "--prompt", PROMPT, "--out", str(tmp_path / "x.mp4"),
                     *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.mp4").exists()


def test_the_installed_cli_entry_point_runs(tmp_path):
    """``python -m memrope`` is the CLI."""
    proc = subprocess.run([sys.executable, "-m", "memrope", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("memrope "), proc.stderr


def test_the_wheel_installs_beside_a_foreign_runtime_module(tmp_path):
    """The wheel adds one top-level name, ``memrope``: installed in a fresh virtual environment next
    to a distribution that owns a top-level ``runtime`` (and ``engine``) module, ``memrope generate``
    still runs, and the foreign modules still import as themselves."""
    import zipfile

    def build_wheel(project: Path) -> None:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(project)], check=True, timeout=300, capture_output=True)

    wheels = tmp_path / "wheels"
    build_wheel(Path(__file__).resolve().parents[1])
    wheel = next(wheels.glob("memrope_engine-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"memrope"}, tops
    # Every module of every layer folder is in it (a subpackage missing from pyproject's list is not).
    root = Path(__file__).resolve().parents[1]
    for layer, package in (("memrope", "memrope"), ("export", "memrope/export"), ("engine", "memrope/engine"),
                           ("runtime", "memrope/runtime")):
        for path in (root / layer).rglob("*.py"):
            assert f"{package}/{path.relative_to(root / layer).as_posix()}" in names, f"{path} is not in the wheel"

    foreign = tmp_path / "foreign"
    (foreign / "runtime").mkdir(parents=True)
    (foreign / "runtime" / "__init__.py").write_text("WHO = 'foreign runtime'\n")
    (foreign / "engine.py").write_text("WHO = 'foreign engine'\n")
    (foreign / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "foreign-runtime"\nversion = "1.0"\n'
        '[tool.setuptools]\npackages = ["runtime"]\npy-modules = ["engine"]\n')
    build_wheel(foreign)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies come from this environment's site-packages (a path, so its .pth files,
    # among them this checkout's editable install, are not read).
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, str(wheel)], check=True, timeout=300, capture_output=True)
    subprocess.run([*pip, str(next(wheels.glob("foreign_runtime-*.whl")))], check=True, timeout=300,
                   capture_output=True)
    # Then the dependencies, from this environment's site-packages (added as a path, so its .pth
    # files, among them this checkout's editable install, are not read).
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "zz_deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MEMROPE_CACHE"] = str(tmp_path / "cache")
    check = subprocess.run([str(py), "-c", "import runtime, engine, memrope.runtime.cli as c; "
                                           "print(runtime.WHO, '|', engine.WHO, '|', c.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("foreign runtime | foreign engine | " + site), check.stdout
    run = subprocess.run([str(venv / "bin" / "memrope"), "generate", "--preset", "tiny", "--prompt", PROMPT,
                          "--seconds", "1", "--no-decode", "--no-progress", "--latents-out", str(tmp_path / "l.safetensors")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "l.safetensors").stat().st_size > 0
