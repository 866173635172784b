"""Named manual strategies, expressed as annotations that propagation completes: data parallel (batch split),
Megatron tensor parallel (column-parallel then row-parallel weight matmuls), and both on a 2-D mesh.

Megatron is found from the graph's structure, not from names (exporters rename weights): walking the nodes in
order, a matmul whose right operand is a weight (a parameter, possibly through transposes) is *column-parallel*
when its activation is whole and *row-parallel* when its activation is already split by an earlier
column-parallel matmul. A column-parallel matmul whose result is cut by a ``split`` (GPT-2's fused QKV, unless
``bmc.ops.fusion.split_fused_products`` made it one product a part) is left whole and the split's outputs are
split instead, so every layer needs exactly one all-reduce after attention and one after the MLP; so is one whose
result is cut into heads too few to divide by the axis (the attention would gather them back), and one whose
features are read across before any head reshape or weight matmul (normalized, sliced: a latent attention's
low-rank projections) stays whole together with the next. A mixture of
experts (``gather_matmul``) is split by its experts instead (expert parallelism, as Megatron-LM runs MoE layers:
one all-reduce after the expert layer, ``partition._elide_routed_reduces``), and its router's matmul (whose logits
a ``topk`` picks from) is left whole.

Grouped-query attention with fewer key/value heads than Megatron's axis has devices is planned on a view of the
mesh (:func:`megatron_view`): the axis cut into a major part of one device a key/value head and a minor rest, the
key/value projections split over the major part (each device holds the one head its query heads read, as vLLM
does) and everything else over both. :func:`manual_plan` keeps the view only where the cost model finds it no
slower than the mesh itself (a key/value output returned whole would be gathered on the view).
"""

from __future__ import annotations

from math import gcd, prod
from typing import Mapping

from bmc.errors import PlanningError, UsageError
from bmc.ir.graph import Graph, Node, Value
from bmc.ops import get_op
from bmc.sharding.mesh import MAX_RANK, Mesh
from bmc.sharding.plan import Plan
from bmc.sharding.propagate import propagate
from bmc.sharding.spec import Spec


def weight_source(v: Value) -> tuple[Value, tuple[int, ...]] | None:
    """The parameter behind ``v`` and the permutation from ``v``'s dims to its dims (through transposes only)."""
    perm = tuple(range(v.type.rank))
    while v.producer is not None:
        node = v.producer
        if node.op != "transpose":
            return None
        perm = tuple(node.attrs["perm"][p] for p in perm)
        v = node.inputs[0]
    return v, perm


def data_parallel(graph: Graph, axes: tuple[str, ...]) -> dict[str, Spec]:
    """Split dim 0 (the batch) of every graph input over ``axes``."""
    return {v.name: Spec((tuple(axes),) + ((),) * (v.type.rank - 1)) for v in graph.inputs if v.type.rank}


