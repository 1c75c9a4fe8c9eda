"""Benchmark: what the trained demo model's videos show, read back by the demo world's evaluator.

Four parts, each runnable alone (``--part``), each writing ``bench/results/demo_quality_<part>.json``;
``--part report`` turns the JSON files into ``docs/demo_quality.md`` and its plots:

- ``fidelity``: the 50 :data:`EVAL_PROMPTS`, 10 s each (14 blocks), seed 0, on eager fp32, ONNX
  Runtime fp32 (an artifact exported from the demo model) and eager bf16: the fraction of prompts
  whose background, object colour, shape and motion the evaluator reads as the prompt says.
- ``switch``: "a red ball moving right on a blue background" for 6 blocks, then "a green square
  moving left on a white background", per re-cache mode (none, recent, all): per block after the
  switch, which scene the evaluator reads (window of that block's frames): the first block with
  the new background, and the frames showing objects of both colours.
- ``horizon``: 10 minutes of video per cache policy: ``ema`` (MemRoPE), ``eviction`` (3 sink
  frames + the recent frames) and a sink-less sliding window (``eviction`` with ``sink_size`` 0),
  for a few prompts: per 10 s window the evaluator's attribute accuracy, per second the
  background's colour drift against the first second (RGB distance) and the frames' sharpness
  (mean absolute Laplacian).
- ``vae``: the trained VAE decoder on ONNX Runtime against eager, fp32, on the DiT's own latents
  of 10 prompts: PSNR (dB).
- ``vae-fp8``: the VAE decoder in FP8 alone: the same latents of an fp8 export decoded by the eager
  float VAE and by its ``vae_decode.onnx`` (FP8 convolutions) on ONNX Runtime, 10 prompts x 10 s:
  PSNR (dB) and the evaluator's read of each.
- ``quantized`` (``--mode fp8|int8|int8-wo|int4-wo``): a float32 export of the demo model quantized in
  that mode (``memrope export --quantize``, default calibration) run by ONNX Runtime: the fidelity
  part's 50 prompts, and for the first ``--psnr-prompts`` of them the PSNR of its decoded frames
  against eager bf16's (same prompt and seed). Writes ``demo_quality_quantized_<mode>.json``.

Usage: python bench/demo_quality.py --part fidelity|switch|horizon|vae|vae-fp8|quantized|report [--threads 1]
       [--mode fp8]
The model is the embedded demo model (``memrope.runtime.t2v.ensure_demo_model``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "demo_quality.md"
FPS = 16
ATTRIBUTES = ("background", "color", "shape", "motion")
QUANTIZED_MODES = ("fp8", "int8", "int8-wo", "int4-wo")
FIRST_BLOCK_FRAMES = 9  # video frames of a video's first block (1 + 4 x 2)
SWITCH_FROM = "a red ball moving right on a blue background"
SWITCH_TO = "a green square moving left on a white background"
SWITCH_AT_BLOCK = 6
SWITCH_BLOCKS_AFTER = 8
HORIZON_PROMPTS = ("a red ball bouncing on a blue background", "a yellow square moving left on a gray background",
                   "a white triangle moving up on a green background")
HORIZON_POLICIES = {"ema": dict(policy="ema", sink_frames=3), "eviction": dict(policy="eviction", sink_frames=3),
                    "sinkless": dict(policy="eviction", sink_frames=0)}


def _machine() -> dict:
    import torch

    from memrope.runtime.bench import cpu_name

    return {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _model() -> dict:
    """Which demo model a result measured: its DiT's SHA-256 (first 12 hex digits) and training date."""
    from memrope.runtime.t2v import shipped_demo_model

    manifest = json.loads((shipped_demo_model() / "manifest.json").read_text())
    return {"dit_sha256": manifest["files"]["diffusion_pytorch_model.safetensors"]["sha256"][:12],
            "trained": manifest["date"]}


