"""Rule checker: runs one op sharded by its factor rule on every device of a mesh and compares with the reference.

For an op application, a mesh and a strategy (``Assignment``), the rule gives every operand's and result's spec. Each
device gets its operand shards (``layout.shard``) and runs the op locally: the op's numpy reference with a
``shape`` attribute replaced by the local result shape, or — when the rule has a ``local`` hook — the hook's
program, built with a ``GraphBuilder``-backed ``LocalContext`` (``block_index`` computed from a ``mesh_coord``
input) and run on every device in lockstep by the mesh simulator (a hook's own all-reduces included). A split
max/min reduction's results are combined over its axes (the partitioner's all-reduce), then the results are
reassembled (``layout.unshard``, partial axes summed) and compared with the reference on the global inputs.

    check_rule(op, inputs, attrs, mesh, assignment)      raises AssertionError listing every difference
    random_assignments(rule, mesh, rng, n)              distinct valid strategies that split something
    structure_problems(rule, in_types, out_types)       the rule's dims against the tensors' ranks and sizes
"""

from __future__ import annotations

import itertools
from math import prod
from typing import Sequence

import numpy as np

from bmc.ir.graph import Node, Value
from bmc.ir.types import TensorType, dtype_of
from bmc.ops import get_op
from bmc.ops.builder import GraphBuilder
from bmc.sharding.layout import coordinates, replica_mismatch, shard, unshard
from bmc.sharding.mesh import Mesh
from bmc.sharding.rules import Assignment, ShardingRule
from bmc.sharding.spec import Spec
from bmc.testing.spmd_sim import run_lockstep

FLOAT_ATOL = 1e-5  # scaled by max(1, max|reference|)


class GraphContext:
    """A ``LocalContext`` that records a hook's program in a graph whose first input is ``mesh_coord`` (int64
    [mesh rank], this device's coordinate); the same graph runs on every device."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.builder = GraphBuilder("local")
        self.coord = self.builder.input("mesh_coord", TensorType("int64", (len(mesh.shape),)))

    def emit(self, op: str, inputs: Sequence[Value], names: Sequence[str | None] = (), **attrs) -> list[Value]:
        return self.builder.emit(op, list(inputs), names, **attrs)

    def constant(self, value, dtype: str | None = None) -> Value:
        return self.builder.constant(value, dtype)

    def block_index(self, axes: tuple[str, ...]) -> Value:
        """Block index over ``axes`` (major to minor), as ``Spec.block_index`` computes it."""
        index = self.constant(0, "int64")
        for a in axes:
            k = self.mesh.names.index(a)
            c = self.builder.emit1("gather", [self.coord, self.constant(k, "int64")], axis=0)
            scaled = self.builder.emit1("mul", [index, self.constant(self.mesh.shape[k], "int64")])
            index = self.builder.emit1("add", [scaled, c])
        return index

    def all_reduce(self, x: Value, axes: tuple[str, ...], reduce: str) -> Value:
        return self.builder.emit1("all_reduce", [x], axes=tuple(self.mesh.names.index(a) for a in axes),
                                  group_size=prod(self.mesh.axis(a).size for a in axes), reduce=reduce)


def structure_problems(rule: ShardingRule, in_types: Sequence[TensorType],
                       out_types: Sequence[TensorType]) -> list[str]:
    """Every way the rule's dims disagree with the tensors: counts, ranks, factor sizes multiplying to dim sizes."""
    problems = []
    for what, side, types in (("operand", rule.operands, in_types), ("result", rule.results, out_types)):
        if len(side) != len(types):
            problems.append(f"rule has {len(side)} {what}s, the op {len(types)}")
            continue
        for k, (dims, t) in enumerate(zip(side, types)):
            if len(dims) != t.rank:
                problems.append(f"{what} {k}: rule rank {len(dims)}, tensor {t.shape}")
                continue
            for i, (dim, size) in enumerate(zip(dims, t.shape)):
                got = prod(rule.factors[f].size for f in dim)
                if got != size:
                    names = ", ".join(rule.factors[f].name for f in dim) or "no factor"
                    problems.append(f"{what} {k} dim {i} (size {size}) is {names} of total size {got}")
    return problems


