"""The artifact format: what ``memrope export`` writes, and opening it again safely.

Owns: the file names of an artifact directory, the run config specialised to an export's
resolution (:func:`specialise_run`), reading ``contract.json`` / ``config.json``, recomputing the
config hash, checking that the ONNX graphs' inputs and outputs are exactly the contract's, and
comparing the artifact with the run a user asks for. A mismatch is an
:class:`ArtifactMismatchError` that says how to fix it. Writing artifacts is ``export/``'s job.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from memrope.cache import CacheLayout
from memrope.config import VAE_SPATIAL_STRIDE, RunConfig, WanConfig, run_config_from_dict
from memrope.contract import ArtifactContract, artifact_hash, build_contract, read_contract_json
from memrope.io import read_json
from memrope.vae import VAEDecoderConfig

CONTRACT_FILE, CONFIG_FILE = "contract.json", "config.json"


def graph_file(graph: str) -> str:
    """The ONNX file of one of an artifact's graphs (``step`` -> ``step.onnx``)."""
    return f"{graph}.onnx"


STEP_FILE, TEXT_FILE = graph_file("step"), graph_file("text")
logger = logging.getLogger(__name__)


def specialise_run(run: RunConfig, model: WanConfig, height: int, width: int, batch: int) -> RunConfig:
    """The run config at ``height`` x ``width`` pixels (multiples of 16; latent = pixels / 8)."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % 16:
            raise ValueError(f"--{name} must be a positive multiple of 16 pixels, got {value}")
    if batch <= 0:
        raise ValueError(f"--batch must be positive, got {batch}")
    run = replace(run, latent_height=height // VAE_SPATIAL_STRIDE, latent_width=width // VAE_SPATIAL_STRIDE,
                  batch_size=batch)
    if run.latent_channels != model.in_dim:
        raise ValueError(f"run config latent_channels={run.latent_channels} does not match the "
                         f"model's in_dim={model.in_dim}")
    return run


class ArtifactMismatchError(ValueError):
    """An artifact was exported for something other than what is being asked of it."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    contract: ArtifactContract

    @property
    def model(self) -> WanConfig:
        return self.contract.model

    @property
    def run(self) -> RunConfig:
        return self.contract.run

    def graph_path(self, graph: str) -> Path:
        """``<artifact>/<graph>.onnx`` for one of the contract's graphs."""
        if graph not in self.contract.graphs:
            raise ValueError(f"artifact {self.path} has no {graph!r} graph (it has {sorted(self.contract.graphs)})")
        return self.path / graph_file(graph)

    @property
    def step_path(self) -> Path:
        return self.graph_path("step")

    @property
    def text_path(self) -> Path:
        return self.graph_path("text")

    def layout(self) -> CacheLayout:
        return CacheLayout.for_run(self.model, self.run)

    def check_run(self, run: RunConfig) -> RunConfig:
        """The user's ``run`` at this artifact's resolution, or an error naming what differs.

        The artifact fixes the resolution; the hash covers the cache policy, the sampler, the
        batch, and (for the ``global`` policy only) the video length that sizes its cache.
        """
        c = self.contract
        wanted = specialise_run(run, self.model, c.height, c.width, run.batch_size)
        if artifact_hash(self.model, wanted, c.dtype, wanted.batch_size, c.height, c.width,
                         vae=c.vae) != c.config_hash:
            diffs = [f"{name}: artifact {a!r}, requested {b!r}"
                     for name, a, b in (("cache", self.run.cache, wanted.cache),
                                        ("sampler", self.run.sampler, wanted.sampler),
                                        ("batch", c.batch, wanted.batch_size),
                                        ("latent_channels", self.run.latent_channels, wanted.latent_channels),
                                        ("num_output_frames", self.run.num_output_frames, wanted.num_output_frames))
                     if a != b]
            raise ArtifactMismatchError(
                f"artifact {self.path} was exported for a different configuration "
                f"({'; '.join(diffs)}); re-export it with `memrope export --config <your run.yaml> ...`")
        return wanted


def _check_graph_io(path: Path, names: list[str], shapes: list[tuple[int, ...]], outputs: list[str]) -> None:
    import onnx

    if not path.is_file():
        raise ArtifactMismatchError(f"artifact graph missing: {path}; re-export with `memrope export`")
    model = onnx.load(str(path), load_external_data=False)
    got = [(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim)) for i in model.graph.input]
    if got != list(zip(names, shapes)) or [o.name for o in model.graph.output] != outputs:
        raise ArtifactMismatchError(f"{path}: the graph's inputs/outputs do not match contract.json; the "
                                    "artifact was modified or mixed with another export — re-export it")


