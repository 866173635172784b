"""Reference interpreter: runs any bmc IR graph with the op table's numpy implementations.

This is the oracle for the frontend, every graph rewrite and every backend. It is deliberately simple: values are
numpy arrays held in a dict, nodes run in order, weights are read through their lazy ``Tensor``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from bmc.ir.graph import Graph, Value
from bmc.ir.types import np_dtype
from bmc.ops import get_op


def run_reference(graph: Graph, inputs: Mapping[str, np.ndarray], *, keep: bool = False) -> dict[str, np.ndarray]:
    """Outputs by name. ``keep=True`` returns every value (for dumps and divergence hunting)."""
    env: dict[Value, np.ndarray] = {}
    for v in graph.inputs:
        if v.name not in inputs:
            raise KeyError(f"missing input {v.name!r}")
        arr = np.asarray(inputs[v.name])
        if arr.shape != v.type.shape:
            raise ValueError(f"input {v.name} has shape {arr.shape}, expected {v.type.shape}")
        env[v] = arr.astype(np_dtype(v.type.dtype), copy=False)
    for p in graph.params:
        env[p] = graph.weights[p.name].numpy()
    for node in graph.nodes:
        outs = get_op(node.op).reference([env[v] for v in node.inputs], node.attrs)
        for v, arr in zip(node.outputs, outs):
            arr = np.asarray(arr)
            if arr.shape != v.type.shape or arr.dtype != np_dtype(v.type.dtype):
                raise AssertionError(f"{node.op} (onnx {node.source!r}) reference returned {arr.dtype}{arr.shape} "
                                     f"for %{v.name}: {v.type}")
            env[v] = arr
    values = env if keep else {v: env[v] for v in graph.outputs}
    return {v.name: a for v, a in values.items()}
