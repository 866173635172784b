"""Converters for ONNX elementwise math, matmul/Gemm, reductions and normalizations."""

from __future__ import annotations

import numpy as np

from bmc.frontend.onnx.importer import Context, ConvertError, Operand, converter
from bmc.frontend.onnx.loader import INT_RANGES, NARROW, coded, to_dtype
from bmc.ir.types import itemsize, np_dtype
from bmc.ops.registry import broadcast_shapes

_UNARY = {
    "Neg": "neg", "Abs": "abs", "Sign": "sign", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Reciprocal": "reciprocal",
    "Tanh": "tanh", "Sigmoid": "sigmoid", "Erf": "erf", "Sin": "sin", "Cos": "cos", "Floor": "floor", "Ceil": "ceil",
    "Round": "round", "Relu": "relu", "Softplus": "softplus", "Not": "logical_not", "IsNaN": "isnan",
    "BitwiseNot": "bitwise_not", "Asin": "asin", "Acos": "acos", "Atan": "atan",
}
_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Equal": "equal", "Less": "less",
    "LessOrEqual": "less_equal", "Greater": "greater", "GreaterOrEqual": "greater_equal", "And": "logical_and",
    "Or": "logical_or", "Xor": "logical_xor", "BitwiseAnd": "bitwise_and", "BitwiseOr": "bitwise_or",
    "BitwiseXor": "bitwise_xor",
}
_VARIADIC = {"Max": "maximum", "Min": "minimum", "Sum": "add"}


def scalar_like(ctx: Context, x, value) -> np.ndarray:
    return np.array(value, dtype=np_dtype(ctx.type(x).dtype))


@converter(*_UNARY)
def _unary(ctx: Context, node):
    return [ctx.emit1(_UNARY[node.op_type], [ctx.operand(0)])]


@converter("BitShift")
def _bit_shift(ctx: Context, node):
    direction = ctx.text("direction", "")
    if direction not in ("LEFT", "RIGHT"):
        raise ConvertError(f"BitShift direction must be LEFT or RIGHT, got {direction!r}")
    return [ctx.emit1("left_shift" if direction == "LEFT" else "right_shift", [ctx.operand(0), ctx.operand(1)])]


@converter(*_BINARY)
def _binary(ctx: Context, node):
    a, b = ctx.operand(0), ctx.operand(1)
    if node.op_type == "Pow" and ctx.type(b).dtype != ctx.type(a).dtype:
        b = ctx.emit1("cast", [b], dtype=ctx.type(a).dtype)
    return [ctx.emit1(_BINARY[node.op_type], [a, b])]


@converter(*_VARIADIC, "Mean")
def _variadic(ctx: Context, node):
    ops = [ctx.operand(i) for i in range(len(node.input)) if ctx.has(i)]
    acc = ops[0]
    for x in ops[1:]:
        acc = ctx.emit1(_VARIADIC.get(node.op_type, "add"), [acc, x])
    if node.op_type == "Mean":
        acc = ctx.emit1("div", [acc, scalar_like(ctx, acc, len(ops))])
    elif len(ops) == 1:
        acc = ctx.emit1("reshape", [acc], shape=ctx.type(acc).shape)
    return [acc]


@converter("IsInf")
def _isinf(ctx: Context, node):
    if not (ctx.attr("detect_positive", 1) and ctx.attr("detect_negative", 1)):
        x = ctx.operand(0)
        inf = ctx.emit1("isinf", [x])
        sign = ctx.emit1("greater" if ctx.attr("detect_positive", 1) else "less", [x, scalar_like(ctx, x, 0)])
        return [ctx.emit1("logical_and", [inf, sign])]
    return [ctx.emit1("isinf", [ctx.operand(0)])]


@converter("Identity", "Dropout")
def _identity(ctx: Context, node):
    if node.op_type == "Dropout" and ctx.attr("is_test", 1) == 0 and ctx.opset < 7:
        raise ConvertError("training-mode Dropout is not supported")
    if ctx.has(2) and ctx.const(2, "training_mode") is not None and bool(ctx.const(2, "training_mode")):
        raise ConvertError("Dropout with training_mode=true is not supported", fix="export the model in eval mode")
    x = ctx.operand(0)
    outs = [x]
    if len(node.output) > 1 and node.output[1]:
        outs.append(np.ones(ctx.type(x).shape, dtype=bool))
    return outs


