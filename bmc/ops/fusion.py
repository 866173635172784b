"""Graph fusions that make one op of a composition the importer leaves spelled out: attention, a mixture of experts'
products by gathered weights (:func:`fuse_gathered_matmuls`), and a scatter along a middle dim that the dynamo
exporter spells with two transposes (:func:`untranspose_scatters`).

:func:`fuse_attention` finds scaled dot-product attention as every exporter writes it (PyTorch's eager and dynamo
exporters, for GPT-2, BERT, Llama, OPT, ViT, Falcon, BLOOM, T5 and the Llama-likes)::

    s = matmul(q, kt)            q [..., M, D], kt [..., D, N] (the key already transposed)
    s = mul(s, c) | div(s, c)    optional: a scalar constant
    s = mul(tanh(div(s, c)), c)  optional: soft-capping by a positive scalar constant (Gemma 2)
    s = add(s, bias)             optional, up to twice (T5: a position bias, then the mask): broadcasting to s;
                                 where(mask, lowest, s) counts as adding where(mask, lowest, 0) (MPT, DeBERTa)
    p = softmax(s, axis=-1)      or GPT-OSS's sinks: softmax(concat(s, sink) [- its row max], -1)[..., :N] with
                                 sink [..., M, 1] (a logit per head, one more column of every row)
    o = matmul(p, v)             v [..., N, E]

and replaces it by one ``attention(q, kt, v[, bias]) {scale}``, when every intermediate has that single reader
and kt's and v's batch dims are q's or 1 (multi-query attention, as Falcon's export broadcasts one key head).
Grouped-query models (Llama 2 70B and 3, Mistral, Qwen) copy each key/value head to the query heads that share it
before the product (``repeat_kv``: an unsqueeze, an expand or tile, a reshape); the fused op reads the shared heads
instead (its key/value batch dims may divide q's: query head i reads head i // group), so no copy of the keys and
values (a whole cache, each decoding step) is made; an expand of one head to every query head is dropped the same
way (:func:`_shared_heads`). Two
biases become one ``add`` of the two before the attention: ``(s + b1) + b2`` is ``s + (b1 + b2)`` up to rounding
where both are nonzero (a mask's 0 leaves the bias exact; where it hides a key, either sum is a huge negative).
A ``kt`` that is a transpose of the last two dims of ``k [..., N, D]`` (a key or key cache kept as ``[batch, heads,
seq, dim]``) is read as ``k`` (``transpose_k``): no transposed copy. Any other transpose making ``kt`` (the heads
split off ``[b, s, h, d]`` by one ``(0, 2, 3, 1)``) becomes the permute to ``k [..., N, D]``, read the same way:
the kernels read rows of ``k`` contiguously, where a ``kt`` copy scatters single elements. Between the product and the softmax, and
between the softmax and ``@ v``, one reshape may regroup the batch dims (BLOOM multiplies over ``[B * H, ...]`` and
softmaxes over ``[B, H, ...]``): the fused op works in the softmax's batch dims, its operands and the biases added
before the regrouping reshaped into them, its result reshaped back.
Planning then sees no ``[..., M, N]`` score tensor (the memory model and the ILP price the fused op, whose rule
may split the keys: context parallelism, ``bmc.sharding.factors.attention_rule``), the CPU runs one kernel that never stores the scores
(``bmc.cpu.attention``), and other targets lower the same composition again. The fused op's reference runs the
replaced ops' references in order, so fusing changes no reference result.

ONNX's own ``Attention`` body (opset 23, what ``torch.onnx.export(dynamo=True)`` writes for SDPA) follows the
softmax with ``where(fully_masked_rows, 0, p)``; under a constant mask that hides no whole row the importer's
``Where`` converter already drops it (a constant condition false everywhere), so the pattern above remains; a
mask that does hide whole rows is left alone. A scale applied to q and k before their product is simply part of
q and kt. PyTorch's SDPA decomposition (both exporters, a boolean mask) zeroes the probabilities of rows masked
everywhere with ``where(isnan(p), 0, p)``: the fused op is then followed by ``where(isnan(o), 0, o)`` (a row of p
is NaN everywhere or nowhere, so the two agree wherever v is finite).
"""

