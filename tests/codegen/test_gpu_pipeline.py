"""CUDA pipeline passes that can be checked on the CPU: the one-kernel reduced-precision normalizations."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import tvm
from tvm import relax

from bmc.codegen.gpu import narrow_normalizations
from bmc.codegen.relax_module import to_relax
from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder
from bmc.testing.reference import run_reference


def _graph():
    """bfloat16 layer norm → softmax → RMS norm → log_softmax (each lowered as astype(f32) → op → astype(bf16))."""
    rng = np.random.default_rng(0)
    bf = ml_dtypes.bfloat16
    b = GraphBuilder("norms")
    x = b.input("x", TensorType("bfloat16", (4, 64)))
    y = b.emit1("layer_norm", [x, b.param("g", (1 + 0.1 * rng.standard_normal(64)).astype(bf)),
                               b.param("b", (0.1 * rng.standard_normal(64)).astype(bf))], epsilon=1e-5)
    y = b.emit1("softmax", [b.emit1("mul", [y, b.constant(np.array(3.0, bf))])], axis=-1)
    y = b.emit1("rms_norm", [y, b.param("w", (1 + 0.1 * rng.standard_normal(64)).astype(bf))], epsilon=1e-6)
    y = b.emit1("log_softmax", [y], "y", axis=-1)
    return b.finish([y]), rng.standard_normal((4, 64)).astype(bf)


def _run(mod, graph, x):
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    params = [tvm.runtime.tensor(graph.weights[p.name].numpy()) for p in graph.params]
    return vm["main"](tvm.runtime.tensor(x), *params)[0].numpy().astype(np.float32)


def test_widened_normalizations_become_one_kernel_with_the_same_result():
    graph, x = _graph()
    mod = to_relax(graph)
    record: dict = {}
    narrowed = narrow_normalizations(record)(mod)
    assert record["narrow_normalizations"] == 4
    text = narrowed.script()
    assert "R.nn.softmax" not in text and "R.nn.layer_norm" not in text and "R.nn.rms_norm" not in text
    assert text.count('R.astype(') < mod.script().count('R.astype(')  # the widening casts are gone
    want = _run(mod, graph, x)
    got = _run(narrowed, graph, x)
    # same float32 arithmetic inside, so at most a bfloat16 rounding step apart; and both near the reference
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    ref = run_reference(graph, {"x": x})["y"].astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2)
