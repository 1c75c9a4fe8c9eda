"""Quantized exports: NVIDIA ModelOpt calibrates and quantizes the DiT's Linear layers; the graphs
carry the result as explicit ONNX QuantizeLinear/DequantizeLinear (Q/DQ) that TensorRT-RTX builds
into FP8, INT8 and INT4 GEMMs.

Owns: the quantization modes (:data:`MODES`), which layers are quantized (:data:`QUANTIZED_LAYERS`),
the calibration on real block-loop inputs (:func:`calibration_loop`, :func:`quantize_dit`), the
FP8 convolutions of the VAE decoder (:func:`quantize_vae`, calibrated on the latents of the same
loop), the graph form of a quantized Linear and convolution (:class:`QDQLinear`,
:class:`QDQConv`, two custom torch ops and their ONNX translation), the INT4 packing of an
exported graph (:func:`pack_int4_weights`) and the Q/DQ census of a graph (:func:`qdq_census`).
Does not own the export itself (:mod:`memrope.export.onnx_export`) or the prompts (the runtime
encodes them and hands over embeddings).

What is quantized, per transformer block: the Linear layers of self-attention (q, k, v, o),
cross-attention (q, k, v, o; k and v run in the text graph, once per prompt) and the FFN (both).
What stays in the base dtype, and why:

- the time embedding and the modulation (``time_embedding``, ``time_projection``, per-block
  ``modulation``): six scale/shift/gate vectors per block multiply every activation; an error there
  is an error everywhere, and they are a few hundredths of the weights;
- the norms (RMS, layer): statistics over the channel axis, cheap, and their fp32 islands are
  deliberate (spec section 7.10);
- the online RoPE: angles from positions; quantizing them moves tokens in time and space;
- the memory EMA (alpha 0.01): a running mean; an 8-bit or 4-bit update would vanish under
  rounding, and it accumulates over the whole video;
- the cache write: keys and values are cached as computed (the cache stays in the base dtype);
- the patch embedding, the text embedding and the head: the first and last layers, small, and where
  quantization errors are least forgiven (they touch the latents directly).

Modes (ModelOpt's own configs, restricted to the layers above):

- ``fp8``: FP8 E4M3 weights (per tensor) and activations (per tensor, static, calibrated):
  ``mtq.FP8_DEFAULT_CFG``. TensorRT-RTX builds FP8 GEMMs for Ada (8.9) and Blackwell (12.0).
- ``int8``: INT8 weights (per output channel) and activations (per tensor): ``mtq.INT8_DEFAULT_CFG``.
- ``int8-wo``: INT8 weights per output channel, activations in the base dtype: ``mtq.INT8_WEIGHT_ONLY_CFG``.
  TensorRT-RTX 1.7 dequantizes the self-attention's q, k and v to fuse them into one bf16 GEMM, so
  ``memrope build`` refuses these graphs (:mod:`memrope.engine.build`); ONNX Runtime runs them.
- ``int4-wo``: INT4 weights in blocks of 128 input channels (fewer where a layer is narrower), the
  activations in the base dtype: ``mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG`` (weight-only GEMMs from Ampere on).

The VAE decoder (``fp8`` only): TensorRT-RTX 1.7 builds a convolution whose input and weight are
both FP8 Q/DQ into an FP8 convolution, 2D and 3D, for 8.9 and 12.0; with the weight alone in FP8
it dequantizes the weight and convolves in the base dtype (bench/vae_fp8_probe.py). So ``fp8``
quantizes the decoder's residual, shortcut and upsampling convolutions (weights and inputs, per
tensor, calibrated on the decoded latents of the calibration loop) and keeps in the base dtype:
``post_quant_conv`` and ``conv_in`` (the latents' first touch, 16 channels), the mid block's
attention (its 1x1 projections feed a softmax over a whole frame), ``conv_out`` (3 channels: its
rounding is the pixel's), the norms, the upsampling and the feature caches (written as computed).
The weight-only and INT8 modes keep the whole VAE in the base dtype.

NVFP4 is not offered: ModelOpt 0.47 calibrates its dynamic blocks on CUDA only, and an export must
run on a CPU.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import hashlib
import io
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from memrope.errors import StageError

logger = logging.getLogger(__name__)

# Module names (relative to the DiT) of the Linear layers that are quantized.
QUANTIZED_LAYERS = ("blocks.*.self_attn.[qkvo]", "blocks.*.cross_attn.[qkvo]", "blocks.*.ffn.0", "blocks.*.ffn.2")
# Module names (relative to memrope.vae.WanStreamingDecoder) of the convolutions fp8 quantizes.
VAE_QUANTIZED_CONVS = ("decoder.mid_block.resnets.*.conv[12]", "decoder.up_blocks.*.resnets.*.conv[12]",
                       "decoder.up_blocks.*.resnets.*.conv_shortcut", "decoder.up_blocks.*.upsampler*.resample.1",
                       "decoder.up_blocks.*.upsampler*.time_conv")
VAE_KEPT = ["post_quant_conv", "decoder.conv_in", "decoder.mid_block.attentions", "decoder.conv_out", "norms",
            "upsampling", "feature_caches"]
VAE_CALIBRATION_LATENT_FRAMES = 9  # per calibration prompt: its first three blocks
INT4_BLOCK_SIZE = 128
FP8_MAX = 448.0  # the largest finite float8 E4M3 (fn) value


@dataclass(frozen=True)
class Mode:
    """One quantization mode: ModelOpt's config and what the graph stores."""

    name: str
    modelopt_config: str      # the mtq config it starts from
    weight: str               # "fp8", "int8" or "int4": the initializers' type
    activations: str | None   # "fp8", "int8" or None (weight-only: activations in the base dtype)
    summary: str
    vae: bool = False         # the VAE decoder's convolutions are quantized too (see the module docstring)

    @property
    def weight_only(self) -> bool:
        return self.activations is None