# Files whose bytes the contract pins: the graphs and their external weights.
PINNED_SUFFIXES = (".onnx", ".data")
_HASH_CHUNK_BYTES = 1 << 24


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def pin_files(directory: Path) -> dict[str, dict]:
    """``{file: {bytes, sha256, mtime_ns}}`` for every graph and external-data file in ``directory``
    (what the export records in ``contract.json``)."""
    pins = {}
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.suffix in PINNED_SUFFIXES:
            stat = file.stat()
            pins[file.name] = {"bytes": stat.st_size, "sha256": file_sha256(file), "mtime_ns": stat.st_mtime_ns}
    return pins


def _check_pins(path: Path, pins: object, verify: bool) -> None:
    """Every pinned file is present with its size; its SHA-256 is recomputed when ``verify`` or
    when its mtime moved (a copy, an edit). A mismatch names the file."""
    if not isinstance(pins, dict) or not pins:
        raise ArtifactMismatchError(f"artifact {path}: contract.json records no file hashes (exported by an older "
                                    "version); re-export it with `memrope export`")
    for name, pin in pins.items():
        file = path / name
        if not file.is_file():
            raise ArtifactMismatchError(f"artifact {path}: {name} is missing; re-export it with `memrope export`")
        stat = file.stat()
        if stat.st_size != pin.get("bytes"):
            raise ArtifactMismatchError(f"artifact {path}: {name} has {stat.st_size} bytes, the export wrote "
                                        f"{pin.get('bytes')}: the file was edited or mixed in from another export; "
                                        "re-export it")
        if verify or stat.st_mtime_ns != pin.get("mtime_ns"):
            if file_sha256(file) != pin.get("sha256"):
                raise ArtifactMismatchError(f"artifact {path}: {name} differs from the file the export wrote "
                                            "(SHA-256 mismatch): it was edited or mixed in from another export; "
                                            "re-export it")
    extra = sorted(f.name for f in path.iterdir() if f.is_file() and f.suffix in PINNED_SUFFIXES and f.name not in pins)
    if extra:
        logger.warning("artifact %s holds files its export did not write (ignored): %s", path, ", ".join(extra))


def load_artifact(path: str | Path, *, verify: bool = False) -> Artifact:
    """Open and verify an artifact directory written by ``memrope export``.

    Checks the contract and config against what this engine derives, the graphs' I/O names,
    and the recorded size of every graph and external-data file; a file whose mtime changed is
    hashed and compared, and ``verify`` hashes every file (SHA-256). A mismatch is an
    :class:`ArtifactMismatchError` naming the file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"artifact {path} is a file, not an artifact directory (the folder "
                                 "`memrope export` wrote)")
    if not path.is_dir():
        raise FileNotFoundError(f"artifact directory not found: {path}")
    raw = read_contract_json(path / CONTRACT_FILE)
    _check_pins(path, raw.pop("files", None), verify)
    config = read_json(path / CONFIG_FILE, "artifact config")
    try:
        model = WanConfig.from_dict(config["model"])
        run = run_config_from_dict(config["run"])
        vae = VAEDecoderConfig.from_dict(config["vae"]) if config.get("vae") is not None else None
    except (KeyError, TypeError) as exc:
        raise ArtifactMismatchError(f"artifact config {path / CONFIG_FILE} is unreadable: {exc}") from None
    layout = CacheLayout.for_run(model, run)
    contract = build_contract(model, run, layout, raw["dtype"], raw["batch"], raw["height"], raw["width"], vae=vae)
    if raw.get("config_hash") != contract.config_hash or config.get("config_hash") != contract.config_hash:
        raise ArtifactMismatchError(f"artifact {path}: the config hash in contract.json/config.json does "
                                    "not match its configuration (edited or stale); re-export it")
    if raw != json.loads(json.dumps(contract.to_json())):
        raise ArtifactMismatchError(f"artifact {path}: contract.json differs from the contract this engine "
                                    "derives for its config; re-export it with this version")
    for name, graph in contract.graphs.items():
        _check_graph_io(path / graph_file(name), graph.input_names, [t.shape for t in graph.inputs],
                        graph.output_names)
    return Artifact(path, contract)
