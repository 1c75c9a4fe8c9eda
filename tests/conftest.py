"""Shared fixtures: the golden tiny model and inputs copied from the authors' traces."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file

from memrope.checkpoint import load_dit_state_dict
from memrope.config import WanConfig, load_run_config
from memrope.model import WanCausalDiT, build_dit

GOLDEN = Path(__file__).parent / "data" / "golden"
GOLDEN_PIXELS = dict(height=32, width=48)  # latent 4 x 6
TRACES = {
    "memrope_ema": "trace_memrope_ema.safetensors",
    "memrope_eviction": "trace_memrope_eviction.safetensors",
    "global_noevict": "trace_global_noevict.safetensors",
}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's torch intra-op threads (in the worker, and through
    ``OMP_NUM_THREADS`` in the commands it starts) are its share of the CPUs, so two workers on two
    cores do not each run two threads. A value the caller set wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_config() -> WanConfig:
    return WanConfig.from_json(GOLDEN / "config.json")


@pytest.fixture(scope="session")
def golden_dit(tiny_config: WanConfig) -> WanCausalDiT:
    state = load_dit_state_dict(GOLDEN / "tiny_selfforcing.pt", tiny_config, use_ema=True)
    return build_dit(tiny_config, state)


@pytest.fixture(scope="session")
def golden_inputs() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "inputs.safetensors"))


def golden_run(name: str):
    return load_run_config(GOLDEN / f"{name}.yaml")


def golden_trace(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / TRACES[name]))


def golden_generate_args(out: Path, *, policy: str = "memrope_ema", backend: str = "eager",
                         engine: Path | None = None, **options: object) -> list[str]:
    """``memrope generate`` argv on the golden inputs (its text embeddings and noise), writing
    latents only to ``out``, no progress bar: the golden checkpoint for ``eager``/``compiled``,
    else the artifact ``engine``; ``--config`` is ``policy``'s YAML.

    ``options`` (``**{"--flag": value}``) add or replace options: ``None`` drops one (``--noise``
    too), ``""`` passes a bare flag (``--allow-nonfinite``).
    """
    if backend in ("eager", "compiled"):
        values = {"--checkpoint": GOLDEN / "tiny_selfforcing.pt", "--model-config": GOLDEN / "config.json"}
    else:
        values = {"--engine": engine}
    values.update({"--backend": backend, "--config": GOLDEN / f"{policy}.yaml",
                   "--text-embeds": GOLDEN / "inputs.safetensors", "--noise": GOLDEN / "inputs.safetensors",
                   "--latents-out": out})
    values.update(options)
    args = ["generate", "--no-decode", "--no-progress"]
    for flag, value in values.items():
        if value == "":
            args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    return args


class Lazy(dict):
    """A mapping that makes each entry with ``make(key)`` on first use (so a run that selects only
    some tests pays only for what they read)."""

    def __init__(self, make: Callable):
        super().__init__()
        self._make = make

    def __missing__(self, key):
        self[key] = value = self._make(key)
        return value


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(path)`` once per test run; returns ``path``. The suite runs in pytest-xdist workers
    (pyproject.toml): they share this folder, the first to ask builds under a file lock and the
    others wait for it and reuse it, so an expensive session fixture is made once, not once per
    worker. ``build`` must create ``path`` atomically (the exports do: a partial folder, renamed)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base folder, above each worker's own
    path = root / "built-once" / name
    path.parent.mkdir(exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.exists():
            build(path)
    return path


@pytest.fixture(scope="session")
def artifacts(golden_dit, tmp_path_factory):
    """policy -> the golden model's fp32 ONNX artifact for that trace's cache policy (validated),
    exported on first use."""
    from memrope.export.onnx_export import export_artifact

    def make(name: str) -> Path:
        return built_once(tmp_path_factory, f"artifact-{name}",
                          lambda path: export_artifact(golden_dit, golden_run(name), path, **GOLDEN_PIXELS))

    return Lazy(make)


@pytest.fixture(scope="session")
def low_precision_exports(golden_dit, tiny_config, tmp_path_factory) -> dict[str, Path]:
    """dtype name -> the golden model's ``memrope_ema`` export in bf16 / fp16 with a tiny VAE
    decoder (``vae_decode``), not validated (ONNX Runtime on CPU has no bf16 kernels); audited,
    as every export is. Shared by the audit test and the TensorRT-RTX builds; made on first use."""
    from diffusers import AutoencoderKLWan

    from memrope.export.onnx_export import export_artifact
    from memrope.runtime.vae import tiny_vae_config
    from memrope.vae import WanStreamingDecoder

    def build(dtype: torch.dtype, path: Path) -> None:
        torch.manual_seed(0)
        vae = WanStreamingDecoder.from_diffusers(AutoencoderKLWan(**tiny_vae_config()).eval()).to(dtype)
        dit = build_dit(tiny_config, golden_dit.state_dict(), dtype=dtype)
        export_artifact(dit, golden_run("memrope_ema"), path, validate=False, vae=vae, **GOLDEN_PIXELS)

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    return Lazy(lambda name: built_once(tmp_path_factory, f"memrope_ema_{name}",
                                        lambda path: build(dtypes[name], path)))


@pytest.fixture(scope="session")
def tiny_bench_doc(tmp_path_factory):
    """One ``memrope bench`` document on the tiny preset (eager, ONNX Runtime, and TensorRT,
    which says why it cannot run here), frame path included: what the bench tests read."""
    from memrope.io import atomic_write
    from memrope.runtime.bench import BENCH_PRESETS, run_bench

    def build(path: Path) -> None:
        doc = run_bench(BENCH_PRESETS["tiny"], ["eager", "onnxruntime", "tensorrt"], blocks=8, warmup_blocks=1,
                        e2e_blocks=2)
        atomic_write(path, json.dumps(doc))

    return json.loads(built_once(tmp_path_factory, "tiny_bench.json", build).read_text())


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory):
    """``(demo model folder, artifact)``: the embedded demo model (built in a private folder)
    exported with its VAE at 64x96 through the CLI (validated)."""
    from memrope.runtime.cli import main
    from memrope.runtime.t2v import ensure_demo_model

    def build(path: Path) -> None:
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        demo = ensure_demo_model(partial / "demo")
        assert main(["export", "--preset", "tiny", "--model-dir", str(demo), "--height", "64", "--width", "96",
                     "--out", str(partial / "art")]) == 0
        partial.rename(path)

    path = built_once(tmp_path_factory, "demo", build)
    return path / "demo", path / "art"


@dataclass(frozen=True)
class RayCluster:
    address: str          # the head's HOST:PORT
    worker_raylet: int    # the process id of the worker node's raylet (killing it takes the node away)


def _raylet_pids() -> set[int]:
    import subprocess
    found = subprocess.run(["pgrep", "-x", "raylet"], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A two-node Ray cluster on this machine, on 127.0.0.1: ``ray start --head`` and a worker
    node joining it, each offering one CPU, so two engine replicas of one CPU each land on
    different nodes (a :class:`RayCluster`), with Ray's token authentication (a fresh token in ``$RAY_AUTH_TOKEN``, set
    for this test process and so for the servers it starts). Yields the head's address; ``ray
    stop`` at the end."""
    import secrets
    import shutil
    import socket
    import subprocess
    import sys

    pytest.importorskip("ray.serve", reason="the cluster extra is not installed (pip install 'memrope-engine[cluster]')")
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.skip("the `ray` command is not installed beside this Python (the cluster extra)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = {name: os.environ.get(name) for name in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env = dict(os.environ)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       env=env, check=True, capture_output=True, timeout=180)
        raylets = _raylet_pids()
        subprocess.run([ray, "start", f"--address={address}", *common], env=env, check=True, capture_output=True,
                       timeout=180)
        (worker_raylet,) = _raylet_pids() - raylets
        yield RayCluster(address, worker_raylet)
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
