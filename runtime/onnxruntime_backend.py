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

from export.graph import pack_step_inputs, unpack_step_outputs
from memrope.cache import CacheControls
from memrope.model import StepOutputs
from runtime.artifact import Artifact, load_artifact

logger = logging.getLogger(__name__)


def _require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("the onnxruntime backend needs ONNX Runtime: pip install -e '.[onnx]' "
                          "(or '.[gpu]' for onnxruntime-gpu)") from exc
    return onnxruntime


class OnnxRuntimeBackend:
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

    def encode_text(self, prompt_embeds: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        spec = self.artifact.contract.text.inputs[0]
        b, length, dim = prompt_embeds.shape
        if b != spec.shape[0] or dim != spec.shape[2] or length > spec.shape[1]:
            raise ValueError(f"prompt_embeds {list(prompt_embeds.shape)} do not fit the artifact's "
                             f"{list(spec.shape)} (batch, at most text_len tokens, text_dim)")
        padded = torch.zeros(spec.shape, dtype=torch.float32)
        padded[:, :length] = prompt_embeds
        outs = self.text_session.run(None, {spec.name: padded.numpy()})
        n = self.model.num_layers
        tensors = [torch.from_numpy(o) for o in outs]
        return tensors[:n], tensors[n:]

    def step(self, latents: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor, past_keys, past_values,
             cross_keys, cross_values, controls: CacheControls, memory_keys, memory_values) -> StepOutputs:
        flat = pack_step_inputs(latents.float(), timestep, sigma, past_keys, past_values, cross_keys,
                                cross_values, controls, memory_keys, memory_values)
        feeds = {name: t.detach().contiguous().numpy() for name, t in zip(self.step_inputs, flat)}
        outs = self.step_session.run(self.step_outputs, feeds)
        return unpack_step_outputs(tuple(torch.from_numpy(o) for o in outs), self.model.num_layers)
