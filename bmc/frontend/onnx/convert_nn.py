"""Converters for ONNX convolution, pooling (LpPool too), batch norm, LRN (layout NCHW) and GridSample."""

from __future__ import annotations

import itertools
from math import prod

import numpy as np

from bmc.frontend.onnx.importer import Context, ConvertError, Operand, converter
from bmc.ir.types import np_dtype


def _auto_pads(ctx: Context, spatial, kernel, strides, dilations) -> tuple[int, ...]:
    """Explicit pads (all begins, then all ends) for the node's auto_pad / pads attributes."""
    auto = ctx.text("auto_pad", "NOTSET")
    nd = len(spatial)
    if auto in ("NOTSET", ""):
        return tuple(ctx.attr("pads", [0] * (2 * nd)))
    if auto == "VALID":
        return (0,) * (2 * nd)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise ConvertError(f"auto_pad={auto!r} is not supported")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return tuple(begins + ends)


@converter("Conv")
def _conv(ctx: Context, node):
    on_codes = ctx.weight_convs.get(node.input[1])  # a QDQ convolution: on the 8-bit codes, where exact and fast
    y = on_codes(node.input[0]) if on_codes is not None else None
    if y is None:
        return [conv(ctx, ctx.operand(0), ctx.operand(1), ctx.optional(2))]
    bias = ctx.optional(2)
    if bias is not None:
        y = ctx.emit1("add", [y, ctx.emit1("reshape", [bias], shape=(ctx.type(bias).numel,)
                                           + (1,) * (ctx.type(y).rank - 2))])
    return [y]


def conv(ctx: Context, x, w, bias):
    """The node's convolution (its kernel_shape/strides/dilations/pads/group attributes) of ``x`` by ``w``."""
    xs, ws = ctx.type(x).shape, ctx.type(w).shape
    nd = len(xs) - 2
    kernel = tuple(ctx.attr("kernel_shape", ws[2:]))
    if kernel != tuple(ws[2:]):
        raise ConvertError(f"kernel_shape {kernel} does not match the weight shape {ws}")
    strides = tuple(ctx.attr("strides", [1] * nd))
    dilations = tuple(ctx.attr("dilations", [1] * nd))
    pads = _auto_pads(ctx, xs[2:], kernel, strides, dilations)
    y = ctx.emit1("conv", [x, w], strides=strides, pads=pads, dilations=dilations, group=ctx.attr("group", 1))
    if bias is not None:
        y = ctx.emit1("add", [y, ctx.emit1("reshape", [bias], shape=(ws[0],) + (1,) * nd)])
    return y


@converter("MaxPool", "AveragePool")
def _pool(ctx: Context, node):
    return pool(ctx, ctx.operand(0), node.op_type)


def pool(ctx: Context, x, op_type: str) -> list:
    """The node's ``MaxPool`` (with its indices when the node has a second output) or ``AveragePool`` of ``x``
    (its kernel_shape/strides/dilations/pads/ceil_mode/count_include_pad attributes)."""
    node = ctx.node
    indices = op_type == "MaxPool" and len(node.output) > 1 and node.output[1] != ""
    xs = ctx.type(x).shape
    nd = len(xs) - 2
    kernel = tuple(ctx.attr("kernel_shape"))
    strides = tuple(ctx.attr("strides", [1] * nd))
    dilations = tuple(ctx.attr("dilations", [1] * nd))
    pads = _auto_pads(ctx, xs[2:], kernel, strides, dilations)
    ceil = bool(ctx.attr("ceil_mode", 0))
    if op_type == "MaxPool":
        y = ctx.emit1("max_pool", [x], kernel=kernel, strides=strides, pads=pads, dilations=dilations,
                      ceil_mode=ceil)
        if not indices:
            return [y]
        return [y, _max_pool_indices(ctx, x, ctx.type(y).shape[2:], kernel, strides, pads, dilations,
                                     "F" if ctx.attr("storage_order", 0) else "C")]
    return [ctx.emit1("avg_pool", [x], kernel=kernel, strides=strides, pads=pads, dilations=dilations,
                      ceil_mode=ceil, count_include_pad=bool(ctx.attr("count_include_pad", 0)))]


