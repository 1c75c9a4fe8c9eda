"""The Python API: open a model once, stream video for prompts, change the prompt mid-stream,
write MP4s.

    import memrope

    pipe = memrope.VideoPipeline.from_pretrained("tiny")
    with pipe.stream("a red ball bouncing on a blue background", seed=0) as video:
        for frames in video:              # uint8 [T, H, W, 3], one block at a time, without end
            ...
            video.set_prompt("a green square moving left on a white background")
    pipe.generate("a red ball bouncing on a blue background", seconds=4, out="ball.mp4")

Owns: :class:`VideoPipeline` (the loaded DiT backend, text encoder and VAE, shared by its
streams), :class:`VideoStream` (one video: its own cache and decoder state) and
:func:`write_video` (a finite run streamed to MP4 / PNG / latents files, temp-then-rename: the
path ``memrope generate`` runs too). Everything loads through :mod:`memrope.runtime.load`.

Legend: B batch (1 for streams), T video frames, H/W pixels, 3 RGB.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memrope.config import VAE_SPATIAL_STRIDE
from memrope.pipeline import BlockStream, MemRoPEPipeline, PromptChange
from memrope.runtime.load import PRESETS, LoadRequest, Resolved, resolve
from memrope.runtime.t2v import VIDEO_FPS, StreamResult, stream_video, video_frames_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    """Where a finite run writes: an MP4 (``video``), a folder of PNG frames (``png_dir``) and
    latents ``[B, F, C, H, W]`` float32 as safetensors (``latents``). Each is written to a temp
    file (or hidden folder) and renamed only when the run succeeded."""

    video: Path | None = None
    png_dir: Path | None = None
    latents: Path | None = None

    def check(self, run=None) -> None:
        """Suffixes and writability now, and free space for ``run``'s length when given: a full
        disk fails before the run, not after it."""
        from memrope.io import check_output_path

        if self.video is not None:
            estimate = None
            if run is not None:
                w, h = VAE_SPATIAL_STRIDE * run.latent_width, VAE_SPATIAL_STRIDE * run.latent_height
                # H.264 at CRF 18: well under 1 byte per pixel; a generous bound still catches a full disk.
                estimate = video_frames_for(run.num_output_frames) * w * h // 4 + 65536
            check_output_path(self.video, "--out", suffixes=(".mp4",), estimate_bytes=estimate)
        if self.latents is not None:
            estimate = None if run is None else (4 * run.batch_size * run.num_output_frames * run.latent_channels
                                                 * run.latent_height * run.latent_width + 4096)
            check_output_path(self.latents, "--latents-out", suffixes=(".safetensors",), estimate_bytes=estimate)
        if self.png_dir is not None:
            from memrope.runtime.video import check_png_folder

            check_output_path(self.png_dir, "--png-dir", directory=True)
            check_png_folder(self.png_dir)


def write_video(pipeline: MemRoPEPipeline, decoder, prompt_embeds: torch.Tensor, noise, outputs: Outputs, *,
                prompt_changes: Sequence[PromptChange] = (), progress: bool = False,
                allow_nonfinite: bool = False) -> StreamResult:
    """Run ``pipeline.run``'s blocks and stream them into ``outputs`` as they finish (the
    decoder, a :class:`memrope.runtime.vae.VAEStream`, turns latents into frames and is closed
    here; ``None`` writes latents only). The pipeline's backend stays open. Every output is a temp file renamed when the run succeeded: a failed
    run leaves nothing. Raises :class:`memrope.errors.NonFiniteError` at the first non-finite
    block unless ``allow_nonfinite`` (then the result lists the bad blocks)."""
    from memrope.io import SafetensorsStreamWriter
    from memrope.runtime.video import Mp4Writer, PngFolderWriter

    run = pipeline.run
    latent_shape = list(pipeline.latent_frame_shape())
    with ExitStack() as stack:
        if decoder is not None:
            stack.enter_context(decoder)
        writer = latents_writer = on_frames = None
        if outputs.latents is not None:
            latents_writer = stack.enter_context(SafetensorsStreamWriter(
                outputs.latents, "latents", [run.batch_size, run.num_output_frames, *latent_shape]))
        if decoder is not None:
            if outputs.png_dir is not None:  # entered first, so renamed last: only once the video is complete
                on_frames = stack.enter_context(PngFolderWriter(outputs.png_dir)).write
            if outputs.video is not None:
                outputs.video.parent.mkdir(parents=True, exist_ok=True)
                width, height = VAE_SPATIAL_STRIDE * run.latent_width, VAE_SPATIAL_STRIDE * run.latent_height
                writer = stack.enter_context(Mp4Writer(outputs.video, fps=VIDEO_FPS, width=width, height=height))
        return stream_video(pipeline, prompt_embeds, noise, run.num_blocks, decoder, writer,
                            latents_writer=latents_writer, progress=progress, on_frames=on_frames,
                            allow_nonfinite=allow_nonfinite, prompt_changes=prompt_changes)


class VideoStream:
    """One video without end: its own cache and decoder state on its pipeline's shared models.
    Iterate it for uint8 frames ``[T, H, W, 3]`` one block at a time (``T`` = 4 x latent frames
    per block; 3 fewer for the first block); :meth:`set_prompt` changes the prompt from the next
    block on. Use it as a context manager (or call :meth:`close`) to free its cache."""

    def __init__(self, owner: VideoPipeline, stream: BlockStream):
        from memrope.runtime.vae import VAEStream

        self._owner = owner
        self._stream = stream
        try:
            self._decoder = VAEStream(owner.vae, owner.pipeline.layout.block_frames, owns_backend=False)
        except BaseException:
            stream.close()
            raise
        self._decoder.reset()
        self.blocks = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        self._owner._check_open()
        block = self._stream.next_block()
        frames = self._decoder.decode(block.x0)[0].numpy().copy()  # the decoder's host ring is reused
        block.check_finite()  # the frames are on the host: reading the flag costs no extra sync
        self.blocks += 1
        return frames

    def set_prompt(self, prompt: str, *, recache: str = "none", memory: str = "keep",
                   transition_blocks: int = 0) -> None:
        """From the next block on, follow ``prompt``. ``recache`` (``none``, ``recent``, ``all``)
        re-encodes the window under the new prompt (LongLive's re-cache), ``memory`` keeps or
        resets the EMA memory, ``transition_blocks`` blends the two prompts over that many blocks
        (see :meth:`memrope.pipeline.BlockStream.set_prompt`)."""
        self._stream.set_prompt(self._owner.encode(prompt), recache=recache, memory=memory,
                                transition_blocks=transition_blocks)

    def close(self) -> None:
        self._stream.close()
        self._decoder.close()

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VideoPipeline:
    """A loaded MemRoPE text-to-video model: the DiT on its backend, the text encoder and the
    VAE, loaded once and shared by every :meth:`stream` and :meth:`generate` call.

    Open one with :meth:`from_pretrained`; free it with :meth:`close` (or ``with``).
    """

    def __init__(self, resolved: Resolved, backend, text_encoder, vae):
        if resolved.run.cache.policy == "global":
            raise ValueError("a VideoPipeline streams without end, so its cache must be a window: the run config's "
                             "local_attn_size must be positive (policy 'global' grows with the video)")
        self.resolved = resolved
        self.pipeline = MemRoPEPipeline(backend, resolved.run)
        self.text_encoder = text_encoder
        self.vae = vae
        self._closed = False

    @classmethod
    def from_pretrained(cls, source: str | Path, *, backend: str | None = None, vae_backend: str = "eager",
                        device: str = "cpu", dtype: str = "float32", config: str | Path | None = None,
                        height: int | None = None, width: int | None = None, **options) -> VideoPipeline:
        """Load a model.

        Args:
            source: a preset name (``"tiny"``: the embedded demo model; ``"mid"``, ``"wan-1.3b"``:
                random weights), a Wan2.1 folder (its ``config.json``, DiT weights, text encoder
                and VAE), an artifact directory from ``memrope export`` (run on ``onnxruntime`` or
                ``tensorrt``; pass ``model_dir=`` for its text encoder and VAE), or a DiT
                checkpoint file (``.pt``/``.safetensors``; pass ``model_config=`` and
                ``model_dir=``).
            backend: ``eager``, ``compiled``, ``onnxruntime`` or ``tensorrt`` (default: ``onnxruntime``
                for an artifact, else ``eager``).
            vae_backend: what decodes frames: ``eager`` or the artifact's graph.
            device, dtype: ``cpu``/``cuda[:N]``; ``float32``/``bfloat16``/``float16``.
            config: the authors' run YAML (cache policy, sampler, seed). height, width: pixels.
            options: any other :class:`memrope.runtime.load.LoadRequest` field (``lora``,
                ``model_dir``, ``model_config``, ``recache=True`` to allow re-caching prompt
                changes on an exported backend, ...).

        Raises ``ValueError``/``FileNotFoundError`` naming what is wrong, before weights load.
        """
        fields = dict(options)
        path = Path(source)
        if isinstance(source, str) and source in PRESETS:
            fields["preset"] = source
        elif (path / "contract.json").is_file():
            fields["engine"] = path
            backend = backend or "onnxruntime"
        elif path.is_dir():
            fields.setdefault("model_dir", path)
        elif path.is_file():
            fields["checkpoint"] = path
        else:
            raise FileNotFoundError(f"{source}: not a preset ({', '.join(PRESETS)}), a model folder, an "
                                    "artifact directory or a checkpoint file")
        request = LoadRequest(backend=backend or "eager", vae_backend=vae_backend, device=device, dtype=dtype,
                              config=config, height=height, width=width, text=True, decode=True, **fields)
        resolved = resolve(request)
        with ExitStack() as loaded:  # a part that fails to load frees those loaded before it
            text = loaded.enter_context(closing(resolved.load_text_encoder()))
            vae = loaded.enter_context(closing(resolved.load_vae_backend()))
            dit = loaded.enter_context(closing(resolved.load_backend()))
            pipe = cls(resolved, dit, text, vae)
            loaded.pop_all()
        return pipe

    @property
    def run(self):
        """The run config (resolution, cache policy, sampler, seed)."""
        return self.pipeline.run

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(width, height)`` of the video in pixels."""
        return VAE_SPATIAL_STRIDE * self.run.latent_width, VAE_SPATIAL_STRIDE * self.run.latent_height

    def encode(self, prompt: str) -> torch.Tensor:
        """``[B, text_len, text_dim]`` embeddings of ``prompt`` (kept in an in-memory cache)."""
        self._check_open()
        return self.text_encoder.encode(self.text_encoder.check(prompt, truncate=True))

    def stream(self, prompt: str, *, seed: int | None = None) -> VideoStream:
        """A video without end for ``prompt`` (see :class:`VideoStream`)."""
        from memrope.sampler import StreamingSeededNoise

        self._check_open()
        p = self.pipeline
        noise = StreamingSeededNoise(self.run.seed if seed is None else seed, p.run.batch_size,
                                     p.latent_frame_shape(), p.layout.block_frames, p.dtype)
        return VideoStream(self, p.stream(self.encode(prompt), noise))

    def generate(self, prompt: str, *, seconds: float | None = None, num_frames: int | None = None,
                 out: str | Path | None = None, png_dir: str | Path | None = None,
                 latents_out: str | Path | None = None, seed: int | None = None,
                 progress: bool = False) -> StreamResult:
        """A video of ``seconds`` (or ``num_frames`` latent frames; default the run's length) for
        ``prompt``, streamed to ``out`` (MP4), ``png_dir`` and ``latents_out`` as it is made.
        Returns the frame counts and timing. Raises :class:`memrope.errors.NonFiniteError` on a
        non-finite block (nothing is written then)."""
        from dataclasses import replace

        from memrope.runtime.t2v import latent_frames_for
        from memrope.runtime.vae import VAEStream, overlap_by_default

        self._check_open()
        if seconds is not None and num_frames is not None:
            raise ValueError("pass either seconds or num_frames, not both")
        run = self.run
        if seconds is not None:
            num_frames = latent_frames_for(seconds, run.cache.block_frames)
        if num_frames is not None:
            run = run.with_frames(num_frames)
        if seed is not None:
            run = replace(run, seed=seed)
        if self.resolved.artifact is not None:
            run = self.resolved.artifact.check_run(run)
        outputs = Outputs(*(None if p is None else Path(p) for p in (out, png_dir, latents_out)))
        outputs.check(run)
        if outputs == Outputs():
            raise ValueError("nothing to write: pass out=, png_dir= or latents_out=")
        pipeline = MemRoPEPipeline(self.pipeline.backend, run)
        # The seed through the authors' draw order, as `memrope generate` draws it.
        noise = self.resolved.noise("reference", pipeline.dtype, pipeline.device, run=run)
        decoder = None
        if outputs.video is not None or outputs.png_dir is not None:
            r = self.resolved.request
            decoder = VAEStream(self.vae, run.cache.block_frames, owns_backend=False,
                                overlap=overlap_by_default(self.resolved.device, r.backend, r.vae_backend))
        return write_video(pipeline, decoder, self.encode(prompt), noise, outputs, progress=progress)

    def close(self) -> None:
        """Free the models (idempotent); every part is closed even if one fails to."""
        if self._closed:
            return
        self._closed = True
        with ExitStack() as parts:
            for part in (self.pipeline.backend, self.vae, self.text_encoder):
                parts.callback(part.close)

    def __enter__(self) -> VideoPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this VideoPipeline is closed")


def export_model(request: LoadRequest, out: str | Path, *, batch: int = 1, validate: bool = True,
                 force: bool = False, quantize: str | None = None,
                 calibration_prompts: str | Path | list[str] | None = None, calibration_blocks: int | None = None,
                 calibration_dtype: str | None = None):
    """``memrope export``: the DiT of ``request`` (its ``height``/``width`` are required) as an
    ONNX artifact in ``out`` (step, text and recache graphs; the model folder's VAE as
    ``vae_decode`` when ``request.decode``), audited against TensorRT's parser and, in fp32,
    validated against eager. Bad sizes and checkpoints fail before any weight loads. Returns
    :class:`memrope.export.onnx_export.ExportResult`.

    ``quantize``: a mode of :data:`memrope.export.quantize.MODES`. Modes that quantize activations
    (fp8, int8) are calibrated on ``calibration_prompts`` (a list, or a file of one prompt per line;
    default :func:`memrope.runtime.prompts.calibration_prompts`) encoded by the model folder's text
    encoder, each driven through ``calibration_blocks`` blocks (default: until the first eviction,
    plus 2), computing in ``calibration_dtype`` (``"float32"``, the default when None, or ``"model"``
    for the export's own dtype; see :class:`memrope.export.quantize.Calibration`); weight-only
    modes read the weights alone, and a warning names the calibration options given to one."""
    from memrope.artifact import specialise_run
    from memrope.export.onnx_export import check_export_target, export_artifact
    from memrope.io import check_output_path

    out = Path(out)
    check_export_target(out, force)
    check_output_path(out, "--out", directory=True)
    if request.model_dir is not None and not request.model_dir.is_dir():
        raise ValueError(f"--model-dir must be a Wan2.1 model folder, got {request.model_dir}")
    if request.height is None:
        raise ValueError("export needs --height and --width (pixels, multiples of 16)")
    prompts, activations = None, False
    if quantize is not None:
        from memrope.export.quantize import check_mode, modelopt_version
        from memrope.runtime.prompts import read_calibration_prompts

        activations = not check_mode(quantize).weight_only
        modelopt_version()
        if calibration_blocks is not None and calibration_blocks < 1:
            raise ValueError(f"--calibration-blocks must be at least 1, got {calibration_blocks}")
        if calibration_dtype not in (None, "float32", "model"):
            raise ValueError(f"--calibration-dtype must be float32 or model, got {calibration_dtype!r}")
        prompts = read_calibration_prompts(calibration_prompts)
    resolved = resolve(request)
    run = specialise_run(resolved.run, resolved.model, request.height, request.width, batch)
    calibration = None
    if quantize is not None and not activations:
        given = [flag for flag, value in (("--calibration-prompts", prompts), ("--calibration-blocks", calibration_blocks),
                                          ("--calibration-dtype", calibration_dtype)) if value]
        if given:
            logger.warning("--quantize %s is weight-only: ModelOpt reads the weights' ranges, so %s %s not used",
                           quantize, " and ".join(given), "is" if len(given) == 1 else "are")
    if activations:  # weight-only modes read the weights' ranges: no prompts, no text encoder
        from memrope.cache import CacheLayout
        from memrope.export.quantize import Calibration
        from memrope.runtime.prompts import calibration_prompts as default_prompts

        if resolved.model_dir is None:
            raise ValueError(f"--quantize {quantize} calibrates activations on encoded prompts, so it needs a text "
                             "encoder: pass --model-dir WAN_DIR (int8-wo and int4-wo need none)")
        demo = request.preset == "tiny" and request.checkpoint is None and request.model_dir is None
        prompts = prompts or default_prompts(demo=demo)
        layout = CacheLayout.for_run(resolved.model, run)
        blocks = calibration_blocks or layout.cache_frames // layout.block_frames + 2
        calibration = Calibration(prompts, resolved.encode_prompts(prompts, flag="--calibration-prompts"), blocks,
                                  seed=run.seed, dtype=None if calibration_dtype == "model" else torch.float32)
    vae = None
    if resolved.model_dir is not None and request.decode:
        from memrope.runtime.vae import streaming_decoder_module

        vae = streaming_decoder_module(resolved.model_dir, dtype=resolved.dtype)
    dit = resolved.load_dit()
    return export_artifact(dit, run, out, height=request.height, width=request.width, batch=batch,
                           validate=validate, force=force, vae=vae, quantize=quantize, calibration=calibration)