@converter("Gelu")
def _gelu(ctx: Context, node):
    return [ctx.emit1("gelu", [ctx.operand(0)], approximate=ctx.text("approximate", "none")
                      if isinstance(ctx.attr("approximate", "none"), bytes) else ctx.attr("approximate", "none"))]


@converter("LeakyRelu")
def _leaky_relu(ctx: Context, node):
    return [ctx.emit1("leaky_relu", [ctx.operand(0)], alpha=ctx.attr("alpha", 0.01))]


@converter("HardSigmoid")
def _hard_sigmoid(ctx: Context, node):
    x = ctx.operand(0)
    y = ctx.emit1("add", [ctx.emit1("mul", [x, scalar_like(ctx, x, ctx.attr("alpha", 0.2))]),
                          scalar_like(ctx, x, ctx.attr("beta", 0.5))])
    return [ctx.emit1("clip", [y], min=0.0, max=1.0)]


@converter("Clip")
def _clip(ctx: Context, node):
    x = ctx.operand(0)
    if ctx.opset < 11:
        return [ctx.emit1("clip", [x], min=ctx.attr("min", None), max=ctx.attr("max", None))]
    for idx, op in ((1, "maximum"), (2, "minimum")):
        bound = ctx.optional(idx)
        if bound is not None:
            x = ctx.emit1(op, [x, bound])
    return [x if x is not ctx.operand(0) else ctx.emit1("clip", [x])]


@converter("Cast", "CastLike")
def _cast(ctx: Context, node):
    x = ctx.operand(0)
    src = ctx.narrow.get(node.input[0])
    if node.op_type == "CastLike":
        dst = ctx.narrow.get(node.input[1])
        dtype = ctx.type(ctx.operand(1)).dtype
    else:
        dst = NARROW.get(ctx.attr("to"))
        dtype = to_dtype(ctx.attr("to"), f"Cast node {node.name!r}", "Cast", narrow=True)
    if coded(src):
        x = ctx.emit1("decode_float", [x], format=src)
    if dst is not None:
        ctx.narrow[node.output[0]] = dst
    if coded(dst):  # from float32 (exact from float16/bfloat16; a float64 is rounded twice)
        x = x if ctx.type(x).dtype == "float32" else ctx.emit1("cast", [x], dtype="float32")
        return [ctx.emit1("encode_float", [x], format=dst, saturate=bool(ctx.attr("saturate", 1)),
                          round_mode=ctx.text("round_mode", "up"))]
    if dst is not None:  # a narrow integer wraps around, as numpy's casts do: truncate, then reduce into its range
        lo, hi = INT_RANGES[dst]
        t = ctx.emit1("cast", [ctx.emit1("cast", [x], dtype="int32")], dtype="float64")
        wraps = ctx.emit1("floor", [ctx.emit1("div", [ctx.emit1("sub", [t, np.float64(lo)]), np.float64(hi - lo + 1)])])
        x = ctx.emit1("sub", [t, ctx.emit1("mul", [wraps, np.float64(hi - lo + 1)])])
    if ctx.type(x).dtype == dtype:
        return [x]
    return [ctx.emit1("cast", [x], dtype=dtype)]


@converter("BitCast")
def _bitcast(ctx: Context, node):
    if node.input[0] in ctx.narrow:
        raise ConvertError(f"BitCast of a {ctx.narrow[node.input[0]]} tensor is not supported")
    dtype = to_dtype(ctx.attr("to"), f"BitCast node {node.name!r}", "BitCast")
    x = ctx.operand(0)
    if ctx.type(x).dtype == "bool" and dtype in ("uint8", "int8"):  # a bool's byte is 0 or 1
        return [ctx.emit1("cast", [x], dtype=dtype)]
    if ctx.type(x).dtype == "bool" or dtype == "bool" or itemsize(ctx.type(x).dtype) != itemsize(dtype):
        raise ConvertError(f"BitCast from {ctx.type(x).dtype} to {dtype}: the types must be non-bool and of one size")
    return [x if ctx.type(x).dtype == dtype else ctx.emit1("bitcast", [x], dtype=dtype)]


@converter("Where")
def _where(ctx: Context, node):
    cond, x, y = ctx.operand(0), ctx.operand(1), ctx.operand(2)
    if isinstance(cond, np.ndarray) and cond.size and (cond.all() or not cond.any()):
        # a constant condition that picks one side everywhere (ONNX Attention's "rows the mask hides entirely"
        # under a mask that hides none): that side, when it already has the result's shape
        picked = x if cond.all() else y
        shape = broadcast_shapes(cond.shape, broadcast_shapes(ctx.type(x).shape, ctx.type(y).shape))
        if ctx.type(picked).shape == shape:
            return [picked]
    return [ctx.emit1("where", [cond, x, y])]


