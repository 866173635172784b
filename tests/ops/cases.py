"""Sample applications of every op in the table: (op, inputs, attrs). Used by the coverage, reference and
lowering tests; a new op without a case here fails the coverage test."""

from __future__ import annotations

import numpy as np

R = np.random.default_rng(1234)
_R2 = np.random.default_rng(5)  # for cases added later, so the earlier cases keep their inputs
_R3 = np.random.default_rng(6)  # for cases inserted among the first ones, so the later ones keep theirs


def f32(*shape, lo=-2.0, hi=2.0):
    return R.uniform(lo, hi, size=shape).astype(np.float32)


def i64(*shape, hi=5):
    return R.integers(0, hi, size=shape).astype(np.int64)


def boolean(*shape):
    return R.random(shape) > 0.5


POS = dict(lo=0.1, hi=3.0)
UNARY_FLOAT = ["neg", "abs", "sign", "exp", "tanh", "sigmoid", "erf", "sin", "cos", "floor", "ceil", "relu",
               "softplus"]
UNARY_POSITIVE = ["log", "sqrt", "rsqrt", "reciprocal"]
BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "equal", "less", "less_equal", "greater",
          "greater_equal"]

CASES: list[tuple[str, list[np.ndarray], dict]] = []
CASES += [(op, [f32(2, 3, 4)], {}) for op in UNARY_FLOAT]
CASES += [(op, [f32(2, 3, 4, **POS)], {}) for op in UNARY_POSITIVE]
CASES += [(op, [f32(2, 3, 4, lo=-0.99, hi=0.99)], {}) for op in ("asin", "acos", "atan")]  # inside their domain
CASES += [(op, [f32(2, 3, 4), f32(3, 1)], {}) for op in BINARY]
CASES += [
    ("round", [np.array([0.4, 1.6, -2.3, 3.7], np.float32)], {}),
    ("pow", [f32(2, 3, **POS), f32(3)], {}),
    ("div", [np.array([7, -7, 9], np.int64), np.array([2, 2, -4], np.int64)], {}),
    ("gelu", [f32(4, 5)], {"approximate": "none"}),
    ("gelu", [f32(4, 5)], {"approximate": "tanh"}),
    ("leaky_relu", [f32(4, 5)], {"alpha": 0.2}),
    ("clip", [f32(4, 5)], {"min": -0.5, "max": 0.7}),
    ("cast", [f32(3, 4) * 4], {"dtype": "int32"}),
    ("cast", [i64(3, 4)], {"dtype": "float32"}),
    ("logical_not", [boolean(3, 4)], {}),
    ("logical_and", [boolean(3, 4), boolean(4)], {}),
    ("logical_or", [boolean(3, 4), boolean(3, 4)], {}),
    ("logical_xor", [boolean(3, 4), boolean(3, 4)], {}),
    ("isnan", [np.array([1.0, np.nan, np.inf], np.float32)], {}),
    ("isinf", [np.array([1.0, np.nan, -np.inf], np.float32)], {}),
    ("where", [boolean(3, 4), f32(3, 4), f32(1, 4)], {}),
    ("matmul", [f32(2, 5, 3), f32(3, 4)], {}),
    ("matmul", [f32(2, 1, 5, 3), f32(3, 3, 4)], {}),
    ("matmul", [f32(3), f32(2, 3, 4)], {}),
    ("reduce_sum", [f32(2, 3, 4)], {"axes": (1,), "keepdims": True}),
    ("reduce_mean", [f32(2, 3, 4)], {"axes": (-1, 0), "keepdims": False}),
    ("reduce_max", [f32(2, 3, 4)], {"axes": None, "keepdims": False}),
    ("reduce_min", [f32(2, 3, 4)], {"axes": (2,), "keepdims": True}),
    ("reduce_prod", [f32(2, 3, 4, lo=0.5, hi=1.5)], {"axes": (1,), "keepdims": False}),
    # adjacent axes, lowered as one merged axis (a reshape): a global pool's, an instance norm's, in any order
    ("reduce_mean", [f32(2, 3, 5, 7)], {"axes": (2, 3), "keepdims": True}),
    ("reduce_sum", [f32(2, 3, 5, 7)], {"axes": (-2, 1), "keepdims": False}),
    ("reduce_max", [np.array([[[-np.inf, -np.inf], [-np.inf, -np.inf]], [[1.0, -np.inf], [2.0, 0.5]]],
                             np.float32)], {"axes": (1, 2), "keepdims": False}),
    ("reduce_prod", [f32(3, 2, 2, 4, lo=0.5, hi=1.5)], {"axes": (1, 2, 3), "keepdims": True}),
    ("argmax", [f32(2, 3, 4)], {"axis": 1, "keepdims": False}),
    ("argmin", [f32(2, 3, 4)], {"axis": -1, "keepdims": True}),
    ("topk", [f32(2, 3, 6)], {"k": 3, "axis": -1, "largest": True}),
    ("scatter_elements", [f32(3, 4), np.array([[0, -1], [2, 1], [1, 0]], np.int64), f32(3, 2)],
     {"axis": 1, "reduction": "none"}),
    ("scatter_elements", [f32(3, 4), np.array([[0, 0, 2, 1]], np.int64), f32(1, 4)], {"axis": 0, "reduction": "add"}),
    ("scatter_nd", [f32(4, 3), np.array([[2], [0]], np.int64), f32(2, 3)], {"reduction": "none"}),
    ("scatter_nd", [f32(2, 3, 4), np.array([[1, 2], [0, -1], [1, 2]], np.int64), f32(3, 4)], {"reduction": "max"}),
    # a key/value cache [length, heads, dim] written at position 3, and one [batch, heads, length, dim] at 5 (data
    # from their own generator: the cases after them keep their inputs)
    ("scatter_nd", [_R3.uniform(-2, 2, (6, 4, 2)).astype(np.float32), np.array([[3]], np.int64),
                    _R3.uniform(-2, 2, (1, 4, 2)).astype(np.float32)], {"reduction": "none"}),
    ("scatter_elements", [_R3.uniform(-2, 2, (2, 4, 6, 2)).astype(np.float32), np.full((2, 4, 1, 2), 5, np.int64),
                          _R3.uniform(-2, 2, (2, 4, 1, 2)).astype(np.float32)], {"axis": 2, "reduction": "none"}),
    ("topk", [f32(4, 3, 2)], {"k": 2, "axis": 0, "largest": False}),
    ("softmax", [f32(2, 3, 5)], {"axis": -1}),
    ("log_softmax", [f32(2, 3, 5)], {"axis": 1}),
    ("layer_norm", [f32(2, 3, 8), f32(8), f32(8)], {"axis": -1, "epsilon": 1e-5}),
    ("layer_norm", [f32(2, 3, 8), f32(3, 8)], {"axis": 1, "epsilon": 1e-5}),
    ("rms_norm", [f32(2, 3, 8), f32(8)], {"axis": -1, "epsilon": 1e-6}),
    ("batch_norm", [f32(2, 3, 4, 4), f32(3), f32(3), f32(3), f32(3, **POS)], {"epsilon": 1e-5}),
    ("lrn", [f32(1, 6, 3, 3)], {"size": 3, "alpha": 1e-2, "beta": 0.75, "bias": 1.0}),
    ("cumsum", [f32(2, 5)], {"axis": 1}),
    ("cumsum", [i64(2, 5)], {"axis": 1, "exclusive": True, "reverse": True}),
    ("cumprod", [_R2.uniform(0.5, 1.5, (3, 4)).astype(np.float32)], {"axis": 0, "exclusive": True}),
    ("cumprod", [_R2.integers(-3, 4, (2, 6)).astype(np.int32)], {"axis": -1, "reverse": True}),
    ("reshape", [f32(2, 3, 4)], {"shape": (6, 4)}),
    ("transpose", [f32(2, 3, 4)], {"perm": (2, 0, 1)}),
    ("concat", [f32(2, 3), f32(2, 5), f32(2, 1)], {"axis": 1}),
    ("split", [f32(2, 7)], {"axis": 1, "sizes": (2, 4, 1)}),
    ("slice", [f32(4, 6)], {"starts": (1, -1), "ends": (3, -100), "axes": (0, 1), "steps": (1, -2)}),
    ("slice", [f32(4, 6)], {"starts": (2,), "ends": (2**62,), "axes": (1,), "steps": (1,)}),
    ("gather", [f32(5, 3), np.array([[0, 4], [-1, 2]], np.int64)], {"axis": 0}),
    ("gather", [f32(2, 5, 3), np.array([1, 3], np.int64)], {"axis": 1}),
    ("gather_elements", [f32(3, 4), i64(3, 2, hi=4)], {"axis": 1}),
    ("gather_nd", [f32(2, 3, 4), i64(2, 1, hi=3)], {"batch_dims": 1}),
    ("broadcast_to", [f32(3, 1)], {"shape": (2, 3, 4)}),
    ("tile", [f32(2, 3)], {"repeats": (2, 1)}),
    ("unpack_int4", [np.arange(256, dtype=np.uint8).reshape(4, 64)], {"signed": True}),  # every byte
    ("matmul_nbits", [_R2.uniform(-2, 2, (1, 2, 64)).astype(np.float32),  # default zero point 8; 2 rows: fused
                      np.arange(6 * 4 * 8, dtype=np.uint8).reshape(6, 4, 8),
                      _R2.uniform(0.01, 0.1, (6, 4)).astype(np.float32)], {}),
    ("matmul_nbits", [_R2.uniform(-2, 2, (20, 32)).astype(np.float32),  # 20 rows: dequantize + sgemm
                      np.arange(255, -1, -1, dtype=np.uint8).reshape(16, 2, 8),
                      _R2.uniform(0.01, 0.1, (16, 2)).astype(np.float32),
                      _R2.uniform(0, 15, (16, 2)).astype(np.float32)], {}),
    ("unpack_int4", [np.arange(240, dtype=np.uint8).reshape(2, 3, 40)], {"signed": False}),
    ("left_shift", [_R2.integers(0, 2**20, (3, 4)).astype(np.uint32), np.array([0, 1, 7, 11], np.uint32)], {}),
    ("right_shift", [_R2.integers(0, 2**63, (2, 5)).astype(np.uint64), np.array([[0], [60]], np.uint64)], {}),
    ("bitwise_and", [_R2.integers(-99, 99, (2, 3)).astype(np.int16), _R2.integers(-99, 99, (3,)).astype(np.int16)], {}),
    ("bitwise_or", [_R2.integers(0, 2**32, (4,)).astype(np.uint32), _R2.integers(0, 2**32, (4,)).astype(np.uint32)],
     {}),
    ("bitwise_xor", [_R2.integers(0, 255, (2, 2)).astype(np.uint8), _R2.integers(0, 255, (2, 2)).astype(np.uint8)], {}),
    ("bitwise_not", [_R2.integers(-2**62, 2**62, (5,)).astype(np.int64)], {}),
    # signed: amounts outside [0, 32) give 0 (a right shift of a negative value: -1); a left shift wraps
    ("left_shift", [np.array([1, -3, 7, 2**30, 5], np.int32), np.array([31, 2, -1, 3, 32], np.int32)], {}),
    ("right_shift", [np.array([-64, 64, -1, 9, -9], np.int32), np.array([3, 40, -2, 1, 33], np.int32)], {}),
    ("add", [_R2.integers(0, 2**16, (2, 3)).astype(np.uint16), _R2.integers(0, 2**16, (3,)).astype(np.uint16)], {}),
    # uint8 A x int8 B (the CPU kernel's native pair); K = 70: a 64-byte step and a masked tail; M = 5, N = 6: tails
    ("matmul_integer", [_R2.integers(0, 256, (5, 70)).astype(np.uint8),
                        _R2.integers(-128, 128, (6, 70)).astype(np.int8),
                        np.array(131, np.uint8), np.array([-3], np.int8)], {}),
    # int8 A (batched, a zero point per row) x uint8 B (one per row of Bt): both flipped to the native pair
    ("matmul_integer", [_R2.integers(-128, 128, (2, 3, 9)).astype(np.int8),
                        _R2.integers(0, 256, (4, 9)).astype(np.uint8),
                        np.array([-128, 5, 127], np.int8), np.array([0, 255, 7, 128], np.uint8)], {}),
    # fused attention: q [2, 3, 7, 5], kt [2, 3, 5, 19], v [2, 3, 19, 6] (tails of the kernel's 6 x 16 tiles), a
    # causal bias broadcast over heads; and a 3-D one without a bias
    ("attention", [f32(2, 3, 7, 5), f32(2, 3, 5, 19), f32(2, 3, 19, 6),
                   np.where(np.tril(np.ones((7, 19), bool), 12), 0, -3.4e38).astype(np.float32)[None, None]
                   .repeat(2, 0)], {"scale": 0.4}),
    ("attention", [f32(4, 13, 8), f32(4, 8, 33), f32(4, 33, 17)], {}),
    ("attention", [f32(2, 20, 8), f32(2, 33, 8), f32(2, 33, 5), f32(20, 33)], {"transpose_k": True}),  # k [N, D]
    ("attention", [f32(2, 1, 8), f32(2, 33, 8), f32(2, 33, 5)], {"transpose_k": True, "scale": 0.5}),  # decoding
    # soft-capped scores (Gemma 2), with a bias and without one (the kernel then gets a scalar 0)
    ("attention", [f32(2, 20, 8), f32(2, 33, 8), f32(2, 33, 5), f32(20, 33)], {"transpose_k": True, "softcap": 1.5}),
    ("attention", [f32(4, 13, 8), f32(4, 8, 33), f32(4, 33, 17)], {"scale": 2.0, "softcap": 3.0, "lse": True}),
    ("pad", [f32(2, 3)], {"pads": (1, 0, 0, 2), "mode": "constant", "value": 1.5}),
    ("pad", [f32(3, 4)], {"pads": (1, 1, 1, 1), "mode": "reflect", "value": 0.0}),
    ("pad", [f32(3, 4)], {"pads": (0, 2, 1, 0), "mode": "edge", "value": 0.0}),
    ("constant", [], {"value": np.arange(6, dtype=np.float32).reshape(2, 3)}),
    ("conv", [f32(1, 4, 7, 7), f32(6, 2, 3, 3)], {"strides": (2, 1), "pads": (1, 0, 1, 2), "dilations": (1, 1),
                                                  "group": 2}),
    ("conv", [f32(2, 3, 9), f32(4, 3, 3)], {"strides": (1,), "pads": (1, 1), "dilations": (2,), "group": 1}),
    ("conv", [f32(1, 2, 5, 4, 6), f32(4, 1, 3, 2, 3)], {"strides": (2, 1, 1), "pads": (1, 0, 1, 1, 1, 0),
                                                         "dilations": (1, 2, 1), "group": 2}),
    ("max_pool", [f32(1, 2, 5, 6, 4)], {"kernel": (2, 3, 2), "strides": (2, 2, 1), "pads": (0, 1, 0, 1, 1, 0)}),
    ("avg_pool", [f32(1, 2, 5, 6, 4)], {"kernel": (3, 2, 2), "strides": (1, 2, 2), "pads": (1, 0, 0, 1, 0, 1),
                                        "count_include_pad": False}),
    ("max_pool", [f32(1, 2, 7, 7)], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}),
    ("max_pool", [f32(1, 2, 6, 6)], {"kernel": (3, 3), "strides": (2, 2), "pads": (0, 0, 0, 0), "ceil_mode": True}),
    ("avg_pool", [f32(1, 2, 7, 7)], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1),
                                     "count_include_pad": False}),
    ("avg_pool", [f32(1, 2, 7, 7)], {"kernel": (2, 2), "strides": (2, 2), "pads": (1, 1, 0, 0),
                                     "count_include_pad": True}),
    ("all_reduce", [f32(2, 3)], {"axes": (0,), "group_size": 1, "reduce": "sum"}),
    ("all_gather", [f32(2, 3)], {"axes": (0,), "group_size": 1, "dim": 1}),
    ("reduce_scatter", [f32(2, 3)], {"axes": (0,), "group_size": 1, "dim": 0}),
    ("all_to_all", [f32(2, 4)], {"axes": (0,), "group_size": 1, "split_dim": 1, "concat_dim": 0}),
]
CASES += [
    ("gather_elements", [f32(3, 2), np.array([[-1, 0], [1, -2]], np.int64)], {"axis": 0}),
    ("tile", [f32(2, 3, 4, 5)], {"repeats": (1, 6, 4, 2)}),
    ("pow", [np.array([1, 2, 3], np.int32), np.array([2, 3, 1], np.int32)], {}),
    ("reduce_max", [boolean(2, 3)], {"axes": (1,), "keepdims": False}),
    ("split", [f32(4)], {"axis": 0, "sizes": (0, 4)}),
]

