"""Training the demo VAE: a few steps lower the loss, the written ``vae/`` loads with the engine's
loader and decodes with its streaming decoder, the manifest pins the weights by SHA-256, the
training decode is the stock decode without its clamp, and clips are reproducible per seed."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from memrope.runtime.demo import train_vae as tv
from memrope.runtime.demo.train_common import (
    check_manifest,
    frames_to_tensor,
    psnr_db,
    sample_batch,
    sample_clip,
    set_seed,
    write_manifest,
)
from memrope.runtime.vae import StreamingVAEDecoder, load_vae

# 32 x 48 pixels (latent 4 x 6), 5 frames (2 latent frames), width 4: seconds on one core.
TINY = dict(base_dim=4, batch_clips=1, num_frames=5, height=32, width=48, stats_clips=2)
PROMPT = "a red ball moving to the left on a white background"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_vae")
    torch.set_num_threads(1)
    result = tv.train_vae(out, steps=12, seed=0, threads=1, progress=False, eval_prompts=(PROMPT,),
                          eval_seeds=(0,), eval_frames=9, command="pytest", **TINY)
    return out, result


def test_a_few_steps_lower_the_loss():
    # One fixed batch: fresh clips each step (as train_vae draws them) vary too much in loss
    # (a white background costs more than a black one) for 15 steps to show a trend. Seeds 0-4
    # all end below 0.45 of the first loss.
    generator = set_seed(0)
    vae = tv.build_vae(base_dim=4, seed=0)
    clips = frames_to_tensor([c.frames for c in sample_batch(0, 0, 2, 5, height=32, width=48)])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=tv.LEARNING_RATE, betas=(0.9, 0.99), weight_decay=0.0)
    losses = []
    for _ in range(15):
        loss, parts = tv.training_loss(vae, clips, generator, latent_noise=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(parts) == {"l1", "mse", "latent_l2", "anchor"}
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_vae_records_a_finite_loss_per_step(trained):
    _, result = trained
    assert len(result["losses"]) == 12 and all(np.isfinite(result["losses"]))
    assert result["step_s"] > 0 and result["threads"] == 1


def test_the_written_folder_loads_and_streams(trained):
    out, result = trained
    vae = load_vae(out)
    assert vae.config.base_dim == 4 and vae.config.z_dim == tv.Z_DIM
    assert vae.config.latents_mean == pytest.approx(result["config"]["latents_mean"])
    assert vae.config.latents_std == pytest.approx(result["config"]["latents_std"])
    assert vae.config.latents_std != [1.0] * tv.Z_DIM and min(vae.config.latents_std) > 0
    decoder = StreamingVAEDecoder(vae)
    latents = torch.randn(1, 3, tv.Z_DIM, 4, 6, generator=torch.Generator().manual_seed(0))
    frames = torch.cat([decoder.decode(latents[:, :2]), decoder.decode(latents[:, 2:])], dim=1)
    assert frames.dtype == torch.uint8 and frames.shape == (1, 9, 32, 48, 3)
    metrics = result["metrics"]
    assert metrics["clips"] == 1 and np.isfinite(metrics["psnr_db"])
    assert set(metrics["accuracy"]) == {"background", "color", "shape", "motion", "count", "overall"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_the_manifest_pins_the_weights(trained):
    out, result = trained
    folder = out / "vae"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"diffusion_pytorch_model.safetensors"}
    for name, pin in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert pin == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["command"] == "pytest" and manifest["steps"] == 12
    assert manifest["losses"] == pytest.approx(result["losses"])
    assert manifest["seeds"] == {"init": 0, "data": 0, "stats": tv.STATS_SEED_OFFSET}
    assert manifest["extra"]["config"]["base_dim"] == 4
    assert check_manifest(folder) == []


def test_check_manifest_reports_changed_missing_and_unrecorded_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(3)}, str(tmp_path / "b.safetensors"))
    write_manifest(tmp_path, ["train", "--steps", "1"], {"init": 1}, 1, [0.5])
    assert json.loads((tmp_path / "manifest.json").read_text())["command"] == "train --steps 1"
    save_file({"w": torch.full((3,), 2.0)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "b.safetensors").unlink()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "c.safetensors"))
    problems = check_manifest(tmp_path)
    assert [p.split(":")[0] for p in problems] == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert "changed" in problems[0] and "missing" in problems[1] and "not in" in problems[2]


def test_write_manifest_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(ValueError, match="no weight file"):
        write_manifest(tmp_path, "x", {}, 0, [])


def test_training_decode_is_the_stock_decode_unclamped():
    vae = tv.build_vae(base_dim=4, seed=1).eval()
    z = 3.0 * torch.randn(1, tv.Z_DIM, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tv.decode_unclamped(vae, z)
        stock = vae.decode(z).sample
    assert ours.shape == stock.shape == (1, 3, 9, 32, 48)
    torch.testing.assert_close(ours.clamp(-1, 1), stock)


def test_clips_are_reproducible_per_seed_and_index():
    a, b = sample_clip(3, 7, 5), sample_clip(3, 7, 5)
    assert a.prompt == b.prompt and a.render_seed == b.render_seed and np.array_equal(a.frames, b.frames)
    assert a.frames.shape == (5, 64, 96, 3) and a.frames.dtype == np.uint8
    assert sample_clip(3, 8, 5).render_seed != a.render_seed
    batch = sample_batch(3, 2, 4, 5)
    assert [c.render_seed for c in batch] == [sample_clip(3, 8 + i, 5).render_seed for i in range(4)]
    x = frames_to_tensor([c.frames for c in batch])
    assert x.shape == (4, 3, 5, 64, 96) and x.min() >= -1 and x.max() <= 1


def test_pooled_clips_group_frames_as_the_vae_does():
    clips = torch.arange(9, dtype=torch.float32).view(1, 1, 9, 1, 1).expand(1, 3, 9, 16, 16)
    pooled = tv.pooled_clips(clips, 3)
    assert pooled.shape == (1, 3, 3, 2, 2)
    torch.testing.assert_close(pooled[0, 0, :, 0, 0], torch.tensor([0.0, 2.5, 6.5]))


def test_psnr_and_the_learning_rate_schedule():
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr_db(frames, frames) == float("inf")
    assert psnr_db(frames, frames + 1) == pytest.approx(20 * np.log10(255), abs=1e-9)
    rates = [tv.learning_rate(s, 200, 1.0) for s in range(200)]
    assert rates[0] == pytest.approx(1 / tv.WARMUP_STEPS) and max(rates) == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(tv.FINAL_LR_FRACTION, abs=1e-3)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(num_frames=6)])
def test_bad_settings_are_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        tv.train_vae(tmp_path, **{"steps": 1, "progress": False, **bad})


def test_a_pinned_latent_trains_the_encoder_and_decoder_towards_the_code(tmp_path):
    # The recipe's mode: the encoder regresses to the patch code, the decoder decodes the code.
    from memrope.runtime.demo.codec import PatchPCACodec

    code = PatchPCACodec.fit(seed=0, clips=4)
    generator = set_seed(0)
    vae = tv.build_vae(base_dim=4, seed=0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    frames = np.stack([c.frames for c in sample_batch(0, 0, 2, 5, height=32, width=48)])
    clips = frames_to_tensor(list(frames))
    codes = code.encode(frames).permute(0, 2, 1, 3, 4).contiguous()
    first = None
    for _ in range(25):
        loss, parts = tv.pinned_loss(vae, clips, codes, generator, latent_code=code, latent_offset=0.6)
        first = first or parts
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert parts["encoder_mse"] < 0.8 * first["encoder_mse"], (first, parts)
    assert parts["l1"] + parts["mse"] < 0.8 * (first["l1"] + first["mse"]), (first, parts)

    result = tv.train_vae(tmp_path, steps=2, seed=0, threads=1, progress=False, eval_prompts=(), command="pytest",
                          latent_code=code, **TINY)
    assert result["config"]["latents_mean"] == [0.0] * 16 and result["config"]["latents_std"] == [1.0] * 16
    manifest = json.loads((tmp_path / "vae" / "manifest.json").read_text())
    assert manifest["extra"]["latent"] == "pinned to patch-pca" and manifest["steps"] == 2


def test_a_latent_offset_means_the_same_change_of_every_patch():
    # The pinned decoder's target for an offset code is what the code itself decodes it to.
    from memrope.runtime.demo.codec import PatchPCACodec

    code = PatchPCACodec.fit(seed=0, clips=4)
    frames = np.full((1, 5, 64, 96, 3), 128, dtype=np.uint8)  # mid gray: no clamping either way
    frames[:, :, 16:40, 24:48] = (200, 60, 40)
    latents = code.encode(frames)  # [1, 2, 16, 8, 12]
    offsets = torch.zeros(16)
    offsets[0], offsets[3] = 0.4, -0.3
    moved = code.decode(latents + offsets.view(1, 1, 16, 1, 1)).astype(np.float64)
    before = code.decode(latents).astype(np.float64)
    change = (code.offset_pixels(offsets).numpy() * 127.5)  # [8, 8, 3], in pixel levels
    expected = np.tile(change, (8, 12, 1))
    assert np.abs(expected).max() > 10  # the offset is visible
    np.testing.assert_allclose(moved - before, np.broadcast_to(expected, moved.shape), atol=1.01)


@pytest.mark.parametrize("offset, message", [(-0.1, "finite number >= 0"), (float("nan"), "finite number"),
                                             (0.5, "needs latent_code")])
def test_a_bad_latent_offset_is_refused_before_training(tmp_path, offset, message):
    # Offsets mean something only under the code they are decoded by (the free autoencoder has none).
    with pytest.raises(ValueError, match=message):
        tv.train_vae(tmp_path, steps=1, latent_offset=offset, progress=False, **TINY)
    assert not any(tmp_path.iterdir())
