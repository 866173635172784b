"""Graph fusions that make one op of a composition the importer leaves spelled out.

:func:`fuse_attention` finds scaled dot-product attention as every exporter writes it (PyTorch's eager and dynamo
exporters, for GPT-2, BERT, Llama, OPT, ViT)::

    s = matmul(q, kt)            q [..., M, D], kt [..., D, N] (the key already transposed)
    s = mul(s, c) | div(s, c)    optional: a scalar constant
    s = add(s, bias)             optional, up to twice (T5: a position bias, then the mask): broadcasting to s
    p = softmax(s, axis=-1)
    o = matmul(p, v)             v [..., N, E]

and replaces it by one ``attention(q, kt, v[, bias]) {scale}``, when every intermediate has that single reader
and kt's and v's batch dims are q's or 1 (multi-query attention, as Falcon's export broadcasts one key head). Two
biases become one ``add`` of the two before the attention: ``(s + b1) + b2`` is ``s + (b1 + b2)`` up to rounding
where both are nonzero (a mask's 0 leaves the bias exact; where it hides a key, either sum is a huge negative).
A ``kt`` that is a transpose of the last two dims of ``k [..., N, D]`` (a key or key cache kept as ``[batch, heads,
seq, dim]``) is read as ``k`` (``transpose_k``): no transposed copy.
Planning then sees no ``[..., M, N]`` score tensor (the memory model and the ILP price the fused op, whose rule
replicates the key axis as the softmax's did), the CPU runs one kernel that never stores the scores
(``bmc.cpu.attention``), and other targets lower the same composition again. The fused op's reference runs the
replaced ops' references in order, so fusing changes no reference result.

ONNX's own ``Attention`` body (opset 23, what ``torch.onnx.export(dynamo=True)`` writes for SDPA) follows the
softmax with ``where(fully_masked_rows, 0, p)``; under a constant mask that hides no whole row the importer's
``Where`` converter already drops it (a constant condition false everywhere), so the pattern above remains; a
mask that does hide whole rows is left alone. A scale applied to q and k before their product is simply part of
q and kt.
"""

from __future__ import annotations

import numpy as np

from bmc.ir.graph import Graph, Node, Value
from bmc.ir.passes import eliminate_dead_code
from bmc.ir.types import TensorType
from bmc.ops.registry import broadcast_shapes


def _scalar(node: Node | None) -> float | None:
    if node is None or node.op != "constant":
        return None
    value = np.asarray(node.attrs["value"])
    return float(value.reshape(())) if value.size == 1 and value.dtype.kind == "f" else None


def _last_two_swapped(rank: int) -> tuple[int, ...]:
    return tuple(range(rank - 2)) + (rank - 1, rank - 2)


def fuse_attention(graph: Graph) -> Graph:
    users = graph.users()
    outputs = set(map(id, graph.outputs))

    def only_reader(v: Value, node: Node) -> bool:
        return id(v) not in outputs and users.get(v, []) == [node]

    def producer(v: Value, node: Node, *ops: str) -> Node | None:
        """``v``'s producer when it is one of ``ops`` and ``node`` is ``v``'s only reader."""
        p = v.producer
        return p if p is not None and p.op in ops and only_reader(v, node) else None

    fused: dict[int, Node] = {}  # id(the replaced output matmul) -> its attention node
    for node in graph.nodes:
        if node.op != "softmax" or node.attrs["axis"] % node.inputs[0].type.rank != node.inputs[0].type.rank - 1:
            continue
        probs = node.outputs[0]
        readers = users.get(probs, [])
        if len(readers) != 1 or readers[0].op != "matmul" or readers[0].inputs[0] is not probs \
                or id(probs) in outputs:
            continue
        out_mm = readers[0]
        s, top, biases, scale = node.inputs[0], node, [], 1.0
        while len(biases) < 2 and (add := producer(s, top, "add")) is not None:  # T5: position bias, then mask
            a, b = add.inputs
            if b.type.shape == s.type.shape and a.type.shape != s.type.shape:
                a, b = b, a
            if a.type.shape != s.type.shape:
                break
            s, top = a, add
            biases.insert(0, b)
        mul = producer(s, top, "mul", "div")
        if mul is not None:
            a, b = mul.inputs
            c = _scalar(b.producer)
            if c is None and mul.op == "mul":
                a, c = b, _scalar(a.producer)
            if c is not None and (mul.op == "mul" or c != 0.0):
                s, top, scale = a, mul, c if mul.op == "mul" else 1.0 / c
        qk = producer(s, top, "matmul")
        if qk is None:
            continue
        (q, kt), v = qk.inputs, out_mm.inputs[1]
        batch = q.type.shape[:-2]
        if not (q.type.rank >= 2 and kt.type.rank == v.type.rank == q.type.rank and s.type.shape[:-2] == batch
                and all(d in (1, b) for b, d in zip(batch * 2, kt.type.shape[:-2] + v.type.shape[:-2]))):
            continue
        key, transpose_k = kt, False
        swap = producer(kt, qk, "transpose")
        if swap is not None and tuple(swap.attrs["perm"]) == _last_two_swapped(kt.type.rank):
            key, transpose_k = swap.inputs[0], True  # the kernel reads k [..., N, D] itself
        made = []
        if len(biases) == 2:
            a, b = biases
            made.append(Node("add", [a, b], [Value(f"{node.outputs[0].name}.bias",
                                                   TensorType(a.type.dtype, broadcast_shapes(a.type.shape,
                                                                                             b.type.shape)))],
                             {}, node.source))
            biases = made[0].outputs
        fused[id(out_mm)] = made + [Node("attention", [q, key, v] + biases, out_mm.outputs,
                                         {"scale": scale, "transpose_k": transpose_k}, node.source)]
    if not fused:
        return graph
    graph.nodes = [m for n in graph.nodes for m in fused.get(id(n), [n])]
    return eliminate_dead_code(graph)
