"""Converters for ONNX shape, movement and constant ops. Shape arithmetic folds to compile-time arrays."""

from __future__ import annotations

from math import prod

import numpy as np
import onnx

from bmc.frontend.onnx.importer import Context, ConvertError, converter, fill
from bmc.ir.types import np_dtype
from bmc.ops.registry import broadcast_shapes


def _ints(a) -> tuple[int, ...]:
    return tuple(int(x) for x in np.asarray(a).reshape(-1))


@converter("Constant")
def _constant(ctx: Context, node):
    a = node.attribute[0]
    if a.name == "value":
        from bmc.frontend.onnx import loader

        stored = np.array(loader.initializer_tensor(a.t, None).numpy())
        if a.t.data_type not in loader.NARROW:
            return [stored]
        ctx.narrow[node.output[0]] = loader.NARROW[a.t.data_type]
        return [loader.unpack_narrow(stored, a.t.data_type, tuple(a.t.dims))]
    if a.name in ("value_float", "value_int"):
        return [np.array(onnx.helper.get_attribute_value(a), dtype=np.float32 if a.name == "value_float" else np.int64)]
    if a.name in ("value_floats", "value_ints"):
        return [np.array(list(onnx.helper.get_attribute_value(a)),
                         dtype=np.float32 if a.name == "value_floats" else np.int64)]
    raise ConvertError(f"Constant attribute {a.name!r} is not supported",
                       fix="use value, value_float(s) or value_int(s)")


@converter("ConstantOfShape")
def _constant_of_shape(ctx: Context, node):
    shape = _ints(ctx.const(0, "shape"))
    value = ctx.attr("value")
    arr = np.zeros(1, np.float32) if value is None else onnx.numpy_helper.to_array(value).reshape(-1)
    return [fill(ctx, shape, arr)]


@converter("Shape")
def _shape(ctx: Context, node):
    shape = ctx.type(ctx.operand(0)).shape
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    return [np.array(shape[slice(start, end)], dtype=np.int64)]


@converter("Size")
def _size(ctx: Context, node):
    return [np.array(ctx.type(ctx.operand(0)).numel, dtype=np.int64)]


@converter("Range")
def _range(ctx: Context, node):
    values = [ctx.const(i, n) for i, n in enumerate(("start", "limit", "delta"))]
    for v, n in zip(values, ("start", "limit", "delta")):
        if v.size != 1:
            raise ConvertError(f"Range's {n} must be a scalar, got shape {v.shape}")
    start, limit, delta = (v.reshape(()) for v in values)  # (a one-element tensor passes, as in onnx's reference)
    return [np.arange(start, limit, delta).astype(start.dtype)]


@converter("Reshape")
def _reshape(ctx: Context, node):
    x = ctx.operand(0)
    in_shape = ctx.type(x).shape
    target = list(_ints(ctx.const(1, "shape")) if ctx.opset >= 5 else ctx.attr("shape"))
    if not ctx.attr("allowzero", 0):
        target = [in_shape[i] if d == 0 else d for i, d in enumerate(target)]
    if target.count(-1) > 1:
        raise ConvertError(f"Reshape target {target} has more than one -1")
    if -1 in target:
        known = prod(d for d in target if d != -1)
        if known == 0 or prod(in_shape) % known:
            raise ConvertError(f"cannot reshape {in_shape} to {target}")
        target[target.index(-1)] = prod(in_shape) // known
    return [ctx.emit1("reshape", [x], shape=tuple(target))]