MODES = {
    "fp8": Mode("fp8", "FP8_DEFAULT_CFG", "fp8", "fp8", "FP8 E4M3 weights and activations, per tensor", vae=True),
    "int8": Mode("int8", "INT8_DEFAULT_CFG", "int8", "int8", "INT8 weights per channel, INT8 activations per tensor"),
    "int8-wo": Mode("int8-wo", "INT8_WEIGHT_ONLY_CFG", "int8", None, "INT8 weights per output channel, weight-only"),
    "int4-wo": Mode("int4-wo", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "int4", None,
                    "INT4 weights in blocks of input channels, weight-only"),
}
# The largest integer of each type's symmetric range: ModelOpt's scale is amax / bound.
_BOUND = {"fp8": FP8_MAX, "int8": 127.0, "int4": 7.0}


class QuantizationError(StageError):
    """Quantization could not be done as asked (a bad mode, no calibration data, or ModelOpt's
    result not what the graph can carry)."""


def modelopt_version() -> str:
    try:
        import modelopt
    except ImportError:
        raise QuantizationError("--quantize needs NVIDIA ModelOpt: pip install -e '.[quantize]'") from None
    return str(modelopt.__version__)


def check_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"--quantize must be one of {', '.join(MODES)}, got {name!r}")
    return MODES[name]


@dataclass
class Calibration:
    """The calibration set: text embeddings of real prompts, each driven through ``blocks`` blocks
    of the eager block loop from seeded noise (``seed + i`` for prompt ``i``), switching to the next
    prompt with a re-cache halfway, so every graph sees the cache at every fill level.

    ``prompt_embeds``: one ``[B, text_len, text_dim]`` float tensor per prompt.
    ``latents``: filled by the calibration run, one ``[B, blocks * F, C, h, w]`` tensor of clean
    latents per prompt: what the VAE decoder's calibration decodes.
    ``dtype``: what the eager loop computes in; None: the model's own dtype. float32 by default:
    the export runs on the CPU, where float32 GEMMs are many times faster than bf16 or fp16 ones
    on CPUs without bf16 instructions (a full-size bf16 block did not finish in 14.5 minutes on a
    2-core AVX2 machine), and the ranges it records differ from the base dtype's by rounding only:
    the weights are the same numbers (bf16 and fp16 widen to float32 exactly), and each range
    becomes a scale rounded to the base dtype anyway.
    """

    prompts: list[str]
    prompt_embeds: list[torch.Tensor]
    blocks: int
    seed: int = 0
    latents: list[torch.Tensor] = field(default_factory=list, repr=False)
    dtype: torch.dtype | None = torch.float32

    def sha256(self) -> str:
        """Hash of everything that decides the calibration's result (prompts, embeddings, blocks,
        seed, the dtype it computes in)."""
        digest = hashlib.sha256()
        for text, embeds in zip(self.prompts, self.prompt_embeds, strict=True):
            digest.update(text.encode())
            digest.update(embeds.detach().float().contiguous().numpy().tobytes())
        digest.update(f"blocks={self.blocks};seed={self.seed}".encode())
        if self.dtype is not None:
            digest.update(f";dtype={self.dtype}".encode())
        return digest.hexdigest()


