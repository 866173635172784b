"""Sharding rules in factor form (Shardy's OpShardingRule idea), the one vocabulary that propagation, strategy
enumeration, cost and partitioning are written against — none of them switches on op names.

A rule names the *factors* of one op application and says, for every operand and result dim, which factors make it
up (major to minor; a compound dim such as the result of a reshape has several, a broadcast size-1 dim has none)::

    matmul [b,m,k] x [k,n] -> [b,m,n]      factors b, m, k (reduction), n
    operands ((0,), (1,), (2,)), ((2,), (3,))   results ((0,), (1,), (3,))

Factor kinds:
  * ``pass``       — may be split over mesh axes; every tensor that has it is split the same way;
  * ``reduction``  — appears in operands only; splitting it leaves the result a partial sum over those axes, or,
                     when the factor's ``combine`` is ``max``/``min``, a partial extremum that the partitioner
                     all-reduces (max/min) right after the op, so the result is complete;
  * ``replicate``  — may not be split (softmax's axis, a normalized dim, a sliced or concatenated dim, ...).

A *strategy* (``Assignment``) gives each factor a tuple of mesh axes; it determines every operand's required spec
and the result specs. Most ops run unchanged on their local shards (``shape``-valued attributes are replaced by the
local result shape); a rule whose local program differs (an embedding split over its vocabulary) supplies ``local``.
A ``local`` hook may run all-reduces of its own (attention over a block of the keys combines its rows' log-sum-exps
with the other blocks'); it declares them in ``inner`` so that the cost model prices them.

*Grouped* factor pairs ``(outer, inner)``: index ``i`` of the outer factor reads index ``i // (outer / inner size)``
of the inner one (grouped-query attention: query heads over their key/value heads). The inner factor is never
assigned on its own: it takes the longest major prefix of the outer's axes that divides it (``complete``), so a
device's inner block holds what its outer block reads. When the outer is split more ways than the inner has
indices, the extra axes must each give an outer block exactly one inner index, which the rule's ``local`` hook
picks from its block (what vLLM's key/value heads duplicated to the tensor-parallel degree compute).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Callable, Protocol, Sequence

from bmc.ir.graph import Node, Value
from bmc.ir.types import TensorType
from bmc.sharding.mesh import Mesh
from bmc.sharding.spec import Spec

KINDS = ("pass", "reduction", "replicate")
COMBINES = ("sum", "max", "min")  # how the shards of a split reduction combine

DimFactors = tuple[int, ...]  # factor indices making up one tensor dim, major to minor
Assignment = tuple[tuple[str, ...], ...]  # per factor: the mesh axes splitting it, major to minor


@dataclass(frozen=True)
class Factor:
    name: str
    size: int
    kind: str = "pass"
    combine: str = "sum"  # a reduction's: "sum" leaves partial sums, "max"/"min" are all-reduced after the op

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown factor kind {self.kind}")
        if self.combine not in COMBINES:
            raise ValueError(f"unknown combine {self.combine}")


class LocalContext(Protocol):
    """What a rule's ``local`` hook may use while the partitioner emits one device's program."""

    mesh: Mesh

    def emit(self, op: str, inputs: Sequence[Value], names: Sequence[str | None] = (), **attrs) -> list[Value]:
        """Add ``op(inputs) {attrs}`` to the program; its results (named from ``names`` where given)."""
        ...

    def constant(self, value, dtype: str | None = None) -> Value: ...

    def block_index(self, axes: tuple[str, ...]) -> Value:
        """int64 scalar: this device's block index over ``axes`` (major to minor), computed from its coordinate."""
        ...

    def all_reduce(self, x: Value, axes: tuple[str, ...], reduce: str) -> Value:
        """``x`` reduced (``sum``/``max``/``min``) over the devices that differ from this one only along ``axes``."""
        ...


LocalFn = Callable[[LocalContext, Node, list[Value], Assignment, "ShardingRule"], list[Value]]
#: the all-reduces a ``local`` hook runs under a strategy: (mesh axes, global type, spec) of each reduced tensor
InnerFn = Callable[[Assignment], list[tuple[tuple[str, ...], TensorType, Spec]]]


