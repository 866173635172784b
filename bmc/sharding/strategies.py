"""Sharding strategies of every node for the automatic search, and the shrinking that keeps the ILP small.

* **Strategies** of a node: every assignment of the mesh axes (size > 1) to its splittable factors, each axis at most
  once, several axes on one factor in mesh order, kept when ``rule.check`` accepts it (divisibility, compound dims);
  ordered by the number of axes used, capped at ``MAX_STRATEGIES``.
* **Shrinking** (``analyze``): (1) a node with exactly one operand produced by another node whose factors are
  exactly that operand's (elementwise, transpose, reshape, bias add) *follows* it: its strategy is derived from the
  producer's result spec, so its group has one variable; (2) repeated layers (a periodic run of structurally
  identical nodes, verified edge by edge) share one variable per position: ``copies`` of a class all take the same
  strategy.
* ``plan_from_choice`` turns one strategy per class back into a ``Plan``.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from bmc.errors import UsageError
from bmc.ir.graph import Graph, Node
from bmc.sharding.mesh import Mesh
from bmc.sharding.partition import rule_of
from bmc.sharding.plan import Plan
from bmc.sharding.propagate import assignment_from_specs, resolve_annotations
from bmc.sharding.rules import Assignment, ShardingRule
from bmc.sharding.spec import Spec

MAX_STRATEGIES = 64
ORIGIN = "auto (ILP)"


# ---------------------------------------------------------------------------------------------------------------
# Strategies

def enumerate_strategies(rule: ShardingRule, mesh: Mesh, cap: int = MAX_STRATEGIES) -> list[Assignment]:
    """Every valid assignment of mesh axes to the rule's factors (replicated first, fewer axes first)."""
    axes = [a.name for a in mesh.axes if a.size > 1]
    splittable = rule.splittable()
    found: dict[Assignment, tuple] = {}
    for choice in itertools.product([None] + splittable, repeat=len(axes)):
        parts: list[list[str]] = [[] for _ in rule.factors]
        for axis, f in zip(axes, choice):
            if f is not None:
                parts[f].append(axis)
        a = rule.complete(tuple(tuple(p) for p in parts), mesh)
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
    output_specs: dict[str, Spec] = field(default_factory=dict)  # graph outputs' requested layouts (else replicated)
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
            dedup: bool = True, output_specs: Mapping[str, Spec] | None = None) -> Structure:
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
    st = Structure(graph, mesh, ann, rules, root, strategies, {}, {}, [], [], {}, rules_key=keys,
                   output_specs=dict(output_specs or {}))
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
    return Plan(mesh, specs, strategies, origins, output_specs=dict(st.output_specs))
