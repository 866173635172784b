"""Relax rewriting and scheduling helpers shared by the CPU and CUDA pipelines, and their target-independent passes."""

from __future__ import annotations

import functools
import math
import re
from collections import Counter

import tvm
from tvm import relax


def static_shape(ty) -> tuple[int, ...] | None:
    """The static shape of a Relax tensor type, None when unknown or symbolic."""
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):  # symbolic dims
        return None


_INDEX_DIVISOR = re.compile(r"(?://|%) (?:T\.int(?:32|64)\((\d+)\)|(\d+)\b)")  # int64 and int32 literals


def vector_lanes(block_stmt, lanes: int) -> int:
    """The lanes to vectorize a block's innermost loop (its last iteration variable) with: at most ``lanes``, and a
    divisor of every constant that index arithmetic on that variable divides by (``v % 8``, ``(v + 4) // 8``: a
    concat, split or reshape across the innermost axis).

    TVM 0.27 vectorizes such indices wrongly once a vector spans two periods: the rotary-embedding body (``concat``
    of two 4-wide halves of 8) came out as garbage with AVX-512's 16 float lanes and right with 8. Divisions of
    other variables (``v1 % 12`` for heads) are constant across a vector and leave the lanes alone. (Matched in the
    printed block: this TVM exposes no TIR visitor to Python.)"""
    if not block_stmt.iter_vars:
        return lanes
    var = re.compile(rf"\b{re.escape(block_stmt.iter_vars[-1].var.name)}\b")
    text = block_stmt.script()
    for m in _INDEX_DIVISOR.finditer(text):
        if var.search(_left_operand(text, m.start())):
            lanes = math.gcd(lanes, int(m.group(1) or m.group(2)))
    return lanes


