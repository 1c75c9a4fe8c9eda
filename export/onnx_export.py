"""Export an artifact directory: the step, text and recache graphs, their contract, config and checks.

Owns: ``export_artifact`` and the directory it writes:

    step.onnx [+ step.onnx.data]   one DiT call, explicit cache I/O (opset 23, static shapes)
    text.onnx [+ text.onnx.data]   prompt embeddings -> per-layer cross-attention keys/values
    recache.onnx [+ .data]         a prompt switch: the cache's tail re-encoded from clean latents
    vae_decode.onnx                (with a VAE) one streaming VAE decode step, explicit feature cache
    contract.json                  every input/output name, shape, dtype; cache layout; hash
    config.json                    model, cache, sampler configs and their hash
    versions.json                  the packages that produced it
    audit.json                     the TensorRT 10.15 parser audit of each graph
    validation.json                ONNX Runtime (CPU, fp32) vs eager, per call and output

It is written into a hidden sibling directory and renamed into place only after every check
passed, so a failed export leaves nothing that looks valid.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memrope.artifact import CONFIG_FILE, CONTRACT_FILE, STEP_FILE, graph_file, pin_files, specialise_run
from memrope.cache import CacheControls, CacheLayout
from memrope.config import RunConfig
from memrope.contract import ArtifactContract, GraphContract, build_contract
from memrope.export.graph import RecacheGraph, StepGraph, TextGraph
from memrope.export.torch_onnx import export_graph, param_bytes
from memrope.io import clean_leftovers, partial_path
from memrope.model import MemRoPEStep, WanCausalDiT

logger = logging.getLogger(__name__)

@dataclass
class ExportResult:
    path: Path
    contract: ArtifactContract
    seconds: float
    files: dict[str, int]
    step_nodes: int
    audit: dict
    validation: dict

    def summary(self) -> str:
        """One line: what was written, how big, and what was checked."""
        sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in self.files.items()
                          if name.endswith((".onnx", ".data")))
        check = self.validation.get("skipped") or f"max abs error vs eager {self.validation['max_abs_error']:.2e}"
        if self.validation.get("rel_l2") is not None:
            check += (f" (quantized activations round differently at code boundaries: worst relative L2 error "
                      f"{self.validation['max_relative_l2']:.1e}, bound {self.validation['rel_l2']:.0e})")
        if "vae_decode" in self.validation:
            check += f"; vae_decode pixels {self.validation['vae_decode']['pixels_max_abs_error']:.2e}"
        quantized = ""
        if self.contract.quantization is not None:
            q = self.contract.quantization
            calibrated = f"calibration {q['calibration_sha256'][:12]}" if q["calibration_sha256"] else "weight-only"
            convs = f", {q['vae']['quantized_convs']} VAE convolutions" if q.get("vae") else ""
            quantized = (f"; quantized {q['mode']} ({q['quantized_layers']} Linear layers{convs}, ModelOpt "
                         f"{q['modelopt']}, {calibrated})")
        return (f"wrote {self.path} in {self.seconds:.1f} s: step graph {self.step_nodes} nodes; {sizes}; "
                f"TensorRT audit passed; validation: {check}{quantized}")


def example_inputs(graph: GraphContract, layout: CacheLayout) -> tuple[torch.Tensor, ...]:
    """Valid-looking inputs of ``graph`` in contract order, for tracing (values do not shape the
    graph).

    Float tensors are stride-0 expanded zeros: at 1.3B / 832x480 the cache alone would
    otherwise allocate 6.9 GB (fp32) just to be traced."""
    named = CacheControls.allocate(layout).as_dict()

    def example(spec):
        if spec.name in named and tuple(named[spec.name].shape) == spec.shape:
            return named[spec.name]
        return torch.zeros((1,) * len(spec.shape), dtype=spec.torch_dtype).expand(spec.shape)

    return tuple(example(t) for t in graph.inputs)


def example_step_inputs(contract: ArtifactContract, layout: CacheLayout) -> tuple[torch.Tensor, ...]:
    return example_inputs(contract.step, layout)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "onnx", "onnxruntime", "onnxscript", "polygraphy", "memrope-engine"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def check_export_target(out_dir: str | os.PathLike[str], force: bool) -> None:
    """Refuse an ``out_dir`` the export must not replace: anything that exists without ``force``,
    and with it a file, or a non-empty folder that is not an artifact (no ``contract.json``):
    replacing deletes the folder, and it may hold someone's work."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not force:
        raise ValueError(f"{out_dir} already exists; pass --force to replace it")
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not an artifact directory; --force replaces artifacts only")
    if any(out_dir.iterdir()) and not (out_dir / CONTRACT_FILE).is_file():
        raise ValueError(f"{out_dir} is not an artifact (no {CONTRACT_FILE}) and is not empty; --force replaces "
                         "artifacts only, it will not delete this folder: choose another --out")


