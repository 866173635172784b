"""Converters for ONNX linear quantization: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, the integer
matmul/conv ops (MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv), onnxruntime's weight-only
``com.microsoft::MatMulNBits`` and the rest of its quantizer's QOperator format (``com.microsoft::QLinearAdd``,
``QLinearMul``, ``QLinearLeakyRelu``, ``QLinearSigmoid``, ``QLinearGlobalAveragePool``, ``QLinearAveragePool``,
``QLinearConcat``, ``QLinearSoftmax``, ``QLinearWhere``, ``QGemm``: each its float op between a dequantization of
its per-tensor quantized inputs and a quantization of its output).

Quantized ops become float arithmetic the rest of bmc already shards, lowers and checks, with two exceptions that
read the integer codes themselves: a matmul by a 4-bit block-quantized weight is the IR's ``matmul_nbits``, and
the 8-bit integer matmuls are its ``matmul_integer``.

- ``matmul_integer`` (MatMulInteger, QLinearMatMul with a 2-D B): the exact int32 product, B stored transposed
  (``[N, K]``; a weight once, at compile time). On the CPU a native kernel (AVX-512 VNNI where the CPU has it);
  elsewhere, like every other integer product (batched B, integer convolutions), **float64** arithmetic on the
  zero-point-shifted operands, exact because every product and partial sum of 8-bit operands is an integer below
  2^53 for any K < 2^37. A row-parallel split all-reduces the partial sums, still exactly.
- Quantized weights stay 8-bit (4-bit: packed two a byte) in the artifact: an int8/uint8 initializer of more than
  ``SMALL_WEIGHT`` elements is a weight, and its dequantization (cast, shift, scale) is elementwise work in the
  kernel that reads it; 4-bit ones are read through ``unpack_int4`` or by ``matmul_nbits``.
- Rounding is ONNX's: half to even (``round``), then saturation to the integer type's range.
- Each quantize adds a ``round`` call to a fused kernel's expression; :func:`bmc.codegen.rewrite.bound_fusion`
  cuts the chains a QDQ model fuses before TVM's vectorizer chokes on their depth.
"""

from __future__ import annotations

import numpy as np

from bmc.frontend.onnx.convert_math import softmax
from bmc.frontend.onnx.convert_nn import _auto_pads, conv, pool
from bmc.frontend.onnx.importer import Context, ConvertError, Operand, converter
from bmc.frontend.onnx.loader import CARRIER, INT_RANGES, NARROW, coded, to_dtype
from bmc.ir.graph import Value
from bmc.ir.types import FLOAT_DTYPES, INT_DTYPES, TensorType, np_dtype
from bmc.ops.linalg import INT8
from bmc.ops.shape import pack_nibbles, unpack_nibbles

_RANGES = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767), **INT_RANGES}


