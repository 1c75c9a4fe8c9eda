"""ONNX Runtime backend: an artifact's step, text and recache graphs behind the loop's interface.

Owns: the inference sessions (opened by path) and how tensors cross into them: IO binding
by pointer, on the CPU and on CUDA alike. The loop's fixed buffers are bound as inputs once per
stream (:class:`memrope.backend.Feeds`), and the outputs are preallocated torch tensors the
backend owns, bound once and shared by every stream; a call is one ``run_with_iobinding`` with
no per-call Python work that grows with the layer count and no allocation. The recache graph
(a prompt switch) writes its outputs straight into the loop's cache: its outputs are bound to
the views the loop passes, once per stream; so is the text graph when a stream changes its
prompt (``encode_text_into``: its outputs are the stream's cross-attention buffers). On CUDA
(``onnxruntime-gpu``) bf16 is bound by ONNX element type 16, ``enable_cuda_graph`` replays the
whole call (one captured graph per stream, by ``gpu_graph_id``), and the TensorRT execution
provider is an option. The loop's cache stays the only copy of the cache.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch

from memrope.artifact import Artifact, load_artifact
from memrope.backend import Backend, Feeds, StreamBindings
from memrope.contract import GraphContract

logger = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
# ONNX TensorProto element types, for binding torch buffers by pointer.
ELEMENT_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7, torch.bool: 9}


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("the onnxruntime backend needs ONNX Runtime: pip install -e '.[onnx]' "
                          "(onnxruntime-gpu on Linux x86_64, the CPU build elsewhere)") from exc
    return onnxruntime


def resolve_provider(provider: str, dtype: str, artifact_path, allowed: tuple[str, ...] = PROVIDERS) -> str:
    """The execution provider a session will use: ``auto`` is CUDA where onnxruntime-gpu and a GPU
    are present, else the CPU. Refuses, in one line and before any session opens, what cannot run
    here: CUDA or TensorRT without onnxruntime-gpu and a GPU, and a bf16/fp16 artifact (``dtype``)
    on the CPU, whose provider has no such kernels."""
    ort = require_onnxruntime()
    if provider not in allowed:
        raise ValueError(f"provider must be one of {allowed}, got {provider!r}")
    available = ort.get_available_providers()
    gpu = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    if provider == "auto":
        provider = "cuda" if gpu else "cpu"
    if provider in ("cuda", "tensorrt") and not gpu:
        raise ValueError(f"provider {provider!r} needs onnxruntime-gpu and a CUDA GPU "
                         f"(available providers: {available}); on Linux x86_64 pip install -e '.[onnx]' "
                         "installs onnxruntime-gpu")
    if provider == "cpu" and dtype != "float32":
        raise ValueError(f"artifact {artifact_path} is {dtype}; ONNX Runtime's CPU execution provider has no "
                         "bf16/fp16 kernels: export float32 for CPU")
    return provider


def _bind(bind, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor to be bound by pointer")
    bind(name, tensor.device.type, tensor.device.index or 0, ELEMENT_TYPES[tensor.dtype], tuple(tensor.shape),
         tensor.data_ptr())


def _check_spec(kind: str, spec, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.torch_dtype:
        raise ValueError(f"{kind} {spec.name} is {tensor.dtype} {list(tensor.shape)}; the graph has "
                         f"{spec.dtype} {list(spec.shape)}")


class _Graph:
    """One session, its outputs, and an IO binding per stream of inputs.

    With ``own_outputs`` the outputs are preallocated here and shared by every stream; without,
    each stream passes its own destinations with its feeds (``run(feeds, outputs)``) and they
    are bound directly (a non-contiguous destination gets a buffer of its own and a copy).
    """

    def __init__(self, session, contract: GraphContract, device: torch.device, ort, graph_ids: bool,
                 own_outputs: bool = True):
        self.session, self.contract, self.ort, self.device = session, contract, ort, device
        self.outputs = {spec.name: spec.zeros(device) for spec in contract.outputs} if own_outputs else None
        self.bindings = StreamBindings(self._bind_stream)
        self.graph_ids = graph_ids
        self._destinations: dict[str, torch.Tensor] | None = None

    def _bind_stream(self, feeds: dict[str, torch.Tensor], index: int):
        binding = self.session.io_binding()
        for spec in self.contract.inputs:
            tensor = feeds[spec.name]
            _check_spec("input", spec, tensor)
            _bind(binding.bind_input, spec.name, tensor)
        copies = []
        destinations = self._destinations
        for spec in self.contract.outputs:
            if destinations is None:
                tensor = self.outputs[spec.name]
            else:
                tensor = destinations[spec.name]
                _check_spec("output", spec, tensor)
                if not tensor.is_contiguous():
                    tensor = spec.zeros(self.device)
                    copies.append((tensor, spec.name))
            _bind(binding.bind_output, spec.name, tensor)
        options = None
        if self.graph_ids:
            # One captured CUDA graph per stream: graph 0 is ORT's default.
            options = self.ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(index))
        # Weakly: a binding must not keep a finished stream's cache alive (its views would).
        bound = None if destinations is None else weakref.ref(destinations)
        return binding, options, copies, bound

    def run(self, feeds: dict[str, torch.Tensor],
            outputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if (outputs is None) != (self.outputs is not None):
            raise ValueError(f"the {self.contract.graph} graph takes its outputs "
                             f"{'from the caller' if self.outputs is None else 'from the backend'}")
        self._destinations = outputs
        binding, options, copies, bound = self.bindings.get(feeds)
        if (None if bound is None else bound()) is not outputs:
            raise ValueError(f"the {self.contract.graph} graph was bound for this stream with other output "
                             "tensors; a stream passes the same outputs every time")
        self.session.run_with_iobinding(binding, options)
        for staged, name in copies:
            outputs[name].copy_(staged)
        return self.outputs if outputs is None else outputs


class OnnxRuntimeBackend(Backend):
    """Runs an artifact's graphs with ONNX Runtime.

    Args:
        artifact: an artifact directory (or a loaded :class:`Artifact`).
        provider: ``cpu``, ``cuda``, ``tensorrt`` (TensorRT EP with CUDA fallback) or ``auto``
            (CUDA when ``onnxruntime-gpu`` and a GPU are present, else CPU).
        cuda_graph: replay the step with ``enable_cuda_graph`` (CUDA provider only).
        threads: intra-op threads (CPU).
        spinning: let idle intra-op threads spin (ONNX Runtime's default, ``None``). Turn it off when
            another stage (an overlapped VAE decode) shares the CPU cores with this session.
        recache: open the recache graph (prompt switches with a re-cache); False saves its
            weights' memory when no stream will re-cache.
    """

    name = "onnxruntime"

    def __init__(self, artifact: Artifact | str | Path, provider: str = "auto", cuda_graph: bool = True,
                 threads: int | None = None, recache: bool = True, spinning: bool | None = None):
        ort = require_onnxruntime()
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        contract = self.artifact.contract
        provider = resolve_provider(provider, contract.dtype, self.artifact.path)
        self.provider = provider
        self.model = self.artifact.model
        self.layout = self.artifact.layout()
        self.dtype = contract.step.input("latents").torch_dtype
        self.device = torch.device("cuda" if provider != "cpu" else "cpu")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if spinning is False:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        quantization = contract.quantization or {}
        if quantization.get("activations") == "int8":
            # ONNX Runtime 1.31's CPU Q/DQ fusions reject signed-int8 activation Q/DQ feeding a
            # reshaped MatMul ("output_dtype INT8 does not match y_zero_point type UINT8"): run
            # the graph as written (dequantize, then multiply in float).
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        step_providers = self._providers(provider, cuda_graph)
        text_providers = self._providers(provider, cuda_graph=False)
        self.step_session = ort.InferenceSession(str(self.artifact.step_path), options, providers=step_providers)
        self.text_session = ort.InferenceSession(str(self.artifact.text_path), options, providers=text_providers)
        graph_ids = self.device.type == "cuda" and cuda_graph
        self._step = _Graph(self.step_session, contract.step, self.device, ort, graph_ids)
        self._text = _Graph(self.text_session, contract.text, self.device, ort, graph_ids=False)
        self._text_input = Feeds({contract.text.inputs[0].name: contract.text.inputs[0].zeros(self.device)})
        # The same session, bound per stream to the stream's prompt and cross-attention buffers.
        self._text_into = _Graph(self.text_session, contract.text, self.device, ort, graph_ids=False,
                                 own_outputs=False)
        self._recache = None
        self.recache_session = None
        if recache:
            self.recache_session = ort.InferenceSession(str(self.artifact.graph_path("recache")), options,
                                                        providers=text_providers)
            self._recache = _Graph(self.recache_session, contract.recache, self.device, ort, graph_ids=False,
                                   own_outputs=False)
        self.can_recache = recache

    def _providers(self, provider: str, cuda_graph: bool) -> list:
        if provider == "cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": torch.cuda.current_device(),
                                          "enable_cuda_graph": "1" if cuda_graph else "0"})
        if provider == "tensorrt":
            cache = str(self.artifact.path / "ort_trt_cache")
            trt = ("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                                 "trt_timing_cache_enable": True})
            return [trt, cuda, "CPUExecutionProvider"]
        return [cuda, "CPUExecutionProvider"]

    def encode_text(self, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.artifact.contract.text.inputs[0]
        if tuple(prompt_embeds.shape) != spec.shape:
            raise ValueError(f"prompt_embeds {list(prompt_embeds.shape)} do not match the artifact's "
                             f"{list(spec.shape)}")
        self._text_input[spec.name].copy_(prompt_embeds)
        return self._text.run(self._text_input)

    def encode_text_into(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        self._text_into.run(feeds, outputs)

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._step.run(feeds)

    def recache(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        if self._recache is None:
            raise ValueError("this backend was opened with recache=False")
        self._recache.run(feeds, outputs)

    def close(self) -> None:
        self._step = self._text = self._text_into = self._recache = None
        self.step_session = self.text_session = self.recache_session = None
