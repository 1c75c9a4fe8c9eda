"""TensorRT engine sidecars: what a serialized plan was built for, and refusing a stale one.

Owns: the ``<graph>.plan.json`` file written next to each ``<graph>.plan`` in an artifact
directory (TensorRT version, GPU name and compute capability, the artifact's config hash, the
graph, its dtype and the build flags), where plans and sidecars live, and the check a runtime
makes before deserializing a plan. A TensorRT plan only runs on the TensorRT version and GPU
architecture it was built with, and only matches the artifact it was built from; a mismatch
is an :class:`EngineMismatchError` that names every differing field and says how to rebuild.

Pure Python: nothing here imports ``tensorrt`` or touches a GPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from memrope.io import atomic_write

GRAPHS = ("step", "text")
PLAN_SUFFIX = ".plan"


class EngineMismatchError(ValueError):
    """A TensorRT plan was built for another TensorRT version, GPU or artifact, or its I/O differs."""


def rebuild_hint(artifact_dir: str | os.PathLike[str] | None = None) -> str:
    target = str(artifact_dir) if artifact_dir is not None else "<artifact dir>"
    return f"rebuild the engines with `memrope build {target}`"


def plan_path(artifact_dir: str | os.PathLike[str], graph: str) -> Path:
    """``<artifact>/<graph>.plan`` (``graph`` is ``step`` or ``text``)."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    return Path(artifact_dir) / f"{graph}{PLAN_SUFFIX}"


def sidecar_path(plan: str | os.PathLike[str]) -> Path:
    """``<graph>.plan`` -> ``<graph>.plan.json``."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


@dataclass(frozen=True)
class EngineSidecar:
    """What one serialized TensorRT plan was built for.

    ``build_flags``: ``strongly_typed`` (always True), ``timing_cache`` (path used, or None),
    ``builder_optimization_level`` and ``workspace_bytes`` (None = TensorRT's default).
    ``created``: ISO 8601 UTC timestamp of the build.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    contract_hash: str
    graph: str
    dtype: str
    build_flags: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any, source: str = "sidecar") -> "EngineSidecar":
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict):
            raise EngineMismatchError(f"{source} is not a JSON object; {rebuild_hint()}")
        missing = sorted(n for n in names if n not in raw and n not in ("build_flags", "created"))
        unknown = sorted(set(raw) - names)
        if missing or unknown:
            raise EngineMismatchError(f"{source} is not an engine sidecar this version reads (missing "
                                      f"{missing or 'nothing'}, unknown {unknown or 'nothing'}); {rebuild_hint()}")
        return cls(**raw)


def write_sidecar(path: str | os.PathLike[str], sidecar: EngineSidecar) -> None:
    """Write ``sidecar`` as JSON atomically (temp file in the same directory, then ``os.replace``)."""
    atomic_write(path, json.dumps(sidecar.to_json(), indent=1, sort_keys=True) + "\n")


def read_sidecar(path: str | os.PathLike[str]) -> EngineSidecar:
    """Read a sidecar; a missing file is FileNotFoundError, a malformed one EngineMismatchError."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"engine sidecar not found: {path}; "
                                f"{rebuild_hint(path.parent)}") from None
    except json.JSONDecodeError as exc:
        raise EngineMismatchError(f"engine sidecar {path} is not valid JSON ({exc}); "
                                  f"{rebuild_hint(path.parent)}") from None
    return EngineSidecar.from_json(raw, source=f"engine sidecar {path}")


def check_sidecar(sidecar: EngineSidecar, *, tensorrt_version: str, gpu_name: str, compute_capability: str,
                  contract_hash: str, artifact_dir: str | os.PathLike[str] | None = None) -> None:
    """Refuse a plan built for anything other than this TensorRT, this GPU and this artifact.

    Raises:
        EngineMismatchError: naming every field that differs and how to rebuild.
    """
    wanted = {"tensorrt_version": tensorrt_version, "gpu_name": gpu_name,
              "compute_capability": compute_capability, "contract_hash": contract_hash}
    diffs = [f"{name}: engine {getattr(sidecar, name)!r}, here {value!r}"
             for name, value in wanted.items() if getattr(sidecar, name) != value]
    if diffs:
        raise EngineMismatchError(f"the TensorRT {sidecar.graph} engine was built for something else "
                                  f"({'; '.join(diffs)}); {rebuild_hint(artifact_dir)}")
