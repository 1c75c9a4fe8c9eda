"""ONNX Runtime backend: the exported step and text graphs behind the loop's backend interface.

Owns: two inference sessions opened by path, and the mapping between the loop's tensors and
the contract's names. On CPU, inputs are handed over as zero-copy NumPy views of the loop's
torch buffers and outputs come back as zero-copy torch views, so the loop's fixed-address
cache stays the only copy of the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from memrope.pipeline import Backend
from runtime.artifact import Artifact, load_artifact

logger = logging.getLogger(__name__)


def _require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("the onnxruntime backend needs ONNX Runtime: pip install -e '.[onnx]' "
                          "(or '.[gpu]' for onnxruntime-gpu)") from exc
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    """Runs an artifact's graphs with ONNX Runtime (CPU execution provider)."""

    name = "onnxruntime"

    def __init__(self, artifact: Artifact | str | Path, threads: int | None = None):
        ort = _require_onnxruntime()
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        contract = self.artifact.contract
        if contract.dtype != "float32":
            raise ValueError(f"artifact {self.artifact.path} is {contract.dtype}; ONNX Runtime's CPU "
                             "execution provider has no bf16/fp16 kernels: export float32 for CPU")
        self.model = self.artifact.model
        self.layout = self.artifact.layout()
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.step_session = ort.InferenceSession(str(self.artifact.step_path), options, providers=providers)
        self.text_session = ort.InferenceSession(str(self.artifact.text_path), options, providers=providers)
        self.step_inputs = contract.step.input_names
        self.step_outputs = contract.step.output_names

    def encode_text(self, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.artifact.contract.text.inputs[0]
        if tuple(prompt_embeds.shape) != spec.shape:
            raise ValueError(f"prompt_embeds {list(prompt_embeds.shape)} do not match the artifact's "
                             f"{list(spec.shape)}")
        outs = self.text_session.run(None, {spec.name: prompt_embeds.float().contiguous().numpy()})
        names = self.artifact.contract.text.output_names
        return {name: torch.from_numpy(o) for name, o in zip(names, outs)}

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Zero-copy NumPy views of the loop's CPU buffers in, zero-copy torch views out.
        arrays = {name: feeds[name].numpy() for name in self.step_inputs}
        outs = self.step_session.run(self.step_outputs, arrays)
        return {name: torch.from_numpy(o) for name, o in zip(self.step_outputs, outs)}
