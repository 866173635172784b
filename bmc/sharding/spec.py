"""Sharding specs: how one tensor is laid out over a mesh.

For each tensor dim, an ordered tuple of mesh axes (major to minor; empty = not split), plus ``partial``: the axes
over which the value is an unreduced sum. Each mesh axis appears at most once per tensor. Text form::

    [{x}, {}, {y}]            dim 0 split over x, dim 2 over y
    [{x, y}, {}] partial{z}   dim 0 split over x (major) then y; every device holds a partial sum over z

Dim ``d`` split over axes ``(a1, a2)`` is cut into ``size(a1) * size(a2)`` equal blocks; the device at mesh
coordinate ``c`` holds block ``c[a1] * size(a2) + c[a2]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

from bmc.errors import UsageError
from bmc.sharding.mesh import Mesh

SPEC_GRAMMAR = "[{AXES}, {AXES}, ...] [partial{AXES}] with AXES a comma-separated list of mesh axis names, e.g. " \
               "[{x}, {}, {y}] or [{}, {x,y}] partial{z}"


class SpecError(ValueError):
    """A spec that does not fit a shape or mesh; callers turn it into a located user error."""


@dataclass(frozen=True)
class Spec:
    dims: tuple[tuple[str, ...], ...]
    partial: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "dims", tuple(tuple(d) for d in self.dims))
        object.__setattr__(self, "partial", tuple(self.partial))
        used = [a for d in self.dims for a in d] + list(self.partial)
        if len(used) != len(set(used)):
            raise SpecError(f"spec {self} uses a mesh axis more than once")

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def replicated(cls, rank: int) -> "Spec":
        return cls(((),) * rank)

    @classmethod
    def parse(cls, text: str) -> "Spec":
        t = text.strip()
        m = re.fullmatch(r"\[(.*?)\]\s*(?:partial\s*\{([^{}]*)\})?", t, re.S)
        if not m:
            raise SpecError(f"cannot read spec {text!r}; write it as {SPEC_GRAMMAR}")
        body, partial = m.group(1).strip(), m.group(2)
        dims = []
        if body:
            parts = re.findall(r"\{([^{}]*)\}|([^,\s][^,]*)", body)
            for braced, bare in parts:
                if bare:
                    raise SpecError(f"cannot read spec {text!r}: {bare.strip()!r} is not in braces; "
                                    f"write it as {SPEC_GRAMMAR}")
                dims.append(_axes(braced, text))
            if re.sub(r"\{[^{}]*\}|[,\s]", "", body):
                raise SpecError(f"cannot read spec {text!r}; write it as {SPEC_GRAMMAR}")
        return cls(tuple(dims), _axes(partial or "", text))

    # ---- queries ------------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return len(self.dims)

    def axes(self) -> tuple[str, ...]:
        """Every axis the spec uses (dims major to minor, then partial)."""
        return tuple(a for d in self.dims for a in d) + self.partial

    def is_replicated(self) -> bool:
        return not self.axes()

    def dim_of(self, axis: str) -> int | None:
        for i, d in enumerate(self.dims):
            if axis in d:
                return i
        return None

    def num_shards(self, dim: int, mesh: Mesh) -> int:
        return prod(mesh.axis(a).size for a in self.dims[dim])

    def validate(self, shape: tuple[int, ...], mesh: Mesh) -> None:
        """Raise SpecError unless the spec names only mesh axes, matches the rank and splits dims evenly."""
        if len(self.dims) != len(shape):
            raise SpecError(f"spec {self} has {len(self.dims)} dims but the tensor has rank {len(shape)} "
                            f"(shape {tuple(shape)})")
        unknown = [a for a in self.axes() if a not in mesh.names]
        if unknown:
            raise SpecError(f"spec {self} names axis {', '.join(unknown)}, which mesh {mesh} "
                            f"(axes {', '.join(mesh.names)}) does not have")
        for i, d in enumerate(shape):
            n = self.num_shards(i, mesh)
            if d % n:
                raise SpecError(f"dim {i} of shape {tuple(shape)} (size {d}) is not divisible by {n} "
                                f"(axes {', '.join(self.dims[i])})")

    def local_shape(self, shape: tuple[int, ...], mesh: Mesh) -> tuple[int, ...]:
        return tuple(d // self.num_shards(i, mesh) for i, d in enumerate(shape))

    def block_index(self, dim: int, mesh: Mesh, coord: tuple[int, ...]) -> int:
        """Which block of ``dim`` the device at ``coord`` holds."""
        idx = 0
        for a in self.dims[dim]:
            k = mesh.names.index(a)
            idx = idx * mesh.shape[k] + coord[k]
        return idx

    def block_slices(self, shape: tuple[int, ...], mesh: Mesh, coord: tuple[int, ...]) -> tuple[slice, ...]:
        """Where the block the device at ``coord`` holds lies in a tensor of global ``shape``."""
        out = []
        for dim, size in enumerate(shape):
            chunk = size // self.num_shards(dim, mesh)
            b = self.block_index(dim, mesh, coord)
            out.append(slice(b * chunk, (b + 1) * chunk))
        return tuple(out)

    # ---- derived specs ------------------------------------------------------------------------------------------
    def with_dim(self, dim: int, axes: tuple[str, ...]) -> "Spec":
        return Spec(self.dims[:dim] + (tuple(axes),) + self.dims[dim + 1:], self.partial)

    def with_partial(self, partial: tuple[str, ...]) -> "Spec":
        return Spec(self.dims, tuple(partial))

    def onto(self, mesh: Mesh) -> "Spec":
        """This spec on ``mesh``, a view that may cut the axes it names into parts (``Mesh.split_axis``): each such
        axis becomes its parts, major first, which lays every tensor out as before."""
        parts = mesh.parts()
        if not parts:
            return self

        def sub(axes):
            return tuple(b for a in axes for b in parts.get(a, (a,)))

        return Spec(tuple(sub(d) for d in self.dims), sub(self.partial))

    def __str__(self) -> str:
        body = ", ".join("{" + ",".join(d) + "}" for d in self.dims)
        return f"[{body}]" + (" partial{" + ",".join(self.partial) + "}" if self.partial else "")


def _axes(text: str, whole: str) -> tuple[str, ...]:
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", a)]
    if bad:
        raise SpecError(f"cannot read spec {whole!r}: {bad[0]!r} is not a mesh axis name")
    return names


def parse_spec_flag(text: str, flag: str = "--shard") -> tuple[str, Spec]:
    """``--shard NAME=SPEC`` (or another ``flag`` of that form; split on the first '=' followed by '[')."""
    m = re.fullmatch(r"(.+?)=(\[.*)", text.strip(), re.S)
    if not m:
        raise UsageError(f"malformed {flag} value {text!r}", where=flag, fix=f"write NAME=SPEC with SPEC as "
                         f"{SPEC_GRAMMAR}")
    try:
        return m.group(1), Spec.parse(m.group(2))
    except SpecError as e:
        raise UsageError(str(e), where=f"{flag} {text}") from None
