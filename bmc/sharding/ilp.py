"""The automatic search's integer linear program (Alpa's intra-op pass): built from an analyzed graph, solved with
HiGHS (``scipy.optimize.milp``, time-limited, deterministic).

* **Problem** (a value: JSON in, JSON out): a node (class) has a cost per strategy (compute of every node it stands
  for, resharding inside its groups, gathering graph outputs, edges between copies of itself) and weight bytes per
  strategy; an edge between two classes has a resharding-cost matrix (``reshard_cost`` of the producer's result spec
  into the consumer's required spec, summed over every graph edge it stands for; an expert layer's two products get
  an edge crediting the all-reduce the partitioner drops when both split their experts alike); memory steps bound
  weights + live activations per device.
* **ILP**: one-hot binaries ``x[c, s]``; an edge matrix, compressed to its distinct rows/columns (separable
  matrices fold into node costs), gets continuous ``z[p, q]`` with row sums = producer groups and column sums =
  consumer groups (exact for one-hot ``x``); ``W`` = Σ weight bytes; for each distinct live set
  ``W + Σ activation bytes ≤ budget``. Costs in µs, bytes in units of the budget (FAILURES.md 27: scaled).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from bmc.ir.graph import Value
from bmc.ir.types import TensorType
from bmc.sharding.cost import DeviceProfile, local_bytes, node_comm_s, node_compute_s
from bmc.sharding.partition import routed_region
from bmc.sharding.reshard import reshard_cost
from bmc.sharding.rules import Assignment, ShardingRule
from bmc.sharding.spec import Spec
from bmc.sharding.strategies import Structure

TIME_SCALE = 1e6  # objective in µs
MEMORY_MARGIN = 1e-6  # memory rows are scaled by the budget; keep this fraction of it free for solver tolerances
MIP_REL_GAP = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# The problem (a value: JSON in, JSON out)

@dataclass(frozen=True)
class ProblemNode:
    name: str  # the representative ONNX node (or op)
    strategies: tuple[str, ...]  # printable assignments
    cost: tuple[float, ...]  # seconds, summed over every node the class stands for
    weight_bytes: tuple[float, ...]  # per device, summed over copies
    allowed: tuple[bool, ...]
    copies: int = 1


@dataclass(frozen=True)
class ProblemEdge:
    u: int
    v: int
    cost: tuple[tuple[float, ...], ...]  # seconds, [strategy of u][strategy of v]


@dataclass(frozen=True)
class MemoryStep:
    step: int  # node index (in the graph's order) where this live set occurs
    fixed_bytes: float
    terms: tuple[tuple[int, tuple[float, ...]], ...]  # (problem node, bytes per strategy)


@dataclass(frozen=True)
class Problem:
    nodes: tuple[ProblemNode, ...]
    edges: tuple[ProblemEdge, ...]
    steps: tuple[MemoryStep, ...]
    budget_bytes: float | None
    time_limit_s: float
    mesh: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, d: dict) -> "Problem":
        nodes = tuple(ProblemNode(n["name"], tuple(n["strategies"]), tuple(n["cost"]), tuple(n["weight_bytes"]),
                                  tuple(n["allowed"]), n.get("copies", 1)) for n in d["nodes"])
        edges = tuple(ProblemEdge(e["u"], e["v"], tuple(tuple(r) for r in e["cost"])) for e in d["edges"])
        steps = tuple(MemoryStep(s["step"], s["fixed_bytes"], tuple((t[0], tuple(t[1])) for t in s["terms"]))
                      for s in d["steps"])
        return cls(nodes, edges, steps, d["budget_bytes"], d["time_limit_s"], d.get("mesh", ""))


def _label(a: Assignment, rule: ShardingRule) -> str:
    parts = [f"{f.name}:{','.join(ax)}" for f, ax in zip(rule.factors, a) if ax]
    return "{" + " ".join(parts) + "}" if parts else "replicated"


def build_problem(st: Structure, device: DeviceProfile, budget_bytes: float | None,
                  time_limit_s: float = 20.0) -> Problem:
    graph, mesh, nodes = st.graph, st.mesh, st.graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    size = [len(st.strategies[r[0]]) for r in st.classes]
    cost = [np.zeros(s) for s in size]
    weights = [np.zeros(s) for s in size]
    edges: dict[tuple[int, int], np.ndarray] = {}
    compute_cache: dict = {}
    rc_cache: dict = {}
    param_ids = {id(p) for p in graph.params}

    def rcost(src: Spec, dst: Spec, t: TensorType) -> float:
        key = (src, dst, t)
        if key not in rc_cache:
            rc_cache[key] = reshard_cost(src, dst, t, mesh)
        return rc_cache[key]

    def matrix(srcs: list[Spec], dsts: list[Spec], t: TensorType) -> np.ndarray:
        us, ui = _unique(srcs)
        vs, vi = _unique(dsts)
        m = np.array([[rcost(a, b, t) for b in vs] for a in us])
        return m[np.ix_(ui, vi)]

    def add_pair(pu: int, pv: int, srcs: list[Spec], dsts: list[Spec], t: TensorType) -> None:
        """A reshard from node pu's spec (per its root's strategy) into node pv's requirement."""
        ru, rv = st.root[pu], st.root[pv]
        cu, cv = st.klass[ru], st.klass[rv]
        if ru == rv or cu == cv:  # same group, or two copies of one class: one strategy decides both
            cost[cu] += np.array([rcost(a, b, t) for a, b in zip(srcs, dsts)])
            return
        m = matrix(srcs, dsts, t)
        if cu > cv:
            cu, cv, m = cv, cu, m.T
        edges[(cu, cv)] = edges[(cu, cv)] + m if (cu, cv) in edges else m

    for i, n in enumerate(nodes):
        r = st.root[i]
        if r < 0:
            continue
        c = st.klass[r]
        ns = size[c]
        row = []
        for s in range(ns):
            key = (st.rules_key[i], st.assign[i][s])
            if key not in compute_cache:
                compute_cache[key] = (node_compute_s(n, st.rules[i], st.assign[i][s], mesh, device)
                                      + node_comm_s(n, st.rules[i], st.assign[i][s], mesh))
            row.append(compute_cache[key])
        cost[c] += row
        for k, v in enumerate(n.inputs):
            req = [st.specs(i, s)[0][k] for s in range(ns)]
            if v.name in st.first_use:
                j, kk = st.first_use[v.name]
                if (j, kk) == (i, k):
                    if id(v) in param_ids:
                        weights[c] += [local_bytes(v.type, q, mesh) for q in req]
                    continue
                srcs = [st.specs(j, s)[0][kk] for s in range(size[st.klass[st.root[j]]])]
                add_pair(j, i, srcs, req, v.type)
                continue
            if v.producer is None or v.producer.op == "constant":
                continue  # fed whole (or a constant): sliced for free
            p = index[id(v.producer)]
            o = v.producer.outputs.index(v)
            srcs = [st.specs(p, s)[1][o] for s in range(size[st.klass[st.root[p]]])]
            add_pair(p, i, srcs, req, v.type)
    for i1, i2 in _routed_pairs(graph):  # expert layers: the all-reduce between their products is not run
        c1, c2 = st.klass[st.root[i1]], st.klass[st.root[i2]]
        e1, e2 = (next(f for f, fac in enumerate(st.rules[i].factors) if fac.name == "experts") for i in (i1, i2))
        y = nodes[i1].outputs[0]
        m = np.zeros((size[c1], size[c2]))
        for s1 in range(size[c1]):
            out, axes = st.specs(i1, s1)[1][0], st.assign[i1][s1][e1]
            if axes and set(out.partial) == set(axes):  # partial over the experts' axes alone
                saved = rcost(out, Spec(out.dims), y.type)
                m[s1] = [-saved if st.assign[i2][s2][e2] == axes else 0.0 for s2 in range(size[c2])]
        if c1 == c2:  # copies of one class: one strategy decides both
            cost[c1] += np.diag(m)
        elif m.any():
            m, (cu, cv) = (m, (c1, c2)) if c1 < c2 else (m.T, (c2, c1))
            edges[(cu, cv)] = edges[(cu, cv)] + m if (cu, cv) in edges else m
    for v in graph.outputs:  # outputs end in their requested layout (replicated unless --output-shard)
        if v.producer is None or v.producer.op == "constant":
            continue
        p = index[id(v.producer)]
        o = v.producer.outputs.index(v)
        c = st.klass[st.root[p]]
        want = st.output_specs.get(v.name, Spec.replicated(v.type.rank))
        cost[c] += [rcost(st.specs(p, s)[1][o], want, v.type) for s in range(size[c])]
    steps = _memory_steps(st, size)
    pnodes = []
    for c, roots in enumerate(st.classes):
        r = roots[0]
        pnodes.append(ProblemNode(nodes[r].source or f"{nodes[r].op}#{r}",
                                  tuple(_label(a, st.rules[r]) for a in st.strategies[r]),
                                  tuple(float(x) for x in cost[c]), tuple(float(x) for x in weights[c]),
                                  tuple(st.allowed[c]), len(roots)))
    pedges = tuple(ProblemEdge(u, v, tuple(tuple(float(x) for x in row) for row in m))
                   for (u, v), m in sorted(edges.items()))
    return Problem(tuple(pnodes), pedges, steps, None if budget_bytes is None else float(budget_bytes),
                   float(time_limit_s), str(mesh))


