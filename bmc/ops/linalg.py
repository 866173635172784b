"""Linear algebra: matmul with numpy semantics (batched, broadcast batch dims, 1-D operands promoted);
matmul_nbits, a matmul by a block-quantized 4-bit weight; matmul_integer, the exact int32 product of 8-bit
operands (the weight transposed, ``[N, K]``, as both quantized matmuls store it); attention, the fused
``softmax(scale * q @ kt + bias) @ v`` (and, with ``lse``, each row's log-sum-exp of the scores, with which the
results of attention over disjoint key blocks combine: context parallelism, ``bmc.sharding.factors``);
gather_matmul, each row times the weight its index picks (a mixture of experts' expert layers)."""

from __future__ import annotations

import numpy as np

from bmc.ir.types import FLOAT_DTYPES, TensorType
from bmc.ops.registry import OPS, Attr, Cost, OpDef, OpError, broadcast_shapes, bytes_moved, register, same_dtype
from bmc.ops.shape import unpack_nibbles


def matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if not a or not b:
        raise OpError("matmul operands must have rank >= 1")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise OpError(f"matmul contraction dims differ: {a} @ {b} ({a2[-1]} vs {b2[-2]})")
    batch = broadcast_shapes(a2[:-2], b2[:-2])
    out = batch + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _infer_matmul(ins, attrs):
    a, b = ins
    return [TensorType(same_dtype("matmul", ins), matmul_shape(a.shape, b.shape))]


def _matmul(ins, attrs):
    a, b = ins
    if a.dtype.itemsize < 4 and a.dtype.kind in "fV":  # float16/bfloat16: accumulate in float32
        return [np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype)]
    return [np.matmul(a, b)]


def _matmul_cost(ins, outs, attrs):
    k = ins[0].shape[-1]
    return Cost(2 * k * outs[0].numel, bytes_moved(ins, outs))


register(OpDef("matmul", "linalg", (2, 2), {}, _infer_matmul, _matmul, _matmul_cost,
               doc="numpy.matmul: [..., m, k] @ [..., k, n] -> [..., m, n]"))


def _infer_matmul_nbits(ins, attrs):
    a, codes, scales = ins[:3]
    if codes.dtype != "uint8" or codes.rank != 3 or a.rank < 1:
        raise OpError(f"matmul_nbits takes A[..., K] and uint8 codes [N, blocks, block/2], got {a} and {codes}")
    n, blocks, half = codes.shape
    if a.shape[-1] != blocks * 2 * half:
        raise OpError(f"matmul_nbits: A's last dim {a.shape[-1]} is not blocks * block = {blocks * 2 * half}")
    for t, what in zip(ins[2:], ("scales", "zero points")):
        if t.shape != (n, blocks) or t.dtype != a.dtype:
            raise OpError(f"matmul_nbits: {what} must be {a.dtype}[{n},{blocks}], got {t}")
    return [TensorType(a.dtype, a.shape[:-1] + (n,))]


def dequantize_nbits(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None) -> np.ndarray:
    """The float32 ``[N, K]`` weight of 4-bit ``codes`` ``[N, blocks, block/2]`` (low nibble first)."""
    n, blocks, half = codes.shape
    q = unpack_nibbles(codes).astype(np.float32)
    zp = np.float32(8) if zero_points is None else zero_points.astype(np.float32)[..., None]
    return ((q - zp) * scales.astype(np.float32)[..., None]).reshape(n, blocks * 2 * half)


def _matmul_nbits(ins, attrs):
    a, codes, scales = ins[:3]
    w = dequantize_nbits(codes, scales, ins[3] if len(ins) > 3 else None)
    return [np.matmul(a.astype(np.float32), w.T).astype(a.dtype)]


register(OpDef("matmul_nbits", "linalg", (3, 4), {}, _infer_matmul_nbits, _matmul_nbits, _matmul_cost,
               doc="A[..., K] @ W.T with W[N, K] 4-bit codes[N, blocks, block/2] (two a byte, low nibble first) "
                   "dequantized per block as (code - zero_point) * scale; zero point 8 when not given"))


INT8 = ("uint8", "int8")


