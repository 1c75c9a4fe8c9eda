"""TensorRT backend: an artifact's ``step``, ``text`` and ``recache`` plans behind the loop's interface.

Owns: loading both kinds of plan ``memrope build`` makes (``rtx``: TensorRT-RTX, ``server``:
datacenter TensorRT; the sidecar says which, see :mod:`memrope.engine.sidecar`), refusing a plan built
for another target, TensorRT version, GPU or artifact before deserializing it, turning a failed
deserialization into one plain sentence (:class:`EngineLoadError`: no usable GPU or driver, a
corrupt plan ...), checking each engine's I/O against the contract, one execution context per
engine, TensorRT-RTX's runtime cache (its JIT kernels, kept in ``<graph>.plan.rtxcache`` next
to the plan), the output buffers (torch CUDA tensors allocated once from the contract), and
running ``execute_async_v3`` on a side stream ordered against the caller's current stream.

Binding: the loop passes the same feeds dict, whose tensors never move, on every call of a
stream; addresses are bound once per feeds-dict identity (per-call host work does not grow with
the layer count). A different dict (another session) rebinds. With ``cuda_graph=True`` the step
is captured into a CUDA graph right after the first (warm-up) execution for an address set, and
replayed after; a graph is kept per address set (the few most recent), so alternating sessions
do not recapture every call. The text and recache engines (prompt switches: rare) bind their
addresses at each call, inputs and outputs alike, so ``encode_text_into`` and ``recache`` write
straight into the stream's buffers. Building plans is :mod:`memrope.engine.build`'s job.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memrope.artifact import Artifact, load_artifact
from memrope.backend import Backend
from memrope.contract import GraphContract
from memrope.engine.build import (
    TARGETS,
    Target,
    collecting_logger,
    current_gpu,
    engine_io,
    io_differences,
    module_version,
    native_stderr,
)
from memrope.engine.sidecar import (
    EngineMismatchError,
    EngineSidecar,
    check_plan_bytes,
    check_sidecar,
    plan_path,
    read_sidecar,
    rebuild_command,
    runtime_cache_path,
    sidecar_path,
)
from memrope.errors import StageError
from memrope.io import atomic_write

logger = logging.getLogger(__name__)

GRAPHS_RUN = ("step", "text")  # the graphs every run executes (the loop's step and the prompt encoder)
GRAPH_RECACHE = "recache"  # a prompt switch's re-cache: loaded when asked for (another copy of the weights)
MAX_CUDA_GRAPHS = 4  # captured step graphs kept, one per bound address set (least recently used dropped)
_NO_GPU = re.compile(r"driver version is insufficient|no CUDA-capable device|CUDA driver|cudaError (35|100)\b",
                     re.IGNORECASE)
_CUDA_ERROR = re.compile(r"cudaError \d+: ([^)]*)\)")


class EngineLoadError(StageError):
    """A TensorRT plan could not be loaded here (no usable GPU or driver, corrupt plan ...)."""


def _validity_problems(trt: Any, runtime: Any, data: bytes) -> list[str]:
    """TensorRT-RTX's own verdict on a plan for this machine, as phrases (empty when it has none)."""
    check = getattr(runtime, "get_engine_validity", None)
    diagnostics = getattr(trt, "EngineInvalidityDiagnostics", None)
    if check is None or diagnostics is None:
        return []
    try:
        _, flags = check(data)
    except Exception:  # a verdict is a bonus for the message; its absence is not an error
        return []
    phrases = {"VERSION_MISMATCH": "built by another TensorRT version", "UNSUPPORTED_CC":
               "not built for this GPU's compute capability", "OLD_CUDA_DRIVER": "the CUDA driver is too old",
               "OLD_CUDA_RUNTIME": "the CUDA runtime is too old", "INSUFFICIENT_GPU_MEMORY": "not enough GPU memory",
               "MALFORMED_ENGINE": "the file is not a valid plan (corrupt or truncated)"}
    return [text for name, text in phrases.items()
            if hasattr(diagnostics, name) and int(flags) & int(getattr(diagnostics, name))]