CASES += [("gather_nd", [_R2.standard_normal((6, 2, 4)).astype(np.float32), np.array([[-2], [1]], np.int64)],
           {"batch_dims": 0}),  # negative indices count from the end (Falcon's dynamo export)
          ("gather_nd", [_R2.standard_normal((2, 3, 4)).astype(np.float32), np.array([[-1, 2], [0, -4]], np.int64)],
           {"batch_dims": 1})]
_MASKED_ROWS = np.where(np.tril(np.ones((7, 19), bool), 12), 0, -np.inf).astype(np.float32)
_MASKED_ROWS[2], _MASKED_ROWS[4] = -np.inf, np.finfo(np.float32).min
CASES += [("attention", [_R2.standard_normal((2, 4, 6, 8)).astype(np.float32),  # multi-query: one k/v head
                         _R2.standard_normal((2, 1, 9, 8)).astype(np.float32),
                         _R2.standard_normal((2, 1, 9, 5)).astype(np.float32)], {"transpose_k": True}),
          # with each row's log-sum-exp (attention to a block of the keys): a causal -inf mask, one row masked
          # everywhere with -inf (lse -inf, output NaN) and one with float32's lowest; multi-query with k [N, D]
          ("attention", [f32(2, 7, 5), f32(2, 5, 19), f32(2, 19, 6), _MASKED_ROWS], {"scale": 0.4, "lse": True}),
          ("attention", [_R2.standard_normal((2, 4, 6, 8)).astype(np.float32),
                         _R2.standard_normal((2, 1, 9, 8)).astype(np.float32),
                         _R2.standard_normal((2, 1, 9, 5)).astype(np.float32)], {"transpose_k": True, "lse": True})]