@dataclass
class QuantizationRecord:
    """What :func:`quantize_dit` did: recorded in the artifact's contract and the plans' sidecars."""

    mode: str
    modelopt: str
    calibration_sha256: str | None  # None for weight-only modes: no calibration data
    calibration: dict
    layers: list[str]
    int4_block_size: int | None = None
    kept: list[str] = field(default_factory=list)
    vae: dict | None = None  # what :func:`quantize_vae` did, when the artifact has a VAE

    def to_json(self) -> dict:
        return {"mode": self.mode, "weights": MODES[self.mode].weight, "activations": MODES[self.mode].activations,
                "modelopt": self.modelopt, "calibration_sha256": self.calibration_sha256,
                "calibration": self.calibration, "quantized_layers": len(self.layers),
                "layer_patterns": list(QUANTIZED_LAYERS), "int4_block_size": self.int4_block_size,
                "kept_in_base_dtype": self.kept, **({} if self.vae is None else {"vae": self.vae})}


# --------------------------------------------------------------------------------------------
# The graph form: two custom ops that export as standard Q/DQ
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("memrope::fake_quantize", mutates_args=())
def fake_quantize(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """ONNX ``DequantizeLinear(QuantizeLinear(x, scale), scale)`` to ``kind`` (fp8 E4M3 or int8,
    saturating, round half to even), per tensor; in ``x``'s dtype."""
    scaled = x.float() / scale.float()
    if kind == "fp8":
        quantized = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    else:
        quantized = torch.round(scaled).clamp(-128, 127)
    return (quantized * scale.float()).to(x.dtype)


@fake_quantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("memrope::dequantize", mutates_args=())
def dequantize(weight: torch.Tensor, scale: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """ONNX ``DequantizeLinear(weight, scale, axis, block_size)`` of a ``[K, N]`` weight, in the
    scale's dtype: per tensor (``axis`` -1), per output channel (``axis`` 1, scale ``[N]``) or in
    blocks of ``block_size`` input channels (``axis`` 0, scale ``[K / block_size, N]``)."""
    if block_size > 0:
        scale = scale.repeat_interleave(block_size, dim=0)
    return (weight.float() * scale.float()).to(scale.dtype)


@dequantize.register_fake
def _(weight: torch.Tensor, scale: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    return torch.empty(weight.shape, dtype=scale.dtype, device=weight.device)


def _onnx_fake_quantize(x, scale, kind: str):
    import ml_dtypes
    import onnx_ir as ir
    from onnxscript import opset23 as op

    zero = np.zeros((), dtype=ml_dtypes.float8_e4m3fn if kind == "fp8" else np.int8)
    zero_point = op.Constant(value=ir.tensor(zero))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


def _onnx_dequantize(weight, scale, axis: int, block_size: int):
    from onnxscript import opset23 as op

    if block_size > 0:
        return op.DequantizeLinear(weight, scale, axis=0, block_size=block_size)
    if axis >= 0:
        return op.DequantizeLinear(weight, scale, axis=axis)
    return op.DequantizeLinear(weight, scale)


def translation_table() -> dict:
    """torch.onnx's ``custom_translation_table``: the custom ops above as standard ONNX Q/DQ."""
    return {torch.ops.memrope.fake_quantize.default: _onnx_fake_quantize,
            torch.ops.memrope.dequantize.default: _onnx_dequantize}


class QDQLinear(nn.Module):
    """A Linear whose weight is held quantized, transposed to ``[K, N]`` (in x out) so that the graph
    reads ``DequantizeLinear -> MatMul`` (the form TensorRT fuses into a low-precision GEMM), with
    the input quantized and dequantized first when the mode quantizes activations.

    Buffers: ``weight_q`` ``[K, N]`` (float8_e4m3fn, or int8 holding int8 or int4 values),
    ``weight_scale`` (``[]``, ``[N]`` or ``[K / block, N]``, base dtype), ``input_scale`` (``[]``).
    """

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, axis: int, block_size: int,
                 bias: torch.Tensor | None, input_scale: torch.Tensor | None, activations: str | None):
        super().__init__()
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.axis, self.block_size, self.activations = axis, block_size, activations
        self.in_features, self.out_features = weight_q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            x = torch.ops.memrope.fake_quantize(x, self.input_scale, self.activations)
        y = torch.matmul(x, torch.ops.memrope.dequantize(self.weight_q, self.weight_scale, self.axis,
                                                         self.block_size))
        return y if self.bias is None else y + self.bias


class QDQConv(nn.Module):
    """A VAE decoder convolution (:class:`memrope.vae.VAEConv`) with its weight held in FP8 (per
    tensor) and its input quantized and dequantized first: the graph reads ``Q -> DQ -> Conv`` with
    ``DequantizeLinear`` on the weight, the form TensorRT builds into an FP8 convolution.

    Buffers: ``weight_q`` ``[O, I, t, kh, kw]`` float8_e4m3fn, ``weight_scale`` and ``input_scale``
    ``[]`` in the base dtype.
    """

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: torch.Tensor, padding: tuple[int, int, int], activations: str):
        super().__init__()
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.padding, self.activations = padding, activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.ops.memrope.fake_quantize(x, self.input_scale, self.activations)
        weight = torch.ops.memrope.dequantize(self.weight_q, self.weight_scale, -1, 0)
        return torch.nn.functional.conv3d(x, weight, self.bias, padding=self.padding)


# --------------------------------------------------------------------------------------------
# Calibration and conversion
# --------------------------------------------------------------------------------------------

def quantized_layer_names(dit: nn.Module) -> list[str]:
    """The names of ``dit``'s Linear layers that :data:`QUANTIZED_LAYERS` selects, in module order."""
    return [name for name, module in dit.named_modules()
            if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in QUANTIZED_LAYERS)]


