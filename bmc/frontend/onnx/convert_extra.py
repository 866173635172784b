"""Converters for ONNX ops that compose exactly from the existing IR ops (no new op-table entries).

Activations (Elu, Selu, Celu, ThresholdedRelu, HardSwish, Softsign, PRelu, Shrink, Mish, Swish), hyperbolic and
tangent functions with closed forms (Sinh, Cosh, Tan, Asinh, Acosh, Atanh), integer and fmod Mod, L1/log-sum
reductions, Lp/instance/group/mean-variance normalization, DepthToSpace/SpaceToDepth, Hardmax, OneHot, EyeLike,
Einsum (no repeated index within one operand), NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss; onnxruntime's
mixture-of-experts layer ``com.microsoft::MoE``.
"""

from __future__ import annotations

from math import prod

import numpy as np

from bmc.frontend.onnx.importer import Context, ConvertError, converter
from bmc.frontend.onnx.loader import to_dtype
from bmc.ir.types import FLOAT_DTYPES, np_dtype


def _s(ctx: Context, x, value) -> np.ndarray:
    """A scalar constant of x's dtype."""
    return np.array(value, dtype=np_dtype(ctx.type(x).dtype))


def _float_input(ctx: Context, x, op: str) -> None:
    if ctx.type(x).dtype not in FLOAT_DTYPES:
        raise ConvertError(f"{op} needs a floating-point input, got {ctx.type(x).dtype}")


def _exp_minus_one(ctx: Context, x):
    return ctx.emit1("sub", [ctx.emit1("exp", [x]), _s(ctx, x, 1)])


def _log1p(ctx: Context, u):
    """log(1 + u) accurate for small u (Goldberg's trick: u * log(w) / (w - 1) with w = 1 + u)."""
    w = ctx.emit1("add", [u, _s(ctx, u, 1)])
    wm1 = ctx.emit1("sub", [w, _s(ctx, u, 1)])
    tiny = ctx.emit1("equal", [wm1, _s(ctx, u, 0)])
    safe = ctx.emit1("where", [tiny, _s(ctx, u, 1), wm1])
    ratio = ctx.emit1("div", [ctx.emit1("mul", [u, ctx.emit1("log", [w])]), safe])
    return ctx.emit1("where", [tiny, u, ratio])


# ---- activations ------------------------------------------------------------------------------------------------

@converter("Elu", "Selu")
def _elu(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, node.op_type)
    default_alpha = 1.0 if node.op_type == "Elu" else 1.67326319217681884765625
    neg = ctx.emit1("mul", [_exp_minus_one(ctx, x), _s(ctx, x, ctx.attr("alpha", default_alpha))])
    y = ctx.emit1("where", [ctx.emit1("greater", [x, _s(ctx, x, 0)]), x, neg])
    if node.op_type == "Selu":
        y = ctx.emit1("mul", [y, _s(ctx, x, ctx.attr("gamma", 1.05070102214813232421875))])
    return [y]


@converter("Celu")
def _celu(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, "Celu")
    alpha = ctx.attr("alpha", 1.0)
    neg = ctx.emit1("mul", [_exp_minus_one(ctx, ctx.emit1("div", [x, _s(ctx, x, alpha)])), _s(ctx, x, alpha)])
    return [ctx.emit1("add", [ctx.emit1("relu", [x]), ctx.emit1("minimum", [neg, _s(ctx, x, 0)])])]


@converter("ThresholdedRelu")
def _thresholded_relu(ctx: Context, node):
    x = ctx.operand(0)
    keep = ctx.emit1("greater", [x, _s(ctx, x, ctx.attr("alpha", 1.0))])
    return [ctx.emit1("where", [keep, x, _s(ctx, x, 0)])]


@converter("HardSwish")
def _hard_swish(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, "HardSwish")
    gate = ctx.emit1("add", [ctx.emit1("mul", [x, _s(ctx, x, 1.0 / 6.0)]), _s(ctx, x, 0.5)])
    return [ctx.emit1("mul", [x, ctx.emit1("clip", [gate], min=0.0, max=1.0)])]


@converter("Softsign")
def _softsign(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, "Softsign")
    return [ctx.emit1("div", [x, ctx.emit1("add", [ctx.emit1("abs", [x]), _s(ctx, x, 1)])])]