CASES += [("matmul_float8", [_R2.standard_normal((3, 40)).astype(np.float32),  # a few rows: decoded row by row
                             _R2.integers(0, 256, (24, 40)).astype(np.uint8) & 0x7E | 0x30,  # no NaN codes
                             _R2.uniform(0.5, 2, 24).astype(np.float32)], {"format": "float8e4m3fn"}),
          ("matmul_float8", [_R2.standard_normal((2, 10, 40)).astype(np.float32),  # 20 rows: decoded, then sgemm
                             _R2.integers(0, 0x7C, (24, 40)).astype(np.uint8),
                             np.array(0.25, np.float32)], {"format": "float8e5m2"})]
CASES += [("bitcast", [_R2.standard_normal(6).astype(np.float32)], {"dtype": "int32"}),
          ("bitcast", [np.array([16256, 0, 7, -32768], np.int16)], {"dtype": "bfloat16"})]

# float8/float4 codes: every code decoded; every float16 value (and float32's specials and extremes) encoded
_CODES = np.arange(256, dtype=np.uint8)
_FLOATS = np.concatenate([np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32),
                          np.array([3e38, -3e38, 1e-40, -1e-40, 2.0 ** -127, 464.0, 465.0, 61440.0], np.float32)])
CASES += [("decode_float", [_CODES & 0xF if f == "float4e2m1" else _CODES], {"format": f})
          for f in ("float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz", "float4e2m1", "float8e8m0")]
