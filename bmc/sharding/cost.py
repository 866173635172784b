"""The cost model of a sharding plan: device profiles, mesh link defaults, per-node compute time under a strategy,
edge resharding time (from the one reshard table), per-device memory, and the flag parsers that override them.

Compute is a roofline on the *local* types a strategy gives a node (global shapes divided by its operand and result
specs): ``max(flops / peak(dtype), bytes / memory bandwidth)`` with the op table's ``cost`` facet. Communication is
``reshard_cost`` (α + β·bytes, ring formulas). Memory per device is the weights in the specs the plan stores them in
plus the activations live at each step of the graph's (topological) node order.

Numbers: ANCHORS.md "Cost model formulas" (H100 SXM: 989 TFLOP/s bf16, 67 TFLOP/s fp32, 80 GB at 3.35 TB/s; links
~400 GB/s α≈7 µs inside a node, ~45 GB/s α≈15 µs between nodes); A100 SXM 80 GB from NVIDIA's data sheet (312 TFLOP/s
bf16/fp16, 19.5 TFLOP/s fp32, 2.04 TB/s).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

import numpy as np

from bmc.errors import UsageError
from bmc.ir.graph import Graph, Node
from bmc.ir.types import TensorType
from bmc.ops import OPS
from bmc.sharding.mesh import Mesh
from bmc.sharding.reshard import Step
from bmc.sharding.rules import Assignment, ShardingRule
from bmc.sharding.spec import Spec


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator: dense peak FLOP/s per dtype (``fp32`` covers every other dtype), memory bandwidth and size."""

    name: str
    peak_flops: tuple[tuple[str, float], ...]  # (dtype, FLOP/s); a tuple of pairs keeps the profile hashable
    mem_bandwidth_Bps: float
    memory_bytes: int

    def peak(self, dtype: str) -> float:
        table = dict(self.peak_flops)
        return table.get(dtype, table["float32"])

    def to_json(self) -> dict:
        return {"name": self.name, "peak_flops": dict(self.peak_flops), "mem_bandwidth_Bps": self.mem_bandwidth_Bps,
                "memory_bytes": self.memory_bytes}


DEVICES: dict[str, DeviceProfile] = {
    "h100": DeviceProfile("h100", (("float32", 67e12), ("float16", 989e12), ("bfloat16", 989e12)), 3.35e12, 80 * 10**9),
    "a100": DeviceProfile("a100", (("float32", 19.5e12), ("float16", 312e12), ("bfloat16", 312e12)), 2.04e12,
                          80 * 10**9),
}
DEFAULT_DEVICE = "h100"

# (latency α in s, bandwidth in B/s per device) of the links between nodes and inside a node
INTER_NODE = (15e-6, 45e9)
INTRA_NODE = (7e-6, 400e9)


# ---------------------------------------------------------------------------------------------------------------
# Flags: --device, --mesh-bandwidth, --memory-per-device

SIZE_GRAMMAR = "NUMBER[UNIT] with UNIT one of B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB, e.g. 80GB"
BANDWIDTH_GRAMMAR = ("AXIS=SIZE[/s][@LATENCY],... with SIZE a NUMBER and a UNIT (" + SIZE_GRAMMAR.split(" with UNIT ")[1] + ")"
                     
                     " and LATENCY like 15us or 0.01ms, e.g. x=45GB,y=400GB@7us")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = r"([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)"


def parse_size(text: str, flag: str = "--memory-per-device") -> int:
    """``80GB`` → 80·10⁹ bytes; a usage error showing the grammar otherwise."""
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-z]*)", text.strip())
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"invalid size {text!r}", where=flag, fix=f"write it as {SIZE_GRAMMAR}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_device(text: str) -> DeviceProfile:
    """``--device h100|a100``."""
    key = text.strip().lower()
    if key not in DEVICES:
        raise UsageError(f"unknown device {text!r}", where="--device", fix=f"use one of {', '.join(DEVICES)}")
    return DEVICES[key]


