"""Train the demo's Wan VAE as an autoencoder of the demo world's clips.

Owns the VAE half of the demo's training recipe: the model size (diffusers ``AutoencoderKLWan``
with :func:`memrope.runtime.vae.tiny_vae_config`, so the engine's streaming decode, the
``vae_decode.onnx`` export, ONNX Runtime and TensorRT run it unchanged), the loss, the optimiser
and schedule, the per-channel latent statistics written into the config as ``latents_mean`` /
``latents_std`` (the DiT then works on normalised latents, as with Wan2.1), the measurement of
the result through the engine's own decode path (PSNR, and the demo evaluator's attribute
accuracy on reconstructed :data:`EVAL_PROMPTS` clips), and writing ``vae/`` in the Diffusers
layout with a training manifest, atomically. Does not own the architecture (diffusers), the
streaming decoder (``memrope.runtime.vae``), the world or the evaluator, nor the DiT's training.

Recipe (docs/demo_training.md has the measured numbers):

1. Data: every step draws ``batch_clips`` fresh clips of ``num_frames`` (4k + 1) frames from
   :func:`memrope.runtime.demo.train_common.sample_batch`: random single-object scenes, each
   with its own render seed, at 64 x 96.
2. Model: the encoder's posterior mean ``mu`` (the log-variance half of its output is kept for the
   format and never used), plus Gaussian noise of :data:`LATENT_NOISE` times ``mu``'s per-channel
   batch std, goes through the causal decoder one latent frame at a time with a feature cache,
   exactly as the streaming decoder runs it, but without the final clamp (which would stop the
   gradient of saturated pixels). The noise makes the decoder map nearby latents to nearby
   pictures, which is what it meets when decoding the DiT's imperfect latents.
3. Loss: L1 + MSE on pixels in [-1, 1]; plus :data:`ANCHOR_WEIGHT` * the MSE between latent
   channels 0-2 and the clip's RGB averaged over each latent frame's 8 x 8 x (1 or 4) pixels
   (:func:`pooled_clips`); plus :data:`LATENT_L2_WEIGHT` * mean(mu^2), the mean part of a KL
   term, which only keeps the latent scale from drifting (latents are normalised afterwards).
   Without the anchor the decoder learns an average picture first and then ignores its input
   (the encoder's codes differ by ~2% after the first steps), so its gradient to the encoder
   vanishes; the anchor gives the encoder a target that does not go through the decoder. Of the
   variants tried it lowered the loss most (at 32 x 48 after 300 steps, 0.20 vs 0.44), but at
   64 x 96 the decoder still merged dark backgrounds after 560 steps: docs/demo_training.md
   has the numbers and the next steps. It also makes the latent partly a small video.
4. AdamW, warm-up then cosine decay to a tenth, gradient norm clipped at 1.
5. Latent statistics: per-channel mean and std of ``mu`` over :data:`STATS_CLIPS` clips drawn
   from a stream disjoint from the training clips.

Tensors: clips ``[B, 3, T, H, W]`` in [-1, 1]; latents ``[B, C, F, h, w]`` with C = z_dim,
F = 1 + (T - 1) / 4, h = H / 8, w = W / 8 (the engine's frame-major layout ``[B, F, C, h, w]`` is a
permute of it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from memrope.io import clean_leftovers, partial_path
from memrope.runtime.args import run_command

from .train_common import (
    frames_to_tensor,
    psnr_db,
    sample_batch,
    set_seed,
    set_threads,
    write_manifest,
)
from .world import EVAL_PROMPTS, REFERENCE_HEIGHT, REFERENCE_WIDTH, render

logger = logging.getLogger(__name__)

Z_DIM = 16                    # the demo DiT's in_dim (model preset "tiny")
BASE_DIM = 8                  # decoder/encoder width; see docs/demo_training.md for the timing
TRAIN_FRAMES = 9              # 3 latent frames: the first-frame chunk and two steady chunks
BATCH_CLIPS = 2
LEARNING_RATE = 1e-3
WARMUP_STEPS = 20
FINAL_LR_FRACTION = 0.1
GRAD_CLIP_NORM = 1.0
LATENT_NOISE = 0.1            # of mu's per-channel std
LATENT_L2_WEIGHT = 1e-4
ANCHOR_WEIGHT = 1.0           # latent channels 0-2 = the clip's 8 x 8 x (1 or 4) pooled RGB
STATS_CLIPS = 32
STATS_SEED_OFFSET = 1_000_000  # stats clips come from the stream seed + this, never trained on
EVAL_FRAMES = 33               # 9 latent frames: three of the engine's 3-latent blocks
EVAL_SEEDS = (0, 1)
DECODE_BLOCK_LATENTS = 3       # latent frames per streaming decode call (the demo's DiT block)
DEFAULT_STEPS = 1800           # the time budget: 0.7-0.8 s/step on one thread, 21-24 min; quality unmeasured


def vae_config(*, z_dim: int = Z_DIM, base_dim: int = BASE_DIM) -> dict:
    """AutoencoderKLWan kwargs of the demo VAE (the format of ``tiny_vae_config``)."""
    from memrope.runtime.vae import tiny_vae_config

    return tiny_vae_config(z_dim=z_dim, base_dim=base_dim)


def build_vae(*, z_dim: int = Z_DIM, base_dim: int = BASE_DIM, seed: int = 0):
    """A freshly initialised demo VAE (seeded) in train mode."""
    from memrope.runtime.vae import _autoencoder_cls

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _autoencoder_cls()(**vae_config(z_dim=z_dim, base_dim=base_dim))
    return vae.train()


def encode_mean(vae, clips: torch.Tensor) -> torch.Tensor:
    """``[B, 3, T, H, W]`` clips -> the posterior mean ``[B, C, F, h, w]`` (unnormalised)."""
    return vae.encode(clips).latent_dist.mean


def decode_unclamped(vae, latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, F, h, w]`` unnormalised latents -> ``[B, 3, T, H, W]`` pixels, not clamped.

    The streaming decoder's loop (one latent frame per call, a causal feature cache of one slot
    per ``WanCausalConv3d``, ``first_chunk`` on frame 0) with gradients, minus the final clamp.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    x = vae.post_quant_conv(latents)
    frames = [vae.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
              for i in range(x.shape[2])]
    return torch.cat(frames, dim=2)


def training_loss(vae, clips: torch.Tensor, generator: torch.Generator, latent_noise: float = LATENT_NOISE,
                  anchor_weight: float = ANCHOR_WEIGHT) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch ``[B, 3, T, H, W]`` and its parts (floats, for logging)."""
    mu = encode_mean(vae, clips)
    z = mu
    if latent_noise > 0:
        scale = mu.detach().std(dim=(0, 2, 3, 4), keepdim=True)
        z = mu + latent_noise * scale * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
    pixels = decode_unclamped(vae, z)
    l1 = (pixels - clips).abs().mean()
    mse = (pixels - clips).square().mean()
    latent_l2 = mu.square().mean()
    anchor = (mu[:, :3] - pooled_clips(clips, mu.shape[2])).square().mean()
    loss = l1 + mse + LATENT_L2_WEIGHT * latent_l2 + anchor_weight * anchor
    return loss, {"l1": l1.item(), "mse": mse.item(), "latent_l2": latent_l2.item(), "anchor": anchor.item()}


