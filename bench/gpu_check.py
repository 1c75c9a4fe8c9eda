"""What only a CUDA GPU can show, in one run of a few minutes: tests, full-size bf16 latency, error.

Needs an NVIDIA GPU, PyTorch built with CUDA and the project installed with its ``video`` and
``dev`` extras (the README's first command installs them); TensorRT and ONNX Runtime's CUDA
provider are optional (their tests skip without them). The sections run in order of value, each
in its own process with a time limit, so one that fails or hangs costs only its own share:

1. ``environment``: the device, driver-visible memory, torch and CUDA versions, the date.
2. ``gpu_tests``: the test suite's ``gpu``-marked tests (compiled CUDA graphs against eager in
   bf16, the VAE decode on its own CUDA stream, ...); TensorRT and ONNX Runtime CUDA tests skip
   with their reasons where those are missing.
3. ``bench_eager``: ``memrope bench`` at the preset (default the full-size 1.3B DiT at 832x480,
   bf16) for eager PyTorch with the frame path: block latency, DiT and VAE per block, and the
   decode of block b on a second CUDA stream overlapping the DiT of block b+1 (its ratio to
   max(DiT, VAE) in ``frame_path_targets``).
4. ``bf16_error``: the same random weights, prompt and noise in fp32 (the reference; TF32 off) and
   in bf16, eager: the relative L2 error of every block's clean latents.
5. ``bench_compiled``: the same bench for ``torch.compile`` with CUDA graphs (replay).
6. ``bf16_error_compiled``: the compiled bf16 loop's error against the same fp32 reference, and
   its ratio to eager bf16's.

Each section's result (or its error, or "not run: budget") goes into ``gpu_check.json`` in
``--out`` as soon as it finishes (written atomically), beside ``gpu_check.log`` and the bench
documents and plots, so a run stopped early still keeps what was measured. The last lines printed
are a summary table. See docs/gpu_check.md.

On a CUDA machine::

    python bench/gpu_check.py --out "$PWD/out/gpu_check"

Without a GPU, the same sections at the tiny preset on the CPU check the plumbing::

    python bench/gpu_check.py --smoke --out "$PWD/out/gpu_check_smoke"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "gpu_tests", "bench_eager", "bf16_error", "bench_compiled", "bf16_error_compiled")
# Seconds each section may take at most (the full-size ones on an H200), and the least it needs to
# be worth starting; the whole run stops starting sections when the budget is spent.
LIMITS_S = {"gpu_tests": (150, 30), "bench_eager": (150, 60), "bf16_error": (120, 45),
            "bench_compiled": (240, 90), "bf16_error_compiled": (150, 60)}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def environment() -> dict:
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    device_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


def _run(cmd: list[str], timeout_s: float, log: Path) -> dict:
    """Run ``cmd`` from the repository root with a time limit; its output is appended to ``log``
    (one log for every section, so the results stay six files)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile("w+") as out:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        out.seek(0)
        text = out.read()
    with open(log, "a") as whole:
        whole.write(f"\n===== {' '.join(cmd[1:])} (rc {rc}) =====\n{text}")
    return {"rc": rc, "wall_s": round(time.perf_counter() - start, 1), "output": text.splitlines()[-15:]}


def bf16_error(preset_name: str, device: str, backend: str, blocks: int, seed: int = 0) -> dict:
    """Relative L2 error of each block's clean latents, ``backend`` in bf16 against eager fp32 (TF32
    off), same random weights, prompt embeddings and noise. Runs in its own process."""
    import torch

    from memrope.engine.compiled_backend import CompiledBackend
    from memrope.engine.eager_backend import EagerBackend
    from memrope.model import build_dit, random_state_dict
    from memrope.pipeline import MemRoPEPipeline
    from memrope.runtime.bench import BENCH_PRESETS, bench_model, bench_run_config
    from memrope.sampler import StreamingSeededNoise

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    preset = BENCH_PRESETS[preset_name]
    model = bench_model(preset)
    run = bench_run_config(model, preset.height, preset.width, blocks)
    weights = random_state_dict(model, seed=1234 + seed)
    embeds = torch.randn(1, model.text_len, model.text_dim, generator=torch.Generator().manual_seed(seed + 1))
    latent = (run.latent_channels, run.latent_height, run.latent_width)

    def trajectory(dtype: torch.dtype, kind: str) -> list[torch.Tensor]:
        dit = build_dit(model, weights, dtype=dtype, device=device)
        loop = (CompiledBackend if kind == "compiled" else EagerBackend)(dit, run)
        pipeline = MemRoPEPipeline(loop, run)
        noise = StreamingSeededNoise(seed, 1, latent, 3)  # fp32 draws, cast into the loop's dtype
        # A copy of each block: x0 lives in a ring of two buffers (and .float() of fp32 is no copy).
        out = [r.x0.to("cpu", torch.float32, copy=True) for r in pipeline.blocks(embeds.to(dtype), noise, blocks)]
        loop.close()
        del dit, loop, pipeline
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return out

    start = time.perf_counter()
    reference = trajectory(torch.float32, "eager")
    low = trajectory(torch.bfloat16, backend)
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(low, reference, strict=True)]
    finite = all(bool(torch.isfinite(x).all()) for x in low + reference)
    return {"backend": backend, "dtype": "bfloat16", "reference": "eager float32, TF32 off", "blocks": blocks,
            "rel_l2_by_block": errors, "rel_l2_max": max(errors), "rel_l2_first_block": errors[0],
            "all_finite": finite, "wall_s": round(time.perf_counter() - start, 1)}


