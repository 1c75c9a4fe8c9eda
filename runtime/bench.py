"""``memrope bench``: latency of the same loop, same inputs, on every available backend.

Owns: the bench presets, the work model (FLOPs and bytes per call from the config), the timing
wrapper around a backend, one worker process per backend (so peak host memory is its own), the
summary statistics, the JSON document and the plot. Random weights: latency does not depend on
weight values.

The frame path (after the DiT-only rollout, same process): the VAE decode per block alone
(``memrope.runtime.vae.VAEStream`` over the backend's VAE: eager for eager/compiled, the artifact's
``vae_decode`` graph for onnxruntime/tensorrt; the diffusers reference decode too in the eager
worker), then ``memrope.runtime.t2v.stream_video`` end to end into a writer that timestamps each block's
frames, without and with overlap (block b decoding while the DiT computes block b+1; the two modes
alternate in short segments, see ``_end_to_end``), and the time to first frame: text encoding (a
tiny umT5 of the preset's width, cold = load + encode + cache write, cached = the prompt cache
read) plus the first block's DiT and decode.

Timing: one warm-up rollout (compilation, allocator and cache warm-up) is excluded; the timed
rollout records every call. On CPU ``perf_counter`` around each call; on a GPU CUDA events
around each call, read after one synchronisation per block (a block's frames leave the device
there in a real run anyway). Host overhead is the block's wall time outside the backend calls.

Threads: every worker runs a fixed number of intra-op CPU threads (:func:`bench_threads`: 1
unless asked, recorded in the document's meta), PyTorch's and ONNX Runtime's alike. Left at one
per core, on a host where anything else runs, each parallel op waits for a team thread the
scheduler has taken off its core: a tiny-preset block then swings from tens of milliseconds to
seconds with the neighbours' load, and sections measured seconds apart (the DiT-only rollout, the
serial end-to-end blocks that contain that same DiT) disagree by an order of magnitude.
"""

from __future__ import annotations

import contextlib
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
from contextlib import nullcontext
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
from memrope.runtime.vae import WAN21_VAE_CONFIG, tiny_vae_config

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "compiled", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BenchPreset:
    """A bench size: the ``model`` preset's architecture and random weights at ``height`` x
    ``width`` pixels with the ``vae`` of :data:`BENCH_VAES`, or, with ``trained``, the embedded
    demo model's own architecture, weights and VAE (:func:`memrope.runtime.t2v.ensure_demo_model`)."""

    model: str
    height: int
    width: int
    vae: str = "tiny"    # a key of BENCH_VAES
    trained: bool = False


BENCH_PRESETS = {
    "tiny": BenchPreset("tiny", 32, 48),
    "demo": BenchPreset("tiny", 64, 96, trained=True),  # the embedded demo model at its video size
    "mid": BenchPreset("mid", 96, 128, vae="mid"),
    "wan-1.3b": BenchPreset("wan-1.3b", 480, 832, vae="wan2.1"),
}
# Random-weight VAEs with Wan2.1's structure: the demo's tiny one, a third of Wan2.1's width for
# the mid DiT, and Wan2.1's own sizes.
BENCH_VAES = {
    "tiny": tiny_vae_config(),
    "mid": {**WAN21_VAE_CONFIG, "base_dim": 32},
    "wan2.1": WAN21_VAE_CONFIG,
}
VAE_FOR_BACKEND = {"eager": "eager", "compiled": "eager", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}
BENCH_PROMPT = "a red fox trotting through fresh snow at dawn"


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


def bench_model(preset: BenchPreset) -> WanConfig:
    """The DiT architecture the preset runs."""
    if preset.trained:
        from memrope.runtime.t2v import ensure_demo_model

        return WanConfig.from_json(ensure_demo_model() / "config.json")
    return model_preset(preset.model)


