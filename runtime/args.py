"""The command-line options shared by ``memrope generate``, ``export`` and ``serve``, and their
mapping onto a :class:`memrope.runtime.load.LoadRequest`.

Owns: the help formatter, the "model" and "execution" argument groups,
:func:`load_request`, and the quiet setup of the libraries a command drives. Does not own the subcommands (``memrope.runtime.cli``,
``memrope.runtime.serve``) or what the options mean (``memrope.runtime.load``).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path

from memrope.runtime.load import BACKENDS, DTYPES, PRESETS, LoadRequest


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Show each option's default (when it has a value to show); keep descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction))
        if "%(default)" in text or flag or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Where the DiT comes from."""
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", type=Path,
                     help="DiT weights: Self-Forcing/LongLive .pt, a Wan2.1 .safetensors or a Wan2.1 folder")
    src.add_argument("--model-config", type=Path, help="Wan config.json (default: the checkpoint folder's)")
    src.add_argument("--preset", choices=PRESETS,
                     help="architecture preset; without --checkpoint the weights are RANDOM, except 'tiny' with "
                          "text or video: the embedded demo model, trained on a toy world of moving shapes")
    src.add_argument("--lora", type=Path, help="LongLive LoRA .pt merged into the weights at load")
    src.add_argument("--use-ema", dest="use_ema", action="store_true", default=None,
                     help="load generator_ema (default: the YAML's use_ema)")
    src.add_argument("--no-use-ema", dest="use_ema", action="store_false", help="load generator (not the EMA)")


def add_execution_args(p: argparse.ArgumentParser) -> None:
    """What runs the DiT (shared by ``generate`` and ``serve``)."""
    ex = p.add_argument_group("execution")
    ex.add_argument("--backend", choices=BACKENDS, default="eager",
                    help="what runs the DiT: PyTorch eager or compiled, or an exported --engine")
    ex.add_argument("--engine", type=Path,
                    help="artifact directory from `memrope export` (onnxruntime; tensorrt after `memrope build`)")
    ex.add_argument("--verify-artifact", action="store_true",
                    help="hash every file of --engine before the run starts (default: each graph is hashed as "
                         "it loads, its external weights in the background, and a mismatch stops the run)")
    ex.add_argument("--ort-provider", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto",
                    help="ONNX Runtime execution provider (auto: CUDA with onnxruntime-gpu and a GPU, else CPU)")
    ex.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ex.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                    help="model dtype (exported backends run their artifact's dtype)")


def quantize_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`memrope.runtime.api.export_model` that the quantization options set."""
    return {"quantize": args.quantize, "calibration_prompts": args.calibration_prompts,
            "calibration_blocks": args.calibration_blocks}


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    """``memrope export``'s quantization options (``memrope.export.quantize``)."""
    from memrope.export.quantize import MODES

    g = p.add_argument_group("quantization (NVIDIA ModelOpt; pip install -e '.[quantize]')")
    g.add_argument("--quantize", choices=tuple(MODES),
                   help="quantize the attention and FFN Linear layers, with explicit Q/DQ in the graphs: "
                        "fp8 (weights and activations; Ada, Blackwell), int8 (weights and activations), "
                        "int8-wo or int4-wo (weights only; Ampere on); --dtype is what stays unquantized")
    g.add_argument("--calibration-prompts", type=Path, metavar="FILE",
                   help="fp8/int8 calibration prompts, one per line (default: 8 built-in prompts; the demo world's "
                        "for the embedded demo); weight-only modes need none")
    g.add_argument("--calibration-blocks", type=int, metavar="N",
                   help="fp8/int8: blocks of the loop per calibration prompt (default: until the first eviction, "
                        "plus 2)")


def load_request(args: argparse.Namespace, **overrides) -> LoadRequest:
    """The :class:`LoadRequest` of a parsed command line: every option named like a request field
    is taken (options a subcommand lacks keep the field's default); ``overrides`` win."""
    values = {f.name: getattr(args, f.name) for f in fields(LoadRequest) if hasattr(args, f.name)}
    return LoadRequest(**{**values, **overrides})


def quiet_third_party() -> None:
    """Progress bars and deprecation chatter of libraries we drive are noise on a CLI."""
    import os
    import warnings

    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import torch

    torch._logging.set_logs(onnx=logging.ERROR)  # "torchvision is not installed" at every export
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
