"""The plan as data (``plan.json``) and as a readable table.

Keys (stable, for other tools): ``mesh`` {shape, axes, parts (only on a view: {cut axis: [major, minor]},
``mesh.py``)}; ``values`` {name: {shape, dtype, spec, origin}};
``nodes`` [{name (ONNX node), op, inputs, outputs (value names), compute_s, flops (one device's share)}] in graph
order; ``idle_axes`` the mesh axes (of more than one device) that split no tensor, whose devices repeat each
other's work; ``collectives`` [{kind, axes, bytes (per device), node (ONNX node), value, at (index into ``nodes``: the node
it runs for; ``len(nodes)`` the outputs, -1 the inputs), time_s}]; ``memory`` {peak_bytes_per_device, budget_bytes,
weight_bytes_per_device, live_bytes (activations live per device while each node runs)}; ``cost`` {total_s,
compute_s, comm_s, device}; ``solver`` when a search ran; ``input_specs`` / ``output_specs`` {value: spec} for inputs fed and outputs returned as blocks. ``bmc.sharding.htmlreport`` renders it as one HTML page.
"""

from __future__ import annotations

from bmc.sharding.partition import LocalProgram


def plan_json(prog: LocalProgram, cost, budget_bytes: int | None = None, device: str = "") -> dict:
    """``cost`` is the plan's ``bmc.sharding.cost.PlanCost``: the one cost and memory model every plan is priced by."""
    plan, graph = prog.plan, prog.global_graph
    values = {v.name: {"shape": list(v.type.shape), "dtype": v.type.dtype, "spec": str(plan.specs[v.name]),
                       "origin": plan.origins.get(v.name, "default")} for v in graph.values()}
    used = {a for s in plan.specs.values() for a in s.axes()} | {a for s in plan.output_specs.values()
                                                                 for a in s.axes()}
    nodes = [{"name": n.source, "op": n.op, "inputs": [v.name for v in n.inputs],
              "outputs": [v.name for v in n.outputs], "compute_s": t, "flops": flops}
             for n, (t, flops) in zip(graph.nodes, cost.nodes)]
    return {
        "mesh": plan.mesh.to_json(),
        "idle_axes": [a.name for a in plan.mesh.axes if a.size > 1 and a.name not in used],
        "values": values,
        "nodes": nodes,
        "collectives": [c.to_json() for c in prog.collectives],
        "memory": {"peak_bytes_per_device": cost.memory.peak_bytes, "weight_bytes_per_device": cost.memory.weight_bytes,
                   "budget_bytes": budget_bytes, "live_bytes": list(cost.memory.live)},
        "cost": {"total_s": cost.total_s, "compute_s": cost.compute_s, "comm_s": cost.comm_s, "device": device},
    } | {key: {k: str(s) for k, s in specs.items()}
         for key, specs in (("input_specs", plan.input_specs), ("output_specs", plan.output_specs)) if specs}


def format_plan(prog: LocalProgram, data: dict, top: int = 15) -> str:
    """A plain-text table: the largest tensors with spec, local shape and bytes per device; the collectives."""
    mesh = prog.plan.mesh
    rows = []
    for v in prog.global_graph.values():
        spec = prog.plan.specs[v.name]
        local = spec.local_shape(v.type.shape, mesh)
        rows.append((v.type.with_shape(local).nbytes, v.name, str(v.type), str(spec), local))
    rows.sort(key=lambda r: (-r[0], r[1]))
    idle = data.get("idle_axes") or []
    idle = f"; {'axis' if len(idle) == 1 else 'axes'} {', '.join(idle)} split{'s' if len(idle) == 1 else ''} " \
        "nothing" if idle else ""
    view = f"; viewed with {mesh.describe_parts()}" if mesh.parts() else ""
    out = [f"mesh {mesh} (axes {', '.join(mesh.names)}{view}), {len(prog.global_graph.nodes)} nodes{idle}",
           "", f"{'tensor':40} {'global':22} {'spec':22} {'local shape':18} {'bytes/device':>12}"]
    for nbytes, name, ty, spec, local in rows[:top]:
        out.append(f"{name[:40]:40} {ty[:22]:22} {spec[:22]:22} {str(list(local))[:18]:18} {nbytes:>12,}")
    out += ["", f"collectives: {len(prog.collectives)}"]
    for c in prog.collectives:
        out.append(f"  {c.describe():15} axes {','.join(c.axes):6} {c.bytes:>12,} B/device  for {c.node}  ({c.value})")
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
