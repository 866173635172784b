"""bmc IR: a static-shape, typed SSA graph.

``Value``: a tensor with a name and a ``TensorType``, defined exactly once (graph input, parameter, or node output).
``Node``: one op application; keeps the ONNX node it came from in ``source`` so every error and plan entry can
point back at the user's model. ``Graph``: inputs (fed at run time), parameters (weights, bound lazily to
``Tensor`` data), nodes in topological order, outputs. ``Module``: the programs of one compilation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from bmc.ir.tensor import Tensor
from bmc.ir.types import TensorType


@dataclass(eq=False)
class Value:
    """An SSA value. Identity is object identity; ``name`` is unique inside its graph."""

    name: str
    type: TensorType
    producer: "Node | None" = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(eq=False)
class Node:
    """``outputs = op(inputs) {attrs}``. ``source`` is the ONNX node name (or '' for nodes bmc made up)."""

    op: str
    inputs: list[Value]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        for v in self.outputs:
            v.producer = self

    @property
    def output(self) -> Value:
        (out,) = self.outputs
        return out

    def __repr__(self) -> str:
        return f"Node({self.op}, {[v.name for v in self.inputs]} -> {[v.name for v in self.outputs]})"


@dataclass(eq=False)
class Graph:
    """One program. ``weights`` maps each parameter name to its (lazy) data."""

    name: str
    inputs: list[Value] = field(default_factory=list)
    params: list[Value] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    weights: dict[str, Tensor] = field(default_factory=dict)
    #: the model's own names of the outputs, where they differ from the values' (an ONNX output that is a graph
    #: input, a weight or a repeated output is a copy, whose IR name must differ); None: the values' names
    output_names: list[str] | None = None

    def values(self) -> Iterator[Value]:
        """Every value once, in definition order."""
        yield from self.inputs
        yield from self.params
        for node in self.nodes:
            yield from node.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(name)

    def users(self) -> dict[Value, list[Node]]:
        """Map from value to the nodes that read it, in node order."""
        out: dict[Value, list[Node]] = {v: [] for v in self.values()}
        for node in self.nodes:
            for v in node.inputs:
                out.setdefault(v, []).append(node)
        return out

    def weight_bytes(self) -> int:
        return sum(p.type.nbytes for p in self.params)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items()))


def extract(graph: Graph, nodes: list[Node], outputs: list[Value], name: str) -> Graph:
    """A standalone copy of ``nodes`` (a run of ``graph``'s nodes, in order) computing ``outputs``: every value they
    read but do not make becomes an input (a parameter, with its weight, if it is one of ``graph``'s), in the order
    of first use. Values are copied, so the new graph shares nothing mutable with ``graph``."""
    params = {id(p) for p in graph.params}
    copies: dict[int, Value] = {}
    sub = Graph(name)

    def copy(v: Value) -> Value:
        c = copies.get(id(v))
        if c is None:
            c = copies[id(v)] = Value(v.name, v.type)
            if id(v) in params:
                sub.params.append(c)
                sub.weights[v.name] = graph.weights[v.name]
            else:
                sub.inputs.append(c)
        return c

    for node in nodes:
        ins = [copy(v) for v in node.inputs]
        outs = []
        for v in node.outputs:
            copies[id(v)] = Value(v.name, v.type)
            outs.append(copies[id(v)])
        sub.nodes.append(Node(node.op, ins, outs, dict(node.attrs), node.source))
    sub.outputs = [copy(v) for v in outputs]
    return sub


@dataclass(eq=False)
class Module:
    """The programs of one compilation (one today; one per pipeline stage later) plus free-form metadata."""

    graphs: dict[str, Graph]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def main(self) -> Graph:
        return self.graphs["main"]


class NameAllocator:
    """Hands out value names unique within one graph, keeping the preferred name when it is free."""

    def __init__(self, taken: Iterable[str] = ()):
        self._taken = set(taken)
        self._counter = 0

    def __call__(self, preferred: str | None = None) -> str:
        if preferred and preferred not in self._taken:
            self._taken.add(preferred)
            return preferred
        base = preferred or "v"
        while True:
            self._counter += 1
            name = f"{base}.{self._counter}" if preferred else f"{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name
