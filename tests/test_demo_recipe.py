"""The demo model's one-command recipe (``python -m memrope.runtime.demo.train``), run for a few
steps: it writes a whole Wan2.1 model folder with a manifest that pins every weight file, which the
engine's loader opens and generates from. CI never runs the full recipe (docs/demo_training.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from memrope.config import WanConfig
from memrope.runtime.demo.train_common import check_manifest


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
    assert cfg.text_len == 32 and cfg.in_dim == 16

    # The engine's own loader and generate run it (two blocks, real frames).
    video = tmp_path / "clip.mp4"
    gen = subprocess.run([sys.executable, "-m", "memrope", "generate", "--model-dir", str(out), "--preset", "tiny",
                          "--prompt", "a red ball", "--num-frames", "6", "--height", "64", "--width", "96",
                          "--out", str(video), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert video.stat().st_size > 0
