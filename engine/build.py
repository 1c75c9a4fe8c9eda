"""Building TensorRT engines for an exported artifact (``memrope build ART --target rtx|server``).

Owns: turning every graph of an artifact's contract (``step``, ``text`` and whatever else the
contract lists) into ``<graph>.plan`` with its ``<graph>.plan.json`` sidecar (:mod:`memrope.engine.sidecar`),
through ONE builder code path over two TensorRT Python modules:

- ``rtx``: TensorRT-RTX (module ``tensorrt_rtx``). Builds ahead of time with no GPU present, for a
  list of compute capabilities (``--compute-capability``; default the builder's own targets). No
  timing cache: attaching one makes the builder look for a GPU.
- ``server``: datacenter TensorRT (module ``tensorrt`` >= 10.15). Builds on the GPU it targets and
  keeps a tactic timing cache across builds.

The two modules share TensorRT's API where we use it (``Builder``, ``create_network``,
``OnnxParser.parse_from_file``, ``create_builder_config``, ``build_serialized_network``); their
differences are declared once in :data:`TARGETS` and applied once in :func:`_configure`.

The ONNX is parsed by path (external weights) into a strongly typed network, so the precision is
the exported graph's own (bf16/fp16/fp32 with its deliberate fp32 islands). Shapes are static.
Attention: an fp32 ``Attention`` is marked decomposable (TensorRT-RTX 1.7 has no fused fp32 kernel
for it and fails the build otherwise; the builder then runs MatMul/Softmax/MatMul); bf16/fp16
attention stays non-decomposable, so a build either puts it on a fused kernel or fails loudly. Each sidecar carries a build report
(layer counts and which attention kernels the builder chose) that shows this.

All or nothing: every requested graph is built into a temp file first; only when all of them
built are the plans and sidecars moved into place (old sidecar removed, plan replaced, new
sidecar written, per graph). A graph the builder rejects raises one :class:`EngineBuildError`
naming the layer and the builder's message and leaves the directory exactly as it was; so does
Ctrl-C during a parse or build (:class:`DeferredInterrupt`: TensorRT would swallow it). An
interrupted commit can leave a plan without a sidecar, which loading refuses with the rebuild
command; never a plan under another plan's sidecar.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from memrope.contract import GraphContract
from memrope.engine.sidecar import (
    RTX_DEFAULT_COMPUTE_CAPABILITIES,
    EngineMismatchError,
    EngineSidecar,
    plan_path,
    plan_sha256,
    read_sidecar,
    sidecar_json,
    sidecar_path,
)
from memrope.errors import StageError
from memrope.io import atomic_path, shown

logger = logging.getLogger(__name__)

DEFAULT_TIMING_CACHE = Path("~/.cache/memrope/trt_timing.cache")
BUILD_DTYPES = ("bfloat16", "float16", "float32")
_COMPUTE_CAPABILITY = re.compile(r"^\d{1,2}\.\d$")
# Fused attention kernels as the builders name them in their layer listings (TensorRT-RTX 1.7:
# ``_gemm_mha_v2``; server TensorRT: ``*fmha*`` / ``*mha*``).
_FUSED_ATTENTION_KERNEL = re.compile(r"mha", re.IGNORECASE)


class EngineBuildError(StageError):
    """TensorRT could not parse or build one of an artifact's graphs; the message names the layer."""


@dataclass(frozen=True)
class Target:
    """One kind of plan, and everything in which building or running it differs from the other kind."""

    name: str
    module: str
    extra: str
    title: str
    builds_on_gpu: bool  # server TensorRT times tactics on the GPU it builds for
    timing_cache: bool  # server: reuse tactic timings; rtx: never (a timing cache makes it look for a GPU)
    compute_capabilities: bool  # rtx: the GPUs to build for are chosen at build time
    runtime_cache: bool  # rtx: the JIT step's kernels are cached next to the plan between runs

    def require_module(self) -> Any:
        """Import the target's TensorRT module lazily, or raise ImportError naming the extra."""
        try:
            return importlib.import_module(self.module)
        except ImportError as exc:
            needs = "no GPU needed to build" if not self.builds_on_gpu else "needs an NVIDIA GPU with a CUDA driver"
            raise ImportError(f"--target {self.name} needs the {self.module} module ({self.title}, {needs}): "
                              f"pip install -e '.[{self.extra}]'") from exc


