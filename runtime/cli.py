"""The ``memrope`` command line.

Owns: argument parsing and wiring files to the library. Library code logs; only this module
prints. Every user-facing error is a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from memrope.errors import StageError

logger = logging.getLogger("memrope")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BACKENDS = ("eager", "compiled", "onnxruntime", "tensorrt")
EXPORTED_BACKENDS = ("onnxruntime", "tensorrt")
VAE_BACKENDS = ("eager", "onnxruntime", "tensorrt")
# Reference-order noise draws the whole video's initial noise up front; past this many
# elements per run the loop draws block by block instead (constant memory).
REFERENCE_NOISE_MAX_ELEMENTS = 1 << 28


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a video (or latents) from a prompt",
                       description="Generate with the MemRoPE fixed-size cache.")
    _add_model_args(p)
    run = p.add_argument_group("run")
    run.add_argument("--config", type=Path, help="run YAML (the authors' format); default: the preset's demo run")
    run.add_argument("--prompt", help="text prompt (encoded with the umT5 in --model-dir; cached on disk)")
    run.add_argument("--text-embeds", type=Path, help="safetensors with prompt_embeds [B, L, text_dim]")
    run.add_argument("--seconds", type=float, help="video length at 16 fps (sets the latent frame count)")
    run.add_argument("--model-dir", type=Path,
                     help="Wan2.1 folder: text encoder + tokenizer, VAE (Diffusers or original layout), "
                          "and config.json / diffusion_pytorch_model.safetensors for the DiT")
    run.add_argument("--text-cache", type=Path, help="prompt-embedding cache folder (default ~/.cache/memrope/text)")
    run.add_argument("--noise", type=Path, help="safetensors with noise and intermediate_noise")
    run.add_argument("--seed", type=int, help="override the YAML seed")
    run.add_argument("--num-frames", type=int, help="override num_output_frames (multiple of the block size)")
    run.add_argument("--memory-dtype", choices=("cache", "float32"),
                     help="EMA memory accumulator (default cache dtype, as the authors)")
    run.add_argument("--stream-noise", action="store_true",
                     help="draw noise block by block (constant memory; not the reference's draw order)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="MP4 (H.264) written as frames are generated, finalised atomically")
    out.add_argument("--png-dir", type=Path, help="also write every frame as PNG here")
    out.add_argument("--latents-out", type=Path, help="write latents [B, F, C, H, W] to this safetensors file")
    out.add_argument("--no-decode", action="store_true", help="skip the VAE (latents only)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    ex = p.add_argument_group("execution")
    ex.add_argument("--backend", choices=BACKENDS, default="eager")
    ex.add_argument("--engine", type=Path,
                    help="artifact directory from `memrope export` (onnxruntime; tensorrt after `memrope build`)")
    ex.add_argument("--ort-provider", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto",
                    help="ONNX Runtime execution provider (auto: CUDA with onnxruntime-gpu and a GPU, else CPU)")
    ex.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ex.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ex.add_argument("--vae-backend", choices=VAE_BACKENDS, default="eager",
                    help="VAE decode: eager (PyTorch, weights from --model-dir) or the artifact's vae_decode "
                         "graph (--engine; onnxruntime, or tensorrt after `memrope build`)")
    ex.add_argument("--no-vae-overlap", dest="vae_overlap", action="store_false",
                    help="decode each block before starting the next one (default: decode block b in a "
                         "worker while the DiT computes block b+1)")
    p.set_defaults(func=cmd_generate)


def _demo_run_config(preset: str, video: bool = False):
    from memrope.config import RunConfig

    if preset == "tiny":
        if video:
            from runtime.t2v import DEMO_LATENT

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


def _load_dit(args: argparse.Namespace, model_cfg, run, dtype: torch.dtype, device: torch.device,
              model_dir: Path | None = None):
    """The DiT from ``--checkpoint`` (with ``--lora``), the model folder's
    ``diffusion_pytorch_model.safetensors``, or random weights for a ``--preset``."""
    from memrope.checkpoint import WAN_WEIGHTS_FILE, load_dit_state_dict
    from memrope.model import build_dit, random_state_dict

    checkpoint = args.checkpoint
    if checkpoint is None and model_dir is not None and (model_dir / WAN_WEIGHTS_FILE).is_file():
        checkpoint = model_dir
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
        logger.warning("no --checkpoint: RANDOM weights (preset %s); the output shows the machinery, "
                       "not a picture", args.preset)
        state = random_state_dict(model_cfg, seed=run.seed + 1234)
    dit = build_dit(model_cfg, state, dtype=dtype, device=device)
    del state
    return dit


def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", type=Path,
                     help="DiT weights: Self-Forcing/LongLive .pt, a Wan2.1 .safetensors or a Wan2.1 folder")
    src.add_argument("--model-config", type=Path, help="Wan config.json (default: the checkpoint folder's)")
    src.add_argument("--preset", choices=("tiny", "mid", "wan-1.3b"),
                     help="architecture preset; without --checkpoint the weights are RANDOM")
    src.add_argument("--lora", type=Path, help="LongLive LoRA .pt merged into the weights at load")
    src.add_argument("--use-ema", dest="use_ema", action="store_true", default=None,
                     help="load generator_ema (default: the YAML's use_ema)")
    src.add_argument("--no-use-ema", dest="use_ema", action="store_false")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the step and text graphs to an ONNX artifact directory",
                       description="Export one DiT call with explicit cache I/O (opset 23, static shapes), "
                                   "audit it against TensorRT 10.15's parser and validate it against eager.")
    _add_model_args(p)
    p.add_argument("--config", type=Path, help="run YAML (cache policy, sampler); default: the preset's demo run")
    p.add_argument("--height", type=int, required=True, help="video height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, required=True, help="video width in pixels (multiple of 16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--memory-dtype", choices=("cache", "float32"))
    p.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the ONNX Runtime vs eager comparison (fp32 exports)")
    p.add_argument("--model-dir", type=Path,
                   help="Wan2.1 folder: its VAE is exported as vae_decode.onnx (and its DiT weights are used "
                        "when --checkpoint is not given)")
    p.add_argument("--no-vae", dest="vae", action="store_false", help="do not export the VAE of --model-dir")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from export.onnx_export import export_artifact

    if args.model_dir is not None and not args.model_dir.is_dir():
        raise FileNotFoundError(f"--model-dir not found: {args.model_dir}")
    model_cfg = _resolve_model(args, args.model_dir)
    run = _run_config(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.out.exists() and not args.force:
        raise ValueError(f"{args.out} already exists; pass --force to replace it")
    vae = None
    if args.model_dir is not None and args.vae:
        from runtime.vae import streaming_decoder_module

        vae = streaming_decoder_module(args.model_dir, dtype=dtype)
    dit = _load_dit(args, model_cfg, run, dtype, torch.device("cpu"), args.model_dir)
    result = export_artifact(dit, run, args.out, height=args.height, width=args.width, batch=args.batch,
                             validate=args.validate, force=args.force, vae=vae)
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in result.files.items() if name.endswith((".onnx", ".data")))
    check = result.validation.get("skipped") or f"max abs error vs eager {result.validation['max_abs_error']:.2e}"
    if "vae_decode" in result.validation:
        check += f"; vae_decode pixels {result.validation['vae_decode']['pixels_max_abs_error']:.2e}"
    print(f"wrote {result.path} in {result.seconds:.1f} s: step graph {result.step_nodes} nodes; {sizes}; "
          f"TensorRT audit passed; validation: {check}")
    return 0


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build TensorRT engines for an exported artifact",
                       description="Build strongly typed TensorRT engines (step.plan, text.plan) with "
                                   "Polygraphy, next to the artifact's graphs, with a sidecar each.")
    p.add_argument("artifact", type=Path, help="artifact directory from `memrope export`")
    p.add_argument("--timing-cache", type=Path, help="timing cache to reuse across builds")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level (0-5)")
    p.add_argument("--force", action="store_true", help="rebuild existing plans")
    p.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from engine.build import build_engines

    plans = build_engines(args.artifact, timing_cache=args.timing_cache, opt_level=args.opt_level, force=args.force)
    print("built " + ", ".join(str(p) for p in plans))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency of the same loop on every available backend",
                       description="Profile eager, compiled, ONNX Runtime and TensorRT on the same loop and "
                                   "inputs (random weights). Prints a table, then one JSON line.")
    p.add_argument("--preset", choices=("tiny", "demo", "mid", "wan-1.3b"), default="tiny",
                   help="tiny 48x32, demo 96x64 (the embedded demo), mid 128x96, wan-1.3b 832x480")
    p.add_argument("--height", type=int, help="pixels (multiple of 16); default: the preset's")
    p.add_argument("--width", type=int, help="pixels (multiple of 16); default: the preset's")
    p.add_argument("--backends", default="eager,compiled,onnxruntime,tensorrt",
                   help="comma-separated subset of eager,compiled,onnxruntime,tensorrt")
    p.add_argument("--blocks", type=int, default=30, help="timed blocks (after the warm-up)")
    p.add_argument("--warmup-blocks", type=int, default=3)
    p.add_argument("--e2e-blocks", type=int, default=20,
                   help="blocks of the frame path (VAE alone, DiT + VAE serial and overlapped); 0 skips it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--peak-tflops", type=float, help="device peak, to report the achieved fraction")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--plot", type=Path, help="PNG: per-block latency and per-stage breakdown")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from runtime.bench import (
        BACKENDS,
        BENCH_PRESETS,
        plot,
        print_table,
        require_matplotlib,
        run_bench,
        write_json,
    )

    if args.plot:
        require_matplotlib()  # fail before minutes of benchmarking, not after
    preset = BENCH_PRESETS[args.preset]
    if args.height or args.width:
        preset = replace(preset, height=args.height or preset.height, width=args.width or preset.width)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
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
    return 0


def _check_writable(target: Path) -> None:
    """Fail before any model loads if ``target`` cannot be written (its folder is created)."""
    parent = target if target.suffix == "" and not target.exists() else target.parent
    if target.exists() and target.is_dir() and target.suffix:
        raise ValueError(f"cannot write {target}: it is a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot write {target}: {parent} is not a directory") from None
    except OSError as exc:
        raise ValueError(f"cannot write {target}: cannot create {parent} ({exc.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write {target}: {parent} is not writable")


def _model_dir(args: argparse.Namespace) -> Path | None:
    """The Wan2.1 folder holding the text encoder and VAE: ``--model-dir``, or the embedded demo
    model for ``--preset tiny`` when decoding without a checkpoint."""
    if args.model_dir is not None:
        if not args.model_dir.is_dir():
            raise FileNotFoundError(f"--model-dir not found: {args.model_dir}")
        return args.model_dir
    if args.preset == "tiny" and args.checkpoint is None and not args.no_decode:
        from runtime.t2v import ensure_demo_model

        logger.warning("using the embedded demo model: tiny, RANDOM weights; its frames are not meaningful "
                       "pictures, it shows the machinery")
        return ensure_demo_model()
    return None


def _text_embeddings(args, model_cfg, run, model_dir: Path | None) -> torch.Tensor:
    from memrope.io import read_text_embeds

    if args.text_embeds is not None:
        if args.prompt is not None:
            raise ValueError("pass either --prompt or --text-embeds, not both")
        return read_text_embeds(args.text_embeds, model_cfg.text_dim, model_cfg.text_len)
    if args.prompt is not None:
        if model_dir is None:
            raise ValueError("--prompt needs a text encoder: pass --model-dir WAN_DIR (or --text-embeds)")
        from runtime.text import TextEncoder, encode_cached

        cache_dir = args.text_cache or Path(os.environ.get("MEMROPE_CACHE", Path.home() / ".cache" / "memrope")) / "text"
        key = f"{model_dir.resolve()}|{model_cfg.text_len}"
        embeds = encode_cached(lambda: TextEncoder.from_model_dir(model_dir, text_len=model_cfg.text_len),
                               [args.prompt] * run.batch_size, cache_dir, key=key)
        if embeds.shape[-1] != model_cfg.text_dim:
            raise ValueError(f"the text encoder in {model_dir} gives {embeds.shape[-1]}-wide embeddings; the DiT "
                             f"takes text_dim={model_cfg.text_dim}")
        return embeds
    if args.checkpoint is None and args.engine is None and model_dir is None:
        g = torch.Generator("cpu").manual_seed(run.seed + 4321)
        logger.warning("no --prompt or --text-embeds: using random text embeddings (demo)")
        return torch.randn(run.batch_size, model_cfg.text_len, model_cfg.text_dim, generator=g)
    raise ValueError("pass --prompt TEXT (with --model-dir) or --text-embeds FILE.safetensors")


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.eager_backend import EagerBackend
    from memrope.io import read_noise, save_safetensors_atomic
    from memrope.pipeline import MemRoPEPipeline
    from memrope.sampler import (
        SeededNoise,
        StreamingSeededNoise,
        TensorNoise,
        build_schedule,
    )

    decode = not args.no_decode
    if decode and args.out is None:
        raise ValueError("pass --out VIDEO.mp4 (or --no-decode with --latents-out for latents only)")
    if not decode and args.latents_out is None:
        raise ValueError("nothing to write: pass --latents-out FILE.safetensors")
    if args.out is not None and args.out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must be an .mp4 file, got {args.out}")
    for target in (args.out, args.latents_out, args.png_dir):
        if target is not None:
            _check_writable(target)
    if args.dtype == "bfloat16" and args.device == "cpu":
        logger.warning("bfloat16 on CPU is slow; the authors' bf16 semantics are meant for CUDA")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    dtype = DTYPES[args.dtype]

    artifact = None
    model_dir = _model_dir(args)
    vae_exported = decode and args.vae_backend in EXPORTED_BACKENDS
    if vae_exported and args.engine is None:
        raise ValueError(f"--vae-backend {args.vae_backend} needs --engine DIR (an artifact exported with a VAE)")
    if args.backend in EXPORTED_BACKENDS:
        from memrope.artifact import load_artifact

        if args.engine is None:
            raise ValueError(f"--backend {args.backend} needs --engine DIR (an artifact from `memrope export`)")
        artifact = load_artifact(args.engine)
        model_cfg = artifact.model
    elif args.engine is not None and not vae_exported:
        raise ValueError(f"--engine is for exported backends; --backend {args.backend} runs the checkpoint")
    else:
        model_cfg = _resolve_model(args, model_dir)
        if vae_exported:
            from memrope.artifact import load_artifact

            artifact = load_artifact(args.engine)
    run = _run_config(args, artifact.run if artifact is not None else None,
                      video_demo=model_dir is not None and args.model_dir is None)
    if args.seed is not None:
        run = replace(run, seed=args.seed)
    schedule = build_schedule(run.sampler)
    latent_shape = (run.latent_channels, run.latent_height, run.latent_width)
    if run.latent_channels != model_cfg.in_dim:
        raise ValueError(f"run config latent_channels={run.latent_channels} does not match the "
                         f"model's in_dim={model_cfg.in_dim}")

    # Inputs before weights: a bad file fails in milliseconds, not after loading 1.3B params.
    noise_tensors = None
    if args.noise is not None:
        noise_tensors = read_noise(args.noise, run.batch_size, latent_shape, run.cache.block_frames,
                                   schedule.num_steps)
        run = run.with_frames(noise_tensors[0].shape[1])
    frames = args.num_frames
    if args.seconds is not None:
        from runtime.t2v import latent_frames_for

        if args.num_frames is not None:
            raise ValueError("pass either --seconds or --num-frames, not both")
        frames = latent_frames_for(args.seconds, run.cache.block_frames)
    if frames is not None:
        if noise_tensors is not None and frames > run.num_output_frames:
            raise ValueError(f"{frames} latent frames exceed the {run.num_output_frames} frames in the noise file")
        run = run.with_frames(frames)
    if artifact is not None:
        run = artifact.check_run(run)

    embeds = _text_embeddings(args, model_cfg, run, model_dir)
    if embeds.shape[0] != run.batch_size:
        raise ValueError(f"text embeddings have batch {embeds.shape[0]}, the run config's "
                         f"num_samples is {run.batch_size}")

    decoder = None
    if decode:
        if model_dir is None and args.vae_backend == "eager":
            raise ValueError("decoding needs the VAE: pass --model-dir WAN_DIR (or --no-decode, or "
                             "--vae-backend onnxruntime with an artifact exported with a VAE)")
        from runtime.vae import VAEStream, make_vae_backend

        provider = args.ort_provider if args.ort_provider in ("cpu", "cuda") else "auto"
        decoder = VAEStream(make_vae_backend(args.vae_backend, run, artifact=artifact, model_dir=model_dir,
                                             device=device, provider=provider),
                            run.cache.block_frames, overlap=args.vae_overlap)

    if args.backend == "onnxruntime":
        from engine.onnxruntime_backend import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(artifact, provider=args.ort_provider)
    elif args.backend == "tensorrt":
        from engine.tensorrt_backend import TensorRTBackend

        backend = TensorRTBackend(artifact)
    elif args.backend == "compiled":
        from engine.compiled_backend import CompiledBackend

        backend = CompiledBackend(_load_dit(args, model_cfg, run, dtype, device, model_dir), run)
    else:
        backend = EagerBackend(_load_dit(args, model_cfg, run, dtype, device, model_dir), run)
    # Exported backends run in their artifact's dtype on their own device.
    dtype = backend.dtype
    pipeline = MemRoPEPipeline(backend, run)

    if noise_tensors is not None:
        noise = TensorNoise(noise_tensors[0], noise_tensors[1], run.cache.block_frames)
    else:
        elements = run.batch_size * run.num_output_frames * run.latent_channels * run.latent_height * run.latent_width
        if args.stream_noise or elements > REFERENCE_NOISE_MAX_ELEMENTS:
            if not args.stream_noise:
                logger.warning("video too long for the reference's up-front noise draw; drawing block by block")
            noise = StreamingSeededNoise(run.seed, run.batch_size, latent_shape, run.cache.block_frames, dtype)
        else:
            noise = SeededNoise(run.seed, run.batch_size, run.num_output_frames, latent_shape,
                                run.cache.block_frames, dtype)

    start = time.perf_counter()
    if decode:
        from memrope.config import VAE_SPATIAL_STRIDE
        from runtime.t2v import VIDEO_FPS, stream_video
        from runtime.video import Mp4Writer, write_png_frames

        on_frames = None
        if args.png_dir is not None:
            args.png_dir.mkdir(parents=True, exist_ok=True)
            on_frames = lambda frames, first: write_png_frames(args.png_dir, frames, first)  # noqa: E731
        width, height = VAE_SPATIAL_STRIDE * run.latent_width, VAE_SPATIAL_STRIDE * run.latent_height
        with backend, decoder, Mp4Writer(args.out, fps=VIDEO_FPS, width=width, height=height) as writer:
            result = stream_video(pipeline, embeds, noise, run.num_blocks, decoder, writer,
                                  keep_latents=args.latents_out is not None, progress=not args.no_progress,
                                  on_frames=on_frames)
        latents = result.latents
        summary = f"wrote {args.out}: {result.video_frames} frames at {VIDEO_FPS} fps " \
                  f"({result.video_frames / VIDEO_FPS:.1f} s, {width}x{height})"
    else:
        with backend:
            latents = pipeline.generate(embeds, noise, run.num_output_frames)
        summary = f"wrote {args.latents_out}: latents {list(latents.shape)}"
    elapsed = time.perf_counter() - start
    if args.latents_out is not None:
        save_safetensors_atomic({"latents": latents.float()}, args.latents_out)
    vae_note = f", vae {args.vae_backend}{' overlapped' if args.vae_overlap else ''}" if decode else ""
    print(f"{summary} ({run.num_output_frames} latent frames, {run.num_blocks} blocks, {elapsed:.2f} s, "
          f"policy {run.cache.policy}, backend {args.backend}{vae_note})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memrope", description="MemRoPE video generation engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_export(sub)
    _add_build(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for name in ("memrope", "export", "runtime"):
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, StageError) as exc:
        print(f"memrope {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
