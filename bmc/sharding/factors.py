"""Factor rules for every op in the op table (the ``factors`` facet), in the form of ``bmc.sharding.rules``.

A rule is built by one of a few pattern helpers, and ops are mapped to rules by two tables (``RULES`` by op name,
``FAMILY_RULES`` by family as the fallback); ``install()`` fills ``OPS[name].factors`` from them at import. Each rule
builder takes ``(in_types, out_types, attrs)``; the installed facet has the op table signature
``rule(in_types, attrs) -> ShardingRule`` (output types are inferred once, by the op's own ``infer``).

Patterns:
  * broadcast    — one pass factor per result dim; an operand dim of size 1 under a larger result dim has none;
  * same shape   — one factor per dim, some dims ``replicate`` (softmax's axis, normalized dims, cumsum's axis);
  * reduce       — reduced dims ``reduction`` (a partial sum; max/min: all-reduced after the op) or ``replicate``;
                   kept size-1 result dims have none;
  * permutation  — transpose;
  * refinement   — reshape: compound factors from the common refinement of input and output shapes;
  * restructured — tensors of one rank that share untouched dims and change others (concat, split, slice, pad,
    tile, pooling, collectives): each changed dim gets its own replicate factor per tensor;
  * window/gather specials — matmul, conv, gather (vocab split with a ``local`` hook), gather_matmul (experts split
    with one), gather_elements, gather_nd,
    scatter_elements and scatter_nd (the dims every write spans pass).

A compound dim is one contiguous block layout only when every factor major to a split factor is split completely;
``ShardingRule.check`` enforces that together with divisibility and replicate factors.
"""

from __future__ import annotations

from math import prod
from typing import Callable, Sequence

import numpy as np

from bmc.ir.types import FLOAT_DTYPES, INT_DTYPES, TensorType
from bmc.ops.registry import OPS, broadcast_shapes, normalize_axis
from bmc.ops.linalg import key_dims
from bmc.sharding.rules import DimFactors, Factor, ShardingRule
from bmc.sharding.spec import Spec

RuleBuilder = Callable[[Sequence[TensorType], Sequence[TensorType], dict], ShardingRule]
Dims = tuple[DimFactors, ...]


class _Factors:
    """Collects the factors of one rule while its dims are described."""

    def __init__(self):
        self.factors: list[Factor] = []
        self.grouped: list[tuple[int, int]] = []

    def new(self, name: str, size: int, kind: str = "pass", combine: str = "sum") -> int:
        self.factors.append(Factor(name, int(size), kind, combine))
        return len(self.factors) - 1

    def rule(self, operands: Sequence[Sequence[DimFactors]], results: Sequence[Sequence[DimFactors]],
             local=None, inner=None) -> ShardingRule:
        return ShardingRule(tuple(self.factors), tuple(tuple(tuple(d) for d in op) for op in operands),
                            tuple(tuple(tuple(d) for d in r) for r in results), local, inner, tuple(self.grouped))


# ---------------------------------------------------------------------------------------------------------------
# Pattern helpers: each describes the dims of some tensors in terms of new factors.

def broadcast_dims(fs: _Factors, shapes: Sequence[tuple[int, ...]], out_shape: tuple[int, ...],
                   prefix: str = "d") -> tuple[list[Dims], Dims]:
    """Numpy broadcasting of ``shapes`` to ``out_shape``: one pass factor per result dim; an operand dim of size 1
    under a larger result dim has no factor, and missing leading dims are simply absent."""
    ids = [fs.new(f"{prefix}{i}", d) for i, d in enumerate(out_shape)]
    operands = []
    for shape in shapes:
        off = len(out_shape) - len(shape)
        operands.append(tuple((ids[off + j],) if d == out_shape[off + j] else () for j, d in enumerate(shape)))
    return operands, tuple((f,) for f in ids)


def grouped_dims(fs: _Factors, shapes: Sequence[tuple[int, ...]], batch: tuple[int, ...],
                 prefix: str = "b") -> tuple[list[Dims], Dims]:
    """Batch dims ``batch`` and operands' dims that divide them (attention's keys and values against q): a dim of
    the same size shares the factor, a 1 has none, and a group's (``h`` under ``h * g``: query head ``i`` reads
    key/value head ``i // g``) is a factor of its own, the inner of a grouped pair with the big dim's
    (``ShardingRule.grouped``): splitting the query heads splits the key/value heads in the same blocks as far as
    they go; split further (more devices than key/value heads), each device's query block reads one key/value head,
    which the rule's ``local`` hook takes from its block (:func:`attention_local`). Two different groupings of one
    dim may not be split."""
    operands: list[list[tuple[int, ...]]] = [[] for _ in shapes]
    result = []
    for i, size in enumerate(batch):
        groups = {s[i] for s in shapes} - {1, size}
        if len(groups) > 1:
            result.append((fs.new(f"{prefix}{i}", size, "replicate"),))
            for dims, s in zip(operands, shapes):
                dims.append(result[-1] if s[i] == size else () if s[i] == 1
                            else (fs.new(f"{prefix}{i}.{s[i]}", s[i], "replicate"),))
            continue
        whole = fs.new(f"{prefix}{i}", size)
        result.append((whole,))
        if groups:
            heads = fs.new(f"{prefix}{i}.kv", next(iter(groups)))
            fs.grouped.append((whole, heads))
        for dims, s in zip(operands, shapes):
            dims.append((whole,) if s[i] == size else () if s[i] == 1 else (heads,))
    return [tuple(d) for d in operands], tuple(result)