def parse_mesh_bandwidth(text: str, mesh: Mesh | None = None) -> dict[str, tuple[float, float | None]]:
    """``--mesh-bandwidth x=45GB,y=400GB@7us`` → {axis: (bytes/s, latency s or None)}; axes checked against
    ``mesh`` when given."""
    out: dict[str, tuple[float, float | None]] = {}
    for part in [p.strip() for p in text.split(",")]:
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*" + _NUMBER + r"\s*([A-Za-z]*)(?:/s)?"
                         r"(?:@" + _NUMBER + r"\s*(s|ms|us|µs|ns))?", part)
        if not m or not m.group(3) or m.group(3).lower() not in _UNITS or float(m.group(2)) <= 0:
            raise UsageError(f"invalid --mesh-bandwidth entry {part!r}", where="--mesh-bandwidth",
                             fix=f"write it as {BANDWIDTH_GRAMMAR}")
        axis = m.group(1)
        if axis in out:
            raise UsageError(f"--mesh-bandwidth names axis {axis!r} twice", where="--mesh-bandwidth",
                             fix=f"write it as {BANDWIDTH_GRAMMAR}")
        if mesh is not None and axis not in mesh.names:
            raise UsageError(f"--mesh-bandwidth names axis {axis!r}, which mesh {mesh} (axes "
                             f"{', '.join(mesh.names)}) does not have", where="--mesh-bandwidth",
                             fix=f"name the mesh's axes: {', '.join(mesh.names)}")
        latency = float(m.group(4)) * _TIME_UNITS[m.group(5)] if m.group(4) else None
        out[axis] = (float(m.group(2)) * _UNITS[m.group(3).lower()], latency)
    return out


def with_links(mesh: Mesh, overrides: Mapping[str, tuple[float, float | None]] | None = None) -> Mesh:
    """The mesh with link defaults (the last axis inside a node, every other axis between nodes; a 1-D mesh is one
    node), then ``overrides`` ({axis: (bytes/s, latency or None)}) applied."""
    axes = []
    for k, a in enumerate(mesh.axes):
        alpha, bw = INTRA_NODE if k == len(mesh.axes) - 1 else INTER_NODE
        if overrides and a.name in overrides:
            bw, lat = overrides[a.name]
            alpha = alpha if lat is None else lat
        axes.append(replace(a, latency_s=alpha, bandwidth_Bps=bw))
    return Mesh(tuple(axes))


def calibrate(mesh: Mesh, measurements: Iterable[tuple[str, tuple[str, ...], int, float]]) -> Mesh:
    """Fit α and β per axis from measured collectives ``(kind, axes, bytes per device sent, seconds)`` (bytes as
    ``Step.bytes_per_device`` counts them). Single-axis measurements are fitted by least squares
    ``t = α + bytes / bandwidth``; axes without at least two distinct sizes keep their values."""
    by_axis: dict[str, list[tuple[int, float]]] = {}
    for kind, axes, nbytes, seconds in measurements:
        if len(axes) == 1:
            by_axis.setdefault(axes[0], []).append((int(nbytes), float(seconds)))
    new = []
    for a in mesh.axes:
        pts = by_axis.get(a.name, [])
        if len({b for b, _ in pts}) < 2:
            new.append(a)
            continue
        x = np.array([b for b, _ in pts], float)
        y = np.array([t for _, t in pts], float)
        beta, alpha = np.polyfit(x, y, 1)
        if beta <= 0:
            new.append(a)
            continue
        new.append(replace(a, latency_s=max(float(alpha), 0.0), bandwidth_Bps=float(1.0 / beta)))
    return Mesh(tuple(new))


# ---------------------------------------------------------------------------------------------------------------
# Compute and memory

def local_types(node: Node, rule: ShardingRule, assign: Assignment, mesh: Mesh) -> tuple[list[TensorType],
                                                                                            list[TensorType]]:
    """The node's operand and result types on one device under ``assign``."""
    ins = [v.type.with_shape(s.local_shape(v.type.shape, mesh)) for v, s in zip(node.inputs, rule.operand_specs(assign))]
    outs = [v.type.with_shape(s.local_shape(v.type.shape, mesh)) for v, s in zip(node.outputs,
                                                                                   rule.result_specs(assign))]
    return ins, outs


def roofline_s(op: str, ins: list[TensorType], outs: list[TensorType], attrs: dict, device: DeviceProfile) -> float:
    c = OPS[op].cost(ins, outs, attrs)
    dtype = outs[0].dtype if outs else "float32"
    return max(c.flops / device.peak(dtype), c.bytes / device.mem_bandwidth_Bps)


def node_compute_s(node: Node, rule: ShardingRule, assign: Assignment, mesh: Mesh, device: DeviceProfile) -> float:
    """Seconds one device spends on ``node`` under strategy ``assign`` (constants are free)."""
    return node_work(node, rule, assign, mesh, device)[0]