def bench_vae(preset: BenchPreset, seed: int = 0):
    """The preset's diffusers ``AutoencoderKLWan`` (float32, CPU): random weights (seeded), or the
    demo model's trained VAE for a ``trained`` preset."""
    from diffusers import AutoencoderKLWan

    if preset.trained:
        from memrope.runtime.t2v import ensure_demo_model
        from memrope.runtime.vae import load_vae

        return load_vae(ensure_demo_model()).float().eval().requires_grad_(False)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**BENCH_VAES[preset.vae]).eval().requires_grad_(False)


def bench_threads(threads: int | None = None) -> int:
    """Intra-op CPU threads of each bench worker: ``threads``, else ``OMP_NUM_THREADS``, else 1
    (one thread's timings hold on a shared host; see the module docstring)."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        try:
            threads = int(env) if env else 1
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {env!r}") from None
    if threads < 1:
        raise ValueError(f"bench threads must be a positive integer, got {threads}")
    return threads


def make_bench_backend(name: str, preset: BenchPreset, model: WanConfig, run: RunConfig, device: torch.device,
                       dtype: torch.dtype, workdir: Path, threads: int | None = None) -> Backend:
    """Backend ``name`` for the bench, through the one loader (:mod:`memrope.runtime.load`):
    eager and compiled run the preset's weights (random, or the demo model's for a ``trained``
    preset); ONNX Runtime and TensorRT run an artifact of them exported once into ``workdir``
    (with the bench VAE); ``threads``: ONNX Runtime's intra-op threads (``None``: its default)."""
    from memrope.runtime.load import LoadRequest, resolve

    dtype_name = str(dtype).removeprefix("torch.")
    model_dir = None
    if preset.trained:
        from memrope.runtime.t2v import ensure_demo_model

        model_dir = ensure_demo_model()
    base = LoadRequest(preset=preset.model, model_dir=model_dir, run=run, backend="eager", device=str(device),
                       dtype=dtype_name, decode=False, text=False)
    if name in ("eager", "compiled"):
        return resolve(replace(base, backend=name)).load_backend()
    from memrope.export.onnx_export import export_artifact

    # ONNX Runtime's CPU provider has no bf16/fp16 kernels.
    export_dtype = torch.float32 if device.type == "cpu" else dtype
    artifact = workdir / f"{'demo' if preset.trained else preset.model}_{export_dtype}".replace("torch.", "")
    if not artifact.exists():
        from memrope.vae import WanStreamingDecoder

        dit = resolve(replace(base, device="cpu", dtype=str(export_dtype).removeprefix("torch."))).load_dit()
        vae = WanStreamingDecoder.from_diffusers(bench_vae(preset)).to(export_dtype)
        export_artifact(dit, run, artifact, height=preset.height, width=preset.width, validate=False, vae=vae)
        del dit, vae
    if name == "tensorrt":
        from memrope.engine.build import build_engines

        build_engines(artifact)
    return resolve(LoadRequest(engine=artifact, backend=name, device=str(device), decode=False, text=False,
                               ort_provider="cpu" if device.type == "cpu" else "cuda")).load_backend(ort_threads=threads)


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
                  workdir: str, seed: int = 0, e2e_blocks: int = 0, threads: int = 1) -> dict:
    """Run one backend (in this process, on ``threads`` intra-op CPU threads) and return its
    measurements."""
    from memrope.sampler import StreamingSeededNoise

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = bench_model(preset)
    run = bench_run_config(model, preset.height, preset.width, blocks)
    device_baseline = _device_used_bytes(dev)
    backend = TimedBackend(make_bench_backend(name, preset, model, run, dev, torch_dtype, Path(workdir), threads))
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
        frame_path = None
        if e2e_blocks:
            frame_path = bench_frame_path(name, preset, run, backend, embeds, e2e_blocks, warmup_blocks,
                                          Path(workdir), seed, threads)
    peak_host_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Whole-device usage above the baseline covers ONNX Runtime's and TensorRT's own allocations,
    # which torch's allocator statistics do not see.
    peak_device_mb = max(device_peak - device_baseline, 0) / 2 ** 20
    work = work_per_call(model, pipeline.layout, torch.empty((), dtype=backend.dtype).element_size())
    result = summarise(name, block_ms, call_ms, calls_per_block, pipeline.layout.block_frames, work,
                       peak_host_mb, peak_device_mb)
    result["threads"] = torch.get_num_threads()
    if frame_path is not None:
        result["frame_path"] = frame_path
    return result