from __future__ import annotations

import numpy as np

from bmc.ir.graph import Graph, Node, Value
from bmc.ir.passes import eliminate_dead_code
from bmc.ir.types import FLOAT_DTYPES, TensorType, dtype_of, np_dtype
from bmc.ops.registry import OPS, broadcast_shapes


_MASKED = -1e30  # a fill at least this low hides a key: s + fill rounds to fill for any score |s| < 2^75


def _scalar(node: Node | None) -> float | None:
    if node is None or node.op != "constant":
        return None
    value = np.asarray(node.attrs["value"])
    floating = value.dtype.kind == "f" or value.dtype.name == "bfloat16"  # ml_dtypes' bfloat16 is kind "V"
    return float(value.reshape(()).astype(np.float32)) if value.size == 1 and floating else None


def _last_two_swapped(rank: int) -> tuple[int, ...]:
    return tuple(range(rank - 2)) + (rank - 1, rank - 2)


def _last_two_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:-2] + (shape[-1], shape[-2])


def _batch_reshape(node: Node | None) -> bool:
    """A reshape that only regroups the leading (batch) dims: the last two dims stay."""
    if node is None or node.op != "reshape":
        return False
    i, o = node.inputs[0].type.shape, node.outputs[0].type.shape
    return len(i) >= 2 and len(o) >= 2 and i[-2:] == o[-2:]


def _all_but_last_column(node: Node | None) -> bool:
    """A slice keeping all of the last dim but its last entry: ``p[..., :-1]``."""
    if node is None or node.op != "slice" or len(node.attrs["axes"]) != 1:
        return False
    shape = node.inputs[0].type.shape
    size = shape[-1]
    start, end = node.attrs["starts"][0], node.attrs["ends"][0]
    start, end = (x + size if x < 0 else x for x in (start, end))
    return (node.attrs["axes"][0] % len(shape) == len(shape) - 1 and tuple(node.attrs["steps"]) == (1,)
            and start == 0 and min(end, size) == size - 1)


def _shared_heads(x: Value, emit) -> Value:
    """The smaller key or value ``x`` was copied from, when ``x`` only repeats its batch indices: ``repeat_kv`` of
    grouped-query models (``k[:, :, None].expand(b, h, g, n, d).reshape(b, h * g, n, d)``: an unsqueeze, an expand
    or tile, a reshape, repeating each head ``g`` times), or an expand of dims of 1 (one key/value head broadcast
    to every query head); the attention reads that one (its batch dims divide q's) and no copy is made. A scaling by
    a constant scalar or a swap of the last two dims after the copy (ONNX's ``Attention`` body scales the repeated
    key, transposed) is applied to the smaller tensor instead, as is a reshape there and back."""
    node = x.producer
    if node is not None and (node.op in ("mul", "div") and _scalar(node.inputs[1].producer) is not None or
                             node.op == "transpose" and node.attrs["perm"] == _last_two_swapped(x.type.rank)):
        src = node.inputs[0]
        shared = _shared_heads(src, emit)
        if shared is src:
            return x
        shape = shared.type.shape[:-2] + x.type.shape[-2:]
        return emit(node.op, [shared] + node.inputs[1:], shape, **node.attrs)
    while x.producer is not None and x.producer.op in ("reshape", "broadcast_to", "tile"):
        node, shape = x.producer, x.type.shape
        inner = node.inputs[0].producer
        if node.op == "reshape" and inner is not None and inner.op == "reshape" and inner.inputs[0].type.shape == shape:
            x = inner.inputs[0]  # a reshape there and back
            continue
        if node.op != "reshape":  # every query head reading one key/value head
            src = node.inputs[0].type.shape
            if len(src) != len(shape) or src[-2:] != shape[-2:] or any(a not in (1, b) for a, b in zip(src, shape)):
                break
            x = node.inputs[0]
            continue
        rep = node.inputs[0].producer
        if rep is None or rep.op not in ("broadcast_to", "tile"):
            break
        wide, narrow = rep.outputs[0].type.shape, rep.inputs[0].type.shape  # [.., h, g, n, d], [.., h, 1, n, d]
        rank = len(shape)
        dims = [j for j in range(rank - 2) if len(wide) == rank + 1 and wide[:j] + (wide[j] * wide[j + 1],)
                + wide[j + 2:] == shape and narrow == wide[:j + 1] + (1,) + wide[j + 2:]]
        if not dims or rep.op == "tile" and tuple(rep.attrs["repeats"]) != tuple(
                wide[j] if j == dims[0] + 1 else 1 for j in range(rank + 1)):
            break
        j = dims[0]
        heads = shape[:j] + (wide[j],) + shape[j + 1:]
        source = rep.inputs[0].producer
        x = source.inputs[0] if source is not None and source.op == "reshape" and \
            source.inputs[0].type.shape == heads else emit("reshape", [rep.inputs[0]], heads, shape=heads)
    return x