def invalid_reason(rule: ShardingRule, assignment: Assignment, mesh: Mesh) -> str | None:
    """Why ``assignment`` is not a usable strategy (rule check plus block layout of compound dims)."""
    return rule.check(assignment, mesh)


def random_assignments(rule: ShardingRule, mesh: Mesh, rng: np.random.Generator, n: int) -> list[Assignment]:
    """Up to ``n`` distinct valid strategies, each splitting at least one factor: every mesh axis, in a random
    order, goes to a random splittable factor or to none. Fewer come back when fewer exist (or are found)."""
    splittable = rule.splittable()
    found: list[Assignment] = []
    if not splittable:
        return found
    for _ in range(40 * n):
        if len(found) == n:
            break
        axes = list(mesh.names)
        rng.shuffle(axes)
        chosen: list[list[str]] = [[] for _ in rule.factors]
        for a in axes:
            pick = int(rng.integers(-1, len(splittable)))
            if pick >= 0:
                chosen[splittable[pick]].append(a)
        assignment = rule.complete(tuple(tuple(c) for c in chosen), mesh)
        if any(assignment) and assignment not in found and invalid_reason(rule, assignment, mesh) is None:
            found.append(assignment)
    return found


def check_rule(op: str, inputs: Sequence[np.ndarray], attrs: dict, mesh: Mesh, assignment: Assignment,
               rule: ShardingRule | None = None) -> None:
    """Run ``op`` sharded by ``rule`` (default: the op's own) under ``assignment`` on every device of ``mesh``;
    raise AssertionError listing every result that differs from the reference (values, local shapes, replicas).
    An invalid assignment is a ValueError (a wrong call, not a wrong rule)."""
    opdef = get_op(op)
    full = opdef.check_attrs(attrs)
    inputs = [np.asarray(a) for a in inputs]
    in_types = [TensorType(dtype_of(a.dtype), a.shape) for a in inputs]
    out_types = opdef.infer(in_types, full)
    rule = rule if rule is not None else opdef.factors(in_types, full)
    where = f"{op}{[t.shape for t in in_types]} {_short(full)} on mesh {mesh} with {describe(rule, assignment)}"
    problems = structure_problems(rule, in_types, out_types)
    if problems:
        raise AssertionError(f"{where}: rule does not fit the tensors:\n  " + "\n  ".join(problems))
    why = invalid_reason(rule, assignment, mesh)
    if why:
        raise ValueError(f"{where}: invalid assignment: {why}")
    in_specs, out_specs = rule.operand_specs(assignment), rule.result_specs(assignment)
    expected = opdef.reference(inputs, full)
    run = _local_runner(opdef, rule, full, in_specs, out_specs, in_types, out_types, assignment, mesh)
    try:
        results = run({c: [shard(a, s, mesh, c) for a, s in zip(inputs, in_specs)] for c in coordinates(mesh)})
    except Exception as e:  # a local program that cannot run on its shards is a wrong rule
        raise AssertionError(f"{where}: the devices failed on their shards: {type(e).__name__}: {e}") from e
    for reduce, axes in rule.combined(assignment):  # what the partitioner's all-reduce(max/min) does
        results = _all_reduced(results, mesh, axes, reduce)
    for r, (spec, t, ref) in enumerate(zip(out_specs, out_types, expected)):
        problems += _result_problems(r, spec, t, np.asarray(ref), {c: outs[r] for c, outs in results.items()}, mesh)
    if problems:
        specs = ", ".join(map(str, in_specs)) + " -> " + ", ".join(map(str, out_specs))
        raise AssertionError(f"{where} ({specs}):\n  " + "\n  ".join(problems))


def _all_reduced(results: dict, mesh: Mesh, axes: tuple[str, ...], reduce: str) -> dict:
    """Every device's results combined (``np.maximum``/``np.minimum``) with those of the devices that differ from
    it only along ``axes``."""
    fn = {"max": np.maximum, "min": np.minimum}[reduce]
    keep = [k for k, name in enumerate(mesh.names) if name not in axes]
    groups: dict[tuple, list] = {}
    for c, outs in results.items():
        key = tuple(c[k] for k in keep)
        groups[key] = outs if key not in groups else [fn(a, b) for a, b in zip(groups[key], outs)]
    return {c: groups[tuple(c[k] for k in keep)] for c in results}


