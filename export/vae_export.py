"""Export and validate ``vae_decode.onnx``: one streaming Wan VAE decode step with explicit
feature-cache I/O (``memrope.vae.WanStreamingDecoder``), as the contract names it.

Owns: tracing inputs for the decode step, writing the graph (same exporter settings and name
checks as the DiT graphs), and the validation: ONNX Runtime on CPU runs the graph free-running
(its own caches fed back, as the runtime does) over a rollout that crosses the first-frame step
and the cache fill, against the eager module step by step. Writing it into an artifact directory
(atomically, with the audit) is :func:`memrope.export.onnx_export.export_artifact`'s job.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from memrope.contract import GraphContract
from memrope.errors import StageError
from memrope.export.torch_onnx import export_graph, param_bytes
from memrope.vae import WanStreamingDecoder, padding_frames

logger = logging.getLogger(__name__)

PIXEL_ATOL = 1e-4            # on pixels in [-1, 1]
VALIDATION_LATENT_FRAMES = 6  # the first-frame step, the cache filling, three steady steps


class VAEMismatchError(StageError):
    """ONNX Runtime and the eager decoder disagree on ``vae_decode.onnx``."""


def example_vae_inputs(contract: GraphContract) -> tuple[torch.Tensor, ...]:
    """Inputs in contract order for tracing (values do not shape the graph; caches are
    stride-0 zeros so a 832x480 trace does not allocate the 3.8 GB fp32 cache)."""
    def example(spec):
        if spec.name == "first_frame":
            return torch.ones(spec.shape, dtype=torch.bool)
        return torch.zeros((1,) * len(spec.shape), dtype=spec.torch_dtype).expand(spec.shape)

    return tuple(example(t) for t in contract.inputs)


def check_module(module: WanStreamingDecoder, contract: GraphContract) -> None:
    """The module's step size and cache count must be the contract's."""
    latents = contract.input("latents")
    caches = len(contract.inputs) - 2
    if module.latent_frames != latents.shape[1] or len(module.layout) != caches:
        raise ValueError(f"the VAE module decodes {module.latent_frames} latent frame(s) with {len(module.layout)} "
                         f"caches; the contract expects {latents.shape[1]} with {caches}")
    dtype = module.post_quant_conv.weight.dtype
    if dtype != latents.torch_dtype:
        raise ValueError(f"the VAE module is in {dtype}, the contract's latents are {latents.dtype}: "
                         "convert the module to the export dtype")


def export_vae_graph(module: WanStreamingDecoder, contract: GraphContract, path: Path,
                     translations: dict | None = None) -> None:
    """Write ``module`` as the contract's static graph at ``path`` (names checked, onnx checker);
    ``translations``: torch.onnx's custom translation table (a quantized decoder's Q/DQ ops)."""
    check_module(module, contract)
    logger.info("exporting the vae_decode graph (%d feature caches)", len(module.layout))
    with torch.no_grad():
        export_graph(module.eval(), example_vae_inputs(contract), path, contract.input_names,
                     contract.output_names, param_bytes(module), translations)


def validation_latents(contract: GraphContract, frames: int, seed: int = 0) -> torch.Tensor:
    """Seeded latents ``[B, frames, C, h, w]`` shaped like the DiT's output (unit variance)."""
    b, _, c, h, w = contract.input("latents").shape
    return torch.randn(b, frames, c, h, w, generator=torch.Generator().manual_seed(seed))


def run_onnxruntime_stream(session, contract: GraphContract, latents: torch.Tensor) -> list[dict[str, np.ndarray]]:
    """Free-running decode with an ONNX Runtime session: every step's outputs by name, its own
    caches fed back. ``latents`` ``[B, F, C, h, w]``, F a multiple of the step size."""
    t = contract.input("latents").shape[1]
    caches = {spec.name: spec.zeros().numpy() for spec in contract.inputs[2:]}
    present = contract.output_names[2:]
    steps = []
    for i in range(0, latents.shape[1], t):
        feeds = {"latents": latents[:, i:i + t].numpy(), "first_frame": np.array([i == 0]), **caches}
        outs = dict(zip(contract.output_names, session.run(contract.output_names, feeds), strict=True))
        caches = {spec.name: outs[name] for spec, name in zip(contract.inputs[2:], present, strict=True)}
        steps.append(outs)
    return steps


def validate_vae_graph(path: Path, module: WanStreamingDecoder, contract: GraphContract,
                       latent_frames: int = VALIDATION_LATENT_FRAMES, atol: float = PIXEL_ATOL,
                       rel_l2: float | None = None) -> dict:
    """ONNX Runtime (CPU, float32) free-running vs the eager module, step by step.

    Compares ``pixels`` (max abs error <= ``atol``), ``frames`` (uint8, at most one level where a
    value sits on a rounding boundary) and the final caches. With ``rel_l2`` (a decoder whose
    convolutions quantize their inputs: a value on a code boundary can round the other way), a
    step also passes when its pixels' relative L2 error is at most ``rel_l2``. Raises
    :class:`VAEMismatchError` listing every step over tolerance; returns the report.
    """
    import onnxruntime

    from memrope.export.validate import relative_l2

    check_module(module, contract)
    latents = validation_latents(contract, latent_frames)
    start = time.perf_counter()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_steps = run_onnxruntime_stream(session, contract, latents)
    t = module.latent_frames
    b, _, _, h, w = contract.input("latents").shape
    caches = module.zero_caches(b, h, w)
    rows, failures = [], []
    with torch.no_grad():
        for k, got in enumerate(ort_steps):
            out = module(latents[:, k * t:(k + 1) * t], torch.tensor([k == 0]), *caches)
            caches = list(out[2:])
            skip = padding_frames(module.config) if k == 0 else 0
            pixel_err = float(np.abs(out[1][:, :, skip:].numpy() - got["pixels"][:, :, skip:]).max())
            frame_err = int(np.abs(out[0][:, skip:].numpy().astype(np.int16)
                                   - got["frames"][:, skip:].astype(np.int16)).max())
            cache_err = max(float(np.abs(c.numpy() - got[name]).max())
                            for c, name in zip(caches, contract.output_names[2:], strict=True))
            relative = relative_l2(out[1][:, :, skip:].numpy(), got["pixels"][:, :, skip:])
            rows.append({"step": k, "first_frame": k == 0, "pixels_max_abs_error": pixel_err,
                         "pixels_relative_l2": relative, "frames_max_level_diff": frame_err,
                         "cache_max_abs_error": cache_err})
            exact = pixel_err <= atol and frame_err <= 1
            if not exact and (rel_l2 is None or not relative <= rel_l2):
                failures.append(f"step {k}: pixels max abs error {pixel_err:.3e} (atol {atol:.0e}), "
                                f"frames differ by up to {frame_err} levels"
                                + ("" if rel_l2 is None else f", relative L2 error {relative:.2e} > {rel_l2:.0e}"))
    report = {"atol": atol, "rel_l2": rel_l2, "latent_frames": latent_frames, "seconds": time.perf_counter() - start,
              "pixels_max_abs_error": max(r["pixels_max_abs_error"] for r in rows),
              "pixels_max_relative_l2": max(r["pixels_relative_l2"] for r in rows),
              "frames_max_level_diff": max(r["frames_max_level_diff"] for r in rows), "steps": rows}
    if failures:
        raise VAEMismatchError("ONNX Runtime disagrees with the eager VAE decoder on vae_decode.onnx:\n  "
                               + "\n  ".join(failures))
    return report
