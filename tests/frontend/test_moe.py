"""onnxruntime's ``com.microsoft::MoE`` (a mixture-of-experts layer, as onnxruntime-genai writes them) against
onnxruntime's own CPU kernel: every activation it has, routing weights renormalized or not, biases, a 3-D input;
compiled and expert-parallel on 2 simulated devices; unsupported forms refused with the reason.

Tolerance: max abs error <= 1e-5 x max(1, max |onnxruntime|) (float32; onnxruntime's own kernel and bmc's sum the
experts in different orders)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bmc
from bmc.errors import ModelError
from bmc.frontend.onnx import import_model
from bmc.testing.reference import run_reference

TOKENS, HIDDEN, INNER, EXPERTS = 6, 16, 12, 4


def moe_model(activation="silu", k=2, bias=False, leading=(TOKENS,), seed=0, **attrs):
    """x [*leading, H] -> MoE(x, x @ router) with seeded weights."""
    rng = np.random.default_rng(seed)
    width = 2 * INNER if activation == "swiglu" else INNER
    weights = {"router": rng.standard_normal((HIDDEN, EXPERTS)), "fc1": rng.standard_normal((EXPERTS, width, HIDDEN)),
               "fc2": rng.standard_normal((EXPERTS, HIDDEN, INNER)) / 4}
    if bias:
        weights |= {"b1": rng.standard_normal((EXPERTS, width)), "b2": rng.standard_normal((EXPERTS, HIDDEN))}
    inits = [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    inits.append(numpy_helper.from_array(np.array([-1, EXPERTS], np.int64), "rows"))  # the logits are [tokens, E]
    moe = helper.make_node("MoE", ["x", "logits", "fc1", "b1" if bias else "", "fc2", "b2" if bias else ""], ["y"],
                           domain="com.microsoft", k=k, activation_type=activation, **attrs)
    router = [helper.make_node("MatMul", ["x", "router"], ["scores"]),
              helper.make_node("Reshape", ["scores", "rows"], ["logits"])]
    graph = helper.make_graph(router + [moe], "moe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(leading) + [HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(leading) + [HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal(tuple(leading) + (HIDDEN,)).astype(np.float32) / 4
    return model, x


def onnxruntime_y(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def assert_close(got, want):
    err = float(np.max(np.abs(got - want)))
    assert err <= 1e-5 * max(1.0, float(np.max(np.abs(want)))), f"max abs error {err}"


FORMS = [  # (activation, attributes, biases, leading dims)
    ("relu", {}, False, (TOKENS,)),
    ("gelu", {"normalize_routing_weights": 1}, True, (TOKENS,)),
    ("silu", {"normalize_routing_weights": 1}, False, (2, 3)),
    ("identity", {}, True, (TOKENS,)),
    ("swiglu", {"swiglu_fusion": 1, "normalize_routing_weights": 1}, True, (TOKENS,)),
    ("swiglu", {"swiglu_fusion": 1, "activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 0.5}, True,
     (TOKENS,)),
]


@pytest.mark.parametrize("activation,attrs,bias,leading", FORMS,
                         ids=[f"{f[0]}-{i}" for i, f in enumerate(FORMS)])
def test_moe_matches_onnxruntime(activation, attrs, bias, leading):
    model, x = moe_model(activation, bias=bias, leading=leading, **attrs)
    graph = import_model(model)
    assert graph.op_counts()["gather_matmul"] == 2  # the expert weights read in place
    assert_close(run_reference(graph, {"x": x})["y"], onnxruntime_y(model, x))


def test_moe_compiles_and_splits_by_experts(tmp_path):
    """Compiled for llvm (the native gather_matmul kernel), and with Megatron's layout on 2 devices: each holds 2 of
    the 4 experts; one all-reduce after the layer, none between its two products."""
    model, x = moe_model("swiglu", k=2, bias=True, swiglu_fusion=1, normalize_routing_weights=1)
    want = onnxruntime_y(model, x)
    bmc.compile(model, tmp_path / "one.bmc")
    assert_close(bmc.load(tmp_path / "one.bmc")(x=x), want)
    bmc.compile(model, tmp_path / "ep.bmc", mesh="2", strategy="megatron")
    plan = json.loads((tmp_path / "ep.bmc" / "plan.json").read_text())
    assert [c["kind"] for c in plan["collectives"]] == ["all_reduce"]
    assert plan["values"]["fc1"]["spec"] == plan["values"]["fc2"]["spec"] == "[{x}, {}, {}]"
    assert_close(bmc.load(tmp_path / "ep.bmc", simulate=True)(x=x), want)


@pytest.mark.parametrize("attrs, message", [
    ({"use_sparse_mixer": 1}, "use_sparse_mixer"),
    ({"activation_type": "swiglu", "swiglu_fusion": 2}, "swiglu_fusion"),
    ({"activation_type": "softplus"}, "activation_type 'softplus'"),
    ({"k": 5}, "k=5"),
])
def test_unsupported_moe_forms_are_refused_with_the_reason(attrs, message):
    activation = attrs.pop("activation_type", "relu")
    model, _ = moe_model(activation, **attrs)
    with pytest.raises(ModelError, match=message):
        import_model(model)