def _routed_pairs(graph) -> list[tuple[int, int]]:
    """(first, second) node indices of the expert layers whose first product's result reaches, through row-wise ops
    only, the second product routed by the same indices (``partition.routed_region``): when both split their
    experts over the same axes, the partitioner drops the all-reduce of the first's partial result
    (``partition._elide_routed_reduces``), so the problem credits the reshard it charges for it on the edges
    between them."""
    users = graph.users()
    outputs = set(map(id, graph.outputs))
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    pairs = []
    for i, n in enumerate(graph.nodes):
        if n.op == "gather_matmul":
            found = routed_region(n.outputs[0], users, outputs, lambda r, n=n: r.inputs[2] is n.inputs[2])
            pairs += [(i, index[id(end)]) for end in (found[1] if found else ())]
    return pairs


def _unique(specs: list[Spec]) -> tuple[list[Spec], list[int]]:
    seen: dict[Spec, int] = {}
    idx = [seen.setdefault(s, len(seen)) for s in specs]
    return list(seen), idx


def _memory_steps(st: Structure, size: list[int]) -> tuple[MemoryStep, ...]:
    """Live activations after each node (values freed after their last use), one step per distinct live set."""
    graph, mesh, nodes = st.graph, st.mesh, st.graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    last: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for v in n.inputs:
            last[id(v)] = i
    for v in graph.outputs:
        last[id(v)] = len(nodes)
    fixed_inputs = sum(v.type.nbytes for v in graph.inputs)
    live: dict[int, Value] = {}
    seen: dict[tuple, int] = {}
    out: list[MemoryStep] = []
    bytes_cache: dict = {}
    for i, n in enumerate(nodes):
        for v in n.outputs:
            live[id(v)] = v
        fixed = float(fixed_inputs)
        terms: dict[int, np.ndarray] = {}
        for v in live.values():
            p = index[id(v.producer)]
            if st.root[p] < 0:
                fixed += v.type.nbytes
                continue
            c = st.klass[st.root[p]]
            o = v.producer.outputs.index(v)
            key = (st.rules_key[p], tuple(st.assign[p]), o)
            if key not in bytes_cache:
                bytes_cache[key] = np.array([local_bytes(v.type, st.specs(p, s)[1][o], mesh)
                                             for s in range(size[c])], float)
            terms[c] = terms.get(c, 0) + bytes_cache[key]
        sig = (fixed,) + tuple((c, tuple(t)) for c, t in sorted(terms.items()))
        if sig not in seen:
            seen[sig] = len(out)
            out.append(MemoryStep(i, fixed, tuple((c, tuple(float(x) for x in t)) for c, t in sorted(terms.items()))))
        for v in list(n.outputs) + list(n.inputs):
            if id(v) in live and last.get(id(v), -1) <= i:
                del live[id(v)]
    return tuple(_undominated(out))