class _ArrivalWriter:
    """A video writer that keeps nothing: it timestamps each block's frames as they arrive."""

    def __init__(self):
        self.arrivals: list[float] = []
        self.frames = 0

    def write(self, frames: torch.Tensor) -> None:
        self.arrivals.append(time.perf_counter())
        self.frames += frames.shape[0]


def _text_encoding_ms(model: WanConfig, workdir: Path) -> dict[str, float]:
    """Cold (load the encoder, encode, write the prompt cache) and cached (read it) text encoding,
    with a tiny umT5 of the preset's width (stands in for umT5-XXL; see the module docstring)."""
    from memrope.runtime.text import TextEncoder, build_tiny_text_model, encode_cached

    folder = workdir / f"text_{model.text_dim}_{model.text_len}"
    if not (folder / "text_encoder").is_dir():
        build_tiny_text_model(folder, layout="diffusers", d_model=model.text_dim, text_len=model.text_len, seed=0)
    cache = Path(tempfile.mkdtemp(prefix="memrope-bench-text-", dir=workdir))
    out = {}
    for label in ("text_cold_ms", "text_cached_ms"):
        start = time.perf_counter()
        encode_cached(lambda: TextEncoder.from_model_dir(folder, text_len=model.text_len), [BENCH_PROMPT],
                      cache, key=str(folder))
        out[label] = (time.perf_counter() - start) * 1e3
    return out


def _vae_backend(name: str, preset: BenchPreset, run: RunConfig, dit_backend: Backend, threads: int | None = None):
    from memrope.runtime.vae import make_vae_backend

    kind = VAE_FOR_BACKEND[name]
    if kind == "eager":
        from memrope.engine.vae_eager_backend import EagerVAEBackend
        from memrope.vae import WanStreamingDecoder

        module = WanStreamingDecoder.from_diffusers(bench_vae(preset)).to(dit_backend.device)
        return EagerVAEBackend(module, run)
    artifact = dit_backend.inner.artifact
    provider = "cpu" if dit_backend.device.type == "cpu" else "cuda"
    return make_vae_backend(kind, run, artifact=artifact, provider=provider, threads=threads)


