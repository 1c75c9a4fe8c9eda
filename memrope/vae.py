"""The streaming Wan VAE decoder as a pure function: latents and an explicit feature cache in,
video frames and the updated cache out. This is what ``vae_decode.onnx`` computes.

Owns: :class:`VAEDecoderConfig` (the decoder's sizes, read from a diffusers ``AutoencoderKLWan``
config), the feature-cache layout (:func:`feature_cache_layout`: one tensor per causal 3D conv,
in execution order, and its bytes), and :class:`WanStreamingDecoder`, a torch module holding the
weights of the Wan VAE decoder (diffusers' parameter names) whose ``forward`` is one decode step
with no Python branch on data: de-normalisation, the decoder, the first-frame case, clamping and
the float -> uint8 conversion are all in the graph.

Does not own: loading model folders and the diffusers reference decode (``memrope.runtime.vae``), the
ONNX export (``memrope.export.vae_export``), running the graph (``engine``), the per-block driver that
owns the fixed buffers (``memrope.runtime.vae``).

Numerics (spec section 5.1, diffusers 0.42 ``autoencoder_kl_wan.py``):
- every temporal conv is causal with a 3-frame kernel and caches the last ``CACHE_FRAMES = 2``
  frames of its input. Diffusers starts from an empty cache and pads with zeros; a zero-filled
  cache is the same computation, so the cache here is always two frames and starts at zero;
- the 3D upsamplers' time conv is skipped for the very first latent frame (diffusers marks its
  cache ``"Rep"``): that frame yields one frame where later frames yield two, and it never
  enters the time conv's cache;
- RMS norm is ``F.normalize`` over channels (float32 for half types) times ``sqrt(C) * gamma``;
  nearest 2x spatial upsampling; one single-head attention per frame in the middle block;
- latents are de-normalised as ``z / (1 / std) + mean`` (the reference divides by the
  reciprocal), then ``post_quant_conv``; the output is clamped to [-1, 1], then
  ``floor((x * 0.5 + 0.5).clamp(0, 1) * 255)`` as uint8 (the reference's truncating cast).

The first-frame case without a data-dependent branch: every step has the same shapes. A step of
``T`` latent frames always produces ``4 T`` output frames (positions). With ``first_frame`` set,
the first latent frame's single real frame sits at the LAST of its positions at every stage and
the positions before it are padding: they are zeroed at the input of every causal conv (exactly
the zeros diffusers pads with), the 3D upsamplers' time conv never sees the first latent frame,
and its output pair is replaced by (padding, the frame itself) with ``Where``. So the step's
first ``VAE_TEMPORAL_STRIDE - 1`` output frames are padding that the driver drops; everything else
equals diffusers' decode. With ``first_frame`` set, the cache inputs are ignored (read as zeros),
so a new video needs no buffer reset. In steady state the masks select the identity (bit-exact).

Legend: B batch, T latent frames per step, C channels, h/w latent height/width, H/W pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memrope.config import VAE_SPATIAL_STRIDE, VAE_TEMPORAL_STRIDE

CACHE_FRAMES = 2          # diffusers' CACHE_T: frames of context each causal conv keeps
# Latent frames per exported decode step. One, not a DiT block of three: the same work per frame
# either way (the causal convs see the same context), but a third of the peak activation memory
# (the last stage of a 832x480 step is 96 x 4 x 480 x 832 per tensor), the shapes of diffusers'
# own per-frame loop (and Self-Forcing's TensorRT decoder), and no padding waste beyond one
# frame at the start of a video. docs/bench_frame_path_cpu.md has the measured 1-vs-3 comparison.
STEP_LATENT_FRAMES = 1
TIME_KERNEL = CACHE_FRAMES + 1
RMS_EPS = 1e-12           # F.normalize's eps

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class VAEDecoderConfig:
    """Sizes of a Wan VAE decoder (Wan2.1 by default; Wan2.2's residual decoder is accepted).

    ``base_dim`` is the decoder's (diffusers' ``decoder_base_dim`` when set);
    ``temporal_upsample[i]`` says whether up block ``i`` doubles time (diffusers reverses the
    encoder's ``temperal_downsample``).
    """

    z_dim: int = 16
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_upsample: tuple[bool, ...] = (True, True, False)
    is_residual: bool = False
    out_channels: int = 3
    patch_size: int | None = None
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self) -> None:
        for name in ("z_dim", "base_dim", "num_res_blocks", "out_channels"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                     f"VAE {name} must be a positive integer, got {value!r}")
        _require(len(self.dim_mult) >= 1 and all(isinstance(m, int) and m > 0 for m in self.dim_mult),
                 f"VAE dim_mult must be positive integers, got {self.dim_mult!r}")
        _require(len(self.temporal_upsample) == len(self.dim_mult) - 1,
                 f"VAE temporal_upsample needs {len(self.dim_mult) - 1} entries (one per upsampling "
                 f"stage), got {self.temporal_upsample!r}")
        _require(self.patch_size is None or (isinstance(self.patch_size, int) and self.patch_size > 0),
                 f"VAE patch_size must be None or a positive integer, got {self.patch_size!r}")
        patch = self.patch_size or 1
        _require(self.out_channels % (patch * patch) == 0,
                 f"VAE out_channels {self.out_channels} is not divisible by patch_size^2 = {patch * patch}")
        _require(len(self.latents_mean) == self.z_dim and len(self.latents_std) == self.z_dim,
                 f"VAE latents_mean/latents_std need z_dim = {self.z_dim} values each, got "
                 f"{len(self.latents_mean)} and {len(self.latents_std)}")
        _require(all(s != 0 for s in self.latents_std), "VAE latents_std must be non-zero")

    @classmethod
    def from_diffusers(cls, config: Mapping) -> VAEDecoderConfig:
        """From an ``AutoencoderKLWan`` config (``vae.config`` or ``vae/config.json``)."""
        get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
        z_dim = get("z_dim", 16)
        mean = get("latents_mean", None)
        std = get("latents_std", None)
        if mean is None or std is None:
            mean, std = ((WAN21_LATENTS_MEAN, WAN21_LATENTS_STD) if z_dim == len(WAN21_LATENTS_MEAN)
                         else ((0.0,) * z_dim, (1.0,) * z_dim))
        downsample = get("temperal_downsample", [False, True, True])
        return cls(z_dim=z_dim, base_dim=get("decoder_base_dim", None) or get("base_dim", 96),
                   dim_mult=tuple(get("dim_mult", (1, 2, 4, 4))), num_res_blocks=get("num_res_blocks", 2),
                   temporal_upsample=tuple(bool(t) for t in downsample[::-1]),
                   is_residual=bool(get("is_residual", False)), out_channels=get("out_channels", 3),
                   patch_size=get("patch_size", None), latents_mean=tuple(float(m) for m in mean),
                   latents_std=tuple(float(s) for s in std))

    @classmethod
    def from_dict(cls, raw: Mapping) -> VAEDecoderConfig:
        """Inverse of :meth:`to_dict` (artifacts' ``config.json``)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        _require(not unknown, f"unknown VAE decoder config keys {unknown}; expected some of {sorted(known)}")
        tuples = {"dim_mult", "temporal_upsample", "latents_mean", "latents_std"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in raw.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_levels(self) -> int:
        return len(self.dim_mult)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (self.num_levels - 1) * (self.patch_size or 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_upsample)

    @property
    def pixel_channels(self) -> int:
        return self.out_channels // (self.patch_size or 1) ** 2

    def up_blocks(self) -> list[tuple[int, int, str | None]]:
        """``(in_dim, out_dim, upsample mode)`` of each up block, as diffusers builds them."""
        dims = [self.base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        out = []
        for i in range(self.num_levels):
            in_dim, out_dim = dims[i], dims[i + 1]
            if i > 0 and not self.is_residual:
                in_dim //= 2  # Wan2.1: the previous upsampler halved the channels
            mode = None
            if i != self.num_levels - 1:
                mode = "upsample3d" if self.temporal_upsample[i] else "upsample2d"
            out.append((in_dim, out_dim, mode))
        return out

    @property
    def mid_dim(self) -> int:
        return self.base_dim * self.dim_mult[-1]


# ------------------------------------------------------------------------------------------------
# The feature-cache layout
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheSlot:
    """One causal conv's cache: ``[B, channels, CACHE_FRAMES, h * scale, w * scale]``."""

    module: str          # the conv's parameter prefix, e.g. "decoder.up_blocks.1.resnets.0.conv1"
    channels: int
    spatial_scale: int   # relative to the latent grid

    def shape(self, batch: int, latent_height: int, latent_width: int) -> tuple[int, ...]:
        s = self.spatial_scale
        return (batch, self.channels, CACHE_FRAMES, latent_height * s, latent_width * s)


def feature_cache_layout(cfg: VAEDecoderConfig) -> tuple[CacheSlot, ...]:
    """Every causal conv's cache slot, in the order a decode step reads and writes them."""
    slots = [CacheSlot("decoder.conv_in", cfg.z_dim, 1)]

    def resnet(prefix: str, in_dim: int, out_dim: int, scale: int) -> None:
        slots.append(CacheSlot(f"{prefix}.conv1", in_dim, scale))
        slots.append(CacheSlot(f"{prefix}.conv2", out_dim, scale))

    resnet("decoder.mid_block.resnets.0", cfg.mid_dim, cfg.mid_dim, 1)
    resnet("decoder.mid_block.resnets.1", cfg.mid_dim, cfg.mid_dim, 1)
    for i, (in_dim, out_dim, mode) in enumerate(cfg.up_blocks()):
        scale = 2 ** i
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", in_dim if j == 0 else out_dim, out_dim, scale)
        if mode == "upsample3d":
            upsampler = "upsampler" if cfg.is_residual else "upsamplers.0"
            slots.append(CacheSlot(f"decoder.up_blocks.{i}.{upsampler}.time_conv", out_dim, scale))
    last_dim = cfg.up_blocks()[-1][1]
    slots.append(CacheSlot("decoder.conv_out", last_dim, 2 ** (cfg.num_levels - 1)))
    return tuple(slots)


def feature_cache_bytes(cfg: VAEDecoderConfig, batch: int, latent_height: int, latent_width: int,
                        element_bytes: int) -> int:
    """Bytes of the whole feature cache (read and written once per decode step)."""
    return sum(math.prod(slot.shape(batch, latent_height, latent_width))
               for slot in feature_cache_layout(cfg)) * element_bytes


def check_engine_geometry(cfg: VAEDecoderConfig) -> None:
    """The engine's latent <-> video arithmetic is Wan2.1's; refuse a VAE with another one."""
    _require(cfg.spatial_stride == VAE_SPATIAL_STRIDE and cfg.temporal_stride == VAE_TEMPORAL_STRIDE,
             f"the engine's video geometry is Wan2.1's ({VAE_SPATIAL_STRIDE}x spatial, {VAE_TEMPORAL_STRIDE}x "
             f"temporal); this VAE upsamples {cfg.spatial_stride}x and {cfg.temporal_stride}x")


def padding_frames(cfg: VAEDecoderConfig) -> int:
    """Padding frames at the start of a first step's output (the first latent frame yields one
    frame where the others yield ``temporal_stride``)."""
    return cfg.temporal_stride - 1


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------

class VAEConv(nn.Module):
    """A decoder convolution: weights with diffusers' names (``weight``, ``bias``), stored 5D
    ``[O, I, t, kh, kw]``; space padded here, time causally by the feature cache. Public so that a
    quantized export can find the convolutions (``memrope.export.quantize``)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, *kernel), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_dim), requires_grad=False)
        self.padding = (0, kernel[1] // 2, kernel[2] // 2)  # time is padded causally by the cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight, self.bias, padding=self.padding)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim, 1, 1, 1), requires_grad=False)
        self.scale = dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics for half types, as diffusers' WanRMS_norm.
        xf = x.float()
        norm = torch.sqrt((xf * xf).sum(dim=1, keepdim=True)).clamp_min(RMS_EPS)
        return (xf / norm).to(x.dtype) * self.scale * self.gamma


class _Step:
    """Trace-time state of one decode step: the cache inputs consumed in layout order, the new
    caches produced, and the first-frame masks. Python here only follows the static structure."""

    def __init__(self, caches: tuple[torch.Tensor, ...], first_frame: torch.Tensor,
                 patterns: Mapping[tuple[int, int], torch.Tensor]):
        self.inputs: Iterator[torch.Tensor] = iter(caches)
        self.outputs: list[torch.Tensor] = []
        self.first = first_frame.reshape(1, 1, 1, 1, 1)
        self.patterns = patterns
        self.positions_per_latent = 1   # doubles at each temporal upsampler

    def first_positions(self, exclude_last: bool) -> torch.Tensor | None:
        """Bool ``[1, 1, T_stage, 1, 1]``: the first latent frame's positions at this stage
        (``exclude_last``: only its padding positions), and only when ``first_frame`` is set."""
        s = self.positions_per_latent
        count = s - 1 if exclude_last else s
        if count == 0:
            return None
        return torch.logical_and(self.first, self.patterns[(s, count)])

    def causal(self, conv: VAEConv, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """``conv`` over ``[cache | x]`` along time; records the last two frames as the new cache."""
        cache = next(self.inputs)
        if cache.shape[1] != x.shape[1] or cache.shape[3:] != x.shape[3:]:
            raise ValueError(f"feature cache {len(self.outputs)} has shape {list(cache.shape)}, expected "
                             f"[B, {x.shape[1]}, {CACHE_FRAMES}, {x.shape[3]}, {x.shape[4]}]")
        # masked_fill, not where(zeros_like): a zeros_like would be folded into a full-size constant.
        cache = cache.masked_fill(self.first, 0.0)
        if zero is not None:
            x = x.masked_fill(zero, 0.0)
        full = torch.cat([cache, x], dim=2)
        self.outputs.append(full[:, :, -CACHE_FRAMES:])
        return conv(full)


class _ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = _RMSNorm(in_dim)
        self.conv1 = VAEConv(in_dim, out_dim, (TIME_KERNEL, 3, 3))
        self.norm2 = _RMSNorm(out_dim)
        self.conv2 = VAEConv(out_dim, out_dim, (TIME_KERNEL, 3, 3))
        self.conv_shortcut = VAEConv(in_dim, out_dim, (1, 1, 1)) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        zero = step.first_positions(exclude_last=True)
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = step.causal(self.conv1, F.silu(self.norm1(x)), zero)
        x = step.causal(self.conv2, F.silu(self.norm2(x)), zero)
        return x + h


class _AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (diffusers' WanAttentionBlock)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = _RMSNorm(dim)
        self.to_qkv = VAEConv(dim, 3 * dim, (1, 1, 1))
        self.proj = VAEConv(dim, dim, (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 3 * c, t, h * w).permute(0, 2, 3, 1)  # [B, T, hw, 3C]
        q, k, v = qkv.chunk(3, dim=-1)
        # softmax in float32: the scores of a 60x104 frame are 6240 wide.
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(c))
        out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)                      # [B, T, hw, C]
        out = out.permute(0, 3, 1, 2).reshape(b, c, t, h, w)
        return self.proj(out) + x


class _MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([_ResidualBlock(dim, dim), _ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([_AttentionBlock(dim)])

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        x = self.resnets[0](x, step)
        x = self.attentions[0](x)
        return self.resnets[1](x, step)


def _upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B, C, T, 2H, 2W]``, nearest (= diffusers' nearest-exact at 2x).
    Expand + Reshape, not ``Resize``: ONNX Runtime's CPU Resize was slower here (demo VAE profile)."""
    b, c, t, h, w = x.shape
    return x.reshape(b, c, t, h, 1, w, 1).expand(b, c, t, h, 2, w, 2).reshape(b, c, t, 2 * h, 2 * w)


class _Resample(nn.Module):
    """Diffusers' WanResample in its two decoder modes; ``resample.1`` is the spatial conv."""

    def __init__(self, dim: int, mode: str, out_dim: int):
        super().__init__()
        self.mode = mode
        self.resample = nn.ModuleList([nn.Identity(), VAEConv(dim, out_dim, (1, 3, 3))])
        self.time_conv = VAEConv(dim, 2 * dim, (TIME_KERNEL, 1, 1)) if mode == "upsample3d" else None

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        if self.time_conv is not None:
            b, c, t, h, w = x.shape
            first_latent = step.first_positions(exclude_last=False)
            # The first latent frame never enters the time conv ("Rep"): its positions read as zeros.
            y = step.causal(self.time_conv, x, first_latent)            # [B, 2C, T, h, w]
            y = y.reshape(b, 2, c, t, h, w)
            # ... and its own output pair is (padding, the frame itself).
            early = y[:, 0].masked_fill(first_latent, 0.0)
            late = torch.where(first_latent, x, y[:, 1])
            x = torch.stack((early, late), dim=3).reshape(b, c, 2 * t, h, w)
            step.positions_per_latent *= 2
        return self.resample[1](_upsample_nearest2x(x))


class _DupUp3D(nn.Module):
    """Wan2.2's parameter-free shortcut of a residual up block (channel repeat, then to time/space)."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        ft, fs, o = self.factor_t, self.factor_s, self.out_dim
        x = x.reshape(b, c, 1, t, h, w).expand(b, c, self.repeats, t, h, w).reshape(b, c * self.repeats, t, h, w)
        x = x.reshape(b, o, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        # With first_frame set, diffusers drops the first factor_t - 1 frames; here they land on
        # the padding positions, which every later causal conv zeroes.
        return x.reshape(b, o, t * ft, h * fs, w * fs)


class _UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None, residual: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                      for j in range(num_res_blocks + 1)])
        self.residual = residual
        resample = None
        if mode is not None:
            resample = _Resample(out_dim, mode, out_dim if residual else out_dim // 2)
        if residual:
            self.upsampler = resample
            self.avg_shortcut = (_DupUp3D(in_dim, out_dim, 2 if mode == "upsample3d" else 1, 2)
                                 if mode is not None else None)
        else:
            self.upsamplers = nn.ModuleList([resample]) if resample is not None else None

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        shortcut = x
        for resnet in self.resnets:
            x = resnet(x, step)
        if self.residual:
            if self.upsampler is not None:
                x = self.upsampler(x, step)
            if self.avg_shortcut is not None:
                x = x + self.avg_shortcut(shortcut)
        elif self.upsamplers is not None:
            x = self.upsamplers[0](x, step)
        return x


class _Decoder(nn.Module):
    def __init__(self, cfg: VAEDecoderConfig):
        super().__init__()
        self.conv_in = VAEConv(cfg.z_dim, cfg.mid_dim, (TIME_KERNEL, 3, 3))
        self.mid_block = _MidBlock(cfg.mid_dim)
        self.up_blocks = nn.ModuleList([_UpBlock(i, o, cfg.num_res_blocks, mode, cfg.is_residual)
                                        for i, o, mode in cfg.up_blocks()])
        last = cfg.up_blocks()[-1][1]
        self.norm_out = _RMSNorm(last)
        self.conv_out = VAEConv(last, cfg.out_channels, (TIME_KERNEL, 3, 3))

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        x = step.causal(self.conv_in, x, None)
        x = self.mid_block(x, step)
        for up in self.up_blocks:
            x = up(x, step)
        return step.causal(self.conv_out, F.silu(self.norm_out(x)), step.first_positions(exclude_last=True))


# Diffusers stores 2D convs (spatial resample, attention projections) and the attention norm's
# gamma in 2D shapes; this module keeps everything 5D so no per-frame reshape is needed.
def _is_2d_conv_weight(name: str) -> bool:
    return name.endswith(("resample.1.weight", "to_qkv.weight", "proj.weight"))


class WanStreamingDecoder(nn.Module):
    """One streaming decode step of the Wan VAE, a pure function of its inputs.

    ``forward(latents, first_frame, *caches) -> (frames, pixels, *new_caches)``:

    - ``latents`` ``[B, T, C, h, w]``: normalised latents as the DiT produces them (frame-major);
    - ``first_frame`` ``[1]`` bool: this step starts a video (the caches are then ignored);
    - ``caches``: one tensor per :func:`feature_cache_layout` slot, ``[B, C_i, 2, h_i, w_i]``,
      all zeros or the previous step's ``new_caches``;
    - ``frames`` ``[B, 4 T, H, W, 3]`` uint8; ``pixels`` ``[B, 3, 4 T, H, W]`` float32 in [-1, 1]
      (for validation); on a first step the first :func:`padding_frames` (3) are padding.

    Parameters carry diffusers' ``AutoencoderKLWan`` names (``post_quant_conv.*``, ``decoder.*``);
    load them with :meth:`load_diffusers_state_dict`. Computes in the parameters' dtype with
    float32 norms, softmax and output conversion.
    """

    def __init__(self, cfg: VAEDecoderConfig, latent_frames: int = STEP_LATENT_FRAMES):
        super().__init__()
        if not isinstance(latent_frames, int) or latent_frames <= 0:
            raise ValueError(f"latent_frames per step must be a positive integer, got {latent_frames!r}")
        self.config = cfg
        self.latent_frames = latent_frames
        self.layout = feature_cache_layout(cfg)
        self.post_quant_conv = VAEConv(cfg.z_dim, cfg.z_dim, (1, 1, 1))
        self.decoder = _Decoder(cfg)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean).reshape(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std).reshape(1, -1, 1, 1, 1), persistent=False)
        # The first latent frame's positions at each stage (s positions per latent frame), as
        # buffers so a step builds no tensor on the host.
        self._patterns: dict[tuple[int, int], str] = {}
        s = 1
        while s <= cfg.temporal_stride:
            for count in sorted({s - 1, s} - {0}):
                name = f"first_positions_{s}_{count}"
                pattern = torch.tensor([p < count for p in range(s * latent_frames)]).reshape(1, 1, -1, 1, 1)
                self.register_buffer(name, pattern, persistent=False)
                self._patterns[(s, count)] = name
            s *= 2

    @classmethod
    def from_diffusers(cls, vae: nn.Module, latent_frames: int = STEP_LATENT_FRAMES) -> WanStreamingDecoder:
        """The decoder of a diffusers ``AutoencoderKLWan`` (weights copied, same dtype and device)."""
        param = next(vae.parameters())
        module = cls(VAEDecoderConfig.from_diffusers(vae.config), latent_frames)
        module.load_diffusers_state_dict(vae.state_dict())
        return module.to(device=param.device, dtype=param.dtype).eval()

    def load_diffusers_state_dict(self, state: Mapping[str, torch.Tensor]) -> WanStreamingDecoder:
        """Load ``post_quant_conv.*`` and ``decoder.*`` from an ``AutoencoderKLWan`` state dict
        (encoder keys are ignored). Raises ValueError naming missing keys and wrong shapes."""
        own = self.state_dict()
        picked = {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
        missing = sorted(set(own) - set(picked))
        unexpected = sorted(set(picked) - set(own))
        if missing or unexpected:
            raise ValueError(f"VAE state dict does not match the decoder of {self.config}: missing "
                             f"{missing[:10]}, unexpected {unexpected[:10]}")
        converted, bad = {}, []
        for name, value in picked.items():
            target = own[name].shape
            if _is_2d_conv_weight(name) and value.ndim == 4:
                value = value.unsqueeze(2)
            elif name.endswith(".gamma") and value.ndim == 3:
                value = value.unsqueeze(1)
            if tuple(value.shape) != tuple(target):
                bad.append(f"{name} {list(value.shape)} (expected {list(target)})")
            converted[name] = value
        if bad:
            raise ValueError(f"VAE tensors with the wrong shape for {self.config}: {bad[:10]}")
        self.load_state_dict(converted, strict=True)
        return self

    def cache_shapes(self, batch: int, latent_height: int, latent_width: int) -> list[tuple[int, ...]]:
        return [slot.shape(batch, latent_height, latent_width) for slot in self.layout]

    def zero_caches(self, batch: int, latent_height: int, latent_width: int) -> list[torch.Tensor]:
        param = self.post_quant_conv.weight
        return [torch.zeros(s, dtype=param.dtype, device=param.device)
                for s in self.cache_shapes(batch, latent_height, latent_width)]

    def forward(self, latents: torch.Tensor, first_frame: torch.Tensor,
                *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(caches) != len(self.layout):
            raise ValueError(f"the decode step takes {len(self.layout)} feature caches, got {len(caches)}")
        if latents.ndim != 5 or latents.shape[1] != self.latent_frames or latents.shape[2] != self.config.z_dim:
            raise ValueError(f"latents have shape {list(latents.shape)}, expected [B, {self.latent_frames}, "
                             f"{self.config.z_dim}, h, w]")
        dtype = self.post_quant_conv.weight.dtype
        patterns = {key: getattr(self, name) for key, name in self._patterns.items()}
        step = _Step(caches, first_frame.to(torch.bool), patterns)

        # 1. De-normalise: z / (1 / std) + mean, in the VAE's dtype, as the reference.
        std = self.latents_std.to(dtype)
        z = latents.to(dtype).permute(0, 2, 1, 3, 4) / (1.0 / std) + self.latents_mean.to(dtype)
        # 2. The decoder.
        x = self.decoder(self.post_quant_conv(z), step)
        # 3. Unpatchify (Wan2.2), clamp, uint8.
        p = self.config.patch_size
        if p is not None and p > 1:
            b, cp, t, h, w = x.shape
            c = cp // (p * p)
            x = x.reshape(b, c, p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c, t, h * p, w * p)
        pixels = x.float().clamp(-1.0, 1.0)
        # Transpose in float: TensorRT has no uint8 Transpose. floor() makes the cast exact everywhere.
        levels = torch.floor((pixels * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0)
        frames = levels.permute(0, 2, 3, 4, 1).to(torch.uint8)
        return (frames, pixels, *step.outputs)


@torch.no_grad()
def decode_stream(module: WanStreamingDecoder, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager streamed decode of a whole latent video with ``module``, step by step from a zero
    cache: ``[B, F, C, h, w]`` -> ``(frames [B, 1 + 4 (F - 1), H, W, 3] uint8,
    pixels [B, 3, 1 + 4 (F - 1), H, W] float32)``. ``F`` must be a multiple of the step size.
    For tests and validation; the runtime's driver keeps fixed buffers instead."""
    b, f, _, h, w = latents.shape
    t = module.latent_frames
    if f % t:
        raise ValueError(f"{f} latent frames are not a multiple of the step's {t}")
    caches = module.zero_caches(b, h, w)
    frames, pixels = [], []
    for i in range(0, f, t):
        first = torch.tensor([i == 0], device=latents.device)
        out = module(latents[:, i:i + t], first, *caches)
        skip = padding_frames(module.config) if i == 0 else 0
        frames.append(out[0][:, skip:])
        pixels.append(out[1][:, :, skip:])
        caches = list(out[2:])
    return torch.cat(frames, dim=1), torch.cat(pixels, dim=2)

