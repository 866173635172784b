"""Automatic sharding as an integer linear program (Alpa's intra-op pass), written over factor rules.

Pipeline: ``analyze`` (strategies per node, shrinking) → ``build_problem`` (a typed, JSON-serializable ILP) →
``solve`` (HiGHS through ``scipy.optimize.milp``, time-limited, deterministic) → ``plan_from_choice`` (a ``Plan``).

* **Strategies** of a node: every assignment of the mesh axes (size > 1) to its splittable factors, each axis at most
  once, several axes on one factor in mesh order, kept when ``rule.check`` accepts it (divisibility, compound dims);
  ordered by the number of axes used, capped at ``MAX_STRATEGIES``.
* **Shrinking**: (1) a node with exactly one operand produced by another node whose factors are exactly that
  operand's (elementwise, transpose, reshape, bias add) *follows* it: its strategy is derived from the producer's
  result spec, so its group has one variable; (2) repeated layers (a periodic run of structurally identical nodes,
  verified edge by edge) share one variable per position: ``copies`` of a class all take the same strategy.
* **Problem**: a node (class) has a cost per strategy (compute of every node it stands for, resharding inside its
  groups, gathering graph outputs, edges between copies of itself) and weight bytes per strategy; an edge between two
  classes has a resharding-cost matrix (``reshard_cost`` of the producer's result spec into the consumer's required
  spec, summed over every graph edge it stands for); memory steps bound weights + live activations per device.
* **ILP**: one-hot binaries ``x[c, s]``; an edge matrix, compressed to its distinct rows/columns (separable
  matrices fold into node costs), gets continuous ``z[p, q]`` with row sums = producer groups and column sums =
  consumer groups (exact for one-hot ``x``); ``W`` = Σ weight bytes; for each distinct live set
  ``W + Σ activation bytes ≤ budget``. Costs in µs, bytes in units of the budget (FAILURES.md 27: scaled).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np

from bmc.errors import PlanningError, UsageError
from bmc.ir.graph import Graph, Node, Value
from bmc.ir.types import TensorType
from bmc.sharding.cost import DeviceProfile, local_bytes, node_compute_s
from bmc.sharding.mesh import Mesh
from bmc.sharding.partition import rule_of
from bmc.sharding.plan import Plan
from bmc.sharding.propagate import assignment_from_specs
from bmc.sharding.propagate import resolve_annotations
from bmc.sharding.reshard import reshard_cost
from bmc.sharding.rules import Assignment, ShardingRule
from bmc.sharding.spec import Spec

MAX_STRATEGIES = 64
TIME_SCALE = 1e6  # objective in µs
MEMORY_MARGIN = 1e-6  # memory rows are scaled by the budget; keep this fraction of it free for solver tolerances
MIP_REL_GAP = 1e-6
ORIGIN = "auto (ILP)"


# ---------------------------------------------------------------------------------------------------------------
# Strategies

def enumerate_strategies(rule: ShardingRule, mesh: Mesh, cap: int = MAX_STRATEGIES) -> list[Assignment]:
    """Every valid assignment of mesh axes to the rule's factors (replicated first, fewer axes first)."""
    axes = [a.name for a in mesh.axes if a.size > 1]
    splittable = [i for i, f in enumerate(rule.factors) if f.kind != "replicate" and f.size > 1]
    found: dict[Assignment, tuple] = {}
    for choice in itertools.product([None] + splittable, repeat=len(axes)):
        parts: list[list[str]] = [[] for _ in rule.factors]
        for axis, f in zip(axes, choice):
            if f is not None:
                parts[f].append(axis)
        a = tuple(tuple(p) for p in parts)
        if a not in found and rule.check(a, mesh) is None:
            found[a] = (sum(c is not None for c in choice), tuple(-1 if c is None else c for c in choice))
    return sorted(found, key=lambda a: found[a])[:cap]


def _freeze(x):
    if isinstance(x, np.ndarray):
        return ("array", x.dtype.str, x.shape, hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest())
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(y) for y in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    return x


def node_key(node: Node) -> tuple:
    """What a node's rule, strategies and costs depend on: op, operand and result types, attributes."""
    return (node.op, tuple(v.type for v in node.inputs), tuple(v.type for v in node.outputs), _freeze(node.attrs))


# ---------------------------------------------------------------------------------------------------------------
# Analysis: strategies per node, follower groups, repeated layers

