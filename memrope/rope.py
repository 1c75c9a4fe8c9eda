"""3D rotary position embedding of Wan2.1 in real arithmetic (spec section 2).

Owns: the frequency ladders, the per-token cos/sin for a set of frame positions on a fixed
(h', w') token grid, and the rotation. No complex tensors, so it exports to ONNX/TensorRT.

Legend: B batch, L tokens, H heads, D head_dim, P = D/2 rotary pairs, F frames, S tokens per
frame (grid_h * grid_w).

Pairs are interleaved: channels (2j, 2j+1) form pair j. Pairs [0, P_t) rotate with the temporal
index, [P_t, P_t+P_s) with the row h', the rest with the column w', where P_s = P // 3 and
P_t = P - 2 * P_s (22/21/21 for D = 128, 6/5/5 for D = 32).
"""

from __future__ import annotations

import torch

ROPE_THETA = 10000.0
# The reference builds its tables for 1024 positions on every axis (spec section 2).
ROPE_MAX_POSITIONS = 1024


def rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs per axis (time, height, width) for a head of ``head_dim`` channels."""
    pairs = head_dim // 2
    spatial = pairs // 3
    return pairs - 2 * spatial, spatial, spatial


def _axis_angles(pairs: int, positions: int) -> torch.Tensor:
    """``[positions, pairs]`` float64 angles ``p * theta^(-2j / (2 * pairs))``."""
    exponent = torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs)
    inv_freq = 1.0 / torch.pow(torch.tensor(ROPE_THETA, dtype=torch.float64), exponent)
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)


class RopeTables:
    """Precomputed cos/sin ladders for one head size and one token grid.

    ``temporal_cos/sin``: ``[ROPE_MAX_POSITIONS, P_t]``, gathered by frame position at call time
    (the "online" part). ``spatial_cos/sin``: ``[S, P - P_t]``, fixed by the grid.
    Angles are computed in float64 as in the reference, then stored in float32.
    """

    def __init__(self, head_dim: int, grid_h: int, grid_w: int):
        p_t, p_h, p_w = rope_pair_split(head_dim)
        if max(grid_h, grid_w) > ROPE_MAX_POSITIONS:
            raise ValueError(f"token grid {grid_h}x{grid_w} exceeds {ROPE_MAX_POSITIONS} positions")
        self.head_dim = head_dim
        self.frame_tokens = grid_h * grid_w
        t = _axis_angles(p_t, ROPE_MAX_POSITIONS)
        h = _axis_angles(p_h, grid_h)
        w = _axis_angles(p_w, grid_w)
        # Token s = h' * grid_w + w' (row-major inside a frame).
        spatial = torch.cat(
            [h[:, None, :].expand(grid_h, grid_w, p_h), w[None, :, :].expand(grid_h, grid_w, p_w)],
            dim=-1,
        ).reshape(grid_h * grid_w, p_h + p_w)
        self.temporal_cos = torch.cos(t).float()
        self.temporal_sin = torch.sin(t).float()
        self.spatial_cos = torch.cos(spatial).float()
        self.spatial_sin = torch.sin(spatial).float()

    def to(self, device: torch.device | str) -> RopeTables:
        for name in ("temporal_cos", "temporal_sin", "spatial_cos", "spatial_sin"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def rope_cos_sin(
    frame_positions: torch.Tensor,
    temporal_cos: torch.Tensor,
    temporal_sin: torch.Tensor,
    spatial_cos: torch.Tensor,
    spatial_sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos/sin for frames at ``frame_positions``.

    Args:
        frame_positions: ``[F]`` int64 temporal index of each frame (window-relative).
        temporal_*: ``[ROPE_MAX_POSITIONS, P_t]``; spatial_*: ``[S, P - P_t]``.
    Returns:
        cos, sin: ``[F * S, P]`` float32, frame-major.
    """
    num_frames = frame_positions.shape[0]
    frame_tokens, spatial_pairs = spatial_cos.shape
    pairs_t = temporal_cos.shape[1]

    def combine(table: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
        t = table.index_select(0, frame_positions)[:, None, :].expand(num_frames, frame_tokens, pairs_t)
        s = spatial[None, :, :].expand(num_frames, frame_tokens, spatial_pairs)
        return torch.cat([t, s], dim=-1).reshape(num_frames * frame_tokens, pairs_t + spatial_pairs)

    return combine(temporal_cos, spatial_cos), combine(temporal_sin, spatial_sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``[B, L, H, D]`` by per-token ``cos/sin`` ``[L, D/2]``.

    Computed in float32 (the reference uses float64) and cast back to ``x.dtype``.
    """
    batch, tokens, heads, head_dim = x.shape
    pairs = x.float().reshape(batch, tokens, heads, head_dim // 2, 2)
    x_even, x_odd = pairs[..., 0], pairs[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack([x_even * c - x_odd * s, x_even * s + x_odd * c], dim=-1)
    return out.reshape(batch, tokens, heads, head_dim).to(x.dtype)