def load_plan(trt: Any, runtime: Any, log: Any, plan: Path, sidecar: EngineSidecar, artifact_dir: Path) -> Any:
    """Deserialize ``plan``, or raise one plain :class:`EngineLoadError` saying why it cannot run here."""
    data = plan.read_bytes()
    check_plan_bytes(sidecar, data, plan, artifact_dir)  # the bytes about to load are the plan that was built
    log.errors.clear()
    with native_stderr() as native:
        engine = runtime.deserialize_cuda_engine(data)
    if engine is not None:
        return engine
    text = " ".join(log.errors + native)
    problems = _validity_problems(trt, runtime, data)
    title = f"{TARGETS[sidecar.target].title} {trt.__version__}"
    targets = ", ".join(sidecar.compute_capabilities) + (" and later" if sidecar.default_compute_capabilities else "")
    if _NO_GPU.search(text):
        cause = _CUDA_ERROR.search(text)
        raise EngineLoadError(
            f"cannot load {plan}: no usable NVIDIA GPU on this machine ({title}: "
            f"{cause.group(1) if cause else 'CUDA is unavailable'}). This {sidecar.target} plan runs on NVIDIA "
            f"GPUs of compute capability {targets}"
            f"{'; building it needed no GPU' if sidecar.target == 'rtx' else ''}")
    reason = "; ".join(problems) or re.sub(r"\s+", " ", text).strip()[:300] or "no reason given"
    raise EngineLoadError(f"cannot load {plan} with {title}: {reason}; rebuild it with "
                          f"`{rebuild_command(artifact_dir, sidecar.target)}`")


@dataclass
class OpenedPlans:
    """Deserialized engines of one artifact (see :func:`open_plans`); ``gpu`` is ``(name, cc)``."""

    trt: Any
    runtime: Any
    log: Any
    target: Target
    engines: dict[str, Any]
    gpu: tuple[str, str]


def open_plans(artifact: Artifact, graphs: tuple[str, ...], *, target: str | None = None) -> OpenedPlans:
    """Check and deserialize the plans ``memrope build`` made for ``graphs`` of ``artifact``.

    Every plan and sidecar must exist; the sidecars must all come from one build, for this
    artifact's contract hash and source graphs (SHA-256), this TensorRT module version and this
    GPU, and describe the graph and dtype the contract expects; each plan's bytes must be the
    ones its sidecar recorded; all of it is checked before any plan is deserialized (a plan for
    another TensorRT or GPU can crash). Each engine's I/O must equal the contract's.
    """
    path, contract = artifact.path, artifact.contract
    plans = {graph: plan_path(path, graph) for graph in graphs}
    for graph, plan in plans.items():
        for file in (plan, sidecar_path(plan)):
            if not file.is_file():
                also = " (or open the backend with recache=False)" if graph == GRAPH_RECACHE else ""
                raise FileNotFoundError(f"artifact {path} has no TensorRT engine ({file.name} missing); build "
                                        f"it with `memrope build {path} --target rtx` (TensorRT-RTX, any machine) "
                                        f"or `--target server` (TensorRT, on this GPU){also}")
    sidecars = {graph: read_sidecar(sidecar_path(plan)) for graph, plan in plans.items()}
    kinds = {(s.target, s.module_version) for s in sidecars.values()}
    first = sidecars[graphs[0]]
    if len(kinds) > 1:
        raise EngineMismatchError(f"{path}: the plans were built by different builds ({sorted(kinds)}); rebuild "
                                  f"them with `{rebuild_command(path, target or first.target)}`")
    gpu = current_gpu()
    for graph, sidecar in sidecars.items():
        check_sidecar(sidecar, contract_hash=contract.config_hash, module_version=module_version(sidecar.module),
                      compute_capability=gpu[1] if gpu else None, gpu_name=gpu[0] if gpu else None,
                      target=target, artifact_dir=path, source_sha256=artifact.graph_sources(graph),
                      quantization=contract.quantization)
        if sidecar.graph != graph or sidecar.dtype != contract.dtype:
            raise EngineMismatchError(f"{sidecar_path(plans[graph])} describes the {sidecar.dtype} {sidecar.graph} "
                                      f"graph, not the {contract.dtype} {graph} graph; rebuild it with "
                                      f"`{rebuild_command(path, sidecar.target)}`")
    spec = TARGETS[first.target]
    trt = spec.require_module()
    log = collecting_logger(trt)
    runtime = trt.Runtime(log)
    engines = {}
    for graph, plan in plans.items():
        engine = load_plan(trt, runtime, log, plan, sidecars[graph], path)
        differences = io_differences(engine_io(trt, engine), contract.graphs[graph])
        if differences:
            raise EngineMismatchError(f"{plan}: the engine's I/O tensors differ from the artifact's contract "
                                      f"({'; '.join(differences[:6])}); rebuild it with "
                                      f"`{rebuild_command(path, spec.name)}`")
        engines[graph] = engine
    if gpu is None:
        raise EngineLoadError(f"cannot run {path}'s TensorRT plans: torch sees no CUDA device "
                              "(torch.cuda.is_available() is False)")
    return OpenedPlans(trt, runtime, log, spec, engines, gpu)


