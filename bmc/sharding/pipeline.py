"""Pipeline stages (Alpa's inter-operator parallelism, GPipe's schedule): a graph cut into consecutive stages.

``--stages S`` cuts the (topologically ordered) nodes into S runs and gives each run a submesh: the mesh's first
axis, the slow one between nodes, divided by S (``--mesh 4x8 --stages 4``: four stages, each on a 1×8 submesh of
one node). Each stage is then an ordinary program, planned (ILP, propagation) and partitioned on its submesh. A
stage's ranks receive what it needs of its predecessor's results from the ranks at the same place of the previous
submesh, and pass on what later stages need; each stage gets the graph inputs it reads from the rank that holds
them, and the graph outputs go from the stage that makes them straight to every rank (not along the chain: a
decoder's key/value caches made by the first stages would otherwise cross every later cut).

The cut minimises the pipeline's bottleneck: the largest stage time, a stage's time being its nodes' roofline time
(the cost model's) plus sending its boundary values over the first axis' link (α + bytes/bandwidth). It is a
dynamic program over the cut positions, ties broken by the bytes sent. Constant nodes are not cut off from their
users: a stage that reads a constant of an earlier stage makes its own copy.

What this leaves out (Alpa's inter-op DP does more): the submeshes are equal (no per-stage submesh shapes), and the
cost of a stage is its single-device roofline divided by its devices, not the planned stage's own cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bmc.errors import PlanningError, UsageError
from bmc.ir.graph import Graph, Node, Value, extract
from bmc.sharding.cost import DeviceProfile, roofline_s
from bmc.sharding.mesh import Mesh, MeshAxis


@dataclass
class Stage:
    """One stage: its nodes ``[start, end)`` of the whole graph, as a standalone ``graph`` whose outputs
    (``makes``) are the values made here that later stages read, and the graph outputs made here; ``sends`` is what
    its ranks pass to the next stage (made here or received: the runtime forwards received values itself)."""

    index: int
    start: int
    end: int
    graph: Graph
    makes: list[str]  # this stage's program outputs: values made here that a later stage reads, graph outputs made here
    sends: list[str]  # what its ranks pass to the next stage (made here or received), empty for the last
    compute_s: float
    send_bytes: int

    def to_json(self) -> dict:
        return {"index": self.index, "nodes": [self.start, self.end], "inputs": [v.name for v in self.graph.inputs],
                "outputs": self.makes, "sends": self.sends, "compute_s": self.compute_s,
                "send_bytes": self.send_bytes}


def stage_mesh(mesh: Mesh, stages: int) -> Mesh:
    """The submesh each of ``stages`` stages runs on: ``mesh`` with its first axis divided by ``stages`` (an axis
    left with one device is dropped unless it is the only one)."""
    if stages < 1:
        raise UsageError(f"--stages {stages} is not a positive number", where="--stages", fix="use 1 or more")
    first = mesh.axes[0]
    if first.size % stages:
        raise UsageError(f"the mesh's first axis {first.name!r} has {first.size} devices, which {stages} stages do not "
                         f"divide", where="--stages",
                         fix=f"use a number of stages that divides {first.size}, or a mesh whose first axis is a "
                             f"multiple of {stages} (e.g. --mesh {stages * first.size}"
                             + "".join(f"x{a.size}" for a in mesh.axes[1:]) + ")")
    axes = (MeshAxis(first.name, first.size // stages, first.latency_s, first.bandwidth_Bps), *mesh.axes[1:])
    kept = tuple(a for a in axes if a.size > 1)
    return Mesh(kept or axes[:1])


def split_stages(graph: Graph, stages: int, *, device: DeviceProfile, mesh: Mesh,
                 memory_per_device: float | None = None) -> list[Stage]:
    """Cut ``graph`` into ``stages`` consecutive stages, each on ``stage_mesh(mesh, stages)``, with the smallest
    bottleneck (see the module docstring) among the cuts whose every stage's weights, split over its devices, fit
    ``memory_per_device`` (a weight counted in the stage that reads it first)."""
    devices = stage_mesh(mesh, stages).size
    nodes = graph.nodes
    n = len(nodes)
    if stages > sum(node.op != "constant" for node in nodes):
        raise UsageError(f"{stages} stages for a graph of {n} nodes", where="--stages",
                         fix="use fewer stages than the model has operations")
    cost = np.array([0.0 if nd.op == "constant" else
                     roofline_s(nd.op, [v.type for v in nd.inputs], [v.type for v in nd.outputs], nd.attrs, device)
                     for nd in nodes]) / devices
    prefix = np.concatenate([[0.0], np.cumsum(cost)])
    weights = np.concatenate([[0.0], np.cumsum(_first_read_bytes(graph))]) / devices
    budget = np.inf if memory_per_device is None else float(memory_per_device)
    crossing = _crossing_bytes(graph)
    send = crossing / mesh.axes[0].bandwidth_Bps  # every cut pays one α: it changes no choice
    # best[s][j]: the smallest bottleneck of cutting nodes [0, j) into s + 1 stages; the bytes sent break ties
    best = np.full((stages, n + 1), np.inf)
    sent = np.full((stages, n + 1), np.inf)
    back = np.zeros((stages, n + 1), np.int64)
    best[0, 1:] = np.where(weights[1:] <= budget, prefix[1:] + send[1:], np.inf)
    sent[0, 1:] = crossing[1:]
    for s in range(1, stages):
        last = s == stages - 1
        for j in range(s + 1, n + 1) if not last else (n,):
            i = np.arange(s, j)
            worst = np.maximum(best[s - 1, i], prefix[j] - prefix[i] + (send[j] if not last else 0.0))
            worst[weights[j] - weights[i] > budget] = np.inf
            total = sent[s - 1, i] + (crossing[j] if not last else 0.0)
            k = np.lexsort((total, worst))[0]
            best[s, j], sent[s, j], back[s, j] = worst[k], total[k], i[k]
    if not np.isfinite(best[stages - 1, n]):
        raise PlanningError(f"no cut into {stages} stages fits the memory budget of {budget:,.0f} B per device: "
                            f"the model has {weights[-1] * devices:,.0f} B of weights, {weights[-1] / stages:,.0f} B "
                            f"per device were they spread evenly", where="--memory-per-device",
                            fix="use more stages or a larger mesh, or raise --memory-per-device")
    cuts = [n]
    for s in range(stages - 1, 0, -1):
        cuts.append(int(back[s, cuts[-1]]))
    cuts = [0, *cuts[::-1]]
    return _stages(graph, list(zip(cuts[:-1], cuts[1:])), prefix)


def _first_read_bytes(graph: Graph) -> np.ndarray:
    """Per node, the bytes of the weights it is the first to read."""
    params, seen = {id(p) for p in graph.params}, set()
    out = np.zeros(len(graph.nodes))
    for k, node in enumerate(graph.nodes):
        for v in node.inputs:
            if id(v) in params and id(v) not in seen:
                seen.add(id(v))
                out[k] += v.type.nbytes
    return out


def _crossing_bytes(graph: Graph) -> np.ndarray:
    """``out[c]``: the bytes of the values made by nodes before ``c`` that nodes from ``c`` on read (what a cut
    before node ``c`` sends). Graph inputs, constants and graph outputs (sent from their stage to every rank at the
    end, wherever the cuts are) are not sent along the chain."""
    n = len(graph.nodes)
    last: dict[int, int] = {}
    for k, node in enumerate(graph.nodes):
        for v in node.inputs:
            last[id(v)] = k
    delta = np.zeros(n + 2)
    for k, node in enumerate(graph.nodes):
        if node.op == "constant":
            continue
        for v in node.outputs:
            end = last.get(id(v), k)
            if end > k:  # live on the cuts k + 1 .. end
                delta[k + 1] += v.type.nbytes
                delta[end + 1] -= v.type.nbytes
    out = np.cumsum(delta)[:n + 1]
    out[0] = 0.0
    return out


def _stages(graph: Graph, bounds: list[tuple[int, int]], prefix: np.ndarray) -> list[Stage]:
    nodes = graph.nodes
    stage_of = {id(v): s for s, (a, b) in enumerate(bounds) for node in nodes[a:b] for v in node.outputs}
    constant = {id(v): node for node in nodes if node.op == "constant" for v in node.outputs}
    later: list[set[int]] = [set() for _ in bounds]  # per stage: ids of values it passes on (a later stage reads)
    for s, (a, b) in enumerate(bounds):
        for node in nodes[a:b]:
            for v in node.inputs:
                p = stage_of.get(id(v))
                if p is not None and p < s and id(v) not in constant:
                    for q in range(p, s):
                        later[q].add(id(v))
    final = len(bounds) - 1
    values = {id(v): v for node in nodes for v in node.outputs}
    position = {id(v): k for k, node in enumerate(nodes) for v in node.outputs}
    out = []
    for s, (a, b) in enumerate(bounds):
        own = nodes[a:b]
        needed_constants = _borrowed_constants(own, constant, stage_of, s)
        passed = sorted(later[s], key=position.__getitem__)
        outputs = [values[i] for i in passed if stage_of[i] == s] + [v for v in graph.outputs
                                                                      if stage_of.get(id(v)) == s]
        sub = extract(graph, needed_constants + own, _unique(outputs), f"{graph.name}.stage{s}")
        sends = [values[i].name for i in passed] if s < final else []
        out.append(Stage(s, a, b, sub, [v.name for v in sub.outputs], sends, float(prefix[b] - prefix[a]),
                         sum(values[i].type.nbytes for i in later[s]) if s < final else 0))
    return out


def _borrowed_constants(own: list[Node], constant: dict[int, Node], stage_of: dict[int, int], s: int) -> list[Node]:
    seen, out = set(), []
    for node in own:
        for v in node.inputs:
            c = constant.get(id(v))
            if c is not None and stage_of[id(v)] != s and id(c) not in seen:
                seen.add(id(c))
                out.append(c)
    return out


def _unique(values: list[Value]) -> list[Value]:
    seen, out = set(), []
    for v in values:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out