def megatron(graph: Graph, mesh: Mesh, axis: str, batch_axis: str | None = None) -> dict[str, Spec]:
    """Megatron annotations over ``axis`` of ``mesh`` (over its parts, major first, where ``mesh`` is a view that cuts
    it: :func:`megatron_view`); activations it annotates keep their batch dim on ``batch_axis``. A weight whose
    output features do not divide by the axis's size (a per-token gate ``[1, H]``) is left whole; one whose heads
    are fewer splits over the longest major run of the parts that divides them, or stays whole."""
    axes = mesh.parts().get(axis, (axis,))
    size = prod(mesh.axis(a).size for a in axes)
    params = {id(p) for p in graph.params}
    users: dict[int, list[Node]] = {}
    derived = set(params)  # values computed from parameters and constants alone (a dequantized weight)
    for n in graph.nodes:
        for v in n.inputs:
            users.setdefault(id(v), []).append(n)
        if all(id(v) in derived for v in n.inputs):
            derived.update(id(v) for v in n.outputs)
    split_act: set[int] = set()  # activations already split over `axis` by a column-parallel matmul
    out: dict[str, Spec] = {}

    def weight_matmul(node: Node):
        """(what to annotate, its permutation) for a matmul by a 2-D weight: the parameter behind transposes, or
        the operand itself when it is computed from parameters (quantized weights: propagation carries the
        split back through the dequantization to the stored, packed parameter)."""
        if node.op in ("matmul_nbits", "matmul_integer", "matmul_float8"):  # the weight stored [N, K] (4-bit:
            # [N, blocks, block/2])
            w = node.inputs[1]
            return (w, None) if id(w) in params else None
        if node.op != "matmul" or node.inputs[1].type.rank != 2:
            return None
        src = weight_source(node.inputs[1])
        if src is not None and id(src[0]) in params:
            return src
        return (node.inputs[1], (0, 1)) if id(node.inputs[1]) in derived and node.inputs[1].producer else None

    for node in graph.nodes:
        w = node.inputs[1] if node.op == "gather_matmul" else None
        if w is not None and id(w) in params and w.type.shape[0] % size == 0:  # expert parallel: each device its
            out[w.name] = Spec((axes,) + ((),) * (w.type.rank - 1))  # experts
            continue
        src = weight_matmul(node)
        if src is not None and (_routes(node.output, users) or (id(node.inputs[0]) not in split_act
                                                                 and node.output.type.shape[-1] % size)):
            src = None  # left whole: a router's logits (a topk picks from them), too few features (a gate [1, H])
        if src is None:
            if any(id(v) in split_act for v in node.inputs) and node.op not in ("layer_norm", "rms_norm"):
                split_act.update(id(v) for v in node.outputs)
            continue
        param, perm = src
        if id(node.inputs[0]) in split_act:  # row-parallel: split the contraction dim; the result is a partial sum
            out[param.name] = _stored_nk(param, 1, axes) if perm is None else _through(perm, 0, axes)
            continue
        fused = _feeds_split(node.output, users)
        if fused is not None and any(v.type.shape[-1] % size for v in fused.outputs):
            continue  # a part narrower than the axis (Qwen3-Next's per-head gates): all of it left whole
        if fused is not None:  # fused QKV: keep the matmul whole, split each part of the split instead
            for v in fused.outputs:
                batch = ((batch_axis,) if batch_axis else (),)
                out[v.name] = Spec(batch + ((),) * (v.type.rank - 2) + (axes,))
                split_act.add(id(v))
            continue
        if _features_read_across(node.output, users, weight_matmul):  # left whole, as are the next one's features
            continue
        split_act.add(id(node.output))
        cut = _head_axes(node.output, users, axes, mesh)
        if not cut:  # computed whole, read by the next weight matmul as split (its activation sliced on each
            continue  # device, free): a head is never cut
        # column-parallel: split the output features
        out[param.name] = _stored_nk(param, 0, cut) if perm is None else _through(perm, 1, cut)
    return out


def _stored_nk(param: Value, dim: int, axes: tuple[str, ...]) -> Spec:
    """Spec of a weight stored with N as dim 0 and K (or its blocks) as dim 1, split on ``dim``."""
    return Spec(tuple(axes if d == dim else () for d in range(param.type.rank)))


def _through(perm: tuple[int, ...], dim: int, axes: tuple[str, ...]) -> Spec:
    """Spec of a 2-D parameter whose transposed view (by ``perm``) is split on ``dim``."""
    dims = [(), ()]
    dims[perm[dim]] = axes
    return Spec(tuple(dims))


def _feeds_split(v: Value, users: dict[int, list[Node]]) -> Node | None:
    """The split node that cuts ``v``'s last dim, looking through elementwise ops (a bias add; a quantized matmul's
    cast and scale, a quantize-dequantize pair) and reshapes."""
    return _reached(v, users, lambda n, x: n.op == "split" and n.attrs["axis"] % x.type.rank == x.type.rank - 1)