def _infer_matmul_float8(ins, attrs):
    a, codes, scale = ins
    from bmc.ops.minifloat import get_format

    get_format(attrs["format"])
    if (a.dtype != "float32" or codes.dtype != "uint8" or codes.rank != 2 or a.rank < 1
            or a.shape[-1] != codes.shape[1] or scale.dtype != "float32" or scale.numel not in (1, codes.shape[0])
            or scale.rank > 1):
        raise OpError(f"matmul_float8 takes float32 A[..., K], uint8 codes [N, K] and a float32 scale (1 or N "
                      f"values), got {a}, {codes} and {scale}")
    return [TensorType("float32", a.shape[:-1] + (codes.shape[0],))]


def _matmul_float8(ins, attrs):
    from bmc.ops.minifloat import decode, get_format

    a, codes, scale = ins
    w = decode(codes, get_format(attrs["format"])) * scale.reshape(-1, 1)
    return [np.matmul(a, w.T).astype(np.float32)]


register(OpDef("matmul_float8", "linalg", (3, 3), {"format": Attr("str")}, _infer_matmul_float8, _matmul_float8,
               _matmul_cost,
               doc="A[..., K] @ (decode(codes) * scale).T with float8 codes [N, K] (bmc.ops.minifloat) and a scale "
                   "per row of the codes (or one): a weight-only float8 matmul, the weight read a byte a value"))


def _per_row(zp: np.ndarray) -> np.ndarray:
    """A zero point as int64, one per row when it has several values, so it broadcasts against ``[rows, K]``."""
    zp = zp.astype(np.int64)
    return zp.reshape(-1, 1) if zp.size > 1 else zp.reshape(())


def _infer_matmul_integer(ins, attrs):
    a, bt, za, zb = ins
    if a.dtype not in INT8 or bt.dtype not in INT8 or bt.rank != 2 or a.rank < 1 or a.shape[-1] != bt.shape[1]:
        raise OpError(f"matmul_integer takes 8-bit A[..., K] and Bt[N, K], got {a} and {bt}")
    m = a.shape[-2] if a.rank >= 2 else 1
    for zp, t, rows, what in ((za, a, m, "A's zero point"), (zb, bt, bt.shape[0], "B's zero point")):
        if zp.dtype != t.dtype or zp.rank > 1 or zp.numel not in (1, rows):
            raise OpError(f"matmul_integer: {what} must be {t.dtype} with 1 or {rows} values, got {zp}")
    return [TensorType("int32", a.shape[:-1] + (bt.shape[0],))]


def _matmul_integer(ins, attrs):
    a, bt, za, zb = ins
    return [np.matmul(a.astype(np.int64) - _per_row(za), (bt.astype(np.int64) - _per_row(zb)).T).astype(np.int32)]


register(OpDef("matmul_integer", "linalg", (4, 4), {}, _infer_matmul_integer, _matmul_integer, _matmul_cost,
               doc="exact int32 (A - a_zero_point) @ (Bt - b_zero_point).T of 8-bit A[..., M, K] and Bt[N, K]; "
                   "a zero point is one value, or one per row of A's last M (of Bt's N); sums wrap modulo 2^32"))


def key_dims(k: tuple[int, ...], attrs) -> tuple[int, ...]:
    """The key operand's shape as kt ``[..., D, N]`` (it is stored ``[..., N, D]`` with ``transpose_k``)."""
    return k[:-2] + (k[-1], k[-2]) if attrs["transpose_k"] else k