TARGETS = {
    "rtx": Target("rtx", "tensorrt_rtx", "rtx", "TensorRT-RTX", builds_on_gpu=False, timing_cache=False,
                  compute_capabilities=True, runtime_cache=True),
    "server": Target("server", "tensorrt", "tensorrt", "TensorRT", builds_on_gpu=True, timing_cache=True,
                     compute_capabilities=False, runtime_cache=False),
}


def target_of(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {shown(name)}")
    return TARGETS[name]


def require_tensorrt(target: str = "server") -> Any:
    """The TensorRT module of ``target`` (``tensorrt_rtx`` for rtx, ``tensorrt`` for server)."""
    return target_of(target).require_module()


def module_version(module: str) -> str | None:
    """The installed version of a TensorRT module (``"1.7.1.116"``), None when it cannot be imported."""
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def current_gpu() -> tuple[str, str] | None:
    """(name, compute capability ``"8.9"``) of the current CUDA device, None when torch sees none."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def parse_compute_capabilities(values: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """``["8.9,12.0"]`` or ``"8.9"`` -> ``("8.9", "12.0")`` (sorted, unique); None/empty -> None."""
    if values is None:
        return None
    items = [values] if isinstance(values, str) else list(values)
    caps = [c.strip() for item in items for c in str(item).split(",") if c.strip()]
    bad = [c for c in caps if not _COMPUTE_CAPABILITY.match(c)]
    if bad:
        raise ValueError(f"--compute-capability takes MAJOR.MINOR values such as 8.9 or 12.0, got {shown(bad)}")
    if not caps:
        return None
    return tuple(sorted(set(caps), key=lambda c: tuple(int(p) for p in c.split("."))))


@dataclass(frozen=True)
class BuildOptions:
    """What shapes a plan besides its graph: recorded in the sidecar, compared before reusing a plan."""

    target: Target
    compute_capabilities: tuple[str, ...] | None = None
    timing_cache: Path | None = None
    opt_level: int = 3
    workspace_bytes: int | None = None

    def flags(self) -> dict[str, Any]:
        return {"strongly_typed": True, "builder_optimization_level": self.opt_level,
                "workspace_bytes": self.workspace_bytes,
                "timing_cache": str(self.timing_cache) if self.timing_cache is not None else None,
                "compute_capabilities": list(self.compute_capabilities) if self.compute_capabilities else None}


def _compute_capability_enum(trt: Any, cc: str) -> Any:
    name = "SM" + cc.replace(".", "")
    if not hasattr(trt.ComputeCapability, name):
        known = sorted(f"{m[2:-1]}.{m[-1]}" for m in trt.ComputeCapability.__members__ if m.startswith("SM"))
        raise ValueError(f"--compute-capability {cc} is not a {trt.__name__} {trt.__version__} target "
                         f"(it builds for {', '.join(known)})")
    return getattr(trt.ComputeCapability, name)


def _configure(trt: Any, builder: Any, options: BuildOptions) -> Any:
    """The builder config: the one place where building for rtx and for server differs."""
    target = options.target
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    # DETAILED puts the engine's layer listing (kernel names) in the build log and the inspector.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if target.compute_capabilities and options.compute_capabilities:
        config.num_compute_capabilities = len(options.compute_capabilities)
        for index, cc in enumerate(options.compute_capabilities):
            if not config.set_compute_capability(_compute_capability_enum(trt, cc), index):
                raise ValueError(f"{target.title} refused compute capability {cc}")
    if target.timing_cache and options.timing_cache is not None:
        blob = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)
    return config


def _save_timing_cache(config: Any, options: BuildOptions) -> None:
    if options.target.timing_cache and options.timing_cache is not None:
        with atomic_path(options.timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))


def collecting_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that keeps errors, warnings and the engine layer listing (of a build or a load)."""

    class BuildLog(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []
            self.layer_listing: str | None = None

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.WARNING:
                self.warnings.append(msg)
                logger.debug("%s: %s", trt.__name__, msg)
            elif msg.startswith("Layers:"):
                self.layer_listing = msg
            elif severity == trt.ILogger.INFO:
                logger.debug("%s: %s", trt.__name__, msg)

    return BuildLog()


class DeferredInterrupt:
    """Hold Ctrl-C (SIGINT) and SIGTERM while TensorRT runs, and raise ``KeyboardInterrupt`` (or
    :class:`memrope.errors.Terminated`) once it returns.

    TensorRT calls our logger from inside a parse or build; a ``KeyboardInterrupt`` raised there
    is caught by TensorRT ("Exception caught in log()"), the build finishes and its plans would be
    written. So inside ``with DeferredInterrupt() as interrupt:`` the signal only sets
    ``interrupt.requested``; :meth:`progress_monitor` cancels a build at its next step, and the
    ``with`` raises ``KeyboardInterrupt`` on exit, before the caller writes anything. Outside the
    main thread it changes nothing; a signal someone else handles (SIGINT not Python's default,
    SIGTERM not :func:`memrope.errors.raise_terminated`) is left to them.
    """

    def __init__(self) -> None:
        self.requested = False
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> DeferredInterrupt:
        from memrope.errors import raise_terminated

        if threading.current_thread() is threading.main_thread():
            for signum, ours in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, raise_terminated)):
                if signal.getsignal(signum) is ours:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self._signal = self._signal or signum

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        from memrope.errors import Terminated

        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self.requested and exc_type is None:
            raise Terminated if self._signal == signal.SIGTERM else KeyboardInterrupt

    def progress_monitor(self, trt: Any) -> Any:
        """A ``trt.IProgressMonitor`` that cancels the build once Ctrl-C was pressed."""
        interrupt = self

        class CancelOnInterrupt(trt.IProgressMonitor):
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                pass

            def step_complete(self, phase_name: str, step: int) -> bool:
                return not interrupt.requested

            def phase_finish(self, phase_name: str) -> None:
                pass

        return CancelOnInterrupt()


@contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Capture what the TensorRT libraries print straight to file descriptor 2.

    The builder prints its full internal error there (the logger gets a truncated copy); it goes
    into the one error message instead of onto the user's terminal.
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line for line in sink.read().decode(errors="replace").splitlines() if line.strip())


def strongly_typed(trt: Any) -> int:
    """The network-creation flags of a strongly typed network (precision taken from the graph)."""
    # TensorRT-RTX and TensorRT 11 networks are always strongly typed (the flag is accepted);
    # TensorRT 10 needs it to take the precision from the graph.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _dtype_names(trt: Any) -> dict[Any, str]:
    names = {}
    for attr in ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"):
        if hasattr(trt, attr):
            names[getattr(trt, attr)] = attr
    return names


def network_io(trt: Any, network: Any) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """A parsed network's I/O: name -> (``input``/``output``, shape, dtype name)."""
    names = _dtype_names(trt)
    io = {}
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            io[t.name] = (mode, tuple(t.shape), names.get(t.dtype, str(t.dtype)))
    return io


def engine_io(trt: Any, engine: Any) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """A deserialized engine's I/O: name -> (``input``/``output``, shape, dtype name)."""
    names = _dtype_names(trt)
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dtype = engine.get_tensor_dtype(name)
        io[name] = (mode, tuple(engine.get_tensor_shape(name)), names.get(dtype, str(dtype)))
    return io


def io_differences(got: dict[str, tuple[str, tuple[int, ...], str]], contract: GraphContract) -> list[str]:
    """Every tensor whose direction, shape or dtype differs from ``contract`` (empty: they agree)."""
    want = {spec.name: ("input", spec.shape, spec.dtype) for spec in contract.inputs}
    want.update({spec.name: ("output", spec.shape, spec.dtype) for spec in contract.outputs})
    return [f"{name}: TensorRT {got.get(name, 'absent')}, contract {want.get(name, 'absent')}"
            for name in list(want) + [n for n in got if n not in want] if got.get(name) != want.get(name)]


