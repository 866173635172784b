"""Where a compiled model departs from the single-device reference (FAILURES.md 49, 50; ``bmc verify --inputs``).

Three questions, answered with the oracles of this package:

* :func:`check_outputs`: does each output of the artifact match the reference interpreter's on the same inputs
  (max abs error over the output's scale, non-finite values)?
* :func:`first_divergence`: if not, which tensor of the sharded program is the first to differ? The model is
  planned again with the artifact's recorded options (planning is deterministic, FAILURES.md 28), its SPMD program
  is run for every device in the simulator, and each value, put back together from its shards, is compared with the
  reference in graph order. No divergence there means the sharding is exact and the difference comes from the
  compiled kernels (or the artifact's weights).
* :func:`first_nonfinite`: the first node that makes a NaN or infinity out of finite operands, and on which device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from bmc.ir.graph import Graph
from bmc.sharding.layout import coordinates, unshard
from bmc.testing.spmd_sim import feed, run_lockstep


@dataclass(frozen=True)
class OutputCheck:
    name: str
    max_abs: float
    scale: float  # max(1, max |reference|)
    nonfinite: int  # NaN/Inf values in the artifact's output where the reference is finite
    ok: bool

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale


@dataclass(frozen=True)
class Finding:
    value: str
    node: str  # the ONNX node (or the IR op when bmc made the node up)
    op: str
    index: int  # position of the node in the graph
    error: float  # max abs error over the value's scale (inf: non-finite where the reference is finite)
    device: tuple[int, ...] | None = None  # the first mesh device whose block is wrong


def check_outputs(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], tolerance: float) -> list[OutputCheck]:
    """Each output against the reference: ok when max |got - want| <= tolerance * max(1, max |want|) and the artifact
    has no non-finite value where the reference is finite."""
    out = []
    for name, ref in want.items():
        g, r = np.asarray(got[name], np.float64), np.asarray(ref, np.float64)
        finite = np.isfinite(r)
        bad = int(np.count_nonzero(~np.isfinite(g) & finite))
        diff = np.abs(g - r)[finite & np.isfinite(g)]
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = max(1.0, float(np.abs(r[finite]).max())) if finite.any() else 1.0
        out.append(OutputCheck(name, max_abs, scale, bad, bad == 0 and max_abs <= tolerance * scale))
    return out


def _error(got: np.ndarray, ref: np.ndarray) -> float:
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if (~np.isfinite(g) & np.isfinite(r)).any():
        return float("inf")
    both = np.isfinite(g) & np.isfinite(r)
    if not both.any():
        return 0.0
    return float(np.abs(g - r)[both].max()) / max(1.0, float(np.abs(r[both]).max()))


def first_divergence(prog, inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                     tolerance: float) -> Finding | None:
    """The first value of ``prog``'s global graph (a ``LocalProgram``) whose shards, run on the simulator and put
    together by its spec, differ from ``reference`` (every value of the reference run, by name) by more than
    ``tolerance`` of its scale; None when every value matches. Values between an expert layer's two products split
    by experts (each device exact on the rows routed to its experts only) are not compared."""
    mesh = prog.mesh
    envs = feed(prog, inputs)
    run_lockstep(prog.graph, envs)
    for i, node in enumerate(prog.global_graph.nodes):
        for v in node.outputs:
            if v.name not in prog.produced or v.name not in reference:
                continue
            lv, spec = prog.produced[v.name]
            if id(lv) not in envs[coordinates(mesh)[0]] or id(lv) in prog.routed_rows:  # dead in the local
                continue  # program (nothing reads it), or exact only on the rows routed to a device's experts
            shards = {c: envs[c][id(lv)] for c in coordinates(mesh)}
            whole = unshard(shards, spec, mesh)
            err = _error(whole, reference[v.name])
            if err > tolerance:
                device = next((c for c, a in shards.items() if not np.isfinite(np.asarray(a, np.float64)).all()),
                              None)
                return Finding(v.name, node.source or node.op, node.op, i, err, device)
    return None


def first_nonfinite(graph: Graph, values: Mapping[str, np.ndarray]) -> Finding | None:
    """The first node whose operands are finite and a result is not (NaN or ±inf), in graph order; ``values``: every
    value of a reference run by name."""
    def finite(name: str) -> bool:
        a = values.get(name)
        return a is None or not np.issubdtype(np.asarray(a).dtype, np.inexact) or bool(np.isfinite(a).all())

    for i, node in enumerate(graph.nodes):
        if all(finite(v.name) for v in node.inputs):
            for v in node.outputs:
                if not finite(v.name):
                    return Finding(v.name, node.source or node.op, node.op, i, float("inf"))
    return None