def bench_frame_path(name: str, preset: BenchPreset, run: RunConfig, backend: TimedBackend, embeds: torch.Tensor,
                     blocks: int, warmup_blocks: int, workdir: Path, seed: int, threads: int | None = None) -> dict:
    """VAE per block alone, then DiT + VAE end to end without and with overlap, and the time to
    first frame (see the module docstring). Milliseconds; per-block series included."""
    from memrope.runtime.vae import StreamingVAEDecoder, VAEStream

    lay = backend.layout
    latent = (run.latent_channels, run.latent_height, run.latent_width)
    block_latents = (1, lay.block_frames, *latent)
    g = torch.Generator().manual_seed(seed + 7)
    vae_inputs = [torch.randn(block_latents, generator=g).to(backend.device, backend.dtype)
                  for _ in range(warmup_blocks + blocks)]
    out: dict = {"vae_backend": VAE_FOR_BACKEND[name], "blocks": blocks}

    # 1. The VAE alone, block by block (warm-up blocks first, not timed).
    vae_backend = _vae_backend(name, preset, run, backend, threads)
    out["vae_cache_bytes"] = sum(spec.nbytes for spec in vae_backend.contract.inputs[2:])
    with VAEStream(vae_backend, lay.block_frames, overlap=False) as stream:
        for x in vae_inputs:
            stream.decode(x)
        vae_ms = stream.decode_ms[warmup_blocks + 1:]  # block 0 decodes the padded first frame
    out.update(vae_ms_median=statistics.median(vae_ms), vae_ms_p90=_percentile(vae_ms, 0.9), vae_block_ms=vae_ms)
    if name == "eager":
        reference = StreamingVAEDecoder(bench_vae(preset).to(backend.device))
        ref_ms = []
        for x in vae_inputs:
            start = time.perf_counter()
            reference.decode(x)
            ref_ms.append((time.perf_counter() - start) * 1e3)
        out["vae_reference_ms_median"] = statistics.median(ref_ms[warmup_blocks + 1:])

    # 2. DiT + VAE end to end, the real streaming driver, without and with overlap. The DiT runs as
    # `memrope generate` opens it when it decodes: on the CPU, an ONNX Runtime session whose idle
    # threads do not spin (they would take the cores from the decode).
    dit = backend
    if name == "onnxruntime" and backend.device.type == "cpu":
        from memrope.engine.onnxruntime_backend import OnnxRuntimeBackend

        dit = TimedBackend(OnnxRuntimeBackend(backend.inner.artifact, provider="cpu", spinning=False,
                                              recache=False, threads=threads))
    with dit if dit is not backend else nullcontext():
        out.update(_end_to_end(name, preset, run, dit, embeds, blocks, warmup_blocks, seed, threads))

    # 3. Time to first frame: text encoding + the first block's DiT and decode (serial run).
    text = _text_encoding_ms(backend.model, workdir)
    first = out["serial"]["first_frames_ms"]
    out["ttff"] = {**text, "first_frames_ms": first, "ttff_cold_ms": text["text_cold_ms"] + first,
                   "ttff_cached_ms": text["text_cached_ms"] + first}
    return out


E2E_SEGMENT_BLOCKS = 6


