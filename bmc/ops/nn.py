"""Neural-network windows: N-d convolution (grouped, dilated) and max/average pooling, layout NC[spatial...]."""

from __future__ import annotations

from math import prod

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from bmc.ir.types import FLOAT_DTYPES
from bmc.ops.registry import contiguous, Attr, Cost, OpDef, OpError, bytes_moved, register, same_dtype


def window_out_dim(size, k, stride, pad_begin, pad_end, dilation, ceil_mode=False) -> int:
    span = dilation * (k - 1) + 1
    total = size + pad_begin + pad_end - span
    if total < 0:
        raise OpError(f"window of {span} does not fit dim {size} with pads ({pad_begin}, {pad_end})")
    out = -(-total // stride) + 1 if ceil_mode else total // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:  # last window must start inside input or left pad
        out -= 1
    return out


def _window_attrs(attrs, nd, what):
    strides = tuple(attrs["strides"]) or (1,) * nd
    dilations = tuple(attrs["dilations"]) or (1,) * nd
    pads = tuple(attrs["pads"]) or (0,) * (2 * nd)
    if len(strides) != nd or len(dilations) != nd or len(pads) != 2 * nd:
        raise OpError(f"{what} needs {nd} strides/dilations and {2 * nd} pads for {nd} spatial dims")
    if any(s <= 0 for s in strides) or any(d <= 0 for d in dilations) or any(p < 0 for p in pads):
        raise OpError(f"{what} strides/dilations must be positive and pads non-negative")
    return strides, dilations, pads


def _conv_infer(ins, attrs):
    x, w = ins
    dtype = same_dtype("conv", ins)
    if dtype not in FLOAT_DTYPES:
        raise OpError(f"conv needs floating-point inputs, got {dtype}")
    nd = x.rank - 2
    if nd < 1 or w.rank != x.rank:
        raise OpError(f"conv needs x [N, C, spatial...] and w [M, C/group, kernel...] of equal rank, got "
                      f"{x.shape} and {w.shape}")
    g = attrs["group"]
    if g < 1 or x.shape[1] != w.shape[1] * g or w.shape[0] % g:
        raise OpError(f"conv channels do not match: x {x.shape}, w {w.shape}, group {g}")
    strides, dilations, pads = _window_attrs(attrs, nd, "conv")
    spatial = tuple(window_out_dim(x.shape[2 + i], w.shape[2 + i], strides[i], pads[i], pads[nd + i],
                                   dilations[i]) for i in range(nd))
    return [x.with_shape((x.shape[0], w.shape[0]) + spatial)]


def _windows(x, kernel, strides, dilations, pads, pad_value):
    """View of x as [N, C, out..., k...] windows (x padded first)."""
    nd = len(kernel)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[nd + i]) for i in range(nd)], constant_values=pad_value)
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
    win = sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    idx = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + \
        tuple(slice(None, None, d) for d in dilations)
    return win[idx]


