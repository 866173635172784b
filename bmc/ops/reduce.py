"""Reductions and normalizations: reduce_*, arg max/min, softmax, layer/batch norm, LRN, cumulative sum."""

from __future__ import annotations

import numpy as np

from bmc.ir.types import FLOAT_DTYPES, TensorType
from bmc.ops.registry import (Attr, Cost, OpDef, OpError, bytes_moved, elementwise_cost, normalize_axis, register,
                              same_dtype)


def _axes(attrs, rank):
    axes = attrs["axes"]
    if axes is None:
        return tuple(range(rank))
    norm = tuple(sorted({normalize_axis(a, rank, "reduction axis") for a in axes}))
    if len(norm) != len(axes):
        raise OpError(f"reduction axes {axes} repeat an axis")
    return norm


def _reduce_infer(ins, attrs):
    (t,) = ins
    axes = _axes(attrs, t.rank)
    if attrs["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
    else:
        shape = tuple(d for i, d in enumerate(t.shape) if i not in axes)
    return [t.with_shape(shape)]


def _reduce_ref(fn):
    def ref(ins, attrs):
        (x,) = ins
        axes = _axes(attrs, x.ndim)
        wide = x.astype(np.float32) if x.dtype.kind in "fV" and x.dtype.itemsize < 4 else x
        return [np.asarray(fn(wide, axis=axes, keepdims=attrs["keepdims"])).astype(x.dtype)]

    return ref


def _reduce_cost(ins, outs, attrs):
    return Cost(ins[0].numel, bytes_moved(ins, outs))


_REDUCE_ATTRS = {"axes": Attr("axes", None), "keepdims": Attr("bool", True)}
for _name, _fn in {"reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min,
                   "reduce_prod": np.prod}.items():
    register(OpDef(_name, "reduce", (1, 1), dict(_REDUCE_ATTRS), _reduce_infer, _reduce_ref(_fn), _reduce_cost))


def _arg_infer(ins, attrs):
    (t,) = ins
    axis = normalize_axis(attrs["axis"], t.rank)
    shape = tuple(1 if i == axis else d for i, d in enumerate(t.shape)) if attrs["keepdims"] else \
        tuple(d for i, d in enumerate(t.shape) if i != axis)
    return [TensorType("int64", shape)]


def _arg_ref(fn):
    def ref(ins, attrs):
        (x,) = ins
        axis = normalize_axis(attrs["axis"], x.ndim)
        return [fn(x, axis=axis, keepdims=attrs["keepdims"]).astype(np.int64)]

    return ref


for _name, _fn in {"argmax": np.argmax, "argmin": np.argmin}.items():
    register(OpDef(_name, "reduce", (1, 1), {"axis": Attr("int", 0), "keepdims": Attr("bool", True)},
                   _arg_infer, _arg_ref(_fn), _reduce_cost))


def _float_same(name):
    def infer(ins, attrs):
        dtype = same_dtype(name, ins)
        if dtype not in FLOAT_DTYPES:
            raise OpError(f"op {name} needs floating-point inputs, got {dtype}")
        if "axis" in attrs:
            normalize_axis(attrs["axis"], ins[0].rank)
        return [ins[0]]

    return infer


def _wide(x):
    return x.astype(np.float32) if x.dtype.itemsize < 4 else x


def _softmax(ins, attrs):
    (x,) = ins
    w = _wide(x)
    e = np.exp(w - w.max(axis=attrs["axis"], keepdims=True))
    return [(e / e.sum(axis=attrs["axis"], keepdims=True)).astype(x.dtype)]


def _log_softmax(ins, attrs):
    (x,) = ins
    w = _wide(x)
    s = w - w.max(axis=attrs["axis"], keepdims=True)
    return [(s - np.log(np.exp(s).sum(axis=attrs["axis"], keepdims=True))).astype(x.dtype)]


register(OpDef("softmax", "reduce", (1, 1), {"axis": Attr("int", -1)}, _float_same("softmax"), _softmax,
               elementwise_cost(5)))
register(OpDef("log_softmax", "reduce", (1, 1), {"axis": Attr("int", -1)}, _float_same("log_softmax"),
               _log_softmax, elementwise_cost(5)))


def _norm_axes(attrs, rank):
    return tuple(range(normalize_axis(attrs["axis"], rank), rank))


def _layer_norm_infer(ins, attrs):
    x = ins[0]
    _float_same("layer_norm")(ins, {})
    axes = _norm_axes(attrs, x.rank)
    want = tuple(x.shape[a] for a in axes)
    for t in ins[1:]:
        if t.shape != want:
            raise OpError(f"layer_norm scale/bias must have shape {want} (the normalized dims), got {t.shape}")
    return [x]


def _layer_norm(ins, attrs):
    x = ins[0]
    axes = _norm_axes(attrs, x.ndim)
    w = _wide(x)
    mean = w.mean(axis=axes, keepdims=True)
    var = ((w - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (w - mean) / np.sqrt(var + attrs["epsilon"]) * _wide(ins[1])
    if len(ins) > 2:
        y = y + _wide(ins[2])
    return [y.astype(x.dtype)]


register(OpDef("layer_norm", "reduce", (2, 3), {"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
               _layer_norm_infer, _layer_norm, elementwise_cost(8),
               doc="normalize over dims axis..rank-1, then scale (and shift)"))


def _rms_norm(ins, attrs):
    x, scale = ins
    axes = _norm_axes(attrs, x.ndim)
    w = _wide(x)
    y = w / np.sqrt((w * w).mean(axis=axes, keepdims=True) + attrs["epsilon"]) * _wide(scale)
    return [y.astype(x.dtype)]


register(OpDef("rms_norm", "reduce", (2, 2), {"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
               _layer_norm_infer, _rms_norm, elementwise_cost(6)))


def _batch_norm_infer(ins, attrs):
    x = ins[0]
    _float_same("batch_norm")(ins, {})
    if x.rank < 2:
        raise OpError(f"batch_norm needs rank >= 2 (N, C, ...), got {x.shape}")
    for t in ins[1:]:
        if t.shape != (x.shape[1],):
            raise OpError(f"batch_norm scale/bias/mean/var must have shape ({x.shape[1]},), got {t.shape}")
    return [x]


def _batch_norm(ins, attrs):
    x, scale, bias, mean, var = (_wide(a) for a in ins)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + attrs["epsilon"]) * scale.reshape(shape)
    return [(y + bias.reshape(shape)).astype(ins[0].dtype)]


register(OpDef("batch_norm", "reduce", (5, 5), {"epsilon": Attr("float", 1e-5)}, _batch_norm_infer, _batch_norm,
               elementwise_cost(4), doc="inference batch norm: inputs x, scale, bias, running mean, running var"))


def _lrn(ins, attrs):
    (x,) = ins
    w = _wide(x)
    size, c = attrs["size"], x.shape[1]
    sq = np.zeros_like(w)
    for ch in range(c):
        lo, hi = max(0, ch - (size - 1) // 2), min(c - 1, ch + size // 2)
        sq[:, ch] = (w[:, lo:hi + 1] ** 2).sum(axis=1)
    return [(w / (attrs["bias"] + attrs["alpha"] / size * sq) ** attrs["beta"]).astype(x.dtype)]


register(OpDef("lrn", "reduce", (1, 1), {"size": Attr("int"), "alpha": Attr("float", 1e-4),
                                         "beta": Attr("float", 0.75), "bias": Attr("float", 1.0)},
               _float_same("lrn"), _lrn, elementwise_cost(10), doc="local response norm across channels (dim 1)"))


def _cumulative_infer(ins, attrs):
    normalize_axis(attrs["axis"], ins[0].rank)
    return [ins[0]]


def _cumulative(fn, identity):
    def ref(ins, attrs):
        (x,) = ins
        axis = normalize_axis(attrs["axis"], x.ndim)
        y = np.flip(x, axis) if attrs["reverse"] else x
        out = fn(y, axis=axis, dtype=x.dtype)
        if attrs["exclusive"]:  # shifted by one along the axis, the identity first
            first = np.full(x.shape[:axis] + (min(1, x.shape[axis]),) + x.shape[axis + 1:], identity, x.dtype)
            out = np.concatenate([first, np.delete(out, -1, axis) if x.shape[axis] else out], axis=axis)
        return [np.flip(out, axis) if attrs["reverse"] else out]

    return ref


_CUMULATIVE_ATTRS = {"axis": Attr("int"), "exclusive": Attr("bool", False), "reverse": Attr("bool", False)}
register(OpDef("cumsum", "reduce", (1, 1), _CUMULATIVE_ATTRS, _cumulative_infer, _cumulative(np.cumsum, 0),
               elementwise_cost(1)))
register(OpDef("cumprod", "reduce", (1, 1), _CUMULATIVE_ATTRS, _cumulative_infer, _cumulative(np.cumprod, 1),
               elementwise_cost(1)))


def _topk_infer(ins, attrs):
    (t,) = ins
    axis = normalize_axis(attrs["axis"], t.rank)
    if not 0 <= attrs["k"] <= t.shape[axis]:
        raise OpError(f"topk: k={attrs['k']} is outside [0, {t.shape[axis]}] (the size of axis {attrs['axis']})")
    shape = tuple(attrs["k"] if i == axis else d for i, d in enumerate(t.shape))
    return [TensorType(t.dtype, shape), TensorType("int64", shape)]


def _topk(ins, attrs):
    """The k largest (smallest) along ``axis``, sorted; equal values keep their order (ONNX: lower index first)."""
    (x,) = ins
    axis = normalize_axis(attrs["axis"], x.ndim)
    key = -x if attrs["largest"] and x.dtype != np.bool_ else (~x if attrs["largest"] else x)
    idx = np.take(np.argsort(key, axis=axis, kind="stable"), np.arange(attrs["k"]), axis=axis)
    return [np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64)]


def _topk_cost(ins, outs, attrs):
    n = ins[0].shape[normalize_axis(attrs["axis"], ins[0].rank)] if ins[0].rank else 1
    return Cost(ins[0].numel * max(1, int(np.log2(max(n, 2)))), bytes_moved(ins, outs))


register(OpDef("topk", "reduce", (1, 1), {"k": Attr("int"), "axis": Attr("int", -1), "largest": Attr("bool", True)},
               _topk_infer, _topk, _topk_cost))
