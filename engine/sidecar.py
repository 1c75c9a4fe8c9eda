"""TensorRT engine sidecars: what a serialized plan was built for, and refusing a plan built for something else.

Owns: the ``<graph>.plan.json`` file written next to each ``<graph>.plan`` in an artifact directory
(the build target, the TensorRT module and its version, the compute capabilities the plan runs on,
the build GPU for server plans, the artifact's config hash, the graph and its dtype, the SHA-256
of the ONNX files the plan was built from and of the plan itself, the build flags and the build
report), where plans, sidecars and TensorRT-RTX runtime caches live, the exact ``memrope build``
command that rebuilds a plan, and the checks a runtime makes before it deserializes a plan
(:func:`check_sidecar`, :func:`check_plan_bytes`). A mismatch is an :class:`EngineMismatchError`
naming every differing field and the command to run.

Targets (see :mod:`memrope.engine.build`): ``rtx`` plans are built ahead of time by TensorRT-RTX (module
``tensorrt_rtx``) for a list of compute capabilities and run on any RTX GPU among them; ``server``
plans are built by datacenter TensorRT (module ``tensorrt``) on the GPU they run on.

Pure Python: nothing here imports TensorRT or touches a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from memrope.io import atomic_write, parse_json, read_text, shown

# 3: the SHA-256 of the source graph (and its weights) and of the plan are recorded and checked.
SIDECAR_VERSION = 3
PLAN_SUFFIX = ".plan"
RUNTIME_CACHE_SUFFIX = ".rtxcache"
TARGET_MODULES = {"rtx": "tensorrt_rtx", "server": "tensorrt"}
# TensorRT-RTX's documented default targets when no compute capability is set: "8.0, 8.6, 8.9,
# 12.0, and later" (docs.nvidia.com/deeplearning/tensorrt-rtx, CPU-only AOT and TensorRT-RTX engines).
RTX_DEFAULT_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0")
_GRAPH_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class EngineMismatchError(ValueError):
    """A TensorRT plan was built for another target, TensorRT version, GPU or artifact, or its I/O differs."""


def rebuild_command(artifact_dir: str | os.PathLike[str] | None, target: str,
                    compute_capabilities: Sequence[str] = ()) -> str:
    """The exact ``memrope build`` command that rebuilds an artifact's plans for ``target``."""
    command = f"memrope build {artifact_dir if artifact_dir is not None else '<artifact dir>'} --target {target}"
    if compute_capabilities:
        command += f" --compute-capability {','.join(compute_capabilities)}"
    return command + " --force"


def plan_path(artifact_dir: str | os.PathLike[str], graph: str) -> Path:
    """``<artifact>/<graph>.plan`` for one of the artifact contract's graphs."""
    if not isinstance(graph, str) or not _GRAPH_NAME.match(graph):
        raise ValueError(f"graph must be a contract graph name such as 'step', got {shown(graph)}")
    return Path(artifact_dir) / f"{graph}{PLAN_SUFFIX}"


def sidecar_path(plan: str | os.PathLike[str]) -> Path:
    """``<graph>.plan`` -> ``<graph>.plan.json``."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def runtime_cache_path(plan: str | os.PathLike[str]) -> Path:
    """``<graph>.plan`` -> ``<graph>.plan.rtxcache``: TensorRT-RTX's JIT kernel cache for this plan."""
    plan = Path(plan)
    return plan.with_name(plan.name + RUNTIME_CACHE_SUFFIX)


