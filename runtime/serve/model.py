"""What the server's one model worker owns: the block loop over one backend, the text encoder,
and the VAE, loaded once and shared by every session.

Owns: :class:`ServeModel` (the pipeline, the prompt encoder, the VAE and the per-session pieces
made from them: a noise source, a :class:`memrope.pipeline.BlockStream`, a frame decoder),
:class:`PromptEncoder` (umT5 kept loaded for the server's life, a prompt's token count for
admission checks, an in-memory LRU of encoded prompts) and :func:`load_serve_model` (the same
model and backend resolution as ``memrope generate``, from ``memrope.runtime.cli``).

Does not own the block loop (``memrope.pipeline``: sessions run the very ``BlockStream`` that
``memrope generate`` runs), the text model or the VAE themselves (``memrope.runtime.text``,
``memrope.runtime.vae``), or scheduling (``memrope.runtime.serve.worker``).

Legend: B batch (1 here), L text tokens, D text width, F latent frames per block, C/H/W latent
channels/height/width, T video frames, 3 RGB.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memrope.backend import VAEBackend
from memrope.config import VAE_SPATIAL_STRIDE
from memrope.pipeline import BlockStream, MemRoPEPipeline
from memrope.sampler import StreamingSeededNoise

logger = logging.getLogger(__name__)

FrameDecoder = Callable[[torch.Tensor], np.ndarray]
"""One video's decoder: a block's ``x0 [1, F, C, H, W]`` -> uint8 frames ``[T, 8 H, 8 W, 3]``."""


class PromptEncoder:
    """umT5 prompts -> ``[B, text_len, D]`` embeddings, with the encoder loaded once.

    A server cannot reload a multi-GB encoder on every prompt change (``memrope.runtime.text.encode_cached``
    builds and closes one per miss, which suits the one-shot CLI), so this keeps it open and keeps
    the last ``capacity`` prompts' embeddings in memory. :meth:`count_tokens` runs on a second
    tokenizer instance so request handlers can check lengths while the encoder thread encodes
    (a fast tokenizer is not safe to share across threads while it pads and truncates).
    """

    def __init__(self, encoder, tokenizer, *, text_len: int, batch: int = 1, capacity: int = 64):
        self._encoder = encoder
        self._tokenizer = tokenizer
        self.text_len = text_len
        self.batch = batch
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()  # encode() may be called from more than one thread

    @classmethod
    def from_model_dir(cls, model_dir: Path, *, text_len: int, text_dim: int, batch: int = 1) -> PromptEncoder:
        from memrope.runtime.text import TextEncoder, load_tokenizer

        encoder = TextEncoder.from_model_dir(model_dir, text_len=text_len)
        if encoder.d_model != text_dim:
            raise ValueError(f"the text encoder in {model_dir} gives {encoder.d_model}-wide embeddings; the DiT "
                             f"takes text_dim={text_dim}")
        return cls(encoder, load_tokenizer(model_dir), text_len=text_len, batch=batch)

    def check(self, prompt: str) -> str:
        """The cleaned prompt; TypeError if it is not a string, ValueError if it is empty or longer
        than ``text_len`` tokens."""
        from memrope.runtime.text import prompt_tokens, validate_prompts

        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        cleaned = validate_prompts([prompt])[0]
        tokens = prompt_tokens(self._tokenizer, cleaned)
        if tokens > self.text_len:
            raise ValueError(f"prompt is {tokens} tokens long (end-of-text included); this model takes at most "
                             f"text_len={self.text_len} tokens: shorten it")
        return cleaned

    def encode(self, prompt: str) -> torch.Tensor:
        """``[B, text_len, D]`` float32 embeddings of ``prompt`` (one row per sample)."""
        with self._lock:
            embeds = self._cache.get(prompt)
            if embeds is None:
                embeds = self._encoder.encode([prompt])
                self._cache[prompt] = embeds
                if len(self._cache) > self._capacity:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(prompt)
        return embeds.expand(self.batch, -1, -1)

    def close(self) -> None:
        self._encoder.close()
        self._cache.clear()


@dataclass
class ServeModel:
    """The loaded model, shared by every session; only the worker thread runs it.

    pipeline: the block loop over the backend (one per server; one ``BlockStream`` per session).
    text: the prompt encoder.
    vae: the Wan VAE module (each session's decoder keeps its own causal cache over it), or a
      ``memrope.backend.VAEBackend`` running the artifact's ``vae_decode`` graph
      (``--vae-backend onnxruntime|tensorrt``), shared by the sessions' ``VAEStream``s.
    description: what is being served, for ``/healthz`` and the page.
    """

    pipeline: MemRoPEPipeline
    text: PromptEncoder
    vae: object
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
        if isinstance(self.vae, VAEBackend):
            return _EngineFrameDecoder(self.vae, self.pipeline.layout.block_frames)
        from memrope.runtime.vae import StreamingVAEDecoder

        decoder = StreamingVAEDecoder(self.vae)
        return lambda x0: decoder.decode(x0)[0].numpy()

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
        if isinstance(self.vae, VAEBackend):
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


def load_serve_model(args: argparse.Namespace) -> ServeModel:
    """Load what ``memrope serve`` serves, resolved exactly as ``memrope generate`` resolves it:
    ``--engine ART --backend onnxruntime|tensorrt``, a ``--checkpoint``, a ``--model-dir``, or
    (no model options at all) the embedded tiny demo model. The text encoder and the VAE come
    from the model folder. Raises ValueError / FileNotFoundError before loading the DiT when the
    options cannot serve."""
    from memrope.runtime.cli import (
        _check_dit_checkpoint,
        _device,
        _make_backend,
        _model_dir,
        _resolve_engine,
        _torch_dtype,
        vae_provider,
    )
    from memrope.runtime.vae import load_vae

    if args.checkpoint is None and args.engine is None and args.preset is None and args.model_dir is None:
        args.preset = "tiny"
    device = _device(args.device)
    model_dir = _model_dir(args)
    if model_dir is None:
        raise ValueError("serving encodes prompts and decodes video: pass --model-dir WAN_DIR (the folder with "
                         "the text encoder and the VAE), or no model options for the embedded tiny demo")
    artifact, model_cfg, run = _resolve_engine(args, model_dir, recache=getattr(args, "prompt_recache", "none") != "none")
    if run.batch_size != 1:
        raise ValueError(f"a session streams one video: the run config's num_samples must be 1, got {run.batch_size}")
    if args.backend in ("eager", "compiled"):
        _check_dit_checkpoint(args, model_cfg, run, model_dir)  # before the text encoder and the VAE load
    if run.cache.policy == "global":
        raise ValueError("sessions stream without end, so the cache must be a window: the run config's "
                         "local_attn_size must be positive (policy 'global' grows with the video)")
    text = PromptEncoder.from_model_dir(model_dir, text_len=model_cfg.text_len, text_dim=model_cfg.text_dim)
    vae = None
    try:
        if args.vae_backend == "eager":
            vae = load_vae(model_dir, device=device)
        else:
            from memrope.runtime.vae import make_vae_backend

            vae = make_vae_backend(args.vae_backend, run, artifact=artifact, device=device,
                                   provider=vae_provider(args.ort_provider))
        backend = _make_backend(args, artifact, model_cfg, run, _torch_dtype(args.dtype), device, model_dir,
                                recache=getattr(args, "prompt_recache", "none") != "none", decode=True)
    except BaseException:
        text.close()
        if isinstance(vae, VAEBackend):
            vae.close()
        raise
    pipeline = MemRoPEPipeline(backend, run)
    description = {
        "backend": backend.name, "device": str(backend.device), "dtype": str(backend.dtype).removeprefix("torch."),
        "model_dir": str(model_dir), "dim": model_cfg.dim, "num_layers": model_cfg.num_layers,
        "text_len": model_cfg.text_len, "cache_policy": run.cache.policy, "cache": pipeline.layout.describe(),
        "block_frames": pipeline.layout.block_frames, "vae_backend": args.vae_backend,
    }
    return ServeModel(pipeline, text, vae, description)
