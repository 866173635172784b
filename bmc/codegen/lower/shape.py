"""Relax lowering of shape and data-movement ops."""

from __future__ import annotations

from itertools import accumulate

import numpy as np
from tvm import relax

from bmc.codegen.lower import const, lowering
from bmc.errors import CompileError
from bmc.ops.shape import slice_indices

_R = relax.op


@lowering("reshape")
def _reshape(ctx, node, args):
    return _R.reshape(args[0], list(node.attrs["shape"]))


@lowering("transpose")
def _transpose(ctx, node, args):
    return _R.permute_dims(args[0], list(node.attrs["perm"]))


@lowering("concat")
def _concat(ctx, node, args):
    return _R.concat(list(args), axis=node.attrs["axis"])


@lowering("split")
def _split(ctx, node, args):
    sizes, axis = node.attrs["sizes"], node.attrs["axis"]
    if len(sizes) == 1:
        return [args[0]]
    if 0 in sizes:  # R.split needs strictly increasing indices: cut each piece with a strided slice instead
        starts = [0, *accumulate(sizes)]
        return [_R.strided_slice(args[0], [axis], [b], [b + n], [1]) for b, n in zip(starts, sizes)]
    parts = ctx.emit(_R.split(args[0], list(accumulate(sizes[:-1])), axis=axis))
    return [ctx.emit(relax.TupleGetItem(parts, i)) for i in range(len(sizes))]


@lowering("slice")
def _slice(ctx, node, args):
    x = args[0]
    shape = node.inputs[0].type.shape
    axes, begin, end, strides = [], [], [], []
    for axis, s in enumerate(slice_indices(shape, node.attrs)):
        start, stop, step = s.indices(shape[axis])
        if (start, stop, step) == (0, shape[axis], 1):
            continue
        if step < 0:  # slice the flipped axis with a positive step
            x = ctx.emit(_R.flip(x, axis))
            start, stop, step = shape[axis] - 1 - start, shape[axis] - 1 - stop, -step
        axes.append(axis)
        begin.append(start)
        end.append(max(stop, start))
        strides.append(step)
    if not axes:
        return x
    return _R.strided_slice(x, axes, begin, end, strides)


@lowering("gather")
def _gather(ctx, node, args):
    return _R.take(args[0], args[1], axis=node.attrs["axis"], mode="wrap")


@lowering("gather_elements")
def _gather_elements(ctx, node, args):
    axis = node.attrs["axis"] % node.inputs[0].type.rank
    idx = _positive(ctx, args[1], node.inputs[1].type.dtype, node.inputs[0].type.shape[axis])
    return _R.gather_elements(args[0], idx, axis=axis)


@lowering("gather_nd")
def _gather_nd(ctx, node, args):
    idx = args[1] if node.inputs[1].type.dtype == "int64" else ctx.emit(_R.astype(args[1], "int64"))
    batch, depth = node.attrs["batch_dims"], node.inputs[1].type.shape[-1]
    idx = _positive(ctx, idx, "int64", node.inputs[0].type.shape[batch:batch + depth])  # per index tuple entry
    return _R.gather_nd(args[0], idx, batch_dims=batch)


def _positive(ctx, idx, dt, sizes):
    """Indices with negative entries counted from the end of their dims (``sizes``: one per index or broadcast)."""
    negative = ctx.emit(_R.less(idx, const(np.array(0, dtype=np.dtype(dt)))))
    return ctx.emit(_R.where(negative, ctx.emit(_R.add(idx, const(np.asarray(sizes, dtype=np.dtype(dt))))), idx))


_SCATTER_REDUCTION = {"add": "add", "mul": "mul", "max": "max", "min": "min"}


