"""Tensor types of bmc IR: a dtype name and a static shape."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

# Canonical dtype names, their short text form and numpy dtype. bfloat16 comes from ml_dtypes (an onnx dependency).
_DTYPES: dict[str, tuple[str, str]] = {
    "float64": ("f64", "float64"),
    "float32": ("f32", "float32"),
    "float16": ("f16", "float16"),
    "bfloat16": ("bf16", "bfloat16"),
    "int64": ("i64", "int64"),
    "int32": ("i32", "int32"),
    "int16": ("i16", "int16"),
    "int8": ("i8", "int8"),
    "uint8": ("u8", "uint8"),
    "uint16": ("u16", "uint16"),
    "uint32": ("u32", "uint32"),
    "uint64": ("u64", "uint64"),
    "bool": ("bool", "bool"),
}
DTYPES = tuple(_DTYPES)
SHORT_TO_DTYPE = {short: name for name, (short, _) in _DTYPES.items()}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
INT_DTYPES = frozenset({"int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64"})

# A stored tensor (initializer) of more elements is refused before anything is allocated (FAILURES.md 7).
MAX_ELEMENTS = 1 << 40
# No tensor type may have more: an intermediate the importer infers may be far larger than anything stored, and the
# fusions remove it (a batched mixture of experts gathers every routed row's expert weights: 6.6e12 elements for
# 16k tokens of Mixtral 8x22B, a `gather_matmul` after fusion), but int64 offsets into it must stay far from overflow.
MAX_TYPE_ELEMENTS = 1 << 56


class ShapeError(ValueError):
    """A shape no tensor may have (negative, or more than ``MAX_TYPE_ELEMENTS`` elements)."""


def np_dtype(dtype: str) -> np.dtype:
    """The numpy dtype for a bmc dtype name."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_DTYPES[dtype][1])


def dtype_of(array_dtype: np.dtype) -> str:
    """The bmc dtype name of a numpy dtype (raises KeyError for unsupported ones)."""
    name = np.dtype(array_dtype).name
    if name not in _DTYPES:
        raise KeyError(name)
    return name


def itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np_dtype(dtype).itemsize


@dataclass(frozen=True, slots=True)
class TensorType:
    """A dense tensor of a static shape. ``shape == ()`` is a scalar."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ShapeError(f"negative dimension in shape {shape}")
        if prod(shape) > MAX_TYPE_ELEMENTS:
            raise ShapeError(f"shape {shape} has {prod(shape)} elements, more than the limit of {MAX_TYPE_ELEMENTS}")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{_DTYPES[self.dtype][0]}[{','.join(map(str, self.shape))}]"
