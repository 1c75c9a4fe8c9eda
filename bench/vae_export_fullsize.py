"""Benchmark: export the Wan2.1 VAE decoder step (``vae_decode.onnx``) at 832x480, random weights
with the real config, on this machine.

Each measured stage runs in its own child process, so its peak RSS (from ``wait4``) is its own:
- ``export DTYPE``: build the random ``AutoencoderKLWan`` (Wan2.1 sizes), take its decoder as
  ``memrope.vae.WanStreamingDecoder``, export the contract's static graph (names checked,
  ``onnx.checker`` by path), then run the TensorRT op-table audit;
- ``ort``: (float32) one ONNX Runtime CPU session, a first-frame step and a steady step. At
  832x480 this needs more than 24 GB: ONNX Runtime's CPU Conv3D builds the whole im2col matrix,
  27 x 96 x (4 x 480 x 832) floats = 16.6 GB for one last-stage conv (measured: killed at 23.2 GB);
- ``rtx DTYPE``: (bf16/fp16) the real TensorRT-RTX builder, AOT without a GPU, no timing cache.
Results go to ``bench/results/vae_export_fullsize.json``; the reading is docs/vae_export_fullsize.md.

Usage: flock /tmp/memrope-heavy.lock python bench/vae_export_fullsize.py [--dtypes float32,bfloat16]
       [--ort] [--rtx] [--workdir /tmp/memrope_vae_fullsize]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 480, 832


def _contract(dtype: str):
    from memrope.config import RunConfig
    from memrope.contract import vae_decode_contract
    from memrope.vae import VAEDecoderConfig

    run = RunConfig(latent_height=HEIGHT // 8, latent_width=WIDTH // 8)
    return vae_decode_contract(VAEDecoderConfig(), run, dtype, 1)


def child_export(dtype: str, workdir: Path) -> dict:
    import torch
    from diffusers import AutoencoderKLWan

    from memrope.export.audit import audit_onnx
    from memrope.export.vae_export import export_vae_graph
    from memrope.runtime.vae import WAN21_VAE_CONFIG
    from memrope.vae import WanStreamingDecoder

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**WAN21_VAE_CONFIG).eval()
    module = WanStreamingDecoder.from_diffusers(vae).to(getattr(torch, dtype))
    del vae
    params = sum(p.numel() for p in module.parameters())
    contract = _contract(dtype)
    path = workdir / f"vae_decode_{dtype}.onnx"
    start = time.perf_counter()
    export_vae_graph(module, contract, path)   # includes onnx.checker.check_model(path)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    report = audit_onnx(path, expect_dtype=dtype)
    audit_s = time.perf_counter() - start
    files = {p.name: p.stat().st_size for p in workdir.iterdir() if p.name.startswith(path.name)}
    return {"stage": "export", "dtype": dtype, "decoder_params": params, "export_s": round(export_s, 1),
            "audit_s": round(audit_s, 1), "onnx_checker": "pass", "audit_problems": report.problems,
            "nodes": report.node_count, "op_counts": report.op_counts, "files_bytes": files,
            "feature_caches": len(contract.inputs) - 2,
            "feature_cache_bytes": sum(s.nbytes for s in contract.inputs[2:])}


def child_ort(workdir: Path) -> dict:
    import numpy as np
    import onnxruntime

    contract = _contract("float32")
    start = time.perf_counter()
    session = onnxruntime.InferenceSession(str(workdir / "vae_decode_float32.onnx"), providers=["CPUExecutionProvider"])
    out = {"stage": "ort", "session_s": round(time.perf_counter() - start, 1)}
    rng = np.random.default_rng(0)
    feeds = {s.name: np.zeros(s.shape, np.float32) for s in contract.inputs[2:]}
    for label, first in (("first_step_s", True), ("steady_step_s", False)):
        latents = rng.standard_normal(contract.input("latents").shape).astype(np.float32)
        start = time.perf_counter()
        outs = session.run(None, {"latents": latents, "first_frame": np.array([first]), **feeds})
        out[label] = round(time.perf_counter() - start, 1)
        feeds = dict(zip(contract.input_names[2:], outs[2:], strict=True))
    out["frames_shape"] = list(outs[0].shape)
    return out


def child_rtx(dtype: str, workdir: Path) -> dict:
    import tensorrt_rtx as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    start = time.perf_counter()
    ok = parser.parse_from_file(str(workdir / f"vae_decode_{dtype}.onnx"))
    parse_s = time.perf_counter() - start
    if not ok:
        return {"stage": "rtx", "dtype": dtype, "parsed": False,
                "errors": [parser.get_error(i).desc() for i in range(parser.num_errors)]}
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    return {"stage": "rtx", "dtype": dtype, "tensorrt_rtx": trt.__version__, "parsed": True,
            "parse_s": round(parse_s, 1), "build_s": round(time.perf_counter() - start, 1),
            "built": plan is not None, "plan_bytes": None if plan is None else plan.nbytes}


def run_child(args: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if code == 0 and lines else {"stage": args[0], "failed": stderr.strip()[-2000:]}
    result.update(exit_code=code, wall_s=round(time.perf_counter() - start, 1),
                  peak_rss_gb=round(usage.ru_maxrss / 1024 ** 2, 2))
    print(json.dumps({k: v for k, v in result.items() if k != "op_counts"}), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ort", action="store_true", help="also run one first and one steady step with ORT (fp32)")
    parser.add_argument("--rtx", action="store_true", help="also build the low-precision graphs with TensorRT-RTX")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/memrope_vae_fullsize"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vae_export_fullsize.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, rest = args.child[0], args.child[1:]
        workdir = Path(rest[-1])
        result = (child_export(rest[0], workdir) if stage == "export" else child_ort(workdir) if stage == "ort"
                  else child_rtx(rest[0], workdir))
        print(json.dumps(result))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    dtypes = [d for d in args.dtypes.split(",") if d]
    results = [run_child(["export", d, str(args.workdir)]) for d in dtypes]
    if args.ort and "float32" in dtypes:
        results.append(run_child(["ort", str(args.workdir)]))
    if args.rtx:
        results += [run_child(["rtx", d, str(args.workdir)]) for d in dtypes if d != "float32"]
    import onnx
    import torch

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                        "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1),
                        "platform": platform.platform()},
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
            "size": {"height": HEIGHT, "width": WIDTH, "latent": [HEIGHT // 8, WIDTH // 8]}}
    from memrope.io import atomic_write

    atomic_write(args.out, json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
