"""Check an exported artifact against eager PyTorch with ONNX Runtime on CPU (fp32).

Owns: the validation rollout (the loop's real per-call inputs through fill, the first eviction
and the steady state), the re-cache rollout (the inputs of prompt switches with a re-cache in the
fill phase, with the window just full, and after the first eviction), a Polygraphy runner for the
eager graph, and the comparison report.
A mismatch raises :class:`ExportMismatchError` listing every call and output over tolerance.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from memrope.backend import Backend, StepModuleBackend
from memrope.config import RunConfig
from memrope.contract import ArtifactContract, GraphContract
from memrope.errors import StageError
from memrope.export.graph import RecacheGraph, StepGraph, TextGraph
from memrope.model import MemRoPEStep
from memrope.pipeline import MemRoPEPipeline, PromptChange
from memrope.sampler import StreamingSeededNoise

logger = logging.getLogger(__name__)

# Per call, an output may differ by this much times max(1, its largest eager magnitude): float32
# rounding grows with the values, and a trained model's flows reach tens where random weights'
# stay near 1 (the demo model's differ by 1.2e-5 at magnitudes around 20).
PER_CALL_ATOL = 1e-5
# Graphs that quantize activations (fp8, int8): per call and output, ONNX Runtime may round a value
# on a code boundary the other way from eager (their fp32 sums differ in the last bit), which moves
# that value by one code; such an output passes when its relative L2 error stays under this. The
# demo model's worst call: 6.3e-3 (fp8), 3.5e-3 (int8) (docs/quantization.md).
QDQ_RELATIVE_L2 = 1e-2


class ExportMismatchError(StageError):
    """ONNX Runtime and eager PyTorch disagree on an exported graph."""


def _eager_runner(module: torch.nn.Module, graph: GraphContract, name: str):
    from polygraphy.backend.base import BaseRunner

    class EagerRunner(BaseRunner):
        """A Polygraphy runner around an eager module with positional inputs in contract order."""

        def __init__(self):
            super().__init__(name=name, prefix="eager-runner")

        def activate_impl(self):
            pass

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata

            meta = TensorMetadata()
            for spec in graph.inputs:
                meta.add(spec.name, dtype=torch.empty((), dtype=spec.torch_dtype).numpy().dtype, shape=spec.shape)
            return meta

        def infer_impl(self, feed_dict):
            with torch.no_grad():
                args = [torch.from_numpy(np.ascontiguousarray(feed_dict[n])) for n in graph.input_names]
                start = time.perf_counter()
                outs = module(*args)
                self.inference_time = time.perf_counter() - start
            return OrderedDict((n, o.numpy()) for n, o in zip(graph.output_names, outs, strict=True))

        def deactivate_impl(self):
            pass

    return EagerRunner()


def rollout_feeds(step: MemRoPEStep, run: RunConfig, blocks: int) -> tuple[list[dict], list[str]]:
    """The step's named inputs (NumPy) for every call of ``blocks`` blocks of a seeded rollout,
    and a label per call (``block b call c (phase)``)."""
    cfg = step.config
    feeds: list[dict] = []
    eager = StepModuleBackend(step)

    class Recording(Backend):
        """The eager step, recording each call's inputs on the way through."""

        name, model, layout, dtype, device = "recording", cfg, eager.layout, eager.dtype, eager.device

        def encode_text(self, embeds):
            return eager.encode_text(embeds)

        def step(self, named):
            feeds.append({k: v.detach().clone().numpy() for k, v in named.items()})
            return eager.step(named)

    pipeline = MemRoPEPipeline(Recording(), run)
    noise = StreamingSeededNoise(run.seed, run.batch_size, pipeline.latent_frame_shape(), step.layout.block_frames)
    g = torch.Generator().manual_seed(run.seed + 4321)
    embeds = torch.randn(run.batch_size, cfg.text_len, cfg.text_dim, generator=g)
    labels = []
    for block in pipeline.blocks(embeds, noise, blocks):
        b, plan = block.index, block.plan
        phase = "fill" if not plan.roll else (f"roll, memory {plan.memory_step}" if step.layout.has_memory else "roll")
        labels += [f"block {b} call {c} ({phase})" for c in range(pipeline.schedule.num_steps + 1)]
    return feeds, labels


