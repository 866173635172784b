"""Shape and data movement: reshape, transpose, concat, split, slice, gathers, broadcast, tile, pad, constant,
unpack_int4."""

from __future__ import annotations

from math import prod

import numpy as np

from bmc.ir.types import TensorType, dtype_of
from bmc.ops.registry import (contiguous, Attr, Cost, OpDef, OpError, broadcast_shapes, movement_cost, normalize_axis,
                              register, same_dtype)


def _reshape_infer(ins, attrs):
    (t,) = ins
    shape = tuple(attrs["shape"])
    if any(d < 0 for d in shape):
        raise OpError(f"reshape target {shape} must be fully static (resolve -1 and 0 first)")
    if prod(shape) != t.numel:
        raise OpError(f"cannot reshape {t.shape} ({t.numel} elements) to {shape} ({prod(shape)} elements)")
    return [t.with_shape(shape)]


register(OpDef("reshape", "shape", (1, 1), {"shape": Attr("ints")}, _reshape_infer,
               lambda ins, a: [ins[0].reshape(a["shape"])], movement_cost))


def _transpose_infer(ins, attrs):
    (t,) = ins
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(t.rank)):
        raise OpError(f"transpose perm {perm} is not a permutation of 0..{t.rank - 1}")
    return [t.with_shape(t.shape[p] for p in perm)]


register(OpDef("transpose", "shape", (1, 1), {"perm": Attr("ints")}, _transpose_infer,
               lambda ins, a: [contiguous(np.transpose(ins[0], a["perm"]))], movement_cost))


def _concat_infer(ins, attrs):
    dtype = same_dtype("concat", ins)
    rank = ins[0].rank
    axis = normalize_axis(attrs["axis"], rank)
    for t in ins:
        if t.rank != rank or any(d != e for i, (d, e) in enumerate(zip(t.shape, ins[0].shape)) if i != axis):
            raise OpError(f"concat inputs differ outside axis {axis}: {[x.shape for x in ins]}")
    shape = list(ins[0].shape)
    shape[axis] = sum(t.shape[axis] for t in ins)
    return [TensorType(dtype, shape)]


register(OpDef("concat", "shape", (1, None), {"axis": Attr("int")}, _concat_infer,
               lambda ins, a: [np.concatenate(ins, axis=a["axis"])], movement_cost))


def _split_infer(ins, attrs):
    (t,) = ins
    axis = normalize_axis(attrs["axis"], t.rank)
    sizes = tuple(attrs["sizes"])
    if sum(sizes) != t.shape[axis] or any(s < 0 for s in sizes):
        raise OpError(f"split sizes {sizes} do not add up to dim {axis} of {t.shape}")
    return [t.with_shape(t.shape[:axis] + (s,) + t.shape[axis + 1:]) for s in sizes]


def _split(ins, attrs):
    (x,) = ins
    return [contiguous(p) for p in np.split(x, np.cumsum(attrs["sizes"])[:-1], axis=attrs["axis"])]


register(OpDef("split", "shape", (1, 1), {"axis": Attr("int"), "sizes": Attr("ints")}, _split_infer, _split,
               movement_cost))


def slice_indices(shape, attrs):
    """Per-dim python slices for a slice node; starts/ends are clamped as in ONNX and numpy."""
    out = [slice(None)] * len(shape)
    for axis, start, end, step in zip(attrs["axes"], attrs["starts"], attrs["ends"], attrs["steps"]):
        axis = normalize_axis(axis, len(shape), "slice axis")
        if step == 0:
            raise OpError("slice step must not be 0")
        lo, hi, st = slice(start, end, step).indices(shape[axis])
        out[axis] = slice(lo, hi if hi >= 0 else None, st)  # stop -1 with a negative step means "past index 0"
    return tuple(out)


def _slice_infer(ins, attrs):
    (t,) = ins
    n = len(attrs["axes"])
    if not len(attrs["starts"]) == len(attrs["ends"]) == len(attrs["steps"]) == n:
        raise OpError("slice starts, ends, axes and steps must have the same length")
    idx = slice_indices(t.shape, attrs)
    return [t.with_shape(len(range(*s.indices(d))) for s, d in zip(idx, t.shape))]


register(OpDef("slice", "shape", (1, 1), {"starts": Attr("ints"), "ends": Attr("ints"), "axes": Attr("ints"),
                                          "steps": Attr("ints")},
               _slice_infer, lambda ins, a: [contiguous(ins[0][slice_indices(ins[0].shape, a)])],
               movement_cost))


def _index_check(op, t):
    if t.dtype not in ("int64", "int32"):
        raise OpError(f"op {op} needs int32/int64 indices, got {t.dtype}")


def _gather_infer(ins, attrs):
    data, idx = ins
    _index_check("gather", idx)
    axis = normalize_axis(attrs["axis"], data.rank)
    return [data.with_shape(data.shape[:axis] + idx.shape + data.shape[axis + 1:])]


