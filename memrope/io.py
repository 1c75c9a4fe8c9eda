"""Tensor files in and out: validated inputs, atomic outputs.

Owns: reading ``--text-embeds`` and ``--noise`` safetensors files with shape checks that say
what was expected, and writing any tensor file atomically (temp file in the same folder, fsync,
``os.replace``) so a crash never leaves a file that looks finished.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                            metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` atomically and return the path.

    Tensors are detached, moved to the CPU and made contiguous; tensors that share storage are
    copied (safetensors refuses shared storage).
    """
    from safetensors.torch import save_file

    path = Path(path)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor file entries must be str -> torch.Tensor, got {name!r} -> "
                             f"{type(tensor).__name__}")
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        seen.add(storage.data_ptr())
        out[name] = tensor

    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata={"format": "pt", **(metadata or {})})
    logger.debug("wrote %d tensors to %s", len(out), path)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and ``os.replace`` it onto ``path``,
    on failure remove it. Readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes | str | memoryview) -> Path:
    """Write ``data`` (bytes, text, or a buffer such as TensorRT's IHostMemory) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w" if isinstance(data, str) else "wb") as handle:
            handle.write(data)
    return Path(path)


def read_json(path: str | os.PathLike[str], what: str):
    """Parse a JSON file; errors name ``what`` it was supposed to be."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None


def read_safetensors(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """Read a whole safetensors file; errors name ``what`` the file was supposed to be."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{what} file {path} is not a readable safetensors file: {exc}") from None


def _expect(tensors: Mapping[str, torch.Tensor], key: str, path: Path, what: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{what} file {path} has no tensor {key!r} (found {sorted(tensors)})")
    tensor = tensors[key]
    if not tensor.is_floating_point():
        raise ValueError(f"{what} file {path}: {key!r} must be a floating tensor, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} file {path}: {key!r} contains NaN or Inf")
    return tensor


def read_text_embeds(path: str | os.PathLike[str], text_dim: int, text_len: int) -> torch.Tensor:
    """``prompt_embeds`` ``[B, L <= text_len, text_dim]`` from a safetensors file."""
    path = Path(path)
    embeds = _expect(read_safetensors(path, "text embeddings"), "prompt_embeds", path, "text embeddings")
    if embeds.ndim != 3 or embeds.shape[2] != text_dim or embeds.shape[1] > text_len:
        raise ValueError(f"text embeddings file {path}: prompt_embeds has shape {list(embeds.shape)}, "
                         f"expected [B, L <= {text_len}, {text_dim}]")
    return embeds


def read_noise(path: str | os.PathLike[str], batch: int, latent_shape: tuple[int, int, int],
               block_frames: int, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``noise`` ``[B, F, C, H, W]`` and ``intermediate_noise`` ``[blocks, steps - 1, B * frames,
    C, H, W]`` (the layout of the golden ``inputs.safetensors``) from a safetensors file."""
    path = Path(path)
    tensors = read_safetensors(path, "noise")
    noise = _expect(tensors, "noise", path, "noise")
    inter = _expect(tensors, "intermediate_noise", path, "noise")
    c, h, w = latent_shape
    if noise.ndim != 5 or noise.shape[0] != batch or tuple(noise.shape[2:]) != latent_shape:
        raise ValueError(f"noise file {path}: noise has shape {list(noise.shape)}, expected "
                         f"[{batch}, F, {c}, {h}, {w}]")
    frames = noise.shape[1]
    if frames == 0 or frames % block_frames:
        raise ValueError(f"noise file {path}: {frames} frames is not a positive multiple of the "
                         f"block size {block_frames}")
    blocks = frames // block_frames
    expected = (blocks, num_steps - 1, batch * block_frames, c, h, w)
    if tuple(inter.shape) != expected:
        raise ValueError(f"noise file {path}: intermediate_noise has shape {list(inter.shape)}, "
                         f"expected {list(expected)} (blocks, denoising steps - 1, batch * frames "
                         "per block, C, H, W)")
    return noise, inter
