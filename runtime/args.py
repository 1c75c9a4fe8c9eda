"""The command-line options shared by ``memrope generate``, ``export`` and ``serve``, and their
mapping onto a :class:`memrope.runtime.load.LoadRequest`.

Owns: the help formatter, the "model" and "execution" argument groups,
:func:`load_request`, the quiet setup of the libraries a command drives, and :func:`run_command`
(how every command line of the package ends: an exit code and, on failure, one line). Does not own the subcommands (``memrope.runtime.cli``,
``memrope.runtime.serve``) or what the options mean (``memrope.runtime.load``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from memrope.errors import Terminated, raise_terminated
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
            "calibration_blocks": args.calibration_blocks, "calibration_dtype": args.calibration_dtype}


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
    g.add_argument("--calibration-dtype", choices=("float32", "model"), default=None,
                   help="fp8/int8: what the calibration loop computes in (default float32: on a CPU many times "
                        "faster than bf16, with the same weights and ranges up to rounding; model: the --dtype)")


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


# Exceptions that mean "the input is wrong" (exit 2); everything else a run raises is a failure (exit 1).
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError, ImportError)


def run_command(prog: str, run: Callable[[], int], *, verbose: bool = False) -> int:
    """Run a command line's body and return its exit code: ``run()``'s, or 2 for bad input
    (:data:`INPUT_ERRORS`), 1 for any other failure, 130 for Ctrl-C and 143 for SIGTERM (which
    unwinds as Ctrl-C does, so the same clean-up runs; the previous handler is put back after).
    A failure prints ``{prog}: error: {one line}`` on stderr, the traceback only with ``verbose``.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        return run()
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"{prog}: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, INPUT_ERRORS) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def one_line(exc: BaseException) -> str:
    """The exception as one line: its message (or its type), with OSError's errno text and path."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{lines[0]} ({len(lines) - 1} more line(s) with -v)" if len(lines) > 4 else " | ".join(lines)
    return lines[0]
