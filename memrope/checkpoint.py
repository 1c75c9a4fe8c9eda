"""Loading and saving the causal Wan2.1 DiT weights (spec section 6).

Owns: the exact key set and shapes of ``CausalWanModel.state_dict()`` for a :class:`WanConfig`
(:func:`expected_dit_shapes`), reading every checkpoint format the authors ship (Wan2.1
``diffusion_pytorch_model.safetensors`` directories, single or sharded, bare ``.safetensors``
files, Self-Forcing / LongLive ``.pt`` files) into one plain dict with ``CausalWanModel`` key
names, merging a LongLive LoRA into the base weights at load, and writing a state dict to
``.safetensors`` atomically. Does not own: building the model, the VAE or the text encoder
checkpoints, or the configuration dataclasses (``memrope.config``).

Safety: ``.pt`` files are read with ``torch.load(weights_only=True)`` only; a file that needs
arbitrary pickled objects is refused, never executed.

Every check raises ``ValueError`` (``FileNotFoundError`` for a missing path) naming the file,
the offending keys and, for key or shape mismatches, the config that was assumed.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from memrope.config import LoraConfig, WanConfig
from memrope.io import save_safetensors_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_TARGET_MODULES",
    "WAN_INDEX_FILE",
    "WAN_WEIGHTS_FILE",
    "expected_dit_shapes",
    "load_dit_state_dict",
    "save_dit_state_dict_safetensors",
]

WAN_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WAN_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"

# The nn.Linear layers inside each transformer block that LongLive's LoRA targets (spec 6.3).
LORA_TARGET_MODULES = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)

_TORCH_SUFFIXES = (".pt", ".pth")
_SAFETENSORS_SUFFIX = ".safetensors"
_ZIP_MAGIC = b"PK\x03\x04"
_STATE_DICT_KEYS = ("generator_ema", "generator", "model")
_FSDP_SEGMENT = "_fsdp_wrapped_module."
_MODEL_PREFIX = "model."
_PEFT_PREFIX = "base_model.model."
_MAX_LISTED = 10

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
_LORA_TARGET = re.compile(
    r"blocks\.\d+\.(?:" + "|".join(re.escape(m) for m in LORA_TARGET_MODULES) + r")"
)
_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")

StateDict = dict[str, torch.Tensor]


def expected_dit_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every key of ``CausalWanModel.state_dict()`` with its shape, in state-dict order.

    With ``D = dim``, ``F = ffn_dim``, ``P = prod(patch_size) * out_dim``:

    - ``patch_embedding.weight [D, in_dim, *patch_size]``, ``.bias [D]``
    - ``text_embedding.0 [D, text_dim]``, ``text_embedding.2 [D, D]`` (+ biases ``[D]``)
    - ``time_embedding.0 [D, freq_dim]``, ``time_embedding.2 [D, D]`` (+ biases ``[D]``)
    - ``time_projection.1 [6D, D]`` (+ bias ``[6D]``)
    - per block ``i``: ``modulation [1, 6, D]``; ``self_attn`` and ``cross_attn`` ``q, k, v, o``
      ``[D, D]`` (+ biases) and ``norm_q, norm_k`` weights ``[D]``; ``norm3`` weight and bias
      ``[D]``; ``ffn.0 [F, D]``, ``ffn.2 [D, F]`` (+ biases)
    - ``head.modulation [1, 2, D]``, ``head.head [P, D]`` (+ bias ``[P]``)

    There are no buffers (the RoPE table is recomputed). That is 15 + 27 * num_layers keys.
    """
    dim, ffn = cfg.dim, cfg.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        shapes[f"{name}.weight"] = (out_features, in_features)
        shapes[f"{name}.bias"] = (out_features,)

    shapes["patch_embedding.weight"] = (dim, cfg.in_dim, *cfg.patch_size)
    shapes["patch_embedding.bias"] = (dim,)
    linear("text_embedding.0", dim, cfg.text_dim)
    linear("text_embedding.2", dim, dim)
    linear("time_embedding.0", dim, cfg.freq_dim)
    linear("time_embedding.2", dim, dim)
    linear("time_projection.1", 6 * dim, dim)
    for i in range(cfg.num_layers):
        block = f"blocks.{i}"
        shapes[f"{block}.modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                linear(f"{block}.{attn}.{proj}", dim, dim)
            shapes[f"{block}.{attn}.norm_q.weight"] = (dim,)
            shapes[f"{block}.{attn}.norm_k.weight"] = (dim,)
            if attn == "self_attn":
                shapes[f"{block}.norm3.weight"] = (dim,)
                shapes[f"{block}.norm3.bias"] = (dim,)
        linear(f"{block}.ffn.0", ffn, dim)
        linear(f"{block}.ffn.2", dim, ffn)
    shapes["head.modulation"] = (1, 2, dim)
    linear("head.head", cfg.patch_channels, dim)
    return shapes


def load_dit_state_dict(
    path: str | os.PathLike[str],
    cfg: WanConfig,
    *,
    use_ema: bool = True,
    lora_path: str | os.PathLike[str] | None = None,
    lora: LoraConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> StateDict:
    """Read DiT weights from any supported checkpoint and return ``CausalWanModel`` names.

    ``path`` may be:

    - a Wan2.1 directory holding ``diffusion_pytorch_model.safetensors`` or the sharded
      ``diffusion_pytorch_model.safetensors.index.json`` plus its shards;
    - a ``.safetensors`` file holding a bare Wan state dict;
    - a ``.pt`` / ``.pth`` file (Self-Forcing, LongLive): the state dict under ``generator_ema``
      (when ``use_ema``), else ``generator``, else ``model``, or a bare ``{name: tensor}`` dict.
      ``_fsdp_wrapped_module.`` segments and a leading ``model.`` are stripped.

    The result must match :func:`expected_dit_shapes` exactly (no missing or extra keys, same
    shapes, floating dtypes) and hold only finite values. If ``lora_path`` is given, the LongLive LoRA in it is merged as
    ``W <- W + (alpha / rank) * B @ A`` in float32, with ``lora`` (default :class:`LoraConfig`)
    giving rank and alpha; ``lora`` is ignored without ``lora_path``. Tensors come back
    contiguous, on CPU, in ``dtype``, in state-dict order.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(path)
    raw = _read_dit_checkpoint(path, use_ema=use_ema)
    state = _normalise_state_dict(raw, source=str(path))
    _check_against_config(state, cfg, source=str(path))
    if lora_path is not None:
        state = _merge_lora(state, Path(lora_path), lora if lora is not None else LoraConfig(),
                            num_layers=cfg.num_layers)
    out = {name: state[name].to(device="cpu", dtype=dtype).contiguous() for name in expected_dit_shapes(cfg)}
    _check_finite(out, source=str(path) + (f" + LoRA {lora_path}" if lora_path is not None else ""))
    return out


def check_dit_checkpoint(
    path: str | os.PathLike[str],
    cfg: WanConfig,
    *,
    use_ema: bool = True,
    lora_path: str | os.PathLike[str] | None = None,
    lora: LoraConfig | None = None,
) -> None:
    """Everything :func:`load_dit_state_dict` checks about a checkpoint's structure (layout, names,
    shapes, dtypes, and the LoRA's pairs and ranks) without reading its weights: safetensors
    headers and memory-mapped torch files only, so it takes milliseconds at 1.3B. A command checks
    this before it loads a text encoder; the values (NaN/Inf) are checked when the weights load.
    Raises what :func:`load_dit_state_dict` would."""
    path = Path(path)
    state = _normalise_state_dict(_read_dit_checkpoint(path, use_ema=use_ema, meta=True), source=str(path))
    _check_against_config(state, cfg, source=str(path))
    if lora_path is not None:
        _read_lora_pairs(Path(lora_path), state, lora if lora is not None else LoraConfig(),
                         num_layers=cfg.num_layers, meta=True)


def _check_finite(state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Refuse weights holding NaN or Inf (after the cast: a value too large for ``dtype`` counts):
    such a model would turn every frame into NaN after minutes of compute."""
    bad = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ValueError(f"{source}: {len(bad)} weight tensor(s) hold NaN or Inf ({_preview(bad)}); the "
                         "checkpoint is corrupt (or its values overflow the requested dtype)")


def save_dit_state_dict_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]
) -> Path:
    """Write ``state_dict`` to a ``.safetensors`` file atomically and return its path."""
    return save_safetensors_atomic(state_dict, path)