def same_shape_dims(fs: _Factors, shape: tuple[int, ...], replicate: Sequence[int] = ()) -> Dims:
    """One factor per dim; the dims in ``replicate`` may not be split."""
    return tuple((fs.new(f"d{i}", d, "replicate" if i in replicate else "pass"),) for i, d in enumerate(shape))


def reduce_dims(fs: _Factors, shape: tuple[int, ...], axes: Sequence[int], keepdims: bool,
                kind: str, combine: str = "sum") -> tuple[Dims, Dims]:
    """A reduction over ``axes``: those dims get factors of ``kind`` (and ``combine``); kept size-1 result dims
    have none."""
    dims = tuple((fs.new(f"d{i}", d, kind, combine) if i in axes else fs.new(f"d{i}", d),)
                 for i, d in enumerate(shape))
    result = tuple(() if i in axes else dims[i] for i in range(len(shape)) if keepdims or i not in axes)
    return dims, result


def permuted_dims(fs: _Factors, shape: tuple[int, ...], perm: Sequence[int]) -> tuple[Dims, Dims]:
    """Result dim ``j`` is operand dim ``perm[j]``."""
    dims = same_shape_dims(fs, shape)
    return dims, tuple(dims[p] for p in perm)


def restructured_dims(fs: _Factors, shapes: Sequence[tuple[int, ...]], changed: Sequence[int]) -> list[Dims]:
    """Tensors of one rank that share every dim outside ``changed`` (one pass factor each); every changed dim of
    every tensor gets its own replicate factor (its size may differ from tensor to tensor)."""
    rank = len(shapes[0])
    shared = {i: fs.new(f"d{i}", shapes[0][i]) for i in range(rank) if i not in changed}
    out = []
    for t, shape in enumerate(shapes):
        out.append(tuple((shared[i],) if i in shared else (fs.new(f"t{t}d{i}", d, "replicate"),)
                         for i, d in enumerate(shape)))
    return out


