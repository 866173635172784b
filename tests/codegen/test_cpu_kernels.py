"""The llvm path's library kernels: matmul offloaded to BLAS (native C++ and the numpy fallback), fast math.

Real TVM and the real OpenBLAS numpy ships throughout; the native library is built with cmake into a temporary
directory (skipped, saying why, when cmake or a C++ compiler is missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder

ROOT = Path(__file__).resolve().parents[2]


def _graph(shapes, dtype, trans=(False, False)):
    """``matmul(a, b)`` where an operand marked in ``trans`` is given stored transposed plus a transpose node."""
    b = GraphBuilder("mm")
    vals = []
    for i, (shape, t) in enumerate(zip(shapes, trans)):
        stored = shape[:-2] + (shape[-1], shape[-2]) if t else shape
        v = b.input(f"in{i}", TensorType(dtype, stored))
        if t:
            perm = tuple(range(len(shape) - 2)) + (len(shape) - 1, len(shape) - 2)
            v = b.emit1("transpose", [v], perm=perm)
        vals.append(v)
    return b.finish([b.emit1("matmul", vals)])


def _run(graph, arrays, native: bool):
    """Build with bmc's llvm pipeline, register the chosen implementation, then construct the VM and run."""
    import tvm
    from tvm import relax

    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec
    from bmc.runtime.kernels import register_cpu_kernels

    built = build(graph, TargetSpec.parse("llvm"))
    info = register_cpu_kernels(native=native)
    assert info["impl"] == ("native" if native else "numpy")
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
    return built, out[0].numpy()


@pytest.fixture(scope="module")
def native_lib(tmp_path_factory):
    if not shutil.which("cmake") and not (Path(sys.executable).parent / "cmake").exists():
        pytest.skip("cmake not found (pip install cmake ninja)")
    if not any(map(shutil.which, ("c++", "g++", "clang++"))) and not os.environ.get("CXX"):
        pytest.skip("no C++ compiler (apt-get install g++)")
    from bmc.runtime.kernels import build_native

    return build_native(tmp_path_factory.mktemp("cpu-kernels"))


@pytest.fixture(params=["native", "numpy"])
def impl(request, monkeypatch):
    if request.param == "native":
        monkeypatch.setenv("BMC_NATIVE_LIB", str(request.getfixturevalue("native_lib")))
    yield request.param
    from bmc.runtime.kernels import register_cpu_kernels

    register_cpu_kernels(native=False)  # leave the process on the implementation that needs nothing built


CASES = [  # (a shape, b shape, transposed operands); all >= MIN_BLAS_MACS multiply-adds, so all offloaded
    ((16, 24), (24, 8), (False, False)),           # 2-D
    ((3, 16, 24), (3, 24, 8), (False, False)),     # batched
    ((2, 1, 16, 24), (3, 24, 8), (False, False)),  # broadcast batch dims
    ((2, 3, 16, 24), (24, 8), (False, False)),     # batch stacked into M (one GEMM)
    ((64,), (64, 16), (False, False)),             # 1-D a promoted
    ((3, 16, 24), (24,), (False, False)),          # 1-D b promoted
    ((1024,), (1024,), (False, False)),            # dot product: 0-d result
    ((16, 24), (24, 40), (False, True)),           # Gemm transB: transpose folded into the call
    ((2, 16, 24), (2, 24, 8), (True, False)),      # transposed a, batched
    ((2, 16, 24), (24, 8), (True, True)),          # both
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("a_shape,b_shape,trans", CASES, ids=[f"{a}@{b}{''.join('T' if t else '' for t in tr)}"
                                                             for a, b, tr in CASES])
def test_offloaded_matmul_matches_numpy(impl, dtype, a_shape, b_shape, trans):
    rng = np.random.default_rng(0)
    logical = [rng.standard_normal(s).astype(dtype) for s in (a_shape, b_shape)]
    stored = [np.swapaxes(x, -1, -2).copy() if t else x for x, t in zip(logical, trans)]
    built, got = _run(_graph((a_shape, b_shape), dtype, trans), stored, native=impl == "native")
    ref = np.matmul(*logical)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * float(np.max(np.abs(ref))))
    rec = built.kernels["cpu"]
    assert rec["requires"] == ["bmc.cpu.matmul"] and rec["matmul"]["blas"] == 1
    assert rec["matmul"]["transposes_folded"] == sum(trans)


HALF_CASES = [CASES[0], CASES[2], CASES[3], CASES[8], ((1, 512), (512, 768), (False, True)),
              ((3, 45), (45, 37), (False, False)), ((2, 45), (45, 37), (False, True)),  # few rows: b read as stored
              ((20, 70), (70, 45), (False, True))]  # more rows, b [N, K]: widened into panels column by column


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("a_shape,b_shape,trans", HALF_CASES, ids=[f"{a}@{b}{''.join('T' if t else '' for t in tr)}"
                                                                  for a, b, tr in HALF_CASES])
def test_half_matmuls_are_offloaded_in_float32(impl, dtype, a_shape, b_shape, trans):
    """float16/bfloat16 matmuls (float32 accumulation) go to the kernel too, which widens the operands to float32
    (b a panel at a time, as the panel GEMM packs it) or, for up to 8 rows, reads b's 16-bit values
    in its few-row kernels (K and N tails included), and writes the 16-bit result: equal to numpy's float32 product
    of the same values rounded to the dtype (1 unit of its last place: sums in another order)."""
    import ml_dtypes

    t = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    rng = np.random.default_rng(1)
    logical = [rng.standard_normal(s).astype(t) for s in (a_shape, b_shape)]
    stored = [np.swapaxes(x, -1, -2).copy() if tr else x for x, tr in zip(logical, trans)]
    built, got = _run(_graph((a_shape, b_shape), dtype, trans), stored, native=impl == "native")
    ref = np.matmul(*(x.astype(np.float32) for x in logical))
    assert got.dtype == t and got.shape == ref.shape
    ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=ulp, atol=ulp * 1e-2 * float(np.abs(ref).max()))
    rec = built.kernels["cpu"]
    assert rec["requires"] == ["bmc.cpu.matmul"] and rec["matmul"]["blas"] == 1


def test_float16_arithmetic_is_computed_in_float32():
    """float16 elementwise chains and normalizations compile to float32 arithmetic between float16 loads and stores
    (``widen_float16``): the result is the float32 computation from the float16 inputs rounded once, within one
    float16 unit of numpy's; the chain is still one kernel."""
    b = GraphBuilder("f16")
    x = b.input("x", TensorType("float16", (64, 96)))
    y = b.input("y", TensorType("float16", (96,)))
    h = b.emit1("tanh", [b.emit1("mul", [b.emit1("add", [x, y]), b.constant(np.float16(0.7))])])
    out = b.emit1("layer_norm", [h, b.constant(np.ones(96, np.float16)), b.constant(np.zeros(96, np.float16))])
    graph = b.finish([out])
    rng = np.random.default_rng(3)
    xs, ys = rng.standard_normal((64, 96)).astype(np.float16), rng.standard_normal(96).astype(np.float16)
    built, got = _run(graph, [xs, ys], native=False)
    t = np.tanh((xs.astype(np.float32) + ys.astype(np.float32)) * np.float32(np.float16(0.7)))
    want = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5)
    assert got.dtype == np.float16 and built.kernels["cpu"]["widened_float16"] == 3  # tanh: float32 already
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2 ** -10, atol=2e-3)


def test_half_operands_with_a_float32_result(native_lib, monkeypatch):
    """The kernel called directly: bfloat16 operands and a float32 result (no rounding of the product); a NaN in a
    stays NaN; an integer result is refused."""
    import ml_dtypes
    import tvm

    from bmc.runtime.kernels import MATMUL_KERNEL, register_cpu_kernels

    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    register_cpu_kernels(native=True)
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in ((5, 40), (40, 24)))
    a[2, 3] = np.nan
    out = tvm.runtime.tensor(np.zeros((5, 24), np.float32))
    kernel = tvm.get_global_func(MATMUL_KERNEL)
    kernel(tvm.runtime.tensor(a), tvm.runtime.tensor(b), 0, 0, out)
    ref = a.astype(np.float32) @ b.astype(np.float32)
    got = out.numpy()
    assert np.isnan(got[2]).all() and np.isfinite(np.delete(got, 2, axis=0)).all()
    np.testing.assert_allclose(np.delete(got, 2, axis=0), np.delete(ref, 2, axis=0), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="need a float32 or bfloat16 result"):
        kernel(tvm.runtime.tensor(a), tvm.runtime.tensor(b), 0, 0, tvm.runtime.tensor(np.zeros((5, 24), np.int32)))
    register_cpu_kernels(native=False)


SKINNY_CASES = [  # (M, K, N): up to 8 rows of a (a decoding step) run bmc's own kernel, not the BLAS: tiles of
    # every row x 32 columns (AVX-512) or of 4 rows (tails of 3, 2, 1) x 16 columns (AVX2), column tails, 8 rows of b
    # at a time (K tails); b's rows are split over
    # the threads once the product has 2^18 multiply-adds (partial sums added at the end); 9 rows: the panel GEMM
    (1, 768, 3072), (8, 70, 37), (5, 1, 9), (7, 133, 45), (6, 8, 16), (3, 1000, 600), (2, 9, 1), (4, 300, 200),
    (9, 64, 40),
]


