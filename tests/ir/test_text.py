"""IR text form: golden text, print → parse → print round-trips, and the verifier catches broken graphs."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bmc.errors import InternalError
from bmc.ir import Node, TensorType, Value, parse_graph, print_graph, verify
from bmc.ops import infer_types
from bmc.ops.builder import GraphBuilder

GOLDEN = """\
graph @main(%x: f32[2,3]) params(%w: f32[3,4]) {
  %1 = matmul(%x, %w) : f32[2,4]  # "MatMul_0"
  %2 = constant() {value = tensor<f32[4]>[1.5, 2.0, 3.0, 4.0]} : f32[4]  # "Add_1"
  %"y out" = add(%1, %2) : f32[2,4]  # "Add_1"
  %3, %4 = split(%"y out") {axis = 1, sizes = [1, 3]} : f32[2,1], f32[2,3]
  %5 = reduce_sum(%4) {axes = none, keepdims = false} : f32[]
  return %3, %5
}
"""


def build_sample():
    b = GraphBuilder()
    x = b.input("x", TensorType("float32", (2, 3)))
    w = b.param("w", np.ones((3, 4), np.float32))
    b.source = "MatMul_0"
    y = b.emit1("matmul", [x, w])
    b.source = "Add_1"
    y = b.emit1("add", [y, b.constant(np.array([1.5, 2, 3, 4], np.float32))], "y out")
    b.source = ""
    a, c = b.emit("split", [y], axis=1, sizes=[1, 3])
    return b.finish([a, b.emit1("reduce_sum", [c], axes=None, keepdims=False)])


def test_golden_text():
    assert print_graph(build_sample()) == GOLDEN


def test_parse_round_trip_and_verify():
    g = parse_graph(GOLDEN)
    verify(g, infer_types)
    assert print_graph(g) == GOLDEN
    assert [n.source for n in g.nodes][:3] == ["MatMul_0", "Add_1", "Add_1"]


def test_verifier_reports_use_before_definition_and_wrong_types():
    g = build_sample()
    g.nodes[0], g.nodes[2] = g.nodes[2], g.nodes[0]
    with pytest.raises(InternalError, match="before it is defined"):
        verify(g)
    g = build_sample()
    g.nodes[0].outputs[0].type = TensorType("float32", (2, 5))
    with pytest.raises(InternalError, match="op infers"):
        verify(g, infer_types)


def test_verifier_catches_duplicate_definitions_and_missing_weights():
    g = build_sample()
    g.nodes.append(Node("neg", [g.inputs[0]], [g.nodes[0].outputs[0]]))
    del g.weights["w"]
    with pytest.raises(InternalError) as e:
        verify(g)
    assert "defined twice" in str(e.value) and "no weight data" in str(e.value)


_dims = st.lists(st.integers(1, 4), min_size=0, max_size=3)
_names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(shape=_dims, name=_names, values=st.lists(st.floats(allow_nan=True, width=32), min_size=1, max_size=4),
       axis=st.integers(-1, 0))
def test_round_trip_random_graphs(shape, name, values, axis):
    b = GraphBuilder()
    x = b.input(name, TensorType("float32", tuple(shape)))
    c = b.constant(np.array(values, np.float32))
    y = b.emit1("neg", [x], name + "'\"")
    z = b.emit1("reduce_max", [y], axes=(axis,) if shape else None, keepdims=True)
    g = b.finish([z, c])
    text = print_graph(g)
    assert print_graph(parse_graph(text)) == text
    parsed = parse_graph(text)
    np.testing.assert_array_equal(parsed.nodes[0].attrs["value"], np.array(values, np.float32))


def test_value_types_are_validated():
    with pytest.raises(ValueError, match="unknown dtype"):
        TensorType("complex64", (2,))
    with pytest.raises(ValueError, match="more than the limit"):
        TensorType("float32", (2**30, 2**30, 2))
    assert str(Value("a", TensorType("bfloat16", ()))) == "%a: bf16[]"
