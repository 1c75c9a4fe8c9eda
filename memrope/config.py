"""Validated, frozen configuration for the DiT, the cache policy, the sampler and a run.

Owns: the dataclasses every other module reads, the adapters that read the authors' files
unchanged (Wan's ``config.json``, the Self-Forcing / LongLive / MemRoPE YAML configs), and the
model presets. Does not own: the cache layout arithmetic (``memrope.cache.CacheLayout``) or
checkpoint loading (``memrope.checkpoint``).

Every dataclass validates in ``__post_init__`` and raises ``ValueError`` naming the field, the
value and the rule.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from memrope.io import shown

logger = logging.getLogger(__name__)

CACHE_POLICIES = ("ema", "ema_adaptive", "eviction", "global")
MEMORY_DTYPES = ("cache", "float32")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive_int(name: str, value: Any) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {shown(value)}",
    )


@dataclass(frozen=True)
class WanConfig:
    """Architecture of the causal Wan2.1 DiT (spec section 1).

    Sizes are in channels or tokens; ``head_dim = dim // num_heads``.
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    in_dim: int = 16
    out_dim: int = 16
    text_len: int = 512
    text_dim: int = 4096
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    model_type: str = "t2v"

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "in_dim",
                     "out_dim", "text_len", "text_dim"):
            _positive_int(name, getattr(self, name))
        _require(self.dim % self.num_heads == 0,
                 f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        _require(self.head_dim % 2 == 0 and self.head_dim >= 6,
                 f"head_dim = dim / num_heads = {self.head_dim} must be even and >= 6 "
                 "(3D RoPE splits head_dim/2 rotary pairs over time, height and width)")
        _require(self.freq_dim % 2 == 0, f"freq_dim must be even, got {self.freq_dim}")
        _require(isinstance(self.eps, float) and 0 < self.eps < 1, f"eps must be in (0, 1), got {shown(self.eps)}")
        _require(len(self.patch_size) == 3 and self.patch_size[0] == 1
                 and all(isinstance(p, int) and p > 0 for p in self.patch_size),
                 f"patch_size must be (1, ph, pw) with positive ints, got {shown(self.patch_size)}")
        _require(self.model_type == "t2v",
                 f"model_type {shown(self.model_type)} is not supported (only 't2v')")
        _require(self.qk_norm is True, "qk_norm=False is not supported (Wan2.1 uses qk RMSNorm)")
        _require(self.cross_attn_norm is True,
                 "cross_attn_norm=False is not supported (Wan2.1 uses an affine norm3)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_channels(self) -> int:
        """Outputs per token of the head: prod(patch_size) * out_dim."""
        p_t, p_h, p_w = self.patch_size
        return p_t * p_h * p_w * self.out_dim

    @classmethod
    def from_json(cls, path: str | Path) -> WanConfig:
        """Read Wan's ``config.json`` (optionally with ``text_dim``; the 1.3B default is 4096)."""
        from memrope.io import read_json

        return cls.from_dict(read_json(path, "model config"), source=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> WanConfig:
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in known:
                kwargs[key] = tuple(value) if key == "patch_size" else value
        if "eps" in kwargs:
            kwargs["eps"] = float(kwargs["eps"])
        missing = [k for k in ("dim", "ffn_dim", "num_heads", "num_layers") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing} (Wan config.json format)")
        return cls(**kwargs)


# Named architectures. The tiny one is the golden-trace model (spec section 8.1).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "wan-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_len=512, text_dim=4096),
    "mid": dict(dim=512, ffn_dim=1536, num_heads=4, num_layers=6, text_len=64, text_dim=256),
    "tiny": dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=16, text_dim=32),
}


def model_preset(name: str) -> WanConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {shown(name)}; expected one of {sorted(MODEL_PRESETS)}")
    return WanConfig(**MODEL_PRESETS[name])


@dataclass(frozen=True)
class CacheConfig:
    """Self-attention KV-cache policy (spec section 4), in latent frames.

    policy:
      ``ema``           MemRoPE: sink | long memory | short memory | recent | new block
      ``ema_adaptive``  as ``ema`` with per-position memory and a motion-adaptive short alpha
      ``eviction``      sink + sliding window (the authors' baseline)
      ``global``        no eviction, absolute positions (``local_attn_size: -1``)
    window_frames: the cache length in frames (``local_attn_size``); ``None`` for ``global``.
    memory_dtype: ``cache`` reproduces the authors' EMA in the cache dtype; ``float32`` keeps a
      float32 accumulator (opt-in fix for spec section 7.6).
    """

    policy: str = "ema"
    window_frames: int | None = 12
    sink_frames: int = 3
    block_frames: int = 3
    alpha_long: float = 0.01
    alpha_short: float = 0.1
    memory_dtype: str = "cache"

    def __post_init__(self) -> None:
        _require(self.policy in CACHE_POLICIES,
                 f"cache policy {shown(self.policy)} is not one of {CACHE_POLICIES}")
        _require(self.memory_dtype in MEMORY_DTYPES,
                 f"memory_dtype {shown(self.memory_dtype)} is not one of {MEMORY_DTYPES}")
        _positive_int("num_frame_per_block", self.block_frames)
        _require(isinstance(self.sink_frames, int) and self.sink_frames >= 0,
                 f"sink_size must be a non-negative integer, got {shown(self.sink_frames)}")
        for name in ("alpha_long", "alpha_short"):
            value = getattr(self, name)
            _require(isinstance(value, float) and 0.0 < value <= 1.0,
                     f"ema_{name} must be a float in (0, 1], got {shown(value)}")
        if self.policy == "global":
            _require(self.window_frames is None,
                     "policy 'global' has no window (local_attn_size must be -1)")
            return
        window = self.window_frames
        _positive_int("local_attn_size", window)
        _require(window % self.block_frames == 0,
                 f"local_attn_size ({window}) must be a multiple of num_frame_per_block "
                 f"({self.block_frames}) so that every eviction removes exactly one block")
        fixed = self.sink_frames + self.memory_frames + self.block_frames
        _require(self.recent_frames >= 0,
                 f"impossible cache layout: local_attn_size ({window}) < sink_size "
                 f"({self.sink_frames}) + memory frames ({self.memory_frames}) + "
                 f"num_frame_per_block ({self.block_frames}) = {fixed}")

    @property
    def has_memory(self) -> bool:
        return self.policy in ("ema", "ema_adaptive")

    @property
    def memory_frames(self) -> int:
        """Frames of the window that hold memory (long + short) once it is initialised."""
        return 2 if self.has_memory else 0

    @property
    def recent_frames(self) -> int:
        """Derived as window - sink - memory - block (the authors never read ``recent_size``)."""
        if self.window_frames is None:
            return 0
        return self.window_frames - self.sink_frames - self.memory_frames - self.block_frames


@dataclass(frozen=True)
class SamplerConfig:
    """Few-step flow-matching sampler (spec section 3)."""

    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    shift: float = 5.0
    context_timestep: float = 0.0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        _positive_int("num_train_timestep", self.num_train_timesteps)
        _require(len(self.denoising_steps) >= 1, "denoising_step_list must not be empty")
        for step in self.denoising_steps:
            _require(isinstance(step, int) and not isinstance(step, bool)
                     and 0 < step <= self.num_train_timesteps,
                     f"denoising_step_list entries must be integers in (0, "
                     f"{self.num_train_timesteps}], got {shown(step)}")
        _require(isinstance(self.shift, float) and self.shift > 0,
                 f"timestep_shift must be a positive float, got {shown(self.shift)}")
        _require(isinstance(self.context_timestep, float) and 0.0 <= self.context_timestep
                 <= self.num_train_timesteps,
                 f"context_noise must be in [0, {self.num_train_timesteps}], got {shown(self.context_timestep)}")


@dataclass(frozen=True)
class LoraConfig:
    """LongLive LoRA adapter (spec section 6.3), merged into the base weights at load."""

    rank: int = 256
    alpha: float = 256.0

    def __post_init__(self) -> None:
        _positive_int("adapter.rank", self.rank)
        _require(isinstance(self.alpha, float) and self.alpha > 0,
                 f"adapter.alpha must be positive, got {shown(self.alpha)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class RunConfig:
    """One generation run, as read from the authors' YAML (plus our optional ``engine:`` keys).

    Latent sizes are per frame: ``latent_height`` x ``latent_width`` with ``latent_channels``.
    """

    cache: CacheConfig = field(default_factory=CacheConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    num_output_frames: int = 120
    seed: int = 0
    batch_size: int = 1
    latent_channels: int = 16
    latent_height: int = 60
    latent_width: int = 104
    use_ema: bool = True
    generator_ckpt: str | None = None
    lora_ckpt: str | None = None
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        _positive_int("num_output_frames", self.num_output_frames)
        _require(self.num_output_frames % self.cache.block_frames == 0,
                 f"num_output_frames ({self.num_output_frames}) must be a multiple of "
                 f"num_frame_per_block ({self.cache.block_frames})")
        _positive_int("num_samples", self.batch_size)
        for name in ("latent_channels", "latent_height", "latent_width"):
            _positive_int(name, getattr(self, name))
        _require(isinstance(self.seed, int), f"seed must be an integer, got {shown(self.seed)}")
        if self.cache.policy == "global":
            # The reference's RoPE table has 1024 temporal positions (spec section 7.15).
            _require(self.num_output_frames <= 1024,
                     f"policy 'global' uses absolute positions: num_output_frames "
                     f"({self.num_output_frames}) must be <= 1024")

    @property
    def num_blocks(self) -> int:
        return self.num_output_frames // self.cache.block_frames

    def with_frames(self, num_output_frames: int) -> RunConfig:
        return replace(self, num_output_frames=num_output_frames)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {shown(value)}")
    return float(value)


# The one architecture these weights and this engine implement (spec section 1).
SUPPORTED_MODEL_NAME = "Wan2.1-T2V-1.3B"

# Our own options, under the YAML's ``engine:`` map (the authors' keys live outside it).
ENGINE_KEYS = ("memory_dtype",)


def _section(raw: Mapping[str, Any], name: str, source: str) -> Mapping[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: {name} must be a mapping, got {shown(value)}")
    return value


def _pick(key: str, places: list[tuple[str, Mapping[str, Any]]], source: str, default: Any = None) -> Any:
    """The value of ``key`` wherever the authors' layouts put it; two different values are an error."""
    found = [(where, place[key]) for where, place in places if key in place]
    first = found[0][1] if found else None
    if any(type(v) is not type(first) or v != first for _, v in found):
        listed = ", ".join(f"{where}{key}={shown(v)}" for where, v in found)
        raise ValueError(f"{source}: {key} is given twice with different values ({listed}); keep one")
    return found[0][1] if found else default


def run_config_from_yaml_dict(raw: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Map the authors' YAML keys onto :class:`RunConfig`.

    Reads the layouts of MemRoPE / Self-Forcing / LongLive v1 (options at the top level and under
    ``model_kwargs:``) and LongLive 2.0's nested ``inference:`` / ``data:`` sections, so that no
    option is silently read as its default. ``model_name`` must be Wan2.1-T2V-1.3B (the model
    this engine implements): another model's config is refused by name. Without
    ``num_output_frames``, Self-Forcing's ``image_or_video_shape`` (``[B, F, C, H, W]``) or
    ``num_training_frames`` give the frame count, as Self-Forcing's inference does (21), and the
    shape gives the latent size. Other keys (training options, prompts, paths of other
    components) are ignored, so the authors' files are read unchanged. Our own options live under
    an optional ``engine:`` map: ``memory_dtype: float32``.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a YAML mapping at top level, got {type(raw).__name__}")
    kwargs = _section(raw, "model_kwargs", source)
    engine = _section(raw, "engine", source)
    unknown = [str(key) for key in engine if key not in ENGINE_KEYS]
    if unknown:
        raise ValueError(f"{source}: unknown key(s) under engine: {', '.join(unknown)}; accepted: "
                         f"{', '.join(ENGINE_KEYS)}")
    places = [("", raw), ("model_kwargs.", kwargs), ("inference.", _section(raw, "inference", source)),
              ("data.", _section(raw, "data", source))]

    model_name = _pick("model_name", places, source)
    if model_name is not None and model_name != SUPPORTED_MODEL_NAME:
        raise ValueError(f"{source}: model_name {shown(model_name)} is not supported: this engine runs the causal "
                         f"{SUPPORTED_MODEL_NAME} DiT (Self-Forcing / LongLive v1 / MemRoPE weights, 16 latent "
                         "channels); that config is for another model")
    shape = _pick("image_or_video_shape", places, source)
    shape_frames = shape_channels = shape_h = shape_w = None
    if shape is not None:
        if not (isinstance(shape, (list, tuple)) and len(shape) == 5
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise ValueError(f"{source}: image_or_video_shape must be 5 positive integers [B, F, C, H, W], "
                             f"got {shown(shape)}")
        _, shape_frames, shape_channels, shape_h, shape_w = shape

    local_attn = _pick("local_attn_size", places, source, -1)
    if isinstance(local_attn, bool) or not isinstance(local_attn, int):
        raise ValueError(f"{source}: local_attn_size must be an integer, got {shown(local_attn)}")
    method = _pick("compression_method", places, source, "eviction")
    if method not in ("ema", "eviction"):
        raise ValueError(f"{source}: compression_method {shown(method)} is not 'ema' or 'eviction'")
    if local_attn == -1:
        policy, window = "global", None
    elif local_attn > 0:
        policy = method
        if method == "ema" and bool(_pick("ema_adaptive", places, source, False)):
            policy = "ema_adaptive"
        window = local_attn
    else:
        raise ValueError(f"{source}: local_attn_size must be -1 (global) or positive, got {local_attn}")

    block_frames = _pick("num_frame_per_block", places, source, 1)
    frames = raw.get("num_output_frames")
    if frames is None:
        frames = shape_frames if shape_frames is not None else raw.get("num_training_frames", 120)
        if shape_frames is not None or "num_training_frames" in raw:
            logger.info("%s: no num_output_frames; generating %s latent frames, as Self-Forcing's inference does",
                        source, frames)
    try:
        cache = CacheConfig(
            policy=policy,
            window_frames=window,
            sink_frames=_pick("sink_size", places, source, 0),
            block_frames=block_frames,
            alpha_long=_as_float(_pick("ema_alpha_long", places, source, 0.01), "ema_alpha_long"),
            alpha_short=_as_float(_pick("ema_alpha_short", places, source, 0.1), "ema_alpha_short"),
            memory_dtype=engine.get("memory_dtype", "cache"),
        )
        steps = raw.get("denoising_step_list", [1000, 750, 500, 250])
        if not isinstance(steps, (list, tuple)):
            raise ValueError(f"denoising_step_list must be a list, got {shown(steps)}")
        sampler = SamplerConfig(
            denoising_steps=tuple(steps),
            warp_denoising_step=bool(raw.get("warp_denoising_step", False)),
            # The reference's wrapper reads model_kwargs only (a top-level shift is a training option).
            shift=_as_float(kwargs.get("timestep_shift", 8.0), "timestep_shift"),
            context_timestep=_as_float(raw.get("context_noise", 0), "context_noise"),
            num_train_timesteps=raw.get("num_train_timestep", 1000),
        )
        lora = None
        adapter = raw.get("adapter")
        if adapter:
            if not isinstance(adapter, Mapping) or adapter.get("type", "lora") != "lora":
                raise ValueError(f"adapter must be a mapping with type 'lora', got {shown(adapter)}")
            lora = LoraConfig(rank=adapter.get("rank", 256),
                              alpha=_as_float(adapter.get("alpha", 256), "adapter.alpha"))
        return RunConfig(
            cache=cache,
            sampler=sampler,
            num_output_frames=frames,
            seed=raw.get("seed", 0),
            batch_size=raw.get("num_samples", 1),
            latent_channels=raw.get("latent_channels", shape_channels or 16),
            latent_height=raw.get("latent_h", shape_h or 60),
            latent_width=raw.get("latent_w", shape_w or 104),
            use_ema=bool(raw.get("use_ema", False)),
            generator_ckpt=raw.get("generator_ckpt"),
            lora_ckpt=raw.get("lora_ckpt"),
            lora=lora,
        )
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def load_run_config(path: str | Path) -> RunConfig:
    """Read one of the authors' YAML configs (or ours) into a :class:`RunConfig`."""
    from memrope.io import read_yaml

    path = Path(path)
    return run_config_from_yaml_dict(read_yaml(path, "run config"), source=str(path))


# Wan2.1 VAE geometry: one latent pixel covers 8x8 video pixels, and T latent frames decode to
# 1 + 4 (T - 1) video frames.
VAE_SPATIAL_STRIDE = 8
VAE_TEMPORAL_STRIDE = 4


def frame_tokens(model: WanConfig, latent_height: int, latent_width: int) -> int:
    """Tokens per latent frame, S = (H / ph) * (W / pw)."""
    _, p_h, p_w = model.patch_size
    if latent_height % p_h or latent_width % p_w:
        raise ValueError(f"latent size {latent_height}x{latent_width} is not divisible by the "
                         f"patch size {p_h}x{p_w}")
    return (latent_height // p_h) * (latent_width // p_w)


def config_hash(*parts: Any) -> str:
    """A stable SHA-256 over dataclass configs (used by artifacts to refuse stale files)."""
    import hashlib

    def normalise(obj: Any) -> Any:
        if hasattr(obj, "__dataclass_fields__"):
            return {k: normalise(v) for k, v in asdict(obj).items()}
        if isinstance(obj, dict):
            return {k: normalise(v) for k, v in sorted(obj.items())}
        if isinstance(obj, (list, tuple)):
            return [normalise(v) for v in obj]
        if isinstance(obj, float) and math.isfinite(obj):
            return obj.hex()
        return obj

    blob = json.dumps([normalise(p) for p in parts], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def run_config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Inverse of :meth:`RunConfig.to_dict` (for artifacts' ``config.json``)."""
    raw = dict(raw)
    cache = dict(raw.pop("cache"))
    sampler = dict(raw.pop("sampler"))
    sampler["denoising_steps"] = tuple(sampler["denoising_steps"])
    lora = raw.pop("lora", None)
    return RunConfig(cache=CacheConfig(**cache), sampler=SamplerConfig(**sampler),
                     lora=LoraConfig(**lora) if lora else None, **raw)
