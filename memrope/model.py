"""The causal Wan2.1 DiT and the export-ready per-call step (spec sections 1, 2, 4).

Owns: the transformer (parameter names equal the Wan2.1 ``CausalWanModel`` state dict),
the cross-attention projection done once per prompt, and :class:`MemRoPEStep`, one DiT call
with the cache as explicit fixed-shape tensors in and what changed out (and, for a prompt
switch, :meth:`MemRoPEStep.recache`: the cache's tail re-encoded under a new prompt). Does not
own: which slot holds which frame (``memrope.cache.CachePolicy``), the sampler, or the loop.

Legend: B batch, F frames in a block, C latent channels, H/W latent height/width, S tokens per
frame, N = F * S block tokens, K context tokens, T text tokens, Hd heads, D head_dim, Q tail
frames re-cached at a prompt switch.
Wrapper I/O is ``[B, F, C, H, W]``.

Nothing in :meth:`MemRoPEStep.forward` reads a tensor value on the host: shapes are fixed by
the layout, and decisions arrive as tensors (``CacheControls``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memrope.cache import CacheControls, CacheLayout, memory_slots_view, memory_update
from memrope.config import WanConfig
from memrope.rope import RopeTables, apply_rope, rope_cos_sin


def _split_float32(values: torch.Tensor, keep_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``values`` -> float32 ``(hi, lo)`` with ``hi`` holding ``keep_bits`` significant
    bits (so small-integer multiples of it are exact in float32) and ``hi + lo ~= values``."""
    mantissa, exponent = torch.frexp(values)
    hi = torch.ldexp(torch.round(torch.ldexp(mantissa, torch.full_like(exponent, keep_bits))),
                     exponent - keep_bits)
    return hi.float(), (values - hi).float()


_TWO_PI = 2 * math.pi


def sinusoid_constants(freq_dim: int) -> dict[str, torch.Tensor]:
    """float32 constants of :func:`sinusoidal_features` (kept as buffers by the step)."""
    half = freq_dim // 2
    omega = torch.pow(torch.tensor(10000.0, dtype=torch.float64),
                      -torch.arange(half, dtype=torch.float64) / half)
    w_hi, w_lo = _split_float32(omega, 12)
    two_pi = torch.tensor([_TWO_PI], dtype=torch.float64)
    p1, _ = _split_float32(two_pi, 12)
    p2, p3 = _split_float32(two_pi - p1.double(), 12)
    return {"omega_hi": w_hi, "omega_lo": w_lo, "two_pi": torch.cat([p1, p2, p3])}


def sinusoidal_features(timestep: torch.Tensor, omega_hi: torch.Tensor, omega_lo: torch.Tensor,
                        two_pi: torch.Tensor) -> torch.Tensor:
    """``[cos(t * w), sin(t * w)]`` with ``w_j = 10000^(-j / (freq_dim/2))``, cos first.

    The reference computes the angles in float64 (float64 has no TensorRT kernels). This
    computes them in float32 to ~1 ulp of the float64 result instead of the ~4e-5 a plain
    float32 product loses at t = 1000: ``t = floor(t) + frac`` and ``w = w_hi + w_lo`` make
    ``floor(t) * w_hi`` exact, and a three-term 2*pi (Cody-Waite) reduces it exactly. The
    same function runs eagerly and in exported graphs.

    Args:
        timestep: ``[...]`` float, ``0 <= t < 2^12``.
        omega_hi, omega_lo, two_pi: from :func:`sinusoid_constants`.
    Returns:
        ``[..., freq_dim]`` float32.
    """
    p1, p2, p3 = two_pi[0], two_pi[1], two_pi[2]
    t = timestep.float()[..., None]
    t_int = torch.floor(t)
    t_frac = t - t_int
    big = t_int * omega_hi                   # exact: 12-bit integer x 12-bit mantissa
    k = torch.round(big / p1)
    reduced = ((big - k * p1) - k * p2) - k * p3
    angles = reduced + (t_int * omega_lo + t_frac * omega_hi + t_frac * omega_lo)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class WanRMSNorm(nn.Module):
    """RMSNorm over the full width; statistics in float32, cast back, then the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm in the activation dtype (this fork does not upcast; spec section 7.10)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class _WanAttention(nn.Module):
    """q, k, v, o projections with q/k RMSNorm over the full width (both attention kinds)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = WanRMSNorm(cfg.dim, cfg.eps)
        self.norm_k = WanRMSNorm(cfg.dim, cfg.eps)


