"""Benchmark: the extra latency of a prompt switch, with and without re-cache, and what it allocates.

Per backend (eager and ONNX Runtime on CPU, fp32, the ``mid`` preset at 96x128, random weights),
in a process of its own, one stream in the steady state (the window full, the memory ready):

- ``text_ms``: one text-graph call (``backend.encode_text``), the unit of the no-re-cache target;
- ``block_ms``: one block without a switch (four steps and the context pass), the unit of the
  re-cache target;
- per re-cache mode (none, recent, all): the switch's own work (``set_prompt`` applied at the
  block boundary: text call, cross-attention copy, re-cache), timed around that work, and the
  latency of the block that carries it minus a block without;
- allocation: every stream buffer keeps its address across all switches; the heap bytes in use
  (glibc ``mallinfo2``: torch's CPU allocator, ONNX Runtime's arena and Python all allocate
  there) after a block carrying a switch minus before it, next to the same for plain blocks; the
  process's RSS over the switches; for ONNX Runtime also the RSS the recache session itself
  costs (its own copy of the weights).

Targets (issue 12): a switch without re-cache costs no more than one text-graph call; with a
re-cache of the recent frames no more than one block; neither leaves an allocation behind.

Usage: flock /tmp/memrope-heavy.lock python bench/prompt_switch.py [--repeats 8] [--workdir DIR]
Writes bench/results/prompt_switch_mid_cpu.json (and prints one JSON line last).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("none", "recent", "all")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _make_backend(name: str, workdir: Path, recache: bool = True):
    import torch

    from memrope.config import model_preset
    from memrope.model import build_dit, random_state_dict
    from runtime.bench import BENCH_PRESETS, bench_run_config

    preset = BENCH_PRESETS["mid"]
    model = model_preset("mid")
    run = bench_run_config(model, preset.height, preset.width, blocks=1000)
    dit = build_dit(model, random_state_dict(model), dtype=torch.float32)
    if name == "eager":
        from engine.eager_backend import EagerBackend

        return EagerBackend(dit, run), run
    from engine.onnxruntime_backend import OnnxRuntimeBackend
    from export.onnx_export import export_artifact

    artifact = workdir / "mid_float32"
    if not artifact.exists():
        export_artifact(dit, run, artifact, height=preset.height, width=preset.width, validate=False)
    del dit
    return OnnxRuntimeBackend(artifact, provider="cpu", recache=recache), run


def _addresses(stream) -> list[int]:
    tensors = [stream.cache.keys, stream.cache.values, stream.cache.memory_keys, stream.cache.memory_values,
               stream._clean, *stream.feeds.values(), *stream._recache_feeds.values(),
               *stream._recache_outputs.values(), *stream._x0]
    return [t.data_ptr() for t in tensors]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _Mallinfo2


def _heap_bytes() -> int:
    """Bytes the process has allocated from the C heap and not freed (after a garbage collection)."""
    gc.collect()
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def _timed_block(stream) -> tuple[float, int]:
    """(milliseconds, heap bytes still held afterwards) of one ``next_block``."""
    before = _heap_bytes()
    start = time.perf_counter()
    stream.next_block()
    elapsed = (time.perf_counter() - start) * 1e3
    return elapsed, _heap_bytes() - before


def bench_backend(name: str, repeats: int, workdir: str) -> dict:
    import torch

    from memrope.pipeline import MemRoPEPipeline
    from memrope.sampler import StreamingSeededNoise

    torch.manual_seed(0)
    result: dict = {"backend": name}
    if name == "onnxruntime":
        # What the recache session costs: RSS of a backend opened with and without it.
        for with_recache in (False, True):
            gc.collect()
            before = _rss_mb()
            backend, _ = _make_backend(name, Path(workdir), recache=with_recache)
            result[f"backend_rss_mb_recache_{with_recache}".lower()] = _rss_mb() - before
            backend.close()
            del backend
            gc.collect()
    backend, run = _make_backend(name, Path(workdir))
    model = backend.model
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(1, model.text_len, model.text_dim, generator=g) for _ in range(2)]
    latent = (run.latent_channels, run.latent_height, run.latent_width)
    pipeline = MemRoPEPipeline(backend, run)
    stream = pipeline.stream(prompts[0], StreamingSeededNoise(0, 1, latent, 3))

    # Text-graph calls (warmed up), in the same padded form the stream hands the backend.
    padded = torch.zeros(1, model.text_len, model.text_dim)
    padded.copy_(prompts[1])
    for _ in range(3):
        backend.encode_text(padded)
    text_ms = []
    for _ in range(20):
        start = time.perf_counter()
        backend.encode_text(padded)
        text_ms.append((time.perf_counter() - start) * 1e3)

    switch_ms: list[float] = []
    original = stream._apply_switches

    def timed_apply():
        start = time.perf_counter()
        original()
        switch_ms.append((time.perf_counter() - start) * 1e3)

    stream._apply_switches = timed_apply
    for _ in range(6):  # fill, first eviction, memory ready; warms every path once
        stream.next_block()
    for mode in MODES:
        stream.set_prompt(prompts[1], recache=mode)
        stream.next_block()
    addresses = _addresses(stream)
    rss_start = _rss_mb()
    plain_ms, plain_held, rss = [], [], []
    per_mode = {m: {"switch_ms": [], "block_ms": [], "held_bytes": []} for m in MODES}
    which = 0
    for _ in range(repeats):
        for mode in MODES:
            elapsed, held = _timed_block(stream)
            plain_ms.append(elapsed)
            plain_held.append(held)
            which = 1 - which
            stream.set_prompt(prompts[which], recache=mode)
            switch_ms.clear()
            elapsed, held = _timed_block(stream)
            per_mode[mode]["block_ms"].append(elapsed)
            per_mode[mode]["switch_ms"].append(switch_ms[0])
            per_mode[mode]["held_bytes"].append(held)
            rss.append(_rss_mb())
            assert _addresses(stream) == addresses, "a stream buffer moved"
    text_median = statistics.median(text_ms)
    block_median = statistics.median(plain_ms)
    result.update({
        "text_ms_median": text_median, "text_ms": text_ms,
        "block_ms_median": block_median, "block_ms": plain_ms,
        "heap_bytes_held_after_plain_block": plain_held,
        "rss_mb_after_warmup": rss_start, "rss_mb_after_each_switch": rss,
        "rss_growth_mb": rss[-1] - rss[0],
        "addresses_unchanged": True,
        "modes": {},
    })
    for mode, m in per_mode.items():
        switch_median = statistics.median(m["switch_ms"])
        result["modes"][mode] = {
            "switch_ms_median": switch_median, "switch_ms_min": min(m["switch_ms"]),
            "switch_ms_max": max(m["switch_ms"]),
            "switch_in_text_calls": switch_median / text_median,
            "switch_in_blocks": switch_median / block_median,
            "block_with_switch_minus_plain_ms": statistics.median(m["block_ms"]) - block_median,
            "heap_bytes_held_after_switch_block": m["held_bytes"],
            "switch_ms": m["switch_ms"], "block_ms": m["block_ms"],
        }
    stream.close()
    backend.close()
    return result


def _worker(queue, *args) -> None:
    import traceback

    try:
        queue.put(bench_backend(*args))
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def _meta(repeats: int) -> dict:
    import importlib.metadata as md

    from memrope.cache import CacheLayout
    from memrope.config import model_preset
    from runtime.bench import BENCH_PRESETS, bench_run_config

    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    preset = BENCH_PRESETS["mid"]
    model = model_preset("mid")
    layout = CacheLayout.for_run(model, bench_run_config(model, preset.height, preset.width, 1000))
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()},
            "versions": {pkg: md.version(pkg) for pkg in ("torch", "onnxruntime")},
            "preset": {"model": "mid", "height": preset.height, "width": preset.width, "dtype": "float32"},
            "cache_layout": layout.describe(), "tail_frames": layout.tail_frames, "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="eager,onnxruntime")
    parser.add_argument("--repeats", type=int, default=8, help="switches per re-cache mode")
    parser.add_argument("--workdir", type=Path, help="where the mid export goes (default: a temporary folder)")
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "prompt_switch_mid_cpu.json")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory(prefix="memrope-switch-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.backends.split(","):
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(queue, name, args.repeats, str(work)))
            proc.start()
            results.append(queue.get())
            proc.join()
            if "error" in results[-1]:
                print(results[-1]["traceback"], file=sys.stderr)
    doc = {"meta": _meta(args.repeats), "results": results}
    from memrope.io import atomic_write

    atomic_write(args.json_out, json.dumps(doc, indent=1) + "\n")
    for r in results:
        if "error" in r:
            continue
        print(f"{r['backend']}: text call {r['text_ms_median']:.2f} ms, block {r['block_ms_median']:.0f} ms")
        for mode, m in r["modes"].items():
            print(f"  switch {mode:6s}: {m['switch_ms_median']:8.2f} ms = {m['switch_in_text_calls']:6.2f} text calls "
                  f"= {m['switch_in_blocks']:.3f} blocks; heap bytes held after (max): "
                  f"{max(m['heap_bytes_held_after_switch_block'])}")
        print(f"  plain blocks: heap bytes held after (max): {max(r['heap_bytes_held_after_plain_block'])}")
        print(f"  RSS growth over the switches: {r['rss_growth_mb']:.1f} MB")
    print(json.dumps([{k: r.get(k) for k in ("backend", "text_ms_median", "block_ms_median", "rss_growth_mb")}
                      | {m: r["modes"][m]["switch_ms_median"] for m in r.get("modes", {})} for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
