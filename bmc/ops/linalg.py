"""Linear algebra: matmul with numpy semantics (batched, broadcast batch dims, 1-D operands promoted)."""

from __future__ import annotations

import numpy as np

from bmc.ir.types import TensorType
from bmc.ops.registry import Cost, OpDef, OpError, broadcast_shapes, bytes_moved, register, same_dtype


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
