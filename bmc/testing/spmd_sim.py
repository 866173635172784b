"""In-process mesh simulator: runs a partitioned (local) program for every mesh coordinate in lockstep, with the
collectives simulated in numpy, and reassembles the global outputs from their specs.

This is the oracle every sharding rewrite is checked against (with the reference interpreter on the global graph).
It also counts the bytes each collective moves, so the plan's accounting can be checked against what ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from bmc.ir.graph import Graph
from bmc.ir.types import np_dtype
from bmc.ops import get_op
from bmc.ops.collective import GROUP_REFERENCE
from bmc.sharding.layout import ShardTensor, coordinates, replica_mismatch, shard, unshard
from bmc.sharding.partition import MESH_COORD, LocalProgram
from bmc.sharding.spec import Spec


@dataclass
class SimResult:
    outputs: dict[str, np.ndarray]
    collective_bytes: list[int] = field(default_factory=list)  # per collective node, bytes each device sent
    replica_error: float = 0.0  # largest disagreement between devices that should hold the same data


def _ring_bytes(kind: str, n: int, local_in: np.ndarray, local_out: np.ndarray) -> int:
    if kind == "all_reduce":
        return int(2 * (n - 1) / n * local_in.nbytes)
    if kind == "all_gather":
        return int((n - 1) / n * local_out.nbytes)
    return int((n - 1) / n * local_in.nbytes)  # reduce_scatter, all_to_all


def run_lockstep(graph: Graph, envs: dict[tuple[int, ...], dict[int, np.ndarray]]) -> list[int]:
    """Run ``graph``'s nodes on every device (``envs``: per mesh coordinate, value id → array, holding the inputs
    and parameters; the results are added), each collective across its groups; returns the bytes each device
    sent per collective node."""
    coords = list(envs)
    moved: list[int] = []
    for node in graph.nodes:
        op = get_op(node.op)
        if not op.collective:
            for c in coords:
                outs = op.reference([envs[c][id(v)] for v in node.inputs], node.attrs)
                for v, a in zip(node.outputs, outs):
                    envs[c][id(v)] = np.asarray(a)
            continue
        axes = node.attrs["axes"]
        groups: dict[tuple, list[tuple[int, ...]]] = {}
        for c in coords:
            key = tuple(x for k, x in enumerate(c) if k not in axes)
            groups.setdefault(key, []).append(c)
        for members in groups.values():
            members.sort(key=lambda c: tuple(c[k] for k in axes))  # group order = block order (major → minor)
            xs = [envs[c][id(node.inputs[0])] for c in members]
            outs = GROUP_REFERENCE[node.op](xs, node.attrs)
            for c, o in zip(members, outs):
                envs[c][id(node.outputs[0])] = o
        c0 = coords[0]
        moved.append(_ring_bytes(node.op, node.attrs["group_size"], envs[c0][id(node.inputs[0])],
                                 envs[c0][id(node.outputs[0])]))
    return moved


def simulate(prog: LocalProgram, inputs: Mapping[str, np.ndarray]) -> SimResult:
    mesh, graph = prog.mesh, prog.graph
    coords = coordinates(mesh)
    envs = feed(prog, inputs)
    moved = run_lockstep(graph, envs)
    result = SimResult({}, moved)
    for gv, lv in zip(prog.global_graph.outputs, graph.outputs):
        spec = prog.plan.output_specs.get(gv.name, Spec.replicated(gv.type.rank))
        shards = {c: envs[c][id(lv)] for c in coords}
        result.replica_error = max(result.replica_error, replica_mismatch(shards, spec, mesh))
        result.outputs[gv.name] = unshard(shards, spec, mesh)
    return result


def feed(prog: LocalProgram, inputs: Mapping[str, np.ndarray]) -> dict[tuple[int, ...], dict[int, np.ndarray]]:
    """Every device's environment before the run: its inputs (its block of those fed as blocks, its mesh
    coordinate) and its weights, keyed by ``id`` of the local program's values."""
    mesh, graph = prog.mesh, prog.graph
    coords = coordinates(mesh)
    envs: dict[tuple[int, ...], dict[int, np.ndarray]] = {c: {} for c in coords}
    for v in graph.inputs:
        fed = prog.plan.input_specs.get(v.name)  # an input fed as blocks: each device gets its own
        for c in coords:
            envs[c][id(v)] = (np.array(c, dtype=np.int64) if v.name == MESH_COORD else
                              shard(np.asarray(inputs[v.name]).astype(np_dtype(v.type.dtype)), fed, mesh, c)
                              if fed is not None else
                              np.asarray(inputs[v.name]).astype(np_dtype(v.type.dtype), copy=False))
    for p in graph.params:
        data = graph.weights[p.name]
        for c in coords:
            envs[c][id(p)] = data.at(c).numpy() if isinstance(data, ShardTensor) else data.numpy()
    return envs
