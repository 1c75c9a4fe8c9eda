"""Positional-tensor wrappers of the PyTorch core, in the contract's order, for the exporter.

Owns: :class:`StepGraph` (one ``MemRoPEStep`` call), :class:`TextGraph` (the per-prompt
cross-attention keys/values) and :class:`RecacheGraph` (a prompt switch's re-cache of the
cache's tail, ``MemRoPEStep.recache``). The exporter sees positional tensors; names come from the
contract and are attached to the graph's inputs and outputs at export. No math lives here.
"""

from __future__ import annotations

import torch
from torch import nn

from memrope.contract import (
    GraphContract,
    named_recache_outputs,
    named_step_outputs,
    recache_arguments,
    step_arguments,
)
from memrope.model import MemRoPEStep, WanCausalDiT


class StepGraph(nn.Module):
    """``MemRoPEStep`` with positional tensors in and out, as ``contract`` orders them."""

    def __init__(self, step: MemRoPEStep, contract: GraphContract):
        super().__init__()
        self.step = step
        self.input_names = contract.input_names
        self.output_names = contract.output_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = dict(zip(self.input_names, inputs, strict=True))
        args = step_arguments(feeds, self.step.config.num_layers, self.step.layout.has_memory)
        named = named_step_outputs(self.step(*args))
        return tuple(named[name] for name in self.output_names)


class TextGraph(nn.Module):
    """``prompt_embeds [B, text_len, text_dim]`` -> per-layer cross keys, then values."""

    def __init__(self, dit: WanCausalDiT):
        super().__init__()
        self.dit = dit

    def forward(self, prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keys, values = self.dit.encode_text(prompt_embeds)
        return (*keys, *values)


class RecacheGraph(nn.Module):
    """``MemRoPEStep.recache`` with positional tensors in and out, as ``contract`` orders them."""

    def __init__(self, step: MemRoPEStep, contract: GraphContract):
        super().__init__()
        self.step = step
        self.input_names = contract.input_names
        self.output_names = contract.output_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = dict(zip(self.input_names, inputs, strict=True))
        args = recache_arguments(feeds, self.step.config.num_layers, self.step.layout.has_memory)
        named = named_recache_outputs(*self.step.recache(*args))
        return tuple(named[name] for name in self.output_names)