@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bt"])
@pytest.mark.parametrize("m,k,n", SKINNY_CASES, ids=[f"{m}x{k}x{n}" for m, k, n in SKINNY_CASES])
def test_skinny_matmul_matches_blas(native_lib, monkeypatch, m, k, n, trans_b):
    """The few-row kernels (AVX-512: every row at once; AVX2: tiles of 4 rows) against float64 products and against
    the BLAS (``BMC_CPU_NO_AVX2`` sends every call there, the panel GEMM's too): float32 sums in another order, 1e-5
    of max |ref|; a NaN in a row of a stays in that row only."""
    import tvm_ffi

    from bmc.runtime.kernels import MATMUL_KERNEL, register_cpu_kernels

    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    register_cpu_kernels(native=True, threads=2)
    rng = np.random.default_rng(m * k + n)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    if m > 1:
        a[m // 2, k // 2] = np.nan
    ref = a.astype(np.float64) @ b.astype(np.float64)
    stored = np.ascontiguousarray(b.T) if trans_b else b
    outs = []
    for isa in ("avx512", "avx2", "plain"):  # plain: the BLAS
        for name, value in PANEL_ISAS[isa].items():
            monkeypatch.setenv(name, value)
        out = np.full((m, n), 7.0, np.float32)
        tvm_ffi.get_global_func(MATMUL_KERNEL)(tvm_ffi.from_dlpack(a), tvm_ffi.from_dlpack(stored), False, trans_b,
                                               tvm_ffi.from_dlpack(out))
        outs.append(out)
    finite = np.isfinite(ref)
    assert (np.isnan(outs[0]) == ~finite).all() and finite.sum() == (m - (m > 1)) * n
    for out in outs:
        np.testing.assert_allclose(out[finite], ref[finite], rtol=0, atol=1e-5 * float(np.abs(ref[finite]).max()))
    register_cpu_kernels(native=False)


PANEL_ISAS = {"avx512": {}, "avx2": {"BMC_CPU_NO_AVX512": "1"}, "plain": {"BMC_CPU_NO_AVX2": "1"}}
PANEL_CASES = [  # (M, K, N): row tiles of 12 (AVX-512) / 6 (AVX2) with every tail; panels of 32 columns with tails
    # under 16 (AVX-512: a half-width tile), exactly 16, 16-32 and none; K over 4096 runs in passes that add into c;
    # K = 4100 x 30 rows: blocks of a's rows
    (13, 40, 70), (12, 64, 32), (25, 7, 15), (100, 300, 17), (23, 4100, 33), (30, 4100, 40), (11, 5, 1),
    (9, 0, 5), (47, 129, 96), (1, 768, 64), (20, 50, 48),
]


@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bt"])
@pytest.mark.parametrize("m,k,n", PANEL_CASES, ids=[f"{m}x{k}x{n}" for m, k, n in PANEL_CASES])
@pytest.mark.parametrize("isa", list(PANEL_ISAS))
def test_panel_gemm_matches_float64(native_lib, monkeypatch, isa, m, k, n, trans_b):
    """bmc's own float32 GEMM, on a weight packed once (``pack_weight`` + ``matmul_packed``) and, for more than 8
    rows, on b packed panel by panel inside ``matmul`` (the plain-loop build leaves that to the BLAS): against
    float64 products, 1e-5 of max |ref| (float32 sums in another order); every element written (out starts at 7);
    a NaN in a row of a stays in that row. The packed layout equals the numpy fallback's, and the numpy
    ``matmul_packed`` reads it back to the same product."""
    import tvm_ffi

    from bmc.runtime import kernels

    have = kernels.host_cpu_features() or set()
    if isa == "avx512" and "avx512f" not in have:
        pytest.skip("this CPU has no AVX-512")
    if isa == "avx2" and "avx2" not in have:
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    for var, value in PANEL_ISAS[isa].items():
        monkeypatch.setenv(var, value)
    kernels.register_cpu_kernels(native=True, threads=2)
    rng = np.random.default_rng(m * k + n)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    if m > 1 and k > 0:
        a[m // 2, k // 2] = np.nan
    ref = a.astype(np.float64) @ b.astype(np.float64)
    stored = np.ascontiguousarray(b.T) if trans_b else b
    packed = np.full((-(-n // kernels.PACK_PANEL), k, kernels.PACK_PANEL), 7.0, np.float32)
    tvm_ffi.get_global_func(kernels.PACK_WEIGHT_KERNEL)(tvm_ffi.from_dlpack(stored), int(trans_b),
                                                        tvm_ffi.from_dlpack(packed))
    expected_layout = np.empty_like(packed)
    kernels._pack_weight_numpy(tvm_ffi.from_dlpack(stored), int(trans_b), tvm_ffi.from_dlpack(expected_layout))
    outs = {}
    for name, fn in (("packed", kernels.MATMUL_PACKED_KERNEL), ("numpy", None), ("panels", kernels.MATMUL_KERNEL)):
        if name == "panels" and (m <= 8 or isa == "plain"):
            continue
        out = np.full((m, n), 7.0, np.float32)
        if name == "packed":
            tvm_ffi.get_global_func(fn)(tvm_ffi.from_dlpack(a), tvm_ffi.from_dlpack(packed), n,
                                        tvm_ffi.from_dlpack(out))
        elif name == "numpy":
            kernels._matmul_packed_numpy(tvm_ffi.from_dlpack(a), tvm_ffi.from_dlpack(packed), n,
                                         tvm_ffi.from_dlpack(out))
        else:
            tvm_ffi.get_global_func(fn)(tvm_ffi.from_dlpack(a), tvm_ffi.from_dlpack(stored), False, trans_b,
                                        tvm_ffi.from_dlpack(out))
        outs[name] = out
    kernels.register_cpu_kernels(native=False)
    np.testing.assert_array_equal(packed, expected_layout)
    finite = np.isfinite(ref)
    assert finite.sum() == (m - (m > 1 and k > 0)) * n
    scale = max(1.0, float(np.abs(ref[finite]).max()) if finite.any() else 1.0)
    for name, out in outs.items():
        assert (np.isnan(out) == ~finite).all(), name
        np.testing.assert_allclose(out[finite], ref[finite], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_matmul_weights_are_packed_once_at_load(native_lib, monkeypatch, tmp_path):
    """A float32 weight read only as matmul's right operand (as stored, or stored transposed by a Gemm) becomes a
    packed parameter, packed when the program is loaded (in memory, and from an artifact on one device and on a
    1x2 mesh of simulated ranks, whose shards are packed each); one also read by another op stays as it is;
    ``BMC_CPU_PACK_WEIGHTS=0`` packs nothing. The same results every way."""
    from onnx import TensorProto, helper, numpy_helper

    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec
    from bmc.compiler import compile_model, import_graph
    from bmc.runtime.executor import load
    from bmc.runtime.kernels import register_cpu_kernels
    from bmc.testing.compiled import CompiledGraph

    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    register_cpu_kernels(native=True, threads=2)
    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.standard_normal(s).astype(np.float32) for s in ((40, 70), (34, 70), (70, 70)))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1),
             helper.make_node("MatMul", ["h", "w3"], ["hw3"]),
             helper.make_node("ReduceSum", ["w3", "axis0"], ["s"], keepdims=0),
             helper.make_node("Add", ["hw3", "s"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10, 40])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")],
                              [numpy_helper.from_array(w, n) for n, w in (("w1", w1), ("w2", w2), ("w3", w3))]
                              + [numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((10, 40)).astype(np.float32)
    h = x.astype(np.float64) @ w1
    ref = {"y": h @ w2.T, "z": h @ w3 + w3.sum(0, dtype=np.float64)}
    g = import_graph(model)
    assert build(g, TargetSpec.parse("llvm")).packed_weights == {"w1": False, "w2": True}
    compiled = CompiledGraph(g)
    assert sorted(tuple(p.shape) for p in compiled.params) == [(2, 70, 32), (3, 40, 32), (70, 70)]
    results = [compiled({"x": x})]
    for mesh in (None, "1x2"):
        path = compile_model(model, tmp_path / f"m{mesh}.bmc", mesh=mesh)["output"]
        if mesh:
            assert json.loads((Path(path) / "manifest.json").read_text())["kernels"]["cpu"]["packed_weights"]
        results.append(dict(zip(("y", "z"), load(path, simulate=bool(mesh))(x=x))))
    monkeypatch.setenv("BMC_CPU_PACK_WEIGHTS", "0")
    assert build(g, TargetSpec.parse("llvm")).packed_weights == {}
    results.append(CompiledGraph(g)({"x": x}))
    register_cpu_kernels(native=False)
    for got in results:
        for name, want in ref.items():
            np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-5 * float(np.abs(want).max()), err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("isa", ["avx512", "avx512-widened", "avx2"])
def test_16_bit_weights_pack_into_16_bit_panels(native_lib, monkeypatch, isa, dtype):
    """``pack_weight`` of a float16/bfloat16 weight keeps it 16-bit in the panel layout (equal to the numpy
    fallback's); ``matmul_packed`` of 16-bit a and panels, and ``matmul`` of 16-bit a and b as stored (b packed
    per call), equal the float32 product of the 16-bit values (float32 result: 1e-5 of max |ref|; 16-bit result:
    that product rounded once, within one 16-bit step), and the numpy fallback agrees; K over 4096 runs in passes
    (4099: an odd last pass). bfloat16 runs the ``vdpbf16ps`` tiles on CPUs with AVX512_BF16 (``avx512``) and
    widens both operands to float32 without them (``avx512-widened``: ``BMC_CPU_NO_BF16_DOT``)."""
    import ml_dtypes
    import tvm
    import tvm_ffi

    from bmc.runtime import kernels

    have = kernels.host_cpu_features() or set()
    if isa.startswith("avx512") and "avx512f" not in have or "avx2" not in have:
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    for var, value in {**PANEL_ISAS.get(isa, {}), **({"BMC_CPU_NO_BF16_DOT": "1"} if "widened" in isa else {})}.items():
        monkeypatch.setenv(var, value)
    kernels.register_cpu_kernels(native=True, threads=2)
    npdt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    step = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    rng = np.random.default_rng(5)

    def tensor(array, dt):
        t = tvm.runtime.empty(array.shape, dt)
        kernels.host_array(t)[...] = array
        return t

    for m, k, n, trans in ((37, 300, 70, False), (12, 64, 32, True), (9, 4100, 33, True), (100, 7, 15, False),
                           (26, 4099, 40, False), (13, 1, 17, True)):
        w = rng.standard_normal((n, k) if trans else (k, n)).astype(npdt)
        a = rng.standard_normal((m, k)).astype(npdt)
        ref = a.astype(np.float64) @ (w.T if trans else w).astype(np.float64)
        stored, at = tensor(w, dtype), tensor(a, dtype)
        packed = tvm.runtime.empty((-(-n // 32), k, 32), dtype)
        tvm_ffi.get_global_func(kernels.PACK_WEIGHT_KERNEL)(stored, int(trans), packed)
        layout = tvm.runtime.empty((-(-n // 32), k, 32), dtype)
        kernels._pack_weight_numpy(stored, int(trans), layout)
        np.testing.assert_array_equal(kernels.host_array(packed).view(np.uint16),
                                      kernels.host_array(layout).view(np.uint16))
        scale = float(np.abs(ref).max())
        unpacked = tvm_ffi.get_global_func(kernels.MATMUL_KERNEL)
        for out_dtype in ("float32", dtype):
            for run in (lambda a, p, n, o: unpacked(a, stored, False, trans, o),
                        tvm_ffi.get_global_func(kernels.MATMUL_PACKED_KERNEL), kernels._matmul_packed_numpy):
                out = tensor(np.full((m, n), 7, np.float32).astype(npdt if out_dtype == dtype else np.float32),
                             out_dtype)
                run(at, packed, n, out)
                got = kernels.host_array(out).astype(np.float64)
                tol = 1e-5 * scale if out_dtype == "float32" else step * np.abs(ref) + 1e-5 * scale
                assert (np.abs(got - ref) <= tol).all(), (m, k, n, trans, out_dtype, run)
    kernels.register_cpu_kernels(native=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_weights_are_packed_at_load_only_for_many_rows(native_lib, monkeypatch, tmp_path, dtype):
    """A float32 model compiled ``--dtype float16|bfloat16``: with 16 rows its matmul weights are packed at load into
    16-bit panels (the few-row kernels read them where they lie: at 4 rows nothing is packed); the packed program's
    outputs are bit for bit those of the unpacked one (the same widened values through the same panel kernel)."""
    from onnx import TensorProto, helper, numpy_helper

    from bmc.compiler import compile_model
    from bmc.runtime.executor import load
    from bmc.runtime.kernels import register_cpu_kernels

    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    register_cpu_kernels(native=True, threads=2)
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((64, 96)).astype(np.float32), rng.standard_normal((40, 96)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for rows, packs in ((16, True), (4, False)):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        outs = []
        for pack in ("1", "0"):
            monkeypatch.setenv("BMC_CPU_PACK_WEIGHTS", pack)
            path = tmp_path / f"m{rows}-{pack}.bmc"
            compile_model(model, path, dtype=dtype, input_shapes={"rows": rows})
            cpu = json.loads((path / "manifest.json").read_text())["kernels"]["cpu"]
            assert bool(cpu.get("packed_weights")) == (packs and pack == "1"), cpu
            outs.append(load(path)(x=x))
        np.testing.assert_array_equal(outs[0], outs[1])
        ref = np.maximum(x.astype(np.float64) @ w1, 0) @ w2.T.astype(np.float64)
        assert float(np.abs(outs[0] - ref).max()) <= 3e-2 * float(np.abs(ref).max())
    register_cpu_kernels(native=False)


@pytest.mark.parametrize("impl", ["avx512", "plain", "numpy"])
def test_minmax_kernel(native_lib, monkeypatch, impl):
    """``bmc.cpu.minmax``: one pass for a float32 tensor's min and max, equal to numpy's on lengths with every tail
    of the 16- and 32-lane loops and several threads' chunks; only -inf gives -inf and -inf (the infinite
    identities, where TVM's reductions start from the finite extremes); a NaN anywhere makes both NaN; an empty
    tensor gives +inf and -inf."""
    import tvm_ffi

    from bmc.runtime import kernels

    if impl == "avx512" and "avx512f" not in (kernels.host_cpu_features() or set()):
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    if impl == "plain":
        monkeypatch.setenv("BMC_CPU_NO_AVX512", "1")
    kernels.register_cpu_kernels(native=impl != "numpy", threads=2)
    fn = tvm_ffi.get_global_func(kernels.MINMAX_KERNEL)
    rng = np.random.default_rng(3)

    def minmax(x):
        out = np.full(2, 7, np.float32)
        fn(tvm_ffi.from_dlpack(x), tvm_ffi.from_dlpack(out))
        return out

    for n in (1, 15, 16, 17, 31, 33, 4099, 1 << 16, (1 << 18) + 5):
        x = (rng.standard_normal(n) * 100).astype(np.float32)
        np.testing.assert_array_equal(minmax(x), [x.min(), x.max()])
        x[n // 2] = np.nan
        assert np.isnan(minmax(x)).all(), n
    np.testing.assert_array_equal(minmax(np.full((3, 40), -np.inf, np.float32)), [-np.inf, -np.inf])
    np.testing.assert_array_equal(minmax(np.zeros(0, np.float32)), [np.inf, -np.inf])
    kernels.register_cpu_kernels(native=False)


@pytest.mark.parametrize("native", [True, False], ids=["native", "numpy"])
def test_whole_tensor_extremes_run_as_one_minmax_call(native_lib, monkeypatch, tmp_path, native):
    """A max and a min over all of one float32 tensor (ONNX ReduceMax/ReduceMin, and DynamicQuantizeLinear's
    range) compile to one ``bmc.cpu.minmax`` call, recorded as required; the results equal numpy's, -inf for a
    tensor of -inf (the lowering's float64 widening gave that before), and DynamicQuantizeLinear equals
    onnxruntime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from bmc.compiler import compile_model
    from bmc.runtime.executor import load
    from bmc.runtime.kernels import MINMAX_KERNEL, register_cpu_kernels

    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    register_cpu_kernels(native=native, threads=2)
    nodes = [helper.make_node("ReduceMax", ["x"], ["hi"], keepdims=0), helper.make_node("ReduceMin", ["x"], ["lo"]),
             helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zp"])]
    outs = [helper.make_tensor_value_info("hi", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("lo", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("q", TensorProto.UINT8, [64, 128]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("zp", TensorProto.UINT8, [])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 128])], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    compile_model(model, tmp_path / "m.bmc")
    cpu = json.loads((tmp_path / "m.bmc" / "manifest.json").read_text())["kernels"]["cpu"]
    assert MINMAX_KERNEL in cpu["requires"], cpu
    m = load(tmp_path / "m.bmc")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    got = m.run({"x": x})
    assert got["hi"] == x.max() and got["lo"].shape == (1, 1) and got["lo"][0, 0] == x.min()
    for name, want in zip(["q", "scale", "zp"], sess.run(["q", "scale", "zp"], {"x": x})[0:3]):
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    got = m.run({"x": np.full((64, 128), -np.inf, np.float32)})
    assert got["hi"] == -np.inf and got["lo"][0, 0] == -np.inf
    register_cpu_kernels(native=False)


def test_int8_weights_are_packed_once_at_load(native_lib, monkeypatch, tmp_path):
    """An 8-bit weight read only as MatMulInteger's B (int8, or uint8 with a zero point per column) is packed when
    the program is loaded (in memory, from an artifact, and per shard on a 1x2 mesh of simulated ranks), and the
    unpacked kernel is no longer required; one also read by another op stays as it is. Exact every way, the numpy
    kernels and ``BMC_CPU_PACK_WEIGHTS=0`` too."""
    from onnx import TensorProto, helper, numpy_helper

    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec
    from bmc.compiler import compile_model, import_graph
    from bmc.runtime.executor import load
    from bmc.runtime.kernels import register_cpu_kernels
    from bmc.testing.compiled import CompiledGraph

    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    register_cpu_kernels(native=True, threads=2)
    rng = np.random.default_rng(0)
    w1 = rng.integers(-128, 128, (70, 40), dtype=np.int8)
    w2 = rng.integers(0, 256, (40, 34), dtype=np.uint8)
    z2 = rng.integers(100, 156, 34, dtype=np.uint8)
    inits = [numpy_helper.from_array(v, n) for n, v in (("w1", w1), ("w2", w2), ("z2", z2),
                                                          ("za", np.array(7, np.uint8)), ("s", np.float32(1000)))]
    nodes = [helper.make_node("MatMulInteger", ["x", "w1", "za"], ["h"]),
             helper.make_node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT),
             helper.make_node("QuantizeLinear", ["hf", "s", "za"], ["hq"]),
             helper.make_node("MatMulInteger", ["hq", "w2", "za", "z2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [40, 70])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = rng.integers(0, 256, (40, 70), dtype=np.uint8)
    h = (x.astype(np.int64) - 7) @ w1
    hq = np.clip(np.rint(h / 1000.0) + 7, 0, 255)
    want = (hq - 7) @ (w2.astype(np.int64) - z2)
    g = import_graph(model)
    cpu = build(g, TargetSpec.parse("llvm")).kernels["cpu"]
    assert cpu["packed_int8_weights"] == ["w1.T", "w2.T"]  # MatMulInteger's B is stored transposed, [N, K]
    assert {"bmc.cpu.matmul_integer_packed", "bmc.cpu.pack_int8_weight"} <= set(cpu["requires"])
    assert "bmc.cpu.matmul_integer" not in cpu["requires"]
    compiled = CompiledGraph(g)
    assert sorted(tuple(p.shape) for p in compiled.params if p.ndim == 3) == [(3, 11, 64), (3, 19, 64)]
    results = [compiled({"x": x})["y"]]
    for mesh in (None, "1x2"):
        path = compile_model(model, tmp_path / f"m{mesh}.bmc", mesh=mesh, strategy="megatron")["output"]
        results.append(load(path, simulate=bool(mesh))(x=x))
    monkeypatch.setenv("BMC_CPU_KERNELS", "numpy")
    results.append(load(tmp_path / "mNone.bmc")(x=x))
    monkeypatch.delenv("BMC_CPU_KERNELS")
    monkeypatch.setenv("BMC_CPU_PACK_WEIGHTS", "0")
    assert "packed_int8_weights" not in build(g, TargetSpec.parse("llvm")).kernels["cpu"]
    results.append(CompiledGraph(g)({"x": x})["y"])
    monkeypatch.delenv("BMC_CPU_PACK_WEIGHTS")
    for got in results:
        np.testing.assert_array_equal(got, want)
    # a weight also read by another op (here a cast) is left as it is
    b = GraphBuilder("shared")
    a, w = b.input("a", TensorType("uint8", (4, 40))), b.param("w", w2[:, :16].T.copy())
    zero = b.param("z", np.array([0], np.uint8))
    g = b.finish([b.emit1("matmul_integer", [a, w, zero, zero]), b.emit1("cast", [w], dtype="int32")])
    cpu = build(g, TargetSpec.parse("llvm")).kernels["cpu"]
    assert "packed_int8_weights" not in cpu and "bmc.cpu.matmul_integer" in cpu["requires"]
    register_cpu_kernels(native=False)


NBITS_CASES = [  # (A shape, N, block): AVX-512 decodes 32 values (16 bytes) at a time, so blocks of 32 and 64 take
    # it, for every row of A at once (over 8 rows, the decoded values scaled first); AVX2 16 values (8 bytes), blocks
    # of 16 too, 4 rows at once (tails 3/2/1); a
    # block of 24 the plain loops; more than 16 rows dequantize + sgemm; N rows of the weight split over the threads
    ((1, 64), 40, 32), ((3, 96), 7, 16), ((2, 2, 128), 33, 64), ((5, 48), 9, 24), ((16, 64), 70, 32),
    ((17, 32), 12, 16), ((1, 3072), 768, 32), ((8, 128), 20, 32), ((11, 256), 5, 64),
]


@pytest.mark.parametrize("zero_points", [False, True], ids=["zp8", "zp"])
@pytest.mark.parametrize("a_shape,n,block", NBITS_CASES, ids=[f"{a}x{n}-b{b}" for a, n, b in NBITS_CASES])
def test_matmul_nbits_kernel_matches_reference(impl, monkeypatch, a_shape, n, block, zero_points):
    """``bmc.cpu.matmul_nbits[_zp]`` against float64 products of the dequantized weight (the op's definition), the
    native kernel with AVX-512, with AVX2 (``BMC_CPU_NO_AVX512``) and with its plain loops (``BMC_CPU_NO_AVX2``):
    1e-5 of max |ref|."""
    import tvm_ffi

    from bmc.runtime.kernels import MATMUL_NBITS_KERNEL, MATMUL_NBITS_ZP_KERNEL, register_cpu_kernels

    register_cpu_kernels(native=impl == "native", threads=2)
    rng = np.random.default_rng(n * block)
    k = a_shape[-1]
    a = rng.standard_normal(a_shape, np.float32)
    codes = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    scales = rng.random((n, k // block), np.float32) + 0.5
    zp = rng.integers(0, 16, (n, k // block)).astype(np.float32)
    q = np.stack([codes & 15, codes >> 4], axis=-1).reshape(n, k // block, block).astype(np.float64)
    w = ((q - (zp[..., None] if zero_points else 8.0)) * scales[..., None]).reshape(n, k)
    ref = a.astype(np.float64) @ w.T
    kernel = tvm_ffi.get_global_func(MATMUL_NBITS_ZP_KERNEL if zero_points else MATMUL_NBITS_KERNEL)
    for isa in (PANEL_ISAS if impl == "native" else ["avx512"]):
        for name, value in PANEL_ISAS[isa].items():
            monkeypatch.setenv(name, value)
        out = np.full(a_shape[:-1] + (n,), np.nan, np.float32)
        args = [a, codes, scales] + ([zp] if zero_points else []) + [out]
        kernel(*[tvm_ffi.from_dlpack(x) for x in args])
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_kernel_threads_serve_concurrent_callers_and_forked_children(native_lib, monkeypatch, tmp_path):
    """The native kernels' worker threads persist between calls; callers on several threads at once (all but one
    start their own threads) and a forked child (whose copy of the workers does not exist) get correct results."""
    import multiprocessing
    import threading

    import tvm_ffi

    from bmc.runtime.kernels import MATMUL_NBITS_KERNEL, register_cpu_kernels

    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    register_cpu_kernels(native=True, threads=2)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 256), np.float32)
    codes = rng.integers(0, 256, (512, 8, 16), dtype=np.uint8)
    scales = rng.random((512, 8), np.float32)
    kernel = tvm_ffi.get_global_func(MATMUL_NBITS_KERNEL)

    def product():
        out = np.zeros((2, 512), np.float32)
        kernel(*[tvm_ffi.from_dlpack(x) for x in (a, codes, scales, out)])
        return out

    want = product()
    results = [[] for _ in range(4)]
    threads = [threading.Thread(target=lambda r=r: r.extend(product() for _ in range(50))) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(r) == 50 and all(np.array_equal(x, want) for x in r) for r in results)
    child = multiprocessing.get_context("fork").Process(target=lambda: np.save(tmp_path / "child.npy", product()))
    child.start()
    child.join(timeout=60)  # waiting for the parent's workers, which a child does not have, would hang it
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0
    np.testing.assert_array_equal(np.load(tmp_path / "child.npy"), want)
    register_cpu_kernels(native=False)


POOL_SCRIPT = """
import os, numpy as np, tvm_ffi
from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder
from bmc.runtime.kernels import MATMUL_KERNEL, register_cpu_kernels
from bmc.testing.compiled import CompiledGraph
register_cpu_kernels(native=True, threads=2)
b = GraphBuilder("add")
x = b.input("x", TensorType("float32", (1 << 20,)))
graph = b.finish([b.emit1("add", [x, x])])
CompiledGraph(graph)({"x": np.ones(1 << 20, np.float32)})  # a parallel TVM kernel: TVM's pool exists now
before = len(os.listdir("/proc/self/task"))
a, out = np.ones((512, 512), np.float32), np.zeros((512, 512), np.float32)
tvm_ffi.get_global_func(MATMUL_KERNEL)(*map(tvm_ffi.from_dlpack, (a, a)), False, False, tvm_ffi.from_dlpack(out))
print(before, len(os.listdir("/proc/self/task")), float(out.min()), float(out.max()))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize("pool", ["tvm", "own"])
def test_native_kernels_run_on_tvms_thread_pool(native_lib, pool):
    """bmc's kernels run their threads on TVM's pool (TVMBackendParallelLaunch), so no second set of workers
    spins against TVM's on the same cores; ``BMC_KERNEL_POOL=own`` keeps bmc's own pool (one more thread)."""
    env = {**os.environ, "BMC_NATIVE_LIB": str(native_lib), "BMC_KERNEL_POOL": pool}
    done = subprocess.run([sys.executable, "-c", POOL_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after, low, high = done.stdout.split()
    assert float(low) == float(high) == 512.0
    assert int(after) - int(before) == (0 if pool == "tvm" else 1)


INTEGER_CASES = [  # (A shape, N, zero points per row): K across the 64-byte steps and tails, M and N across tiles;
    # up to 16 rows dot products, more (and every weight packed at load) the packed panels (16 columns, 4 bytes of K
    # at a time: K % 4 tails; tiles of 8 rows, the rest in one tile)
    ((1, 64), 1, False), ((5, 70), 6, True), ((9, 127), 13, False), ((2, 3, 128), 4, True), ((4, 1), 3, False),
    ((3, 200), 9, True), ((37, 70), 45, True), ((2, 20, 131), 33, False), ((17, 4), 16, True), ((24, 64), 32, False),
    ((3, 97), 20, True),  # packed tiles of up to 4 rows take K in pairs of quads: an odd count of quads left over
]


@pytest.mark.parametrize("a_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("b_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("a_shape,n,per_row", INTEGER_CASES, ids=[f"{a}x{n}{'-rows' if r else ''}"
                                                                   for a, n, r in INTEGER_CASES])
def test_matmul_integer_kernel_is_exact(impl, a_dtype, b_dtype, a_shape, n, per_row):
    """``bmc.cpu.matmul_integer`` equals the op's int64 reference bit for bit, for each signedness pair (the native
    kernel flips int8 A and uint8 B to its uint8 x int8 products), zero points one or one per row, extreme codes;
    so does ``bmc.cpu.matmul_integer_packed`` on the weight packed by ``bmc.cpu.pack_int8_weight``, whose layout
    (codes in panels, row sums after them) the native and numpy packers write alike."""
    import tvm_ffi

    from bmc.ops import get_op
    from bmc.runtime import kernels
    from bmc.runtime.kernels import MATMUL_INTEGER_KERNEL, register_cpu_kernels

    register_cpu_kernels(native=impl == "native")
    rng = np.random.default_rng(len(a_shape) * 100 + n)

    def codes(dtype, shape):
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max + 1, shape).astype(dtype)
        x.flat[:2] = (info.min, info.max)[: x.size]
        return x

    a, bt = codes(a_dtype, a_shape), codes(b_dtype, (n, a_shape[-1]))
    za = codes(a_dtype, (a_shape[-2],) if per_row else ())
    zb = codes(b_dtype, (n,) if per_row else (1,))
    out = np.zeros(a_shape[:-1] + (n,), np.int32)
    tvm_ffi.get_global_func(MATMUL_INTEGER_KERNEL)(*[tvm_ffi.from_dlpack(x) for x in (a, bt, za, zb, out)])
    (want,) = get_op("matmul_integer").reference([a, bt, za, zb], {})
    np.testing.assert_array_equal(out, want)
    packed = np.full(kernels.packed_int8_shape(*bt.shape), 99, np.int8)  # every byte written
    tvm_ffi.get_global_func(kernels.PACK_INT8_WEIGHT_KERNEL)(tvm_ffi.from_dlpack(bt), tvm_ffi.from_dlpack(packed))
    expected = np.zeros_like(packed)
    kernels._pack_int8_weight_numpy(tvm_ffi.from_dlpack(bt), tvm_ffi.from_dlpack(expected))
    np.testing.assert_array_equal(packed, expected)
    out[...] = -1
    tvm_ffi.get_global_func(kernels.MATMUL_INTEGER_PACKED_KERNEL)(
        *[tvm_ffi.from_dlpack(x) for x in (a, packed, za, zb)], n, tvm_ffi.from_dlpack(out))
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("a_dtype, b_dtype", [("uint8", "int8"), ("int8", "uint8")])
def test_matmul_integer_plain_loops_are_exact(native_lib, monkeypatch, a_dtype, b_dtype):
    """The native kernel's loops for CPUs without AVX-512 VNNI (``BMC_CPU_NO_VNNI`` makes this one take them)."""
    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    monkeypatch.setenv("BMC_CPU_NO_VNNI", "1")
    for a_shape, n, per_row in INTEGER_CASES:
        test_matmul_integer_kernel_is_exact("native", a_dtype, b_dtype, a_shape, n, per_row)
    test_matmul_integer_sums_wrap_like_int32("native")


def test_matmul_integer_sums_wrap_like_int32(impl):
    """K = 70000 products of 255 and -128 pass int32's range: the result wraps modulo 2^32 (onnxruntime's int32
    accumulator does the same), in the native kernel and the numpy fallback alike."""
    import tvm_ffi

    from bmc.runtime.kernels import MATMUL_INTEGER_KERNEL, register_cpu_kernels

    register_cpu_kernels(native=impl == "native")
    k = 70000
    a, bt = np.full((1, k), 255, np.uint8), np.full((1, k), -128, np.int8)
    zero_a, zero_b, out = np.zeros((), np.uint8), np.zeros((), np.int8), np.zeros((1, 1), np.int32)
    tvm_ffi.get_global_func(MATMUL_INTEGER_KERNEL)(*[tvm_ffi.from_dlpack(x) for x in (a, bt, zero_a, zero_b, out)])
    assert out[0, 0] == np.int64(255 * -128 * k).astype(np.int32) and 255 * -128 * k < np.iinfo(np.int32).min


def test_attention_key_transpose_folds_into_the_call():
    """``q.transpose(0, 2, 1, 3) @ k.transpose(0, 2, 3, 1)`` (attention scores from [batch, seq, heads, dim]): the
    key's permute becomes ``transpose(0, 2, 1, 3)`` (rows stay contiguous) with the last-two swap folded into the
    call; the query's permute is not a swap and stays."""
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 16, 3, 24)).astype("float32"), rng.standard_normal((2, 20, 3, 24)).astype("float32")
    b = GraphBuilder("scores")
    qv, kv = b.input("q", TensorType("float32", q.shape)), b.input("k", TensorType("float32", k.shape))
    graph = b.finish([b.emit1("matmul", [b.emit1("transpose", [qv], perm=(0, 2, 1, 3)),
                                         b.emit1("transpose", [kv], perm=(0, 2, 3, 1))])])
    built, got = _run(graph, [q, k], native=False)
    ref = np.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))
    assert built.kernels["cpu"]["matmul"]["transposes_folded"] == 1


def test_small_and_integer_matmuls_stay_in_tvm():
    from bmc.codegen.cpu import choose_matmul

    assert choose_matmul((4, 4), (4, 4), (4, 4), "float32") == "tvm"  # 64 MACs: the packed call costs more
    assert choose_matmul((128, 768), (768, 768), (128, 768), "float32") == "blas"
    assert choose_matmul((128, 768), (768, 768), (128, 768), "int32") == "tvm"
    rng = np.random.default_rng(1)
    a, b = rng.integers(-5, 5, (32, 32)).astype("int32"), rng.integers(-5, 5, (32, 32)).astype("int32")
    built, got = _run(_graph(((32, 32), (32, 32)), "int32"), [a, b], native=False)
    np.testing.assert_array_equal(got, a @ b)
    assert built.kernels["cpu"]["requires"] == [] and built.kernels["cpu"]["matmul"] == {
        "blas": 0, "tvm": 1, "transposes_folded": 0, "shapes": {}}


def test_native_matmul_rejects_bad_arguments(native_lib):
    import tvm
    import tvm_ffi

    from bmc.runtime.kernels import find_openblas

    mod = tvm_ffi.load_module(str(native_lib))
    blas = find_openblas()
    mod["blas_bind"](blas["path"], blas["sgemm"], blas["dgemm"], blas["int64"])
    out = tvm.runtime.empty((2, 2), "float32")
    with pytest.raises(TypeError, match="a is float64 but the output is float32"):
        mod["cpu_matmul"](tvm.runtime.tensor(np.zeros((2, 3))), tvm.runtime.tensor(np.zeros((3, 2), "float32")),
                          0, 0, out)
    with pytest.raises(ValueError, match="contraction dims differ"):
        mod["cpu_matmul"](tvm.runtime.tensor(np.zeros((2, 3), "float32")),
                          tvm.runtime.tensor(np.zeros((4, 2), "float32")), 0, 0, out)


def test_fallback_when_native_library_is_absent(tmp_path):
    """No native library anywhere: the numpy kernel, silently (same BLAS), correct results (fresh interpreter)."""
    script = textwrap.dedent("""
        import warnings
        import numpy as np
        from tests.codegen.test_cpu_kernels import _graph
        from bmc.testing.compiled import CompiledGraph
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g = _graph(((8, 32), (32, 16)), "float32")
            a = np.random.default_rng(0).standard_normal((8, 32)).astype("float32")
            b = np.random.default_rng(1).standard_normal((32, 16)).astype("float32")
            outs = [CompiledGraph(g)({"in0": a, "in1": b}) for _ in range(2)]
        import bmc.runtime.kernels as k
        err = max(float(np.max(np.abs(o[g.outputs[0].name] - a @ b))) for o in outs)
        print(k.info()["impl"], len([w for w in caught if issubclass(w.category, RuntimeWarning)]), err)
    """)
    env = dict(os.environ, BMC_NATIVE_LIB=str(tmp_path / "missing.so"), BMC_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("BMC_CPU_KERNELS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    impl, warned, err = proc.stdout.split()
    assert (impl, warned) == ("numpy", "0") and float(err) < 1e-4


def test_manifest_records_kernel_choice(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from bmc.compiler import compile_model
    from bmc.runtime.executor import load
    from bmc.runtime.kernels import register_cpu_kernels

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 32)).astype("float32")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1), helper.make_node("Tanh", ["y"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [8, 48])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = compile_model(model, tmp_path / "m.bmc")["output"]
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    cpu = manifest["kernels"]["cpu"]
    assert cpu["requires"] == ["bmc.cpu.matmul_packed", "bmc.cpu.pack_weight"]  # the one matmul reads w packed
    assert cpu["matmul"]["blas"] == 1 and cpu["matmul"]["transposes_folded"] == 1
    assert cpu["packed_weights"] == {"w": True}  # stored [N, K]
    assert cpu["fast_math"] == {"tanh": 1} and cpu["mcpu"] == manifest["target"]["mcpu"]
    assert isinstance(cpu["features"], list)
    register_cpu_kernels(required=cpu["requires"])
    x = rng.standard_normal((8, 32)).astype("float32")
    np.testing.assert_allclose(load(path)(x), np.tanh(x @ w.T), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="bmc.cpu.flash_attention"):
        register_cpu_kernels(required=["bmc.cpu.flash_attention"])


def test_fast_math_matches_numpy():
    """float32 exp/tanh/erf/sigmoid/softmax/gelu through the fast-math rewrite stay within float32 rounding."""
    import tvm
    from scipy import special
    from tvm import relax

    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    x = (np.random.default_rng(0).standard_normal((4, 256)) * 6).astype("float32")
    x64 = x.astype(np.float64)
    sm = np.exp(x64 - x64.max(-1, keepdims=True))
    cases = {"exp": ({}, np.exp(x64)), "tanh": ({}, np.tanh(x64)), "erf": ({}, special.erf(x64)),
             "sigmoid": ({}, 1 / (1 + np.exp(-x64))), "softmax": ({"axis": -1}, sm / sm.sum(-1, keepdims=True)),
             "gelu": ({"approximate": "none"}, 0.5 * x64 * (1 + special.erf(x64 / np.sqrt(2)))),
             "gelu:tanh": ({"approximate": "tanh"},
                           0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3))))}
    for name, (attrs, ref) in cases.items():
        b = GraphBuilder("fm")
        v = b.input("x", TensorType("float32", x.shape))
        g = b.finish([b.emit1(name.split(":")[0], [v], **attrs)])
        built = build(g, TargetSpec.parse("llvm"))
        assert sum(built.kernels["cpu"]["fast_math"].values()) == 1, name
        got = relax.VirtualMachine(built.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * float(np.max(np.abs(ref))), err_msg=name)


def test_artifact_cpu_features_are_checked_against_the_host():
    from bmc.codegen.cpu import simd_features
    from bmc.codegen.targets import TargetSpec
    from bmc.runtime.kernels import check_host_cpu, host_cpu_features

    have = host_cpu_features()
    if have is None:
        pytest.skip("no /proc/cpuinfo feature flags on this host")
    features = simd_features(TargetSpec.parse("llvm").tvm_target())
    assert set(features) <= have  # built for this host: runs here
    check_host_cpu({"mcpu": "host", "features": features})
    check_host_cpu({"mcpu": "old", "features": []})  # older artifacts: nothing to check
    lacking = next(f for f in ("amx-tile", "sve2", "avx512fp16", "avx512f") if f not in have)
    with pytest.raises(RuntimeError, match=f"uses {lacking}, which this CPU lacks"):
        check_host_cpu({"mcpu": "future", "features": [*features, lacking]})


# ------------------------------------------------------------------------------------------ conv2d offload

CONV_CASES = [  # (x shape, w shape, strides, pads (top, left, bottom, right), dilations, groups); all offloaded
    ((1, 16, 20, 20), (32, 16, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),    # 3x3 "same"
    ((2, 16, 20, 18), (32, 16, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),    # batch 2, stride 2
    ((1, 64, 16, 16), (64, 64, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),    # 1x1: no im2col copy
    ((1, 64, 16, 16), (128, 64, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),   # 1x1 stride 2 (ResNet downsample)
    ((1, 3, 40, 40), (32, 3, 7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),      # ResNet stem
    ((1, 16, 21, 19), (24, 16, 3, 2), (2, 1), (0, 1, 2, 0), (2, 1), 1),    # asymmetric pads, dilation, odd sizes
    ((1, 32, 16, 16), (64, 8, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4),     # grouped
    ((1, 32, 17, 15), (32, 16, 3, 3), (1, 2), (2, 1, 0, 2), (2, 2), 2),    # grouped, dilated, strided
    ((1, 16, 6, 6), (16, 16, 3, 3), (1, 1), (4, 4, 5, 4), (1, 1), 1),      # pads wider than the kernel: zero rows
    ((1, 32, 64, 1), (32, 32, 3, 1), (1, 1), (1, 0, 1, 0), (1, 1), 1),     # one output column: a run per pixel
]


DEPTHWISE_CASES = [  # one input channel a group: bmc.cpu.conv2d's direct depthwise loop (float32)
    ((1, 32, 16, 16), (32, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32),   # 3x3 "same" (MobileNet)
    ((2, 48, 31, 29), (48, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 48),   # stride 2, odd sizes, batch 2: 4 phases
    ((1, 16, 20, 20), (16, 1, 7, 7), (1, 1), (3, 3, 3, 3), (1, 1), 16),   # 7x7 (ConvNeXt)
    ((1, 8, 19, 70), (16, 1, 3, 5), (1, 2), (0, 2, 1, 1), (2, 1), 8),     # 2 outputs a channel, dilated, 2 chunks
    ((1, 96, 30, 30), (96, 1, 3, 3), (3, 3), (1, 1, 1, 1), (1, 1), 96),   # stride 3: 9 phases
    ((1, 64, 7, 7), (64, 1, 5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 64),     # a 7x7 map: channels in vector lanes
    ((4, 40, 15, 15), (40, 1, 3, 3), (2, 2), (2, 1, 1, 2), (2, 2), 40),   # lanes: 16 + 16 + 8, strided, dilated
    ((1, 24, 14, 14), (24, 1, 7, 7), (1, 1), (3, 3, 3, 3), (1, 1), 24),   # lanes: a 14x14 map of 7x7 taps
    ((1, 64, 8, 8), (128, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 64),    # a small map, 2 outputs a channel: planes
]


GROUPED_CASES = [  # several input channels a group: bmc.cpu.conv2d's direct loop (up to 64 outputs a group, float32)
    ((1, 32, 12, 12), (32, 4, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8),    # ResNeXt's 4 channels a group
    ((2, 9, 23, 21), (15, 3, 3, 3), (2, 1), (1, 0, 2, 1), (1, 2), 3),     # 5 outputs (4 + 1), strided, dilated
    ((1, 4, 9, 9), (128, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),      # 64 outputs a group: the most direct
    ((1, 24, 20, 20), (36, 8, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 3),    # grouped 1x1 (ShuffleNet)
    ((1, 24, 41, 41), (24, 2, 3, 3), (3, 3), (1, 1, 1, 1), (1, 1), 12),   # stride 3: 9 phases a plane
    ((1, 64, 7, 7), (64, 32, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),     # a 7x7 map: wide rows of 9
    ((1, 4, 9, 9), (130, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),      # 65 outputs a group: a GEMM a group
    ((1, 144, 9, 9), (6, 72, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),     # 72 inputs a group: a GEMM of 3 rows
]


def _conv_graph(x_shape, w_shape, strides, pads, dilations, groups, dtype="float32"):
    b = GraphBuilder("conv")
    x = b.input("x", TensorType(dtype, x_shape))
    w = b.input("w", TensorType(dtype, w_shape))
    return b.finish([b.emit1("conv", [x, w], strides=strides, pads=pads, dilations=dilations, group=groups)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"{c[1][2]}x{c[1][3]}s{c[2]}p{c[3]}d{c[4]}g{c[5]}".replace(" ", "")
                                                  for c in CONV_CASES])
def test_offloaded_conv2d_matches_reference(impl, dtype, case):
    from bmc.ops import OPS

    x_shape, w_shape, strides, pads, dilations, groups = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    built, got = _run(_conv_graph(*case, dtype=dtype), [x, w], native=impl == "native")
    rec = built.kernels["cpu"]
    assert rec["conv2d"]["blas"] == 1 and rec["requires"] == ["bmc.cpu.conv2d"], rec
    (ref,) = OPS["conv"].reference([x, w], {"strides": strides, "pads": pads, "dilations": dilations,
                                            "group": groups})
    assert got.shape == ref.shape and got.dtype == ref.dtype
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * float(np.max(np.abs(ref))))


@pytest.mark.parametrize("case", DEPTHWISE_CASES + GROUPED_CASES,
                         ids=[f"{c[1][2]}x{c[1][3]}s{c[2]}c{c[1][1]}m{c[1][0] // c[5]}".replace(" ", "")
                              for c in DEPTHWISE_CASES + GROUPED_CASES])
def test_depthwise_and_grouped_conv2d_match_reference(impl, case):
    from bmc.ops import OPS

    x_shape, w_shape, strides, pads, dilations, groups = case
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal(x_shape).astype("float32"), rng.standard_normal(w_shape).astype("float32")
    built, got = _run(_conv_graph(*case), [x, w], native=impl == "native")
    rec = built.kernels["cpu"]
    assert rec["conv2d"]["blas"] == 1 and rec["requires"] == ["bmc.cpu.conv2d"], rec
    (ref,) = OPS["conv"].reference([x, w], {"strides": strides, "pads": pads, "dilations": dilations,
                                            "group": groups})
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))


CONV1D_CASES = [  # (x shape, w shape, strides, pads (begin, end), dilations, groups): as 2-D convs of height 1
    ((1, 80, 300), (64, 80, 3), (1,), (1, 1), (1,), 1),        # Whisper's first conv
    ((2, 64, 301), (64, 64, 3), (2,), (1, 1), (1,), 1),        # its second, stride 2, batch 2
    ((1, 1, 1600), (64, 1, 10), (5,), (0, 0), (1,), 1),        # wav2vec2's first (one input channel, K = 10)
    ((1, 48, 100), (48, 3, 16), (1,), (8, 7), (1,), 16),       # wav2vec2's positional conv: grouped, asymmetric pads
    ((1, 64, 400), (64, 1, 5), (1,), (4, 4), (2,), 64),        # depthwise, dilated (Conformer)
]


CONV3D_CASES = [  # (x, w, strides, pads (front, top, left, back, bottom, right), dilations, groups)
    ((1, 3, 8, 20, 20), (16, 3, 3, 7, 7), (1, 2, 2), (1, 3, 3, 1, 3, 3), (1, 1, 1), 1),  # a video stem
    ((2, 8, 6, 9, 10), (16, 8, 3, 3, 3), (2, 1, 2), (1, 0, 1, 0, 2, 1), (1, 2, 1), 1),  # strided, dilated, batch 2
    ((1, 16, 8, 16, 16), (32, 16, 1, 1, 1), (1, 1, 1), (0,) * 6, (1, 1, 1), 1),         # pointwise: the image itself
    ((1, 16, 8, 16, 16), (4, 16, 1, 1, 1), (1, 1, 1), (0,) * 6, (1, 1, 1), 1),          # 4 outputs: im2col + BLAS
    ((1, 32, 4, 8, 8), (32, 8, 3, 3, 3), (1, 1, 1), (1,) * 6, (1, 1, 1), 4),             # grouped: a GEMM a group
    ((1, 3, 16, 32, 32), (64, 3, 2, 16, 16), (2, 16, 16), (0,) * 6, (1, 1, 1), 1),      # VideoMAE's tubelets
]


@pytest.mark.parametrize("isa", ["host", "no_avx2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CONV1D_CASES + CONV3D_CASES,
                         ids=[f"{len(c[2])}d_k{'x'.join(map(str, c[1][2:]))}s{c[2][0]}g{c[5]}o{c[1][0]}"
                              for c in CONV1D_CASES + CONV3D_CASES])
def test_conv1d_and_conv3d_run_on_the_native_kernels(impl, dtype, case, isa, monkeypatch):
    """A 1-D convolution is a 2-D one of height 1 on the CPU (reshapes, no copies), a 3-D one ``bmc.cpu.conv3d``
    (the panel GEMM on its column matrix, a depth more than a 2-D one's); without AVX2 (``BMC_CPU_NO_AVX2``), and
    for a pointwise conv of few outputs, im2col + the BLAS. TVM's conv1d and conv3d loop nests took 60-100x
    onnxruntime's time (Whisper's and wav2vec2's front ends, video stems)."""
    import ml_dtypes

    from bmc.ops import OPS

    if isa == "no_avx2":  # (the numpy kernels have one path either way)
        monkeypatch.setenv("BMC_CPU_NO_AVX2", "1")
    x_shape, w_shape, strides, pads, dilations, groups = case
    t = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(x_shape).astype(t), rng.standard_normal(w_shape).astype(t)
    built, got = _run(_conv_graph(*case, dtype=dtype), [x, w], native=impl == "native")
    kind = "conv3d" if len(w_shape) == 5 else "conv2d"
    rec = built.kernels["cpu"]
    assert rec[kind]["blas"] == 1 and rec[kind]["tvm"] == 0 and rec["requires"] == [f"bmc.cpu.{kind}"], rec
    (ref,) = OPS["conv"].reference([x.astype(np.float32), w.astype(np.float32)],
                                   {"strides": strides, "pads": pads, "dilations": dilations, "group": groups})
    assert got.shape == ref.shape and got.dtype == t
    tol = 2.0 ** -7 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=tol, atol=tol * float(np.max(np.abs(ref))))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[5], CONV_CASES[7], DEPTHWISE_CASES[1]],
                         ids=["3x3", "1x1", "dilated", "grouped", "depthwise"])
def test_half_conv2d_is_offloaded_in_float32(impl, dtype, case):
    """A float16/bfloat16 convolution (float32 accumulation) goes to the kernel too, which widens x and w to float32:
    equal to the float32 convolution of the same values rounded to the dtype (1 unit of its last place)."""
    import ml_dtypes

    from bmc.ops import OPS

    x_shape, w_shape, strides, pads, dilations, groups = case
    t = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal(x_shape).astype(t), rng.standard_normal(w_shape).astype(t)
    built, got = _run(_conv_graph(*case, dtype=dtype), [x, w], native=impl == "native")
    rec = built.kernels["cpu"]
    assert rec["conv2d"]["blas"] == 1 and rec["requires"] == ["bmc.cpu.conv2d"], rec
    (ref,) = OPS["conv"].reference([x.astype(np.float32), w.astype(np.float32)],
                                   {"strides": strides, "pads": pads, "dilations": dilations, "group": groups})
    ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    assert got.dtype == t
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=ulp, atol=ulp * 1e-2 * float(np.abs(ref).max()))


@pytest.mark.parametrize("case", CONV_CASES[:1] + CONV_CASES[5:] + DEPTHWISE_CASES[3:4])
def test_conv2d_numpy_kernel_matches_reference(case):
    """The kernel itself (no compile), allocating its output, against the op's numpy reference."""
    from bmc.ops import OPS
    from bmc.runtime.kernels import conv2d_numpy

    x_shape, w_shape, strides, pads, dilations, groups = case
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal(x_shape).astype("float32"), rng.standard_normal(w_shape).astype("float32")
    (ref,) = OPS["conv"].reference([x, w], {"strides": strides, "pads": pads, "dilations": dilations,
                                            "group": groups})
    np.testing.assert_allclose(conv2d_numpy(x, w, strides, pads, dilations, groups), ref, rtol=1e-5,
                               atol=1e-5 * float(np.max(np.abs(ref))))


EPILOGUE_CASES = CONV_CASES + [((1, 64, 16, 16), (8, 64, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # 1x1, 8 rows
                                ((3, 1344, 1, 1), (56, 1344, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # one pixel
                                DEPTHWISE_CASES[1], DEPTHWISE_CASES[3], DEPTHWISE_CASES[6]]


def _epilogue_case(case, seed: int):
    """A conv case's attributes, its random generator after drawing x and w, x, w, and the reference conv."""
    from bmc.ops import OPS

    x_shape, w_shape, strides, pads, dilations, groups = case
    attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": groups}
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape).astype("float32"), rng.standard_normal(w_shape).astype("float32")
    (conv,) = OPS["conv"].reference([x, w], attrs)
    return attrs, rng, x, w, conv


@pytest.mark.parametrize("case", EPILOGUE_CASES, ids=[f"{c[1][2]}x{c[1][3]}s{c[2]}p{c[3]}g{c[5]}o{c[1][0]}"
                                                      .replace(" ", "") for c in EPILOGUE_CASES])
def test_conv_epilogue_is_fused_into_the_kernel(impl, case):
    """``relu(conv(x, w) * s - m + b + residual)`` (a batch norm's per-channel scale and shift, in both broadcast
    forms, a residual add, a ReLU) becomes one ``bmc.cpu.conv2d_fused`` call, which applies them as the panel GEMM
    stores each block (or after the im2col + BLAS path: 1x1 with <= 8 output channels, and the numpy kernel).
    The scale and shift are computed by the program from parameters (here), or at compile time from constants
    (:func:`test_conv_epilogue_of_constants_is_folded_at_compile_time`)."""
    attrs, rng, x, w, conv = _epilogue_case(case, seed=3)
    c = w.shape[0]
    s, m = rng.uniform(0.5, 2, (c, 1, 1)).astype("float32"), rng.standard_normal((1, c, 1, 1)).astype("float32")
    bias, residual = rng.standard_normal((c, 1, 1)).astype("float32"), rng.standard_normal(conv.shape).astype("float32")
    b = GraphBuilder("conv_epilogue")
    xv, wv, rv = (b.input(n, TensorType("float32", a.shape)) for n, a in (("x", x), ("w", w), ("r", residual)))
    y = b.emit1("conv", [xv, wv], **attrs)
    for op, value in (("mul", s), ("sub", m), ("add", bias)):
        y = b.emit1(op, [y, b.param(f"p{op}", value)])
    y = b.emit1("relu", [b.emit1("add", [rv, y])])
    built, got = _run(b.finish([y]), [x, w, residual, s, m, bias], native=impl == "native")  # inputs, params
    rec = built.kernels["cpu"]
    assert rec["conv2d"]["fused"] == 1 and rec["requires"] == ["bmc.cpu.conv2d_fused"], rec
    ref = np.maximum(conv * s - m + bias + residual, 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))


#: activations a conv epilogue ends with: (name, how the graph writes it, numpy reference); every clamp reaches
#: both of its bounds on these convs' outputs (a standard deviation of ~12 to ~100)
CONV_ACTIVATION_CASES = [
    ("relu6", lambda b, y: b.emit1("clip", [y], min=0.0, max=6.0), lambda v: np.clip(v, 0, 6)),
    ("clip_tensors", lambda b, y: b.emit1("minimum", [b.emit1("maximum", [y, b.constant(np.float32(-7.5))]),
                                                      b.constant(np.float32(5.25))]), lambda v: np.clip(v, -7.5, 5.25)),
    ("max_only", lambda b, y: b.emit1("maximum", [b.constant(np.float32(-2.0)), y]), lambda v: np.maximum(v, -2)),
    ("min_only", lambda b, y: b.emit1("minimum", [y, b.constant(np.float32(3.0))]), lambda v: np.minimum(v, 3)),
    ("crossed", lambda b, y: b.emit1("maximum", [b.emit1("minimum", [y, b.constant(np.float32(-1.0))]),
                                                 b.constant(np.float32(2.0))]),  # all 2: only the minimum fuses
     lambda v: np.maximum(np.minimum(v, -1), 2)),
    ("silu", lambda b, y: b.emit1("mul", [y, b.emit1("sigmoid", [y])]), lambda v: v / (1 + np.exp(-v))),
    ("silu_swapped", lambda b, y: b.emit1("mul", [b.emit1("sigmoid", [y]), y]), lambda v: v / (1 + np.exp(-v))),
    ("hardswish", lambda b, y: b.emit1("mul", [y, b.emit1("clip", [b.emit1("add", [b.emit1(  # as the importer writes it
        "mul", [y, b.constant(np.float32(1 / 6))]), b.constant(np.float32(0.5))])], min=0.0, max=1.0)]),
     lambda v: v * np.clip(v / 6 + 0.5, 0, 1)),
]


@pytest.mark.parametrize("residual", [False, True], ids=["bn", "bn_residual"])
@pytest.mark.parametrize("case", [CONV_CASES[0], EPILOGUE_CASES[-5], EPILOGUE_CASES[-4], DEPTHWISE_CASES[1],
                                  DEPTHWISE_CASES[5], GROUPED_CASES[1], CONV1D_CASES[1]],
                         ids=["3x3", "1x1_8rows", "one_pixel", "depthwise", "dw_lanes", "grouped", "conv1d"])
@pytest.mark.parametrize("act", CONV_ACTIVATION_CASES, ids=[a[0] for a in CONV_ACTIVATION_CASES])
def test_conv_activation_is_fused_into_the_kernel(impl, act, case, residual):
    """A clamp (ReLU6, an opset-11 Clip's maximum and minimum with scalar constants, either alone) or a SiLU
    (``v * sigmoid(v)``, as exporters write it) after a conv's batch norm (and residual add) becomes one
    ``bmc.cpu.conv2d_fused_act`` call, on the GEMM, the im2col + BLAS and the depthwise paths, and after a 1-D
    conv through the reshape that drops its unit height (the call's result reshaped back)."""
    name, write, reference = act
    attrs, rng, x, w, conv = _epilogue_case(case, seed=8)
    channel = (w.shape[0],) + (1,) * (x.ndim - 2)  # [C, 1, 1] (2-D) or [C, 1] (1-D)
    s, t = rng.uniform(0.5, 2, channel).astype("float32"), rng.standard_normal(channel).astype("float32")
    r = rng.standard_normal(conv.shape).astype("float32")
    b = GraphBuilder("conv_activation")
    xv, wv = b.input("x", TensorType("float32", x.shape)), b.input("w", TensorType("float32", w.shape))
    y = b.emit1("add", [b.emit1("mul", [b.emit1("conv", [xv, wv], **attrs), b.param("s", s)]), b.param("t", t)])
    if residual:
        y = b.emit1("add", [y, b.input("r", TensorType("float32", r.shape))])
    y = write(b, y)
    arrays = [x, w, r, s, t] if residual else [x, w, s, t]
    built, got = _run(b.finish([y]), arrays, native=impl == "native")
    rec = built.kernels["cpu"]
    assert rec["conv2d"]["fused"] == 1 and rec["requires"] == ["bmc.cpu.conv2d_fused_act"], rec
    ref = reference((conv * s + t + (r if residual else 0)).astype("float64"))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))


def test_fused_silu_is_accurate_over_the_whole_range(impl):
    """The native SiLU (an exp polynomial of -|v|) against float64 over [-100, 100] and tiny values: a 1x1 conv with
    an identity weight passes x through exactly."""
    values = np.concatenate([np.linspace(-100, 100, 2001), [0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 1e-3, -1e-3]])
    c = 4
    x = np.resize(values, (1, c, 1, (values.size + c - 1) // c)).astype("float32")
    b = GraphBuilder("silu_range")
    y = b.emit1("conv", [b.input("x", TensorType("float32", x.shape)), b.param("w", np.eye(c, dtype="float32")
                                                                                .reshape(c, c, 1, 1))],
                strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1)
    y = b.emit1("mul", [y, b.emit1("sigmoid", [y])])
    import tvm
    from tvm import relax

    from bmc.codegen.cpu import fuse_conv_epilogues, offload_matmul
    from bmc.codegen.relax_module import to_relax
    from bmc.runtime.kernels import register_cpu_kernels

    register_cpu_kernels(native=impl == "native")
    mod = relax.transform.DeadCodeElimination()(fuse_conv_epilogues()(offload_matmul(conv=True)(
        to_relax(b.finish([y]), "llvm"))))
    ex = relax.build(mod, tvm.target.Target("llvm"))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(
        np.eye(c, dtype="float32").reshape(c, c, 1, 1)))[0].numpy()
    v = x.astype("float64")
    ref = v / (1 + np.exp(-v))
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("graph", ["sigmoid_read_twice", "sigmoid_of_another", "per_channel_max", "clamp_then_add",
                                   "hard_sigmoid_gate"])
def test_conv_activation_stops_where_it_is_not_one(graph):
    """What looks like an activation but is not one ends the chain before it: a sigmoid also read elsewhere, ``v *
    sigmoid(u)`` of another value, a maximum with a tensor, an add after a clamp (the clamp is fused, the add
    stays), and ``v * hard_sigmoid(v)`` with HardSigmoid's default slope 0.2 instead of HardSwish's 1/6."""
    from bmc.ops import OPS

    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 16, 10, 10)).astype("float32")
    w = rng.standard_normal((32, 16, 3, 3)).astype("float32")
    other = rng.standard_normal((1, 32, 10, 10)).astype("float32")
    attrs = {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1), "group": 1}
    b = GraphBuilder(graph)
    xv, ov = b.input("x", TensorType("float32", x.shape)), b.input("o", TensorType("float32", other.shape))
    y = b.emit1("conv", [xv, b.param("w", w)], **attrs)
    (conv,) = OPS["conv"].reference([x, w], attrs)
    sig = 1 / (1 + np.exp(-conv.astype("float64")))
    if graph == "sigmoid_read_twice":
        sy = b.emit1("sigmoid", [y])
        outs, refs, fused = [b.emit1("mul", [y, sy]), sy], [conv * sig, sig], None
    elif graph == "sigmoid_of_another":
        osig = 1 / (1 + np.exp(-other.astype("float64")))
        outs, refs, fused = [b.emit1("mul", [y, b.emit1("sigmoid", [ov])])], [conv * osig], None
    elif graph == "per_channel_max":
        bound = rng.standard_normal((32, 1, 1)).astype("float32")
        outs, refs, fused = [b.emit1("maximum", [y, b.constant(bound)])], [np.maximum(conv, bound)], None
    elif graph == "hard_sigmoid_gate":
        gate = b.emit1("clip", [b.emit1("add", [b.emit1("mul", [y, b.constant(np.float32(0.2))]),
                                                b.constant(np.float32(0.5))])], min=0.0, max=1.0)
        outs, refs, fused = [b.emit1("mul", [y, gate])], [conv * np.clip(conv * 0.2 + 0.5, 0, 1)], None
    else:
        outs = [b.emit1("add", [b.emit1("clip", [y], min=0.0, max=6.0), ov])]
        refs, fused = [np.clip(conv, 0, 6) + other], "bmc.cpu.conv2d_fused_act"
    import tvm
    from tvm import relax

    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    built = build(b.finish(outs), TargetSpec.parse("llvm"))
    rec = built.kernels["cpu"]
    assert rec["conv2d"].get("fused", 0) == (fused is not None), rec
    assert rec["requires"] == [fused or "bmc.cpu.conv2d"], rec
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(other), tvm.runtime.tensor(w))
    assert len(got) == len(refs)
    for out, ref in zip(got, refs):
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))


def test_conv_epilogue_of_constants_is_folded_at_compile_time():
    """A batch norm whose statistics are constants (ResNet-50 from onnx's test data builds its weights with
    ConstantOfShape): scale and shift become numbers in the fused call, with no kernel left to compute them."""
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec
    from bmc.ops import OPS

    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 16, 10, 10)).astype("float32")
    w = rng.standard_normal((24, 16, 3, 3)).astype("float32")
    s, m, t = rng.uniform(0.5, 2, 24), rng.standard_normal(24), rng.standard_normal(24)
    attrs = {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1), "group": 1}
    b = GraphBuilder("conv_constants")
    y = b.emit1("conv", [b.input("x", TensorType("float32", x.shape)), b.param("w", w)], **attrs)
    for op, value in (("sub", m), ("mul", s), ("add", t)):
        y = b.emit1(op, [y, b.constant(value.reshape(24, 1, 1).astype("float32"))])
    g = b.finish([b.emit1("relu", [y])])
    built = build(g, TargetSpec.parse("llvm"))
    assert built.kernels["cpu"]["conv2d"]["fused"] == 1
    import tvm
    from tvm import relax

    from bmc.codegen.cpu import fuse_conv_epilogues, offload_matmul
    from bmc.codegen.relax_module import to_relax

    mod = fuse_conv_epilogues()(offload_matmul()(to_relax(g, "llvm")))
    calls = [bd.value for block in mod["main"].body.blocks for bd in block.bindings
             if isinstance(bd.value, relax.Call) and bd.value.op.name == "relax.call_dps_packed"]
    (call,) = calls
    scale, shift = call.args[1].fields[2:4]
    assert isinstance(scale, tvm.ir.expr.Constant) and isinstance(shift, tvm.ir.expr.Constant)
    np.testing.assert_allclose(shift.value.numpy(), (t - m * s).astype("float32"), rtol=1e-6, atol=1e-6)

    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w))[0].numpy()
    (conv,) = OPS["conv"].reference([x, w], attrs)
    ref = np.maximum((conv - m.reshape(24, 1, 1)) * s.reshape(24, 1, 1) + t.reshape(24, 1, 1), 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))


def test_conv_epilogue_stops_where_a_value_is_read_twice():
    """A conv result that is also an output, or a link read by two ops, ends the chain there: the part before is
    fused, nothing is computed twice."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 16, 10, 10)).astype("float32")
    w = rng.standard_normal((32, 16, 3, 3)).astype("float32")
    bias = rng.standard_normal((32, 1, 1)).astype("float32")
    attrs = {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1), "group": 1}
    b = GraphBuilder("conv_twice")
    xv, wv = b.input("x", TensorType("float32", x.shape)), b.input("w", TensorType("float32", w.shape))
    biased = b.emit1("add", [b.emit1("conv", [xv, wv], **attrs), b.param("bias", bias)])
    outs = [b.emit1("relu", [biased]), b.emit1("sigmoid", [biased])]
    g = b.finish(outs)
    import tvm
    from tvm import relax

    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec
    from bmc.ops import OPS

    built = build(g, TargetSpec.parse("llvm"))
    rec = built.kernels["cpu"]
    assert rec["conv2d"]["fused"] == 1 and rec["requires"] == ["bmc.cpu.conv2d_fused"], rec  # conv + bias only
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    got = [t.numpy() for t in vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(bias))]
    (conv,) = OPS["conv"].reference([x, w], attrs)
    for out, ref in zip(got, (np.maximum(conv + bias, 0), 1 / (1 + np.exp(-(conv + bias))))):
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))


def test_conv_branches_meeting_at_a_residual_add_are_both_fused(impl):
    """A residual block with a projection: ``relu(bn(conv_a(x)) + bn(conv_b(x)))``. The first conv's call takes
    the add and the ReLU, the second's ends with its own batch norm and is read as the residual."""
    from bmc.ops import OPS

    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 16, 12, 12)).astype("float32")
    wa, wb = (rng.standard_normal((32, 16, k, k)).astype("float32") for k in (3, 1))
    scales = [rng.uniform(0.5, 2, (32, 1, 1)).astype("float32") for _ in range(2)]
    shifts = [rng.standard_normal((32, 1, 1)).astype("float32") for _ in range(2)]
    b = GraphBuilder("residual_block")
    xv = b.input("x", TensorType("float32", x.shape))
    branches = []
    for i, (w, pads) in enumerate(((wa, (1, 1, 1, 1)), (wb, (0, 0, 0, 0)))):
        y = b.emit1("conv", [xv, b.param(f"w{i}", w)], strides=(1, 1), pads=pads, dilations=(1, 1), group=1)
        y = b.emit1("mul", [y, b.param(f"s{i}", scales[i])])
        branches.append(b.emit1("add", [y, b.param(f"t{i}", shifts[i])]))
    g = b.finish([b.emit1("relu", [b.emit1("add", branches)])])
    built, got = _run(g, [x, wa, scales[0], shifts[0], wb, scales[1], shifts[1]], native=impl == "native")
    rec = built.kernels["cpu"]
    assert rec["conv2d"]["blas"] == 2 and rec["conv2d"]["fused"] == 2, rec
    ref = 0
    for w, s, t, p in ((wa, scales[0], shifts[0], (1, 1, 1, 1)), (wb, scales[1], shifts[1], (0, 0, 0, 0))):
        (conv,) = OPS["conv"].reference([x, w], {"strides": (1, 1), "pads": p, "dilations": (1, 1), "group": 1})
        ref = ref + conv * s + t
    ref = np.maximum(ref, 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))


def test_small_depthwise_and_integer_convs_stay_in_tvm():
    from bmc.codegen.cpu import choose_conv2d

    assert choose_conv2d((1, 4, 8, 8), (4, 4, 3, 3), (1, 4, 8, 8), 1, "float32") == "tvm"  # 9k MACs: tiny
    assert choose_conv2d((1, 64, 56, 56), (64, 64, 3, 3), (1, 64, 56, 56), 1, "float32") == "blas"
    assert choose_conv2d((1, 64, 56, 56), (64, 1, 3, 3), (1, 64, 56, 56), 64, "float32") == "blas"  # depthwise
    assert choose_conv2d((1, 2, 56, 56), (192, 1, 3, 3), (1, 192, 56, 56), 2, "float32") == "blas"  # 96 a channel
    assert choose_conv2d((1, 64, 56, 56), (64, 1, 3, 3), (1, 64, 56, 56), 64, "float64") == "tvm"
    assert choose_conv2d((1, 64, 56, 56), (128, 2, 3, 3), (1, 64, 56, 56), 64, "float32") == "blas"  # 2 a group
    assert choose_conv2d((1, 64, 56, 56), (128, 2, 3, 3), (1, 64, 56, 56), 64, "float64") == "tvm"
    assert choose_conv2d((1, 1, 112, 112), (32, 1, 3, 3), (1, 32, 112, 112), 1, "float32") == "blas"  # K = 9
    from bmc.codegen.cpu import choose_conv3d

    assert choose_conv3d((1, 64, 8, 28, 28), (64, 64, 3, 3, 3), (1, 64, 8, 28, 28), 1, "float32") == "blas"
    assert choose_conv3d((1, 64, 8, 28, 28), (64, 1, 3, 3, 3), (1, 64, 8, 28, 28), 64, "float32") == "tvm"
    assert choose_conv3d((1, 4, 2, 4, 4), (4, 4, 3, 3, 3), (1, 4, 2, 4, 4), 1, "float32") == "tvm"  # tiny
    assert choose_conv3d((1, 64, 8, 28, 28), (64, 64, 3, 3, 3), (1, 64, 8, 28, 28), 1, "float64") == "tvm"
    assert choose_conv2d((1, 64, 56, 56), (64, 64, 3, 3), (1, 64, 56, 56), 1, "float16") == "tvm"
    rng = np.random.default_rng(2)
    case = ((1, 8, 8, 8), (8, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8)  # a tiny depthwise: stays in TVM
    x, w = rng.standard_normal(case[0]).astype("float32"), rng.standard_normal(case[1]).astype("float32")
    built, got = _run(_conv_graph(*case), [x, w], native=False)
    assert built.kernels["cpu"]["conv2d"] == {"blas": 0, "tvm": 1, "shapes": {}}
    assert built.kernels["cpu"]["requires"] == []
    from bmc.ops import OPS

    (ref,) = OPS["conv"].reference([x, w], {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1),
                                            "group": 8})
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))


ATTENTION_CASES = [  # (batch, M, N, D, E, bias shape or None): tiles are 12 (AVX-512) or 6 rows x 16 columns;
    # blocks 65536 scores
    ((2, 3), 7, 19, 5, 6, (2, 1, 7, 19)),   # tails everywhere, bias broadcast over heads
    ((4,), 128, 128, 64, 64, (128, 128)),   # whole tiles, a 2-D bias (every batch index)
    ((1,), 600, 300, 33, 40, None),         # several row blocks (218 rows each), no bias
    ((2,), 5, 1, 3, 2, (2, 5, 1)),          # one key; the bias broadcast over keys (stride 0)
    ((3,), 1, 40, 8, 8, (1, 40)),           # one query row (decoding)
    ((2,), 10, 7000, 8, 4, (10, 7000)),     # few rows, many keys: two blocks of a batch index (6 rows, then 4)
    ((1,), 20, 7000, 8, 4, (20, 7000)),     # the same with AVX-512 tiles (12 rows, then 8)
]


@pytest.mark.parametrize("lse", [False, True], ids=["", "lse"])
@pytest.mark.parametrize("transpose_k", [False, True], ids=["kt", "k"])
@pytest.mark.parametrize("batch,m,n,d,e,bias_shape", ATTENTION_CASES,
                         ids=[f"{b}x{m}x{n}x{d}x{e}-{s}" for b, m, n, d, e, s in ATTENTION_CASES])
def test_attention_kernel_matches_reference(impl, batch, m, n, d, e, bias_shape, transpose_k, lse):
    """``bmc.cpu.attention[_bias]`` against the op's reference (the unfused composition): float32 rounding apart,
    1e-5 of max |ref| (the kernel sums in its own order and uses a polynomial exp; the scores reach ~20 here, where
    float32 sums of 64 products differ by ~1e-6, and the softmax carries that into the weights); masked entries
    (-3.4e38 and -inf in the bias) get no weight. The key comes as kt ``[..., D, N]`` or as k ``[..., N, D]`` (``transpose_k``:
    packed transposed for many query rows, dot products in place for few). ``bmc.cpu.attention[_bias]_lse`` also
    stores each row's log-sum-exp: within 1e-5 of the reference's, relative to max(1, |lse|)."""
    import tvm_ffi

    from bmc.ops import get_op
    from bmc.runtime import kernels as K

    rng = np.random.default_rng(m * n)
    q, kt = rng.standard_normal(batch + (m, d), np.float32), rng.standard_normal(batch + (d, n), np.float32) * 3
    v = rng.standard_normal(batch + (n, e), np.float32)
    args = [q, np.ascontiguousarray(np.swapaxes(kt, -1, -2)) if transpose_k else kt, v]
    if bias_shape is not None:
        bias = rng.standard_normal(bias_shape, np.float32)
        if bias_shape[-1] > 1:  # a causal-style mask (never a whole row) with both fills
            bias[..., 1:2] = -np.inf
            bias[..., 2:] = np.where(rng.random(bias[..., 2:].shape) < 0.3, np.float32(-3.4e38), bias[..., 2:])
        args.append(bias)
    outs = [np.full(batch + (m, e), np.nan, np.float32)] + ([np.full(batch + (m,), np.nan, np.float32)] if lse else [])
    kernel = ([K.ATTENTION_KERNEL, K.ATTENTION_BIAS_KERNEL], [K.ATTENTION_LSE_KERNEL,
                                                               K.ATTENTION_BIAS_LSE_KERNEL])[lse][bias_shape is not None]
    K.register_cpu_kernels(native=impl == "native")
    tvm_ffi.get_global_func(kernel)(*[tvm_ffi.from_dlpack(x) for x in args], 0.3, transpose_k,
                                    *[tvm_ffi.from_dlpack(x) for x in outs])
    want = get_op("attention").reference(args, {"scale": 0.3, "transpose_k": transpose_k, "lse": lse})
    np.testing.assert_allclose(outs[0], want[0], rtol=0, atol=1e-5 * float(np.abs(want[0]).max()))
    if lse:
        np.testing.assert_allclose(outs[1], want[1], rtol=0, atol=1e-5 * max(1.0, float(np.abs(want[1]).max())))


SOFTCAP_CASES = [  # (batch, M, N, D, E, bias shape: () is the scalar 0 the lowering passes for none)
    ((2, 3), 7, 19, 5, 6, (2, 1, 7, 19)),  # tails, bias broadcast over heads
    ((4,), 128, 128, 64, 64, ()),          # packed panels, no bias
    ((3,), 1, 40, 8, 8, (1, 40)),          # one query row (decoding: the few-row tiles with k)
]


@pytest.mark.parametrize("lse", [False, True], ids=["", "lse"])
@pytest.mark.parametrize("transpose_k", [False, True], ids=["kt", "k"])
@pytest.mark.parametrize("batch,m,n,d,e,bias_shape", SOFTCAP_CASES,
                         ids=[f"{b}x{m}x{n}x{d}x{e}-{s}" for b, m, n, d, e, s in SOFTCAP_CASES])
def test_attention_kernel_soft_caps_the_scores(impl, batch, m, n, d, e, bias_shape, transpose_k, lse):
    """``bmc.cpu.attention_softcap[_lse]`` (Gemma 2): the scaled scores capped to ``c * tanh(s / c)`` before the
    bias, against the op's reference (the composition ``mul, div, tanh, mul, add, softmax, matmul``) within 1e-5
    of max |ref|; c = 4 against scores of a few units to ~20, so the tanh runs from linear to saturated. The
    log-sum-exp is that of the capped scores."""
    import tvm_ffi

    from bmc.ops import get_op
    from bmc.runtime import kernels as K

    rng = np.random.default_rng(m * n + 1)
    q, kt = rng.standard_normal(batch + (m, d), np.float32), rng.standard_normal(batch + (d, n), np.float32) * 3
    v = rng.standard_normal(batch + (n, e), np.float32)
    bias = rng.standard_normal(bias_shape, np.float32) if bias_shape else np.zeros((), np.float32)
    if bias_shape:
        bias[..., 1:2] = np.float32(-3.4e38)
    args = [q, np.ascontiguousarray(np.swapaxes(kt, -1, -2)) if transpose_k else kt, v, bias]
    outs = [np.full(batch + (m, e), np.nan, np.float32)] + ([np.full(batch + (m,), np.nan, np.float32)] if lse else [])
    K.register_cpu_kernels(native=impl == "native")
    tvm_ffi.get_global_func(K.ATTENTION_SOFTCAP_LSE_KERNEL if lse else K.ATTENTION_SOFTCAP_KERNEL)(
        *[tvm_ffi.from_dlpack(x) for x in args], 0.3, 4.0, transpose_k, *[tvm_ffi.from_dlpack(x) for x in outs])
    want = get_op("attention").reference(args, {"scale": 0.3, "transpose_k": transpose_k, "lse": lse,
                                                "softcap": 4.0})
    np.testing.assert_allclose(outs[0], want[0], rtol=0, atol=1e-5 * float(np.abs(want[0]).max()))
    if lse:
        np.testing.assert_allclose(outs[1], want[1], rtol=0, atol=1e-5 * max(1.0, float(np.abs(want[1]).max())))


def _tensor(x):
    """``x`` as a TVM tensor (ml_dtypes' bfloat16 crosses DLPack as uint16, viewed back as bfloat16)."""
    import tvm  # noqa: F401  (gives tvm_ffi's tensors _create_view)
    import tvm_ffi

    if x.dtype.kind != "V":
        return tvm_ffi.from_dlpack(x)
    return tvm_ffi.from_dlpack(x.view(np.uint16))._create_view(x.shape, str(x.dtype))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("transpose_k", [False, True], ids=["kt", "k"])
@pytest.mark.parametrize("m", [1, 40], ids=["decoding", "packed"])
def test_attention_kernel_reads_16_bit_keys_and_values(impl, dtype, transpose_k, m):
    """Keys and values in float16/bfloat16 (a 16-bit cache, read as it is) against the float32 kernel on the
    widened keys and values, exactly: a decoding step's few rows with the key as rows read them in place, 8 widened
    in registers at a time, by the same tiles as float32 ones; every other case widens a batch index's keys and
    values once and runs the float32 code, for few query rows and for many (packed panels). Without AVX2 the
    few-row loops for 16 bits sum in their own order: within 1e-6 of the output's scale."""
    import tvm_ffi

    from bmc.ir.types import np_dtype
    from bmc.runtime import kernels as K

    rng = np.random.default_rng(5)
    batch, n, d, e = (2, 3), 37, 16, 8
    q = rng.standard_normal(batch + (m, d), np.float32)
    k = (rng.standard_normal(batch + ((n, d) if transpose_k else (d, n))) * 2).astype(np_dtype(dtype))
    v = rng.standard_normal(batch + (n, e)).astype(np_dtype(dtype))
    bias = np.where(rng.random((m, n)) < 0.2, np.float32(-3.4e38), np.float32(0)).astype(np.float32)
    K.register_cpu_kernels(native=impl == "native")
    kernel = tvm_ffi.get_global_func(K.ATTENTION_BIAS_KERNEL)
    got, want = (np.zeros(batch + (m, e), np.float32) for _ in range(2))
    kernel(*[_tensor(x) for x in (q, k, v, bias)], 0.25, transpose_k, _tensor(got))
    kernel(*[_tensor(x.astype(np.float32)) for x in (q, k, v, bias)], 0.25, transpose_k, _tensor(want))
    if impl == "native" and m == 1 and transpose_k and os.environ.get("BMC_CPU_NO_AVX2"):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kv_batch", [(2, 3), (1, 3), (2, 1)], ids=["grouped", "grouped-batch-1", "multi-query"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transpose_k", [False, True], ids=["kt", "k"])
@pytest.mark.parametrize("m", [1, 3, 40], ids=["decoding", "three-rows", "packed"])
def test_attention_kernel_reads_grouped_keys_and_values(impl, kv_batch, dtype, transpose_k, m):
    """Keys and values whose batch dims divide q's ``(2, 6)`` (query head i reads key/value head i // group; a dim
    of 1 is read by every index) give exactly what the kernel gives on keys and values repeated to q's batch dims
    (``np.repeat``, what the exporters' ``repeat_kv`` copies), on every path: few rows in place (the rows of the
    query heads sharing a key/value head together, up to 8), packed panels, and 16-bit keys and values."""
    import tvm_ffi

    from bmc.ir.types import np_dtype
    from bmc.runtime import kernels as K

    rng = np.random.default_rng(11)
    batch, n, d, e = (2, 6), 23, 16, 8
    q = rng.standard_normal(batch + (m, d), np.float32)
    k = rng.standard_normal(kv_batch + ((n, d) if transpose_k else (d, n))).astype(np_dtype(dtype))
    v = rng.standard_normal(kv_batch + (n, e)).astype(np_dtype(dtype))
    bias = np.where(rng.random((m, n)) < 0.2, np.float32(-3.4e38), np.float32(0)).astype(np.float32)
    whole = [np.ascontiguousarray(np.repeat(np.repeat(x, batch[0] // x.shape[0], 0), batch[1] // x.shape[1], 1))
             for x in (k, v)]
    K.register_cpu_kernels(native=impl == "native")
    kernel = tvm_ffi.get_global_func(K.ATTENTION_BIAS_KERNEL)
    got, want = (np.full(batch + (m, e), np.nan, np.float32) for _ in range(2))
    kernel(*[_tensor(x) for x in (q, k, v, bias)], 0.25, transpose_k, _tensor(got))
    kernel(*[_tensor(x) for x in (q, *whole, bias)], 0.25, transpose_k, _tensor(want))
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fill", [-3.4e38, -np.inf])
def test_attention_kernel_skips_masked_keys_exactly(impl, fill):
    """A causal mask: each block of query rows skips the keys masked for all of them (half the work); a row
    masked everywhere with a finite fill attends to every key alike, as the reference's softmax does (with -inf it
    is NaN in both, and its log-sum-exp -inf)."""
    import tvm_ffi

    from bmc.ops import get_op
    from bmc.runtime.kernels import ATTENTION_BIAS_LSE_KERNEL, register_cpu_kernels

    register_cpu_kernels(native=impl == "native")
    rng = np.random.default_rng(3)
    m = n = 300  # 216-row blocks: the first needs 216 keys, the second (with row 5) every key
    q, kt, v = (rng.standard_normal(s, np.float32) for s in ((2, m, 16), (2, 16, n), (2, n, 8)))
    bias = np.where(np.tril(np.ones((m, n), bool)), 0, np.float32(fill)).astype(np.float32)
    bias[5] = fill
    out, lse = np.zeros((2, m, 8), np.float32), np.zeros((2, m), np.float32)
    tvm_ffi.get_global_func(ATTENTION_BIAS_LSE_KERNEL)(*[tvm_ffi.from_dlpack(x) for x in (q, kt, v, bias)], 0.5,
                                                        False, tvm_ffi.from_dlpack(out), tvm_ffi.from_dlpack(lse))
    with np.errstate(invalid="ignore"):
        want, want_lse = get_op("attention").reference([q, kt, v, bias], {"scale": 0.5, "transpose_k": False,
                                                                          "lse": True})
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-6 * float(np.nanmax(np.abs(want))), equal_nan=True)
    finite = np.abs(want_lse[np.isfinite(want_lse)])
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-5 * max(1.0, float(finite.max())))
    assert np.isneginf(lse[:, 5]).all() == (fill == -np.inf)
    assert np.isnan(out[:, 5]).all() == (fill == -np.inf)
    if fill != -np.inf:
        np.testing.assert_allclose(out[:, 5], v.mean(axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m,dtype", [(300, "float32"), (1, "float32"), (1, "bfloat16"), (3, "float16")],
                         ids=["packed", "decoding", "decoding-bf16", "rows-f16"])
def test_attention_kernel_skips_keys_outside_a_sliding_window(impl, m, dtype):
    """A causal sliding window of 37 keys (Mistral's, Gemma's local layers) over 300: each block of query rows
    computes only the keys from the first one any of its rows sees (rounded down to 16) to the last; the rest get
    no weight either way, so the result is the reference's (2e-6 of max |ref|), on every path (packed panels for
    many rows, the few-row tiles and 16-bit keys and values read in place for a decoding step's rows at the end)
    and for two query heads sharing a key/value head."""
    import tvm_ffi

    from bmc.ir.types import np_dtype
    from bmc.ops import get_op
    from bmc.runtime.kernels import ATTENTION_BIAS_KERNEL, register_cpu_kernels

    register_cpu_kernels(native=impl == "native")
    rng = np.random.default_rng(8)
    n, window = 300, 37
    q = rng.standard_normal((2, m, 16), np.float32)
    k, v = (rng.standard_normal((1, n, c)).astype(np_dtype(dtype)) for c in (16, 8))
    rows = np.arange(n - m, n)[:, None]  # the last m positions
    cols = np.arange(n)[None, :]
    bias = np.where((cols <= rows) & (cols > rows - window), 0, np.float32(-3.4e38)).astype(np.float32)
    out = np.full((2, m, 8), np.nan, np.float32)
    tvm_ffi.get_global_func(ATTENTION_BIAS_KERNEL)(*[_tensor(x) for x in (q, k, v, bias)], 0.5, True, _tensor(out))
    want = get_op("attention").reference([q, k.astype(np.float32), v.astype(np.float32), bias],
                                         {"scale": 0.5, "transpose_k": True, "lse": False})[0]
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("isa", ["avx2", "plain"])
def test_attention_narrower_tiles_match(native_lib, monkeypatch, isa):
    """The native kernel's AVX2 tiles (what CPUs without AVX-512 run; ``BMC_CPU_NO_AVX512`` makes this one take
    them; the other tests run the AVX-512 tiles where the host has them) and its loops for CPUs without AVX2
    (``BMC_CPU_NO_AVX2``)."""
    from bmc.runtime import kernels

    if isa == "avx2" and "avx2" not in (kernels.host_cpu_features() or set()):
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    for var, value in PANEL_ISAS[isa].items():
        monkeypatch.setenv(var, value)
    for case in ATTENTION_CASES:
        for transpose_k in (False, True):
            test_attention_kernel_matches_reference("native", *case, transpose_k, lse=transpose_k)
    for fill in (-3.4e38, -np.inf):
        test_attention_kernel_skips_masked_keys_exactly("native", fill)
    for case in SOFTCAP_CASES:
        test_attention_kernel_soft_caps_the_scores("native", *case, True, lse=True)
    for m, dtype in ((300, "float32"), (1, "bfloat16")):
        test_attention_kernel_skips_keys_outside_a_sliding_window("native", m, dtype)
    for dtype in ("float16", "bfloat16"):
        for transpose_k in (False, True):
            test_attention_kernel_reads_16_bit_keys_and_values("native", dtype, transpose_k, 1)
            test_attention_kernel_reads_grouped_keys_and_values("native", (2, 3), "bfloat16" if dtype == "bfloat16"
                                                                else "float32", transpose_k, 1)


def test_attention_kernel_propagates_nan_and_rejects_bad_shapes(native_lib, monkeypatch):
    import tvm_ffi

    from bmc.runtime.kernels import ATTENTION_BIAS_KERNEL, ATTENTION_KERNEL, register_cpu_kernels

    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    register_cpu_kernels(native=True)
    q, kt, v = np.ones((2, 4, 3), np.float32), np.ones((2, 3, 5), np.float32), np.ones((2, 5, 2), np.float32)
    q[1, 2, 0] = np.nan
    out = np.zeros((2, 4, 2), np.float32)
    fn = tvm_ffi.get_global_func(ATTENTION_KERNEL)
    fn(*[tvm_ffi.from_dlpack(x) for x in (q, kt, v)], 1.0, False, tvm_ffi.from_dlpack(out))
    assert np.isnan(out[1, 2]).all() and not np.isnan(np.delete(out.reshape(8, 2), 6, axis=0)).any()
    np.testing.assert_allclose(out[0], 1.0)
    with pytest.raises(Exception, match="one shape"):  # k's and v's batch dims differ
        fn(*[tvm_ffi.from_dlpack(x) for x in (q, kt[:1], v)], 1.0, False, tvm_ffi.from_dlpack(out))
    with pytest.raises(Exception, match="must divide"):  # 3 key/value heads for 2 query heads
        fn(*[tvm_ffi.from_dlpack(np.ones((3,) + x.shape[1:], np.float32)) if i else tvm_ffi.from_dlpack(x)
             for i, x in enumerate((q, kt, v))], 1.0, False, tvm_ffi.from_dlpack(out))
    with pytest.raises(Exception, match="does not broadcast"):
        tvm_ffi.get_global_func(ATTENTION_BIAS_KERNEL)(
            *[tvm_ffi.from_dlpack(x) for x in (q, kt, v, np.zeros((3, 5), np.float32))], 1.0, False,
            tvm_ffi.from_dlpack(out))
    register_cpu_kernels(native=False)


FLOAT8 = ["float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz"]


@pytest.mark.parametrize("fmt", FLOAT8)
@pytest.mark.parametrize("rows", [1, 3, 6, 9, 40], ids=["decode-dot", "3-rows", "6-rows", "9-rows", "sgemm"])
def test_matmul_float8_kernel_matches_reference(impl, fmt, rows):
    """``bmc.cpu.matmul_float8`` against the op's reference over every code of each format (NaN and infinity
    included: their columns come out NaN/inf as in the reference), a scale per row; up to 16 rows of A (each weight
    row decoded once and dotted with 4 rows at a time: tails of 3, 2, 1) and many (decoded, then sgemm). The native
    kernel decodes most codes by moving their bits into a float32's (16 and 8 at a time, then single ones: K = 45)
    and looks the rest up; the numpy one looks every code up."""
    import tvm_ffi

    from bmc.ops import get_op
    from bmc.ops.minifloat import FORMATS, decode
    from bmc.runtime.kernels import MATMUL_FLOAT8_KERNEL, register_cpu_kernels

    register_cpu_kernels(native=impl == "native")
    f = FORMATS[fmt]
    rng = np.random.default_rng(rows)
    codes = rng.permutation(256).astype(np.uint8).reshape(32, 8).repeat(5, axis=1)
    codes = np.concatenate([codes, codes[:, :5]], axis=1)  # K = 45: 16 + 16 + 8 + 5
    a = rng.standard_normal((rows, 45)).astype(np.float32)
    scale = rng.uniform(0.5, 2, 32).astype(np.float32)
    table = decode(np.arange(256, dtype=np.uint8), f)
    out = np.zeros((rows, 32), np.float32)
    tvm_ffi.get_global_func(MATMUL_FLOAT8_KERNEL)(*[tvm_ffi.from_dlpack(x) for x in (a, codes, table, scale)],
                                                  f.mantissa_bits, f.bias, tvm_ffi.from_dlpack(out))
    with np.errstate(invalid="ignore", over="ignore"):
        (want,) = get_op("matmul_float8").reference([a, codes, scale], {"format": fmt})
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(out[np.isinf(want)], want[np.isinf(want)])
    np.testing.assert_allclose(out[finite], want[finite], rtol=0, atol=1e-5 * float(np.abs(want[finite]).max()))


def test_matmul_float8_table_loops_match(native_lib, monkeypatch):
    """The native kernel's table-only decode (what CPUs without AVX2 run; ``BMC_CPU_NO_AVX2``)."""
    monkeypatch.setenv("BMC_NATIVE_LIB", str(native_lib))
    monkeypatch.setenv("BMC_CPU_NO_AVX2", "1")
    for fmt in FLOAT8:
        for rows in (1, 3, 6, 9, 40):
            test_matmul_float8_kernel_matches_reference("native", fmt, rows)


GATHER_MATMUL_CASES = [  # (rows, experts, K, N): a decoding step's routed rows, a prefill's (every expert's rows
    # over the panel GEMM's 8-row threshold), experts without rows, K = 0
    (2, 8, 64, 96), (64, 4, 48, 70), (7, 16, 33, 5), (5, 3, 0, 4)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("transpose_w", [False, True], ids=["w[E,K,N]", "w[E,N,K]"])
@pytest.mark.parametrize("rows,experts,k,n", GATHER_MATMUL_CASES,
                         ids=[f"{s}x{e}x{k}x{n}" for s, e, k, n in GATHER_MATMUL_CASES])
def test_gather_matmul_kernel_matches_reference(impl, rows, experts, k, n, transpose_w, dtype):
    """``bmc.cpu.gather_matmul`` (rows grouped by expert, one GEMM each) against float64 products row by row of the
    (16-bit: widened) operands; indices outside [0, E) (another device's experts) give zero rows; int32 and int64
    indices. float32 1e-5 of max |ref|; 16-bit: the float32 result rounded once (two units in the last place)."""
    import ml_dtypes
    import tvm

    from bmc.runtime.kernels import GATHER_MATMUL_KERNEL, register_cpu_kernels

    register_cpu_kernels(native=impl == "native", threads=2)
    rng = np.random.default_rng(rows * experts + k)
    t = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    x = rng.standard_normal((rows, k)).astype(t)
    w = rng.standard_normal((experts, n, k) if transpose_w else (experts, k, n)).astype(t)
    idx = rng.integers(-2, experts + 2, rows)
    ref = np.zeros((rows, n))
    for s, e in enumerate(idx):
        if 0 <= e < experts:
            ref[s] = x[s].astype(np.float64) @ (w[e].T if transpose_w else w[e]).astype(np.float64)
    kernel = tvm.get_global_func(GATHER_MATMUL_KERNEL)
    tol = {"float32": 1e-5, "bfloat16": 8e-3, "float16": 1e-3}[dtype] * max(1.0, float(np.abs(ref).max()))
    for itype in (np.int64, np.int32):
        out = np.full((rows, n), np.nan, t)
        kernel(*[_tensor(a) for a in (x, w, idx.astype(itype))], int(transpose_w), _tensor(out))
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=0, atol=tol)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_native_conv2d_matches_reference_on_random_shapes(data):
    """``bmc.cpu.conv2d`` called directly on random grouped shapes (depthwise and several channels a group, a channel
    multiplier, strides and dilations up to 3 and 2, pads wider than the taps, batch 2): every path of the kernel
    (the direct loop over stride phases or channels in vector lanes, a GEMM a group) against the op's reference."""
    import tvm
    import tvm_ffi

    from bmc.ops import OPS
    from bmc.runtime.kernels import register_cpu_kernels

    draw = data.draw
    g, cg, mg = draw(st.integers(1, 6)), draw(st.integers(1, 9)), draw(st.sampled_from([1, 2, 3, 4, 5, 8, 66]))
    kh, kw, sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 4)) for _ in range(4))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - pads[0] - pads[2]), 20))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - pads[1] - pads[3]), 20))
    n = draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.standard_normal((n, g * cg, h, w)).astype("float32")
    wt = rng.standard_normal((g * mg, cg, kh, kw)).astype("float32")
    (ref,) = OPS["conv"].reference([x, wt], {"strides": (sh, sw), "pads": pads, "dilations": (dh, dw), "group": g})
    info = register_cpu_kernels(native=True)
    assert info["impl"] == "native"
    out = tvm.runtime.tensor(np.full(ref.shape, np.nan, dtype="float32"))
    tvm_ffi.get_global_func("bmc.cpu.conv2d")(tvm.runtime.tensor(x), tvm.runtime.tensor(wt), sh, sw, *pads, dh, dw, g,
                                              out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.max(np.abs(ref)))))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_native_conv3d_matches_reference_on_random_shapes(data):
    """``bmc.cpu.conv3d`` called directly on random shapes (groups, taps up to 3 a dim, strides up to 2, dilation
    2, pads wider than the taps, batch 2) against the op's reference."""
    import tvm
    import tvm_ffi

    from bmc.ops import OPS
    from bmc.runtime.kernels import register_cpu_kernels

    draw = data.draw
    g, cg, mg = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.sampled_from([1, 3, 8, 13]))
    k3, s3, d3 = ([draw(st.integers(lo, hi)) for _ in range(3)] for lo, hi in ((1, 3), (1, 2), (1, 2)))
    pads = [draw(st.integers(0, 3)) for _ in range(6)]
    size = [draw(st.integers(max(1, d3[i] * (k3[i] - 1) + 1 - pads[i] - pads[3 + i]), 9)) for i in range(3)]
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.standard_normal((draw(st.integers(1, 2)), g * cg, *size)).astype("float32")
    wt = rng.standard_normal((g * mg, cg, *k3)).astype("float32")
    (ref,) = OPS["conv"].reference([x, wt], {"strides": s3, "pads": pads, "dilations": d3, "group": g})
    assert register_cpu_kernels(native=True)["impl"] == "native"
    out = tvm.runtime.tensor(np.full(ref.shape, np.nan, dtype="float32"))
    tvm_ffi.get_global_func("bmc.cpu.conv3d")(tvm.runtime.tensor(x), tvm.runtime.tensor(wt), *s3, *pads, *d3, g, out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.max(np.abs(ref)))))