@converter("Flatten")
def _flatten(ctx: Context, node):
    x = ctx.operand(0)
    shape = ctx.type(x).shape
    axis = ctx.attr("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    return [ctx.emit1("reshape", [x], shape=(prod(shape[:axis]), prod(shape[axis:])))]


@converter("Squeeze", "Unsqueeze")
def _squeeze(ctx: Context, node):
    x = ctx.operand(0)
    shape = list(ctx.type(x).shape)
    axes = ctx.const(1, "axes") if ctx.opset >= 13 else ctx.attr("axes", None)
    axes = None if axes is None else _ints(axes)
    if node.op_type == "Squeeze":
        rank = len(shape)
        drop = {a % rank for a in axes} if axes else {i for i, d in enumerate(shape) if d == 1}
        if any(shape[a] != 1 for a in drop):
            raise ConvertError(f"Squeeze axes {axes} select dims that are not 1 in {tuple(shape)}")
        new = [d for i, d in enumerate(shape) if i not in drop]
    else:
        rank = len(shape) + len(axes)
        new = shape[:]
        for a in sorted(a % rank for a in axes):
            new.insert(a, 1)
    return [ctx.emit1("reshape", [x], shape=tuple(new))]


@converter("Transpose")
def _transpose(ctx: Context, node):
    x = ctx.operand(0)
    perm = ctx.attr("perm", None)
    perm = tuple(reversed(range(len(ctx.type(x).shape)))) if perm is None else tuple(perm)
    return [ctx.emit1("transpose", [x], perm=perm)]


@converter("Concat")
def _concat(ctx: Context, node):
    parts = [ctx.operand(i) for i in range(len(node.input)) if ctx.has(i)]
    parts = [p for p in parts if ctx.type(p).numel or len(parts) == 1]
    return [ctx.emit1("concat", parts, axis=ctx.attr("axis"))]


@converter("Split")
def _split(ctx: Context, node):
    x = ctx.operand(0)
    shape = ctx.type(x).shape
    axis = ctx.attr("axis", 0) % len(shape)
    n_out = len(node.output)
    sizes = ctx.const(1, "split") if ctx.opset >= 13 else ctx.attr("split", None)
    if sizes is not None and len(sizes):
        sizes = _ints(sizes)
    else:
        n = ctx.attr("num_outputs", n_out)
        chunk = -(-shape[axis] // n)
        sizes = tuple(min(chunk, shape[axis] - chunk * i) for i in range(n))
    return ctx.emit("split", [x], axis=axis, sizes=sizes)


@converter("Slice")
def _slice(ctx: Context, node):
    x = ctx.operand(0)
    rank = len(ctx.type(x).shape)
    if ctx.opset < 10:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes = ctx.attr("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(ctx.const(1, "starts")), _ints(ctx.const(2, "ends"))
        axes = _ints(ctx.const(3, "axes")) if ctx.has(3) else tuple(range(len(starts)))
        steps = _ints(ctx.const(4, "steps")) if ctx.has(4) else (1,) * len(starts)
    big = 2**62
    clamp = [max(min(int(v), big), -big) for v in starts], [max(min(int(v), big), -big) for v in ends]
    return [ctx.emit1("slice", [x], starts=clamp[0], ends=clamp[1], axes=tuple(a % rank for a in axes),
                      steps=tuple(steps))]


@converter("Gather")
def _gather(ctx: Context, node):
    return [ctx.emit1("gather", [ctx.operand(0), ctx.operand(1)], axis=ctx.attr("axis", 0))]


@converter("GatherElements")
def _gather_elements(ctx: Context, node):
    return [ctx.emit1("gather_elements", [ctx.operand(0), ctx.operand(1)], axis=ctx.attr("axis", 0))]


@converter("GatherND")
def _gather_nd(ctx: Context, node):
    return [ctx.emit1("gather_nd", [ctx.operand(0), ctx.operand(1)], batch_dims=ctx.attr("batch_dims", 0))]


@converter("Expand")
def _expand(ctx: Context, node):
    x = ctx.operand(0)
    shape = broadcast_shapes(ctx.type(x).shape, _ints(ctx.const(1, "shape")))
    if shape == ctx.type(x).shape:
        return [x]
    return [ctx.emit1("broadcast_to", [x], shape=shape)]


@converter("Tile")
def _tile(ctx: Context, node):
    return [ctx.emit1("tile", [ctx.operand(0)], repeats=_ints(ctx.const(1, "repeats")))]


@converter("Pad")
def _pad(ctx: Context, node):
    x = ctx.operand(0)
    rank = len(ctx.type(x).shape)
    mode = ctx.text("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise ConvertError(f"Pad mode {mode!r} is not supported", fix="use constant, reflect, edge or wrap")
    if ctx.opset < 11:
        pads, value = list(ctx.attr("pads")), ctx.attr("value", 0.0)
    else:
        pads = list(_ints(ctx.const(1, "pads")))
        cv = ctx.const(2, "constant_value")
        value = 0.0 if cv is None or cv.size == 0 else float(np.asarray(cv).reshape(-1)[0])
        if ctx.has(3):
            axes = [a % rank for a in _ints(ctx.const(3, "axes"))]
            full = [0] * (2 * rank)
            for k, a in enumerate(axes):
                full[a], full[a + rank] = pads[k], pads[k + len(axes)]
            pads = full
    if mode == "wrap":
        return [_wrap_pad(ctx, x, pads)]
    if mode == "constant" and any(p < 0 for p in pads):  # a negative pad crops (RWKV's time shift): slice, then pad
        shape = ctx.type(x).shape
        cut = [a for a in range(rank) if pads[a] < 0 or pads[a + rank] < 0]
        x = ctx.emit1("slice", [x], starts=tuple(max(0, -pads[a]) for a in cut),
                      ends=tuple(shape[a] - max(0, -pads[a + rank]) for a in cut), axes=tuple(cut),
                      steps=(1,) * len(cut))
        pads = [max(0, p) for p in pads]
        if not any(pads):
            return [x]
    return [ctx.emit1("pad", [x], pads=tuple(pads), mode=mode, value=value)]


def _wrap_pad(ctx: Context, x, pads):
    """Pad mode ``wrap`` (numpy's): the axis extended periodically, as a tile of the axis then a slice of it."""
    shape = ctx.type(x).shape
    rank = len(shape)
    if any(p < 0 for p in pads):
        raise ConvertError("Pad mode 'wrap' with negative pads is not supported",
                           fix="crop with Slice first, then pad with non-negative pads")
    for axis in range(rank):
        before, after, n = pads[axis], pads[axis + rank], shape[axis]
        if before == after == 0:
            continue
        if n == 0:
            raise ConvertError(f"Pad mode 'wrap' of an empty axis {axis}", fix="remove the Pad or its empty axis")
        reps = -(-max(before, after) // n)  # copies needed on each side
        tiled = ctx.emit1("tile", [x], repeats=tuple(2 * reps + 1 if a == axis else 1 for a in range(rank)))
        x = ctx.emit1("slice", [tiled], starts=(reps * n - before,), ends=(reps * n + n + after,), axes=(axis,),
                      steps=(1,))
    return x


@converter("Trilu")
def _trilu(ctx: Context, node):
    x = ctx.operand(0)
    k = int(np.asarray(ctx.const(1, "k")).reshape(-1)[0]) if ctx.has(1) else 0
    shape = ctx.type(x).shape
    rows, cols = shape[-2], shape[-1]
    keep = np.triu(np.ones((rows, cols), bool), k) if ctx.attr("upper", 1) else np.tril(np.ones((rows, cols), bool), k)
    zero = np.zeros((), dtype=x.dtype if isinstance(x, np.ndarray) else None) if isinstance(x, np.ndarray) else None
    if zero is None:
        from bmc.ir.types import np_dtype

        zero = np.zeros((), dtype=np_dtype(ctx.type(x).dtype))
    return [ctx.emit1("where", [keep, x, zero])]


@converter("NonZero", "Unique", "NonMaxSuppression")
def _data_dependent(ctx: Context, node):
    x = ctx.operand(0)
    if isinstance(x, np.ndarray) and node.op_type == "NonZero":
        return [np.array(np.nonzero(x), dtype=np.int64)]
    raise ConvertError(f"{node.op_type} has a data-dependent output shape, which bmc's static-shape IR cannot "
                       "represent", fix="fold it away by binding inputs, or remove it from the model")


@converter("ScatterElements", "Scatter")
def _scatter_elements(ctx: Context, node):
    return [ctx.emit1("scatter_elements", [ctx.operand(0), ctx.operand(1), ctx.operand(2)],
                      axis=ctx.attr("axis", 0), reduction=ctx.text("reduction", "none"))]


@converter("ScatterND")
def _scatter_nd(ctx: Context, node):
    return [ctx.emit1("scatter_nd", [ctx.operand(0), ctx.operand(1), ctx.operand(2)],
                      reduction=ctx.text("reduction", "none"))]


@converter("TensorScatter")
def _tensor_scatter(ctx: Context, node):
    """A KV-cache write (opset 24): ``update`` lands at ``write_indices[b]`` (0 without them; modulo the cache
    length in ``circular`` mode) along ``axis`` of each batch's cache. A gather of the update at every cache
    position, then a select of the written positions: no scatter, and the same static shapes."""
    past, update = ctx.operand(0), ctx.operand(1)
    pt, ut = ctx.type(past), ctx.type(update)
    axis, mode = ctx.attr("axis", -2) % max(pt.rank, 1), ctx.text("mode", "linear")
    if pt.rank < 2 or axis == 0:
        raise ConvertError(f"TensorScatter needs a cache of rank >= 2 with the sequence axis after the batch axis, "
                           f"got {pt} and axis {ctx.attr('axis', -2)}")
    total, length = pt.shape[axis], ut.shape[axis]
    if ut.rank != pt.rank or any(a != b for i, (a, b) in enumerate(zip(pt.shape, ut.shape)) if i != axis) \
            or length > total or mode not in ("linear", "circular"):
        raise ConvertError(f"TensorScatter of update {ut} into cache {pt} (axis {axis}, mode {mode!r}): the update "
                           "must be the cache's shape with at most as many positions along the axis, and the mode "
                           "linear or circular")
    lead = (pt.shape[0],) + (1,) * (pt.rank - 1)
    writes = ctx.optional(2)
    writes = np.zeros(lead, np.int64) if writes is None else ctx.emit1(
        "reshape", [ctx.emit1("cast", [writes], dtype="int64")], shape=lead)
    if mode == "circular":  # write indices are non-negative
        writes = ctx.emit1("sub", [writes, ctx.emit1("mul", [ctx.emit1("div", [writes, np.int64(total)]),
                                                              np.int64(total)])])
    positions = np.arange(total, dtype=np.int64).reshape([total if i == axis else 1 for i in range(pt.rank)])
    offset = ctx.emit1("sub", [positions, writes])  # the update position each cache position would take
    if mode == "circular":
        offset = ctx.emit1("where", [ctx.emit1("less", [offset, np.int64(0)]),
                                     ctx.emit1("add", [offset, np.int64(total)]), offset])
    written = ctx.emit1("logical_and", [ctx.emit1("greater_equal", [offset, np.int64(0)]),
                                        ctx.emit1("less", [offset, np.int64(length)])])
    index = ctx.emit1("minimum", [ctx.emit1("maximum", [offset, np.int64(0)]), np.int64(length - 1)])
    index = ctx.emit1("broadcast_to", [index], shape=pt.shape)
    return [ctx.emit1("where", [written, ctx.emit1("gather_elements", [update, index], axis=axis), past])]


@converter("Col2Im")
def _col2im(ctx: Context, node):
    """The inverse of im2col (PyTorch's ``fold``): each column of ``[N, C * prod(block), L]`` is added back into
    the (padded) image at its block's positions: a scatter-add with indices computed here, then the padding cut."""
    x = ctx.operand(0)
    image, block = _ints(ctx.const(1, "image_shape")), _ints(ctx.const(2, "block_shape"))
    dims, xt = len(image), ctx.type(x)
    strides = tuple(ctx.attr("strides", [1] * dims))
    dilations = tuple(ctx.attr("dilations", [1] * dims))
    pads = tuple(ctx.attr("pads", [0] * 2 * dims))
    padded = tuple(d + pads[i] + pads[dims + i] for i, d in enumerate(image))
    counts = tuple((p - dl * (k - 1) - 1) // s + 1 for p, k, s, dl in zip(padded, block, strides, dilations))
    if len(block) != dims or xt.rank != 3 or xt.shape[1] % prod(block) or xt.shape[2] != prod(counts) \
            or min(counts, default=1) < 1:
        raise ConvertError(f"Col2Im of {xt} into image {image} with blocks {block}: the input must be "
                           f"[N, C * {prod(block)}, {prod(counts)}] (the blocks that fit the padded image)")
    n, c = xt.shape[0], xt.shape[1] // prod(block)
    offsets = np.stack(np.meshgrid(*[np.arange(k) * dl for k, dl in zip(block, dilations)], indexing="ij"), -1)
    starts = np.stack(np.meshgrid(*[np.arange(m) * s for m, s in zip(counts, strides)], indexing="ij"), -1)
    where = offsets.reshape(-1, 1, dims) + starts.reshape(1, -1, dims)  # [K, L, dims] positions in the padded image
    flat = np.ravel_multi_index(tuple(np.moveaxis(where, -1, 0)), padded).reshape(1, 1, -1).astype(np.int64)
    updates = ctx.emit1("reshape", [x], shape=(n, c, flat.size))
    index = ctx.emit1("broadcast_to", [flat], shape=(n, c, flat.size))
    zeros = fill(ctx, (n, c, prod(padded)), np.zeros(1, np_dtype(xt.dtype)))
    summed = ctx.emit1("scatter_elements", [zeros, index, updates], axis=2, reduction="add")
    y = ctx.emit1("reshape", [summed], shape=(n, c) + padded)
    if any(pads):
        y = ctx.emit1("slice", [y], starts=pads[:dims], ends=tuple(p + d for p, d in zip(pads, image)),
                      axes=tuple(range(2, 2 + dims)), steps=(1,) * dims)
    return [y]


@converter("ReverseSequence")
def _reverse_sequence(ctx: Context, node):
    """Each batch entry's first ``sequence_lens[b]`` steps reversed, the rest kept: a gather along the time axis of
    ``len - 1 - t`` where ``t < len``, else ``t``."""
    x, lens = ctx.operand(0), ctx.operand(1)
    xt = ctx.type(x)
    time_axis, batch_axis = ctx.attr("time_axis", 0) % xt.rank, ctx.attr("batch_axis", 1) % xt.rank
    if {time_axis, batch_axis} != {0, 1}:
        raise ConvertError("ReverseSequence's time and batch axes must be 0 and 1")
    steps = np.arange(xt.shape[time_axis], dtype=np.int64).reshape(
        [-1 if i == time_axis else 1 for i in range(xt.rank)])
    lens = ctx.emit1("reshape", [ctx.emit1("cast", [lens], dtype="int64")],
                     shape=tuple(xt.shape[batch_axis] if i == batch_axis else 1 for i in range(xt.rank)))
    index = ctx.emit1("where", [ctx.emit1("less", [steps, lens]),
                                ctx.emit1("sub", [ctx.emit1("sub", [lens, np.int64(1)]), steps]), steps])
    return [ctx.emit1("gather_elements", [x, ctx.emit1("broadcast_to", [index], shape=xt.shape)], axis=time_axis)]


@converter("MaxUnpool")
def _max_unpool(ctx: Context, node):
    """MaxPool's values put back where its Indices say (flat indices into ``[N, C, *spatial]`` of the size MaxPool's
    kernel, strides and pads undo), zeros elsewhere: a scatter into a zero tensor; a larger ``output_shape`` pads
    that with zeros at the end of each dim (as ONNX's reference does)."""
    x, where = ctx.operand(0), ctx.operand(1)
    xt = ctx.type(x)
    nd = xt.rank - 2
    kernel = tuple(ctx.attr("kernel_shape"))
    strides, pads = tuple(ctx.attr("strides", [1] * nd)), tuple(ctx.attr("pads", [0] * (2 * nd)))
    shape = xt.shape[:2] + tuple((d - 1) * s + k - pads[i] - pads[nd + i]
                                 for i, (d, s, k) in enumerate(zip(xt.shape[2:], strides, kernel)))
    wanted = _ints(ctx.const(2, "output_shape")) if ctx.has(2) else shape
    if len(wanted) != xt.rank or any(w < d for w, d in zip(wanted, shape)):
        raise ConvertError(f"MaxUnpool's output_shape {wanted} is smaller than the unpooled {shape}")
    n, c = xt.shape[:2]
    flat = prod(shape[2:])
    base = (np.arange(n * c, dtype=np.int64) * flat).reshape(n, c, 1)  # the indices count from the tensor's start
    pooled = (n, c, prod(xt.shape[2:]))
    index = ctx.emit1("sub", [ctx.emit1("reshape", [ctx.emit1("cast", [where], dtype="int64")], shape=pooled),
                              base])
    zeros = fill(ctx, (n, c, flat), np.zeros(1, np_dtype(xt.dtype)))
    values = ctx.emit1("reshape", [x], shape=pooled)
    y = ctx.emit1("reshape", [ctx.emit1("scatter_elements", [zeros, index, values], axis=2)], shape=shape)
    if wanted != shape:
        y = ctx.emit1("pad", [y], pads=(0,) * xt.rank + tuple(w - d for w, d in zip(wanted, shape)))
    return [y]


@converter("Compress")
def _compress(ctx: Context, node):
    """The slices along ``axis`` (of the flattened input without one) where ``condition`` is true: a gather of
    those indices, so the condition must be known at compile time (the output's shape depends on it)."""
    x = ctx.operand(0)
    keep = np.flatnonzero(np.asarray(ctx.const(1, "condition")).reshape(-1))
    axis = ctx.attr("axis")
    if axis is None:
        x, axis = ctx.emit1("reshape", [x], shape=(ctx.type(x).numel,)), 0
    axis %= ctx.type(x).rank
    if keep.size and keep[-1] >= ctx.type(x).shape[axis]:
        raise ConvertError(f"Compress' condition selects index {keep[-1]}, past the {ctx.type(x).shape[axis]} "
                           f"entries of axis {axis}")
    return [ctx.emit1("gather", [x, keep.astype(np.int64)], axis=axis)]
