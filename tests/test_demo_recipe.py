"""The demo model's one-command recipe (``python -m memrope.runtime.demo.train``), run for a few
steps: it writes a whole Wan2.1 model folder with a manifest that pins every weight file, which the
engine's loader opens and generates from. CI never runs the full recipe (docs/demo_training.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memrope.config import WanConfig
from memrope.runtime.demo.train import TEXT_LEN
from memrope.runtime.demo.train_common import check_manifest


@pytest.mark.slow  # the whole recipe end to end (its data, both models, a generate): about a minute
def test_the_recipe_writes_a_loadable_pinned_model_folder(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "memrope.runtime.demo.train", "--out", str(out), "--dit-steps", "2",
                           "--vae-steps", "2", "--no-eval"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["dit_steps"] == 2 and summary["vae_steps"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("python -m memrope.runtime.demo.train --out ")
    assert set(manifest["files"]) == {"diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                                      "vae/diffusion_pytorch_model.safetensors"}
    assert manifest["extra"]["dit"]["steps"] == 2 and manifest["extra"]["vae"]["latent"] == "pinned to patch-pca"
    assert check_manifest(out) == []
    assert not any(p.name.startswith(".") or p.name == "_work" for p in tmp_path.iterdir() if p != out)
    assert not (out / "_work").exists()
    cfg = WanConfig.from_json(out / "config.json")
    assert cfg.text_len == TEXT_LEN and cfg.in_dim == 16

    # The engine's own loader and generate run it (two blocks, real frames).
    video = tmp_path / "clip.mp4"
    gen = subprocess.run([sys.executable, "-m", "memrope", "generate", "--model-dir", str(out), "--preset", "tiny",
                          "--prompt", "a red ball", "--num-frames", "6", "--height", "64", "--width", "96",
                          "--out", str(video), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert video.stat().st_size > 0


def test_the_training_commands_refuse_bad_input_in_one_line_before_they_start(tmp_path):
    cases = [
        (["memrope.runtime.demo.train", "--out", str(tmp_path / "a"), "--dit-steps", "0"],
         "dit_steps must be a positive int, got 0"),
        (["memrope.runtime.demo.train", "--out", str(tmp_path / "a"), "--max-minutes", "-5"],
         "max_minutes must be a positive number of minutes"),
        (["memrope.runtime.demo.train_dit", "--out", str(tmp_path / "b"), "--steps", "2", "--vae",
          str(tmp_path / "missing.safetensors")], "latent codec file not found"),
        (["memrope.runtime.demo.train_vae", "--out", str(tmp_path / "c"), "--steps", "2", "--latent-code",
          str(tmp_path / "missing.safetensors")], "latent codec file not found"),
    ]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120)
        errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        assert len(errors) == 1 and message in errors[0] and errors[0].startswith(f"python -m {argv[0]}: error: ")
        assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial folder


def test_a_failed_training_process_stops_the_other_at_once(tmp_path):
    from memrope.runtime.demo.train import _stop, _wait_all

    (tmp_path / "dit.log").write_text("step 1\nValueError: the DiT could not start\n")
    procs = {"vae": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]),
             "dit": subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])}
    try:
        with pytest.raises(RuntimeError, match=r"the dit training failed \(exit 3\): ValueError: the DiT could not"):
            _wait_all(procs, tmp_path, poll_s=0.1)
        assert procs["vae"].poll() is None  # still running: the caller stops it
    finally:
        _stop(procs.values())
    assert procs["vae"].returncode is not None and procs["vae"].returncode != 0
