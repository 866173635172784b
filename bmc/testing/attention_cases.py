"""Shapes and a numpy oracle for the fused CUDA attention kernel (``cpp/cuda_attention.cuh``), shared by its CPU
emulator tests (``tests/codegen/test_cuda_attention.py``) and the GPU check (``scripts/gpu_check.py``), which
calls the real kernel on the same cases.

The reference is the composition in float32 from the 16-bit inputs, P rounded to their type before ``@ v`` (as
the composition rounds it). Tolerances (max |out - ref| / max |ref|): bfloat16 8e-3, float16 2e-3, a few units of
the output's last place (2^-8 and 2^-11 relative).
"""

from __future__ import annotations

import numpy as np

TOL = {"bf16": 8e-3, "f16": 2e-3}

#: name → (dtype, q shape, k shape, v shape, bias shape or None, transpose_k, scale): rows and keys that are not
#: multiples of the tiles (64), fewer keys than a tile, broadcast k/v (multi-query), grouped k/v (grouped-query:
#: query head i reads key/value head i // group) and biases, kt or k, every head dim (16 to 128) and both 16-bit types
CASES = {
    "one-partial-tile": ("bf16", (1, 7, 64), (1, 5, 64), (1, 5, 64), None, True, 0.125),
    "rows-and-keys-ragged": ("bf16", (1, 70, 64), (1, 130, 64), (1, 130, 64), (70, 130), True, 0.125),
    "kt-multi-query-mask": ("bf16", (2, 3, 70, 64), (2, 1, 64, 130), (2, 1, 130, 64), (1, 1, 70, 130), False, 0.125),
    "d128-padding-mask": ("bf16", (2, 2, 64, 128), (2, 2, 128, 128), (2, 2, 128, 128), (2, 1, 1, 128), True, 0.088),
    "f16-d128-ragged": ("f16", (1, 2, 33, 128), (1, 2, 40, 128), (1, 2, 40, 128), (1, 2, 1, 40), True, 0.088),
    "f16-kt-no-bias": ("f16", (3, 65, 64), (3, 64, 66), (3, 66, 64), None, False, 1.0),
    "d16-vit-rows": ("bf16", (2, 2, 17, 16), (2, 2, 17, 16), (2, 2, 17, 16), None, True, 0.25),
    "d32-f16-mask": ("f16", (1, 3, 80, 32), (1, 3, 80, 32), (1, 3, 80, 32), (1, 1, 80, 80), True, 0.177),
    "grouped-decode": ("bf16", (2, 8, 1, 64), (2, 2, 90, 64), (2, 2, 90, 64), (2, 1, 1, 90), True, 0.125),
    "f16-grouped-kt-rows": ("f16", (1, 6, 70, 32), (1, 3, 32, 70), (1, 3, 70, 32), (70, 70), False, 0.177),
}


def np_dtype(dtype: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if dtype == "bf16" else np.float16


def lowest(dtype: str) -> float:
    """The mask fill of ``dtype`` (bmc clamps -inf and float32's lowest to the dtype's range)."""
    return -3.0e38 if dtype == "bf16" else -65504.0


def make_case(dtype, q_shape, k_shape, v_shape, bias_shape, seed=0, masked_row=None):
    """Random q, k, v (and a bias hiding ~20% of the keys, plus every key of ``masked_row``) of ``dtype``."""
    rng = np.random.default_rng(seed)
    t = np_dtype(dtype)
    q, k, v = (rng.standard_normal(s).astype(t) for s in (q_shape, k_shape, v_shape))
    bias = None
    if bias_shape is not None:
        bias = np.where(rng.random(bias_shape) < 0.2, lowest(dtype), rng.standard_normal(bias_shape)).astype(t)
        if masked_row is not None:
            bias[..., masked_row, :] = lowest(dtype)
    return q, k, v, bias


def causal_bias(dtype: str, m: int, n: int) -> np.ndarray:
    return np.where(np.tril(np.ones((m, n), bool), n - m), 0.0, lowest(dtype)).astype(np_dtype(dtype))


def reference(q, k, v, bias, transpose_k: bool, scale: float, softcap: float = 0.0) -> np.ndarray:
    for axis, (a, b) in enumerate(zip(q.shape[:-2], k.shape[:-2])):  # grouped heads: query head i reads i // group
        if b not in (1, a):
            k, v = (np.repeat(x, a // b, axis=axis) for x in (k, v))
    kt = np.swapaxes(k, -1, -2) if transpose_k else k
    s = (q.astype(np.float32) @ kt.astype(np.float32)) * np.float32(scale)
    if softcap:
        s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
    if bias is not None:
        s = s + bias.astype(np.float32)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return p.astype(q.dtype).astype(np.float32) @ v.astype(np.float32)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())
