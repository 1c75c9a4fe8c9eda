"""Wan2.1 VAE decode, streamed: latents in, uint8 video frames out, one block at a time.

Owns: the engine's frame path (:class:`VAEStream`: a ``memrope.backend.VAEBackend`` (eager,
ONNX Runtime, TensorRT; :func:`make_vae_backend`) driven block by block with fixed buffers, the
feature cache ping-ponged between two buffer sets, frames leaving the device once per block, and
optionally decoding in a worker so block b decodes while the DiT computes block b+1), the
diffusers reference decoder below it, the latent de-normalisation (spec section 5.1), the
streaming decoder that keeps the Wan
VAE's causal feature cache alive across calls (so a video of any length decodes as one continuous
causal pass, with no seams and no lost frames at chunk boundaries, unlike the reference's
120-latent re-chunking), the float -> uint8 conversion, loading the VAE from a model folder in the
Diffusers layout (``vae/``) or Wan's original layout (``Wan2.1_VAE.pth``) including the key mapping
between the two, and a builder for tiny random VAEs used by tests and the demo.

Does not own the VAE architecture (diffusers' ``AutoencoderKLWan``), the DiT, or the video container
(``memrope.runtime.video``).

Diffusers internals relied on (checked against diffusers 0.42): ``AutoencoderKLWan.post_quant_conv``
and ``.decoder``; ``WanDecoder3d.forward(x, feat_cache, feat_idx, first_chunk)`` decoding one latent
frame per call with a list ``feat_cache`` of one slot per ``WanCausalConv3d`` in the decoder (the 3D
upsamplers mark theirs ``"Rep"`` on the first frame; 1x1x1 shortcut convs get a slot they never
use); ``unpatchify`` for configs with a ``patch_size``. That is ``AutoencoderKLWan._decode`` without
its ``clear_cache()`` calls. The cache list is ours, not the model's ``_feat_map``, so the stock
``vae.decode`` can run on the same model without disturbing a stream.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from memrope.contract import feat_cache, present_feat_cache
from memrope.vae import WanStreamingDecoder, padding_frames

logger = logging.getLogger(__name__)

WAN_VAE_FILE = "Wan2.1_VAE.pth"
DIFFUSERS_VAE_DIR = "vae"
DIFFUSERS_VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")

# Wan2.1's VAE (spec section 5.1); Wan's original names where they differ from diffusers'.
WAN21_VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                        temperal_downsample=[False, True, True])
WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
_VAE_CONFIG_KEYS = {"base_dim", "dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
                    "dropout", "latents_mean", "latents_std"}


def _autoencoder_cls():
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as exc:  # pragma: no cover - diffusers is a hard requirement of decoding
        raise ImportError(f"decoding video needs diffusers >= 0.33 with AutoencoderKLWan ({exc}); "
                          "pip install diffusers") from None
    return AutoencoderKLWan


# ------------------------------------------------------------------------------------------------
# Latents -> pixels
# ------------------------------------------------------------------------------------------------

def _check_latents(vae, latents: torch.Tensor) -> None:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor [B, F, C, H, W], got {type(latents).__name__}")
    z_dim = vae.config.z_dim
    if latents.ndim != 5 or latents.shape[2] != z_dim or min(latents.shape) == 0:
        raise ValueError(f"latents have shape {list(latents.shape)}, expected [B, F >= 1, {z_dim}, H, W] "
                         "(the engine's frame-major layout)")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be floating point, got {latents.dtype}")


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """``[B, F, C, H, W]`` normalised latents (as the DiT produces them) -> ``[B, C, F, H, W]``
    VAE latents in the VAE's dtype and device: ``z / (1 / std) + mean`` per channel, computed in the
    VAE's dtype as the reference does (it divides by the reciprocal rather than multiplying)."""
    _check_latents(vae, latents)
    param = next(vae.parameters())
    dtype, device = param.dtype, param.device
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).to(device=device, dtype=dtype)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).to(device=device, dtype=dtype)
    if mean.numel() != c or std.numel() != c:
        raise ValueError(f"VAE config has {mean.numel()} latents_mean and {std.numel()} latents_std values, "
                         f"expected z_dim = {c} of each")
    z = latents.to(device=device, dtype=dtype).permute(0, 2, 1, 3, 4)
    return z / (1.0 / std).view(1, c, 1, 1, 1) + mean.view(1, c, 1, 1, 1)


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """Decoder output ``[B, 3, T, H, W]`` in [-1, 1] -> ``[B, T, H, W, 3]`` uint8 on the CPU.

    ``clamp(-1, 1)``, then ``(x * 0.5 + 0.5).clamp(0, 1)`` (spec 5.1), then ``* 255`` truncated to
    uint8 the way the reference's ``torchvision.io.write_video`` casts it. Done in float32.
    """
    x = video.float().clamp(-1.0, 1.0)
    x = (x * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0
    return x.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous().cpu()


@torch.no_grad()
def decode_all(vae, latents: torch.Tensor) -> torch.Tensor:
    """One-shot reference decode with the stock ``vae.decode`` (it clears its cache before and
    after): ``[B, F, C, H, W]`` normalised latents -> ``[B, 1 + 4 (F - 1), 8 H, 8 W, 3]`` uint8.
    Holds the whole video in memory; meant for tests and short clips. (If the model has diffusers'
    spatial tiling enabled, ``vae.decode`` tiles; the streaming decoder never does.)"""
    z = denormalize_latents(vae, latents)
    return to_uint8_frames(vae.decode(z).sample)


class StreamingVAEDecoder:
    """Causal, streaming Wan VAE decode with a feature cache that lives across calls.

    ``decode(latents [B, F, C, H, W])`` returns uint8 frames ``[B, T, 8 H, 8 W, 3]`` with
    ``T = 1 + 4 (F - 1)`` on the first call after :meth:`reset` and ``T = 4 F`` afterwards, so the
    concatenation of all calls equals the one-shot decode of the concatenated latents (no seams,
    no dropped frames). Memory is constant in the video length: the cache holds the last two time
    steps of each causal conv's input. Batch size and latent size must not change until
    :meth:`reset`. The model is put in eval mode without gradients; compute runs in its dtype and
    on its device (diffusers upsamples in float32 internally).
    """

    def __init__(self, vae) -> None:
        cls = _autoencoder_cls()
        if not isinstance(vae, cls):
            raise TypeError(f"StreamingVAEDecoder wraps a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        self.vae = vae.eval().requires_grad_(False)
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self._num_slots = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self._takes_first_chunk = "first_chunk" in inspect.signature(vae.decoder.forward).parameters
        self.reset()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> StreamingVAEDecoder:
        """Load the VAE from a Wan2.1 model folder; see :func:`load_vae`."""
        return cls(load_vae(model_dir, device=device, dtype=dtype))

    # -- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the causal cache: the next :meth:`decode` starts a new video."""
        self._cache: list = [None] * self._num_slots
        self._latents_seen = 0
        self._stream_shape: tuple[int, int, int] | None = None

    @property
    def latent_frames_decoded(self) -> int:
        """Latent frames decoded since the last :meth:`reset`."""
        return self._latents_seen

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # -- decode ----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, F, C, H, W]`` normalised latents -> ``[B, T, 8 H, 8 W, 3]`` uint8 CPU frames,
        continuing the video decoded since the last :meth:`reset`."""
        return to_uint8_frames(self.decode_pixels(latents))

    @torch.no_grad()
    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """As :meth:`decode`, but the decoder's float output ``[B, 3, T, 8 H, 8 W]`` clamped to
        [-1, 1], on the VAE's device (what the exported graph's ``pixels`` is compared with)."""
        _check_latents(self.vae, latents)
        b, _, _, h, w = latents.shape
        if self._stream_shape is None:
            self._stream_shape = (b, h, w)
        elif self._stream_shape != (b, h, w):
            sb, sh, sw = self._stream_shape
            raise ValueError(f"latents have batch {b} and latent size {h}x{w}, but this stream started with "
                             f"batch {sb} and {sh}x{sw}; call reset() before decoding a different video")
        z = denormalize_latents(self.vae, latents)
        x = self.vae.post_quant_conv(z)  # 1x1x1 causal conv: no time context, no cache
        patch_size = self.vae.config.patch_size
        out = []
        for i in range(x.shape[2]):
            feat_idx = [0]
            kwargs = {"first_chunk": self._latents_seen == 0} if self._takes_first_chunk else {}
            frame = self.vae.decoder(x[:, :, i:i + 1], feat_cache=self._cache, feat_idx=feat_idx, **kwargs)
            if patch_size is not None:
                from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                frame = unpatchify(frame, patch_size=patch_size)
            out.append(frame.clamp(-1.0, 1.0))
            self._latents_seen += 1
        return torch.cat(out, dim=2)


# ------------------------------------------------------------------------------------------------
# The engine's frame path: a VAE backend driven block by block with fixed buffers
# ------------------------------------------------------------------------------------------------

VAE_BACKENDS = ("eager", "onnxruntime", "tensorrt")


def streaming_decoder_module(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32):
    """The exportable decoder (``memrope.vae.WanStreamingDecoder``) with the weights of the VAE
    in ``model_dir`` (either layout, see :func:`load_vae`), on ``device`` in ``dtype``."""
    vae = load_vae(model_dir, device="cpu", dtype=torch.float32)
    module = WanStreamingDecoder.from_diffusers(vae)
    del vae
    return module.to(device=device, dtype=dtype).eval()


def overlap_by_default(device: torch.device, dit_backend: str, vae_backend: str) -> bool:
    """Whether the decode of block b overlaps the DiT of block b+1 unless the user says otherwise.

    On a GPU, yes: the decode runs on its own CUDA stream. On a CPU only when both stages are
    ONNX Runtime sessions, which then run without spinning threads: measured on 2 cores, the
    overlapped block is 0.90x the serial one at the mid preset and within 1.1x of max(DiT, VAE)
    (docs/frame_path_schedule_cpu.md). Two PyTorch thread pools on the same cores are not
    measured to gain, so eager/compiled stages on a CPU decode serially.
    """
    return device.type == "cuda" or (dit_backend == "onnxruntime" and vae_backend == "onnxruntime")


def make_vae_backend(kind: str, run, *, artifact=None, model_dir: str | os.PathLike[str] | None = None,
                     device: str | torch.device = "cpu", provider: str = "auto", threads: int | None = None):
    """A ``memrope.backend.VAEBackend`` by name: ``eager`` (the decoder module from ``model_dir``,
    float32 on ``device``), ``onnxruntime`` or ``tensorrt`` (the artifact's ``vae_decode`` graph)."""
    if kind not in VAE_BACKENDS:
        raise ValueError(f"--vae-backend must be one of {', '.join(VAE_BACKENDS)}, got {kind!r}")
    if kind == "eager":
        if model_dir is None:
            raise ValueError("--vae-backend eager needs the VAE weights: pass --model-dir WAN_DIR")
        from memrope.engine.vae_eager_backend import EagerVAEBackend

        return EagerVAEBackend(streaming_decoder_module(model_dir, device=device), run)
    if artifact is None:
        raise ValueError(f"--vae-backend {kind} needs --engine DIR (an artifact exported with a VAE)")
    if kind == "onnxruntime":
        from memrope.engine.vae_onnxruntime_backend import OnnxRuntimeVAEBackend

        return OnnxRuntimeVAEBackend(artifact, provider=provider, threads=threads)
    from memrope.engine.vae_tensorrt_backend import TensorRTVAEBackend

    return TensorRTVAEBackend(artifact)


@dataclass
class DecodeTicket:
    """A block handed to :meth:`VAEStream.submit`; :meth:`VAEStream.collect` turns it into frames."""

    slot: int
    starts_video: bool
    skip_frames: int
    sink: Callable[[torch.Tensor], None] | None = None
    future: Future | None = None
    decode_ms: float = float("nan")   # wall time of the block's decode steps (set when done)


class VAEStream:
    """Decodes a video block by block through a ``VAEBackend``, with buffers allocated once.

    The buffers: one latent-step input and first-frame flag, the feature cache twice (A and B:
    a step reads one and writes the other, the next step the other way round, so no cache is
    copied and each (feeds, outputs) pair is bound once), the step's frame outputs, a 2-slot ring
    of each block's latents (so the DiT may overwrite its own x0 while the block decodes) and a
    2-slot ring of host frames (pinned on CUDA). A block's frames leave the device once, as one
    copy, after its last step.

    ``submit(x0, sink)`` copies the block's latents into the ring and starts decoding it: in a
    worker thread when ``overlap`` (on CUDA the worker enqueues on its own stream, after an event
    recorded on the caller's stream), else right away. As soon as the block is decoded, ``sink``
    gets its uint8 frames ``[B, T, H, W, 3]`` on the CPU (``T = 4 F``, or ``4 F - 3`` for the
    video's first block; valid during the call), in the worker, so frames reach a writer without
    waiting for the caller's next block. ``flush()`` waits for every submitted block and raises a
    worker's error. ``collect(ticket)`` waits for one block and returns its frames (valid until
    the next ``submit``); ``decode(x0) = collect(submit(x0))``. ``decode_ms`` lists each block's
    decode wall time.

    Args:
        backend: the ``VAEBackend`` (owned: closed with the stream).
        block_latent_frames: latent frames per submitted block (the DiT's block size).
        overlap: decode in a worker thread, so the caller can compute the next block meanwhile.
        owns_backend: close the backend with the stream (default). False for a backend shared by
            several streams (a server's sessions): closing the stream then only makes the backend
            forget this stream's bindings.
    """

    def __init__(self, backend, block_latent_frames: int, *, overlap: bool = False, owns_backend: bool = True):
        contract = backend.contract
        latents_spec = contract.input("latents")
        self.step_latent_frames = latents_spec.shape[1]
        if block_latent_frames % self.step_latent_frames:
            raise ValueError(f"blocks of {block_latent_frames} latent frames cannot be decoded in steps of "
                             f"{self.step_latent_frames}")
        self.backend = backend
        self.owns_backend = owns_backend
        self.block_latent_frames = block_latent_frames
        self.overlap = overlap
        self.device = device = backend.device
        self._padding = padding_frames(backend.config)
        b, t, c, h, w = latents_spec.shape
        frames_spec = contract.output("frames")
        self.step_frames = frames_spec.shape[1]
        steps = block_latent_frames // t
        self._latents = latents_spec.zeros(device)
        self._first = contract.input("first_frame").zeros(device)
        self._frames = frames_spec.zeros(device)
        self._pixels = contract.output("pixels").zeros(device)
        specs = contract.inputs[2:]
        caches = [[spec.zeros(device) for spec in specs] for _ in range(2)]
        self._pairs = []
        for src, dst in ((0, 1), (1, 0)):
            feeds = {"latents": self._latents, "first_frame": self._first}
            feeds.update({feat_cache(i): caches[src][i] for i in range(len(specs))})
            outputs = {"frames": self._frames, "pixels": self._pixels}
            outputs.update({present_feat_cache(i): caches[dst][i] for i in range(len(specs))})
            self._pairs.append((feeds, outputs))
        self._x0 = [torch.zeros(b, block_latent_frames, c, h, w, dtype=latents_spec.torch_dtype, device=device)
                    for _ in range(2)]
        block_shape = (b, steps * self.step_frames, *frames_spec.shape[2:])
        cuda = device.type == "cuda"
        self._host = [torch.zeros(block_shape, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self._device_block = torch.zeros(block_shape, dtype=torch.uint8, device=device) if cuda else None
        self._stream = torch.cuda.Stream(device) if cuda and overlap else None
        self._ready = [torch.cuda.Event() for _ in range(2)] if cuda else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae") if overlap else None
        self._slot_tickets: list[DecodeTicket | None] = [None, None]
        self._next_slot = 0
        self._parity = 0
        self._latents_seen = 0
        self.cache_bytes = sum(spec.nbytes for spec in specs)
        self.decode_ms: list[float] = []

    def __enter__(self) -> VAEStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def latent_frames_decoded(self) -> int:
        return self._latents_seen

    def reset(self) -> None:
        """Start a new video: the next step has ``first_frame`` set (the caches are then ignored)."""
        self.flush()
        self._latents_seen = 0

    def flush(self) -> None:
        """Wait for every submitted block (and its sink); re-raise a worker's error."""
        for ticket in self._slot_tickets:
            if ticket is not None and ticket.future is not None:
                ticket.future.result()

    def submit(self, x0: torch.Tensor, sink: Callable[[torch.Tensor], None] | None = None) -> DecodeTicket:
        """Start decoding one block ``x0 [B, F, C, h, w]`` (the DiT's output, any device/dtype)."""
        ring = self._x0[0]
        if tuple(x0.shape) != tuple(ring.shape):
            raise ValueError(f"latents have shape {list(x0.shape)}; this stream decodes blocks of "
                             f"{list(ring.shape)} ([B, F, C, h, w])")
        slot = self._next_slot
        self._next_slot ^= 1
        previous = self._slot_tickets[slot]
        if previous is not None and previous.future is not None:
            previous.future.result()  # the slot's last block is decoded before its latents are replaced
        self._x0[slot].copy_(x0)
        if self._ready is not None:
            self._ready[slot].record()
        starts = self._latents_seen == 0
        ticket = DecodeTicket(slot, starts, self._padding if starts else 0, sink)
        self._latents_seen += self.block_latent_frames
        self._slot_tickets[slot] = ticket
        if self._executor is None:
            self._decode_block(ticket)
        else:
            ticket.future = self._executor.submit(self._decode_block, ticket)
        return ticket

    def collect(self, ticket: DecodeTicket) -> torch.Tensor:
        """The block's uint8 frames ``[B, T, H, W, 3]`` on the CPU (a view, valid until the next submit)."""
        if ticket.future is not None:
            ticket.future.result()
        return self._host[ticket.slot][:, ticket.skip_frames:]

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.collect(self.submit(x0))

    @torch.no_grad()
    def _decode_block(self, ticket: DecodeTicket) -> None:
        start = time.perf_counter()
        stream = self._stream
        if stream is not None:
            with torch.cuda.stream(stream):
                stream.wait_event(self._ready[ticket.slot])
                self._steps(ticket)
            stream.synchronize()
        else:
            self._steps(ticket)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        ticket.decode_ms = (time.perf_counter() - start) * 1e3
        self.decode_ms.append(ticket.decode_ms)
        if ticket.sink is not None:
            ticket.sink(self._host[ticket.slot][:, ticket.skip_frames:])

    def _steps(self, ticket: DecodeTicket) -> None:
        x0 = self._x0[ticket.slot]
        t, n = self.step_latent_frames, self.step_frames
        target = self._device_block if self._device_block is not None else self._host[ticket.slot]
        for k in range(self.block_latent_frames // t):
            self._latents.copy_(x0[:, k * t:(k + 1) * t])
            self._first.fill_(ticket.starts_video and k == 0)
            feeds, outputs = self._pairs[self._parity]
            self.backend.run(feeds, outputs)
            self._parity ^= 1
            target[:, k * n:(k + 1) * n].copy_(self._frames)
        if self._device_block is not None:
            self._host[ticket.slot].copy_(self._device_block, non_blocking=True)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self.owns_backend:
                self.backend.close()
            else:
                for feeds, outputs in self._pairs:
                    self.backend.forget(feeds, outputs)


# ------------------------------------------------------------------------------------------------
# Wan original <-> diffusers key names
# ------------------------------------------------------------------------------------------------
# Wan's ResidualBlock keeps its layers in one nn.Sequential ``residual`` (norm, SiLU, conv, norm,
# SiLU, dropout, conv) and a ``shortcut``; diffusers names them. Attention and Resample leaves
# (``norm.gamma``, ``to_qkv.*``, ``proj.*``, ``resample.1.*``, ``time_conv.*``) are the same.
_RESNET_LEAVES = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight",
                  "conv1.bias": "residual.2.bias", "norm2.gamma": "residual.3.gamma",
                  "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
                  "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
_RESNET_LEAVES_INV = {v: k for k, v in _RESNET_LEAVES.items()}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_TOP_INV = {v: k for k, v in _TOP.items()}
_MID = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}
_MID_INV = {v: k for k, v in _MID.items()}


def _leaf_to_wan(leaf: str) -> str:
    return _RESNET_LEAVES.get(leaf, leaf)


def _leaf_to_diffusers(leaf: str) -> str:
    if leaf.startswith(("residual.", "shortcut.")):
        return _RESNET_LEAVES_INV.get(leaf, "")  # "" -> unknown
    return leaf


def diffusers_to_wan_key(key: str, num_res_blocks: int, num_levels: int) -> str:
    """Diffusers ``AutoencoderKLWan`` parameter name -> Wan's original ``WanVAE_`` name.

    ``num_res_blocks`` and ``num_levels`` (``len(dim_mult)``) fix where the decoder's flat
    ``upsamples`` sequence puts each up block's ``num_res_blocks + 1`` resnets and its upsampler
    (every level but the last has one). Raises ValueError for a name it does not know.
    """
    top, _, rest = key.partition(".")
    if top in _TOP:
        return f"{_TOP[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        raise ValueError(f"unknown AutoencoderKLWan parameter {key!r}")
    part, _, rest = rest.partition(".")
    if part == "conv_in":
        return f"{top}.conv1.{rest}"
    if part == "norm_out":
        return f"{top}.head.0.{rest}"
    if part == "conv_out":
        return f"{top}.head.2.{rest}"
    if part == "mid_block":
        m = re.fullmatch(r"(resnets\.\d+|attentions\.\d+)\.(.+)", rest)
        if m and m.group(1) in _MID:
            return f"{top}.middle.{_MID[m.group(1)]}.{_leaf_to_wan(m.group(2))}"
    elif part == "down_blocks" and top == "encoder":
        m = re.fullmatch(r"(\d+)\.(.+)", rest)
        if m:
            return f"encoder.downsamples.{m.group(1)}.{_leaf_to_wan(m.group(2))}"
    elif part == "up_blocks" and top == "decoder":
        per_level = num_res_blocks + 2  # resnets + upsampler
        m = re.fullmatch(r"(\d+)\.resnets\.(\d+)\.(.+)", rest)
        if m and int(m.group(2)) <= num_res_blocks and int(m.group(1)) < num_levels:
            return f"decoder.upsamples.{int(m.group(1)) * per_level + int(m.group(2))}.{_leaf_to_wan(m.group(3))}"
        m = re.fullmatch(r"(\d+)\.upsamplers\.0\.(.+)", rest)
        if m and int(m.group(1)) < num_levels - 1:
            return f"decoder.upsamples.{int(m.group(1)) * per_level + num_res_blocks + 1}.{m.group(2)}"
    raise ValueError(f"unknown AutoencoderKLWan parameter {key!r}")


def wan_to_diffusers_key(key: str, num_res_blocks: int, num_levels: int) -> str | None:
    """Wan's original ``WanVAE_`` parameter name -> diffusers ``AutoencoderKLWan`` name, or None
    for a name that is not part of a Wan2.1 VAE with these sizes."""
    top, _, rest = key.partition(".")
    if top in _TOP_INV and rest in ("weight", "bias"):
        return f"{_TOP_INV[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        return None
    part, _, rest = rest.partition(".")
    if part == "conv1" and rest in ("weight", "bias"):
        return f"{top}.conv_in.{rest}"
    if part == "head":
        if rest == "0.gamma":
            return f"{top}.norm_out.gamma"
        if rest in ("2.weight", "2.bias"):
            return f"{top}.conv_out.{rest[2:]}"
        return None
    m = re.fullmatch(r"(\d+)\.(.+)", rest)
    if m is None:
        return None
    index, leaf = int(m.group(1)), m.group(2)
    if part == "middle":
        new_leaf = _leaf_to_diffusers(leaf)
        if str(index) in _MID_INV and new_leaf:
            return f"{top}.mid_block.{_MID_INV[str(index)]}.{new_leaf}"
        return None
    if part == "downsamples" and top == "encoder":
        new_leaf = _leaf_to_diffusers(leaf)
        return f"encoder.down_blocks.{index}.{new_leaf}" if new_leaf else None
    if part == "upsamples" and top == "decoder":
        per_level = num_res_blocks + 2
        level, slot = divmod(index, per_level)
        if level >= num_levels:
            return None
        if slot <= num_res_blocks:
            new_leaf = _leaf_to_diffusers(leaf)
            return f"decoder.up_blocks.{level}.resnets.{slot}.{new_leaf}" if new_leaf else None
        if level < num_levels - 1 and not leaf.startswith(("residual.", "shortcut.")):
            return f"decoder.up_blocks.{level}.upsamplers.0.{leaf}"
    return None


def diffusers_to_wan_state_dict(state: Mapping[str, torch.Tensor], num_res_blocks: int,
                                num_levels: int) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKLWan`` state dict renamed to Wan's original names."""
    return {diffusers_to_wan_key(k, num_res_blocks, num_levels): v for k, v in state.items()}


def wan_to_diffusers_state_dict(state: Mapping[str, torch.Tensor], num_res_blocks: int,
                                num_levels: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Wan's original state dict renamed to diffusers' names, and the keys that have no
    diffusers counterpart (the caller decides whether that is an error)."""
    out, unknown = {}, []
    for key, value in state.items():
        new = wan_to_diffusers_key(key, num_res_blocks, num_levels) if isinstance(key, str) else None
        if new is None or new in out:
            unknown.append(str(key))
        else:
            out[new] = value
    return out, unknown


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def _expected_files_message(model_dir: Path) -> str:
    vae = "/".join((DIFFUSERS_VAE_DIR, DIFFUSERS_VAE_FILES[0]))
    weights = "/".join((DIFFUSERS_VAE_DIR, DIFFUSERS_VAE_FILES[1]))
    return (f"no Wan VAE in {model_dir}: expected either the Diffusers layout ({vae} and {weights}) "
            f"or Wan's original layout ({WAN_VAE_FILE}, optionally with a config.json giving its sizes)")


def _wan_vae_config(model_dir: Path) -> dict:
    """AutoencoderKLWan kwargs for the ``.pth`` in ``model_dir``: the ``vae`` section of a
    ``config.json`` beside it, or its top level if that holds VAE keys; otherwise (no file, or the
    DiT's own config.json of a real Wan2.1 folder) the Wan2.1 sizes."""
    cfg = dict(WAN21_VAE_CONFIG)
    path = model_dir / "config.json"
    if not path.is_file():
        return cfg
    from memrope.io import read_json

    raw = read_json(path, "VAE config")
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    # "dim" alone does not make a VAE config: the DiT's config.json has a "dim" too.
    section = raw.get("vae", raw if (_VAE_CONFIG_KEYS - {"dim"}) & raw.keys() else None)
    if section is None:
        return cfg
    if not isinstance(section, dict):
        raise ValueError(f"{path}: 'vae' must be a JSON object of VAE sizes, got {type(section).__name__}")
    section = {k: v for k, v in section.items() if not k.startswith("_")}
    unknown = sorted(set(section) - _VAE_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown VAE config keys {unknown}; expected some of {sorted(_VAE_CONFIG_KEYS)}")
    if "dim" in section:
        section["base_dim"] = section.pop("dim")
    cfg.update(section)
    if cfg["attn_scales"]:
        raise ValueError(f"{path}: attn_scales {cfg['attn_scales']} is not supported for {WAN_VAE_FILE} "
                         "(Wan2.1 has none; diffusers' decoder has no attention in its up blocks)")
    return cfg


def _load_wan_original(model_dir: Path, device, dtype):
    cls = _autoencoder_cls()
    path = model_dir / WAN_VAE_FILE
    cfg = _wan_vae_config(model_dir)
    if "latents_mean" not in cfg and cfg["z_dim"] == len(WAN21_LATENTS_MEAN):
        cfg.update(latents_mean=list(WAN21_LATENTS_MEAN), latents_std=list(WAN21_LATENTS_STD))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable PyTorch state dict: {exc}") from None
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path} must hold a flat state dict of tensors (encoder.*, conv1.*, conv2.*, "
                         f"decoder.*), got {type(raw).__name__}")
    num_res_blocks, num_levels = cfg["num_res_blocks"], len(cfg["dim_mult"])
    state, unexpected = wan_to_diffusers_state_dict(raw, num_res_blocks, num_levels)
    with torch.device("meta"):
        vae = cls(**cfg)
    expected = vae.state_dict()
    missing = sorted(diffusers_to_wan_key(k, num_res_blocks, num_levels) for k in expected if k not in state)
    if missing or unexpected:
        raise ValueError(f"{path} does not match a Wan VAE with {cfg}: missing keys {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}, unexpected keys {sorted(unexpected)[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
    bad = [f"{diffusers_to_wan_key(k, num_res_blocks, num_levels)} {list(state[k].shape)} "
           f"(expected {list(t.shape)})" for k, t in expected.items() if state[k].shape != t.shape]
    if bad:
        raise ValueError(f"{path}: tensors with the wrong shape for a Wan VAE with {cfg}: {bad[:20]}")
    # Cast the tensors, not the module: ModelMixin.to(dtype) warns about fp32-pinned modules.
    vae.load_state_dict({k: v.to(dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return vae.to(device=device)


def _load_diffusers(model_dir: Path, device, dtype):
    cls = _autoencoder_cls()
    folder = model_dir / DIFFUSERS_VAE_DIR
    has_weights = any(folder.glob("diffusion_pytorch_model*"))  # .safetensors, .bin or sharded
    missing = [f"{DIFFUSERS_VAE_DIR}/{name}" for name in DIFFUSERS_VAE_FILES
               if not (folder / name).is_file() and (name == "config.json" or not has_weights)]
    if missing:
        raise FileNotFoundError(f"{folder} is incomplete: missing {missing}; " + _expected_files_message(model_dir))
    try:
        vae = cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                  low_cpu_mem_usage=False)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load the Diffusers VAE from {folder}: {exc}") from None
    return vae.to(device=device)


def load_vae(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32):
    """An eval-mode ``AutoencoderKLWan`` from a model folder, without network access.

    Looks for the Diffusers layout (``vae/config.json`` + ``vae/diffusion_pytorch_model.safetensors``)
    first, then Wan's original ``Wan2.1_VAE.pth`` (keys ``encoder.*``, ``conv1.*``, ``conv2.*``,
    ``decoder.*``; loaded with ``weights_only=True, mmap=True`` and renamed to diffusers' names;
    strict: missing or unexpected keys raise ValueError listing them). Sizes for the ``.pth`` come
    from a ``config.json`` beside it when that holds VAE keys (tiny test models), else Wan2.1's.
    A folder with neither layout raises FileNotFoundError naming the files of both.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    diffusers_dir = model_dir / DIFFUSERS_VAE_DIR
    if (diffusers_dir / DIFFUSERS_VAE_FILES[0]).is_file():
        vae, layout = _load_diffusers(model_dir, device, dtype), "diffusers"
    elif (model_dir / WAN_VAE_FILE).is_file():
        vae, layout = _load_wan_original(model_dir, device, dtype), "wan"
    elif diffusers_dir.is_dir():  # a vae/ folder without its config: say what it lacks
        vae, layout = _load_diffusers(model_dir, device, dtype), "diffusers"
    else:
        raise FileNotFoundError(_expected_files_message(model_dir))
    vae.eval().requires_grad_(False)
    logger.info("loaded the Wan VAE (%s layout, base_dim %d, z_dim %d) from %s on %s in %s", layout,
                vae.config.base_dim, vae.config.z_dim, model_dir, device, dtype)
    return vae


# ------------------------------------------------------------------------------------------------
# Tiny random VAEs (tests, demo)
# ------------------------------------------------------------------------------------------------

def tiny_vae_config(z_dim: int = 16, base_dim: int = 8) -> dict:
    """AutoencoderKLWan kwargs of the tiny test VAE: Wan2.1's structure (temporal upsampling at the
    first two decoder stages, spatial stride 8, temporal stride 4) at a fraction of the width."""
    cfg = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
               temperal_downsample=[False, True, True])
    if z_dim != len(WAN21_LATENTS_MEAN):
        cfg.update(latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    return cfg


def build_tiny_vae(directory: str | os.PathLike[str], *, layout: str = "diffusers", seed: int = 0,
                   z_dim: int = 16, base_dim: int = 8) -> Path:
    """Write a tiny Wan VAE with RANDOM weights (seeded, reproducible) into ``directory`` and
    return ``directory``. Its frames are noise-like, not pictures: it exists to test the decode
    machinery without downloads.

    ``layout='diffusers'`` writes ``vae/`` with ``save_pretrained``; ``layout='wan'`` writes
    ``Wan2.1_VAE.pth`` with Wan's original key names and its sizes into ``config.json`` (top level
    for a new file; a ``vae`` section merged into an existing one, e.g. a DiT's config). With
    ``z_dim == 16`` the Wan2.1 latent mean/std are used, otherwise zeros/ones.
    """
    if layout not in ("diffusers", "wan"):
        raise ValueError(f"layout must be 'diffusers' or 'wan', got {layout!r}")
    cls = _autoencoder_cls()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_vae_config(z_dim=z_dim, base_dim=base_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = cls(**cfg).eval()
    if layout == "diffusers":
        vae.save_pretrained(str(directory / DIFFUSERS_VAE_DIR), safe_serialization=True)
    else:
        from memrope.io import atomic_path, atomic_write

        state = diffusers_to_wan_state_dict(vae.state_dict(), cfg["num_res_blocks"], len(cfg["dim_mult"]))
        with atomic_path(directory / WAN_VAE_FILE) as tmp:
            torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
        wan_cfg = {("dim" if k == "base_dim" else k): v for k, v in cfg.items()}
        config_path = directory / "config.json"
        if config_path.is_file():
            existing = json.loads(config_path.read_text())
            existing["vae"] = wan_cfg
            wan_cfg = existing
        else:
            wan_cfg["_note"] = "tiny Wan VAE sizes: RANDOM weights"
        atomic_write(config_path, json.dumps(wan_cfg, indent=1))
    logger.info("wrote a tiny random Wan VAE (%s layout, seed %d) to %s", layout, seed, directory)
    return directory
