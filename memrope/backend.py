"""The backend interfaces: one DiT call with explicit cache I/O, and one streaming VAE decode
step with explicit feature-cache I/O, by name.

Owns: :class:`Backend`, the only thing the block loop (``memrope.pipeline``) drives;
:class:`VAEBackend`, the only thing the runtime's frame path drives;
:class:`StepModuleBackend`, the interface over this package's own :class:`MemRoPEStep` in this
process (what the eager backend and the export's validation run); and :func:`cross_named`, the
contract names of per-layer cross-attention keys/values. The runtimes (eager PyTorch,
``torch.compile``, ONNX Runtime, TensorRT) live in ``engine/``, one module each.
"""

from __future__ import annotations

import torch

from memrope.cache import CacheLayout
from memrope.config import WanConfig
from memrope.contract import GraphContract, cross_key, cross_value, named_step_outputs, step_arguments
from memrope.model import MemRoPEStep
from memrope.vae import VAEDecoderConfig


class Backend:
    """One DiT call with explicit cache I/O, by name: the only thing the loop drives.

    A backend maps the contract's named inputs (:func:`memrope.contract.step_contract`) to its
    named outputs. The loop owns the input buffers and keeps their addresses fixed for the whole
    run (cache views, controls, a latent buffer), so a backend may bind them once (ONNX Runtime
    IO binding, TensorRT tensor addresses, CUDA graphs). Returned outputs stay valid until the
    next call. Backends are context managers; ``close`` releases sessions, engines and buffers.

    Attributes: ``name``; ``model`` (WanConfig); ``layout`` (CacheLayout); ``dtype`` and
    ``device`` of the tensors it takes and returns.
    """

    name = "backend"
    model: WanConfig
    layout: CacheLayout
    dtype: torch.dtype
    device: torch.device

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release what the backend holds (sessions, engines, device buffers)."""

    def encode_text(self, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """``prompt_embeds [B, text_len, text_dim]`` (zero-padded) -> ``cross_key_values.*``."""
        raise NotImplementedError

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One call: every input of the step contract by name -> every output by name."""
        raise NotImplementedError


class VAEBackend:
    """One streaming VAE decode step (the ``vae_decode`` contract), by name.

    ``run(feeds, outputs)`` reads every contract input from ``feeds`` (``latents``,
    ``first_frame``, ``feat_cache.*``) and writes every output into the caller's tensors in
    ``outputs`` (``frames``, ``pixels``, ``present_feat_cache.*``). Both dicts hold fixed-address
    buffers owned by the caller, who alternates two (feeds, outputs) pairs with the cache
    buffers swapped, so no cache is ever copied. A backend may bind each pair once, keyed by
    the identity of the two dicts; a dict whose tensors moved must be a new dict. Work is
    enqueued on the current CUDA stream (GPU) and may still be running when ``run`` returns.

    Attributes: ``name``; ``contract`` (GraphContract); ``config`` (VAEDecoderConfig);
    ``device``; ``dtype`` of the latents and caches.
    """

    name = "vae-backend"
    contract: GraphContract
    config: VAEDecoderConfig
    device: torch.device
    dtype: torch.dtype

    def __enter__(self) -> VAEBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release what the backend holds (sessions, engines)."""

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


def cross_named(keys: list[torch.Tensor], values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer cross-attention keys and values -> the contract's ``cross_key_values.*`` names."""
    named = {cross_key(i): k for i, k in enumerate(keys)}
    named.update({cross_value(i): v for i, v in enumerate(values)})
    return named


class StepModuleBackend(Backend):
    """The interface over a :class:`MemRoPEStep` module run in this process (no export).

    Args:
        step: the step module, bound to a DiT, a cache layout and a latent grid.
    """

    name = "step-module"

    def __init__(self, step: MemRoPEStep):
        self.module = step
        self.dit = step.dit
        self.model = step.config
        self.layout = step.layout
        self.device = self.dit.head.head.weight.device
        self.dtype = self.dit.dtype

    def encode_text(self, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        keys, values = self.dit.encode_text(prompt_embeds.to(self.device))
        return cross_named(keys, values)

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = step_arguments(feeds, self.model.num_layers, self.layout.has_memory)
        return named_step_outputs(self.module(*args))
