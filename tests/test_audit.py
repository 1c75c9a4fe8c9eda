"""The TensorRT 10.15 readiness audit (memrope.export.audit) on small hand-built ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from memrope.export.audit import (
    TensorRTAuditError,
    audit_onnx,
    load_trt_support_table,
)

F, BF = TP.FLOAT, TP.BFLOAT16


def _vi(name, elem=F, shape=(1, 2, 4, 8)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _save(tmp_path, nodes, inputs, outputs, inits=(), opset=23, name="m.onnx", domains=(),
          **save_kw):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=imports)
    path = tmp_path / name
    onnx.save_model(model, str(path), **save_kw)
    return path


def _weight(name, shape, elem=F):
    dtype = {F: np.float32, TP.FLOAT16: np.float16}[elem]
    return numpy_helper.from_array(np.zeros(shape, dtype=dtype), name)  # raw_data: externalisable


def _problems_with(report, text):
    return [p for p in report.problems if text in p]


def _clean_attention_nodes():
    return [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
            helper.make_node("Softmax", ["xw"], ["q"], axis=-1, name="sm"),
            helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], name="attn")]


def _clean_attention_io():
    return ([_vi("x"), _vi("k"), _vi("v"), _vi("mask", TP.BOOL, (1, 1, 4, 4))], [_vi("y")],
            [_weight("w", (8, 8))])


def test_table_loads_and_has_the_ops_we_rely_on():
    table = load_trt_support_table()
    assert len(table) > 150
    attention = table["Attention"]
    assert (attention.op, attention.supported) == ("Attention", True)
    assert attention.types == frozenset({"FP32", "FP16", "BF16", "INT8", "FP8"})
    assert "4D" in attention.restrictions
    assert {"BF16", "FP32"} <= table["MatMul"].types
    assert not table["Unique"].supported and not table["DFT"].supported
    assert table["Cast"].types >= {"BOOL", "INT64", "UINT8"}


def test_clean_fp32_attention_graph_passes(tmp_path):
    inputs, outputs, inits = _clean_attention_io()
    report = audit_onnx(_save(tmp_path, _clean_attention_nodes(), inputs, outputs, inits))
    assert report.ok, report.problems
    report.raise_if_failed()
    assert report.opset == 23 and report.node_count == 3
    assert report.op_counts == {"MatMul": 1, "Softmax": 1, "Attention": 1}
    assert report.dtypes_by_op["Attention"] == ["FP32"]  # the bool mask is a control input
    assert report.initializer_bytes == 8 * 8 * 4
    assert report.fp32_islands == {}
    js = report.to_json()
    assert js["ok"] is True and js["op_counts"]["MatMul"] == 1


def test_custom_domain_node_fails(tmp_path):
    nodes = [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")]
    report = audit_onnx(_save(tmp_path, nodes, [_vi("x")], [_vi("y")], domains=["com.example"]))
    assert not report.ok
    assert _problems_with(report, "custom opset domain 'com.example'")
    assert _problems_with(report, "custom domain 'com.example'")
    with pytest.raises(TensorRTAuditError, match="FancyOp"):
        report.raise_if_failed()


@pytest.mark.parametrize("op", ["Unique", "DFT"])
def test_unsupported_op_fails(tmp_path, op):
    if op == "Unique":
        nodes = [helper.make_node("Unique", ["x"], ["y"], name="u")]
        io = ([_vi("x", F, (6,))], [_vi("y", F, (6,))])
    else:
        nodes = [helper.make_node("DFT", ["x"], ["y"], name="dft")]
        io = ([_vi("x", F, (1, 8, 1))], [_vi("y", F, (1, 8, 2))])
    report = audit_onnx(_save(tmp_path, nodes, *io))
    assert _problems_with(report, f"op {op} is not supported")


def test_double_tensors_fail(tmp_path):
    nodes = [helper.make_node("Add", ["x", "x"], ["y"], name="add")]
    report = audit_onnx(_save(tmp_path, nodes, [_vi("x", TP.DOUBLE)], [_vi("y", TP.DOUBLE)]))
    assert _problems_with(report, "is DOUBLE (TensorRT casts it to FLOAT)")
    assert report.dtypes_by_op["Add"] == ["DOUBLE"]


def test_dynamic_input_dim_fails(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    report = audit_onnx(_save(tmp_path, nodes, [_vi("x", F, ("batch", 8))], [_vi("y", F, (2, 8))]))
    assert _problems_with(report, "tensor 'x' has a non-static shape ['batch', 8]")


def test_complex_initializer_fails(tmp_path):
    c = numpy_helper.from_array(np.ones((2, 2), dtype=np.complex64), "c")
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    report = audit_onnx(_save(tmp_path, nodes, [_vi("x", F, (2, 2))], [_vi("y", F, (2, 2))], [c]))
    assert _problems_with(report, "tensor 'c' is COMPLEX64")


def test_attention_present_key_output_fails(tmp_path):
    nodes = [helper.make_node("Attention", ["q", "k", "v"], ["y", "present_key"], name="attn")]
    report = audit_onnx(_save(tmp_path, nodes, [_vi("q"), _vi("k"), _vi("v")],
                              [_vi("y"), _vi("present_key")]))
    assert _problems_with(report, "output 1 'present_key' is unsupported")


def test_attention_3d_and_past_key_fail(tmp_path):
    nodes = [helper.make_node("Attention", ["q", "k", "v", "", "past"], ["y"], name="attn",
                              q_num_heads=2, kv_num_heads=2)]
    q3 = _vi("q", F, (1, 4, 16))
    report = audit_onnx(_save(tmp_path, nodes, [q3, _vi("k", F, (1, 4, 16)),
                                                _vi("v", F, (1, 4, 16)), _vi("past")],
                              [_vi("y", F, (1, 4, 16))]))
    assert _problems_with(report, "input 0 'q' must be 4D")
    assert _problems_with(report, "input 4 'past'")


def test_reduce_axes_from_a_node_fail(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["shp"], start=0, end=1, name="shape"),
             helper.make_node("Sub", ["shp", "one"], ["axes"], name="sub"),
             helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1, name="rm")]
    one = numpy_helper.from_array(np.array([1], dtype=np.int64), "one")
    report = audit_onnx(_save(tmp_path, nodes, [_vi("x", F, (2, 8))], [_vi("y", F, (2, 1))],
                              [one]))
    assert _problems_with(report, "ReduceMean node 'rm': input 1 'axes' must be an initializer")


def test_reduce_axes_from_constant_pass(tmp_path):
    axes = helper.make_tensor("axes_val", TP.INT64, [1], [1])
    nodes = [helper.make_node("Constant", [], ["axes"], value=axes, name="c"),
             helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1, name="rm")]
    report = audit_onnx(_save(tmp_path, nodes, [_vi("x", F, (2, 8))], [_vi("y", F, (2, 1))]))
    assert report.ok, report.problems


def test_opset_25_fails(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    report = audit_onnx(_save(tmp_path, nodes, [_vi("x")], [_vi("y")], opset=25))
    assert report.opset == 25
    assert _problems_with(report, "opset 25 outside")


def test_bf16_expectation_rejects_fp32_matmul(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    w = _weight("w", (512, 256))  # > 65536 elements: a "weight"
    report = audit_onnx(_save(tmp_path, nodes, [_vi("x", F, (4, 512))], [_vi("y", F, (4, 256))],
                              [w]), expect_dtype="bfloat16")
    assert _problems_with(report, "MatMul node 'mm': input 0 'x' is FP32, expected BF16")
    assert _problems_with(report, "weight 'w' (131072 elements) is FP32, expected BF16")
    assert audit_onnx(tmp_path / "m.onnx").ok  # fine as an fp32 export


def test_bf16_matmul_with_fp32_island_passes(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Cast", ["h"], ["h32"], to=F, name="to_fp32"),
             helper.make_node("Softmax", ["h32"], ["p32"], axis=-1, name="sm"),
             helper.make_node("Cast", ["p32"], ["y"], to=BF, name="to_bf16")]
    w = helper.make_tensor("w", BF, [512, 256], np.zeros(512 * 256, dtype=np.uint16).tobytes(),
                           raw=True)
    report = audit_onnx(_save(tmp_path, nodes, [_vi("x", BF, (4, 512))], [_vi("y", BF, (4, 256))],
                              [w]), expect_dtype="bfloat16")
    assert report.ok, report.problems
    assert report.fp32_islands == {"float32_tensors": 2, "casts_to_float32": ["to_fp32"]}
    assert report.initializer_bytes == 512 * 256 * 2
    assert report.dtypes_by_op["MatMul"] == ["BF16"]


def test_external_data_audited_by_path(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Cast", ["b"], ["b32"], to=F, name="cast_b"),
             helper.make_node("Add", ["h", "b32"], ["y"], name="add")]
    inits = [_weight("w", (64, 32)), _weight("b", (32,), TP.FLOAT16)]
    path = _save(tmp_path, nodes, [_vi("x", F, (2, 64))], [_vi("y", F, (2, 32))], inits,
                 save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
                 size_threshold=0)
    assert (tmp_path / "m.data").stat().st_size >= 64 * 32 * 4
    stored = onnx.load(str(path), load_external_data=False).graph.initializer
    assert all(t.data_location == TP.EXTERNAL and not t.raw_data for t in stored)
    report = audit_onnx(path)
    assert report.ok, report.problems
    assert report.initializer_bytes == 64 * 32 * 4 + 32 * 2
    (tmp_path / "m.data").rename(tmp_path / "elsewhere.data")  # the audit never reads weights
    assert audit_onnx(path).to_json() == report.to_json()


def test_subgraphs_are_audited(tmp_path):
    def branch(op, name):
        return helper.make_graph([helper.make_node(op, ["x"], [name], name=f"{name}_node")], name,
                                 [], [_vi(name, F, (6,))])

    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("Relu", "t"),
                              else_branch=branch("Unique", "e"))]
    report = audit_onnx(_save(tmp_path, nodes, [_vi("cond", TP.BOOL, ()), _vi("x", F, (6,))],
                              [_vi("y", F, (6,))]))
    assert report.op_counts == {"If": 1, "Relu": 1, "Unique": 1}
    assert report.problems == ["Unique node 'e_node': op Unique is not supported by the "
                               "TensorRT 10.15 parser"]


def test_problem_listing_is_capped(tmp_path):
    nodes = [helper.make_node("Unique", [f"x{i}"], [f"y{i}"], name=f"u{i}") for i in range(60)]
    report = audit_onnx(_save(tmp_path, nodes, [_vi(f"x{i}", F, (3,)) for i in range(60)],
                              [_vi(f"y{i}", F, (3,)) for i in range(60)]))
    with pytest.raises(TensorRTAuditError) as err:
        report.raise_if_failed()
    assert "and 10 more" in str(err.value)
    assert str(err.value).count("not supported") == 50


def test_bad_expect_dtype_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="expect_dtype"):
        audit_onnx(tmp_path / "missing.onnx", expect_dtype="int8")


def test_torch_dynamo_export_audits_clean(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(approximate="tanh"),
                                torch.nn.LayerNorm(16)).eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (torch.randn(2, 8),), str(path), dynamo=True, opset_version=23)
    report = audit_onnx(path)
    assert report.ok, report.problems
    assert report.opset == 23
    assert {"Gelu", "LayerNormalization"} <= set(report.op_counts)