def pinned_loss(vae, clips: torch.Tensor, codes: torch.Tensor, generator: torch.Generator,
                latent_noise: float = LATENT_NOISE, latent_code=None,
                latent_offset: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch when the latent is pinned to a fixed code (:class:`PatchPCACodec`).

    ``clips`` ``[B, 3, T, H, W]`` in [-1, 1]; ``codes`` ``[B, C, F, h, w]``: the pinned code of the
    same clips, normalised (unit variance per channel), which is the DiT's latent space as is.
    Two regressions that share no gradient: the encoder's posterior mean to the code (MSE), and
    the decoder, run as the streaming decoder runs it, from the code plus Gaussian noise of
    ``latent_noise`` (the code's std is 1) to the clip (L1 + MSE). The decoder never waits for
    the encoder to make its codes distinct, the failure of the free autoencoder at this budget
    (docs/demo_training.md), and the DiT trains on the code at the same time as the VAE.

    With ``latent_code`` (the :class:`PatchPCACodec` of ``codes``) and ``latent_offset`` > 0, each
    clip's code also gets a constant offset per channel, of a standard deviation drawn uniformly from
    ``[0, latent_offset]`` per clip, and the decoder's target moves by what that offset means
    under the code (:meth:`PatchPCACodec.offset_pixels`, clamped to the pixel range): a DiT's
    latents drift in brightness and colour, and a decoder that only ever saw codes of real
    frames turned such latents into colours of its own (measured: a dark green latent decoded
    as pinkish gray). The Gaussian noise stays noise to remove: the target keeps the clip.
    """
    mu = encode_mean(vae, clips)
    encoder_mse = (mu - codes).square().mean()
    z = codes + latent_noise * torch.randn(codes.shape, generator=generator, dtype=codes.dtype)
    target = clips
    if latent_code is not None and latent_offset > 0:
        batch, channels = codes.shape[:2]
        std = latent_offset * torch.rand((batch, 1), generator=generator, dtype=codes.dtype)
        offsets = std * torch.randn((batch, channels), generator=generator, dtype=codes.dtype)  # [B, C]
        z = z + offsets[:, :, None, None, None]
        patch = latent_code.offset_pixels(offsets)  # [B, 8, 8, 3]
        height, width = clips.shape[-2:]
        tiled = patch.permute(0, 3, 1, 2).repeat(1, 1, height // patch.shape[1], width // patch.shape[2])
        target = (clips + tiled[:, :, None]).clamp(-1.0, 1.0)
    pixels = decode_unclamped(vae, z)
    l1 = (pixels - target).abs().mean()
    mse = (pixels - target).square().mean()
    loss = l1 + mse + encoder_mse
    return loss, {"l1": l1.item(), "mse": mse.item(), "encoder_mse": encoder_mse.item()}


def pooled_clips(clips: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """``[B, 3, T, H, W]`` -> ``[B, 3, F, H / 8, W / 8]``: each latent frame's pixels averaged, the
    way the VAE groups them (latent frame 0 is video frame 0, latent frame k frames 4k-3 .. 4k)."""
    first = clips[:, :, :1]
    rest = clips[:, :, 1:]
    b, c, t, h, w = rest.shape
    groups = [first] + ([rest.reshape(b, c, t // 4, 4, h, w).mean(dim=3)] if t else [])
    video = torch.cat(groups, dim=2)[:, :, :latent_frames]
    return torch.nn.functional.avg_pool3d(video, kernel_size=(1, 8, 8))


def learning_rate(step: int, steps: int, peak: float = LEARNING_RATE) -> float:
    """Linear warm-up over :data:`WARMUP_STEPS`, then cosine decay to ``FINAL_LR_FRACTION * peak``."""
    warmup = min(WARMUP_STEPS, max(steps // 10, 1))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def latent_statistics(vae, seed: int, *, clips: int = STATS_CLIPS, num_frames: int = TRAIN_FRAMES,
                      height: int = REFERENCE_HEIGHT, width: int = REFERENCE_WIDTH) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mean over ``clips`` clips of the stream ``seed``."""
    batch = sample_batch(seed, 0, clips, num_frames, height=height, width=width)
    mus = [encode_mean(vae, frames_to_tensor(c.frames)) for c in batch]
    mu = torch.cat(mus).transpose(0, 1).reshape(mus[0].shape[1], -1).double()  # [C, everything else]
    return mu.mean(dim=1).tolist(), mu.std(dim=1).clamp_min(1e-6).tolist()


@torch.no_grad()
def reconstruct(vae, frames: np.ndarray, *, block_latents: int = DECODE_BLOCK_LATENTS) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, H, W, 3]`` the way the engine would show it: encode to
    the posterior mean, normalise with the config's ``latents_mean`` / ``latents_std`` (the DiT's
    latent space), then :class:`memrope.runtime.vae.StreamingVAEDecoder` in calls of
    ``block_latents`` latent frames."""
    from memrope.runtime.vae import StreamingVAEDecoder

    mu = encode_mean(vae.eval(), frames_to_tensor(frames))
    c = mu.shape[1]
    mean = torch.tensor(vae.config.latents_mean, dtype=mu.dtype).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=mu.dtype).view(1, c, 1, 1, 1)
    normalised = ((mu - mean) / std).permute(0, 2, 1, 3, 4)  # [1, F, C, h, w]
    decoder = StreamingVAEDecoder(vae)
    blocks = [decoder.decode(normalised[:, i:i + block_latents])
              for i in range(0, normalised.shape[1], block_latents)]
    return torch.cat(blocks, dim=1)[0].numpy()


def evaluate_reconstruction(vae, *, prompts: Sequence[str] = EVAL_PROMPTS, seeds: Sequence[int] = EVAL_SEEDS,
                            num_frames: int = EVAL_FRAMES, height: int = REFERENCE_HEIGHT,
                            width: int = REFERENCE_WIDTH) -> dict:
    """PSNR and the evaluator's accuracy on reconstructions of ``prompts`` x ``seeds`` renders.

    Returns ``psnr_db`` (mean over clips of each clip's PSNR), ``psnr_db_min``, ``clips``, and
    ``accuracy``: the fraction of clips whose background / color / shape / motion / count agree
    and the mean ``overall``, from :func:`memrope.runtime.demo.evaluate.score`.
    """
    from .evaluate import evaluate, score

    psnrs, scores = [], []
    for prompt in prompts:
        for seed in seeds:
            frames = render(prompt, num_frames, height=height, width=width, seed=seed)
            decoded = reconstruct(vae, frames)
            psnrs.append(psnr_db(frames, decoded))
            scores.append(score(evaluate(decoded), prompt))
    keys = ("background", "color", "shape", "motion", "count", "overall")
    accuracy = {k: float(np.mean([float(s[k]) for s in scores])) for k in keys} if scores else {}
    return {"clips": len(psnrs), "psnr_db": float(np.mean(psnrs)) if psnrs else float("nan"),
            "psnr_db_min": float(np.min(psnrs)) if psnrs else float("nan"), "accuracy": accuracy}


def train_vae(out_dir: str | Path, *, steps: int = DEFAULT_STEPS, seed: int = 0, threads: int = 1,
              progress: bool = True, base_dim: int = BASE_DIM, batch_clips: int = BATCH_CLIPS,
              num_frames: int = TRAIN_FRAMES, height: int = REFERENCE_HEIGHT, width: int = REFERENCE_WIDTH,
              learning_rate_peak: float = LEARNING_RATE, stats_clips: int = STATS_CLIPS,
              eval_prompts: Sequence[str] = EVAL_PROMPTS, eval_seeds: Sequence[int] = EVAL_SEEDS,
              eval_frames: int = EVAL_FRAMES, command: str | Sequence[str] | None = None,
              latent_code=None, latent_offset: float = 0.0, max_seconds: float | None = None) -> dict:
    """Train the demo VAE and write ``out_dir/vae/`` (Diffusers layout + ``manifest.json``).

    The folder appears whole or not at all (built beside it, then renamed; an existing ``vae/`` is
    replaced). ``seed`` seeds the initialisation and the training clips' stream; the latent
    statistics use the stream ``seed + STATS_SEED_OFFSET``. The evaluation loads the written folder
    with :func:`memrope.runtime.vae.load_vae` and decodes through the streaming decoder; an empty
    ``eval_prompts`` skips it.

    Returns a dict: ``losses`` (per step), ``loss_parts`` (last step), ``steps``, ``step_s``
    (median wall seconds per step, first 3 steps excluded), ``train_s``, ``threads``, ``config``
    (the VAE config written, latent statistics included), ``metrics`` (see
    :func:`evaluate_reconstruction`; absent without eval prompts), ``vae_dir``.

    ``max_seconds``: stop after the first step past that many seconds of training (the steps done
    are saved and recorded; the learning-rate schedule is the one of ``steps``).
    ``latent_code``: a :class:`memrope.runtime.demo.codec.PatchPCACodec` pins the latent to its
    code (:func:`pinned_loss`; the written ``latents_mean`` / ``latents_std`` are 0 / 1, since the
    code is the DiT's latent as is); ``None`` trains a free autoencoder (:func:`training_loss`).

    Raises:
        ValueError: ``steps`` < 1, ``num_frames`` not 4k + 1, sizes the world cannot render, or a
            negative ``latent_offset`` (or one without ``latent_code``).
    """
    from memrope.runtime.vae import DIFFUSERS_VAE_DIR, load_vae

    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1")
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames={num_frames!r} must be 4k + 1 (Wan's 4x temporal compression)")
    if not (latent_offset >= 0 and math.isfinite(latent_offset)):
        raise ValueError(f"latent_offset={latent_offset!r} must be a finite number >= 0")
    if latent_offset and latent_code is None:
        raise ValueError("latent_offset needs latent_code: an offset's target is what the code decodes it to")
    set_threads(threads)
    generator = set_seed(seed)
    out_dir = Path(out_dir)
    vae = build_vae(base_dim=base_dim, seed=seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate_peak, betas=(0.9, 0.99), weight_decay=0.0)

    losses: list[float] = []
    step_times: list[float] = []
    parts: dict[str, float] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="training the VAE", unit="step", dynamic_ncols=True)
    train_start = time.perf_counter()
    try:
        for step in range(steps):
            start = time.perf_counter()
            batch = [c.frames for c in sample_batch(seed, step, batch_clips, num_frames, height=height, width=width)]
            clips = frames_to_tensor(batch)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, learning_rate_peak)
            if latent_code is None:
                loss, parts = training_loss(vae, clips, generator)
            else:
                codes = latent_code.encode(np.stack(batch)).permute(0, 2, 1, 3, 4).contiguous()
                loss, parts = pinned_loss(vae, clips, codes, generator, latent_code=latent_code,
                                          latent_offset=latent_offset)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), GRAD_CLIP_NORM)
            optimizer.step()
            losses.append(loss.item())
            step_times.append(time.perf_counter() - start)
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", s_per_step=f"{step_times[-1]:.2f}")
                bar.update(1)
            if max_seconds is not None and time.perf_counter() - train_start > max_seconds:
                logger.info("stopping after %d of %d steps: max_seconds=%s reached", step + 1, steps, max_seconds)
                break
    finally:
        if bar is not None:
            bar.close()
    train_s = time.perf_counter() - train_start
    step_s = float(np.median(step_times[3:] if len(step_times) > 3 else step_times))

    vae.eval()
    if latent_code is None:
        mean, std = latent_statistics(vae, seed + STATS_SEED_OFFSET, clips=stats_clips, num_frames=num_frames,
                                      height=height, width=width)
    else:
        channels = vae.config.z_dim
        mean, std = [0.0] * channels, [1.0] * channels
    vae.register_to_config(latents_mean=mean, latents_std=std)

    out_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir)
    final = out_dir / DIFFUSERS_VAE_DIR
    staging = partial_path(final)
    staging.mkdir()
    try:
        vae.save_pretrained(str(staging / DIFFUSERS_VAE_DIR), safe_serialization=True)
        metrics = None
        if eval_prompts:
            eval_start = time.perf_counter()
            metrics = evaluate_reconstruction(load_vae(staging), prompts=eval_prompts, seeds=eval_seeds,
                                              num_frames=eval_frames, height=height, width=width)
            metrics["eval_s"] = time.perf_counter() - eval_start
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        summary = {"config": config, "batch_clips": batch_clips, "num_frames": num_frames,
                   "height": height, "width": width, "learning_rate": learning_rate_peak,
                   "latent_noise": LATENT_NOISE, "latent_offset": latent_offset if latent_code is not None else 0.0,
                   "latent_l2_weight": LATENT_L2_WEIGHT,
                   "anchor_weight": ANCHOR_WEIGHT if latent_code is None else None,
                   "latent": "free" if latent_code is None else f"pinned to {latent_code.name}",
                   "threads": threads, "step_s": step_s, "train_s": train_s, "loss_parts": parts,
                   **({"metrics": metrics} if metrics is not None else {})}
        write_manifest(staging / DIFFUSERS_VAE_DIR,
                       command if command is not None else f"train_vae(steps={steps}, seed={seed})",
                       {"init": seed, "data": seed, "stats": seed + STATS_SEED_OFFSET}, len(losses), losses,
                       extra=json.loads(json.dumps(summary, default=float)))
        if final.exists():
            old = partial_path(final, "old")
            final.rename(old)
            (staging / DIFFUSERS_VAE_DIR).rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            (staging / DIFFUSERS_VAE_DIR).rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote the trained VAE (%d steps, %.2f s/step) to %s", len(losses), step_s, final)
    return {"losses": losses, "loss_parts": parts, "steps": len(losses), "step_s": step_s, "train_s": train_s,
            "threads": threads, "config": config, **({"metrics": metrics} if metrics is not None else {}),
            "vae_dir": str(final)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memrope.runtime.demo.train_vae",
                                     description="Train the demo's Wan VAE on the demo world and write OUT/vae/.")
    parser.add_argument("--out", required=True, type=Path, help="model folder; vae/ is written inside it")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--base-dim", type=int, default=BASE_DIM, help=f"VAE width (default {BASE_DIM})")
    parser.add_argument("--latent-code", type=Path, default=None,
                        help="pin the latent to this patch code (a PatchPCACodec .safetensors file); default: free")
    parser.add_argument("--latent-offset", type=float, default=0.0,
                        help="with --latent-code: per clip and channel, code offsets of a std drawn from [0, this], "
                             "decoded to what the code means (default 0: none)")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help=f"peak learning rate (default {LEARNING_RATE})")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this many minutes of training (the steps done are saved)")
    parser.add_argument("--no-eval", action="store_true", help="skip PSNR and the evaluator on EVAL_PROMPTS")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="the full traceback on a failure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(parser.prog, lambda: _main(args, argv), verbose=args.verbose)


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    latent_code = None
    if args.latent_code is not None:
        from .codec import PatchPCACodec

        latent_code = PatchPCACodec.load(args.latent_code)
    result = train_vae(args.out, steps=args.steps, seed=args.seed, threads=args.threads, progress=not args.quiet,
                       base_dim=args.base_dim, eval_prompts=() if args.no_eval else EVAL_PROMPTS,
                       learning_rate_peak=args.lr, latent_code=latent_code, latent_offset=args.latent_offset,
                       max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes,
                       command=["python", "-m", "memrope.runtime.demo.train_vae",
                                *(sys.argv[1:] if argv is None else argv)])
    summary = {k: result[k] for k in ("steps", "step_s", "train_s", "threads", "vae_dir")}
    summary["final_loss"] = float(np.mean(result["losses"][-20:]))
    if "metrics" in result:
        summary["metrics"] = result["metrics"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
