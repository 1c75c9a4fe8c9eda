"""The generation loop: blocks of frames, a few denoising steps each, then the context pass.

Owns: the lean per-block loop (spec section 3.2) over a :class:`memrope.backend.Backend`
(named tensors in and out, as the IO contract names them), and everything a stream of blocks
keeps between calls, in :class:`BlockStream`: one :class:`KVCache`, one :class:`CacheControls`,
the latent / timestep / sigma / noise buffers and a ring of two output buffers, all allocated
once at fixed addresses. Per block the host does integer bookkeeping (:class:`CachePolicy`),
one tail roll once the window is full, and buffer writes of what the calls returned; per call it
does a fixed number of in-place tensor ops, whatever the layer count, and no host <-> device
synchronisation. Also owns prompt changes at a block boundary (:meth:`BlockStream.set_prompt`,
:class:`PromptChange`): new cross-attention keys/values, an optional blend, the EMA memory kept or
reset, and an optional LongLive-style re-cache of the window from the clean latents the stream
keeps in a fixed buffer that mirrors the cache's slots.

Does not own the model math (``memrope.model``), where noise comes from (``memrope.sampler``), or
what a backend runs (``engine/``).

Legend: B batch, F frames per block, C latent channels, H/W latent height/width, N steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from memrope.backend import Backend, Feeds
from memrope.cache import MEMORY_NONE, BlockPlan, CacheControls, CacheLayout, CachePolicy, KVCache
from memrope.config import RunConfig
from memrope.contract import (
    DTYPE_NAMES,
    cross_key,
    cross_value,
    memory_key,
    memory_value,
    past_key,
    past_value,
    present_key,
    present_memory_key,
    present_memory_value,
    present_value,
    recache_contract,
    recached_key,
    recached_value,
    step_contract,
    step_outputs_from_named,
)
from memrope.errors import NonFiniteError
from memrope.model import StepOutputs
from memrope.sampler import NoiseSource, Schedule, build_schedule

logger = logging.getLogger(__name__)

# The bound on a block's clean latents |x0|. The DiT works in the Wan VAE's normalised latent
# space (the VAE de-normalises with per-channel std 1.1-3.3 and mean within +-1.6,
# memrope.vae.WAN21_LATENTS_*): a trained model's x0 are O(1)-O(10); the golden tiny model's and the
# random-weight tiny preset's peak at ~6. 1e3 leaves two orders of magnitude of headroom; a
# latent beyond it decodes to saturated colour and, carried by the cache, poisons later blocks.
# Seen in practice: a noise spike of 1e6 gives |x0| ~4e3, of 1e30 ~4e27 on ONNX Runtime (which
# keeps it finite where eager overflows to NaN), so finiteness alone misses it.
MAX_ABS_LATENT = 1e3

MEMORY_ON_SWITCH = ("keep", "reset")
RECACHE_MODES = ("none", "recent", "all")  # in increasing order of work
_ALL_DIMS = (0, 1, 2, 3, 4)


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


@dataclass
class BlockResult:
    """One finished block.

    x0: ``[B, F, C, H, W]`` the block's clean latents, in one of two ring buffers: valid until
      the block after next has been computed (so it may be decoded while the next block runs).
    cache: the stream's cache after the context pass (inspection only; overwritten in place).
    finite: ``[]`` float32 on the device: 0 when every value of ``x0`` is finite and
      ``|x0| <= max_abs_latent``; NaN or Inf when some value is not finite; otherwise the block's
      largest ``|x0|``. Read it with :meth:`check_finite` once the frames have left the device,
      which synchronises anyway.
    max_abs_latent: the bound ``finite`` was computed against (:data:`MAX_ABS_LATENT` by default).
    """

    index: int
    x0: torch.Tensor
    cache: KVCache
    plan: BlockPlan
    finite: torch.Tensor
    max_abs_latent: float = MAX_ABS_LATENT

    def check_finite(self, flag: torch.Tensor | None = None) -> None:
        """Raise :class:`NonFiniteError` naming this block if its latents hold NaN or Inf or
        leave ``[-max_abs_latent, max_abs_latent]`` (with the largest ``|x0|`` and the bound).

        ``flag``: a copy of :attr:`finite` the caller already has on the host (read without a
        sync); by default :attr:`finite` itself (a sync on a GPU)."""
        value = (self.finite if flag is None else flag).item()
        if value == 0.0:
            return
        first = self.index * self.x0.shape[1]
        frames = f"block {self.index} (latent frames {first}..{first + self.x0.shape[1] - 1})"
        bound = f"{self.max_abs_latent:g}"
        if math.isfinite(value):
            cause = ("the inputs or the weights: check --noise / --text-embeds and the checkpoint" if self.index == 0
                     else "a spike in this block's noise, or a blow-up carried forward by the cache and the EMA "
                          "memory: check --noise / --text-embeds and the checkpoint")
            raise NonFiniteError(f"{frames} produced latents out of range: max |x0| {value:.3g} > {bound} (clean "
                                 f"latents are normalised, O(1)-O(10) for a trained model); likely cause: {cause}")
        if self.index == 0:
            cause = ("the inputs or the weights: check --noise / --text-embeds and the checkpoint "
                     "(weights are checked for NaN/Inf at load)")
        elif self.x0.dtype != torch.float32:
            cause = ("a numerical overflow carried forward by the cache and the EMA memory; try --dtype float32, "
                     "or --memory-dtype float32")
        else:
            cause = ("a numerical overflow carried forward by the cache and the EMA memory, in float32 already: "
                     "check --noise / --text-embeds and the checkpoint")
        raise NonFiniteError(f"{frames} produced NaN or Inf (clean latents must be finite and within +-{bound}); "
                             f"likely cause: {cause}")


@dataclass(frozen=True)
class PromptChange:
    """A prompt change at a block boundary: from block ``at_block`` on, ``prompt_embeds``
    ``[B, L <= text_len, text_dim]``; see :meth:`BlockStream.set_prompt` for the options."""

    at_block: int
    prompt_embeds: torch.Tensor
    recache: str = "none"
    memory: str = "keep"
    transition_blocks: int = 0


class MemRoPEPipeline:
    """Generates latent frames block by block with a fixed-size cache.

    Args:
        backend: a :class:`memrope.backend.Backend` (``engine/`` has one per runtime).
        run: the run configuration (cache policy, sampler, latent size, frames).
        max_abs_latent: the bound on every block's clean latents ``|x0|`` (default
            :data:`MAX_ABS_LATENT`; ``math.inf`` checks finiteness only): a block past it fails
            as a non-finite one does (:meth:`BlockResult.check_finite`).

    One pipeline may drive several streams (:meth:`stream`), each with its own cache, on the
    same backend: a server does this, one block at a time per stream.
    """

    def __init__(self, backend: Backend, run: RunConfig, *, max_abs_latent: float = MAX_ABS_LATENT):
        if (isinstance(max_abs_latent, bool) or not isinstance(max_abs_latent, (int, float))
                or not max_abs_latent > 0):
            raise ValueError(f"max_abs_latent must be a positive number (math.inf: no bound), got {max_abs_latent!r}")
        expected = CacheLayout.for_run(backend.model, run)
        if backend.layout != expected:
            raise ValueError(f"backend {backend.name} was built for cache layout {backend.layout.describe()}, "
                             f"the run needs {expected.describe()}")
        self.backend = backend
        self.run = run
        self.layout = expected
        self.max_abs_latent = float(max_abs_latent)
        self.schedule: Schedule = build_schedule(run.sampler)
        self.device, self.dtype = backend.device, backend.dtype

    def latent_frame_shape(self) -> tuple[int, int, int]:
        r = self.run
        return r.latent_channels, r.latent_height, r.latent_width

    def block_shape(self) -> tuple[int, int, int, int, int]:
        """``(B, F, C, H, W)`` of one block of latents."""
        return (self.run.batch_size, self.layout.block_frames, *self.latent_frame_shape())

    def stream(self, prompt_embeds: torch.Tensor, noise: NoiseSource, *, max_blocks: int | None = None,
               on_call: Callable[[CallRecord], None] | None = None,
               prompt_changes: Sequence[PromptChange] = ()) -> BlockStream:
        """A new stream of blocks for ``prompt_embeds [B, L <= text_len, text_dim]``, with
        ``prompt_changes`` scheduled on it (:meth:`BlockStream.set_prompt`); see :class:`BlockStream`."""
        stream = BlockStream(self, prompt_embeds, noise, max_blocks=max_blocks, on_call=on_call)
        try:
            for change in prompt_changes:
                stream.set_prompt(change.prompt_embeds, at_block=change.at_block, recache=change.recache,
                                  memory=change.memory, transition_blocks=change.transition_blocks)
        except BaseException:
            stream.close()
            raise
        return stream

    @torch.no_grad()
    def blocks(self, prompt_embeds: torch.Tensor, noise: NoiseSource, num_blocks: int,
               on_call: Callable[[CallRecord], None] | None = None,
               prompt_changes: Sequence[PromptChange] = ()) -> Iterator[BlockResult]:
        """Yield each of ``num_blocks`` blocks as a :class:`BlockResult` once its context pass is done."""
        stream = self.stream(prompt_embeds, noise, max_blocks=num_blocks, on_call=on_call,
                             prompt_changes=prompt_changes)
        try:
            for _ in range(num_blocks):
                yield stream.next_block()
        finally:
            stream.close()

    def generate(self, prompt_embeds: torch.Tensor, noise: NoiseSource, num_frames: int | None = None,
                 on_call: Callable[[CallRecord], None] | None = None,
                 prompt_changes: Sequence[PromptChange] = ()) -> torch.Tensor:
        """All frames at once: ``[B, num_frames, C, H, W]`` in the model dtype (held in memory; a
        long video should consume :meth:`blocks` instead)."""
        num_frames = self.run.num_output_frames if num_frames is None else num_frames
        if num_frames % self.layout.block_frames:
            raise ValueError(f"num_frames ({num_frames}) must be a multiple of the block size "
                             f"({self.layout.block_frames})")
        out = [r.x0.clone() for r in self.blocks(prompt_embeds, noise, num_frames // self.layout.block_frames,
                                                  on_call, prompt_changes)]
        return torch.cat(out, dim=1)


class BlockStream:
    """One video being generated: its cache, controls, buffers, noise and prompt.

    Created by :meth:`MemRoPEPipeline.stream`. :meth:`next_block` runs every call of the next
    block and returns a :class:`BlockResult`; :meth:`set_prompt` changes the prompt at a block
    boundary. Every buffer is allocated here, once; the backend sees the same ``feeds`` dict (same
    tensors, same addresses) on every call, so it may bind them once.

    Args:
        prompt_embeds: ``[B, L <= text_len, text_dim]`` text embeddings (zero-padded to text_len here).
        noise: where each block's noise comes from.
        max_blocks: the last block this stream will run, if known (noise is drawn one block
            ahead, but never past it); ``None`` for an unbounded stream.
    """

    def __init__(self, pipeline: MemRoPEPipeline, prompt_embeds: torch.Tensor, noise: NoiseSource, *,
                 max_blocks: int | None = None, on_call: Callable[[CallRecord], None] | None = None):
        self.pipeline = pipeline
        backend, lay, run = pipeline.backend, pipeline.layout, pipeline.run
        cfg, device, dtype = backend.model, pipeline.device, pipeline.dtype
        self.backend, self.layout, self.on_call = backend, lay, on_call
        self.num_layers = cfg.num_layers
        self.max_blocks = max_blocks
        batch = run.batch_size
        self._check_embeds(prompt_embeds)
        shape = pipeline.block_shape()
        num_steps = pipeline.schedule.num_steps
        noise.check(shape, num_steps)
        self.noise = noise

        # Buffers, allocated once; their addresses never change for the stream's life.
        self.cache = KVCache(lay, cfg.num_layers, batch, cfg.num_heads, cfg.head_dim, dtype, device)
        self.controls = CacheControls.allocate(lay, device)
        self.policy = CachePolicy(lay)
        contract = step_contract(cfg, run, lay, DTYPE_NAMES[dtype], batch)
        feeds = Feeds(self.controls.as_dict())
        for i in range(cfg.num_layers):
            feeds[past_key(i)], feeds[past_value(i)] = self.cache.keys[i], self.cache.values[i]
            if lay.has_memory:
                feeds[memory_key(i)], feeds[memory_value(i)] = self.cache.memory_keys[i], self.cache.memory_values[i]
        for spec in contract.inputs:
            if spec.name not in feeds:
                feeds[spec.name] = spec.zeros(device)
        self.feeds = feeds
        self.cross = Feeds({name: feeds[name] for i in range(cfg.num_layers) for name in (cross_key(i), cross_value(i))})
        self._padded = torch.zeros(batch, cfg.text_len, cfg.text_dim, dtype=dtype, device=device)
        self._text_feeds = Feeds({"prompt_embeds": self._padded})
        self._load_cross(prompt_embeds)

        self._latents, self._timestep, self._sigma = feeds["latents"], feeds["timestep"], feeds["sigma"]

        def constant(shape_: tuple[int, ...], value: float) -> torch.Tensor:
            return torch.full(shape_, value, dtype=torch.float32, device=device)

        sched = pipeline.schedule
        frames = lay.block_frames
        self._step_t = [constant((batch, frames), t) for t in sched.step_timesteps]
        self._step_sigma = [constant((1,), s) for s in sched.step_sigmas]
        self._step_keep = [constant((1,), 1.0) - s for s in self._step_sigma]
        self._context_t = constant((batch, frames), sched.context_timestep)
        self._context_sigma = constant((1,), sched.context_sigma)
        # Re-noising (1 - s) * x0 + s * eps in float32 (the reference's arithmetic), into fixed
        # scratch: two products then a sum, bit-identical to sampler.add_noise.
        self._mix = torch.empty(shape, dtype=torch.float32, device=device)
        self._mix_eps = torch.empty(shape, dtype=torch.float32, device=device)
        self._x0 = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
        self._finite = [torch.zeros((), dtype=torch.float32, device=device) for _ in range(2)]
        self._finite_scratch = torch.empty(shape, dtype=torch.float32, device=device)
        self._abs_max = torch.zeros((), dtype=torch.float32, device=device)
        self._over = torch.zeros((), dtype=torch.bool, device=device)
        self.max_abs_latent = pipeline.max_abs_latent

        # Noise: [steps, B, F, C, H, W] on the device. A host source on an accelerator is staged
        # through two (pinned, on CUDA) buffers and copied without blocking, one block ahead.
        # A host source drawing in another dtype (e.g. bf16 noise for an fp32 comparison run) is
        # staged in its dtype and converted by the copy.
        self._noise = torch.empty((num_steps, *shape), dtype=dtype, device=device)
        draw_dtype = noise.dtype or dtype
        if noise.device is not None and draw_dtype != dtype:
            raise ValueError(f"noise drawn on {noise.device} in {draw_dtype} cannot fill the model's {dtype} buffers")
        self._staged = noise.device is None and (device.type != "cpu" or draw_dtype != dtype)
        self._staging: list[torch.Tensor] = []
        self._staging_done: list = [None, None]
        if self._staged:
            pin = device.type == "cuda"
            self._staging = [torch.empty((num_steps, *shape), dtype=draw_dtype, pin_memory=pin) for _ in range(2)]
        self._noise_ready = -1  # the block whose noise self._noise holds (or has a copy queued for)

        self._memory_names = [(present_memory_key(i), present_memory_value(i)) for i in range(cfg.num_layers)]
        self._block_names = [(present_key(i), present_value(i)) for i in range(cfg.num_layers)]
        self._pending: list[PromptChange] = []
        self._blend: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._blend_left = self._blend_total = 0
        self._rolled = False  # the tail has rolled at least once (the memory slots hold no frames)

        # Re-cache state (a prompt switch's), fixed like the rest. ``_clean [B, cache_frames, C, H,
        # W]`` mirrors the cache's slots: the context pass's latents are written where its keys/values
        # go, and the tail rolls with the cache's. The recache call reads the cache's head and writes
        # the tail's keys/values straight into views of the cache (``_recache_outputs``).
        self._clean = torch.zeros((batch, lay.cache_frames, *shape[2:]), dtype=dtype, device=device)
        tail = lay.tail_start_frame
        self._clean_scratch = torch.empty_like(self._clean[:, tail:]) if lay.rolls else None
        recache_feeds = Feeds()
        for spec in recache_contract(cfg, run, lay, DTYPE_NAMES[dtype], batch).inputs:
            recache_feeds[spec.name] = feeds[spec.name] if spec.name in self.cross or spec.name.startswith(
                ("past_key_values.", "memory.")) else spec.zeros(device)
        recache_feeds["timestep"].fill_(sched.context_timestep)
        self._recache_feeds = recache_feeds
        start = tail * lay.frame_tokens
        self._recache_outputs = Feeds()
        for i in range(cfg.num_layers):
            self._recache_outputs[recached_key(i)] = self.cache.keys[i][:, start:]
            self._recache_outputs[recached_value(i)] = self.cache.values[i][:, start:]
        self.block_index = 0
        self.closed = False

    # -- prompts ----------------------------------------------------------------------------------

    def _check_embeds(self, prompt_embeds: torch.Tensor) -> None:
        cfg, run = self.backend.model, self.pipeline.run
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[2] != cfg.text_dim:
            raise ValueError(f"prompt_embeds must be [B, L, text_dim={cfg.text_dim}], got {list(prompt_embeds.shape)}")
        if prompt_embeds.shape[0] != run.batch_size:
            raise ValueError(f"prompt_embeds batch {prompt_embeds.shape[0]} does not match num_samples "
                             f"{run.batch_size}")
        if prompt_embeds.shape[1] > cfg.text_len:
            raise ValueError(f"prompt_embeds has {prompt_embeds.shape[1]} tokens; the model takes at most "
                             f"text_len={cfg.text_len}")
        if not torch.isfinite(prompt_embeds).all():
            raise ValueError("prompt_embeds contain NaN or Inf")

    def _load_cross(self, prompt_embeds: torch.Tensor) -> None:
        """The prompt's cross-attention K/V, written by the text call into the stream's buffers."""
        self._padded.zero_()
        self._padded[:, :prompt_embeds.shape[1]] = prompt_embeds
        self.backend.encode_text_into(self._text_feeds, self.cross)

    def set_prompt(self, prompt_embeds: torch.Tensor, *, at_block: int | None = None, recache: str = "none",
                   memory: str = "keep", transition_blocks: int = 0) -> None:
        """Change the prompt at a block boundary: from block ``at_block`` on (default: the next
        block), the calls attend to the new prompt's cross-attention keys/values. Callable between
        any two blocks of a running stream; the work happens when the switch takes effect, at the
        start of that block's :meth:`next_block`.

        Args:
            prompt_embeds: ``[B, L <= text_len, text_dim]`` of the new prompt.
            recache: re-encode the window's frames under the new prompt, from their clean latents,
                before the block runs (LongLive's re-cache): ``none``; ``recent``, the cache's tail
                (recent frames and the newest block, one ``recache`` call); ``all``, the sink too
                (first re-encoded as block 0 was, one step call per sink block, then the tail). The
                EMA memory summarises frames that are gone: it is never re-cached (see ``memory``).
            memory: ``keep`` the EMA memory, or ``reset`` it: it is zeroed and not attended
                until the next eviction initialises it afresh.
            transition_blocks: blend the old and new cross keys/values linearly over this many
                blocks (block k of the transition uses weight ``(k + 1) / (N + 1)`` for the new
                prompt); 0 switches at once. A re-cache uses the first block's blend.

        Several changes for one boundary merge as they arrive, so a stream holds at most one
        pending prompt per boundary however many changes a client sends: the last change's prompt
        and transition (a transition starts from what the previous block attended to, never from
        a prompt no block saw), a memory reset if any of them asked for one, and the largest
        re-cache, run once. Raises ValueError for a bad prompt or option before anything changes.
        """
        self._check_open()
        self._check_embeds(prompt_embeds)
        if recache not in RECACHE_MODES:
            raise ValueError(f"recache must be one of {RECACHE_MODES}, got {recache!r}")
        if recache != "none" and not self.backend.can_recache:
            raise ValueError(f"backend {self.backend.name} cannot re-cache at a prompt switch; switch with "
                             "recache='none' (memrope generate --recache none)")
        lay = self.layout
        if recache == "all" and lay.sink_frames % lay.block_frames:
            raise ValueError(f"recache='all' re-encodes the sink block by block: sink_frames ({lay.sink_frames}) "
                             f"must be a multiple of the block size ({lay.block_frames}); use 'recent'")
        if memory not in MEMORY_ON_SWITCH:
            raise ValueError(f"memory must be one of {MEMORY_ON_SWITCH}, got {memory!r}")
        if isinstance(transition_blocks, bool) or not isinstance(transition_blocks, int) or transition_blocks < 0:
            raise ValueError(f"transition_blocks must be a non-negative integer, got {transition_blocks!r}")
        at = self.block_index if at_block is None else at_block
        if isinstance(at, bool) or not isinstance(at, int) or at < self.block_index:
            raise ValueError(f"at_block must be an integer >= the next block ({self.block_index}), got {at_block!r}")
        if self.max_blocks is not None and at >= self.max_blocks:
            raise ValueError(f"at_block {at} is past the end: this stream was opened for {self.max_blocks} blocks")
        earlier = next((c for c in self._pending if c.at_block == at), None)
        if earlier is not None:
            self._pending.remove(earlier)  # its prompt is never shown: its embeddings are freed
            recache = max(recache, earlier.recache, key=RECACHE_MODES.index)
            memory = "reset" if "reset" in (memory, earlier.memory) else "keep"
        self._pending.append(PromptChange(at, prompt_embeds.detach().clone(), recache, memory, transition_blocks))
        self._pending.sort(key=lambda c: c.at_block)

    def _apply_switches(self) -> None:
        recache = "none"
        while self._pending and self._pending[0].at_block <= self.block_index:
            change = self._pending.pop(0)
            if change.memory == "reset":
                self.policy.memory_initialized = False
                if self.cache.memory_keys is not None:
                    self.cache.memory_keys.zero_()
                    self.cache.memory_values.zero_()
            if change.transition_blocks == 0:
                self._end_transition()
                self._load_cross(change.prompt_embeds)
            else:
                self._start_transition(change)
            recache = max(recache, change.recache, key=RECACHE_MODES.index)
            logger.info("prompt switched at block %d (re-cache %s, memory %s, transition %d blocks)",
                        self.block_index, change.recache, change.memory, change.transition_blocks)
        if self._blend_left:
            self._blend_step()
        if recache != "none":
            self._recache(recache)

    def _start_transition(self, change: PromptChange) -> None:
        if not self._blend:
            # 2 x the cross K/V, for the transition's length only (freed by _end_transition).
            self._blend = {name: (torch.empty_like(t), torch.empty_like(t)) for name, t in self.cross.items()}
        for name, (old_buf, _) in self._blend.items():
            old_buf.copy_(self.cross[name])
        self._load_cross(change.prompt_embeds)
        for name, (_, new_buf) in self._blend.items():
            new_buf.copy_(self.cross[name])
        self._blend_total = change.transition_blocks
        self._blend_left = change.transition_blocks + 1

    def _blend_step(self) -> None:
        k = self._blend_total + 1 - self._blend_left
        weight = (k + 1) / (self._blend_total + 1)
        for name, (old_buf, new_buf) in self._blend.items():
            torch.lerp(old_buf, new_buf, weight, out=self.cross[name])
        self._blend_left -= 1
        if not self._blend_left:
            self._end_transition()

    def _end_transition(self) -> None:
        self._blend_left = 0
        self._blend = {}

    # -- re-cache -----------------------------------------------------------------------------------

    def _recache(self, mode: str) -> None:
        """Re-encode the frames in the window under the current cross keys/values, block-causally
        by slot, before the next block's roll: the sink (``all`` only) as block 0 was encoded, one
        step call per block, then the tail in one recache call that sees the fresh sink."""
        lay, filled = self.layout, self.policy.filled_frames
        if mode == "all":
            for first in range(0, min(lay.sink_frames, filled), lay.block_frames):
                self._recache_sink_block(first)
        if filled > lay.tail_start_frame:
            self._recache_tail(filled)

    def _recache_sink_block(self, first: int) -> None:
        lay = self.layout
        plan = BlockPlan(self.block_index, first, first, first, False, MEMORY_NONE, False)
        self.controls.set(lay, plan, first_call=True)  # the next block's set uploads its own again
        self._latents.copy_(self._clean[:, first:first + lay.block_frames])
        self._timestep.copy_(self._context_t)
        self._sigma.copy_(self._context_sigma)
        out = self.backend.step(self.feeds)
        self.cache.write_block(first, [out[k] for k, _ in self._block_names], [out[v] for _, v in self._block_names])

    def _recache_tail(self, filled: int) -> None:
        lay, feeds = self.layout, self._recache_feeds
        valid = feeds["slot_valid"]
        valid[:filled].fill_(True)
        valid[filled:].fill_(False)
        if lay.has_memory and self._rolled:
            # Once the tail has rolled, the memory slots show the memory or nothing (after a reset).
            valid[lay.memory_start_frame:lay.tail_start_frame].fill_(self.policy.memory_initialized)
        if lay.has_memory:
            feeds["memory_ready"].fill_(self.policy.memory_initialized)
        feeds["latents"].copy_(self._clean[:, lay.tail_start_frame:])
        self.backend.recache(feeds, self._recache_outputs)

    def _roll_clean(self) -> None:
        """Rotate the clean latents' tail left by one block, as :meth:`KVCache.roll` does the cache's."""
        tail = self._clean[:, self.layout.tail_start_frame:]
        shift = self.layout.block_frames
        self._clean_scratch.copy_(tail)
        tail[:, :-shift].copy_(self._clean_scratch[:, shift:])
        tail[:, -shift:].copy_(self._clean_scratch[:, :shift])

    # -- noise --------------------------------------------------------------------------------------

    def _queue_noise(self, block: int) -> None:
        """Make ``self._noise`` hold block ``block``'s noise by the time the stream's next calls run."""
        if self.max_blocks is not None and block >= self.max_blocks:
            return
        self._noise_ready = block
        if not self._staged:
            self.noise.draw(block, self._noise)
            return
        slot = block % 2
        done = self._staging_done[slot]
        if done is not None:
            done.synchronize()  # the copy out of this staging buffer (two blocks ago) has finished
        self.noise.draw(block, self._staging[slot])
        # Ordered on the stream after every call that still reads the current block's noise.
        self._noise.copy_(self._staging[slot], non_blocking=True)
        if self._noise.device.type == "cuda":
            if done is None:
                done = self._staging_done[slot] = torch.cuda.Event()
            done.record()

    # -- the loop -----------------------------------------------------------------------------------

    def _call(self, block: int, index: int, plan: BlockPlan, t: torch.Tensor, s: torch.Tensor) -> dict:
        self._timestep.copy_(t)
        self._sigma.copy_(s)
        out = self.backend.step(self.feeds)
        if self.on_call is not None:
            snapshot = {k: v.clone() for k, v in out.items()}
            self.on_call(CallRecord(block, index, plan, self._latents.clone(), t,
                                    step_outputs_from_named(snapshot, self.num_layers)))
        return out

    @torch.no_grad()
    def next_block(self) -> BlockResult:
        """Run every call of the next block (its denoising steps, then the context pass)."""
        self._check_open()
        b = self.block_index
        if self.max_blocks is not None and b >= self.max_blocks:
            raise ValueError(f"this stream was opened for {self.max_blocks} blocks")
        self._apply_switches()
        if self._noise_ready != b:
            self._queue_noise(b)
        cache, controls, lay, sched = self.cache, self.controls, self.layout, self.pipeline.schedule
        plan = self.policy.next_block()
        if plan.roll:
            cache.roll()
            self._roll_clean()
            self._rolled = True
        controls.set(lay, plan, first_call=True)
        x0 = self._x0[b % 2]
        latents = self._latents
        latents.copy_(self._noise[0])
        for i in range(sched.num_steps):
            out = self._call(b, i, plan, self._step_t[i], self._step_sigma[i])
            if i == 0:
                if plan.memory_step != MEMORY_NONE:
                    cache.write_memory([out[k] for k, _ in self._memory_names],
                                       [out[v] for _, v in self._memory_names])
                controls.set(lay, plan, first_call=False)
            if i < sched.num_steps - 1:
                mix = latents if latents.dtype == torch.float32 else self._mix
                torch.mul(out["x0"], self._step_keep[i + 1], out=mix)
                torch.mul(self._noise[i + 1], self._step_sigma[i + 1], out=self._mix_eps)
                mix.add_(self._mix_eps)
                if mix is not latents:
                    latents.copy_(mix)
            else:
                x0.copy_(out["x0"])
        # Context pass: the clean prediction at the context timestep writes the cache.
        latents.copy_(x0)
        out = self._call(b, sched.num_steps, plan, self._context_t, self._context_sigma)
        cache.write_block(plan.write_frame, [out[k] for k, _ in self._block_names],
                          [out[v] for _, v in self._block_names])
        self._clean[:, plan.write_frame:plan.write_frame + lay.block_frames].copy_(x0)
        # Every call that reads this block's noise is queued: draw the next block's meanwhile.
        self._queue_noise(b + 1)
        # The block's flag, on the device (the host reads it with the frames): max |x0| propagates
        # NaN and Inf, and times (max |x0| > bound) it is 0 for a block in range, the peak for one
        # out of it, and NaN or Inf for a non-finite one (NaN * 0 is NaN, Inf * 1 is Inf).
        finite = self._finite[b % 2]
        self._finite_scratch.copy_(x0).abs_()  # float32 whatever the model dtype
        torch.amax(self._finite_scratch, dim=_ALL_DIMS, out=self._abs_max)
        torch.gt(self._abs_max, self.max_abs_latent, out=self._over)
        torch.mul(self._abs_max, self._over, out=finite)
        self.block_index = b + 1
        return BlockResult(b, x0, cache, plan, finite, self.max_abs_latent)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this stream is closed")

    def close(self) -> None:
        """Release the stream's buffers (its cache first: the largest)."""
        self.closed = True
        self.cache = self.feeds = self.cross = None
        self._recache_feeds = self._recache_outputs = self._clean = self._clean_scratch = self._text_feeds = None
        self._x0 = self._noise = self._staging = []
        self._blend = {}
