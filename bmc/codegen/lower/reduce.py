"""Relax lowering of reductions and normalizations."""

from __future__ import annotations

import numpy as np
from tvm import relax, topi

from bmc.codegen.lower import const, lowering
from bmc.codegen.lower.elementwise import scalar
from bmc.ir.types import np_dtype

_R = relax.op
_REDUCE = {"reduce_sum": _R.sum, "reduce_mean": _R.mean, "reduce_max": _R.max, "reduce_min": _R.min,
           "reduce_prod": _R.prod}


@lowering(*_REDUCE)
def _reduce(ctx, node, args):
    """``relax.sum``/``mean``/``max``/``min``/``prod``; over axes that all have one element, a reshape (each result
    is its one element; TVM 0.27's schedules inlined the consumers of such a degenerate ``mean`` into its reduction
    block, wrongly: FocalNet's spatial mean over a 1 x 1 map came out as garbage)."""
    axes = node.attrs["axes"]
    axes = None if axes is None else list(axes)
    x, out = node.inputs[0].type, node.outputs[0].type
    if all(x.shape[a] == 1 for a in (range(x.rank) if axes is None else axes)) and out.dtype == x.dtype:
        return _R.reshape(args[0], list(out.shape))
    dtype = node.inputs[0].type.dtype
    if dtype == "bool":  # TVM has no min/max identity for bool: reduce as int8
        x = ctx.emit(_R.astype(args[0], "int8"))
        return _R.astype(ctx.emit(_REDUCE[node.op](x, axis=axes, keepdims=node.attrs["keepdims"])), "bool")
    norm = None if axes is None else sorted(a % x.rank for a in axes)
    if ctx.target_kind == "llvm" and norm is not None and 2 <= len(norm) < x.rank \
            and norm == list(range(norm[0], norm[0] + len(norm))):
        # adjacent axes (a map's height and width: a global pool, an instance norm) merged into one by a reshape (a
        # view): the CPU's row-reduction schedule vectorizes a reduction over one axis; over two it ran scalar on
        # one thread (ReduceMean over 64 x 112 x 112 6.6x onnxruntime's time). (Over every axis: see
        # ``bmc.codegen.rewrite.split_full_reductions``; on a GPU dlight's rules are left as they were measured.)
        a0 = norm[0]
        merged = [*x.shape[:a0], int(np.prod([x.shape[a] for a in norm])), *x.shape[a0 + len(norm):]]
        reduced = _reduce_as(ctx, node, ctx.emit(_R.reshape(args[0], merged)), [a0], keepdims=True)
        return _R.reshape(ctx.emit(reduced), list(out.shape))
    return _reduce_as(ctx, node, args[0], axes, node.attrs["keepdims"])


def _reduce_as(ctx, node, x_in, axes, keepdims: bool):
    """``node``'s reduction of ``x_in`` over ``axes``."""
    dtype = node.inputs[0].type.dtype
    if node.op in ("reduce_max", "reduce_min") and dtype in _WIDER:
        # topi starts a max from the lowest *finite* value (a min from the highest), so a row of -inf (a fully
        # masked attention row) or an empty reduction gave -3.4e38 where numpy and ONNX give -inf. Reducing in the
        # next wider type is exact, and its extreme finite value overflows to the infinity when cast back. (A TE
        # reducer with an infinite identity is not recognized by TVM's cross-thread reduction: one serial thread.)
        wide = ctx.emit(_R.astype(x_in, _WIDER[dtype]))
        out = ctx.emit(_REDUCE[node.op](wide, axis=axes, keepdims=keepdims))
        return _R.astype(out, dtype)
    return _REDUCE[node.op](x_in, axis=axes, keepdims=keepdims)


_WIDER = {"float16": "float32", "bfloat16": "float32", "float32": "float64"}


def _compared(ctx, node, x):
    """``x`` as TVM's sorts and arg-reductions can compare it: bfloat16 widened to float32 (exactly; TVM's own
    bfloat16 topk ranked wrong values and its argmax did not compile)."""
    return ctx.emit(_R.astype(x, "float32")) if node.inputs[0].type.dtype == "bfloat16" else x


