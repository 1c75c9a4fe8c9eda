"""Benchmark: the extra latency of a prompt switch, with and without re-cache, and what it allocates.

Per backend (eager and ONNX Runtime on CPU, fp32, the ``mid`` preset at 96x128, random weights),
in a process of its own, one stream in the steady state (the window full, the memory ready):

- ``text``: one text-graph call (``backend.encode_text``), the unit of the no-re-cache target;
- ``block``: one block without a switch (four steps and the context pass), the unit of the
  re-cache target;
- ``switch`` per re-cache mode (none, recent, all): the switch's own work when it takes effect
  at the block boundary (text call, cross-attention copy, re-cache), timed around that work;
- allocation: every stream buffer keeps its address across all switches; the heap bytes in use
  (glibc ``mallinfo2``: torch's CPU allocator, ONNX Runtime's arena and Python all allocate
  there) after a block carrying a switch minus before it, next to the same for plain blocks; the
  process's RSS over the switches; for ONNX Runtime also the RSS the recache session itself
  costs (its own copy of the weights).

Every region is timed with two clocks: wall time, and the process's CPU time. The machine is
shared, so wall time depends on what else runs; CPU time with one intra-op thread
(``--threads 1``, the default) is the work itself and is what the ratios are judged on. Medians
over ``--repeats`` switches per mode, all from one run.

Targets (issue 12): a switch without re-cache costs no more than one text-graph call; with a
re-cache of the recent frames no more than one block; neither leaves an allocation behind.

Usage: flock /tmp/memrope-heavy.lock python bench/prompt_switch.py [--repeats 8] [--threads 1]
Writes bench/results/prompt_switch_mid_cpu.json and prints one JSON line last.
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
CLOCKS = ("wall_ms", "cpu_ms")


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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class _Timer:
    """Wall and process CPU time of a region, in ms."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_ms = (time.perf_counter() - self.wall) * 1e3
        self.cpu_ms = (time.process_time() - self.cpu) * 1e3


def _make_backend(name: str, workdir: Path, threads: int, recache: bool = True):
    """The mid preset's random weights on ``name`` through the one loader; ONNX Runtime runs an
    artifact of them exported once into ``workdir``."""
    from memrope.config import model_preset
    from memrope.export.onnx_export import export_artifact
    from memrope.runtime.bench import BENCH_PRESETS, bench_run_config
    from memrope.runtime.load import LoadRequest, resolve

    preset = BENCH_PRESETS["mid"]
    run = bench_run_config(model_preset("mid"), preset.height, preset.width, blocks=1000)
    eager = resolve(LoadRequest(preset="mid", run=run, decode=False, text=False))
    if name == "eager":
        return eager.load_backend(), run
    artifact = workdir / "mid_float32"
    if not artifact.exists():
        export_artifact(eager.load_dit(), run, artifact, height=preset.height, width=preset.width, validate=False)
    onnx = resolve(LoadRequest(engine=artifact, backend="onnxruntime", ort_provider="cpu", recache=recache,
                               decode=False, text=False))
    return onnx.load_backend(ort_threads=threads), run


def _addresses(stream) -> list[int]:
    tensors = [stream.cache.keys, stream.cache.values, stream.cache.memory_keys, stream.cache.memory_values,
               stream._clean, *stream.feeds.values(), *stream._recache_feeds.values(),
               *stream._recache_outputs.values(), *stream._x0]
    return [t.data_ptr() for t in tensors]


def _median(rows: list[_Timer], clock: str) -> float:
    return statistics.median(getattr(r, clock) for r in rows)


def bench_backend(name: str, repeats: int, workdir: str, threads: int) -> dict:
    import torch

    from memrope.pipeline import MemRoPEPipeline
    from memrope.sampler import StreamingSeededNoise

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    result: dict = {"backend": name, "threads": threads}
    backend, run = _make_backend(name, Path(workdir), threads)
    model = backend.model
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(1, model.text_len, model.text_dim, generator=g) for _ in range(2)]
    latent = (run.latent_channels, run.latent_height, run.latent_width)
    stream = MemRoPEPipeline(backend, run).stream(prompts[0], StreamingSeededNoise(0, 1, latent, 3))

    switches: list[_Timer] = []
    original = stream._apply_switches

    def timed_apply():
        with _Timer() as timer:
            original()
        switches.append(timer)

    stream._apply_switches = timed_apply
    for _ in range(6):  # fill, first eviction, memory ready
        stream.next_block()
    for mode in MODES:  # every switch path once, untimed
        stream.set_prompt(prompts[1], recache=mode)
        stream.next_block()
    padded = torch.zeros(1, model.text_len, model.text_dim)
    padded.copy_(prompts[1])
    backend.encode_text(padded)

    addresses = _addresses(stream)
    texts, plains, plain_held, rss = [], [], [], []
    per_mode = {m: {"switch": [], "held": []} for m in MODES}
    which = 0
    for _ in range(repeats):
        for mode in MODES:
            # A text call, a plain block, then a block that carries a switch, interleaved so
            # that all three see the same machine.
            with _Timer() as timer:
                backend.encode_text(padded)
            texts.append(timer)
            before = _heap_bytes()
            with _Timer() as timer:
                stream.next_block()
            plain_held.append(_heap_bytes() - before)
            plains.append(timer)
            which = 1 - which
            stream.set_prompt(prompts[which], recache=mode)
            switches.clear()
            before = _heap_bytes()
            stream.next_block()
            per_mode[mode]["held"].append(_heap_bytes() - before)
            per_mode[mode]["switch"].append(switches[0])
            rss.append(_rss_mb())
            assert _addresses(stream) == addresses, "a stream buffer moved"
    result.update({
        "text": {c: _median(texts, c) for c in CLOCKS},
        "block": {c: _median(plains, c) for c in CLOCKS},
        "heap_bytes_held_after_plain_block": plain_held,
        "rss_mb_after_each_switch": rss, "rss_growth_mb": rss[-1] - rss[0],
        "addresses_unchanged": True,
        "modes": {},
    })
    for mode, m in per_mode.items():
        row = {"switch": {c: _median(m["switch"], c) for c in CLOCKS}}
        for c in CLOCKS:
            row[f"switch_in_text_calls_{c}"] = row["switch"][c] / result["text"][c]
            row[f"switch_in_blocks_{c}"] = row["switch"][c] / result["block"][c]
        row["switch_all_runs"] = [{c: getattr(t, c) for c in CLOCKS} for t in m["switch"]]
        row["heap_bytes_held_after_switch_block"] = m["held"]
        result["modes"][mode] = row
    stream.close()
    backend.close()
    return result


