"""Building TensorRT engines for an exported artifact (``memrope build <artifact dir>``).

Owns: turning an artifact's ``step.onnx`` and ``text.onnx`` into ``step.plan`` / ``text.plan``
inside the artifact directory, each with its ``.plan.json`` sidecar (:mod:`engine.sidecar`),
through Polygraphy's TensorRT loaders: the ONNX is parsed by path (external weights) into a
**strongly typed** network, so the precision is the exported graph's own (bf16/fp16/fp32 with
its deliberate fp32 islands); no FP16/BF16 builder flags are used (TensorRT 11 removed them).
Shapes are static (from the contract), so the single optimization profile Polygraphy fills
from the network has min = opt = max. A tactic timing cache is loaded and saved across builds.
Plans are written atomically: a failed build leaves no plan behind. Also owns the lazy
``tensorrt`` import and the description of the running TensorRT/GPU the sidecars record.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from engine.sidecar import (
    GRAPHS,
    EngineMismatchError,
    EngineSidecar,
    check_sidecar,
    plan_path,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from memrope.errors import StageError
from memrope.io import atomic_write

logger = logging.getLogger(__name__)

DEFAULT_TIMING_CACHE = Path("~/.cache/memrope/trt_timing.cache")
BUILD_DTYPES = ("bfloat16", "float16", "float32")
INSTALL_HINT = ("pip install -e '.[tensorrt]' (installs tensorrt and polygraphy; TensorRT needs an NVIDIA GPU "
                "with a CUDA driver)")


class EngineBuildError(StageError):
    """TensorRT could not parse or build an artifact's graph; the message carries TensorRT's errors."""


def require_tensorrt():
    """Import ``tensorrt`` lazily, or raise ImportError saying how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ImportError(f"TensorRT engines need the tensorrt package: {INSTALL_HINT}") from exc
    return tensorrt


def _require_polygraphy():
    try:
        from polygraphy.backend.trt import loader  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"building TensorRT engines needs polygraphy: {INSTALL_HINT}") from exc
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
    )

    if "strongly_typed" not in inspect.signature(NetworkFromOnnxPath.__init__).parameters:
        raise ImportError("this polygraphy cannot build strongly typed networks; "
                          f"upgrade it (polygraphy>=0.49): {INSTALL_HINT}")
    return CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath


def runtime_environment(trt: Any = None) -> dict[str, str]:
    """The running TensorRT version, GPU name and compute capability (``"9.0"``), as sidecars record them."""
    import torch

    trt = require_tensorrt() if trt is None else trt
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs an NVIDIA GPU, and torch sees no CUDA device "
                           "(torch.cuda.is_available() is False)")
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}"}


@contextmanager
def _polygraphy_errors() -> Iterator[list[str]]:
    """Collect Polygraphy's error lines (the ONNX parser's and the builder's) while building.

    Polygraphy logs parser errors and raises a generic exception, so its log is teed to a
    temporary file and the ``[E]``/``[!]`` lines are handed back on failure. Leaves the
    logger alone when the caller already set a log file.
    """
    from polygraphy.logger import G_LOGGER

    errors: list[str] = []
    if G_LOGGER.log_file:
        yield errors
        return
    with tempfile.TemporaryDirectory(prefix="memrope-trt-") as tmp:
        log = os.path.join(tmp, "polygraphy.log")
        G_LOGGER.log_file = log
        try:
            yield errors
        finally:
            G_LOGGER.log_file = None
            try:
                lines = Path(log).read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            errors.extend(line.strip() for line in lines if "[E]" in line or "[!]" in line)




def _up_to_date(plan: Path, env: dict[str, str], contract_hash: str, flags: dict[str, Any],
                artifact_dir: Path) -> bool:
    """True when ``plan`` exists and its sidecar matches this TensorRT, GPU, artifact and build flags."""
    if not plan.is_file():
        return False
    try:
        sidecar = read_sidecar(sidecar_path(plan))
        check_sidecar(sidecar, contract_hash=contract_hash, artifact_dir=artifact_dir, **env)
    except (FileNotFoundError, EngineMismatchError) as exc:
        logger.info("rebuilding %s: %s", plan.name, exc)
        return False
    if sidecar.build_flags != flags:
        logger.info("rebuilding %s: built with %s, asked for %s", plan.name, sidecar.build_flags, flags)
        return False
    return True


