"""The generation loop: blocks of frames, a few denoising steps each, then the context pass.

Owns: the lean per-block loop (spec section 3.2) over a :class:`memrope.backend.Backend`
(named tensors in and out, as the IO contract names them), and the buffers the loop owns (one :class:`KVCache`, one :class:`CacheControls`, fixed latent/timestep/sigma
buffers, all at fixed addresses for the whole run). Per block the host does integer bookkeeping (:class:`CachePolicy`), one
tail roll once the window is full, and buffer writes of what the calls returned. Does not
own the model math (``memrope.model``) or where noise comes from (``memrope.sampler``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from memrope.backend import Backend
from memrope.cache import (
    MEMORY_NONE,
    BlockPlan,
    CacheControls,
    CacheLayout,
    CachePolicy,
    KVCache,
)
from memrope.config import RunConfig
from memrope.contract import (
    DTYPE_NAMES,
    memory_key,
    memory_value,
    past_key,
    past_value,
    present_key,
    present_memory_key,
    present_memory_value,
    present_value,
    step_contract,
    step_outputs_from_named,
)
from memrope.model import StepOutputs
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


class MemRoPEPipeline:
    """Generates latent frames block by block with a fixed-size cache.

    Args:
        backend: a :class:`memrope.backend.Backend` (``engine/`` has one per runtime).
        run: the run configuration (cache policy, sampler, latent size, frames).
    """

    def __init__(self, backend: Backend, run: RunConfig):
        expected = CacheLayout.for_run(backend.model, run)
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
        cfg, lay, sched, backend = self.backend.model, self.layout, self.schedule, self.backend
        batch = prompt_embeds.shape[0]
        if batch != self.run.batch_size:
            raise ValueError(f"prompt_embeds batch {batch} does not match num_samples {self.run.batch_size}")
        if prompt_embeds.shape[1] > cfg.text_len:
            raise ValueError(f"prompt_embeds has {prompt_embeds.shape[1]} tokens; the model takes at most "
                             f"text_len={cfg.text_len}")
        contract = step_contract(cfg, self.run, lay, DTYPE_NAMES[self.dtype], batch)

        # Buffers, allocated once; their addresses never change during the run.
        cache = KVCache(lay, cfg.num_layers, batch, cfg.num_heads, cfg.head_dim, self.dtype, self.device)
        controls = CacheControls.allocate(lay, self.device)
        feeds: dict[str, torch.Tensor] = {}
        padded = torch.zeros(batch, cfg.text_len, cfg.text_dim, dtype=self.dtype, device=self.device)
        padded[:, :prompt_embeds.shape[1]] = prompt_embeds
        cross = backend.encode_text(padded)
        named_controls = controls.as_dict()
        for i in range(cfg.num_layers):
            feeds[past_key(i)], feeds[past_value(i)] = cache.keys[i], cache.values[i]
            if lay.has_memory:
                feeds[memory_key(i)], feeds[memory_value(i)] = cache.memory_keys[i], cache.memory_values[i]
        for spec in contract.inputs:
            if spec.name in named_controls:
                feeds[spec.name] = named_controls[spec.name]
            elif spec.name in cross:
                feeds[spec.name] = spec.zeros(self.device).copy_(cross[spec.name])
            elif spec.name not in feeds:
                feeds[spec.name] = spec.zeros(self.device)
        del cross
        latents_buf, timestep_buf, sigma_buf = feeds["latents"], feeds["timestep"], feeds["sigma"]

        frames = lay.block_frames

        def constant(shape: tuple[int, ...], value: float) -> torch.Tensor:
            return torch.full(shape, value, dtype=torch.float32, device=self.device)

        step_t = [constant((batch, frames), t) for t in sched.step_timesteps]
        step_sigma = [constant((1,), s) for s in sched.step_sigmas]
        context_t = constant((batch, frames), sched.context_timestep)
        context_sigma = constant((1,), sched.context_sigma)
        expected = (batch, frames, *self.latent_frame_shape())

        def call(block: int, index: int, plan: BlockPlan, x: torch.Tensor, t: torch.Tensor,
                 s: torch.Tensor) -> dict[str, torch.Tensor]:
            latents_buf.copy_(x)
            timestep_buf.copy_(t)
            sigma_buf.copy_(s)
            out = backend.step(feeds)
            if on_call is not None:
                snapshot = {k: v.clone() for k, v in out.items()}
                on_call(CallRecord(block, index, plan, latents_buf.clone(), t,
                                   step_outputs_from_named(snapshot, cfg.num_layers)))
            return out

        memory_names = [(present_memory_key(i), present_memory_value(i)) for i in range(cfg.num_layers)]
        block_names = [(present_key(i), present_value(i)) for i in range(cfg.num_layers)]
        policy = CachePolicy(lay)
        for b in range(num_blocks):
            plan = policy.next_block()
            if plan.roll:
                cache.roll()
            x = noise.block_noise(b).to(self.device, self.dtype)
            if tuple(x.shape) != expected:
                raise ValueError(f"noise for block {b} has shape {list(x.shape)}, expected {list(expected)}")
            controls.set(lay, plan, first_call=True)
            for i in range(sched.num_steps):
                out = call(b, i, plan, x, step_t[i], step_sigma[i])
                if i == 0:
                    if plan.memory_step != MEMORY_NONE:
                        cache.write_memory([out[k] for k, _ in memory_names], [out[v] for _, v in memory_names])
                    controls.set(lay, plan, first_call=False)
                if i < sched.num_steps - 1:
                    eps = noise.renoise(b, i).to(self.device, self.dtype)
                    x = add_noise(out["x0"], eps, step_sigma[i + 1])
                else:
                    x0 = out["x0"].clone()
            # Context pass: the clean prediction at the context timestep writes the cache.
            out = call(b, sched.num_steps, plan, x0, context_t, context_sigma)
            cache.write_block(plan.write_frame, [out[k] for k, _ in block_names], [out[v] for _, v in block_names])
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
