"""The fast pre-check at export: audit ONNX graphs against TensorRT 10.15's parser table.

Owns: the transcribed support table (``export/data/tensorrt_10_15_onnx_ops.tsv``, from the
TensorRT 10.15 revision of onnx/onnx-tensorrt ``docs/operators.md``), its loader
:func:`load_trt_support_table`, and :func:`audit_onnx`, the static checks every export runs in
milliseconds before it writes anything: opset range, no custom domains or local functions,
supported ops, per-op dtypes, no complex tensors, fully static shapes, the restrictions that can
be checked without running anything, and (for a strongly typed bf16/fp16 export) that the heavy
compute and the weights are in the low-precision dtype.

The audit works by path and never loads external weights, so it is safe on > 2 GB models. It is
necessary, not sufficient: a table cannot know which kernels a builder has (it passed fp32
attention that no fused kernel covers). The authoritative check is a real parse and build of
every exported graph by TensorRT-RTX's builder (``memrope build --target rtx``, no GPU needed),
which the test suite runs on every CI pass; running the plans needs a GPU.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

log = logging.getLogger(__name__)

TABLE_FILE = "tensorrt_10_15_onnx_ops.tsv"
OPSET_MIN, OPSET_MAX = 9, 24  # TensorRT 10.15: "inclusive range of opset 9 to opset 24"
KNOWN_TYPES = frozenset({"FP32", "FP16", "BF16", "FP8", "FP4", "INT4", "INT8", "INT32", "INT64",
                         "UINT8", "BOOL"})
DEFAULT_DOMAINS = ("", "ai.onnx")

T = TensorProto
# ONNX elem type -> the table's type name; anything else keeps its ONNX name (never in the table).
_TYPE_NAMES = {T.FLOAT: "FP32", T.FLOAT16: "FP16", T.BFLOAT16: "BF16", T.INT32: "INT32",
               T.INT64: "INT64", T.INT8: "INT8", T.UINT8: "UINT8", T.BOOL: "BOOL",
               T.FLOAT8E4M3FN: "FP8", T.INT4: "INT4", T.FLOAT4E2M1: "FP4"}
_FLOATS = {T.FLOAT, T.FLOAT16, T.BFLOAT16, T.DOUBLE}
_COMPLEX = {T.COMPLEX64, T.COMPLEX128}
_BITS = {T.FLOAT: 32, T.UINT8: 8, T.INT8: 8, T.UINT16: 16, T.INT16: 16, T.INT32: 32, T.INT64: 64,
         T.BOOL: 8, T.FLOAT16: 16, T.DOUBLE: 64, T.UINT32: 32, T.UINT64: 64, T.COMPLEX64: 64,
         T.COMPLEX128: 128, T.BFLOAT16: 16, T.FLOAT8E4M3FN: 8, T.FLOAT8E4M3FNUZ: 8,
         T.FLOAT8E5M2: 8, T.FLOAT8E5M2FNUZ: 8, T.UINT4: 4, T.INT4: 4, T.FLOAT4E2M1: 4}
_EXPECT = {"bfloat16": T.BFLOAT16, "float16": T.FLOAT16}
_LOW_PRECISION_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (0, 1), "Attention": (0, 1, 2)}
_BIG_WEIGHT = 65536  # float initializers above this many elements count as "the weights"

_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")
_BOOL_OUT = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
             "IsNaN", "IsInf")
_ALL = range(64)
# Inputs whose types the ONNX spec fixes (indices, shapes, axes, masks): not checked against the
# op's type list. Range: every input shares the output's type, so only the output is checked.
_CONTROL_INPUTS: dict[str, Any] = {
    "Where": (0,), "Attention": (3,), "Gather": (1,), "GatherElements": (1,), "GatherND": (1,),
    "ScatterND": (1,), "ScatterElements": (1,), "Scatter": (1,), "Slice": (1, 2, 3, 4),
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Unsqueeze": (1,), "Squeeze": (1,),
    "Split": (1,), "ConstantOfShape": (0,), "Pad": (1, 2, 3), "TopK": (1,), "CumSum": (1,),
    "Range": _ALL, "Trilu": (1,), "OneHot": (0, 1), "Resize": (1, 2, 3),
    "RotaryEmbedding": (3,), "TensorScatter": (2,), "Dropout": (1, 2),
    # Q/DQ: the table's types are those of input 0 (the tensor quantized or dequantized); the scale,
    # zero point and output are checked in _restrictions.
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2),
    **dict.fromkeys(_REDUCE, (1,))}
# Outputs whose types the spec fixes (BOOL results, INT64 shapes and indices).
_CONTROL_OUTPUTS: dict[str, Any] = {"Shape": _ALL, "Size": _ALL, "NonZero": _ALL, "TopK": (1,),
                                    "QuantizeLinear": _ALL, "DequantizeLinear": _ALL,
                                    **dict.fromkeys(_BOOL_OUT, _ALL)}
_QUANTIZED = {T.INT8, T.FLOAT8E4M3FN, T.INT4, T.FLOAT4E2M1}  # what TensorRT's Q/DQ quantize to
# Inputs TensorRT needs as build-time constants (initializer or Constant node).
_CONST_INPUTS = {"Squeeze": 1, "Unsqueeze": 1, "CumSum": 1, "OneHot": 1,
                 **dict.fromkeys(_REDUCE, 1)}


class TensorRTAuditError(ValueError):
    """An ONNX graph fails the TensorRT 10.15 readiness audit."""


@dataclass(frozen=True)
class OpSupport:
    """One row of the TensorRT 10.15 ONNX parser table."""

    op: str
    supported: bool
    types: frozenset[str]
    restrictions: str = ""


@dataclass
class AuditReport:
    """What :func:`audit_onnx` found; ``ok`` is true when there are no problems."""

    path: str
    opset: int = 0
    node_count: int = 0
    initializer_bytes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    dtypes_by_op: dict[str, list[str]] = field(default_factory=dict)
    fp32_islands: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "opset": self.opset,
                "node_count": self.node_count, "initializer_bytes": self.initializer_bytes,
                "op_counts": dict(self.op_counts),
                "dtypes_by_op": {k: list(v) for k, v in self.dtypes_by_op.items()},
                "fp32_islands": dict(self.fp32_islands), "problems": list(self.problems)}

    def raise_if_failed(self, max_lines: int = 50) -> None:
        if self.ok:
            return
        lines = self.problems[:max_lines]
        if len(self.problems) > max_lines:
            lines.append(f"... and {len(self.problems) - max_lines} more")
        raise TensorRTAuditError(f"{self.path}: {len(self.problems)} TensorRT 10.15 readiness "
                                 "problem(s):\n  " + "\n  ".join(lines))


@lru_cache(maxsize=1)
def _table() -> Mapping[str, OpSupport]:
    text = resources.files(__package__ or "export").joinpath("data", TABLE_FILE).read_text("utf-8")
    table: dict[str, OpSupport] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        op, supported, types, restrictions = (line.split("\t") + ["", "", ""])[:4]
        type_set = frozenset(t.strip() for t in types.split(",") if t.strip())
        if supported not in ("Y", "N") or not type_set <= KNOWN_TYPES or op in table:
            raise ValueError(f"{TABLE_FILE}:{lineno}: malformed row {line!r}")
        table[op] = OpSupport(op, supported == "Y", type_set, restrictions.strip())
    return table


def load_trt_support_table() -> dict[str, OpSupport]:
    """The TensorRT 10.15 ONNX parser table: op name -> :class:`OpSupport`."""
    return dict(_table())


def type_name(elem_type: int) -> str:
    """The table's name for an ONNX elem type (ONNX's own name when the table has none)."""
    return _TYPE_NAMES.get(elem_type) or T.DataType.Name(elem_type)


@dataclass(frozen=True)
class _Tensor:
    elem_type: int  # 0: unknown
    dims: tuple[int | str | None, ...] | None  # None: unknown rank; str: dim_param

    @classmethod
    def of(cls, tp: onnx.TypeProto) -> _Tensor:
        if not tp.HasField("tensor_type"):
            return cls(0, None)
        tt = tp.tensor_type
        dims = None if not tt.HasField("shape") else tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        return cls(tt.elem_type, dims)


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _all_graphs(sub)


def _label(node: NodeProto) -> str:
    return f"{node.op_type} node '{node.name or (node.output[0] if node.output else '?')}'"


def _attr(node: NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _nbytes(init: TensorProto) -> int:
    return math.ceil(math.prod(init.dims) * _BITS.get(init.data_type, 0) / 8)


class _Auditor:
    def __init__(self, model: ModelProto, report: AuditReport, expect: int | None) -> None:
        self.model, self.report, self.expect = model, report, expect
        self.table = _table()
        self.problems = report.problems
        self.dtypes: dict[str, set[str]] = {}
        self.fp32_tensors: set[str] = set()
        self.fp32_casts: list[str] = []

    def run(self) -> None:
        self._check_model_header()
        self._graph(self.model.graph, ChainMap(), ChainMap())
        self.report.dtypes_by_op = {op: sorted(s) for op, s in sorted(self.dtypes.items())}
        if self.expect is not None:
            self.report.fp32_islands = {"float32_tensors": len(self.fp32_tensors),
                                        "casts_to_float32": self.fp32_casts}

    def _check_model_header(self) -> None:
        m, rep = self.model, self.report
        for imp in m.opset_import:
            if imp.domain not in DEFAULT_DOMAINS:
                self.problems.append(f"custom opset domain '{imp.domain}' (version {imp.version})")
            else:
                rep.opset = int(imp.version)
        if not OPSET_MIN <= rep.opset <= OPSET_MAX:
            self.problems.append(f"default-domain opset {rep.opset} outside TensorRT 10.15's "
                                 f"{OPSET_MIN}..{OPSET_MAX}")
        for fn in m.functions:
            self.problems.append(f"ONNX local function '{fn.domain}::{fn.name}' left in the model "
                                 "(inline it)")

    def _graph(self, g: GraphProto, outer_types: ChainMap, outer_consts: ChainMap) -> None:
        types = outer_types.new_child()
        consts = outer_consts.new_child({i.name: True for i in g.initializer})
        for vi in [*g.input, *g.output, *g.value_info]:
            types[vi.name] = _Tensor.of(vi.type)
            self._check_static(vi.name, types[vi.name])
        for init in g.initializer:
            types[init.name] = _Tensor(init.data_type, tuple(init.dims))
            self.report.initializer_bytes += _nbytes(init)
            if self.expect is not None and init.data_type in _FLOATS \
                    and init.data_type != self.expect and math.prod(init.dims) > _BIG_WEIGHT:
                self.problems.append(f"weight '{init.name}' ({math.prod(init.dims)} elements) is "
                                     f"{type_name(init.data_type)}, expected "
                                     f"{type_name(self.expect)}")
        for name, t in types.maps[0].items():
            if t.elem_type in _COMPLEX:
                self.problems.append(f"tensor '{name}' is {type_name(t.elem_type)}: TensorRT has "
                                     "no complex types")
            elif t.elem_type == T.DOUBLE:
                self.problems.append(f"tensor '{name}' is DOUBLE (TensorRT casts it to FLOAT)")
            elif t.elem_type == T.FLOAT:
                self.fp32_tensors.add(name)
        for node in g.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                consts[node.output[0]] = True
            self._node(node, types, consts)
            for sub in _subgraphs(node):
                self._graph(sub, types, consts)

    def _check_static(self, name: str, t: _Tensor) -> None:
        if t.dims is None:
            self.problems.append(f"tensor '{name}' has no static shape (unknown rank)")
        elif not all(isinstance(d, int) and d > 0 for d in t.dims):
            shown = ["?" if d is None else d for d in t.dims]
            self.problems.append(f"tensor '{name}' has a non-static shape {shown}")

    def _node(self, node: NodeProto, types: ChainMap, consts: ChainMap) -> None:
        op, label = node.op_type, _label(node)
        self.report.node_count += 1
        self.report.op_counts[op] = self.report.op_counts.get(op, 0) + 1
        if node.domain not in DEFAULT_DOMAINS:
            self.problems.append(f"{label} is in custom domain '{node.domain}'")
            return
        support = self.table.get(op)
        if support is None or not support.supported:
            self.problems.append(f"{label}: op {op} is not supported by the TensorRT 10.15 parser"
                                 + ("" if support else " (not in the table)"))
            return
        if op == "Cast" and _attr(node, "to", 0) == T.FLOAT:
            self.fp32_casts.append(node.name or node.output[0])
        skip_in = _CONTROL_INPUTS.get(op, ())
        skip_out = _CONTROL_OUTPUTS.get(op, ())
        checked = [("input", i, n) for i, n in enumerate(node.input) if n and i not in skip_in]
        checked += [("output", i, n) for i, n in enumerate(node.output) if n and i not in skip_out]
        for kind, i, name in checked:
            t = types.get(name)
            if t is None or t.elem_type == 0:
                self.problems.append(f"{label}: no type information for tensor '{name}'")
                continue
            dtype = type_name(t.elem_type)
            self.dtypes.setdefault(op, set()).add(dtype)
            if dtype not in support.types and t.elem_type not in _COMPLEX | {T.DOUBLE}:
                self.problems.append(f"{label}: {kind} {i} '{name}' is {dtype}, not in TensorRT's "
                                     f"{op} types {sorted(support.types)}")
        self._restrictions(node, label, types, consts)
        if self.expect is not None:
            for i in _LOW_PRECISION_INPUTS.get(op, ()):
                t = types.get(node.input[i]) if i < len(node.input) and node.input[i] else None
                if t is not None and t.elem_type and t.elem_type != self.expect:
                    self.problems.append(f"{label}: input {i} '{node.input[i]}' is "
                                         f"{type_name(t.elem_type)}, expected "
                                         f"{type_name(self.expect)} (strongly typed export)")

    def _restrictions(self, node: NodeProto, label: str, types: ChainMap, consts: ChainMap) -> None:
        op, ins, outs = node.op_type, list(node.input), list(node.output)
        bad = self.problems.append

        def rank(i: int) -> int | None:
            t = types.get(ins[i]) if i < len(ins) and ins[i] else None
            return None if t is None or t.dims is None else len(t.dims)

        if op in _CONST_INPUTS:
            i = _CONST_INPUTS[op]
            if i < len(ins) and ins[i] and ins[i] not in consts:
                bad(f"{label}: input {i} '{ins[i]}' must be an initializer or Constant "
                    "(TensorRT needs it at build time)")
        if op in ("QuantizeLinear", "DequantizeLinear"):
            for i in (1, 2):
                if i < len(ins) and ins[i] and ins[i] not in consts:
                    bad(f"{label}: input {i} '{ins[i]}' (scale/zero point) must be an initializer or Constant")
            scale = types.get(ins[1]) if len(ins) > 1 else None
            if scale is not None and scale.elem_type not in (T.FLOAT, T.FLOAT16, T.BFLOAT16):
                bad(f"{label}: scale '{ins[1]}' is {type_name(scale.elem_type)}, expected FP32, FP16 or BF16")
            low = types.get(outs[0] if op == "QuantizeLinear" else ins[0])
            if low is not None and low.elem_type not in _QUANTIZED:
                bad(f"{label}: quantizes to {type_name(low.elem_type)}, not one of TensorRT's INT8, FP8, INT4, FP4")
        if op == "Attention":
            for i in range(min(4, len(ins))):
                if ins[i] and rank(i) != 4:
                    bad(f"{label}: input {i} '{ins[i]}' must be 4D (rank {rank(i)})")
            for i in range(4, len(ins)):
                if ins[i]:
                    bad(f"{label}: input {i} '{ins[i]}' (past_key/past_value/nonpad_kv_seqlen) "
                        "is unsupported")
            if _attr(node, "qk_matmul_output_mode", 0) != 0 or _attr(node, "softcap", 0.0) != 0:
                bad(f"{label}: qk_matmul_output_mode and softcap are unsupported")
        if op in ("Attention", "LayerNormalization"):
            for i in range(1, len(outs)):
                if outs[i]:
                    bad(f"{label}: output {i} '{outs[i]}' is unsupported (only output 0)")
        if op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
            bad(f"{label}: reduction must be 'none'")
        if op == "TopK" and _attr(node, "sorted", 1) != 1:
            bad(f"{label}: sorted must be 1")
        if op == "TensorScatter":
            if rank(0) != 4 or rank(1) != 4:
                bad(f"{label}: past_cache and update must be 4D")
            if _attr(node, "axis", -2) != -2:
                bad(f"{label}: axis must be -2")
        if op == "RotaryEmbedding" and len(ins) > 3 and ins[3]:
            t = types.get(ins[3])
            if t is None or t.elem_type != T.INT64:
                bad(f"{label}: position_ids must be INT64")


def _load_inferred(path: str, problems: list[str]) -> ModelProto:
    """The model with inferred value_info, loaded without external data."""
    with tempfile.TemporaryDirectory(prefix="trt_audit_") as tmp:
        out = os.path.join(tmp, "inferred.onnx")
        try:
            onnx.shape_inference.infer_shapes_path(path, out, data_prop=True)
            return onnx.load(out, load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - reported as a problem, audit goes on
            problems.append(f"ONNX shape inference failed: {exc}")
            return onnx.load(path, load_external_data=False)


def audit_onnx(path: str | os.PathLike, *, expect_dtype: str | None = None) -> AuditReport:
    """Audit the ONNX model at ``path`` against TensorRT 10.15's parser support table.

    ``expect_dtype`` ``"bfloat16"``/``"float16"`` also checks a strongly typed low-precision
    export (MatMul/Gemm/Conv/Attention data inputs and big float weights in that dtype) and
    reports the deliberate fp32 islands; ``None``/``"float32"`` skips those checks.
    """
    if expect_dtype not in (None, "float32", *_EXPECT):
        raise ValueError(f"expect_dtype must be None, 'float32', 'bfloat16' or 'float16', "
                         f"not {expect_dtype!r}")
    path = os.fspath(path)
    report = AuditReport(path=path)
    model = _load_inferred(path, report.problems)
    _Auditor(model, report, _EXPECT.get(expect_dtype or "")).run()
    log.info("TensorRT audit of %s: %d nodes, opset %d, %d problem(s)", path, report.node_count,
             report.opset, len(report.problems))
    return report
