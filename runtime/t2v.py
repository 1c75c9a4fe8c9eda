"""Text to video, streamed: prompt -> umT5 embeddings -> DiT with the MemRoPE cache -> streaming
Wan VAE -> MP4, block by block at constant memory (decode of block b overlapping the DiT of block
b+1 when the VAE stream has a worker).

Owns: the duration arithmetic (seconds -> latent frames), the streaming driver that hands each
block's frames to the decoder and the writer as soon as the block is denoised, the model-folder
conventions, and the embedded demo model (tiny, random, generated once with a fixed seed, no
downloads). Does not own the models themselves (``memrope.model``, ``memrope.runtime.text``,
``memrope.runtime.vae``) or the MP4 container (``memrope.runtime.video``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memrope.config import VAE_TEMPORAL_STRIDE
from memrope.errors import NonFiniteError
from memrope.pipeline import MemRoPEPipeline, PromptChange
from memrope.sampler import NoiseSource

logger = logging.getLogger(__name__)

VIDEO_FPS = 16                    # Wan2.1
MAX_SECONDS = 6 * 3600.0          # beyond this, a typo is likelier than a wish
DEMO_PROMPT = "a red ball bouncing on a blue background"
DEMO_LATENT = (8, 12)             # latent height, width of the demo (64 x 96 pixels)


def latent_frames_for(seconds: float, block_frames: int) -> int:
    """Latent frames that cover ``seconds`` of 16 fps video, rounded up to whole blocks."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        raise ValueError(f"--seconds must be a number, got {seconds!r}")
    if seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {seconds}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"--seconds {seconds} exceeds the {MAX_SECONDS / 3600:.0f} h limit of one run")
    video = math.ceil(seconds * VIDEO_FPS)
    latents = 1 + math.ceil(max(video - 1, 0) / VAE_TEMPORAL_STRIDE)
    return block_frames * math.ceil(latents / block_frames)


def video_frames_for(latent_frames: int) -> int:
    return 1 + VAE_TEMPORAL_STRIDE * (latent_frames - 1)


@dataclass
class StreamResult:
    latent_frames: int
    video_frames: int
    seconds: float
    nonfinite_blocks: list[int] = field(default_factory=list)  # kept with allow_nonfinite; a failed run


def stream_video(pipeline: MemRoPEPipeline, prompt_embeds: torch.Tensor, noise: NoiseSource, num_blocks: int,
                 decoder=None, writer=None, *, latents_writer=None, progress: bool = True,
                 on_frames: Callable[[torch.Tensor, int], None] | None = None,
                 allow_nonfinite: bool = False, prompt_changes: Sequence[PromptChange] = ()) -> StreamResult:
    """Denoise ``num_blocks`` blocks; hand each block's output on as soon as it is done.
    ``prompt_changes`` switch the prompt at block boundaries (:class:`memrope.pipeline.PromptChange`).

    Per block: the decoder turns ``x0`` into uint8 frames ``[T, H, W, 3]``, which go to
    ``writer.write(frames)`` (e.g. an open :class:`memrope.runtime.video.Mp4Writer`) and
    ``on_frames(frames, first_index)``; ``latents_writer.write(frame_start, x0)`` (e.g. a
    :class:`memrope.io.SafetensorsStreamWriter`) gets the latents. Without a decoder only latents
    are written. Memory stays constant: nothing accumulates.

    ``decoder`` is a :class:`memrope.runtime.vae.VAEStream` (the engine's frame path: with ``overlap``,
    block b decodes and is written from the stream's worker while the DiT computes block b+1)
    or anything with ``reset()`` and ``decode(x0) -> [B, T, H, W, 3]`` (the diffusers reference).

    Each block is checked for NaN/Inf and for latents past the pipeline's ``max_abs_latent``
    where its output reaches the host (no extra sync: the block's flag travels with its frames);
    a failing block raises :class:`memrope.errors.NonFiniteError` naming it, before anything of
    it is written. With ``allow_nonfinite`` the run goes on and writes everything; each bad block
    is logged and listed in the result's ``nonfinite_blocks`` (the caller reports the run as failed).

    With ``progress``, a bar on stderr; while it is shown, console logging goes through tqdm
    (:func:`_logging_over_bar`), so a log line starts a line of its own instead of joining the bar's.
    """
    bar = None
    frames_total = num_blocks * pipeline.layout.block_frames
    if progress:
        from tqdm import tqdm

        total = video_frames_for(frames_total) if decoder is not None else frames_total
        bar = tqdm(total=total, unit="frame" if decoder is not None else "latent frame", desc="generating",
                   dynamic_ncols=True)
    if decoder is not None:
        decoder.reset()
    written = 0
    start = time.perf_counter()
    nonfinite: list[int] = []

    def check(block, flag: torch.Tensor) -> None:
        try:
            block.check_finite(flag)
        except NonFiniteError as exc:
            if not allow_nonfinite:
                raise
            if block.index not in nonfinite:  # the latents and the frames both check a block
                nonfinite.append(block.index)
                logger.warning("%s; kept (--allow-nonfinite)", exc)

    def emit(block, flag: torch.Tensor, frames: torch.Tensor) -> None:
        nonlocal written
        check(block, flag)  # the frames are on the host: so is the flag
        frames = frames[0]  # [T, H, W, 3] uint8, batch 0
        if writer is not None:
            writer.write(frames)
        if on_frames is not None:
            on_frames(frames, written)
        written += frames.shape[0]
        if bar is not None:
            bar.update(frames.shape[0])

    streamed = hasattr(decoder, "submit")
    pinned = pipeline.backend.device.type == "cuda"
    flags = [torch.zeros((), dtype=torch.float32, pin_memory=pinned) for _ in range(3)]
    with _logging_over_bar() if bar is not None else contextlib.nullcontext():
        try:
            for block in pipeline.blocks(prompt_embeds, noise, num_blocks, prompt_changes=prompt_changes):
                # A host copy of the block's flag, ordered before the decoder's copy of x0: ready
                # when the frames are. A ring of 3: an overlapped decoder holds at most 2 blocks.
                flag = flags[block.index % 3]
                flag.copy_(block.finite, non_blocking=True)
                if latents_writer is not None:
                    host_latents = block.x0.float().cpu()  # synchronises: the flag is ready too
                    check(block, flag)
                    latents_writer.write(block.index * pipeline.layout.block_frames, host_latents)
                if decoder is None:
                    if bar is not None:
                        bar.update(pipeline.layout.block_frames)
                elif streamed:
                    decoder.submit(block.x0, functools.partial(emit, block, flag))
                else:
                    emit(block, flag, decoder.decode(block.x0))
            if streamed:
                decoder.flush()
        except BaseException:
            if streamed:  # no frame may reach the writer after this returns (it is closed next)
                with contextlib.suppress(Exception):
                    decoder.flush()
            raise
        finally:
            if bar is not None:
                bar.close()
    return StreamResult(frames_total, written, time.perf_counter() - start, sorted(nonfinite))


