"""The ``memrope`` command line.

Owns: argument parsing and wiring files to the library. Library code logs; only this module
prints. Every failure is one line on stderr (a traceback only with ``-v``), and the exit code
says whose fault it was:

- 2: the input is wrong (a bad option, file, config, artifact or output path; a missing extra);
  found before any expensive work;
- 1: the run failed (a stage failed, a block went non-finite, the disk filled, a device error);
  nothing half-written is left behind;
- 130: interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

from memrope.runtime.prompts import add_timeline_args, recache_mode, timeline_from_args

logger = logging.getLogger("memrope")

DTYPE_NAMES = ("float32", "bfloat16", "float16")
BACKENDS = ("eager", "compiled", "onnxruntime", "tensorrt")
EXPORTED_BACKENDS = ("onnxruntime", "tensorrt")
NOISE_SOURCES = ("reference", "streamed", "device")
VAE_BACKENDS = ("eager", "onnxruntime", "tensorrt")
# Reference-order noise draws the whole video's initial noise up front; past this many
# elements per run the loop draws block by block instead (constant memory).
REFERENCE_NOISE_MAX_ELEMENTS = 1 << 28
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Show each option's default (when it has a value to show); keep descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction))
        if "%(default)" in text or flag or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("memrope-engine")
    except md.PackageNotFoundError:
        return "unknown (not installed)"


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _device(name: str):
    """``cpu`` or ``cuda[:N]``, checked against this machine before any work."""
    import torch

    if not _DEVICE.match(name):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _cache_root() -> Path:
    return Path(os.environ.get("MEMROPE_CACHE", Path.home() / ".cache" / "memrope"))


# ------------------------------------------------------------------------------------------------
# Shared argument groups and resolution (model, run config, weights)
# ------------------------------------------------------------------------------------------------

def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", type=Path,
                     help="DiT weights: Self-Forcing/LongLive .pt, a Wan2.1 .safetensors or a Wan2.1 folder")
    src.add_argument("--model-config", type=Path, help="Wan config.json (default: the checkpoint folder's)")
    src.add_argument("--preset", choices=("tiny", "mid", "wan-1.3b"),
                     help="architecture preset; without --checkpoint the weights are RANDOM ('tiny' without "
                          "--checkpoint is the embedded demo model)")
    src.add_argument("--lora", type=Path, help="LongLive LoRA .pt merged into the weights at load")
    src.add_argument("--use-ema", dest="use_ema", action="store_true", default=None,
                     help="load generator_ema (default: the YAML's use_ema)")
    src.add_argument("--no-use-ema", dest="use_ema", action="store_false", help="load generator (not the EMA)")


def _demo_run_config(preset: str, video: bool = False):
    from memrope.config import RunConfig

    if preset == "tiny":
        if video:
            from memrope.runtime.t2v import DEMO_LATENT

            # The embedded demo: a 64x96-pixel video, 4 s unless --seconds says otherwise.
            return RunConfig(num_output_frames=18, latent_height=DEMO_LATENT[0], latent_width=DEMO_LATENT[1],
                             use_ema=True)
        # The golden traces' run: 30 frames of a 4x6 latent with the shipped MemRoPE cache.
        return RunConfig(num_output_frames=30, latent_height=4, latent_width=6, use_ema=True)
    return RunConfig(num_output_frames=30, use_ema=True)


def _run_config(args: argparse.Namespace, fallback=None, video_demo: bool = False):
    """``--config`` YAML, else ``fallback`` (an artifact's run), else the preset's demo run;
    then ``--memory-dtype``."""
    from memrope.config import load_run_config

    if args.config is not None:
        run = load_run_config(args.config)
    elif fallback is not None:
        run = fallback
    elif args.preset is not None:
        run = _demo_run_config(args.preset, video=video_demo)
    else:
        raise ValueError("no run configuration: pass --config run.yaml")
    if args.memory_dtype is not None:
        run = replace(run, cache=replace(run.cache, memory_dtype=args.memory_dtype))
    return run


def _resolve_model(args: argparse.Namespace, model_dir: Path | None = None):
    from memrope.config import WanConfig, model_preset

    if args.model_config is not None:
        return WanConfig.from_json(args.model_config)
    if model_dir is not None and (model_dir / "config.json").is_file():
        return WanConfig.from_json(model_dir / "config.json")
    if args.checkpoint is not None and args.checkpoint.is_dir() and (args.checkpoint / "config.json").is_file():
        return WanConfig.from_json(args.checkpoint / "config.json")
    if args.preset is not None:
        return model_preset(args.preset)
    raise ValueError("no model architecture: pass --model-config config.json, a Wan2.1 folder as "
                     "--checkpoint, or --preset")


def _check_inputs_exist(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        path = getattr(args, name, None)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"--{name.replace('_', '-')} not found: {path}")


def _dit_checkpoint(args: argparse.Namespace, model_dir: Path | None) -> Path | None:
    """Where the DiT weights come from: ``--checkpoint``, else the model folder's
    ``diffusion_pytorch_model.safetensors``; ``None`` for a preset's random weights."""
    from memrope.checkpoint import WAN_WEIGHTS_FILE

    if args.checkpoint is None and model_dir is not None and (model_dir / WAN_WEIGHTS_FILE).is_file():
        return model_dir
    return args.checkpoint


def _check_dit_checkpoint(args: argparse.Namespace, model_cfg, run, model_dir: Path | None) -> None:
    """The DiT checkpoint's (and LoRA's) names and shapes against the model, from headers only:
    a wrong file fails in milliseconds, before a text encoder or VAE loads."""
    from memrope.checkpoint import check_dit_checkpoint

    checkpoint = _dit_checkpoint(args, model_dir)
    if checkpoint is not None:
        check_dit_checkpoint(checkpoint, model_cfg, use_ema=run.use_ema if args.use_ema is None else args.use_ema,
                             lora_path=args.lora, lora=run.lora)


def _load_dit(args: argparse.Namespace, model_cfg, run, dtype, device, model_dir: Path | None = None):
    """The DiT from ``--checkpoint`` (with ``--lora``), the model folder's
    ``diffusion_pytorch_model.safetensors``, or random weights for a ``--preset``."""
    import torch

    from memrope.checkpoint import load_dit_state_dict
    from memrope.model import build_dit, random_state_dict

    checkpoint = _dit_checkpoint(args, model_dir)
    if checkpoint is not None and run.lora_ckpt and args.lora is None:
        logger.warning("the run config names a LoRA (lora_ckpt: %s) but --lora was not given: running the "
                       "base weights only", run.lora_ckpt)
    if checkpoint is not None:
        use_ema = run.use_ema if args.use_ema is None else args.use_ema
        state = load_dit_state_dict(checkpoint, model_cfg, use_ema=use_ema, lora_path=args.lora,
                                    lora=run.lora, dtype=torch.float32)
    else:
        if args.preset is None:
            raise ValueError("pass --checkpoint, or --preset for random weights")
        if args.preset != "tiny":
            logger.warning("no --checkpoint: RANDOM weights (preset %s); the output shows the machinery, "
                           "not a picture", args.preset)
        # Seed 1234 for the demo run (seed 0): the embedded demo model's own DiT weights.
        state = random_state_dict(model_cfg, seed=run.seed + 1234)
    dit = build_dit(model_cfg, state, dtype=dtype, device=device)
    del state
    return dit


def _model_dir(args: argparse.Namespace) -> Path | None:
    """The Wan2.1 folder holding the text encoder and VAE: ``--model-dir``, or the embedded demo
    model for ``--preset tiny`` without a checkpoint when it needs text or frames."""
    if args.model_dir is not None:
        if not args.model_dir.is_dir():
            raise FileNotFoundError(f"--model-dir not found: {args.model_dir}")
        return args.model_dir
    wants_demo = (not getattr(args, "no_decode", False) or getattr(args, "prompt", None) is not None
                  or getattr(args, "prompts", None) is not None)
    if args.preset == "tiny" and args.checkpoint is None and wants_demo:
        from memrope.runtime.t2v import ensure_demo_model

        logger.warning("using the embedded demo model: tiny, RANDOM weights; its frames are not meaningful "
                       "pictures, it shows the machinery")
        return ensure_demo_model()
    return None


# ------------------------------------------------------------------------------------------------
# memrope generate
# ------------------------------------------------------------------------------------------------

def _add_generate(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[common], formatter_class=_Formatter,
                       help="generate a video (or latents) from a prompt",
                       description="Generate with the MemRoPE fixed-size cache, block by block, streaming the "
                                   "video (and latents) to disk as it goes.")
    _add_model_args(p)
    run = p.add_argument_group("run")
    run.add_argument("--config", type=Path, help="run YAML (the authors' format); default: the preset's demo run")
    run.add_argument("--prompt", help="text prompt (encoded with the umT5 in --model-dir; cached on disk)")
    run.add_argument("--text-embeds", type=Path, help="safetensors with prompt_embeds [B, L, text_dim]")
    run.add_argument("--seconds", type=float, help="video length at 16 fps (sets the latent frame count)")
    run.add_argument("--model-dir", type=Path,
                     help="Wan2.1 folder: text encoder + tokenizer, VAE (Diffusers or original layout), "
                          "and config.json / diffusion_pytorch_model.safetensors for the DiT")
    run.add_argument("--text-cache", type=Path, help="prompt-embedding cache folder (default: $MEMROPE_CACHE/text)")
    run.add_argument("--noise", type=Path, help="safetensors with noise and intermediate_noise")
    run.add_argument("--noise-source", choices=NOISE_SOURCES, default="reference",
                     help="without --noise: 'reference' = the authors' CPU generator and draw order (drawn "
                          "one block ahead, copied without blocking); 'streamed' = the CPU generator block by "
                          "block at constant memory; 'device' = a generator on --device (no host work)")
    run.add_argument("--stream-noise", dest="noise_source", action="store_const", const="streamed",
                     help="same as --noise-source streamed")
    run.add_argument("--seed", type=int, help="override the YAML seed")
    run.add_argument("--num-frames", type=int, help="override num_output_frames (multiple of the block size)")
    run.add_argument("--memory-dtype", choices=("cache", "float32"),
                     help="EMA memory accumulator (default: the cache dtype, as the authors)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="MP4 (H.264) written as frames are generated, finalised atomically")
    out.add_argument("--png-dir", type=Path,
                     help="also write every frame as PNG into this folder (new, empty, or an earlier run's "
                          "frames, which it replaces when the run succeeds)")
    out.add_argument("--latents-out", type=Path,
                     help="write latents [B, F, C, H, W] (float32) to this .safetensors file, block by block")
    out.add_argument("--no-decode", action="store_true", help="skip the VAE (latents only)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--allow-nonfinite", action="store_true",
                     help="keep going when a block holds NaN/Inf and keep the outputs, warning for each bad "
                          "block; the run still fails (exit 1). Default: stop at the first, naming it, and write "
                          "nothing")
    _add_execution_args(p)
    vae = p.add_argument_group("vae")
    vae.add_argument("--vae-backend", choices=VAE_BACKENDS, default="eager",
                     help="what decodes latents to frames: eager (PyTorch, the VAE in --model-dir) or the "
                          "artifact's vae_decode graph (--engine; onnxruntime, or tensorrt after `memrope build`)")
    vae.add_argument("--vae-overlap", dest="vae_overlap", action="store_true", default=None,
                     help="decode block b in a worker while the DiT computes block b+1 (default on a GPU, where "
                          "the decode runs on its own stream, and on a CPU when both stages run on ONNX Runtime; "
                          "off for PyTorch stages on a CPU: docs/frame_path_schedule_cpu.md)")
    vae.add_argument("--no-vae-overlap", dest="vae_overlap", action="store_false",
                     help="decode each block before starting the next one")
    add_timeline_args(p)
    p.set_defaults(func=cmd_generate)


def _add_execution_args(p: argparse.ArgumentParser) -> None:
    """Options that choose what runs the DiT (shared by ``generate`` and ``serve``)."""
    ex = p.add_argument_group("execution")
    ex.add_argument("--backend", choices=BACKENDS, default="eager",
                    help="what runs the DiT: PyTorch eager or compiled, or an exported --engine")
    ex.add_argument("--engine", type=Path,
                    help="artifact directory from `memrope export` (onnxruntime; tensorrt after `memrope build`)")
    ex.add_argument("--verify-artifact", action="store_true",
                    help="hash every graph file of --engine in full (default: size and mtime, hashing only "
                         "files whose mtime changed)")
    ex.add_argument("--ort-provider", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto",
                    help="ONNX Runtime execution provider (auto: CUDA with onnxruntime-gpu and a GPU, else CPU)")
    ex.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ex.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                    help="model dtype (exported backends run in their artifact's dtype)")


def _text_embeddings(args, model_cfg, run, model_dir: Path | None):
    import torch

    from memrope.io import read_text_embeds

    if args.text_embeds is not None:
        if args.prompt is not None:
            raise ValueError("pass either --prompt or --text-embeds, not both")
        return read_text_embeds(args.text_embeds, model_cfg.text_dim, model_cfg.text_len)
    if args.prompt is not None:
        return _encode_prompts(args, model_cfg, run, model_dir, [args.prompt], "--prompt")[0]
    if args.checkpoint is None and args.engine is None and model_dir is None:
        g = torch.Generator("cpu").manual_seed(run.seed + 4321)
        logger.warning("no --prompt or --text-embeds: using random text embeddings (demo)")
        return torch.randn(run.batch_size, model_cfg.text_len, model_cfg.text_dim, generator=g)
    raise ValueError("pass --prompt TEXT (with --model-dir) or --text-embeds FILE.safetensors")


def _encode_prompts(args, model_cfg, run, model_dir: Path | None, prompts: list[str], flag: str) -> list:
    """Each prompt -> ``[B, text_len, text_dim]`` with the umT5 in ``model_dir`` (cached on disk)."""
    if model_dir is None:
        raise ValueError(f"{flag} needs a text encoder: pass --model-dir WAN_DIR (or --text-embeds)")
    from memrope.runtime.text import TextEncoder, encode_cached, load_tokenizer, prompt_tokens, validate_prompts

    tokenizer = load_tokenizer(model_dir)
    for text in dict.fromkeys(validate_prompts(prompts)):
        tokens = prompt_tokens(tokenizer, text)
        if tokens > model_cfg.text_len:
            logger.warning("%s %r is %d tokens long (end-of-text included); the model reads the first "
                           "text_len=%d and drops the rest", flag, text if len(text) <= 60 else text[:57] + "...",
                           tokens, model_cfg.text_len)
    cache_dir = args.text_cache or _cache_root() / "text"
    key = f"{model_dir.resolve()}|{model_cfg.text_len}"
    embeds = encode_cached(lambda: TextEncoder.from_model_dir(model_dir, text_len=model_cfg.text_len),
                           [p for p in prompts for _ in range(run.batch_size)], cache_dir, key=key)
    if embeds.shape[-1] != model_cfg.text_dim:
        raise ValueError(f"the text encoder in {model_dir} gives {embeds.shape[-1]}-wide embeddings; the DiT "
                         f"takes text_dim={model_cfg.text_dim}")
    return list(embeds.split(run.batch_size))


def _resolve_engine(args: argparse.Namespace, model_dir: Path | None, recache: bool = False):
    """``(artifact or None, model config, run config)`` of a ``generate`` or ``serve`` call, from
    files alone (no weights): an exported backend takes both configs from its ``--engine``
    artifact (checked: contract, file hashes, engines), whose resolution applies to the run at
    once; the other backends take them from the checkpoint, the preset or ``--config``. An
    exported ``--vae-backend`` needs the artifact (and its ``vae_decode`` graph) too.
    ``recache``: prompt switches will re-cache, so a TensorRT run needs the recache plan too."""
    artifact = None
    vae_backend = getattr(args, "vae_backend", "eager") if not getattr(args, "no_decode", False) else "eager"
    dit_exported, vae_exported = args.backend in EXPORTED_BACKENDS, vae_backend in EXPORTED_BACKENDS
    if dit_exported or vae_exported:
        from memrope.artifact import load_artifact

        if args.engine is None:
            flag = f"--backend {args.backend}" if dit_exported else f"--vae-backend {vae_backend}"
            raise ValueError(f"{flag} needs --engine DIR (an artifact from `memrope export`)")
        if dit_exported:
            given = [flag for flag, name in (("--checkpoint", "checkpoint"), ("--lora", "lora"))
                     if getattr(args, name, None) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} cannot change --backend {args.backend}'s weights: an "
                                 "exported backend runs the weights in its --engine artifact (export them with "
                                 "`memrope export --checkpoint ...`), or run them with --backend eager")
        artifact = load_artifact(args.engine, verify=getattr(args, "verify_artifact", False))
        # Providers this machine lacks fail here, before the text encoder and the VAE load.
        provider = getattr(args, "ort_provider", "auto")
        wanted = ([provider] if args.backend == "onnxruntime" else []) + \
                 ([vae_provider(provider)] if vae_backend == "onnxruntime" else [])
        if wanted:
            from memrope.engine.onnxruntime_backend import resolve_provider

            for each in wanted:
                resolve_provider(each, artifact.contract.dtype, artifact.path)
        if dit_exported:
            _check_engine_files(artifact, args.backend, ["step", "text", *(["recache"] if recache else [])],
                                "--backend")
        if vae_exported:
            if "vae_decode" not in artifact.contract.graphs:
                raise ValueError(f"artifact {artifact.path} has no vae_decode graph: export it with --model-dir "
                                 "WAN_DIR (the VAE is exported from there), or decode with --vae-backend eager")
            _check_engine_files(artifact, vae_backend, ["vae_decode"], "--vae-backend")
    elif args.engine is not None:
        raise ValueError(f"--engine is for exported backends; --backend {args.backend} runs the checkpoint")
    model_cfg = artifact.model if dit_exported else _resolve_model(args, model_dir)
    run = _run_config(args, artifact.run if artifact is not None else None,
                      video_demo=model_dir is not None and args.model_dir is None)
    if getattr(args, "seed", None) is not None:
        run = replace(run, seed=args.seed)
    if artifact is not None:
        run = artifact.check_run(run)
    if run.latent_channels != model_cfg.in_dim:
        raise ValueError(f"run config latent_channels={run.latent_channels} does not match the "
                         f"model's in_dim={model_cfg.in_dim}")
    return artifact, model_cfg, run


