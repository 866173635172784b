"""RNN, GRU and LSTM (unrolled over their static length) against onnxruntime (ONNX's reference for the batch-first
layout), in forms the conformance cases do not
cover: GRU's ``linear_before_reset``, both directions with biases and initial states, LSTM's cell clip and
peepholes, the batch-first layout; and the refusal of shorter ``sequence_lens``."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import bmc.onnx_backend as backend
from bmc.errors import ModelError
from bmc.frontend.onnx import import_model

SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6


def _model(kind, attrs, layout=0, lengths=None):
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    rng = np.random.default_rng(len(kind) + len(attrs))
    arrays = {"W": rng.standard_normal((dirs, gates * HIDDEN, INPUT)), "R": rng.standard_normal((dirs, gates * HIDDEN,
                                                                                              HIDDEN)) * 0.5,
              "B": rng.standard_normal((dirs, 2 * gates * HIDDEN)),
              "h0": rng.standard_normal((BATCH, dirs, HIDDEN) if layout else (dirs, BATCH, HIDDEN))}
    names = ["X", "W", "R", "B", "lens", "h0"]
    if kind == "LSTM":
        arrays["c0"] = rng.standard_normal(arrays["h0"].shape)
        arrays["P"] = rng.standard_normal((dirs, 3 * HIDDEN))
        names += ["c0", "P"]
    inits = [helper.make_tensor(k, TensorProto.FLOAT, v.shape, v.astype(np.float32).reshape(-1)) for k, v in
             arrays.items()]
    inits.append(helper.make_tensor("lens", TensorProto.INT32, [BATCH], lengths or [SEQ] * BATCH))
    outs = ["Y", "Y_h"] + (["Y_c"] if kind == "LSTM" else [])
    node = helper.make_node(kind, names, outs, hidden_size=HIDDEN, layout=layout, **attrs)
    x_shape = [BATCH, SEQ, INPUT] if layout else [SEQ, BATCH, INPUT]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), x_shape


@pytest.mark.parametrize("kind, attrs, layout", [
    ("GRU", {"linear_before_reset": 1, "direction": "bidirectional"}, 0),
    ("GRU", {"direction": "reverse"}, 1),
    ("LSTM", {"clip": 1.5, "direction": "bidirectional"}, 0),
    ("RNN", {"activations": ["Relu", "Tanh"], "direction": "bidirectional"}, 0),
    ("LSTM", {"direction": "reverse"}, 1),
])
def test_recurrent_layers_match_onnxruntime(kind, attrs, layout):
    """(onnxruntime refuses the batch-first layout: ONNX's reference implementation checks those.)"""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    model, x_shape = _model(kind, attrs, layout)
    x = np.random.default_rng(9).standard_normal(x_shape).astype(np.float32)
    if layout:
        want = ReferenceEvaluator(model).run(None, {"X": x})
    else:
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})
    got = backend.prepare(model).run([x])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_shorter_sequences_are_refused():
    model, _ = _model("GRU", {}, lengths=[SEQ, SEQ - 2, SEQ])
    with pytest.raises(ModelError, match=r"sequence_lens \[5, 3, 5\] shorter than the 5 steps"):
        import_model(model)


def test_gru_slices_its_hidden_weight_once():
    """GRU's candidate product ``(r * h) R_h`` reads R_h sliced once per direction, not once per step (a step's
    slice copied the H x H weight: 100 steps of 256 ran 2.7x slower)."""
    model, _ = _model("GRU", {"direction": "reverse"})
    graph = import_model(model)
    matmul_weights = {n.inputs[1].name for n in graph.nodes if n.op == "matmul" and n.inputs[0].type.rank == 2}
    assert len(matmul_weights) == 2  # R's every gate (hr) and R_h, each the same value at every step
