"""``memrope bench``: latency of the same loop, same inputs, on every available backend.

Owns: the bench presets, the work model (FLOPs and bytes per call from the config), the timing
wrapper around a backend, one worker process per backend (so peak host memory is its own), the
summary statistics, the JSON document and the plot. Random weights: latency does not depend on
weight values.

Timing: one warm-up rollout (compilation, allocator and cache warm-up) is excluded; the timed
rollout records every call. On CPU ``perf_counter`` around each call; on a GPU CUDA events
around each call, read after one synchronisation per block (a block's frames leave the device
there in a real run anyway). Host overhead is the block's wall time outside the backend calls.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from memrope.backend import Backend
from memrope.cache import CacheLayout
from memrope.config import (
    VAE_TEMPORAL_STRIDE,
    CacheConfig,
    RunConfig,
    WanConfig,
    frame_tokens,
    model_preset,
)
from memrope.io import atomic_write
from memrope.pipeline import MemRoPEPipeline

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "compiled", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BenchPreset:
    model: str
    height: int
    width: int


BENCH_PRESETS = {
    "tiny": BenchPreset("tiny", 32, 48),
    "mid": BenchPreset("mid", 96, 128),
    "wan-1.3b": BenchPreset("wan-1.3b", 480, 832),
}


def bench_run_config(model: WanConfig, height: int, width: int, blocks: int) -> RunConfig:
    """The shipped MemRoPE cache (window 12, sink 3) and sampler at ``height`` x ``width``."""
    from memrope.artifact import specialise_run

    cache = CacheConfig()
    run = RunConfig(cache=cache, num_output_frames=cache.block_frames * blocks, latent_channels=model.in_dim)
    return specialise_run(run, model, height, width, batch=1)


def work_per_call(model: WanConfig, layout: CacheLayout, element_bytes: int) -> dict[str, float]:
    """FLOPs of one steady-state call (linear layers and attention; a multiply-add is 2 FLOPs)
    and the bytes it must move at least (weights once, the cache read, the block's K/V written)."""
    d, L, n = model.dim, model.num_layers, layout.block_tokens
    keys = layout.context_tokens + layout.block_tokens
    linear = 2 * n * (4 * d * d + 2 * d * d + 2 * d * model.ffn_dim)  # self q,k,v,o; cross q,o; ffn
    attention = 2 * 2 * n * d * (keys + model.text_len)                 # QK^T and PV, self + cross
    per_layer = linear + attention
    p_t, p_h, p_w = model.patch_size
    embed_head = 2 * n * d * (model.in_dim * p_t * p_h * p_w + model.patch_channels)
    flops = L * per_layer + embed_head
    from memrope.model import param_count

    # Cross-attention K/V projections and the text embedding run once per prompt, not per call.
    step_params = param_count(model) - L * 2 * (d * d + d) - (model.text_dim * d + d) - (d * d + d)
    cache_bytes = 2 * L * layout.cache_tokens * d * element_bytes
    block_kv_bytes = 2 * L * n * d * element_bytes
    return {"flops": float(flops), "linear_flops": float(L * linear), "attention_flops": float(L * attention),
            "weight_bytes": float(step_params * element_bytes), "cache_read_bytes": float(cache_bytes),
            "block_kv_write_bytes": float(block_kv_bytes)}


class TimedBackend(Backend):
    """Wraps a backend; records each ``step`` (CUDA events on GPU, perf_counter on CPU)."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name, self.model, self.layout = inner.name, inner.model, inner.layout
        self.dtype, self.device = inner.dtype, inner.device
        self.cuda = self.device.type == "cuda"
        self.pending: list = []

    def encode_text(self, prompt_embeds):
        return self.inner.encode_text(prompt_embeds)

    def step(self, feeds):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner.step(feeds)
            end.record()
            self.pending.append((start, end))
        else:
            t0 = time.perf_counter()
            out = self.inner.step(feeds)
            self.pending.append((time.perf_counter() - t0) * 1e3)
        return out

    def drain(self) -> list[float]:
        """Milliseconds of the calls since the last drain (synchronises on GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            out = [s.elapsed_time(e) for s, e in self.pending]
        else:
            out = list(self.pending)
        self.pending.clear()
        return out

    def close(self):
        self.inner.close()


def _device_used_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _make_backend(name: str, preset: BenchPreset, model: WanConfig, run: RunConfig, device: torch.device,
                  dtype: torch.dtype, workdir: Path) -> Backend:
    from memrope.model import build_dit, random_state_dict

    if name in ("eager", "compiled"):
        dit = build_dit(model, random_state_dict(model), dtype=dtype, device=device)
        if name == "eager":
            from engine.eager_backend import EagerBackend

            return EagerBackend(dit, run)
        from engine.compiled_backend import CompiledBackend

        return CompiledBackend(dit, run)
    from export.onnx_export import export_artifact

    # ONNX Runtime's CPU provider has no bf16/fp16 kernels.
    export_dtype = torch.float32 if device.type == "cpu" else dtype
    artifact = workdir / f"{preset.model}_{export_dtype}".replace("torch.", "")
    if not artifact.exists():
        dit = build_dit(model, random_state_dict(model), dtype=export_dtype)
        export_artifact(dit, run, artifact, height=preset.height, width=preset.width, validate=False)
        del dit
    if name == "onnxruntime":
        from engine.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(artifact, provider="cpu" if device.type == "cpu" else "cuda")
    from engine.build import build_engines
    from engine.tensorrt_backend import TensorRTBackend

    build_engines(artifact)
    return TensorRTBackend(artifact)


def availability(name: str, device: torch.device) -> str | None:
    """``None`` if ``name`` can run here, else the reason it cannot."""
    import importlib.util

    if name == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install -e '.[onnx]')"
        if device.type == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "onnxruntime-gpu is not installed (the CPU build cannot run on the GPU)"
    if name == "tensorrt":
        if device.type != "cuda":
            return "TensorRT needs an NVIDIA GPU"
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed (pip install -e '.[tensorrt]')"
    if name not in BACKENDS:
        return f"unknown backend (choose from {', '.join(BACKENDS)})"
    return None


def bench_backend(name: str, preset: BenchPreset, blocks: int, warmup_blocks: int, device: str, dtype: str,
                  workdir: str, seed: int = 0) -> dict:
    """Run one backend (in this process) and return its measurements."""
    from memrope.sampler import StreamingSeededNoise

    torch.manual_seed(seed)
    dev = torch.device(device)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = model_preset(preset.model)
    run = bench_run_config(model, preset.height, preset.width, blocks)
    device_baseline = _device_used_bytes(dev)
    backend = TimedBackend(_make_backend(name, preset, model, run, dev, torch_dtype, Path(workdir)))
    g = torch.Generator().manual_seed(seed + 1)
    embeds = torch.randn(1, model.text_len, model.text_dim, generator=g)
    latent = (run.latent_channels, run.latent_height, run.latent_width)

    with backend:
        # Warm-up: compilation, allocators, caches. Not timed.
        warm = replace(run, num_output_frames=3 * warmup_blocks)
        for _ in MemRoPEPipeline(backend, warm).blocks(embeds, StreamingSeededNoise(seed, 1, latent, 3, torch_dtype),
                                                       warmup_blocks):
            pass
        backend.drain()

        pipeline = MemRoPEPipeline(backend, run)
        calls_per_block = pipeline.schedule.num_steps + 1
        noise = StreamingSeededNoise(seed, 1, latent, 3, torch_dtype)
        block_ms, call_ms = [], []
        start = time.perf_counter()
        device_peak = 0
        for _ in pipeline.blocks(embeds, noise, blocks):
            calls = backend.drain()  # synchronises on GPU: the block's frames are ready
            now = time.perf_counter()
            device_peak = max(device_peak, _device_used_bytes(dev))
            block_ms.append((now - start) * 1e3)
            call_ms.append(calls)
            start = now
    peak_host_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Whole-device usage above the baseline covers ONNX Runtime's and TensorRT's own allocations,
    # which torch's allocator statistics do not see.
    peak_device_mb = max(device_peak - device_baseline, 0) / 2 ** 20
    work = work_per_call(model, pipeline.layout, torch.empty((), dtype=backend.dtype).element_size())
    return summarise(name, block_ms, call_ms, calls_per_block, pipeline.layout.block_frames, work,
                     peak_host_mb, peak_device_mb)


def summarise(name: str, block_ms: list[float], call_ms: list[list[float]], calls_per_block: int,
              block_frames: int, work: dict, peak_host_mb: float, peak_device_mb: float) -> dict:
    """Statistics of one backend's timed rollout (block 0 is the time to first frames)."""
    steady = list(range(1, len(block_ms)))
    steady_calls = [c for b in steady for c in call_ms[b]]
    blocks_steady = [block_ms[b] for b in steady]
    host_ms = [block_ms[b] - sum(call_ms[b]) for b in steady]
    stages = ["step%d" % i for i in range(calls_per_block - 1)] + ["context"]
    stage_ms = {s: statistics.median(call_ms[b][i] for b in steady) for i, s in enumerate(stages)}
    n = len(block_ms)
    window = max(2, min(10, n // 4))
    early_start = min(10, max(1, n // 3))
    early = block_ms[early_start:early_start + window]
    late = block_ms[-window:]
    block_median = statistics.median(blocks_steady)
    call_median = statistics.median(steady_calls)
    latent_fps = block_frames / (block_median / 1e3)
    achieved = work["flops"] / (call_median / 1e3)
    host_per_call = statistics.median(host_ms) / calls_per_block
    return {
        "backend": name, "available": True,
        "blocks": n, "calls_per_block": calls_per_block,
        "call_ms_median": call_median, "call_ms_p90": _percentile(steady_calls, 0.9),
        "stage_ms_median": stage_ms,
        "block_ms_median": block_median, "block_ms_p90": _percentile(blocks_steady, 0.9),
        "first_block_ms": block_ms[0],
        "latent_fps": latent_fps, "video_fps": VAE_TEMPORAL_STRIDE * latent_fps,
        "host_overhead_ms_per_call": host_per_call,
        "host_overhead_pct": 100.0 * host_per_call / call_median,
        "peak_host_mb": peak_host_mb, "peak_device_mb": peak_device_mb,
        "flatness": statistics.median(late) / statistics.median(early),
        "flatness_windows": {"early_blocks": [early_start, early_start + len(early)], "late_blocks": [n - len(late), n]},
        "work_per_call": work, "achieved_tflops": achieved / 1e12,
        "block_ms": block_ms, "call_ms": call_ms,
    }


def _worker(queue, *args) -> None:
    try:
        queue.put(bench_backend(*args))
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def run_bench(preset: BenchPreset, backends: list[str], blocks: int, warmup_blocks: int = 3, device: str = "cpu",
              dtype: str = "float32", peak_tflops: float | None = None, workdir: Path | None = None) -> dict:
    """Every requested backend in its own process, same loop and inputs; returns the JSON document."""
    if blocks < 4:
        raise ValueError(f"--blocks must be at least 4 (a steady state needs a few blocks), got {blocks}")
    bench_run_config(model_preset(preset.model), preset.height, preset.width, blocks)  # validates the size
    dev = torch.device(device)
    results = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="memrope-bench-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        for name in backends:
            reason = availability(name, dev)
            if reason:
                logger.info("skipping %s: %s", name, reason)
                results.append({"backend": name, "available": False, "skipped_reason": reason})
                continue
            logger.info("benchmarking %s (%d blocks after %d warm-up blocks)", name, blocks, warmup_blocks)
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(queue, name, preset, blocks, warmup_blocks, device, dtype, str(work)))
            proc.start()
            result = queue.get()
            proc.join()
            if "error" in result:
                logger.error("%s failed: %s", name, result["error"])
                results.append({"backend": name, "available": False, "skipped_reason": f"failed: {result['error']}",
                                "traceback": result["traceback"]})
                continue
            if peak_tflops:
                result["peak_fraction"] = result["achieved_tflops"] / peak_tflops
            results.append(result)
    return {"meta": _meta(preset, device, dtype, blocks, warmup_blocks, peak_tflops), "results": results}


def _meta(preset: BenchPreset, device: str, dtype: str, blocks: int, warmup: int, peak_tflops) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "onnx"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    model = model_preset(preset.model)
    run = bench_run_config(model, preset.height, preset.width, blocks)
    layout = CacheLayout.build(run.cache, frame_tokens(model, run.latent_height, run.latent_width))
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform()},
            "versions": versions, "preset": {"model": preset.model, "height": preset.height, "width": preset.width,
                                             "model_config": model.__dict__},
            "cache_layout": layout.describe(), "device": device, "dtype": dtype, "blocks": blocks,
            "warmup_blocks": warmup, "peak_tflops": peak_tflops}


def print_table(doc: dict) -> None:
    rows = [("backend", "call ms (med/p90)", "block ms", "first block ms", "latent fps", "video fps",
             "host %", "peak host MB", "flatness", "TFLOP/s")]
    for r in doc["results"]:
        if not r.get("available"):
            rows.append((r["backend"], "skipped: " + r["skipped_reason"], "", "", "", "", "", "", "", ""))
            continue
        rows.append((r["backend"], f"{r['call_ms_median']:.2f} / {r['call_ms_p90']:.2f}", f"{r['block_ms_median']:.1f}",
                     f"{r['first_block_ms']:.1f}", f"{r['latent_fps']:.2f}", f"{r['video_fps']:.2f}",
                     f"{r['host_overhead_pct']:.2f}", f"{r['peak_host_mb']:.0f}", f"{r['flatness']:.3f}",
                     f"{r['achieved_tflops']:.4f}"))
    widths = [max(len(str(row[i])) for row in rows if row[i] != "" or True) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install -e '.[bench]'") from exc
    return matplotlib


def plot(doc: dict, path: Path) -> None:
    """Per-block latency over the run for each backend, and a per-stage breakdown."""
    matplotlib = require_matplotlib()

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in doc["results"] if r.get("available")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for r in results:
        left.plot(range(len(r["block_ms"])), r["block_ms"], label=r["backend"], linewidth=1)
    left.set_xlabel("block")
    left.set_ylabel("block latency (ms)")
    left.set_yscale("log")
    left.set_title("per-block latency over the run (block 0 = first frames)")
    left.legend()
    stages = list(results[0]["stage_ms_median"]) if results else []
    bottom = [0.0] * len(results)
    for stage in stages + ["host"]:
        values = [r["host_overhead_ms_per_call"] * r["calls_per_block"] if stage == "host" else r["stage_ms_median"][stage]
                  for r in results]
        right.bar([r["backend"] for r in results], values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_ylabel("median ms per block")
    right.set_title("per-stage breakdown")
    right.legend(fontsize=8)
    meta = doc["meta"]
    fig.suptitle(f"memrope bench: {meta['preset']['model']} {meta['preset']['width']}x{meta['preset']['height']}, "
                 f"{meta['dtype']} on {meta['machine']['gpu'] or meta['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def write_json(doc: dict, path: Path) -> None:
    atomic_write(path, json.dumps(doc, indent=1) + "\n")