def fuse_attention(graph: Graph) -> Graph:
    users = graph.users()
    outputs = set(map(id, graph.outputs))

    def only_reader(v: Value, node: Node) -> bool:
        return id(v) not in outputs and users.get(v, []) == [node]

    def producer(v: Value, node: Node, *ops: str) -> Node | None:
        """``v``'s producer when it is one of ``ops`` and ``node`` is ``v``'s only reader."""
        p = v.producer
        return p if p is not None and p.op in ops and only_reader(v, node) else None

    def single_reader(v: Value) -> Node | None:
        readers = users.get(v, [])
        return readers[0] if len(readers) == 1 and id(v) not in outputs else None

    def nan_zeroed(v: Value) -> Node | None:
        """The ``where(isnan(v), 0, v)`` that is all that reads ``v``."""
        readers = users.get(v, [])
        isnan = next((r for r in readers if r.op == "isnan"), None)
        where = next((r for r in readers if r.op == "where"), None)
        if id(v) in outputs or len(readers) != 2 or isnan is None or where is None:
            return None
        cond, zero, kept = where.inputs
        ok = (cond is isnan.outputs[0] and single_reader(cond) is where and kept is v
              and _scalar(zero.producer) == 0.0 and where.outputs[0].type == v.type)
        return where if ok else None

    fused: dict[int, list[Node]] = {}  # id(the replaced output matmul) -> the nodes that replace it
    for node in graph.nodes:
        if node.op != "softmax" or node.attrs["axis"] % node.inputs[0].type.rank != node.inputs[0].type.rank - 1:
            continue
        probs = node.outputs[0]
        frame = probs.type.shape[:-2]  # the fused op works in the softmax's batch dims
        start, sink, sink_shift = node, None, False  # the node the chain of the scores feeds, and GPT-OSS's sink
        cut = single_reader(probs)
        if _all_but_last_column(cut):  # softmax(concat(s, sink) [- its row max])[..., :-1]
            x = node.inputs[0]
            sub = producer(x, node, "sub")
            top = sub.inputs[1].producer if sub is not None else None
            if (top is not None and top.op == "reduce_max" and top.inputs[0] is sub.inputs[0]
                    and only_reader(sub.inputs[1], sub) and top.attrs["keepdims"]
                    and tuple(a % x.type.rank for a in top.attrs["axes"]) == (x.type.rank - 1,)
                    and id(sub.inputs[0]) not in outputs and len(users.get(sub.inputs[0], [])) == 2):
                x, sink_shift = sub.inputs[0], True
            cat = x.producer
            if (cat is not None and cat.op == "concat" and len(cat.inputs) == 2
                    and cat.attrs["axis"] % x.type.rank == x.type.rank - 1 and cat.inputs[1].type.shape[-1] == 1
                    and (sink_shift or only_reader(x, node))):
                start, sink, probs = cat, cat.inputs[1], cut.outputs[0]
        zeroed = nan_zeroed(probs) if sink is None else None
        if zeroed is not None:
            probs = zeroed.outputs[0]
        out_mm, p = single_reader(probs), probs
        if _batch_reshape(out_mm):  # BLOOM: the probabilities regrouped [B, H, M, N] -> [B * H, M, N] for bmm
            p = out_mm.outputs[0]
            out_mm = single_reader(p)
        if out_mm is None or out_mm.op != "matmul" or out_mm.inputs[0] is not p:
            continue
        s, top, biases, scale, regrouped = start.inputs[0], start, [], 1.0, False
        while True:  # up from the softmax: up to two biases (T5: position bias, then mask) and one batch reshape
            add = producer(s, top, "add") if len(biases) < 2 else None
            if add is not None:
                a, b = add.inputs
                if b.type.shape == s.type.shape and a.type.shape != s.type.shape:
                    a, b = b, a
                if a.type.shape == s.type.shape:
                    s, top = a, add
                    biases.insert(0, (b, regrouped))
                    continue
            fill = producer(s, top, "where") if len(biases) < 2 else None
            if fill is not None:  # masked_fill(mask, lowest): the same as adding where(mask, lowest, 0)
                cond, a, b = fill.inputs
                for kept, value, when in ((b, a, True), (a, b, False)):
                    lowest = _scalar(value.producer)
                    if kept.type.shape == s.type.shape and lowest is not None and lowest <= _MASKED:
                        s, top = kept, fill
                        biases.insert(0, ((cond, value, when), regrouped))
                        break
                if top is fill:
                    continue
            reshape = producer(s, top, "reshape")
            if not regrouped and _batch_reshape(reshape):
                s, top, regrouped = reshape.inputs[0], reshape, True
                continue
            break
        softcap = 0.0
        cap = producer(s, top, "mul")  # Gemma 2: c * tanh(s / c) between the scaling and the mask
        if cap is not None:
            for th, c in ((cap.inputs[0], _scalar(cap.inputs[1].producer)),
                          (cap.inputs[1], _scalar(cap.inputs[0].producer))):
                tanh = producer(th, cap, "tanh")
                div = producer(tanh.inputs[0], tanh, "div") if tanh is not None else None
                if div is not None and c is not None and c > 0 and _scalar(div.inputs[1].producer) == c:
                    s, top, softcap = div.inputs[0], div, c
                    break
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
        made: list[Node] = []
        tag = node.outputs[0].name

        def emit(op: str, inputs: list[Value], out_shape: tuple[int, ...], out_dtype: str | None = None,
                 **attrs) -> Value:
            dtype = out_dtype or (inputs[-1].type.dtype if inputs else dtype_of(attrs["value"].dtype))
            out = Value(f"{tag}.{len(made)}", TensorType(dtype, out_shape))
            made.append(Node(op, inputs, [out], attrs, node.source))
            return out

        def reframe(x: Value, src: tuple[int, ...]) -> Value | None:
            """``x``, broadcasting against batch dims ``src``, as an operand in ``frame`` (None if it cannot be)."""
            if src == frame:
                return x
            shape = (1,) * (len(src) + 2 - x.type.rank) + x.type.shape
            lead = shape[:-2]
            new = frame + shape[-2:] if lead == src else (1,) * len(frame) + shape[-2:] if set(lead) <= {1} \
                else None
            return None if new is None else emit("reshape", [x], new, shape=new)

        q, kt = qk.inputs
        key, transpose_k = kt, False
        swap = producer(kt, qk, "transpose")
        if swap is not None and tuple(swap.attrs["perm"]) == _last_two_swapped(kt.type.rank):
            key, transpose_k = swap.inputs[0], True  # the kernel reads k [..., N, D] itself
        elif swap is not None:  # heads(k).transpose(-1, -2) as one permute: make the heads [..., N, D] instead
            perm = tuple(swap.attrs["perm"])
            perm = perm[:-2] + (perm[-1], perm[-2])
            key = emit("transpose", [swap.inputs[0]], _last_two_shape(kt.type.shape), perm=perm)
            transpose_k = True
        inner = s.type.shape[:-2]  # the product's batch dims: the frame's, or regrouped
        operands = [reframe(q, inner), reframe(key, inner), reframe(out_mm.inputs[1], p.type.shape[:-2])]
        for b, above in biases:
            if isinstance(b, tuple):  # a fill: where(mask, lowest, 0), or where(mask, 0, lowest)
                cond, value, when = b
                zero = emit("constant", [], (), value=np.zeros((), np_dtype(value.type.dtype)))
                branches = [value, zero] if when else [zero, value]
                b = emit("where", [cond] + branches, broadcast_shapes(cond.type.shape, value.type.shape))
            operands.append(reframe(b, inner if above else frame))
        if any(x is None for x in operands) or not (q.type.rank >= 2 and kt.type.rank == q.type.rank
                                                   and out_mm.inputs[1].type.rank == p.type.rank):
            continue
        q, key, v = operands[:3]
        if not (q.type.shape[:-2] == frame and key.type.rank == v.type.rank == q.type.rank
                and all(d in (1, b) for b, d in zip(frame * 2, key.type.shape[:-2] + v.type.shape[:-2]))):
            continue
        key, v = (_shared_heads(x, emit) for x in (key, v))
        bias = operands[3:]
        if len(bias) == 2:
            bias = [emit("add", bias, broadcast_shapes(bias[0].type.shape, bias[1].type.shape))]
        result = out_mm.outputs[0]
        shape = frame + result.type.shape[-2:]
        attrs = OPS["attention"].check_attrs({"scale": scale, "transpose_k": transpose_k, "softcap": softcap,
                                              "sink": sink is not None, "sink_shift": sink_shift})
        last = ("attention", [q, key, v] + bias + ([sink] if sink is not None else []), attrs)
        if zeroed is not None:  # where(isnan(o), 0, o)
            o = emit(*last[:2], shape, **attrs)
            zero = emit("constant", [], (), value=np.zeros((), np_dtype(o.type.dtype)))
            last = ("where", [emit("isnan", [o], shape, out_dtype="bool"), zero, o], {})
        if shape != result.type.shape:  # back to the regrouped batch dims the model continues with
            last = ("reshape", [emit(*last[:2], shape, **last[2])], {"shape": result.type.shape})
        made.append(Node(*last[:2], [result], last[2], node.source))
        fused[id(out_mm)] = made
    if not fused:
        return graph
    graph.nodes = [m for n in graph.nodes for m in fused.get(id(n), [n])]
    return eliminate_dead_code(graph)