CASES += [("encode_float", [_FLOATS], {"format": f, "saturate": s})
          for f in ("float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz", "float4e2m1")
          for s in (True, False)]
CASES += [("encode_float", [_FLOATS], {"format": "float8e8m0", "saturate": s, "round_mode": r})
          for s in (True, False) for r in ("up", "down", "nearest")]

# grouped-query attention: 4 query heads over 2 key/value heads (head i reads i // 2), a causal mask broadcast over
# heads; 6 heads over 3 with a batch of 1 broadcast (k [N, D]; its log-sum-exp too); a decoding step (1 row)
_R4 = np.random.default_rng(8)


def _normal(*shape):
    return _R4.standard_normal(shape).astype(np.float32)


CASES += [("attention", [_normal(2, 4, 7, 8), _normal(2, 2, 8, 19), _normal(2, 2, 19, 6),
                         np.where(np.tril(np.ones((7, 19), bool), 12), 0, -np.inf).astype(np.float32)],
           {"scale": 0.4}),
          ("attention", [_normal(2, 6, 5, 8), _normal(1, 3, 11, 8), _normal(1, 3, 11, 4)],
           {"transpose_k": True, "lse": True}),
          ("attention", [_normal(2, 4, 1, 8), _normal(2, 2, 33, 8), _normal(2, 2, 33, 5)], {"transpose_k": True})]