def _infer_attention(ins, attrs):
    q, k, v = ins[:3]
    kt = key_dims(k.shape, attrs) if k.rank >= 2 else k.shape
    ok = (q.rank >= 2 and k.rank == q.rank and v.rank == q.rank and q.dtype in FLOAT_DTYPES
          and k.dtype == q.dtype and v.dtype == q.dtype and q.shape[-1] == kt[-2] and kt[-1] == v.shape[-2]
          and all(b == a or (b > 0 and a % b == 0) for a, b in zip(q.shape[:-2] * 2, kt[:-2] + v.shape[:-2])))
    if not ok:
        raise OpError(f"attention takes float q [..., M, D], kt [..., D, N] (k [..., N, D] with transpose_k) and "
                      f"v [..., N, E] whose batch dims divide q's (q's, a group's or 1), got {q}, {k} and {v}")
    scores = q.shape[:-1] + (kt[-1],)
    if len(ins) > 3 + attrs["sink"]:
        bias = ins[3]
        if bias.dtype != q.dtype or bias.rank > len(scores) or broadcast_shapes(bias.shape, scores) != scores:
            raise OpError(f"attention: the bias must be {q.dtype} and broadcast to the scores {list(scores)}, "
                          f"got {bias}")
    if len(ins) > 4 + attrs["sink"]:
        raise OpError(f"attention takes q, k, v, an optional bias{' and the sink' if attrs['sink'] else ''}: "
                      f"{len(ins)} operands given")
    if attrs["sink"]:
        sink, rows = ins[-1], q.shape[:-1] + (1,)
        if len(ins) == 3 or attrs["lse"] or sink.dtype != q.dtype or sink.rank > len(rows) \
                or broadcast_shapes(sink.shape, rows) != rows:
            raise OpError(f"attention: the sink operand (last, with sink) must be {q.dtype} and broadcast to the "
                          f"rows {list(rows)}, and lse cannot be asked with it, got {sink}")
    elif attrs["sink_shift"]:
        raise OpError("attention: sink_shift needs sink")
    out = TensorType(q.dtype, q.shape[:-1] + (v.shape[-1],))
    return [out, TensorType("float32", q.shape[:-1])] if attrs["lse"] else [out]


def _attention(ins, attrs):
    """The composition the op replaces, op by op (the same references, so fusing changes no reference result);
    the log-sum-exp in float64, rounded to float32."""
    def run(op, args, **kw):
        return OPS[op].reference(args, OPS[op].check_attrs(kw))[0]

    q, k, v = (grouped(x, ins[0].shape[:-2]) for x in ins[:3])
    s = run("matmul", [q, np.swapaxes(k, -1, -2) if attrs["transpose_k"] else k])
    if attrs["scale"] != 1.0:
        s = run("mul", [s, np.asarray(attrs["scale"], s.dtype)])
    if attrs.get("softcap"):  # (attrs as check_attrs fills them; direct callers may leave it out)
        cap = np.asarray(attrs["softcap"], s.dtype)
        s = run("mul", [run("tanh", [run("div", [s, cap])]), cap])
    if len(ins) > 3 + attrs.get("sink", False):
        s = run("add", [s, ins[3]])
    if attrs.get("sink"):  # the sink's logit is one more column of the softmax, left out of the product
        s = run("concat", [s, np.broadcast_to(ins[-1], s.shape[:-1] + (1,))], axis=-1)
        if attrs.get("sink_shift"):
            s = run("sub", [s, run("reduce_max", [s], axes=(-1,), keepdims=True)])
        return [run("matmul", [run("softmax", [s], axis=-1)[..., :-1], v])]
    out = run("matmul", [run("softmax", [s], axis=-1), v])
    return [out, log_sum_exp(s)] if attrs["lse"] else [out]


def grouped(x: np.ndarray, batch: tuple[int, ...]) -> np.ndarray:
    """A key or value with grouped batch dims (a divisor of q's, not 1) repeated to q's: index ``i`` of q's dim
    reads index ``i // (q's size / x's size)`` (``repeat_interleave``, how grouped-query models share a key/value
    head among consecutive query heads); dims of 1 are left to broadcast."""
    for axis, (a, b) in enumerate(zip(batch, x.shape[:-2])):
        if b not in (1, a):
            x = np.repeat(x, a // b, axis=axis)
    return x


def log_sum_exp(s: np.ndarray) -> np.ndarray:
    """float32 ``log(sum(exp(s), axis=-1))``, computed in float64 about the row's max (a row of -inf: -inf)."""
    s = s.astype(np.float64)
    m = s.max(axis=-1, keepdims=True)
    shift = np.where(np.isinf(m), 0.0, m)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(s - shift).sum(axis=-1)) + shift[..., 0]).astype(np.float32)


def _attention_cost(ins, outs, attrs):
    q, k, v = ins[:3]
    scores = q.numel // q.shape[-1] * key_dims(k.shape, attrs)[-1]
    return Cost(2 * scores * (q.shape[-1] + v.shape[-1]) + (7 + 3 * bool(attrs.get("softcap"))) * scores,
                bytes_moved(ins, outs))