def _shown(items: list[str], limit: int = 4) -> str:
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _attention_layers(trt: Any, network: Any) -> list[Any]:
    """The network's IAttention objects (one per ONNX ``Attention`` node)."""
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    found = []
    for i in range(network.num_layers if kind is not None else 0):
        layer = network.get_layer(i)
        if layer.type == kind:
            layer.__class__ = trt.IAttentionInputLayer  # the bindings hand out the ILayer base class
            found.append(layer.attention)
    return found


def _mark_fp32_attention_decomposable(trt: Any, attentions: list[Any]) -> int:
    """Let the builder split fp32 attention into MatMul/Softmax/MatMul; bf16/fp16 stays fused or fails."""
    marked = 0
    for attention in attentions:
        if attention.get_input(0).dtype == trt.float32:
            attention.decomposable = True
            marked += 1
    return marked


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _engine_layers(listing: str | None) -> list[tuple[str, str]] | None:
    """(name, type) of each engine layer from the builder's ``Layers:`` log listing (DETAILED verbosity)."""
    if listing is None:
        return None
    layers = []
    for line in listing.splitlines():
        match = re.match(r"Name: (.*?), LayerType: ([^,]*)", line)
        if match:
            layers.append((match.group(1), match.group(2)))
    return layers


def _inspector_layers(trt: Any, serialized: Any, log: Any) -> list[tuple[str, str]] | None:
    """(name, type) of each engine layer from the engine inspector; needs a GPU (server builds have one)."""
    import json

    try:
        engine = trt.Runtime(log).deserialize_cuda_engine(serialized)
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as exc:  # the report is informative; a failed inspection must not fail the build
        logger.warning("could not inspect the built engine: %s", exc)
        return None
    return [(str(layer.get("Name", "")), str(layer.get("LayerType", ""))) if isinstance(layer, dict)
            else (str(layer), "") for layer in info.get("Layers", [])]


_LOW_PRECISION = ("FP8", "Int8", "Int4", "FP4")  # engine datatypes of quantized tensors, as listed


def layer_records(listing: str) -> list[dict[str, Any]]:
    """Each engine layer of the builder's listing: name, type, the datatypes of its inputs and
    constants, and the ONNX nodes it was built from (its ``[ONNX Layer: ...]`` metadata)."""
    records = []
    for line in listing.splitlines():
        match = re.match(r"Name: (.*?), LayerType: ([^,]*)", line)
        if not match:
            continue
        head = line.split("Outputs:", 1)[0]  # inputs and constants: what the layer reads
        records.append({"name": match.group(1), "type": match.group(2),
                        "reads": set(re.findall(r"Datatype: (\w+)", head)),
                        "onnx": set(re.findall(r"\[ONNX Layer: ([^\]]*)\]", line))})
    return records


