"""Bad input gets a one-line error naming what is wrong and what was expected (exit 2), and
nothing is written; a run that fails after it started writing leaves an earlier output as it was."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import golden_generate_args
from safetensors.torch import load_file, save_file

from memrope.runtime.cli import main


@pytest.fixture()
def files(golden_dir, tmp_path):
    paths = {name: golden_dir / name for name in ("tiny_selfforcing.pt", "config.json", "memrope_ema.yaml",
                                                  "inputs.safetensors")}
    paths["out"] = tmp_path / "out" / "latents.safetensors"
    return paths


def _fails(files, capsys, match, **override):
    assert main(golden_generate_args(files["out"], **override)) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not files["out"].exists()
    assert not files["out"].parent.exists() or not any(files["out"].parent.iterdir())


def test_missing_checkpoint(files, tmp_path, capsys):
    _fails(files, capsys, "missing.pt", **{"--checkpoint": tmp_path / "missing.pt"})


def test_truncated_checkpoint(files, tmp_path, capsys):
    data = files["tiny_selfforcing.pt"].read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    _fails(files, capsys, "truncated", **{"--checkpoint": bad})


def test_config_inconsistent_with_checkpoint(files, tmp_path, capsys):
    cfg = json.loads(files["config.json"].read_text())
    cfg["num_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _fails(files, capsys, "does not match the model config", **{"--model-config": tmp_path / "config.json"})


def test_impossible_cache_layout(files, tmp_path, capsys):
    text = files["memrope_ema.yaml"].read_text().replace("local_attn_size: 12", "local_attn_size: 6")
    (tmp_path / "bad.yaml").write_text(text)
    _fails(files, capsys, "impossible cache layout", **{"--config": tmp_path / "bad.yaml"})


def test_noise_of_the_wrong_shape(files, tmp_path, capsys):
    save_file({"noise": torch.zeros(1, 30, 16, 4, 5), "intermediate_noise": torch.zeros(10, 3, 3, 16, 4, 5)},
              str(tmp_path / "noise.safetensors"))
    _fails(files, capsys, "expected [1, F, 16, 4, 6]", **{"--noise": tmp_path / "noise.safetensors"})
    save_file({"noise": torch.zeros(1, 30, 16, 4, 6), "intermediate_noise": torch.zeros(10, 2, 3, 16, 4, 6)},
              str(tmp_path / "noise2.safetensors"))
    _fails(files, capsys, "intermediate_noise has shape", **{"--noise": tmp_path / "noise2.safetensors"})
    save_file({"noise": torch.zeros(1, 30, 16, 4, 6)}, str(tmp_path / "noise3.safetensors"))
    _fails(files, capsys, "no tensor 'intermediate_noise'", **{"--noise": tmp_path / "noise3.safetensors"})


def test_embeddings_of_the_wrong_shape(files, tmp_path, capsys):
    save_file({"prompt_embeds": torch.zeros(1, 16, 31)}, str(tmp_path / "emb.safetensors"))
    _fails(files, capsys, "expected [B, L <= 16, 32]", **{"--text-embeds": tmp_path / "emb.safetensors"})
    save_file({"prompt_embeds": torch.zeros(2, 16, 32)}, str(tmp_path / "emb2.safetensors"))
    _fails(files, capsys, "num_samples is 1", **{"--text-embeds": tmp_path / "emb2.safetensors"})
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    _fails(files, capsys, "not a readable safetensors file", **{"--text-embeds": tmp_path / "junk.safetensors"})


def test_decode_is_not_silently_skipped(files, capsys):
    args = [a for a in golden_generate_args(files["out"]) if a != "--no-decode"]
    assert main(args) == 2
    assert "--no-decode" in capsys.readouterr().err


def test_existing_output_survives_a_run_that_fails_mid_stream(files, tmp_path, capsys):
    """The latents stream to a temp file that replaces the output only when the run succeeds:
    a run that wrote blocks 0 and 1 and then failed on block 2 (noise of 1e30 there) leaves the
    earlier result as it was, and no temp file beside it."""
    tensors = load_file(str(files["inputs.safetensors"]))
    tensors["noise"] = tensors["noise"].clone()
    tensors["noise"][:, 7] = 1e30  # latent frame 7: block 2 of 3-frame blocks
    save_file(tensors, str(tmp_path / "noisy.safetensors"))
    files["out"].parent.mkdir(parents=True)
    files["out"].write_bytes(b"previous result")
    assert main(golden_generate_args(files["out"], **{"--noise": tmp_path / "noisy.safetensors"})) == 1
    err = capsys.readouterr().err
    assert "memrope generate: error: block 2 (latent frames 6..8)" in err, err  # failed mid-run, not before
    assert files["out"].read_bytes() == b"previous result"
    assert [p.name for p in files["out"].parent.iterdir()] == [files["out"].name]


def test_an_unreadable_tensor_file_says_why_not_that_it_is_missing(files, tmp_path, capsys):
    folder = tmp_path / "embeds.safetensors"
    folder.mkdir()  # exists, but cannot be read as a file (as root, a chmod 000 file still can)
    _fails(files, capsys, f"text embeddings file {folder} cannot be read: Is a directory",
           **{"--text-embeds": folder})


def test_a_model_config_that_is_not_utf8_or_not_an_object_is_named(files, tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_bytes(files["config.json"].read_bytes().replace(b"{", b'{"_note": "caf\xe9",', 1))
    _fails(files, capsys, f"model config {bad} is not UTF-8 text (byte 0xe9", **{"--model-config": bad})
    bad.write_text("[]")
    _fails(files, capsys, f"model config {bad} holds a JSON list; expected a JSON object", **{"--model-config": bad})