# --------------------------------------------------------------------------------------------
# Reading files


def _read_dit_checkpoint(path: Path, *, use_ema: bool, meta: bool = False) -> Mapping[str, object]:
    """Dispatch on the checkpoint layout and return its raw ``{name: value}`` mapping
    (``meta``: safetensors as meta tensors, their headers only)."""
    if not path.exists():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    if path.is_dir():
        return _read_wan_directory(path, meta=meta)
    suffix = path.suffix.lower()
    if suffix == _SAFETENSORS_SUFFIX:
        return _read_safetensors(path, meta=meta)
    if suffix in _TORCH_SUFFIXES:
        return _select_state_dict(_torch_load(path), path, use_ema=use_ema)
    raise ValueError(f"unsupported DiT checkpoint {path}: expected a Wan2.1 directory, a "
                     f"{_SAFETENSORS_SUFFIX} file or a {'/'.join(_TORCH_SUFFIXES)} file")


def _read_wan_directory(directory: Path, *, meta: bool = False) -> StateDict:
    """Read a Wan2.1 / diffusers directory: one safetensors file, else a sharded index."""
    single = directory / WAN_WEIGHTS_FILE
    if single.is_file():
        return _read_safetensors(single, meta=meta)
    index = directory / WAN_INDEX_FILE
    if index.is_file():
        return _read_sharded_safetensors(index, meta=meta)
    raise FileNotFoundError(f"{directory} is a directory but holds neither {WAN_WEIGHTS_FILE} "
                            f"nor {WAN_INDEX_FILE} (Wan2.1 layout)")


