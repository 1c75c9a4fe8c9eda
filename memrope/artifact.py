"""The artifact format: what ``memrope export`` writes, and opening it again safely.

Owns: the file names of an artifact directory, the run config specialised to an export's
resolution (:func:`specialise_run`), reading ``contract.json`` / ``config.json``, recomputing the
config hash, checking that the ONNX graphs' inputs and outputs are exactly the contract's,
comparing the artifact with the run a user asks for, and the integrity of its files: the pins
(size and SHA-256 of every graph and of every external-data file a graph loads, under plain
file names inside the artifact, :func:`pin_files`) and checking them (:class:`ArtifactIntegrity`:
each graph's files are hashed, in the background or at once, before the graph is handed out;
docs/artifact_integrity.md). A mismatch is an :class:`ArtifactMismatchError` that says how to
fix it. Writing artifacts is ``export/``'s job.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from memrope.cache import CacheLayout
from memrope.config import VAE_SPATIAL_STRIDE, RunConfig, WanConfig, run_config_from_dict
from memrope.contract import ArtifactContract, GraphContract, artifact_hash, build_contract, read_contract_json
from memrope.io import read_json, shown
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
    """An opened artifact. ``integrity`` (set by :func:`load_artifact`) checks the files a graph
    loads before :meth:`graph_path` hands the graph out."""

    path: Path
    contract: ArtifactContract
    integrity: ArtifactIntegrity | None = field(default=None, compare=False, repr=False)

    @property
    def model(self) -> WanConfig:
        return self.contract.model

    @property
    def run(self) -> RunConfig:
        return self.contract.run

    def graph_path(self, graph: str) -> Path:
        """``<artifact>/<graph>.onnx`` for one of the contract's graphs, once every file it loads
        (external weights too) matched its SHA-256 pin (waits for the background hash).

        Raises:
            ArtifactMismatchError: a file the graph loads differs from what the export wrote.
        """
        if graph not in self.contract.graphs:
            raise ValueError(f"artifact {self.path} has no {shown(graph)} graph (it has "
                             f"{sorted(self.contract.graphs)})")
        if self.integrity is not None:
            self.integrity.check([graph])
        return self.path / graph_file(graph)

    def graph_sources(self, graph: str) -> dict[str, str]:
        """``{file: sha256}`` of the files ``graph`` loads (its ONNX and external weights), as
        ``contract.json`` pins them: what a TensorRT plan built from it records."""
        if self.integrity is None:
            raise ValueError(f"artifact {self.path} was not opened with load_artifact; its file pins are unknown")
        return self.integrity.sources(graph)

    def verify(self) -> None:
        """Wait for the SHA-256 of every pinned file; raise :class:`ArtifactMismatchError` on a mismatch."""
        if self.integrity is not None:
            self.integrity.check()

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
                         vae=c.vae, quantization=c.quantization) != c.config_hash:
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


def _plain_name(name: object) -> bool:
    """A file name directly inside the artifact: no folder part, no ``..``, not absolute."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..")
            and not any(c in name for c in "/\\\0"))


def _read_pins(path: Path, pins: object) -> dict[str, FilePin]:
    """``contract.json``'s ``files``: plain file names -> what the export wrote there."""
    if not isinstance(pins, dict) or not pins:
        raise ArtifactMismatchError(f"artifact {path}: contract.json records no file hashes (exported by an older "
                                    "version); re-export it with `memrope export`")
    read = {}
    for name, pin in pins.items():
        if not _plain_name(name):
            raise ArtifactMismatchError(f"artifact {path}: contract.json pins {shown(name)}, which is not a plain file "
                                        "name inside the artifact; the contract was edited — re-export it")
        size = pin.get("bytes") if isinstance(pin, dict) else None
        digest = pin.get("sha256") if isinstance(pin, dict) else None
        if (isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(digest, str)
                or not _SHA256.match(digest)):
            raise ArtifactMismatchError(f"artifact {path}: contract.json's pin of {name} is {shown(pin)}; expected "
                                        "{\"bytes\": N, \"sha256\": 64 hex digits} — re-export it")
        read[name] = FilePin(size, digest)
    return read


def _external_locations(model: object) -> list[str]:
    """The ``location`` of every tensor of ``model`` stored outside it (initializers, constants,
    subgraphs and functions alike): the files ONNX Runtime and TensorRT load with the graph."""
    from onnx import AttributeProto, TensorProto

    def tensors(nodes, initializers=(), sparse=()):
        yield from initializers
        for s in sparse:
            yield from (s.values, s.indices)
        for node in nodes:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield attr.t
                yield from attr.tensors
                for graph in ([attr.g] if attr.type == AttributeProto.GRAPH else []) + list(attr.graphs):
                    yield from tensors(graph.node, graph.initializer, graph.sparse_initializer)

    found = tensors(model.graph.node, model.graph.initializer, model.graph.sparse_initializer)
    for function in model.functions:
        found = itertools.chain(found, tensors(function.node))
    locations = []
    for tensor in found:
        if tensor.data_location == TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location not in locations:
                locations.append(location)
    return locations