def _conv(ins, attrs):
    x, w = ins
    nd = x.ndim - 2
    strides, dilations, pads = _window_attrs(attrs, nd, "conv")
    out_t = _conv_infer([_t(x), _t(w)], attrs)[0]
    win = _windows(x.astype(np.float32) if x.dtype.itemsize < 4 else x, w.shape[2:], strides, dilations, pads, 0)
    win = win[(slice(None), slice(None)) + tuple(slice(0, d) for d in out_t.shape[2:])]
    g = attrs["group"]
    n, c = x.shape[:2]
    m = w.shape[0]
    out_sp = win.shape[2:2 + nd]
    # [N, g, C/g, out..., k...] x [g, M/g, C/g, k...] -> [N, g, M/g, out...]
    win = win.reshape((n, g, c // g) + win.shape[2:])
    wg = w.reshape((g, m // g) + w.shape[1:]).astype(win.dtype)
    sp = "".join(chr(ord("p") + i) for i in range(nd))
    ks = "".join(chr(ord("h") + i) for i in range(nd))
    y = np.einsum(f"ngc{sp}{ks},gmc{ks}->ngm{sp}", win, wg, optimize=True)
    return [contiguous(y.reshape((n, m) + out_sp)).astype(x.dtype)]


def _t(a):
    from bmc.ir.types import TensorType, dtype_of

    return TensorType(dtype_of(a.dtype), a.shape)


def _conv_cost(ins, outs, attrs):
    w = ins[1]
    return Cost(2 * outs[0].numel * prod(w.shape[1:]), bytes_moved(ins, outs))


_CONV_ATTRS = {"strides": Attr("ints", ()), "pads": Attr("ints", ()), "dilations": Attr("ints", ()),
               "group": Attr("int", 1)}
register(OpDef("conv", "nn", (2, 2), _CONV_ATTRS, _conv_infer, _conv, _conv_cost,
               doc="cross-correlation; pads are all begins then all ends (ONNX order); bias is a separate add"))


def _pool_infer(what):
    def infer(ins, attrs):
        (x,) = ins
        nd = x.rank - 2
        kernel = tuple(attrs["kernel"])
        if nd < 1 or len(kernel) != nd:
            raise OpError(f"{what} kernel {kernel} does not match {nd} spatial dims of {x.shape}")
        strides, dilations, pads = _window_attrs(attrs, nd, what)
        spatial = tuple(window_out_dim(x.shape[2 + i], kernel[i], strides[i], pads[i], pads[nd + i], dilations[i],
                                       attrs["ceil_mode"]) for i in range(nd))
        return [x.with_shape(x.shape[:2] + spatial)]

    return infer


def _pool_windows(x, attrs, pad_value):
    """Windows with extra end padding for ceil mode, cropped to the inferred output."""
    nd = x.ndim - 2
    strides, dilations, pads = _window_attrs(attrs, nd, "pool")
    out = _pool_infer("pool")([_t(x)], attrs)[0].shape[2:]
    kernel = tuple(attrs["kernel"])
    extra = [max(0, (o - 1) * s + d * (k - 1) + 1 - (size + pb + pe))
             for o, s, d, k, size, pb, pe in zip(out, strides, dilations, kernel, x.shape[2:], pads[:nd], pads[nd:])]
    pads = tuple(pads[:nd]) + tuple(p + e for p, e in zip(pads[nd:], extra))
    win = _windows(x, kernel, strides, dilations, pads, pad_value)
    return win[(slice(None), slice(None)) + tuple(slice(0, o) for o in out)], nd


def _max_pool(ins, attrs):
    (x,) = ins
    win, nd = _pool_windows(x, attrs, -np.inf)
    return [win.max(axis=tuple(range(-nd, 0))).astype(x.dtype)]


def _avg_pool(ins, attrs):
    (x,) = ins
    w = x.astype(np.float32) if x.dtype.itemsize < 4 else x
    win, nd = _pool_windows(w, attrs, 0.0)
    axes = tuple(range(-nd, 0))
    total = win.sum(axis=axes)
    if attrs["count_include_pad"]:  # explicit pads count, the extra ceil-mode padding does not
        strides, dilations, pads = _window_attrs(attrs, nd, "avg_pool")
        padded = tuple(d + pads[i] + pads[nd + i] for i, d in enumerate(x.shape[2:]))
        count = _pool_windows(np.ones((1, 1) + padded, w.dtype), dict(attrs, pads=(0,) * (2 * nd)), 0.0)[0]
        count = count.sum(axis=axes)[(slice(None), slice(None)) + tuple(slice(0, o) for o in total.shape[2:])]
    else:
        count = _pool_windows(np.ones((1, 1) + x.shape[2:], w.dtype), attrs, 0.0)[0].sum(axis=axes)
    return [(total / count).astype(x.dtype)]


def _pool_cost(ins, outs, attrs):
    return Cost(outs[0].numel * prod(attrs["kernel"]), bytes_moved(ins, outs))


_POOL_ATTRS = {"kernel": Attr("ints"), "strides": Attr("ints", ()), "pads": Attr("ints", ()),
               "dilations": Attr("ints", ()), "ceil_mode": Attr("bool", False)}
register(OpDef("max_pool", "nn", (1, 1), dict(_POOL_ATTRS), _pool_infer("max_pool"), _max_pool, _pool_cost))
register(OpDef("avg_pool", "nn", (1, 1), dict(_POOL_ATTRS, count_include_pad=Attr("bool", False)),
               _pool_infer("avg_pool"), _avg_pool, _pool_cost))