@dataclass
class Structure:
    """A graph analyzed for one mesh: which variable every node's strategy is derived from."""

    graph: Graph
    mesh: Mesh
    annotations: dict[str, Spec]
    rules: list[ShardingRule]
    root: list[int]  # node → root node of its follower group (constants: -1)
    strategies: dict[int, list[Assignment]]  # root → its strategies
    assign: dict[int, list[Assignment]]  # node → its assignment under each strategy of its root
    klass: dict[int, int]  # root → class (problem node) index
    classes: list[list[int]]  # class → its roots (the first is the representative)
    allowed: list[list[bool]]  # class → strategy allowed by the annotations
    first_use: dict[str, tuple[int, int]]  # param / annotated input → (node, operand) whose required spec it takes
    stats: dict = field(default_factory=dict)
    _spec_cache: dict = field(default_factory=dict, repr=False)

    def specs(self, n: int, s: int) -> tuple[list[Spec], list[Spec]]:
        """(operand specs, result specs) of node ``n`` when its root takes strategy ``s``."""
        a = self.assign[n][s]
        key = (self.rules_key[n], a)
        hit = self._spec_cache.get(key)
        if hit is None:
            rule = self.rules[n]
            hit = self._spec_cache[key] = (rule.operand_specs(a), rule.result_specs(a))
        return hit

    rules_key: list = field(default_factory=list, repr=False)


def _follow_operand(node: Node, rule: ShardingRule, touched: set[str]) -> int | None:
    """The operand a node follows: the only one produced by a non-constant node, carrying exactly the node's
    factors (elementwise, transpose, reshape, bias add); None when the node must have a variable of its own."""
    if node.op == "constant" or any(v.name in touched for v in list(node.inputs) + list(node.outputs)):
        return None
    produced = [k for k, v in enumerate(node.inputs) if v.producer is not None and v.producer.op != "constant"]
    if len(produced) != 1 or any(f.kind == "reduction" for f in rule.factors):
        return None
    k = produced[0]
    mine = {f for d in rule.operands[k] for f in d if rule.factors[f].kind != "replicate"}
    res = {f for r in rule.results for d in r for f in d if rule.factors[f].kind != "replicate"}
    if not mine or mine != res or any(rule.factors[f].kind == "replicate" for r in rule.results for d in r for f in d):
        return None
    return k


def analyze(graph: Graph, mesh: Mesh, annotations: Mapping[str, Spec | str] | None = None, *, merge: bool = True,
            dedup: bool = True) -> Structure:
    t0 = time.perf_counter()
    ann = resolve_annotations(graph, mesh, annotations or {})
    nodes = graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    rules = [rule_of(n) for n in nodes]
    keys = [node_key(n) for n in nodes]
    strat_cache: dict = {}
    root = [-1] * len(nodes)
    follows: dict[int, int] = {}
    for i, n in enumerate(nodes):
        if n.op == "constant":
            continue
        k = _follow_operand(n, rules[i], set(ann)) if merge else None
        if k is not None:
            follows[i] = k
            root[i] = root[index[id(n.inputs[k].producer)]]
        else:
            root[i] = i
    # repeated layers: node → representative node
    rep = _repeated_layers(graph, keys, index, set(ann)) if dedup else {}
    strategies: dict[int, list[Assignment]] = {}
    for i, n in enumerate(nodes):
        if root[i] == i:
            if keys[i] not in strat_cache:
                strat_cache[keys[i]] = enumerate_strategies(rules[i], mesh)
            strategies[i] = strat_cache[keys[i]]
    st = Structure(graph, mesh, ann, rules, root, strategies, {}, {}, [], [], {}, rules_key=keys)
    # derive every follower's assignment from its root's strategies, in node order
    derive_cache: dict = {}
    for i, n in enumerate(nodes):
        if root[i] < 0:
            continue
        if root[i] == i:
            st.assign[i] = strategies[i]
            continue
        k = follows[i]
        p = index[id(n.inputs[k].producer)]
        out_idx = n.inputs[k].producer.outputs.index(n.inputs[k])
        row = []
        for s in range(len(strategies[root[i]])):
            src = Spec(st.specs(p, s)[1][out_idx].dims)
            key = (keys[i], k, src)
            if key not in derive_cache:
                known = [None] * (len(n.inputs) + len(n.outputs))
                known[k] = src
                derive_cache[key] = assignment_from_specs(rules[i], known, mesh)
            row.append(derive_cache[key])
        st.assign[i] = row
    # classes: roots whose representative is a root with the same strategies share a variable
    for r in sorted(strategies):
        rr = rep.get(r, r)
        if rr != r and root[rr] == rr and rr in st.klass and keys[rr] == keys[r]:
            st.klass[r] = st.klass[rr]
            st.classes[st.klass[r]].append(r)
        else:
            st.klass[r] = len(st.classes)
            st.classes.append([r])
    _first_uses(st, ann)
    _restrict(st, ann)
    st.stats = {"nodes": len(nodes), "constants": sum(n.op == "constant" for n in nodes),
                "groups": len(strategies), "classes": len(st.classes),
                "repeated_layers": st.stats.get("repeated_layers", None) or _layer_stats(rep, nodes),
                "analyze_s": time.perf_counter() - t0}
    return st


