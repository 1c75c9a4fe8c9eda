"""ONNX Runtime VAE backend: an artifact's ``vae_decode.onnx`` behind :class:`VAEBackend`.

Owns: the inference session and its IO bindings. Each (feeds, outputs) pair of the caller's
fixed buffers is bound by pointer once, on the CPU or the CUDA execution provider alike, so a
call copies nothing: ONNX Runtime reads the caches where the caller keeps them and writes the
frames and the new caches straight into the caller's buffers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from memrope.artifact import Artifact, load_artifact
from memrope.backend import VAEBackend
from memrope.engine.onnxruntime_backend import ELEMENT_TYPES, require_onnxruntime, resolve_provider

logger = logging.getLogger(__name__)

GRAPH = "vae_decode"
VAE_PROVIDERS = ("auto", "cpu", "cuda")
_ELEMENT_TYPES = {**ELEMENT_TYPES, torch.uint8: 2}
_MAX_BINDINGS = 4  # a stream alternates two; more means the caller keeps making new dicts


def require_vae_graph(artifact: Artifact) -> None:
    if GRAPH not in artifact.contract.graphs:
        raise ValueError(f"artifact {artifact.path} has no {GRAPH} graph: export it with a VAE "
                         "(`memrope export ... --model-dir WAN_DIR`), or use --vae-backend eager")


class OnnxRuntimeVAEBackend(VAEBackend):
    """Runs ``vae_decode.onnx`` with ONNX Runtime.

    Args:
        artifact: an artifact directory (or :class:`Artifact`) exported with a VAE.
        provider: ``cpu``, ``cuda`` or ``auto`` (CUDA with onnxruntime-gpu and a GPU, else CPU).
        threads: intra-op threads (CPU); ``None`` lets ONNX Runtime decide.
        spinning: let idle intra-op threads spin (ONNX Runtime's default). Off by default on the
            CPU: the decode shares the cores with the DiT, and spinning threads of an idle session
            steal them (docs/bench_frame_path_cpu.md).
    """

    name = "onnxruntime"

    def __init__(self, artifact: Artifact | str | Path, provider: str = "auto", threads: int | None = None,
                 spinning: bool | None = None):
        ort = require_onnxruntime()
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        require_vae_graph(self.artifact)
        self.contract = self.artifact.contract.graphs[GRAPH]
        self.config = self.artifact.contract.vae
        provider = resolve_provider(provider, self.artifact.contract.dtype, self.artifact.path, VAE_PROVIDERS)
        self.provider = provider
        self.device = torch.device("cuda", torch.cuda.current_device()) if provider == "cuda" else torch.device("cpu")
        self.dtype = self.contract.input("latents").torch_dtype
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not (spinning if spinning is not None else provider != "cpu"):
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = (["CPUExecutionProvider"] if provider == "cpu" else
                     [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(self.artifact.graph_path(GRAPH)), options, providers=providers)
        self._bindings: dict[tuple[int, int], tuple] = {}

    def _check(self, name: str, spec, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.torch_dtype:
            raise ValueError(f"{name} is {tensor.dtype} {list(tensor.shape)}; {GRAPH} takes {spec.dtype} "
                             f"{list(spec.shape)}")
        if tensor.device != self.device or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor on {self.device}, got {tensor.device}")

    def _bind(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]):
        binding = self.session.io_binding()
        device = "cuda" if self.device.type == "cuda" else "cpu"
        for specs, named, bind in ((self.contract.inputs, feeds, binding.bind_input),
                                   (self.contract.outputs, outputs, binding.bind_output)):
            for spec in specs:
                if spec.name not in named:
                    raise ValueError(f"{GRAPH} call is missing {spec.name}")
                tensor = named[spec.name]
                self._check(spec.name, spec, tensor)
                bind(spec.name, device, self.device.index or 0, _ELEMENT_TYPES[tensor.dtype], tuple(tensor.shape),
                     tensor.data_ptr())
        if len(self._bindings) >= _MAX_BINDINGS:
            self._bindings.clear()
        # The dicts are kept alive with their binding so their ids cannot be reused.
        entry = (binding, feeds, outputs)
        self._bindings[(id(feeds), id(outputs))] = entry
        return entry

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        entry = self._bindings.get((id(feeds), id(outputs)))
        if entry is None:
            entry = self._bind(feeds, outputs)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(entry[0])

    def forget(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        self._bindings.pop((id(feeds), id(outputs)), None)

    def close(self) -> None:
        self._bindings.clear()
        self.session = None
