"""Narrow floating-point formats (float8, float4, float8e8m0) carried as their bit codes in ``uint8`` tensors.

bmc has no float8 dtype: a tensor of such a format is a ``uint8`` tensor of codes (float4: one code a byte, in the
low 4 bits), and two elementwise ops (registered in ``bmc.ops.elementwise``) convert:

- ``decode_float(codes) {format}`` → float32, exactly (every value of these formats is a float32);
- ``encode_float(x: float32) {format, saturate, round_mode}`` → codes, rounding to nearest even as ONNX's ``Cast``
  does: with ``saturate`` (float8; float4 always saturates) a finite value beyond the largest one, or an infinity,
  becomes the largest finite value of its sign; without it, an infinity where the format has one, else NaN.
  float8e8m0 (a power of two, the MX formats' scale) rounds by ``round_mode`` (``up``, ``down``, ``nearest``) and
  ignores the sign, as ONNX's reference does.

The references are ml_dtypes' conversions (what ONNX's reference runs); the lowerings are integer arithmetic on the
float32 bits (``bmc.codegen.lower.minifloat``), checked against them over every float16 value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bmc.ops.registry import OpError


@dataclass(frozen=True)
class Format:
    """A sign-exponent-mantissa format of ``bits`` bits. ``special``: which codes are not finite numbers —
    ``ieee`` (all-ones exponent: infinities and NaNs), ``fn`` (only the all-ones magnitude is NaN), ``fnuz`` (the
    negative-zero code is the one NaN), ``none`` (every code is finite), ``e8m0`` (unsigned powers of two; 0xFF is
    NaN)."""

    name: str
    bits: int
    exponent_bits: int
    mantissa_bits: int
    bias: int
    special: str
    ml_dtype: str

    @property
    def max_magnitude(self) -> int:
        """The code of the largest finite value, sign bit clear."""
        top = (1 << (self.bits - 1)) - 1
        return {"ieee": top - (1 << self.mantissa_bits), "fn": top - 1, "fnuz": top, "none": top, "e8m0": 0xFE}[
            self.special]

    @property
    def np_dtype(self) -> np.dtype:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, self.ml_dtype))


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("float8e4m3fn", 8, 4, 3, 7, "fn", "float8_e4m3fn"),
    Format("float8e4m3fnuz", 8, 4, 3, 8, "fnuz", "float8_e4m3fnuz"),
    Format("float8e5m2", 8, 5, 2, 15, "ieee", "float8_e5m2"),
    Format("float8e5m2fnuz", 8, 5, 2, 16, "fnuz", "float8_e5m2fnuz"),
    Format("float4e2m1", 4, 2, 1, 1, "none", "float4_e2m1fn"),
    Format("float8e8m0", 8, 8, 0, 127, "e8m0", "float8_e8m0fnu"),
)}
ROUND_MODES = ("up", "down", "nearest")


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise OpError(f"unknown float format {name!r}; known: {', '.join(FORMATS)}") from None


def decode(codes: np.ndarray, fmt: Format) -> np.ndarray:
    """float32 values of ``uint8`` codes."""
    return np.asarray(codes, np.uint8).view(fmt.np_dtype).astype(np.float32)


def encode(x: np.ndarray, fmt: Format, saturate: bool = True, round_mode: str = "up") -> np.ndarray:
    """``uint8`` codes of float32 values (module docstring for the rounding)."""
    x = np.asarray(x, np.float32)
    if fmt.special == "e8m0":
        return _encode_e8m0(x, saturate, round_mode)
    if saturate:
        largest = np.float32(decode(np.uint8(fmt.max_magnitude), fmt))
        x = np.clip(x, -largest, largest)
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(fmt.np_dtype).view(np.uint8)


def _encode_e8m0(x: np.ndarray, saturate: bool, round_mode: str) -> np.ndarray:
    bits = x.view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.uint32)
    if round_mode == "up":
        up = (bits & 0x7FFFFF) != 0
    elif round_mode == "nearest":  # guard bit, and then any of round, sticky or "the result is not 2^-127"
        up = ((bits & 0x400000) != 0) & (((bits & 0x3FFFFF) != 0) | (exponent > 0))
    elif round_mode == "down":
        up = np.zeros(x.shape, bool)
    else:
        raise OpError(f"round_mode must be one of {', '.join(ROUND_MODES)}, got {round_mode!r}")
    if saturate:
        up &= exponent != 0xFE
    special = exponent == 0xFF
    return np.where(special, 0xFF, (exponent + (up & ~special)) & 0xFF).astype(np.uint8)