def _cc_key(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


@dataclass(frozen=True)
class EngineSidecar:
    """What one serialized TensorRT plan was built for.

    ``target``: ``rtx`` or ``server``. ``module`` / ``module_version``: the TensorRT Python module
    that built it (``tensorrt_rtx`` 1.7.1.116, ``tensorrt`` 10.15.1.29). ``compute_capabilities``:
    the GPUs it runs on (``["8.9", "12.0"]``); ``default_compute_capabilities`` is True when the
    builder's own default targets were used (TensorRT-RTX: 8.0, 8.6, 8.9, 12.0 and later).
    ``gpu_name``: the GPU a server plan was built (and tuned) on; None for rtx plans, built with
    no GPU. ``source_sha256``: ``{file: sha256}`` of the ONNX graph the plan was built from and of
    the external weights it loads (the artifact's pins of them: a plan of another export of the
    same config differs here). ``plan_sha256``: the plan's own bytes. ``build_flags``: the options
    that shaped the plan. ``report``: what the builder did (layer counts, attention kernels,
    seconds, bytes). ``created``: ISO 8601 UTC time of the build.
    """

    target: str
    module: str
    module_version: str
    compute_capabilities: list[str]
    contract_hash: str
    graph: str
    dtype: str
    gpu_name: str | None = None
    default_compute_capabilities: bool = False
    source_sha256: dict[str, str] = field(default_factory=dict)
    plan_sha256: str | None = None
    build_flags: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    # The artifact's quantization (mode, ModelOpt version, calibration hash), None when not quantized.
    quantization: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    sidecar_version: int = SIDECAR_VERSION

    def __post_init__(self) -> None:
        if self.target not in TARGET_MODULES:
            raise ValueError(f"sidecar target must be one of {sorted(TARGET_MODULES)}, got {shown(self.target)}")
        if self.module != TARGET_MODULES[self.target]:
            raise ValueError(f"a {self.target} plan is built by {TARGET_MODULES[self.target]}, not {shown(self.module)}")
        sources = self.source_sha256
        if not isinstance(sources, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in sources.items()):
            raise ValueError(f"source_sha256 must map file names to SHA-256 digests, got {shown(sources)}")
        if self.plan_sha256 is not None and not isinstance(self.plan_sha256, str):
            raise ValueError(f"plan_sha256 must be a SHA-256 digest, got {shown(self.plan_sha256)}")

    def runs_on(self, compute_capability: str) -> bool:
        """True when this plan was built for a GPU of ``compute_capability`` (``"8.9"``)."""
        if compute_capability in self.compute_capabilities:
            return True
        # "12.0 and later": TensorRT-RTX's default targets reach forward from the newest one.
        return (self.default_compute_capabilities and bool(self.compute_capabilities)
                and _cc_key(compute_capability) >= max(map(_cc_key, self.compute_capabilities)))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any, source: str = "sidecar", artifact_dir: str | os.PathLike[str] | None = None
                  ) -> EngineSidecar:
        hint = f"rebuild with `{rebuild_command(artifact_dir, '<rtx|server>')}`"
        if not isinstance(raw, dict):
            raise EngineMismatchError(f"{source} is not a JSON object; {hint}")
        if raw.get("sidecar_version") != SIDECAR_VERSION:
            raise EngineMismatchError(f"{source} has sidecar version {shown(raw.get('sidecar_version'))}; this engine "
                                      f"reads version {SIDECAR_VERSION}; {hint}")
        names = {f.name for f in fields(cls)}
        required = {"target", "module", "module_version", "compute_capabilities", "contract_hash", "graph", "dtype",
                    "source_sha256", "plan_sha256"}
        missing = sorted(required - set(raw))
        unknown = sorted(set(raw) - names)
        if missing or unknown:
            raise EngineMismatchError(f"{source} is not an engine sidecar this version reads (missing "
                                      f"{missing or 'nothing'}, unknown {shown(unknown) if unknown else 'nothing'}); "
                                      f"{hint}")
        try:
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise EngineMismatchError(f"{source}: {exc}; {hint}") from None


def write_sidecar(path: str | os.PathLike[str], sidecar: EngineSidecar) -> None:
    """Write ``sidecar`` as JSON atomically (temp file in the same directory, then ``os.replace``)."""
    atomic_write(path, sidecar_json(sidecar))


def sidecar_json(sidecar: EngineSidecar) -> str:
    return json.dumps(sidecar.to_json(), indent=1, sort_keys=True) + "\n"


def read_sidecar(path: str | os.PathLike[str]) -> EngineSidecar:
    """Read a sidecar; a missing file is FileNotFoundError, a malformed one EngineMismatchError."""
    path = Path(path)
    hint = f"rebuild with `{rebuild_command(path.parent, '<rtx|server>')}`"
    try:
        text = read_text(path, "engine sidecar")
    except FileNotFoundError:
        raise FileNotFoundError(f"engine sidecar not found: {path}; {hint}") from None
    except ValueError as exc:  # not UTF-8, or larger than any sidecar
        raise EngineMismatchError(f"{exc}; {hint}") from None
    try:
        raw = parse_json(text, f"engine sidecar {path}")
    except ValueError as exc:
        raise EngineMismatchError(f"{exc}; {hint}") from None
    return EngineSidecar.from_json(raw, source=f"engine sidecar {path}", artifact_dir=path.parent)


def _quantization_key(record: Mapping[str, Any] | None) -> tuple | None:
    if not isinstance(record, Mapping):
        return None
    return record.get("mode"), record.get("modelopt"), record.get("calibration_sha256")


def _quantization_text(record: Mapping[str, Any] | None) -> str:
    key = _quantization_key(record)
    if key is None:
        return "not quantized"
    mode, version, calibration = key
    return f"{mode} (ModelOpt {version}, {'calibration ' + str(calibration)[:12] if calibration else 'weight-only'})"