def _parse_graph(path: Path, data: bytes) -> object:
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError:
        raise ArtifactMismatchError(f"{path} is not a readable ONNX graph; re-export it with `memrope export`") from None
    return model


def _check_graph_io(path: Path, model: object, graph: GraphContract) -> None:
    got = [(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim)) for i in model.graph.input]
    if got != [(t.name, t.shape) for t in graph.inputs] or [o.name for o in model.graph.output] != graph.output_names:
        raise ArtifactMismatchError(f"{path}: the graph's inputs/outputs do not match contract.json; the "
                                    "artifact was modified or mixed with another export — re-export it")


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK_BYTES = 1 << 24


@dataclass(frozen=True)
class FilePin:
    """What the export wrote to one file of the artifact: its size and SHA-256."""

    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha256}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 16 MiB chunks (hashlib releases the GIL on each)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def pin_files(directory: str | os.PathLike[str], graphs: list[str] | None = None) -> dict[str, dict]:
    """``{file: {bytes, sha256}}`` for every graph in ``directory`` (default: every ``*.onnx``) and
    every external-data file it loads: what the export records in ``contract.json``."""
    directory = Path(directory)
    names = [graph_file(g) for g in graphs] if graphs is not None else sorted(p.name for p in directory.glob("*.onnx"))
    pins: dict[str, dict] = {}
    for name in names:
        data = (directory / name).read_bytes()
        pins[name] = FilePin(len(data), hashlib.sha256(data).hexdigest()).to_json()
        for location in _external_locations(_parse_graph(directory / name, data)):
            if not _plain_name(location):
                raise ValueError(f"{directory / name} stores weights in {shown(location)}, outside its folder")
            file = directory / location
            pins.setdefault(location, FilePin(file.stat().st_size, file_sha256(file)).to_json())
    return pins


class ArtifactIntegrity:
    """The SHA-256 check of the files an artifact's graphs load, against ``contract.json``'s pins.

    Graph files are hashed from the very bytes whose I/O is checked, when the artifact is
    opened. Their external weights (gigabytes at 1.3B: docs/artifact_integrity.md) are hashed by
    :meth:`start` in a daemon thread while the caller loads everything else, or by
    :meth:`hash_now`. :meth:`check` raises :class:`ArtifactMismatchError` naming a file of a
    graph that differs; it hashes a file the thread has not reached yet itself, so a graph never
    waits for another graph's weights. :meth:`Artifact.graph_path`, through which every backend
    and ``memrope build`` reaches a graph, calls it: a file that does not match never loads.
    """

    def __init__(self, path: Path, pins: dict[str, FilePin], graph_files: dict[str, tuple[str, ...]],
                 hashed: dict[str, str]):
        self.path, self.pins, self.graph_files = path, pins, graph_files
        self._digests: dict[str, Future] = {name: Future() for name in pins}
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        for name, digest in hashed.items():
            self._claimed.add(name)
            self._digests[name].set_result(digest)
        self._checked: set[str] = set()

    def _order(self) -> list[str]:
        # Graph order (step, text, recache, vae_decode): the files a run loads first are hashed first.
        order = [name for files in self.graph_files.values() for name in files]
        return list(dict.fromkeys(order + sorted(self.pins)))

    def _hash(self, name: str) -> None:
        """Hash ``name`` here unless another thread has taken it."""
        with self._lock:
            if name in self._claimed:
                return
            self._claimed.add(name)
        try:
            self._digests[name].set_result(file_sha256(self.path / name))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever checks this file
            self._digests[name].set_exception(exc)

    def _hash_all(self) -> None:
        for name in self._order():
            self._hash(name)

    def start(self) -> None:
        """Hash every file not hashed yet, in a daemon thread."""
        threading.Thread(target=self._hash_all, name="memrope-artifact-sha256", daemon=True).start()

    def hash_now(self) -> None:
        self._hash_all()

    def sources(self, graph: str) -> dict[str, str]:
        """``{file: sha256}`` of the files ``graph`` loads, as ``contract.json`` pins them."""
        return {name: self.pins[name].sha256 for name in self.graph_files[graph]}

    def check(self, graphs: list[str] | tuple[str, ...] | None = None) -> None:
        """Hash (or wait for) the files of ``graphs`` (default: every pinned file); raise
        :class:`ArtifactMismatchError` naming the first that differs from its pin."""
        names = list(self.pins) if graphs is None else [n for g in graphs for n in self.graph_files[g]]
        for name in names:
            if name in self._checked:
                continue
            self._hash(name)
            if self._digests[name].result() != self.pins[name].sha256:
                raise _differs(self.path, name)
            self._checked.add(name)


