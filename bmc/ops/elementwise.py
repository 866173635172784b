"""Elementwise ops: unary math, binary arithmetic and comparison with numpy broadcasting, select, cast."""

from __future__ import annotations

import numpy as np

from bmc.ir.types import FLOAT_DTYPES, TensorType, itemsize, np_dtype
from bmc.ops import minifloat
from bmc.ops.registry import (Attr, OpDef, OpError, broadcast_shapes, elementwise_cost, register,
                              same_dtype)


def _erf(x):
    from scipy.special import erf

    return erf(x)


def _gelu(x, approximate):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _floats_only(name):
    def infer(ins, attrs):
        (t,) = ins
        if t.dtype not in FLOAT_DTYPES:
            raise OpError(f"op {name} needs a floating-point input, got {t.dtype}")
        return [t]

    return infer


def _any_dtype(ins, attrs):
    return [ins[0]]


def _bool_of(ins, attrs):
    return [ins[0].with_dtype("bool")]


def _numeric(name):
    def infer(ins, attrs):
        if ins[0].dtype == "bool":
            raise OpError(f"op {name} does not take bool inputs")
        return [ins[0]]

    return infer


def _with_dtype(fn):
    """Run a numpy function in float32 or wider and cast the result back (float16/bfloat16 inputs)."""

    def ref(ins, attrs):
        x = ins[0]
        out = fn(x.astype(np.float32) if x.dtype.itemsize < 4 and x.dtype.kind in "fV" else x, attrs)
        return [np.asarray(out).astype(x.dtype, copy=False)]

    return ref


# name: (infer factory, reference(x, attrs), flops per element, attrs)
_UNARY = {
    "neg": (_numeric, lambda x, a: -x, 1, {}),
    "abs": (_numeric, lambda x, a: np.abs(x), 1, {}),
    "sign": (_numeric, lambda x, a: np.sign(x), 1, {}),
    "bitwise_not": (_numeric, lambda x, a: np.invert(x), 1, {}),  # integers
    "exp": (_floats_only, lambda x, a: np.exp(x), 4, {}),
    "log": (_floats_only, lambda x, a: np.log(x), 4, {}),
    "sqrt": (_floats_only, lambda x, a: np.sqrt(x), 4, {}),
    "rsqrt": (_floats_only, lambda x, a: 1.0 / np.sqrt(x), 5, {}),
    "reciprocal": (_floats_only, lambda x, a: 1.0 / x, 1, {}),
    "tanh": (_floats_only, lambda x, a: np.tanh(x), 6, {}),
    "sigmoid": (_floats_only, lambda x, a: 1.0 / (1.0 + np.exp(-x)), 5, {}),
    "erf": (_floats_only, lambda x, a: _erf(x), 8, {}),
    "sin": (_floats_only, lambda x, a: np.sin(x), 6, {}),
    "cos": (_floats_only, lambda x, a: np.cos(x), 6, {}),
    "asin": (_floats_only, lambda x, a: np.arcsin(x), 8, {}),
    "acos": (_floats_only, lambda x, a: np.arccos(x), 8, {}),
    "atan": (_floats_only, lambda x, a: np.arctan(x), 8, {}),
    "floor": (_floats_only, lambda x, a: np.floor(x), 1, {}),
    "ceil": (_floats_only, lambda x, a: np.ceil(x), 1, {}),
    "round": (_floats_only, lambda x, a: np.round(x), 1, {}),
    "relu": (_numeric, lambda x, a: np.maximum(x, 0), 1, {}),
    "softplus": (_floats_only, lambda x, a: np.logaddexp(0, x), 5, {}),
    "gelu": (_floats_only, lambda x, a: _gelu(x, a["approximate"]), 10, {"approximate": Attr("str", "none")}),
    "leaky_relu": (_floats_only, lambda x, a: np.where(x >= 0, x, a["alpha"] * x), 2, {"alpha": Attr("float", 0.01)}),
    "clip": (_numeric, lambda x, a: np.clip(x, a["min"], a["max"]), 2,
             {"min": Attr("float?", None), "max": Attr("float?", None)}),
}