@converter("PRelu")
def _prelu(ctx: Context, node):
    x, slope = ctx.operand(0), ctx.operand(1)
    neg = ctx.emit1("mul", [x, slope])
    return [ctx.emit1("where", [ctx.emit1("less", [x, _s(ctx, x, 0)]), neg, x])]


@converter("Shrink")
def _shrink(ctx: Context, node):
    x = ctx.operand(0)
    lambd, bias = ctx.attr("lambd", 0.5), ctx.attr("bias", 0.0)
    dtype = np_dtype(ctx.type(x).dtype)
    if dtype.kind in "iu":
        if bias != int(bias):
            raise ConvertError(f"Shrink on {dtype} needs an integral bias, got {bias}")
        lambd = float(np.floor(lambd))  # x > lambd <=> x > floor(lambd) and x < -lambd <=> x < -floor(lambd)
    low = ctx.emit1("add", [x, _s(ctx, x, bias)]) if dtype.kind != "u" else x
    high = ctx.emit1("sub", [x, _s(ctx, x, bias)])
    zero = _s(ctx, x, 0)
    y = ctx.emit1("where", [ctx.emit1("greater", [x, _s(ctx, x, lambd)]), high, zero])
    if dtype.kind == "u":
        return [y]
    return [ctx.emit1("where", [ctx.emit1("less", [x, _s(ctx, x, -lambd)]), low, y])]


def _softplus_accurate(ctx: Context, x):
    """max(x, 0) + log1p(exp(-|x|)), accurate where softplus(x) is tiny (x very negative)."""
    e = ctx.emit1("exp", [ctx.emit1("neg", [ctx.emit1("abs", [x])])])
    return ctx.emit1("add", [ctx.emit1("relu", [x]), _log1p(ctx, e)])


@converter("Mish")
def _mish(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, "Mish")
    return [ctx.emit1("mul", [x, ctx.emit1("tanh", [_softplus_accurate(ctx, x)])])]


@converter("Swish")
def _swish(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, "Swish")
    alpha = ctx.attr("alpha", 1.0)
    ax = x if alpha == 1.0 else ctx.emit1("mul", [x, _s(ctx, x, alpha)])
    return [ctx.emit1("mul", [x, ctx.emit1("sigmoid", [ax])])]


# ---- closed-form elementary functions ----------------------------------------------------------------------------

@converter("Sinh", "Cosh")
def _sinh_cosh(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, node.op_type)
    ep, em = ctx.emit1("exp", [x]), ctx.emit1("exp", [ctx.emit1("neg", [x])])
    y = ctx.emit1("sub" if node.op_type == "Sinh" else "add", [ep, em])
    return [ctx.emit1("mul", [y, _s(ctx, x, 0.5)])]


@converter("Tan")
def _tan(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, "Tan")
    return [ctx.emit1("div", [ctx.emit1("sin", [x]), ctx.emit1("cos", [x])])]


@converter("Asinh")
def _asinh(ctx: Context, node):
    # asinh(x) = sign(x) * log(|x| + sqrt(x^2 + 1)), symmetric so it stays accurate for negative x
    x = ctx.operand(0)
    _float_input(ctx, x, "Asinh")
    a = ctx.emit1("abs", [x])
    r = ctx.emit1("sqrt", [ctx.emit1("add", [ctx.emit1("mul", [a, a]), _s(ctx, x, 1)])])
    return [ctx.emit1("mul", [ctx.emit1("sign", [x]), ctx.emit1("log", [ctx.emit1("add", [a, r])])])]


@converter("Acosh")
def _acosh(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, "Acosh")
    r = ctx.emit1("sqrt", [ctx.emit1("sub", [ctx.emit1("mul", [x, x]), _s(ctx, x, 1)])])
    return [ctx.emit1("log", [ctx.emit1("add", [x, r])])]


@converter("Atanh")
def _atanh(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, "Atanh")
    q = ctx.emit1("div", [ctx.emit1("add", [_s(ctx, x, 1), x]), ctx.emit1("sub", [_s(ctx, x, 1), x])])
    return [ctx.emit1("mul", [ctx.emit1("log", [q]), _s(ctx, x, 0.5)])]


# ---- Mod --------------------------------------------------------------------------------------------------------

def _trunc(ctx: Context, q):
    neg = ctx.emit1("less", [q, _s(ctx, q, 0)])
    return ctx.emit1("where", [neg, ctx.emit1("ceil", [q]), ctx.emit1("floor", [q])])