def _bench_cmd(args, backend: str) -> list[str]:
    blocks, warmup, e2e = (4, 1, 6) if args.smoke else (10, 3, 12)
    stem = f"bench_{backend}"
    return [sys.executable, "-m", "memrope", "bench", "--preset", args.preset, "--device", args.device,
            "--dtype", "bfloat16", "--backends", backend, "--blocks", str(blocks), "--warmup-blocks", str(warmup),
            "--e2e-blocks", str(e2e), "--json-out", str(args.out / f"{stem}.json"),
            "--plot", str(args.out / f"{stem}.png")]


def _section(name: str, args, remaining_s: float) -> dict:
    if name == "environment":
        return environment()
    limit, least = LIMITS_S[name]
    if remaining_s < least:
        return {"not_run": f"budget: {remaining_s:.0f} s left, the section needs at least {least} s"}
    timeout = min(limit, remaining_s)
    log = args.out / "gpu_check.log"
    if name == "gpu_tests":
        files = ["tests/test_backends.py", "tests/test_vae_engine.py", "tests/test_tensorrt.py"]
        return _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", "-m", "gpu",
                     *files], timeout, log)
    if name.startswith("bench_"):
        backend = name.removeprefix("bench_")
        result = _run(_bench_cmd(args, backend), timeout, log)
        doc = args.out / f"{name}.json"
        if doc.exists():
            bench = json.loads(doc.read_text())
            result["results"] = [{k: v for k, v in r.items() if k not in ("block_ms", "call_ms", "traceback")}
                                 for r in bench["results"]]
            result["frame_path_targets"] = bench.get("frame_path_targets")
        return result
    backend = "compiled" if name.endswith("_compiled") else "eager"
    blocks = 3 if args.smoke else 4
    child = [sys.executable, __file__, "--child-error", backend, "--preset", args.preset, "--device", args.device,
             "--blocks", str(blocks)]
    result = _run(child, timeout, log)
    lines = [line for line in result["output"] if line.startswith("{")]
    if result["rc"] == 0 and lines:
        result.update(json.loads(lines[-1]))
        del result["output"]
    return result


def summary_rows(doc: dict) -> list[str]:
    rows = [f"{doc['environment'].get('device', 'cpu')}, torch {doc['environment']['torch']}, "
            f"{doc['environment']['date']}, preset {doc['preset']}"]
    for name in SECTIONS[1:]:
        if name not in doc["sections"]:
            continue
        s = doc["sections"][name]
        if "not_run" in s or "error" in s:
            rows.append(f"{name}: {s.get('not_run') or s.get('error')}")
            continue
        line = f"{name}: rc {s.get('rc')}, {s.get('wall_s')} s"
        for r in s.get("results", []):
            if r.get("available") is False:
                line += f"; {r['backend']} not measured: {r.get('skipped_reason')}"
            elif "block_ms_median" in r:
                line += (f"; {r['backend']} block {r['block_ms_median']:.1f} ms (first {r['first_block_ms']:.0f}), "
                         f"{r['achieved_tflops']:.0f} TFLOP/s")
                path = r.get("frame_path") or {}
                if "serial" in path:
                    line += (f"; DiT {path['serial']['dit_ms_median']:.1f} ms, VAE {path['serial']['vae_ms_median']:.1f}"
                             f" ms, overlapped block {path['overlap']['block_ms_median']:.1f} ms")
        for backend, ratio in ((s.get("frame_path_targets") or {}).get("overlap_vs_max") or {}).items():
            line += f"; {backend} overlapped / max(DiT, VAE) {ratio:.2f}"
        if "rel_l2_max" in s:
            line += f"; bf16 vs fp32 rel L2 max {s['rel_l2_max']:.2e} (first block {s['rel_l2_first_block']:.2e})"
        rows.append(line)
    eager, compiled = doc["sections"].get("bf16_error", {}), doc["sections"].get("bf16_error_compiled", {})
    if "rel_l2_max" in eager and "rel_l2_max" in compiled:
        rows.append(f"compiled / eager bf16 error: {compiled['rel_l2_max'] / eager['rel_l2_max']:.2f} (at most 2)")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json, the logs and plots (an absolute path)")
    parser.add_argument("--preset", default=None, help="bench preset (default: wan-1.3b; tiny with --smoke)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after this long")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset on the CPU: checks the plumbing")
    parser.add_argument("--only", default=",".join(SECTIONS[1:]), help="comma-separated sections to run")
    parser.add_argument("--child-error", choices=("eager", "compiled"), help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.preset = args.preset or ("tiny" if args.smoke else "wan-1.3b")
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.child_error:
        print(json.dumps(bf16_error(args.preset, args.device, args.child_error, args.blocks)), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required: the folder for gpu_check.json, its log and the bench documents")
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}; expected some of {', '.join(SECTIONS[1:])}")
    args.out = args.out.resolve()  # the sections run from the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    doc = {"preset": args.preset, "device": args.device, "smoke": args.smoke, "sections": {}}
    doc["environment"] = environment()
    path = args.out / "gpu_check.json"
    for name in SECTIONS[1:]:
        if name not in args.only.split(","):
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            doc["sections"][name] = _section(name, args, deadline - time.perf_counter())
        except Exception as exc:  # noqa: BLE001 - one section's failure must not cost the others
            doc["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        _write_json(path, doc)
    print("\n".join(summary_rows(doc)))
    failed = [n for n, s in doc["sections"].items() if "error" in s or s.get("rc") not in (0, None)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