# float64: the composition (what GPUs run; no CPU kernel), its query heads folded into rows of one product per
# key/value head: grouped with a per-head bias and the log-sum-exp, one head, and a grouped dim that is not the last
CASES += [("attention", [_normal(2, 4, 3, 8).astype(np.float64), _normal(2, 2, 8, 9).astype(np.float64),
                         _normal(2, 2, 9, 5).astype(np.float64), _normal(4, 3, 9).astype(np.float64)],
           {"scale": 0.4, "lse": True}),
          ("attention", [_normal(2, 4, 3, 8).astype(np.float64), _normal(2, 1, 9, 8).astype(np.float64),
                         _normal(2, 1, 9, 5).astype(np.float64)], {"transpose_k": True}),
          ("attention", [_normal(4, 2, 3, 8).astype(np.float64), _normal(2, 2, 9, 8).astype(np.float64),
                         _normal(2, 2, 9, 5).astype(np.float64)], {"transpose_k": True}),
          ("attention", [_normal(2, 4, 3, 8).astype(np.float64), _normal(2, 2, 8, 9).astype(np.float64),
                         _normal(2, 2, 9, 5).astype(np.float64), _normal(4, 3, 9).astype(np.float64)],
           {"scale": 2.0, "softcap": 1.5})]

# attention sinks (GPT-OSS: a logit per head beside every row's scores): grouped with the causal mask (a row masked
# everywhere: output 0), shifted by the row max as GPT-OSS writes it; multi-query without a bias; float64 (the
# composition GPUs run)
_SINK = _normal(1, 4, 1, 1) * 2
CASES += [("attention", [_normal(2, 4, 7, 8), _normal(2, 2, 19, 8), _normal(2, 2, 19, 6), _MASKED_ROWS, _SINK],
           {"scale": 0.4, "transpose_k": True, "sink": True, "sink_shift": True}),
          ("attention", [_normal(2, 4, 3, 8), _normal(2, 1, 8, 9), _normal(2, 1, 9, 5), _normal(2, 4, 3, 1)],
           {"sink": True}),
          ("attention", [_normal(2, 4, 7, 8).astype(np.float64), _normal(2, 2, 19, 8).astype(np.float64),
                         _normal(2, 2, 19, 6).astype(np.float64), _MASKED_ROWS.astype(np.float64),
                         _SINK.astype(np.float64)], {"transpose_k": True, "sink": True})]