def _head_axes(v: Value, users: dict[int, list[Node]], axes: tuple[str, ...], mesh: Mesh) -> tuple[str, ...]:
    """The axes ``v``'s features split over: all of ``axes`` unless a reshape cuts them into ``[..., heads, d]``
    with ``heads`` not divisible by their devices (split by columns, attention would gather them back); then the
    longest major run of them that divides ``heads`` (empty: whole)."""
    n = v.type.shape[-1]

    def head_dim(shape, rank):  # [..., heads, d] with d < n, or one head [b, s, 1, n] from [b, s, n] (multi-query)
        return shape[-1] if shape[-1] not in (n, 1) and n % shape[-1] == 0 else \
            n if len(shape) == rank + 1 >= 4 and shape[-2:] == (1, n) else None

    cut = _reached(v, users, lambda node, x: node.op == "reshape" and x.type.shape[-1] == n
                   and head_dim(node.outputs[0].type.shape, x.type.rank) is not None)
    if cut is None:
        return axes
    heads, k = n // head_dim(cut.outputs[0].type.shape, cut.inputs[0].type.rank), len(axes)
    while heads % prod(mesh.axis(a).size for a in axes[:k]):
        k -= 1
    return axes[:k]


def _features_read_across(v: Value, users: dict[int, list[Node]], projection) -> bool:
    """Whether ``v``'s features (its last dim), before any weight matmul or reshape into heads, are read across:
    sliced, split or concatenated along the last dim (a rotary embedding of a multi-head latent attention's shared
    key), or normalized (reduced along it) on the way, as they are, into another projection (``projection(node)``:
    the latent's RMSNorm before its up-projection). Split by columns, each of those would need an all-gather or an
    all-reduce before a row-parallel product; Megatron-LM keeps such projections whole. Features normalized and
    then split into heads (OLMo 2's RMSNorm over all query heads) stay split: their statistic is an all-reduce of
    one number a row, where whole they would cost the projection on every device."""
    projected = _reached(v, users, lambda n, x: projection(n), keep_features=True) is not None

    def across(n: Node, x: Value) -> bool:
        rank = x.type.rank
        along = n.attrs.get("axes", (n.attrs.get("axis"),))
        along = () if along is None or None in along else {a % rank for a in along}
        # (a reduction over every dim, a quantizer's max, is one number: no reason)
        return n.op not in ("matmul", "attention") and rank - 1 in along and len(along) < rank and (
            get_op(n.op).family != "reduce" or projected)

    return _reached(v, users, across, keep_features=True) is not None


def _routes(v: Value, users: dict[int, list[Node]]) -> bool:
    """Whether ``v`` is a mixture of experts' router logits: a topk picks the experts from them (after a softmax)."""
    return _reached(v, users, lambda n, x: n.op == "topk", through=("softmax",)) is not None


def _reached(v: Value, users: dict[int, list[Node]], found, through: tuple[str, ...] = (),
             keep_features: bool = False) -> Node | None:
    """The first reader ``n`` (of ``v`` or of what is computed from it by reshapes, elementwise ops and the ops
    ``through``; with ``keep_features``, only reshapes that keep the last dim) for which ``found(n, its operand)``
    holds."""
    frontier, seen = [v], {id(v)}
    for _ in range(24):  # (a QDQ model quantizes and dequantizes twice on the way: 19 ops)
        nxt = []
        for x in frontier:
            for n in users.get(id(x), []):
                if found(n, x):
                    return n
                kept = not keep_features or n.outputs[0].type.shape[-1:] == x.type.shape[-1:]
                reshaped = n.op == "reshape" and kept
                if reshaped or n.op in through or get_op(n.op).family == "elementwise":
                    nxt.extend(o for o in n.outputs if id(o) not in seen)
                    seen.update(id(o) for o in n.outputs)
        frontier = nxt
    return None


