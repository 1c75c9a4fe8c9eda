"""The eager backend: the PyTorch core (``memrope.model.MemRoPEStep``) called directly.

Owns: binding a :class:`WanCausalDiT` to a run's cache layout and latent grid on the DiT's
device. The reference every other backend is compared against; the call itself is
:class:`memrope.backend.StepModuleBackend`'s.
"""

from __future__ import annotations

from memrope.backend import StepModuleBackend
from memrope.cache import CacheLayout
from memrope.config import RunConfig
from memrope.model import MemRoPEStep, WanCausalDiT


class EagerBackend(StepModuleBackend):
    """The PyTorch core, called directly."""

    name = "eager"

    def __init__(self, dit: WanCausalDiT, run: RunConfig):
        layout = CacheLayout.for_run(dit.config, run)
        device = dit.head.head.weight.device
        super().__init__(MemRoPEStep(dit, layout, run.latent_height, run.latent_width).to(device))