def _undominated(steps: list[MemoryStep], limit: int = 400) -> list[MemoryStep]:
    """Drop a step whose fixed part and every term are at most another step's: it can never bind. (Steps are
    already distinct, so two steps never dominate each other.) The quadratic scan is skipped on long lists."""
    if len(steps) > limit:
        return steps
    terms = [dict(s.terms) for s in steps]
    keep = []
    for i, s in enumerate(steps):
        dominated = any(
            j != i and t.fixed_bytes >= s.fixed_bytes and set(terms[i]) <= set(terms[j])
            and all(all(a <= b for a, b in zip(terms[i][c], terms[j][c])) for c in terms[i])
            for j, t in enumerate(steps))
        if not dominated:
            keep.append(s)
    return keep


# ---------------------------------------------------------------------------------------------------------------
# Solving

@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]  # strategy index per problem node
    status: str  # optimal | time_limit | greedy | infeasible
    objective_s: float
    stats: dict

    def to_json(self) -> dict:
        return {"choice": list(self.choice), "status": self.status, "objective_s": self.objective_s, **self.stats}


def objective_of(problem: Problem, choice) -> float:
    """Seconds: the problem's objective at ``choice``."""
    total = sum(n.cost[s] for n, s in zip(problem.nodes, choice))
    return total + sum(e.cost[choice[e.u]][choice[e.v]] for e in problem.edges)


