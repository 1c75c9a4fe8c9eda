"""The ``memrope`` command line: argument parsing and printing.

Owns: the subcommands' arguments, their mapping onto the library (a
:class:`memrope.runtime.load.LoadRequest` for the model, :mod:`memrope.runtime.api` for the run)
and what is printed. Library code logs; only this module prints. Every failure is one line on
stderr (a traceback only with ``-v``), and the exit code says whose fault it was:

- 2: the input is wrong (a bad option, file, config, artifact or output path; a missing extra);
  found before any expensive work;
- 1: the run failed (a stage failed, a block went non-finite, the disk filled, a device error);
  nothing half-written is left behind;
- 130: interrupted (Ctrl-C); 143: terminated (SIGTERM), after the same clean-up.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from memrope.runtime.args import (
    Formatter,
    add_execution_args,
    add_model_args,
    load_request,
    quiet_third_party,
    run_command,
)
from memrope.runtime.load import DTYPES, NOISE_SOURCES, VAE_BACKENDS
from memrope.runtime.prompts import add_timeline_args, recache_mode, timeline_from_args

logger = logging.getLogger("memrope")


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("memrope-engine")
    except md.PackageNotFoundError:
        return "unknown (not installed)"


# ------------------------------------------------------------------------------------------------
# memrope generate
# ------------------------------------------------------------------------------------------------

def _add_generate(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[common], formatter_class=Formatter,
                       help="generate a video (or latents) from a prompt",
                       description="Generate with the MemRoPE fixed-size cache, block by block, streaming the "
                                   "video (and latents) to disk as it goes.")
    add_model_args(p)
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
    run.add_argument("--height", type=int, help="video height in pixels (multiple of 16; default: the run config's)")
    run.add_argument("--width", type=int, help="video width in pixels (multiple of 16; default: the run config's)")
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
                     help="keep going when a block holds NaN/Inf or latents out of range and keep the outputs, "
                          "warning for each bad "
                          "block; the run still fails (exit 1). Default: stop at the first, naming it, and write "
                          "nothing")
    add_execution_args(p)
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


def cmd_generate(args: argparse.Namespace) -> int:
    from memrope.io import check_output_path
    from memrope.pipeline import MemRoPEPipeline
    from memrope.runtime.api import Outputs, write_video
    from memrope.runtime.load import resolve
    from memrope.runtime.t2v import VIDEO_FPS

    # 1. Options, prompt timeline and output paths: milliseconds, before anything loads.
    timeline = timeline_from_args(args)
    decode = not args.no_decode
    if decode and args.out is None:
        raise ValueError("pass --out VIDEO.mp4 (or --no-decode with --latents-out for latents only)")
    if not decode and args.latents_out is None:
        raise ValueError("nothing to write: pass --latents-out FILE.safetensors")
    if not decode and (args.out is not None or args.png_dir is not None):
        raise ValueError("--no-decode writes latents only; drop --out/--png-dir")
    outputs = Outputs(args.out, args.png_dir, args.latents_out)
    outputs.check()
    if args.text_cache is not None:
        check_output_path(args.text_cache, "--text-cache", directory=True)
    if args.text_embeds is not None and not args.text_embeds.exists():
        raise FileNotFoundError(f"--text-embeds not found: {args.text_embeds}")
    recache = recache_mode(args, timeline) if timeline is not None else "none"
    request = load_request(args, decode=decode, text=args.prompt is not None or timeline is not None,
                           recache=timeline is not None and len(timeline.segments) > 1 and recache != "none")
    if request.dtype != "float32" and request.device == "cpu" and request.backend in ("eager", "compiled"):
        logger.warning("%s on CPU is slow; the authors' bf16 semantics are meant for CUDA", request.dtype)

    # 2. The model, the artifact and the run, from files alone; inputs before weights.
    resolved = resolve(request, check_checkpoint=False)
    run = resolved.run
    outputs.check(run)  # free space for this length
    logger.info("%d latent frames in %d blocks, cache policy %s", run.num_output_frames, run.num_blocks,
                run.cache.policy)
    if timeline is not None:
        timeline.check_length(run.num_output_frames, run.cache.block_frames)
    resolved.check_checkpoint()  # headers only: before the text encoder and the VAE load
    prompt_changes = []
    if timeline is not None:
        flag = "--prompts" if args.prompts is not None else f"{args.config}'s data_path"
        all_embeds = resolved.encode_prompts(timeline.prompts, flag, args.text_cache)
        embeds = all_embeds[0]
        prompt_changes = timeline.prompt_changes(all_embeds, run.cache.block_frames, recache=recache,
                                                 memory=args.memory_on_switch,
                                                 transition_blocks=args.transition_blocks)
    else:
        embeds = resolved.text_embeddings(args.prompt, args.text_embeds, args.text_cache)

    noise = resolved.noise(args.noise_source)

    # 3. Models, then the run: every output is streamed to a temp file, renamed on success.
    with ExitStack() as models:
        decoder = resolved.load_vae_stream(overlap=args.vae_overlap) if decode else None
        if decoder is not None:
            models.callback(decoder.close)  # write_video closes it; closing twice is harmless
        backend = models.enter_context(resolved.load_backend())
        pipeline = MemRoPEPipeline(backend, run)
        start = time.perf_counter()
        result = write_video(pipeline, decoder, embeds, noise, outputs, prompt_changes=prompt_changes,
                             progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite)
        elapsed = time.perf_counter() - start
    latent_shape = [run.batch_size, run.num_output_frames, *pipeline.latent_frame_shape()]
    width, height = resolved.frame_size
    written = [f"{args.out}: {result.video_frames} frames at {VIDEO_FPS} fps "
               f"({result.video_frames / VIDEO_FPS:.1f} s, {width}x{height})"] if decode else []
    if args.latents_out is not None:
        written.append(f"{args.latents_out}: latents {latent_shape}")
    vae_note = f", vae {args.vae_backend}{' overlapped' if decoder.overlap else ''}" if decode else ""
    print(f"wrote {'; '.join(written)} ({run.num_output_frames} latent frames, {run.num_blocks} blocks, "
          f"{elapsed:.2f} s, policy {run.cache.policy}, backend {args.backend}{vae_note})")
    if result.nonfinite_blocks:
        bad = result.nonfinite_blocks
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        print(f"memrope generate: error: {len(bad)} of {run.num_blocks} blocks were non-finite or out of range "
              f"(blocks {shown}); "
              "the outputs were kept (--allow-nonfinite), the run failed", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------
# memrope export / build / bench
# ------------------------------------------------------------------------------------------------

def _add_export(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from memrope.runtime.args import add_quantize_args

    p = sub.add_parser("export", parents=[common], formatter_class=Formatter,
                       help="export the step, text and recache graphs (and the VAE decoder) to an ONNX artifact",
                       description="Export one DiT call with explicit cache I/O (opset 23, static shapes), "
                                   "audit it against TensorRT 10.15's parser and validate it against eager.")
    add_model_args(p)
    p.add_argument("--config", type=Path, help="run YAML (cache policy, sampler); default: the preset's demo run")
    p.add_argument("--height", type=int, required=True, help="video height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, required=True, help="video width in pixels (multiple of 16)")
    p.add_argument("--batch", type=int, default=1, help="videos per call (num_samples)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
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
    add_quantize_args(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from memrope.runtime.api import export_model
    from memrope.runtime.args import quantize_options

    result = export_model(load_request(args, text=True, decode=args.vae, device="cpu"), args.out,
                          batch=args.batch, validate=args.validate, force=args.force, **quantize_options(args))
    print(result.summary())
    return 0


def _add_build(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("build", parents=[common], formatter_class=Formatter,
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
        quantized = report.get("quantization") or {}
        low = ", ".join(f"{n} reading {t}" for t, n in quantized.get("layers_reading", {}).items())
        print(f"{built.plan}: {report['plan_bytes'] / 1e6:.1f} MB in {report['build_seconds']:.1f} s "
              f"({sidecar.module} {sidecar.module_version}, {where}; {report['engine_layers'] or '?'} engine layers"
              f"{f' ({low})' if low else ''}; attention: {report['attention']})")
    return 0


def _add_bench(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[common], formatter_class=Formatter,
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
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype")
    p.add_argument("--peak-tflops", type=float, help="device peak, to report the achieved fraction")
    p.add_argument("--threads", type=int,
                   help="CPU threads per backend (torch and ONNX Runtime); default $OMP_NUM_THREADS, else 1")
    p.add_argument("--json-out", type=Path, help="write the results document here (JSON)")
    p.add_argument("--plot", type=Path, help="PNG: per-block latency and per-stage breakdown")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from memrope.runtime import bench

    preset, backends = bench.bench_options(args.preset, args.backends, height=args.height, width=args.width,
                                           warmup_blocks=args.warmup_blocks, e2e_blocks=args.e2e_blocks,
                                           device=args.device, peak_tflops=args.peak_tflops,
                                           json_out=args.json_out, plot_out=args.plot)
    doc = bench.run_bench(preset, backends, args.blocks, args.warmup_blocks, args.device, args.dtype,
                          args.peak_tflops, e2e_blocks=args.e2e_blocks, threads=bench.bench_threads(args.threads))
    bench.print_table(doc)
    if args.json_out:
        bench.write_json(doc, args.json_out)
    if args.plot:
        bench.plot(doc, args.plot)
    print(json.dumps(bench.summary_rows(doc)))
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
    parser = argparse.ArgumentParser(prog="memrope", formatter_class=Formatter,
                                     description="MemRoPE video generation engine: generate, export, build, "
                                                 "bench, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"memrope {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub, common)
    _add_export(sub, common)
    _add_build(sub, common)
    _add_bench(sub, common)
    from memrope.runtime.serve import add_parser as add_serve

    add_serve(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    def run() -> int:
        if not verbose:
            quiet_third_party()
            logging.getLogger("memrope").setLevel(logging.INFO)
        return args.func(args)

    return run_command(f"memrope {args.command}", run, verbose=verbose)


if __name__ == "__main__":
    sys.exit(main())