def open_rss(name: str, workdir: str, threads: int, recache: bool) -> dict:
    """RSS of a fresh process once the backend is open (with or without the recache session)."""
    backend, _ = _make_backend(name, Path(workdir), threads, recache=recache)
    gc.collect()
    rss = _rss_mb()
    backend.close()
    return {"rss_mb": rss}


def _worker(queue, fn, *args) -> None:
    import traceback

    try:
        queue.put(fn(*args))
    except BaseException as exc:  # noqa: BLE001 -- report, do not hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def _meta(repeats: int, threads: int) -> dict:
    import importlib.metadata as md

    from memrope.cache import CacheLayout
    from memrope.config import model_preset
    from memrope.runtime.bench import BENCH_PRESETS, bench_run_config, cpu_name

    cpu = cpu_name()
    preset = BENCH_PRESETS["mid"]
    model = model_preset("mid")
    layout = CacheLayout.for_run(model, bench_run_config(model, preset.height, preset.width, 1000))
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                        "load_average_1_5_15": list(os.getloadavg())},
            "versions": {pkg: md.version(pkg) for pkg in ("torch", "onnxruntime")},
            "preset": {"model": "mid", "height": preset.height, "width": preset.width, "dtype": "float32"},
            "cache_layout": layout.describe(), "tail_frames": layout.tail_frames, "repeats": repeats,
            "threads": threads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="eager,onnxruntime")
    parser.add_argument("--repeats", type=int, default=8, help="switches per re-cache mode")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (torch and ONNX Runtime)")
    parser.add_argument("--workdir", type=Path, help="where the mid export goes (default: a temporary folder)")
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "prompt_switch_mid_cpu.json")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    start_meta = _meta(args.repeats, args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="memrope-switch-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        def child(fn, *fn_args) -> dict:
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(queue, fn, *fn_args))
            proc.start()
            out = queue.get()
            proc.join()
            if "error" in out:
                print(out["traceback"], file=sys.stderr)
            return out

        for name in args.backends.split(","):
            results.append(child(bench_backend, name, args.repeats, str(work), args.threads))
            if name == "onnxruntime" and "error" not in results[-1]:
                # What the recache session costs: a fresh process's RSS with the backend open.
                results[-1]["open_rss_mb"] = {f"recache_{flag}".lower(): child(open_rss, name, str(work), args.threads,
                                                                                flag)["rss_mb"]
                                              for flag in (False, True)}
                results[-1]["artifact_file_mb"] = {p.name: p.stat().st_size / 2 ** 20
                                                   for p in sorted((work / "mid_float32").glob("*.onnx*"))}
    start_meta["machine"]["load_average_at_end"] = list(os.getloadavg())
    from memrope.io import atomic_write

    atomic_write(args.json_out, json.dumps({"meta": start_meta, "results": results}, indent=1) + "\n")
    summary = []
    for r in results:
        if "error" in r:
            continue
        print(f"{r['backend']} ({r['threads']} thread): text call {r['text']['wall_ms']:.2f} ms wall / "
              f"{r['text']['cpu_ms']:.2f} ms CPU; block {r['block']['wall_ms']:.0f} / {r['block']['cpu_ms']:.0f} ms")
        for mode, m in r["modes"].items():
            print(f"  switch {mode:6s}: {m['switch']['wall_ms']:8.2f} ms wall / {m['switch']['cpu_ms']:8.2f} ms CPU"
                  f" = {m['switch_in_text_calls_cpu_ms']:6.2f} text calls = {m['switch_in_blocks_cpu_ms']:.3f} blocks "
                  f"(CPU); heap bytes held after (max) {max(m['heap_bytes_held_after_switch_block'])}")
        print(f"  plain blocks: heap bytes held after (max) {max(r['heap_bytes_held_after_plain_block'])}; "
              f"RSS growth over the switches {r['rss_growth_mb']:.2f} MB")
        if "open_rss_mb" in r:
            print(f"  RSS with the backend open: {r['open_rss_mb']}")
        summary.append({"backend": r["backend"], "text_cpu_ms": r["text"]["cpu_ms"], "block_cpu_ms": r["block"]["cpu_ms"],
                        **{f"switch_{m}_cpu_ms": r["modes"][m]["switch"]["cpu_ms"] for m in MODES}})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
