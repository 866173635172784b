"""Global IR + plan → one local SPMD program that every device of the mesh runs.

Shapes are divided by the specs; the collectives of the reshard table are inserted as IR nodes on every edge whose
producer spec differs from the spec its consumer's strategy needs; graph inputs are fed whole (replicated) and sliced
by mesh coordinate; parameters arrive already sharded (each device holds its own block). The local program has one
extra input, ``mesh_coord`` (int64 [mesh rank]): the device's coordinate, from which block offsets are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bmc.errors import PlanningError
from bmc.ir.graph import Graph, Node, Value
from bmc.ir.passes import eliminate_dead_code
from bmc.ir.types import TensorType
from bmc.ops import OPS
from bmc.ops.builder import GraphBuilder
from bmc.sharding.layout import ShardTensor
from bmc.sharding.mesh import Mesh
from bmc.sharding.plan import Plan
from bmc.sharding.reshard import Step, plan_reshard
from bmc.sharding.rules import ShardingRule
from bmc.sharding.spec import Spec, SpecError

MESH_COORD = "mesh_coord"


@dataclass(frozen=True)
class Collective:
    """One inserted collective, for plan.json and the byte-accounting check."""

    kind: str
    axes: tuple[str, ...]
    bytes: int
    value: str  # the global value it reshards
    node: str  # the ONNX node (source) whose operand needed it, or "output"
    time_s: float
    reduce: str = "sum"  # all_reduce: sum, or max/min after a max/min over split dims
    at: int = -1  # the global graph's node it runs for (len(nodes): the outputs; -1: the inputs)

    def to_json(self) -> dict:
        out = {"kind": self.kind, "axes": list(self.axes), "bytes": self.bytes, "node": self.node, "value": self.value,
               "at": self.at, "time_s": self.time_s}
        return out | ({"reduce": self.reduce} if self.kind == "all_reduce" else {})

    def describe(self) -> str:
        return f"{self.kind}({self.reduce})" if self.kind == "all_reduce" and self.reduce != "sum" else self.kind


@dataclass
class LocalProgram:
    graph: Graph
    mesh: Mesh
    plan: Plan
    global_graph: Graph
    collectives: list[Collective] = field(default_factory=list)
    param_specs: dict[str, Spec] = field(default_factory=dict)
    produced: dict[str, tuple[Value, Spec]] = field(default_factory=dict)  # global value name → its local value as
    # its node made it, and that value's spec (what the divergence search compares; local names can differ)
    routed_rows: set[int] = field(default_factory=set)  # ids of local values exact only on the rows routed to the
    # device's experts (read unreduced: ``_elide_routed_reduces``), which the divergence search cannot compare


def rule_of(node: Node) -> ShardingRule:
    op = OPS[node.op]
    if op.factors is None:
        import bmc.sharding.factors  # noqa: F401  (fills the op table's factor slots)
    return op.factors([v.type for v in node.inputs], node.attrs)


class _Emitter:
    """The LocalContext that rules' ``local`` hooks see, plus the reshard emission."""

    def __init__(self, mesh: Mesh, name: str):
        self.mesh = mesh
        self.at = -1  # the global node being partitioned (Collective.at)
        self.b = GraphBuilder(name)
        self.coord = self.b.input(MESH_COORD, TensorType("int64", (len(mesh.shape),)))
        self._blocks: dict[tuple[str, ...], Value] = {}
        self.records: dict[int, Collective] = {}  # id(a collective's local result) -> its record
        self.slices: dict[int, tuple[str, ...]] = {}  # id(a local slice's result) -> the mesh axes of its block

    def emit(self, op, inputs, names=(), **attrs):
        return self.b.emit(op, list(inputs), names, **attrs)

    def constant(self, value, dtype=None):
        return self.b.constant(value, dtype)

    def block_index(self, axes: tuple[str, ...]) -> Value:
        if axes not in self._blocks:
            idx = None
            for a in axes:
                k = self.mesh.names.index(a)
                c = self.b.emit1("gather", [self.coord, self.b.constant(np.array(k, np.int64))], axis=0)
                idx = c if idx is None else self.b.emit1(
                    "add", [self.b.emit1("mul", [idx, self.b.constant(np.array(self.mesh.shape[k], np.int64))]), c])
            self._blocks[axes] = idx
        return self._blocks[axes]

    def all_reduce(self, x: Value, axes: tuple[str, ...], reduce: str) -> Value:
        """A hook's own all-reduce, accounted like the reshards (its value is local: replicated on its own type)."""
        spec = Spec.replicated(x.type.rank)
        return self.collective(x, Step("all_reduce", axes, spec, spec, reduce=reduce), x.type, x.name,
                               self.b.source or "local")

    def collective(self, x: Value, step: Step, global_type: TensorType, value: str, consumer: str) -> Value:
        """``step`` (not a local slice) applied to ``x``, a block of the global value ``value``, and recorded; over a
        group of one device it is ``x`` itself, with nothing run or recorded."""
        if step.group_size(self.mesh) == 1:
            return x
        y = self.reshard(x, step, global_type)
        self.records[id(y)] = Collective(step.kind, step.axes, step.bytes_per_device(global_type, self.mesh), value,
                                         consumer, step.time_s(global_type, self.mesh), step.reduce, self.at)
        return y

    def reshard(self, x: Value, step: Step, global_type: TensorType) -> Value:
        axes = tuple(self.mesh.names.index(a) for a in step.axes)
        n = step.group_size(self.mesh)
        if step.kind == "all_reduce":
            return self.b.emit1("all_reduce", [x], axes=axes, group_size=n, reduce=step.reduce)
        if step.kind == "reduce_scatter":
            return self.b.emit1("reduce_scatter", [x], axes=axes, group_size=n, dim=step.dim)
        if step.kind == "all_gather":
            return self.b.emit1("all_gather", [x], axes=axes, group_size=n, dim=step.dim)
        if step.kind == "all_to_all":
            return self.b.emit1("all_to_all", [x], axes=axes, group_size=n, split_dim=step.dim2, concat_dim=step.dim)
        # local_slice: keep this device's block of dim `step.dim`
        chunk = x.type.shape[step.dim] // n
        offset = self.b.emit1("mul", [self.block_index(step.axes), self.b.constant(np.array(chunk, np.int64))])
        idx = self.b.emit1("add", [self.b.constant(np.arange(chunk, dtype=np.int64)), offset])
        out = self.b.emit1("gather", [x, idx], axis=step.dim)
        self.slices[id(out)] = step.axes
        return out