def vae_provider(ort_provider: str) -> str:
    """The VAE session's provider for ``--ort-provider``: the same, but TensorRT's EP (DiT only)
    means CUDA where it exists."""
    return ort_provider if ort_provider in ("cpu", "cuda") else "auto"


def _check_engine_files(artifact, backend: str, graphs: list[str], flag: str) -> None:
    """A TensorRT run needs a built plan for each of ``graphs``: say so before any model loads."""
    if backend != "tensorrt":
        return
    import torch

    from memrope.engine.sidecar import plan_path, sidecar_path

    if not torch.cuda.is_available():
        raise ValueError(f"{flag} tensorrt runs TensorRT plans on an NVIDIA GPU and this machine has none "
                         f"(torch.cuda.is_available() is False); run the artifact with {flag} onnxruntime")
    for graph in graphs:
        plan = plan_path(artifact.path, graph)
        for file in (plan, sidecar_path(plan)):
            if not file.is_file():
                raise FileNotFoundError(f"artifact {artifact.path} has no TensorRT engine ({file.name} missing); "
                                        f"build it with `memrope build {artifact.path} --target rtx` (RTX GPUs) "
                                        "or `--target server`")


def _noise_source(args, run, schedule, dtype, device, latent_shape):
    from memrope.io import read_noise
    from memrope.sampler import DeviceNoise, SeededNoise, StreamingSeededNoise, TensorNoise

    if args.noise is not None:
        if args.noise_source != "reference":
            raise ValueError("--noise gives the noise itself; drop --noise-source/--stream-noise")
        tensors = read_noise(args.noise, run.batch_size, latent_shape, run.cache.block_frames, schedule.num_steps)
        return TensorNoise(*tensors, run.cache.block_frames)
    if args.noise_source == "device":
        return DeviceNoise(run.seed, device)
    elements = run.batch_size * run.num_output_frames * run.latent_channels * run.latent_height * run.latent_width
    if args.noise_source == "streamed" or elements > REFERENCE_NOISE_MAX_ELEMENTS:
        if args.noise_source != "streamed":
            logger.warning("video too long for the reference's up-front noise draw; drawing block by block")
        return StreamingSeededNoise(run.seed, run.batch_size, latent_shape, run.cache.block_frames, dtype)
    return SeededNoise(run.seed, run.batch_size, run.num_output_frames, latent_shape, run.cache.block_frames, dtype)