@converter("Mod")
def _mod(ctx: Context, node):
    a, b = ctx.operand(0), ctx.operand(1)
    dtype = np_dtype(ctx.type(a).dtype)
    fmod = ctx.attr("fmod", 0)
    if dtype.kind == "f":  # C's fmod: a - trunc(a / b) * b (exact while the quotient fits the mantissa)
        r = ctx.emit1("sub", [a, ctx.emit1("mul", [_trunc(ctx, ctx.emit1("div", [a, b])), b])])
        finite_by_inf = ctx.emit1("logical_and", [ctx.emit1("isinf", [b]),
                                                  ctx.emit1("logical_not", [ctx.emit1("isinf", [a])])])
        r = ctx.emit1("where", [finite_by_inf, a, r])  # fmod(a, ±inf) = a
    elif dtype.kind in "iu":
        # integer division in the IR truncates toward zero (C), so a - (a / b) * b is C's remainder
        r = ctx.emit1("sub", [a, ctx.emit1("mul", [ctx.emit1("div", [a, b]), b])])
    else:
        raise ConvertError(f"Mod does not take {dtype} inputs")
    if fmod or dtype.kind == "u":
        return [r]
    zero = _s(ctx, r, 0)
    differ = ctx.emit1("logical_xor", [ctx.emit1("less", [r, zero]), ctx.emit1("less", [b, zero])])
    fix = ctx.emit1("logical_and", [ctx.emit1("logical_not", [ctx.emit1("equal", [r, zero])]), differ])
    return [ctx.emit1("where", [fix, ctx.emit1("add", [r, b]), r])]


# ---- reductions and normalizations -----------------------------------------------------------------------------

def _reduce_axes(ctx: Context):
    """(axes or None for all, keepdims, noop) for a Reduce* node (axes as an input from opset 18)."""
    axes = ctx.const(1, "axes") if ctx.opset >= 18 else ctx.attr("axes", None)
    keepdims = bool(ctx.attr("keepdims", 1))
    if axes is None or len(np.asarray(axes).reshape(-1)) == 0:
        return None, keepdims, bool(ctx.attr("noop_with_empty_axes", 0))
    return tuple(int(a) for a in np.asarray(axes).reshape(-1)), keepdims, False


@converter("ReduceL1", "ReduceLogSum")
def _reduce_extra(ctx: Context, node):
    x = ctx.operand(0)
    axes, keepdims, noop = _reduce_axes(ctx)
    if node.op_type == "ReduceL1":
        x = ctx.emit1("abs", [x])
        if noop:
            return [x]
        return [ctx.emit1("reduce_sum", [x], axes=axes, keepdims=keepdims)]
    if noop:
        return [ctx.emit1("log", [x])]
    return [ctx.emit1("log", [ctx.emit1("reduce_sum", [x], axes=axes, keepdims=keepdims)])]


@converter("LpNormalization")
def _lp_normalization(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, "LpNormalization")
    p = ctx.attr("p", 2)
    axis = (ctx.attr("axis", -1),)
    if p == 1:
        norm = ctx.emit1("reduce_sum", [ctx.emit1("abs", [x])], axes=axis, keepdims=True)
    elif p == 2:
        norm = ctx.emit1("sqrt", [ctx.emit1("reduce_sum", [ctx.emit1("mul", [x, x])], axes=axis, keepdims=True)])
    else:
        raise ConvertError(f"LpNormalization p={p} is not supported (ONNX allows 1 and 2)")
    zero = ctx.emit1("equal", [norm, _s(ctx, x, 0)])
    safe = ctx.emit1("where", [zero, _s(ctx, x, 1), norm])
    return [ctx.emit1("where", [zero, _s(ctx, x, 0), ctx.emit1("div", [x, safe])])]


def _normalize(ctx: Context, x, axes, epsilon):
    """(x - mean) / sqrt(var + epsilon) over ``axes`` (population variance)."""
    mean = ctx.emit1("reduce_mean", [x], axes=axes, keepdims=True)
    d = ctx.emit1("sub", [x, mean])
    var = ctx.emit1("reduce_mean", [ctx.emit1("mul", [d, d])], axes=axes, keepdims=True)
    return ctx.emit1("div", [d, ctx.emit1("sqrt", [ctx.emit1("add", [var, _s(ctx, x, epsilon)])])])


