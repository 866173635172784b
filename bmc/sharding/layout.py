"""Numpy views of a spec: cut a global array into one device's shard, and put the shards back together.

These are the ground truth for what a spec means; the partitioner, the simulator and the rule checker all use them.
"""

from __future__ import annotations

import itertools
from typing import Mapping

import numpy as np

from bmc.ir.tensor import Tensor
from bmc.ir.types import TensorType
from bmc.sharding.mesh import Mesh
from bmc.sharding.spec import Spec


def coordinates(mesh: Mesh) -> list[tuple[int, ...]]:
    """Every device's mesh coordinate, in rank order (row-major)."""
    return list(itertools.product(*(range(s) for s in mesh.shape)))


def shard(array: np.ndarray, spec: Spec, mesh: Mesh, coord: tuple[int, ...]) -> np.ndarray:
    """The block of ``array`` that the device at ``coord`` holds under ``spec`` (partial axes: device 0 along each
    partial axis holds the value, the others zeros — one valid decomposition of a sum)."""
    local = np.require(array[spec.block_slices(array.shape, mesh, coord)], requirements="C").copy()
    if any(coord[mesh.names.index(a)] for a in spec.partial):
        local[...] = 0
    return local


def unshard(shards: Mapping[tuple[int, ...], np.ndarray], spec: Spec, mesh: Mesh) -> np.ndarray:
    """The global value from every device's shard: blocks put in place, partial axes summed. Devices that differ
    only along axes the spec does not use are replicas; the first one is read (``replica_mismatch`` checks them)."""
    first = next(iter(shards.values()))
    shape = tuple(d * spec.num_shards(i, mesh) for i, d in enumerate(first.shape))
    out = np.zeros(shape, dtype=first.dtype)
    replica_axes = [i for i, a in enumerate(mesh.names) if a not in spec.axes()]
    for coord, local in shards.items():
        if any(coord[i] for i in replica_axes):
            continue
        index = spec.block_slices(shape, mesh, coord)
        if spec.partial:
            out[index] += local
        else:
            out[index] = local
    return out


def replica_mismatch(shards: Mapping[tuple[int, ...], np.ndarray], spec: Spec, mesh: Mesh,
                     atol: float = 0.0) -> float:
    """Largest difference between a shard and its replica on coordinate 0 of the unused axes (0 if consistent)."""
    replica_axes = [i for i, a in enumerate(mesh.names) if a not in spec.axes()]
    worst = 0.0
    for coord, local in shards.items():
        base = tuple(0 if i in replica_axes else c for i, c in enumerate(coord))
        if base != coord:
            diff = np.abs(local.astype(np.float64) - shards[base].astype(np.float64))
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


class ShardTensor(Tensor):
    """One device's block of a (lazy) global weight; read only when asked (each rank reads only its bytes)."""

    def __init__(self, base: Tensor, spec: Spec, mesh: Mesh, coord: tuple[int, ...]):
        self.base, self.spec, self.mesh, self.coord = base, spec, mesh, coord
        self.type = TensorType(base.type.dtype, spec.local_shape(base.type.shape, mesh))

    def at(self, coord: tuple[int, ...]) -> "ShardTensor":
        return ShardTensor(self.base, self.spec, self.mesh, coord)

    def numpy(self) -> np.ndarray:
        return shard(self.base.numpy(), self.spec, self.mesh, self.coord)

    def describe(self) -> str:
        return f"shard {self.spec} @ {self.coord} of {self.base.describe()}"
