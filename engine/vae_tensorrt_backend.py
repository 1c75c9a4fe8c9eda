"""TensorRT VAE backend: an artifact's ``vae_decode.plan`` behind :class:`VAEBackend`.

Owns: refusing a stale plan before deserializing it (sidecar: TensorRT version, GPU, config hash,
graph), checking the engine's I/O against the contract, and one execution context per
(feeds, outputs) pair of the caller's fixed buffers, each bound once with ``set_tensor_address``
and optionally replayed as a CUDA graph. The contexts share one scratch allocation (TensorRT's
user-managed device memory): the runtime orders all decode steps on one stream, so they never run
at the same time, and a 832x480 decode's activations are not held twice. Work is enqueued on the
caller's current CUDA stream. Building the plan is ``memrope build``'s job: ``vae_decode`` is one of
the artifact's ``contract.graphs`` and is built like ``step`` and ``text``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from engine.sidecar import EngineMismatchError, check_sidecar, read_sidecar, rebuild_hint, sidecar_path
from memrope.artifact import Artifact, load_artifact
from memrope.backend import VAEBackend
from memrope.contract import GraphContract

logger = logging.getLogger(__name__)

GRAPH = "vae_decode"
PLAN_FILE = f"{GRAPH}.plan"


def _dtype_name(trt: Any, dtype: Any) -> str:
    for attr in ("float32", "float16", "bfloat16", "int64", "bool", "uint8", "int32"):
        if hasattr(trt, attr) and getattr(trt, attr) == dtype:
            return attr
    return str(dtype)


def check_vae_engine_io(trt: Any, engine: Any, contract: GraphContract, plan: Path) -> None:
    """The engine's I/O (name, direction, shape, dtype) must be exactly the contract's."""
    got = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        got[name] = (mode, tuple(engine.get_tensor_shape(name)), _dtype_name(trt, engine.get_tensor_dtype(name)))
    want = {s.name: ("input", s.shape, s.dtype) for s in contract.inputs}
    want.update({s.name: ("output", s.shape, s.dtype) for s in contract.outputs})
    if got != want:
        diffs = [f"{n}: engine {got.get(n, 'absent')}, contract {want.get(n, 'absent')}"
                 for n in sorted(set(got) | set(want)) if got.get(n) != want.get(n)]
        raise EngineMismatchError(f"{plan}: the engine's I/O differs from the artifact's contract "
                                  f"({'; '.join(diffs[:6])}); {rebuild_hint(plan.parent)}")


class TensorRTVAEBackend(VAEBackend):
    """Runs ``vae_decode.plan`` on the current CUDA device.

    Args:
        artifact: an artifact directory (or :class:`Artifact`) exported with a VAE and built
            with ``memrope build``.
        cuda_graph: capture each bound pair's execution after its first call and replay it.
    """

    name = "tensorrt"

    def __init__(self, artifact: Artifact | str | Path, *, cuda_graph: bool = True):
        from engine.build import require_tensorrt, runtime_environment
        from engine.vae_onnxruntime_backend import require_vae_graph

        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        require_vae_graph(self.artifact)
        path = self.artifact.path
        plan = path / PLAN_FILE
        for file in (plan, sidecar_path(plan)):
            if not file.is_file():
                raise FileNotFoundError(f"artifact {path} has no TensorRT VAE engine ({file.name} missing); "
                                        f"build it with `memrope build {path}`")
        trt = require_tensorrt()
        env = runtime_environment(trt)
        contract = self.artifact.contract
        sidecar = read_sidecar(sidecar_path(plan))
        check_sidecar(sidecar, contract_hash=contract.config_hash, artifact_dir=path, **env)
        if sidecar.graph != GRAPH or sidecar.dtype != contract.dtype:
            raise EngineMismatchError(f"{sidecar_path(plan)} describes the {sidecar.dtype} {sidecar.graph} graph, "
                                      f"not the {contract.dtype} {GRAPH} graph; {rebuild_hint(path)}")
        self.contract = contract.graphs[GRAPH]
        self.config = contract.vae
        self.dtype = self.contract.input("latents").torch_dtype
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda_graph = cuda_graph
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialize {plan}; {rebuild_hint(path)}")
        check_vae_engine_io(trt, self.engine, self.contract, plan)
        self._scratch = torch.empty(max(int(self.engine.device_memory_size_v2), 1), dtype=torch.uint8,
                                    device=self.device)
        self._contexts: dict[tuple[int, int], list] = {}

    def _bind(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> list:
        trt = self._trt
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {PLAN_FILE}")
        context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        for specs, named in ((self.contract.inputs, feeds), (self.contract.outputs, outputs)):
            for spec in specs:
                tensor = named.get(spec.name)
                if tensor is None:
                    raise ValueError(f"{GRAPH} call is missing {spec.name}")
                if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.torch_dtype \
                        or tensor.device != self.device or not tensor.is_contiguous():
                    raise ValueError(f"{spec.name} must be a contiguous {spec.dtype} {list(spec.shape)} tensor on "
                                     f"{self.device}, got {tensor.dtype} {list(tensor.shape)} on {tensor.device}")
                if not context.set_tensor_address(spec.name, tensor.data_ptr()):
                    raise RuntimeError(f"TensorRT refused the address of {spec.name}")
        entry = [context, None, feeds, outputs]  # context, CUDA graph, and the dicts kept alive
        self._contexts[(id(feeds), id(outputs))] = entry
        return entry

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        entry = self._contexts.get((id(feeds), id(outputs)))
        first = entry is None
        if first:
            entry = self._bind(feeds, outputs)
        stream = torch.cuda.current_stream(self.device)
        if entry[1] is not None:
            entry[1].replay()
            return
        if not entry[0].execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {PLAN_FILE}")
        if self.cuda_graph and first:
            # The warm-up execution above computed this call; the capture only records. Thread-local
            # capture: with overlap the DiT keeps issuing CUDA work from the main thread meanwhile.
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    entry[0].execute_async_v3(stream.cuda_stream)
                entry[1] = graph
            except Exception as exc:  # an engine with layers that cannot run under capture
                logger.warning("CUDA graph capture of the TensorRT VAE failed (%s); running without graphs", exc)
                self.cuda_graph = False

    def close(self) -> None:
        self._contexts.clear()
        self.engine = None
        self._runtime = None
        self._scratch = None