def untranspose_scatters(graph: Graph) -> Graph:
    """``transpose(scatter_nd(transpose(x, P), idx [n, 1], u), P⁻¹)`` → ``scatter_elements(x, idx', u', axis=P[0])``.

    This is how PyTorch's dynamo exporter writes ``cache.index_copy(dim, pos, new)`` (a static key/value cache, as
    Hugging Face's ``StaticCache`` updates it): ``index_put`` on the moved-to-front dim. Two transposes of the whole
    cache a step become none, and the scatter can then write into a donated cache (``--donate``). ``u'`` is ``u``
    moved back (``transpose(u, P⁻¹)``), ``idx'`` the positions broadcast over it along ``P[0]``. Only when each
    intermediate has that one reader and the scatter has no reduction."""
    users = graph.users()
    outputs = set(map(id, graph.outputs))

    def sole(v: Value) -> Node | None:
        readers = users.get(v, [])
        return readers[0] if len(readers) == 1 and id(v) not in outputs else None

    replaced: dict[int, list[Node]] = {}
    dropped: set[int] = set()
    for t1 in graph.nodes:
        if t1.op != "transpose":
            continue
        scatter = sole(t1.outputs[0])
        if scatter is None or scatter.op != "scatter_nd" or scatter.inputs[0] is not t1.outputs[0] \
                or scatter.attrs["reduction"] != "none":
            continue
        t2 = sole(scatter.outputs[0])
        perm = tuple(t1.attrs["perm"])
        inverse = tuple(int(i) for i in np.argsort(perm))
        idx, upd = scatter.inputs[1], scatter.inputs[2]
        if t2 is None or t2.op != "transpose" or tuple(t2.attrs["perm"]) != inverse or idx.type.rank != 2 \
                or idx.type.shape[-1] != 1:
            continue
        x, axis, result = t1.inputs[0], perm[0], t2.outputs[0]
        tag, made = result.name, []

        def emit(op: str, inputs: list[Value], ty: TensorType, **attrs) -> Value:
            out = Value(f"{tag}.{len(made)}", ty)
            made.append(Node(op, inputs, [out], attrs, scatter.source))
            return out

        shape = tuple(upd.type.shape[i] for i in inverse)  # u moved back: the position dim at `axis`
        moved = upd if inverse == tuple(range(len(inverse))) else emit(
            "transpose", [upd], upd.type.with_shape(shape), perm=inverse)
        line = tuple(idx.type.shape[0] if d == axis else 1 for d in range(len(shape)))
        where = emit("broadcast_to", [emit("reshape", [idx], idx.type.with_shape(line), shape=line)],
                     idx.type.with_shape(shape), shape=shape)
        made.append(Node("scatter_elements", [x, where, moved], [result], {"axis": axis, "reduction": "none"},
                         scatter.source))
        replaced[id(t2)] = made
        dropped.update((id(t1), id(scatter)))
    if not replaced:
        return graph
    graph.nodes = [m for n in graph.nodes if id(n) not in dropped for m in replaced.get(id(n), [n])]
    return graph