def partition(graph: Graph, plan: Plan) -> LocalProgram:
    mesh = plan.mesh
    em = _Emitter(mesh, graph.name)
    prog = LocalProgram(em.b.graph, mesh, plan, graph)
    local: dict[tuple[int, Spec], Value] = {}  # (global value id, spec) → local value holding it in that spec
    spec_of: dict[int, Spec] = {}

    def current(v: Value) -> tuple[Value, Spec]:
        s = spec_of[id(v)]
        return local[(id(v), s)], s

    def get(v: Value, want: Spec, consumer: str) -> Value:
        x, have = current(v)
        if (id(v), want) in local:
            return local[(id(v), want)]
        for step in plan_reshard(have, want, mesh):
            if (id(v), step.after) in local:
                x = local[(id(v), step.after)]
                continue
            if step.kind == "local_slice":
                x = em.reshard(x, step, v.type) if step.group_size(mesh) > 1 else x
            else:
                x = em.collective(x, step, v.type, v.name, consumer)
            local[(id(v), step.after)] = x
        return x

    for v in graph.inputs:
        fed = plan.input_specs.get(v.name)
        if fed is not None:  # fed as each device's block: the program's input is the local type
            s = _checked(fed, v, mesh)
            spec_of[id(v)] = s
            local[(id(v), s)] = em.b.input(v.name, v.type.with_shape(s.local_shape(v.type.shape, mesh)))
            continue
        x = em.b.input(v.name, v.type)
        spec_of[id(v)] = Spec.replicated(v.type.rank)
        local[(id(v), spec_of[id(v)])] = x
        em.b.source = ""
        get(v, _checked(plan.specs.get(v.name, Spec.replicated(v.type.rank)), v, mesh), "input")
        spec_of[id(v)] = plan.specs.get(v.name, Spec.replicated(v.type.rank))
    for v in graph.params:
        s = _checked(plan.specs.get(v.name, Spec.replicated(v.type.rank)), v, mesh)
        data = ShardTensor(graph.weights[v.name], s, mesh, (0,) * len(mesh.shape))
        x = em.b.param(v.name, data)
        spec_of[id(v)] = s
        local[(id(v), s)] = x
        prog.param_specs[v.name] = s
    for i, node in enumerate(graph.nodes):
        em.b.source, em.at = node.source, i
        rule = rule_of(node)
        assign = plan.strategies.get(i, rule.replicated())
        why = rule.check(assign, mesh)
        if why:
            raise PlanningError(f"invalid strategy for {node.op}: {why}", where=_where(node))
        ins = [get(v, s, node.source or node.op) for v, s in zip(node.inputs, rule.operand_specs(assign))]
        out_specs = rule.result_specs(assign)
        if rule.local is not None and any(assign):
            outs = rule.local(em, node, ins, assign, rule)
        else:
            outs = em.b.emit(node.op, ins, names=[v.name for v in node.outputs],
                             **_local_attrs(node, out_specs, mesh))
        for reduce, axes in rule.combined(assign):  # a max/min over split dims: combine the shards right away
            outs = list(outs)
            for k, (v, s) in enumerate(zip(node.outputs, out_specs)):
                outs[k] = em.collective(outs[k], Step("all_reduce", axes, s, s, reduce=reduce), v.type, v.name,
                                        node.source or node.op)
        for v, x, s in zip(node.outputs, outs, out_specs):
            want = TensorType(v.type.dtype, s.local_shape(v.type.shape, mesh))
            if x.type != want:
                raise PlanningError(f"internal: local result of {node.op} is {x.type}, the plan says {want} "
                                    f"(spec {s})", where=_where(node))
            spec_of[id(v)] = s
            local[(id(v), s)] = x
            prog.produced[v.name] = (x, s)
            if v.name in plan.forced:  # an annotation the producer cannot make directly: reshard right away
                get(v, plan.forced[v.name], node.source or node.op)
                spec_of[id(v)] = plan.forced[v.name]
    em.b.source, em.at = "", len(graph.nodes)
    outs = []
    for v in graph.outputs:
        x = get(v, plan.output_specs.get(v.name, Spec.replicated(v.type.rank)), "output")
        if x.name != v.name:  # the program's outputs keep the model's output names (the shard gets another)
            for other in em.b.graph.values():
                if other.name == v.name:
                    other.name = em.b.names(f"{v.name}.shard")
            x.name = v.name
        outs.append(x)
    em.b.finish(outs)
    _elide_routed_reduces(prog, em)
    _sink_reduces(prog, em)
    eliminate_dead_code(prog.graph)
    prog.collectives[:] = [em.records[id(n.outputs[0])] for n in prog.graph.nodes if id(n.outputs[0]) in em.records]
    return prog


