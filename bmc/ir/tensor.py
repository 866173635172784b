"""Weight data that is read lazily.

A graph's parameters point at a ``Tensor``: its type is known up front, its bytes are only read when someone asks
(``numpy()``), and external data is memory-mapped, so importing or planning a model never loads its weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bmc.ir.types import TensorType, dtype_of, np_dtype


class Tensor:
    """Lazily available tensor data of a known type."""

    type: TensorType

    def numpy(self) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


@dataclass(eq=False)
class ArrayTensor(Tensor):
    """Data already in memory."""

    array: np.ndarray
    type: TensorType = field(init=False)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        self.type = TensorType(dtype_of(self.array.dtype), self.array.shape)

    def numpy(self) -> np.ndarray:
        return self.array

    def describe(self) -> str:
        return "in memory"


@dataclass(eq=False)
class ExternalTensor(Tensor):
    """A byte range of a file, memory-mapped on access (ONNX external data)."""

    path: Path
    offset: int
    type: TensorType

    def numpy(self) -> np.ndarray:
        if self.type.numel == 0:
            return np.zeros(self.type.shape, np_dtype(self.type.dtype))
        return np.memmap(self.path, dtype=np_dtype(self.type.dtype), mode="r", offset=self.offset,
                         shape=self.type.shape)

    def describe(self) -> str:
        return f"{self.path.name}@{self.offset}+{self.type.nbytes}"


@dataclass(eq=False)
class FillTensor(Tensor):
    """Every element equal to one value (ONNX ConstantOfShape); materialized on access."""

    value: float | int | bool
    type: TensorType

    def numpy(self) -> np.ndarray:
        return np.full(self.type.shape, self.value, dtype=np_dtype(self.type.dtype))

    def describe(self) -> str:
        return f"fill({self.value})"


def digest(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@dataclass(eq=False)
class CastTensor(Tensor):
    """Another tensor's data converted to ``dtype`` on access (for --dtype float16/bfloat16 weights)."""

    base: Tensor
    dtype: str
    type: TensorType = field(init=False)

    def __post_init__(self):
        self.type = self.base.type.with_dtype(self.dtype)

    def numpy(self) -> np.ndarray:
        return self.base.numpy().astype(np_dtype(self.dtype))

    def describe(self) -> str:
        return f"{self.dtype}({self.base.describe()})"


@dataclass(eq=False)
class MappedTensor(Tensor):
    """Another tensor's data through ``fn`` on access (a weight layout the importer chose, e.g. 4-bit codes
    repacked for ``matmul_nbits``); ``fn`` must return ``type``'s shape and dtype."""

    base: Tensor
    fn: Callable[[np.ndarray], np.ndarray]
    type: TensorType
    what: str = "mapped"

    def numpy(self) -> np.ndarray:
        out = np.ascontiguousarray(self.fn(np.asarray(self.base.numpy())))
        if out.shape != self.type.shape or dtype_of(out.dtype) != self.type.dtype:
            raise ValueError(f"{self.what}: produced {out.dtype}{list(out.shape)}, expected {self.type}")
        return out

    def describe(self) -> str:
        return f"{self.what}({self.base.describe()})"
