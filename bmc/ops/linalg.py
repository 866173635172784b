"""Linear algebra: matmul with numpy semantics (batched, broadcast batch dims, 1-D operands promoted), and
matmul_nbits, a matmul by a block-quantized 4-bit weight."""

from __future__ import annotations

import numpy as np

from bmc.ir.types import TensorType
from bmc.ops.registry import Cost, OpDef, OpError, broadcast_shapes, bytes_moved, register, same_dtype
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


def _matmul_nbits_cost(ins, outs, attrs):
    return Cost(2 * ins[0].shape[-1] * outs[0].numel, bytes_moved(ins, outs))


register(OpDef("matmul_nbits", "linalg", (3, 4), {}, _infer_matmul_nbits, _matmul_nbits, _matmul_nbits_cost,
               doc="A[..., K] @ W.T with W[N, K] 4-bit codes[N, blocks, block/2] (two a byte, low nibble first) "
                   "dequantized per block as (code - zero_point) * scale; zero point 8 when not given"))