def _end_to_end(name: str, preset: BenchPreset, run: RunConfig, backend: TimedBackend, embeds: torch.Tensor,
                blocks: int, warmup_blocks: int, seed: int, threads: int | None = None) -> dict:
    """``{"serial": ..., "overlap": ...}``: stream_video block times into a timestamping writer.

    The two modes alternate in segments of :data:`E2E_SEGMENT_BLOCKS` blocks (serial, overlapped,
    serial, ...), so a drift of the machine's speed over the run hits both alike (these VMs drift
    by tens of percent over minutes). A segment is one stream_video call; its first block (the
    stream starting) and last (an overlapped decode with no DiT beside it) are not steady-state
    and are left out of the medians. The serial segments also give each stage's time alone
    (``dit_ms_median``, ``vae_ms_median``), measured in the same minutes as the overlapped ones.
    """
    from memrope.runtime.t2v import stream_video
    from memrope.runtime.vae import VAEStream
    from memrope.sampler import StreamingSeededNoise

    lay = backend.layout
    latent = (run.latent_channels, run.latent_height, run.latent_width)
    video_frames_per_block = VAE_TEMPORAL_STRIDE * lay.block_frames
    segment = min(blocks, E2E_SEGMENT_BLOCKS)
    rounds = max(1, blocks // segment)
    pipeline = MemRoPEPipeline(backend, replace(run, num_output_frames=lay.block_frames * segment))
    per_block = pipeline.schedule.num_steps + 1
    streams = {overlap: VAEStream(_vae_backend(name, preset, run, backend, threads), lay.block_frames, overlap=overlap)
               for overlap in (False, True)}
    series = {overlap: {"e2e": [], "steady": [], "dit": [], "vae": [], "frames": 0} for overlap in streams}
    try:
        for stream in streams.values():
            stream_video(pipeline, embeds, StreamingSeededNoise(seed, 1, latent, lay.block_frames, backend.dtype),
                         warmup_blocks, stream, _ArrivalWriter(), progress=False)
        backend.drain()
        by_round = []
        for _ in range(rounds):
            before = {overlap: {k: len(s[k]) for k in ("steady", "dit", "vae")} for overlap, s in series.items()}
            for overlap, stream in streams.items():
                writer, decoded = _ArrivalWriter(), len(stream.decode_ms)
                start = time.perf_counter()
                stream_video(pipeline, embeds, StreamingSeededNoise(seed, 1, latent, lay.block_frames, backend.dtype),
                             segment, stream, writer, progress=False)
                calls = backend.drain()
                arrivals = [start, *writer.arrivals]
                e2e = [(b - a) * 1e3 for a, b in zip(arrivals, arrivals[1:], strict=False)]
                s = series[overlap]
                s["e2e"] += e2e
                s["steady"] += e2e[1:-1] if segment > 2 else e2e[1:]
                s["dit"] += [sum(calls[i:i + per_block]) for i in range(per_block, len(calls), per_block)]
                s["vae"] += stream.decode_ms[decoded + 1:]
                s["frames"] += writer.frames

            def this_round(overlap: bool, key: str, before: dict = before) -> float:
                return statistics.median(series[overlap][key][before[overlap][key]:])

            by_round.append(this_round(True, "steady") / max(this_round(False, "dit"), this_round(False, "vae")))
    finally:
        for stream in streams.values():
            stream.close()
    # The target ratio within each round alone (its serial and overlapped segments, minutes
    # apart at most): their spread shows how far the machine's drift moves one median.
    out = {"segment_blocks": segment, "rounds": rounds, "overlap_vs_max_by_round": by_round}
    for overlap, s in series.items():
        steady = statistics.median(s["steady"])
        out["overlap" if overlap else "serial"] = {
            "block_ms_median": steady, "block_ms_p90": _percentile(s["steady"], 0.9),
            "first_frames_ms": s["e2e"][0], "dit_ms_median": statistics.median(s["dit"]),
            "vae_ms_median": statistics.median(s["vae"]), "video_fps": video_frames_per_block / (steady / 1e3),
            "video_frames": s["frames"], "block_ms": s["steady"]}
    return out


def summarise(name: str, block_ms: list[float], call_ms: list[list[float]], calls_per_block: int,
              block_frames: int, work: dict, peak_host_mb: float, peak_device_mb: float) -> dict:
    """Statistics of one backend's timed rollout (block 0 is the time to first frames)."""
    steady = list(range(1, len(block_ms)))
    steady_calls = [c for b in steady for c in call_ms[b]]
    blocks_steady = [block_ms[b] for b in steady]
    host_ms = [block_ms[b] - sum(call_ms[b]) for b in steady]
    stages = [f"step{i}" for i in range(calls_per_block - 1)] + ["context"]
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
              dtype: str = "float32", peak_tflops: float | None = None, workdir: Path | None = None,
              e2e_blocks: int = 0, threads: int | None = None) -> dict:
    """Every requested backend in its own process, same loop, inputs and intra-op CPU threads
    (:func:`bench_threads` of ``threads``); returns the JSON document."""
    if blocks < 4:
        raise ValueError(f"--blocks must be at least 4 (a steady state needs a few blocks), got {blocks}")
    bench_run_config(bench_model(preset), preset.height, preset.width, blocks)  # validates the size
    threads = bench_threads(threads)
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
            proc = ctx.Process(target=_worker, args=(queue, name, preset, blocks, warmup_blocks, device, dtype, str(work),
                                                     0, e2e_blocks, threads))
            proc.start()
            try:
                result = queue.get()
            except BaseException:  # Ctrl-C or SIGTERM here: the worker must not outlive the bench
                proc.terminate()
                proc.join()
                raise
            proc.join()
            if "error" in result:
                logger.error("%s failed: %s", name, result["error"])
                results.append({"backend": name, "available": False, "skipped_reason": f"failed: {result['error']}",
                                "traceback": result["traceback"]})
                continue
            if peak_tflops:
                result["peak_fraction"] = result["achieved_tflops"] / peak_tflops
            results.append(result)
    doc = {"meta": {**_meta(preset, device, dtype, blocks, warmup_blocks, peak_tflops), "e2e_blocks": e2e_blocks,
                    "threads": threads},
           "results": results}
    if e2e_blocks:
        doc["frame_path_targets"] = frame_path_targets(results)
    return doc