def _left_operand(text: str, end: int) -> str:
    """The operand printed just before ``text[end:]``: a parenthesized group or a name."""
    head = text[:end].rstrip()
    if not head.endswith(")"):
        return re.search(r"[\w.]*$", head).group(0)
    depth = 0
    for i in range(len(head) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(head[i], 0)
        if depth == 0:
            return head[i:]
    return head


def rewrite_functions(mutator, mod: tvm.IRModule, prepare=None) -> tvm.IRModule:
    """Run a ``PyExprMutator`` over every Relax function of ``mod`` (``prepare(func)`` first, if given)."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            if prepare is not None:
                prepare(func)
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def use_counts(func: relax.Function) -> Counter:
    """How many bindings use each variable of ``func`` (its outputs count as a use)."""
    uses: Counter = Counter()
    for block in func.body.blocks:
        for binding in block.bindings:
            uses.update(relax.analysis.free_vars(binding.value))
    uses.update(relax.analysis.free_vars(func.body.body))
    return uses


#: elementwise producers a split is pushed through (the bias add of a fused QKV projection)
_SPLIT_THROUGH = {"relax.add": relax.op.add, "relax.subtract": relax.op.subtract,
                  "relax.multiply": relax.op.multiply, "relax.divide": relax.op.divide}


@relax.expr_functor.mutator
class _SplitSlices(relax.PyExprMutator):
    """``split(x, axis)`` → one ``strided_slice`` per part; ``split(x ⊙ c)`` with a single-use elementwise
    ``⊙`` → ``slice(x) ⊙ slice(c)`` per part (``c`` sliced only where it is not broadcast along ``axis``)."""

    def __init__(self, mod=None):
        super().__init__(mod)
        self.count = 0
        self.uses: Counter = Counter()

    def visit_call_(self, call: relax.Call):  # noqa: N802 (TVM's visitor naming)
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.split"):
            return call
        x = call.args[0]
        parts = call.ty.fields
        rank = len(x.ty.shape)
        axis = int(call.attrs.axis) % rank
        if not all(static_shape(t) is not None for t in (x.ty, *parts)):
            return call
        bound = self.lookup_binding(x) if isinstance(x, relax.Var) else None
        through = (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op)
                   and bound.op.name in _SPLIT_THROUGH and self.uses[x] == 1
                   and all(static_shape(a.ty) is not None for a in bound.args))

        def piece(v, begin: int, end: int):
            dim = axis - (rank - len(v.ty.shape))  # the axis in v (numpy broadcasting aligns on the right)
            if dim < 0 or int(v.ty.shape[dim]) == 1:
                return v
            return self.builder_.emit(relax.op.strided_slice(v, axes=[dim], begin=[begin], end=[end]))

        out, begin = [], 0
        for t in parts:
            end = begin + int(t.shape[axis])
            if through:
                out.append(self.builder_.emit(_SPLIT_THROUGH[bound.op.name](
                    *(piece(a, begin, end) for a in bound.args))))
            else:
                out.append(piece(x, begin, end))
            begin = end
        self.count += 1
        return relax.Tuple(out)


def counting_pass(name: str, mutator_cls, record: dict | None, key: str, *cleanup) -> tvm.transform.Pass:
    """A module pass running ``mutator_cls`` (a PyExprMutator with ``uses`` and ``count``) over every function, with
    each function's use counts, then ``cleanup`` passes and dead-code elimination; ``record[key]`` = rewrites."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator = mutator_cls(mod)
        mod = rewrite_functions(mutator, mod, prepare=lambda func: setattr(mutator, "uses", use_counts(func)))
        if record is not None and mutator.count:
            record[key] = mutator.count
        for p in cleanup:
            mod = p(mod)
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


def split_slices(record: dict | None = None) -> tvm.transform.Pass:
    """Module pass: every static ``split`` becomes slices (:class:`_SplitSlices`), so each part fuses with its own
    consumers: FuseOps keeps a multi-output split as one function whose parts TVM writes from separate kernels, each
    re-reading the bias-added input (a QKV projection: ``add+split`` three times, then three ``reshape+transpose``
    kernels to the attention heads); sliced, each head tensor is one kernel reading its third of the projection."""
    return counting_pass("BmcSplitSlices", _SplitSlices, record, "split_slices",
                         relax.transform.CanonicalizeBindings())


#: the deepest nesting of calls (``T.nearbyint(T.exp(...))``) one fused elementwise kernel may reach by inlining its
#: producers; see :func:`bound_fusion`. Measured with TVM 0.27 on llvm: VectorizeLoop's time doubles per nested
#: call (a chain of 20 ``round`` ops: 1 s, 24: 14 s), sooner when the expression also repeats operands (the QDQ
#: GPT-2 fixture: depth 6 compiles in 2 s, depth 8 not in 10 minutes). The model fixtures nest at most 2.
MAX_CALL_DEPTH = 4
_STORE = re.compile(r"^\s*\w+\[[^\]]*\] = (.*)$", re.M)
_TOKEN = re.compile(r"T\.(\w+)\(|(\w+)\[|[()]")
_NOT_CALLS = re.compile(r"Cast|min|max|Select|Let|Ramp|Broadcast|bool|u?int\d+|b?float\d+")  # nodes, constants
_OPAQUE = 8  # TVM's OpPatternKind kOpaque: FuseOps never fuses such a call with another


#: a max/min over every axis of at least this many elements is split into row reductions (below, one thread is
#: as fast)
MIN_SPLIT_REDUCTION = 1 << 16
#: a float32 max/min over every axis of at least this many elements is ``bmc.cpu.minmax``'s (fewer: a call costs
#: about what TVM's serial loop does)
MIN_NATIVE_EXTREMES = 1 << 12


@relax.expr_functor.mutator
class _SplitFullReductions(relax.PyExprMutator):
    """``max``/``min`` over every axis of a large tensor → the same over the rows of ``[P, n / P]``, then over the P
    partial results. TVM's schedules run a reduction to one value on one thread (a ``DynamicQuantizeLinear``'s max
    and min over ``[128, 3072]`` were 14% of an int8 MLP's time); the rows run in parallel. Exact: max and min do
    not round. With ``native`` (the CPU kernels offloaded), a float32 tensor's max and min are instead one call of
    ``bmc.cpu.minmax``, shared by the max and the min of the same tensor: one vectorized pass over it, where
    TVM's row reductions were serial chains of scalar max/min (still 16-18% of that MLP)."""

    def __init__(self, mod=None, native: bool = False):
        super().__init__(mod)
        self.count = 0  # (counting_pass also sets self.uses, which this rewrite does not need)
        self.native = native
        self.extremes: dict = {}  # float32 tensor → its minmax call (per function: Vars are not shared)

    def _native(self, x, widened, call, index: int):
        """``min`` (index 0) or ``max`` (1) of float32 ``x`` from its ``bmc.cpu.minmax`` call."""
        from bmc.runtime.kernels import MINMAX_KERNEL

        emit = self.builder_.emit
        if x not in self.extremes:
            self.extremes[x] = emit(relax.call_dps_packed(MINMAX_KERNEL, [x], out_ty=relax.TensorType([2],
                                                                                                      "float32")))
        value = emit(relax.op.take(self.extremes[x], relax.const(index, "int64"), axis=0))
        if widened is not None:
            value = emit(relax.op.astype(value, widened.attrs.dtype))
        rank = len(static_shape(call.args[0].ty))
        return relax.op.reshape(value, [1] * rank) if call.attrs.keepdims else value

    def visit_call_(self, call: relax.Call):  # noqa: N802 (TVM's visitor naming)
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in ("relax.max", "relax.min")):
            return call
        shape = static_shape(call.args[0].ty)
        if not shape or math.prod(shape) < (MIN_NATIVE_EXTREMES if self.native else MIN_SPLIT_REDUCTION):
            return call
        axes = call.attrs.axis
        if axes is not None and sorted(int(a) % len(shape) for a in axes) != list(range(len(shape))):
            return call
        n = math.prod(shape)
        rows = math.gcd(n, 256)
        op = relax.op.max if call.op.name == "relax.max" else relax.op.min
        emit = self.builder_.emit
        x = call.args[0]
        widened = self.lookup_binding(x) if isinstance(x, relax.Var) else None
        widened = widened if isinstance(widened, relax.Call) and widened.op.same_as(
            tvm.ir.Op.get("relax.astype")) else None
        source = x if widened is None else widened.args[0]
        if self.native and str(source.ty.dtype) == "float32":
            self.count += 1
            return self._native(source, widened, call, int(call.op.name == "relax.max"))
        if rows < 16 or n < MIN_SPLIT_REDUCTION:
            return call
        if widened is not None:
            # a float32 max is lowered on its values widened to float64 (bmc.codegen.lower.reduce): reshape the
            # narrow tensor (a view) and widen inside the partial reductions, where FuseOps fuses the cast; the
            # reshape of the wide one was a kernel writing a float64 copy, once for the max and once for the min
            rows_x = emit(relax.op.reshape(widened.args[0], [rows, n // rows]))
            x = emit(relax.op.astype(rows_x, widened.attrs.dtype))
        else:
            x = emit(relax.op.reshape(x, [rows, n // rows]))
        part = emit(op(x, axis=[1]))
        self.count += 1
        if call.attrs.keepdims:
            return relax.op.reshape(emit(op(part, axis=[0])), [1] * len(shape))
        return op(part, axis=[0])


def split_full_reductions(record: dict | None = None, native: bool = False) -> tvm.transform.Pass:
    """Module pass: large max/min reductions to one value become parallel row reductions, or with ``native``
    ``bmc.cpu.minmax`` calls for float32 (:class:`_SplitFullReductions`); ``record["split_reductions"]`` counts
    them."""
    return counting_pass("BmcSplitFullReductions", functools.partial(_SplitFullReductions, native=native), record,
                         "split_reductions")


def _call_depths(func: tvm.tirx.PrimFunc) -> tuple[int, list[int]]:
    """The deepest call nesting in a PrimFunc's stored expressions, and per parameter buffer the most calls that
    enclose a read of it (-1: never read). Read from the printed script: this TVM has no TIR visitor in Python."""
    text = func.script()
    names = re.findall(r"(\w+): T\.Buffer", text[text.index("def main("):])
    deepest, reads = 0, dict.fromkeys(names, -1)
    for expr in _STORE.findall(text):
        stack: list[bool] = []  # per open parenthesis: does it belong to a call?
        for m in _TOKEN.finditer(expr):
            call, load = m.group(1), m.group(2)
            if call is not None:
                stack.append(_NOT_CALLS.fullmatch(call) is None)
                deepest = max(deepest, sum(stack))
            elif load is not None:
                if load in reads:
                    reads[load] = max(reads[load], sum(stack))
            elif m.group(0) == "(":
                stack.append(False)
            elif stack:
                stack.pop()
    return deepest, [reads[n] for n in names]


def bound_fusion(record: dict | None = None, max_depth: int | None = None) -> tvm.transform.Pass:
    """Keep the call nesting of every fused elementwise kernel at most ``max_depth`` (default
    :data:`MAX_CALL_DEPTH`); run it between AnnotateTIROpPattern and FuseOps.

    After FuseOps, TVM's schedules inline each elementwise producer into its consumer, so a fused chain becomes one
    expression, and VectorizeLoop's time doubles with each nested call in it. Normal models nest a few calls; a
    fake-quantized (QDQ) model has a ``round`` in every quantize, and its GELU fused into one expression that did
    not compile in ten minutes. This pass computes each call's inlined depth in dataflow order and,
    where it would pass the limit, makes the deepest operand's producer opaque (a copy of its PrimFunc with
    ``op_pattern`` kOpaque, which FuseOps never fuses), so the chain is cut into kernels there.
    ``record["materialized"]`` counts the cuts."""

    @tvm.transform.module_pass(opt_level=0, name="BmcBoundFusion")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        limit = MAX_CALL_DEPTH if max_depth is None else max_depth
        stats: dict = {}
        opaque: set = set()  # call_tir binding vars whose producer becomes opaque
        call_tir = tvm.ir.Op.get("relax.call_tir")
        for _, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            for block in func.body.blocks:
                depth: dict = {}  # fusable call_tir results -> their inlined call depth
                for binding in block.bindings:
                    call = binding.value
                    if not (isinstance(call, relax.Call) and call.op == call_tir):
                        continue
                    gv = call.args[0]
                    pf = mod[gv]
                    if not isinstance(pf, tvm.tirx.PrimFunc) or int(pf.attrs.get("op_pattern", _OPAQUE)) > 2:
                        continue  # reductions, matmuls, opaque ops: anchors, not inlined into their consumers
                    if gv not in stats:
                        stats[gv] = _call_depths(pf)
                    own, reads = stats[gv]
                    parts = [(r + depth[a], a) for r, a in zip(reads, call.args[1].fields)
                             if r >= 0 and a in depth and a not in opaque]  # a cut operand is a plain load
                    while parts and max(own, max(parts, key=lambda p: p[0])[0]) > limit:
                        deepest = max(parts, key=lambda p: p[0])
                        opaque.add(deepest[1])
                        parts = [p for p in parts if p[1] is not deepest[1]]
                    depth[binding.var] = max([own] + [d for d, _ in parts])
        if not opaque:
            return mod
        copies: dict = {}

        @relax.expr_functor.mutator
        class _Opaque(relax.PyExprMutator):
            def visit_var_binding_(self, binding):  # noqa: N802 (TVM's visitor naming)
                if binding.var not in opaque:
                    return super().visit_var_binding_(binding)
                call = self.visit_expr(binding.value)
                gv = call.args[0]
                if gv not in copies:
                    copies[gv] = self.builder_.add_func(mod[gv].with_attr("op_pattern", _OPAQUE),
                                                        f"{gv.name_hint}_materialized")
                new = relax.Call(call.op, [copies[gv], *call.args[1:]], call.attrs, call.ty_args)
                self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new)))

        mod = rewrite_functions(_Opaque(mod), mod)
        if record is not None:
            record["materialized"] = record.get("materialized", 0) + len(opaque)
        return mod

    return _pass


_ALLOC_TENSOR = ("relax.vm.alloc_tensor", "relax.memory.alloc_tensor", "relax.builtin.alloc_tensor")
_ALLOC_STORAGE = ("relax.vm.alloc_storage", "relax.memory.alloc_storage")


def owned_outputs(record: dict | None) -> tvm.transform.Pass:
    """Analysis pass, last in a pipeline (after memory planning): ``record["owned_outputs"]`` gets, per output of
    ``main``, whether the call allocates it afresh (an ``alloc_tensor`` in a storage the call allocated) and no
    earlier output is the same tensor. The runtime hands such an output to the caller without copying it; any other
    is a view of an input or a weight, a constant of the program, or a repeat, and is copied."""

    @tvm.transform.module_pass(opt_level=0, name="BmcOwnedOutputs")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod["main"] if any(gv.name_hint == "main" for gv in mod.get_global_vars()) else None
        if record is None or not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            return mod
        bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}

        def value(expr):
            while isinstance(expr, relax.Var) and expr in bound:
                expr = bound[expr]
            return expr

        def is_call(expr, names) -> bool:
            return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in names

        result = value(func.body.body)
        outputs = list(result.fields) if isinstance(result, relax.Tuple) else [func.body.body]
        owned, seen = [], []
        for out in outputs:
            tensor = value(out)
            fresh = is_call(tensor, _ALLOC_TENSOR) and (
                "builtin" in tensor.op.name or is_call(value(tensor.args[0]), _ALLOC_STORAGE))
            owned.append(bool(fresh) and not any(tensor.same_as(s) for s in seen))
            seen.append(tensor)
        record["owned_outputs"] = owned
        return mod

    return _pass
