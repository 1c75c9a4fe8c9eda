"""The MemRoPE self-attention cache: layout, per-block plan, graph-side memory math, buffers.

Owns, in one place:
- :class:`CacheLayout`: where everything lives, in frames and tokens, derived once from the
  config (sink | long memory | short memory | recent | block). Nothing else repeats that sum.
- :class:`CachePolicy`: the host-side state machine. Per block it decides, in plain integers,
  how many context frames are valid, where the block's keys/values are written, the RoPE
  positions, whether the tail rolls and whether the memory is initialised or updated.
- :func:`memory_update`: the EMA memory math that runs *inside* the model call (and so inside
  an exported graph), selected by flag tensors.
- :class:`KVCache`: the fixed-size buffers the loop owns, with small verbs (``reset``,
  ``roll``, ``write_block``, ``write_memory``) and a logical view for comparison with the
  authors' cache.

Physical layout of one layer's buffer ``[B, cache_frames * S, H, D]`` (slot = S tokens),
identical to the authors' cache after every block:

    [ sink | mem_long mem_short | recent | block ]     (ema, ema_adaptive)
    [ sink | recent                      | block ]     (eviction)
    [ frame 0 .. num_output_frames - 1          ]      (global: absolute slots)

A call attends to the first ``context_frames = cache_frames - block_frames`` slots (masked by
validity while the cache fills) plus the block's own keys/values, which the call computes
itself; the last ``block_frames`` slots are not attended. Before the first call of a rolling
block the loop rotates the tail left by one block, which parks the frames being evicted in
those unattended slots: the call reads them there to compute the memory. After the context
pass the loop writes the block's clean keys/values over them.

The memory is a separate state ``[B, 2, M, H, D]`` (long, short; ``M = 1`` for the global mean
of the authors' default, ``M = S`` for ``ema_adaptive``) in the cache dtype (the authors'
rounding) or float32. Once initialised it is broadcast over the memory slots in place of their
stale contents. Keys are stored un-rotated; RoPE positions are window-relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memrope.config import CacheConfig, RunConfig, WanConfig, frame_tokens

MEMORY_NONE, MEMORY_INIT, MEMORY_UPDATE = "none", "init", "update"


@dataclass(frozen=True)
class CacheLayout:
    """Sizes and offsets of the cache, in frames (``*_frames``) and tokens (``*_tokens``)."""

    config: CacheConfig
    frame_tokens: int
    cache_frames: int

    @classmethod
    def build(cls, config: CacheConfig, frame_tokens: int, num_output_frames: int | None = None) -> CacheLayout:
        if frame_tokens <= 0:
            raise ValueError(f"frame_tokens must be positive, got {frame_tokens}")
        if config.policy == "global":
            if num_output_frames is None:
                raise ValueError("policy 'global' sizes its cache by num_output_frames; none given")
            cache_frames = num_output_frames
        else:
            cache_frames = config.window_frames
        if cache_frames < config.block_frames or cache_frames % config.block_frames:
            raise ValueError(f"cache of {cache_frames} frames cannot hold whole blocks of "
                             f"{config.block_frames} frames")
        return cls(config=config, frame_tokens=frame_tokens, cache_frames=cache_frames)

    @classmethod
    def for_run(cls, model: WanConfig, run: RunConfig) -> CacheLayout:
        """The layout of ``run``'s cache for ``model`` (tokens per frame from the latent grid)."""
        return cls.build(run.cache, frame_tokens(model, run.latent_height, run.latent_width),
                         run.num_output_frames)

    @property
    def block_frames(self) -> int:
        return self.config.block_frames

    @property
    def sink_frames(self) -> int:
        return self.config.sink_frames

    @property
    def memory_frames(self) -> int:
        return self.config.memory_frames

    @property
    def has_memory(self) -> bool:
        return self.config.has_memory

    @property
    def memory_start_frame(self) -> int:
        """First memory slot (long term); the short-term memory follows it."""
        return self.sink_frames

    @property
    def tail_start_frame(self) -> int:
        """First slot of the FIFO that rolls (everything after the sink and memory)."""
        return self.sink_frames + self.memory_frames

    @property
    def tail_frames(self) -> int:
        """Slots of the FIFO (recent frames and the newest block): what a prompt-switch re-cache
        recomputes (``memrope.model.MemRoPEStep.recache``)."""
        return self.cache_frames - self.tail_start_frame

    @property
    def context_frames(self) -> int:
        """Slots a call may attend to; the remaining ``block_frames`` hold parked/stale frames."""
        return self.cache_frames - self.block_frames

    @property
    def memory_tokens(self) -> int:
        """Tokens per memory slot in the memory state: 1 (global mean) or S (per position)."""
        return self.frame_tokens if self.config.policy == "ema_adaptive" else 1

    @property
    def cache_tokens(self) -> int:
        return self.cache_frames * self.frame_tokens

    @property
    def context_tokens(self) -> int:
        return self.context_frames * self.frame_tokens

    @property
    def block_tokens(self) -> int:
        return self.block_frames * self.frame_tokens

    @property
    def rolls(self) -> bool:
        return self.config.policy != "global"

    def describe(self) -> dict:
        """The layout as plain data (for the IO contract and the docs)."""
        return {
            "policy": self.config.policy,
            "frame_tokens": self.frame_tokens,
            "cache_frames": self.cache_frames,
            "cache_tokens": self.cache_tokens,
            "context_frames": self.context_frames,
            "block_frames": self.block_frames,
            "sink_frames": self.sink_frames,
            "memory_frames": self.memory_frames,
            "recent_frames": self.config.recent_frames,
            "memory_tokens": self.memory_tokens,
            "memory_dtype": self.config.memory_dtype,
        }


