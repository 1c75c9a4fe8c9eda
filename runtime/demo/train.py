"""The demo model's whole training recipe, one command: ``python -m memrope.runtime.demo.train``.

Owns the order and the assembly: the patch code the VAE's latent is pinned to
(:class:`memrope.runtime.demo.codec.PatchPCACodec`, fitted per seed), the frozen text encoder
(:func:`memrope.runtime.text.build_tiny_text_model`, seeded, random weights: docs/demo_training.md
says why), then the VAE and the DiT trained **at the same time in two processes** (one torch thread
each: they share nothing but the code, so a 2-core machine runs both at full speed), and the model
folder they make: Wan2.1's diffusers layout, with ``manifest.json`` recording the command, seeds,
steps, final losses, timings and the SHA-256 of every weight file. The folder appears whole or not
at all. Does not own either model's training (``train_vae``, ``train_dit``).

The shipped demo model (``memrope/runtime/demo/weights``) is this command's output::

    python -m memrope.runtime.demo.train --out runtime/demo/weights
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from memrope.io import atomic_write, clean_leftovers, partial_path
from memrope.runtime.args import run_command

logger = logging.getLogger(__name__)

DIT_STEPS = 4500
VAE_STEPS = 5000
VAE_LR = 2e-3        # pinned latent: 200-step probes at 1e-3 and 3e-3 were alike (3e-3 a little lower)
TEXT_LEN = 160       # ~one token per word (unknown words are one <unk>): a 130-word prompt fits
UNKNOWN_WORDS = "unk"  # the tiny tokenizer's mode (memrope.runtime.text.build_tiny_tokenizer)
TEXT_DIM = 32        # the tiny umT5's width, the DiT's text_dim
CODE_FILE = "latent_code.safetensors"
MODEL_NOTE = "memrope demo model: trained on the demo world by memrope.runtime.demo.train (see manifest.json)"


def _run(argv: list[str], log: Path) -> subprocess.Popen:
    logger.info("starting: %s (log: %s)", " ".join(argv), log)
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def _check_settings(*, seed, dit_steps, vae_steps, max_minutes) -> None:
    """ValueError naming the first bad setting, before anything is written or started."""
    for name, value in (("dit_steps", dit_steps), ("vae_steps", vae_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if max_minutes is not None and not (isinstance(max_minutes, (int, float)) and 0 < max_minutes < float("inf")):
        raise ValueError(f"max_minutes must be a positive number of minutes (or None), got {max_minutes!r}")


def _wait_all(procs: dict[str, subprocess.Popen], work: Path, poll_s: float = 1.0) -> None:
    """Wait for every training process; the first that fails raises at once (the others are
    stopped by the caller), naming it, its exit code and the last line of its log."""
    running = dict(procs)
    while running:
        for name, proc in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[name]
            if code:
                lines = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()
                raise RuntimeError(f"the {name} training failed (exit {code}): {lines[-1] if lines else 'no output'}")
        if running:
            time.sleep(poll_s)


def _stop(procs) -> None:
    """Terminate training processes still running (after a failure or an interrupt)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train(out_dir: str | Path, *, seed: int = 0, dit_steps: int = DIT_STEPS, vae_steps: int = VAE_STEPS,
          max_minutes: float | None = None, evaluate: bool = True, command: Sequence[str] | None = None) -> dict:
    """Train the demo model from scratch into ``out_dir`` (replaced atomically); return the manifest.

    ``max_minutes`` stops each model's training after that many minutes (the steps done are
    recorded); without it both run their full step counts. ``evaluate=False`` skips the VAE's
    reconstruction scores (PSNR and the evaluator on 100 clips, about 2 minutes).
    """
    from memrope.runtime.text import build_tiny_text_model

    from .codec import PatchPCACodec
    from .train_common import write_manifest

    _check_settings(seed=seed, dit_steps=dit_steps, vae_steps=vae_steps, max_minutes=max_minutes)
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir.parent)
    staging = partial_path(out_dir)
    work = staging / "_work"
    work.mkdir(parents=True)
    started = time.perf_counter()
    procs: dict[str, subprocess.Popen] = {}
    try:
        PatchPCACodec.fit(seed).save(work / CODE_FILE)
        build_tiny_text_model(staging, layout="diffusers", d_model=TEXT_DIM, text_len=TEXT_LEN, seed=seed,
                              unknown_words=UNKNOWN_WORDS)
        python = sys.executable
        limit = [] if max_minutes is None else ["--max-minutes", str(max_minutes)]
        procs["vae"] = _run([python, "-m", "memrope.runtime.demo.train_vae", "--out", str(staging),
                             "--steps", str(vae_steps), "--seed", str(seed), "--threads", "1",
                             "--latent-code", str(work / CODE_FILE), "--lr", str(VAE_LR), "--quiet",
                             *limit, *([] if evaluate else ["--no-eval"])], work / "vae.log")
        procs["dit"] = _run([python, "-m", "memrope.runtime.demo.train_dit", "--out", str(work / "dit"),
                             "--vae", str(work / CODE_FILE), "--text-encoder", str(staging),
                             "--steps", str(dit_steps), "--seed", str(seed), "--threads", "1",
                             "--text-len", str(TEXT_LEN), "--eval-prompts", "0", "--save-every", "500",
                             "--no-progress", *limit], work / "dit.log")
        _wait_all(procs, work)
        for name in ("diffusion_pytorch_model.safetensors",):
            shutil.copy2(work / "dit" / name, staging / name)
        config = json.loads((work / "dit" / "config.json").read_text())
        config["_note"] = MODEL_NOTE
        atomic_write(staging / "config.json", json.dumps(config, indent=1) + "\n")
        dit_record = json.loads((work / "dit" / "train_dit.json").read_text())
        vae_manifest = json.loads((staging / "vae" / "manifest.json").read_text())
        wall_s = time.perf_counter() - started
        extra = {
            "wall_seconds": round(wall_s, 1),
            "dit": {k: dit_record[k] for k in ("config", "model", "steps", "seconds", "seconds_per_step",
                                               "final_loss", "loss_columns", "losses")},
            "vae": {"steps": vae_manifest["steps"], "final_loss": sum(vae_manifest["losses"][-20:]) / 20,
                    **{k: vae_manifest["extra"][k] for k in ("train_s", "step_s", "loss_parts", "latent")},
                    "metrics": vae_manifest["extra"].get("metrics")},
            "text_encoder": {"weights": "random, frozen", "seed": seed, "d_model": TEXT_DIM, "text_len": TEXT_LEN,
                             "unknown_words": UNKNOWN_WORDS},
        }
        shutil.rmtree(work)
        manifest_path = write_manifest(
            staging, command if command is not None else f"train(seed={seed}, dit_steps={dit_steps}, "
                                                          f"vae_steps={vae_steps})",
            {"text_encoder": seed, "latent_code": seed, "vae": seed, "dit": seed},
            dit_record["steps"], [row[1] for row in dit_record["losses"]], extra=extra)
        if out_dir.exists():
            old = partial_path(out_dir, "old")
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_dir)
    finally:
        _stop(procs.values())
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("trained the demo model in %.1f minutes: %s", wall_s / 60, out_dir)
    return json.loads((out_dir / manifest_path.name).read_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memrope.runtime.demo.train",
                                     description="Train the demo model (VAE and DiT at once) from scratch into OUT.")
    parser.add_argument("--out", required=True, type=Path, help="the model folder to write (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0, help="every seed of the recipe (default 0)")
    parser.add_argument("--dit-steps", type=int, default=DIT_STEPS, help=f"DiT steps (default {DIT_STEPS})")
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS, help=f"VAE steps (default {VAE_STEPS})")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop each model's training after this many minutes (the steps done are recorded)")
    parser.add_argument("--no-eval", action="store_true", help="skip the VAE's reconstruction scores")
    parser.add_argument("-v", "--verbose", action="store_true", help="the full traceback on a failure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(parser.prog, lambda: _main(args, argv), verbose=args.verbose)


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    manifest = train(args.out, seed=args.seed, dit_steps=args.dit_steps, vae_steps=args.vae_steps,
                     max_minutes=args.max_minutes, evaluate=not args.no_eval,
                     command=["python", "-m", "memrope.runtime.demo.train", *(sys.argv[1:] if argv is None else argv)])
    extra = manifest["extra"]
    print(json.dumps({"out": str(args.out), "wall_minutes": round(extra["wall_seconds"] / 60, 1),
                      "dit_steps": extra["dit"]["steps"], "dit_final_loss": extra["dit"]["final_loss"],
                      "vae_steps": extra["vae"]["steps"], "vae_metrics": extra["vae"]["metrics"]}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
