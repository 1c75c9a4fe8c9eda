"""ONNX Runtime backend: an artifact's step and text graphs behind the loop's interface.

Owns: the two inference sessions (opened by path) and how tensors cross into them.
- CPU execution provider (float32 artifacts): inputs go in as zero-copy NumPy views of the
  loop's torch buffers and outputs come back as zero-copy torch views.
- CUDA execution provider (``onnxruntime-gpu``): IO binding to the loop's fixed device
  buffers by pointer (bf16 bound by ONNX element type 16) and to preallocated output buffers,
  bound once; ``enable_cuda_graph`` replays the whole call; the TensorRT execution provider is
  an option. The loop's cache stays the only copy of the cache either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from memrope.artifact import Artifact, load_artifact
from memrope.backend import Backend
from memrope.contract import GraphContract

logger = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
# ONNX TensorProto element types, for binding torch buffers by pointer.
ELEMENT_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7, torch.bool: 9}


def _require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("the onnxruntime backend needs ONNX Runtime: pip install -e '.[onnx]' "
                          "(or '.[gpu]' for onnxruntime-gpu)") from exc
    return onnxruntime


class _IoBinding:
    """One session's IO binding to fixed torch buffers, rebound only when an address changes."""

    def __init__(self, session, contract: GraphContract, device: torch.device):
        self.session = session
        self.binding = session.io_binding()
        self.contract = contract
        self.device = device
        self.outputs = {spec.name: spec.zeros(device) for spec in contract.outputs}
        for name, tensor in self.outputs.items():
            self._bind(self.binding.bind_output, name, tensor)
        self.bound: dict[str, int] = {}

    def _bind(self, bind, name: str, tensor: torch.Tensor) -> None:
        bind(name, "cuda", self.device.index or 0, ELEMENT_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())

    def run(self, feeds: dict[str, torch.Tensor], run_options=None) -> dict[str, torch.Tensor]:
        for name in self.contract.input_names:
            tensor = feeds[name]
            if self.bound.get(name) != tensor.data_ptr():
                if not tensor.is_contiguous():
                    raise ValueError(f"input {name} must be contiguous to be bound by pointer")
                self._bind(self.binding.bind_input, name, tensor)
                self.bound[name] = tensor.data_ptr()
        self.session.run_with_iobinding(self.binding, run_options)
        return self.outputs


class OnnxRuntimeBackend(Backend):
    """Runs an artifact's graphs with ONNX Runtime.

    Args:
        artifact: an artifact directory (or a loaded :class:`Artifact`).
        provider: ``cpu``, ``cuda``, ``tensorrt`` (TensorRT EP with CUDA fallback) or ``auto``
            (CUDA when ``onnxruntime-gpu`` and a GPU are present, else CPU).
        cuda_graph: replay the step with ``enable_cuda_graph`` (CUDA provider only).
        threads: intra-op threads (CPU).
    """

    name = "onnxruntime"

    def __init__(self, artifact: Artifact | str | Path, provider: str = "auto", cuda_graph: bool = True,
                 threads: int | None = None):
        ort = _require_onnxruntime()
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        contract = self.artifact.contract
        available = ort.get_available_providers()
        gpu = "CUDAExecutionProvider" in available and torch.cuda.is_available()
        if provider == "auto":
            provider = "cuda" if gpu else "cpu"
        if provider in ("cuda", "tensorrt") and not gpu:
            raise ValueError(f"provider {provider!r} needs onnxruntime-gpu and a CUDA GPU "
                             f"(available providers: {available}); pip install -e '.[gpu]'")
        if provider == "cpu" and contract.dtype != "float32":
            raise ValueError(f"artifact {self.artifact.path} is {contract.dtype}; ONNX Runtime's CPU "
                             "execution provider has no bf16/fp16 kernels: export float32 for CPU")
        self.provider = provider
        self.model = self.artifact.model
        self.layout = self.artifact.layout()
        self.dtype = contract.step.input("latents").torch_dtype
        self.device = torch.device("cuda" if provider != "cpu" else "cpu")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        step_providers = self._providers(provider, cuda_graph)
        text_providers = self._providers(provider, cuda_graph=False)
        self.step_session = ort.InferenceSession(str(self.artifact.step_path), options, providers=step_providers)
        self.text_session = ort.InferenceSession(str(self.artifact.text_path), options, providers=text_providers)
        self.step_inputs = contract.step.input_names
        self.step_outputs = contract.step.output_names
        self._step_binding = self._text_binding = None
        if self.device.type == "cuda":
            self._step_binding = _IoBinding(self.step_session, contract.step, self.device)
            self._text_binding = _IoBinding(self.text_session, contract.text, self.device)

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
        embeds = prompt_embeds.to(self.device, spec.torch_dtype).contiguous()
        if self._text_binding is not None:
            return {k: v.clone() for k, v in self._text_binding.run({spec.name: embeds}).items()}
        outs = self.text_session.run(None, {spec.name: embeds.numpy()})
        return {name: torch.from_numpy(o) for name, o in zip(self.artifact.contract.text.output_names, outs)}

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._step_binding is not None:
            return self._step_binding.run(feeds)
        # Zero-copy NumPy views of the loop's CPU buffers in, zero-copy torch views out.
        arrays = {name: feeds[name].numpy() for name in self.step_inputs}
        outs = self.step_session.run(self.step_outputs, arrays)
        return {name: torch.from_numpy(o) for name, o in zip(self.step_outputs, outs)}

    def close(self) -> None:
        self._step_binding = self._text_binding = None
        self.step_session = self.text_session = None