@dataclass(frozen=True)
class BlockPlan:
    """What the loop decided for one block, in plain integers.

    ``valid_frames``: context slots ``[0, valid_frames)`` hold frames the block attends to.
    ``write_frame``: slot where the block's clean keys/values go after the context pass.
    ``query_start``: temporal RoPE index of the block's first frame (keys use the slot index).
    ``roll``: rotate the tail left by one block before the first call.
    ``memory_step``: ``none``/``init``/``update`` on the first call; later calls use ``none``.
    ``memory_ready``: the memory slots show the memory (not raw frames) in this block.
    """

    block_index: int
    valid_frames: int
    write_frame: int
    query_start: int
    roll: bool
    memory_step: str
    memory_ready: bool


class CachePolicy:
    """Host-side bookkeeping of the cache, block by block (spec section 4.3/4.4).

    Fill phase: the block goes to slot ``filled`` with queries at the same index. Once a block
    no longer fits, every block rolls: queries sit at ``context_frames ..``, keys at
    ``0 .. context_frames - 1`` and, with memory, the first roll initialises it and every
    later roll updates it (the evicted frames are the oldest ``block_frames`` of the tail, so
    frames ``sink .. sink + 1`` are overwritten by the memory and never remembered, as in the
    authors' code).
    """

    def __init__(self, layout: CacheLayout):
        self.layout = layout
        self.reset()

    def reset(self) -> None:
        self.filled_frames = 0
        self.memory_initialized = False
        self.block_index = 0

    def next_block(self) -> BlockPlan:
        lay = self.layout
        block = lay.block_frames
        b = self.block_index
        if self.filled_frames + block <= lay.cache_frames:
            plan = BlockPlan(b, self.filled_frames, self.filled_frames,
                             self.filled_frames, False, MEMORY_NONE, self.memory_initialized)
            self.filled_frames += block
        elif lay.rolls:
            step = MEMORY_NONE
            if lay.has_memory:
                step = MEMORY_UPDATE if self.memory_initialized else MEMORY_INIT
                self.memory_initialized = True
            plan = BlockPlan(b, lay.context_frames, lay.context_frames,
                             lay.context_frames, True, step, self.memory_initialized)
        else:
            raise ValueError(f"policy 'global' cache holds {lay.cache_frames} frames; block {b} "
                             f"(frames {b * block}..{b * block + block - 1}) does not fit")
        self.block_index += 1
        return plan


