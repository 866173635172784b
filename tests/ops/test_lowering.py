"""Each op's Relax lowering, compiled by TVM for llvm, matches its numpy reference on the sample cases."""

import numpy as np
import pytest

from bmc.ir.types import TensorType, dtype_of
from bmc.ops.builder import GraphBuilder
from bmc.testing.compiled import run_compiled
from bmc.testing.reference import run_reference
from tests.ops.cases import CASES, LOW_PRECISION_CASES

# float32 kernels vs numpy: relative to the output scale (transcendentals differ in the last bits)
RTOL = 1e-5


def single_op_graph(op, inputs, attrs):
    b = GraphBuilder()
    vals = [b.input(f"in{i}", TensorType(dtype_of(x.dtype), x.shape)) for i, x in enumerate(inputs)]
    outs = b.emit(op, vals, **attrs)
    return b.finish(outs)


def _register_fake_collectives():
    """Collectives in a group of one are identities: register them so single-op graphs run without MPI."""
    import json

    import tvm_ffi

    from bmc.ops.collective import GROUP_REFERENCE

    for name, fn in GROUP_REFERENCE.items():
        def impl(x, attrs, out, fn=fn):
            res = fn([np.from_dlpack(x)], json.loads(attrs))[0]
            np.from_dlpack(out)[...] = res
        tvm_ffi.register_global_func(f"bmc.{name}", impl, override=True)


