"""Benchmark: ahead-of-time TensorRT-RTX builds (no GPU) of the tiny, mid and full Wan2.1-1.3B shapes in bf16.

For each preset: ``memrope export --preset P --dtype bfloat16 --no-validate`` (random weights), then
``memrope build ART --target rtx``, each in a child process whose wall time and peak RSS come from
``wait4``. Records, per graph, the plan size, the builder's own parse and build seconds and what it
did with attention (from the sidecar's build report). Multi-GB artifacts are written under
``--workdir`` and deleted afterwards. Each preset's export and build hold ``/tmp/memrope-heavy.lock``
(``flock``), so no other heavy job on the machine runs at the same time.

Results: ``bench/results/tensorrt_rtx_build.json`` and ``docs/tensorrt_rtx_build.md``; with
``--quantize MODE`` the export is quantized and the results go to ``..._<MODE>.json`` / ``.md``, with
the layers each plan runs in low precision and the step plan's size against the bf16 one's. The
modes that quantize activations (``fp8``, ``int8``) calibrate on encoded prompts, and a
random-weight preset has no text encoder: the export gets ``--model-dir`` with a random-weight umT5
of the preset's text width (``build_tiny_text_model``: 2 layers, the real width, the tiny
tokenizer), and ``--calibration-prompts N`` (default 1) of the built-in prompts driven through
``--calibration-blocks B`` (default 1) blocks, computing in float32. The DiT's weights are random too, so the ranges mean
as little as the weights; what is measured is the time, the memory and the plans.

Usage: python bench/tensorrt_rtx_build.py [--presets tiny,mid,wan-1.3b] [--workdir /tmp/memrope_rtx_build]
       [--quantize int4-wo|int8-wo|fp8|int8] [--compute-capability 8.9,12.0]
       [--calibration-prompts 1] [--calibration-blocks 1]
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memrope.runtime.bench import BENCH_PRESETS, cpu_name  # noqa: E402  (the presets' pixel sizes, one definition)

HEAVY_LOCK = Path("/tmp/memrope-heavy.lock")
CALIBRATION_DTYPE = "float32"  # what the calibration loop computes in (bf16 GEMMs are slow on a CPU)
TARGET_STEP_SECONDS, TARGET_PEAK_GB = 120, 12  # full-size bf16 step, on the project's 2-core, 24 GB machine


@contextmanager
def heavy_lock() -> Iterator[None]:
    with open(HEAVY_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_child(args: list[str]) -> dict:
    """``python -m memrope ARGS`` in a child: exit code, wall seconds, peak RSS (GB) and output tail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "memrope", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return {"exit_code": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - start, 1),
            # CPU seconds (user + system) do not grow when other jobs share the cores; wall time does.
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 1024 ** 2, 2), "output_tail": output.strip().splitlines()[-4:],
            # Other jobs on the machine slow a child down: the 1-minute load average before and after.
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def calibration_args(preset_name: str, workdir: Path, prompts: int, blocks: int) -> list[str]:
    """``memrope export`` arguments that calibrate a random-weight preset's activations: a
    random-weight umT5 of its text width in ``workdir`` and the first ``prompts`` built-in prompts."""
    from memrope.config import model_preset
    from memrope.runtime.prompts import CALIBRATION_PROMPTS
    from memrope.runtime.text import build_tiny_text_model

    cfg = model_preset(preset_name)
    text = workdir / f"text_{cfg.text_dim}_{cfg.text_len}"
    if not (text / "text_encoder_info.json").is_file():
        build_tiny_text_model(text, layout="diffusers", d_model=cfg.text_dim, text_len=cfg.text_len, seed=0)
    prompt_file = workdir / f"calibration_{prompts}.txt"
    prompt_file.write_text("\n".join(CALIBRATION_PROMPTS[:prompts]) + "\n")
    return ["--model-dir", str(text), "--no-vae", "--calibration-prompts", str(prompt_file),
            "--calibration-blocks", str(blocks), "--calibration-dtype", CALIBRATION_DTYPE]


