"""Relax lowering of elementwise ops."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx

from bmc.codegen.lower import const, lowering
from bmc.ir.types import np_dtype
from bmc.ops.minifloat import Format, get_format

_R = relax.op

_SIMPLE_UNARY = {
    "neg": _R.negative, "abs": _R.abs, "sign": _R.sign, "exp": _R.exp, "log": _R.log, "sqrt": _R.sqrt,
    "rsqrt": _R.rsqrt, "tanh": _R.tanh, "sigmoid": _R.sigmoid, "erf": _R.erf, "sin": _R.sin, "cos": _R.cos,
    "asin": _R.asin, "acos": _R.acos, "atan": _R.atan,
    "floor": _R.floor, "ceil": _R.ceil, "round": _R.round, "relu": _R.nn.relu, "logical_not": _R.logical_not,
    "isnan": _R.isnan, "isinf": _R.isinf, "bitwise_not": _R.bitwise_not,
}
_BINARY = {
    "add": _R.add, "sub": _R.subtract, "mul": _R.multiply, "div": _R.divide, "pow": _R.power,
    "maximum": _R.maximum, "minimum": _R.minimum, "equal": _R.equal, "less": _R.less, "less_equal": _R.less_equal,
    "greater": _R.greater, "greater_equal": _R.greater_equal, "logical_and": _R.logical_and,
    "logical_or": _R.logical_or, "logical_xor": _R.logical_xor, "bitwise_and": _R.bitwise_and,
    "bitwise_or": _R.bitwise_or, "bitwise_xor": _R.bitwise_xor,
}


#: unary ops computed in float32 for float16/bfloat16 tensors ("opmath", as PyTorch does): inside the fused kernel
#: the casts cost no memory traffic, and a transcendental evaluated in 8 or 11 bits loses digits the cast-back keeps
_OPMATH = {"exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "erf", "sin", "cos", "asin", "acos", "atan", "gelu",
           "softplus"}


def scalar(value, dtype: str) -> relax.Constant:
    return const(np.array(value, dtype=np_dtype(dtype)))


def opmath(fn):
    """Lower ``fn`` on float32 copies of float16/bfloat16 operands, then cast the result back."""
    def lower(ctx, node, args):
        dtype = node.inputs[0].type.dtype
        if dtype not in ("float16", "bfloat16") or node.op not in _OPMATH:
            return fn(ctx, node, args)
        return _R.astype(ctx.emit(fn(ctx, node, [ctx.emit(_R.astype(a, "float32")) for a in args])), dtype)
    return lower


@lowering(*_SIMPLE_UNARY)
@opmath
def _unary(ctx, node, args):
    if node.op in ("isnan", "isinf") and node.inputs[0].type.dtype in ("float16", "bfloat16"):
        return _SIMPLE_UNARY[node.op](ctx.emit(_R.astype(args[0], "float32")))  # exact; TVM's CUDA has no bf16 isnan
    return _SIMPLE_UNARY[node.op](args[0])


def _small_power(node) -> int | None:
    """2 or 3 when the exponent of ``pow`` is that constant (GELU's ``x ** 3``): computed as products, as
    onnxruntime does, instead of a ``pow`` call per element."""
    exp = node.inputs[1].producer
    if exp is None or exp.op != "constant" or node.inputs[0].type.dtype not in ("float64", "float32", "float16",
                                                                                "bfloat16"):
        return None
    value = np.asarray(exp.attrs["value"])
    if value.size == 0 or not np.all(value == value.flat[0]) or float(value.flat[0]) not in (2.0, 3.0):
        return None
    return int(value.flat[0])


@lowering(*_BINARY)
def _binary(ctx, node, args):
    dtype = node.inputs[0].type.dtype
    if node.op == "pow" and (n := _small_power(node)) and node.outputs[0].type.shape == node.inputs[0].type.shape:
        x = args[0] if dtype != "bfloat16" else ctx.emit(_R.astype(args[0], "float32"))
        y = ctx.emit(_R.multiply(x, x))
        y = y if n == 2 else ctx.emit(_R.multiply(y, x))
        return y if dtype != "bfloat16" else _R.astype(y, dtype)
    if node.op == "pow" and dtype not in ("float64", "float32", "float16"):  # TVM's pow takes IEEE floats only
        wide = [ctx.emit(_R.astype(a, "float32" if dtype == "bfloat16" else "float64")) for a in args]
        return _R.astype(ctx.emit(_R.power(*wide)), dtype)
    return _BINARY[node.op](args[0], args[1])


@lowering("left_shift", "right_shift")
def _shift(ctx, node, args):
    """A shift amount outside [0, bit width) gives 0 (-1 for a right shift of a negative value), as ONNX says; TVM's
    shifts leave that undefined, so the amount is clamped into range and the result selected."""
    dtype = node.inputs[0].type.dtype
    x, amount = args
    bits = 8 * np.dtype(np_dtype(dtype)).itemsize
    ok = ctx.emit(_R.logical_and(ctx.emit(_R.greater_equal(amount, scalar(0, dtype))),
                                 ctx.emit(_R.less(amount, scalar(bits, dtype)))))
    amount = ctx.emit(_R.where(ok, amount, scalar(0, dtype)))
    shifted = ctx.emit((_R.left_shift if node.op == "left_shift" else _R.right_shift)(x, amount))
    fill = scalar(0, dtype)
    if node.op == "right_shift" and not dtype.startswith("u"):
        fill = ctx.emit(_R.where(ctx.emit(_R.less(x, fill)), scalar(-1, dtype), fill))
    return _R.where(ok, shifted, fill)


@lowering("reciprocal")
def _reciprocal(ctx, node, args):
    return _R.divide(scalar(1, node.inputs[0].type.dtype), args[0])


@lowering("softplus")
@opmath
def _softplus(ctx, node, args):
    # log(1 + exp(x)) computed stably as max(x, 0) + log(1 + exp(-|x|))
    x, dt = args[0], ctx.dtype_of(args[0])
    tail = _R.log(_R.add(scalar(1, dt), ctx.emit(_R.exp(ctx.emit(_R.negative(ctx.emit(_R.abs(x))))))))
    return _R.add(ctx.emit(_R.maximum(x, scalar(0, dt))), ctx.emit(tail))


@lowering("gelu")
@opmath
def _gelu(ctx, node, args):
    return _R.nn.gelu_tanh(args[0]) if node.attrs["approximate"] == "tanh" else _R.nn.gelu(args[0])


@lowering("leaky_relu")
def _leaky_relu(ctx, node, args):
    return _R.nn.leakyrelu(args[0], node.attrs["alpha"])


@lowering("clip")
def _clip(ctx, node, args):
    x, dt = args[0], node.inputs[0].type.dtype
    if node.attrs["min"] is not None:
        x = ctx.emit(_R.maximum(x, scalar(node.attrs["min"], dt)))
    if node.attrs["max"] is not None:
        x = ctx.emit(_R.minimum(x, scalar(node.attrs["max"], dt)))
    return x


@lowering("cast")
def _cast(ctx, node, args):
    dtype = node.attrs["dtype"]
    if node.attrs.get("excess_precision") and node.inputs[0].type.dtype in ("float16", "bfloat16"):
        # the producer's float32 result where its lowering narrowed one (a matmul accumulator, a norm)
        bound = ctx.bb.lookup_binding(args[0]) if isinstance(args[0], relax.Var) else None
        if (isinstance(bound, relax.Call) and bound.op == tvm.ir.Op.get("relax.astype")
                and ctx.dtype_of(bound.args[0]) == dtype):
            return bound.args[0]
    return _R.astype(args[0], dtype)


@lowering("where")
def _where(ctx, node, args):
    return _R.where(*args)


@lowering("bitcast")
def _bitcast(ctx, node, args):
    dtype = node.attrs["dtype"]
    return ctx.bb.emit_te(lambda x: te.compute(x.shape, lambda *i: tirx.reinterpret(dtype, x(*i)), name="bitcast"),
                          args[0], primfunc_name_hint="bitcast")

# ---------------------------------------------------------------------------------------------------------------
# float8/float4 codes (``bmc.ops.minifloat``): integer arithmetic on float32 bits, one kernel each, on every target.
# Encoding rounds exactly: with ``e`` the input's binary exponent (from its bits) raised to the format's smallest
# normal exponent ``emin``, ``|x| * 2^(M - e)`` is exact in float32 and ``nearbyint`` of it is the mantissa rounded to
# nearest even, with the implicit bit; the magnitude code is then ``(e - emin) * 2^M + q``, which also carries a
# mantissa that rounds up into the next exponent, and covers subnormals (``e = emin``) with the same formula.

def _u32(v: int):
    return tirx.const(v, "uint32")


def _i32(v: int):
    return tirx.const(v, "int32")


def _f32_bits(bits):
    return tirx.reinterpret("float32", tirx.Cast("uint32", bits))


_NAN = 0x7FC00000
_INF = 0x7F800000


def decode_expr(code, fmt: Format):
    """float32 value of one uint8 code."""
    c = tirx.Cast("int32", code)
    if fmt.special == "e8m0":  # 2^(c - 127); c = 0 is float32's subnormal 2^-127
        value = _f32_bits(tirx.Select(c == 0, _i32(0x400000), c << 23))
        return tirx.Select(c == 0xFF, _f32_bits(_u32(_NAN)), value)
    m_bits, sign_at = fmt.mantissa_bits, fmt.bits - 1
    magnitude = c & ((1 << sign_at) - 1)
    e, m = magnitude >> m_bits, magnitude & ((1 << m_bits) - 1)
    normal = _f32_bits(((e + (127 - fmt.bias)) << 23) | (m << (23 - m_bits)))
    subnormal = tirx.Cast("float32", m) * tirx.const(2.0 ** (1 - fmt.bias - m_bits), "float32")
    value = tirx.Select(e == 0, subnormal, normal)
    if fmt.special == "ieee":
        top = (1 << fmt.exponent_bits) - 1
        value = tirx.Select(e == top, _f32_bits(tirx.Select(m == 0, _u32(_INF), _u32(_NAN))), value)
    value = tirx.Select(((c >> sign_at) & 1) == 1, -value, value)
    if fmt.special == "fn":
        value = tirx.Select(magnitude == (1 << sign_at) - 1, _f32_bits(_u32(_NAN)), value)
    elif fmt.special == "fnuz":
        value = tirx.Select(c == 1 << sign_at, _f32_bits(_u32(_NAN)), value)
    return value


def encode_expr(x, fmt: Format, saturate: bool, round_mode: str):
    """uint8 code of one float32 value (``bmc.ops.minifloat.encode``)."""
    bits = tirx.reinterpret("uint32", x)
    exponent = tirx.Cast("int32", (bits >> _u32(23)) & _u32(0xFF))
    if fmt.special == "e8m0":
        return _encode_e8m0(bits, exponent, saturate, round_mode)
    m_bits, sign_at = fmt.mantissa_bits, fmt.bits - 1
    sign = tirx.Cast("int32", bits >> _u32(31))
    abs_bits = bits & _u32(0x7FFFFFFF)
    emin = 1 - fmt.bias
    e = tirx.max(exponent - 127, _i32(emin))
    scale = _f32_bits((m_bits - e + 127) << 23)  # 2^(M - e), a normal float32 for every finite input
    q = tirx.Cast("int32", tirx.nearbyint(_f32_bits(abs_bits) * scale))
    magnitude = (e - emin) * (1 << m_bits) + q
    largest = fmt.max_magnitude
    if saturate or fmt.special == "none":
        overflow = _i32(largest)
    else:
        overflow = _i32({"ieee": largest + 1, "fn": largest + 1, "fnuz": 1 << sign_at}[fmt.special])
    is_nan = abs_bits > _u32(_INF)
    magnitude = tirx.Select((magnitude > largest) | (abs_bits == _u32(_INF)), overflow, magnitude)
    if fmt.special == "fnuz":  # no negative zero; the NaN code stands alone
        code = tirx.Select((magnitude == 0) | (magnitude == 1 << sign_at), magnitude, magnitude | (sign << sign_at))
        code = tirx.Select(is_nan, _i32(1 << sign_at), code)
    else:
        code = magnitude | (sign << sign_at)
        nan = {"ieee": (sign << sign_at) | (largest + 3),  # ml_dtypes' quiet NaN, sign kept
               "fn": (sign << sign_at) | (largest + 1),
               "none": (1 - sign) << sign_at}[fmt.special]  # ml_dtypes turns float4's NaN into the other zero
        code = tirx.Select(is_nan, nan, code)
    return tirx.Cast("uint8", code)


def _encode_e8m0(bits, exponent, saturate: bool, round_mode: str):
    if round_mode == "up":
        up = (bits & _u32(0x7FFFFF)) != _u32(0)
    elif round_mode == "nearest":
        up = ((bits & _u32(0x400000)) != _u32(0)) & (((bits & _u32(0x3FFFFF)) != _u32(0)) | (exponent > 0))
    else:
        up = tirx.const(False, "bool")
    if saturate:
        up = up & (exponent != 0xFE)
    rounded = (exponent + tirx.Cast("int32", up)) & 0xFF
    return tirx.Cast("uint8", tirx.Select(exponent == 0xFF, _i32(0xFF), rounded))


def emit_decode(ctx, codes, fmt: Format):
    """One kernel decoding a uint8 tensor of ``fmt``'s codes to float32."""
    return ctx.bb.emit_te(lambda x: te.compute(x.shape, lambda *i: decode_expr(x(*i), fmt), name="decode_float"),
                          codes, primfunc_name_hint="decode_float")


@lowering("decode_float")
def _decode(ctx, node, args):
    return emit_decode(ctx, args[0], get_format(node.attrs["format"]))


@lowering("encode_float")
def _encode(ctx, node, args):
    fmt, a = get_format(node.attrs["format"]), node.attrs
    return ctx.bb.emit_te(
        lambda x: te.compute(x.shape, lambda *i: encode_expr(x(*i), fmt, a["saturate"], a["round_mode"]),
                             name="encode_float"), args[0], primfunc_name_hint="encode_float")