def cmd_generate(args: argparse.Namespace) -> int:

    from memrope.config import VAE_SPATIAL_STRIDE
    from memrope.io import SafetensorsStreamWriter, check_output_path, read_noise
    from memrope.pipeline import MemRoPEPipeline
    from memrope.runtime.t2v import VIDEO_FPS, latent_frames_for, stream_video, video_frames_for
    from memrope.sampler import build_schedule

    # 1. Options, prompt timeline and output paths: milliseconds, before anything loads.
    timeline = timeline_from_args(args)
    decode = not args.no_decode
    if decode and args.out is None:
        raise ValueError("pass --out VIDEO.mp4 (or --no-decode with --latents-out for latents only)")
    if not decode and args.latents_out is None:
        raise ValueError("nothing to write: pass --latents-out FILE.safetensors")
    if not decode and (args.out is not None or args.png_dir is not None):
        raise ValueError("--no-decode writes latents only; drop --out/--png-dir")
    if args.seconds is not None and args.num_frames is not None:
        raise ValueError("pass either --seconds or --num-frames, not both")
    device = _device(args.device)
    if args.dtype != "float32" and device.type == "cpu" and args.backend in ("eager", "compiled"):
        logger.warning("%s on CPU is slow; the authors' bf16 semantics are meant for CUDA", args.dtype)
    dtype = _torch_dtype(args.dtype)
    if args.out is not None:
        check_output_path(args.out, "--out", suffixes=(".mp4",))
    if args.latents_out is not None:
        check_output_path(args.latents_out, "--latents-out", suffixes=(".safetensors",))
    if args.png_dir is not None:
        from memrope.runtime.video import check_png_folder

        check_output_path(args.png_dir, "--png-dir", directory=True)
        check_png_folder(args.png_dir)
    if args.text_cache is not None:
        check_output_path(args.text_cache, "--text-cache", directory=True)
    _check_inputs_exist(args, "checkpoint", "model_config", "config", "lora", "text_embeds", "noise", "engine")

    # 2. The artifact (if any) and the run it fixes: its resolution applies before any shape is
    #    derived, and its graphs (and engines) are checked before the text encoder or VAE load.
    model_dir = _model_dir(args)
    switches = timeline is not None and len(timeline.segments) > 1
    artifact, model_cfg, run = _resolve_engine(args, model_dir,
                                               recache=switches and recache_mode(args, timeline) != "none")
    schedule = build_schedule(run.sampler)
    latent_shape = (run.latent_channels, run.latent_height, run.latent_width)

    # 3. Inputs before weights: a bad file fails in milliseconds, not after loading 1.3B params.
    if args.noise is not None:
        noise_frames = read_noise(args.noise, run.batch_size, latent_shape, run.cache.block_frames,
                                  schedule.num_steps)[0].shape[1]
        run = run.with_frames(noise_frames)
    frames = args.num_frames
    if args.seconds is not None:
        frames = latent_frames_for(args.seconds, run.cache.block_frames)
    if frames is not None:
        if args.noise is not None and frames > run.num_output_frames:
            raise ValueError(f"{frames} latent frames exceed the {run.num_output_frames} frames in the noise file")
        run = run.with_frames(frames)
    if artifact is not None:
        run = artifact.check_run(run)  # the global policy's cache is sized by the frame count
    width, height = VAE_SPATIAL_STRIDE * run.latent_width, VAE_SPATIAL_STRIDE * run.latent_height
    if args.latents_out is not None:
        check_output_path(args.latents_out, "--latents-out", suffixes=(".safetensors",),
                          estimate_bytes=4 * run.batch_size * run.num_output_frames * run.latent_channels
                          * run.latent_height * run.latent_width + 4096)
    if args.out is not None:
        # H.264 at CRF 18: well under 1 byte per pixel; a generous bound still catches a full disk.
        check_output_path(args.out, "--out", suffixes=(".mp4",),
                          estimate_bytes=video_frames_for(run.num_output_frames) * width * height // 4 + 65536)
    if timeline is not None:
        timeline.check_length(run.num_output_frames, run.cache.block_frames)
    if args.backend in ("eager", "compiled"):
        _check_dit_checkpoint(args, model_cfg, run, model_dir)
    prompt_changes = []
    if timeline is not None:
        all_embeds = _encode_prompts(args, model_cfg, run, model_dir, timeline.prompts, "--prompts")
        embeds = all_embeds[0]
        prompt_changes = timeline.prompt_changes(all_embeds, run.cache.block_frames,
                                                 recache=recache_mode(args, timeline),
                                                 memory=args.memory_on_switch,
                                                 transition_blocks=args.transition_blocks)
    else:
        embeds = _text_embeddings(args, model_cfg, run, model_dir)
    if embeds.shape[0] != run.batch_size:
        raise ValueError(f"text embeddings have batch {embeds.shape[0]}, the run config's "
                         f"num_samples is {run.batch_size}")

    # 4. Models.
    decoder = None
    if decode:
        if model_dir is None and args.vae_backend == "eager":
            raise ValueError("decoding needs the VAE: pass --model-dir WAN_DIR (or --no-decode, or "
                             "--vae-backend onnxruntime with an artifact exported with a VAE)")
        from memrope.runtime.vae import VAEStream, make_vae_backend, overlap_by_default

        provider = vae_provider(args.ort_provider)
        vae_overlap = (overlap_by_default(device, args.backend, args.vae_backend) if args.vae_overlap is None
                       else args.vae_overlap)
        decoder = VAEStream(make_vae_backend(args.vae_backend, run, artifact=artifact, model_dir=model_dir,
                                             device=device, provider=provider),
                            run.cache.block_frames, overlap=vae_overlap)
    backend = _make_backend(args, artifact, model_cfg, run, dtype, device, model_dir,
                            recache=any(c.recache != "none" for c in prompt_changes), decode=decode)
    pipeline = MemRoPEPipeline(backend, run)
    noise = _noise_source(args, run, schedule, backend.dtype, backend.device, latent_shape)

    # 5. The run: every output is streamed to a temp file and renamed only when the run succeeded.
    from contextlib import ExitStack

    start = time.perf_counter()
    with ExitStack() as outputs:
        outputs.enter_context(backend)
        if decoder is not None:
            outputs.enter_context(decoder)
        writer = latents_writer = on_frames = None
        if args.latents_out is not None:
            latents_writer = outputs.enter_context(SafetensorsStreamWriter(
                args.latents_out, "latents", [run.batch_size, run.num_output_frames, *latent_shape]))
        if decode:
            from memrope.runtime.video import Mp4Writer, PngFolderWriter

            if args.png_dir is not None:  # entered first, so renamed last: only once the video is complete
                on_frames = outputs.enter_context(PngFolderWriter(args.png_dir)).write
            args.out.parent.mkdir(parents=True, exist_ok=True)
            writer = outputs.enter_context(Mp4Writer(args.out, fps=VIDEO_FPS, width=width, height=height))
        result = stream_video(pipeline, embeds, noise, run.num_blocks, decoder, writer,
                              latents_writer=latents_writer, progress=not args.no_progress,
                              on_frames=on_frames, allow_nonfinite=args.allow_nonfinite,
                              prompt_changes=prompt_changes)
    elapsed = time.perf_counter() - start
    written = []
    if decode:
        written.append(f"{args.out}: {result.video_frames} frames at {VIDEO_FPS} fps "
                       f"({result.video_frames / VIDEO_FPS:.1f} s, {width}x{height})")
    if args.latents_out is not None:
        written.append(f"{args.latents_out}: latents {[run.batch_size, run.num_output_frames, *latent_shape]}")
    vae_note = f", vae {args.vae_backend}{' overlapped' if decoder.overlap else ''}" if decode else ""
    print(f"wrote {'; '.join(written)} ({run.num_output_frames} latent frames, {run.num_blocks} blocks, "
          f"{elapsed:.2f} s, policy {run.cache.policy}, backend {args.backend}{vae_note})")
    if result.nonfinite_blocks:
        bad = result.nonfinite_blocks
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        print(f"memrope generate: error: {len(bad)} of {run.num_blocks} blocks produced NaN or Inf (blocks {shown}); "
              "the outputs were kept (--allow-nonfinite), the run failed", file=sys.stderr)
        return 1
    return 0


def _make_backend(args, artifact, model_cfg, run, dtype, device, model_dir, recache: bool = False,
                  decode: bool = False):
    """The DiT backend ``args`` ask for. ``recache``: a prompt switch will re-cache the window, so
    an exported backend opens its recache graph too (a second copy of the weights: only then).
    ``decode``: a VAE decodes the frames in this process, so ONNX Runtime's CPU threads do not
    spin between calls (they would steal the cores from the decode; docs/frame_path_schedule_cpu.md)."""
    if args.backend == "onnxruntime":
        from memrope.engine.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(artifact, provider=args.ort_provider, recache=recache,
                                  spinning=False if decode else None)
    if args.backend == "tensorrt":
        from memrope.engine.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(artifact, recache=recache)
    dit = _load_dit(args, model_cfg, run, dtype, device, model_dir)
    if args.backend == "compiled":
        from memrope.engine.compiled_backend import CompiledBackend

        return CompiledBackend(dit, run)
    from memrope.engine.eager_backend import EagerBackend

    return EagerBackend(dit, run)


# ------------------------------------------------------------------------------------------------
# memrope export / build / bench
# ------------------------------------------------------------------------------------------------

def _add_export(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], formatter_class=_Formatter,
                       help="export the step, text and recache graphs (and the VAE decoder) to an ONNX artifact",
                       description="Export one DiT call with explicit cache I/O (opset 23, static shapes), "
                                   "audit it against TensorRT 10.15's parser and validate it against eager.")
    _add_model_args(p)
    p.add_argument("--config", type=Path, help="run YAML (cache policy, sampler); default: the preset's demo run")
    p.add_argument("--height", type=int, required=True, help="video height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, required=True, help="video width in pixels (multiple of 16)")
    p.add_argument("--batch", type=int, default=1, help="videos per call (num_samples)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="graph dtype (bf16/fp16 are strongly typed, with fp32 islands)")
    p.add_argument("--memory-dtype", choices=("cache", "float32"),
                   help="EMA memory accumulator (default: the cache dtype, as the authors)")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the ONNX Runtime vs eager comparison (fp32 exports)")
    p.add_argument("--model-dir", type=Path,
                   help="Wan2.1 folder: its VAE is exported as vae_decode.onnx (and its DiT weights are used "
                        "when --checkpoint is not given); --preset tiny without one exports the embedded demo")
    p.add_argument("--no-vae", dest="vae", action="store_false", help="do not export the VAE of --model-dir")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from memrope.artifact import specialise_run
    from memrope.export.onnx_export import check_export_target
    from memrope.io import check_output_path

    check_export_target(args.out, args.force)
    check_output_path(args.out, "--out", directory=True)
    _check_inputs_exist(args, "checkpoint", "model_config", "config", "lora", "model_dir")
    if args.model_dir is not None and not args.model_dir.is_dir():
        raise ValueError(f"--model-dir must be a Wan2.1 model folder, got {args.model_dir}")
    model_dir = _model_dir(args)  # --preset tiny without a checkpoint: the embedded demo (DiT and VAE)
    model_cfg = _resolve_model(args, model_dir)
    run = _run_config(args)
    specialise_run(run, model_cfg, args.height, args.width, args.batch)  # bad sizes fail before the weights load
    _check_dit_checkpoint(args, model_cfg, run, model_dir)
    from memrope.export.onnx_export import export_artifact

    dtype = _torch_dtype(args.dtype)
    vae = None
    if model_dir is not None and args.vae:
        from memrope.runtime.vae import streaming_decoder_module

        vae = streaming_decoder_module(model_dir, dtype=dtype)
    dit = _load_dit(args, model_cfg, run, dtype, _device("cpu"), model_dir)
    result = export_artifact(dit, run, args.out, height=args.height, width=args.width, batch=args.batch,
                             validate=args.validate, force=args.force, vae=vae)
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in result.files.items()
                      if name.endswith((".onnx", ".data")))
    check = result.validation.get("skipped") or f"max abs error vs eager {result.validation['max_abs_error']:.2e}"
    if "vae_decode" in result.validation:
        check += f"; vae_decode pixels {result.validation['vae_decode']['pixels_max_abs_error']:.2e}"
    print(f"wrote {result.path} in {result.seconds:.1f} s: step graph {result.step_nodes} nodes; {sizes}; "
          f"TensorRT audit passed; validation: {check}")
    return 0


def _add_build(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("build", parents=[common], formatter_class=_Formatter,
                       help="build TensorRT engines (rtx: TensorRT-RTX, no GPU needed; server: TensorRT)",
                       description="Build a strongly typed TensorRT plan for every graph of an exported artifact, "
                                   "next to its graphs, with a sidecar each (target, TensorRT version, compute "
                                   "capabilities, build report). All or nothing: a graph the builder rejects "
                                   "leaves the directory as it was.")
    p.add_argument("artifact", type=Path, help="artifact directory from `memrope export`")
    p.add_argument("--target", choices=("rtx", "server"), required=True,
                   help="rtx: TensorRT-RTX (pip install -e '.[rtx]'), ahead of time on any machine, runs on RTX "
                        "GPUs; server: datacenter TensorRT (pip install -e '.[tensorrt]'), built on the GPU it runs on")
    p.add_argument("--compute-capability", action="append", metavar="X.Y[,X.Y]",
                   help="rtx: GPUs to build for, e.g. 8.9 (RTX 4090) or 8.9,12.0 (and RTX 5090); "
                        "default TensorRT-RTX's own targets (8.0, 8.6, 8.9, 12.0 and later)")
    p.add_argument("--graph", action="append", metavar="NAME",
                   help="build only this graph (repeat for several, built in this order); default every graph")
    p.add_argument("--timing-cache", type=Path, help="server: tactic timing cache reused across builds")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level (0-5)")
    p.add_argument("--workspace-gb", type=float, help="workspace memory pool limit")
    p.add_argument("--force", action="store_true", help="rebuild plans that are up to date")
    p.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from memrope.engine.build import build_engines

    plans = build_engines(args.artifact, target=args.target, compute_capabilities=args.compute_capability,
                          timing_cache=args.timing_cache, opt_level=args.opt_level, workspace_gb=args.workspace_gb,
                          force=args.force, graphs=args.graph)
    for built in plans:
        sidecar, report = built.sidecar, built.sidecar.report
        where = sidecar.gpu_name or "compute capability " + ", ".join(sidecar.compute_capabilities)
        if not built.rebuilt:
            print(f"{built.plan}: up to date ({sidecar.module} {sidecar.module_version}, {where}); --force rebuilds")
            continue
        print(f"{built.plan}: {report['plan_bytes'] / 1e6:.1f} MB in {report['build_seconds']:.1f} s "
              f"({sidecar.module} {sidecar.module_version}, {where}; {report['engine_layers'] or '?'} engine layers; "
              f"attention: {report['attention']})")
    return 0


def _add_bench(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[common], formatter_class=_Formatter,
                       help="latency of the same loop on every available backend",
                       description="Profile eager, compiled, ONNX Runtime and TensorRT on the same loop and "
                                   "inputs (random weights). Prints a table, then one JSON line. Exits 1 if no "
                                   "backend could be measured.")
    p.add_argument("--preset", choices=("tiny", "demo", "mid", "wan-1.3b"), default="tiny",
                   help="model size and resolution: tiny 48x32, demo 96x64 (the embedded demo's), mid 128x96, "
                        "wan-1.3b 832x480")
    p.add_argument("--height", type=int, help="pixels (multiple of 16); default: the preset's")
    p.add_argument("--width", type=int, help="pixels (multiple of 16); default: the preset's")
    p.add_argument("--backends", default="eager,compiled,onnxruntime,tensorrt",
                   help="comma-separated subset of eager,compiled,onnxruntime,tensorrt")
    p.add_argument("--blocks", type=int, default=30, help="timed blocks (after the warm-up)")
    p.add_argument("--warmup-blocks", type=int, default=3, help="untimed blocks first (compilation, caches)")
    p.add_argument("--e2e-blocks", type=int, default=20,
                   help="blocks of the frame path (VAE alone; DiT + VAE serial and overlapped, alternating in "
                        "segments of 6, rounded down to whole segments); 0 skips it")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="model dtype")
    p.add_argument("--peak-tflops", type=float, help="device peak, to report the achieved fraction")
    p.add_argument("--json-out", type=Path, help="write the results document here (JSON)")
    p.add_argument("--plot", type=Path, help="PNG: per-block latency and per-stage breakdown")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from memrope.io import check_output_path
    from memrope.runtime.bench import BACKENDS as BENCH_BACKENDS
    from memrope.runtime.bench import BENCH_PRESETS, plot, print_table, require_matplotlib, run_bench, write_json

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends:
        raise ValueError(f"--backends {args.backends!r} names no backend; choose from {', '.join(BENCH_BACKENDS)}")
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {', '.join(BENCH_BACKENDS)}")
    if args.warmup_blocks < 1:
        raise ValueError(f"--warmup-blocks must be at least 1 (the first blocks compile and allocate), "
                         f"got {args.warmup_blocks}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ValueError(f"--peak-tflops must be positive, got {args.peak_tflops}")
    _device(args.device)
    if args.json_out:
        check_output_path(args.json_out, "--json-out", suffixes=(".json",))
    if args.plot:
        check_output_path(args.plot, "--plot", suffixes=(".png",))
        require_matplotlib()  # fail before minutes of benchmarking, not after
    preset = BENCH_PRESETS[args.preset]
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive number of pixels (a multiple of 16), got {value}")
    preset = replace(preset, height=args.height or preset.height, width=args.width or preset.width)
    if args.e2e_blocks and args.e2e_blocks < 4:
        raise ValueError(f"--e2e-blocks must be 0 (skip the frame path) or at least 4, got {args.e2e_blocks}")
    doc = run_bench(preset, backends, args.blocks, args.warmup_blocks, args.device, args.dtype, args.peak_tflops,
                    e2e_blocks=args.e2e_blocks)
    print_table(doc)
    if args.json_out:
        write_json(doc, args.json_out)
    if args.plot:
        plot(doc, args.plot)
    summary = [{k: r.get(k) for k in ("backend", "available", "call_ms_median", "block_ms_median", "latent_fps",
                                       "video_fps", "host_overhead_pct", "flatness")} for r in doc["results"]]
    for row, r in zip(summary, doc["results"]):
        if "frame_path" in r:
            f = r["frame_path"]
            row.update(vae_ms_median=f["vae_ms_median"], e2e_block_ms_median=f["overlap"]["block_ms_median"],
                       e2e_video_fps=f["overlap"]["video_fps"], ttff_cached_ms=f["ttff"]["ttff_cached_ms"])
    print(json.dumps(summary))
    if not any(r.get("available") for r in doc["results"]):
        print("memrope bench: error: no backend could be measured here (see the reasons above)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # -v is accepted before and after the subcommand; SUPPRESS keeps a subparser's default from
    # overwriting a -v given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and full tracebacks")
    parser = argparse.ArgumentParser(prog="memrope", formatter_class=_Formatter,
                                     description="MemRoPE video generation engine: generate, export, build, "
                                                 "bench, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"memrope {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub, common)
    _add_export(sub, common)
    _add_build(sub, common)
    _add_bench(sub, common)
    from memrope.runtime.serve import add_parser as _add_serve

    _add_serve(sub, common)
    return parser


# Exceptions that mean "the input is wrong" (exit 2); everything else a run raises is a failure (exit 1).
_INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                 PermissionError, ImportError)


def _quiet_third_party() -> None:
    """Progress bars and deprecation chatter of libraries we drive are noise on a CLI."""
    import warnings

    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import torch

    torch._logging.set_logs(onnx=logging.ERROR)  # "torchvision is not installed" at every export
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if not verbose:
            _quiet_third_party()
            for name in ("memrope", "export", "engine", "runtime"):
                logging.getLogger(name).setLevel(logging.INFO)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"memrope {args.command}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        if verbose:
            import traceback

            traceback.print_exc()
        code = 2 if isinstance(exc, _INPUT_ERRORS) else 1
        print(f"memrope {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return code


def _one_line(exc: BaseException) -> str:
    """The exception as one line: its message (or its type), with OSError's errno text and path."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{lines[0]} ({len(lines) - 1} more line(s) with -v)" if len(lines) > 4 else " | ".join(lines)
    return lines[0]


if __name__ == "__main__":
    sys.exit(main())
