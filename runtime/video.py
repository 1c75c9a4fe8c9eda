"""Video files out: an incremental, atomic H.264 MP4 writer and optional PNG frames.

Owns: the MP4 container and codec settings (libx264, yuv420p, CRF), streaming frames into the
encoder as they arrive (memory stays constant in the video length: nothing is buffered beyond
the encoder's own bounded lookahead), and the atomic-output guarantee: the video is written to a
temp file beside ``path`` and renamed onto it only by a clean ``close()``; any failure removes the
temp file, so a file at ``path`` is always a finished video. Also owns PNG frame dumps (a
run's folder of frames appears whole, or not at all).

Does not own decoding latents into frames (``memrope.runtime.vae``) or choosing output paths (the CLI).
Frames everywhere are uint8 RGB ``[T, H, W, 3]`` (numpy arrays or torch tensors).
"""

from __future__ import annotations

import logging
import os
import re
from fractions import Fraction
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# x264 frame threads: a fixed count keeps the bitstream identical run to run and machine to machine.
ENCODER_THREADS = 2


def _require_av():
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"writing video needs PyAV ({exc}); pip install av") from None
    return av


def _as_frames(frames, what: str = "frames") -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` (numpy or torch, any device) -> C-contiguous numpy on the host."""
    if hasattr(frames, "detach") and hasattr(frames, "cpu"):  # torch.Tensor, without importing torch
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"{what} must be a uint8 numpy array or torch tensor [T, H, W, 3], "
                        f"got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {frames.dtype} (convert with the VAE decoder's output)")
    if frames.ndim == 3:
        raise ValueError(f"{what} have shape {list(frames.shape)}, expected [T, H, W, 3]: add the frame axis "
                         "(frames[None]) for a single frame")
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"{what} have shape {list(frames.shape)}, expected [T, H, W, 3] RGB")
    return np.ascontiguousarray(frames)


def _check_output_dir(directory: Path, what: str) -> None:
    if not directory.exists():
        raise ValueError(f"cannot write {what}: folder {directory} does not exist (create it first)")
    if not directory.is_dir():
        raise ValueError(f"cannot write {what}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what}: folder {directory} is not writable")


class Mp4Writer:
    """Incremental H.264 MP4 writer; a context manager.

    ``Mp4Writer(path, fps=16, width=W, height=H, crf=18)`` checks its arguments and the output
    folder (it must exist and be writable; it is not created), then opens the encoder on a temp
    file beside ``path``. ``write(frames [T, H, W, 3] uint8)`` encodes the frames immediately.
    ``close()`` (or a clean ``with`` exit) flushes the encoder and renames the temp file onto
    ``path``; ``abort()`` (or an exception inside the ``with``) removes it and leaves ``path``
    untouched. Width and height must be even (yuv420p subsamples chroma by 2).
    """

    def __init__(self, path: str | os.PathLike[str], fps: float = 16, *, width: int, height: int,
                 crf: int = 18, preset: str = "medium") -> None:
        av = _require_av()
        from memrope.io import atomic_path

        self.path = Path(path)
        if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0 \
                or not np.isfinite(float(fps)):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value % 2:
                raise ValueError(f"{name} {value} is odd; H.264 yuv420p needs even width and height "
                                 "(crop or pad the frames by one pixel)")
        if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)) or not 0 <= crf <= 51:
            raise ValueError(f"crf must be an integer in [0, 51], got {crf!r}")
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"cannot write the video to {self.path}: it is a directory")
        _check_output_dir(self.path.parent, f"the video {self.path}")

        self.width, self.height, self.fps, self.crf = int(width), int(height), fps, int(crf)
        self._frames = 0
        self._closed = False
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            # As reproducible as x264 allows: a fixed encoder thread count (x264's output depends on
            # its thread count, which "auto" derives from the machine's core count and the threading
            # mode) and no version or time stamps. Two processes encoding the same frames have still
            # been seen to write different bitstreams (a run that first loaded the text encoder,
            # against one that did not), so tests compare frames, not MP4 bytes.
            self._container = av.open(str(self._tmp), mode="w", format="mp4", options={"fflags": "+bitexact"})
            rate = Fraction(fps).limit_denominator(1001)
            self._stream = self._container.add_stream("libx264", rate=rate)
            self._stream.width, self._stream.height = self.width, self.height
            self._stream.pix_fmt = "yuv420p"
            self._stream.codec_context.time_base = 1 / rate
            self._stream.codec_context.thread_count = ENCODER_THREADS
            self._stream.codec_context.thread_type = "FRAME"
            self._stream.codec_context.flags |= av.codec.context.Flags.bitexact
            self._stream.options = {"crf": str(self.crf), "preset": preset}
        except BaseException as exc:
            self._discard(exc)
            raise
        logger.debug("writing %s (%dx%d, %s fps, crf %d) via %s", self.path, self.width, self.height, fps,
                     self.crf, self._tmp.name)

    # -- properties ------------------------------------------------------------------------------
    @property
    def frames_written(self) -> int:
        """Frames handed to the encoder so far."""
        return self._frames

    @property
    def closed(self) -> bool:
        return self._closed

    # -- writing ---------------------------------------------------------------------------------
    def write(self, frames) -> None:
        """Encode ``frames`` ``[T, H, W, 3]`` uint8 RGB now (numpy or torch)."""
        if self._closed:
            raise ValueError(f"write() on a closed Mp4Writer for {self.path}")
        av = _require_av()
        frames = _as_frames(frames)
        if frames.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]} (W x H), but the writer for "
                             f"{self.path} was opened for {self.width}x{self.height}")
        try:
            for image in frames:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = self._frames
                for packet in self._stream.encode(frame):
                    self._container.mux(packet)
                self._frames += 1
        except BaseException as exc:
            self._discard(exc)
            raise

    def close(self) -> Path:
        """Flush the encoder, finish the file and move it onto ``path``; returns ``path``.
        Closing a writer that wrote no frames removes the temp file and raises ValueError."""
        if self._closed:
            return self.path
        try:
            if self._frames == 0:
                raise ValueError(f"no frames were written; {self.path} was not created")
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        except BaseException as exc:
            self._discard(exc)
            raise
        self._closed = True
        self._atomic.__exit__(None, None, None)  # fsync + os.replace onto path
        logger.info("wrote %s: %d frames at %s fps (%dx%d)", self.path, self._frames, self.fps,
                    self.width, self.height)
        return self.path

    def abort(self) -> None:
        """Stop without producing ``path``: the temp file is removed."""
        if not self._closed:
            self._discard(RuntimeError(f"Mp4Writer for {self.path} aborted"))

    def _discard(self, exc: BaseException) -> None:
        if self._closed:
            return
        self._closed = True
        container = getattr(self, "_container", None)
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away
                logger.debug("closing the discarded container for %s failed", self.path, exc_info=True)
        # atomic_path's failure branch: remove the temp file; it re-raises exc, which we swallow
        # here because the caller re-raises (or, for abort(), nothing went wrong).
        try:
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException as again:  # noqa: BLE001
            if again is not exc:
                raise
        Path(self._tmp).unlink(missing_ok=True)
        logger.debug("discarded the partial video for %s", self.path)

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.close()
        else:
            self._discard(exc)
        return False

    def __del__(self) -> None:  # a writer dropped without close() must not leave its temp file
        try:
            if not self._closed and hasattr(self, "_atomic"):
                self.abort()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def write_png_frames(directory: str | os.PathLike[str], frames, start_index: int = 0,
                     *, pattern: str = "frame_{:06d}.png", atomic: bool = True) -> list[Path]:
    """Write ``frames`` ``[T, H, W, 3]`` uint8 as ``directory/frame_{start_index + t:06d}.png``
    and return their paths. Uses PyAV's PNG encoder, so PIL is not needed. The folder must exist
    (it is not created). ``atomic``: each file through a temp file (fsync, rename); off where the
    whole folder is renamed into place anyway (:class:`PngFolderWriter`), which also saves a scan
    of the folder per file."""
    av = _require_av()
    from memrope.io import atomic_write

    directory = Path(directory)
    _check_output_dir(directory, "PNG frames")
    if isinstance(start_index, bool) or not isinstance(start_index, (int, np.integer)) or start_index < 0:
        raise ValueError(f"start_index must be a non-negative integer, got {start_index!r}")
    frames = _as_frames(frames)
    paths = []
    for offset, image in enumerate(frames):
        codec = av.CodecContext.create("png", "w")
        codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        data = b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])
        path = directory / pattern.format(int(start_index) + offset)
        if atomic:
            atomic_write(path, data)
        else:
            path.write_bytes(data)
        paths.append(path)
    logger.debug("wrote %d PNG frames to %s from index %d", len(paths), directory, start_index)
    return paths


PNG_FRAME = re.compile(r"frame_\d{6}\.png")


def check_png_folder(directory: str | os.PathLike[str]) -> None:
    """Refuse a ``--png-dir`` a run must not replace: a file, or a folder holding anything but an
    earlier run's frames (``frame_NNNNNN.png``). Cheap: call it before anything loads."""
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"--png-dir {directory} is a file; expected a folder for the PNG frames")
    others = sorted(p.name for p in directory.iterdir() if not PNG_FRAME.fullmatch(p.name))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ValueError(f"--png-dir {directory} holds other files ({shown}); the frames replace the folder "
                         "as a whole: pass a new or empty folder, or one holding only an earlier run's frames")


class PngFolderWriter:
    """PNG frames of one run in a folder that is complete or absent; a context manager.

    The frames are written into a hidden sibling of ``directory`` (:func:`memrope.io.partial_path`)
    and renamed onto it when the ``with`` block exits cleanly, replacing an earlier run's frames
    (never other files: :func:`check_png_folder`), so the folder never mixes two runs' frames; any
    failure removes the partial folder and leaves ``directory`` as it was. ``write(frames,
    start_index)`` is :func:`write_png_frames` into the partial folder (file by file, not atomic:
    nothing reads the folder before its rename).
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self._partial: Path | None = None

    def __enter__(self) -> PngFolderWriter:
        from memrope.io import clean_leftovers, partial_path

        check_png_folder(self.directory)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.directory.parent)
        self._partial = partial_path(self.directory)
        self._partial.mkdir()
        return self

    def write(self, frames, start_index: int) -> list[Path]:
        return write_png_frames(self._partial, frames, start_index, atomic=False)

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        from memrope.io import partial_path

        partial, self._partial = self._partial, None
        if exc_type is not None:
            shutil.rmtree(partial, ignore_errors=True)
            return
        old = None
        try:
            if self.directory.exists():
                check_png_folder(self.directory)  # nothing else arrived in it meanwhile
                old = partial_path(self.directory, "old")
                os.replace(self.directory, old)
            os.replace(partial, self.directory)
        except BaseException:
            if old is not None and not self.directory.exists():
                os.replace(old, self.directory)  # the earlier run's frames back where they were
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