def _weight_matmul(ctx: Context, transposed: bool) -> Operand | None:
    """A @ B (B used transposed) the way B's dequantization offered (``Context.weight_matmuls``), or None."""
    fused = ctx.weight_matmuls.get(ctx.node.input[1])
    if fused is None or ctx.type(ctx.operand(0)).dtype != "float32":
        return None
    return fused(ctx.operand(0), ctx.node.input[0], transposed)


@converter("MatMul")
def _matmul(ctx: Context, node):
    y = _weight_matmul(ctx, transposed=False)
    return [y if y is not None else ctx.emit1("matmul", [ctx.operand(0), ctx.operand(1)])]


@converter("Gemm")
def _gemm(ctx: Context, node):
    a, b = ctx.operand(0), ctx.operand(1)
    y = None if ctx.attr("transA", 0) else _weight_matmul(ctx, transposed=bool(ctx.attr("transB", 0)))
    if y is None:
        if ctx.attr("transA", 0):
            a = ctx.emit1("transpose", [a], perm=(1, 0))
        if ctx.attr("transB", 0):
            b = ctx.emit1("transpose", [b], perm=(1, 0))
        y = ctx.emit1("matmul", [a, b])
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    if alpha != 1.0:
        y = ctx.emit1("mul", [y, scalar_like(ctx, y, alpha)])
    c = ctx.optional(2)
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = ctx.emit1("mul", [c, scalar_like(ctx, c, beta)])
        y = ctx.emit1("add", [y, c])
    return [y]


_REDUCE = {"ReduceSum": "reduce_sum", "ReduceMean": "reduce_mean", "ReduceMax": "reduce_max",
           "ReduceMin": "reduce_min", "ReduceProd": "reduce_prod"}


def _empty_extreme(t, axes, keepdims: bool, is_max: bool) -> np.ndarray | None:
    """A max (min) over an empty set is its identity, known at compile time: -inf (+inf) for floats, the lowest
    (highest) integer, False (True) for bool (ONNX's ReduceMax/ReduceMin); None when nothing reduced is empty."""
    from bmc.ir.types import np_dtype

    rank = len(t.shape)
    reduced = set(range(rank)) if axes is None else {a % rank for a in axes}
    if all(t.shape[a] != 0 for a in reduced):
        return None
    shape = tuple(1 if a in reduced else d for a, d in enumerate(t.shape) if keepdims or a not in reduced)
    dtype = np_dtype(t.dtype)
    if t.dtype == "bool":
        fill = not is_max
    elif np.issubdtype(dtype, np.integer):
        fill = np.iinfo(dtype).min if is_max else np.iinfo(dtype).max
    else:
        fill = -np.inf if is_max else np.inf
    return np.full(shape, fill, dtype=dtype)


@converter(*_REDUCE, "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp")
def _reduce(ctx: Context, node):
    x = ctx.operand(0)
    axes_from_input = (node.op_type == "ReduceSum" and ctx.opset >= 13) or ctx.opset >= 18
    axes = ctx.const(1, "axes") if axes_from_input else ctx.attr("axes", None)
    keepdims = bool(ctx.attr("keepdims", 1))
    if axes is None or len(axes) == 0:
        if ctx.attr("noop_with_empty_axes", 0):
            return [x]
        axes = None
    else:
        axes = tuple(int(a) for a in np.asarray(axes).reshape(-1))
    if node.op_type in ("ReduceMax", "ReduceMin"):
        empty = _empty_extreme(ctx.type(x), axes, keepdims, node.op_type == "ReduceMax")
        if empty is not None:
            return [empty]
    if node.op_type == "ReduceSumSquare":
        return [ctx.emit1("reduce_sum", [ctx.emit1("mul", [x, x])], axes=axes, keepdims=keepdims)]
    if node.op_type == "ReduceL2":
        s = ctx.emit1("reduce_sum", [ctx.emit1("mul", [x, x])], axes=axes, keepdims=keepdims)
        return [ctx.emit1("sqrt", [s])]
    if node.op_type == "ReduceLogSumExp":
        m = ctx.emit1("reduce_max", [x], axes=axes, keepdims=True)
        s = ctx.emit1("reduce_sum", [ctx.emit1("exp", [ctx.emit1("sub", [x, m])])], axes=axes, keepdims=keepdims)
        m2 = m if keepdims else ctx.emit1("reduce_max", [x], axes=axes, keepdims=False)
        return [ctx.emit1("add", [ctx.emit1("log", [s]), m2])]
    return [ctx.emit1(_REDUCE[node.op_type], [x], axes=axes, keepdims=keepdims)]