def _scatter(ctx, node, args):
    """A scatter without a reduction is bmc's kernel (:func:`bmc.codegen.inplace.scatter_kernel`): written into a
    donated input's own buffer, or into a copy of the data. (TVM's scatters also copy, but leave a pragma that LLVM
    warns about on every compile.)"""
    from tvm import relax

    from bmc.codegen.inplace import scatter_kernel

    t = node.inputs[0].type
    ty = relax.TensorType(list(t.shape), t.dtype)
    in_place = node in ctx.in_place
    gv = ctx.bb.add_func(scatter_kernel(node, in_place), node.op + ("_in_place" if in_place else ""))
    if in_place:
        return relax.call_tir_inplace(gv, list(args), [0], ty)
    return relax.call_tir(gv, list(args), ty)


@lowering("scatter_elements")
def _scatter_elements(ctx, node, args):
    if node.attrs["reduction"] == "none":
        return _scatter(ctx, node, args)
    axis = node.attrs["axis"] % node.inputs[0].type.rank
    idx = _positive(ctx, args[1], node.inputs[1].type.dtype, node.inputs[0].type.shape[axis])
    return _R.scatter_elements(args[0], idx, args[2], axis=axis, reduction=_SCATTER_REDUCTION[node.attrs["reduction"]])


@lowering("scatter_nd")
def _scatter_nd(ctx, node, args):
    if node.attrs["reduction"] == "none":
        return _scatter(ctx, node, args)
    k = node.inputs[1].type.shape[-1]
    idx = _positive(ctx, args[1], node.inputs[1].type.dtype, node.inputs[0].type.shape[:k])
    if node.inputs[1].type.dtype != "int64":
        idx = ctx.emit(_R.astype(idx, "int64"))
    return _R.scatter_nd(args[0], idx, args[2], reduction=_SCATTER_REDUCTION[node.attrs["reduction"]])


@lowering("broadcast_to")
def _broadcast_to(ctx, node, args):
    return _R.broadcast_to(args[0], list(node.attrs["shape"]))


@lowering("tile")
def _tile(ctx, node, args):
    # reshape -> broadcast_to -> reshape (R.tile miscompiles with some -mcpu targets, e.g. znver4)
    shape, reps = node.inputs[0].type.shape, node.attrs["repeats"]
    spread = [v for d in shape for v in (1, d)]
    target = [v for r, d in zip(reps, shape) for v in (r, d)]
    x = ctx.emit(_R.reshape(args[0], spread))
    x = ctx.emit(_R.broadcast_to(x, target))
    return _R.reshape(x, [r * d for r, d in zip(reps, shape)])


@lowering("unpack_int4")
def _unpack_int4(ctx, node, args):
    shape = node.outputs[0].type.shape
    lo = ctx.emit(_R.bitwise_and(args[0], const(np.uint8(15))))
    hi = ctx.emit(_R.right_shift(args[0], const(np.uint8(4))))
    x = ctx.emit(_R.reshape(ctx.emit(_R.stack([lo, hi], axis=len(shape))), list(shape)))
    if not node.attrs["signed"]:
        return x
    x = ctx.emit(_R.astype(x, "int8"))
    return _R.where(_R.greater_equal(x, const(np.int8(8))), _R.subtract(x, const(np.int8(16))), x)


@lowering("pad")
def _pad(ctx, node, args):
    pads, rank = node.attrs["pads"], node.inputs[0].type.rank
    if any(p < 0 for p in pads):
        raise CompileError(f"negative pads {pads} are not supported by the Relax lowering",
                           where=f"node {node.source or node.op}", fix="slice the tensor instead of padding it")
    if node.attrs["mode"] == "edge":  # Relax's pad has no edge mode: gather with clamped indices per axis
        x, shape = args[0], node.inputs[0].type.shape
        for i in range(rank):
            if pads[i] or pads[i + rank]:
                idx = np.clip(np.arange(-pads[i], shape[i] + pads[i + rank]), 0, shape[i] - 1).astype(np.int64)
                x = ctx.emit(_R.take(x, const(idx), axis=i))
        return x
    width = [v for i in range(rank) for v in (pads[i], pads[i + rank])]
    return _R.nn.pad(args[0], width, pad_mode=node.attrs["mode"], pad_value=node.attrs["value"])


@lowering("constant")
def _constant(ctx, node, args):
    return const(node.attrs["value"])