@dataclass
class CacheControls:
    """Per-call control tensors (the policy's integers as tensors, so a graph can take them).

    key_positions: ``[context_frames]`` int64 temporal RoPE index of each context slot.
    key_valid: ``[context_frames]`` bool, slot attended.
    query_positions: ``[block_frames]`` int64 temporal RoPE index of the block's frames.
    memory_ready / memory_init / memory_update: ``[1]`` bool.
    """

    key_positions: torch.Tensor
    key_valid: torch.Tensor
    query_positions: torch.Tensor
    memory_ready: torch.Tensor
    memory_init: torch.Tensor
    memory_update: torch.Tensor

    @classmethod
    def allocate(cls, layout: CacheLayout, device: torch.device | str = "cpu") -> CacheControls:
        return cls(
            key_positions=torch.arange(layout.context_frames, dtype=torch.int64, device=device),
            key_valid=torch.zeros(layout.context_frames, dtype=torch.bool, device=device),
            query_positions=torch.zeros(layout.block_frames, dtype=torch.int64, device=device),
            memory_ready=torch.zeros(1, dtype=torch.bool, device=device),
            memory_init=torch.zeros(1, dtype=torch.bool, device=device),
            memory_update=torch.zeros(1, dtype=torch.bool, device=device),
        )

    def set(self, layout: CacheLayout, plan: BlockPlan, first_call: bool) -> None:
        """Write the plan into the (fixed-address) control tensors in place.

        Positions and validity are uploaded only when they change (during the fill phase);
        in the steady state a block costs three ``fill_`` launches and no host-device copy.
        """
        key = (plan.valid_frames, plan.query_start)
        if getattr(self, "_uploaded", None) != key:
            valid = torch.arange(layout.context_frames) < plan.valid_frames
            self.key_valid.copy_(valid)
            self.query_positions.copy_(torch.arange(plan.query_start, plan.query_start + layout.block_frames))
            self._uploaded = key
        self.memory_ready.fill_(plan.memory_ready)
        self.memory_init.fill_(first_call and plan.memory_step == MEMORY_INIT)
        self.memory_update.fill_(first_call and plan.memory_step == MEMORY_UPDATE)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def memory_update(
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    evicted_key: torch.Tensor,
    evicted_value: torch.Tensor,
    init: torch.Tensor,
    update: torch.Tensor,
    config: CacheConfig,
    frame_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA memory step for one layer, selected by flags (graph-side, no host branching).

    Args:
        memory_key, memory_value: ``[B, 2, M, H, D]`` (long, short) in the memory dtype.
        evicted_key, evicted_value: ``[B, E * S, H, D]`` clean keys/values of the evicted frames.
        init, update: ``[1]`` bool. ``init`` sets long = short = mean; ``update`` applies the EMA;
            neither returns the memory unchanged.
    Returns:
        The new ``(memory_key, memory_value)``, same shapes and dtype.

    The default (``ema``) reproduces the authors: one mean over all evicted tokens, broadcast
    over the frame (M = 1), and ``alpha * mean + (1 - alpha) * memory`` in the memory dtype.
    ``ema_adaptive`` means per spatial position (M = S) and, for the short memory, a
    per-position alpha ``alpha_short * (0.1 + 4.9 * n)`` with ``n`` the key change
    ``||mean_k - short_k||`` (over channels, averaged over heads) divided by its max over
    positions (+1e-8); values use the keys' alpha.
    """
    batch, evicted_tokens, heads, head_dim = evicted_key.shape
    frames = evicted_tokens // frame_tokens
    dtype = memory_key.dtype
    adaptive = config.policy == "ema_adaptive"

    def mean(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype).reshape(batch, frames, frame_tokens, heads, head_dim)
        if adaptive:
            return x.mean(dim=1)
        return x.mean(dim=(1, 2)).unsqueeze(1)

    mu_k, mu_v = mean(evicted_key), mean(evicted_value)
    long_k, short_k = memory_key[:, 0], memory_key[:, 1]
    long_v, short_v = memory_value[:, 0], memory_value[:, 1]
    a_long, a_short = config.alpha_long, config.alpha_short
    if adaptive:
        motion = torch.linalg.vector_norm((mu_k - short_k).float(), dim=-1).mean(dim=-1)
        norm = motion / (motion.amax(dim=1, keepdim=True) + 1e-8)
        alpha = (a_short * (0.1 + 4.9 * norm)).to(dtype)[:, :, None, None]
        new_short_k = alpha * mu_k + (1 - alpha) * short_k
        new_short_v = alpha * mu_v + (1 - alpha) * short_v
    else:
        new_short_k = a_short * mu_k + (1 - a_short) * short_k
        new_short_v = a_short * mu_v + (1 - a_short) * short_v
    new_long_k = a_long * mu_k + (1 - a_long) * long_k
    new_long_v = a_long * mu_v + (1 - a_long) * long_v

    ema_k = torch.stack([new_long_k, new_short_k], dim=1)
    ema_v = torch.stack([new_long_v, new_short_v], dim=1)
    init_k = torch.stack([mu_k, mu_k], dim=1)
    init_v = torch.stack([mu_v, mu_v], dim=1)
    out_k = torch.where(init, init_k, torch.where(update, ema_k, memory_key))
    out_v = torch.where(init, init_v, torch.where(update, ema_v, memory_value))
    return out_k, out_v


def memory_slots_view(memory: torch.Tensor, frame_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Broadcast the memory ``[B, 2, M, H, D]`` to the two memory slots ``[B, 2 * S, H, D]``."""
    batch, slots, tokens, heads, head_dim = memory.shape
    full = memory.expand(batch, slots, frame_tokens, heads, head_dim)
    return full.reshape(batch, slots * frame_tokens, heads, head_dim).to(dtype)


class KVCache:
    """Fixed-size self-attention cache for all layers, owned by the generation loop.

    keys, values: ``[L, B, cache_tokens, H, D]`` in the cache dtype (un-rotated keys).
    memory_keys, memory_values: ``[L, B, 2, M, H, D]`` in the memory dtype (``None`` without
    memory). Addresses never change after allocation; every verb writes in place.
    """

    def __init__(self, layout: CacheLayout, num_layers: int, batch: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.layout = layout
        shape = (num_layers, batch, layout.cache_tokens, heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.memory_keys = self.memory_values = None
        if layout.has_memory:
            mem_dtype = torch.float32 if layout.config.memory_dtype == "float32" else dtype
            mshape = (num_layers, batch, 2, layout.memory_tokens, heads, head_dim)
            self.memory_keys = torch.zeros(mshape, dtype=mem_dtype, device=device)
            self.memory_values = torch.zeros(mshape, dtype=mem_dtype, device=device)
        self._scratch: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    def reset(self) -> None:
        for t in (self.keys, self.values, self.memory_keys, self.memory_values):
            if t is not None:
                t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.keys, self.values, self.memory_keys, self.memory_values) if t is not None)

    def roll(self) -> None:
        """Rotate the tail left by one block: the evicted frames land in the block slots.

        Layer by layer through a one-layer scratch buffer (allocated on first use), so the
        roll never allocates a copy of the whole cache."""
        lay = self.layout
        start = lay.tail_start_frame * lay.frame_tokens
        shift = lay.block_tokens
        if self._scratch is None:
            self._scratch = torch.empty_like(self.keys[0, :, start:])
        for buf in (self.keys, self.values):
            for layer in buf:
                tail = layer[:, start:]
                self._scratch.copy_(tail)
                tail[:, :-shift].copy_(self._scratch[:, shift:])
                tail[:, -shift:].copy_(self._scratch[:, :shift])

    def write_block(self, frame: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Store each layer's block keys/values ``[B, block_tokens, H, D]`` at slot ``frame``."""
        lay = self.layout
        start = frame * lay.frame_tokens
        end = start + lay.block_tokens
        for i in range(self.num_layers):
            self.keys[i, :, start:end].copy_(keys[i])
            self.values[i, :, start:end].copy_(values[i])

    def write_memory(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        for i in range(self.num_layers):
            self.memory_keys[i].copy_(keys[i])
            self.memory_values[i].copy_(values[i])

    def logical(self, memory_ready: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[L, B, cache_tokens, H, D]`` as the authors' cache holds them: the
        memory slots show the broadcast memory (cast to the cache dtype) once it is ready."""
        keys, values = self.keys.clone(), self.values.clone()
        if self.layout.has_memory and memory_ready:
            lay = self.layout
            start = lay.memory_start_frame * lay.frame_tokens
            end = start + 2 * lay.frame_tokens
            for i in range(self.num_layers):
                keys[i, :, start:end] = memory_slots_view(self.memory_keys[i], lay.frame_tokens, keys.dtype)
                values[i, :, start:end] = memory_slots_view(self.memory_values[i], lay.frame_tokens, values.dtype)
        return keys, values


__all__ = [
    "BlockPlan", "CacheControls", "CacheLayout", "CachePolicy", "KVCache", "MEMORY_INIT",
    "MEMORY_NONE", "MEMORY_UPDATE", "memory_slots_view", "memory_update",
]