@converter("ArgMax", "ArgMin")
def _arg(ctx: Context, node):
    x, axis, keepdims = ctx.operand(0), ctx.attr("axis", 0), bool(ctx.attr("keepdims", 1))
    if not ctx.attr("select_last_index", 0):
        return [ctx.emit1(node.op_type.lower(), [x], axis=axis, keepdims=keepdims)]
    # the last of equal extremes: the first one along the reversed axis, counted from the end
    n = ctx.type(x).shape[axis]
    flipped = ctx.emit1("slice", [x], starts=(-1,), ends=(-2**62,), axes=(axis % len(ctx.type(x).shape),),
                        steps=(-1,))
    first = ctx.emit1(node.op_type.lower(), [flipped], axis=axis, keepdims=keepdims)
    return [ctx.emit1("sub", [np.asarray(n - 1, np.int64), first])]


@converter("TopK")
def _topk(ctx: Context, node):
    x = ctx.operand(0)
    if ctx.opset < 10:
        k = ctx.attr("k")
    else:
        k = int(np.asarray(ctx.const(1, "K")).reshape(-1)[0])
    largest = bool(ctx.attr("largest", 1))  # sorted=0 allows any order: the sorted one is as good
    return ctx.emit("topk", [x], k=k, axis=ctx.attr("axis", -1), largest=largest)


@converter("Softmax", "LogSoftmax")
def _softmax(ctx: Context, node):
    return [softmax(ctx, ctx.operand(0), "softmax" if node.op_type == "Softmax" else "log_softmax", ctx.opset)]


def softmax(ctx: Context, x, op: str, opset: int):
    """``op`` (softmax, log_softmax) of ``x`` along the node's ``axis`` with the semantics of ``opset``."""
    shape = ctx.type(x).shape
    if opset >= 13:
        return ctx.emit1(op, [x], axis=ctx.attr("axis", -1))
    axis = ctx.attr("axis", 1) % max(len(shape), 1)  # before opset 13: coerce to 2-D at axis
    outer = int(np.prod(shape[:axis]))
    flat = ctx.emit1("reshape", [x], shape=(outer, int(np.prod(shape[axis:]))))
    return ctx.emit1("reshape", [ctx.emit1(op, [flat], axis=1)], shape=shape)


@converter("LayerNormalization")
def _layer_norm(ctx: Context, node):
    x = ctx.operand(0)
    shape = ctx.type(x).shape
    axis = ctx.attr("axis", -1) % len(shape)
    norm_shape = shape[axis:]
    args = [x]
    for idx in (1, 2):
        p = ctx.optional(idx)
        if p is None:
            continue
        if ctx.type(p).shape != norm_shape:
            p = ctx.emit1("broadcast_to", [p], shape=norm_shape)
        args.append(p)
    epsilon = ctx.attr("epsilon", 1e-5)
    y = ctx.emit1("layer_norm", args, axis=axis, epsilon=epsilon)
    if not any(node.output[1:]):
        return [y]
    # the training outputs Mean and InvStdDev (1 / sqrt(var + epsilon)), over the normalized axes kept as 1s, in
    # the stash type (float32 unless the node says otherwise)
    stash = to_dtype(ctx.attr("stash_type", 1), "LayerNormalization stash_type", "stash_type")  # 1: FLOAT
    xs = x if ctx.type(x).dtype == stash else ctx.emit1("cast", [x], dtype=stash)
    axes = tuple(range(axis, len(shape)))
    mean = ctx.emit1("reduce_mean", [xs], axes=axes, keepdims=True)
    centered = ctx.emit1("sub", [xs, mean])
    var = ctx.emit1("reduce_mean", [ctx.emit1("mul", [centered, centered])], axes=axes, keepdims=True)
    std = ctx.emit1("sqrt", [ctx.emit1("add", [var, np.asarray(epsilon, np_dtype(stash))])])
    return [y, mean, ctx.emit1("div", [np.asarray(1, np_dtype(stash)), std])]


