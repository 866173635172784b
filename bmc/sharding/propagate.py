"""Sharding propagation: from user annotations to a spec on every value and a strategy on every node.

Written once over factor rules (never over op names): a node's known operand/result specs name mesh axes for its
factors; the factors then give specs to the node's other tensors. Passes alternate forward and backward until
nothing changes. Priority: a user annotation always wins; otherwise the first spec a value receives is kept. Every
spec records where it came from (``annotation``, ``propagated from node N (direction)``, ``default``).
"""

from __future__ import annotations

import difflib
from math import prod
from typing import Mapping

from bmc.errors import PlanningError, UsageError
from bmc.ir.graph import Graph, Node, Value
from bmc.sharding.mesh import Mesh
from bmc.sharding.partition import rule_of
from bmc.sharding.plan import Plan
from bmc.sharding.rules import Assignment, ShardingRule
from bmc.sharding.spec import Spec, SpecError

MAX_PASSES = 8


def resolve_annotations(graph: Graph, mesh: Mesh, annotations: Mapping[str, Spec | str]) -> dict[str, Spec]:
    """Annotations by value name, parsed and validated; unknown names list near matches (FAILURES.md 21)."""
    values = {v.name: v for v in graph.values()}
    out = {}
    for name, spec in annotations.items():
        if name not in values:
            near = difflib.get_close_matches(name, list(values), n=5, cutoff=0.5)
            raise UsageError(f"--shard names tensor {name!r}, which the model does not have", where="--shard",
                             fix=("did you mean " + ", ".join(map(repr, near)) + "?") if near else
                             "use the ONNX tensor names of inputs, weights or node outputs")
        try:
            s = (Spec.parse(spec) if isinstance(spec, str) else spec).onto(mesh)
            s.validate(values[name].type.shape, mesh)
        except SpecError as e:
            raise UsageError(f"annotation for tensor {name!r} {values[name].type} cannot be used: {e}",
                             where=f"--shard {name}", fix="pick mesh axes whose sizes divide the dims they split") \
                from None
        if s.partial:
            raise UsageError(f"annotation for {name!r} is partial; only computations produce partial values",
                             where=f"--shard {name}")
        out[name] = s
    return out


def resolve_io_specs(graph: Graph, mesh: Mesh, specs: Mapping[str, Spec | str], kind: str) -> dict[str, Spec]:
    """``--input-shard`` / ``--output-shard`` layouts (``kind`` "input" or "output") by value name: the model's
    input or output names (outputs: ``Graph.output_names``), parsed and validated; split, never partial."""
    flag = f"--{kind}-shard"
    values = graph.inputs if kind == "input" else graph.outputs
    names = dict(zip([v.name for v in values] if kind == "input" else graph.output_names or [v.name for v in values],
                     values))
    out = {}
    for name, spec in specs.items():
        where = f"{flag} {name}"
        if name not in names:
            near = difflib.get_close_matches(name, list(names), n=5, cutoff=0.5)
            raise UsageError(f"{flag} names {name!r}, which is not an {kind} of the model "
                             f"({kind}s: {', '.join(names)})", where=flag,
                             fix=("did you mean " + ", ".join(map(repr, near)) + "?") if near else
                             f"name one of the model's {kind}s")
        v = names[name]
        try:
            s = (Spec.parse(spec) if isinstance(spec, str) else spec).onto(mesh)
            s.validate(v.type.shape, mesh)
        except SpecError as e:
            raise UsageError(f"{kind} {name!r} {v.type} cannot be laid out so: {e}", where=where,
                             fix="pick mesh axes whose sizes divide the dims they split") from None
        if s.partial:
            raise UsageError(f"{kind} layout {s} for {name!r} is partial; {kind}s are split or whole, never pending "
                             "sums", where=where, fix="leave out the partial{...} part")
        out[v.name] = s
    return out