def _logging_over_bar():
    """tqdm's logging redirect (console handlers of the root logger write through ``tqdm.write``,
    which clears the bar and redraws it after the line), when the root logger has a console
    handler (the CLI's ``basicConfig``); otherwise nothing: the redirect would add one."""
    if not any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
               for h in logging.root.handlers):
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def cache_root() -> Path:
    """Where the demo model and the prompt-embedding cache live: ``$MEMROPE_CACHE`` or
    ``~/.cache/memrope``."""
    return Path(os.environ.get("MEMROPE_CACHE", Path.home() / ".cache" / "memrope"))


def demo_dir(source: Path | None = None) -> Path:
    """Where the embedded demo model is copied on first use: one folder per trained model, named by
    the SHA-256 of its ``manifest.json`` (which pins every weight file), so a package that ships a
    retrained model never reads an older copy. ``source``: the model (default :func:`shipped_demo_model`)."""
    from memrope.runtime.demo.train_common import MANIFEST_FILE

    manifest = Path(source if source is not None else shipped_demo_model()) / MANIFEST_FILE
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12] if manifest.is_file() else "missing"
    return cache_root() / f"demo-{digest}"


def shipped_demo_model() -> Path:
    """The trained demo model as the package ships it (read-only: :func:`ensure_demo_model` copies it)."""
    return Path(__file__).resolve().parent / "demo" / "weights"


def ensure_demo_model(directory: Path | None = None, *, source: Path | None = None) -> Path:
    """The embedded demo model's folder: a checked copy of the package's trained model, made once,
    atomically.

    The folder has the Wan2.1 layout the real models use: ``config.json`` and
    ``diffusion_pytorch_model.safetensors`` (a small causal Wan DiT), ``text_encoder/`` +
    ``tokenizer/`` (a tiny umT5, random and frozen, with a tokenizer built in code) and ``vae/`` (a
    small Wan VAE). The DiT and the VAE were trained on the demo world
    (:mod:`memrope.runtime.demo.world`: coloured balls, squares and triangles moving over a plain
    background) by ``python -m memrope.runtime.demo.train``; its ``manifest.json`` records how, and
    the SHA-256 of every weight file, which is checked before the copy. ``source``: where the
    trained model is copied from (default :func:`shipped_demo_model`).

    Raises:
        RuntimeError: the package's model is missing a file or a weight file does not match its
            manifest (a broken install).
    """
    from memrope.io import clean_leftovers, partial_path
    from memrope.runtime.demo.train_common import MANIFEST_FILE, check_manifest

    directory = Path(directory) if directory is not None else demo_dir(source)
    if (directory / "config.json").is_file():
        return directory
    source = Path(source) if source is not None else shipped_demo_model()
    if not (source / MANIFEST_FILE).is_file() or not (source / "config.json").is_file():
        raise RuntimeError(f"the packaged demo model is missing from {source} (config.json and {MANIFEST_FILE} "
                           "expected): reinstall memrope-engine")
    problems = check_manifest(source)
    if problems:
        raise RuntimeError(f"the packaged demo model in {source} does not match its {MANIFEST_FILE}: "
                           f"{'; '.join(problems)}: reinstall memrope-engine")
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(directory.parent)
    tmp = partial_path(directory)
    try:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        try:
            tmp.rename(directory)
        except OSError:
            if not (directory / "config.json").is_file():  # not a concurrent builder that won
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("copied the trained demo model to %s", directory)
    return directory