def megatron_view(graph: Graph, mesh: Mesh, axis: str) -> Mesh:
    """The mesh Megatron plans ``axis`` on: ``mesh``, or, where grouped-query attention has fewer key/value heads
    ``kv`` than the axis has devices ``n`` (``kv`` divides ``n`` and ``n`` the query heads), the view that cuts the
    axis into ``kv`` (major) by ``n / kv`` (``Mesh.split_axis``). Its key/value projections (and caches) then split
    over the major part: each device holds the one key/value head its query heads read, duplicated on ``n / kv``
    devices, as vLLM does, instead of all of them. With several such counts, the major part is their gcd."""
    n = mesh.axis(axis).size
    counts = set()
    for node in graph.nodes:
        if node.op == "attention" and node.inputs[1].type.rank >= 3:  # q [..., h, m, d], k [..., kv, n, d]
            heads, kv = node.inputs[0].type.shape[-3], node.inputs[1].type.shape[-3]
            if 1 < kv < n and n % kv == 0 and heads % n == 0:
                counts.add(kv)
    major = gcd(*counts) if counts else 1
    return mesh.split_axis(axis, major) if major > 1 else mesh


def strategy_mesh(graph: Graph, name: str, mesh: Mesh) -> Mesh:
    """The mesh (or view of it) a named strategy plans on: Megatron's may cut the last axis (:func:`megatron_view`);
    a view is kept as it is."""
    if name in ("megatron", "dp+megatron") and not mesh.parts() and len(mesh.axes) < MAX_RANK:
        return megatron_view(graph, mesh, mesh.axes[-1].name)
    return mesh


def manual_plan(graph: Graph, name: str, mesh: Mesh, annotations: Mapping[str, Spec | str] | None = None,
                output_specs: Mapping[str, Spec] | None = None, device=None) -> Plan:
    """The plan of a named strategy on ``mesh``, completed by propagation; ``annotations`` (on ``mesh``'s axes)
    win over the strategy's and ``output_specs`` lay the outputs out. Where :func:`strategy_mesh` gives a view,
    the plan on it is priced against the plan on ``mesh`` (``cost.plan_cost`` with ``device``) and kept unless it
    is slower: it computes less, but a whole output (a cache returned whole) built from values split over a part
    costs a gather the plan on the mesh does not have."""
    from bmc.sharding.cost import DEFAULT_DEVICE, DEVICES, plan_cost

    plans = []
    for m in dict.fromkeys((strategy_mesh(graph, name, mesh), mesh)):
        try:
            p = propagate(graph, m, {**named_strategy(graph, name, m), **(annotations or {})})
        except PlanningError:
            if m == mesh:
                raise
            continue  # (the view's layout conflicts with the user's annotations: the mesh's plan is the one)
        p.output_specs = {k: s.onto(m) for k, s in (output_specs or {}).items()}
        plans.append(p)
    if len(plans) == 1:
        return plans[0]
    view, plain = (plan_cost(graph, p, device or DEVICES[DEFAULT_DEVICE]).total_s for p in plans)
    return plans[0] if view <= plain * (1 + 1e-9) else plans[1]


def named_strategy(graph: Graph, name: str, mesh: Mesh) -> dict[str, Spec]:
    """Annotations of a named manual strategy on ``mesh`` (or on the view :func:`strategy_mesh` gives):
    replicate | dp | megatron | dp+megatron (dp on the first mesh axis, Megatron on the last)."""
    first, last = (a.part_of or a.name for a in (mesh.axes[0], mesh.axes[-1]))
    if name == "replicate":
        return {}
    if name == "dp":
        return data_parallel(graph, mesh.parts().get(first, (first,)))
    if name == "megatron":
        return megatron(graph, mesh, last)
    if name == "dp+megatron":
        if first == last:
            raise UsageError("dp+megatron needs a mesh with two axes", where="--strategy",
                             fix="use a mesh with two axes, e.g. --mesh 2x2")
        return {**megatron(graph, mesh, last, first), **data_parallel(graph, (first,))}
    raise UsageError(f"unknown strategy {name!r}", where="--strategy",
                     fix="use replicate, dp, megatron, dp+megatron or auto")
