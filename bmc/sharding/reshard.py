"""The reshard table: the one place that says which collectives take a value from one spec to another, and what
they cost. The partitioner emits exactly these steps and the cost model prices exactly these steps, so estimated and
generated communication cannot disagree.

Order of steps for ``src → dst`` (both validated for the same shape and mesh):
  1. pending sums: an axis that ``dst`` splits a dim over (as the next minor axis of that dim) → ``reduce_scatter``
     on that dim; every other partial axis → one ``all_reduce`` over all of them;
  2. an axis that leaves the minor end of one dim and joins the minor end of another → ``all_to_all``;
  3. axes ``dst`` does not keep on a dim (everything after the common prefix) → ``all_gather`` on that dim;
  4. axes ``dst`` adds to a dim → ``local_slice`` (each device keeps its block; no communication).
Costs follow α + β·bytes with the ring formulas; a group spanning several axes uses the slowest axis's α and β.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from bmc.ir.types import TensorType
from bmc.sharding.mesh import Mesh
from bmc.sharding.spec import Spec

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")


@dataclass(frozen=True)
class Step:
    """One reshard step on a tensor whose spec before the step is ``before``."""

    kind: str  # all_reduce | reduce_scatter | all_gather | all_to_all | local_slice
    axes: tuple[str, ...]
    before: Spec
    after: Spec
    dim: int = -1  # all_gather / reduce_scatter / local_slice: the tensor dim; all_to_all: the dim gathered
    dim2: int = -1  # all_to_all: the dim newly split
    reduce: str = "sum"  # all_reduce: sum (a pending partial sum), or max/min (a split max/min reduction's result)

    def group_size(self, mesh: Mesh) -> int:
        return prod(mesh.axis(a).size for a in self.axes)

    def bytes_per_device(self, global_type: TensorType, mesh: Mesh) -> int:
        """Bytes each device sends (ring algorithms), from the local sizes before and after the step."""
        if self.kind == "local_slice":
            return 0
        n = self.group_size(mesh)
        local_in = TensorType(global_type.dtype, self.before.local_shape(global_type.shape, mesh)).nbytes
        local_out = TensorType(global_type.dtype, self.after.local_shape(global_type.shape, mesh)).nbytes
        if self.kind == "all_reduce":
            return int(2 * (n - 1) / n * local_in)
        if self.kind == "reduce_scatter":
            return int((n - 1) / n * local_in)
        if self.kind == "all_gather":
            return int((n - 1) / n * local_out)
        return int((n - 1) / n * local_in)  # all_to_all: every device keeps 1/n of its data

    def time_s(self, global_type: TensorType, mesh: Mesh) -> float:
        if self.kind == "local_slice":
            return 0.0
        axes = [mesh.axis(a) for a in self.axes]
        alpha = max(a.latency_s for a in axes)
        bandwidth = min(a.bandwidth_Bps for a in axes)
        return alpha + self.bytes_per_device(global_type, mesh) / bandwidth


def plan_reshard(src: Spec, dst: Spec, mesh: Mesh) -> list[Step]:
    """The steps that turn a value laid out as ``src`` into ``dst`` (empty when they are equal)."""
    if dst.partial and not set(dst.partial) <= set(src.partial):
        raise ValueError(f"cannot reshard {src} to {dst}: a value only becomes partial by computation")
    steps: list[Step] = []
    cur = src
    # 1. pending sums
    keep = tuple(a for a in cur.partial if a in dst.partial)
    scatter = []
    for a in cur.partial:
        if a in keep:
            continue
        d = dst.dim_of(a)
        if d is not None:
            want = dst.dims[d]
            have = cur.dims[d]
            if want[:len(have) + 1] == have + (a,):
                scatter.append((a, d))
    reduce_axes = tuple(a for a in cur.partial if a not in keep and a not in dict(scatter))
    if reduce_axes:
        nxt = cur.with_partial(tuple(a for a in cur.partial if a not in reduce_axes))
        steps.append(Step("all_reduce", reduce_axes, cur, nxt))
        cur = nxt
    for a, d in scatter:
        nxt = Spec(cur.dims[:d] + (cur.dims[d] + (a,),) + cur.dims[d + 1:], tuple(p for p in cur.partial if p != a))
        steps.append(Step("reduce_scatter", (a,), cur, nxt, dim=d))
        cur = nxt
    # 2. single axes moving between the minor ends of two dims
    for i in range(cur.rank):
        while cur.dims[i] and not _keeps(cur.dims[i], dst.dims[i]):
            a = cur.dims[i][-1]
            j = dst.dim_of(a)
            if j is None or j == i or dst.dims[j][:len(cur.dims[j]) + 1] != cur.dims[j] + (a,):
                break
            nxt = Spec(tuple(d[:-1] if k == i else d + (a,) if k == j else d for k, d in enumerate(cur.dims)),
                       cur.partial)
            steps.append(Step("all_to_all", (a,), cur, nxt, dim=i, dim2=j))
            cur = nxt
    # 3. gathers
    for i in range(cur.rank):
        prefix = _common_prefix(cur.dims[i], dst.dims[i])
        extra = cur.dims[i][len(prefix):]
        if extra:
            nxt = cur.with_dim(i, prefix)
            steps.append(Step("all_gather", extra, cur, nxt, dim=i))
            cur = nxt
    # 4. local slices
    for i in range(cur.rank):
        add = dst.dims[i][len(cur.dims[i]):]
        if add:
            nxt = cur.with_dim(i, dst.dims[i])
            steps.append(Step("local_slice", add, cur, nxt, dim=i))
            cur = nxt
    assert cur == dst, f"reshard {src} -> {dst} ended at {cur}"
    return steps


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _keeps(have: tuple[str, ...], want: tuple[str, ...]) -> bool:
    return want[:len(have)] == have


def reshard_cost(src: Spec, dst: Spec, global_type: TensorType, mesh: Mesh) -> float:
    """Seconds to reshard one value (0 when the specs are equal)."""
    return sum(s.time_s(global_type, mesh) for s in plan_reshard(src, dst, mesh))