def _local_runner(opdef, rule, full, in_specs, out_specs, in_types, out_types, assignment, mesh):
    """``run({coord: local inputs}) -> {coord: local results}``, every device of the mesh."""
    if rule.local is None:
        local_attrs = dict(full)
        if "shape" in full:
            local_attrs["shape"] = out_specs[0].local_shape(out_types[0].shape, mesh)
        return lambda shards: {c: [np.asarray(a) for a in opdef.reference(local, local_attrs)]
                               for c, local in shards.items()}
    ctx = GraphContext(mesh)
    local_in = [ctx.builder.input(f"in{k}", TensorType(t.dtype, s.local_shape(t.shape, mesh)))
                for k, (t, s) in enumerate(zip(in_types, in_specs))]
    node = Node(opdef.name, [Value(f"g_in{k}", t) for k, t in enumerate(in_types)],
                [Value(f"g_out{k}", t) for k, t in enumerate(out_types)], dict(full))
    graph = ctx.builder.finish(rule.local(ctx, node, local_in, assignment, rule))

    def run(shards):
        envs = {c: {id(ctx.coord): np.asarray(c, np.int64)} | {id(v): a for v, a in zip(local_in, local)}
                for c, local in shards.items()}
        run_lockstep(graph, envs)
        return {c: [env[id(v)] for v in graph.outputs] for c, env in envs.items()}

    return run


def _result_problems(r: int, spec: Spec, t: TensorType, ref: np.ndarray, shards: dict, mesh: Mesh) -> list[str]:
    want = spec.local_shape(t.shape, mesh)
    bad = [f"result {r}: device {c} holds shape {a.shape}, spec {spec} needs {want}"
           for c, a in shards.items() if a.shape != want]
    if bad:
        return bad
    problems = []
    got = unshard(shards, spec, mesh)
    if got.dtype != ref.dtype:
        problems.append(f"result {r}: dtype {got.dtype}, reference {ref.dtype}")
    exact = ref.dtype.kind not in "fc"
    finite = np.abs(ref[np.isfinite(ref)]).astype(np.float64) if not exact else np.zeros(0)
    atol = 0.0 if exact else FLOAT_ATOL * max(1.0, float(finite.max()) if finite.size else 1.0)
    if exact:
        ok = np.array_equal(got, ref)
    else:
        ok = np.allclose(got.astype(np.float64), ref.astype(np.float64), rtol=0, atol=atol, equal_nan=True)
    if not ok:
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        worst = np.unravel_index(int(np.nanargmax(diff)), diff.shape) if diff.size else ()
        problems.append(f"result {r} (spec {spec}) differs from the reference: max |diff| "
                        f"{float(np.nanmax(diff)) if diff.size else 0:.3g} at {tuple(map(int, worst))} (atol {atol:.3g})")
    mismatch = replica_mismatch(shards, spec, mesh)
    if mismatch > atol:
        problems.append(f"result {r}: replicas differ by {mismatch:.3g} (spec {spec})")
    return problems


def describe(rule: ShardingRule, assignment: Assignment) -> str:
    """``k->{y}, n->{}``-style text of a strategy (only split factors; 'replicated' when none)."""
    parts = [f"{f.name}->{{{','.join(a)}}}" for f, a in zip(rule.factors, assignment) if a]
    return ", ".join(parts) or "replicated"


def _short(attrs: dict) -> str:
    return "{" + ", ".join(f"{k}={v!r}" for k, v in attrs.items() if not isinstance(v, np.ndarray)) + "}"


def all_valid_assignments(rule: ShardingRule, mesh: Mesh) -> list[Assignment]:
    """Every valid strategy (each mesh axis to one splittable factor or none, in every order); for small rules."""
    splittable = rule.splittable()
    out = set()
    for order in itertools.permutations(mesh.names):
        for picks in itertools.product([None] + splittable, repeat=len(order)):
            chosen: list[list[str]] = [[] for _ in rule.factors]
            for a, p in zip(order, picks):
                if p is not None:
                    chosen[p].append(a)
            assignment = rule.complete(tuple(tuple(c) for c in chosen), mesh)
            if invalid_reason(rule, assignment, mesh) is None:
                out.add(assignment)
    return sorted(out)
