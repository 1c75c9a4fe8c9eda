"""Benchmark: one latent frame per VAE decode step, or one DiT block (three) per step?

For the bench presets' VAEs at their sizes, exports ``vae_decode`` with steps of 1 and of 3 latent
frames (fp32), and times decoding one DiT block (three latent frames) with ONNX Runtime on the
CPU: three calls of the 1-frame graph against one call of the 3-frame graph, steady state, after
warm-up, median over blocks; ONNX Runtime's peak arena is not separable per session here, so the
activation memory is reported from the graph shapes (largest activation of a step). Results go to
``bench/results/vae_step_size.json``.

Usage: flock /tmp/memrope-heavy.lock python bench/vae_step_size.py [--presets demo,mid] [--blocks 10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def measure(preset_name: str, blocks: int, workdir: Path) -> dict:
    import onnxruntime

    from memrope.artifact import specialise_run
    from memrope.config import RunConfig, model_preset
    from memrope.contract import vae_decode_contract
    from memrope.export.vae_export import export_vae_graph
    from memrope.runtime.bench import BENCH_PRESETS, bench_vae
    from memrope.vae import WanStreamingDecoder

    preset = BENCH_PRESETS[preset_name]
    run = specialise_run(RunConfig(), model_preset(preset.model), preset.height, preset.width, 1)
    vae = bench_vae(preset)
    out = {"preset": preset_name, "height": preset.height, "width": preset.width, "steps": {}}
    rng = np.random.default_rng(0)
    for t in (1, 3):
        module = WanStreamingDecoder.from_diffusers(vae, latent_frames=t)
        contract = vae_decode_contract(module.config, run, "float32", 1, latent_frames=t)
        path = workdir / f"{preset_name}_t{t}.onnx"
        export_vae_graph(module, contract, path)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        caches = {s.name: np.zeros(s.shape, np.float32) for s in contract.inputs[2:]}
        times = []
        for b in range(blocks + 2):
            latents = rng.standard_normal((1, 3, *contract.input("latents").shape[2:])).astype(np.float32)
            start = time.perf_counter()
            for k in range(0, 3, t):
                outs = session.run(None, {"latents": latents[:, k:k + t], "first_frame": np.array([b == 0 and k == 0]),
                                          **caches})
                caches = dict(zip(contract.input_names[2:], outs[2:], strict=True))
            times.append((time.perf_counter() - start) * 1e3)
        last_stage = max(s.shape for s in contract.inputs[2:] if s.shape[3] == preset.height)
        out["steps"][t] = {"block_ms_median": statistics.median(times[2:]), "block_ms": times,
                           "calls_per_block": 3 // t,
                           "largest_activation_mb": 4 * t * last_stage[1] * preset.height * preset.width * 4 / 1e6}
    out["three_vs_one"] = out["steps"][3]["block_ms_median"] / out["steps"][1]["block_ms_median"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="demo,mid")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vae_step_size.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memrope-vae-step-") as tmp:
        results = [measure(p, args.blocks, Path(tmp)) for p in args.presets.split(",")]
    for r in results:
        print(json.dumps({"preset": r["preset"], "three_vs_one": r["three_vs_one"],
                          **{f"t{t}_ms": s["block_ms_median"] for t, s in r["steps"].items()}}))
    import onnxruntime
    import torch

    from memrope.io import atomic_write

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}
    atomic_write(args.out, json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