def build_engines(artifact_dir: str | os.PathLike[str], *, timing_cache: str | os.PathLike[str] | None = None,
                  opt_level: int = 3, workspace_gb: float | None = None, force: bool = False) -> list[Path]:
    """Build ``step.plan`` and ``text.plan`` (with sidecars) inside an exported artifact directory.

    Args:
        timing_cache: tactic timing cache to load and update; default
            ``~/.cache/memrope/trt_timing.cache`` (shared by all builds on this machine).
        opt_level: TensorRT builder optimization level (0-5).
        workspace_gb: workspace memory pool limit; None leaves TensorRT's default (the GPU's memory).
        force: rebuild even when a plan's sidecar matches this TensorRT, GPU, artifact and these flags.

    Returns: the plan paths, step then text.

    Raises:
        FileNotFoundError / ArtifactMismatchError: the artifact is missing or stale.
        ImportError: tensorrt or polygraphy is not installed.
        RuntimeError: no CUDA GPU.
        EngineBuildError: TensorRT could not parse or build a graph.
    """
    from memrope.artifact import load_artifact

    artifact = load_artifact(artifact_dir)
    contract = artifact.contract
    if contract.dtype not in BUILD_DTYPES:
        raise ValueError(f"artifact {artifact.path} is {contract.dtype}; TensorRT engines are built from "
                         f"{', '.join(BUILD_DTYPES)} exports")
    if not 0 <= opt_level <= 5:
        raise ValueError(f"opt_level must be 0..5, got {opt_level}")
    if workspace_gb is not None and workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be positive, got {workspace_gb}")
    trt = require_tensorrt()
    CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath = _require_polygraphy()
    env = runtime_environment(trt)

    cache = Path(timing_cache if timing_cache is not None else DEFAULT_TIMING_CACHE).expanduser()
    cache.parent.mkdir(parents=True, exist_ok=True)
    workspace = None if workspace_gb is None else int(workspace_gb * 1024 ** 3)
    flags = {"strongly_typed": True, "timing_cache": str(cache), "builder_optimization_level": opt_level,
             "workspace_bytes": workspace}

    plans = []
    for graph, onnx_path in (("step", artifact.step_path), ("text", artifact.text_path)):
        plan = plan_path(artifact.path, graph)
        plans.append(plan)
        if not force and _up_to_date(plan, env, contract.config_hash, flags, artifact.path):
            logger.info("%s is up to date (TensorRT %s, %s); pass force=True to rebuild", plan,
                        env["tensorrt_version"], env["gpu_name"])
            continue
        logger.info("building %s from %s (TensorRT %s, %s sm_%s, strongly typed %s, opt level %d)", plan.name,
                    onnx_path.name, env["tensorrt_version"], env["gpu_name"], env["compute_capability"],
                    contract.dtype, opt_level)
        config_kwargs: dict[str, Any] = {"load_timing_cache": str(cache) if cache.is_file() else None,
                                         "builder_optimization_level": opt_level}
        if workspace is not None:
            config_kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: workspace}
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
        loader = EngineBytesFromNetwork(network, config=CreateConfig(**config_kwargs), save_timing_cache=str(cache))
        with _polygraphy_errors() as errors:
            try:
                serialized = loader()
            except Exception as exc:  # Polygraphy raises PolygraphyException after logging TensorRT's errors.
                build_error = exc
            else:
                build_error = None
        if build_error is not None or serialized is None:
            details = "\n".join(errors) or str(build_error or "TensorRT returned no engine")
            raise EngineBuildError(f"TensorRT could not build the {graph} graph {onnx_path}: {details}") \
                from build_error
        atomic_write(plan, memoryview(serialized))
        write_sidecar(sidecar_path(plan), EngineSidecar(graph=graph, dtype=contract.dtype,
                                                        contract_hash=contract.config_hash,
                                                        build_flags=flags, **env))
        logger.info("wrote %s (%.1f MB)", plan, plan.stat().st_size / 1e6)
    return plans


__all__ = ["DEFAULT_TIMING_CACHE", "EngineBuildError", "GRAPHS", "build_engines", "require_tensorrt",
           "runtime_environment"]