# reduced precision: the lowering computes normalizations in float32 for bfloat16 (TVM's kernels take f32/f16 only)
try:
    import ml_dtypes

    def bf16(*shape):
        return f32(*shape).astype(ml_dtypes.bfloat16)

    LOW_PRECISION_CASES = [
        (op, [conv(*s) for s in shapes], attrs)
        for conv in (lambda *s: f32(*s).astype(np.float16), bf16)
        for op, shapes, attrs in [("matmul", [(4, 8), (8, 6)], {}), ("softmax", [(3, 8)], {"axis": -1}),
                                  ("layer_norm", [(3, 8), (8,), (8,)], {"axis": -1, "epsilon": 1e-5}),
                                  ("rms_norm", [(3, 8), (8,)], {"axis": -1, "epsilon": 1e-5}),
                                  ("gelu", [(3, 8)], {"approximate": "tanh"}), ("add", [(3, 8), (8,)], {}),
                                  ("attention", [(2, 5, 8), (2, 8, 9), (2, 9, 4), (5, 9)], {"scale": 0.35}),
                                  ("attention", [(2, 5, 8), (2, 8, 9), (2, 9, 4)], {"lse": True}),
                                  ("attention", [(2, 5, 8), (2, 8, 9), (2, 9, 4), (5, 9)], {"softcap": 0.5}),
                                  ("attention", [(2, 5, 8), (2, 8, 9), (2, 9, 4), (2, 5, 1)], {"sink": True})]]
    # a grouped-query decoding step: 16-bit keys and values read in place (own inputs: the cases above keep theirs)
    LOW_PRECISION_CASES += [("attention", [_normal(2, 4, 1, 8).astype(t), _normal(2, 2, 9, 8).astype(t),
                                           _normal(2, 2, 9, 4).astype(t)], {"transpose_k": True})
                            for t in (np.float16, ml_dtypes.bfloat16)]
    LOW_PRECISION_CASES += [("gather_matmul", [_normal(5, 8).astype(t), _normal(3, 6, 8).astype(t),
                                               np.array([2, 0, 2, 5, 1], np.int64)], {"transpose_w": True})
                            for t in (np.float16, ml_dtypes.bfloat16)]
    # selections: a router's top-k (TVM's own topk ranked bfloat16 values wrongly), arg max/min, max/min
    LOW_PRECISION_CASES += [(op, [_normal(6, 9).astype(t)], attrs) for t in (np.float16, ml_dtypes.bfloat16)
                            for op, attrs in [("topk", {"k": 3}), ("topk", {"k": 2, "axis": 0, "largest": False}),
                                              ("argmax", {"axis": 1, "keepdims": False}),
                                              ("argmin", {"axis": 0, "keepdims": True}),
                                              ("reduce_max", {"axes": (1,), "keepdims": False}),
                                              ("reduce_min", {"axes": (0,), "keepdims": True})]]