for _name, (_infer, _fn, _flops, _attrs) in _UNARY.items():
    register(OpDef(_name, "elementwise", (1, 1), _attrs, _infer(_name), _with_dtype(_fn),
                   elementwise_cost(_flops)))


register(OpDef("logical_not", "elementwise", (1, 1), {}, _any_dtype, lambda ins, a: [np.logical_not(ins[0])],
               elementwise_cost(1)))
register(OpDef("isnan", "elementwise", (1, 1), {}, _bool_of, lambda ins, a: [np.isnan(ins[0])],
               elementwise_cost(1)))
register(OpDef("isinf", "elementwise", (1, 1), {}, _bool_of, lambda ins, a: [np.isinf(ins[0])],
               elementwise_cost(1)))


def _infer_cast(ins, attrs):
    return [ins[0].with_dtype(attrs["dtype"])]


def _cast(ins, attrs):
    x, target = ins[0], np_dtype(attrs["dtype"])
    if x.dtype.kind == "f" and target.kind in "iu":
        x = np.trunc(x)  # float → int truncates toward zero (ONNX, C)
    return [x.astype(target)]


#: ``excess_precision``: the input may arrive more precise than its type says (a float16/bfloat16 matmul or norm
#: computed in float32 by its lowering) and is then converted from that, not rounded to its type first. Set only
#: on the output casts of ``--dtype`` (``bmc.ops.precision``); a cast from an ONNX model rounds as ONNX says.
register(OpDef("cast", "elementwise", (1, 1), {"dtype": Attr("dtype"), "excess_precision": Attr("bool", False)},
               _infer_cast, _cast, elementwise_cost(0)))


def _infer_bitcast(ins, attrs):
    (t,) = ins
    if "bool" in (t.dtype, attrs["dtype"]) or itemsize(t.dtype) != itemsize(attrs["dtype"]):
        raise OpError(f"bitcast reinterprets between non-bool dtypes of one size; {t.dtype} -> {attrs['dtype']} is "
                      "not such a pair")
    return [t.with_dtype(attrs["dtype"])]


register(OpDef("bitcast", "elementwise", (1, 1), {"dtype": Attr("dtype")}, _infer_bitcast,
               lambda ins, a: [ins[0].view(np_dtype(a["dtype"]))], elementwise_cost(0)))

# float8/float4 codes <-> float32 (bmc.ops.minifloat)
def _minifloat_infer(dtype_in: str, dtype_out: str, op: str):
    def infer(ins, attrs):
        minifloat.get_format(attrs["format"])
        if op == "encode_float" and attrs["round_mode"] not in minifloat.ROUND_MODES:
            raise OpError(f"round_mode must be one of {', '.join(minifloat.ROUND_MODES)}, "
                          f"got {attrs['round_mode']!r}")
        if ins[0].dtype != dtype_in:
            raise OpError(f"op {op} takes a {dtype_in} tensor, got {ins[0]}")
        return [ins[0].with_dtype(dtype_out)]

    return infer


register(OpDef("decode_float", "elementwise", (1, 1), {"format": Attr("str")},
               _minifloat_infer("uint8", "float32", "decode_float"),
               lambda ins, a: [minifloat.decode(ins[0], minifloat.get_format(a["format"]))], elementwise_cost(4)))
register(OpDef("encode_float", "elementwise", (1, 1),
               {"format": Attr("str"), "saturate": Attr("bool", True), "round_mode": Attr("str", "up")},
               _minifloat_infer("float32", "uint8", "encode_float"),
               lambda ins, a: [minifloat.encode(ins[0], minifloat.get_format(a["format"]), a["saturate"],
                                                a["round_mode"])], elementwise_cost(8)))