@converter("RMSNormalization")
def _rms_norm(ctx: Context, node):
    x = ctx.operand(0)
    shape = ctx.type(x).shape
    axis = ctx.attr("axis", -1) % len(shape)
    scale = ctx.operand(1)
    if ctx.type(scale).shape != shape[axis:]:
        scale = ctx.emit1("broadcast_to", [scale], shape=shape[axis:])
    return [ctx.emit1("rms_norm", [x, scale], axis=axis, epsilon=ctx.attr("epsilon", 1e-5))]


@converter("CumSum", "CumProd")
def _cumulative(ctx: Context, node):
    axis = int(np.asarray(ctx.const(1, "axis")).reshape(-1)[0])
    return [ctx.emit1(node.op_type.lower(), [ctx.operand(0)], axis=axis, exclusive=bool(ctx.attr("exclusive", 0)),
                      reverse=bool(ctx.attr("reverse", 0)))]


@converter("DFT")
def _dft(ctx: Context, node):
    x = ctx.operand(0)
    xt = ctx.type(x)
    if xt.shape[-1] not in (1, 2) or xt.rank < 2:
        raise ConvertError(f"DFT's input must end in a dim of 1 (real) or 2 (complex), got {xt.shape}")
    axis = ctx.attr("axis", 1) if ctx.opset < 20 else (
        int(np.asarray(ctx.const(2, "axis")).reshape(-1)[0]) if ctx.has(2) else -2)
    axis %= xt.rank
    if axis == xt.rank - 1:
        raise ConvertError("DFT's axis cannot be the last (real/imaginary) dim")
    length = int(np.asarray(ctx.const(1, "dft_length")).reshape(-1)[0]) if ctx.has(1) else None
    return [dft(ctx, x, axis, length, bool(ctx.attr("inverse", 0)), bool(ctx.attr("onesided", 0)))]


