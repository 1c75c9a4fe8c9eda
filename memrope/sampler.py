"""Flow-matching schedule, warped denoising steps, x0 conversion and re-noising (spec 3.1).

Owns the sampler arithmetic and the noise sources. Everything that depends only on the
schedule (timesteps, sigmas) is computed once on the host; per call the loop does two
elementwise ops on device tensors.

Conventions: ``x_t = (1 - sigma) * x0 + sigma * eps``; the model predicts ``v = eps - x0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memrope.config import SamplerConfig


@dataclass(frozen=True)
class Schedule:
    """The per-step constants of one run.

    step_timesteps: float32 value fed to the model at each denoising step (e.g. 1000, 937.5,
      833.3333129882812, 625 for the shipped config).
    step_sigmas: float32 sigma looked up for each step (used by x0 conversion and re-noising).
    context_timestep: timestep of the context pass (0 in every shipped config).
    context_sigma: its looked-up sigma (the context pass's x0 is discarded).
    """

    step_timesteps: tuple[float, ...]
    step_sigmas: tuple[float, ...]
    context_timestep: float
    context_sigma: float

    @property
    def num_steps(self) -> int:
        return len(self.step_timesteps)


def flow_match_tables(shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`` training tables.

    Returns ``(sigmas, timesteps)``, each ``[num_train_timesteps]`` float32.
    """
    s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas, sigmas * num_train_timesteps


def _lookup_sigma(sigmas: torch.Tensor, timesteps: torch.Tensor, t: float) -> float:
    index = torch.argmin((timesteps - torch.tensor(t, dtype=torch.float32)).abs())
    return float(sigmas[index])


def build_schedule(cfg: SamplerConfig) -> Schedule:
    sigmas, timesteps = flow_match_tables(cfg.shift, cfg.num_train_timesteps)
    steps = torch.tensor(cfg.denoising_steps, dtype=torch.int64)
    if cfg.warp_denoising_step:
        table = torch.cat([timesteps, torch.zeros(1, dtype=torch.float32)])
        step_t = table[cfg.num_train_timesteps - steps]
    else:
        # int64 x float32 promotes to float32 in the reference.
        step_t = steps.to(torch.float32)
    step_timesteps = tuple(float(t) for t in step_t)
    step_sigmas = tuple(_lookup_sigma(sigmas, timesteps, t) for t in step_timesteps)
    context_t = float(torch.tensor(cfg.context_timestep, dtype=torch.float32))
    return Schedule(step_timesteps, step_sigmas, context_t, _lookup_sigma(sigmas, timesteps, context_t))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * eps`` with a float32 sigma, result in the noise dtype.

    ``sigma`` may be a float or a float32 tensor of shape ``[1]`` already on the device (the
    loop's, so no allocation per step). A non-scalar float32 sigma promotes bf16 operands to
    float32, as the reference's ``[B, 1, 1, 1]`` sigma does (a 0-dim tensor would not).
    """
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.full((1,), sigma, dtype=torch.float32, device=x0.device)
    return ((1 - sigma) * x0 + sigma * noise).to(noise.dtype)


class NoiseSource:
    """Writes each block's noise into a buffer the loop owns (no allocation per block).

    ``draw(block, out)`` fills ``out [num_steps, B, F, C, H, W]``: ``out[0]`` is the block's
    initial noise, ``out[i]`` (``i >= 1``) the re-noising draw after denoising step ``i - 1``.
    The loop calls it once per block, in block order, possibly one block ahead of the compute
    (a block's draws all come after the previous block's, so drawing ahead keeps the order).

    ``device``: ``None`` when the source draws on the host (the loop stages it through pinned
    memory and copies it without blocking); a device for a source that draws there directly.
    ``dtype``: the dtype it draws in (``None``: any, converted on copy).
    """

    device: torch.device | None = None
    dtype: torch.dtype | None = None

    def check(self, block_shape: tuple[int, ...], num_steps: int) -> None:
        """Raise ValueError if this source cannot fill ``[num_steps, *block_shape]`` buffers."""

    def draw(self, block: int, out: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _check_shape(what: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(f"{what} has shape {list(got)}, expected {list(expected)} (batch, frames per block, "
                         "latent channels, latent height, latent width)")


class TensorNoise(NoiseSource):
    """Noise given as tensors (e.g. read from a file).

    noise: ``[B, num_frames, C, H, W]``; intermediate: ``[blocks, steps - 1, F, C, H, W]``
    (batch 1) or ``[blocks, steps - 1, B * F, C, H, W]``.
    """

    def __init__(self, noise: torch.Tensor, intermediate: torch.Tensor, block_frames: int):
        self.noise, self.intermediate, self.block_frames = noise, intermediate, block_frames

    def check(self, block_shape: tuple[int, ...], num_steps: int) -> None:
        batch, frames = block_shape[:2]
        _check_shape("noise for one block", (self.noise.shape[0], frames, *self.noise.shape[2:]), block_shape)
        expected = (self.intermediate.shape[0], num_steps - 1, batch * frames, *block_shape[2:])
        if tuple(self.intermediate.shape) != expected:
            raise ValueError(f"intermediate_noise has shape {list(self.intermediate.shape)}, expected "
                             f"{list(expected)} (blocks, denoising steps - 1, batch * frames per block, C, H, W)")

    def draw(self, block: int, out: torch.Tensor) -> None:
        f = self.block_frames
        if (block + 1) * f > self.noise.shape[1] or block >= self.intermediate.shape[0]:
            raise ValueError(f"the noise tensors cover {self.noise.shape[1] // f} blocks; block {block} has none")
        out[0].copy_(self.noise[:, block * f:(block + 1) * f])
        out[1:].copy_(self.intermediate[block].reshape(out[1:].shape))


class SeededNoise(NoiseSource):
    """The reference's draw order from one CPU ``torch.Generator(seed)``.

    Draws the whole initial noise ``[B, num_frames, C, H, W]`` first, then ``[B * F, C, H, W]``
    after each denoising step but the last, block after block, in ``dtype`` (bf16 in the
    authors' runs). CPU draws make the result the same on any device.
    """

    def __init__(self, seed: int, batch: int, num_frames: int, latent_shape: tuple[int, int, int],
                 block_frames: int, dtype: torch.dtype = torch.float32):
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.block_frames, self.dtype = block_frames, dtype
        self.block_shape = (batch, block_frames, *latent_shape)
        self.noise = torch.randn([batch, num_frames, *latent_shape], generator=self.generator, dtype=dtype)

    def check(self, block_shape: tuple[int, ...], num_steps: int) -> None:
        _check_shape("seeded noise", self.block_shape, block_shape)

    def draw(self, block: int, out: torch.Tensor) -> None:
        f = self.block_frames
        if (block + 1) * f > self.noise.shape[1]:
            raise ValueError(f"the seeded noise was drawn for {self.noise.shape[1] // f} blocks; block {block} "
                             "has none")
        out[0].copy_(self.noise[:, block * f:(block + 1) * f])
        for step in range(1, out.shape[0]):
            # [B, F, C, H, W] holds the reference's [B * F, C, H, W] draw element for element.
            torch.randn(self.block_shape, generator=self.generator, dtype=self.dtype, out=out[step])


class StreamingSeededNoise(NoiseSource):
    """Constant-memory noise for unbounded videos: one CPU generator drawn block by block
    (the block's initial noise, then its re-noising draws). Deterministic for a seed, but not
    the reference's stream, which draws all initial noise up front."""

    def __init__(self, seed: int, batch: int, latent_shape: tuple[int, int, int], block_frames: int,
                 dtype: torch.dtype = torch.float32):
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.block_shape = (batch, block_frames, *latent_shape)
        self.dtype = dtype

    def check(self, block_shape: tuple[int, ...], num_steps: int) -> None:
        _check_shape("seeded noise", self.block_shape, block_shape)

    def draw(self, block: int, out: torch.Tensor) -> None:
        for step in range(out.shape[0]):
            torch.randn(self.block_shape, generator=self.generator, dtype=self.dtype, out=out[step])


class DeviceNoise(NoiseSource):
    """Noise drawn on the device by a device generator, straight into the loop's buffer: no host
    draw and no copy. Deterministic for a seed and device, but neither the reference's stream nor
    the same across devices (use :class:`SeededNoise` for that)."""

    def __init__(self, seed: int, device: torch.device | str):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def draw(self, block: int, out: torch.Tensor) -> None:
        torch.randn(out.shape, generator=self.generator, dtype=out.dtype, device=out.device, out=out)
