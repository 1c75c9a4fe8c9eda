"""Flat-tensor wrappers of the PyTorch core, in the contract's positional order.

Owns: :class:`StepGraph` (one ``MemRoPEStep`` call) and :class:`TextGraph` (the per-prompt
cross-attention keys/values), both taking and returning plain tensors named by the contract.
They are what gets exported, and what the export validation runs eagerly. No math lives here.
"""

from __future__ import annotations

import torch
from torch import nn

from memrope.cache import CacheControls
from memrope.model import MemRoPEStep, StepOutputs, WanCausalDiT


def unpack_step_outputs(outputs: tuple[torch.Tensor, ...], num_layers: int) -> StepOutputs:
    """The step graph's outputs, in contract order, back into :class:`StepOutputs`."""
    n = num_layers
    return StepOutputs(outputs[0], outputs[1], list(outputs[2:2 + n]), list(outputs[2 + n:2 + 2 * n]),
                       list(outputs[2 + 2 * n:2 + 3 * n]), list(outputs[2 + 3 * n:2 + 4 * n]))


def pack_step_inputs(latents: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor, past_keys,
                     past_values, cross_keys, cross_values, controls: CacheControls, memory_keys,
                     memory_values) -> tuple[torch.Tensor, ...]:
    """The step's arguments flattened in contract order (see ``export.contract``)."""
    flat = [latents, timestep, sigma, *past_keys, *past_values, *cross_keys, *cross_values,
            *controls.as_dict().values()]
    if memory_keys is not None:
        flat += [*memory_keys, *memory_values]
    return tuple(flat)


class StepGraph(nn.Module):
    """``MemRoPEStep`` with positional tensors in and out, as the contract orders them."""

    def __init__(self, step: MemRoPEStep):
        super().__init__()
        self.step = step
        self.num_layers = step.config.num_layers
        self.has_memory = step.layout.has_memory

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.num_layers
        latents, timestep, sigma = inputs[:3]
        past_k = list(inputs[3:3 + n])
        past_v = list(inputs[3 + n:3 + 2 * n])
        cross_k = list(inputs[3 + 2 * n:3 + 3 * n])
        cross_v = list(inputs[3 + 3 * n:3 + 4 * n])
        controls = CacheControls(*inputs[3 + 4 * n:9 + 4 * n])
        mem_k = mem_v = None
        if self.has_memory:
            mem_k = list(inputs[9 + 4 * n:9 + 5 * n])
            mem_v = list(inputs[9 + 5 * n:9 + 6 * n])
        out = self.step(latents, timestep, sigma, past_k, past_v, cross_k, cross_v, controls, mem_k, mem_v)
        return (out.flow, out.x0, *out.block_keys, *out.block_values, *out.memory_keys, *out.memory_values)


class TextGraph(nn.Module):
    """``prompt_embeds [B, text_len, text_dim]`` -> per-layer cross keys, then values."""

    def __init__(self, dit: WanCausalDiT):
        super().__init__()
        self.dit = dit

    def forward(self, prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keys, values = self.dit.encode_text(prompt_embeds)
        return (*keys, *values)