def assignment_from_specs(rule: ShardingRule, specs: list[Spec | None], mesh: Mesh,
                          order: list[int] | None = None) -> Assignment:
    """Factor axes implied by the known specs of the rule's operands then results (``order`` says which tensors
    speak first), dropping anything the rule does not allow (replicate factors, reused axes, indivisible sizes)."""
    assign: list[tuple[str, ...] | None] = [None] * len(rule.factors)
    taken: set[str] = set()
    outer_of = {inner: outer for outer, inner in rule.grouped}  # a grouped inner factor's axes split its outer
    tensors = list(rule.operands) + list(rule.results)
    for k in order or range(len(tensors)):
        dims, spec = tensors[k], specs[k]
        if spec is None:
            continue
        for factors, axes in zip(dims, spec.dims):
            remaining = list(axes)
            for f in factors:  # axes fill factors major to minor; a minor factor gets axes only once the
                size, got = rule.factors[f].size, []  # factors before it are split completely (block layout)
                while remaining and size % (prod(mesh.axis(a).size for a in got + [remaining[0]])) == 0:
                    got.append(remaining.pop(0))
                target = outer_of.get(f, f)
                if assign[target] is None and got and rule.factors[f].kind != "replicate" \
                        and not taken.intersection(got):
                    assign[target] = tuple(got)
                    taken.update(got)
                if prod(mesh.axis(a).size for a in got) != size:
                    break
    result = rule.complete(tuple(a or () for a in assign), mesh)
    return result if rule.check(result, mesh) is None else _drop_invalid(rule, result, mesh)


def _drop_invalid(rule: ShardingRule, assign: Assignment, mesh: Mesh) -> Assignment:
    """Unsplit factors, minor ones first, until the strategy is valid (indivisible sizes, non-block layouts)."""
    a = list(assign)
    for f in reversed(range(len(a))):
        if rule.check(tuple(a), mesh) is None:
            break
        a[f] = ()
        a = list(rule.complete(tuple(a), mesh))
    return tuple(a)


def propagate(graph: Graph, mesh: Mesh, annotations: Mapping[str, Spec | str] | None = None) -> Plan:
    fixed = resolve_annotations(graph, mesh, annotations or {})
    spec: dict[str, Spec] = dict(fixed)
    origin = {name: "annotation" for name in fixed}
    rules = [rule_of(n) for n in graph.nodes]
    for _ in range(MAX_PASSES):
        changed = False
        order = list(enumerate(graph.nodes))
        for direction, nodes in (("forward", order), ("backward", order[::-1])):
            for i, node in nodes:
                changed |= _visit(node, rules[i], spec, origin, mesh, direction)
        if not changed:
            break
    for v in graph.values():
        if v.name not in spec:
            spec[v.name] = Spec.replicated(v.type.rank)
            origin[v.name] = "default"
    # final strategies, in topological order: results (annotated or propagated) speak first, then operands
    strategies: dict[int, Assignment] = {}
    forced: dict[str, Spec] = {}
    for i, node in enumerate(graph.nodes):
        rule, n_in = rules[i], len(node.inputs)
        known = [_dims_only(spec[v.name]) for v in list(node.inputs) + list(node.outputs)]
        a = assignment_from_specs(rule, known, mesh, list(range(n_in, len(known))) + list(range(n_in)))
        strategies[i] = a
        for v, s in zip(node.outputs, rule.result_specs(a)):
            if v.name in fixed and _dims_only(s) != fixed[v.name]:
                forced[v.name] = fixed[v.name]  # the producer cannot make it: reshard right after the node
            spec[v.name] = s
    return Plan(mesh, spec, strategies, origin, forced=forced)


def _dims_only(s: Spec | None) -> Spec | None:
    return None if s is None else Spec(s.dims)


def _visit(node: Node, rule: ShardingRule, spec: dict[str, Spec], origin: dict[str, str], mesh: Mesh,
           direction: str) -> bool:
    tensors: list[Value] = list(node.inputs) + list(node.outputs)
    known = [_dims_only(spec.get(v.name)) for v in tensors]
    if all(s is None for s in known) or all(s is not None for s in known):
        return False
    n_in = len(node.inputs)
    order = (list(range(n_in, len(tensors))) + list(range(n_in)) if direction == "backward"
             else list(range(len(tensors))))
    assign = assignment_from_specs(rule, known, mesh, order)
    if not any(assign):
        return False
    changed = False
    new = rule.operand_specs(assign) + rule.result_specs(assign)
    where = node.source or node.op
    for v, s in zip(tensors, new):
        if v.name not in spec and not s.is_replicated():
            spec[v.name] = s
            origin[v.name] = f"propagated from node {where!r} ({direction})"
            changed = True
    return changed


def check_plan(graph: Graph, plan: Plan) -> None:
    """Every strategy valid for its rule on the plan's mesh."""
    for i, node in enumerate(graph.nodes):
        why = rule_of(node).check(plan.strategies[i], plan.mesh)
        if why:
            raise PlanningError(f"invalid strategy: {why}", where=f"node {node.source or node.op}")
