"""Streaming Wan VAE decode and MP4 output, on CPU with tiny random VAEs (no downloads).

Streaming in blocks equals the one-shot decode frame for frame (no seams, no lost frames); the
Diffusers and Wan original layouts load the same weights; the key mapping round-trips and agrees
with diffusers' own converter; bad folders and files give errors that name what is wrong; the MP4
writer is incremental, atomic and checks its inputs; memory stays flat over 1000 latent frames.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from memrope.runtime.vae import (
    WAN21_VAE_CONFIG,
    WAN_VAE_FILE,
    StreamingVAEDecoder,
    _wan_vae_config,
    build_tiny_vae,
    decode_all,
    diffusers_to_wan_key,
    diffusers_to_wan_state_dict,
    tiny_vae_config,
    wan_to_diffusers_state_dict,
)
from memrope.runtime.video import Mp4Writer, write_png_frames

LATENT_HW = (4, 6)  # 32 x 48 pixels


def _latents(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, 16, *LATENT_HW, generator=g)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory) -> Path:
    return build_tiny_vae(tmp_path_factory.mktemp("vae-diffusers"), layout="diffusers", seed=0)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return build_tiny_vae(tmp_path_factory.mktemp("vae-wan"), layout="wan", seed=0)


@pytest.fixture(scope="module")
def decoder(diffusers_dir) -> StreamingVAEDecoder:
    return StreamingVAEDecoder.from_model_dir(diffusers_dir)


def _probe(path: Path) -> tuple[int, int, int, float, list[np.ndarray]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return len(frames), stream.codec_context.width, stream.codec_context.height, float(stream.average_rate), \
            frames


# ------------------------------------------------------------------------------------------------
# Streaming decode
# ------------------------------------------------------------------------------------------------

def test_streaming_equals_one_shot(decoder):
    latents = _latents(9)
    reference = decode_all(decoder.vae, latents)
    assert reference.shape == (1, 1 + 4 * 8, 32, 48, 3) and reference.dtype == torch.uint8
    assert reference.float().std() > 10  # not a saturated, constant picture

    decoder.reset()
    chunks = []
    for i in range(0, 9, 3):
        chunks.append(decoder.decode(latents[:, i:i + 3]))
        decode_all(decoder.vae, _latents(2, seed=5))  # the stock decode does not touch our cache
    assert [c.shape[1] for c in chunks] == [9, 12, 12]
    streamed = torch.cat(chunks, dim=1)
    assert streamed.shape == reference.shape
    assert (streamed.int() - reference.int()).abs().max() <= 1
    assert decoder.latent_frames_decoded == 9

    # Uneven chunks give the same video; restarting the cache at each chunk (the reference's
    # re-chunking) does not, which shows the comparison would catch seams.
    decoder.reset()
    uneven = torch.cat([decoder.decode(latents[:, a:b]) for a, b in ((0, 1), (1, 6), (6, 9))], dim=1)
    assert (uneven.int() - reference.int()).abs().max() <= 1
    restarted = []
    for i in range(0, 9, 3):
        decoder.reset()
        restarted.append(decoder.decode(latents[:, i:i + 3]))
    assert sum(c.shape[1] for c in restarted) == 27  # 6 frames lost at the 2 seams
    assert (restarted[1][:, 1:].int() - reference[:, 13:21].int()).abs().max() > 1


def test_streaming_with_patch_size():
    # Wan2.2-style residual decoder with patch_size 2 (unpatchified per frame): same guarantee.
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**dict(tiny_vae_config(), is_residual=True, patch_size=2, in_channels=12,
                                  out_channels=12))
    latents = _latents(7)
    reference = decode_all(vae, latents)
    stream = StreamingVAEDecoder(vae)
    streamed = torch.cat([stream.decode(latents[:, i:i + 3]) for i in range(0, 7, 3)], dim=1)
    assert streamed.shape == reference.shape == (1, 25, 64, 96, 3)
    assert (streamed.int() - reference.int()).abs().max() <= 1


def test_stream_checks_its_input(decoder):
    decoder.reset()
    decoder.decode(_latents(3))
    with pytest.raises(ValueError, match="reset"):
        decoder.decode(torch.randn(1, 3, 16, 6, 6))
    decoder.reset()
    with pytest.raises(ValueError, match=r"expected \[B, F >= 1, 16, H, W\]"):
        decoder.decode(torch.randn(1, 16, 3, *LATENT_HW))  # channel-major layout
    with pytest.raises(TypeError):
        decoder.decode(np.zeros((1, 3, 16, *LATENT_HW), np.float32))


def test_diffusers_and_wan_layouts_decode_identically(decoder, wan_dir):
    wan = StreamingVAEDecoder.from_model_dir(wan_dir)
    a, b = decoder.vae.state_dict(), wan.vae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    latents = _latents(6, seed=1)
    decoder.reset()
    wan.reset()
    assert torch.equal(decoder.decode(latents), wan.decode(latents))


def test_key_mapping_round_trips_exactly():
    from diffusers import AutoencoderKLWan

    cfg = dict(tiny_vae_config(base_dim=4), num_res_blocks=2, dim_mult=[1, 2, 4, 4])
    torch.manual_seed(3)
    vae = AutoencoderKLWan(**cfg)
    state = vae.state_dict()
    wan = diffusers_to_wan_state_dict(state, cfg["num_res_blocks"], len(cfg["dim_mult"]))
    assert len(wan) == len(state)
    assert all(k.split(".")[0] in ("encoder", "decoder", "conv1", "conv2") for k in wan)
    back, unknown = wan_to_diffusers_state_dict(wan, cfg["num_res_blocks"], len(cfg["dim_mult"]))
    assert unknown == []
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_key_mapping_agrees_with_diffusers_converter():
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    convert = getattr(single_file_utils, "convert_wan_vae_to_diffusers", None)
    if convert is None:
        pytest.skip("this diffusers has no convert_wan_vae_to_diffusers")
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):  # Wan2.1 sizes, no memory
        names = list(AutoencoderKLWan(**WAN21_VAE_CONFIG).state_dict())
    wan_names = {diffusers_to_wan_key(k, 2, 4): k for k in names}
    assert "decoder.upsamples.3.resample.1.weight" in wan_names and "decoder.middle.1.to_qkv.weight" in wan_names
    converted = convert(wan_names)  # {diffusers name: our diffusers name}
    assert converted == {k: k for k in names}


# ------------------------------------------------------------------------------------------------
# Loading errors
# ------------------------------------------------------------------------------------------------

def test_missing_files_name_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        StreamingVAEDecoder.from_model_dir(tmp_path)
    message = str(info.value)
    assert "vae/config.json" in message and "vae/diffusion_pytorch_model.safetensors" in message
    assert WAN_VAE_FILE in message
    with pytest.raises(FileNotFoundError, match="not found"):
        StreamingVAEDecoder.from_model_dir(tmp_path / "nope")
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        StreamingVAEDecoder.from_model_dir(tmp_path)


def test_wrong_key_in_pth_is_named(wan_dir, tmp_path):
    state = torch.load(wan_dir / WAN_VAE_FILE, weights_only=True)
    state["decoder.bogus.weight"] = state.pop("decoder.head.2.weight")
    torch.save(state, tmp_path / WAN_VAE_FILE)
    (tmp_path / "config.json").write_text((wan_dir / "config.json").read_text())
    with pytest.raises(ValueError) as info:
        StreamingVAEDecoder.from_model_dir(tmp_path)
    assert "decoder.bogus.weight" in str(info.value) and "decoder.head.2.weight" in str(info.value)

    (tmp_path / WAN_VAE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        StreamingVAEDecoder.from_model_dir(tmp_path)


def test_wan_layout_beside_a_dit_config(tmp_path):
    # A real Wan2.1 folder has the DiT's config.json next to Wan2.1_VAE.pth: not VAE sizes.
    dit = {"_class_name": "WanModel", "dim": 1536, "ffn_dim": 8960, "in_dim": 16, "num_layers": 30}
    (tmp_path / "config.json").write_text(json.dumps(dit))
    cfg = _wan_vae_config(tmp_path)
    assert {k: cfg[k] for k in WAN21_VAE_CONFIG} == WAN21_VAE_CONFIG
    # The tiny builder merges its sizes into a "vae" section, leaving the DiT keys alone.
    build_tiny_vae(tmp_path, layout="wan", seed=0)
    merged = json.loads((tmp_path / "config.json").read_text())
    assert merged["dim"] == 1536 and merged["vae"]["dim"] == 8
    frames = StreamingVAEDecoder.from_model_dir(tmp_path).decode(_latents(1))
    assert frames.shape == (1, 1, 32, 48, 3)


# ------------------------------------------------------------------------------------------------
# MP4 / PNG output
# ------------------------------------------------------------------------------------------------

def test_mp4_writer_incremental(tmp_path):
    out = tmp_path / "clip.mp4"
    levels = [40, 128, 220]
    with Mp4Writer(out, fps=16, width=48, height=32) as writer:
        for i, level in enumerate(levels):
            frames = np.full((11, 32, 48, 3), level, np.uint8)
            writer.write(torch.from_numpy(frames) if i == 1 else frames)
            assert writer.frames_written == 11 * (i + 1)
        assert not out.exists()  # only a clean close publishes the file
    count, width, height, fps, decoded = _probe(out)
    assert (count, width, height, fps) == (33, 48, 32, 16.0)
    for i, level in enumerate(levels):
        assert abs(decoded[11 * i + 5].astype(float).mean() - level) < 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_mp4_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "clip.mp4"
    with pytest.raises(RuntimeError, match="boom"), Mp4Writer(out, width=48, height=32) as writer:
        for _ in range(20):  # past x264's lookahead, so the temp file really exists
            writer.write(np.zeros((4, 32, 48, 3), np.uint8))
        assert [p.name for p in tmp_path.iterdir()] != []
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    writer = Mp4Writer(out, width=48, height=32)
    writer.write(np.zeros((2, 32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="48x32"):
        writer.write(np.zeros((2, 48, 32, 3), np.uint8))  # H and W swapped: rejected, nothing encoded
    assert not writer.closed and writer.frames_written == 2
    writer.abort()
    assert writer.closed and list(tmp_path.iterdir()) == []

    writer = Mp4Writer(out, width=48, height=32)
    writer.abort()
    with pytest.raises(ValueError, match="no frames"):
        Mp4Writer(out, width=48, height=32).close()
    assert list(tmp_path.iterdir()) == []


def test_mp4_writer_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Mp4Writer(tmp_path / "missing" / "v.mp4", width=48, height=32)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        Mp4Writer(blocker / "v.mp4", width=48, height=32)
    with pytest.raises(ValueError, match="odd"):
        Mp4Writer(tmp_path / "v.mp4", width=47, height=32)
    with pytest.raises(ValueError, match="odd"):
        Mp4Writer(tmp_path / "v.mp4", width=48, height=33)
    for fps in (0, -16, float("nan")):
        with pytest.raises(ValueError, match="fps"):
            Mp4Writer(tmp_path / "v.mp4", fps=fps, width=48, height=32)
    with Mp4Writer(tmp_path / "v.mp4", width=48, height=32) as writer:
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((1, 32, 48, 3), np.float32))
        writer.write(np.zeros((1, 32, 48, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "v.mp4"]


def test_png_frames_are_lossless(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    paths = write_png_frames(tmp_path, frames, 7)
    assert [p.name for p in paths] == ["frame_000007.png", "frame_000008.png", "frame_000009.png"]
    for path, frame in zip(paths, frames, strict=True):
        with av.open(str(path)) as container:
            image = next(container.decode(video=0)).to_ndarray(format="rgb24")
        assert np.array_equal(image, frame)
    with pytest.raises(ValueError, match="does not exist"):
        write_png_frames(tmp_path / "missing", frames, 0)


# ------------------------------------------------------------------------------------------------
# Constant memory
# ------------------------------------------------------------------------------------------------

def _rss_mb() -> tuple[float, float]:
    """(peak RSS, current RSS) in MB; current falls back to peak where /proc is missing."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return peak, int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak, peak


