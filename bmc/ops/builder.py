"""Building graphs op by op, with attributes checked and output types inferred from the op table."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bmc.ir.graph import Graph, NameAllocator, Node, Value
from bmc.ir.tensor import ArrayTensor, Tensor
from bmc.ir.types import TensorType
from bmc.ops.registry import get_op


class GraphBuilder:
    """Appends nodes to a graph. ``source`` (the ONNX node name) is stamped on every node emitted under it."""

    def __init__(self, name: str = "main"):
        self.graph = Graph(name)
        self.names = NameAllocator()
        self.source = ""

    def input(self, name: str, type_: TensorType) -> Value:
        v = Value(self.names(name), type_)
        self.graph.inputs.append(v)
        return v

    def param(self, name: str, data: Tensor | np.ndarray) -> Value:
        data = data if isinstance(data, Tensor) else ArrayTensor(np.asarray(data))
        v = Value(self.names(name), data.type)
        self.graph.params.append(v)
        self.graph.weights[v.name] = data
        return v

    def emit(self, op: str, inputs: Sequence[Value], names: Sequence[str | None] = (), **attrs: Any) -> list[Value]:
        """Add ``op(inputs) {attrs}``; returns its output values (named from ``names`` where given)."""
        opdef = get_op(op)
        opdef.check_arity(len(inputs))
        full = opdef.check_attrs(attrs)
        out_types = opdef.infer([v.type for v in inputs], full)
        outs = [Value(self.names(names[i] if i < len(names) else None), t) for i, t in enumerate(out_types)]
        self.graph.nodes.append(Node(op, list(inputs), outs, full, self.source))
        return outs

    def emit1(self, op: str, inputs: Sequence[Value], name: str | None = None, **attrs: Any) -> Value:
        (out,) = self.emit(op, inputs, (name,), **attrs)
        return out

    def constant(self, value, dtype: str | None = None, name: str | None = None) -> Value:
        arr = np.asarray(value)
        if dtype is not None:
            from bmc.ir.types import np_dtype

            arr = arr.astype(np_dtype(dtype))
        return self.emit1("constant", [], name, value=arr)

    def finish(self, outputs: Sequence[Value]) -> Graph:
        self.graph.outputs = list(outputs)
        return self.graph
