"""Text to video end to end with the embedded demo model (tiny, random, no downloads): the MP4
opens with the expected frame count, size and fps; the demo passes on CPU; durations and bad
input give clear errors and write nothing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from memrope.config import WanConfig
from memrope.runtime.cli import main
from memrope.runtime.demo.train import TEXT_LEN
from memrope.runtime.t2v import DEMO_LATENT, DEMO_PROMPT, ensure_demo_model, latent_frames_for, video_frames_for

# A paragraph in the style of LongLive's interactive prompts (our own words, 111 of them).
LONG_PROMPT = (
    "A wide, steady shot of a quiet harbour town at the end of a summer afternoon. A small red fishing boat "
    "drifts slowly past the old stone pier while gulls circle above the masts, and the water catches long "
    "streaks of orange light from the setting sun. On the pier an old man in a grey wool coat mends a net, "
    "pausing now and then to watch the boat. Behind him the white houses climb the hillside, their windows "
    "glowing one by one as the evening settles in. The camera holds its position, the colours warm and soft, "
    "with gentle film grain and a calm, unhurried rhythm throughout the whole scene.")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("memrope-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEMROPE_CACHE", str(path))
    yield path
    mp.undo()


def _probe(path: Path) -> tuple[int, int, int, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.codec_context.width, stream.codec_context.height, float(stream.average_rate)


def test_duration_arithmetic():
    assert latent_frames_for(60, 3) == 243 and video_frames_for(243) == 969
    assert latent_frames_for(0.01, 3) == 3 and video_frames_for(3) == 9
    for bad in (0, -1, float("nan"), 1e9):
        with pytest.raises(ValueError, match="--seconds"):
            latent_frames_for(bad, 3)


def test_embedded_demo_writes_an_mp4(cache_dir, tmp_path):
    """Two runs of the same ``memrope generate``, each a fresh process as a user runs it, make the
    same video: the same latents and the same frames, byte for byte (the PNGs); the second reads the
    prompt from the cache (no encoder load). Both MP4s hold those frames. (The H.264 bitstream of a
    run that first loaded the text encoder has been seen to differ from a cached run's for the same
    frames, so the MP4 bytes are not compared.)"""
    out = tmp_path / "videos" / "demo.mp4"

    def argv(run: str) -> list[str]:
        return [sys.executable, "-m", "memrope", "generate", "--preset", "tiny", "--prompt", DEMO_PROMPT, "--seconds",
                "2", "--out", str(out), "--no-progress", "--latents-out", str(tmp_path / f"{run}.safetensors"),
                "--png-dir", str(tmp_path / f"{run}_png")]

    env = {**os.environ, "MEMROPE_CACHE": str(cache_dir)}
    run = subprocess.run(argv("first"), capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "cache misses" in run.stderr  # the first run encodes the prompt
    latents = latent_frames_for(2, 3)
    frames, width, height, fps = _probe(out)
    assert frames == video_frames_for(latents)
    assert (height, width) == (8 * DEMO_LATENT[0], 8 * DEMO_LATENT[1]) and fps == 16
    assert not list(out.parent.glob(".*.tmp"))
    again = subprocess.run(argv("again"), capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "cache misses" not in again.stderr and "loading umT5" not in again.stderr
    assert (tmp_path / "first.safetensors").read_bytes() == (tmp_path / "again.safetensors").read_bytes()
    pngs = {run: {p.name: p.read_bytes() for p in (tmp_path / f"{run}_png").iterdir()} for run in ("first", "again")}
    assert len(pngs["first"]) == video_frames_for(latents) and pngs["first"] == pngs["again"]
    assert _probe(out)[0] == video_frames_for(latents)


def test_demo_model_is_a_real_wan_folder(cache_dir):
    folder = ensure_demo_model()
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "text_encoder", "tokenizer", "vae"):
        assert (folder / name).exists(), name
    # Loading it through --model-dir is the same path as a real Wan2.1 folder.
    from memrope.runtime.text import TextEncoder
    from memrope.runtime.vae import StreamingVAEDecoder

    encoder = TextEncoder.from_model_dir(folder, text_len=16)
    embeds = encoder.encode(["hello world"])
    assert embeds.shape == (1, 16, 32) and torch.isfinite(embeds).all()
    decoder = StreamingVAEDecoder.from_model_dir(folder)
    decoder.reset()
    frames = decoder.decode(torch.randn(1, 3, 16, *DEMO_LATENT))
    assert frames.shape[1] == 9 and frames.dtype == torch.uint8


@pytest.mark.parametrize("extra, match", [
    (["--prompt", "   "], "empty"),
    (["--prompt", "x", "--seconds", "-3"], "--seconds must be positive"),
    (["--prompt", "x", "--seconds", "100000"], "limit"),
    (["--prompt", "x", "--seconds", "2", "--num-frames", "6"], "either --seconds or --num-frames"),
])
def test_bad_input_writes_nothing(cache_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "bad.mp4"
    assert main(["generate", "--preset", "tiny", "--out", str(out), "--no-progress", *extra]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_unwritable_output_and_corrupt_model_folder(cache_dir, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main(["generate", "--preset", "tiny", "--prompt", "x", "--out", str(blocker / "v.mp4"), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"memrope generate: error: --out {blocker / 'v.mp4'}: {blocker} is not a directory\n"
    # A Wan folder with only its config.json: the first part the run needs (the prompt's tokenizer)
    # is named as missing, with the files either layout would have.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((ensure_demo_model() / "config.json").read_text())
    assert main(["generate", "--model-dir", str(broken), "--preset", "tiny", "--prompt", "x",
                 "--out", str(tmp_path / "v.mp4"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memrope generate: error: no tokenizer in {broken}: expected either the Diffusers "
                          f"layout ({broken}/text_encoder/ with config.json and model weights, plus "
                          f"{broken}/tokenizer/) or Wan's original layout"), err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.slow
def test_1002_latent_frames_through_the_whole_path_keep_host_memory_flat(tmp_path):
    """DiT with the MemRoPE cache -> streaming VAE -> MP4 for 334 blocks: the peak RSS after
    block 300 is no higher than after block 60 (+32 MB), and every frame reaches the file."""
    import resource

    from safetensors.torch import load_file

    from memrope.config import CacheConfig, RunConfig, model_preset
    from memrope.engine.eager_backend import EagerBackend
    from memrope.io import SafetensorsStreamWriter
    from memrope.model import build_dit, random_state_dict
    from memrope.pipeline import MemRoPEPipeline
    from memrope.runtime.t2v import stream_video
    from memrope.runtime.vae import StreamingVAEDecoder, build_tiny_vae
    from memrope.runtime.video import Mp4Writer
    from memrope.sampler import StreamingSeededNoise

    cfg = model_preset("tiny")
    blocks = 334
    run = RunConfig(cache=CacheConfig(), num_output_frames=3 * blocks, latent_height=4, latent_width=6)
    pipeline = MemRoPEPipeline(EagerBackend(build_dit(cfg, random_state_dict(cfg)), run), run)
    build_tiny_vae(tmp_path / "model", layout="diffusers", seed=0, base_dim=4)
    decoder = StreamingVAEDecoder.from_model_dir(tmp_path / "model")
    embeds = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(0))
    rss = {}

    def sample(frames, first_index):
        block = (first_index + frames.shape[0] - 1) // 12
        if block in (60, 300) and block not in rss:
            rss[block] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    out = tmp_path / "long.mp4"
    latents_out = tmp_path / "long.safetensors"
    with Mp4Writer(out, fps=16, width=48, height=32, preset="ultrafast") as writer, \
            SafetensorsStreamWriter(latents_out, "latents", [1, 3 * blocks, 16, 4, 6]) as latents_writer:
        result = stream_video(pipeline, embeds, StreamingSeededNoise(0, 1, (16, 4, 6), 3), blocks, decoder, writer,
                              latents_writer=latents_writer, progress=False, on_frames=sample)
    assert result.latent_frames == 1002 and result.video_frames == video_frames_for(1002)
    assert rss[300] - rss[60] < 32 * 1024  # KiB: neither the video nor the latents accumulate
    assert _probe(out)[0] == result.video_frames
    latents = load_file(str(latents_out))["latents"]
    assert latents.shape == (1, 1002, 16, 4, 6) and torch.isfinite(latents).all() and latents.abs().sum() > 0


def test_long_prompt_warns_that_it_is_truncated(cache_dir, tmp_path, caplog):
    # The demo model reads text_len=160 tokens; a longer prompt runs (as Wan does) with a warning
    # that says what is dropped, given before the run.
    long_prompt = " ".join(["a red fox runs through the snow"] * 30)
    out = tmp_path / "long.mp4"
    with caplog.at_level(logging.WARNING):
        assert main(["generate", "--preset", "tiny", "--prompt", long_prompt, "--num-frames", "9", "--out", str(out),
                     "--no-progress"]) == 0
    assert "tokens long" in caplog.text and f"text_len={TEXT_LEN}" in caplog.text and out.is_file()


def test_the_demo_reads_long_prompts_whole():
    # The README's prompt and a paragraph in LongLive's interactive style (about 110 words) fit the
    # demo's text length: every word is one token, a word it does not know one <unk>.
    from memrope.runtime.text import load_tokenizer, prompt_tokens

    tokenizer = load_tokenizer(ensure_demo_model())
    assert WanConfig.from_json(ensure_demo_model() / "config.json").text_len == TEXT_LEN
    assert prompt_tokens(tokenizer, DEMO_PROMPT) <= 16
    words = len(LONG_PROMPT.split())
    assert words >= 100 and words < prompt_tokens(tokenizer, LONG_PROMPT) <= TEXT_LEN
    ids = tokenizer(LONG_PROMPT)["input_ids"]
    assert tokenizer.unk_token_id in ids and "red" in tokenizer.decode(ids)