@pytest.mark.slow
def test_memory_flat_over_1000_latent_frames(tmp_path):
    build_tiny_vae(tmp_path, layout="diffusers", seed=0, base_dim=4)  # smallest: this is about memory
    decoder = StreamingVAEDecoder.from_model_dir(tmp_path)
    decoder.reset()
    out = tmp_path / "long.mp4"
    blocks, g = 334, torch.Generator().manual_seed(0)  # 334 blocks of 3 = 1002 latent frames
    start = time.perf_counter()
    with Mp4Writer(out, width=48, height=32, crf=30) as writer:
        for b in range(blocks):
            writer.write(decoder.decode(torch.randn(1, 3, 16, *LATENT_HW, generator=g))[0])
            if b == 33:  # ~100 latent frames: everything is warm
                peak_100, rss_100 = _rss_mb()
    peak_1000, rss_1000 = _rss_mb()
    assert writer.frames_written == 1 + 4 * (3 * blocks - 1)
    assert peak_1000 - peak_100 < 50, f"peak RSS grew {peak_1000 - peak_100:.1f} MB"
    assert rss_1000 - rss_100 < 50, f"RSS grew {rss_1000 - rss_100:.1f} MB"
    count, width, height, fps, _ = _probe(out)
    assert (count, width, height, fps) == (writer.frames_written, 48, 32, 16.0)
    print(f"1002 latent frames -> {count} video frames in {time.perf_counter() - start:.1f} s; "
          f"RSS {rss_100:.0f} -> {rss_1000:.0f} MB")
