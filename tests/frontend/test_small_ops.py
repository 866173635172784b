"""Pad's ``wrap`` mode (a periodic extension, also wider than the axis) against numpy's, ReduceMax/ReduceMin over
an empty set (their identities, folded at compile time), a ``Where`` whose constant condition picks one side
everywhere (no ``where`` left), and MaxPool's Indices output against ONNX's reference, through
``bmc.onnx_backend`` and the importer."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import bmc.onnx_backend as backend
from bmc.errors import ModelError
from bmc.frontend.onnx import import_model


def _model(nodes, x, inits, opset=21, elem=TensorProto.FLOAT):
    return helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", elem, list(x.shape))],
        [helper.make_tensor_value_info("y", elem, None)], inits), opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("pads", [(1, 2, 0, 3), (0, 7, 4, 0), (5, 0, 0, 11)])  # [x1_begin, x2_begin, x1_end, x2_end]
def test_wrap_pad_matches_numpy(pads):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    model = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap")], x,
                   [helper.make_tensor("pads", TensorProto.INT64, [4], list(pads))])
    got = backend.prepare(model).run([x])[0]
    np.testing.assert_array_equal(got, np.pad(x, ((pads[0], pads[2]), (pads[1], pads[3])), mode="wrap"))


def test_wrap_pad_with_negative_pads_is_a_clear_error():
    x = np.zeros((3, 4), np.float32)
    model = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap")], x,
                   [helper.make_tensor("pads", TensorProto.INT64, [4], [-1, 0, 0, 0])])
    with pytest.raises(ModelError, match="negative pads"):
        backend.prepare(model).run([x])


@pytest.mark.parametrize("op, elem, dtype, fill", [
    ("ReduceMax", TensorProto.FLOAT, np.float32, -np.inf), ("ReduceMin", TensorProto.FLOAT, np.float32, np.inf),
    ("ReduceMax", TensorProto.INT32, np.int32, np.iinfo(np.int32).min),
    ("ReduceMin", TensorProto.BOOL, np.bool_, True)])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_max_and_min_of_an_empty_set_are_their_identities(op, elem, dtype, fill, keepdims):
    x = np.zeros((2, 0, 3), dtype)
    model = _model([helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)], x,
                   [helper.make_tensor("axes", TensorProto.INT64, [1], [1])], elem=elem)
    got = backend.prepare(model).run([x])[0]
    np.testing.assert_array_equal(got, np.full((2, 1, 3) if keepdims else (2, 3), fill, dtype))


@pytest.mark.parametrize("cond, picked", [([False, False], "b"), ([True, True], "a"), ([True, False], None)])
def test_where_with_a_constant_one_sided_condition_is_that_side(cond, picked):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 2])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Where", ["c", "a", "b"], ["y"])], "g", [a, b],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("c", TensorProto.BOOL, [2], cond)]), opset_imports=[helper.make_opsetid("", 17)])
    graph = import_model(model)
    assert ("where" in graph.op_counts()) == (picked is None)
    x, z = np.ones((3, 2), np.float32), np.zeros((3, 2), np.float32)
    np.testing.assert_array_equal(backend.prepare(model).run([x, z])[0], np.where(cond, x, z))


@pytest.mark.parametrize("storage_order", [0, 1])
@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[2, 3, 2], strides=[1, 2, 1], pads=[0, 1, 1, 1, 0, 1], dilations=[1, 1, 2]),
    dict(kernel_shape=[3, 2, 2], strides=[2, 2, 2], ceil_mode=1),
])
def test_max_pool_indices_match_the_onnx_reference(attrs, storage_order):
    """MaxPool's second output (flat indices of the maxima, row- or column-major spatial dims) in 3-D, with pads,
    dilations and ceil_mode, equals ONNX's reference implementation."""
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(7).permutation(2 * 3 * 5 * 6 * 5).astype(np.float32).reshape(2, 3, 5, 6, 5)  # no ties
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y", "i"], storage_order=storage_order, **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("i", TensorProto.INT64, None)]), opset_imports=[helper.make_opsetid("", 12)])
    want = ReferenceEvaluator(model).run(None, {"x": x})
    got = backend.prepare(model).run([x])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("equation, shapes, matmuls", [
    ("bhlk,bhtk->bhlt", [(2, 3, 5, 4), (2, 3, 6, 4)], 1),  # CvT's attention scores
    ("bhlt,bhtv->bhlv", [(2, 3, 5, 6), (2, 3, 6, 4)], 1),
    ("bij,bjk->bki", [(2, 3, 4), (2, 4, 5)], 1),  # the output transposed
    ("bij,xjk->bxik", [(2, 3, 4), (1, 4, 5)], 1),  # an output index of each operand's batch
    ("bhij,bjk->bhik", [(2, 1, 3, 4), (2, 4, 5)], 1),
    ("...ij,...jk->...ik", [(2, 3, 4, 5), (3, 5, 2)], 1),  # ellipsis, broadcast batch
    ("aij,jk->ik", [(3, 2, 4), (4, 5)], 1),  # 'a' summed in the first operand alone
    ("ijk,jkl->il", [(2, 3, 4), (3, 4, 5)], 1),  # two contracted indices flattened
    ("ij,j->i", [(3, 4), (4,)], 1),
    ("i,i->", [(4,), (4,)], 1),
    ("ij,kl->ijkl", [(2, 3), (4, 5)], 0),  # nothing contracted: products
])
def test_two_operand_einsum_is_one_matmul(equation, shapes, matmuls):
    """A contraction of two operands becomes one batched matmul (so attention written with einsum fuses, and no
    [.., M, N, K] product is materialized), equal to numpy's einsum; an outer product stays elementwise."""
    from onnx import numpy_helper

    rng = np.random.default_rng(1)
    x = rng.standard_normal(shapes[0]).astype(np.float32)
    w = rng.standard_normal(shapes[1]).astype(np.float32)
    model = _model([helper.make_node("Einsum", ["x", "w"], ["y"], equation=equation)], x,
                   [numpy_helper.from_array(w, "w")], opset=12)
    assert import_model(model).op_counts().get("matmul", 0) == matmuls
    np.testing.assert_allclose(backend.prepare(model).run([x])[0], np.einsum(equation, x, w), rtol=1e-5, atol=1e-5)