@pytest.mark.parametrize("op,inputs,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_lowering_matches_reference(op, inputs, attrs):
    _register_fake_collectives()
    graph = single_op_graph(op, inputs, attrs)
    feeds = {f"in{i}": x for i, x in enumerate(inputs)}
    ref = run_reference(graph, feeds)
    got = run_compiled(graph, feeds)
    for v in graph.outputs:
        _assert_matches(got[v.name], ref[v.name])


def _assert_matches(got, want, rtol=RTOL):
    """Same shape and dtype; floats within ``rtol`` of the largest finite |want| (NaN and inf where want has
    them), the rest exact."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype.kind == "f" or want.dtype.name == "bfloat16":
        finite = np.abs(want[np.isfinite(want)]).astype(np.float32)
        scale = max(1.0, float(finite.max()) if finite.size else 1.0)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0, atol=rtol * scale,
                                   equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("op,inputs,attrs", LOW_PRECISION_CASES,
                         ids=[f"{c[0]}-{c[1][0].dtype}" for c in LOW_PRECISION_CASES])
def test_float16_and_bfloat16_lowerings(op, inputs, attrs):
    """Within two units in the last place of the output's type (relative to the output scale: float16 1e-3,
    bfloat16 8e-3) of the op in float32 on the same (16-bit) inputs, rounded to that type once; dtype preserved.
    The float32 op is the yardstick, not the 16-bit reference, which rounds after every step of a composition (a
    bfloat16 attention's scores of up to ~10, where bfloat16's spacing is 0.06, and its probabilities) and was
    itself up to 6e-3 off on these cases (1.3e-2 on others)."""
    graph = single_op_graph(op, inputs, attrs)
    widened = [x.astype(np.float32) if x.dtype.kind in "fV" else x for x in inputs]  # (not indices)
    wide = single_op_graph(op, widened, attrs)
    want = run_reference(wide, {f"in{i}": x for i, x in enumerate(widened)})
    got = run_compiled(graph, {f"in{i}": x for i, x in enumerate(inputs)})
    for v, w in zip(graph.outputs, wide.outputs):
        _assert_matches(got[v.name], want[w.name].astype(got[v.name].dtype),
                        rtol={"float16": 1e-3, "bfloat16": 8e-3}.get(v.type.dtype, RTOL))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("exponent", [2.0, 3.0, 2.5])
def test_pow_by_a_constant_two_or_three_is_products(dtype, exponent):
    """``x ** 3`` (GELU-tanh) with a constant exponent of 2 or 3 lowers to multiplications, as onnxruntime computes
    it; other exponents keep ``power``. Both match numpy."""
    import ml_dtypes

    from bmc.codegen.relax_module import to_relax

    np_t = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    x = np.random.default_rng(0).uniform(-2, 2, (4, 8)).astype(np_t)
    b = GraphBuilder()
    xv = b.input("x", TensorType(dtype, x.shape))
    graph = b.finish([b.emit1("pow", [xv, b.constant(np.array(exponent, np_t))], "y")])
    assert ("R.power" in to_relax(graph).script()) == (exponent not in (2.0, 3.0))
    got = run_compiled(graph, {"x": x})["y"].astype(np.float64)
    with np.errstate(invalid="ignore"):  # a negative base to the 2.5: NaN, in both
        want = x.astype(np.float64) ** exponent
    tol = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, equal_nan=True)


LIBRARY_KERNEL_OPS = ("matmul_nbits", "matmul_integer", "attention", "gather_matmul")  # a CPU library kernel, a composition elsewhere


@pytest.mark.parametrize("op,inputs,attrs", [c for c in CASES if c[0] in LIBRARY_KERNEL_OPS],
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES) if c[0] in LIBRARY_KERNEL_OPS])
def test_lowerings_without_the_cpu_kernels_match_reference(op, inputs, attrs):
    """The lowerings a GPU gets instead of the CPU's library kernels (``to_relax`` without a target kind), built
    for llvm here: the same numbers as the reference."""
    import tvm
    from tvm import relax

    from bmc.codegen.relax_module import to_relax

    graph = single_op_graph(op, inputs, attrs)
    text = to_relax(graph).script()
    assert "call_dps_packed" not in text
    vm = relax.VirtualMachine(tvm.compile(to_relax(graph), target="llvm"), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    want = run_reference(graph, {f"in{i}": x for i, x in enumerate(inputs)})
    for g, v in zip(got, graph.outputs):
        _assert_matches(g.numpy(), want[v.name])


@pytest.mark.parametrize("op", ["reduce_mean", "reduce_sum", "reduce_max", "reduce_prod"])
@pytest.mark.parametrize("axes", [(2, 3), (1,)], ids=["spatial-1x1", "middle"])
def test_reductions_over_single_elements_fused_with_their_readers(op, axes):
    """A reduction whose axes all have one element, read by a broadcast product and an add (FocalNet's spatial mean
    of a 1 x 1 map, then its gates): TVM 0.27's schedules inlined those readers into the degenerate reduction block
    and the mean came out as garbage (2.9 off on values of 6); bmc lowers it as the reshape it is."""
    shape = (2, 384, 1, 1) if axes == (2, 3) else (2, 1, 384)
    rng = np.random.default_rng(3)
    b = GraphBuilder("degenerate")
    x = b.input("x", TensorType("float32", shape))
    s = b.input("s", TensorType("float32", (2,) + (1,) * (len(shape) - 1)))
    m = b.emit1(op, [x], axes=axes, keepdims=True)
    graph = b.finish([b.emit1("add", [x, b.emit1("mul", [m, s])], "y")])
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    np.testing.assert_allclose(run_compiled(graph, feeds)["y"], run_reference(graph, feeds)["y"], rtol=1e-6, atol=1e-6)


def test_two_scatters_of_different_shapes_compile_together():
    """bmc's scatter kernel is a TVMScript function named after the op: two of different shapes in one program
    (Qwen3-Next's recurrent state updates) exported the same global symbol twice and TVM refused the module."""
    rng = np.random.default_rng(4)
    b = GraphBuilder("scatters")
    outs = []
    for k, (rows, cols) in enumerate(((4, 6), (3, 5))):
        data = b.input(f"data{k}", TensorType("float32", (rows, cols)))
        idx = b.input(f"idx{k}", TensorType("int64", (1, cols)))
        upd = b.input(f"upd{k}", TensorType("float32", (1, cols)))
        outs.append(b.emit1("scatter_elements", [data, idx, upd], f"y{k}", axis=0))
    graph = b.finish(outs)
    feeds = {}
    for k, (rows, cols) in enumerate(((4, 6), (3, 5))):
        feeds[f"data{k}"] = rng.standard_normal((rows, cols)).astype(np.float32)
        feeds[f"idx{k}"] = rng.integers(0, rows, (1, cols)).astype(np.int64)
        feeds[f"upd{k}"] = rng.standard_normal((1, cols)).astype(np.float32)
    got, want = run_compiled(graph, feeds), run_reference(graph, feeds)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("axes,merged", [((2, 3), 2), ((-2, 1), 1), ((1, 2, 3), 1)], ids=["hw", "swapped", "chw"])
def test_adjacent_reduction_axes_merge_into_one_on_the_cpu(axes, merged):
    """A reduction over adjacent axes (not all of them) reduces one merged axis on the CPU (a reshape before and
    after), which its row-reduction schedule vectorizes; a GPU keeps the axes as they are."""
    from bmc.codegen.relax_module import to_relax

    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
    graph = single_op_graph("reduce_mean", [x], {"axes": axes, "keepdims": False})
    cpu, gpu = to_relax(graph, "llvm").script(), to_relax(graph).script()
    assert f"R.mean(lv, axis=[{merged}], keepdims=True)" in cpu and "R.reshape" in cpu, cpu
    assert "R.reshape" not in gpu
    want = run_reference(graph, {"in0": x})[graph.outputs[0].name]
    _assert_matches(run_compiled(graph, {"in0": x})[graph.outputs[0].name], want)
