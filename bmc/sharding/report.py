"""The plan as data (``plan.json``) and as a readable table.

Keys (stable, for other tools): ``mesh`` {axes, shape}; ``values`` {name: {shape, dtype, spec, origin}};
``collectives`` [{kind, axes, bytes (per device), node (ONNX node), value}]; ``memory`` {peak_bytes_per_device,
budget_bytes, weight_bytes_per_device}; ``cost`` {total_s, compute_s, comm_s, device}; ``solver`` when a search ran.
"""

from __future__ import annotations

from bmc.ir.graph import Graph
from bmc.ops import get_op
from bmc.sharding.partition import LocalProgram

# A neutral default device for estimates until the cost model (with device profiles) lands: ~H100 fp32 numbers.
DEFAULT_DEVICE = {"name": "default", "peak_flops": 60e12, "mem_bandwidth_Bps": 3.0e12}


def estimate_compute_s(graph: Graph, device: dict = DEFAULT_DEVICE) -> float:
    """Roofline estimate: each node costs max(flops / peak, bytes / bandwidth)."""
    total = 0.0
    for node in graph.nodes:
        c = get_op(node.op).cost([v.type for v in node.inputs], [v.type for v in node.outputs], node.attrs)
        total += max(c.flops / device["peak_flops"], c.bytes / device["mem_bandwidth_Bps"])
    return total


def peak_memory(graph: Graph) -> tuple[int, int]:
    """(peak bytes, weight bytes) per device over a walk of the local program in node order."""
    last_use: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            last_use[id(v)] = i
    for v in graph.outputs:
        last_use[id(v)] = len(graph.nodes)
    weights = sum(p.type.nbytes for p in graph.params)
    live = sum(v.type.nbytes for v in graph.inputs)
    peak = live
    for i, node in enumerate(graph.nodes):
        live += sum(v.type.nbytes for v in node.outputs)
        peak = max(peak, live)
        for v in set(node.inputs) | set(node.outputs):
            if last_use.get(id(v), -1) <= i and v.producer is not None:
                live -= v.type.nbytes
    return weights + peak, weights


def plan_json(prog: LocalProgram, budget_bytes: int | None = None) -> dict:
    plan, graph = prog.plan, prog.global_graph
    values = {v.name: {"shape": list(v.type.shape), "dtype": v.type.dtype, "spec": str(plan.specs[v.name]),
                       "origin": plan.origins.get(v.name, "default")} for v in graph.values()}
    peak, weights = peak_memory(prog.graph)
    compute = estimate_compute_s(prog.graph)
    comm = sum(c.time_s for c in prog.collectives)
    return {
        "mesh": {"axes": list(plan.mesh.names), "shape": list(plan.mesh.shape)},
        "values": values,
        "collectives": [{"kind": c.kind, "axes": list(c.axes), "bytes": c.bytes, "node": c.node, "value": c.value}
                        for c in prog.collectives],
        "memory": {"peak_bytes_per_device": peak, "weight_bytes_per_device": weights, "budget_bytes": budget_bytes},
        "cost": {"total_s": compute + comm, "compute_s": compute, "comm_s": comm, "device": DEFAULT_DEVICE["name"]},
        "strategy": "propagation",
    }


def format_plan(prog: LocalProgram, data: dict, top: int = 15) -> str:
    """A plain-text table: the largest tensors with spec, local shape and bytes per device; the collectives."""
    mesh = prog.plan.mesh
    rows = []
    for v in prog.global_graph.values():
        spec = prog.plan.specs[v.name]
        local = spec.local_shape(v.type.shape, mesh)
        rows.append((v.type.with_shape(local).nbytes, v.name, str(v.type), str(spec), local))
    rows.sort(key=lambda r: (-r[0], r[1]))
    out = [f"mesh {mesh} (axes {', '.join(mesh.names)}), {len(prog.global_graph.nodes)} nodes",
           "", f"{'tensor':40} {'global':22} {'spec':22} {'local shape':18} {'bytes/device':>12}"]
    for nbytes, name, ty, spec, local in rows[:top]:
        out.append(f"{name[:40]:40} {ty[:22]:22} {spec[:22]:22} {str(list(local))[:18]:18} {nbytes:>12,}")
    out += ["", f"collectives: {len(prog.collectives)}"]
    for c in prog.collectives:
        out.append(f"  {c.kind:15} axes {','.join(c.axes):6} {c.bytes:>12,} B/device  for {c.node}  ({c.value})")
    solver = data.get("solver")
    if solver:
        out += ["", f"search: {solver.get('status')} in {solver.get('total_s', 0):.2f} s ({solver.get('variables')} "
                    f"variables, {solver.get('constraints')} constraints, gap {solver.get('gap', 0):.2%}, "
                    f"{solver.get('problem_nodes')} problem nodes from {solver.get('nodes')}; chosen: "
                    f"{solver.get('chosen', 'ilp')})"]
    m, cost = data["memory"], data["cost"]
    budget = f" of {m['budget_bytes']:,} B budget" if m.get("budget_bytes") else ""
    out += ["", f"per device: peak {m['peak_bytes_per_device']:,} B{budget} (weights {m['weight_bytes_per_device']:,} B); "
                f"estimated time {cost['total_s'] * 1e3:.3f} ms (compute {cost['compute_s'] * 1e3:.3f} ms, "
                f"communication {cost['comm_s'] * 1e3:.3f} ms, device profile '{cost['device']}')"]
    return "\n".join(out)