except ImportError:  # pragma: no cover
    LOW_PRECISION_CASES = []

# gather_matmul (a mixture of experts' expert layers): 7 rows over 4 experts, every expert routed; 6 rows over two
# of them and indices outside [0, E) (zero rows), the weight stored [E, N, K] (transpose_w), int32 indices; a
# decoding step's one row; float64
_R5 = np.random.default_rng(7)
CASES += [("gather_matmul", [_R5.standard_normal((7, 5)).astype(np.float32),
                             _R5.standard_normal((4, 5, 6)).astype(np.float32),
                             np.array([0, 2, 1, 0, 3, 2, 2], np.int64)], {}),
          ("gather_matmul", [_R5.standard_normal((6, 5)).astype(np.float32),
                             _R5.standard_normal((4, 6, 5)).astype(np.float32),
                             np.array([3, -1, 0, 4, 3, 0], np.int32)], {"transpose_w": True}),
          ("gather_matmul", [_R5.standard_normal((1, 8)).astype(np.float32),
                             _R5.standard_normal((4, 12, 8)).astype(np.float32), np.array([2], np.int64)],
           {"transpose_w": True}),
          ("gather_matmul", [_R5.standard_normal((4, 5)), _R5.standard_normal((2, 5, 3)),
                             np.array([1, 1, 0, 1], np.int64)], {})]  # float64
