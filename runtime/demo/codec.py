"""The demo's latent spaces: video frames <-> the DiT's normalised latents.

Owns :class:`LatentCodec` (the interface training encodes clips with and scoring decodes with)
and :class:`PatchPCACodec`, a fixed linear code of 8 x 8 RGB patches with the Wan VAE's geometry.
The demo's VAE is trained with its latent pinned to this code (``memrope.runtime.demo.train_vae``),
so the DiT trains on the code directly while the VAE learns to produce and decode it. Does not own
the VAE (``train_vae``), the DiT's training (``train_dit``) or the world.

Geometry: 64 x 96 pixels (:data:`DEMO_HEIGHT` x :data:`DEMO_WIDTH`), 8x spatial and 4x temporal
strides (latent frame 0 is video frame 0; latent frame k covers video frames 4k-3 .. 4k).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from memrope.io import read_safetensors, save_safetensors_atomic

from . import world

DEMO_HEIGHT, DEMO_WIDTH = 64, 96   # pixels (latent 8 x 12 with the 8x VAE)
SPATIAL_STRIDE, TEMPORAL_STRIDE = 8, 4


class LatentCodec:
    """Video frames <-> the DiT's normalised latents.

    ``encode(frames)``: uint8 ``[B, Tv, H, W, 3]`` with ``Tv = 1 + 4 (T - 1)`` -> float32
    ``[B, T, C, H / 8, W / 8]``. ``decode(latents)``: the inverse direction, uint8 numpy
    ``[B, 1 + 4 (T - 1), H, W, 3]``.
    """

    name = "codec"
    latent_channels = 16

    def encode(self, frames: np.ndarray) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "latent_channels": self.latent_channels}


def _patches(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, H/8, W/8, 192]`` in [-1, 1] (row, column, channel)."""
    n, height, width, _ = frames.shape
    s = SPATIAL_STRIDE
    x = frames.astype(np.float32) / 127.5 - 1.0
    x = x.reshape(n, height // s, s, width // s, s, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, height // s, width // s, s * s * 3)


def _unpatch(patches: np.ndarray) -> np.ndarray:
    n, h, w, _ = patches.shape
    s = SPATIAL_STRIDE
    x = patches.reshape(n, h, w, s, s, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * s, w * s, 3)


class PatchPCACodec(LatentCodec):
    """Stand-in latent space until the demo's VAE is trained: a linear code of each 8 x 8 RGB
    patch (its first ``channels`` principal components over world frames, each scaled to unit
    variance), with latent frame ``k`` reading video frame ``4k`` (the last frame a causal Wan
    latent covers) and decoding held for the 4 video frames it covers.

    Same geometry as the Wan VAE (16 channels, 8x spatial, 4x temporal with the first frame
    alone), so the DiT and the engine run unchanged; not a Wan VAE, so it cannot ship in the demo
    folder. Round trips of the 50 evaluation prompts score 100% on every attribute.
    """

    name = "patch-pca"

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, scale: torch.Tensor):
        self.mean = mean.float()               # [192]
        self.components = components.float()   # [C, 192], orthonormal rows
        self.scale = scale.float()             # [C]
        self.latent_channels = int(components.shape[0])

    @classmethod
    def fit(cls, seed: int = 0, clips: int = 150, channels: int = 16) -> PatchPCACodec:
        """Principal components of patches of ``clips`` random world clips (deterministic per seed)."""
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(clips):
            scene = world.random_scene(rng, two_objects_probability=0.2)
            frames = world.render(scene, 41, height=DEMO_HEIGHT, width=DEMO_WIDTH,
                                  seed=int(rng.integers(1 << 31)))[::TEMPORAL_STRIDE]
            rows.append(_patches(frames).reshape(-1, SPATIAL_STRIDE * SPATIAL_STRIDE * 3))
        data = np.concatenate(rows).astype(np.float64)
        mean = data.mean(axis=0)
        _, singular, vt = np.linalg.svd(data - mean, full_matrices=False)
        scale = singular[:channels] / math.sqrt(data.shape[0])
        return cls(torch.from_numpy(mean), torch.from_numpy(vt[:channels]), torch.from_numpy(scale))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components, "scale": self.scale}

    @classmethod
    def load(cls, path: str | Path) -> PatchPCACodec:
        tensors = read_safetensors(path, "stand-in latent codec")
        return cls(tensors["mean"], tensors["components"], tensors["scale"])

    def save(self, path: str | Path) -> Path:
        return save_safetensors_atomic(self.state_dict(), path)

    def offset_pixels(self, offsets: torch.Tensor) -> torch.Tensor:
        """What adding ``offsets [..., C]`` (in code units) to every latent position means in
        pixels: the change of every decoded 8 x 8 patch, ``[..., 8, 8, 3]`` in [-1, 1] units (the
        code is linear, so the same change wherever it is added)."""
        s = SPATIAL_STRIDE
        return ((offsets.float() * self.scale) @ self.components).reshape(*offsets.shape[:-1], s, s, 3)

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        b, tv = frames.shape[:2]
        picked = frames[:, ::TEMPORAL_STRIDE]
        t = picked.shape[1]
        patches = torch.from_numpy(_patches(picked.reshape(b * t, *frames.shape[2:])))
        codes = (patches - self.mean) @ self.components.T / self.scale  # [B*T, h, w, C]
        return codes.reshape(b, t, *codes.shape[1:]).permute(0, 1, 4, 2, 3).contiguous()

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        b, t, c, h, w = latents.shape
        codes = latents.detach().float().cpu().permute(0, 1, 3, 4, 2).reshape(b * t, h, w, c)
        patches = (codes * self.scale) @ self.components + self.mean
        images = np.clip(np.rint((_unpatch(patches.numpy()) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        images = images.reshape(b, t, *images.shape[1:])
        held = np.repeat(images[:, 1:], TEMPORAL_STRIDE, axis=1)
        return np.concatenate([images[:, :1], held], axis=1)