def _layer_stats(rep: dict[int, int], nodes) -> dict:
    if not rep:
        return {"copies": 0, "nodes_per_layer": 0}
    reps = set(rep.values())
    copies = len(rep) // max(1, len(reps)) + 1
    return {"copies": copies, "nodes_per_layer": len(reps)}


def _first_uses(st: Structure, ann: dict[str, Spec]) -> None:
    """Params (and annotated inputs) take the spec their first consumer requires."""
    held = {id(p) for p in st.graph.params} | {id(v) for v in st.graph.inputs if v.name in ann}
    for i, n in enumerate(st.graph.nodes):
        if st.root[i] < 0:
            continue
        for k, v in enumerate(n.inputs):
            if id(v) in held and v.name not in st.first_use:
                st.first_use[v.name] = (i, k)


def _restrict(st: Structure, ann: dict[str, Spec]) -> None:
    """Annotated specs as constraints: only strategies that produce (or, for params and inputs, require) them."""
    st.allowed = [[True] * len(st.strategies[roots[0]]) for roots in st.classes]
    where: list[tuple[int, int | None, int, str]] = []  # (node, operand or None, result index, value)
    for i, n in enumerate(st.graph.nodes):
        if st.root[i] < 0:
            continue
        for j, v in enumerate(n.outputs):
            if v.name in ann:
                where.append((i, None, j, v.name))
    for name, (i, k) in st.first_use.items():
        if name in ann:
            where.append((i, k, 0, name))
    for i, k, j, name in where:
        c = st.klass[st.root[i]]
        want = ann[name]
        for s in range(len(st.allowed[c])):
            ops, res = st.specs(i, s)
            got = ops[k] if k is not None else Spec(res[j].dims)
            if got != want:
                st.allowed[c][s] = False
        if not any(st.allowed[c]):
            raise UsageError(f"no strategy of node {st.graph.nodes[i].source or st.graph.nodes[i].op!r} "
                             f"({st.graph.nodes[i].op}) gives tensor {name!r} the annotated spec {want}",
                             where=f"--shard {name}", fix="annotate a spec the op can produce, or drop the annotation")


def _weak_sig(node: Node, key_hash: dict) -> int:
    refs = tuple((v.producer.op if v.producer is not None else "in", v.type) for v in node.inputs)
    return hash((key_hash, refs)) & ((1 << 62) - 1)


def _repeated_layers(graph: Graph, keys: list, index: dict[int, int], touched: set[str]) -> dict[int, int]:
    """node → representative node in the first copy, for the longest periodic run of identical layers whose edges
    correspond copy by copy (an edge of copy j comes from the same position in copy j or j-1, or from one shared
    value); empty when nothing repeats."""
    nodes = graph.nodes
    n = len(nodes)
    if n < 4:
        return {}
    sig = np.array([_weak_sig(nd, hash(keys[i])) for i, nd in enumerate(nodes)], dtype=np.int64)
    last: dict[int, int] = {}
    gaps: dict[int, int] = {}
    for i, s in enumerate(sig.tolist()):
        if s in last:
            g = i - last[s]
            gaps[g] = gaps.get(g, 0) + 1
        last[s] = i
    best = (0, 0, 0)  # (run, -period, start)
    for L in sorted(gaps, key=lambda g: (-gaps[g], g))[:12]:
        if L < 2 or 2 * L > n:
            continue
        eq = np.concatenate([[False], sig[:-L] == sig[L:], [False]])
        d = np.diff(eq.astype(np.int8))
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        if not len(starts):
            continue
        lens = ends - starts
        j = int(np.argmax(lens))
        if lens[j] >= L and (lens[j], -L) > best[:2]:
            best = (int(lens[j]), -L, int(starts[j]))
    run, L, a0 = best[0], -best[1], best[2]
    if not run:
        return {}

    def same(i: int, c: int) -> bool:
        """Node ``i`` and its copy ``c`` layers later: same key, edges from the same relative position or one
        shared value, no annotations."""
        m = i + c * L
        x, y = nodes[i], nodes[m]
        if keys[i] != keys[m] or any(v.name in touched for v in list(x.inputs) + list(x.outputs) +
                                     list(y.inputs) + list(y.outputs)):
            return False
        for u, w in zip(x.inputs, y.inputs):
            if (u.producer is None) != (w.producer is None):
                return False
            if u.producer is not None and u is not w and index[id(w.producer)] != index[id(u.producer)] + c * L:
                return False
        return True

    best_copies, best_a = 1, a0
    for a in range(a0, a0 + L):  # the weak signatures may line up before the layers really do
        copies = 1
        while a + (copies + 1) * L <= a0 + run + L and all(same(i, copies) for i in range(a, a + L)):
            copies += 1
        if copies > best_copies:
            best_copies, best_a = copies, a
        if copies >= (run - (a - a0)) // L + 1 - 1 and copies > 1:
            break
    rep: dict[int, int] = {}
    for c in range(1, best_copies):
        for i in range(best_a, best_a + L):
            rep[i + c * L] = i
    return rep


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
                compute_cache[key] = node_compute_s(n, st.rules[i], st.assign[i][s], mesh, device)
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
    for v in graph.outputs:  # outputs end replicated
        if v.producer is None or v.producer.op == "constant":
            continue
        p = index[id(v.producer)]
        o = v.producer.outputs.index(v)
        c = st.klass[st.root[p]]
        cost[c] += [rcost(st.specs(p, s)[1][o], Spec.replicated(v.type.rank), v.type) for s in range(size[c])]
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


