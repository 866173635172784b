"""Reduced precision: run a float32 model in float16 or bfloat16 (``--dtype``).

Every float32 value of the graph becomes ``dtype``: weights are converted lazily when they are written, constants
and ``cast`` targets are rewritten, inputs are cast on entry and outputs back to float32, so the model's signature
does not change. Normalizations are still computed in float32 by their lowerings where TVM needs it. The output
casts take the float32 result of the last op where its lowering computed one (a matmul's float32 accumulator, a
norm computed in float32), without rounding it to ``dtype`` first: the outputs lose no precision to that last
rounding (XLA's "excess precision"; bfloat16 rounds to 2^-9 relative, a third of the ViT fixture's 1e-2 budget).
"""

from __future__ import annotations

import numpy as np

from bmc.errors import UsageError
from bmc.ir.graph import Graph, Value
from bmc.ir.tensor import CastTensor
from bmc.ir.types import np_dtype
from bmc.ops.builder import GraphBuilder

REDUCED = ("float16", "bfloat16")


def convert_float32(graph: Graph, dtype: str) -> Graph:
    if dtype == "float32":
        return graph
    if dtype not in REDUCED:
        raise UsageError(f"unknown dtype {dtype!r}", where="--dtype", fix="use float32, float16 or bfloat16")
    b = GraphBuilder(graph.name)
    env: dict[int, Value] = {}
    cast_back = {id(v) for v in graph.outputs if v.type.dtype == "float32"}  # their names go to the final casts

    def narrow(v: Value, x: Value) -> Value:
        return b.emit1("cast", [x], dtype=dtype) if v.type.dtype == "float32" else x

    for v in graph.inputs:
        env[id(v)] = narrow(v, b.input(v.name, v.type))
    for p in graph.params:
        data = graph.weights[p.name]
        env[id(p)] = b.param(p.name, CastTensor(data, dtype) if p.type.dtype == "float32" else data)
    for node in graph.nodes:
        b.source = node.source
        attrs = dict(node.attrs)
        if node.op == "constant" and np.asarray(attrs["value"]).dtype == np.float32:
            with np.errstate(over="ignore"):  # e.g. a -3.4e38 mask fill becomes -inf in float16, as intended
                attrs["value"] = np.asarray(attrs["value"]).astype(np_dtype(dtype))
        if node.op == "cast" and attrs["dtype"] == "float32":
            attrs["dtype"] = dtype
        names = [f"{v.name}.{dtype}" if id(v) in cast_back else v.name for v in node.outputs]
        outs = b.emit(node.op, [env[id(v)] for v in node.inputs], names=names, **attrs)
        env.update({id(v): o for v, o in zip(node.outputs, outs)})
    b.source = ""
    outputs = [b.emit1("cast", [env[id(v)]], v.name, dtype="float32", excess_precision=True)
               if id(v) in cast_back else env[id(v)]
               for v in graph.outputs]
    return b.finish(outputs)