class PlanEngine:
    """One deserialized engine, its execution context, its output buffers and (rtx) its runtime cache.

    ``activate`` makes the engine's own context; :meth:`new_context` makes further ones (e.g. one
    per bound buffer pair, sharing caller-managed scratch memory). The TensorRT-RTX runtime cache
    (its JIT kernels) is shared by every context and saved next to the plan on close.
    """

    def __init__(self, engine: Any, plan: Path, contract: GraphContract, target: Target):
        self.engine = engine
        self.plan = plan
        self.contract = contract
        self.runtime_cache = None
        self.context = None
        self.outputs: dict[str, torch.Tensor] = {}
        self.executed = False
        self.target = target

    def new_context(self, user_managed: bool = False) -> Any:
        """A new execution context (``user_managed``: its scratch memory is set by the caller)."""
        trt = self.target.require_module()
        strategy = trt.ExecutionContextAllocationStrategy
        if self.target.runtime_cache:
            config = self.engine.create_runtime_config()
            if self.runtime_cache is None:
                self.runtime_cache = config.create_runtime_cache()
                cache_file = runtime_cache_path(self.plan)
                if cache_file.is_file() and not self.runtime_cache.deserialize(cache_file.read_bytes()):
                    logger.info("%s is from another GPU, driver or TensorRT-RTX; starting an empty runtime cache",
                                cache_file.name)
            config.set_runtime_cache(self.runtime_cache)
            if user_managed:
                config.set_execution_context_allocation_strategy(strategy.USER_MANAGED)
            context = self.engine.create_execution_context(config)
        else:
            context = self.engine.create_execution_context(strategy.USER_MANAGED if user_managed else strategy.STATIC)
        if context is None:
            raise EngineLoadError(f"TensorRT could not create an execution context for {self.plan} "
                                  "(out of GPU memory?)")
        return context

    def activate(self, device: torch.device, own_outputs: bool = True) -> None:
        """Create the execution context (with the runtime cache for rtx) and, with ``own_outputs``,
        output buffers bound once (else the caller binds its own with :meth:`bind_outputs`)."""
        self.context = self.new_context()
        if own_outputs:
            self.outputs = {spec.name: spec.zeros(device) for spec in self.contract.outputs}
            self.bind_outputs(self.outputs, device)

    def _set_addresses(self, kind: str, specs, tensors: dict[str, torch.Tensor], device: torch.device,
                       context: Any = None) -> None:
        context = self.context if context is None else context
        missing = [s.name for s in specs if s.name not in tensors]
        if missing:
            raise ValueError(f"{self.contract.graph} call is missing {kind}s {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}")
        for spec in specs:
            t = tensors[spec.name]
            if tuple(t.shape) != spec.shape or t.dtype != spec.torch_dtype:
                raise ValueError(f"{kind} {spec.name} is {t.dtype} {list(t.shape)}; the engine takes "
                                 f"{spec.dtype} {list(spec.shape)}")
            if t.device != device or not t.is_contiguous():
                raise ValueError(f"{kind} {spec.name} must be a contiguous tensor on {device}, "
                                 f"got {'non-contiguous ' if not t.is_contiguous() else ''}{t.device}")
        for spec in specs:
            if not context.set_tensor_address(spec.name, tensors[spec.name].data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {spec.name} for {self.plan.name}")

    def bind(self, inputs: dict[str, torch.Tensor], device: torch.device, context: Any = None) -> tuple[int, ...]:
        """Check ``inputs`` against the contract and point ``context`` (default: the engine's own)
        at them; returns their addresses."""
        self._set_addresses("input", self.contract.inputs, inputs, device, context)
        return tuple(inputs[spec.name].data_ptr() for spec in self.contract.inputs)

    def bind_outputs(self, outputs: dict[str, torch.Tensor], device: torch.device, context: Any = None) -> None:
        """Check ``outputs`` against the contract and make ``context`` (default: the engine's own) write into them."""
        self._set_addresses("output", self.contract.outputs, outputs, device, context)

    def execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.plan.name}")

    def save_runtime_cache(self) -> None:
        """Persist TensorRT-RTX's JIT kernels next to the plan, so the next launch skips compiling them."""
        if self.runtime_cache is None:
            return
        try:
            atomic_write(runtime_cache_path(self.plan), memoryview(self.runtime_cache.serialize()))
        except OSError as exc:  # a read-only artifact still runs, just without the warm start
            logger.warning("could not save the runtime cache of %s: %s", self.plan.name, exc)

    def close(self) -> None:
        self.save_runtime_cache()
        self.context = None
        self.runtime_cache = None
        self.engine = None
        self.outputs = {}