def _differs(path: Path, name: str) -> ArtifactMismatchError:
    return ArtifactMismatchError(f"artifact {path}: {name} differs from the file the export wrote (SHA-256 "
                                 "mismatch): it was edited, corrupted or mixed in from another export; re-export it")


def _check_size(path: Path, name: str, pin: FilePin) -> None:
    file = path / name
    if not file.is_file():
        raise ArtifactMismatchError(f"artifact {path}: {name} is missing; re-export it with `memrope export`")
    size = file.stat().st_size
    if size != pin.bytes:
        raise ArtifactMismatchError(f"artifact {path}: {name} has {size} bytes, the export wrote {pin.bytes}: the "
                                    "file was edited or mixed in from another export; re-export it")


def load_artifact(path: str | os.PathLike[str], *, verify: bool = False) -> Artifact:
    """Open and verify an artifact directory written by ``memrope export``.

    Checks the contract and config against what this engine derives; that every graph of the
    contract, and every external-data file each graph loads, is pinned in ``contract.json``
    under a plain file name inside the artifact, with its recorded size; and each graph's I/O
    names and SHA-256 (from the bytes read for that check). The external weights are hashed
    in a background thread (``verify=False``), each graph's checked before
    :meth:`Artifact.graph_path` hands it out, or all before this returns (``verify=True``,
    ``--verify-artifact``). A mismatch is an :class:`ArtifactMismatchError` naming the file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"artifact {path} is a file, not an artifact directory (the folder "
                                 "`memrope export` wrote)")
    if not path.is_dir():
        raise FileNotFoundError(f"artifact directory not found: {path}")
    raw = read_contract_json(path / CONTRACT_FILE)
    pins = _read_pins(path, raw.pop("files", None))
    config = read_json(path / CONFIG_FILE, "artifact config")
    try:
        model = WanConfig.from_dict(config["model"])
        run = run_config_from_dict(config["run"])
        vae = VAEDecoderConfig.from_dict(config["vae"]) if config.get("vae") is not None else None
        quantization = config.get("quantization")
        if quantization is not None and not isinstance(quantization, dict):
            raise TypeError(f"quantization must be an object, got {type(quantization).__name__}")
    except (KeyError, TypeError) as exc:
        raise ArtifactMismatchError(f"artifact config {path / CONFIG_FILE} is unreadable: {exc}") from None
    layout = CacheLayout.for_run(model, run)
    contract = build_contract(model, run, layout, raw["dtype"], raw["batch"], raw["height"], raw["width"], vae=vae,
                              quantization=quantization)
    if raw.get("config_hash") != contract.config_hash or config.get("config_hash") != contract.config_hash:
        raise ArtifactMismatchError(f"artifact {path}: the config hash in contract.json/config.json does "
                                    "not match its configuration (edited or stale); re-export it")
    if raw != json.loads(json.dumps(contract.to_json())):
        raise ArtifactMismatchError(f"artifact {path}: contract.json differs from the contract this engine "
                                    "derives for its config; re-export it with this version")
    for name, pin in pins.items():
        _check_size(path, name, pin)
    graph_files: dict[str, tuple[str, ...]] = {}
    hashed: dict[str, str] = {}
    for graph, graph_contract in contract.graphs.items():
        name = graph_file(graph)
        if name not in pins:
            raise ArtifactMismatchError(f"artifact {path}: contract.json pins no {name} (the {graph} graph runs from "
                                        "it); the contract was edited — re-export it")
        # The bytes whose I/O is checked are the bytes hashed: what was checked is what was pinned.
        data = (path / name).read_bytes()
        hashed[name] = hashlib.sha256(data).hexdigest()
        if hashed[name] != pins[name].sha256:
            raise _differs(path, name)
        model_proto = _parse_graph(path / name, data)
        del data
        _check_graph_io(path / name, model_proto, graph_contract)
        locations = _external_locations(model_proto)
        for location in locations:
            if not _plain_name(location):
                raise ArtifactMismatchError(f"artifact {path}: {name} loads {shown(location)}, which is not a plain "
                                            "file name inside the artifact; re-export it")
            if location not in pins:
                raise ArtifactMismatchError(f"artifact {path}: {name} loads {location}, which contract.json does not "
                                            "pin; re-export it")
        graph_files[graph] = (name, *locations)
    loaded = {n for files in graph_files.values() for n in files}
    extra = sorted(f.name for f in path.iterdir() if f.is_file() and f.suffix in (".onnx", ".data") and f.name not in loaded)
    if extra:
        logger.warning("artifact %s holds files no graph of it loads (not read): %s", path, ", ".join(extra))
    integrity = ArtifactIntegrity(path, pins, graph_files, hashed)
    if verify:
        integrity.hash_now()
        integrity.check()
    else:
        integrity.start()
    return Artifact(path, contract, integrity)