@dataclass(frozen=True)
class ShardingRule:
    factors: tuple[Factor, ...]
    operands: tuple[tuple[DimFactors, ...], ...]
    results: tuple[tuple[DimFactors, ...], ...]
    local: LocalFn | None = field(default=None, compare=False)
    inner: InnerFn | None = field(default=None, compare=False)
    grouped: tuple[tuple[int, int], ...] = ()  # (outer, inner) factor pairs, see the module docstring

    def __post_init__(self):
        n = len(self.factors)
        for side in (self.operands, self.results):
            for dims in side:
                for d in dims:
                    if any(not 0 <= f < n for f in d):
                        raise ValueError(f"rule refers to factor {d} outside 0..{n - 1}")
        if any(self.factors[f].kind == "reduction" for dims in self.results for d in dims for f in d):
            raise ValueError("a reduction factor cannot appear in a result")

    # ---- specs from a strategy -----------------------------------------------------------------------------------
    def dim_axes(self, dim: DimFactors, assignment: Assignment) -> tuple[str, ...]:
        return tuple(a for f in dim for a in assignment[f])

    def operand_specs(self, assignment: Assignment) -> list[Spec]:
        return [Spec(tuple(self.dim_axes(d, assignment) for d in dims)) for dims in self.operands]

    def result_specs(self, assignment: Assignment) -> list[Spec]:
        partial = tuple(a for i, f in enumerate(self.factors) if f.kind == "reduction" and f.combine == "sum"
                        for a in assignment[i])
        return [Spec(tuple(self.dim_axes(d, assignment) for d in dims), partial) for dims in self.results]

    def combined(self, assignment: Assignment) -> list[tuple[str, tuple[str, ...]]]:
        """``(max|min, mesh axes)`` of the split max/min reductions: every result is all-reduced over those axes
        right after the op (a partial extremum is no spec a value can carry)."""
        out: dict[str, tuple[str, ...]] = {}
        for f, axes in zip(self.factors, assignment):
            if f.kind == "reduction" and f.combine != "sum" and axes:
                out[f.combine] = out.get(f.combine, ()) + tuple(axes)
        return list(out.items())

    def check(self, assignment: Assignment, mesh: Mesh) -> str | None:
        """Why ``assignment`` is not a valid strategy for this rule on ``mesh`` (None when it is)."""
        if len(assignment) != len(self.factors):
            return f"{len(assignment)} factor assignments for {len(self.factors)} factors"
        derived = {i for _, i in self.grouped}
        used = [a for f, axes in enumerate(assignment) if f not in derived for a in axes]
        if len(used) != len(set(used)):
            return "a mesh axis splits two factors"
        for outer, inner in self.grouped:
            want = self.nested_axes(outer, inner, assignment[outer], mesh)
            o, i = self.factors[outer], self.factors[inner]
            if want is None:
                return (f"factor {o.name} (size {o.size}) split {prod(mesh.axis(a).size for a in assignment[outer])} "
                        f"ways would cut a group of the {i.size} {i.name} it reads")
            if assignment[inner] != want:
                return f"factor {i.name} takes {want or 'no axes'} of {o.name}'s, not {assignment[inner]}"
        for f, axes in zip(self.factors, assignment):
            if not axes:
                continue
            if f.kind == "replicate":
                return f"factor {f.name} may not be split"
            n = prod(mesh.axis(a).size for a in axes)
            if f.size % n:
                return f"factor {f.name} of size {f.size} is not divisible by {n} ({', '.join(axes)})"
        return self._compound_violation(assignment, mesh)

    def _compound_violation(self, assignment: Assignment, mesh: Mesh) -> str | None:
        """In a dim made of several factors, a split factor needs every factor major to it split completely, or a
        device's elements are not one contiguous block."""
        for side in (self.operands, self.results):
            for dims in side:
                for dim in dims:
                    for pos, f in enumerate(dim):
                        if not assignment[f]:
                            continue
                        for g in dim[:pos]:
                            n = prod(mesh.axis(a).size for a in assignment[g])
                            if n != self.factors[g].size:
                                return (f"factor {self.factors[f].name} is split but factor {self.factors[g].name} "
                                        f"(size {self.factors[g].size}) major to it in the same dim is split {n} "
                                        "ways, so the shards would not be contiguous blocks")
        return None

    def replicated(self) -> Assignment:
        return ((),) * len(self.factors)

    # ---- grouped factor pairs ----------------------------------------------------------------------------------
    def splittable(self) -> list[int]:
        """The factors a strategy assigns axes to directly (inner factors of grouped pairs are derived)."""
        derived = {i for _, i in self.grouped}
        return [f for f, fac in enumerate(self.factors)
                if fac.kind != "replicate" and fac.size > 1 and f not in derived]

    def nested_axes(self, outer: int, inner: int, axes: tuple[str, ...], mesh: Mesh) -> tuple[str, ...] | None:
        """The axes of the inner factor when the outer takes ``axes``: all of them when they divide it; else, when
        the inner's size divides their product (each outer block reads one inner index), the longest major prefix
        that divides it; None when an outer block would read part of a group."""
        size, n = self.factors[inner].size, prod(mesh.axis(a).size for a in axes)
        if size % n == 0:
            return tuple(axes)
        if n % size:
            return None
        k = len(axes)
        while size % prod(mesh.axis(a).size for a in axes[:k]):
            k -= 1
        return tuple(axes[:k])

    def complete(self, assignment: Assignment, mesh: Mesh) -> Assignment:
        """``assignment`` with every grouped pair's inner factor given its derived axes (none where invalid)."""
        if not self.grouped:
            return assignment
        a = list(assignment)
        for outer, inner in self.grouped:
            a[inner] = self.nested_axes(outer, inner, a[outer], mesh) or ()
        return tuple(a)



def factor_of_dim(rule: ShardingRule, operand: int | None, result: int | None, dim: int) -> DimFactors:
    """The factors of one dim of an operand (or, with ``operand=None``, of a result)."""
    side = rule.operands[operand] if operand is not None else rule.results[result]
    return side[dim]