def quantized_layer_report(graph: str, onnx_path: Path, listing: str | None) -> dict[str, Any]:
    """Where the builder put the graph's quantized MatMuls and convolutions (those reading a
    dequantized weight), counted from the engine's layer listing: the engine layers that read FP8,
    INT8 or INT4, and for each MatMul or Conv whether the layer that runs it reads a low-precision
    tensor (a low-precision GEMM or convolution) or not (the builder dequantized the weight and
    multiplies in the base dtype).

    Raises :class:`EngineBuildError` naming the MatMuls and Convs that do not run in low precision.
    """
    from memrope.export.quantize import qdq_census

    census = qdq_census(onnx_path)
    matmuls, convs = census["quantized_matmuls"], census["quantized_convs"]
    if listing is None:
        return {"quantized_matmuls": len(matmuls), "quantized_convs": len(convs), "verified": False,
                "why": "the builder log had no layer listing"}
    records = layer_records(listing)
    low = [r for r in records if r["reads"] & set(_LOW_PRECISION)]
    by_type = Counter(t for r in low for t in r["reads"] & set(_LOW_PRECISION))

    def runs_low(node: str) -> bool:
        # The layers built from this node that multiply: a GEMM, a convolution ("correlation"), or
        # a fusion ending in a fully connected layer ("...Fc"); a separate dequantizing kernel does
        # not count.
        built = [r for r in records if node in r["onnx"]]
        multiply = [r for r in built if r["type"] in ("gemm", "correlation", "convolution")
                    or r["name"].split("_myl")[0].endswith("Fc")] or built
        return bool(multiply) and all(r["reads"] & set(_LOW_PRECISION) for r in multiply)

    for kind, nodes in (("MatMuls", matmuls), ("convolutions", convs)):
        missing = [f"{m} ({layer})" for m, layer in nodes.items() if not runs_low(m)]
        if missing:
            raise EngineBuildError(
                f"the builder ignored the Q/DQ of {len(missing)} of the {graph} graph's {len(nodes)} quantized "
                f"{kind} ({_shown(missing)}): they run in the base dtype, not in low precision ({onnx_path}); "
                "no plan was written")
    return {"quantized_matmuls": len(matmuls), "quantized_convs": len(convs), "verified": True,
            "low_precision_layers": len(low), "layers_reading": dict(sorted(by_type.items())),
            "layer_types": dict(Counter(r["type"] for r in low)),
            "onnx_q_dq": {"QuantizeLinear": census["QuantizeLinear"], "DequantizeLinear": census["DequantizeLinear"],
                          "weights": census["weights"]}}


def _attention_summary(attention_layers: int, decomposable: int, fused: list[str]) -> str:
    if attention_layers == 0:
        return "no attention layers"
    if decomposable == attention_layers:
        return (f"decomposed: {decomposable} fp32 attention layers marked decomposable (MatMul/Softmax/MatMul); "
                f"{len(fused)} fused attention kernels")
    kernels = sorted({re.sub(r"_myl\d+_\d+$", "", name) for name in fused})
    if decomposable == 0 and len(fused) == attention_layers:
        return f"fused: {attention_layers} attention layers -> {len(fused)} fused kernels ({', '.join(kernels)})"
    return (f"{attention_layers} attention layers ({decomposable} decomposable), {len(fused)} fused attention "
            f"kernels{' (' + ', '.join(kernels) + ')' if kernels else ''}")


def _attention_signature(attention: Any) -> tuple:
    mask = attention.mask
    return (tuple(tuple(attention.get_input(i).shape) for i in range(3)), attention.get_input(0).dtype,
            None if mask is None else (tuple(mask.shape), mask.dtype), attention.causal, attention.norm_op,
            attention.decomposable)


def _rejected_attention(trt: Any, attentions: list[Any], options: BuildOptions) -> list[tuple[str, tuple]]:
    """The attention layers the builder cannot build on their own: (name, signature) of each.

    The builder's attention error names no layer, so each distinct attention (shapes, dtype, mask,
    decomposable) is built alone in a one-layer network, once; only runs after a failed build.
    """
    groups: dict[tuple, list[str]] = {}
    for attention in attentions:
        groups.setdefault(_attention_signature(attention), []).append(attention.name)
    rejected = []
    for signature, names in groups.items():
        shapes, dtype, mask, causal, norm_op, decomposable = signature
        log = collecting_logger(trt)
        builder = trt.Builder(log)
        network = builder.create_network(strongly_typed(trt))
        q, k, v = (network.add_input(role, dtype, shape) for role, shape in zip("qkv", shapes, strict=True))
        probe = network.add_attention(q, k, v, norm_op, causal)
        if mask is not None:
            probe.mask = network.add_input("mask", mask[1], mask[0])
        probe.decomposable = decomposable
        network.mark_output(probe.get_output(0))
        with native_stderr():
            if builder.build_serialized_network(network, _configure(trt, builder, options)) is None:
                rejected.extend((name, signature) for name in names)
    return rejected