def frame_path_targets(results: list[dict]) -> dict:
    """The issue's two frame-path ratios, from one run, per backend: exported VAE / eager VAE per
    block (each VAE alone), and the overlapped end-to-end block / max(DiT, VAE), the two stage
    times taken from the serial segments that alternate with the overlapped ones (same minutes,
    same sessions; ``_end_to_end``). Also the serial block / (DiT + VAE), overlapped / serial, and
    the spread (min, median, max) of the overlap ratio computed within each round alone."""
    paths = {r["backend"]: r["frame_path"] for r in results if r.get("available") and "frame_path" in r}
    out: dict = {"overlap_vs_max": {}, "serial_vs_sum": {}, "overlap_vs_serial": {}, "overlap_vs_max_rounds": {}}
    eager = paths.get("eager", {}).get("vae_ms_median")
    for name, path in paths.items():
        if eager and path["vae_backend"] != "eager":
            out[f"{path['vae_backend']}_vae_vs_eager"] = path["vae_ms_median"] / eager
        if eager and name == "eager" and "vae_reference_ms_median" in path:
            out["eager_vae_vs_diffusers_reference"] = eager / path["vae_reference_ms_median"]
        serial, overlap = path["serial"], path["overlap"]
        out["overlap_vs_max"][name] = overlap["block_ms_median"] / max(serial["dit_ms_median"],
                                                                       serial["vae_ms_median"])
        out["serial_vs_sum"][name] = serial["block_ms_median"] / (serial["dit_ms_median"] + serial["vae_ms_median"])
        out["overlap_vs_serial"][name] = overlap["block_ms_median"] / serial["block_ms_median"]
        rounds = path.get("overlap_vs_max_by_round", [])
        if rounds:
            out["overlap_vs_max_rounds"][name] = {"min": min(rounds), "median": statistics.median(rounds),
                                                   "max": max(rounds), "rounds": len(rounds)}
    return out


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the machine line of every results file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meta(preset: BenchPreset, device: str, dtype: str, blocks: int, warmup: int, peak_tflops) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "onnx"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    model = bench_model(preset)
    run = bench_run_config(model, preset.height, preset.width, blocks)
    layout = CacheLayout.build(run.cache, frame_tokens(model, run.latent_height, run.latent_width))
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform()},
            "versions": versions, "preset": {"model": preset.model, "trained": preset.trained,
                                             "height": preset.height, "width": preset.width,
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
    _print_rows(rows)
    if "threads" in doc["meta"]:
        print(f"intra-op CPU threads per backend: {doc['meta']['threads']}")
    paths = [r for r in doc["results"] if r.get("available") and "frame_path" in r]
    if paths:
        print()
        rows = [("backend", "vae", "DiT ms/block", "VAE ms/block", "e2e serial ms", "e2e overlap ms",
                 "video fps (overlap)", "TTFF cold / cached ms")]
        for r in paths:
            f = r["frame_path"]
            rows.append((r["backend"], f["vae_backend"], f"{r['block_ms_median']:.1f}", f"{f['vae_ms_median']:.1f}",
                         f"{f['serial']['block_ms_median']:.1f}", f"{f['overlap']['block_ms_median']:.1f}",
                         f"{f['overlap']['video_fps']:.2f}",
                         f"{f['ttff']['ttff_cold_ms']:.0f} / {f['ttff']['ttff_cached_ms']:.0f}"))
        _print_rows(rows)
        print("targets: " + json.dumps(doc.get("frame_path_targets", {})))


def _print_rows(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


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
    paths = [r for r in results if "frame_path" in r]
    if paths:
        fig, (left, right, frames) = plt.subplots(1, 3, figsize=(18, 4.5), gridspec_kw={"width_ratios": [2, 1, 1.3]})
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for r in results:
        left.plot(range(len(r["block_ms"])), r["block_ms"], label=f"{r['backend']} (DiT)", linewidth=1)
        if "frame_path" in r:
            series = r["frame_path"]["overlap"]["block_ms"]
            left.plot(range(len(series)), series, label=f"{r['backend']} + VAE, overlapped", linewidth=1,
                      linestyle="--")
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
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_ylabel("median ms per block")
    right.set_title("per-stage breakdown")
    right.legend(fontsize=8)
    if paths:
        stages = ("DiT", "VAE", "e2e serial", "e2e overlap", "TTFF cached")
        width = 0.8 / len(paths)
        for k, r in enumerate(paths):
            f = r["frame_path"]
            values = [r["block_ms_median"], f["vae_ms_median"], f["serial"]["block_ms_median"],
                      f["overlap"]["block_ms_median"], f["ttff"]["ttff_cached_ms"]]
            frames.bar([i + k * width for i in range(len(stages))], values, width=width,
                       label=f"{r['backend']} (vae {f['vae_backend']})")
        frames.set_xticks([i + width * (len(paths) - 1) / 2 for i in range(len(stages))], stages, fontsize=8)
        frames.set_ylabel("median ms per block (TTFF: ms)")
        frames.set_title("frame path: DiT, VAE, end to end")
        frames.legend(fontsize=8)
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


def bench_options(preset_name: str, backends_csv: str, *, height: int | None = None, width: int | None = None,
                  warmup_blocks: int = 3, e2e_blocks: int = 0, device: str = "cpu", peak_tflops: float | None = None,
                  json_out: Path | None = None, plot_out: Path | None = None) -> tuple[BenchPreset, list[str]]:
    """``memrope bench``'s options checked before minutes of benchmarking: the preset at the
    asked size and the backends to measure. ValueError names the bad option."""
    from memrope.io import check_output_path
    from memrope.runtime.load import torch_device

    backends = [b.strip() for b in backends_csv.split(",") if b.strip()]
    if not backends:
        raise ValueError(f"--backends {backends_csv!r} names no backend; choose from {', '.join(BACKENDS)}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    if warmup_blocks < 1:
        raise ValueError(f"--warmup-blocks must be at least 1 (the first blocks compile and allocate), "
                         f"got {warmup_blocks}")
    if peak_tflops is not None and not peak_tflops > 0:
        raise ValueError(f"--peak-tflops must be positive, got {peak_tflops}")
    torch_device(device)
    if json_out:
        check_output_path(json_out, "--json-out", suffixes=(".json",))
    if plot_out:
        check_output_path(plot_out, "--plot", suffixes=(".png",))
        require_matplotlib()  # fail before minutes of benchmarking, not after
    preset = BENCH_PRESETS[preset_name]
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive number of pixels (a multiple of 16), got {value}")
    if e2e_blocks and e2e_blocks < 4:
        raise ValueError(f"--e2e-blocks must be 0 (skip the frame path) or at least 4, got {e2e_blocks}")
    return replace(preset, height=height or preset.height, width=width or preset.width), backends


def summary_rows(doc: dict) -> list[dict]:
    """The one-JSON-line summary of a results document: a row per backend."""
    summary = [{k: r.get(k) for k in ("backend", "available", "call_ms_median", "block_ms_median", "latent_fps",
                                       "video_fps", "host_overhead_pct", "flatness")} for r in doc["results"]]
    for row, r in zip(summary, doc["results"], strict=True):
        if "frame_path" in r:
            f = r["frame_path"]
            row.update(vae_ms_median=f["vae_ms_median"], e2e_block_ms_median=f["overlap"]["block_ms_median"],
                       e2e_video_fps=f["overlap"]["video_fps"], ttff_cached_ms=f["ttff"]["ttff_cached_ms"])
    return summary
