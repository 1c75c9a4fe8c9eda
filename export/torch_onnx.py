"""One ``torch.nn.Module`` call to one ONNX file: the exporter settings every graph of an
artifact shares (opset, external weights) and the check of its I/O names.

Owns: :func:`export_graph`, :func:`param_bytes`, :class:`ExportError`. Used by the DiT graphs
(:mod:`memrope.export.onnx_export`) and the VAE graph (:mod:`memrope.export.vae_export`); it
knows neither.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memrope.errors import StageError

OPSET = 23
PROTOBUF_LIMIT_BYTES = 2 * 1024 ** 3


class ExportError(StageError):
    """The exporter failed or produced a graph that does not honour the contract."""


def export_graph(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
                 output_names: list[str], weight_bytes: int, translations: dict | None = None) -> None:
    """``module(*args)`` as ONNX at ``path`` (torch's dynamo exporter, opset 23, weights in an
    external ``.data`` file past protobuf's 2 GB limit), its I/O names checked against the
    contract's and the model checked by path. ``translations``: torch.onnx's custom translation
    table for custom ops (a quantized export's Q/DQ). Raises :class:`ExportError`."""
    external = weight_bytes > PROTOBUF_LIMIT_BYTES * 0.9
    try:
        torch.onnx.export(module, args, str(path), dynamo=True, opset_version=OPSET,
                          input_names=input_names, output_names=output_names,
                          external_data=external, optimize=True, verbose=False,
                          custom_translation_table=translations)
    except Exception as exc:  # the exporter raises many types; report them as one stage failure
        raise ExportError(f"torch.onnx.export failed for {path.name}: {exc}") from exc
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != input_names or got_out != output_names:
        raise ExportError(f"{path.name}: exported names differ from the contract\n"
                          f"  inputs  {got_in}\n  expected {input_names}\n"
                          f"  outputs {got_out}\n  expected {output_names}")
    # By path: a >2 GB model cannot be checked as an in-memory proto.
    onnx.checker.check_model(str(path))


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (a quantized layer's weights are buffers)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