def _max_pool_indices(ctx: Context, x: Operand, out: tuple[int, ...], kernel, strides, pads, dilations,
                      order: str) -> Operand:
    """MaxPool's Indices: where each maximum is, as a flat index into x ``[N, C, *D]`` (the spatial dims row-major,
    or column-major with ``order="F"``: storage_order=1). Every window is gathered (positions in the padding read
    -inf), the first maximum of each found, and its position looked up."""
    n, c, *dims = ctx.type(x).shape
    nd, size = len(dims), prod(dims)
    starts = np.stack(np.meshgrid(*[np.arange(o) * s - p for o, s, p in zip(out, strides, pads)], indexing="ij"), -1)
    offsets = np.stack(np.meshgrid(*[np.arange(k) * d for k, d in zip(kernel, dilations)], indexing="ij"), -1)
    where = starts.reshape(-1, 1, nd) + offsets.reshape(1, -1, nd)  # [outputs, window, nd]
    inside = np.all((where >= 0) & (where < np.array(dims)), axis=-1)
    clipped = tuple(np.moveaxis(np.clip(where, 0, np.array(dims) - 1), -1, 0))
    flat = np.where(inside, np.ravel_multi_index(clipped, dims), size)  # the padding: one extra -inf position
    lowest = np.full((n, c, 1), -np.inf, np_dtype(ctx.type(x).dtype))
    padded = ctx.emit1("concat", [ctx.emit1("reshape", [x], shape=(n, c, size)), lowest], axis=2)
    windows = ctx.emit1("reshape", [ctx.emit1("gather", [padded, flat.reshape(-1).astype(np.int64)], axis=2)],
                        shape=(n, c) + flat.shape)
    first = ctx.emit1("argmax", [windows], axis=-1, keepdims=True)  # [N, C, outputs, 1]
    stored = np.ravel_multi_index(clipped, dims, order=order).astype(np.int64)
    table = ctx.emit1("broadcast_to", [stored], shape=(n, c) + flat.shape)
    spatial = ctx.emit1("gather_elements", [table, first], axis=3)
    base = (np.arange(n * c, dtype=np.int64) * size).reshape(n, c, 1, 1)
    return ctx.emit1("reshape", [ctx.emit1("add", [spatial, base])], shape=(n, c) + tuple(out))


@converter("LpPool")
def _lp_pool(ctx: Context, node):
    """``(sum over the window of |x|^p)^(1/p)``: the sum is a depthwise convolution of ``|x|^p`` by ones (padding
    adds zeros, which add nothing)."""
    if ctx.attr("ceil_mode", 0):
        raise ConvertError("LpPool with ceil_mode=1 is not supported", fix="use ceil_mode=0")
    x = ctx.operand(0)
    xs = ctx.type(x).shape
    nd, p = len(xs) - 2, ctx.attr("p", 2)
    kernel = tuple(ctx.attr("kernel_shape"))
    strides, dilations = tuple(ctx.attr("strides", [1] * nd)), tuple(ctx.attr("dilations", [1] * nd))
    pads = _auto_pads(ctx, xs[2:], kernel, strides, dilations)
    powered = ctx.emit1("abs", [x]) if p == 1 else ctx.emit1("mul", [x, x]) if p == 2 else ctx.emit1(
        "pow", [ctx.emit1("abs", [x]), np.array(p, np_dtype(ctx.type(x).dtype))])
    ones = np.ones((xs[1], 1) + kernel, np_dtype(ctx.type(x).dtype))
    total = ctx.emit1("conv", [powered, ones], strides=strides, pads=pads, dilations=dilations, group=xs[1])
    if p == 1:
        return [total]
    return [ctx.emit1("sqrt", [total]) if p == 2 else
            ctx.emit1("pow", [total, np.array(1.0 / p, np_dtype(ctx.type(x).dtype))])]


@converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(ctx: Context, node):
    x = ctx.operand(0)
    axes = tuple(range(2, len(ctx.type(x).shape)))
    op = "reduce_mean" if node.op_type == "GlobalAveragePool" else "reduce_max"
    return [ctx.emit1(op, [x], axes=axes, keepdims=True)]


@converter("BatchNormalization")
def _batch_norm(ctx: Context, node):
    if ctx.attr("training_mode", 0) or any(node.output[1:]):
        raise ConvertError("training-mode BatchNormalization is not supported", fix="export the model in eval mode")
    return [ctx.emit1("batch_norm", [ctx.operand(i) for i in range(5)], epsilon=ctx.attr("epsilon", 1e-5))]


@converter("LRN")
def _lrn(ctx: Context, node):
    return [ctx.emit1("lrn", [ctx.operand(0)], size=ctx.attr("size"), alpha=ctx.attr("alpha", 1e-4),
                      beta=ctx.attr("beta", 0.75), bias=ctx.attr("bias", 1.0))]




@converter("ConvTranspose")
def _conv_transpose(ctx: Context, node):
    """The gradient of a convolution, as the convolution it equals: the input with ``stride - 1`` zeros between
    elements, padded by ``dilation * (kernel - 1)`` less the node's pads (negative: cropped), convolved with the
    kernel flipped and its channel axes swapped per group. The inserted zeros cost stride^d multiply-adds per
    output; the numerics are exact."""
    x, w = ctx.operand(0), ctx.operand(1)
    xs, ws = ctx.type(x).shape, ctx.type(w).shape
    nd, g = len(xs) - 2, ctx.attr("group", 1)
    kernel = tuple(ctx.attr("kernel_shape", ws[2:]))
    if kernel != tuple(ws[2:]):
        raise ConvertError(f"kernel_shape {kernel} does not match the weight shape {ws}")
    strides = tuple(ctx.attr("strides", [1] * nd))
    dilations = tuple(ctx.attr("dilations", [1] * nd))
    extra = tuple(ctx.attr("output_padding", [0] * nd))
    full = [s * (n - 1) + e + d * (k - 1) + 1 for n, s, e, k, d in zip(xs[2:], strides, extra, kernel, dilations)]
    auto = ctx.text("auto_pad", "NOTSET")
    if ctx.attr("output_shape") is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        want = list(ctx.attr("output_shape") or [n * s for n, s in zip(xs[2:], strides)])[-nd:]
        total = [f - o for f, o in zip(full, want)]  # negative: a larger output, extended at the end (onnxruntime)
        first = [max(t, 0) // 2 if auto == "SAME_UPPER" else max(t, 0) - max(t, 0) // 2 for t in total]
        pads = first + [t - b for t, b in zip(total, first)]
    elif auto in ("NOTSET", "", "VALID"):
        pads = list(ctx.attr("pads", [0] * (2 * nd))) if auto != "VALID" else [0] * (2 * nd)
    else:
        raise ConvertError(f"auto_pad={auto!r} is not supported")
    y = x
    for i, s in enumerate(strides):  # zeros between the input elements along each strided axis
        if s == 1:
            continue
        axis, shape = 2 + i, ctx.type(y).shape
        col = ctx.emit1("reshape", [y], shape=shape[:axis + 1] + (1,) + shape[axis + 1:])
        zeros = np.zeros(shape[:axis + 1] + (s - 1,) + shape[axis + 1:], np_dtype(ctx.type(x).dtype))
        spread = ctx.emit1("concat", [col, zeros], axis=axis + 1)
        y = ctx.emit1("reshape", [spread], shape=shape[:axis] + (shape[axis] * s,) + shape[axis + 1:])
        y = ctx.emit1("slice", [y], starts=(0,), ends=((shape[axis] - 1) * s + 1,), axes=(axis,), steps=(1,))
    grow = [d * (k - 1) for k, d in zip(kernel, dilations)]
    y = ctx.emit1("pad", [y], pads=(0, 0, *[a - b for a, b in zip(grow, pads[:nd])],
                                    0, 0, *[a - b + e for a, b, e in zip(grow, pads[nd:], extra)]))
    # weight [C, M/g, k...] -> [M, C/g, k...], flipped along the kernel axes
    c, mg = ws[0], ws[1]
    wt = ctx.emit1("reshape", [w], shape=(g, c // g, mg) + kernel)
    wt = ctx.emit1("transpose", [wt], perm=(0, 2, 1) + tuple(range(3, 3 + nd)))
    wt = ctx.emit1("reshape", [wt], shape=(g * mg, c // g) + kernel)
    wt = ctx.emit1("slice", [wt], starts=(-1,) * nd, ends=(-2**62,) * nd, axes=tuple(range(2, 2 + nd)),
                   steps=(-1,) * nd)
    out = ctx.emit1("conv", [y, wt], strides=(1,) * nd, pads=(0,) * (2 * nd), dilations=dilations, group=g)
    bias = ctx.optional(2)
    if bias is not None:
        out = ctx.emit1("add", [out, ctx.emit1("reshape", [bias], shape=(g * mg,) + (1,) * nd)])
    return [out]


def _source_coords(out: int, size: int, scale: float, mode: str, roi: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Where each output position samples the input (ONNX Resize's coordinate_transformation_mode), in float64;
    ``length`` is the unrounded output length ``scale * size``, as ONNX's reference implementation uses it;
    ``roi`` (tf_crop_and_resize) is the crop's start and end, relative to the input."""
    x = np.arange(out, dtype=np.float64)
    length = scale * size
    if mode == "tf_crop_and_resize":
        if length == 1:
            return np.full(out, (roi[1] - roi[0]) * (size - 1) / 2 + roi[0] * (size - 1))
        return x * (roi[1] - roi[0]) * (size - 1) / (length - 1) + roi[0] * (size - 1)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if length > 1 else np.zeros(out)
    if mode == "align_corners":
        return x * (size - 1) / (length - 1) if length != 1 else np.zeros(out)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = out / length
        return size / 2 * (1 - adjustment) + (x + 0.5) / scale - 0.5
    raise ConvertError(f"coordinate_transformation_mode {mode!r} is not supported",
                       fix="use half_pixel, pytorch_half_pixel, align_corners, asymmetric, tf_half_pixel_for_nn, "
                           "half_pixel_symmetric or tf_crop_and_resize")


def _cubic(a: float, d: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``d`` (0 from 2 on)."""
    d = np.abs(d)
    return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                    np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))


def _antialias_taps(coords: np.ndarray, scale: float, mode: str, a: float) -> tuple[list[np.ndarray], list]:
    """Downsampling with ``antialias``: the linear (triangle) or cubic kernel stretched by 1 / scale over
    ``2 / scale`` (``4 / scale``) taps, normalized, as ONNX's reference computes it (a position on an input pixel
    takes that pixel as its right tap)."""
    scale = min(scale, 1.0)
    start = int(np.floor((-1 if mode == "linear" else -2) / scale) + 1)
    base = np.floor(coords)
    ratio = np.where(coords == base, 1.0, coords - base)
    left = np.where(coords == base, coords - 1, base)
    offsets = np.arange(start, 2 - start)
    args = (offsets[None, :] - ratio[:, None]) * scale
    coeffs = np.clip(1 - np.abs(args), 0, 1) if mode == "linear" else _cubic(a, args)
    coeffs = coeffs / coeffs.sum(axis=1, keepdims=True)
    return [left + o for o in offsets], list(coeffs.T)


def _taps(ctx: Context, out: int, size: int, scale: float, roi) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Resize along one axis as taps: (input index per output, weight per output or None for 1)."""
    mode = ctx.text("mode", "nearest")
    coords = _source_coords(out, size, scale, ctx.text("coordinate_transformation_mode", "half_pixel"), roi)
    if mode == "nearest":
        rounding = ctx.text("nearest_mode", "round_prefer_floor")
        pick = {"round_prefer_floor": lambda c: np.ceil(c - 0.5), "round_prefer_ceil": lambda c: np.floor(c + 0.5),
                "floor": np.floor, "ceil": np.ceil}
        if rounding not in pick:
            raise ConvertError(f"nearest_mode {rounding!r} is not supported")
        return [(np.clip(pick[rounding](coords), 0, size - 1).astype(np.int64), None)]
    base = np.floor(coords)
    t = coords - base
    a = ctx.attr("cubic_coeff_a", -0.75)
    if mode not in ("linear", "cubic"):
        raise ConvertError(f"Resize mode {mode!r} is not supported", fix="use nearest, linear or cubic")
    if ctx.attr("antialias", 0) and scale < 1:
        index, weights = _antialias_taps(coords, scale, mode, a)
    elif mode == "linear":
        index, weights = [base, base + 1], [1 - t, t]
    else:
        index, weights = [base + o for o in (-1, 0, 1, 2)], [_cubic(a, d) for d in (t + 1, t, 1 - t, 2 - t)]
    if ctx.attr("exclude_outside", 0):  # taps outside the input get no weight; the rest are renormalized
        weights = [np.where((i >= 0) & (i <= size - 1), w, 0.0) for i, w in zip(index, weights)]
        total = sum(weights)
        weights = [w / total for w in weights]
    return [(np.clip(i, 0, size - 1).astype(np.int64), w) for i, w in zip(index, weights)]


@converter("Resize", "Upsample")
def _resize(ctx: Context, node):
    """Separable: each resized axis is a sum of gathers (one for nearest, two for linear, four for cubic) with
    indices and weights computed here, at compile time, from the static shapes."""
    x = ctx.operand(0)
    shape = ctx.type(x).shape
    rank = len(shape)
    if node.op_type == "Upsample" or ctx.opset < 11:
        scales_in = ctx.const(1, "scales") if len(node.input) > 1 else np.asarray(ctx.attr("scales"))
        scales, sizes = scales_in, None
    else:  # input 1, roi, is only read by tf_crop_and_resize
        scales = ctx.const(2, "scales")
        sizes = ctx.const(3, "sizes")
    axes = [a % rank for a in ctx.attr("axes", list(range(rank)))]
    crop = ctx.text("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
    roi = ctx.const(1, "roi") if crop else None
    if crop and (roi is None or np.asarray(roi).size != 2 * len(axes)):
        raise ConvertError(f"tf_crop_and_resize needs a constant roi of {2 * len(axes)} values (starts, then ends)")
    if sizes is not None and np.asarray(sizes).size:
        sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
        ratio = [sizes[k] / shape[a] for k, a in enumerate(axes)]
        policy = ctx.text("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            keep = min(ratio) if policy == "not_larger" else max(ratio)
            ratio = [keep] * len(axes)
            sizes = [int(np.floor(shape[a] * keep + 0.5)) for a in axes]
        plan = list(zip(axes, sizes, ratio))
    else:
        values = [float(v) for v in np.asarray(scales).reshape(-1)]
        plan = [(a, int(np.floor(shape[a] * s)), s) for a, s in zip(axes, values)]
    y = x
    for k, (axis, out, scale) in enumerate(plan):
        box = (0.0, 1.0) if roi is None else (float(np.ravel(roi)[k]), float(np.ravel(roi)[len(axes) + k]))
        if out == shape[axis] and scale == 1.0 and roi is None:
            continue
        dtype = np_dtype(ctx.type(y).dtype)
        total = None
        for index, weight in _taps(ctx, out, shape[axis], scale, box):
            term = ctx.emit1("gather", [y, index], axis=axis)
            if weight is not None:
                w = weight.reshape((out,) + (1,) * (rank - 1 - axis)).astype(dtype)
                term = ctx.emit1("mul", [term, w])
            total = term if total is None else ctx.emit1("add", [total, term])
        y = total
        if roi is not None:  # samples outside the input take the extrapolation value (every later axis keeps it)
            coords = _source_coords(out, shape[axis], scale, "tf_crop_and_resize", box)
            outside = ((coords < 0) | (coords > shape[axis] - 1)).reshape((out,) + (1,) * (rank - 1 - axis))
            y = ctx.emit1("where", [outside, np.asarray(ctx.attr("extrapolation_value", 0.0), dtype), y])
    return [y]


_CUBIC_A = -0.75  # Keys' cubic convolution, as PyTorch's and onnx's bicubic sampling


@converter("GridSample")
def _grid_sample(ctx: Context, node):
    """Sample ``X [N, C, *spatial]`` at the normalized points of ``grid [N, *out, D]`` (its last dim lists the
    coordinates from the last spatial dim to the first), as onnx's reference: denormalize, move points outside the
    border range (border: clamp; reflection: reflect), then interpolate from 1 (nearest), 2 (linear) or 4 (cubic)
    taps a dim, each tap's index padded (zeros: weight 0; border: clamped; reflection: reflected). Every tap
    combination is a ``gather_elements`` of X flattened over its spatial dims, weighted and summed."""
    x, grid = ctx.operand(0), ctx.operand(1)
    xs, gs = ctx.type(x).shape, ctx.type(grid).shape
    spatial, dims = xs[2:], len(xs) - 2
    if len(gs) != len(xs) or gs[0] != xs[0] or gs[-1] != dims:
        raise ConvertError(f"GridSample: grid {gs} does not fit X {xs} (need [N, *out, {dims}])")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(ctx.text("mode", "linear"), ctx.text("mode", "linear"))
    padding, align = ctx.text("padding_mode", "zeros"), bool(ctx.attr("align_corners", 0))
    if mode not in ("nearest", "linear", "cubic") or padding not in ("zeros", "border", "reflection"):
        raise ConvertError(f"GridSample mode {mode!r} / padding_mode {padding!r} is not supported")
    e, f32 = ctx.emit1, (lambda v: np.array(v, np.float32))
    n, c, out = xs[0], xs[1], gs[1:-1]
    points = int(np.prod(out))
    g = e("reshape", [e("cast", [grid], dtype="float32")], shape=(n, points, dims))

    def lt(a, b):
        return e("less", [a, b])

    def reflect(v, lo: float, hi: float):
        """``v`` reflected at ``lo`` and ``hi`` until inside (onnx's ``_gs_reflect``)."""
        if hi == lo:
            return e("mul", [v, f32(0.0)])
        span = hi - lo
        below, above = lt(v, f32(lo)), lt(f32(hi), v)
        dist = e("where", [below, e("sub", [f32(lo), v]), e("sub", [v, f32(hi)])])
        turns = e("floor", [e("div", [dist, f32(span)])])
        rest = e("sub", [dist, e("mul", [turns, f32(span)])])
        even = e("equal", [e("sub", [turns, e("mul", [e("floor", [e("div", [turns, f32(2.0)])]), f32(2.0)])]),
                           f32(0.0)])
        up, down = e("add", [f32(lo), rest]), e("sub", [f32(hi), rest])
        return e("where", [below, e("where", [even, up, down]),
                           e("where", [above, e("where", [even, down, up]), v])])

    taps_per_dim = []  # per spatial dim: [(int64 index [N, P], float32 weight [N, P])]
    for d, size in enumerate(spatial):
        coord = e("gather", [g, np.array(dims - 1 - d, np.int64)], axis=2)
        lo, hi = (0.0, size - 1.0) if align else (-0.5, size - 0.5)
        pos = (e("mul", [e("add", [coord, f32(1.0)]), f32((size - 1) / 2.0)]) if align else
               e("div", [e("sub", [e("mul", [e("add", [coord, f32(1.0)]), f32(size)]), f32(1.0)]), f32(2.0)]))
        if mode == "nearest":
            pos = e("round", [pos])  # half to even, as the reference's rint
        if padding != "zeros":
            outside = e("logical_or", [lt(pos, f32(lo)), lt(f32(hi), pos)])
            moved = e("clip", [pos], min=0.0, max=float(size - 1)) if padding == "border" else reflect(pos, lo, hi)
            pos = e("where", [outside, moved, pos])
        if mode == "nearest":
            taps = [(pos, None)]
        else:
            base = e("floor", [pos])
            t = e("sub", [pos, base])
            if mode == "linear":
                taps = [(base, e("sub", [f32(1.0), t])), (e("add", [base, f32(1.0)]), t)]
            else:
                def cubic(u, outer: bool):  # Keys' kernel at distance u (1 <= u < 2 outer, else u < 1)
                    if outer:
                        return e("sub", [e("mul", [e("add", [e("mul", [e("sub", [e("mul", [u, f32(_CUBIC_A)]),
                                                                                  f32(5 * _CUBIC_A)]), u]),
                                                            f32(8 * _CUBIC_A)]), u]), f32(4 * _CUBIC_A)])
                    return e("add", [e("mul", [e("mul", [e("sub", [e("mul", [u, f32(_CUBIC_A + 2)]),
                                                                  f32(_CUBIC_A + 3)]), u]), u]), f32(1.0)])

                one_minus = e("sub", [f32(1.0), t])
                taps = [(e("sub", [base, f32(1.0)]), cubic(e("add", [t, f32(1.0)]), True)), (base, cubic(t, False)),
                        (e("add", [base, f32(1.0)]), cubic(one_minus, False)),
                        (e("add", [base, f32(2.0)]), cubic(e("add", [one_minus, f32(1.0)]), True))]
        padded = []
        for index, weight in taps:
            if padding == "zeros":
                valid = e("logical_and", [e("logical_not", [lt(index, f32(0.0))]),
                                          e("logical_not", [lt(f32(size - 1), index)])])
                weight = e("where", [valid, f32(1.0) if weight is None else weight, f32(0.0)])
            elif padding == "reflection":
                index = reflect(index, lo, hi)
            index = e("cast", [e("clip", [index], min=0.0, max=float(size - 1))], dtype="int64")  # truncates
            padded.append((index, weight))
        taps_per_dim.append(padded)
    flat_x = e("reshape", [x], shape=(n, c, int(np.prod(spatial))))
    strides = [int(np.prod(spatial[d + 1:])) for d in range(dims)]
    y = None
    for combo in itertools.product(*taps_per_dim):
        flat = None
        weight = None
        for (index, w), stride in zip(combo, strides):
            term = e("mul", [index, np.array(stride, np.int64)]) if stride != 1 else index
            flat = term if flat is None else e("add", [flat, term])
            if w is not None:
                weight = w if weight is None else e("mul", [weight, w])
        idx = e("broadcast_to", [e("reshape", [flat], shape=(n, 1, points))], shape=(n, c, points))
        value = e("gather_elements", [flat_x, idx], axis=2)
        if weight is not None:
            w = e("reshape", [e("cast", [weight], dtype=ctx.type(x).dtype)], shape=(n, 1, points))
            value = e("mul", [value, w])
        y = value if y is None else e("add", [y, value])
    return [e("reshape", [y], shape=(n, c) + tuple(out))]