def peak_of(problem: Problem, choice) -> float:
    """Bytes per device at the worst memory step of ``choice``."""
    w = sum(n.weight_bytes[s] for n, s in zip(problem.nodes, choice))
    steps = [s.fixed_bytes + sum(t[choice[c]] for c, t in s.terms) for s in problem.steps]
    return w + max(steps, default=0.0)


def _compress(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows and columns: (row group per u strategy, column group per v strategy, reduced matrix)."""
    r = np.round(m * TIME_SCALE, 9)
    _, rows, rinv = np.unique(r, axis=0, return_index=True, return_inverse=True)
    _, cols, cinv = np.unique(r.T, axis=0, return_index=True, return_inverse=True)
    return rinv.ravel(), cinv.ravel(), m[np.ix_(rows, cols)]


def solve(problem: Problem, *, objective: str = "time") -> Solution:
    """The ILP with HiGHS under the problem's time limit. ``objective="memory"`` minimizes the peak instead (used to
    explain infeasible budgets). Never raises for solver trouble: falls back to a greedy choice and says so."""
    t0 = time.perf_counter()
    try:
        return _solve_milp(problem, objective, t0)
    except Exception as e:  # FAILURES.md 27: solver failure → greedy plan, said out loud
        choice = greedy(problem)
        return Solution(choice, "greedy", objective_of(problem, choice),
                        {"time_s": time.perf_counter() - t0, "message": f"solver failed ({e}); greedy plan",
                         "gap": None, "variables": 0, "constraints": 0})


def _solve_milp(problem: Problem, objective: str, t0: float) -> Solution:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    nodes = problem.nodes
    budget = problem.budget_bytes
    scale_b = 1.0 / budget if budget else 2.0 ** -30  # memory rows in units of the budget (or GiB)
    cap = (1.0 - MEMORY_MARGIN) * budget if budget else None
    off = np.cumsum([0] + [len(n.cost) for n in nodes])
    nx = int(off[-1])
    c: list[float] = []
    for n in nodes:
        c.extend(x * TIME_SCALE for x in n.cost)
    c = list(np.asarray(c, float))
    rows, cols, vals, lo, hi = [], [], [], [], []
    nrow = 0

    def row(entries, lb, ub):
        nonlocal nrow
        for j, a in entries:
            rows.append(nrow)
            cols.append(j)
            vals.append(a)
        lo.append(lb)
        hi.append(ub)
        nrow += 1

    for k, n in enumerate(nodes):
        row([(int(off[k]) + s, 1.0) for s in range(len(n.cost))], 1.0, 1.0)
    nvar = nx
    kept = folded = 0
    zcost: list[float] = []
    for e in problem.edges:
        m = np.asarray(e.cost, float)
        a, b = m[:, 0] - m[0, 0], m[0, :]
        if np.allclose(m, a[:, None] + b[None, :], rtol=0, atol=1e-12):  # separable: fold into the node costs
            for s in range(len(a)):
                c[int(off[e.u]) + s] += a[s] * TIME_SCALE
            for s in range(len(b)):
                c[int(off[e.v]) + s] += b[s] * TIME_SCALE
            folded += 1
            continue
        kept += 1
        rg, cg, red = _compress(m)
        P, Q = red.shape
        base = nvar
        nvar += P * Q
        zcost.extend((red * TIME_SCALE).ravel().tolist())
        for p in range(P):
            row([(base + p * Q + q, 1.0) for q in range(Q)] +
                [(int(off[e.u]) + s, -1.0) for s in np.flatnonzero(rg == p)], 0.0, 0.0)
        for q in range(Q):
            row([(base + p * Q + q, 1.0) for p in range(P)] +
                [(int(off[e.v]) + s, -1.0) for s in np.flatnonzero(cg == q)], 0.0, 0.0)
    cvec = np.concatenate([np.asarray(c), np.asarray(zcost)]) if zcost else np.asarray(c)
    # W (weights, GiB) and, for the memory objective, the peak M
    w_var = nvar
    nvar += 1
    cvec = np.append(cvec, 0.0)
    row([(int(off[k]) + s, x * scale_b) for k, n in enumerate(nodes) for s, x in enumerate(n.weight_bytes) if x]
        + [(w_var, -1.0)], 0.0, 0.0)
    m_var = None
    if objective == "memory":
        m_var = nvar
        nvar += 1
        cvec = np.append(np.zeros(len(cvec)), 1.0)
    for stp in problem.steps:
        entries = [(w_var, 1.0)] + [(int(off[k]) + s, x * scale_b) for k, t in stp.terms for s, x in enumerate(t)
                                     if x]
        if m_var is not None:
            row(entries + [(m_var, -1.0)], -np.inf, -stp.fixed_bytes * scale_b)
        elif problem.budget_bytes is not None:
            row(entries, -np.inf, (cap - stp.fixed_bytes) * scale_b)
    if m_var is not None and not problem.steps:
        row([(w_var, 1.0), (m_var, -1.0)], -np.inf, 0.0)
    if objective != "memory" and problem.budget_bytes is not None and not problem.steps:
        row([(w_var, 1.0)], -np.inf, cap * scale_b)
    ub = np.ones(nvar)
    ub[w_var] = np.inf
    if m_var is not None:
        ub[m_var] = np.inf
    for k, n in enumerate(nodes):
        for s, ok in enumerate(n.allowed):
            if not ok:
                ub[int(off[k]) + s] = 0.0
    integrality = np.zeros(nvar)
    integrality[:nx] = 1
    A = coo_matrix((vals, (rows, cols)), shape=(nrow, nvar)).tocsr()
    res = milp(cvec, constraints=LinearConstraint(A, np.array(lo), np.array(hi)), integrality=integrality,
               bounds=Bounds(np.zeros(nvar), ub),
               options={"time_limit": float(problem.time_limit_s), "mip_rel_gap": MIP_REL_GAP, "presolve": True,
                        "disp": False})
    stats = {"variables": int(nvar), "binary_variables": nx, "constraints": int(nrow), "edges_kept": kept,
             "edges_folded": folded, "time_s": 0.0, "message": str(res.message),
             "gap": None if getattr(res, "mip_gap", None) is None else float(res.mip_gap)}
    if res.x is None:
        stats["time_s"] = time.perf_counter() - t0
        if res.status == 2:
            return Solution((), "infeasible", math.inf, stats)
        choice = greedy(problem)
        stats["message"] = f"solver returned no solution ({res.message}); greedy plan"
        return Solution(choice, "greedy", objective_of(problem, choice), stats)
    choice = tuple(int(np.argmax(res.x[off[k]:off[k + 1]])) for k in range(len(nodes)))
    stats["time_s"] = time.perf_counter() - t0
    status = "optimal" if res.status == 0 else "time_limit"
    return Solution(choice, status, objective_of(problem, choice), stats)


def greedy(problem: Problem) -> tuple[int, ...]:
    """Node by node, the allowed strategy cheapest against the nodes already chosen (memory ignored)."""
    incident: dict[int, list[ProblemEdge]] = {}
    for e in problem.edges:
        incident.setdefault(e.v, []).append(e)
        incident.setdefault(e.u, []).append(e)
    choice: dict[int, int] = {}
    for k, n in enumerate(problem.nodes):
        best, best_s = math.inf, 0
        for s, ok in enumerate(n.allowed):
            if not ok:
                continue
            x = n.cost[s]
            for e in incident.get(k, []):
                other = e.u if e.v == k else e.v
                if other in choice:
                    x += e.cost[choice[e.u]][s] if e.v == k else e.cost[s][choice[e.v]]
            if x < best:
                best, best_s = x, s
        choice[k] = best_s
    return tuple(choice[k] for k in range(len(problem.nodes)))
