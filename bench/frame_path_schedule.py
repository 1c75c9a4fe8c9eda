"""Experiment: how the DiT and the VAE decode share a 2-core CPU (ONNX Runtime, demo and mid).

For the bench presets (random weights) this exports the DiT and VAE graphs once, then measures,
per schedule, with ONNX Runtime on the CPU: the DiT alone, the VAE decode alone, and
``stream_video`` end to end serially and overlapped (block b decoding in the VAEStream worker while
the DiT computes block b+1). A schedule is each session's intra-op thread count and whether its
idle threads spin (``session.intra_op.allow_spinning``). All schedules' sessions are open in one
process per preset and the rounds visit them in turn, a segment of each measurement at a time:
these VMs drift by tens of percent over minutes, and separate runs per schedule compared drift,
not schedules. The derived figures (``summary``): each stage's single-thread time (its least core
time) and 2-thread speedup, the core-time lower bound of any overlap on this many cores, and the
best overlapped block against the best ``max(DiT, VAE)`` and the best serial block of any schedule.
Results: ``bench/results/frame_path_schedule_cpu.json`` and ``docs/frame_path_schedule_cpu.md``.

Usage: flock /tmp/memrope-heavy.lock python bench/frame_path_schedule.py [--presets demo,mid] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import onnxruntime
import torch

ROOT = Path(__file__).resolve().parents[1]
# name: (DiT threads, DiT spins, VAE threads, VAE spins)
SCHEDULES = {
    "2+2, DiT spins (before)": (2, True, 2, False),
    "2+2, neither spins (engine default)": (2, False, 2, False),
    "1+1 (one core each)": (1, False, 1, False),
    "DiT 1 + VAE 2": (1, False, 2, False),
}
SEGMENT = 6  # blocks per measured segment; its first (and, end to end, its last) are not steady


def measure(artifact_dir: Path, rounds: int) -> list[dict]:
    """Every schedule's sessions open in this one process; the rounds visit them in turn (DiT
    alone, VAE alone, serial, overlapped: a segment each), so the machine's drift over minutes
    hits every schedule and mode alike. Medians over the rounds' steady-state blocks."""
    from memrope.artifact import load_artifact
    from memrope.engine.onnxruntime_backend import OnnxRuntimeBackend
    from memrope.engine.vae_onnxruntime_backend import OnnxRuntimeVAEBackend
    from memrope.pipeline import MemRoPEPipeline
    from memrope.runtime.bench import _ArrivalWriter
    from memrope.runtime.t2v import stream_video
    from memrope.runtime.vae import VAEStream
    from memrope.sampler import StreamingSeededNoise

    artifact = load_artifact(artifact_dir)
    run = replace(artifact.run, num_output_frames=3 * SEGMENT)
    latent = (run.latent_channels, run.latent_height, run.latent_width)
    embeds = torch.randn(1, artifact.model.text_len, artifact.model.text_dim, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    vae_inputs = [torch.randn(1, 3, *latent, generator=g) for _ in range(SEGMENT)]
    opened = {}
    for name, (dit_threads, dit_spins, vae_threads, vae_spins) in SCHEDULES.items():
        dit = OnnxRuntimeBackend(artifact, provider="cpu", threads=dit_threads, spinning=dit_spins, recache=False)
        streams = {overlap: VAEStream(OnnxRuntimeVAEBackend(artifact, provider="cpu", threads=vae_threads,
                                                             spinning=vae_spins), 3, overlap=overlap)
                   for overlap in ("alone", False, True)}
        opened[name] = (dit, MemRoPEPipeline(dit, run), streams)
    samples = {name: {"dit_alone": [], "vae_alone": [], "serial": [], "overlap": []} for name in SCHEDULES}

    def segment(name: str, kind: str) -> list[float]:
        _, pipeline, streams = opened[name]
        noise = StreamingSeededNoise(0, 1, latent, 3)
        if kind == "dit_alone":
            marks = [time.perf_counter()]
            for _ in pipeline.blocks(embeds, noise, SEGMENT):
                marks.append(time.perf_counter())
            return [(b - a) * 1e3 for a, b in zip(marks[1:-1], marks[2:], strict=True)]
        if kind == "vae_alone":
            stream = streams["alone"]
            stream.reset()
            done = len(stream.decode_ms)
            for x in vae_inputs:
                stream.decode(x)
            return stream.decode_ms[done + 1:]
        writer, start = _ArrivalWriter(), time.perf_counter()
        stream_video(pipeline, embeds, noise, SEGMENT, streams[kind == "overlap"], writer, progress=False)
        arrivals = [start, *writer.arrivals]
        return [(b - a) * 1e3 for a, b in zip(arrivals[1:-1], arrivals[2:-1], strict=False)]

    try:
        for name in SCHEDULES:  # warm-up: one segment of each kind, not kept
            for kind in samples[name]:
                segment(name, kind)
        for _ in range(rounds):
            for name in SCHEDULES:
                for kind in samples[name]:
                    samples[name][kind] += segment(name, kind)
    finally:
        for dit, _, streams in opened.values():
            for stream in streams.values():
                stream.close()
            dit.close()
    rows = []
    for name, schedule in SCHEDULES.items():
        med = {kind: statistics.median(values) for kind, values in samples[name].items()}
        rows.append({"name": name, "schedule": list(schedule), **{f"{k}_block_ms": v for k, v in med.items()},
                     "samples": {k: len(v) for k, v in samples[name].items()},
                     "overlap_vs_own_max": med["overlap"] / max(med["dit_alone"], med["vae_alone"])})
    return rows


def export(preset_name: str, workdir: Path) -> Path:
    from memrope.export.onnx_export import export_artifact
    from memrope.model import build_dit, random_state_dict
    from memrope.runtime.bench import BENCH_PRESETS, bench_model, bench_run_config, bench_vae
    from memrope.vae import WanStreamingDecoder

    preset = BENCH_PRESETS[preset_name]
    model = bench_model(preset)
    run = bench_run_config(model, preset.height, preset.width, 4)
    path = workdir / preset_name
    export_artifact(build_dit(model, random_state_dict(model)), run, path, height=preset.height, width=preset.width,
                    validate=False, vae=WanStreamingDecoder.from_diffusers(bench_vae(preset)))
    return path


def summarize(rows: list[dict], cores: int) -> dict:
    """Per stage: single-thread time (its least core time) and 2-thread speedup; the core-time
    bound of any overlap on ``cores`` cores; the best overlapped block against the best
    max(DiT, VAE) and the best serial block of any schedule."""
    def alone(stage: str, threads: int) -> float:
        index = 0 if stage == "dit" else 2
        return min(r[f"{stage}_alone_block_ms"] for r in rows if r["schedule"][index] == threads)

    dit1, dit2, vae1, vae2 = alone("dit", 1), alone("dit", 2), alone("vae", 1), alone("vae", 2)
    best_max = min(max(r["dit_alone_block_ms"], r["vae_alone_block_ms"]) for r in rows)
    best_serial = min(r["serial_block_ms"] for r in rows)
    best = min(rows, key=lambda r: r["overlap_block_ms"])
    return {"dit_1_thread_ms": dit1, "dit_2_threads_ms": dit2, "dit_speedup_2_threads": dit1 / dit2,
            "vae_1_thread_ms": vae1, "vae_2_threads_ms": vae2, "vae_speedup_2_threads": vae1 / vae2,
            "best_max_dit_vae_ms": best_max, "best_serial_ms": best_serial,
            "core_time_bound_ms": (dit1 + vae1) / cores,
            "core_time_bound_vs_best_max": (dit1 + vae1) / cores / best_max,
            "best_overlap_ms": best["overlap_block_ms"], "best_overlap_schedule": best["name"],
            "best_overlap_vs_best_max": best["overlap_block_ms"] / best_max,
            "best_overlap_vs_best_serial": best["overlap_block_ms"] / best_serial}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="demo,mid")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "frame_path_schedule_cpu.json")
    args = parser.parse_args()
    if args.child:
        path, rounds = args.child
        print(json.dumps(measure(Path(path), int(rounds))))
        return 0
    from memrope.io import atomic_write
    from memrope.runtime.bench import cpu_name

    results, summary = {}, {}
    with tempfile.TemporaryDirectory(prefix="memrope-schedule-") as tmp:
        for preset in args.presets.split(","):
            path = export(preset, Path(tmp))
            # Its own process: the export's threads and memory stay out of the measurement.
            line = subprocess.run([sys.executable, __file__, "--child", str(path), str(args.rounds)], check=True,
                                  capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()[-1]
            results[preset] = json.loads(line)
            summary[preset] = summarize(results[preset], os.cpu_count() or 1)
            print(json.dumps({preset: {"rows": results[preset], "summary": summary[preset]}}, indent=1), flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_name(), "cpus": os.cpu_count()},
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            "rounds": args.rounds, "segment_blocks": SEGMENT,
            "schedule_fields": ["dit_threads", "dit_spins", "vae_threads", "vae_spins"]}
    atomic_write(args.out, json.dumps({"meta": meta, "summary": summary, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