def recache_rollout_feeds(step: MemRoPEStep, run: RunConfig, blocks: int) -> tuple[list[dict], list[str]]:
    """The recache graph's named inputs (NumPy) at the prompt switches of a seeded eager rollout
    of ``blocks`` blocks, and a label per switch.

    Switches (to a second prompt) before block 2 (``all``: the sink too, while the window fills),
    before the first eviction (``recent``, the window exactly full, the memory slots holding
    frames) and after it (``recent``, the memory ready), where ``blocks`` reaches them."""
    cfg, lay = step.config, step.layout
    feeds: list[dict] = []
    eager = StepModuleBackend(step)

    class Recording(Backend):
        """The eager step and re-cache, recording each re-cache's inputs on the way through."""

        name, model, layout, dtype, device = "recording", cfg, eager.layout, eager.dtype, eager.device
        can_recache = True

        def encode_text(self, embeds):
            return eager.encode_text(embeds)

        def step(self, named):
            return eager.step(named)

        def recache(self, named, outputs):
            feeds.append({k: v.detach().clone().numpy() for k, v in named.items()})
            eager.recache(named, outputs)

    pipeline = MemRoPEPipeline(Recording(), run)
    noise = StreamingSeededNoise(run.seed, run.batch_size, pipeline.latent_frame_shape(), lay.block_frames)
    g = torch.Generator().manual_seed(run.seed + 4321)
    first, second = (torch.randn(run.batch_size, cfg.text_len, cfg.text_dim, generator=g) for _ in range(2))
    fill_blocks = lay.cache_frames // lay.block_frames
    points = {2: ("all", "fill"), fill_blocks: ("recent", "window full"),
              fill_blocks + 1: ("recent", "after the first eviction")}
    changes, labels = [], []
    for at, (mode, phase) in sorted(points.items()):
        if 0 < at < blocks and (mode == "recent" or lay.sink_frames % lay.block_frames == 0):
            changes.append(PromptChange(at, second if len(changes) % 2 == 0 else first, recache=mode))
            labels.append(f"switch before block {at} ({phase}, re-cache {mode})")
    for _ in pipeline.blocks(first, noise, blocks, prompt_changes=changes):
        pass
    if len(feeds) != len(labels):
        raise ExportMismatchError(f"the re-cache rollout made {len(feeds)} recache calls for {len(labels)} switches")
    return feeds, labels


def validation_blocks(step: MemRoPEStep) -> int:
    """Blocks that cover fill, the first eviction and two steady-state blocks."""
    lay = step.layout
    fill_blocks = lay.cache_frames // lay.block_frames
    return fill_blocks + 2 if lay.rolls else fill_blocks


def relative_l2(eager: np.ndarray, other: np.ndarray) -> float:
    """``||other - eager|| / ||eager||`` (0 for two zero tensors, inf when only ``eager`` is zero)."""
    diff = float(np.linalg.norm((other.astype(np.float64) - eager.astype(np.float64)).ravel()))
    norm = float(np.linalg.norm(eager.astype(np.float64).ravel()))
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