def _nonnegative(v: Value) -> bool:
    """Whether ``v`` holds indices no lower than 0 by construction: topk's or argmax's, through reshapes."""
    while v.producer is not None and v.producer.op == "reshape":
        v = v.producer.inputs[0]
    p = v.producer
    return p is not None and (p.op in ("argmax", "argmin") or (p.op == "topk" and v is p.outputs[1]))


def fuse_gathered_matmuls(graph: Graph) -> Graph:
    """``matmul(gather(w, idx), x)`` → ``gather_matmul``: a mixture of experts as its batched form is exported.

    Hugging Face's ``batched_mm`` experts (what both PyTorch exporters can write: the default loop over the experts
    that got tokens has data-dependent shapes) gather every routed row's expert weight and multiply batched::

        g = gather(w [E, N, K], idx [...], axis=0)          (or gather_nd(w, idx[..., None]))   g [..., N, K]
        y = matmul(g, x [..., K, 1])                         y [..., N, 1]
        (or w [E, K, N]: y = matmul(x [..., 1, K], g [..., K, N]))

    which copies ``N * K`` weights per row (Mixtral 8x7B: 235 MB a routed token). The fused op reads each row's
    expert weight where it lies. An index the gather would count from the end (negative) is wrapped first, unless
    it comes from topk or argmax; only when the gathered weights have no other reader."""
    users = graph.users()
    outputs = set(map(id, graph.outputs))
    replaced: dict[int, list[Node]] = {}
    indices: dict[tuple[int, int], Value] = {}  # (id(idx), experts) -> the flat, wrapped indices
    for mm in graph.nodes:
        if mm.op != "matmul" or mm.inputs[0].type.dtype not in FLOAT_DTYPES:
            continue
        for side in (0, 1):
            g = mm.inputs[side].producer
            if g is None or g.op not in ("gather", "gather_nd") or id(g.outputs[0]) in outputs \
                    or users.get(g.outputs[0], []) != [mm]:
                continue
            w, idx = g.inputs
            if g.op == "gather" and g.attrs["axis"] in (0, -w.type.rank):
                batch = idx.type.shape
            elif g.op == "gather_nd" and g.attrs["batch_dims"] == 0 and idx.type.shape[-1:] == (1,):
                batch = idx.type.shape[:-1]
            else:
                continue
            x, out = mm.inputs[1 - side], mm.outputs[0]
            if w.type.rank != 3 or not batch:
                continue
            k = w.type.shape[2 if side == 0 else 1]
            if x.type.shape != batch + ((k, 1) if side == 0 else (1, k)) or out.type.shape[:len(batch)] != batch:
                continue
            rows = int(np.prod(batch))
            made: list[Node] = []
            tag = out.name

            def emit(op: str, inputs: list[Value], ty: TensorType, **attrs) -> Value:
                v = Value(f"{tag}.{len(made)}", ty)
                made.append(Node(op, inputs, [v], attrs, mm.source))
                return v

            flat = indices.get((id(idx), w.type.shape[0]))
            if flat is None:  # (one for all the products it routes: an expert layer's two share it)
                flat = emit("reshape", [idx], idx.type.with_shape((rows,)), shape=(rows,))
                if not _nonnegative(idx):
                    it = flat.type
                    zero = emit("constant", [], TensorType(it.dtype, ()), value=np.zeros((), np_dtype(it.dtype)))
                    size = emit("constant", [], TensorType(it.dtype, ()),
                                value=np.asarray(w.type.shape[0], np_dtype(it.dtype)))
                    flat = emit("where", [emit("less", [flat, zero], TensorType("bool", (rows,))),
                                          emit("add", [flat, size], it), flat], it)
                indices[(id(idx), w.type.shape[0])] = flat
            xs = emit("reshape", [x], x.type.with_shape((rows, k)), shape=(rows, k))
            n = w.type.shape[1 if side == 0 else 2]
            y = emit("gather_matmul", [xs, w, flat], out.type.with_shape((rows, n)), transpose_w=side == 0)
            made.append(Node("reshape", [y], [out], {"shape": out.type.shape}, mm.source))
            replaced[id(mm)] = made
            break
    if not replaced:
        return graph
    graph.nodes = [m for n in graph.nodes for m in replaced.get(id(n), [n])]
    return eliminate_dead_code(graph)