def node_work(node: Node, rule: ShardingRule, assign: Assignment, mesh: Mesh,
              device: DeviceProfile) -> tuple[float, float]:
    """``(seconds, flops)`` of one device's share of ``node`` under strategy ``assign`` (constants are free)."""
    if node.op == "constant":
        return 0.0, 0.0
    ins, outs = local_types(node, rule, assign, mesh)
    seconds, flops = roofline_s(node.op, ins, outs, node.attrs, device), float(OPS[node.op].cost(ins, outs,
                                                                                                node.attrs).flops)
    if node.op == "gather_matmul":  # a device holding a block of the experts computes the rows routed to them:
        share = ins[1].shape[0] / node.inputs[1].type.shape[0]  # with balanced routing, the block's share
        seconds, flops = seconds * share, flops * share
    return seconds, flops


def node_comm_s(node: Node, rule: ShardingRule, assign: Assignment, mesh: Mesh) -> float:
    """Seconds of the collectives inside ``node`` under ``assign``: the all-reduce of each result of a max/min
    over split dims, and those its rule's ``local`` hook runs (every other collective is a reshard between nodes,
    priced on the edges)."""
    specs = rule.result_specs(assign)
    inner = rule.inner(assign) if rule.inner is not None else []
    return (sum(Step("all_reduce", axes, s, s, reduce=reduce).time_s(v.type, mesh)
                for reduce, axes in rule.combined(assign) for v, s in zip(node.outputs, specs))
            + sum(Step("all_reduce", axes, s, s).time_s(t, mesh) for axes, t, s in inner))


def local_bytes(t: TensorType, spec: Spec, mesh: Mesh) -> int:
    return t.with_shape(spec.local_shape(t.shape, mesh)).nbytes


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int  # weights + the largest live set of activations
    weight_bytes: int
    peak_step: int  # node index at which activations peak
    largest: tuple[tuple[str, int], ...]  # the largest tensors per device (name, bytes), largest first
    live: tuple[int, ...] = ()  # activation bytes live per device while each node runs (its results included)


def plan_memory(graph: Graph, plan) -> MemoryEstimate:
    """Per-device memory of ``plan`` over the graph's node order: weights in their plan specs, inputs and values
    in their specs (replicated where the plan has none), each value freed after its last use."""
    mesh = plan.mesh

    def size(v) -> int:
        return local_bytes(v.type, plan.specs.get(v.name, Spec.replicated(v.type.rank)), mesh)

    weights = sum(size(p) for p in graph.params)
    last = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            last[id(v)] = i
    for v in graph.outputs:
        last[id(v)] = len(graph.nodes)
    live = sum(size(v) for v in graph.inputs)
    peak, step, curve = live, 0, []
    for i, n in enumerate(graph.nodes):
        live += sum(size(v) for v in n.outputs)
        curve.append(live)
        if live > peak:
            peak, step = live, i
        for v in n.outputs:
            if last.get(id(v), -1) <= i:
                live -= size(v)
        for v in {id(v): v for v in n.inputs}.values():
            if v.producer is not None and last.get(id(v)) == i:
                live -= size(v)
    sizes = sorted(((size(v), v.name) for v in graph.values()), key=lambda t: (-t[0], t[1]))[:5]
    return MemoryEstimate(weights + peak, weights, step, tuple((n, b) for b, n in sizes), tuple(curve))


@dataclass(frozen=True)
class PlanCost:
    compute_s: float
    comm_s: float
    memory: MemoryEstimate
    collectives: int
    nodes: tuple[tuple[float, float], ...] = ()  # per node of the graph: (seconds, flops) on one device

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s

    def to_json(self) -> dict:
        return {"total_s": self.total_s, "compute_s": self.compute_s, "comm_s": self.comm_s,
                "peak_bytes_per_device": self.memory.peak_bytes, "weight_bytes_per_device": self.memory.weight_bytes,
                "collectives": self.collectives}


def plan_cost(graph: Graph, plan, device: DeviceProfile) -> PlanCost:
    """The one price of a plan: every node's compute under its strategy plus every collective the partitioner
    inserts (priced by the reshard table), and the per-device memory."""
    from bmc.sharding.partition import partition, rule_of

    prog = partition(graph, plan)
    nodes = tuple(node_work(node, rule, plan.strategies.get(i, rule.replicated()), plan.mesh, device)
                  for i, node in enumerate(graph.nodes) for rule in [rule_of(node)])
    comm = sum(c.time_s for c in prog.collectives)
    return PlanCost(sum(t for t, _ in nodes), comm, plan_memory(graph, plan), len(prog.collectives), nodes)
