"""TensorRT VAE backend: an artifact's ``vae_decode.plan`` behind :class:`VAEBackend`.

Owns: one execution context per
(feeds, outputs) pair of the caller's fixed buffers, each bound once with ``set_tensor_address``
and optionally replayed as a CUDA graph. The contexts share one scratch allocation (TensorRT's
user-managed device memory): the runtime orders all decode steps on one stream, so they never run
at the same time, and a 832x480 decode's activations are not held twice. Work is enqueued on the
caller's current CUDA stream. Checking and loading the plan is the DiT's path
(:func:`memrope.engine.tensorrt_backend.open_plans`); building it is ``memrope build``'s: ``vae_decode`` is
one of the artifact's ``contract.graphs`` and is built like ``step`` and ``text``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from memrope.artifact import Artifact, load_artifact
from memrope.backend import VAEBackend
from memrope.engine.sidecar import plan_path
from memrope.engine.tensorrt_backend import PlanEngine, open_plans
from memrope.engine.vae_onnxruntime_backend import require_vae_graph

logger = logging.getLogger(__name__)

GRAPH = "vae_decode"


class TensorRTVAEBackend(VAEBackend):
    """Runs ``vae_decode.plan`` (``memrope build --target rtx|server``) on the current CUDA device.

    The plan is checked and loaded exactly as the DiT's (:func:`memrope.engine.tensorrt_backend.open_plans`:
    sidecar, TensorRT version, GPU, contract hash, I/O), so the same messages say what to rebuild.

    Args:
        artifact: an artifact directory (or :class:`Artifact`) exported with a VAE and built
            with ``memrope build``.
        cuda_graph: capture each bound pair's execution after its first call and replay it.
        target: refuse a plan not built for this target (``rtx``/``server``); None takes either.
    """

    name = "tensorrt"

    def __init__(self, artifact: Artifact | str | Path, *, cuda_graph: bool = True, target: str | None = None):
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        require_vae_graph(self.artifact)
        contract = self.artifact.contract
        self.contract = contract.graphs[GRAPH]
        self.config = contract.vae
        self.dtype = self.contract.input("latents").torch_dtype
        self.cuda_graph = cuda_graph
        self._contexts: dict[tuple[int, int], list] = {}
        opened = open_plans(self.artifact, (GRAPH,), target=target)
        self._runtime = opened.runtime
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._engine = PlanEngine(opened.engines[GRAPH], plan_path(self.artifact.path, GRAPH), self.contract,
                                  opened.target)
        self._scratch = torch.empty(max(int(self._engine.engine.device_memory_size_v2), 1), dtype=torch.uint8,
                                    device=self.device)

    def _bind(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> list:
        context = self._engine.new_context(user_managed=True)
        context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        self._engine.bind(feeds, self.device, context)
        self._engine.bind_outputs(outputs, self.device, context)
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
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self._engine.plan.name}")
        if first:
            self._engine.save_runtime_cache()  # the first run compiled TensorRT-RTX's JIT kernels
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

    def forget(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        self._contexts.pop((id(feeds), id(outputs)), None)  # its context and CUDA graph go with it

    def close(self) -> None:
        self._contexts.clear()
        if getattr(self, "_engine", None) is not None:
            self._engine.close()
        self._engine = None
        self._runtime = None
        self._scratch = None
