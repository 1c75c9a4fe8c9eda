"""Files in and out: validated inputs, atomic outputs, and what a killed run leaves behind.

Owns: reading ``--text-embeds`` and ``--noise`` safetensors files with shape checks that say
what was expected; writing any file atomically (temp file in the same folder, fsync,
``os.replace``) so a crash never leaves a file that looks finished; the names of temp files and
partial directories (``.NAME.PID.UUID.tmp``, ``.NAME.partial-PID-ID``, ``.NAME.old-PID-ID``),
which carry the writer's process id so that a later run can remove what a killed one left
(:func:`clean_leftovers`); checking an output path before any work (:func:`check_output_path`);
and :class:`SafetensorsStreamWriter`, which writes a tensor file block by block at constant
memory. Reading the small text files users hand us (run configs, prompt timelines, jsonl,
artifact contracts, sidecars) is bounded here: their size (:func:`read_text`), YAML aliases
and nesting (:func:`read_yaml`, :func:`parse_json`), and every user value shown in an error
message (:func:`shown`), so a hostile 400-byte file costs milliseconds and one short line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import reprlib
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                            metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` atomically and return the path.

    Tensors are detached, moved to the CPU and made contiguous; tensors that share storage are
    copied (safetensors refuses shared storage).
    """
    import torch
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


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:(?P<tmp_pid>\d+)\.[0-9a-f]{32}\.tmp"
                       r"|(?:partial|old)-(?P<dir_pid>\d+)-[0-9a-f]{8})$")


def partial_path(target: str | os.PathLike[str], kind: str = "partial") -> Path:
    """A hidden sibling of ``target`` for a directory being built (``kind='partial'``) or set
    aside (``'old'``), named with this process's id so :func:`clean_leftovers` can tell whether
    its writer is still alive."""
    target = Path(target)
    if kind not in ("partial", "old"):
        raise ValueError(f"kind must be 'partial' or 'old', got {kind!r}")
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_leftovers(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files and partial directories that killed runs left in ``directory``.

    Only entries named by this module whose writer process is gone are removed (a live writer's
    are kept); each removal is logged. Returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is None:
            continue
        pid = int(match.group("tmp_pid") or match.group("dir_pid"))
        if _alive(pid):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            logger.warning("could not remove %s, left by a killed run (pid %d): %s", entry, pid, exc.strerror)
            continue
        logger.warning("removed %s, left by a killed run (pid %d)", entry, pid)
        removed.append(entry)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and ``os.replace`` it onto ``path``,
    on failure remove it. Readers never see half a file. Leftovers of killed runs in the folder
    are cleaned first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path.parent)
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
    with atomic_path(path) as tmp, open(tmp, "w" if isinstance(data, str) else "wb") as handle:
        handle.write(data)
    return Path(path)


# Sizes of the text files users hand us. JSON parses at hundreds of MB/s, so 16 MiB is a bound
# that no real contract, sidecar or prompt jsonl reaches; PyYAML (pure Python) parses about 1 MB/s,
# and the authors' YAML configs are a few KB.
MAX_TEXT_BYTES = 16 << 20
MAX_YAML_BYTES = 1 << 20
# A YAML alias re-uses a node: 9 aliases of 9 aliases of ... make a 400-byte file stand for a
# billion values, which cost nothing to load but everything to print, hash or compare.
MAX_YAML_ALIASES = 32
MAX_YAML_VALUES = 100_000  # values in the document with every alias expanded
SHOWN_CHARS = 80


class _BoundedRepr(reprlib.Repr):
    """``reprlib`` with every limit set, and the cases it leaves unbounded bounded too."""

    def __init__(self, chars: int):
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxset = self.maxfrozenset = self.maxdeque = 8
        self.maxdict = 6
        self.maxstring = self.maxother = chars
        self.maxlong = 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4 * self.maxlong:  # repr() of a 5000-digit int raises (and costs)
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return self.repr_str(x, level)  # slices before it calls repr (the default repr would not)