def check_sidecar(sidecar: EngineSidecar, *, contract_hash: str, module_version: str | None,
                  compute_capability: str | None = None, gpu_name: str | None = None,
                  target: str | None = None, artifact_dir: str | os.PathLike[str] | None = None,
                  source_sha256: Mapping[str, str] | None = None,
                  quantization: Mapping[str, Any] | None = None) -> None:
    """Refuse a plan built for another target, TensorRT version, GPU or artifact.

    Args:
        contract_hash: the artifact's config hash.
        source_sha256: ``{file: sha256}`` of the files the artifact's graph loads (its pins,
            :meth:`memrope.artifact.Artifact.graph_sources`); None: not checked.
        module_version: the installed version of ``sidecar.module`` (None: not installed).
        compute_capability / gpu_name: the GPU here (None: not known yet, not checked).
        target: the target the caller asks for (None: whichever the plan was built for).
        quantization: the artifact's quantization record (its contract's; None: not quantized).

    Raises:
        EngineMismatchError: naming every field that differs and the exact command to rebuild.
    """
    here_target = target or sidecar.target
    # Rebuild as the plan was built (its explicit targets), plus this GPU when it was not among them.
    rebuilds_rtx = here_target == sidecar.target == "rtx"
    here_caps = list(sidecar.compute_capabilities) if rebuilds_rtx and not sidecar.default_compute_capabilities else []
    diffs = []
    if sidecar.target != here_target:
        diffs.append(f"target: engine {shown(sidecar.target)}, asked for {shown(here_target)}")
    elif module_version is None:
        diffs.append(f"module: the engine needs {sidecar.module} {sidecar.module_version}, which is not installed "
                     f"here (pip install -e '.[{'rtx' if sidecar.target == 'rtx' else 'tensorrt'}]')")
    elif sidecar.module_version != module_version:
        diffs.append(f"module_version: engine {sidecar.module} {shown(sidecar.module_version)}, "
                     f"here {module_version!r}")
    if _quantization_key(sidecar.quantization) != _quantization_key(quantization):
        diffs.append(f"quantization: engine {_quantization_text(sidecar.quantization)}, "
                     f"artifact {_quantization_text(quantization)}")
    if sidecar.contract_hash != contract_hash:
        diffs.append(f"contract_hash: engine {shown(sidecar.contract_hash)}, artifact {contract_hash!r}")
    if source_sha256 is not None and sidecar.source_sha256 != dict(source_sha256):
        if not sidecar.source_sha256:
            diffs.append("source_sha256: the plan records no source graph")
        else:
            files = sorted(n for n in set(sidecar.source_sha256) | set(source_sha256)
                           if sidecar.source_sha256.get(n) != source_sha256.get(n))
            diffs.append(f"source_sha256: the plan was built from another {', '.join(files)} than this artifact's "
                         "(another export of the same config, or an edited one)")
    if compute_capability is not None and sidecar.target == here_target:
        if sidecar.target == "rtx" and not sidecar.runs_on(compute_capability):
            here_caps = sorted(set(here_caps) | {compute_capability}, key=_cc_key)
            diffs.append(f"compute_capability: engine built for {', '.join(sidecar.compute_capabilities)}, "
                         f"this GPU is {compute_capability}")
        if sidecar.target == "server" and sidecar.compute_capabilities != [compute_capability]:
            diffs.append(f"compute_capability: engine {', '.join(sidecar.compute_capabilities)}, "
                         f"this GPU {compute_capability}")
    if gpu_name is not None and sidecar.target == here_target == "server" and sidecar.gpu_name != gpu_name:
        diffs.append(f"gpu_name: engine {shown(sidecar.gpu_name)}, here {gpu_name!r}")
    if diffs:
        raise EngineMismatchError(
            f"the TensorRT {sidecar.graph} plan was built for something else ({'; '.join(diffs)}); rebuild it with "
            f"`{rebuild_command(artifact_dir, here_target, here_caps)}`")


def plan_sha256(data: bytes | memoryview) -> str:
    """SHA-256 of a serialized plan (``IHostMemory`` or the bytes read back)."""
    return hashlib.sha256(data).hexdigest()


def check_plan_bytes(sidecar: EngineSidecar, data: bytes, plan: str | os.PathLike[str],
                     artifact_dir: str | os.PathLike[str] | None = None) -> None:
    """Refuse plan bytes that are not the plan ``sidecar`` describes (corrupted, or another
    build's plan copied over), before they are deserialized.

    Raises:
        EngineMismatchError: naming the plan and the command that rebuilds it.
    """
    if sidecar.plan_sha256 is None or plan_sha256(data) != sidecar.plan_sha256:
        raise EngineMismatchError(f"{plan} is not the plan its sidecar describes (SHA-256 "
                                  f"{'not recorded' if sidecar.plan_sha256 is None else 'mismatch'}): corrupted or "
                                  f"copied from another build; rebuild it with "
                                  f"`{rebuild_command(artifact_dir, sidecar.target)}`")