def _per_channel(ctx: Context, p, rank: int):
    """A [C] parameter reshaped to broadcast over [N, C, spatial...]."""
    c = ctx.type(p).shape[0]
    return ctx.emit1("reshape", [p], shape=(c,) + (1,) * (rank - 2))


@converter("InstanceNormalization")
def _instance_norm(ctx: Context, node):
    x, scale, bias = ctx.operand(0), ctx.operand(1), ctx.operand(2)
    _float_input(ctx, x, "InstanceNormalization")
    rank = len(ctx.type(x).shape)
    if rank < 3:
        raise ConvertError(f"InstanceNormalization needs rank >= 3 (N, C, spatial...), got {ctx.type(x).shape}")
    y = _normalize(ctx, x, tuple(range(2, rank)), ctx.attr("epsilon", 1e-5))
    y = ctx.emit1("mul", [y, _per_channel(ctx, scale, rank)])
    return [ctx.emit1("add", [y, _per_channel(ctx, bias, rank)])]


@converter("GroupNormalization")
def _group_norm(ctx: Context, node):
    x, scale, bias = ctx.operand(0), ctx.operand(1), ctx.operand(2)
    _float_input(ctx, x, "GroupNormalization")
    shape = ctx.type(x).shape
    n, c, rank = shape[0], shape[1], len(shape)
    g = ctx.attr("num_groups")
    if g is None or g <= 0 or c % g:
        raise ConvertError(f"GroupNormalization num_groups={g} does not divide the {c} channels")
    xg = ctx.emit1("reshape", [x], shape=(n, g, prod(shape[1:]) // g))
    y = ctx.emit1("reshape", [_normalize(ctx, xg, (2,), ctx.attr("epsilon", 1e-5))], shape=shape)
    params = []
    for p in (scale, bias):
        if ctx.type(p).shape == (g,) and g != c:  # opset 18: one value per group
            p = ctx.emit1("reshape", [ctx.emit1("broadcast_to", [ctx.emit1("reshape", [p], shape=(g, 1))],
                                                shape=(g, c // g))], shape=(c,))
        params.append(_per_channel(ctx, p, rank))
    return [ctx.emit1("add", [ctx.emit1("mul", [y, params[0]]), params[1]])]


@converter("MeanVarianceNormalization")
def _mvn(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, "MeanVarianceNormalization")
    axes = tuple(ctx.attr("axes", [0, 2, 3]))
    mean = ctx.emit1("reduce_mean", [x], axes=axes, keepdims=True)
    ex2 = ctx.emit1("reduce_mean", [ctx.emit1("mul", [x, x])], axes=axes, keepdims=True)
    std = ctx.emit1("sqrt", [ctx.emit1("sub", [ex2, ctx.emit1("mul", [mean, mean])])])
    return [ctx.emit1("div", [ctx.emit1("sub", [x, mean]), ctx.emit1("add", [std, _s(ctx, x, 1e-9)])])]


# ---- data movement ----------------------------------------------------------------------------------------------

@converter("DepthToSpace")
def _depth_to_space(ctx: Context, node):
    x = ctx.operand(0)
    shape = ctx.type(x).shape
    if len(shape) != 4:
        raise ConvertError(f"DepthToSpace needs a 4-D input, got {shape}")
    n, c, h, w = shape
    bs = ctx.attr("blocksize")
    if c % (bs * bs):
        raise ConvertError(f"DepthToSpace blocksize {bs}: {c} channels are not a multiple of {bs * bs}")
    mode = ctx.text("mode", "DCR")
    if mode == "DCR":
        y = ctx.emit1("reshape", [x], shape=(n, bs, bs, c // (bs * bs), h, w))
        y = ctx.emit1("transpose", [y], perm=(0, 3, 4, 1, 5, 2))
    elif mode == "CRD":
        y = ctx.emit1("reshape", [x], shape=(n, c // (bs * bs), bs, bs, h, w))
        y = ctx.emit1("transpose", [y], perm=(0, 1, 4, 2, 5, 3))
    else:
        raise ConvertError(f"DepthToSpace mode {mode!r} is not supported", fix="use DCR or CRD")
    return [ctx.emit1("reshape", [y], shape=(n, c // (bs * bs), h * bs, w * bs))]


@converter("SpaceToDepth")
def _space_to_depth(ctx: Context, node):
    x = ctx.operand(0)
    shape = ctx.type(x).shape
    if len(shape) != 4:
        raise ConvertError(f"SpaceToDepth needs a 4-D input, got {shape}")
    n, c, h, w = shape
    bs = ctx.attr("blocksize")
    if h % bs or w % bs:
        raise ConvertError(f"SpaceToDepth blocksize {bs} does not divide the spatial dims {h}x{w}")
    mode = ctx.text("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise ConvertError(f"SpaceToDepth mode {mode!r} is not supported", fix="use DCR or CRD")
    y = ctx.emit1("reshape", [x], shape=(n, c, h // bs, bs, w // bs, bs))
    y = ctx.emit1("transpose", [y], perm=(0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4))
    return [ctx.emit1("reshape", [y], shape=(n, c * bs * bs, h // bs, w // bs))]


# ---- one-hot style ----------------------------------------------------------------------------------------------

def _iota(n: int, axis: int, rank: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64).reshape(tuple(n if i == axis else 1 for i in range(rank)))


@converter("Hardmax")
def _hardmax(ctx: Context, node):
    x = ctx.operand(0)
    shape = ctx.type(x).shape
    rank = len(shape)
    if ctx.opset >= 13:
        axis = ctx.attr("axis", -1) % rank
        flat, flat_shape = x, shape
    else:  # before opset 13: coerce to 2-D at axis
        a = ctx.attr("axis", 1) % rank
        flat_shape = (prod(shape[:a]), prod(shape[a:]))
        flat, axis = ctx.emit1("reshape", [x], shape=flat_shape), 1
    idx = ctx.emit1("argmax", [flat], axis=axis, keepdims=True)
    hit = ctx.emit1("equal", [idx, _iota(flat_shape[axis], axis, len(flat_shape))])
    y = ctx.emit1("where", [hit, _s(ctx, x, 1), _s(ctx, x, 0)])
    return [y if flat is x else ctx.emit1("reshape", [y], shape=shape)]


@converter("OneHot")
def _one_hot(ctx: Context, node):
    indices, values = ctx.operand(0), ctx.operand(2)
    depth = int(np.asarray(ctx.const(1, "depth")).reshape(-1)[0])
    shape = ctx.type(indices).shape
    rank = len(shape) + 1
    axis = ctx.attr("axis", -1)
    if not -rank <= axis < rank:
        raise ConvertError(f"OneHot axis {axis} is out of range for output rank {rank}")
    axis %= rank
    if ctx.type(indices).dtype != "int64":
        indices = ctx.emit1("cast", [indices], dtype="int64")
    indices = ctx.emit1("where", [ctx.emit1("less", [indices, np.array(0, np.int64)]),
                                  ctx.emit1("add", [indices, np.array(depth, np.int64)]), indices])
    idx = ctx.emit1("reshape", [indices], shape=shape[:axis] + (1,) + shape[axis:])
    hit = ctx.emit1("equal", [idx, _iota(depth, axis, rank)])
    off = ctx.emit1("reshape", [ctx.emit1("slice", [values], starts=(0,), ends=(1,), axes=(0,), steps=(1,))], shape=())
    on = ctx.emit1("reshape", [ctx.emit1("slice", [values], starts=(1,), ends=(2,), axes=(0,), steps=(1,))], shape=())
    return [ctx.emit1("where", [hit, on, off])]


@converter("EyeLike")
def _eye_like(ctx: Context, node):
    x = ctx.operand(0)
    shape = ctx.type(x).shape
    if len(shape) != 2:
        raise ConvertError(f"EyeLike needs a 2-D input, got {shape}")
    code = ctx.attr("dtype", None)
    dtype = ctx.type(x).dtype if code is None else to_dtype(code, f"EyeLike node {node.name!r}", "EyeLike")
    return [np.eye(shape[0], shape[1], k=ctx.attr("k", 0), dtype=np_dtype(dtype))]


# ---- Einsum -----------------------------------------------------------------------------------------------------

def _einsum_terms(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Explicit index letters per operand and for the output, with '...' expanded to upper-case letters."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise ConvertError(f"Einsum equation {equation!r} names {len(terms)} operands, the node has {len(ranks)}")
    n_ell = max((r - (len(t) - 3) for t, r in zip(terms, ranks) if "..." in t), default=0)
    ell = "".join(chr(ord("A") + i) for i in range(n_ell))
    out_terms = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            k = r - (len(t) - 3)
            t = t.replace("...", ell[n_ell - k:])
        if len(t) != r:
            raise ConvertError(f"Einsum term {t!r} does not match an operand of rank {r}")
        out_terms.append(t)
    if arrow:
        out = rhs.replace("...", ell)
    else:
        counts = {c: "".join(out_terms).count(c) for c in set("".join(out_terms))}
        out = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c.islower()))
    return out_terms, out


@converter("Einsum")
def _einsum(ctx: Context, node):
    ops = [ctx.operand(i) for i in range(len(node.input)) if ctx.has(i)]
    eq = ctx.text("equation", "")
    shapes = [ctx.type(x).shape for x in ops]
    terms, out = _einsum_terms(eq, [len(s) for s in shapes])
    if any(len(set(t)) != len(t) for t in terms) or len(set(out)) != len(out):
        raise ConvertError(f"Einsum equation {eq!r} repeats an index within one term (diagonals are not supported)")
    sizes: dict[str, int] = {}
    for t, s in zip(terms, shapes):
        for c, d in zip(t, s):
            if sizes.get(c, 1) != 1 and d != 1 and sizes[c] != d:
                raise ConvertError(f"Einsum index {c!r} has sizes {sizes[c]} and {d}")
            sizes[c] = max(sizes.get(c, 1), d)
    missing = [c for c in out if c not in sizes]
    if missing:
        raise ConvertError(f"Einsum output indices {missing} appear in no operand")
    if len(ops) == 2:
        product = _einsum_matmul(ctx, ops, terms, out, sizes)
        if product is not None:
            return [product]
    order = out + "".join(sorted(c for c in sizes if c not in out))
    acc = None
    for x, t in zip(ops, terms):
        present = sorted(t, key=order.index)
        if present != list(t):
            x = ctx.emit1("transpose", [x], perm=tuple(t.index(c) for c in present))
        sub = tuple(ctx.type(x).shape[present.index(c)] if c in t else 1 for c in order)
        if sub != ctx.type(x).shape:
            x = ctx.emit1("reshape", [x], shape=sub)
        acc = x if acc is None else ctx.emit1("mul", [acc, x])
    contracted = tuple(range(len(out), len(order)))
    if contracted:
        acc = ctx.emit1("reduce_sum", [acc], axes=contracted, keepdims=False)
    want = tuple(sizes[c] for c in out)
    if ctx.type(acc).shape != want:
        acc = ctx.emit1("broadcast_to", [acc], shape=want)
    return [acc]


def _einsum_matmul(ctx: Context, ops, terms: list[str], out: str, sizes: dict[str, int]):
    """A two-operand contraction as one (batched) matmul: ``a [batch, m, k] @ b [batch, k, n]``, the indices of
    each group flattened (the batch ones kept apart, so size-1 dims broadcast), then reshaped and transposed to
    ``out`` (CvT's ``bhlk,bhtk->bhlt``: the attention scores, which then fuse as attention); an index of one operand
    alone that is not in the output is summed over first. None when nothing is contracted or a contracted index
    has two sizes (the general path: products and a sum)."""
    (ta, tb), (a, b) = terms, ops
    k = [c for c in ta if c in tb and c not in out]
    shape_a, shape_b = ctx.type(a).shape, ctx.type(b).shape
    if not k or any(shape_a[ta.index(c)] != shape_b[tb.index(c)] for c in k):
        return None
    terms, ops = [ta, tb], [a, b]
    for i in range(2):
        t, other = terms[i], terms[1 - i]
        alone = tuple(j for j, c in enumerate(t) if c not in other and c not in out)
        if alone:
            ops[i] = ctx.emit1("reduce_sum", [ops[i]], axes=alone, keepdims=False)
            terms[i] = "".join(c for j, c in enumerate(t) if j not in alone)
    (ta, tb), (a, b) = terms, ops
    batch = [c for c in out if c in ta and c in tb]
    m = [c for c in out if c in ta and c not in tb]
    n = [c for c in out if c in tb and c not in ta]

    def arranged(x, t, groups):
        """``x`` (indices ``t``) transposed to the order of ``groups`` and reshaped to [batch..., each group]."""
        want = [c for g in groups for c in g]
        if want != list(t):
            x = ctx.emit1("transpose", [x], perm=tuple(t.index(c) for c in want))
        shape = ctx.type(x).shape
        lead = shape[:len(groups[0])]
        flat = lead + tuple(int(np.prod([shape[want.index(c)] for c in g], dtype=np.int64)) for g in groups[1:])
        return x if flat == shape else ctx.emit1("reshape", [x], shape=flat)

    y = ctx.emit1("matmul", [arranged(a, ta, [batch, m, k]), arranged(b, tb, [batch, k, n])])
    lead = ctx.type(y).shape[:len(batch)]
    full = lead + tuple(sizes[c] for c in m + n)
    if ctx.type(y).shape != full:
        y = ctx.emit1("reshape", [y], shape=full)
    got = batch + m + n
    if got != list(out):
        y = ctx.emit1("transpose", [y], perm=tuple(got.index(c) for c in out))
    want = tuple(sizes[c] for c in out)
    return y if ctx.type(y).shape == want else ctx.emit1("broadcast_to", [y], shape=want)


# ---- losses -----------------------------------------------------------------------------------------------------

def _nll(ctx: Context, logp, target, weight, reduction: str, ignore_index):
    """NegativeLogLikelihoodLoss on log-probabilities [N, C, d...] and class targets [N, d...]."""
    tshape = ctx.type(target).shape
    if ctx.type(target).dtype not in ("int64", "int32"):
        raise ConvertError(f"the loss target must be int32/int64, got {ctx.type(target).dtype}")
    mask = None
    if ignore_index is not None:
        mask = ctx.emit1("equal", [target, _s(ctx, target, ignore_index)])
        target = ctx.emit1("where", [mask, _s(ctx, target, 0), target])
    idx = ctx.emit1("reshape", [target], shape=tshape[:1] + (1,) + tshape[1:])
    picked = ctx.emit1("reshape", [ctx.emit1("gather_elements", [logp, idx], axis=1)], shape=tshape)
    loss = ctx.emit1("neg", [picked])
    w = None
    if weight is not None:
        w = ctx.emit1("gather", [weight, target], axis=0)
    if mask is not None:
        w = ctx.emit1("where", [mask, _s(ctx, logp, 0), _s(ctx, logp, 1) if w is None else w])
    if w is not None:
        loss = ctx.emit1("mul", [loss, w])
    if reduction == "none":
        return loss
    total = ctx.emit1("reduce_sum", [loss], axes=None, keepdims=False)
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ConvertError(f"loss reduction {reduction!r} is not one of none, sum, mean")
    if w is None:
        return ctx.emit1("reduce_mean", [loss], axes=None, keepdims=False)
    return ctx.emit1("div", [total, ctx.emit1("reduce_sum", [w], axes=None, keepdims=False)])


@converter("NegativeLogLikelihoodLoss")
def _nll_loss(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, node.op_type)
    return [_nll(ctx, x, ctx.operand(1), ctx.optional(2), ctx.text("reduction", "mean"),
                 ctx.attr("ignore_index", None))]


@converter("SoftmaxCrossEntropyLoss")
def _softmax_cross_entropy(ctx: Context, node):
    x = ctx.operand(0)
    _float_input(ctx, x, node.op_type)
    logp = ctx.emit1("log_softmax", [x], axis=1)
    loss = _nll(ctx, logp, ctx.operand(1), ctx.optional(2), ctx.text("reduction", "mean"),
                ctx.attr("ignore_index", None))
    return [loss, logp]


@converter("com.microsoft::MoE")
def _moe(ctx: Context, node):
    """onnxruntime's mixture-of-experts layer (what onnxruntime-genai's model builder writes for Mixtral-like
    models): each token's top ``k`` experts by the softmax of its router logits (their probabilities renormalized
    over the k with ``normalize_routing_weights``), each expert ``fc2(act(fc1 x + b1)) + b2`` with weights stored
    ``[E, out, in]``, weighted and summed. ``activation_type`` relu, gelu (its tanh approximation, as onnxruntime
    computes it), silu, identity, or swiglu: fc1's rows interleaved gate, linear (``swiglu_fusion=1``), ``gate *
    sigmoid(alpha * gate) * (linear + beta)``, ``swiglu_limit`` clamping the gate from above and the linear part
    both ways. The expert products are ``gather_matmul``s: the weights read where they lie, one GEMM per expert,
    split by experts for expert parallelism."""
    x, logits, w1, w2 = ctx.operand(0), ctx.operand(1), ctx.operand(2), ctx.operand(4)
    if ctx.has(6) or ctx.has(7):
        raise ConvertError("MoE with fc3 weights is not supported",
                           fix="fuse the gate into fc1 (activation_type swiglu, swiglu_fusion=1), as onnxruntime's "
                               "CPU kernel requires too")
    if ctx.attr("use_sparse_mixer", 0):
        raise ConvertError("MoE with use_sparse_mixer=1 is not supported", fix="route by the softmax's top k")
    act, k = ctx.text("activation_type", "relu"), ctx.attr("k", 1)
    xt, lt, w1t, w2t = (ctx.type(v) for v in (x, logits, w1, w2))
    _float_input(ctx, x, "MoE")
    hidden, tokens = xt.shape[-1], prod(xt.shape[:-1])
    experts, inner = w2t.shape[0], w2t.shape[-1]
    width = 2 * inner if act == "swiglu" else inner
    expected = {"router_probs": (lt, (tokens, experts)), "fc1_experts_weights": (w1t, (experts, width, hidden)),
                "fc2_experts_weights": (w2t, (experts, hidden, inner))}
    for name, (t, shape) in expected.items():
        if t.shape != shape or t.dtype != xt.dtype:
            raise ConvertError(f"MoE input {name} is {t}, expected {xt.dtype}{list(shape)} (input {xt}, "
                               f"{experts} experts of {inner} {act} units)")
    if act == "swiglu" and ctx.attr("swiglu_fusion", 0) != 1:
        raise ConvertError("MoE swiglu with swiglu_fusion != 1 is not supported",
                           fix="interleave the gate and linear rows of fc1 (swiglu_fusion=1)")
    if act not in ("relu", "gelu", "silu", "identity", "swiglu"):
        raise ConvertError(f"MoE activation_type {act!r} is not supported",
                           fix="bmc takes relu, gelu, silu, identity and swiglu")
    if not 1 <= k <= experts:
        raise ConvertError(f"MoE k={k} is not between 1 and the {experts} experts")
    rows = tokens * k
    x2 = ctx.emit1("reshape", [x], shape=(tokens, hidden))
    top, idx = ctx.emit("topk", [ctx.emit1("softmax", [logits], axis=-1)], k=k)
    if ctx.attr("normalize_routing_weights", 0):
        top = ctx.emit1("div", [top, ctx.emit1("reduce_sum", [top], axes=(-1,), keepdims=True)])
    ids = ctx.emit1("reshape", [idx], shape=(rows,))
    each = ctx.emit1("broadcast_to", [ctx.emit1("reshape", [x2], shape=(tokens, 1, hidden))],
                     shape=(tokens, k, hidden))

    def layer(a, w, bias):
        y = ctx.emit1("gather_matmul", [a, w, ids], transpose_w=True)
        return y if bias is None else ctx.emit1("add", [y, ctx.emit1("gather", [bias, ids], axis=0)])

    h = layer(ctx.emit1("reshape", [each], shape=(rows, hidden)), w1, ctx.optional(3))
    if act == "relu":
        h = ctx.emit1("relu", [h])
    elif act == "gelu":
        h = ctx.emit1("gelu", [h], approximate="tanh")
    elif act == "silu":
        h = ctx.emit1("mul", [h, ctx.emit1("sigmoid", [h])])
    elif act == "swiglu":
        gate, linear = (ctx.emit1("slice", [h], starts=(s,), ends=(width,), axes=(1,), steps=(2,)) for s in (0, 1))
        limit = ctx.attr("swiglu_limit")
        if limit is not None:
            gate = ctx.emit1("minimum", [gate, _s(ctx, gate, limit)])
            linear = ctx.emit1("clip", [linear], min=-limit, max=limit)
        alpha, beta = ctx.attr("activation_alpha", 1.0), ctx.attr("activation_beta", 0.0)
        scaled = gate if alpha == 1.0 else ctx.emit1("mul", [gate, _s(ctx, gate, alpha)])
        linear = linear if beta == 0.0 else ctx.emit1("add", [linear, _s(ctx, linear, beta)])
        h = ctx.emit1("mul", [ctx.emit1("mul", [gate, ctx.emit1("sigmoid", [scaled])]), linear])
    y = layer(h, w2, ctx.optional(5))
    y = ctx.emit1("mul", [y, ctx.emit1("reshape", [top], shape=(rows, 1))])
    y = ctx.emit1("reduce_sum", [ctx.emit1("reshape", [y], shape=(tokens, k, hidden))], axes=(1,), keepdims=False)
    return [ctx.emit1("reshape", [y], shape=xt.shape)]