def refinement_dims(fs: _Factors, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[Dims, Dims]:
    """Reshape as compound factors. Non-1 dims are grouped into minimal runs of equal product; a run whose
    cumulative products form a divisibility chain is refined into shared pass factors (``[2,12]→[2,3,4]``: input
    dim 1 = (f1, f2)); a run that cannot be aligned (``[2,3]→[3,2]``) gets one replicate factor per dim on each side.
    Size-1 dims have no factor."""
    ins: list[DimFactors] = [()] * len(in_shape)
    outs: list[DimFactors] = [()] * len(out_shape)
    if prod(in_shape) == 0:  # empty tensors: nothing to split
        ins = [(fs.new(f"i{i}", d, "replicate"),) for i, d in enumerate(in_shape)]
        outs = [(fs.new(f"o{j}", d, "replicate"),) for j, d in enumerate(out_shape)]
        return tuple(ins), tuple(outs)
    for gi, go in _equal_product_runs(in_shape, out_shape):
        pieces = _common_refinement([in_shape[i] for i in gi], [out_shape[j] for j in go])
        if pieces is None:
            for i in gi:
                ins[i] = (fs.new(f"i{i}", in_shape[i], "replicate"),)
            for j in go:
                outs[j] = (fs.new(f"o{j}", out_shape[j], "replicate"),)
            continue
        ids = [fs.new(f"r{len(fs.factors)}", p) for p in pieces]
        for group, shape, side in ((gi, in_shape, ins), (go, out_shape, outs)):
            k = 0
            for d in group:
                start, size = k, 1
                while size < shape[d]:
                    size *= pieces[k]
                    k += 1
                side[d] = tuple(ids[start:k])
    return tuple(ins), tuple(outs)


def _equal_product_runs(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Minimal runs of non-1 dims of ``a`` and ``b`` with equal products, in order."""
    ia = [i for i, d in enumerate(a) if d != 1]
    ib = [j for j, d in enumerate(b) if d != 1]
    runs, i, j = [], 0, 0
    while i < len(ia):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ga.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                gb.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        runs.append((ga, gb))
    return runs


def _common_refinement(a: list[int], b: list[int]) -> list[int] | None:
    """The coarsest sizes whose consecutive products give every dim of ``a`` and of ``b`` (None if none exists)."""
    cuts = sorted(set(np.cumprod(a).tolist()) | set(np.cumprod(b).tolist()))
    pieces, prev = [], 1
    for c in cuts:
        if c % prev:
            return None
        pieces.append(c // prev)
        prev = c
    return pieces


# ---------------------------------------------------------------------------------------------------------------
# Rules by pattern.

def elementwise_rule(ins, outs, attrs) -> ShardingRule:
    """Unary, binary and select ops with numpy broadcasting; also cast, clip, broadcast_to."""
    fs = _Factors()
    operands, result = broadcast_dims(fs, [t.shape for t in ins], outs[0].shape)
    return fs.rule(operands, [result])


def matmul_rule(ins, outs, attrs) -> ShardingRule:
    """numpy.matmul: broadcast batch dims pass, m and n pass, k is a reduction; 1-D operands have no m (or n)."""
    a, b = ins[0].shape, ins[1].shape
    fs = _Factors()
    (a_batch, b_batch), batch = broadcast_dims(fs, [a[:-2], b[:-2]], broadcast_shapes(a[:-2], b[:-2]), "b")
    m = (fs.new("m", a[-2]),) if len(a) >= 2 else ()
    k = fs.new("k", a[-1], "reduction")
    n = (fs.new("n", b[-1]),) if len(b) >= 2 else ()
    a_dims = a_batch + ((m,) if m else ()) + ((k,),)
    b_dims = b_batch + ((k,),) + ((n,) if n else ())
    return fs.rule([a_dims, b_dims], [batch + ((m,) if m else ()) + ((n,) if n else ())])


def gather_matmul_rule(ins, outs, attrs) -> ShardingRule:
    """x [S, K], w [E, K, N] ([E, N, K] with transpose_w), idx [S] -> [S, N]: rows and N pass, K is a reduction,
    and so are the experts E (expert parallelism): a device holding a block of the experts computes the rows routed
    to them (:func:`gather_matmul_local`) and leaves the others zero, so the sum over the blocks is the product."""
    (s, k), (e, n) = ins[0].shape, (ins[1].shape[0], outs[0].shape[1])
    fs = _Factors()
    rows, kf, nf = fs.new("s", s), fs.new("k", k, "reduction"), fs.new("n", n)
    ef = fs.new("experts", e, "reduction")
    w = ((ef,), (nf,), (kf,)) if attrs["transpose_w"] else ((ef,), (kf,), (nf,))
    return fs.rule([((rows,), (kf,)), w, ((rows,),)], [((rows,), (nf,))], gather_matmul_local)


def gather_matmul_local(ctx, node, inputs, assignment, rule):
    """One device's product on its block [offset, offset + chunk) of the experts: the indices shifted by the offset
    (the op leaves rows whose index falls outside its weights zero)."""
    x, w, idx = inputs
    axes = assignment[rule.operands[1][0][0]]
    if not axes:
        return ctx.emit("gather_matmul", [x, w, idx], **node.attrs)
    itype = idx.type.dtype
    block = ctx.block_index(axes)
    if itype != "int64":
        block = ctx.emit("cast", [block], dtype=itype)[0]
    (offset,) = ctx.emit("mul", [block, ctx.constant(w.type.shape[0], itype)])
    (local,) = ctx.emit("sub", [idx, offset])
    return ctx.emit("gather_matmul", [x, w, local], **node.attrs)


def matmul_nbits_rule(ins, outs, attrs) -> ShardingRule:
    """A's leading dims and N pass; K is (blocks, within a block): whole blocks are a reduction (a row-parallel
    split of the codes, scales and zero points along their block dim), the values within a block stay together."""
    a, codes = ins[0].shape, ins[1].shape
    n, blocks, half = codes
    fs = _Factors()
    lead = tuple((fs.new(f"b{i}", d),) for i, d in enumerate(a[:-1]))
    kb = fs.new("blocks", blocks, "reduction")
    within, nibbles = fs.new("within", 2 * half, "replicate"), fs.new("bytes", half, "replicate")
    nf = fs.new("n", n)
    per_block = ((nf,), (kb,))
    return fs.rule([lead + ((kb, within),), ((nf,), (kb,), (nibbles,))] + [per_block] * (len(ins) - 2),
                   [lead + ((nf,),)])


def matmul_integer_rule(ins, outs, attrs) -> ShardingRule:
    """A's leading dims and Bt's N pass, K is a reduction (int32 partial sums); a zero point with one value per row
    of A (of Bt) goes with A's M (Bt's N)."""
    a, bt, za, zb = (t.shape for t in ins)
    fs = _Factors()
    lead = tuple((fs.new(f"b{i}", d),) for i, d in enumerate(a[:-1]))
    k, n = fs.new("k", a[-1], "reduction"), fs.new("n", bt[0])
    per_row = [lead[-1] if len(a) >= 2 and za and za[0] > 1 else (), (n,) if zb and zb[0] > 1 else ()]
    zps = [tuple(rows for _ in shape) for rows, shape in zip(per_row, (za, zb))]
    return fs.rule([lead + ((k,),), ((n,), (k,))] + zps, [lead + ((n,),)])


def matmul_float8_rule(ins, outs, attrs) -> ShardingRule:
    """A's leading dims and the codes' N pass, K is a reduction (partial sums); a scale per row goes with N."""
    a, codes, scale = (t.shape for t in ins)
    fs = _Factors()
    lead = tuple((fs.new(f"b{i}", d),) for i, d in enumerate(a[:-1]))
    k, n = fs.new("k", a[-1], "reduction"), fs.new("n", codes[0])
    per_row = ((n,),) if scale and scale[0] > 1 else tuple(() for _ in scale)
    return fs.rule([lead + ((k,),), ((n,), (k,)), per_row], [lead + ((n,),)])


def attention_rule(ins, outs, attrs) -> ShardingRule:
    """softmax(q @ kt + bias) @ v (the key stored as kt, or as k with ``transpose_k``): the batch dims (where k and v
    have them: a multi-query k/v of 1 head has none, a grouped-query one a factor grouped under q's,
    :func:`grouped_dims`), q's rows M and v's columns E pass; the head dim D may not be
    split. The keys N are a reduction (context parallelism): each device attends to its block of the keys, and the
    ``local`` hook weighs its rows by their share of the softmax's denominator (:func:`_key_split_attention`), which
    leaves partial sums. The bias broadcasts against the scores [..., M, N]. With ``lse`` (the op that hook emits,
    only ever in a local program) N may not be split."""
    q, k, v = (t.shape for t in ins[:3])
    kt = key_dims(k, attrs)
    fs = _Factors()
    (k_batch, v_batch), batch = grouped_dims(fs, [k[:-2], v[:-2]], q[:-2])  # multi-/grouped-query: k, v dims of 1/h
    m, d = fs.new("m", q[-2]), fs.new("d", q[-1], "replicate")
    n, e = fs.new("n", kt[-1], "replicate" if attrs["lse"] else "reduction"), fs.new("e", v[-1])
    key = ((n,), (d,)) if attrs["transpose_k"] else ((d,), (n,))
    operands = [batch + ((m,), (d,)), k_batch + key, v_batch + ((n,), (e,))]
    scores, shape = batch + ((m,), (n,)), q[:-1] + (kt[-1],)
    for extra in ins[3:]:  # the bias, then the sink (rows [..., M, 1]: its dim of 1 takes no factor)
        off = len(shape) - extra.rank
        operands.append(tuple(scores[off + j] if size == shape[off + j] else () for j, size in enumerate(extra.shape)))
    results = [batch + ((m,), (e,))] + ([batch + ((m,),)] if attrs["lse"] else [])
    if attrs["lse"]:
        return fs.rule(operands, results, attention_local)
    rows = TensorType("float32", q[:-1])

    def inner(assignment):  # the hook's two all-reduces of a float32 value per row: the max, then the sum
        spec = Spec(tuple(tuple(a for f in dim for a in assignment[f]) for dim in batch + ((m,),)))
        return [(assignment[n], rows, spec)] * 2 if assignment[n] else []

    return fs.rule(operands, results, attention_local, inner)


def attention_local(ctx, node, inputs, assignment, rule):
    """One device's attention: the key/value heads its query heads read (:func:`_shared_heads`), then over its
    block of the keys (:func:`_key_split_attention`)."""
    return _key_split_attention(ctx, node, _shared_heads(ctx, inputs, assignment, rule), assignment, rule)


def _shared_heads(ctx, inputs, assignment, rule):
    """q, k, v (and the bias) with k and v cut to the one key/value head this device's query heads read, where its
    query heads are split more ways than its key/value heads (a grouped pair's extra axes, ``nested_axes``): query
    block ``e`` of the ``n_e`` within the local key/value block reads local head ``e // (n / kv)`` (``n``: the
    query heads' ways, ``kv``: the key/value heads)."""
    inputs = list(inputs)
    for outer, inner in rule.grouped:
        extra = assignment[outer][len(assignment[inner]):]
        if not extra:
            continue
        n = prod(ctx.mesh.axis(a).size for a in assignment[outer])
        per_head = n // rule.factors[inner].size
        table = ctx.constant(np.arange(n // prod(ctx.mesh.axis(a).size for a in assignment[inner])) // per_head)
        (index,) = ctx.emit("gather", [table, ctx.emit("reshape", [ctx.block_index(extra)], shape=(1,))[0]], axis=0)
        for k in (1, 2):
            if (inner,) in rule.operands[k]:
                (inputs[k],) = ctx.emit("gather", [inputs[k], index], axis=rule.operands[k].index((inner,)))
    return inputs


def _key_split_attention(ctx, node, inputs, assignment, rule):
    """Attention to this device's block of the keys, as a partial sum of the whole: ``o_i`` (the softmax over block
    i) times ``exp(lse_i) / sum_j exp(lse_j)``, block i's share of the denominator, computed about the max of the
    ``lse_j``. A row whose block is all masked with -inf has ``lse_i = -inf`` and a weight of 0 (its ``o_i`` is
    NaN, so it is left out by a ``where``); a row masked everywhere stays NaN, as in the reference."""
    axes = next(a for f, a in zip(rule.factors, assignment) if f.name == "n")
    if not axes:
        return ctx.emit("attention", inputs, **node.attrs)
    name = node.outputs[0].name
    sink = inputs[-1] if node.attrs["sink"] else None  # one more term of every row's denominator, counted once
    o, lse = ctx.emit("attention", inputs[:len(inputs) - (sink is not None)], names=(f"{name}.block", f"{name}.lse"),
                      **(node.attrs | {"lse": True, "sink": False, "sink_shift": False}))
    top = ctx.all_reduce(lse, axes, "max")
    if sink is not None:
        rows = lse.type.shape
        sink = ctx.emit("reshape", [ctx.emit("broadcast_to", [sink], shape=rows + (1,))[0]], shape=rows)[0]
        sink = sink if sink.type.dtype == "float32" else ctx.emit("cast", [sink], dtype="float32")[0]
        top = ctx.emit("maximum", [top, sink])[0]
    shifted = ctx.emit("sub", [lse, top])[0]
    weight = ctx.emit("exp", [shifted], names=(f"{name}.weight",))[0]
    total = ctx.all_reduce(weight, axes, "sum")
    if sink is not None:
        total = ctx.emit("add", [total, ctx.emit("exp", [ctx.emit("sub", [sink, top])[0]])[0]])[0]
    share = ctx.emit("div", [weight, total])[0]
    column = o.type.shape[:-1] + (1,)
    share = ctx.emit("reshape", [share], shape=column)[0]
    zero = ctx.emit("equal", [ctx.emit("reshape", [weight], shape=column)[0], ctx.constant(0.0, "float32")])[0]
    wide = o if o.type.dtype == "float32" else ctx.emit("cast", [o], dtype="float32")[0]
    part = ctx.emit("where", [zero, ctx.constant(0.0, "float32"), ctx.emit("mul", [wide, share])[0]])[0]
    return [part] if o.type.dtype == "float32" else ctx.emit("cast", [part], dtype=o.type.dtype)


def _reduce_axes(attrs, rank) -> tuple[int, ...]:
    axes = attrs["axes"] if "axes" in attrs else (attrs["axis"],)  # reduce_* have axes, argmax/argmin an axis
    return tuple(range(rank)) if axes is None else tuple(sorted(normalize_axis(a, rank) for a in axes))


def reduce_rule(kind: str, local=None, dtypes: frozenset | None = None, combine: str = "sum") -> RuleBuilder:
    """Reductions over ``axes`` (or ``axis``): reduced dims get ``kind`` (and ``combine``) when the input dtype is
    in ``dtypes`` (``replicate`` otherwise), and ``local`` is the hook that makes the local op right for a split
    reduction."""

    def rule(ins, outs, attrs) -> ShardingRule:
        x = ins[0]
        ok = dtypes is None or x.dtype in dtypes
        fs = _Factors()
        dims, result = reduce_dims(fs, x.shape, _reduce_axes(attrs, x.rank), attrs["keepdims"],
                                   kind if ok else "replicate", combine)
        return fs.rule([dims], [result], local if ok and kind == "reduction" else None)

    return rule


def _scaled_mean_local(ctx, node, inputs, assignment, rule):
    """reduce_mean over split dims: the local mean divided by the number of shards is a partial sum of the mean."""
    (y,) = ctx.emit(node.op, inputs, **node.attrs)
    shards = prod(ctx.mesh.axis(a).size for f, axes in zip(rule.factors, assignment) if f.kind == "reduction"
                  for a in axes)
    if shards == 1:
        return [y]
    return ctx.emit("mul", [y, ctx.constant(np.asarray(1.0 / shards), y.type.dtype)])


def unpack_int4_rule(ins, outs, attrs) -> ShardingRule:
    """Every dim passes; the last result dim is (packed bytes, nibble), so a split of the bytes is a split of the
    values in the same blocks."""
    fs = _Factors()
    dims = same_shape_dims(fs, ins[0].shape)
    nibble = fs.new("nibble", 2, "replicate")
    return fs.rule([dims], [dims[:-1] + (dims[-1] + (nibble,),)])


def axis_replicated_rule(ins, outs, attrs) -> ShardingRule:
    """softmax, log_softmax, cumsum, cumprod: the ``axis`` dim may not be split, every other dim passes."""
    x = ins[0]
    fs = _Factors()
    dims = same_shape_dims(fs, x.shape, (normalize_axis(attrs["axis"], x.rank),))
    return fs.rule([dims], [dims])


def topk_rule(ins, outs, attrs) -> ShardingRule:
    """topk: the ``axis`` dim may not be split (its k results come from the whole dim); every other dim passes to
    both results."""
    x = ins[0]
    axis = normalize_axis(attrs["axis"], x.rank)
    fs = _Factors()
    dims = same_shape_dims(fs, x.shape, (axis,))
    result = tuple((fs.new("k", attrs["k"], "replicate"),) if i == axis else d for i, d in enumerate(dims))
    return fs.rule([dims], [result, result])


def channel_replicated_rule(ins, outs, attrs) -> ShardingRule:
    """lrn: the channel dim (1) may not be split (windows cross it)."""
    fs = _Factors()
    dims = same_shape_dims(fs, ins[0].shape, (1,))
    return fs.rule([dims], [dims])


def normalized_rule(ins, outs, attrs) -> ShardingRule:
    """layer_norm, rms_norm: dims axis..rank-1 are normalized (replicate); scale/bias share their factors."""
    x = ins[0]
    axis = normalize_axis(attrs["axis"], x.rank)
    fs = _Factors()
    dims = same_shape_dims(fs, x.shape, range(axis, x.rank))
    return fs.rule([dims] + [dims[axis:]] * (len(ins) - 1), [dims])


def batch_norm_rule(ins, outs, attrs) -> ShardingRule:
    """Inference batch norm: every dim passes; the four 1-D parameters share the channel factor."""
    fs = _Factors()
    dims = same_shape_dims(fs, ins[0].shape)
    return fs.rule([dims] + [dims[1:2]] * 4, [dims])


def transpose_rule(ins, outs, attrs) -> ShardingRule:
    """Factors follow the permutation."""
    fs = _Factors()
    dims, result = permuted_dims(fs, ins[0].shape, attrs["perm"])
    return fs.rule([dims], [result])


def reshape_rule(ins, outs, attrs) -> ShardingRule:
    """Compound factors from the common refinement of the two shapes (see ``refinement_dims``)."""
    fs = _Factors()
    dims, result = refinement_dims(fs, ins[0].shape, outs[0].shape)
    return fs.rule([dims], [result])


def changed_axes_rule(changed: Callable[[Sequence[TensorType], Sequence[TensorType], dict], Sequence[int]]
                      ) -> RuleBuilder:
    """Ops whose operands and results have one rank and share every dim except ``changed(ins, outs, attrs)``."""

    def rule(ins, outs, attrs) -> ShardingRule:
        fs = _Factors()
        dims = restructured_dims(fs, [t.shape for t in list(ins) + list(outs)], tuple(changed(ins, outs, attrs)))
        return fs.rule(dims[:len(ins)], dims[len(ins):])

    return rule


def _axis_attr(ins, outs, attrs):
    return (normalize_axis(attrs["axis"], ins[0].rank),)


def _sliced_axes(ins, outs, attrs):
    steps = {normalize_axis(a, ins[0].rank): s for a, s in zip(attrs["axes"], attrs["steps"])}
    return [i for i, (d, e) in enumerate(zip(ins[0].shape, outs[0].shape)) if d != e or steps.get(i, 1) != 1]


def _padded_axes(ins, outs, attrs):
    pads, r = attrs["pads"], ins[0].rank
    return [i for i in range(r) if pads[i] or pads[i + r]]


def _repeated_axes(ins, outs, attrs):
    return [i for i, rep in enumerate(attrs["repeats"]) if rep != 1]


def _spatial_axes(ins, outs, attrs):
    return range(2, ins[0].rank)


def conv_rule(ins, outs, attrs) -> ShardingRule:
    """x [N,C,S...] * w [M,C/g,K...] -> [N,M,O...]: N passes; with group 1, M passes and C is a reduction; with
    groups, channels are replicated (a local conv would regroup its shard); spatial and kernel dims replicate."""
    x, w = ins[0].shape, ins[1].shape
    grouped = attrs["group"] != 1
    fs = _Factors()
    n = fs.new("n", x[0])
    if grouped:
        c_x, c_w = fs.new("c", x[1], "replicate"), fs.new("cg", w[1], "replicate")
        m = fs.new("m", w[0], "replicate")
    else:
        c_x = c_w = fs.new("c", x[1], "reduction")
        m = fs.new("m", w[0])

    def windows(name, shape):  # spatial, kernel and output window dims: one replicate factor each
        return tuple((fs.new(f"{name}{i}", d, "replicate"),) for i, d in enumerate(shape[2:]))

    return fs.rule([((n,), (c_x,)) + windows("s", x), ((m,), (c_w,)) + windows("k", w)],
                   [((n,), (m,)) + windows("o", outs[0].shape)])


def gather_rule(ins, outs, attrs) -> ShardingRule:
    """numpy.take along ``axis``: other data dims and every index dim pass; the gathered (vocabulary) dim is a
    reduction implemented by ``gather_vocab_local`` (rows outside a device's vocab block are zero)."""
    data, idx = ins[0], ins[1]
    axis = normalize_axis(attrs["axis"], data.rank)
    fs = _Factors()
    d = [fs.new(f"d{i}", s) if i != axis else None for i, s in enumerate(data.shape)]
    splittable = data.dtype != "bool"  # a partial sum of bools is not a sum
    d[axis] = fs.new("vocab", data.shape[axis], "reduction" if splittable else "replicate")
    i = [fs.new(f"i{j}", s) for j, s in enumerate(idx.shape)]
    result = [(f,) for f in d[:axis]] + [(f,) for f in i] + [(f,) for f in d[axis + 1:]]
    return fs.rule([[(f,) for f in d], [(f,) for f in i]], [result], gather_vocab_local if splittable else None)


def gather_vocab_local(ctx, node, inputs, assignment, rule):
    """One device's gather on a vocab block [offset, offset+chunk): look up ``ids - offset`` where it falls in the
    block (index 0 elsewhere), then zero the rows looked up outside it; the sum over the vocab axes is the gather."""
    data, ids = inputs
    axis = normalize_axis(node.attrs["axis"], data.type.rank)
    vocab = rule.operands[0][axis][0]
    axes = assignment[vocab]
    if not axes:
        return ctx.emit("gather", [data, ids], **node.attrs)
    itype, chunk, size = ids.type.dtype, data.type.shape[axis], rule.factors[vocab].size
    block = ctx.block_index(axes)
    if itype != "int64":
        block = ctx.emit("cast", [block], dtype=itype)[0]
    (offset,) = ctx.emit("mul", [block, ctx.constant(chunk, itype)])
    zero = ctx.constant(0, itype)
    (negative,) = ctx.emit("less", [ids, zero])
    (wrapped,) = ctx.emit("add", [ids, ctx.constant(size, itype)])
    (ids,) = ctx.emit("where", [negative, wrapped, ids])  # numpy.take counts negative ids from the end
    (local,) = ctx.emit("sub", [ids, offset])
    (above,) = ctx.emit("greater_equal", [local, zero])
    (below,) = ctx.emit("less", [local, ctx.constant(chunk, itype)])
    (mine,) = ctx.emit("logical_and", [above, below])
    (safe,) = ctx.emit("where", [mine, local, zero])
    (rows,) = ctx.emit("gather", [data, safe], **node.attrs)
    lead, trail = (1,) * axis, (1,) * (data.type.rank - axis - 1)
    (mask,) = ctx.emit("reshape", [mine], shape=lead + ids.type.shape + trail)
    return ctx.emit("where", [mask, rows, ctx.constant(0, data.type.dtype)])


def _along_axis(fs: _Factors, data, idx, axis: int, idx_axis: str) -> tuple[list, list]:
    """Data and index dims of an op along ``axis`` (gather_elements, scatter_elements): a dim other than ``axis``
    where both have the same size passes, one factor shared; the others replicate, except the index's ``axis`` dim,
    which is of kind ``idx_axis``."""
    d_dims, i_dims = [], []
    for k, (ds, is_) in enumerate(zip(data, idx)):
        if k != axis and ds == is_:
            f = fs.new(f"d{k}", ds)
            d_dims.append((f,))
            i_dims.append((f,))
        else:
            d_dims.append((fs.new(f"data{k}", ds, "replicate"),))
            i_dims.append((fs.new(f"idx{k}", is_, "replicate" if k != axis else idx_axis),))
    return d_dims, i_dims


def gather_elements_rule(ins, outs, attrs) -> ShardingRule:
    """take_along_axis: the data dim along ``axis`` replicates; the index dim there passes (shared with the
    result); other dims pass where data and indices agree in size, and replicate otherwise."""
    fs = _Factors()
    d_dims, i_dims = _along_axis(fs, ins[0].shape, ins[1].shape, normalize_axis(attrs["axis"], ins[0].rank), "pass")
    return fs.rule([d_dims, i_dims], [i_dims])


def gather_nd_rule(ins, outs, attrs) -> ShardingRule:
    """data [B..., K..., R...], indices [B..., I..., k] -> [B..., I..., R...]: batch dims B, index dims I and the
    trailing data dims R pass; the indexed data dims K and the index depth k replicate."""
    data, idx = ins[0].shape, ins[1].shape
    nb, depth = attrs["batch_dims"], idx[-1]
    fs = _Factors()
    batch = [(fs.new(f"b{k}", s),) if s == idx[k] else None for k, s in enumerate(data[:nb])]
    data_batch = [b or (fs.new(f"db{k}", data[k], "replicate"),) for k, b in enumerate(batch)]
    idx_batch = [b or (fs.new(f"ib{k}", idx[k], "replicate"),) for k, b in enumerate(batch)]
    indexed = [(fs.new(f"k{k}", s, "replicate"),) for k, s in enumerate(data[nb:nb + depth])]
    rest = [(fs.new(f"r{k}", s),) for k, s in enumerate(data[nb + depth:])]
    inner = [(fs.new(f"i{k}", s),) for k, s in enumerate(idx[nb:-1])]
    depth_dim = (fs.new("depth", depth, "replicate"),)
    return fs.rule([data_batch + indexed + rest, idx_batch + inner + [depth_dim]], [idx_batch + inner + rest])


pool_rule = changed_axes_rule(_spatial_axes)  # max_pool, avg_pool: N and C pass, spatial dims replicate


def scatter_elements_rule(ins, outs, attrs) -> ShardingRule:
    """ScatterElements writes ``updates[p]`` at ``p`` with ``p[axis]`` replaced by ``indices[p]``: a dim other than
    ``axis`` where indices (and updates) span the whole data dim passes, shared by data, indices, updates and
    result (each block's writes land in its own block: a key/value cache updated at one position splits over
    heads); ``axis`` and partial dims replicate."""
    fs = _Factors()
    d_dims, i_dims = _along_axis(fs, ins[0].shape, ins[1].shape, normalize_axis(attrs["axis"], ins[0].rank),
                                 "replicate")
    return fs.rule([d_dims, i_dims, i_dims], [d_dims])


def scatter_nd_rule(ins, outs, attrs) -> ShardingRule:
    """data [K..., R...], indices [I..., k], updates [I..., R...]: the trailing data dims R pass (shared by data,
    updates and result: every write is a whole slice of them); the indexed dims K, the update dims I and the index
    depth replicate (writes land anywhere along K)."""
    data, idx = ins[0].shape, ins[1].shape
    depth = idx[-1]
    fs = _Factors()
    indexed = [(fs.new(f"k{k}", s, "replicate"),) for k, s in enumerate(data[:depth])]
    rest = [(fs.new(f"r{k}", s),) for k, s in enumerate(data[depth:])]
    inner = [(fs.new(f"i{k}", s, "replicate"),) for k, s in enumerate(idx[:-1])]
    depth_dim = (fs.new("depth", depth, "replicate"),)
    return fs.rule([indexed + rest, inner + [depth_dim], inner + rest], [indexed + rest])


def replicated_rule(ins, outs, attrs) -> ShardingRule:
    """Nothing may be split: constants and collectives (which only appear after partitioning)."""
    fs = _Factors()

    def dims(t, k):
        return tuple((fs.new(f"t{k}d{i}", d, "replicate"),) for i, d in enumerate(t.shape))

    return fs.rule([dims(t, k) for k, t in enumerate(ins)], [dims(t, len(ins) + k) for k, t in enumerate(outs)])


# ---------------------------------------------------------------------------------------------------------------
# The tables: by op name first, then by family.

RULES: dict[str, RuleBuilder] = {
    "matmul": matmul_rule,
    "matmul_nbits": matmul_nbits_rule,
    "matmul_integer": matmul_integer_rule,
    "attention": attention_rule,
    "reduce_sum": reduce_rule("reduction", dtypes=FLOAT_DTYPES | INT_DTYPES),  # a partial sum of bools is no sum
    "reduce_mean": reduce_rule("reduction", _scaled_mean_local, dtypes=FLOAT_DTYPES),
    "reduce_max": reduce_rule("reduction", dtypes=FLOAT_DTYPES | INT_DTYPES, combine="max"),  # all-reduce(max)
    "reduce_min": reduce_rule("reduction", dtypes=FLOAT_DTYPES | INT_DTYPES, combine="min"),
    "reduce_prod": reduce_rule("replicate"),
    "argmax": reduce_rule("replicate"),
    "argmin": reduce_rule("replicate"),
    "softmax": axis_replicated_rule,
    "log_softmax": axis_replicated_rule,
    "cumsum": axis_replicated_rule,
    "cumprod": axis_replicated_rule,
    "topk": topk_rule,
    "layer_norm": normalized_rule,
    "rms_norm": normalized_rule,
    "batch_norm": batch_norm_rule,
    "lrn": channel_replicated_rule,
    "transpose": transpose_rule,
    "reshape": reshape_rule,
    "broadcast_to": elementwise_rule,
    "concat": changed_axes_rule(_axis_attr),
    "split": changed_axes_rule(_axis_attr),
    "slice": changed_axes_rule(_sliced_axes),
    "pad": changed_axes_rule(_padded_axes),
    "tile": changed_axes_rule(_repeated_axes),
    "unpack_int4": unpack_int4_rule,
    "matmul_float8": matmul_float8_rule,
    "gather": gather_rule,
    "gather_matmul": gather_matmul_rule,
    "gather_elements": gather_elements_rule,
    "gather_nd": gather_nd_rule,
    "constant": replicated_rule,
    "scatter_elements": scatter_elements_rule,
    "scatter_nd": scatter_nd_rule,
    "conv": conv_rule,
    "max_pool": pool_rule,
    "avg_pool": pool_rule,
}
FAMILY_RULES: dict[str, RuleBuilder] = {
    "elementwise": elementwise_rule,
    "collective": replicated_rule,
}


def _bind(name: str, build: RuleBuilder):
    """The op-table facet: ``rule(in_types, attrs)`` with output types from the op's own inference."""

    def rule(in_types: Sequence[TensorType], attrs: dict) -> ShardingRule:
        in_types = list(in_types)
        return build(in_types, OPS[name].infer(in_types, attrs), attrs)

    rule.__name__ = rule.__qualname__ = f"{name}_factors"
    rule.__doc__ = build.__doc__
    return rule


def install() -> list[str]:
    """Fill ``OPS[name].factors`` for every op; returns the ops that no table covers (their slot stays None)."""
    missing = []
    for name, op in OPS.items():
        build = RULES.get(name) or FAMILY_RULES.get(op.family)
        if build is None:
            missing.append(name)
        else:
            op.factors = _bind(name, build)
    return missing


def rule_for(op: str, in_types: Sequence[TensorType], attrs: dict) -> ShardingRule:
    """The rule of one application of ``op`` (``attrs`` complete, as stored on IR nodes)."""
    return OPS[op].factors(list(in_types), attrs)


MISSING = install()