def test_negative_constant_pads_crop():
    """ONNX Pad's negative pads remove elements (RWKV's time shift, ``ZeroPad2d((0, 0, 1, -1))``): a slice, then the
    positive pads."""
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    pads = [0, 1, -1, 0, -1, 2]  # [begins..., ends...]
    model = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="constant")], x,
                   [helper.make_tensor("pads", TensorProto.INT64, [6], pads)])
    got = backend.prepare(model).run([x])[0]
    np.testing.assert_array_equal(got, np.pad(x[:, :-1, 1:], ((0, 0), (1, 0), (0, 2))))


@pytest.mark.parametrize("dtype, elem", [(np.uint8, TensorProto.UINT8), (np.int8, TensorProto.INT8),
                                         (np.int16, TensorProto.INT16)])
def test_integer_max_pool_is_exact(dtype, elem):
    """MaxPool of 8/16-bit integers (an int8 CNN's) runs through float32 on the CPU, which holds every value
    exactly: equal to numpy's, extremes and padded borders included."""
    info = np.iinfo(dtype)
    x = np.random.default_rng(0).integers(info.min, info.max + 1, size=(2, 3, 9, 10)).astype(dtype)
    x[0, 0, :2, :2] = info.min  # a window of minima at the padded corner: the padding must not win
    x[1, 2, -1, -1] = info.max
    model = _model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                     pads=[1, 1, 1, 1])], x, [], elem=elem)
    got = backend.prepare(model).run([x])[0]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=info.min)
    ref = np.stack([padded[:, :, i:i + 9:2, j:j + 10:2] for i in range(3) for j in range(3)]).max(axis=0)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, ref)