# ---------------------------------------------------------------------------------------------------------------
# Back to a plan

def plan_from_choice(st: Structure, choice: tuple[int, ...]) -> Plan:
    """Strategies of every node from its class's choice; values take their producer's result spec, params the spec
    their first consumer requires, inputs the spec all their consumers agree on (else replicated)."""
    graph, mesh = st.graph, st.mesh
    strategies: dict[int, Assignment] = {}
    specs: dict[str, Spec] = {}
    origins: dict[str, str] = {}
    for i, n in enumerate(graph.nodes):
        r = st.root[i]
        if r < 0:
            strategies[i] = st.rules[i].replicated()
            for v, s in zip(n.outputs, st.rules[i].result_specs(strategies[i])):
                specs[v.name] = s
                origins[v.name] = "default"
            continue
        s = choice[st.klass[r]]
        strategies[i] = st.assign[i][s]
        for v, sp in zip(n.outputs, st.specs(i, s)[1]):
            specs[v.name] = sp
            origins[v.name] = ORIGIN
    wants: dict[str, list[Spec]] = {}
    for i, n in enumerate(graph.nodes):
        if st.root[i] < 0:
            continue
        s = choice[st.klass[st.root[i]]]
        for v, sp in zip(n.inputs, st.specs(i, s)[0]):
            if v.producer is None:
                wants.setdefault(v.name, []).append(sp)
    for v in graph.params:
        if v.name in st.first_use:
            i, k = st.first_use[v.name]
            specs[v.name] = st.specs(i, choice[st.klass[st.root[i]]])[0][k]
            origins[v.name] = ORIGIN
        else:
            specs[v.name] = Spec.replicated(v.type.rank)
            origins[v.name] = "default"
    for v in graph.inputs:
        if v.name in st.annotations:
            specs[v.name], origins[v.name] = st.annotations[v.name], "annotation"
            continue
        w = wants.get(v.name, [])
        specs[v.name] = w[0] if w and all(x == w[0] for x in w) else Spec.replicated(v.type.rank)
        origins[v.name] = ORIGIN
    for name in st.annotations:
        if name in specs:
            origins[name] = "annotation"
    return Plan(mesh, specs, strategies, origins)


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
                save_problem: str | None = None) -> tuple[Plan, dict]:
    """Analyze, build, solve, and turn the choice into a plan; raises PlanningError (FAILURES.md 25) when no plan
    fits the memory budget."""
    t0 = time.perf_counter()
    st = analyze(graph, mesh, annotations, merge=merge, dedup=dedup)
    t1 = time.perf_counter()
    problem = build_problem(st, device, budget_bytes, time_limit_s)
    t2 = time.perf_counter()
    if save_problem:
        with open(save_problem, "w") as f:
            f.write(problem.dumps())
    sol = solve(problem)
    if sol.status == "infeasible":
        raise PlanningError(infeasible_message(st, problem, device.name), where="--memory-per-device",
                            fix="use a larger mesh or raise --memory-per-device")
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