def _broadcastable(ctx: Context, p: Operand, shape: tuple[int, ...], axis: int, block_size: int, what: str) -> Operand:
    """A scale or zero point reshaped (per-axis) or repeated (blocked) to broadcast against ``shape``."""
    ps = ctx.type(p).shape
    if len(ps) == 0 or (len(ps) == 1 and ps[0] == 1 and not block_size):
        return ctx.emit1("reshape", [p], shape=())
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis < len(shape):
        raise ConvertError(f"axis {axis} is out of range for an input of rank {len(shape)}")
    if not block_size:
        if len(ps) != 1 or ps[0] != shape[axis]:
            raise ConvertError(f"the {what} has shape {ps}; per-axis quantization along axis {axis} needs "
                               f"({shape[axis]},)")
        return ctx.emit1("reshape", [p], shape=tuple(shape[axis] if i == axis else 1 for i in range(len(shape))))
    want = tuple(-(-d // block_size) if i == axis else d for i, d in enumerate(shape))
    if ps != want:
        raise ConvertError(f"the {what} has shape {ps}; blocks of {block_size} along axis {axis} of {shape} need {want}")
    return ctx.emit1("gather", [p, np.arange(shape[axis], dtype=np.int64) // block_size], axis=axis)


def _as(ctx: Context, x: Operand, dtype: str) -> Operand:
    return x if ctx.type(x).dtype == dtype else ctx.emit1("cast", [x], dtype=dtype)


def _shifted(ctx: Context, x: Operand, zero_point: Operand | None, dtype: str) -> Operand:
    """``x - zero_point`` computed in ``dtype`` (both cast first; the zero point is already broadcastable)."""
    x = _as(ctx, x, dtype)
    return x if zero_point is None else ctx.emit1("sub", [x, _as(ctx, zero_point, dtype)])


def _saturate(ctx: Context, y: Operand, dtype: str) -> Operand:
    """Clip a rounded ``y`` to ``dtype``'s range and cast: the last step of every integer quantizing op. A 4- or
    2-bit result is carried in 8 bits (and noted, for the ops that read it)."""
    if dtype not in _RANGES:
        raise ConvertError(f"quantizing to {dtype} is not supported",
                           fix="bmc quantizes to uint8, int8, uint16, int16, uint4, int4, uint2, int2, float8 and "
                               "float4e2m1")
    lo, hi = _RANGES[dtype]
    if dtype in INT_RANGES:
        ctx.narrow[ctx.node.output[0]] = dtype
    return ctx.emit1("cast", [ctx.emit1("clip", [y], min=float(lo), max=float(hi))], dtype=CARRIER.get(dtype, dtype))


def _check_integer(ctx: Context, x: Operand, what: str) -> str:
    dtype = ctx.type(x).dtype
    if dtype not in INT_DTYPES:
        raise ConvertError(f"{what} must be an integer tensor, got {dtype}")
    return dtype


@converter("DequantizeLinear")
def _dequantize(ctx: Context, node):
    x, scale = ctx.operand(0), ctx.operand(1)
    shape = ctx.type(x).shape
    axis, block = ctx.attr("axis", 1), ctx.attr("block_size", 0)
    x_format, scale_format = ctx.narrow.get(node.input[0]), ctx.narrow.get(node.input[1])
    out = to_dtype(ctx.attr("output_dtype"), f"DequantizeLinear node {node.name!r}", "output_dtype") \
        if ctx.attr("output_dtype") else scale_format if coded(scale_format) else ctx.type(scale).dtype
    if coded(scale_format):  # a float8e8m0 scale (the MX formats')
        scale = ctx.emit1("decode_float", [scale], format=scale_format)
    zp = ctx.optional(2)
    if coded(x_format):  # float8/float4 codes: their values times the scale; a zero point only names the type
        x, zp = ctx.emit1("decode_float", [x], format=x_format), None
    else:
        _check_integer(ctx, x, "the quantized input")
    if zp is not None:
        zp = _broadcastable(ctx, zp, shape, axis, block, "zero point")
    y = ctx.emit1("mul", [_shifted(ctx, x, zp, "float32"),
                          _as(ctx, _broadcastable(ctx, scale, shape, axis, block, "scale"), "float32")])
    if out == "float32" and not coded(x_format):
        _offer_matmul_nbits(ctx, node, x, scale, ctx.optional(2), axis, block)
        _offer_matmul_integer(ctx, node, x, scale, ctx.optional(2), axis, block)
    elif out == "float32" and x_format != "float4e2m1" and not block:
        _offer_matmul_float8(ctx, node, ctx.operand(0), scale, axis, x_format)
    if coded(out):
        ctx.narrow[node.output[0]] = out
        return [ctx.emit1("encode_float", [y], format=out)]
    return [_as(ctx, y, out)]


def _offer_matmul_integer(ctx: Context, node, x: Operand, scale: Operand, zp: Operand | None, axis: int,
                          block: int) -> None:
    """The 8-bit QDQ form (onnxruntime's static quantization): ``MatMul``/``Gemm`` of a per-tensor dequantized
    activation and a dequantized 8-bit weight (per tensor or per output channel) is ``s_a * s_w * (integer product
    of the codes)``, so it runs as ``matmul_integer`` on the codes, reading the weight at 1 byte a value; the
    integer product is exact where the float one rounds (onnxruntime's optimizer makes the same rewrite).
    Records per-tensor dequantizations and offers the weight's to the MatMul/Gemm converters."""
    t = ctx.type(x)
    if block or t.dtype not in INT8 or node.input[0] in ctx.narrow or (zp is not None and
                                                                          ctx.type(zp).dtype != t.dtype):
        return
    per_tensor = ctx.type(scale).numel == 1 and (zp is None or ctx.type(zp).numel == 1)
    if per_tensor:
        ctx.dequantized[node.output[0]] = (x, scale, zp)
    if t.rank >= 3 and ctx.weight(x) is not None and (per_tensor or axis % t.rank == 0):
        _offer_conv_integer(ctx, node, x, scale, zp, per_tensor)
    if t.rank != 2 or ctx.weight(x) is None:
        return

    def matmul(a: Operand, a_name: str, transposed: bool) -> Operand | None:
        src = ctx.dequantized.get(a_name)
        channel = 0 if transposed else 1  # the weight's output-channel (N) dim
        if src is None or not (per_tensor or axis % 2 == channel):
            return None
        codes, a_scale, a_zp = src
        n, k = t.shape if transposed else t.shape[::-1]
        bt = x if transposed else ctx.weight_layout(x, "T", lambda w: w.T, TensorType(t.dtype, (n, k)))
        zps = [np.zeros((), np_dtype(ctx.type(c).dtype)) if z is None else ctx.emit1("reshape", [z], shape=shape)
               for c, z, shape in ((codes, a_zp, ()), (x, zp, () if per_tensor else (n,)))]
        acc = ctx.emit1("matmul_integer", [codes, bt] + zps)
        w_scale = ctx.emit1("reshape", [_as(ctx, scale, "float32")], shape=() if per_tensor else (n,))
        factor = ctx.emit1("mul", [ctx.emit1("reshape", [_as(ctx, a_scale, "float32")], shape=()), w_scale])
        return ctx.emit1("mul", [_as(ctx, acc, "float32"), factor])

    ctx.weight_matmuls[node.output[0]] = matmul


def _offer_conv_integer(ctx: Context, node, w: Operand, scale: Operand, zp: Operand | None,
                        per_tensor: bool) -> None:
    """The QDQ form of a convolution (a per-tensor dequantized input, a weight dequantized per tensor or per output
    channel) is ``s_x * s_w * (the convolution of the codes)``: computed on the codes where :func:`_exact_conv`
    has an exact, fast form (pointwise, few terms a sum), so it rounds as onnxruntime's fused QLinearConv does."""
    m = ctx.type(w).shape[0]

    def convolve(x_name: str) -> Operand | None:
        src = ctx.dequantized.get(x_name)
        if src is None:
            return None
        codes, x_scale, x_zp = src
        acc = _exact_conv(ctx, codes, w, x_zp, zp, "float32")
        if acc is None:
            return None
        w_scale = _scalar(ctx, scale, "scale") if per_tensor else ctx.emit1(
            "reshape", [scale], shape=(m,) + (1,) * (ctx.type(acc).rank - 2))
        return ctx.emit1("mul", [acc, ctx.emit1("mul", [_as(ctx, _scalar(ctx, x_scale, "scale"), "float32"),
                                                        _as(ctx, w_scale, "float32")])])

    ctx.weight_convs[node.output[0]] = convolve


def _offer_matmul_float8(ctx: Context, node, codes: Operand, scale: Operand, axis: int, fmt: str) -> None:
    """A float8 weight ``[K, N]`` dequantized per tensor or per output channel (axis 1), weight-only FP8 as FP8
    checkpoints ship: a MatMul by it is ``matmul_float8`` on the codes stored transposed (``[N, K]``, at compile
    time), so a decoding step reads the weight at a byte a value instead of a float temporary decoded each call."""
    t, st = ctx.type(codes), ctx.type(scale)
    if t.rank != 2 or ctx.weight(codes) is None or not (st.numel == 1 or (axis % 2 == 1 and st.shape == t.shape[1:])):
        return
    k, n = t.shape

    def matmul(a: Operand, a_name: str, transposed: bool) -> Operand | None:
        if transposed or ctx.type(a).dtype != "float32":
            return None
        bt = ctx.weight_layout(codes, "T", lambda w: np.ascontiguousarray(w.T), TensorType("uint8", (n, k)))
        return ctx.emit1("matmul_float8", [a, bt, _as(ctx, ctx.emit1("reshape", [scale], shape=(st.numel,)),
                                                         "float32")], format=fmt)

    ctx.weight_matmuls[node.output[0]] = matmul


def _offer_matmul_nbits(ctx: Context, node, x: Operand, scale: Operand, zp: Operand | None, axis: int,
                        block: int) -> None:
    """A packed 4-bit weight ``[K, N]`` dequantized in blocks along K (the QDQ form of 4-bit weight-only
    quantization): a MatMul by it can be ``matmul_nbits`` with the codes repacked once, at compile time, into its
    ``[N, blocks, block/2]`` layout (the DequantizeLinear nodes then go dead). Offered to the MatMul converter."""
    unpack = x.producer if isinstance(x, Value) else None
    if unpack is None or unpack.op != "unpack_int4" or unpack.inputs[0].producer is not None:
        return
    packed, signed = unpack.inputs[0], unpack.attrs["signed"]
    k, n = ctx.type(x).shape if ctx.type(x).rank == 2 else (0, 0)
    if axis % 2 != 0 or not block or block % 2 or not k or k % block:
        return
    blocks = k // block

    def repack(stored: np.ndarray) -> np.ndarray:  # [K, N/2] two nibbles along N -> [N, blocks, block/2] along K
        q = unpack_nibbles(stored)
        q = (q ^ 8 if signed else q).T  # int4's two's-complement nibble ^ 8 = value + 8 (0..15, zero point 8)
        return pack_nibbles(q).reshape(n, blocks, block // 2)

    operands: list[Operand] = []  # made at the first MatMul, shared by any others

    def matmul(a: Operand, a_name: str, transposed: bool) -> Operand | None:
        if transposed:
            return None
        if not operands:
            operands.append(ctx.weight_layout(packed, "nbits", repack, TensorType("uint8", (n, blocks, block // 2))))
            # [blocks, N] -> [N, blocks]: once, at compile time, for initializers (a transpose kernel a call else)
            operands.append(ctx.weight_layout(scale, "T.f32", lambda s: s.T.astype(np.float32),
                                              TensorType("float32", (n, blocks)))
                            or _as(ctx, ctx.emit1("transpose", [scale], perm=(1, 0)), "float32"))
            if zp is not None:
                operands.append(ctx.emit1("add", [_as(ctx, ctx.emit1("transpose", [zp], perm=(1, 0)), "float32"),
                                                  np.float32(8 if signed else 0)]))
            elif not signed:  # uint4 without a zero point: 0, not matmul_nbits' default 8
                operands.append(np.zeros((n, blocks), np.float32))
        return ctx.emit1("matmul_nbits", [a, *operands])

    ctx.weight_matmuls[node.output[0]] = matmul


@converter("QuantizeLinear")
def _quantize(ctx: Context, node):
    x, scale = ctx.operand(0), ctx.operand(1)
    shape = ctx.type(x).shape
    axis, block = ctx.attr("axis", 1), ctx.attr("block_size", 0)
    zp = ctx.optional(2)
    where = f"QuantizeLinear node {node.name!r}"
    if zp is not None:
        out = ctx.narrow.get(node.input[2], ctx.type(zp).dtype)
    elif ctx.attr("output_dtype"):
        code = ctx.attr("output_dtype")
        out = NARROW[code] if code in NARROW else to_dtype(code, where, "output_dtype")
    else:
        out = "uint8"
    precision = to_dtype(ctx.attr("precision"), where, "precision") if ctx.attr("precision") else ctx.type(x).dtype
    y = ctx.emit1("div", [_as(ctx, x, precision),
                          _as(ctx, _broadcastable(ctx, scale, shape, axis, block, "scale"), precision)])
    if coded(out):  # rounded by the conversion; float8's zero point only names the type, float4's is added
        if zp is not None and out == "float4e2m1":
            zp = ctx.emit1("decode_float", [_broadcastable(ctx, zp, shape, axis, block, "zero point")], format=out)
            y = ctx.emit1("add", [_as(ctx, y, "float32"), zp])
        ctx.narrow[node.output[0]] = out
        return [ctx.emit1("encode_float", [_as(ctx, y, "float32")], format=out,
                          saturate=bool(ctx.attr("saturate", 1)))]
    y = ctx.emit1("round", [y])  # rounded before the zero point is added, as the spec says
    if zp is not None:
        y = ctx.emit1("add", [_as(ctx, y, "float32"), _as(ctx, _broadcastable(ctx, zp, shape, axis, block,
                                                                             "zero point"), "float32")])
    return [_saturate(ctx, y, out)]


@converter("DynamicQuantizeLinear")
def _dynamic_quantize(ctx: Context, node):
    """uint8 with the range of ``x`` widened to include 0: scale = (max - min) / 255, zero point = round(-min/scale)."""
    x = ctx.operand(0)
    if ctx.type(x).dtype != "float32":
        raise ConvertError(f"DynamicQuantizeLinear takes float32, got {ctx.type(x).dtype}")
    zero = np.float32(0)
    hi = ctx.emit1("maximum", [ctx.emit1("reduce_max", [x], axes=None, keepdims=False), zero])
    lo = ctx.emit1("minimum", [ctx.emit1("reduce_min", [x], axes=None, keepdims=False), zero])
    span = ctx.emit1("sub", [hi, lo])
    span = ctx.emit1("where", [ctx.emit1("equal", [span, zero]), np.float32(1), span])
    scale = ctx.emit1("div", [span, np.float32(255)])
    zp = ctx.emit1("round", [ctx.emit1("clip", [ctx.emit1("div", [ctx.emit1("neg", [lo]), scale])], min=0.0,
                                       max=255.0)])
    y = ctx.emit1("add", [ctx.emit1("round", [ctx.emit1("div", [x, scale])]), zp])
    return [_saturate(ctx, y, "uint8"), scale, ctx.emit1("cast", [zp], dtype="uint8")]


def _integer_operands(ctx: Context, a_idx: int, b_idx: int, a_zp_idx: int, b_zp_idx: int,
                      convolution: bool) -> tuple[Operand, Operand]:
    """The two 8-bit operands minus their zero points, as float64. A 1-D zero point is per row of A (matmul) and
    per column of B, or per output channel of a convolution weight."""
    a, b = ctx.operand(a_idx), ctx.operand(b_idx)
    for x, what in ((a, "input A"), (b, "input B")):
        if ctx.type(x).dtype not in ("uint8", "int8"):
            raise ConvertError(f"{what} must be uint8 or int8, got {ctx.type(x).dtype}")
    b_shape = ctx.type(b).shape
    a_zp, b_zp = ctx.optional(a_zp_idx), ctx.optional(b_zp_idx)
    if a_zp is not None:
        if ctx.type(a_zp).shape not in ((), (1,)) and convolution:
            raise ConvertError("the input's zero point of an integer convolution must be a scalar")
        if ctx.type(a_zp).rank == 1 and not convolution:
            a_zp = ctx.emit1("reshape", [a_zp], shape=(ctx.type(a_zp).shape[0], 1))  # per row of A
    if b_zp is not None and convolution and ctx.type(b_zp).rank == 1 and ctx.type(b_zp).shape[0] > 1:
        b_zp = ctx.emit1("reshape", [b_zp], shape=(b_shape[0],) + (1,) * (len(b_shape) - 1))
    return _shifted(ctx, a, a_zp, "float64"), _shifted(ctx, b, b_zp, "float64")


def _requantize(ctx: Context, acc: Operand, a_scale: Operand, b_scale: Operand, y_scale: Operand,
                y_zp: Operand | None, out: str, channel_shape: tuple[int, ...] | None) -> Operand:
    """``saturate(round(acc * (a_scale * b_scale / y_scale) + y_zp))``, the multiplier in float32 (onnx's order)
    applied to the exact float64 accumulator. ``channel_shape`` reshapes a per-channel weight scale."""
    if channel_shape is not None and ctx.type(b_scale).numel > 1:
        b_scale = ctx.emit1("reshape", [b_scale], shape=channel_shape)
    mult = ctx.emit1("div", [ctx.emit1("mul", [_as(ctx, a_scale, "float32"), _as(ctx, b_scale, "float32")]),
                             _as(ctx, y_scale, "float32")])
    y = ctx.emit1("mul", [acc, _as(ctx, mult, "float64")])
    if y_zp is not None:  # added before rounding, as onnx does (a tie's even neighbour depends on the zero point)
        y = ctx.emit1("add", [y, _as(ctx, y_zp, "float64")])
    return _saturate(ctx, ctx.emit1("round", [y]), out)


def _integer_matmul(ctx: Context, a_idx: int, b_idx: int, a_zp_idx: int, b_zp_idx: int) -> Operand:
    """The exact int32 product of MatMulInteger's / QLinearMatMul's operands minus their zero points: the IR's
    ``matmul_integer`` (B stored transposed; a weight once, at compile time) for a 2-D B and scalar or per-row /
    per-column zero points, else a float64 matmul (every partial sum is an integer below 2^53) cast to int32."""
    a, b = ctx.operand(a_idx), ctx.operand(b_idx)
    at, bt = ctx.type(a), ctx.type(b)
    zps = []
    for idx, t, rows in ((a_zp_idx, at, at.shape[-2] if at.rank == 2 else 1), (b_zp_idx, bt, bt.shape[-1])):
        zp = ctx.optional(idx)
        if zp is None:
            zp = np.zeros((), np_dtype(t.dtype))
        elif ctx.type(zp).rank > 1 or ctx.type(zp).numel not in (1, rows):
            zps = None  # a zero point per row of a batched A, or not of the form above: the general path checks it
            break
        zps.append(zp)
    if zps is None or bt.rank != 2 or at.dtype not in INT8 or bt.dtype not in INT8:
        a64, b64 = _integer_operands(ctx, a_idx, b_idx, a_zp_idx, b_zp_idx, convolution=False)
        return ctx.emit1("cast", [ctx.emit1("matmul", [a64, b64])], dtype="int32")
    k, n = bt.shape
    b_t = ctx.weight_layout(b, "T", lambda w: w.T, TensorType(bt.dtype, (n, k)))
    return ctx.emit1("matmul_integer", [a, b_t if b_t is not None else ctx.emit1("transpose", [b], perm=(1, 0))]
                     + zps)


@converter("MatMulInteger")
def _matmul_integer(ctx: Context, node):
    return [_integer_matmul(ctx, 0, 1, 2, 3)]


@converter("QLinearMatMul")
def _qlinear_matmul(ctx: Context, node):
    acc = _as(ctx, _integer_matmul(ctx, 0, 3, 2, 5), "float64")
    y_zp = ctx.optional(7)
    out = ctx.type(y_zp).dtype if y_zp is not None else ctx.type(ctx.operand(0)).dtype
    return [_requantize(ctx, acc, ctx.operand(1), ctx.operand(4), ctx.operand(6), y_zp, out, channel_shape=None)]


#: the most multiply-adds of two zero-point-shifted 8-bit values (each at most 255 in size) whose every partial sum
#: float32 holds exactly (below 2^24)
EXACT_FLOAT32_TERMS = (1 << 24) // (255 * 255)


def _exact_conv(ctx: Context, x: Operand, w: Operand, x_zp: Operand | None, w_zp: Operand | None,
                dtype: str) -> Operand | None:
    """The node's convolution of 8-bit ``x`` and ``w`` minus their zero points (x's one value, w's one or one per
    output channel; None: 0), exact, in ``dtype``, where a fast exact form exists, else None:

    - one of at most :data:`EXACT_FLOAT32_TERMS` terms a sum (depthwise, a first layer's few channels), not
      pointwise: a float32 convolution of the shifted codes (every partial sum below 2^24);
    - else one group: the IR's ``matmul_integer`` (the native VNNI kernel on the CPU) of the pixels as rows by the
      weight ``[M, taps x C]``: a pointwise one's rows are the image's pixels (channels last), a 2-D one's the
      im2col of its taps, each a strided slice of the image (channels last, padded with x's zero point).
    """
    xt, wt = ctx.type(x), ctx.type(w)
    if xt.dtype not in INT8 or wt.dtype not in INT8 or (x_zp is not None and ctx.type(x_zp).numel != 1):
        return None
    rank, m = xt.rank, wt.shape[0]
    if w_zp is not None and (ctx.type(w_zp).numel not in (1, m) or ctx.type(w_zp).rank > 1):
        return None
    nd, spatial, kernel = rank - 2, xt.shape[2:], wt.shape[2:]
    zp_value = 0 if x_zp is None else ctx.known(x_zp)  # what the padding must hold: a shifted 0
    x_zp = None if x_zp is None else _scalar(ctx, x_zp, "input zero point")
    strides, dilations = tuple(ctx.attr("strides", [1] * nd)), tuple(ctx.attr("dilations", [1] * nd))
    pads = _auto_pads(ctx, spatial, kernel, strides, dilations)
    pointwise = kernel == (1,) * nd and strides == (1,) * nd and not any(pads)
    if not pointwise and int(np.prod(wt.shape[1:])) <= EXACT_FLOAT32_TERMS:
        if w_zp is not None and ctx.type(w_zp).numel > 1:
            w_zp = ctx.emit1("reshape", [w_zp], shape=(m,) + (1,) * (rank - 1))
        return _as(ctx, conv(ctx, _shifted(ctx, x, x_zp, "float32"), _shifted(ctx, w, w_zp, "float32"), None), dtype)
    if ctx.attr("group", 1) != 1 or not (pointwise or (rank == 4 and zp_value is not None)):
        return None
    n, c = xt.shape[:2]
    image = ctx.emit1("transpose", [x], perm=(0, *range(2, rank), 1))  # channels last
    if pointwise:
        out, taps = spatial, [image]
    else:
        if any(pads):
            image = ctx.emit1("pad", [image], pads=(0, *pads[:2], 0, 0, *pads[2:], 0), mode="constant",
                              value=float(np.asarray(zp_value).reshape(-1)[0]))
        out = tuple((d + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                    for i, d in enumerate(spatial))
        taps = [ctx.emit1("slice", [image], starts=(i * dilations[0], j * dilations[1]),
                          ends=(i * dilations[0] + (out[0] - 1) * strides[0] + 1,
                                j * dilations[1] + (out[1] - 1) * strides[1] + 1), axes=(1, 2), steps=strides)
                for i in range(kernel[0]) for j in range(kernel[1])]
    k = c * int(np.prod(kernel))
    rows = ctx.emit1("reshape", [taps[0] if len(taps) == 1 else ctx.emit1("concat", taps, axis=rank - 1)],
                     shape=(n * int(np.prod(out)), k))  # [N * pixels, taps x C]
    layout = (0, *range(2, rank), 1)  # the weight's taps, then its channels, as the rows' columns
    bt = ctx.weight_layout(w, "taps", lambda a: np.ascontiguousarray(a.transpose(layout)).reshape(a.shape[0], -1),
                           TensorType(wt.dtype, (m, k)))
    if bt is None:
        bt = ctx.emit1("reshape", [ctx.emit1("transpose", [w], perm=layout)], shape=(m, k))
    zps = [np.zeros((), np_dtype(dt)) if zp is None else zp for zp, dt in ((x_zp, xt.dtype), (w_zp, wt.dtype))]
    acc = ctx.emit1("reshape", [ctx.emit1("matmul_integer", [rows, bt] + zps)], shape=(n, *out, m))
    return _as(ctx, ctx.emit1("transpose", [acc], perm=(0, rank - 1, *range(1, rank - 1))), dtype)


def _integer_conv(ctx: Context, x_idx: int, w_idx: int, x_zp_idx: int, w_zp_idx: int) -> Operand:
    """The exact accumulator (float64) of an integer convolution's zero-point-shifted operands: :func:`_exact_conv`,
    else (grouped, 1-D/3-D with taps, an input zero point only known at run time) a float64 convolution (exact
    too, and slow)."""
    acc = _exact_conv(ctx, ctx.operand(x_idx), ctx.operand(w_idx), ctx.optional(x_zp_idx), ctx.optional(w_zp_idx),
                      "float64")
    if acc is not None:
        return acc
    xs, ws = _integer_operands(ctx, x_idx, w_idx, x_zp_idx, w_zp_idx, convolution=True)
    return conv(ctx, xs, ws, None)


@converter("ConvInteger")
def _conv_integer(ctx: Context, node):
    return [ctx.emit1("cast", [_integer_conv(ctx, 0, 1, 2, 3)], dtype="int32")]


@converter("QLinearConv")
def _qlinear_conv(ctx: Context, node):
    w = ctx.operand(3)
    bias = ctx.optional(8)
    acc = _integer_conv(ctx, 0, 3, 2, 5)
    if bias is not None:
        acc = ctx.emit1("add", [acc, ctx.emit1("reshape", [_as(ctx, bias, "float64")],
                                               shape=(ctx.type(w).shape[0],) + (1,) * (ctx.type(acc).rank - 2))])
    y_zp = ctx.optional(7)
    out = ctx.type(y_zp).dtype if y_zp is not None else ctx.type(ctx.operand(0)).dtype
    rank = ctx.type(acc).rank
    return [_requantize(ctx, acc, ctx.operand(1), ctx.operand(4), ctx.operand(6), y_zp, out,
                        channel_shape=(ctx.type(w).shape[0],) + (1,) * (rank - 2))]


# ---- onnxruntime's QOperator format (com.microsoft) ---------------------------------------------------------------

def _scalar(ctx: Context, p: Operand, what: str) -> Operand:
    if ctx.type(p).numel != 1:
        raise ConvertError(f"the {what} has shape {ctx.type(p).shape}; this op quantizes per tensor (one value)")
    return p if ctx.type(p).rank == 0 else ctx.emit1("reshape", [p], shape=())


def _shifted_input(ctx: Context, x_idx: int, zp_idx: int) -> Operand:
    """float32 ``x - zero_point`` of a per-tensor quantized 8-bit input (no zero point: 0)."""
    x = ctx.operand(x_idx)
    if ctx.type(x).dtype not in INT8:
        raise ConvertError(f"input {ctx.node.input[x_idx]!r} must be uint8 or int8, got {ctx.type(x).dtype}")
    zp = ctx.optional(zp_idx)
    return _shifted(ctx, x, None if zp is None else _scalar(ctx, zp, "zero point"), "float32")


def _scale(ctx: Context, idx: int) -> Operand:
    return _as(ctx, _scalar(ctx, ctx.operand(idx), "scale"), "float32")


def _dequantized(ctx: Context, x_idx: int, scale_idx: int, zp_idx: int) -> Operand:
    """float32 ``scale * (x - zero_point)`` of a per-tensor quantized 8-bit input (no zero point: 0)."""
    return ctx.emit1("mul", [_shifted_input(ctx, x_idx, zp_idx), _scale(ctx, scale_idx)])


def _quantized(ctx: Context, y: Operand, scale_idx: int | None, zp_idx: int, like: Operand,
               zp_first: bool = True) -> Operand:
    """``saturate(round(y / scale + zero_point))`` (``scale_idx`` None: y is already in units of the output's scale)
    in the zero point's type (no zero point: 0, in ``like``'s). The zero point is added before rounding as
    onnxruntime's arithmetic kernels of these ops do; ``zp_first=False``: after, as QuantizeLinear and its
    table-driven kernels (LeakyRelu, Sigmoid, Concat, Where) do. The two differ at ties."""
    zp = ctx.optional(zp_idx)
    if scale_idx is not None:
        y = ctx.emit1("div", [y, _scale(ctx, scale_idx)])
    if zp is not None and zp_first:
        y = ctx.emit1("add", [y, _as(ctx, _scalar(ctx, zp, "zero point"), "float32")])
    y = ctx.emit1("round", [y])
    if zp is not None and not zp_first:
        y = ctx.emit1("add", [y, _as(ctx, _scalar(ctx, zp, "zero point"), "float32")])
    return _saturate(ctx, y, ctx.type(zp if zp is not None else like).dtype)


@converter("com.microsoft::QLinearAdd", "com.microsoft::QLinearMul")
def _qlinear_binary(ctx: Context, node):
    """As onnxruntime computes them, each ratio of scales in float32: ``(a - a_zp) a_scale / c_scale + (b - b_zp)
    b_scale / c_scale + c_zp`` and ``(a - a_zp) (b - b_zp) (a_scale b_scale / c_scale) + c_zp``, then rounded."""
    a, b, c_scale = _shifted_input(ctx, 0, 2), _shifted_input(ctx, 3, 5), _scale(ctx, 6)
    if node.op_type == "QLinearMul":
        ratio = ctx.emit1("div", [ctx.emit1("mul", [_scale(ctx, 1), _scale(ctx, 4)]), c_scale])
        y = ctx.emit1("mul", [ctx.emit1("mul", [a, b]), ratio])
    else:
        y = ctx.emit1("add", [ctx.emit1("mul", [a, ctx.emit1("div", [_scale(ctx, 1), c_scale])]),
                              ctx.emit1("mul", [b, ctx.emit1("div", [_scale(ctx, 4), c_scale])])])
    return [_quantized(ctx, y, None, 7, ctx.operand(0))]


@converter("com.microsoft::QLinearLeakyRelu", "com.microsoft::QLinearSigmoid")
def _qlinear_activation(ctx: Context, node):
    x = _dequantized(ctx, 0, 1, 2)
    y = (ctx.emit1("leaky_relu", [x], alpha=float(ctx.attr("alpha", 0.01))) if node.op_type == "QLinearLeakyRelu"
         else ctx.emit1("sigmoid", [x]))
    return [_quantized(ctx, y, 3, 4, ctx.operand(0), zp_first=False)]


def _channels_moved(ctx: Context, x: Operand, first: bool) -> Operand:
    """``x`` with its channels (axis 1) moved last (``first=False``: from last back to 1)."""
    rank = ctx.type(x).rank
    perm = (0, rank - 1, *range(1, rank - 1)) if first else (0, *range(2, rank), 1)
    return ctx.emit1("transpose", [x], perm=perm)


@converter("com.microsoft::QLinearGlobalAveragePool", "com.microsoft::QLinearAveragePool")
def _qlinear_average_pool(ctx: Context, node):
    x = _dequantized(ctx, 0, 1, 2)
    last = bool(ctx.attr("channels_last", 0))
    if last:
        x = _channels_moved(ctx, x, first=True)
    if node.op_type == "QLinearGlobalAveragePool":
        y = ctx.emit1("reduce_mean", [x], axes=tuple(range(2, ctx.type(x).rank)), keepdims=True)
    else:
        (y,) = pool(ctx, x, "AveragePool")
    if last:
        y = _channels_moved(ctx, y, first=False)
    return [_quantized(ctx, y, 3, 4, ctx.operand(0))]


@converter("com.microsoft::QLinearConcat")
def _qlinear_concat(ctx: Context, node):
    if len(node.input) < 5 or (len(node.input) - 2) % 3:
        raise ConvertError(f"QLinearConcat takes Y_scale, Y_zero_point, then (tensor, scale, zero point) for each "
                           f"input; got {len(node.input)} inputs")
    parts = [_dequantized(ctx, i, i + 1, i + 2) for i in range(2, len(node.input), 3)]
    return [_quantized(ctx, ctx.emit1("concat", parts, axis=ctx.attr("axis")), 0, 1, ctx.operand(2), zp_first=False)]


@converter("com.microsoft::QLinearSoftmax")
def _qlinear_softmax(ctx: Context, node):
    y = softmax(ctx, _dequantized(ctx, 0, 1, 2), "softmax", ctx.attr("opset", ctx.opset))
    return [_quantized(ctx, y, 3, 4, ctx.operand(0))]


@converter("com.microsoft::QLinearWhere")
def _qlinear_where(ctx: Context, node):
    y = ctx.emit1("where", [ctx.operand(0), _dequantized(ctx, 1, 2, 3), _dequantized(ctx, 4, 5, 6)])
    return [_quantized(ctx, y, 7, 8, ctx.operand(1), zp_first=False)]


@converter("com.microsoft::QGemm")
def _qgemm(ctx: Context, node):
    """``alpha * (A - a_zp) (B - b_zp) a_scale b_scale + C a_scale b_scale alpha`` (C int32, B's scale and zero
    point per tensor or per column), quantized by ``y_scale``/``y_zero_point`` when given, else float32. Computed
    on the dequantized operands in float32 (B, a weight, stays 8-bit in the artifact)."""
    trans_a, trans_b, alpha = bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0)), float(ctx.attr("alpha", 1.0))
    a, b = _dequantized(ctx, 0, 1, 2), ctx.operand(3)
    if ctx.type(b).dtype not in INT8 or ctx.type(b).rank != 2:
        raise ConvertError(f"B must be a 2-D uint8 or int8 tensor, got {ctx.type(b).dtype}{list(ctx.type(b).shape)}")
    n = ctx.type(b).shape[0 if trans_b else 1]
    b_scale, b_zp = ctx.operand(4), ctx.optional(5)
    for p, what in ((b_scale, "b_scale"), (b_zp, "b_zero_point")):
        if p is not None and ctx.type(p).numel not in (1, n):
            raise ConvertError(f"{what} has shape {ctx.type(p).shape}: one value, or one per column of B ({n})")
    column = (n, 1) if trans_b else (n,)  # per column of B: along its rows when B is stored transposed
    b_scale, b_zp = (None if p is None else _scalar(ctx, p, what) if ctx.type(p).numel == 1 else
                     ctx.emit1("reshape", [p], shape=column)
                     for p, what in ((b_scale, "b_scale"), (b_zp, "b_zero_point")))
    bf = ctx.emit1("mul", [_shifted(ctx, b, b_zp, "float32"), _as(ctx, b_scale, "float32")])
    y = ctx.emit1("matmul", [ctx.emit1("transpose", [a], perm=(1, 0)) if trans_a else a,
                             ctx.emit1("transpose", [bf], perm=(1, 0)) if trans_b else bf])
    if alpha != 1.0:
        y = ctx.emit1("mul", [y, np.float32(alpha)])
    c = ctx.optional(6)
    if c is not None:  # int32 at scale alpha * a_scale * b_scale (per column of Y)
        unit = ctx.emit1("mul", [_as(ctx, _scalar(ctx, ctx.operand(1), "scale"), "float32"),
                                 _as(ctx, ctx.operand(4), "float32")])
        y = ctx.emit1("add", [y, ctx.emit1("mul", [_as(ctx, c, "float32"),
                                                   ctx.emit1("mul", [unit, np.float32(alpha)])])])
    return [y if ctx.optional(7) is None else _quantized(ctx, y, 7, 8, ctx.operand(0))]


@converter("com.microsoft::MatMulNBits")
def _matmul_nbits(ctx: Context, node):
    """onnxruntime's weight-only quantized linear layer: ``A @ dequantize(B).T + bias`` with B ``[N, blocks, bytes]``
    holding 4- or 8-bit codes along K (two 4-bit codes a byte, the first in the low nibble), dequantized per block
    as ``(code - zero_point) * scale``. The packed bytes are the weight (4 bits a value in the artifact), read by
    the IR's ``matmul_nbits`` (4-bit codes, K a whole number of blocks) or else unpacked and dequantized into a
    float weight for a ``matmul``. A is used as given whatever ``accuracy_level`` says (onnxruntime's level 4
    quantizes A to 8 bits first)."""
    a, b, scales = ctx.operand(0), ctx.operand(1), ctx.operand(2)
    k, n, bits, block = ctx.attr("K"), ctx.attr("N"), ctx.attr("bits", 4), ctx.attr("block_size")
    if bits not in (4, 8):
        raise ConvertError(f"MatMulNBits with bits={bits} is not supported", fix="bmc takes 4- and 8-bit weights")
    if ctx.has(4):
        raise ConvertError("MatMulNBits with g_idx (act-order) is not supported",
                           fix="quantize without act-order (onnxruntime's default)")
    blocks = -(-k // block)
    if ctx.type(b).shape != (n, blocks, block * bits // 8) or ctx.type(b).dtype != "uint8":
        raise ConvertError(f"B is {ctx.type(b)}, but K={k}, N={n}, bits={bits}, block_size={block} need "
                           f"uint8[{n},{blocks},{block * bits // 8}]")
    if ctx.type(a).shape[-1:] != (k,):
        raise ConvertError(f"input A has shape {ctx.type(a).shape}; its last dim must be K={k}")
    per_block = (n, blocks)
    zp = ctx.optional(3)
    if zp is not None and ctx.type(zp).dtype == "uint8":  # packed like B: each row padded to whole bytes
        zp = ctx.emit1("reshape", [zp], shape=(n, -(-blocks * bits // 8)))
        if bits == 4:
            zp = ctx.emit1("slice", [ctx.emit1("unpack_int4", [zp], signed=False)], starts=(0,), ends=(blocks,),
                           axes=(1,), steps=(1,))
    dtype = ctx.type(a).dtype
    scales = _as(ctx, ctx.emit1("reshape", [scales], shape=per_block), dtype)
    zps = [] if zp is None else [_as(ctx, ctx.emit1("reshape", [zp], shape=per_block), dtype)]
    if bits == 4 and blocks * block == k and dtype in FLOAT_DTYPES:  # the IR's 4-bit matmul (a fused kernel)
        y = ctx.emit1("matmul_nbits", [a, b, scales] + zps)
    else:
        codes = ctx.emit1("unpack_int4", [b], signed=False) if bits == 4 else b  # [N, blocks, block]
        zp = np.array(1 << (bits - 1), np.float32) if zp is None else ctx.emit1("reshape", zps, shape=(n, blocks, 1))
        w = ctx.emit1("mul", [_shifted(ctx, codes, zp, "float32"),
                              _as(ctx, ctx.emit1("reshape", [scales], shape=(n, blocks, 1)), "float32")])
        w = ctx.emit1("reshape", [w], shape=(n, blocks * block))
        if blocks * block != k:
            w = ctx.emit1("slice", [w], starts=(0,), ends=(k,), axes=(1,), steps=(1,))
        y = ctx.emit1("matmul", [a, ctx.emit1("transpose", [_as(ctx, w, dtype)], perm=(1, 0))])
    bias = ctx.optional(5)
    return [y if bias is None else ctx.emit1("add", [y, bias])]