class TensorRTBackend(Backend):
    """Runs an artifact's TensorRT plans (``memrope build --target rtx|server``) on the current CUDA device.

    Args:
        artifact: an exported artifact directory (or :class:`Artifact`) holding ``step.plan`` and
            ``text.plan`` with their sidecars (and ``recache.plan`` for ``recache=True``).
        cuda_graph: capture the step call into a CUDA graph after its warm-up and replay it.
        recache: load the recache plan, so prompt switches can re-cache the window (it holds a
            second copy of the weights on the GPU; False saves that memory).
        target: refuse plans not built for this target (``rtx``/``server``); None takes either.

    Raises:
        FileNotFoundError: no plans (says which ``memrope build`` to run).
        EngineMismatchError: a plan built for another target, TensorRT version, GPU or artifact.
        ImportError: the plan's TensorRT module is not installed.
        EngineLoadError: the plan cannot be loaded here (no usable GPU or driver, corrupt plan).
    """

    name = "tensorrt"

    def __init__(self, artifact: Artifact | str | Path, *, cuda_graph: bool = True, target: str | None = None,
                 recache: bool = True):
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        self._engines: dict[str, PlanEngine] = {}
        self._graphs: OrderedDict[tuple[int, ...], torch.cuda.CUDAGraph] = OrderedDict()
        self._bound_feeds: weakref.ref | None = None
        self._bound_ptrs: tuple[int, ...] | None = None
        self._runtime = None
        path = self.artifact.path
        contract = self.artifact.contract
        if target is not None and target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        graphs = (*GRAPHS_RUN, GRAPH_RECACHE) if recache else GRAPHS_RUN
        self.model = self.artifact.model
        self.layout = self.artifact.layout()
        self.dtype = contract.step.input("latents").torch_dtype
        self.cuda_graph = cuda_graph
        try:
            opened = open_plans(self.artifact, graphs, target=target)
            self._log, self._runtime = opened.log, opened.runtime
            spec, trt, gpu = opened.target, opened.trt, opened.gpu
            for graph, engine in opened.engines.items():
                self._engines[graph] = PlanEngine(engine, plan_path(path, graph), contract.graphs[graph], spec)
            self.device = torch.device("cuda", torch.cuda.current_device())
            for graph, engine in self._engines.items():
                engine.activate(self.device, own_outputs=graph != GRAPH_RECACHE)
        except BaseException:
            self.close()
            raise
        self.can_recache = recache
        self._text_input = contract.text.inputs[0].zeros(self.device)
        self.stream = torch.cuda.Stream(self.device)
        logger.info("%s %s engines for %s on %s (cuda_graph=%s)", spec.title, trt.__version__, path, gpu[0],
                    cuda_graph)

    def _first_run_done(self, engine: PlanEngine) -> None:
        if not engine.executed:
            engine.executed = True
            engine.save_runtime_cache()  # the warm-up compiled the JIT kernels: keep them even if we crash later

    def encode_text(self, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        engine = self._engines["text"]
        spec = engine.contract.inputs[0]
        if tuple(prompt_embeds.shape) != spec.shape:
            raise ValueError(f"prompt_embeds {list(prompt_embeds.shape)} do not match the artifact's "
                             f"{list(spec.shape)}")
        self._text_input.copy_(prompt_embeds)
        engine.bind({spec.name: self._text_input}, self.device)
        engine.bind_outputs(engine.outputs, self.device)
        self._run_once(engine)
        return engine.outputs

    def encode_text_into(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        engine = self._engines["text"]
        engine.bind(feeds, self.device)
        engine.bind_outputs(outputs, self.device)
        self._run_once(engine)

    def recache(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        engine = self._engines.get(GRAPH_RECACHE)
        if engine is None:
            raise ValueError("this TensorRT backend was opened with recache=False; open it with recache=True "
                             "to re-cache the window at a prompt switch")
        engine.bind(feeds, self.device)
        engine.bind_outputs(outputs, self.device)
        self._run_once(engine)

    def _run_once(self, engine: PlanEngine) -> None:
        """One uncaptured execution on the side stream, ordered against the caller's stream."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            engine.execute(self.stream)
        current.wait_stream(self.stream)
        self._first_run_done(engine)

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine = self._engines["step"]
        if self._bound_feeds is None or self._bound_feeds() is not feeds:
            self._bound_ptrs = engine.bind(feeds, self.device)
            # Weakly: the backend must not keep a finished stream's cache alive.
            self._bound_feeds = weakref.ref(feeds)
        graph = self._graphs.get(self._bound_ptrs) if self.cuda_graph else None
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            if graph is not None:
                self._graphs.move_to_end(self._bound_ptrs)
                graph.replay()
            else:
                engine.execute(self.stream)
                if self.cuda_graph:
                    self._capture(engine)
        current.wait_stream(self.stream)
        self._first_run_done(engine)
        return engine.outputs

    def _capture(self, engine: PlanEngine) -> None:
        # The warm-up execution just before computed this call's outputs; the capture only records.
        capturable = getattr(engine.context, "is_stream_capturable", None)
        if capturable is not None and not capturable(self.stream.cuda_stream):
            logger.warning("the TensorRT step cannot run under stream capture here; running without CUDA graphs")
            self.cuda_graph = False
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                engine.execute(self.stream)
        except Exception as exc:  # e.g. an engine with layers that cannot run under stream capture
            logger.warning("CUDA graph capture of the TensorRT step failed (%s); running without graphs", exc)
            self.cuda_graph = False
            return
        self._graphs[self._bound_ptrs] = graph
        while len(self._graphs) > MAX_CUDA_GRAPHS:
            self._graphs.popitem(last=False)

    @property
    def captured_graphs(self) -> int:
        """How many step CUDA graphs are held (one per recently bound address set)."""
        return len(self._graphs)

    def close(self) -> None:
        self._graphs.clear()
        self._bound_feeds = self._bound_ptrs = None
        for engine in self._engines.values():
            engine.close()
        self._engines = {}
        self._runtime = None