def int4_block_size(dit: nn.Module, names: Sequence[str]) -> int:
    """128 input channels, or the largest power of two that divides every quantized layer's input
    width at least twice: TensorRT-RTX 1.7 fuses an INT4 weight into its GEMM only when the weight
    has two or more blocks along its input (a 64-wide layer in one block of 64 is dequantized by a
    separate kernel, then multiplied in the base dtype; in two blocks of 32, it is fused)."""
    size = INT4_BLOCK_SIZE
    widths = [dit.get_submodule(n).in_features for n in names]
    while size > 1 and any(w % size or w // size < 2 for w in widths):
        size //= 2
    if size < 16:
        raise QuantizationError(f"int4-wo needs layer input widths divisible by 16 (blocks of input channels); "
                                f"got {sorted(set(widths))}")
    return size


def _modelopt_config(mode: Mode, block_size: int) -> dict:
    import modelopt.torch.quantization as mtq

    base = copy.deepcopy(getattr(mtq, mode.modelopt_config))
    entries = {e.get("quantizer_name"): e for e in base["quant_cfg"] if isinstance(e, dict)}
    weight_cfg = dict(entries["*weight_quantizer"]["cfg"])
    if mode.weight == "int4":
        weight_cfg["block_sizes"] = {**weight_cfg["block_sizes"], -1: block_size}
    quant_cfg = [{"quantizer_name": "*", "enable": False},
                 {"quantizer_name": "*weight_quantizer", "cfg": weight_cfg}]
    if mode.activations is not None:
        quant_cfg.append({"quantizer_name": "*input_quantizer", "cfg": dict(entries["*input_quantizer"]["cfg"])})
    return {"quant_cfg": quant_cfg, "algorithm": base.get("algorithm", "max")}


def _scale(amax: torch.Tensor, bound: float) -> torch.Tensor:
    return amax.detach().float() / bound


def _weight_codes(module: nn.Module, mode: Mode, block_size: int, name: str) -> tuple[torch.Tensor, ...]:
    """``module``'s weight (a calibrated ModelOpt layer's) as ModelOpt's own codes and scale:
    ``(codes, scale, axis, block)``, codes in the weight's layout (float8_e4m3fn, or int8 holding
    int8 or int4 values), the scale per tensor ``[]``, per output channel ``[N]`` or per block
    ``[N, K / block]``. Raises if the integers cannot be read back exactly from ModelOpt's result."""
    weight = module.weight.detach().float()  # in fp32, so that ModelOpt's result is exact codes x scale
    out_features = weight.shape[0]
    with torch.no_grad():
        fake = module.weight_quantizer(weight).float()  # ModelOpt's quantize-dequantize of the weight
    amax = module.weight_quantizer.amax
    bound = _BOUND[mode.weight]
    if mode.weight == "int4":
        scale = _scale(amax, bound).reshape(out_features, weight.shape[1] // block_size)  # [N, K / block]
        codes = fake / scale.repeat_interleave(block_size, dim=1)
        axis, size = 0, block_size
    elif amax.numel() == 1:
        scale = _scale(amax, bound).reshape(())
        codes = fake / scale
        axis, size = -1, 0
    else:
        scale = _scale(amax, bound).reshape(out_features)
        codes = fake / scale.reshape(-1, *([1] * (weight.dim() - 1)))
        axis, size = 1, 0
    if mode.weight == "fp8":
        stored = codes.to(torch.float8_e4m3fn)
        exact = stored.float()
    else:
        exact = torch.round(codes)
        stored = exact.to(torch.int8)
    error = float((codes - exact).abs().max()) if codes.numel() else 0.0
    if not np.isfinite(error) or error > 1e-3:
        raise QuantizationError(f"{name}: ModelOpt's {mode.weight} weights are not integers of the scale "
                                f"amax / {bound:g} (off by {error:.3g}); this ModelOpt version quantizes "
                                "differently from what the graph stores")
    return stored, scale, axis, size


def _input_scale(module: nn.Module, mode: Mode, dtype: torch.dtype) -> torch.Tensor | None:
    if mode.activations is None:
        return None
    return _scale(module.input_quantizer.amax, _BOUND[mode.activations]).reshape(()).to(dtype)


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().clone()


def _convert(module: nn.Module, mode: Mode, block_size: int, dtype: torch.dtype, name: str) -> QDQLinear:
    """``module`` (a calibrated ModelOpt QuantLinear) as a :class:`QDQLinear` holding ModelOpt's own
    quantized weight, transposed to ``[K, N]``."""
    stored, scale, axis, size = _weight_codes(module, mode, block_size, name)
    weight_scale = scale.t().contiguous() if scale.dim() == 2 else scale
    return QDQLinear(stored.t().contiguous(), weight_scale.to(dtype), axis, size, _bias(module),
                     _input_scale(module, mode, dtype), mode.activations)


def calibration_loop(step, run, calibration: Calibration) -> Callable[[], None]:
    """A function driving ``step`` (a ``MemRoPEStep`` on the DiT being calibrated) through the
    eager block loop of ``run`` over the calibration set, with a progress bar: for prompt ``i``,
    ``calibration.blocks`` blocks from seeded noise, switching to prompt ``i + 1`` with a re-cache of
    the recent frames halfway (so the re-cache graph's inputs are seen too). The clean latents of
    each prompt's blocks are kept in ``calibration.latents`` for the VAE's calibration."""
    from tqdm.auto import tqdm

    from memrope.backend import StepModuleBackend
    from memrope.pipeline import MemRoPEPipeline, PromptChange
    from memrope.sampler import StreamingSeededNoise

    if not calibration.prompt_embeds or calibration.blocks < 1:
        raise QuantizationError("the calibration set is empty: give at least one prompt and one block")

    def calibrate() -> None:
        backend = StepModuleBackend(step)
        pipeline = MemRoPEPipeline(backend, run)
        embeds = calibration.prompt_embeds
        calibration.latents.clear()  # this run's latents only, if the set is calibrated again
        with torch.no_grad(), tqdm(total=len(embeds) * calibration.blocks, desc="calibrating", unit="block",
                                   disable=None, leave=False) as bar:
            for i, prompt_embeds in enumerate(embeds):
                noise = StreamingSeededNoise(calibration.seed + i, run.batch_size, pipeline.latent_frame_shape(),
                                             step.layout.block_frames)
                switch = calibration.blocks // 2
                changes = ([PromptChange(switch, embeds[(i + 1) % len(embeds)], recache="recent")]
                           if len(embeds) > 1 and switch > 0 else [])
                latents = []
                for result in pipeline.blocks(prompt_embeds, noise, calibration.blocks, prompt_changes=changes):
                    latents.append(result.x0.detach().clone())  # x0 lives in a ring buffer
                    bar.update()
                calibration.latents.append(torch.cat(latents, dim=1))

    return calibrate


def _calibrate_in(module: nn.Module, dtype: torch.dtype | None, calibrate: Callable[[], None]) -> None:
    """Run ``calibrate()`` with ``module``'s parameters and buffers in ``dtype`` (None: as they
    are), then cast them back. Float32 holds every bf16 and fp16 value exactly, so the round trip
    gives back the same weights. ModelOpt collects ranges during the loop and stores them after it,
    so they keep the calibration's precision."""
    own = next(module.parameters()).dtype
    if dtype is None or dtype == own:
        calibrate()
        return
    logger.info("calibrating in %s", str(dtype).removeprefix("torch."))
    module.to(dtype)
    try:
        calibrate()
    finally:
        module.to(own)


def quantize_dit(dit: nn.Module, mode_name: str, calibrate: Callable[[], None] | None = None,
                 calibration: Calibration | None = None) -> QuantizationRecord:
    """Quantize ``dit`` in place: ModelOpt inserts quantizers into the :data:`QUANTIZED_LAYERS`,
    ``calibrate()`` drives the block loop over the calibration set (ModelOpt records each input's
    range), and each quantized Linear becomes a :class:`QDQLinear` holding ModelOpt's weights.

    Weight-only modes need no calibration data: ModelOpt reads the weights' ranges from the weights
    (the same ranges a calibration run would record), so ``calibrate`` and ``calibration`` are not
    used and the record says so; modes that quantize activations require both.

    Raises :class:`QuantizationError` when ModelOpt is missing or its result cannot be carried.
    """
    mode = check_mode(mode_name)
    version = modelopt_version()
    import modelopt.torch.quantization as mtq

    if not mode.weight_only and (calibrate is None or calibration is None):
        raise QuantizationError(f"--quantize {mode.name} quantizes activations: it needs calibration data "
                                "(prompts driven through the block loop)")

    names = quantized_layer_names(dit)
    if not names:
        raise QuantizationError("the DiT has no Linear layers matching " + ", ".join(QUANTIZED_LAYERS))
    block_size = int4_block_size(dit, names) if mode.weight == "int4" else 0
    targets = nn.ModuleDict({name.replace(".", "/"): dit.get_submodule(name) for name in names})
    dtype = next(dit.parameters()).dtype
    logger.info("quantizing %d Linear layers to %s with ModelOpt %s (%s)", len(names), mode.name, version,
                mode.summary)
    # ModelOpt swaps each target's class in place, so the DiT calls the calibrating layers. It
    # prints ("Inserted N quantizers"); that goes to the debug log, and the loop's per-switch
    # lines too: the progress bar tells the story.
    printed = io.StringIO()
    pipeline_log = logging.getLogger("memrope.pipeline")
    level = pipeline_log.level
    pipeline_log.setLevel(max(level, logging.WARNING))
    try:
        with contextlib.redirect_stdout(printed):
            mtq.quantize(targets, _modelopt_config(mode, block_size),
                         None if mode.weight_only else (lambda _model: _calibrate_in(dit, calibration.dtype, calibrate)))
    finally:
        pipeline_log.setLevel(level)
    for line in printed.getvalue().splitlines():
        logger.debug("modelopt: %s", line)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(dit.get_submodule(parent), child, _convert(dit.get_submodule(name), mode, block_size, dtype, name))
    if mode.weight_only:
        calibration_sha256, described = None, {"weights_only": "ModelOpt read the weights' ranges; no activations"}
    else:
        calibration_sha256 = calibration.sha256()
        described = {"prompts": len(calibration.prompts), "blocks_per_prompt": calibration.blocks,
                     "seed": calibration.seed, "dtype": str(calibration.dtype or dtype).removeprefix("torch.")}
    return QuantizationRecord(
        mode=mode.name, modelopt=version, calibration_sha256=calibration_sha256, calibration=described,
        layers=names, int4_block_size=block_size or None,
        kept=["time_embedding", "time_projection", "modulation", "norms", "rope", "memory_ema", "cache_write",
              "patch_embedding", "text_embedding", "head"])


# --------------------------------------------------------------------------------------------
# The VAE decoder (fp8)
# --------------------------------------------------------------------------------------------

def vae_quantized_conv_names(vae: nn.Module) -> list[str]:
    """The names of ``vae``'s convolutions (:class:`memrope.vae.VAEConv`) that
    :data:`VAE_QUANTIZED_CONVS` selects, in module order."""
    from memrope.vae import VAEConv

    return [name for name, module in vae.named_modules()
            if isinstance(module, VAEConv) and any(fnmatch.fnmatchcase(name, p) for p in VAE_QUANTIZED_CONVS)]


def _register_vae_conv() -> None:
    """Tell ModelOpt how to quantize a :class:`memrope.vae.VAEConv`, the way it quantizes its own
    Linear and Conv layers: the input by ``input_quantizer``, the weight (read through
    ``self.weight``) by ``weight_quantizer``."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.nn.modules.quant_module import QuantLinearConvBase

    from memrope.vae import VAEConv

    if VAEConv not in QuantModuleRegistry:
        QuantModuleRegistry.register({VAEConv: "memrope.vae.VAEConv"})(
            type("QuantVAEConv", (QuantLinearConvBase,), {"__doc__": "A quantized memrope.vae.VAEConv."}))


def vae_calibration_loop(vae: nn.Module, latents: Sequence[torch.Tensor],
                         latent_frames: int = VAE_CALIBRATION_LATENT_FRAMES) -> Callable[[], None]:
    """A function decoding the first ``latent_frames`` of each ``[B, F, C, h, w]`` of ``latents``
    (the clean latents of the calibration loop, one video per prompt) through the streaming decoder
    ``vae``, step by step with its feature caches, as the runtime does. The decoder's caches hold
    two frames, so its steady state comes within the first steps; the cap keeps a full-size
    calibration on a CPU to a few decodes per prompt."""
    from tqdm.auto import tqdm

    if not latents:
        raise QuantizationError("the VAE's calibration has no latents: the DiT's calibration run must come first")

    def calibrate() -> None:
        t = vae.latent_frames
        steps = sum(min(video.shape[1], latent_frames) // t for video in latents)
        param = vae.post_quant_conv.weight
        with torch.no_grad(), tqdm(total=steps, desc="calibrating the VAE", unit="step", disable=None,
                                   leave=False) as bar:
            for video in latents:
                b, _, _, h, w = video.shape
                caches = vae.zero_caches(b, h, w)
                for k in range(0, min(video.shape[1], latent_frames) - t + 1, t):
                    first = torch.tensor([k == 0])
                    out = vae(video[:, k:k + t].to(device=param.device, dtype=param.dtype), first, *caches)
                    caches = list(out[2:])
                    bar.update()

    return calibrate


def quantize_vae(vae: nn.Module, mode_name: str, calibrate: Callable[[], None],
                 calibration_dtype: torch.dtype | None = torch.float32) -> dict | None:
    """Quantize ``vae`` (a ``memrope.vae.WanStreamingDecoder``) in place when the mode covers the
    VAE (``fp8``): ModelOpt inserts quantizers into the :data:`VAE_QUANTIZED_CONVS`,
    ``calibrate()`` decodes the calibration latents in ``calibration_dtype`` (None: the VAE's own;
    see :class:`Calibration`) and ModelOpt records each input's range, and each convolution
    becomes a :class:`QDQConv` holding ModelOpt's FP8 weight. Returns the record, or None when the
    mode keeps the VAE in the base dtype."""
    mode = check_mode(mode_name)
    if not mode.vae:
        return None
    version = modelopt_version()
    import modelopt.torch.quantization as mtq

    names = vae_quantized_conv_names(vae)
    if not names:
        raise QuantizationError("the VAE decoder has no convolutions matching " + ", ".join(VAE_QUANTIZED_CONVS))
    _register_vae_conv()
    targets = nn.ModuleDict({name.replace(".", "/"): vae.get_submodule(name) for name in names})
    dtype = vae.post_quant_conv.weight.dtype
    logger.info("quantizing %d VAE decoder convolutions to %s with ModelOpt %s", len(names), mode.name, version)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        mtq.quantize(targets, _modelopt_config(mode, 0), lambda _model: _calibrate_in(vae, calibration_dtype, calibrate))
    for line in printed.getvalue().splitlines():
        logger.debug("modelopt: %s", line)
    for name in names:
        module = vae.get_submodule(name)
        stored, scale, _, _ = _weight_codes(module, mode, 0, name)
        parent, _, child = name.rpartition(".")
        setattr(vae.get_submodule(parent), child,
                QDQConv(stored, scale.to(dtype), _bias(module), _input_scale(module, mode, dtype), module.padding,
                        mode.activations))
    return {"weights": mode.weight, "activations": mode.activations, "quantized_convs": len(names),
            "conv_patterns": list(VAE_QUANTIZED_CONVS), "kept_in_base_dtype": list(VAE_KEPT),
            "calibration": f"the first {VAE_CALIBRATION_LATENT_FRAMES} clean latent frames of each prompt's "
                           "calibration blocks, decoded step by step in "
                           + str(calibration_dtype or dtype).removeprefix("torch.")}


# --------------------------------------------------------------------------------------------
# After export
# --------------------------------------------------------------------------------------------

def pack_int4_weights(path: Path) -> int:
    """Store every int8 initializer that feeds a blocked ``DequantizeLinear`` as INT4 (its values are
    int4 codes held in int8 by torch); rewrites ``path`` in place. Returns how many were packed."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    initializers = {init.name: init for init in model.graph.initializer}
    packed_names: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not any(a.name == "block_size" and a.i > 0 for a in node.attribute):
            continue
        init = initializers.get(node.input[0])
        if init is None or init.data_type != onnx.TensorProto.INT8:
            continue
        values = numpy_helper.to_array(init)
        if values.min() < -8 or values.max() > 7:
            raise QuantizationError(f"{path.name}: {init.name} holds values outside int4's [-8, 7]")
        init.CopyFrom(numpy_helper.from_array(values.astype(ml_dtypes.int4), init.name))  # packed, 2 per byte
        packed_names.add(init.name)
    # The exporter's type annotations of the packed weights still say INT8: set them to INT4.
    for info in [*model.graph.value_info, *model.graph.input]:
        if info.name in packed_names:
            info.type.tensor_type.elem_type = onnx.TensorProto.INT4
    data = path.with_name(path.name + ".data")
    if data.exists():  # weights past protobuf's limit: rewrite them as one external file again
        data.unlink()
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save(model, str(path))
    return len(packed_names)


def qdq_census(path: Path) -> dict:
    """The Q/DQ of a graph: ``{"QuantizeLinear": n, "DequantizeLinear": n, "weights": {type: n},
    "quantized_matmuls": {MatMul node: its layer}, "quantized_convs": {Conv node: its layer}}``,
    where a quantized MatMul or Conv reads a dequantized initializer, and its layer is that
    initializer's module name (``blocks.0.self_attn.q``, ``decoder.up_blocks.0.resnets.0.conv1``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name: init.data_type for init in model.graph.initializer}
    dequantized_weights: dict[str, str] = {}
    sources: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            dequantized_weights[node.output[0]] = onnx.TensorProto.DataType.Name(initializers[node.input[0]])
            sources[node.output[0]] = node.input[0].removesuffix(".weight_q").split("dit.", 1)[-1]
    counts = Counter(node.op_type for node in model.graph.node)

    def quantized(op_type: str) -> dict[str, str]:
        return {node.name: next(sources[i] for i in node.input if i in sources) for node in model.graph.node
                if node.op_type == op_type and any(i in dequantized_weights for i in node.input)}

    return {"QuantizeLinear": counts.get("QuantizeLinear", 0), "DequantizeLinear": counts.get("DequantizeLinear", 0),
            "weights": dict(Counter(dequantized_weights.values())), "quantized_matmuls": quantized("MatMul"),
            "quantized_convs": quantized("Conv")}