def _compare(runners, feeds: list[dict], labels: list[str], atol: float,
             rel_l2: float | None = None) -> tuple[list[dict], list[str]]:
    """Run ``runners`` (eager first) on ``feeds``; an output fails when its max abs error exceeds
    ``atol`` x max(1, max |eager|) and (with ``rel_l2``, for graphs that quantize activations: a value
    on a rounding boundary may round to the neighbouring code in one of them) its relative L2 error
    exceeds ``rel_l2`` too."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        results = Comparator.run(runners, data_loader=feeds)
    finally:
        G_LOGGER.module_severity = severity
    (_, eager_iters), (_, ort_iters) = results[0], results[1]
    rows, failures = [], []
    for label, eager, ort in zip(labels, eager_iters, ort_iters, strict=True):
        errors = {name: float("inf") if ort[name].shape != eager[name].shape else
                  float(np.max(np.abs(eager[name].astype(np.float64) - ort[name].astype(np.float64))))
                  if eager[name].size else 0.0 for name in eager}
        tolerances = {name: atol * max(1.0, float(np.max(np.abs(eager[name]))) if eager[name].size else 1.0)
                      for name in eager}
        relative = {name: relative_l2(eager[name], ort[name]) if ort[name].shape == eager[name].shape
                    else float("inf") for name in eager}
        worst = max(errors, key=errors.get)
        rows.append({"call": label, "max_abs_error": errors[worst], "worst_output": worst, "errors": errors,
                     "max_relative_l2": max(relative.values())})
        failures += [f"{label}: {name} max abs error {err:.3e} > {tolerances[name]:.1e} "
                     f"({atol:.0e} x max(1, max |eager|))"
                     + ("" if rel_l2 is None else f" and relative L2 error {relative[name]:.2e} > {rel_l2:.0e}")
                     for name, err in errors.items()
                     if not err <= tolerances[name] and (rel_l2 is None or not relative[name] <= rel_l2)]
        failures += [f"{label}: {name} shape {list(ort[name].shape)} != eager {list(eager[name].shape)}"
                     for name in eager if ort[name].shape != eager[name].shape]
    return rows, failures


def _exact_session(path: Path):
    """A loader of an ONNX Runtime CPU session of ``path`` that computes the graph as written: its
    Q/DQ fusions are off (they re-quantize activations for integer kernels, which is a speed-up
    with its own error, measured on its own, not the graph's meaning)."""
    import onnxruntime as ort

    def load():
        options = ort.SessionOptions()
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    return load


def validate_artifact_graphs(directory: Path, step: MemRoPEStep, text_graph: TextGraph,
                             contract: ArtifactContract, run: RunConfig, blocks: int | None = None,
                             atol: float = PER_CALL_ATOL, rel_l2: float | None = None) -> dict:
    """Compare ``step.onnx``, ``text.onnx`` and ``recache.onnx`` in ``directory`` against eager, call by
    call (the recache graph at the re-cache rollout's switches)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    blocks = validation_blocks(step) if blocks is None else blocks
    feeds, labels = rollout_feeds(step, run, blocks)
    step_graph = StepGraph(step, contract.step)
    step_rows, failures = _compare(
        [_eager_runner(step_graph, contract.step, "eager-step"),
         OnnxrtRunner(_exact_session(directory / "step.onnx"), name="onnxruntime-step")],
        feeds, labels, atol, rel_l2)
    g = torch.Generator().manual_seed(0)
    text_feed = [{"prompt_embeds": torch.randn(contract.text.inputs[0].shape, generator=g).numpy()}]
    text_rows, text_failures = _compare(
        [_eager_runner(text_graph, contract.text, "eager-text"),
         OnnxrtRunner(_exact_session(directory / "text.onnx"), name="onnxruntime-text")],
        text_feed, ["text"], atol, rel_l2)
    recache_feed, recache_labels = recache_rollout_feeds(step, run, blocks)
    recache_rows, recache_failures = [], []
    if recache_feed:
        recache_rows, recache_failures = _compare(
            [_eager_runner(RecacheGraph(step, contract.recache), contract.recache, "eager-recache"),
             OnnxrtRunner(_exact_session(directory / "recache.onnx"),
                          name="onnxruntime-recache")],
            recache_feed, recache_labels, atol, rel_l2)
    rows = step_rows + text_rows + recache_rows
    report = {"atol": atol, "rel_l2": rel_l2, "blocks": blocks, "calls": len(feeds),
              "max_abs_error": max(r["max_abs_error"] for r in rows),
              "max_relative_l2": max(r["max_relative_l2"] for r in rows),
              "step": step_rows, "text": text_rows, "recache": recache_rows}
    failures += text_failures + recache_failures
    if failures:
        listing = "\n  ".join(failures)
        raise ExportMismatchError(f"ONNX Runtime disagrees with eager PyTorch on {len(failures)} "
                                  f"output(s):\n  {listing}")
    return report