def _gather_cost(ins, outs, attrs):
    return Cost(0, 2 * outs[0].nbytes + ins[1].nbytes)


register(OpDef("gather", "shape", (2, 2), {"axis": Attr("int", 0)}, _gather_infer,
               lambda ins, a: [np.take(ins[0], ins[1], axis=a["axis"])], _gather_cost,
               doc="numpy.take (negative indices count from the end)"))


def _gather_elements_infer(ins, attrs):
    data, idx = ins
    _index_check("gather_elements", idx)
    normalize_axis(attrs["axis"], data.rank)
    if idx.rank != data.rank:
        raise OpError(f"gather_elements indices rank {idx.rank} != data rank {data.rank}")
    return [data.with_shape(idx.shape)]


def _gather_elements(ins, attrs):
    data, idx = ins
    axis = normalize_axis(attrs["axis"], data.ndim)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return [np.take_along_axis(data, idx, axis=axis)]


register(OpDef("gather_elements", "shape", (2, 2), {"axis": Attr("int", 0)}, _gather_elements_infer,
               _gather_elements, _gather_cost))


def _gather_nd_infer(ins, attrs):
    data, idx = ins
    _index_check("gather_nd", idx)
    b, k = attrs["batch_dims"], idx.shape[-1]
    if b + k > data.rank:
        raise OpError(f"gather_nd index depth {k} + batch_dims {b} exceeds data rank {data.rank}")
    return [data.with_shape(idx.shape[:-1] + data.shape[b + k:])]


def _gather_nd(ins, attrs):
    data, idx = ins
    b = attrs["batch_dims"]
    batch = data.shape[:b]
    data_f = data.reshape((prod(batch),) + data.shape[b:])
    idx_f = idx.reshape((prod(batch), -1, idx.shape[-1]))
    k = idx.shape[-1]
    out = [d[tuple(np.moveaxis(np.where(i < 0, i + np.array(d.shape[:k]), i), -1, 0))]
           for d, i in zip(data_f, idx_f)]
    return [np.stack(out).reshape(idx.shape[:-1] + data.shape[b + k:])]


register(OpDef("gather_nd", "shape", (2, 2), {"batch_dims": Attr("int", 0)}, _gather_nd_infer, _gather_nd,
               _gather_cost))


