"""The op table: every op declared once, with all of its facets side by side.

Facets of an ``OpDef``:
  * ``attrs``      — attribute schema (name → ``Attr`` with a kind and an optional default);
  * ``infer``      — input types + attrs → output types (raises ``OpError`` with a message on bad input);
  * ``reference``  — numpy implementation, the oracle every rewrite and backend is checked against;
  * ``cost``       — FLOPs and bytes moved, for the cost model;
  * ``factors``    — the sharding factor rule (Shardy-style); the slot is filled by ``bmc.sharding.factors``.
The Relax lowering of each op lives in ``bmc/codegen/lower/<family>.py`` (same family names as the files here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from bmc.ir.types import TensorType

REQUIRED = object()

ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "dtype", "tensor", "float?", "axes")


class OpError(ValueError):
    """Raised by shape inference and attribute checks; the frontend adds the ONNX node to the message."""


@dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = REQUIRED

    def __post_init__(self):
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"unknown attribute kind {self.kind}")


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int


InferFn = Callable[[Sequence[TensorType], dict], list[TensorType]]
ReferenceFn = Callable[[Sequence[np.ndarray], dict], list[np.ndarray]]
CostFn = Callable[[Sequence[TensorType], Sequence[TensorType], dict], Cost]


def bytes_moved(ins: Sequence[TensorType], outs: Sequence[TensorType]) -> int:
    return sum(t.nbytes for t in ins) + sum(t.nbytes for t in outs)


def elementwise_cost(flops_per_element: int = 1) -> CostFn:
    """Cost of an op that does a fixed amount of work per output element."""

    def cost(ins, outs, attrs):
        return Cost(flops_per_element * sum(t.numel for t in outs), bytes_moved(ins, outs))

    return cost


def movement_cost(ins, outs, attrs) -> Cost:
    """Data movement only: no arithmetic."""
    return Cost(0, bytes_moved(ins, outs))


@dataclass
class OpDef:
    name: str
    family: str
    arity: tuple[int, int | None]  # (min inputs, max inputs or None for variadic)
    attrs: dict[str, Attr]
    infer: InferFn
    reference: ReferenceFn
    cost: CostFn
    doc: str = ""
    factors: Callable | None = field(default=None)  # sharding factor rule, filled by bmc.sharding.factors
    collective: bool = False

    def check_attrs(self, attrs: dict) -> dict:
        """Return attrs with defaults filled in; raise OpError for unknown or missing ones."""
        unknown = sorted(set(attrs) - set(self.attrs))
        if unknown:
            raise OpError(f"op {self.name} has no attribute(s) {', '.join(unknown)}; known: {sorted(self.attrs)}")
        out = {}
        for key, spec in self.attrs.items():
            if key in attrs:
                out[key] = _coerce(self.name, key, spec.kind, attrs[key])
            elif spec.default is REQUIRED:
                raise OpError(f"op {self.name} needs attribute {key!r}")
            else:
                out[key] = spec.default
        return out

    def check_arity(self, n: int) -> None:
        lo, hi = self.arity
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'n'}"
            raise OpError(f"op {self.name} takes {want} inputs, got {n}")


def _coerce(op: str, key: str, kind: str, value: Any) -> Any:
    """Canonical python form of an attribute value (so printing, hashing and comparing are stable)."""
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "float?":
            return None if value is None else float(value)
        if kind == "bool":
            return bool(value)
        if kind in ("str", "dtype"):
            return str(value)
        if kind == "ints":
            return tuple(int(v) for v in value)
        if kind == "floats":
            return tuple(float(v) for v in value)
        if kind == "axes":
            return None if value is None else tuple(int(v) for v in value)
        if kind == "tensor":
            return np.asarray(value)
    except (TypeError, ValueError):
        raise OpError(f"op {op} attribute {key!r} must be {kind}, got {value!r}") from None
    return value


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise ValueError(f"op {op.name} declared twice")
    OPS[op.name] = op
    return op


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise OpError(f"unknown op {name!r}") from None


def infer_types(op: str, in_types: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    """Full attrs (defaults filled) and output types of ``op`` applied to ``in_types``."""
    opdef = get_op(op)
    opdef.check_arity(len(in_types))
    return opdef.infer(list(in_types), attrs)


# ---------------------------------------------------------------------------------------------------------------
# Shape helpers shared by the op families.

def contiguous(a) -> np.ndarray:
    """C-contiguous array, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    return np.require(a, requirements="C")


def normalize_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise OpError(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """Numpy broadcasting of static shapes; raises OpError when they do not broadcast."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        dims = {s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise OpError(f"shapes {', '.join(str(tuple(s)) for s in shapes)} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def same_dtype(op: str, types: Sequence[TensorType]) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise OpError(f"op {op} needs inputs of one dtype, got {', '.join(sorted(dtypes))}")
    return dtypes.pop()
