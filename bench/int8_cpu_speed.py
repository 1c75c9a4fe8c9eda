"""Does INT8 pay on this CPU? The ``mid`` preset's step graph in float32 against its ``int8``
export (ModelOpt, calibrated on the block loop), on ONNX Runtime's CPU provider, call by call,
interleaved in one run on the same recorded inputs of the block loop.

Three ways to run the int8 graph:

* **as the engine runs it** (``--backend onnxruntime``): ONNX Runtime's Q/DQ fusions off, so each
  quantized Linear dequantizes its INT8 weight and its re-quantized activation and multiplies in
  float (``session.disable_quant_qdq``);
* **with ONNX Runtime's Q/DQ fusions on** (its default): what its integer kernels would give, if
  the session can be made and run (the error is recorded if not);
* for reference, the float32 graph **dynamically quantized by ONNX Runtime itself**
  (``quantize_dynamic``, INT8 weights, activations quantized per call): ONNX Runtime's own integer
  GEMMs on the same model, not our artifact.

Per variant: the median call time against float32's (the block is 5 such calls: 4 denoising steps
and the context pass), the relative L2 error of ``x0`` against float32 on the same inputs, and the
kernels that ran, by op type and share of the time, from ONNX Runtime's profiler.

    python bench/int8_cpu_speed.py --out bench/results/int8_cpu_speed.json --report docs/int8_cpu_speed.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_accuracy import MID_SIZE, _machine, _rollout, _setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALLS = 5          # recorded calls (one block: 4 steps and the context pass)
ROUNDS = 12        # interleaved timing rounds over them
THREADS = 2


def _artifacts(workdir: Path) -> tuple[Path, Path, list[dict]]:
    """(float32 artifact, int8 artifact, recorded step inputs of the mid block loop)."""
    import copy

    from memrope.export.onnx_export import export_artifact
    from memrope.export.quantize import Calibration
    from memrope.runtime.prompts import calibration_prompts

    base, run, layout, encode = _setup("mid", workdir)
    prompts = calibration_prompts(demo=False)
    calibration = Calibration(prompts, encode(prompts), layout.cache_frames // layout.block_frames + 2, seed=run.seed)
    from memrope.model import MemRoPEStep

    record: list[dict] = []
    # Inputs from the second block on: the cache holds a block, the memory is not yet in use.
    _rollout(MemRoPEStep(base, layout, run.latent_height, run.latent_width).eval(), run, layout,
             encode(["a small red boat on the blue sea at night"])[0], blocks=2, record=record, record_calls=2 * CALLS)
    height, width = MID_SIZE
    fp32, int8 = workdir / "mid_fp32", workdir / "mid_int8"
    export_artifact(copy.deepcopy(base), run, fp32, height=height, width=width, validate=False)
    export_artifact(base, run, int8, height=height, width=width, validate=False, quantize="int8",
                    calibration=calibration)
    return fp32, int8, record[CALLS:]


def _session(path: Path, *, qdq_fusions: bool = True, profile: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    if not qdq_fusions:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session, named: dict) -> dict:
    return {i.name: named[i.name].numpy() for i in session.get_inputs()}


def _kernels(session, inputs: list[dict]) -> dict:
    """Op types that ran and their share of the node time, from ONNX Runtime's profiler."""
    for named in inputs[:2]:
        session.run(["x0"], _feeds(session, named))
    trace = json.loads(Path(session.end_profiling()).read_text())
    times: Counter = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    total = sum(times.values()) or 1
    return {op: round(t / total, 4) for op, t in times.most_common()}


def measure(workdir: Path) -> dict:
    import numpy as np
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8, inputs = _artifacts(workdir)
    variants = {"float32": (fp32 / "step.onnx", True), "int8, as the engine runs it": (int8 / "step.onnx", False),
                "int8, Q/DQ fusions on": (int8 / "step.onnx", True)}
    sessions, errors = {}, {}
    dynamic = workdir / "mid_fp32_dynamic_int8.onnx"
    try:
        quantize_dynamic(str(fp32 / "step.onnx"), str(dynamic), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])
        variants["float32, ONNX Runtime dynamic int8"] = (dynamic, True)
    except Exception as exc:  # noqa: BLE001 - recorded: what ONNX Runtime's quantizer says
        errors["float32, ONNX Runtime dynamic int8"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
    for name, (path, fusions) in variants.items():
        try:
            session = _session(path, qdq_fusions=fusions)
            session.run(["x0"], _feeds(session, inputs[0]))
            sessions[name] = (path, fusions, session)
        except Exception as exc:  # noqa: BLE001 - recorded: what ONNX Runtime says
            errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
    times = {name: [] for name in sessions}
    x0 = {name: [] for name in sessions}
    for _ in range(ROUNDS):
        for named in inputs:
            for name, (_, _, session) in sessions.items():
                feeds = _feeds(session, named)
                start = time.perf_counter()
                (out,) = session.run(["x0"], feeds)
                times[name].append(time.perf_counter() - start)
                if len(x0[name]) < len(inputs):
                    x0[name].append(out)
    base = statistics.median(times["float32"])
    results = {}
    for name, (path, fusions, _) in sessions.items():
        errs = [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(x0[name], x0["float32"], strict=True)]
        median = statistics.median(times[name])
        results[name] = {"call_ms_median": round(1e3 * median, 2), "block_ms": round(5e3 * median, 1),
                         "vs_float32": round(median / base, 3), "x0_rel_l2_median": round(statistics.median(errs), 5),
                         "kernels": _kernels(_session(path, qdq_fusions=fusions,
                                                      profile=str(workdir / name.replace(" ", "_").replace(",", ""))),
                                             inputs)}
    for name, error in errors.items():
        results[name] = {"error": error}
    return {"meta": {"date": time.strftime("%Y-%m-%d"), "machine": _machine(), "preset": "mid",
                     "size": f"{MID_SIZE[1]}x{MID_SIZE[0]}", "threads": THREADS, "calls": len(inputs),
                     "rounds": ROUNDS},
            "target": "int8 at most 0.7x the float32 block time", "results": results}


def report(doc: dict) -> str:
    meta = doc["meta"]
    lines = [f"# INT8 on this CPU: the mid step on ONNX Runtime ({meta['date']})", "",
             f"Generated by `python bench/int8_cpu_speed.py`: the `mid` preset at {meta['size']}, {meta['threads']} "
             f"threads, {meta['calls']} recorded calls of the block loop timed {meta['rounds']} times each, "
             "interleaved (machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()
                                                     if k in ("cpu", "cores")) + f"). Target: {doc['target']}.", "",
             "| variant | ms per call (median) | block (5 calls) | vs float32 | x0 rel. L2 vs float32 | top kernels (share of node time) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in doc["results"].items():
        if "error" in r:
            lines.append(f"| {name} | fails: `{r['error']}` | | | | |")
            continue
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(r["kernels"].items())[:4])
        lines.append(f"| {name} | {r['call_ms_median']} | {r['block_ms']} ms | {r['vs_float32']}x | "
                     f"{r['x0_rel_l2_median']} | {top} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8_cpu_speed.json")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "int8_cpu_speed.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        doc = measure(Path(tmp))
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.report.write_text(report(doc))
    print(report(doc))
    return 0 if "float32" in doc["results"] and "error" not in doc["results"]["float32"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
