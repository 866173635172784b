"""CUDA (``cuda``) pipeline pieces: the matmul offload to cuBLAS, one-kernel reduced-precision normalizations, and
dlight schedules for TVM's own kernels.

1. **Matmul offload.** Every ``relax.matmul`` with static shapes and a float32/float16/bfloat16 result becomes a
   destination-passing call of the runtime kernel ``bmc.cuda.matmul`` (cuBLAS, float32 accumulation;
   ``cpp/cuda_kernels.cc``), with the same transpose folding as the CPU offload (:mod:`bmc.codegen.cpu`). A
   float16/bfloat16 matmul is lowered as ``astype(matmul(a, b, out_dtype=float32), T)``; the cast is folded into the
   call, so cuBLAS writes ``T`` directly. Why: dlight's tensor-core rule handles float16 only (bfloat16 and float32
   get a SIMT schedule, 2-8% of the H200's peak in ``benchmarks/gpu.py``), while cuBLAS reaches 75%+ on the same
   shapes. ``BMC_CUDA_GEMM=tvm`` keeps matmuls in TVM (for before/after measurements).
2. **Normalizations in float32, one kernel.** A bfloat16 (log-)softmax / layer norm / RMS norm is lowered as
   ``astype(f32) → op → astype(bf16)`` (``bmc/codegen/lower/reduce.py``). TVM's FuseOps does not fuse the widening
   cast into the normalization's kernel, so it would write a float32 copy of the input (1 GB of attention scores per
   layer for a 1.3B model at 4x2048 tokens) and read it back. :func:`narrow_normalizations` rewrites each such
   triple into one TE kernel that reads and writes the narrow dtype and computes in float32 inside.
   A softmax also takes in the elementwise chain that feeds it when nothing else uses it (the attention scale and
   mask: ``softmax(s * c + mask)``), so the scores are read once, in float32 arithmetic.
3. **Splits become slices** (:func:`bmc.codegen.rewrite.split_slices`, on the CPU too): a QKV projection's
   ``add+split`` was three kernels each re-reading the projection, then three ``reshape+transpose`` kernels; now
   each attention head tensor is one kernel. The key's ``transpose(0, 2, 3, 1)`` (a scatter of single elements, 6x
   slower than the query's) becomes the query's layout plus cuBLAS' ``trans_b`` (the offload's permute folding).
4. **Schedules**, bmc's rules first: :func:`vectorized_elementwise` (injective kernels with 4-lane vector accesses per
   thread, where dlight's fallback moves one element per thread: ~1 TB/s on an H200 for the residual adds and
   bias+GELU) and :func:`softmax_rows` (a warp per row, the row computed once into shared memory, where dlight's
   GeneralReduction reads the input three times); then dlight's GPU rules (matmul, GEMV, reductions, general
   reduction, fallback last); all after optional MetaSchedule tuning.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import tvm
from tvm import relax, topi

from bmc.codegen.rewrite import bound_fusion, counting_pass, split_slices, static_shape, vector_lanes

#: result dtypes cuBLAS computes for bmc (float32 accumulation in every case)
CUBLAS_DTYPES = ("float32", "float16", "bfloat16")
NARROW = ("float16", "bfloat16")


def choose_cuda_matmul(a, b, out, dtype: str) -> str:
    """``"blas"`` (cuBLAS) for every float32/float16/bfloat16 matmul with static shapes, else ``"tvm"``."""
    return "blas" if dtype in CUBLAS_DTYPES and None not in (a, b, out) else "tvm"


def _axes(call) -> list[int]:
    return [int(a) for a in call.attrs.axes]


#: normalization op → its TE form on float32 tensors (the same topi functions LegalizeOps would use)
_NORMS = {
    "relax.nn.softmax": lambda call, x: softmax_te(x, int(call.attrs.axis)),
    "relax.nn.log_softmax": lambda call, x: topi.nn.log_softmax(x, axis=int(call.attrs.axis)),
    "relax.nn.layer_norm": lambda call, x, g, b: topi.nn.layer_norm(x, g, b, axis=_axes(call),
                                                                    epsilon=float(call.attrs.epsilon)),
    "relax.nn.rms_norm": lambda call, x, w: topi.nn.rms_norm(x, w, axis=_axes(call),
                                                             epsilon=float(call.attrs.epsilon)),
}


def softmax_te(x, axis: int):
    """topi's float32 softmax, except over the last axis: the same four blocks (``T_softmax_maxelem/exp/expsum/norm``,
    what :func:`softmax_rows` schedules), with ``exp(t) = exp2(t log2 e)`` (CUDA's ``exp2f`` is the hardware
    ``ex2`` plus a denormal fix-up, ``expf`` adds a range reduction: ~3x the instructions; the error, a few ulp of
    float32, is far inside the float16/bfloat16 result's rounding) and one reciprocal per row instead of a division
    per element. The kernel executes ~40 instructions per element before this, enough to be compute-bound."""
    from tvm import te, tirx

    rank = len(x.shape)
    if axis % rank != rank - 1:
        return topi.nn.softmax(x, axis=axis)
    n = x.shape[-1]
    k = te.reduce_axis((0, n), name="k")
    maxelem = te.compute(x.shape[:-1], lambda *i: te.max(x[(*i, k)], axis=k), name="T_softmax_maxelem")
    log2e = tirx.const(math.log2(math.e), "float32")
    exp = te.compute(x.shape, lambda *i: tirx.exp2((x[i] - maxelem[i[:-1]]) * log2e), name="T_softmax_exp")
    k = te.reduce_axis((0, n), name="k")
    expsum = te.compute(x.shape[:-1], lambda *i: te.sum(exp[(*i, k)], axis=k), name="T_softmax_expsum")
    return te.compute(x.shape, lambda *i: exp[i] * (tirx.const(1.0, "float32") / expsum[i[:-1]]),
                      name="T_softmax_norm")


#: elementwise producers a softmax kernel takes in
_CHAIN = {"relax.add": topi.add, "relax.subtract": topi.subtract, "relax.multiply": topi.multiply,
          "relax.divide": topi.divide}
_MAX_CHAIN = 4


@relax.expr_functor.mutator
class _NarrowNorms(relax.PyExprMutator):
    """``astype(norm(astype(x: T, f32), ...), T)`` → one TE kernel on ``x`` (T float16/bfloat16); a layer/RMS
    norm of a float32 ``x`` (the residual stream of ``--dtype``) likewise, reading ``x`` in float32."""

    def __init__(self, mod=None):
        super().__init__(mod)
        self.count = 0
        self.uses: Counter = Counter()

    def _chain(self, expr, leaves: list, depth: int = 0):
        """A tree over ``leaves`` for the single-use elementwise chain that computes ``expr`` (leaves: operands)."""
        b = self._bound(expr)
        if (depth < _MAX_CHAIN and isinstance(b, relax.Call) and isinstance(b.op, tvm.ir.Op)
                and b.op.name in _CHAIN and self.uses[expr] == 1 and static_shape(b.ty) is not None):
            return (_CHAIN[b.op.name], [self._chain(a, leaves, depth + 1) for a in b.args])
        leaves.append(expr)
        return len(leaves) - 1

    def _softmax_args(self, x, dtype: str):
        leaves: list = []
        tree = self._chain(x, leaves)

        def build(t, ts):
            return ts[t] if isinstance(t, int) else t[0](*(build(c, ts) for c in t[1]))

        return leaves, lambda norm, *ts: softmax_te(build(tree, ts), int(norm.attrs.axis))

    def _bound(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else None

    def _widened_from(self, expr, dtype: str):
        """``x`` when ``expr`` is bound to ``astype(x, float32)`` with ``x`` of ``dtype``, else None."""
        b = self._bound(expr)
        if (isinstance(b, relax.Call) and isinstance(b.op, tvm.ir.Op) and b.op.name == "relax.astype"
                and str(b.args[0].ty.dtype) == dtype):
            return b.args[0]
        return None

    def visit_call_(self, call: relax.Call):  # noqa: N802 (TVM's visitor naming)
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.astype"):
            return call
        dtype = str(call.attrs.dtype)
        norm = self._bound(call.args[0])
        if (dtype not in NARROW or not isinstance(norm, relax.Call) or not isinstance(norm.op, tvm.ir.Op)
                or norm.op.name not in _NORMS or str(norm.ty.dtype) != "float32"):
            return call
        x = self._widened_from(norm.args[0], dtype)
        if x is None and norm.op.name in ("relax.nn.layer_norm", "relax.nn.rms_norm"):
            x = norm.args[0]  # a float32 residual stream (bmc.ops.precision): read as it is
        if x is None:
            return call
        # the other operands (gains, biases) as they were before widening, or as given (float32 constants)
        args, te_norm = [x], _NORMS[norm.op.name]
        if norm.op.name == "relax.nn.softmax":
            args, te_norm = self._softmax_args(x, dtype)
        for a in norm.args[1:]:
            narrow = self._widened_from(a, dtype)
            args.append(a if narrow is None else narrow)
        self.count += 1
        return self.builder_.call_te(
            lambda *ts: topi.cast(te_norm(norm, *(topi.cast(t, "float32") for t in ts)), dtype), *args,
            primfunc_name_hint=norm.op.name.rsplit(".", 1)[-1] + "_float32")


def narrow_normalizations(record: dict | None = None) -> tvm.transform.Pass:
    """Module pass: see the module doc (2); ``record["narrow_normalizations"]`` counts the rewrites."""
    return counting_pass("BmcNarrowNormalizations", _NarrowNorms, record, "narrow_normalizations")


THREADS = 256
#: softmax rows staged in shared memory as float32: SOFTMAX_ROWS_PER_BLOCK rows (one warp each) of at most
#: MAX_SOFTMAX_ROW elements (32 KB per thread block)
SOFTMAX_ROWS_PER_BLOCK = 4
MAX_SOFTMAX_ROW = 2048
WARP = 32


def _as_rule(schedule_fn):
    """A dlight GPU rule from ``schedule_fn(func) -> Schedule | None``; a PrimFunc it does not fit (None or an
    exception) goes to the next rule."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class Rule(GPUScheduleRule):
        def apply(self, func, target, _tunable):
            if not isinstance(func, tvm.tirx.PrimFunc) or not self.is_target_available(target):
                return None
            try:
                return schedule_fn(func)
            except Exception:  # noqa: BLE001  (a PrimFunc this rule does not fit)
                return None

    Rule.__name__ = Rule.__qualname__ = schedule_fn.__name__
    return Rule()


def _guarded(rule):
    """A dlight rule whose failure on a PrimFunc passes it to the next rule instead of failing the compile: dlight's
    Reduction crashes in ``rfactor`` on a mean over every axis (TVM 0.27), which GeneralReduction or the fallback
    then schedule."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class Guarded(GPUScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except Exception:  # noqa: BLE001  (TVM raises several types)
                return None

    Guarded.__name__ = Guarded.__qualname__ = type(rule).__name__
    return Guarded()


def vectorized_elementwise(func):
    """An injective PrimFunc (one spatial block after inlining) whose innermost extent is a multiple of the vector
    width: each thread handles one vector (coalesced 8-16 byte accesses); else None."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent, try_inline

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    infos = try_inline(sch, infos)
    if len(infos) != 1 or set(infos[0].dom_kind()) != {"S"}:
        return None
    block = infos[0].block_rv
    loops = sch.get_loops(block)
    extents = [get_extent(sch, lp) for lp in loops]
    if not loops or not all(isinstance(e, int) for e in extents):
        return None
    # 16 bytes of the output, at most 4 lanes: TVM 0.27's CUDA codegen cannot declare 8-lane float32 vectors (the
    # float32 arithmetic inside a bfloat16 kernel would need them)
    stmt = sch.get(block)
    lanes = vector_lanes(stmt, max(1, min(4, 128 // stmt.writes[0].source.dtype.bits)))
    if lanes == 1 or extents[-1] % lanes or math.prod(extents) % (lanes * THREADS):
        return None
    _, tx, vec = sch.split(sch.fuse(*loops), factors=[None, THREADS, lanes])
    sch.bind(sch.get_loops(block)[0], "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)
    return sch


def softmax_rows(func):
    """A softmax over the last axis whose input is computed in the kernel (topi's ``T_softmax_*`` blocks after a
    producer block, e.g. the float32 cast, scale and mask of :func:`narrow_normalizations`): one warp per row,
    SOFTMAX_ROWS_PER_BLOCK consecutive rows per thread block. The producer runs once per element into a shared-memory
    row (float32); the max and the sum are warp-shuffle reductions whose results stay in registers ("local": a
    shared result written by lane 0 would need a barrier TVM does not insert for a warp); the normalization writes
    4-lane vectors. dlight's GeneralReduction gives a row 256 threads with block-wide reductions and recomputes the
    producer from global memory three times. None when the PrimFunc does not have that shape."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    order = [sch.get(i.block_rv).name_hint for i in infos]
    by_name = dict(zip(order, (i.block_rv for i in infos)))
    if len(by_name) != len(order) or not {"T_softmax_maxelem", "T_softmax_exp", "T_softmax_expsum",
                                          "T_softmax_norm"} <= set(by_name):
        return None
    first = order.index("T_softmax_maxelem")
    if infos[first].dom_kind()[-1:] != "R" or infos[first].dom_kind().count("R") != 1:
        return None
    producer = str(sch.get(by_name["T_softmax_maxelem"]).reads[0].source.name)
    if producer not in order[:first]:
        return None
    tail = order[order.index("T_softmax_norm"):]
    loops = sch.get_loops(by_name[tail[-1]])
    n = get_extent(sch, loops[-1])
    rows = get_extent(sch, loops[-2]) if len(loops) > 1 else None
    if not isinstance(n, int) or n % (WARP * 4) or n > MAX_SOFTMAX_ROW or not isinstance(rows, int) \
            or rows % SOFTMAX_ROWS_PER_BLOCK:
        return None
    for name in order[:first]:  # the producer takes in what feeds it
        if name != producer:
            sch.compute_inline(by_name[name])
    sch.compute_inline(by_name["T_softmax_exp"])
    for name in tail[:-1]:  # the normalization (and casts) go into the last block
        sch.compute_inline(by_name[name])
    loops = sch.get_loops(by_name[tail[-1]])
    outer, row = sch.split(loops[-2], [None, SOFTMAX_ROWS_PER_BLOCK])  # consecutive rows per block
    serial, tx, vec = sch.split(loops[-1], [None, WARP, 4])
    sch.unroll(serial)
    sch.bind(sch.fuse(*loops[:-2], outer), "blockIdx.x")
    sch.bind(row, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)
    for name in ("T_softmax_expsum", "T_softmax_maxelem"):
        block = by_name[name]
        sch.compute_at(block, row, preserve_unit_loops=True)
        serial, lane = sch.split(sch.get_loops(block)[-1], [None, WARP])
        sch.reorder(lane, serial)
        sch.bind(lane, "threadIdx.x")
        sch.unroll(serial)
        sch.set_scope(block, 0, "local")
    block = by_name[producer]
    sch.compute_at(block, row, preserve_unit_loops=True)
    sch.set_scope(block, 0, "shared")
    serial, tx, vec = sch.split(sch.get_loops(block)[-1], [None, WARP, 4])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)
    sch.unroll(serial)  # all the row's loads in flight (the rolled loop ran at ~1.6 TB/s on an H200; not re-measured)
    return sch


def row_extremes(func):
    """A max or min over the innermost axes (``reduce_max``/``reduce_min``, e.g. the masked-row check of ONNX's
    Attention body), which dlight's Reduction rule does not take (it matches sums only; its fallback gave one serial
    thread per output): one warp per output, the lanes striding over the reduced elements, a shuffle reduction, lane
    0 writing the result. (FuseOps keeps elementwise consumers out of a reduction's kernel: no epilogue to place.)
    None when the PrimFunc does not have that shape."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent, try_inline_contiguous_spatial

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    infos = try_inline_contiguous_spatial(sch, infos)  # the widening cast (``lower/reduce.py``) goes into it
    if len(infos) != 1:
        return None
    block = infos[0].block_rv
    kinds = infos[0].dom_kind()
    n_s = len(kinds) - len(kinds.lstrip("S"))
    stmt = sch.get(block)
    if kinds[n_s:] != "R" * (len(kinds) - n_s) or n_s == len(kinds) \
            or not isinstance(getattr(stmt.body, "value", None), (tirx.Max, tirx.Min)):
        return None
    loops = sch.get_loops(block)
    if not all(isinstance(get_extent(sch, lp), int) for lp in loops):
        return None
    row = sch.fuse(*loops[:n_s]) if n_s > 1 else loops[0] if n_s else sch.add_unit_loop(block)
    sch.bind(row, "blockIdx.x")
    reduced = sch.fuse(*sch.get_loops(block)[1:]) if len(sch.get_loops(block)) > 2 else sch.get_loops(block)[-1]
    serial, lane = sch.split(reduced, [None, WARP])
    sch.reorder(lane, serial)
    sch.bind(lane, "threadIdx.x")
    return sch


def gpu_pipeline(target, record: dict | None = None, tune=None) -> tvm.transform.Pass:
    """The Relax pipeline for CUDA (module doc: offload, normalizations, slices, schedules); ``tune``: an optional
    MetaSchedule pass (:mod:`bmc.codegen.tune`) run after fusion, whose schedules dlight then leaves alone."""
    from tvm.s_tir import dlight as dl

    from bmc.codegen.cpu import HALF_MIXED, offload_matmul
    from bmc.runtime.cuda import MATMUL_KERNEL

    passes = [relax.transform.DecomposeOpsForInference()]
    if os.environ.get("BMC_CUDA_GEMM", "cublas").strip().lower() != "tvm":
        passes.append(offload_matmul(record, conv=False, kernel=MATMUL_KERNEL, choose=choose_cuda_matmul,
                                     mixed=HALF_MIXED))
    passes += [narrow_normalizations(record), split_slices(record)]
    return tvm.transform.Sequential(passes + [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        bound_fusion(record),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        *([tune] if tune is not None else []),
        dl.ApplyDefaultSchedule(*schedule_rules()),
    ])


def schedule_rules() -> list:
    """The CUDA schedule rules in order: bmc's, then dlight's (fallback last)."""
    from tvm.s_tir import dlight as dl

    return [_as_rule(vectorized_elementwise), _as_rule(softmax_rows), _as_rule(row_extremes),
            *map(_guarded, (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction())),
            dl.gpu.Fallback()]