def _column_blocks(v: Value, users: dict, outputs: set[int],
                   axis: int = -1) -> list[tuple[int, int, list[Value]]] | None:
    """How ``v`` is read, when it is read only in blocks of dim ``axis`` (default: the last): ``(start, stop, [the
    values holding block [start, stop)])`` by start, blocks disjoint and each a split's part or a slice of that dim
    alone; None otherwise (or for a single block)."""
    rank = v.type.rank
    axis %= rank
    n = v.type.shape[axis]
    blocks: dict[tuple[int, int], list[Value]] = {}
    if id(v) in outputs or not users.get(v):
        return None
    for u in users[v]:
        if u.op == "split" and u.attrs["axis"] % rank == axis:
            edges = np.cumsum((0,) + tuple(u.attrs["sizes"]))
            for a, b, part in zip(edges[:-1], edges[1:], u.outputs):
                blocks.setdefault((int(a), int(b)), []).append(part)
        elif u.op == "slice" and len(u.attrs["axes"]) == 1 and u.attrs["axes"][0] % rank == axis \
                and u.attrs["steps"] == (1,):
            a, b, _ = slice(u.attrs["starts"][0], u.attrs["ends"][0]).indices(n)
            blocks.setdefault((a, max(a, b)), []).append(u.outputs[0])
        else:
            return None
    spans = sorted(blocks)
    if len(spans) < 2 or any(b0 > a1 for (_, b0), (a1, _) in zip(spans, spans[1:])) or any(a == b for a, b in spans):
        return None
    return [(a, b, blocks[(a, b)]) for a, b in spans]


