"""TensorRT backend: an artifact's built ``step.plan`` and ``text.plan`` behind the loop's interface.

Owns: refusing a stale plan before deserializing it (the sidecar must match this TensorRT
version, this GPU and the artifact's config hash; see :mod:`engine.sidecar`), checking that each
engine's I/O tensors are exactly the contract's, one execution context per engine, the output
buffers (torch CUDA tensors allocated once from the contract), binding the loop's fixed-address
input buffers by pointer (``set_tensor_address``, redone only when an address changes), and
running ``execute_async_v3`` on a dedicated stream ordered against the caller's current stream.
With ``cuda_graph=True`` the step call is captured into a CUDA graph right after its first
(warm-up) execution and replayed while the addresses stay the same (the demoDiffusion pattern).
Building plans is :mod:`engine.build`'s job (``memrope build <artifact dir>``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from engine.sidecar import (
    EngineMismatchError,
    check_sidecar,
    plan_path,
    read_sidecar,
    rebuild_hint,
    sidecar_path,
)
from memrope.artifact import Artifact, load_artifact
from memrope.backend import Backend
from memrope.contract import GraphContract

logger = logging.getLogger(__name__)


def plan_buffers(contract: GraphContract) -> dict[str, int]:
    """Bytes of each output buffer the backend allocates for ``contract``, plus ``"total"``."""
    sizes = {spec.name: spec.nbytes for spec in contract.outputs}
    sizes["total"] = sum(sizes.values())
    return sizes


def _trt_dtype_names(trt: Any) -> dict[Any, str]:
    names = {}
    for attr, name in (("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
                       ("int64", "int64"), ("bool", "bool"), ("int32", "int32"), ("int8", "int8")):
        if hasattr(trt, attr):
            names[getattr(trt, attr)] = name
    return names


def check_engine_io(trt: Any, engine: Any, contract: GraphContract, plan: Path, artifact_dir: Path) -> None:
    """The engine's I/O tensors (name, direction, shape, dtype) must be exactly the contract's."""
    dtype_names = _trt_dtype_names(trt)
    got: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dtype = engine.get_tensor_dtype(name)
        got[name] = (mode, tuple(engine.get_tensor_shape(name)), dtype_names.get(dtype, str(dtype)))
    want = {spec.name: ("input", spec.shape, spec.dtype) for spec in contract.inputs}
    want.update({spec.name: ("output", spec.shape, spec.dtype) for spec in contract.outputs})
    if got != want:
        diffs = [f"{name}: engine {got.get(name, 'absent')}, contract {want.get(name, 'absent')}"
                 for name in list(want) + [n for n in got if n not in want] if got.get(name) != want.get(name)]
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise EngineMismatchError(f"{plan}: the engine's I/O tensors differ from the artifact's contract "
                                  f"({shown}); {rebuild_hint(artifact_dir)}")


class _Engine:
    """One deserialized engine, its execution context, and its bound buffers."""

    def __init__(self, trt: Any, runtime: Any, plan: Path, contract: GraphContract, device: torch.device,
                 artifact_dir: Path):
        self.plan = plan
        self.contract = contract
        self.device = device
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialize {plan} (corrupt, or built by another "
                                      f"TensorRT); {rebuild_hint(artifact_dir)}")
        check_engine_io(trt, self.engine, contract, plan, artifact_dir)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {plan} (out of GPU memory?)")
        self.outputs = {spec.name: spec.zeros(device) for spec in contract.outputs}
        self.bound: tuple[int, ...] | None = None

    def bind(self, inputs: dict[str, torch.Tensor]) -> bool:
        """Point the context at ``inputs`` and the output buffers; True when (re)bound."""
        try:
            ptrs = tuple(inputs[spec.name].data_ptr() for spec in self.contract.inputs)
        except KeyError:
            missing = [s.name for s in self.contract.inputs if s.name not in inputs]
            raise ValueError(f"{self.contract.graph} call is missing inputs {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}") from None
        if ptrs == self.bound:
            return False
        for spec in self.contract.inputs:
            t = inputs[spec.name]
            if tuple(t.shape) != spec.shape or t.dtype != spec.torch_dtype:
                raise ValueError(f"input {spec.name} is {t.dtype} {list(t.shape)}; the engine takes "
                                 f"{spec.dtype} {list(spec.shape)}")
            if t.device != self.device or not t.is_contiguous():
                raise ValueError(f"input {spec.name} must be a contiguous tensor on {self.device}, "
                                 f"got {'non-contiguous ' if not t.is_contiguous() else ''}{t.device}")
        named = [(s.name, inputs[s.name]) for s in self.contract.inputs] + list(self.outputs.items())
        for name, t in named:
            if not self.context.set_tensor_address(name, t.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {name} for {self.plan.name}")
        self.bound = ptrs
        return True

    def execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.plan.name}")

    def close(self) -> None:
        self.context = None
        self.engine = None
        self.outputs = {}
        self.bound = None


class TensorRTBackend(Backend):
    """Runs an artifact's TensorRT plans (built by ``memrope build``) on the current CUDA device.

    Args:
        artifact: an exported artifact directory (or :class:`Artifact`) holding ``step.plan`` and
            ``text.plan`` with their sidecars.
        cuda_graph: capture the step call into a CUDA graph after its warm-up and replay it.
    """

    name = "tensorrt"

    def __init__(self, artifact: Artifact | str | Path, *, cuda_graph: bool = True):
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        self._step = self._text = None
        self._graph: torch.cuda.CUDAGraph | None = None
        path = self.artifact.path
        plans = {graph: plan_path(path, graph) for graph in ("step", "text")}
        for plan in plans.values():
            for file in (plan, sidecar_path(plan)):
                if not file.is_file():
                    raise FileNotFoundError(f"artifact {path} has no TensorRT engine ({file.name} missing); "
                                            f"build it on this GPU with `memrope build {path}`")
        from engine.build import require_tensorrt, runtime_environment

        trt = require_tensorrt()
        env = runtime_environment(trt)
        contract = self.artifact.contract
        # Refuse stale plans before deserializing them: a plan from another TensorRT or GPU can crash.
        for graph, plan in plans.items():
            sidecar = read_sidecar(sidecar_path(plan))
            check_sidecar(sidecar, contract_hash=contract.config_hash, artifact_dir=path, **env)
            if sidecar.graph != graph or sidecar.dtype != contract.dtype:
                raise EngineMismatchError(f"{sidecar_path(plan)} describes the {sidecar.dtype} {sidecar.graph} "
                                          f"graph, not the {contract.dtype} {graph} graph; {rebuild_hint(path)}")

        self.model = self.artifact.model
        self.layout = self.artifact.layout()
        self.dtype = contract.step.input("latents").torch_dtype
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda_graph = cuda_graph
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        try:
            self._step = _Engine(trt, self._runtime, plans["step"], contract.step, self.device, path)
            self._text = _Engine(trt, self._runtime, plans["text"], contract.text, self.device, path)
        except BaseException:
            self.close()
            raise
        self._text_input = contract.text.inputs[0].zeros(self.device)
        self._text.bind({contract.text.inputs[0].name: self._text_input})
        self.stream = torch.cuda.Stream(self.device)
        logger.info("TensorRT %s engines for %s on %s (cuda_graph=%s)", env["tensorrt_version"], path,
                    env["gpu_name"], cuda_graph)

    def _run(self, engine: _Engine, capture: bool) -> None:
        """Execute ``engine`` on the side stream, ordered after and before the current stream."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            if self._graph is not None and engine is self._step:
                self._graph.replay()
            else:
                engine.execute(self.stream)
                if capture:
                    self._capture(engine)
        current.wait_stream(self.stream)

    def _capture(self, engine: _Engine) -> None:
        # The warm-up execution above computed this call's outputs; the capture only records.
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                engine.execute(self.stream)
        except Exception as exc:  # e.g. an engine with layers that cannot run under stream capture
            logger.warning("CUDA graph capture of the TensorRT step failed (%s); running without graphs", exc)
            self.cuda_graph = False
            return
        self._graph = graph

    def encode_text(self, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.artifact.contract.text.inputs[0]
        if tuple(prompt_embeds.shape) != spec.shape:
            raise ValueError(f"prompt_embeds {list(prompt_embeds.shape)} do not match the artifact's "
                             f"{list(spec.shape)}")
        self._text_input.copy_(prompt_embeds)
        self._run(self._text, capture=False)
        return self._text.outputs

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._step.bind(feeds):
            self._graph = None  # captured with the old addresses
        self._run(self._step, capture=self.cuda_graph and self._graph is None)
        return self._step.outputs

    def close(self) -> None:
        self._graph = None
        for engine in (self._step, self._text):
            if engine is not None:
                engine.close()
        self._step = self._text = None
        self._runtime = None