_SCATTER_REDUCTIONS = {"none": None, "add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter_check(op, data, idx, updates, attrs):
    _index_check(op, idx)
    if updates.dtype != data.dtype:
        raise OpError(f"{op} updates are {updates.dtype} but the data is {data.dtype}")
    if attrs["reduction"] not in _SCATTER_REDUCTIONS:
        raise OpError(f"{op} reduction {attrs['reduction']!r} is not one of {', '.join(_SCATTER_REDUCTIONS)}")


def _scatter_elements_infer(ins, attrs):
    data, idx, updates = ins
    _scatter_check("scatter_elements", data, idx, updates, attrs)
    normalize_axis(attrs["axis"], data.rank)
    if idx.shape != updates.shape or idx.rank != data.rank:
        raise OpError(f"scatter_elements needs indices and updates of one shape and the data's rank, got "
                      f"{idx.shape}, {updates.shape} for data {data.shape}")
    return [data]


def _scatter(out, where, updates, reduction):
    """``out[where] = updates`` (or combined with ``reduction``), one index after the other (ONNX's order)."""
    fn = _SCATTER_REDUCTIONS[reduction]
    if fn is None:
        out[where] = updates
    else:
        fn.at(out, where, updates)
    return out


def _scatter_elements(ins, attrs):
    data, idx, updates = ins
    axis = normalize_axis(attrs["axis"], data.ndim)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    where = list(np.indices(idx.shape, sparse=True))
    where[axis] = idx
    return [_scatter(data.copy(), tuple(where), updates, attrs["reduction"])]


def _scatter_nd_infer(ins, attrs):
    data, idx, updates = ins
    _scatter_check("scatter_nd", data, idx, updates, attrs)
    k = idx.shape[-1] if idx.rank else 0
    if not 1 <= k <= data.rank or updates.shape != idx.shape[:-1] + data.shape[k:]:
        raise OpError(f"scatter_nd updates must be indices.shape[:-1] + data.shape[k:] = "
                      f"{idx.shape[:-1] + data.shape[k:]}, got {updates.shape}")
    return [data]


def _scatter_nd(ins, attrs):
    data, idx, updates = ins
    k = idx.shape[-1]
    idx = np.where(idx < 0, idx + np.array(data.shape[:k]), idx)
    return [_scatter(data.copy(), tuple(np.moveaxis(idx, -1, 0)), updates, attrs["reduction"])]


def _scatter_cost(ins, outs, attrs):
    return Cost(ins[2].numel, 2 * outs[0].nbytes + ins[1].nbytes + ins[2].nbytes)


register(OpDef("scatter_elements", "shape", (3, 3), {"axis": Attr("int", 0), "reduction": Attr("str", "none")},
               _scatter_elements_infer, _scatter_elements, _scatter_cost,
               doc="ONNX ScatterElements: data with updates written at indices along axis"))
register(OpDef("scatter_nd", "shape", (3, 3), {"reduction": Attr("str", "none")}, _scatter_nd_infer, _scatter_nd,
               _scatter_cost, doc="ONNX ScatterND: data with updates written at index tuples"))


def _broadcast_infer(ins, attrs):
    (t,) = ins
    shape = tuple(attrs["shape"])
    if broadcast_shapes(t.shape, shape) != shape:
        raise OpError(f"cannot broadcast {t.shape} to {shape}")
    return [t.with_shape(shape)]


register(OpDef("broadcast_to", "shape", (1, 1), {"shape": Attr("ints")}, _broadcast_infer,
               lambda ins, a: [contiguous(np.broadcast_to(ins[0], a["shape"]))], movement_cost))


def _tile_infer(ins, attrs):
    (t,) = ins
    reps = tuple(attrs["repeats"])
    if len(reps) != t.rank or any(r < 0 for r in reps):
        raise OpError(f"tile repeats {reps} must be {t.rank} non-negative ints")
    return [t.with_shape(d * r for d, r in zip(t.shape, reps))]


register(OpDef("tile", "shape", (1, 1), {"repeats": Attr("ints")}, _tile_infer,
               lambda ins, a: [np.tile(ins[0], a["repeats"])], movement_cost))


def _unpack_int4_infer(ins, attrs):
    (t,) = ins
    if t.dtype != "uint8" or t.rank == 0:
        raise OpError(f"unpack_int4 takes a uint8 tensor of rank >= 1, got {t}")
    return [TensorType("int8" if attrs["signed"] else "uint8", t.shape[:-1] + (2 * t.shape[-1],))]


def unpack_nibbles(x: np.ndarray) -> np.ndarray:
    """uint8 ``[..., n]`` → the nibbles ``[..., 2n]`` (0..15), the low one of each byte first (ONNX's order)."""
    return np.stack([x & 15, x >> 4], axis=-1).reshape(x.shape[:-1] + (2 * x.shape[-1],))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """The inverse of :func:`unpack_nibbles`: ``[..., 2n]`` values (their low 4 bits) → uint8 ``[..., n]``."""
    q = q.astype(np.uint8) & 15
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack_int4(ins, attrs):
    (x,) = ins
    nibbles = unpack_nibbles(x)
    return [np.where(nibbles >= 8, nibbles.astype(np.int8) - 16, nibbles).astype(np.int8) if attrs["signed"]
            else nibbles]


register(OpDef("unpack_int4", "shape", (1, 1), {"signed": Attr("bool")}, _unpack_int4_infer, _unpack_int4,
               movement_cost, doc="4-bit integers packed two per byte along the last dim, the first in the low "
                                  "nibble (ONNX's order), to one per byte; sign-extended when signed"))


def _pad_infer(ins, attrs):
    (t,) = ins
    pads = tuple(attrs["pads"])
    if len(pads) != 2 * t.rank:
        raise OpError(f"pad needs {2 * t.rank} pads (all begins, then all ends), got {len(pads)}")
    if attrs["mode"] not in ("constant", "reflect", "edge"):
        raise OpError(f"pad mode {attrs['mode']!r} is not one of constant, reflect, edge")
    shape = tuple(d + pads[i] + pads[i + t.rank] for i, d in enumerate(t.shape))
    if any(d < 0 for d in shape):
        raise OpError(f"pads {pads} make a negative dim of {t.shape}")
    return [t.with_shape(shape)]


def _pad(ins, attrs):
    (x,) = ins
    pads, r = attrs["pads"], x.ndim
    pos = [(max(pads[i], 0), max(pads[i + r], 0)) for i in range(r)]
    if attrs["mode"] == "constant":
        y = np.pad(x, pos, mode="constant", constant_values=np.array(attrs["value"]).astype(x.dtype))
    else:
        y = np.pad(x, pos, mode=attrs["mode"])
    crop = tuple(slice(-min(pads[i], 0), y.shape[i] + min(pads[i + r], 0)) for i in range(r))
    return [contiguous(y[crop])]


register(OpDef("pad", "shape", (1, 1), {"pads": Attr("ints"), "mode": Attr("str", "constant"),
                                        "value": Attr("float", 0.0)}, _pad_infer, _pad, movement_cost))


def _constant_infer(ins, attrs):
    value = np.asarray(attrs["value"])
    return [TensorType(dtype_of(value.dtype), value.shape)]


register(OpDef("constant", "shape", (0, 0), {"value": Attr("tensor")}, _constant_infer,
               lambda ins, a: [np.asarray(a["value"])], lambda ins, outs, a: Cost(0, outs[0].nbytes),
               doc="a small literal tensor (weights are parameters, not constants)"))