def _builder_failure(trt: Any, graph: str, onnx_path: Path, network: Any, attentions: list[Any],
                     options: BuildOptions, log: Any, native: list[str]) -> EngineBuildError:
    """One error naming the layer the builder rejected and the builder's own message."""
    title = f"{options.target.title} {trt.__version__}"
    internal = [line for line in native if "error" in line.lower()]
    message = _one_line(" | ".join(internal or log.errors or native) or "the builder returned no engine")
    layer_names = {network.get_layer(i).name for i in range(network.num_layers)}
    layer_names |= {a.name for a in attentions}
    named = [n for n in layer_names if n and n in message]
    named = [n for n in named if not any(n != other and n in other for other in named)]
    where = ""
    if named:
        where = f"layer {', '.join(sorted(named)[:4])}: "
    elif "attention" in message.lower() and attentions:
        rejected = _rejected_attention(trt, attentions, options)
        if rejected:
            name, (shapes, dtype, mask, *_rest) = rejected[0]
            dtype_name = _dtype_names(trt).get(dtype, str(dtype))
            more = f" and {len(rejected) - 1} more attention layers" if len(rejected) > 1 else ""
            where = (f"layer {name} (Attention, {dtype_name} query {list(shapes[0])}, key/value "
                     f"{list(shapes[1])}{', masked' if mask is not None else ''}){more}: ")
    if not where:
        where = "the builder named no layer: "
    return EngineBuildError(f"{title} could not build the {graph} graph ({onnx_path}): {where}{message}; "
                            "no plan was written")


def _build_graph(trt: Any, graph: str, onnx_path: Path, contract: GraphContract,
                 options: BuildOptions, quantized: bool = False) -> tuple[Any, dict[str, Any]]:
    """Parse and build one graph; returns the serialized plan and the build report. With
    ``quantized``, every MatMul that reads a dequantized weight must run in a low-precision GEMM
    (:func:`quantized_layer_report`), or the build fails naming it."""
    title = f"{options.target.title} {trt.__version__}"
    log = collecting_logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(strongly_typed(trt))
    parser = trt.OnnxParser(network, log)
    start = time.perf_counter()
    with DeferredInterrupt(), native_stderr() as native:
        parsed = parser.parse_from_file(str(onnx_path))
    parse_seconds = time.perf_counter() - start
    if not parsed:
        errors = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            node = f"node {error.node_name()} ({error.node_operator()})" if error.node_name() else "graph"
            errors.append(f"{node}: {_one_line(error.desc())}")
        raise EngineBuildError(f"{title} could not parse the {graph} graph ({onnx_path}): "
                               f"{_shown(errors or [_one_line(' | '.join(log.errors + native))])}; no plan was written")
    differences = io_differences(network_io(trt, network), contract)
    if differences:
        raise EngineMismatchError(f"{onnx_path}: the parsed graph's inputs/outputs differ from the artifact's "
                                  f"contract ({_shown(differences)}); re-export the artifact with `memrope export`")
    attentions = _attention_layers(trt, network)
    decomposable = _mark_fp32_attention_decomposable(trt, attentions)
    config = _configure(trt, builder, options)
    start = time.perf_counter()
    with DeferredInterrupt() as interrupt, native_stderr() as native:
        monitor = interrupt.progress_monitor(trt)
        config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise _builder_failure(trt, graph, onnx_path, network, attentions, options, log, native)
    for line in native:
        logger.warning("%s: %s", trt.__name__, line)
    _save_timing_cache(config, options)
    layers = _engine_layers(log.layer_listing)
    if layers is None and options.target.builds_on_gpu:
        layers = _inspector_layers(trt, serialized, log)
    fused = [name for name, _ in layers or [] if _FUSED_ATTENTION_KERNEL.search(name)]
    quantization = quantized_layer_report(graph, onnx_path, log.layer_listing) if quantized else None
    report = {"parse_seconds": round(parse_seconds, 3), "build_seconds": round(seconds, 3),
              "plan_bytes": serialized.nbytes,
              "network_layers": network.num_layers, "attention_layers": len(attentions),
              "decomposable_attention_layers": decomposable,
              "engine_layers": None if layers is None else len(layers),
              "engine_layer_types": None if layers is None else dict(Counter(kind for _, kind in layers)),
              "fused_attention_kernels": fused if layers is not None else None,
              "attention": (_attention_summary(len(attentions), decomposable, fused) if layers is not None
                            else "unknown: the builder log had no layer listing")}
    if quantization is not None:
        report["quantization"] = quantization
    return serialized, report