def dft(ctx: Context, x: Operand, axis: int, n: int | None, inverse: bool, onesided: bool) -> Operand:
    """The discrete Fourier transform along ``axis`` as matmuls by cosine and sine matrices (no FFT), computed in
    float64 and rounded once to the input's type: a float32 sum of n terms drifts by ~sqrt(n) ulps of the largest
    term (an FFT's by ~log n), which float64 makes nearly exact (ONNX's two inverse cases still fail by 1.9e-7: they
    expect numpy's float32 FFT's noise where the exact value is 0, past their 1e-7). x is ``[..., 1 or 2]`` (real,
    or real and imaginary parts), the result ``[..., 2]`` (``[..., 1]`` for the inverse of a one-sided spectrum,
    onnx's irfft). ``n`` (the DFT length; None: the axis' length) zero-pads or truncates the signal; ``onesided``
    keeps the first n/2 + 1 frequencies; the inverse divides by n."""
    xt = ctx.type(x)
    rank, parts = xt.rank, xt.shape[-1]
    length = xt.shape[axis]
    irfft = inverse and onesided
    n = n if n is not None else 2 * (length - 1) if irfft else length
    used = min(length, n // 2 + 1 if irfft else n)  # input points the transform reads (the rest: zeros)
    others = [d for d in range(rank - 1) if d != axis]
    xp = ctx.emit1("transpose", [x], perm=tuple(others + [rank - 1, axis]))  # [..., parts, L]
    if used < length:
        xp = ctx.emit1("slice", [xp], starts=(0,), ends=(used,), axes=(rank - 1,), steps=(1,))
    xp = ctx.emit1("cast", [xp], dtype="float64") if xt.dtype != "float64" else xp
    real = ctx.emit1("gather", [xp, np.array(0, np.int64)], axis=rank - 2)
    imag = ctx.emit1("gather", [xp, np.array(1, np.int64)], axis=rank - 2) if parts == 2 else None
    j = np.arange(used, dtype=np.float64)[:, None]
    k = np.arange(n // 2 + 1 if onesided and not inverse else n, dtype=np.float64)[None, :]
    theta = 2 * np.pi * j * k / n
    cos, sin = np.cos(theta), np.sin(theta)
    if irfft:  # Hermitian: the interior frequencies count twice; imaginary parts of 0 and n/2 drop out (sin = 0)
        weight = np.where((j == 0) | (2 * j == n), 1.0, 2.0) / n
        cos, sin = cos * weight, sin * weight
    elif inverse:
        cos, sin = cos / n, sin / n

    def project(re_matrix, im_matrix):  # real @ re_matrix + imag @ im_matrix
        y = ctx.emit1("matmul", [real, re_matrix])
        return y if imag is None else ctx.emit1("add", [y, ctx.emit1("matmul", [imag, im_matrix])])

    if irfft:
        outs = [project(cos, -sin)]
    elif inverse:
        outs = [project(cos, -sin), project(sin, cos)]
    else:
        outs = [project(cos, sin), project(-sin, cos)]
    shape = ctx.type(outs[0]).shape + (1,)
    y = ctx.emit1("concat", [ctx.emit1("reshape", [o], shape=shape) for o in outs], axis=rank - 1) \
        if len(outs) > 1 else ctx.emit1("reshape", [outs[0]], shape=shape)
    current = others + [axis, rank - 1]  # y's dims in terms of the result's
    y = ctx.emit1("transpose", [y], perm=tuple(current.index(d) for d in range(rank)))
    return y if xt.dtype == "float64" else ctx.emit1("cast", [y], dtype=xt.dtype)


@converter("STFT")
def _stft(ctx: Context, node):
    """Frames of ``frame_length`` every ``frame_step`` samples (a gather of constant indices), times the window,
    then a DFT of each frame (one-sided by default): ``[batch, frames, bins, 2]``."""
    x, window = ctx.operand(0), ctx.optional(2)
    xt = ctx.type(x)
    if xt.rank != 3 or xt.shape[-1] not in (1, 2):
        raise ConvertError(f"STFT's signal must be [batch, length, 1 or 2], got {xt.shape}")
    step = int(np.asarray(ctx.const(1, "frame_step")).reshape(-1)[0])
    size = int(np.asarray(ctx.const(3, "frame_length")).reshape(-1)[0]) if ctx.has(3) else (
        ctx.type(window).shape[0] if window is not None else xt.shape[1])
    width = ctx.type(window).shape[0] if window is not None else size
    frames = 1 + (xt.shape[1] - size) // step
    if step < 1 or frames < 1 or width > xt.shape[1]:
        raise ConvertError(f"STFT of a {xt.shape[1]}-sample signal in frames of {size} (window {width}) every "
                           f"{step}: no whole frame")
    starts = np.arange(frames, dtype=np.int64)[:, None] * step + np.arange(width, dtype=np.int64)[None, :]
    y = ctx.emit1("gather", [x, starts], axis=1)  # [batch, frames, width, parts]
    if window is not None:
        y = ctx.emit1("mul", [y, ctx.emit1("reshape", [ctx.emit1("cast", [window], dtype=xt.dtype)],
                                           shape=(1, 1, width, 1))])
    return [dft(ctx, y, 2, size, False, bool(ctx.attr("onesided", 1)))]


@converter("MelWeightMatrix")
def _mel_weight_matrix(ctx: Context, node):
    """The triangular mel filter bank ``[dft_length / 2 + 1, num_mel_bins]``, computed here (every input is a
    compile-time constant) exactly as ONNX's reference does: bin edges equally spaced on the mel scale, rounded
    down to spectrogram bins."""
    mels, length, rate, low, high = (np.asarray(ctx.const(i, name)).reshape(-1)[0] for i, name in enumerate(
        ("num_mel_bins", "dft_length", "sample_rate", "lower_edge_hertz", "upper_edge_hertz")))
    mels, length, rate = int(mels), int(length), int(rate)
    edges = np.arange(mels + 2)
    low_mel, high_mel = (2595 * np.log1p(f / 700) / np.log(10) for f in (low, high))
    hertz = 700 * np.expm1((edges * (high_mel - low_mel) / (mels + 2) + low_mel) / 2595 * np.log(10))
    bins = (((length + 1) * hertz) // rate).astype(int)
    out = np.zeros((length // 2 + 1, mels))
    for i in range(mels):
        left, center, right = bins[i], bins[i + 1], bins[i + 2]
        if center == left:
            out[center, i] = 1
        else:
            out[left:center + 1, i] = (np.arange(left, center + 1) - left) / (center - left)
        if right > center:
            out[center:right, i] = (right - np.arange(center, right)) / (right - center)
    dtype = to_dtype(ctx.attr("output_datatype", 1), f"MelWeightMatrix node {node.name!r}", "output_datatype")
    return [out.astype(np_dtype(dtype))]