def export_artifact(dit: WanCausalDiT, run: RunConfig, out_dir: str | os.PathLike[str], *,
                    height: int, width: int, batch: int = 1, validate: bool = True,
                    force: bool = False, validation_blocks: int | None = None,
                    validation_atol: float | None = None, vae=None, quantize: str | None = None,
                    calibration=None) -> ExportResult:
    """Export ``dit`` (already in the export dtype, on CPU) for ``run`` at ``height`` x ``width``;
    with ``vae`` (a ``memrope.vae.WanStreamingDecoder`` in the same dtype) also ``vae_decode.onnx``.

    ``quantize`` (a mode of :data:`memrope.export.quantize.MODES`) quantizes the DiT's attention
    and FFN Linear layers **in place** with ModelOpt, calibrated by driving the eager block loop
    over ``calibration`` (a :class:`memrope.export.quantize.Calibration`; weight-only modes need
    none), and the graphs carry explicit Q/DQ; ``fp8`` also quantizes ``vae``'s convolutions in
    place, calibrated on that loop's latents. The contract records the mode, the ModelOpt version
    and the calibration hash.

    Raises:
        ValueError: bad resolution/batch, or ``out_dir`` exists and ``force`` is False, or it is
            not an artifact (:func:`check_export_target`).
        ExportError: the exporter failed or the graph does not honour the contract.
        TensorRTAuditError: a graph uses something TensorRT 10.15's parser does not support.
        ExportMismatchError: ONNX Runtime disagrees with eager PyTorch (fp32 exports).
        QuantizationError: ``quantize`` without calibration data, or ModelOpt is missing.
    """
    from memrope.export.audit import audit_onnx

    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_export_target(out_dir, force)
    model_cfg = dit.config
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dit.dtype)
    if dtype_name is None:
        raise ValueError(f"cannot export a model in {dit.dtype}")
    run = specialise_run(run, model_cfg, height, width, batch)
    layout = CacheLayout.for_run(model_cfg, run)
    step = MemRoPEStep(dit, layout, run.latent_height, run.latent_width).eval()
    quantization, translations = None, None
    if quantize is not None:
        from memrope.export.quantize import (
            calibration_loop,
            quantize_dit,
            quantize_vae,
            translation_table,
            vae_calibration_loop,
        )

        loop = None if calibration is None else calibration_loop(step, run, calibration)
        record = quantize_dit(dit, quantize, loop, calibration)
        if vae is not None and calibration is not None:  # the latents of the DiT's calibration run
            record.vae = quantize_vae(vae, quantize, vae_calibration_loop(vae, calibration.latents), calibration.dtype)
        quantization = record.to_json()
        translations = translation_table()
    contract = build_contract(model_cfg, run, layout, dtype_name, batch, height, width,
                              vae=None if vae is None else vae.config, quantization=quantization)
    step_graph = StepGraph(step, contract.step).eval()
    text_graph = TextGraph(dit).eval()
    recache_graph = RecacheGraph(step, contract.recache).eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir.parent)
    tmp = partial_path(out_dir)
    tmp.mkdir()
    try:
        with torch.no_grad():
            logger.info("exporting the step graph (%s, %dx%d, batch %d)", dtype_name, height, width, batch)
            export_graph(step_graph, example_step_inputs(contract, layout), tmp / STEP_FILE,
                          contract.step.input_names, contract.step.output_names, param_bytes(dit), translations)
            logger.info("exporting the text graph")
            export_graph(text_graph, (contract.text.inputs[0].zeros(),), tmp / graph_file("text"),
                          contract.text.input_names, contract.text.output_names, param_bytes(dit), translations)
            logger.info("exporting the recache graph (%d tail frames)", layout.tail_frames)
            export_graph(recache_graph, example_inputs(contract.recache, layout), tmp / graph_file("recache"),
                          contract.recache.input_names, contract.recache.output_names, param_bytes(dit),
                          translations)
        if quantization is not None and quantization["int4_block_size"]:
            from memrope.export.quantize import pack_int4_weights

            for graph in ("step", "text", "recache"):
                pack_int4_weights(tmp / graph_file(graph))
        if vae is not None:
            from memrope.export.vae_export import export_vae_graph

            export_vae_graph(vae, contract.graphs["vae_decode"], tmp / graph_file("vae_decode"), translations)

        audits = {}
        for graph in contract.graphs:
            name = graph_file(graph)
            report = audit_onnx(tmp / name, expect_dtype=dtype_name)
            audits[name] = report.to_json()
            report.raise_if_failed()
        (tmp / "audit.json").write_text(json.dumps(audits, indent=1) + "\n")

        validation = {"skipped": "validation disabled (--no-validate)"}
        if validate and dtype_name != "float32":
            validation = {"skipped": f"ONNX Runtime on CPU has no {dtype_name} kernels; validate the "
                                     "float32 export of the same config"}
        elif validate:
            from memrope.export.validate import PER_CALL_ATOL, QDQ_RELATIVE_L2, validate_artifact_graphs

            quantized_activations = quantization is not None and quantization["activations"] is not None
            validation = validate_artifact_graphs(
                tmp, step, text_graph, contract, run, blocks=validation_blocks,
                atol=PER_CALL_ATOL if validation_atol is None else validation_atol,
                rel_l2=QDQ_RELATIVE_L2 if quantized_activations else None)
            if vae is not None:
                from memrope.export.vae_export import validate_vae_graph

                vae_quantized = quantization is not None and "vae" in quantization
                validation["vae_decode"] = validate_vae_graph(tmp / graph_file("vae_decode"), vae,
                                                              contract.graphs["vae_decode"],
                                                              rel_l2=QDQ_RELATIVE_L2 if vae_quantized else None)
        (tmp / "validation.json").write_text(json.dumps(validation, indent=1) + "\n")

        contract.write(tmp / CONTRACT_FILE, files=pin_files(tmp))
        (tmp / CONFIG_FILE).write_text(json.dumps(
            {"config_hash": contract.config_hash, "model": asdict(model_cfg), "run": run.to_dict(),
             **({} if vae is None else {"vae": vae.config.to_dict()}),
             **({} if quantization is None else {"quantization": quantization})},
            indent=1, default=str) + "\n")
        (tmp / "versions.json").write_text(json.dumps(_versions(), indent=1) + "\n")

        if out_dir.exists():
            trash = partial_path(out_dir, "old")
            out_dir.rename(trash)
            tmp.rename(out_dir)
            shutil.rmtree(trash)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    import onnx

    step_nodes = len(onnx.load(str(out_dir / STEP_FILE), load_external_data=False).graph.node)
    return ExportResult(out_dir, contract, time.perf_counter() - start, files, step_nodes, audits, validation)
