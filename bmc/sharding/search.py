"""Automatic sharding: ``analyze`` (strategies per node, shrinking; ``strategies.py``) → ``build_problem`` (a typed,
JSON-serializable ILP; ``ilp.py``) → ``solve`` (HiGHS, time-limited, deterministic) → ``plan_from_choice`` (a
``Plan``). See those modules for the formulation.
"""

from __future__ import annotations

import time
from typing import Mapping

from bmc.errors import PlanningError
from bmc.ir.graph import Graph
from bmc.sharding.cost import DeviceProfile
from bmc.sharding.ilp import Problem, build_problem, greedy, peak_of, solve
from bmc.sharding.mesh import Mesh
from bmc.sharding.plan import Plan
from bmc.sharding.spec import Spec
from bmc.sharding.strategies import Structure, analyze, plan_from_choice


def infeasible_message(st: Structure, problem: Problem, device_name: str) -> str:
    """FAILURES.md 25: the smallest peak the search can reach, the tensors that dominate it, what to change."""
    from bmc.sharding.cost import plan_memory

    relaxed = Problem(problem.nodes, problem.edges, problem.steps, None, problem.time_limit_s, problem.mesh)
    sol = solve(relaxed, objective="memory")
    choice = sol.choice if sol.choice else greedy(relaxed)
    mem = plan_memory(st.graph, plan_from_choice(st, choice))
    coord = tuple(0 for _ in st.mesh.shape)
    largest = ", ".join(f"{n} {_gb(b)}" for n, b in mem.largest)
    budget = _gb(problem.budget_bytes or 0)
    return (f"infeasible: smallest peak found {_gb(mem.peak_bytes)} on device {coord} (every device holds the same "
            f"amount; budget {budget} per {device_name}); largest tensors per device: {largest}; try a larger mesh "
            f"or --memory-per-device")


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.3f} MB" if b >= 1e4 else f"{int(b)} B"


def search_plan(graph: Graph, mesh: Mesh, annotations: Mapping[str, Spec | str] | None, device: DeviceProfile,
                budget_bytes: float | None, *, time_limit_s: float = 20.0, merge: bool = True, dedup: bool = True,
                save_problem: str | None = None, output_specs: Mapping[str, Spec] | None = None) -> tuple[Plan, dict]:
    """Analyze, build, solve, and turn the choice into a plan; raises PlanningError (FAILURES.md 25) when no plan
    fits the memory budget. ``output_specs``: the graph outputs' layouts (by value name; default replicated)."""
    t0 = time.perf_counter()
    st = analyze(graph, mesh, annotations, merge=merge, dedup=dedup, output_specs=output_specs)
    t1 = time.perf_counter()
    problem = build_problem(st, device, budget_bytes, time_limit_s)
    t2 = time.perf_counter()
    if save_problem:
        with open(save_problem, "w") as f:
            f.write(problem.dumps())
    sol = solve(problem)
    if sol.status == "infeasible":
        raise PlanningError(infeasible_message(st, problem, device.name), where="--memory-per-device",
                            fix="use a larger mesh, raise --memory-per-device, or cut the model into pipeline "
                                "stages (--stages auto)")
    plan = plan_from_choice(st, sol.choice)
    warnings = []
    if sol.status == "time_limit":
        warnings.append(f"solver time limit {time_limit_s:g} s reached: keeping the best plan found "
                        f"(gap {100 * (sol.stats.get('gap') or 0):.2f}%)")
    if sol.status == "greedy":
        warnings.append(f"the ILP solver gave no plan ({sol.stats.get('message')}); using a greedy plan")
    stats = {"solver": "highs (scipy.optimize.milp)", "status": sol.status, "objective_s": sol.objective_s,
             "peak_bytes_estimate": peak_of(problem, sol.choice), "budget_bytes": budget_bytes,
             **{k: v for k, v in sol.stats.items()}, **st.stats,
             "problem_nodes": len(problem.nodes), "problem_edges": len(problem.edges),
             "memory_steps": len(problem.steps), "build_s": t2 - t1, "solve_s": sol.stats.get("time_s"),
             "total_s": time.perf_counter() - t0, "merge": merge, "dedup": dedup, "warnings": warnings}
    return plan, stats