def _routing(index: Value, em: _Emitter) -> tuple | None:
    """(global indices, mesh axes, block size) of the indices an expert-split ``gather_matmul`` reads: the
    ``sub(idx, block_index(axes) * chunk)`` its local hook made (``factors.gather_matmul_local``); None otherwise."""
    p = index.producer
    if p is None or p.op != "sub" or p.inputs[1].producer is None or p.inputs[1].producer.op != "mul":
        return None
    block, chunk = p.inputs[1].producer.inputs
    if block.producer is not None and block.producer.op == "cast":
        block = block.producer.inputs[0]
    axes = next((a for a, v in em._blocks.items() if v is block), None)
    if axes is None or chunk.producer is None or chunk.producer.op != "constant":
        return None
    return id(p.inputs[0]), axes, int(chunk.producer.attrs["value"])


def _row_wise(node: Node, v: Value, rows: int) -> bool:
    """Whether row ``r`` of ``node``'s results depends on row ``r`` of ``v`` alone (and on other operands)."""
    out = node.outputs[0].type.shape
    if not out or out[0] != rows or v.type.shape[:1] != (rows,):
        return False
    if OPS[node.op].family == "elementwise" or node.op == "reshape":
        return True
    if node.op in ("slice", "split"):
        axes = node.attrs["axes"] if node.op == "slice" else (node.attrs["axis"],)
        return all(a % v.type.rank != 0 for a in axes)
    return node.op == "transpose" and node.attrs["perm"][0] == 0


