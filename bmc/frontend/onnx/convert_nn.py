"""Converters for ONNX convolution, pooling, batch norm and LRN (layout NCHW)."""

from __future__ import annotations


from bmc.frontend.onnx.importer import Context, ConvertError, converter


def _auto_pads(ctx: Context, spatial, kernel, strides, dilations) -> tuple[int, ...]:
    """Explicit pads (all begins, then all ends) for the node's auto_pad / pads attributes."""
    auto = ctx.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
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
    x, w = ctx.operand(0), ctx.operand(1)
    xs, ws = ctx.type(x).shape, ctx.type(w).shape
    nd = len(xs) - 2
    kernel = tuple(ctx.attr("kernel_shape", ws[2:]))
    if kernel != tuple(ws[2:]):
        raise ConvertError(f"kernel_shape {kernel} does not match the weight shape {ws}")
    strides = tuple(ctx.attr("strides", [1] * nd))
    dilations = tuple(ctx.attr("dilations", [1] * nd))
    pads = _auto_pads(ctx, xs[2:], kernel, strides, dilations)
    y = ctx.emit1("conv", [x, w], strides=strides, pads=pads, dilations=dilations, group=ctx.attr("group", 1))
    bias = ctx.optional(2)
    if bias is not None:
        bias = ctx.emit1("reshape", [bias], shape=(ws[0],) + (1,) * nd)
        y = ctx.emit1("add", [y, bias])
    return [y]


@converter("MaxPool", "AveragePool")
def _pool(ctx: Context, node):
    if node.op_type == "MaxPool" and (ctx.attr("storage_order", 0) or (len(node.output) > 1 and node.output[1])):
        raise ConvertError("MaxPool with storage_order=1 or an Indices output is not supported")
    x = ctx.operand(0)
    xs = ctx.type(x).shape
    nd = len(xs) - 2
    kernel = tuple(ctx.attr("kernel_shape"))
    strides = tuple(ctx.attr("strides", [1] * nd))
    dilations = tuple(ctx.attr("dilations", [1] * nd))
    pads = _auto_pads(ctx, xs[2:], kernel, strides, dilations)
    ceil = bool(ctx.attr("ceil_mode", 0))
    if node.op_type == "MaxPool":
        return [ctx.emit1("max_pool", [x], kernel=kernel, strides=strides, pads=pads, dilations=dilations,
                          ceil_mode=ceil)]
    return [ctx.emit1("avg_pool", [x], kernel=kernel, strides=strides, pads=pads, dilations=dilations,
                      ceil_mode=ceil, count_include_pad=bool(ctx.attr("count_include_pad", 0)))]


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