def measure(preset_name: str, workdir: Path, keep: bool, quantize: str | None = None,
            compute_capability: str | None = None, calibration: list[str] | None = None) -> dict:
    """Export (or reuse a kept export with its measurement) and build one preset; delete it unless
    ``keep``. ``calibration``: the export's calibration arguments (:func:`calibration_args`)."""
    preset = BENCH_PRESETS[preset_name]
    out = workdir / f"{preset_name}_{preset.width}x{preset.height}_bf16{'_' + quantize if quantize else ''}"
    kept = workdir / f"{out.name}.export.json"
    result = {"preset": preset_name, "height": preset.height, "width": preset.width, "dtype": "bfloat16",
              "quantize": quantize}
    with heavy_lock():
        if out.is_dir() and kept.is_file():
            result["export"] = {**json.loads(kept.read_text()), "reused": True}
            for plan in list(out.glob("*.plan")) + list(out.glob("*.plan.json")):
                plan.unlink()
        else:
            result["export"] = run_child(["export", "--preset", preset_name, "--height", str(preset.height),
                                          "--width", str(preset.width), "--dtype", "bfloat16", "--no-validate",
                                          "--force", "--out", str(out),
                                          *(["--quantize", quantize] if quantize else []), *(calibration or [])])
            kept.write_text(json.dumps(result["export"]))
        if result["export"]["exit_code"] == 0:
            result["onnx_mb"] = {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(out.iterdir())
                                 if ".onnx" in p.name}
            result["build"] = run_child(["build", str(out), "--target", "rtx",
                                         *(["--compute-capability", compute_capability] if compute_capability else [])])
            if result["build"]["exit_code"] == 0:
                result["graphs"] = {}
                for sidecar_file in sorted(out.glob("*.plan.json")):
                    sidecar = json.loads(sidecar_file.read_text())
                    report = sidecar["report"]
                    result["graphs"][sidecar["graph"]] = {
                        "plan_mb": round(report["plan_bytes"] / 1e6, 1), "parse_s": report["parse_seconds"],
                        "build_s": report["build_seconds"], "engine_layers": report["engine_layers"],
                        "attention_layers": report["attention_layers"], "attention": report["attention"],
                        "module": f"{sidecar['module']} {sidecar['module_version']}",
                        "compute_capabilities": sidecar["compute_capabilities"],
                        "quantization": report.get("quantization")}
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
            kept.unlink(missing_ok=True)
    return result


