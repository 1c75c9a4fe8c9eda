"""The generation loop: blocks of frames, a few denoising steps each, then the context pass.

Owns: the lean per-block loop (spec section 3.2) over a step function with explicit cache
I/O, and the buffers it drives (one :class:`KVCache`, one :class:`CacheControls`, fixed
timestep tensors). Per block the host does integer bookkeeping (:class:`CachePolicy`), one
tail roll once the window is full, and buffer writes of what the calls returned. Does not
own the model math (``memrope.model``) or where noise comes from (``memrope.sampler``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from memrope.cache import MEMORY_NONE, BlockPlan, CacheControls, CacheLayout, CachePolicy, KVCache
from memrope.config import RunConfig, WanConfig, frame_tokens
from memrope.model import MemRoPEStep, StepOutputs, WanCausalDiT
from memrope.sampler import NoiseSource, Schedule, add_noise, build_schedule

logger = logging.getLogger(__name__)


@dataclass
class CallRecord:
    """One model call as seen by the loop (for tests and tracing).

    call: 0..num_steps-1 are the denoising steps, num_steps is the context pass.
    """

    block: int
    call: int
    plan: BlockPlan
    latents: torch.Tensor
    timestep: torch.Tensor
    outputs: StepOutputs


def cache_layout_for(model: WanConfig, run: RunConfig) -> CacheLayout:
    return CacheLayout.build(run.cache, frame_tokens(model, run.latent_height, run.latent_width),
                             run.num_output_frames)


class StepBackend(Protocol):
    """What the loop drives: one DiT call with explicit cache I/O, and the per-prompt text pass.

    ``step`` has the signature of :meth:`memrope.model.MemRoPEStep.forward` and returns
    :class:`StepOutputs`; ``encode_text`` maps ``prompt_embeds [B, L, text_dim]`` to per-layer
    cross-attention keys and values. Tensors in and out live on ``device``.
    """

    name: str
    model: WanConfig
    layout: CacheLayout
    dtype: torch.dtype
    device: torch.device

    def encode_text(self, prompt_embeds: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    def step(self, latents: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor,
             past_keys: list[torch.Tensor],
             past_values: list[torch.Tensor], cross_keys: list[torch.Tensor], cross_values: list[torch.Tensor],
             controls: CacheControls, memory_keys: list[torch.Tensor] | None,
             memory_values: list[torch.Tensor] | None) -> StepOutputs: ...


class EagerBackend:
    """The PyTorch core, called directly."""

    name = "eager"

    def __init__(self, dit: WanCausalDiT, run: RunConfig):
        self.dit = dit
        self.model = dit.config
        self.layout = cache_layout_for(dit.config, run)
        self.device = dit.head.head.weight.device
        self.dtype = dit.dtype
        self.module = MemRoPEStep(dit, self.layout, run.latent_height, run.latent_width).to(self.device)

    def encode_text(self, prompt_embeds: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.dit.encode_text(prompt_embeds.to(self.device))

    def step(self, *args) -> StepOutputs:
        return self.module(*args)


class MemRoPEPipeline:
    """Generates latent frames block by block with a fixed-size cache.

    Args:
        backend: a :class:`StepBackend`, or a :class:`WanCausalDiT` (run eagerly).
        run: the run configuration (cache policy, sampler, latent size, frames).
    """

    def __init__(self, backend: StepBackend | WanCausalDiT, run: RunConfig):
        if isinstance(backend, WanCausalDiT):
            backend = EagerBackend(backend, run)
        expected = cache_layout_for(backend.model, run)
        if backend.layout != expected:
            raise ValueError(f"backend {backend.name} was built for cache layout {backend.layout.describe()}, "
                             f"the run needs {expected.describe()}")
        self.backend = backend
        self.run = run
        self.layout = expected
        self.schedule: Schedule = build_schedule(run.sampler)
        self.device, self.dtype = backend.device, backend.dtype

    def latent_frame_shape(self) -> tuple[int, int, int]:
        r = self.run
        return r.latent_channels, r.latent_height, r.latent_width

    @torch.no_grad()
    def blocks(
        self,
        prompt_embeds: torch.Tensor,
        noise: NoiseSource,
        num_blocks: int,
        on_call: Callable[[CallRecord], None] | None = None,
    ) -> Iterator[tuple[int, torch.Tensor, KVCache, BlockPlan]]:
        """Yield ``(block_index, x0 [B, F, C, H, W], cache, plan)`` after each block.

        The cache is yielded after the block's context pass (for inspection; do not keep
        references across blocks, it is overwritten in place).
        """
        cfg, lay, sched = self.backend.model, self.layout, self.schedule
        batch = prompt_embeds.shape[0]
        if batch != self.run.batch_size:
            raise ValueError(f"prompt_embeds batch {batch} does not match num_samples {self.run.batch_size}")
        cross_k, cross_v = self.backend.encode_text(prompt_embeds.to(self.device))
        cache = KVCache(lay, cfg.num_layers, batch, cfg.num_heads, cfg.head_dim, self.dtype, self.device)
        layer_k, layer_v = list(cache.keys.unbind(0)), list(cache.values.unbind(0))
        mem_k = list(cache.memory_keys.unbind(0)) if cache.memory_keys is not None else None
        mem_v = list(cache.memory_values.unbind(0)) if cache.memory_values is not None else None
        policy = CachePolicy(lay)
        controls = CacheControls.allocate(lay, self.device)
        frames = lay.block_frames

        def timestep(t: float) -> torch.Tensor:
            return torch.full((batch, frames), t, dtype=torch.float32, device=self.device)

        def sigma(s: float) -> torch.Tensor:
            return torch.full((1,), s, dtype=torch.float32, device=self.device)

        step_t = [timestep(t) for t in sched.step_timesteps]
        step_sigma = [sigma(s) for s in sched.step_sigmas]
        context_t, context_sigma = timestep(sched.context_timestep), sigma(sched.context_sigma)
        expected = (batch, frames, *self.latent_frame_shape())

        def call(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> StepOutputs:
            return self.backend.step(x, t, s, layer_k, layer_v, cross_k, cross_v, controls, mem_k, mem_v)

        for b in range(num_blocks):
            plan = policy.next_block()
            if plan.roll:
                cache.roll()
            x = noise.block_noise(b).to(self.device, self.dtype)
            if tuple(x.shape) != expected:
                raise ValueError(f"noise for block {b} has shape {list(x.shape)}, expected {list(expected)}")
            controls.set(lay, plan, first_call=True)
            for i in range(sched.num_steps):
                out = call(x, step_t[i], step_sigma[i])
                if i == 0:
                    if plan.memory_step != MEMORY_NONE:
                        cache.write_memory(out.memory_keys, out.memory_values)
                    controls.set(lay, plan, first_call=False)
                x0 = out.x0
                if on_call is not None:
                    on_call(CallRecord(b, i, plan, x, step_t[i], out))
                if i < sched.num_steps - 1:
                    eps = noise.renoise(b, i).to(self.device, self.dtype)
                    x = add_noise(x0, eps, sched.step_sigmas[i + 1])
            # Context pass: the clean prediction at the context timestep writes the cache.
            out = call(x0, context_t, context_sigma)
            if on_call is not None:
                on_call(CallRecord(b, sched.num_steps, plan, x0, context_t, out))
            cache.write_block(plan.write_frame, out.block_keys, out.block_values)
            yield b, x0, cache, plan

    def generate(self, prompt_embeds: torch.Tensor, noise: NoiseSource, num_frames: int | None = None,
                 on_call: Callable[[CallRecord], None] | None = None) -> torch.Tensor:
        """All frames at once: ``[B, num_frames, C, H, W]`` in the model dtype."""
        num_frames = self.run.num_output_frames if num_frames is None else num_frames
        if num_frames % self.layout.block_frames:
            raise ValueError(f"num_frames ({num_frames}) must be a multiple of the block size "
                             f"({self.layout.block_frames})")
        out = [x0 for _, x0, _, _ in self.blocks(prompt_embeds, noise, num_frames // self.layout.block_frames,
                                                 on_call)]
        return torch.cat(out, dim=1)