def routed_region(v: Value, users: dict, outputs: set[int], same_routing) -> tuple[set[int], list[Node]] | None:
    """The ids of ``v`` and the values computed from it by row-wise ops, and the ``gather_matmul`` nodes they end in,
    when every one of them is read only by row-wise ops or, as its rows, by a ``gather_matmul`` for which
    ``same_routing(node)`` holds (none is a graph output); None otherwise."""
    rows, pending, seen, ends = v.type.shape[0], [v], set(), []
    while pending:
        x = pending.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if id(x) in outputs:
            return None
        for r in users.get(x, []):
            if r.op == "gather_matmul" and r.inputs[0] is x and r.inputs[2] is not x and same_routing(r):
                ends.append(r)
                continue
            if not _row_wise(r, x, rows):
                return None
            pending.extend(r.outputs)
    return seen, ends


def _elide_routed_reduces(prog: LocalProgram, em: _Emitter) -> None:
    """Expert parallelism with one all-reduce an expert layer, not two.

    With the experts split, a device's ``gather_matmul`` computes the rows routed to its experts and leaves the
    others zero: a partial sum, all-reduced before the activation that follows. But when every use of the reduced
    value, through row-wise ops (the activation, the gate's product, a split), is the next product routed by the
    same indices over the same axes, that product reads only the rows routed to this device's experts, which are
    already exact: the all-reduce is dropped (with its record). The layer's output is still all-reduced. (The
    automatic search prices the same pairs: ``bmc.sharding.ilp``.)"""
    graph = prog.graph
    users = graph.users()
    outputs = set(map(id, graph.outputs))
    for node in list(graph.nodes):
        if node.op != "all_reduce" or node.attrs["reduce"] != "sum" or id(node.outputs[0]) not in em.records:
            continue
        src = node.inputs[0].producer
        routing = _routing(src.inputs[2], em) if src is not None and src.op == "gather_matmul" else None
        if routing is None or tuple(node.attrs["axes"]) != tuple(prog.mesh.names.index(a) for a in routing[1]):
            continue
        found = routed_region(node.outputs[0], users, outputs, lambda r: _routing(r.inputs[2], em) == routing)
        if found is None:
            continue
        for r in users.get(node.outputs[0], []):
            r.inputs = [node.inputs[0] if x is node.outputs[0] else x for x in r.inputs]
        graph.nodes.remove(node)
        prog.routed_rows.update(found[0])
        del em.records[id(node.outputs[0])]


#: ops linear in each listed operand alone while their other operands are fixed: ``f(Σ x_i) = Σ f(x_i)``
LINEAR_IN = {"neg": (0,), "reshape": (0,), "transpose": (0,), "slice": (0,), "gather": (0,), "reduce_sum": (0,),
             "reduce_mean": (0,), "mul": (0, 1), "div": (0,), "matmul": (0, 1)}


def _varying(prog: LocalProgram) -> dict[int, frozenset[int]]:
    """The mesh axes (indices) along which each local value may differ between devices (JAX's "varying manual
    axes"): an input fed as blocks and a parameter along the axes of their specs, the coordinate along all, one of
    its entries along its own; an all-reduce or all-gather over some axes makes its result the same along them, a
    reduce-scatter or all-to-all split along them; any other op's results differ wherever an operand does."""
    mesh, graph = prog.mesh, prog.graph
    index = {a: k for k, a in enumerate(mesh.names)}

    def along(spec: Spec | None) -> frozenset[int]:
        return frozenset(index[a] for a in spec.axes()) if spec is not None else frozenset()

    vary = {id(v): frozenset(range(len(mesh.shape))) if v.name == MESH_COORD else along(prog.plan.input_specs.get(
        v.name)) for v in graph.inputs}
    vary.update((id(v), along(prog.param_specs.get(v.name))) for v in graph.params)
    for node in graph.nodes:
        ins = frozenset().union(*(vary[id(x)] for x in node.inputs))
        if node.op in ("all_reduce", "all_gather"):
            ins -= set(node.attrs["axes"])
        elif node.op in ("reduce_scatter", "all_to_all"):
            ins |= set(node.attrs["axes"])
        elif node.op == "gather" and node.inputs[0].name == MESH_COORD and node.inputs[1].producer is not None \
                and node.inputs[1].producer.op == "constant":
            ins = frozenset({int(node.inputs[1].producer.attrs["value"])})
        vary.update((id(v), ins) for v in node.outputs)
    return vary