def _write(part: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"demo_quality_{part}.json"
    path.write_text(json.dumps({"machine": _machine(), "model": _model(), **payload}, indent=1) + "\n")
    return path


def _earlier(result: dict) -> str:
    """A note for a result measured on a demo model other than the shipped one ('' if the same)."""
    model = result["model"]
    if model == _model():
        return ""
    return (f" (Measured on an earlier demo model: DiT sha256 {model['dit_sha256']}, trained {model['trained']}; "
            "not yet measured on the shipped one.)")


def _pipeline(**options):
    from memrope.runtime.api import VideoPipeline

    return VideoPipeline.from_pretrained("tiny", **options)


def _stream_frames(pipe, prompt: str, blocks: int, seed: int = 0) -> np.ndarray:
    with pipe.stream(prompt, seed=seed) as stream:
        return np.concatenate([next(stream) for _ in range(blocks)])


def _score(frames: np.ndarray, prompt: str) -> dict:
    from memrope.runtime.demo.evaluate import evaluate, score

    return score(evaluate(frames), prompt)


def part_fidelity(seconds: float = 10.0) -> dict:
    from memrope.runtime.api import export_model
    from memrope.runtime.demo.world import EVAL_PROMPTS
    from memrope.runtime.load import LoadRequest
    from memrope.runtime.t2v import ensure_demo_model, latent_frames_for

    blocks = latent_frames_for(seconds, 3) // 3
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "demo"
        export_model(LoadRequest(preset="tiny", height=64, width=96), artifact)
        configs = {"eager fp32": lambda: _pipeline(),
                   "onnxruntime fp32": lambda: _pipeline_from(artifact, ensure_demo_model()),
                   "eager bf16": lambda: _pipeline(dtype="bfloat16")}
        for name, make in configs.items():
            started = time.perf_counter()
            with make() as pipe:
                rows, _ = _fidelity_rows(pipe, EVAL_PROMPTS, blocks)
            results[name] = {"per_attribute": {a: float(np.mean([r[a] for r in rows])) for a in ATTRIBUTES},
                             "first_block_background": float(np.mean([r["first_block_background"] for r in rows])),
                             "overall": float(np.mean([r["overall"] for r in rows])),
                             "seconds": round(time.perf_counter() - started, 1), "clips": rows}
            print(name, results[name]["per_attribute"], results[name]["overall"], flush=True)
    return {"seconds_per_clip": seconds, "blocks": blocks, "seed": 0, "results": results}


def _fidelity_rows(pipe, prompts, blocks: int, keep: int = 0) -> tuple[list[dict], list[np.ndarray]]:
    """Scores of each prompt's clip (and the first ``keep`` clips' frames)."""
    rows, kept = [], []
    for i, p in enumerate(prompts):
        frames = _stream_frames(pipe, p, blocks)
        first_block = _score(frames[:FIRST_BLOCK_FRAMES], p)
        rows.append({"prompt": p, **_score(frames, p), "first_block_background": first_block["background"]})
        if i < keep:
            kept.append(frames)
    return rows, kept


def _psnr(frames: np.ndarray, reference: np.ndarray) -> float:
    """PSNR (dB) of uint8 ``frames`` against ``reference``."""
    mse = float(np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def part_quantized(mode: str = "fp8", seconds: float = 10.0, psnr_prompts: int = 10) -> dict:
    from memrope.runtime.api import export_model
    from memrope.runtime.demo.world import EVAL_PROMPTS
    from memrope.runtime.load import LoadRequest
    from memrope.runtime.t2v import ensure_demo_model, latent_frames_for

    blocks = latent_frames_for(seconds, 3) // 3
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / f"demo_{mode}"
        export = export_model(LoadRequest(preset="tiny", height=64, width=96), artifact, quantize=mode)
        started = time.perf_counter()
        with _pipeline_from(artifact, ensure_demo_model()) as pipe:
            rows, frames = _fidelity_rows(pipe, EVAL_PROMPTS, blocks, keep=psnr_prompts)
        seconds_quantized = round(time.perf_counter() - started, 1)
    with _pipeline(dtype="bfloat16") as pipe:
        psnr = [_psnr(f, _stream_frames(pipe, p, blocks)) for f, p in zip(frames, EVAL_PROMPTS, strict=False)]
    result = {"per_attribute": {a: float(np.mean([r[a] for r in rows])) for a in ATTRIBUTES},
              "first_block_background": float(np.mean([r["first_block_background"] for r in rows])),
              "overall": float(np.mean([r["overall"] for r in rows])), "seconds": seconds_quantized, "clips": rows,
              "psnr_vs_bf16_db": psnr, "quantization": export.contract.quantization}
    print(mode, result["per_attribute"], result["overall"], "PSNR vs bf16", np.round(psnr, 1).tolist(), flush=True)
    return {"mode": mode, "seconds_per_clip": seconds, "blocks": blocks, "seed": 0, "psnr_prompts": psnr_prompts,
            "backend": "onnxruntime fp32 (the quantized graphs)", "result": result}


def _pipeline_from(artifact: Path, model_dir: Path, **options):
    from memrope.runtime.api import VideoPipeline

    return VideoPipeline.from_pretrained(artifact, model_dir=model_dir, **options)


def _frame_scene(frame: np.ndarray) -> dict:
    """The background and the object colours one frame shows (the evaluator's single-frame read)."""
    from memrope.runtime.demo.evaluate import evaluate

    report = evaluate(frame[None])
    return {"background": report.background, "colors": sorted(o.color for o in report.objects)}


def part_switch() -> dict:
    from memrope.pipeline import RECACHE_MODES
    from memrope.runtime.demo.world import parse_prompt

    old, new = parse_prompt(SWITCH_FROM), parse_prompt(SWITCH_TO)
    modes = {}
    with _pipeline() as pipe:
        for mode in RECACHE_MODES:
            with pipe.stream(SWITCH_FROM, seed=0) as stream:
                before = [next(stream) for _ in range(SWITCH_AT_BLOCK)]
                stream.set_prompt(SWITCH_TO, recache=mode)
                after = [next(stream) for _ in range(SWITCH_BLOCKS_AFTER)]
            per_block = []
            for i, frames in enumerate(after):
                shown = _score(frames, SWITCH_TO)
                was = _score(frames, SWITCH_FROM)
                seen = [_frame_scene(frame) for frame in frames]  # one read per frame
                both_colors = {old.objects[0].color, new.objects[0].color}
                per_block.append({"block_after_switch": i + 1, "new_scene": shown, "old_scene": was,
                                  "frames_with_both_objects": sum(both_colors <= set(s["colors"]) for s in seen),
                                  "frames": len(frames), "backgrounds": sorted({s["background"] for s in seen})})
            # The demo model draws backgrounds, not objects (docs/demo_training.md): the first
            # block whose frames the evaluator reads with the new background.
            first_new = next((b["block_after_switch"] for b in per_block if b["new_scene"]["background"]), None)
            before_ok = _score(np.concatenate(before), SWITCH_FROM)
            modes[mode] = {"before_switch": before_ok, "blocks_until_new_scene": first_new, "blocks": per_block}
            print(mode, first_new, before_ok, flush=True)
    return {"from": SWITCH_FROM, "to": SWITCH_TO, "switch_at_block": SWITCH_AT_BLOCK, "modes": modes}


def _laplacian_sharpness(frames: np.ndarray) -> float:
    gray = frames.astype(np.float32).mean(axis=-1)
    lap = (-4 * gray[:, 1:-1, 1:-1] + gray[:, :-2, 1:-1] + gray[:, 2:, 1:-1] + gray[:, 1:-1, :-2] + gray[:, 1:-1, 2:])
    return float(np.abs(lap).mean())


def _background_rgb(frames: np.ndarray) -> np.ndarray:
    return np.median(frames.reshape(-1, 3), axis=0).astype(np.float64)


def part_horizon(minutes: float = 10.0, prompts: tuple[str, ...] = HORIZON_PROMPTS) -> dict:
    from dataclasses import replace

    from memrope.config import CacheConfig, RunConfig
    from memrope.runtime.t2v import DEMO_LATENT, latent_frames_for

    blocks = latent_frames_for(60.0 * minutes, 3) // 3
    window = 10 * FPS
    out = {}
    for name, cache in HORIZON_POLICIES.items():
        run = RunConfig(num_output_frames=blocks * 3, latent_height=DEMO_LATENT[0], latent_width=DEMO_LATENT[1],
                        use_ema=True)
        run = replace(run, cache=CacheConfig(**cache))
        per_prompt = []
        started = time.perf_counter()
        with _pipeline(run=run) as pipe:
            for prompt in prompts:
                with pipe.stream(prompt, seed=0) as stream:
                    frames = np.concatenate([next(stream) for _ in range(blocks)])
                first_bg = _background_rgb(frames[:FPS])
                seconds = len(frames) // FPS
                drift = [float(np.linalg.norm(_background_rgb(frames[s * FPS:(s + 1) * FPS]) - first_bg))
                         for s in range(seconds)]
                sharp = [_laplacian_sharpness(frames[s * FPS:(s + 1) * FPS]) for s in range(seconds)]
                windows = [_score(frames[w:w + window], prompt) for w in range(0, len(frames) - window + 1, window)]
                per_prompt.append({"prompt": prompt, "drift_rgb": drift, "sharpness": sharp,
                                   "window_overall": [float(w["overall"]) for w in windows],
                                   "window_attributes": {a: [bool(w[a]) for w in windows] for a in ATTRIBUTES}})
                print(name, prompt, np.mean([w["overall"] for w in windows]), drift[-1], flush=True)
        out[name] = {"cache": cache, "blocks": blocks, "seconds": round(time.perf_counter() - started, 1),
                     "prompts": per_prompt}
    return {"minutes": minutes, "window_seconds": 10, "prompts": list(prompts), "policies": out}


def _decoded_both_ways(blocks: int, prompts: int, quantize: str | None = None):
    """An export of the demo model (``quantize``: its mode), its DiT graphs on ONNX Runtime, and
    the same latents of the first ``prompts`` evaluation prompts decoded by the eager float VAE and
    by the artifact's ``vae_decode.onnx`` on ONNX Runtime: ``({backend: [frames]}, export)``."""
    from memrope.runtime.api import export_model
    from memrope.runtime.demo.world import EVAL_PROMPTS
    from memrope.runtime.load import LoadRequest
    from memrope.runtime.t2v import ensure_demo_model

    decoded = {}
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "demo"
        export = export_model(LoadRequest(preset="tiny", height=64, width=96), artifact, quantize=quantize)
        for vae_backend in ("eager", "onnxruntime"):
            with _pipeline_from(artifact, ensure_demo_model(), vae_backend=vae_backend) as pipe:
                decoded[vae_backend] = [_stream_frames(pipe, p, blocks) for p in EVAL_PROMPTS[:prompts]]
    return decoded, export


def part_vae(prompts: int = 10, seconds: float = 4.0) -> dict:
    """The same DiT latents (the exported step on ONNX Runtime) decoded by the eager VAE and by the
    artifact's ``vae_decode.onnx`` on ONNX Runtime."""
    from memrope.runtime.demo.train_common import psnr_db
    from memrope.runtime.t2v import latent_frames_for

    decoded, _ = _decoded_both_ways(latent_frames_for(seconds, 3) // 3, prompts)
    psnrs = [psnr_db(a, b) for a, b in zip(decoded["eager"], decoded["onnxruntime"], strict=True)]
    return {"prompts": prompts, "seconds": seconds, "psnr_db": psnrs, "psnr_db_min": float(min(psnrs))}


def part_vae_fp8(prompts: int = 10, seconds: float = 10.0) -> dict:
    """The VAE decoder in FP8, alone: an fp8 export of the demo model (float32 base, default
    calibration), and the same latents decoded by the eager float VAE and by its ``vae_decode.onnx``
    (FP8 convolutions) on ONNX Runtime: PSNR (dB) of the FP8 frames against the float ones, and what
    the evaluator reads in each."""
    from memrope.runtime.demo.train_common import psnr_db
    from memrope.runtime.demo.world import EVAL_PROMPTS
    from memrope.runtime.t2v import latent_frames_for

    decoded, export = _decoded_both_ways(latent_frames_for(seconds, 3) // 3, prompts, quantize="fp8")
    psnrs = [psnr_db(a, b) for a, b in zip(decoded["eager"], decoded["onnxruntime"], strict=True)]
    scores = {name: [_score(frames, p) for frames, p in zip(videos, EVAL_PROMPTS, strict=False)]
              for name, videos in decoded.items()}
    read = {name: {a: float(np.mean([r[a] for r in rows])) for a in (*ATTRIBUTES, "overall")}
            for name, rows in scores.items()}
    print("vae fp8: PSNR", np.round(psnrs, 1).tolist(), read, flush=True)
    return {"prompts": prompts, "seconds": seconds, "psnr_db": psnrs, "psnr_db_min": float(min(psnrs)),
            "evaluator": {"float VAE (eager)": read["eager"], "fp8 VAE (onnxruntime)": read["onnxruntime"]},
            "vae_quantization": export.contract.quantization.get("vae")}


def _load(part: str) -> dict | None:
    path = RESULTS / f"demo_quality_{part}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _plot_horizon(horizon: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, policy in horizon["policies"].items():
        prompts = policy["prompts"]
        acc = np.mean([p["window_overall"] for p in prompts], axis=0)
        drift = np.mean([p["drift_rgb"] for p in prompts], axis=0)
        sharp = np.mean([p["sharpness"] for p in prompts], axis=0)
        minutes_acc = (np.arange(len(acc)) + 0.5) * horizon["window_seconds"] / 60
        minutes = np.arange(len(drift)) / 60
        axes[0].plot(minutes_acc, acc, label=name)
        axes[1].plot(minutes, drift, label=name)
        axes[2].plot(minutes, sharp, label=name)
    for ax, title in zip(axes, ("attribute accuracy (10 s windows)", "background drift vs first second (RGB)",
                                "sharpness (mean |Laplacian|)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("minutes of video")
        ax.legend()
    axes[0].set_ylim(-0.05, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# What a reader sees in the numbers, per demo model (by its DiT's SHA-256): written after looking at
# the frames, so only for the models someone looked at.
SUMMARIES = {
    "c1a49d48847a": "In short: the demo model trained 2026-12-06 (docs/demo_training.md) starts from the prompt's "
                    "background in about half of the prompts, drifts towards black or white within seconds, and draws "
                    "no objects; its colour, shape and motion hits are noise the evaluator reads as an object. A "
                    "prompt switch does not show in its pictures. The numbers below are its baseline.",
    "f42853d50eda": "In short: the demo model trained 2026-12-07 (docs/demo_training.md; text length 160, 3416 DiT "
                    "steps) is the 2026-12-06 model's equal on first blocks: run by the engine, it starts from the "
                    "prompt's background in 25 of the 50 evaluation prompts (that model: 26), mostly black, green and "
                    "blue ones. Like it, it drifts within seconds (to gray, in docs/demo_frames.png), draws no objects, "
                    "and a prompt switch does not show in its pictures. The "
                    "parts marked below were measured on the 2026-12-06 model and not yet rerun.",
}
HORIZON_READINGS = {
    "c1a49d48847a": "Reading (2026-12-06, the model trained that day): no policy keeps the scene, so this run cannot "
                    "show MemRoPE's advantage. With ema and with eviction the video turns black within 20 seconds "
                    "(the model's brightness drift) and stays black for the remaining 9.7 minutes, the two within a "
                    "fraction of a level of each other; without sink frames it turns to bright, high-frequency noise "
                    "(the sharpness measure reads noise as detail). The comparison becomes informative once the demo "
                    "model holds a scene for longer than its 12-frame window (docs/demo_training.md, what comes next).",
}


def write_report() -> Path:
    """docs/demo_quality.md (and its plot) from the parts' JSON files."""
    lines = ["# What the demo model's videos show", "",
             "Written by `python bench/demo_quality.py --part report` from `bench/results/demo_quality_*.json`;",
             "each part is `python bench/demo_quality.py --part NAME` (the module docstring says what each",
             "measures). The reader is the demo world's evaluator (classical image processing,",
             "docs/demo_world.md), which reads 100% of the world's own rendered clips correctly.", ""]
    summary = SUMMARIES.get(_model()["dit_sha256"])
    if summary:
        lines += [summary, ""]
    fidelity = _load("fidelity")
    if fidelity:
        m = fidelity["machine"]
        lines += ["## Prompt fidelity", "",
                  f"{len(next(iter(fidelity['results'].values()))['clips'])} prompts (`EVAL_PROMPTS`), "
                  f"{fidelity['seconds_per_clip']:g} s each ({fidelity['blocks']} blocks), seed 0; {m['date']}, "
                  f"{m['cpu']}, torch {m['torch']}, {m['threads']} thread(s).{_earlier(fidelity)}", "",
                  "| backend | background | colour | shape | motion | overall | background, first block only | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        quantized = {f"onnxruntime fp32, {q['mode']} (quantized)": {**q["result"], "date": q["machine"]["date"],
                                                                    "note": _earlier(q)}
                     for q in (_load(f"quantized_{mode}") for mode in QUANTIZED_MODES) if q}
        for name, r in {**fidelity["results"], **quantized}.items():
            a = r["per_attribute"]
            lines.append(f"| {name} | {a['background']:.2f} | {a['color']:.2f} | {a['shape']:.2f} | "
                         f"{a['motion']:.2f} | {r['overall']:.3f} | {r['first_block_background']:.2f} | "
                         f"{r['seconds']:.0f} |")
        lines.append("")
        for name, r in quantized.items():
            psnr = np.array(r["psnr_vs_bf16_db"])
            lines.append(f"- {name} (measured {r['date']}): decoded frames against eager bf16's (same prompt and seed, first "
                         f"{len(psnr)} prompts): PSNR {np.median(psnr):.1f} dB median, {psnr.min():.1f} to "
                         f"{psnr.max():.1f} dB; `python bench/demo_quality.py --part quantized --mode "
                         f"{r['quantization']['mode']}`, docs/quantization.md.{r['note']}")
        if quantized:
            lines.append("")
    switch = _load("switch")
    if switch:
        lines += ["## Prompt switch", "",
                  f"\"{switch['from']}\" for {switch['switch_at_block']} blocks, then \"{switch['to']}\"; per re-cache mode, "
                  "the blocks after the switch until the evaluator reads the new background in that "
                  "block's frames (\"never\": not within the 8 blocks measured), and the frames showing "
                  f"objects of both colours.{_earlier(switch)}", "",
                  "| re-cache | old scene read before the switch (overall) | blocks until the new scene | "
                  "frames with both objects (blocks 1-8 after) |", "|---|---|---|---|"]
        for mode, r in switch["modes"].items():
            both = sum(b["frames_with_both_objects"] for b in r["blocks"])
            total = sum(b["frames"] for b in r["blocks"])
            until = r["blocks_until_new_scene"] or "never"
            lines.append(f"| {mode} | {r['before_switch']['overall']:.2f} | {until} | "
                         f"{both} of {total} |")
        lines.append("")
    horizon = _load("horizon")
    if horizon:
        plot = DOC.parent / "demo_quality_horizon.png"
        _plot_horizon(horizon, plot)
        lines += ["## Long horizon: MemRoPE against eviction and a sink-less window", "",
                  f"{horizon['minutes']:g} minutes of video per policy and prompt "
                  f"({len(horizon['prompts'])} prompt(s): " + "; ".join(f"\"{p}\"" for p in horizon["prompts"])
                  + f"), seed 0, eager fp32.{_earlier(horizon)}", "",
                  f"![long horizon]({plot.name})", "",
                  "| policy | accuracy, first minute | accuracy, last minute | background drift at the end (RGB) | "
                  "sharpness first / last minute | wall s |", "|---|---|---|---|---|---|"]
        per_minute = 60 // horizon["window_seconds"]
        for name, r in horizon["policies"].items():
            acc = np.mean([p["window_overall"] for p in r["prompts"]], axis=0)
            drift = np.mean([p["drift_rgb"] for p in r["prompts"]], axis=0)
            sharp = np.mean([p["sharpness"] for p in r["prompts"]], axis=0)
            lines.append(f"| {name} | {acc[:per_minute].mean():.2f} | {acc[-per_minute:].mean():.2f} | "
                         f"{drift[-60:].mean():.1f} | {sharp[:60].mean():.2f} / {sharp[-60:].mean():.2f} | "
                         f"{r['seconds']:.0f} |")
        lines.append("")
        reading = HORIZON_READINGS.get(horizon["model"]["dit_sha256"])
        if reading:
            lines += [reading, ""]
    vae = _load("vae")
    if vae:
        lines += ["## The VAE on ONNX Runtime", "",
                  f"The same latents decoded by the eager VAE and by `vae_decode.onnx` on ONNX Runtime (fp32), "
                  f"{vae['prompts']} prompts x {vae['seconds']:g} s: PSNR min {vae['psnr_db_min']:.1f} dB, "
                  f"mean {np.mean(vae['psnr_db']):.1f} dB.{_earlier(vae)}", ""]
    vae_fp8 = _load("vae_fp8")
    if vae_fp8:
        read = vae_fp8["evaluator"]
        lines += ["## The VAE decoder in FP8", "",
                  f"The same latents (an fp8 export's DiT graphs on ONNX Runtime) decoded by the eager float VAE and "
                  f"by the fp8 artifact's `vae_decode.onnx` ({vae_fp8['vae_quantization']['quantized_convs']} FP8 "
                  f"convolutions) on ONNX Runtime, {vae_fp8['prompts']} prompts x {vae_fp8['seconds']:g} s "
                  f"(`python bench/demo_quality.py --part vae-fp8`, {vae_fp8['machine']['date']}): PSNR of the FP8 "
                  f"frames against the float ones min {vae_fp8['psnr_db_min']:.1f} dB, median "
                  f"{np.median(vae_fp8['psnr_db']):.1f} dB.{_earlier(vae_fp8)}", "",
                  "| decoder | " + " | ".join(ATTRIBUTES) + " | overall |",
                  "|---|" + "---|" * (len(ATTRIBUTES) + 1)]
        lines += [f"| {name} | " + " | ".join(f"{r[a]:.2f}" for a in (*ATTRIBUTES, "overall")) + " |"
                  for name, r in read.items()]
        lines += [""]
    DOC.write_text("\n".join(lines) + "\n")
    return DOC


FRAME_PROMPTS = ("a red ball bouncing on a blue background", "a yellow square moving left on a white background",
                 "a green triangle moving up on a gray background")


def part_frames(seconds: float = 4.0, every: int = 8, scale: int = 2) -> dict:
    """docs/demo_frames.png: every ``every``-th frame of ``seconds`` of each of
    :data:`FRAME_PROMPTS` (the first is README command 1's), one row per prompt, ``scale``x."""
    from PIL import Image

    from memrope.runtime.t2v import latent_frames_for

    blocks = latent_frames_for(seconds, 3) // 3
    with _pipeline() as pipe:
        rows = [_stream_frames(pipe, p, blocks)[::every] for p in FRAME_PROMPTS]
    gap = 4
    height, width = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (height + gap) - gap, rows[0].shape[0] * (width + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            canvas[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = frame
    image = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    path = DOC.parent / "demo_frames.png"
    image.save(path)
    return {"prompts": list(FRAME_PROMPTS), "seconds": seconds, "every": every, "image": str(path.relative_to(ROOT))}


PARTS = {"frames": part_frames, "fidelity": part_fidelity, "switch": part_switch, "horizon": part_horizon, "vae": part_vae,
         "vae-fp8": part_vae_fp8, "quantized": part_quantized}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=(*PARTS, "report"), required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=10.0, help="horizon: minutes of video per policy")
    parser.add_argument("--prompts", type=int, default=len(HORIZON_PROMPTS),
                        help="horizon: how many of HORIZON_PROMPTS (in order)")
    parser.add_argument("--mode", default="fp8", help="quantized: the --quantize mode")
    parser.add_argument("--psnr-prompts", type=int, default=10, help="quantized: clips compared with eager bf16")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.part == "report":
        print(write_report())
        return 0
    started = time.perf_counter()
    if args.part == "horizon":
        payload = part_horizon(minutes=args.minutes, prompts=HORIZON_PROMPTS[:args.prompts])
    elif args.part == "quantized":
        payload = part_quantized(args.mode, psnr_prompts=args.psnr_prompts)
    else:
        payload = PARTS[args.part]()
    payload["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(_write(f"quantized_{args.mode}" if args.part == "quantized" else args.part.replace("-", "_"), payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