def _read_sharded_safetensors(index: Path, *, meta: bool = False) -> StateDict:
    """Read the shards named by a ``*.safetensors.index.json`` (``{"weight_map": {key: file}}``).

    The shards must sit next to the index and hold exactly the keys the index assigns them.
    """
    from memrope.io import read_json

    raw = read_json(index, "shard index")  # bounded in size and nesting, one-line errors
    if "weight_map" not in raw:
        raise ValueError(f"shard index {index} is unreadable: expected JSON with a 'weight_map' object")
    weight_map = raw["weight_map"]
    if not isinstance(weight_map, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"shard index {index}: 'weight_map' must map tensor names to file names")

    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        if Path(shard).name != shard:
            raise ValueError(f"shard index {index}: shard {shard!r} for {key!r} must be a file "
                             "name in the same directory")
        by_shard.setdefault(shard, set()).add(key)

    state: StateDict = {}
    for shard, keys in by_shard.items():
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"shard {shard_path} listed in {index} not found")
        tensors = _read_safetensors(shard_path, meta=meta)
        missing = sorted(keys - tensors.keys())
        unlisted = sorted(tensors.keys() - keys)
        if missing or unlisted:
            raise ValueError(
                f"shard {shard_path} does not match {index}: "
                f"{_listing('keys the index assigns to it are absent', missing)}"
                f"{_listing('keys it holds are not assigned to it', unlisted)}")
        state.update(tensors)
    return state


# safetensors' dtype names -> torch dtypes, for reading a header without its data.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _read_safetensors(path: Path, *, meta: bool = False) -> StateDict:
    """All tensors of one ``.safetensors`` file, on CPU; with ``meta``, meta tensors of the same
    names, shapes and dtypes, from the header alone (no data is read)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            if not meta:
                return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
            out = {}
            for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                view = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise ValueError(f"{path}: {key!r} has dtype {view.get_dtype()}, which this loader does not read")
                out[key] = torch.empty(view.get_shape(), dtype=dtype, device="meta")
            return out
    except SafetensorError as exc:
        raise _unreadable(path, exc) from exc


def _torch_load(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``; memory-mapped unless the file is legacy format.

    ``mmap`` needs the zip format that ``torch.save`` writes by default; the legacy (pre-1.6)
    format, recognised by the missing zip magic, is read without it. Non-tensor pickled objects
    and corrupt or truncated files raise ``ValueError``.
    """
    with open(path, "rb") as handle:
        is_zip = handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load {path}: it contains non-tensor pickled objects (or is corrupt), "
            f"and checkpoints are only read with torch.load(weights_only=True) "
            f"({_weights_only_reason(exc)})") from exc
    except (PermissionError, MemoryError):
        raise
    except Exception as exc:  # torch surfaces corruption as many types (OSError, EOFError, ...)
        raise _unreadable(path, exc) from exc


def _weights_only_reason(exc: BaseException) -> str:
    """The one informative line of torch's long weights-only error message."""
    message = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in message:
        reason = message.split(marker, 1)[1].strip().splitlines()[0]
        return reason.split(" Please use", 1)[0].strip()
    return message.strip().splitlines()[0] if message.strip() else type(exc).__name__


def _unreadable(path: Path, exc: BaseException) -> ValueError:
    return ValueError(f"checkpoint file {path} is unreadable or truncated "
                      f"({type(exc).__name__}: {exc})")