def shown(value: object, chars: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message: at most ``chars`` characters, computed in bounded time
    and memory however long, large or deeply nested ``value`` is (a megabyte string, a YAML alias
    bomb). Small values read exactly as ``repr`` writes them."""
    text = _BoundedRepr(chars).repr(value)
    return text if len(text) <= chars else text[: chars - 3] + "..."


def _size_text(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"


def read_text(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a file of at most ``max_bytes``; errors name ``what`` it was supposed to be.

    Reads at most ``max_bytes + 1`` bytes, so ``/dev/zero`` or a 10 GB file fails at once."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{what} {path} is larger than {_size_text(max_bytes)}, the most read for a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start}); expected a UTF-8 text file") from None


def parse_json(text: str, what: str) -> object:
    """``json.loads(text)``; every way it can fail is one ``ValueError`` naming ``what``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to read (beyond Python's recursion limit); expected "
                         "JSON nested a few levels deep") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ValueError(f"{what} is not valid JSON: {_clip(str(exc))}") from None


def read_json(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_TEXT_BYTES) -> dict:
    """Parse a JSON file holding an object; errors name ``what`` it was supposed to be."""
    path = Path(path)
    raw = parse_json(read_text(path, what, max_bytes), f"{what} {path}")
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {path} holds a JSON {type(raw).__name__}; expected a JSON object {{...}}")
    return raw


def read_yaml(path: str | os.PathLike[str], what: str) -> object:
    """Parse a YAML file (PyYAML's safe loader) with its size, aliases and nesting bounded.

    Raises ValueError naming ``what`` and the file: larger than :data:`MAX_YAML_BYTES`, more
    than :data:`MAX_YAML_ALIASES` aliases, aliases that expand the document past
    :data:`MAX_YAML_VALUES` values (or into itself), nesting beyond the recursion limit, or
    invalid YAML (one line, with line and column)."""
    import yaml

    path = Path(path)
    where = f"{what} {path}"

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
            return super().compose_node(parent, index)

    loader = Loader(read_text(path, what, MAX_YAML_BYTES))
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise ValueError(f"{where} is not valid YAML: {yaml_error(exc)}") from None
        except RecursionError:
            raise ValueError(f"{where} is nested too deeply to read (beyond Python's recursion limit); expected "
                             "a config nested a few levels deep") from None
        if node is None:
            return None
        if loader.aliases > MAX_YAML_ALIASES:
            raise ValueError(f"{where} uses {loader.aliases} YAML aliases (*name); at most {MAX_YAML_ALIASES} "
                             "are accepted")
        if loader.aliases and _expanded_values(node, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise ValueError(f"{where}: YAML aliases expand it to more than {MAX_YAML_VALUES:,} values (or into "
                             "itself); write the values out")
        try:
            return loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise ValueError(f"{where} is not valid YAML: {yaml_error(exc)}") from None
        except ValueError as exc:  # an integer of more than 4300 digits
            raise ValueError(f"{where} is not valid YAML: {_clip(str(exc))}") from None
    finally:
        loader.dispose()


def _expanded_values(root: object, limit: int) -> int:
    """Values (nodes) of a composed YAML document with every alias expanded, counted up to just
    past ``limit``; a node that contains itself counts as past it."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: object) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            return limit + 1
        open_nodes.add(key)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root)


def _clip(text: str, chars: int = 200) -> str:
    return text if len(text) <= chars else text[: chars - 3] + "..."


def yaml_error(exc: Exception) -> str:
    """PyYAML's multi-line error as one line with its line and column (1-based), at most 200 characters."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    if mark is None:
        return _clip(problem)
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark.line != mark.line:
        text += f" ({context} from line {context_mark.line + 1}, column {context_mark.column + 1})"
    return _clip(text)


def read_safetensors(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """Read a whole safetensors file; errors name ``what`` the file was supposed to be."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except OSError as exc:  # a directory, no permission: say which, not "not found"
        raise type(exc)(f"{what} file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{what} file {path} is not a readable safetensors file: {exc}") from None


def _expect(tensors: Mapping[str, torch.Tensor], key: str, path: Path, what: str) -> torch.Tensor:
    import torch

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


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the only test that also holds for root, read-only
    mounts and pseudo-filesystems such as /proc."""
    probe = folder / f".memrope-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise ValueError(f"{what}: {folder} is not writable ({exc.strerror})") from None
    os.close(fd)
    probe.unlink(missing_ok=True)


def check_output_path(path: str | os.PathLike[str], what: str, *, suffixes: tuple[str, ...] = (),
                      directory: bool = False, estimate_bytes: int | None = None) -> Path:
    """Check, before any work, that ``path`` can be written; clean leftovers of killed runs there.

    ``what`` names the option in messages (``--out``). A file output must not be an existing
    directory and must end in one of ``suffixes``; a ``directory`` output must not be a file. The
    nearest existing folder on the way must be a writable directory, and when
    ``estimate_bytes`` is given its filesystem must have that much free space. Nothing is
    created. Raises ValueError naming the path and the problem."""
    path = Path(path)
    if directory:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{what} {path} is a file; expected a directory")
    else:
        if path.is_dir():
            raise ValueError(f"{what} {path} is a directory; expected a file path")
        if suffixes and path.suffix.lower() not in suffixes:
            raise ValueError(f"{what} {path} must end in {' or '.join(suffixes)}")
    folder = path if directory else path.parent
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise ValueError(f"{what} {path}: {base} is not a directory")
    _probe_writable(base, f"{what} {path}")
    if estimate_bytes is not None:
        free = shutil.disk_usage(base).free
        if free < estimate_bytes:
            raise ValueError(f"{what} {path}: needs about {estimate_bytes / 1e6:.1f} MB but {base} has "
                             f"{free / 1e6:.1f} MB free")
    if folder.is_dir():
        clean_leftovers(folder)
    return path


def _safetensors_dtypes() -> dict:
    import torch

    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class SafetensorsStreamWriter:
    """One tensor written to a ``.safetensors`` file frame block by frame block, at constant memory.

    ``SafetensorsStreamWriter(path, "latents", [B, F, C, H, W])`` writes the header (the whole
    shape is known up front) to a temp file beside ``path``; ``write(frame_start, block)`` stores
    ``block [B, f, C, H, W]`` at frames ``frame_start .. frame_start + f - 1``; ``close()`` checks
    every frame was written, fsyncs and renames onto ``path``; ``abort()`` (or an exception inside
    a ``with``) removes the temp file. The result is a standard safetensors file (readable by
    ``safetensors.torch.load_file``).
    """

    def __init__(self, path: str | os.PathLike[str], name: str, shape: tuple[int, ...] | list[int],
                 dtype: torch.dtype | None = None):
        import torch

        names = _safetensors_dtypes()
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in names:
            raise ValueError(f"dtype must be one of {list(names)}, got {dtype}")
        self.path, self.name = Path(path), name
        self.shape, self.dtype = tuple(int(d) for d in shape), dtype
        if len(self.shape) < 2 or min(self.shape) <= 0:
            raise ValueError(f"shape must be [B, F, ...] with positive sizes, got {list(self.shape)}")
        self._frame_bytes = torch.empty((), dtype=dtype).element_size()
        for d in self.shape[2:]:
            self._frame_bytes *= d
        nbytes = self._frame_bytes * self.shape[0] * self.shape[1]
        header = json.dumps({name: {"dtype": names[dtype], "shape": list(self.shape),
                                    "data_offsets": [0, nbytes]}, "__metadata__": {"format": "pt"}},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # 8-byte aligned data, as safetensors writes it
        self._data_start = 8 + len(header)
        self._written = [False] * self.shape[1]
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - open for the writer's life, closed by close()
            self._file.write(len(header).to_bytes(8, "little") + header)
            self._file.truncate(self._data_start + nbytes)
        except BaseException as exc:
            self._discard(exc)
            raise
        self._closed = False

    def write(self, frame_start: int, block: torch.Tensor) -> None:
        """Store ``block [B, f, ...]`` (any device; cast to the file's dtype) at ``frame_start``."""
        import torch

        if self._closed:
            raise ValueError(f"write() on a closed writer for {self.path}")
        b, f = block.shape[:2]
        if (b, *block.shape[2:]) != (self.shape[0], *self.shape[2:]) or frame_start < 0 \
                or frame_start + f > self.shape[1]:
            raise ValueError(f"block {list(block.shape)} at frame {frame_start} does not fit {list(self.shape)}")
        host = block.detach().to("cpu", self.dtype).contiguous()
        raw = host.view(torch.uint8).numpy() if self.dtype == torch.bfloat16 else host.numpy()
        try:
            for i in range(b):
                self._file.seek(self._data_start + (i * self.shape[1] + frame_start) * self._frame_bytes)
                self._file.write(raw[i].tobytes())
        except BaseException as exc:
            self._discard(exc)
            raise
        self._written[frame_start:frame_start + f] = [True] * f

    def close(self) -> Path:
        if self._closed:
            return self.path
        try:
            missing = self._written.count(False)
            if missing:
                raise ValueError(f"{missing} of {self.shape[1]} frames were never written; {self.path} was not "
                                 "created")
            self._file.close()
        except BaseException as exc:
            self._discard(exc)
            raise
        self._closed = True
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        if not self._closed:
            self._discard(RuntimeError(f"writer for {self.path} aborted"))

    def _discard(self, exc: BaseException) -> None:
        self._closed = True
        file = getattr(self, "_file", None)
        if file is not None and not file.closed:
            file.close()
        with contextlib.suppress(BaseException):  # atomic_path re-raises; the caller raises its own
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard(exc if exc is not None else RuntimeError("aborted"))
