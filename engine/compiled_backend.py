"""The PyTorch core under ``torch.compile``: the fair "best PyTorch" baseline next to eager.

Owns only the compilation choice: one static graph (``fullgraph=True, dynamic=False``); on a
GPU ``mode="reduce-overhead"`` adds CUDA graphs (the loop's buffers keep fixed addresses).
The first call compiles (about a minute for the tiny model on a 2-core CPU).
"""

from __future__ import annotations

import torch

from memrope.config import RunConfig
from memrope.engine.eager_backend import EagerBackend
from memrope.model import WanCausalDiT


class CompiledBackend(EagerBackend):
    name = "compiled"

    def __init__(self, dit: WanCausalDiT, run: RunConfig, mode: str | None = None):
        super().__init__(dit, run)
        self.cuda_graphs = mode is None and self.device.type == "cuda"
        if mode is None:
            mode = "reduce-overhead" if self.cuda_graphs else "default"
        self.mode = mode
        self.module = torch.compile(self.module, fullgraph=True, dynamic=False, mode=mode)

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.cuda_graphs:
            # Each call is a new step for CUDA-graph trees: outputs of the last replay are dead.
            torch.compiler.cudagraph_mark_step_begin()
        return super().step(feeds)