def split_fused_products(graph: Graph, keep=frozenset()) -> Graph:
    """A product by a weight whose result is read only in column blocks → one product per block, by that block of
    the weight (run before sharding: ``bmc.compiler.plan_graph`` on a mesh of several devices).

    Exporters keep fused projections: GPT-2's ``c_attn`` (Q, K and V in one ``[H, 3H]`` weight, then a split),
    Phi-3's ``qkv_proj`` and ``gate_up_proj``, and Hugging Face's batched experts' ``gate_up_proj`` (``[E, 2F, H]``,
    then a chunk into gate and up)::

        y = matmul(x, w [K, N]) | gather_matmul(x, w [E, K, N] | [E, N, K], idx)
        y = add(y, b [N])                     optional
        y = reshape(y, ...)                   any number, the last one's last dim N (so a row stays a row), or
                                              the last one cutting N into [P, ...] (ModernBERT's [3, heads, d])
        parts = split(y, axis=-1) | slice(y, axis=-1) ...   disjoint column blocks (of P: whole parts)

    A mesh splits a weight in contiguous blocks, which for a fused one cross its parts' boundaries: splitting the
    columns (Megatron's column-parallel layout) leaves a device one or two parts, not a block of each, so the split
    needs the columns whole first (a gather or an all-to-all a layer), and Megatron left GPT-2's fused weight whole
    on every device. One product per part splits like any projection. Exact: every column of the result is the same
    dot product. Weights, biases and values named in ``keep`` (annotated ones), and weights read elsewhere too, are
    left alone; the parts' weights are views of the fused one, cut when the artifact is written."""
    from bmc.ir.graph import NameAllocator
    from bmc.ir.tensor import MappedTensor

    users = graph.users()
    outputs = set(map(id, graph.outputs))
    params = {id(p) for p in graph.params}
    names = NameAllocator(v.name for v in graph.values())
    cuts: dict[tuple[int, int, int], Value] = {}
    replaced: dict[int, list[Node]] = {}
    dropped: set[int] = set()

    def cut(x: Value, axis: int, a: int, b: int) -> Value:
        """Parameter ``x``'s block ``[a, b)`` of dim ``axis``."""
        if (id(x), a, b) not in cuts:
            ty = x.type.with_shape(x.type.shape[:axis] + (b - a,) + x.type.shape[axis + 1:])
            index = (slice(None),) * axis + (slice(a, b),)
            q = cuts[(id(x), a, b)] = Value(names(f"{x.name}.cols{a}_{b}"), ty)
            graph.params.append(q)
            graph.weights[q.name] = MappedTensor(graph.weights[x.name], lambda arr, i=index: arr[i], ty,
                                                 f"columns {a}:{b}")
        return cuts[(id(x), a, b)]

    for p in graph.nodes:
        w = p.inputs[1] if p.op in ("matmul", "gather_matmul") else None
        if w is None or id(w) not in params or w.type.rank != (2 if p.op == "matmul" else 3):
            continue
        col = 1 if p.op == "matmul" or p.attrs["transpose_w"] else 2
        v, n, bias, chain = p.outputs[0], p.outputs[0].type.shape[-1], None, []
        while id(v) not in outputs and len(users.get(v, [])) == 1:
            u = users[v][0]
            other = u.inputs[1] if u.op == "add" and u.inputs[0] is v else u.inputs[0]
            if u.op == "add" and bias is None and not chain and id(other) in params and other.type.shape == (n,):
                bias = (u, other)
            elif u.op == "reshape":
                chain.append(u)
            else:
                break
            v = u.outputs[0]
        rows = p.outputs[0].type.shape[:-1]
        if v.type.shape[-1:] == (n,):
            blocks = _column_blocks(v, users, outputs)
        elif v.type.rank > len(rows) + 1 and v.type.shape[:len(rows)] == rows:  # the columns cut as [parts, ...]
            unit = int(np.prod(v.type.shape[len(rows) + 1:]))  # (ModernBERT's view(b, s, 3, h, d), then unbind)
            blocks = [(a * unit, b * unit, parts) for a, b, parts in
                      _column_blocks(v, users, outputs, len(rows)) or []] or None
        else:
            blocks = None
        between = [p] + chain + ([bias[0]] if bias else [])
        fused = [w] + ([bias[1]] if bias else [])
        if blocks is None or any(x.name in keep or len(users[x]) > 1 for x in fused) or \
                any(x.outputs[0].name in keep or id(x) in dropped for x in between):
            continue  # (a weight read elsewhere too would be stored twice)
        made: list[Node] = []
        for a, b, parts in blocks:
            y = Value(names(f"{p.outputs[0].name}.cols{a}_{b}"), p.outputs[0].type.with_shape(
                p.outputs[0].type.shape[:-1] + (b - a,)))
            made.append(Node(p.op, [p.inputs[0], cut(w, col, a, b)] + p.inputs[2:], [y], dict(p.attrs), p.source))
            if bias is not None:
                z = Value(names(f"{bias[0].outputs[0].name}.cols{a}_{b}"), y.type)
                made.append(Node("add", [y, cut(bias[1], 0, a, b)], [z], {}, bias[0].source))
                y = z
            for part in parts:  # (reshaped as the reshapes between reshaped the whole: rows stay rows)
                made.append(Node("reshape", [y], [part], {"shape": part.type.shape}, p.source))
        dropped.update(id(x) for x in between + users[v])
        replaced[id(p)] = made
    if not replaced:
        return graph
    graph.nodes = [m for nd in graph.nodes if id(nd) in replaced or id(nd) not in dropped
                   for m in replaced.get(id(nd), [nd])]
    return eliminate_dead_code(graph)