register(OpDef("attention", "linalg", (3, 5),
               {"scale": Attr("float", 1.0), "transpose_k": Attr("bool", False), "lse": Attr("bool", False),
                "softcap": Attr("float", 0.0), "sink": Attr("bool", False), "sink_shift": Attr("bool", False)},
               _infer_attention, _attention, _attention_cost,
               doc="softmax(scale * q @ kt + bias, axis=-1) @ v of q [..., M, D], kt [..., D, N] (or k [..., N, D] "
                   "with transpose_k), v [..., N, E] (k's and v's batch dims divide q's: 1 is multi-query, another "
                   "divisor grouped-query attention, query head i reading key/value head i // group) and an optional "
                   "bias broadcasting to the scores [..., M, N]; made by fusing that composition (bmc.ops.fusion), "
                   "computed without the [M, N] scores where a kernel exists; with lse a second result, float32 "
                   "[..., M]: the log-sum-exp of each row of the scores (-inf for a row of -inf); a nonzero softcap "
                   "c caps the scaled scores before the bias, c * tanh(s / c) (Gemma 2's attention logit "
                   "soft-capping); with sink a last operand broadcasting to the rows [..., M, 1] is one more logit "
                   "of each row's softmax whose probability multiplies nothing (GPT-OSS's attention sinks: "
                   "softmax(concat(s, sink))[..., :N] @ v; sink_shift: the concatenated row less its max first, as "
                   "GPT-OSS writes it, which changes only the reference's rounding)"))


def _infer_gather_matmul(ins, attrs):
    x, w, idx = ins
    ok = (x.rank == 2 and w.rank == 3 and idx.rank == 1 and idx.shape[0] == x.shape[0] and x.dtype == w.dtype
          and x.dtype in FLOAT_DTYPES and idx.dtype in ("int32", "int64")
          and x.shape[1] == w.shape[2 if attrs["transpose_w"] else 1])
    if not ok:
        raise OpError(f"gather_matmul takes float x [S, K], w [E, K, N] (or [E, N, K] with transpose_w) of x's dtype "
                      f"and int32/int64 indices [S], got {x}, {w} and {idx}")
    return [TensorType(x.dtype, (x.shape[0], w.shape[1 if attrs["transpose_w"] else 2]))]


def _gather_matmul(ins, attrs):
    """The composition the op replaces, matmul by the gathered weights (so fusing changes no reference result), 64
    rows at a time; a row whose index lies outside [0, E) is zero."""
    x, w, idx = ins
    valid = (idx >= 0) & (idx < w.shape[0])
    picked = np.where(valid, idx, 0)
    out = np.zeros((x.shape[0], w.shape[1 if attrs["transpose_w"] else 2]), x.dtype)
    for r in range(0, x.shape[0], 64):
        g, xr = w[picked[r:r + 64]], x[r:r + 64]
        pair = [g, xr[:, :, None]] if attrs["transpose_w"] else [xr[:, None, :], g]
        out[r:r + 64] = _matmul(pair, {})[0].reshape(len(xr), -1)
    return [np.where(valid[:, None], out, np.zeros((), x.dtype))]


def _gather_matmul_cost(ins, outs, attrs):
    x, w, idx = ins
    experts = min(w.shape[0], x.shape[0])  # the weights of at most one expert a row are read
    return Cost(2 * x.shape[1] * outs[0].numel,
                x.nbytes + idx.nbytes + outs[0].nbytes + w.nbytes * experts // w.shape[0])


register(OpDef("gather_matmul", "linalg", (3, 3), {"transpose_w": Attr("bool", False)}, _infer_gather_matmul,
               _gather_matmul, _gather_matmul_cost,
               doc="row s of x [S, K] times the weight its index picks, x[s] @ w[idx[s]] of w [E, K, N] (w[idx[s]].T "
                   "of w [E, N, K] with transpose_w); a row whose index lies outside [0, E) is zero: a mixture of "
                   "experts' expert layers without the gathered [S, K, N] weights (bmc.ops.fusion)"))
