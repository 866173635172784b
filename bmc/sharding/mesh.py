"""Abstract device meshes: named axes with sizes and per-axis latency (α) and bandwidth (β).

Text form: ``8x8`` (axes named x, y, z, w by default), ``--mesh-axes dp,tp`` renames them. A mesh is a frozen
value: it is printed, parsed, hashed and serialized, never bound to devices (the runtime maps ranks onto it).

A *view* of a mesh cuts one axis into two (:meth:`Mesh.split_axis`: ``tp`` of 4 as ``tp_0`` of 2, major, and
``tp_1`` of 2), as Shardy's sub-axes ``tp:(1)2`` and ``tp:(2)2`` do: the ranks and their order stay, and a tensor
split over ``(tp_0, tp_1)`` is laid out as one split over ``tp``; a plan on the view may also split a tensor over
the major part alone (Megatron's key/value heads when they are fewer than the devices, ``manual.megatron_view``).
Each part remembers the axis it came from (``MeshAxis.part_of``), so specs written for the mesh carry over
(``Spec.onto``).
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
    part_of: str | None = None  # in a view of a mesh: the axis this one is a part of


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

    def split_axis(self, name: str, major: int) -> "Mesh":
        """The view with axis ``name`` cut into a major part of ``major`` devices and a minor part of the rest (links
        as the axis's; the parts are named ``NAME_0`` and ``NAME_1``, with more underscores where those are taken)."""
        a = self.axis(name)
        if a.size % major or not 1 < major < a.size:
            raise ValueError(f"cannot split mesh axis {name} of {a.size} devices into a major part of {major}")
        sep = "_"
        while {f"{name}{sep}0", f"{name}{sep}1"} & set(self.names):
            sep += "_"
        origin = a.part_of or name
        parts = (MeshAxis(f"{name}{sep}0", major, a.latency_s, a.bandwidth_Bps, origin),
                 MeshAxis(f"{name}{sep}1", a.size // major, a.latency_s, a.bandwidth_Bps, origin))
        k = self.names.index(name)
        return Mesh(self.axes[:k] + parts + self.axes[k + 1:])

    def parts(self) -> dict[str, tuple[str, ...]]:
        """The axes of the mesh this view was made from that it cut, each with its parts (major first)."""
        out: dict[str, tuple[str, ...]] = {}
        for a in self.axes:
            if a.part_of is not None:
                out[a.part_of] = out.get(a.part_of, ()) + (a.name,)
        return out

    def describe_parts(self) -> str:
        """The axes this view cuts, in words: ``x as x_0 (2, major) by x_1 (2)``."""
        return "; ".join(f"{a} as " + " by ".join(f"{p} ({self.axis(p).size}{', major' if i == 0 else ''})"
                                                  for i, p in enumerate(ps)) for a, ps in self.parts().items())

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
        parts = self.parts()
        return {"shape": list(self.shape), "axes": list(self.names)} | (
            {"parts": {k: list(v) for k, v in parts.items()}} if parts else {})
