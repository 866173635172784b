"""Structural verifier for bmc IR: SSA, topological order, unique names, types consistent with the op table."""

from __future__ import annotations

from typing import Callable, Sequence

from bmc.errors import InternalError
from bmc.ir.graph import Graph
from bmc.ir.types import TensorType

InferFn = Callable[[str, Sequence[TensorType], dict], list[TensorType]]


def verify(graph: Graph, infer: InferFn | None = None) -> None:
    """Raise ``InternalError`` listing every problem found. ``infer`` (from the op table) re-checks node types."""
    problems: list[str] = []
    defined: set[int] = set()
    names: dict[str, str] = {}

    def define(v, where):
        if id(v) in defined:
            problems.append(f"value %{v.name} is defined twice ({where})")
        defined.add(id(v))
        if v.name in names:
            problems.append(f"name %{v.name} used by {names[v.name]} and {where}")
        names[v.name] = where

    for v in graph.inputs:
        define(v, "an input")
    for v in graph.params:
        define(v, "a parameter")
        data = graph.weights.get(v.name)
        if data is None:
            problems.append(f"parameter %{v.name} has no weight data")
        elif data.type != v.type:
            problems.append(f"parameter %{v.name} is {v.type} but its data is {data.type}")
    for i, node in enumerate(graph.nodes):
        where = f"node {i} ({node.op}{', onnx ' + node.source if node.source else ''})"
        for v in node.inputs:
            if id(v) not in defined:
                problems.append(f"{where} reads %{v.name} before it is defined")
        for v in node.outputs:
            define(v, where)
            if v.producer is not node:
                problems.append(f"{where}: output %{v.name} does not point back at its node")
        if infer is not None:
            try:
                want = infer(node.op, [v.type for v in node.inputs], node.attrs)
            except Exception as e:  # noqa: BLE001  (report, do not crash the verifier)
                problems.append(f"{where}: {e}")
                continue
            got = [v.type for v in node.outputs]
            if want != got:
                problems.append(f"{where}: output types {[str(t) for t in got]} but the op infers "
                                f"{[str(t) for t in want]}")
    for v in graph.outputs:
        if id(v) not in defined:
            problems.append(f"graph output %{v.name} is not defined")
    if problems:
        raise InternalError(f"graph {graph.name} fails verification:\n  " + "\n  ".join(problems))
