"""What the demo's training scripts share: clips from the demo world, seeding, and the manifest.

Owns drawing training clips from :mod:`memrope.runtime.demo.world` deterministically per
(seed, index) (:func:`sample_clip`, :func:`sample_batch`), converting uint8 frames to the VAE's
``[-1, 1]`` tensors and back (:func:`frames_to_tensor`, :func:`psnr_db`), seeding and thread
setup (:func:`set_seed`, :func:`set_threads`), and the training manifest written next to the
weights (:func:`write_manifest`, :func:`check_manifest`): the command, seeds, steps, losses and
the SHA-256 of every weight file, so a shipped weight file can be traced to the run that made it.
Does not own any model or training loop (``memrope.runtime.demo.train_vae`` for the VAE, and the
DiT's training script), the world's rules or the evaluator.

Frames are uint8 RGB ``[T, H, W, 3]`` (batches ``[B, T, H, W, 3]``); tensors for the VAE are float32
``[B, 3, T, H, W]`` in ``[-1, 1]``. T is the number of video frames at 16 fps.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memrope.artifact import file_sha256
from memrope.io import atomic_write

from .world import REFERENCE_HEIGHT, REFERENCE_WIDTH, Scene, phrase, random_scene, render

MANIFEST_FILE = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors",)


# --- seeding -------------------------------------------------------------------------------------

def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads in torch (and tell OpenMP children the same)."""
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads={threads!r} must be an int >= 1")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def set_seed(seed: int) -> torch.Generator:
    """Seed torch's global generator (weight init, dropout) and return a CPU generator seeded
    alike for anything the training loop draws itself (latent noise, timesteps)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0")
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of clip ``index`` of the stream ``seed``: independent of every other clip, so
    clip i is the same whatever was drawn before it (a resumed or shortened run sees the same data)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


# --- clips ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    """One training clip: the scene, a random wording of it, the render seed and the frames."""

    scene: Scene
    prompt: str
    render_seed: int
    frames: np.ndarray  # uint8 [T, H, W, 3]


def sample_clip(seed: int, index: int, num_frames: int, *, height: int = REFERENCE_HEIGHT,
                width: int = REFERENCE_WIDTH, two_objects_probability: float = 0.0) -> Clip:
    """Clip ``index`` of the stream ``seed``: a :func:`random_scene`, a :func:`phrase` of it and its
    render with a fresh render seed (start positions, diagonal), all drawn from :func:`clip_rng`."""
    rng = clip_rng(seed, index)
    scene = random_scene(rng, two_objects_probability=two_objects_probability)
    prompt = phrase(scene, rng)
    render_seed = int(rng.integers(0, 2 ** 31 - 1))
    frames = render(scene, num_frames, height=height, width=width, seed=render_seed)
    return Clip(scene=scene, prompt=prompt, render_seed=render_seed, frames=frames)


def sample_batch(seed: int, step: int, batch_clips: int, num_frames: int, *, height: int = REFERENCE_HEIGHT,
                 width: int = REFERENCE_WIDTH, two_objects_probability: float = 0.0) -> list[Clip]:
    """The ``batch_clips`` clips of training step ``step``: clips ``step * batch_clips`` onwards of
    the stream ``seed`` (every clip of a run is distinct and reproducible)."""
    if batch_clips < 1:
        raise ValueError(f"batch_clips={batch_clips!r} must be >= 1")
    return [sample_clip(seed, step * batch_clips + i, num_frames, height=height, width=width,
                        two_objects_probability=two_objects_probability) for i in range(batch_clips)]


def frames_to_tensor(frames: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` or ``[B, T, H, W, 3]`` (or a list of ``[T, H, W, 3]``) -> float32
    ``[B, 3, T, H, W]`` in ``[-1, 1]``, the VAE's input (``x / 127.5 - 1``)."""
    array = np.stack(frames) if isinstance(frames, (list, tuple)) else np.asarray(frames)
    if array.ndim == 4:
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 5 or array.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [B, T, H, W, 3], got {array.dtype} {list(array.shape)}")
    return torch.from_numpy(array).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0).contiguous()


def psnr_db(reference: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR in dB of uint8 ``decoded`` against uint8 ``reference`` (same shape), peak 255."""
    if reference.shape != decoded.shape:
        raise ValueError(f"shapes differ: reference {list(reference.shape)}, decoded {list(decoded.shape)}")
    mse = float(np.mean((reference.astype(np.float64) - decoded.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


# --- manifest ------------------------------------------------------------------------------------

def weight_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Every weight file (``*.safetensors``) under ``directory``, sorted, as paths relative to it."""
    directory = Path(directory)
    return sorted(p.relative_to(directory) for p in directory.rglob("*")
                  if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("diffusers", "transformers", "safetensors"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            out[name] = module.__version__
    return out


def write_manifest(directory: str | os.PathLike[str], command: str | Sequence[str], seeds: Mapping[str, int],
                   steps: int, losses: Sequence[float], *, extra: Mapping[str, object] | None = None,
                   name: str = MANIFEST_FILE) -> Path:
    """Write ``directory/name`` (JSON, atomically) describing the training run that made the weights
    in ``directory``, and return its path.

    Records ``command`` (a string, or argv joined with spaces), ``seeds`` (role -> seed, e.g.
    ``{"init": 0, "data": 1}``), ``steps``, ``losses`` (the loss curve, as floats), the date, the
    machine and the package versions, ``extra`` (config, metrics, timings: anything JSON), and
    ``files``: ``{relative path: {"bytes", "sha256"}}`` for every ``*.safetensors`` under
    ``directory`` (:func:`check_manifest` verifies them).

    Raises:
        ValueError: ``directory`` holds no weight file.
    """
    directory = Path(directory)
    files = {str(p.as_posix()): {"bytes": (directory / p).stat().st_size, "sha256": file_sha256(directory / p)}
             for p in weight_files(directory)}
    if not files:
        raise ValueError(f"{directory} holds no weight file ({', '.join(WEIGHT_SUFFIXES)}) to record")
    manifest = {
        "command": command if isinstance(command, str) else " ".join(map(str, command)),
        "seeds": {str(k): int(v) for k, v in seeds.items()},
        "steps": int(steps),
        "losses": [float(v) for v in losses],
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": _versions(),
        **({"extra": dict(extra)} if extra else {}),
        "files": files,
    }
    return atomic_write(directory / name, json.dumps(manifest, indent=1) + "\n")


def check_manifest(directory: str | os.PathLike[str], *, name: str = MANIFEST_FILE) -> list[str]:
    """Problems with the weight files that ``directory/name`` records: one line per file that is
    missing, changed (size or SHA-256) or present but unrecorded. An empty list means all match."""
    directory = Path(directory)
    recorded = json.loads((directory / name).read_text())["files"]
    problems = []
    for rel, pin in sorted(recorded.items()):
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != pin["bytes"] or file_sha256(path) != pin["sha256"]:
            problems.append(f"{rel}: changed (recorded sha256 {pin['sha256'][:12]}...)")
    problems += [f"{p.as_posix()}: not in {name}" for p in weight_files(directory) if p.as_posix() not in recorded]
    return problems