# ---------------------------------------------------------------------------------------------------------------
# Binary ops with broadcasting.

def _binary_infer(name, result_bool=False, logical=False):
    def infer(ins, attrs):
        dtype = same_dtype(name, ins)
        if logical and dtype != "bool":
            raise OpError(f"op {name} needs bool inputs, got {dtype}")
        shape = broadcast_shapes(*(t.shape for t in ins))
        return [TensorType("bool" if result_bool else dtype, shape)]

    return infer


def _int_div(a, b):
    if a.dtype.kind in "iu":
        q = np.abs(a) // np.maximum(np.abs(b), 1)  # truncation toward zero, as in C and ONNX
        return (np.sign(a) * np.sign(b) * q).astype(a.dtype)
    return a / b


def _shift(a, b, fn):
    """Integer shifts as ONNX's BitShift: a shift by a negative amount or by the bit width or more gives 0 (a right
    shift of a negative signed value: -1); a left shift of a signed value wraps."""
    a, b = np.broadcast_arrays(a, b)
    ok = (b >= 0) & (b < 8 * a.dtype.itemsize)
    unsigned = a.view(np.dtype(f"u{a.dtype.itemsize}")) if fn is np.left_shift else a
    out = fn(unsigned, np.where(ok, b, 0).astype(unsigned.dtype)).view(a.dtype)
    fill = np.where(a < 0, -1, 0).astype(a.dtype) if fn is np.right_shift else np.zeros_like(a)
    return np.where(ok, out, fill)


def _pow(a, b):
    if a.dtype.kind == "f" and a.dtype.itemsize < 4:
        return np.power(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype)
    return np.power(a, b)


_BINARY = {
    "add": (np.add, 1, False, False),
    "sub": (np.subtract, 1, False, False),
    "mul": (np.multiply, 1, False, False),
    "div": (_int_div, 1, False, False),
    "pow": (_pow, 4, False, False),
    "maximum": (np.maximum, 1, False, False),
    "minimum": (np.minimum, 1, False, False),
    "equal": (np.equal, 1, True, False),
    "less": (np.less, 1, True, False),
    "less_equal": (np.less_equal, 1, True, False),
    "greater": (np.greater, 1, True, False),
    "greater_equal": (np.greater_equal, 1, True, False),
    "logical_and": (np.logical_and, 1, True, True),
    "logical_or": (np.logical_or, 1, True, True),
    "logical_xor": (np.logical_xor, 1, True, True),
    "bitwise_and": (np.bitwise_and, 1, False, False),  # integers (and bool)
    "bitwise_or": (np.bitwise_or, 1, False, False),
    "bitwise_xor": (np.bitwise_xor, 1, False, False),
    "left_shift": (lambda a, b: _shift(a, b, np.left_shift), 1, False, False),
    "right_shift": (lambda a, b: _shift(a, b, np.right_shift), 1, False, False),
}


def _binary_ref(fn):
    def ref(ins, attrs):
        a, b = ins
        out = np.asarray(fn(a, b))
        if out.dtype != np.bool_ and out.dtype != a.dtype:
            out = out.astype(a.dtype)
        return [out]

    return ref


for _name, (_fn, _flops, _is_bool, _logical) in _BINARY.items():
    register(OpDef(_name, "elementwise", (2, 2), {}, _binary_infer(_name, _is_bool, _logical), _binary_ref(_fn),
                   elementwise_cost(_flops)))


def _infer_where(ins, attrs):
    cond, a, b = ins
    if cond.dtype != "bool":
        raise OpError(f"op where needs a bool condition, got {cond.dtype}")
    dtype = same_dtype("where", [a, b])
    return [TensorType(dtype, broadcast_shapes(cond.shape, a.shape, b.shape))]


register(OpDef("where", "elementwise", (3, 3), {}, _infer_where, lambda ins, a: [np.where(*ins)],
               elementwise_cost(1)))
