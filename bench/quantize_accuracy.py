"""Benchmark: how far the quantized graphs are from the unquantized model, on CPU.

For each mode of ``memrope export --quantize`` (and eager bf16, the unquantized baseline), against
the model in float32, with the relative L2 error ``||x0 - x0_ref|| / ||x0_ref||`` of the clean latents:

- ``per call``: every call (4 denoising steps and the context pass) of the reference rollout's
  first ``--call-blocks`` blocks (the fill, the first eviction, the memory's steady state), fed the
  same inputs: the error one call adds;
- ``rollout``: the quantized model's own rollout of ``--blocks`` blocks from the same noise and
  prompt: the error after it compounds through the cache, per block (plotted).

The quantized model is run as the graphs compute it: eager ``QDQLinear`` layers, which each export
checks against ONNX Runtime (weight-only graphs to 1e-5; fp8 and int8 per call within a relative L2
of 1e-2, docs/quantization.md). Calibration: the default calibration prompts (8 sentences) through
the loop, as ``memrope export`` does; the evaluation prompts are others.

Models: ``mid`` (512 wide, 6 blocks, at 128x96 pixels; random weights, seeded as ``memrope generate --preset mid``
loads them) with a random, frozen umT5 of its text width (256) to encode the prompts; ``demo`` (the
trained embedded demo model and its own text encoder).

Usage: python bench/quantize_accuracy.py --model mid|demo [--blocks 100] [--call-blocks 8]
Writes bench/results/quantize_accuracy_<model>.json and, with --report, docs/quantize_accuracy.md
and docs/quantize_accuracy_<model>.png.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "quantize_accuracy.md"
MODES = ("fp8", "int8", "int8-wo", "int4-wo")
MID_SIZE = (96, 128)  # pixels (height, width): the mid preset's benchmark size
EVAL_PROMPTS = {
    "mid": ("A red fox trots through fresh snow at dawn, its breath visible in the cold air.",
            "Children fly a yellow kite on a windy beach while waves break behind them."),
    "demo": ("a red ball moving to the left on a black background",
             "A yellow ball falling on a blue background."),
}


def _machine() -> dict:
    import torch

    from memrope.runtime.bench import cpu_name

    return {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": __import__("os").cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def _setup(model: str, workdir: Path):
    """(dit, run, layout, encode) for ``model``: ``encode(prompts) -> list of [1, L, D]``."""
    from memrope.artifact import specialise_run
    from memrope.cache import CacheLayout
    from memrope.runtime.load import LoadRequest, resolve

    if model == "demo":
        resolved = resolve(LoadRequest(preset="tiny", height=64, width=96, decode=False))

        def encode(prompts):
            return resolved.encode_prompts(list(prompts))
        height, width = 64, 96
    else:
        from memrope.runtime.text import TextEncoder, build_tiny_text_model

        resolved = resolve(LoadRequest(preset="mid", text=False, decode=False))
        cfg = resolved.model
        build_tiny_text_model(workdir / "text", layout="diffusers", d_model=cfg.text_dim, text_len=cfg.text_len, seed=0)
        encoder = TextEncoder.from_model_dir(workdir / "text", text_len=cfg.text_len)

        def encode(prompts):
            return [encoder.encode([p]) for p in prompts]
        height, width = MID_SIZE
    run = specialise_run(resolved.run, resolved.model, height, width, 1)
    return resolved.load_dit(), run, CacheLayout.for_run(resolved.model, run), encode


def _rollout(step, run, layout, embeds, blocks: int, seed: int = 0, record: list | None = None,
             record_calls: int = 0):
    """x0 of every block ``[blocks, ...]``; with ``record``, the first ``record_calls`` calls' named
    inputs are appended (each holds a copy of the whole cache: record no more than measured)."""
    import torch

    from memrope.backend import StepModuleBackend
    from memrope.pipeline import MemRoPEPipeline
    from memrope.sampler import StreamingSeededNoise

    eager = StepModuleBackend(step)
    if record is not None:
        class Recording(type(eager)):
            def step(self, named):
                if len(record) < record_calls:
                    record.append({k: v.clone() for k, v in named.items()})
                return super().step(named)
        eager = Recording(step)
    pipeline = MemRoPEPipeline(eager, run)
    noise = StreamingSeededNoise(seed, 1, pipeline.latent_frame_shape(), layout.block_frames)
    with torch.no_grad():
        return torch.stack([b.x0.float().clone() for b in pipeline.blocks(embeds, noise, blocks)])


def _relative(x, ref) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm())


def measure(model: str, blocks: int, call_blocks: int) -> dict:
    import torch

    from memrope.export.quantize import Calibration, calibration_loop, quantize_dit
    from memrope.model import MemRoPEStep
    from memrope.runtime.prompts import calibration_prompts

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base, run, layout, encode = _setup(model, Path(tmp))
        evals = encode(EVAL_PROMPTS[model])
        calibration_set = calibration_prompts(demo=model == "demo")
        calibration = Calibration(calibration_set, encode(calibration_set),
                                  layout.cache_frames // layout.block_frames + 2, seed=run.seed)

    def make_step(dit):
        return MemRoPEStep(dit, layout, run.latent_height, run.latent_width).eval()

    reference = make_step(base)
    calls: list[dict] = []
    from memrope.backend import StepModuleBackend
    from memrope.pipeline import MemRoPEPipeline

    # The denoising steps and the context pass.
    calls_per_block = MemRoPEPipeline(StepModuleBackend(reference), run).schedule.num_steps + 1
    refs = [_rollout(reference, run, layout, e, blocks, record=calls if i == 0 else None,
                     record_calls=call_blocks * calls_per_block) for i, e in enumerate(evals)]
    with torch.no_grad():
        ref_calls = [_step_x0(reference, c) for c in calls]
    variants = {"bf16": None, **{m: m for m in MODES}}
    out = {"model": model, "machine": _machine(), "blocks": blocks, "call_blocks": call_blocks,
           "calls": len(calls), "eval_prompts": list(EVAL_PROMPTS[model]), "calibration_prompts": calibration_set,
           "calibration_blocks": calibration.blocks, "variants": {}}
    for name, mode in variants.items():
        t0 = time.perf_counter()
        dit = copy.deepcopy(base)
        if mode is None:
            dit = dit.to(torch.bfloat16)
        step = make_step(dit)
        if mode is not None:
            quantize_dit(dit, mode, calibration_loop(step, run, calibration), calibration)
        per_call = []
        if mode is not None:  # bf16: its rollout only (its calls take bf16 caches, not the reference's)
            with torch.no_grad():
                per_call = [_relative(_step_x0(step, c), r) for c, r in zip(calls, ref_calls, strict=True)]
        per_block = [[_relative(x, r) for x, r in zip(_rollout(step, run, layout, e, blocks), ref, strict=True)]
                     for e, ref in zip(evals, refs, strict=True)]
        out["variants"][name] = {
            "per_call": ({"median": float(torch.tensor(per_call).median()), "max": max(per_call)} if per_call
                         else None),
            "rollout_per_block": per_block,
            "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{model} {name}: per call max {max(per_call, default=float('nan')):.2e}; block 1 "
              f"{max(p[0] for p in per_block):.3f}, block {blocks} {max(p[-1] for p in per_block):.3f}", flush=True)
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    return out


def _step_x0(step, named):
    """The step's ``x0`` (float32) for one call's named inputs."""
    from memrope.backend import Feeds, StepModuleBackend

    return StepModuleBackend(step).step(Feeds(named))["x0"].float()


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Quantized graphs against the unquantized model (CPU)", "",
             "Produced by `python bench/quantize_accuracy.py` (see its docstring for the method); "
             "relative L2 error of the clean latents against the float32 model.", ""]
    for path in sorted(RESULTS.glob("quantize_accuracy_*.json")):
        data = json.loads(path.read_text())
        m = data["machine"]
        lines += [f"## {data['model']}", "",
                  f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
                  f"{data['wall_seconds'] / 60:.0f} minutes. Per call: {data['calls']} calls of the first "
                  f"{data['call_blocks']} blocks. Rollout: {data['blocks']} blocks per prompt, "
                  f"{len(data['eval_prompts'])} prompts (the worst shown).", "",
                  "| variant | per call, median | per call, max | block 1 | block 10 | last block | max over blocks |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        figure, axis = plt.subplots(figsize=(7, 3.5))
        for name, v in data["variants"].items():
            worst = [max(vals) for vals in zip(*v["rollout_per_block"], strict=True)]

            def at(i, worst=worst):
                return f"{worst[i]:.3f}" if i < len(worst) else "-"
            calls = v["per_call"] or {}
            median = f"{calls['median']:.2e}" if calls else "-"
            most = f"{calls['max']:.2e}" if calls else "-"
            lines.append(f"| {name} | {median} | {most} | {at(0)} | {at(9)} | {worst[-1]:.3f} | {max(worst):.3f} |")
            axis.plot(range(1, len(worst) + 1), worst, label=name)
        axis.set_xlabel("block")
        axis.set_ylabel("relative L2 error of x0")
        axis.set_yscale("log")
        axis.set_title(f"{data['model']}: quantized rollouts against float32")
        axis.legend(fontsize=8)
        figure.tight_layout()
        image = ROOT / "docs" / f"quantize_accuracy_{data['model']}.png"
        figure.savefig(image, dpi=100)
        lines += ["", f"![rollout error per block]({image.name})", ""]
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mid", "demo"))
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--call-blocks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--report", action="store_true", help="write docs/quantize_accuracy.md from the results")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model:
        data = measure(args.model, args.blocks, args.call_blocks)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"quantize_accuracy_{args.model}.json").write_text(json.dumps(data, indent=1) + "\n")
    if args.report:
        report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
