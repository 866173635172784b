"""ONNX functions: ops without a converter are inlined from their ONNX function body (schema functions of the
model's opset, and model-local functions), then checked against onnxruntime or ONNX's reference implementation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bmc.onnx_backend as backend
from bmc.errors import ModelError
from bmc.frontend.onnx import import_model


def _model(nodes, inputs, outputs, opset, functions=(), inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    return helper.make_model(graph, opset_imports=imports, functions=list(functions))


def _run_both(model, feeds):
    from onnx.reference import ReferenceEvaluator

    want = ReferenceEvaluator(model).run(None, feeds)
    got = backend.prepare(model).run(list(feeds.values()))
    return list(got), want


def test_model_local_function_is_inlined_with_attributes_and_defaults():
    """A model-local function (a custom domain, as exporters write modules kept as functions) with an attribute the
    node sets and one left to its default; two calls get separate internal tensors."""
    alpha = helper.make_node("Constant", [], ["alpha_t"])
    alpha.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name="alpha",
                                               type=onnx.AttributeProto.FLOAT))
    scaled_tanh = helper.make_function(
        "my.fns", "ScaledTanh", ["x"], ["y"],
        [alpha, helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Mul", ["t", "alpha_t"], ["y"])],
        opset_imports=[helper.make_opsetid("", 18)], attributes=[])
    scaled_tanh.attribute_proto.append(helper.make_attribute("alpha", 2.0))  # the default
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = _model([helper.make_node("ScaledTanh", ["x"], ["h"], domain="my.fns", alpha=0.5),
                    helper.make_node("ScaledTanh", ["h"], ["y"], domain="my.fns")],
                   [x], [y], 18, functions=[scaled_tanh])
    xv = np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3)
    import onnxruntime as ort

    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xv})
    got = backend.prepare(model).run([xv])
    np.testing.assert_allclose(want[0], 2.0 * np.tanh(0.5 * np.tanh(xv)), rtol=1e-6)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    graph = import_model(model)
    assert {n.source for n in graph.nodes} <= {"", "ScaledTanh_0", "ScaledTanh_1"}  # errors name the ONNX node


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_attention_op_matches_the_reference(mask):
    """ONNX ``Attention`` (opset 23; PyTorch's exporter writes SDPA as it) with grouped-query heads, a causal flag
    and the three mask kinds, against ONNX's reference implementation."""
    rng = np.random.default_rng(0)
    b, hq, hkv, s, d = 2, 4, 2, 5, 8
    feeds = {"Q": rng.standard_normal((b, hq, s, d)).astype(np.float32),
             "K": rng.standard_normal((b, hkv, s, d)).astype(np.float32),
             "V": rng.standard_normal((b, hkv, s, d)).astype(np.float32)}
    inputs = ["Q", "K", "V"]
    if mask == "bool":
        feeds["M"] = rng.random((s, s)) > 0.3
    elif mask == "float":
        feeds["M"] = np.where(rng.random((s, s)) > 0.3, 0.0, -np.inf).astype(np.float32)
    if mask:
        inputs.append("M")
        feeds["M"][:, 0] = True if mask == "bool" else 0.0  # every row keeps one key (no all-masked row here)
    vi = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
          for k, v in feeds.items()]
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [b, hq, s, d])
    node = helper.make_node("Attention", inputs, ["Y"], is_causal=int(mask is None))
    got, want = _run_both(_model([node], vi, [y], 23), feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_fully_masked_rows_give_zeros_not_nan():
    """The Attention body zeroes a row whose keys are all masked; it finds them with ReduceMax(bias) == -inf, which
    TVM's max (starting from the lowest finite float) used to miss."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("mx", "mn")]
    model = _model([helper.make_node("ReduceMax", ["x"], ["mx"], axes=[1], keepdims=0),
                    helper.make_node("ReduceMin", ["x"], ["mn"], axes=[1], keepdims=0)], [x], outs, 17)
    xv = np.array([[-np.inf] * 3, [np.inf, 1.0, np.inf]], np.float32)
    got, _ = _run_both(model, {"x": xv})
    np.testing.assert_array_equal(got[0], [-np.inf, np.inf])
    np.testing.assert_array_equal(got[1], [-np.inf, 1.0])


def test_body_with_an_unsupported_op_names_the_node_and_the_body_node():
    """A model-local function whose body (inside an If branch) holds a RoiAlign, which bmc does not support: the
    error names the node, the body node and the branch's node."""
    branch = helper.make_graph([helper.make_node("RoiAlign", ["x"], ["y_b"], name="the_roialign")], "branch", [],
                               [helper.make_tensor_value_info("y_b", TensorProto.FLOAT, None)])
    fn = helper.make_function("my.fns", "Spectrum", ["x"], ["y"], [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="choose")],
        opset_imports=[helper.make_opsetid("", 20)])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model([helper.make_node("Spectrum", ["x"], ["y"], domain="my.fns", name="spec_node")], [x], [y], 20,
                   functions=[fn])
    with pytest.raises(ModelError, match=r"ONNX node 'spec_node' \(Spectrum\), function body node .*\(If\).*"
                                         r"'the_roialign' \(RoiAlign\): op RoiAlign is not supported"):
        import_model(model)


def test_ops_without_converter_or_body_are_listed_in_one_error():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])
    model = _model([helper.make_node("Det", ["x"], ["d"]), helper.make_node("Custom", ["x"], ["y"], domain="acme")],
                   [x], [y], 18)
    with pytest.raises(ModelError, match=r"2 node\(s\) use 2 unsupported op\(s\)") as info:
        import_model(model)
    assert "Det ×1" in str(info.value) and "acme::Custom ×1" in str(info.value)