def write_markdown(doc: dict, path: Path) -> None:
    meta = doc["meta"]
    quantize = meta.get("quantize")
    precision = f"bf16 with {quantize} Linear layers" if quantize else "bf16"
    lines = [f"# TensorRT-RTX ahead-of-time builds (no GPU): tiny, mid and Wan2.1-1.3B at 832x480, {precision}", "",
             f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPUs, {meta['ram_gb']} GB RAM, no GPU), "
             f"{meta['tensorrt_rtx']}, torch {meta['torch']}. Produced by `python bench/tensorrt_rtx_build.py` "
             "(random weights; each step in its own process; peak RSS from `wait4`).", "",
             "| preset | pixels | `memrope build` wall (CPU) | build peak RSS | step plan | step parse + build | "
             "text plan | text parse + build | step attention | load avg | export wall (CPU) | export peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        export, build = r["export"], r.get("build", {})
        if export["exit_code"] != 0 or build.get("exit_code") != 0:
            failed = export if export["exit_code"] != 0 else build
            lines.append(f"| {r['preset']} | {r['width']}x{r['height']} | failed: {' / '.join(failed['output_tail'])} "
                         "| | | | | | | | | |")
            continue
        step, text = r["graphs"]["step"], r["graphs"]["text"]
        load = "–".join(f"{v:g}" for v in build.get("load_avg_1min", []))
        lines.append(f"| {r['preset']} | {r['width']}x{r['height']} | {build['wall_s']} s ({build.get('cpu_s')} s) "
                     f"| {build['peak_rss_gb']} GB | {step['plan_mb']} MB | {step['parse_s']:.1f} + "
                     f"{step['build_s']:.1f} s | {text['plan_mb']} MB | {text['parse_s']:.1f} + "
                     f"{text['build_s']:.1f} s "
                     f"| {step['attention']} | {load} | {export['wall_s']} s ({export.get('cpu_s')} s) "
                     f"| {export['peak_rss_gb']} GB |")
    full = next((r for r in doc["results"] if r["preset"] == "wan-1.3b" and "graphs" in r), None)
    if quantize:
        lines += ["", "Layers in low precision, per plan (the build report, counted from the engine's layer listing):"]
        for r in doc["results"]:
            for graph, g in r.get("graphs", {}).items():
                q = g.get("quantization") or {}
                if q.get("quantized_matmuls"):
                    lines.append(f"- {r['preset']} {graph}: {q['quantized_matmuls']} quantized MatMuls in "
                                 f"{q['low_precision_layers']} engine layers reading {q['layers_reading']}")
        if meta.get("calibration"):
            c = meta["calibration"]
            lines.append(f"- Calibration: {c['prompts']} built-in prompt(s) x {c['blocks_per_prompt']} block(s) of "
                         f"the eager loop, computing in {c.get('dtype', 'the export dtype')}, encoded by a "
                         f"{c['text_encoder']} (the weights are random: the time and memory are what is measured).")
        bf16 = ROOT / "bench" / "results" / "tensorrt_rtx_build.json"
        if bf16.is_file():
            base = {r["preset"]: r for r in json.loads(bf16.read_text())["results"]}
            for r in doc["results"]:
                old = base.get(r["preset"], {}).get("graphs", {}).get("step")
                new = r.get("graphs", {}).get("step")
                if old and new:
                    lines.append(f"- {r['preset']} step plan: {new['plan_mb']} MB against bf16's {old['plan_mb']} MB "
                                 f"({new['plan_mb'] / old['plan_mb']:.2f}x)")
    if full is not None and not quantize:
        step = full["graphs"]["step"]
        seconds, peak = step["parse_s"] + step["build_s"], full["build"]["peak_rss_gb"]
        verdict = "met" if seconds < TARGET_STEP_SECONDS and peak <= TARGET_PEAK_GB else "NOT met"
        lines += ["", f"Target for the full-size bf16 step (under {TARGET_STEP_SECONDS} s at no more than "
                      f"{TARGET_PEAK_GB} GB peak RSS on the 2-core, 24 GB machine): **{verdict}** "
                      f"({seconds:.1f} s parse + build, {peak} GB peak RSS for the whole `memrope build`, "
                      "step and text)."]
    if meta.get("notes"):
        lines += ["", "Notes:"] + [f"- {note}" for note in meta["notes"]]
    lines += ["", "Reading:",
              "- Load avg: the machine's 1-minute load average before and after the build (2 cores; other "
              "jobs share them, and the wall time grows with the load). CPU: user + system seconds of the "
              "process, which sharing inflates much less.",
              "- Export columns: measured when the export was made; an export kept with `--keep-exports` is "
              "built again by later runs without re-exporting (`\"reused\": true` in the JSON, with the "
              "export's own load average).",
              "- `memrope build` wall time includes starting Python, importing torch and TensorRT-RTX, "
              "loading and checking the artifact, both graphs, and writing the plans; the parse + build "
              "columns are the builder's own time for each graph.",
              "- The plans carry their weights (TensorRT-RTX stores them in the engine by default), so a plan "
              "is about the size of its graph's external data. They target compute capabilities "
              "8.0, 8.6, 8.9 and 12.0 and later (the builder's defaults); a GPU specialises them at load "
              "(JIT) and caches the result next to the plan (`<graph>.plan.rtxcache`).",
              "- Attention: bf16 attention stays non-decomposable and lands on TensorRT-RTX's fused kernel "
              "(`_gemm_mha_v2`), one per attention layer, as the build log's layer listing shows. fp32 "
              "exports (not measured here) mark attention decomposable at build time, because TensorRT-RTX has "
              "no fused fp32 kernel for it; see docs/export_and_engines.md.",
              ""]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,mid,wan-1.3b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/memrope_rtx_build"))
    parser.add_argument("--note", action="append", default=[], help="a remark to record with the results")
    parser.add_argument("--quantize", choices=("int8-wo", "int4-wo", "fp8", "int8"), help="quantize the export")
    parser.add_argument("--calibration-prompts", type=int, default=1,
                        help="fp8, int8: how many built-in prompts calibrate the activations (default 1)")
    parser.add_argument("--calibration-blocks", type=int, default=1,
                        help="fp8, int8: blocks of the loop per calibration prompt (default 1)")
    parser.add_argument("--compute-capability", help="build for these compute capabilities (e.g. 8.9,12.0)")
    parser.add_argument("--keep-exports", action="store_true",
                        help="keep the exports (and their measurements) in --workdir; a later run builds them again "
                             "without re-exporting")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import tensorrt_rtx
    import torch

    meta = {"date": datetime.date.today().isoformat(), "machine": platform.node() or platform.machine(),
            "cpus": os.cpu_count(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3),
            "cpu_model": cpu_name(),
            "tensorrt_rtx": f"tensorrt_rtx {tensorrt_rtx.__version__}", "torch": torch.__version__,
            "platform": platform.platform(), "notes": args.note, "quantize": args.quantize,
            "compute_capability": args.compute_capability}
    activations = args.quantize in ("fp8", "int8")
    if activations:
        meta["calibration"] = {"prompts": args.calibration_prompts, "blocks_per_prompt": args.calibration_blocks,
                               "dtype": CALIBRATION_DTYPE,
                               "text_encoder": "random-weight umT5, 2 layers, the preset's text width"}
    results = [measure(name, args.workdir, args.keep_exports, args.quantize, args.compute_capability,
                       calibration_args(name, args.workdir, args.calibration_prompts, args.calibration_blocks)
                       if activations else None)
               for name in args.presets.split(",")]
    doc = {"meta": meta, "results": results}
    suffix = f"_{args.quantize}" if args.quantize else ""
    (ROOT / "bench" / "results" / f"tensorrt_rtx_build{suffix}.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc, ROOT / "docs" / f"tensorrt_rtx_build{suffix}.md")
    summary = [{"preset": r["preset"], "build": {k: r.get("build", {}).get(k) for k in ("wall_s", "peak_rss_gb")},
                "plans_mb": {g: v["plan_mb"] for g, v in r.get("graphs", {}).items()}} for r in results]
    print(json.dumps(summary))
    return 0 if all(r.get("build", {}).get("exit_code") == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