class WanSelfAttention(_WanAttention):
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, N, dim]`` -> q, k (RMS-normed, un-rotated), v, each ``[B, N, Hd, D]``."""
        b, n, _ = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).view(shape)
        k = self.norm_k(self.k(x)).view(shape)
        v = self.v(x).view(shape)
        return q, k, v


class WanCrossAttention(_WanAttention):
    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text ``[B, T, dim]`` -> keys, values ``[B, T, Hd, D]`` (once per prompt)."""
        b, t, _ = context.shape
        shape = (b, t, self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).view(shape), self.v(context).view(shape)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)
        self.norm1 = WanLayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(cfg)
        self.norm3 = WanLayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(cfg)
        self.norm2 = WanLayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)
        self.norm = WanLayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.patch_channels)


class WanCausalDiT(nn.Module):
    """Causal Wan2.1 text-to-video DiT. Parameters only; the call lives in :class:`MemRoPEStep`."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.head.weight.dtype

    def encode_text(self, prompt_embeds: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Text embeddings ``[B, L <= text_len, text_dim]`` -> per-layer cross-attention keys
        and values ``[B, text_len, Hd, D]``. Rows past L are zero-padded and, as in the
        reference, not masked (spec section 7.8)."""
        cfg = self.config
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cfg.text_dim:
            raise ValueError(f"prompt_embeds must be [B, L, text_dim={cfg.text_dim}], "
                             f"got {list(prompt_embeds.shape)}")
        if prompt_embeds.shape[1] > cfg.text_len:
            raise ValueError(f"prompt_embeds has {prompt_embeds.shape[1]} tokens; the model "
                             f"takes at most text_len={cfg.text_len}")
        pad = cfg.text_len - prompt_embeds.shape[1]
        context = F.pad(prompt_embeds.to(self.dtype), (0, 0, 0, pad))
        context = self.text_embedding(context)
        keys, values = [], []
        for block in self.blocks:
            k, v = block.cross_attn.project_context(context)
            keys.append(k)
            values.append(v)
        return keys, values


@dataclass
class StepOutputs:
    """What one call returns.

    flow: ``[B, F, C, H, W]`` flow prediction ``v = eps - x0``.
    x0: ``[B, F, C, H, W]`` the clean prediction ``x_t - sigma * v`` (float32 arithmetic).
    block_keys/values: per layer ``[B, N, Hd, D]`` the block's un-rotated keys and values.
    memory_keys/values: per layer ``[B, 2, M, Hd, D]`` the memory after this call (empty
    lists for policies without memory).
    """

    flow: torch.Tensor
    x0: torch.Tensor
    block_keys: list[torch.Tensor]
    block_values: list[torch.Tensor]
    memory_keys: list[torch.Tensor]
    memory_values: list[torch.Tensor]