@lowering("topk")
def _topk(ctx, node, args):
    both = ctx.emit(_R.topk(_compared(ctx, node, args[0]), k=node.attrs["k"], axis=node.attrs["axis"],
                            ret_type="both", largest=node.attrs["largest"], dtype="int64"))
    values, indices = (ctx.emit(relax.TupleGetItem(both, i)) for i in range(2))
    dtype = node.outputs[0].type.dtype
    return [values if ctx.dtype_of(values) == dtype else ctx.emit(_R.astype(values, dtype)), indices]


@lowering("argmax", "argmin")
def _arg(ctx, node, args):
    fn = _R.argmax if node.op == "argmax" else _R.argmin
    out = ctx.emit(fn(_compared(ctx, node, args[0]), axis=node.attrs["axis"], keepdims=node.attrs["keepdims"]))
    return out if ctx.dtype_of(out) == "int64" else _R.astype(out, "int64")


def in_float32(fn):
    """Compute a normalization in float32 when the IR dtype is bfloat16 (TVM's kernels take only float32/float16;
    float32 accumulation is also what the reference does), then cast back."""

    def lower(ctx, node, args):
        dtype = node.inputs[0].type.dtype
        if dtype != "bfloat16":
            return fn(ctx, node, args)
        wide = [ctx.emit(_R.astype(a, "float32")) for a in args]
        return _R.astype(ctx.emit(fn(ctx, node, wide)), dtype)

    return lower


@lowering("softmax")
@in_float32
def _softmax(ctx, node, args):
    return _R.nn.softmax(args[0], axis=node.attrs["axis"])


@lowering("log_softmax")
@in_float32
def _log_softmax(ctx, node, args):
    return _R.nn.log_softmax(args[0], axis=node.attrs["axis"])


def _norm_axes(node):
    rank = node.inputs[0].type.rank
    return list(range(node.attrs["axis"] % rank, rank))


@lowering("layer_norm")
@in_float32
def _layer_norm(ctx, node, args):
    x, gamma = args[0], args[1]
    if len(args) > 2:
        beta = args[2]
    else:
        t = node.inputs[1].type
        beta = const(np.zeros(t.shape, np_dtype(ctx.dtype_of(gamma))))
    return _R.nn.layer_norm(x, gamma, beta, axes=_norm_axes(node), epsilon=node.attrs["epsilon"])


@lowering("rms_norm")
@in_float32
def _rms_norm(ctx, node, args):
    axes = _norm_axes(node)
    shape = node.inputs[0].type.shape
    if len(axes) < len(shape):
        return _R.nn.rms_norm(args[0], args[1], axes=axes, epsilon=node.attrs["epsilon"])
    # over every axis: TVM 0.27's rms_norm fails to compile ("Tensor dimension mismatch"); a leading unit axis
    # keeps one axis out of the normalization
    x = ctx.emit(_R.reshape(args[0], (1, *shape)))
    y = ctx.emit(_R.nn.rms_norm(x, args[1], axes=[a + 1 for a in axes], epsilon=node.attrs["epsilon"]))
    return _R.reshape(y, shape)


@lowering("batch_norm")
@in_float32
def _batch_norm(ctx, node, args):
    x, scale, bias, mean, var = args
    t = node.inputs[0].type
    shape = [t.shape[1]] + [1] * (t.rank - 2)
    r = [ctx.emit(_R.reshape(a, shape)) for a in (scale, bias, mean, var)]
    inv = ctx.emit(_R.divide(r[0], ctx.emit(_R.sqrt(ctx.emit(_R.add(r[3], scalar(node.attrs["epsilon"], ctx.dtype_of(x))))))))
    return _R.add(ctx.emit(_R.multiply(ctx.emit(_R.subtract(x, r[2])), inv)), r[1])


@lowering("lrn")
def _lrn(ctx, node, args):
    a = node.attrs
    return ctx.bb.emit_te(topi.nn.lrn, args[0], a["size"], 1, a["alpha"], a["beta"], a["bias"])


@lowering("cumsum", "cumprod")
def _cumulative(ctx, node, args):
    axis = node.attrs["axis"] % node.inputs[0].type.rank
    x = ctx.emit(_R.flip(args[0], axis)) if node.attrs["reverse"] else args[0]
    fn = _R.cumsum if node.op == "cumsum" else _R.cumprod
    y = ctx.emit(fn(x, axis=axis, exclusive=node.attrs["exclusive"]))
    return _R.flip(y, axis) if node.attrs["reverse"] else y