def _select_state_dict(obj: object, path: Path, *, use_ema: bool) -> Mapping[str, object]:
    """Pick the DiT state dict out of a loaded ``.pt`` object (spec 6.2, 6.3)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors or "
                         f"a dict with one of {list(_STATE_DICT_KEYS)}")
    if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        return obj
    if use_ema and "generator_ema" in obj:
        key = "generator_ema"
    elif "generator" in obj or "model" in obj:
        key = "generator" if "generator" in obj else "model"
        if use_ema:
            logger.warning("%s has no 'generator_ema'; use_ema was requested, loading %r instead",
                           path, key)
    else:
        hint = ""
        if "generator_ema" in obj:
            hint = " (it has 'generator_ema': pass use_ema=True, or --use-ema to memrope generate/export)"
        raise ValueError(f"{path} holds no DiT state dict: expected a bare dict of tensors or one "
                         f"of the keys {list(_STATE_DICT_KEYS)}, found top-level keys "
                         f"{_preview(list(obj))}{hint}")
    state = obj[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: {key!r} holds a {type(state).__name__}, expected a dict of "
                         "tensors")
    logger.debug("loading %r from %s", key, path)
    return state


# --------------------------------------------------------------------------------------------
# Key normalisation and validation


def _normalise_state_dict(raw: Mapping[str, object], *, source: str) -> StateDict:
    """Strip wrapper prefixes, and insist on string keys and floating tensors."""
    state: StateDict = {}
    origin: dict[str, str] = {}
    bad_values: list[str] = []
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: state dict keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            bad_values.append(f"{key} ({type(value).__name__})")
            continue
        if not value.is_floating_point():
            bad_values.append(f"{key} ({value.dtype})")
            continue
        name = _strip_wrappers(key)
        if name in origin:
            raise ValueError(f"{source}: keys {origin[name]!r} and {key!r} both map to {name!r} "
                             "after stripping wrapper prefixes")
        origin[name] = key
        state[name] = value
    if bad_values:
        raise ValueError(f"{source}: every entry must be a floating-point tensor; "
                         f"{_listing('entries are not', bad_values)}")
    return state


def _strip_wrappers(key: str) -> str:
    """Drop every ``_fsdp_wrapped_module.`` segment, then a leading ``model.``."""
    key = key.replace(_FSDP_SEGMENT, "")
    return key[len(_MODEL_PREFIX):] if key.startswith(_MODEL_PREFIX) else key


def _check_against_config(state: Mapping[str, torch.Tensor], cfg: WanConfig, *,
                          source: str) -> None:
    """Raise ``ValueError`` unless keys and shapes equal :func:`expected_dit_shapes` exactly."""
    expected = expected_dit_shapes(cfg)
    missing = [f"{k} {list(shape)}" for k, shape in expected.items() if k not in state]
    unexpected = [f"{k} {list(v.shape)}" for k, v in state.items() if k not in expected]
    mismatched = [f"{k}: expected {list(shape)}, got {list(state[k].shape)}"
                  for k, shape in expected.items()
                  if k in state and tuple(state[k].shape) != shape]
    if not (missing or unexpected or mismatched):
        return
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_INDEX.match(k))}
    hint = ""
    if blocks and len(blocks) != cfg.num_layers:
        hint = (f"\n  the checkpoint has {len(blocks)} transformer blocks, the config "
                f"{cfg.num_layers}")
    raise ValueError(
        f"checkpoint {source} does not match the model config: {_describe(cfg)}"
        f"{_listing('missing keys', missing)}"
        f"{_listing('unexpected keys', unexpected)}"
        f"{_listing('shape mismatches', mismatched)}{hint}")


def _describe(cfg: WanConfig) -> str:
    fields = ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "in_dim", "out_dim",
              "text_dim", "patch_size")
    return ", ".join(f"{name}={getattr(cfg, name)}" for name in fields)


def _listing(title: str, items: list[str]) -> str:
    """``"\\n  N title: a; b; ... (and M more)"``, or ``""`` when there is nothing to list."""
    if not items:
        return ""
    return f"\n  {len(items)} {title}: {_preview(items)}"


def _preview(items: list[str]) -> str:
    shown = "; ".join(str(item) for item in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown} (and {more} more)" if more > 0 else shown


# --------------------------------------------------------------------------------------------
# LoRA


def _merge_lora(state: StateDict, lora_path: Path, lora: LoraConfig, *,
                num_layers: int) -> StateDict:
    """Return ``state`` with the LoRA in ``lora_path`` merged: ``W + scaling * B @ A``.

    ``A`` is ``[rank, in]`` and ``B`` is ``[out, rank]`` for a weight ``W [out, in]``; the
    product and the sum are computed in float32. Every pair is validated before any merge.
    """
    pairs = _read_lora_pairs(lora_path, state, lora, num_layers=num_layers)
    merged = dict(state)
    for module, (lora_a, lora_b) in pairs.items():
        weight_key = f"{module}.weight"
        delta = lora_b.to(torch.float32) @ lora_a.to(torch.float32)
        merged[weight_key] = state[weight_key].to(torch.float32) + lora.scaling * delta
    logger.info("merged LoRA %s into %d modules (rank %d, alpha %g, scaling %g)",
                lora_path, len(pairs), lora.rank, lora.alpha, lora.scaling)
    return merged


def _read_lora_pairs(lora_path: Path, state: Mapping[str, torch.Tensor], lora: LoraConfig, *,
                     num_layers: int, meta: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Validated ``{module: (A [rank, in], B [out, rank])}`` from a LongLive LoRA file."""
    raw = _read_lora_file(lora_path, meta=meta)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    adapters: dict[str, str | None] = {}
    for key, tensor in raw.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"LoRA {lora_path}: entry {key!r} is not a named tensor")
        match = _LORA_KEY.fullmatch(_strip_lora_wrappers(key))
        if match is None:
            raise ValueError(f"LoRA {lora_path}: key {key!r} is not a lora_A / lora_B weight")
        module, part, adapter = match.group("module", "part", "adapter")
        if not _LORA_TARGET.fullmatch(module) or f"{module}.weight" not in state:
            raise ValueError(
                f"LoRA {lora_path}: key {key!r} targets {module!r}, which is not a LoRA target "
                f"of this model (only {', '.join(LORA_TARGET_MODULES)} inside blocks.0 .. "
                f"blocks.{num_layers - 1})")
        if module in adapters and adapters[module] != adapter:
            raise ValueError(f"LoRA {lora_path}: key {key!r} names adapter {adapter!r} but "
                             f"{module!r} already has adapter {adapters[module]!r}; only one "
                             "adapter can be merged")
        adapters[module] = adapter
        if part in parts.setdefault(module, {}):
            raise ValueError(f"LoRA {lora_path}: keys {parts[module][part][0]!r} and {key!r} "
                             "are the same weight")
        if not tensor.is_floating_point():
            raise ValueError(f"LoRA {lora_path}: {key!r} has dtype {tensor.dtype}, expected a "
                             "floating-point tensor")
        parts[module][part] = (key, tensor)
    if not parts:
        raise ValueError(f"LoRA {lora_path} holds no LoRA weights")

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, found in parts.items():
        for part, partner in (("A", "B"), ("B", "A")):
            if part in found and partner not in found:
                raise ValueError(f"LoRA {lora_path}: {found[part][0]!r} has no lora_{partner} "
                                 "partner")
        (key_a, lora_a), (key_b, lora_b) = found["A"], found["B"]
        out_features, in_features = state[f"{module}.weight"].shape
        expected = {key_a: (lora.rank, in_features), key_b: (out_features, lora.rank)}
        for key, tensor in ((key_a, lora_a), (key_b, lora_b)):
            if tuple(tensor.shape) != expected[key]:
                raise ValueError(
                    f"LoRA {lora_path}: {key!r} has shape {list(tensor.shape)}, expected "
                    f"{list(expected[key])} (rank {lora.rank}, {module}.weight is "
                    f"[{out_features}, {in_features}])")
        pairs[module] = (lora_a, lora_b)
    return pairs


def _read_lora_file(path: Path, *, meta: bool = False) -> Mapping[str, object]:
    """The LoRA tensors of a ``.pt`` (``generator_lora`` or bare) or ``.safetensors`` file."""
    if not path.is_file():
        raise FileNotFoundError(f"LoRA checkpoint not found: {path}")
    if path.suffix.lower() == _SAFETENSORS_SUFFIX:
        return _read_safetensors(path, meta=meta)
    if path.suffix.lower() not in _TORCH_SUFFIXES:
        raise ValueError(f"unsupported LoRA checkpoint {path}: expected a "
                         f"{'/'.join(_TORCH_SUFFIXES)} or {_SAFETENSORS_SUFFIX} file")
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and "generator_lora" in obj:
        obj = obj["generator_lora"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"LoRA {path} must hold {{'generator_lora': {{name: tensor}}}} or a "
                         "bare {name: tensor} dict")
    return obj


def _strip_lora_wrappers(key: str) -> str:
    """Drop ``_fsdp_wrapped_module.`` segments and leading ``base_model.model.`` / ``model.``."""
    key = key.replace(_FSDP_SEGMENT, "")
    while True:
        for prefix in (_PEFT_PREFIX, _MODEL_PREFIX):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key
