"""``--strategy auto``: the ILP plan, checked against the named manual plans under one cost model.

Every plan is priced by ``cost.plan_cost`` (partition the graph, sum each node's compute under its strategy and every
collective the partitioner inserts), so the numbers that compare plans are the numbers the artifact will show. The
auto plan is the ILP's; if a manual plan that fits the budget is cheaper by that price (the ILP prices a reshard
once per consumer, the partitioner shares it), the cheaper plan is returned and the stats say so.
"""

from __future__ import annotations

from typing import Mapping

from bmc.errors import UsageError
from bmc.ir.graph import Graph
from bmc.sharding.cost import DEFAULT_DEVICE, DEVICES, DeviceProfile, PlanCost, plan_cost
from bmc.sharding.manual import manual_plan
from bmc.sharding.mesh import Mesh
from bmc.sharding.plan import Plan
from bmc.sharding.search import search_plan
from bmc.sharding.spec import Spec

MANUAL = ("replicate", "dp", "megatron", "dp+megatron")


def _device(device: DeviceProfile | str | None) -> DeviceProfile:
    if device is None:
        return DEVICES[DEFAULT_DEVICE]
    return DEVICES[device] if isinstance(device, str) else device


def manual_plans(graph: Graph, mesh: Mesh, annotations: Mapping[str, Spec | str] | None = None,
                 output_specs: Mapping[str, Spec] | None = None,
                 device: DeviceProfile | None = None) -> dict[str, Plan]:
    """The named manual plans that apply to this mesh (user annotations win over each strategy's; Megatron's on
    its view of the mesh where that is no slower, ``manual.manual_plan``)."""
    out = {}
    for name in MANUAL:
        if name == "dp+megatron" and len({a.part_of or a.name for a in mesh.axes}) < 2:
            continue
        try:
            out[name] = manual_plan(graph, name, mesh, annotations, output_specs, _device(device))
        except UsageError:  # the strategy does not fit this model on this mesh (a batch of 2 over 4 devices)
            continue
    return out


def auto_plan(graph: Graph, mesh: Mesh, annotations: Mapping[str, Spec | str] | None = None, *,
              device: DeviceProfile | str | None = None, memory_per_device: float | None = None,
              time_limit_s: float = 20.0, dedup: bool = True, merge: bool = True, check_manual: bool = True,
              save_problem: str | None = None, output_specs: Mapping[str, Spec] | None = None) -> tuple[Plan, dict]:
    """The automatic plan and its statistics (solver, shrinking, cost). ``memory_per_device`` defaults to the
    device's memory; ``check_manual`` also prices the manual plans and keeps a cheaper one that fits;
    ``output_specs`` lays the graph outputs out (by value name; default replicated)."""
    dev = _device(device)
    budget = dev.memory_bytes if memory_per_device is None else memory_per_device
    plan, stats = search_plan(graph, mesh, annotations, dev, budget, time_limit_s=time_limit_s, merge=merge,
                              dedup=dedup, save_problem=save_problem, output_specs=output_specs)
    stats["device"] = dev.name
    if not check_manual:
        return plan, stats
    best = plan_cost(graph, plan, dev)
    stats["ilp_cost"] = best.to_json()
    stats["chosen"] = "ilp"
    for name, p in manual_plans(graph, mesh, annotations, output_specs, dev).items():
        c = plan_cost(graph, p, dev)
        if c.memory.peak_bytes <= budget and c.total_s < best.total_s * (1 - 1e-9):
            plan, best, stats["chosen"] = p, c, name
    stats["cost"] = best.to_json()
    if stats["chosen"] != "ilp":
        stats["warnings"].append(f"the manual plan {stats['chosen']!r} is cheaper than the ILP plan under the "
                                 f"partitioner's cost; using it")
    return plan, stats


def compare_strategies(graph: Graph, mesh: Mesh, annotations: Mapping[str, Spec | str] | None = None, *,
                       device: DeviceProfile | str | None = None, memory_per_device: float | None = None,
                       time_limit_s: float = 20.0) -> dict[str, PlanCost]:
    """Price replicate / dp / megatron / dp+megatron and the ILP plan alone (``auto``) with the same function."""
    dev = _device(device)
    out = {name: plan_cost(graph, p, dev) for name, p in manual_plans(graph, mesh, annotations, device=dev).items()}
    plan, _ = auto_plan(graph, mesh, annotations, device=dev, memory_per_device=memory_per_device,
                        time_limit_s=time_limit_s, check_manual=False)
    out["auto"] = plan_cost(graph, plan, dev)
    return out
