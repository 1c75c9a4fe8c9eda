"""What the block loop itself does in the steady state, seen by the torch profiler.

Runs the `tiny` (2 layers) and `mid` (6 layers) presets (random weights) on the eager and ONNX
Runtime backends, lets the cache fill and roll, then profiles two steady-state blocks with
``profile_memory=True``. Every op is attributed to the backend (inside a ``backend.step`` range)
or to the loop (everything else); the loop's ops are split into per-call work (between two calls
of a block) and per-block work (before a block's first call, after its last), and its tensor
allocations are counted. The result goes to
``bench/results/hot_loop_profile.json`` (with machine and date) and a table to stdout.

    python bench/profile_hot_loop.py [--presets tiny,mid] [--out bench/results/hot_loop_profile.json]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memrope.backend import Backend  # noqa: E402
from memrope.pipeline import MemRoPEPipeline  # noqa: E402
from memrope.runtime.bench import BENCH_PRESETS, bench_run_config, cpu_name, make_bench_backend  # noqa: E402
from memrope.sampler import SeededNoise  # noqa: E402


class Ranged(Backend):
    """Marks each backend call with a profiler range, so its ops can be told from the loop's."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name, self.model, self.layout = inner.name, inner.model, inner.layout
        self.dtype, self.device = inner.dtype, inner.device

    def encode_text(self, prompt_embeds):
        with record_function("backend.encode_text"):
            return self.inner.encode_text(prompt_embeds)

    def step(self, feeds):
        with record_function("backend.step"):
            return self.inner.step(feeds)

    def close(self):
        self.inner.close()


def _inside_backend(event) -> bool:
    node = event
    while node is not None:
        if node.name.startswith("backend."):
            return True
        node = node.cpu_parent
    return False


def profile_backend(name: str, preset_name: str, warm_blocks: int, profiled_blocks: int) -> dict:
    preset = BENCH_PRESETS[preset_name]
    from memrope.runtime.bench import bench_model

    model = bench_model(preset)
    blocks = warm_blocks + profiled_blocks
    run = bench_run_config(model, preset.height, preset.width, blocks)
    with tempfile.TemporaryDirectory() as work:
        backend = Ranged(make_bench_backend(name, preset, model, run, torch.device("cpu"), torch.float32, Path(work)))
        pipeline = MemRoPEPipeline(backend, run)
        latent = pipeline.latent_frame_shape()
        noise = SeededNoise(0, 1, run.num_output_frames, latent, run.cache.block_frames)
        embeds = torch.randn(1, model.text_len, model.text_dim, generator=torch.Generator().manual_seed(1))
        stream = pipeline.stream(embeds, noise, max_blocks=blocks)
        for _ in range(warm_blocks):
            stream.next_block()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            for _ in range(profiled_blocks):
                with record_function("loop.block"):
                    stream.next_block()
        stream.close()
        backend.close()

    steps = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.name == "backend.step")
    calls_per_block = len(steps) // profiled_blocks

    def phase(start: float) -> str:
        """``block``: before a block's first call, after its last, or between its first two (the
        memory write, once per block); ``call``: between two later calls (the per-call work)."""
        for i in range(1, len(steps)):
            if steps[i - 1][1] <= start < steps[i][0]:
                return "block" if i % calls_per_block in (0, 1) else "call"
        return "block"

    ops = {"call": collections.Counter(), "block": collections.Counter()}
    alloc_count = alloc_bytes = 0
    for event in prof.events():
        if event.name.startswith(("backend.", "loop.", "[memory]")) or _inside_backend(event):
            continue
        parent = event.cpu_parent
        if parent is not None and not parent.name.startswith("loop."):
            continue  # only the loop's own top-level ops; their children are the op's implementation
        ops[phase(event.time_range.start)][event.name] += 1
        if event.cpu_memory_usage > 0:
            alloc_count += 1
            alloc_bytes += event.cpu_memory_usage
    gaps_per_block = calls_per_block - 2  # the gaps between calls 1..N-1
    return {
        "backend": name, "preset": preset_name, "num_layers": model.num_layers, "profiled_blocks": profiled_blocks,
        "backend_calls_per_block": calls_per_block,
        "loop_ops_per_call": {op: n / (profiled_blocks * gaps_per_block) for op, n in sorted(ops["call"].items())},
        "loop_ops_per_block_outside_calls": {op: n / profiled_blocks for op, n in sorted(ops["block"].items())},
        "loop_allocations_per_block": alloc_count / profiled_blocks,
        "loop_allocated_bytes_per_block": alloc_bytes / profiled_blocks,
        "host_device_copies_per_block": 0.0,  # a CPU run has no device; see docs/hot_loop.md for the GPU path
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,mid", help="comma-separated; they differ in layer count")
    parser.add_argument("--backends", default="eager,onnxruntime")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hot_loop_profile.json")
    args = parser.parse_args()
    results = [profile_backend(name, preset, warm_blocks=6, profiled_blocks=2)
               for preset in args.presets.split(",") for name in args.backends.split(",")]
    cpu = cpu_name()
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": cpu, "cores": __import__("os").cpu_count(), "platform": platform.platform()},
           "torch": torch.__version__, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for r in results:
        print(f"{r['backend']} {r['preset']} ({r['num_layers']} layers): {r['backend_calls_per_block']} calls/block; "
              f"loop ops per call {sum(r['loop_ops_per_call'].values()):.1f}, per block outside calls "
              f"{sum(r['loop_ops_per_block_outside_calls'].values()):.1f}; loop allocations per block "
              f"{r['loop_allocations_per_block']:.1f} ({r['loop_allocated_bytes_per_block']:.0f} B)")
        print("    per call:  " + ", ".join(f"{op} {n:g}" for op, n in r["loop_ops_per_call"].items()))
        print("    per block: " + ", ".join(f"{op} {n:g}" for op, n in r["loop_ops_per_block_outside_calls"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
