"""Abstract device meshes: named axes with sizes and per-axis latency (α) and bandwidth (β).

Text form: ``8x8`` (axes named x, y, z, w by default), ``--mesh-axes dp,tp`` renames them. A mesh is a frozen
value: it is printed, parsed, hashed and serialized, never bound to devices (the runtime maps ranks onto it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

from bmc.errors import UsageError

DEFAULT_AXIS_NAMES = ("x", "y", "z", "w")
MAX_RANK = 4
GRAMMAR = "SIZE[xSIZE...] with 1 to 4 positive integers, e.g. 8, 2x4, 8x8 or 2x2x2"
_MESH = re.compile(r"[1-9][0-9]*(x[1-9][0-9]*){0,3}\Z")
_AXIS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class MeshAxis:
    name: str
    size: int
    latency_s: float = 10e-6  # α: per-collective start-up cost
    bandwidth_Bps: float = 100e9  # 1/β: bytes per second per device on this axis


@dataclass(frozen=True)
class Mesh:
    axes: tuple[MeshAxis, ...]

    def __post_init__(self):
        names = [a.name for a in self.axes]
        if not 1 <= len(names) <= MAX_RANK:
            raise UsageError(f"a mesh has 1 to {MAX_RANK} axes, got {len(names)}", where="--mesh", fix=GRAMMAR)
        if len(set(names)) != len(names):
            raise UsageError(f"mesh axis names {names} repeat a name", where="--mesh-axes",
                             fix="give each axis a distinct name, e.g. --mesh-axes dp,tp")
        if any(a.size < 1 for a in self.axes):
            raise UsageError("mesh axis sizes must be positive", where="--mesh", fix=GRAMMAR)

    @classmethod
    def parse(cls, text: str, axis_names: str | None = None) -> "Mesh":
        """Parse ``--mesh`` (and ``--mesh-axes``); any malformed text is a usage error showing the grammar."""
        t = text.strip()
        if not _MESH.match(t):
            raise UsageError(f"invalid mesh {text!r}", where="--mesh", fix=f"write it as {GRAMMAR}")
        sizes = [int(s) for s in t.split("x")]
        if axis_names is None:
            names = list(DEFAULT_AXIS_NAMES[:len(sizes)])
        else:
            names = [n.strip() for n in axis_names.split(",")]
            if len(names) != len(sizes):
                raise UsageError(f"--mesh-axes names {len(names)} axes but the mesh {text!r} has {len(sizes)}",
                                 where="--mesh-axes", fix="give exactly one name per mesh axis, e.g. dp,tp for 2x4")
            bad = [n for n in names if not _AXIS.match(n)]
            if bad:
                raise UsageError(f"invalid mesh axis name(s) {bad}", where="--mesh-axes",
                                 fix="axis names are identifiers such as dp, tp, x")
        return cls(tuple(MeshAxis(n, s) for n, s in zip(names, sizes)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    @property
    def size(self) -> int:
        return prod(self.shape)

    def axis(self, name: str) -> MeshAxis:
        for a in self.axes:
            if a.name == name:
                return a
        raise KeyError(name)

    def coordinate(self, rank: int) -> tuple[int, ...]:
        """Row-major mesh coordinate of a rank (the last axis varies fastest)."""
        coord = []
        for size in reversed(self.shape):
            coord.append(rank % size)
            rank //= size
        return tuple(reversed(coord))

    def __str__(self) -> str:
        return "x".join(map(str, self.shape))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "axes": list(self.names)}