def _linear_path(r: Node, users: dict, outputs: set[int], vary: dict) -> list[Node]:
    """The nodes an all-reduce ``r`` could move past: from its result on, each the only reader of the value before
    it (reading it once) and linear in it (``LINEAR_IN``) with every other operand the same along the reduced axes;
    it ends at a graph output."""
    axes, path, cur = set(r.attrs["axes"]), [], r.outputs[0]
    while len(users.get(cur, [])) == 1:
        u = users[cur][0]
        slots = [k for k, x in enumerate(u.inputs) if x is cur]
        if len(slots) != 1 or slots[0] not in LINEAR_IN.get(u.op, ()) or len(u.outputs) != 1 or \
                any(vary[id(x)] & axes for x in u.inputs if x is not cur):
            break
        path.append(u)
        cur = u.outputs[0]
        if id(cur) in outputs:
            break
    return path


def _sink_reduces(prog: LocalProgram, em: _Emitter) -> None:
    """Pending sums through linear ops (GSPMD's and DTensor's partial values), when that saves communication:

    * two all-reduces over the same axes whose results, each through linear ops, are added (or subtracted) become
      one, after the add: a Qwen or DeepSeek MoE's routed and shared experts, a parallel residual's attention and
      MLP;
    * an all-reduce whose result, through linear ops, is cut to this device's block over the same axes (a local
      slice) becomes one reduce-scatter there: half the bytes (the plan kept the sum whole where a follower of its
      producer could not take the split, then split it at the next node);
    * an all-reduce whose result shrinks through linear ops moves past them to where the tensor is smallest: a
      Mixtral expert layer reduces its tokens' ``k`` rows after their weighted sum, not before.

    Each move is ``Σ f(x_i) = f(Σ x_i)`` (``_linear_path``), so the values it passes become partial sums: their
    specs say so (the divergence search sums them), and the collectives' records follow the moves."""
    graph = prog.graph
    names = {id(x): g for g, (x, _) in prog.produced.items()}
    at = {v.name: i for i, n in enumerate(prog.global_graph.nodes) for v in n.outputs}
    while True:  # a round's moves touch disjoint paths; a merge's reduce may then move on in the next
        users, outputs, vary = graph.users(), set(map(id, graph.outputs)), _varying(prog)
        paths = {id(r): _linear_path(r, users, outputs, vary) for r in graph.nodes
                 if r.op == "all_reduce" and r.attrs["reduce"] == "sum" and id(r.outputs[0]) in em.records
                 and id(r.outputs[0]) not in outputs}
        by_end = {id(p[-1].outputs[0] if p else r.outputs[0]): r for r in graph.nodes if id(r) in paths
                  for p in [paths[id(r)]]}
        moves = []  # (all-reduces, the nodes each passes, the last node, whether the move ends in a reduce-scatter)
        for node in graph.nodes:  # merges first: each saves a whole collective
            ends = [by_end.get(id(x)) for x in node.inputs]
            if node.op in ("add", "sub") and all(ends) and ends[0] is not ends[1] and \
                    ends[0].attrs["axes"] == ends[1].attrs["axes"] and all(len(users[x]) == 1 for x in node.inputs):
                moves.append((ends, [paths[id(r)] + [node] for r in ends], node, False))
        for r in graph.nodes if not moves else ():
            path = paths.get(id(r))
            if path is None:
                continue
            end = path[-1].outputs[0] if path else r.outputs[0]
            sliced = users[end][0] if len(users[end]) == 1 and id(end) not in outputs else None
            if sliced is not None and sliced.inputs[0] is end and em.slices.get(id(sliced.outputs[0])) == tuple(
                    prog.mesh.names[k] for k in r.attrs["axes"]):
                moves.append(([r], [path], sliced, True))  # with the block taken after it: a reduce-scatter
                continue
            sizes = [u.outputs[0].type.nbytes for u in path]
            if sizes and min(sizes) < r.outputs[0].type.nbytes:
                k = sizes.index(min(sizes))
                moves.append(([r], [path[:k + 1]], path[k], False))
        if not moves:
            return
        for reduces, through, last, scatter in moves:
            for r, nodes in zip(reduces, through):
                _move_reduce(prog, em, r, nodes, users, names)
            (_scatter_at if scatter else _reduce_after)(prog, em, reduces[0], last, users, names, at)


