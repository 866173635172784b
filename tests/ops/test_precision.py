"""``--dtype`` conversion (bmc.ops.precision): which values keep float32."""

import numpy as np
import pytest

from bmc.errors import UsageError
from bmc.ir.types import TensorType, np_dtype
from bmc.ops.builder import GraphBuilder
from bmc.ops.precision import convert_float32, residual_adds
from bmc.testing.reference import run_reference


def _block():
    """A pre-LN block and what is not a residual: h = x + W1 LN1(x) + b1; h2 = h + W2 LN2(h) (the chain: no norm
    reads h2); a masked softmax of h W3 (scores + mask); a rotary-like x*c + x*s (a lone add of activations); bias
    adds (activation + weight)."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("block")
    x = b.input("x", TensorType("float32", (4, 16)))
    mask = b.input("mask", TensorType("float32", (4, 16)))
    ones, zeros = np.ones(16, np.float32), np.zeros(16, np.float32)

    def ln(v, name):
        return b.emit1("layer_norm", [v, b.param(f"{name}_g", ones), b.param(f"{name}_b", zeros)])

    def w(name):
        return b.param(name, (0.25 * rng.standard_normal((16, 16))).astype(np.float32))

    y = b.emit1("add", [b.emit1("matmul", [ln(x, "ln1"), w("w1")]), b.param("b1", zeros)], "bias_add")
    h = b.emit1("add", [x, y], "residual")
    h2 = b.emit1("add", [h, b.emit1("matmul", [ln(h, "ln2"), w("w2")])], "residual2")
    s = b.emit1("softmax", [b.emit1("add", [b.emit1("matmul", [h, w("w3")]), mask], "masked")], "probs")
    c = b.constant(np.linspace(0, 1, 16, dtype=np.float32))
    rot = b.emit1("add", [b.emit1("mul", [x, c]), b.emit1("mul", [b.emit1("neg", [x]), c])], "rotary")
    return b.finish([h2, s, rot]), rng


def test_residual_stream_stays_float32():
    graph, rng = _block()
    residual = residual_adds(graph)
    assert {v.name for n in graph.nodes for v in n.outputs if id(v) in residual} == {"residual", "residual2"}
    low = convert_float32(graph, "bfloat16")
    dtypes = {v.name: v.type.dtype for n in low.nodes for v in n.outputs}
    assert dtypes["residual"] == dtypes["residual2"] == "float32"
    assert dtypes["bias_add"] == dtypes["masked"] == dtypes["rotary.bfloat16"] == "bfloat16"
    norms = [n for n in low.nodes if n.op == "layer_norm"]
    assert [(n.inputs[0].type.dtype, n.outputs[0].type.dtype) for n in norms] == [("bfloat16",) * 2, ("float32",) * 2]
    # the other readers of the stream take it rounded to bfloat16, one cast for all of them
    assert sum(n.op == "cast" and n.inputs[0].name == "residual" for n in low.nodes) == 1
    assert [v.type.dtype for v in low.outputs] == ["float32"] * 3
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32), "mask": np.zeros((4, 16), np.float32)}
    want, got = run_reference(graph, feeds), run_reference(low, feeds)
    for name in want:
        assert float(np.abs(got[name] - want[name]).max()) <= 1e-2 * float(np.abs(want[name]).max()), name


def test_inputs_and_outputs_named_by_dtype_io_are_passed_in_dtype():
    """``--dtype-io``: the named input enters in bfloat16 without a cast, the named outputs leave in bfloat16 (the
    residual one, computed in float32, rounded on its way out; the others made in bfloat16, not cast at all); the
    rest keeps float32, and the values stay within bfloat16's error of float32's."""
    graph, rng = _block()
    graph.output_names = ["out_h2", "out_probs", "out_rot"]
    low = convert_float32(graph, "bfloat16", ["x", "out_h2", "out_r*"])
    assert [(v.name, v.type.dtype) for v in low.inputs] == [("x", "bfloat16"), ("mask", "float32")]
    assert [v.type.dtype for v in low.outputs] == ["bfloat16", "float32", "bfloat16"]
    assert [v.name for v in low.outputs] == [v.name for v in graph.outputs]
    assert not any(n.op == "cast" and n.inputs[0] is low.inputs[0] and n.attrs["dtype"] == "bfloat16"
                   for n in low.nodes)
    assert low.outputs[0].producer.op == "cast" and low.outputs[2].producer.op == "add"
    x = rng.standard_normal((4, 16)).astype(np.float32)
    want = run_reference(graph, {"x": x, "mask": np.zeros((4, 16), np.float32)})
    got = run_reference(low, {"x": x.astype(np_dtype("bfloat16")), "mask": np.zeros((4, 16), np.float32)})
    for name in want:
        err = np.abs(np.asarray(got[name], np.float32) - want[name]).max()
        assert float(err) <= 1e-2 * float(np.abs(want[name]).max()), name


@pytest.mark.parametrize("dtype, io, match", [
    ("float32", ["x"], "--dtype is float32"),
    ("bfloat16", ["y"], "matches no float32 input or output"),
    ("bfloat16", ["residul2"], "did you mean .residual2."),
])
def test_bad_dtype_io(dtype, io, match):
    graph, _ = _block()
    with pytest.raises(UsageError, match=match) as info:
        convert_float32(graph, dtype, io)
    assert info.value.where == "--dtype-io"
