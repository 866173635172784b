"""If and Scan, imported inline, against onnxruntime and ONNX's reference implementation (the conformance suite
adds ``test_if``, ``test_scan9_*``, the linear-attention and affine-grid function bodies)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import bmc.onnx_backend as backend
from bmc.errors import ModelError
from bmc.frontend.onnx import import_model


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _reference(model, feeds):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _scan_model():
    """A running sum over the time axis (axis 1) of x read backwards, plus each step's state times y's step slice,
    stacked along output axis 1 in reverse."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Mul", ["s_out", "y_t"], ["z_t"]),
         helper.make_node("Identity", ["s_out"], ["s_copy"])],
        "body", [_vi("s_in", [2]), _vi("x_t", [2]), _vi("y_t", [2])],
        [_vi("s_out", [2]), _vi("z_t", [2]), _vi("s_copy", [2])])
    scan = helper.make_node("Scan", ["s0", "x", "y"], ["s_final", "z", "states"], body=body, num_scan_inputs=2,
                            scan_input_axes=[1, 0], scan_input_directions=[1, 0], scan_output_axes=[1, 0],
                            scan_output_directions=[1, 0])
    return _model([scan], [_vi("s0", [2]), _vi("x", [2, 5]), _vi("y", [5, 2])],
                  [_vi("s_final", [2]), _vi("z", [2, 5]), _vi("states", [5, 2])])


def test_scan_unrolls_with_axes_and_directions():
    rng = np.random.default_rng(0)
    feeds = {"s0": rng.standard_normal(2).astype(np.float32), "x": rng.standard_normal((2, 5)).astype(np.float32),
             "y": rng.standard_normal((5, 2)).astype(np.float32)}
    model = _scan_model()
    got = backend.prepare(model).run(list(feeds.values()))
    import onnxruntime as ort  # (ONNX's reference implementation reads scan inputs forwards only)

    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    assert sum(n.op == "add" for n in import_model(model).nodes) == 5  # one body per step


def _if_model(cond_input: bool, else_shape=(3,)):
    """``If(c)``: then x + 1, else an else-branch of ``else_shape`` computed from x (a Gather the then branch lacks);
    the condition a graph input, or the constant ``true``."""
    then = helper.make_graph([helper.make_node("Add", ["x", "one"], ["t"])], "then", [], [_vi("t", [3])],
                             [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    idx = list(range(else_shape[0]))
    other = helper.make_graph([helper.make_node("Gather", ["x", "idx"], ["e"])], "else", [],
                              [_vi("e", list(else_shape))],
                              [helper.make_tensor("idx", TensorProto.INT64, [len(idx)], idx[::-1])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    inputs = [_vi("x", [3])]
    inits = []
    if cond_input:
        inputs.append(_vi("c", [], TensorProto.BOOL))
    else:
        inits.append(helper.make_tensor("c", TensorProto.BOOL, [], [True]))
    return _model(nodes, inputs, [_vi("y", None)], inits)


@pytest.mark.parametrize("cond", [True, False])
def test_if_with_a_run_time_condition_selects_between_both_branches(cond):
    model = _if_model(cond_input=True)
    x = np.array([1.0, 2.0, 3.0], np.float32)
    got = backend.prepare(model).run([x, np.array(cond)])
    np.testing.assert_array_equal(got[0], _reference(model, {"x": x, "c": np.array(cond)})[0])
    assert [n.op for n in import_model(model).nodes].count("where") == 1


def test_if_with_a_constant_condition_imports_the_branch_taken():
    graph = import_model(_if_model(cond_input=False, else_shape=(2,)))  # the else branch's type differs: unread
    assert [n.op for n in graph.nodes if n.op != "constant"] == ["add"]


def test_if_branches_of_different_types_need_a_constant_condition():
    with pytest.raises(ModelError, match=r"If output 0 is f32\[3\] in the then branch and f32\[2\] in the else") as e:
        import_model(_if_model(cond_input=True, else_shape=(2,)))
    assert "--input-shape" in e.value.fix



def test_loop_with_a_known_trip_count_unrolls():
    """``Loop`` whose trip count comes from a shape (known once the shapes are bound): a loop-carried sum of x
    scaled by the iteration number, and a scan output of every iteration's value; against ONNX's reference."""
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "i_f"], ["xi"]), helper.make_node("Add", ["acc_in", "xi"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["acc_out"], ["seen"])],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("acc_in", [3])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("acc_out", [3]), _vi("seen", [3])])
    nodes = [helper.make_node("Shape", ["steps"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["trips"], axis=0),
             helper.make_node("Loop", ["trips", "true", "acc0"], ["acc", "all"], body=body)]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("true", TensorProto.BOOL, [],
                                                                                        [True]),
             helper.make_tensor("acc0", TensorProto.FLOAT, [3], [0.5, 0.0, -1.0])]
    model = _model(nodes, [_vi("x", [3]), _vi("steps", [4])], [_vi("acc", [3]), _vi("all", [4, 3])], inits)
    feeds = {"x": np.array([1.0, 2.0, 3.0], np.float32), "steps": np.zeros(4, np.float32)}
    got = backend.prepare(model).run(list(feeds.values()))
    for g, w in zip(got, _reference(model, feeds)):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    with pytest.raises(ModelError, match="trip count or condition known only at run time"):
        import_model(_model([helper.make_node("Loop", ["n", "true", "acc0"], ["acc", "all"], body=body)],
                            [_vi("x", [3]), _vi("n", [], TensorProto.INT64)], [_vi("acc", [3]), _vi("all", None)],
                            inits[1:]))