class MemRoPEStep(nn.Module):
    """One DiT call against the cache, with every piece of state explicit and fixed-shape.

    Binds a :class:`WanCausalDiT` to a :class:`CacheLayout` and a latent grid. The RoPE ladders
    are buffers; the per-call positions arrive in :class:`CacheControls`, so the rotation of
    queries and cached keys, the memory EMA and the attention window are all computed here
    (and so inside an exported graph), from the same inputs on every block.
    """

    def __init__(self, dit: WanCausalDiT, layout: CacheLayout, latent_height: int, latent_width: int):
        super().__init__()
        cfg = dit.config
        _, p_h, p_w = cfg.patch_size
        if latent_height % p_h or latent_width % p_w:
            raise ValueError(f"latent size {latent_height}x{latent_width} is not divisible by the "
                             f"patch size {p_h}x{p_w}")
        self.grid_h, self.grid_w = latent_height // p_h, latent_width // p_w
        if self.grid_h * self.grid_w != layout.frame_tokens:
            raise ValueError(f"layout has {layout.frame_tokens} tokens per frame but the latent "
                             f"grid {latent_height}x{latent_width} gives {self.grid_h * self.grid_w}")
        self.dit = dit
        self.layout = layout
        self.latent_height, self.latent_width = latent_height, latent_width
        tables = RopeTables(cfg.head_dim, self.grid_h, self.grid_w)
        for name in ("temporal_cos", "temporal_sin", "spatial_cos", "spatial_sin"):
            self.register_buffer(f"rope_{name}", getattr(tables, name), persistent=False)
        for name, value in sinusoid_constants(cfg.freq_dim).items():
            self.register_buffer(f"time_{name}", value, persistent=False)
        # Re-cache (prompt switch): keys sit at their slot index, and a tail slot may see every
        # slot whose block (slot // block_frames) is not later than its own.
        slots = torch.arange(layout.cache_frames)
        slot_block = slots // layout.block_frames
        self.register_buffer("recache_positions", slots, persistent=False)
        self.register_buffer("recache_causal", slot_block[None, :] <= slot_block[layout.tail_start_frame:, None],
                             persistent=False)

    @property
    def config(self) -> WanConfig:
        return self.dit.config

    # -- stages -----------------------------------------------------------------------------

    def _patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, F, C, H, W]`` -> tokens ``[B, F * S, dim]`` (Conv3d with kernel = stride)."""
        cfg = self.config
        _, p_h, p_w = cfg.patch_size
        b, f, c, _, _ = latents.shape
        x = latents.reshape(b, f, c, self.grid_h, p_h, self.grid_w, p_w)
        x = x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f * self.grid_h * self.grid_w, c * p_h * p_w)
        conv = self.dit.patch_embedding
        return F.linear(x, conv.weight.reshape(cfg.dim, -1), conv.bias)

    def _unpatchify(self, y: torch.Tensor, frames: int) -> torch.Tensor:
        """Head output ``[B, F * S, ph * pw * C]`` (channel fastest) -> ``[B, F, C, H, W]``."""
        cfg = self.config
        _, p_h, p_w = cfg.patch_size
        b = y.shape[0]
        y = y.reshape(b, frames, self.grid_h, self.grid_w, p_h, p_w, cfg.out_dim)
        y = y.permute(0, 1, 6, 2, 4, 3, 5)
        return y.reshape(b, frames, cfg.out_dim, self.grid_h * p_h, self.grid_w * p_w)

    def _time_embedding(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, F]`` -> e ``[B, F, 1, dim]`` (head) and e0 ``[B, F, 6, dim]`` (blocks)."""
        dit, cfg = self.dit, self.config
        b, f = timestep.shape
        features = sinusoidal_features(timestep.reshape(-1), self.time_omega_hi, self.time_omega_lo,
                                       self.time_two_pi).to(dit.dtype)
        e = dit.time_embedding(features)
        e0 = dit.time_projection(e).reshape(b, f, 6, cfg.dim)
        return e.reshape(b, f, 1, cfg.dim), e0

    def _context_kv(self, past: torch.Tensor, memory: torch.Tensor | None,
                    ready: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """The attended context ``[B, K, Hd, D]`` of one layer: the first ``frames`` slots
        (default ``context_frames``), with the memory slots replaced by the broadcast memory once
        it is ready."""
        lay = self.layout
        tokens = lay.context_tokens if frames is None else frames * lay.frame_tokens
        ctx = past[:, :tokens]
        if memory is None:
            return ctx
        start = lay.memory_start_frame * lay.frame_tokens
        end = start + lay.memory_frames * lay.frame_tokens
        slots = memory_slots_view(memory, lay.frame_tokens, past.dtype)
        shown = torch.where(ready, slots, ctx[:, start:end])
        if end == tokens:  # no zero-length pieces in an exported graph
            return torch.cat([ctx[:, :start], shown], dim=1)
        return torch.cat([ctx[:, :start], shown, ctx[:, end:]], dim=1)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        sigma: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        cross_keys: list[torch.Tensor],
        cross_values: list[torch.Tensor],
        controls: CacheControls,
        memory_keys: list[torch.Tensor] | None = None,
        memory_values: list[torch.Tensor] | None = None,
    ) -> StepOutputs:
        """One call.

        Args:
            latents: ``[B, F, C, H, W]`` noisy (or, for the context pass, clean) block.
            timestep: ``[B, F]`` float32 per-frame timestep.
            sigma: ``[1]`` float32 sigma of that timestep (for the x0 conversion).
            past_keys/values: per layer ``[B, cache_tokens, Hd, D]`` read-only cache.
            cross_keys/values: per layer ``[B, T, Hd, D]`` from :meth:`WanCausalDiT.encode_text`.
            controls: positions, validity and memory flags for this call.
            memory_keys/values: per layer ``[B, 2, M, Hd, D]`` (policies with memory only).
        """
        dit, cfg, lay = self.dit, self.config, self.layout
        b, frames = latents.shape[:2]
        tokens_per_frame = lay.frame_tokens
        if frames != lay.block_frames:
            raise ValueError(f"expected a block of {lay.block_frames} frames, got {frames}")

        # 1. Embeddings.
        x = self._patchify(latents.to(dit.dtype))
        e, e0 = self._time_embedding(timestep)

        # 2. Per-call RoPE and mask, shared by all layers.
        positions = torch.cat([controls.key_positions, controls.query_positions])
        cos, sin = rope_cos_sin(positions, self.rope_temporal_cos, self.rope_temporal_sin,
                                self.rope_spatial_cos, self.rope_spatial_sin)
        q_cos, q_sin = cos[lay.context_tokens:], sin[lay.context_tokens:]
        key_valid = controls.key_valid[:, None].expand(lay.context_frames, tokens_per_frame).reshape(-1)
        mask = torch.cat([key_valid, torch.ones(lay.block_tokens, dtype=torch.bool, device=x.device)])
        # [1, 1, N, K + N]: ONNX Runtime's Attention wants the query axis spelled out (a view here).
        mask = mask[None, None, None, :].expand(1, 1, lay.block_tokens, mask.shape[0])

        # 3. Transformer blocks.
        block_keys, block_values, new_mem_k, new_mem_v = [], [], [], []
        for i, block in enumerate(dit.blocks):
            m = (block.modulation[:, None] + e0).chunk(6, dim=2)  # each [B, F, 1, dim]
            h = block.norm1(x).view(b, frames, tokens_per_frame, cfg.dim) * (1 + m[1]) + m[0]
            q, k, v = block.self_attn.project(h.view(b, frames * tokens_per_frame, cfg.dim))
            block_keys.append(k)
            block_values.append(v)

            mem_k = mem_v = None
            if lay.has_memory:
                evicted_k = past_keys[i][:, lay.context_tokens:]
                evicted_v = past_values[i][:, lay.context_tokens:]
                mem_k, mem_v = memory_update(memory_keys[i], memory_values[i], evicted_k, evicted_v,
                                             controls.memory_init, controls.memory_update,
                                             lay.config, tokens_per_frame)
                new_mem_k.append(mem_k)
                new_mem_v.append(mem_v)
            keys = torch.cat([self._context_kv(past_keys[i], mem_k, controls.memory_ready), k], dim=1)
            values = torch.cat([self._context_kv(past_values[i], mem_v, controls.memory_ready), v], dim=1)

            q = apply_rope(q, q_cos, q_sin)
            keys = apply_rope(keys, cos, sin)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2),
                                                  values.transpose(1, 2), attn_mask=mask)
            y = block.self_attn.o(attn.transpose(1, 2).reshape(b, frames * tokens_per_frame, cfg.dim))
            x = x + (y.view(b, frames, tokens_per_frame, cfg.dim) * m[2]).view_as(x)

            x = x + block.cross_attn(block.norm3(x), cross_keys[i], cross_values[i])

            h = block.norm2(x).view(b, frames, tokens_per_frame, cfg.dim) * (1 + m[4]) + m[3]
            y = block.ffn(h.view_as(x))
            x = x + (y.view(b, frames, tokens_per_frame, cfg.dim) * m[5]).view_as(x)

        # 4. Head and unpatchify.
        head = dit.head
        n = (head.modulation[:, None] + e).chunk(2, dim=2)
        y = head.head(head.norm(x).view(b, frames, tokens_per_frame, cfg.dim) * (1 + n[1]) + n[0])
        flow = self._unpatchify(y.reshape(b, frames * tokens_per_frame, -1), frames)
        # 5. x0 = x_t - sigma * v: an fp32 island (the reference uses float64), cast back.
        x0 = (latents.float() - sigma.float() * flow.float()).to(flow.dtype)
        return StepOutputs(flow, x0, block_keys, block_values, new_mem_k, new_mem_v)

    def recache(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        cross_keys: list[torch.Tensor],
        cross_values: list[torch.Tensor],
        slot_valid: torch.Tensor,
        memory_ready: torch.Tensor | None = None,
        memory_keys: list[torch.Tensor] | None = None,
        memory_values: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Recompute the keys/values of the cache's tail slots from their clean latents, in one
        pass conditioned on ``cross_keys/values`` (a prompt switch's re-cache, LongLive style).

        The tail is every slot from ``tail_start_frame`` on (recent frames and the newest block;
        Q = ``tail_frames``). Each tail slot attends, block-causally by slot
        (``slot // block_frames``), to the slots before the tail as the cache holds them (sink,
        and the memory once ready) and to the tail's fresh keys/values. Positions are slot
        indices, as in :meth:`forward`, so nothing depends on where in the video the window is.
        The last layer's attention, FFN and the head are skipped: nothing reads them.

        Args:
            latents: ``[B, Q, C, H, W]`` clean latents of the tail slots, in slot order.
            timestep: ``[B, Q]`` float32 (the context timestep).
            past_keys/values: per layer ``[B, cache_tokens, Hd, D]``; only the slots before the
                tail are read, so the outputs may be written straight into the tail.
            cross_keys/values: per layer ``[B, T, Hd, D]`` of the prompt to re-cache under.
            (These per-layer lists, and the memory's, may leave out the last layer: it is not read.)
            slot_valid: ``[cache_frames]`` bool, the slot holds a frame (or the ready memory).
                An invalid tail slot is neither attended nor computed: its output is zero.
            memory_ready: ``[1]`` bool, the memory slots show the memory (policies with memory only).
            memory_keys/values: per layer ``[B, 2, M, Hd, D]`` (policies with memory only).
        Returns:
            Per layer keys and values ``[B, Q * S, Hd, D]`` (keys un-rotated).
        """
        dit, cfg, lay = self.dit, self.config, self.layout
        b, frames = latents.shape[:2]
        tokens_per_frame = lay.frame_tokens
        start = lay.tail_start_frame
        if frames != lay.tail_frames:
            raise ValueError(f"expected the {lay.tail_frames} tail frames, got {frames}")
        queries = frames * tokens_per_frame

        # 1. Embeddings.
        x = self._patchify(latents.to(dit.dtype))
        _, e0 = self._time_embedding(timestep)

        # 2. RoPE by slot, the block-causal mask over valid slots, the valid query tokens.
        cos, sin = rope_cos_sin(self.recache_positions, self.rope_temporal_cos, self.rope_temporal_sin,
                                self.rope_spatial_cos, self.rope_spatial_sin)
        q_cos, q_sin = cos[start * tokens_per_frame:], sin[start * tokens_per_frame:]
        allowed = self.recache_causal & slot_valid[None, :]
        mask = allowed[:, None, :, None].expand(frames, tokens_per_frame, lay.cache_frames, tokens_per_frame)
        mask = mask.reshape(1, 1, queries, lay.cache_tokens)
        query_valid = slot_valid[start:, None].expand(frames, tokens_per_frame).reshape(1, queries, 1, 1)

        # 3. Transformer blocks, up to the last layer's keys/values.
        keys_out, values_out = [], []
        last = len(dit.blocks) - 1
        for i, block in enumerate(dit.blocks):
            m = (block.modulation[:, None] + e0).chunk(6, dim=2)  # each [B, Q, 1, dim]
            h = block.norm1(x).view(b, frames, tokens_per_frame, cfg.dim) * (1 + m[1]) + m[0]
            q, k, v = block.self_attn.project(h.view(b, queries, cfg.dim))
            keys_out.append(torch.where(query_valid, k, 0.0))
            values_out.append(torch.where(query_valid, v, 0.0))
            if i == last:
                break

            if start == 0:
                keys, values = k, v
            else:
                mem_k = memory_keys[i] if lay.has_memory else None
                mem_v = memory_values[i] if lay.has_memory else None
                keys = torch.cat([self._context_kv(past_keys[i], mem_k, memory_ready, start), k], dim=1)
                values = torch.cat([self._context_kv(past_values[i], mem_v, memory_ready, start), v], dim=1)
            q = apply_rope(q, q_cos, q_sin)
            keys = apply_rope(keys, cos, sin)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2),
                                                  values.transpose(1, 2), attn_mask=mask)
            y = block.self_attn.o(attn.transpose(1, 2).reshape(b, queries, cfg.dim))
            x = x + (y.view(b, frames, tokens_per_frame, cfg.dim) * m[2]).view_as(x)

            x = x + block.cross_attn(block.norm3(x), cross_keys[i], cross_values[i])

            h = block.norm2(x).view(b, frames, tokens_per_frame, cfg.dim) * (1 + m[4]) + m[3]
            y = block.ffn(h.view_as(x))
            x = x + (y.view(b, frames, tokens_per_frame, cfg.dim) * m[5]).view_as(x)
        return keys_out, values_out


def build_dit(cfg: WanConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> WanCausalDiT:
    """A DiT holding exactly ``state_dict`` (keys and shapes checked strictly), in ``dtype``.

    Built on the meta device and filled by assignment, so the weights are never allocated
    twice (this matters at 1.3B)."""
    with torch.device("meta"):
        dit = WanCausalDiT(cfg)
    dit.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()},
                        strict=True, assign=True)
    return dit.eval().requires_grad_(False)


def random_state_dict(cfg: WanConfig, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Random float32 weights with sane scales, drawn in parameter order from one CPU generator
    (the golden traces' rule): modulation ``randn / sqrt(dim)``; Linear/Conv weights
    ``randn / sqrt(fan_in)``; biases ``0.05 * randn``; norm weights ``1 + 0.1 * randn``.
    Latency does not depend on weight values; these keep activations finite and non-trivial."""
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanCausalDiT(cfg).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("modulation"):
            out[name] = noise / cfg.dim ** 0.5
        elif "norm" in name and name.endswith("weight"):
            out[name] = 1 + 0.1 * noise
        elif name.endswith("bias"):
            out[name] = 0.05 * noise
        else:
            fan_in = math.prod(shape[1:])
            out[name] = noise / fan_in ** 0.5
    return out


def param_count(cfg: WanConfig) -> int:
    """Parameters of the DiT, from the config alone (46,440,704 per 1.3B block)."""
    d, f = cfg.dim, cfg.ffn_dim
    per_block = 6 * d + 8 * (d * d + d) + 4 * d + 2 * d + (d * f + f) + (f * d + d)
    p_t, p_h, p_w = cfg.patch_size
    glob = (d * cfg.in_dim * p_t * p_h * p_w + d) + (cfg.text_dim * d + d) + (d * d + d) \
        + (cfg.freq_dim * d + d) + (d * d + d) + (d * 6 * d + 6 * d) + 2 * d \
        + (d * cfg.patch_channels + cfg.patch_channels)
    return cfg.num_layers * per_block + glob


__all__ = ["MemRoPEStep", "StepOutputs", "WanCausalDiT", "build_dit", "param_count", "random_state_dict",
           "sinusoid_constants", "sinusoidal_features"]