def _reusable(plan: Path, wanted: EngineSidecar) -> bool:
    """True when ``plan`` exists, its sidecar says it was built exactly as ``wanted`` would be,
    from the same source files (SHA-256), and the plan is the one the sidecar describes."""
    from memrope.artifact import file_sha256

    if not plan.is_file():
        return False
    try:
        have = read_sidecar(sidecar_path(plan))
    except (FileNotFoundError, EngineMismatchError) as exc:
        logger.info("rebuilding %s: %s", plan.name, exc)
        return False
    keys = ("target", "module", "module_version", "compute_capabilities", "default_compute_capabilities",
            "contract_hash", "graph", "dtype", "gpu_name", "source_sha256", "build_flags")
    differing = [k for k in keys if getattr(have, k) != getattr(wanted, k)]
    if differing:
        logger.info("rebuilding %s: %s differ", plan.name, ", ".join(differing))
        return False
    if file_sha256(plan) != have.plan_sha256:
        logger.info("rebuilding %s: it is not the plan its sidecar describes (SHA-256)", plan.name)
        return False
    return True


@dataclass(frozen=True)
class BuiltPlan:
    graph: str
    plan: Path
    sidecar: EngineSidecar
    rebuilt: bool


def build_engines(artifact_dir: str | os.PathLike[str], *, target: str = "server",
                  compute_capabilities: Sequence[str] | str | None = None,
                  timing_cache: str | os.PathLike[str] | None = None, opt_level: int = 3,
                  workspace_gb: float | None = None, force: bool = False,
                  graphs: Sequence[str] | None = None) -> list[BuiltPlan]:
    """Build a plan (with its sidecar) for every graph of an exported artifact, all or nothing.

    Args:
        target: ``rtx`` (TensorRT-RTX, ahead of time, no GPU needed) or ``server`` (TensorRT on this GPU).
        compute_capabilities: rtx only: the GPUs to build for (``["8.9", "12.0"]``); default the
            builder's own targets (8.0, 8.6, 8.9, 12.0 and later).
        timing_cache: server only: tactic timing cache to load and update; default
            ``~/.cache/memrope/trt_timing.cache``.
        opt_level: builder optimization level (0-5).
        workspace_gb: workspace memory pool limit; None leaves the builder's default.
        force: rebuild even when a plan's sidecar says it was built exactly like this.
        graphs: the graphs to build, in this order; default every graph of the contract.

    Returns: one :class:`BuiltPlan` per graph, in build order.

    Raises:
        ValueError: a bad option, or an option the target does not take; server without a GPU.
        FileNotFoundError / ArtifactMismatchError: the artifact is missing or stale.
        ImportError: the target's TensorRT module is not installed (names the extra).
        EngineBuildError: a graph could not be parsed or built (names the layer); nothing written.
        EngineMismatchError: a parsed graph's I/O differs from the artifact's contract.
    """
    from memrope.artifact import load_artifact

    spec = target_of(target)
    caps = parse_compute_capabilities(compute_capabilities)
    if caps and not spec.compute_capabilities:
        raise ValueError(f"--compute-capability is for --target rtx; a {spec.name} plan is built for the GPU "
                         "it is built on")
    if timing_cache is not None and not spec.timing_cache:
        raise ValueError(f"--timing-cache is for --target server; a timing cache makes {spec.title} look for a "
                         "GPU, which ahead-of-time builds must not need")
    if not 0 <= opt_level <= 5:
        raise ValueError(f"--opt-level must be 0..5, got {opt_level}")
    if workspace_gb is not None and workspace_gb <= 0:
        raise ValueError(f"--workspace-gb must be positive, got {workspace_gb}")
    artifact = load_artifact(artifact_dir)
    contract = artifact.contract
    if contract.dtype not in BUILD_DTYPES:
        raise ValueError(f"artifact {artifact.path} is {contract.dtype}; engines are built from "
                         f"{', '.join(BUILD_DTYPES)} exports")
    names = list(contract.graphs) if graphs is None else list(graphs)
    unknown = [g for g in names if g not in contract.graphs]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--graph must name distinct graphs of the artifact ({', '.join(contract.graphs)}), "
                         f"got {shown(names)}")

    trt = spec.require_module()
    gpu_name = None
    if spec.builds_on_gpu:
        gpu = current_gpu()
        if gpu is None:
            raise ValueError(f"--target {spec.name} builds on the GPU it targets, and torch sees no CUDA device "
                             "here; build with --target rtx (ahead of time, no GPU needed) instead")
        gpu_name, built_for = gpu[0], (gpu[1],)
    else:
        built_for = caps or RTX_DEFAULT_COMPUTE_CAPABILITIES
        for cc in caps or ():
            _compute_capability_enum(trt, cc)  # an unknown target fails here, before any build
    cache = None
    if spec.timing_cache:
        cache = Path(timing_cache if timing_cache is not None else DEFAULT_TIMING_CACHE).expanduser()
        cache.parent.mkdir(parents=True, exist_ok=True)
    options = BuildOptions(spec, caps, cache, opt_level,
                           None if workspace_gb is None else int(workspace_gb * 1024 ** 3))

    results: list[BuiltPlan] = []
    with ExitStack() as pending:
        for graph in names:
            plan = plan_path(artifact.path, graph)
            wanted = EngineSidecar(target=spec.name, module=spec.module, module_version=trt.__version__,
                                   compute_capabilities=list(built_for), contract_hash=contract.config_hash,
                                   graph=graph, dtype=contract.dtype, gpu_name=gpu_name,
                                   default_compute_capabilities=spec.compute_capabilities and not caps,
                                   source_sha256=artifact.graph_sources(graph), build_flags=options.flags(),
                                   quantization=contract.quantization)
            if not force and _reusable(plan, wanted):
                logger.info("%s is up to date (%s %s); pass force=True to rebuild", plan, spec.title, trt.__version__)
                results.append(BuiltPlan(graph, plan, read_sidecar(sidecar_path(plan)), rebuilt=False))
                continue
            logger.info("building %s from %s (%s %s, %s, strongly typed %s, opt level %d)", plan.name,
                        artifact.graph_path(graph).name, spec.title, trt.__version__,
                        gpu_name or "compute capabilities " + ", ".join(built_for), contract.dtype, opt_level)
            # graph_path waits until the graph's files match the pins recorded as its sources.
            serialized, report = _build_graph(trt, graph, artifact.graph_path(graph), contract.graphs[graph], options,
                                              quantized=contract.quantization is not None)
            sidecar = replace(wanted, report=report, plan_sha256=plan_sha256(memoryview(serialized)))
            # Entered sidecar first, so on success the plan is moved into place before its sidecar.
            sidecar_tmp = pending.enter_context(atomic_path(sidecar_path(plan)))
            plan_tmp = pending.enter_context(atomic_path(plan))
            with open(plan_tmp, "wb") as handle:
                handle.write(memoryview(serialized))
            del serialized
            sidecar_tmp.write_text(sidecar_json(sidecar))
            logger.info("built %s (%.1f MB in %.1f s; attention: %s)", plan.name, report["plan_bytes"] / 1e6,
                        report["build_seconds"], report["attention"])
            results.append(BuiltPlan(graph, plan, sidecar, rebuilt=True))
        # Every graph built. Retire the old sidecars before any plan moves: an interrupted commit
        # then leaves a plan without a sidecar (refused, with the rebuild command), never a new
        # plan described by an old sidecar.
        for result in results:
            if result.rebuilt:
                sidecar_path(result.plan).unlink(missing_ok=True)
    return results


__all__ = ["BUILD_DTYPES", "DEFAULT_TIMING_CACHE", "TARGETS", "BuildOptions", "BuiltPlan", "DeferredInterrupt",
           "EngineBuildError", "Target", "build_engines", "collecting_logger", "current_gpu", "engine_io",
           "io_differences", "layer_records", "module_version", "native_stderr", "network_io",
           "parse_compute_capabilities", "quantized_layer_report", "require_tensorrt", "strongly_typed", "target_of"]
