"""Target-independent Relax passes of ``bmc.codegen.rewrite``, checked on the CPU against the unrewritten module."""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax

from bmc.codegen.relax_module import to_relax
from bmc.codegen.build import build
from bmc.codegen.rewrite import MAX_CALL_DEPTH, split_slices
from bmc.codegen.targets import TargetSpec
from bmc.testing.reference import run_reference
from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder


def test_split_becomes_slices_each_fused_with_its_consumers():
    """A QKV-style ``split(x + bias)`` then per-part reshape+transpose: each part becomes one fused kernel reading
    its slice (the add pushed through the split); a split whose input has another user is only sliced. The
    results are unchanged."""
    rng = np.random.default_rng(3)
    b = GraphBuilder("qkv")
    x = b.input("x", TensorType("float32", (2, 5, 24)))
    y = b.emit1("add", [x, b.param("bias", rng.standard_normal(24).astype(np.float32))])
    heads = [b.emit1("transpose", [b.emit1("reshape", [p], shape=(2, 5, 2, 4))], perm=(0, 2, 1, 3))
             for p in b.emit("split", [y], axis=-1, sizes=(8, 8, 8))]
    z = b.emit1("mul", [x, b.constant(np.array(2.0, np.float32))])  # used by the split and by an output
    rows = b.emit("split", [z], axis=1, sizes=(2, 3))
    graph = b.finish([*heads, *rows, z])
    mod = to_relax(graph)
    record: dict = {}
    sliced = split_slices(record)(mod)
    assert record["split_slices"] == 2 and "R.split" not in sliced.script()
    fused = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                      relax.transform.FuseOps(), relax.transform.FuseTIR()])
    calls = fused(sliced)["main"].script().count("R.call_tir(")
    assert calls == 3 + 1 + 2, fused(sliced)["main"].script()  # a kernel per head; z; a slice per row block

    xs = rng.standard_normal((2, 5, 24)).astype(np.float32)
    bias = tvm.runtime.tensor(graph.weights["bias"].numpy())
    got, want = (relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())["main"](tvm.runtime.tensor(xs), bias)
                 for m in (sliced, mod))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w.numpy())


def _block(fcompute, shape=(2, 3, 32)):
    from tvm import s_tir, te

    x = te.placeholder(shape, "float32", name="x")
    y = te.compute(shape, lambda *i: fcompute(x, *i), name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    return sch.get(sch.get_sblock("y"))


def test_vector_lanes_divide_the_periods_of_the_innermost_index():
    """TVM 0.27 vectorizes ``v % 8`` wrongly once a vector spans two periods (the rotary-embedding body with 16
    AVX-512 lanes): the lanes must divide every divisor applied to the innermost variable, and only those."""
    from bmc.codegen.rewrite import vector_lanes

    assert vector_lanes(_block(lambda x, a, b, c: x[a, b, c]), 16) == 16
    assert vector_lanes(_block(lambda x, a, b, c: x[a, b, c // 8 * 8 + (c + 4) % 8]), 16) == 8
    assert vector_lanes(_block(lambda x, a, b, c: x[a, b, c % 12]), 16) == 4
    assert vector_lanes(_block(lambda x, a, b, c: x[a, (b + a) % 3, c]), 16) == 16  # another variable's period


def test_deep_call_chains_are_cut_into_kernels():
    """A fake-quantize chain of 30 ``round`` calls (divide, round, clip, multiply): fused whole, TVM's vectorizer
    would take minutes (its time doubles per nested call); ``bound_fusion`` cuts it every MAX_CALL_DEPTH calls.
    The result matches the numpy reference exactly."""
    b = GraphBuilder("fake_quant")
    x = b.input("x", TensorType("float32", (32, 128)))
    y = x
    for _ in range(30):
        q = b.emit1("clip", [b.emit1("round", [b.emit1("div", [y, b.constant(np.float32(0.05))])])], min=-128.0,
                    max=127.0)
        y = b.emit1("mul", [q, b.constant(np.float32(0.05))])
    graph = b.finish([y])
    built = build(graph, TargetSpec.parse("llvm"))
    assert built.kernels["cpu"]["materialized"] >= 30 // MAX_CALL_DEPTH - 1
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    xs = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32) * 4
    got = vm["main"](tvm.runtime.tensor(xs))[0].numpy()
    np.testing.assert_array_equal(got, run_reference(graph, {"x": xs})[graph.outputs[0].name])


def test_full_max_and_min_become_parallel_row_reductions():
    """A max or min over every axis of a large tensor (a DynamicQuantizeLinear's range) becomes a reduction over
    the rows of ``[P, n / P]`` and then over the P partial results; axes given or not, keepdims either way, the
    values exactly equal (max and min do not round). A partial or small reduction is left alone."""
    from bmc.codegen.rewrite import MIN_SPLIT_REDUCTION, split_full_reductions

    rng = np.random.default_rng(5)
    shape = (128, 768)
    assert np.prod(shape) >= MIN_SPLIT_REDUCTION
    b = GraphBuilder("ranges")
    x = b.input("x", TensorType("float32", shape))
    small = b.input("small", TensorType("float32", (16, 16)))
    outs = [b.emit1("reduce_max", [x], axes=None, keepdims=True), b.emit1("reduce_min", [x], axes=(0, 1),
                                                                          keepdims=False),
            b.emit1("reduce_max", [x], axes=(1,), keepdims=False), b.emit1("reduce_min", [small], axes=None,
                                                                           keepdims=False)]
    graph = b.finish(outs)
    mod = to_relax(graph)
    record: dict = {}
    split = split_full_reductions(record)(mod)
    assert record["split_reductions"] == 2
    xs, ss = rng.standard_normal(shape).astype(np.float32), rng.standard_normal((16, 16)).astype(np.float32)
    got = relax.VirtualMachine(tvm.compile(split, target="llvm"), tvm.cpu())["main"](tvm.runtime.tensor(xs),
                                                                                      tvm.runtime.tensor(ss))
    want = [xs.max(keepdims=True), xs.min(), xs.max(axis=1), ss.min()]
    for g, w in zip(got, want):
        assert g.numpy().shape == w.shape
        np.testing.assert_array_equal(g.numpy(), w)
    # float32 is reduced widened to float64 (for -inf); the float32 tensor is reshaped and widened inside the
    # partial reductions, so no float64 copy of it is reshaped (the reshape would be a kernel of its own)
    text = split["main"].script()
    assert 'R.reshape(x, R.shape([256, 384]))' in text and text.count('R.astype(') >= 4
    assert not re.search(r'R\.reshape\((?!x,)\w+, R\.shape\(\[256, 384\]\)\)', text)
