"""What the server's one model worker owns: the block loop over one backend, the text encoder,
and the VAE, loaded once and shared by every session.

Owns: :class:`ServeModel` (the pipeline, the prompt encoder, the VAE and the per-session pieces
made from them: a noise source, a :class:`memrope.pipeline.BlockStream`, a frame decoder),
:func:`load_serve_model` (the same model and backend resolution as ``memrope generate``,
through :mod:`memrope.runtime.load`).

Does not own the block loop (``memrope.pipeline``: sessions run the very ``BlockStream`` that
``memrope generate`` runs), the text model (:class:`memrope.runtime.text.PromptEncoder`) or the
VAE themselves (``memrope.runtime.text``,
``memrope.runtime.vae``), or scheduling (``memrope.runtime.serve.worker``).

Legend: B batch (1 here), L text tokens, D text width, F latent frames per block, C/H/W latent
channels/height/width, T video frames, 3 RGB.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from memrope.backend import VAEBackend
from memrope.config import VAE_SPATIAL_STRIDE
from memrope.pipeline import BlockStream, MemRoPEPipeline
from memrope.runtime.load import LoadRequest, resolve
from memrope.runtime.text import PromptEncoder
from memrope.sampler import StreamingSeededNoise

logger = logging.getLogger(__name__)

FrameDecoder = Callable[[torch.Tensor], np.ndarray]
"""One video's decoder: a block's ``x0 [1, F, C, H, W]`` -> uint8 frames ``[T, 8 H, 8 W, 3]``."""


@dataclass
class ServeModel:
    """The loaded model, shared by every session; only the worker thread runs it.

    pipeline: the block loop over the backend (one per server; one ``BlockStream`` per session).
    text: the prompt encoder.
    vae: the decode as a ``memrope.backend.VAEBackend`` (the Wan VAE module, or the artifact's
      ``vae_decode`` graph with ``--vae-backend onnxruntime|tensorrt``), shared by the sessions'
      ``VAEStream``s (each keeps its own causal feature cache).
    description: what is being served, for ``/healthz`` and the page.
    """

    pipeline: MemRoPEPipeline
    text: PromptEncoder
    vae: VAEBackend
    description: dict

    @property
    def fps(self) -> int:
        from memrope.runtime.t2v import VIDEO_FPS

        return VIDEO_FPS

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(width, height)`` of the video in pixels."""
        run = self.pipeline.run
        return VAE_SPATIAL_STRIDE * run.latent_width, VAE_SPATIAL_STRIDE * run.latent_height

    def open_stream(self, prompt_embeds: torch.Tensor, seed: int) -> BlockStream:
        """A new, unbounded stream (its own cache) on the shared pipeline."""
        p = self.pipeline
        noise = StreamingSeededNoise(seed, p.run.batch_size, p.latent_frame_shape(), p.layout.block_frames, p.dtype)
        return p.stream(prompt_embeds, noise)

    def open_decoder(self) -> FrameDecoder:
        """A new video's frame decoder (call it with each block's ``x0``; ``close()`` it when the
        video ends): the one place the server touches the VAE."""
        return _EngineFrameDecoder(self.vae, self.pipeline.layout.block_frames)

    def warm_up(self, blocks: int = 2) -> float:
        """Run ``blocks`` blocks and their decode once (zero text, seed 0) and free them: kernel
        selection, allocator pools and lazily built state happen before the first client, not
        during its first block. Returns the seconds it took."""
        start = time.perf_counter()
        p = self.pipeline
        stream = self.open_stream(torch.zeros(p.run.batch_size, 1, self.pipeline.backend.model.text_dim), seed=0)
        decode = self.open_decoder()
        try:
            for _ in range(blocks):
                decode(stream.next_block().x0)
        finally:
            stream.close()
            close_decoder(decode)
        return time.perf_counter() - start

    def close(self) -> None:
        self.text.close()
        self.pipeline.backend.close()
        self.vae.close()


class _EngineFrameDecoder:
    """One video's decoder over a shared exported VAE backend: its own ``VAEStream`` (feature
    caches, bound once), which the backend forgets when the video ends."""

    def __init__(self, backend, block_frames: int):
        from memrope.runtime.vae import VAEStream

        self.stream = VAEStream(backend, block_frames, overlap=False, owns_backend=False)
        self.stream.reset()

    def __call__(self, x0: torch.Tensor) -> np.ndarray:
        return self.stream.decode(x0)[0].numpy().copy()  # the stream's host ring is reused next block

    def close(self) -> None:
        self.stream.close()


def close_decoder(decode: FrameDecoder | None) -> None:
    """Release what a frame decoder holds (an engine decoder's bindings); plain decoders hold nothing."""
    close = getattr(decode, "close", None)
    if close is not None:
        close()


def load_serve_model(request: LoadRequest) -> ServeModel:
    """Load what ``memrope serve`` serves through the one loader (:mod:`memrope.runtime.load`),
    as ``memrope generate`` loads it: an ``engine`` artifact on an exported backend, a
    ``checkpoint``, a ``model_dir``, or (no model source at all) the embedded tiny demo model.
    The text encoder and the VAE come from the model folder. Raises ValueError /
    FileNotFoundError before loading the DiT when the request cannot serve."""
    from dataclasses import replace

    if request.checkpoint is None and request.engine is None and request.preset is None and request.model_dir is None:
        request = replace(request, preset="tiny")
    request = replace(request, text=True, decode=True)
    resolved = resolve(request)
    if resolved.model_dir is None:
        raise ValueError("serving encodes prompts and decodes video: pass --model-dir WAN_DIR (the folder with "
                         "the text encoder and the VAE), or no model options for the embedded tiny demo")
    run = resolved.run
    if run.batch_size != 1:
        raise ValueError(f"a session streams one video: the run config's num_samples must be 1, got {run.batch_size}")
    if run.cache.policy == "global":
        raise ValueError("sessions stream without end, so the cache must be a window: the run config's "
                         "local_attn_size must be positive (policy 'global' grows with the video)")
    text = resolved.load_text_encoder()
    vae = None
    try:
        vae = resolved.load_vae_backend()
        backend = resolved.load_backend()
    except BaseException:
        text.close()
        if vae is not None:
            vae.close()
        raise
    pipeline = MemRoPEPipeline(backend, run)
    description = {**resolved.describe(), "backend": backend.name, "dtype": str(backend.dtype).removeprefix("torch."),
                   "cache": pipeline.layout.describe(), "block_frames": pipeline.layout.block_frames}
    return ServeModel(pipeline, text, vae, description)