def _move_reduce(prog: LocalProgram, em: _Emitter, r: Node, through: list[Node], users: dict, names: dict) -> None:
    """Remove all-reduce ``r``: its reader reads its operand, and the results of ``through`` (the nodes from that
    reader on) become partial sums over its axes."""
    axes = tuple(prog.mesh.names[k] for k in r.attrs["axes"])
    cur, src = r.outputs[0], r.inputs[0]
    (u,) = users[cur]
    u.inputs = [src if x is cur else x for x in u.inputs]
    prog.graph.nodes.remove(r)
    del em.records[id(cur)]
    for node in through:
        v = node.outputs[0]
        if id(v) in names:
            x, spec = prog.produced[names[id(v)]]
            prog.produced[names[id(v)]] = (x, spec.with_partial(tuple(sorted(set(spec.partial) | set(axes)))))


def _reduce_after(prog: LocalProgram, em: _Emitter, r: Node, last: Node, users: dict, names: dict, at: dict) -> None:
    """An all-reduce like ``r`` of ``last``'s result, for its readers, and its record."""
    v = last.outputs[0]
    out = Value(em.b.names(f"{v.name}.reduced"), v.type)
    for u in users[v]:
        u.inputs = [out if x is v else x for x in u.inputs]
    if v in prog.graph.outputs:  # the program's outputs keep the model's names
        out.name, v.name = v.name, em.b.names(f"{v.name}.partial")
        prog.graph.outputs = [out if x is v else x for x in prog.graph.outputs]
    prog.graph.nodes.insert(prog.graph.nodes.index(last) + 1, Node("all_reduce", [v], [out], dict(r.attrs),
                                                                   last.source))
    spec = Spec.replicated(v.type.rank)
    step = Step("all_reduce", tuple(prog.mesh.names[k] for k in r.attrs["axes"]), spec, spec)
    _record(prog, em, out, step, v.type, names.get(id(v), v.name), users[v], at)


def _scatter_at(prog: LocalProgram, em: _Emitter, r: Node, sliced: Node, users: dict, names: dict,
                at: dict) -> None:
    """All-reduce ``r``, moved down its path to the local slice ``sliced`` over the same axes, and that slice: one
    reduce-scatter, which sends half the bytes and leaves each device its block."""
    v, axes = sliced.inputs[0], em.slices.pop(id(sliced.outputs[0]))
    node = Node("reduce_scatter", [v], sliced.outputs, {"axes": r.attrs["axes"], "group_size": r.attrs["group_size"],
                                                        "dim": sliced.attrs["axis"]}, sliced.source)
    prog.graph.nodes[prog.graph.nodes.index(sliced)] = node
    spec = Spec.replicated(v.type.rank)
    step = Step("reduce_scatter", axes, spec.with_partial(axes), spec.with_dim(sliced.attrs["axis"], axes),
                dim=sliced.attrs["axis"])
    out = sliced.outputs[0]
    _record(prog, em, out, step, v.type, names.get(id(out), names.get(id(v), v.name)), users[out], at)


def _record(prog: LocalProgram, em: _Emitter, out: Value, step: Step, local: TensorType, value: str,
            readers: list[Node], at: dict) -> None:
    """The record of a collective a move made: ``step`` on a local tensor of type ``local`` (the block of global
    value ``value``), its result ``out`` read by ``readers``."""
    em.records[id(out)] = Collective(step.kind, step.axes, step.bytes_per_device(local, prog.mesh), value,
                                     readers[0].source or readers[0].op if readers else "output",
                                     step.time_s(local, prog.mesh), at=at.get(value, -1))


def _local_attrs(node: Node, out_specs: list[Spec], mesh: Mesh) -> dict:
    attrs = dict(node.attrs)
    if "shape" in attrs:  # reshape / broadcast_to take the local result shape
        attrs["shape"] = out_specs[0].local_shape(node.outputs[0].type.shape, mesh)
    return attrs


def _checked(spec: Spec, v: Value, mesh: Mesh) -> Spec:
    try:
        spec.validate(v.type.shape, mesh)
    except SpecError as e:
        raise PlanningError(str(e), where=f"tensor {v.name!r}") from None
    return spec


def _where(node: Node) -> str:
    return f"ONNX node {node.source!r} ({node.op})" if node.source else f"node {node.op}"
