"""``fuse_attention``: which compositions become one ``attention`` op, and that fusing changes no result."""

import numpy as np
import pytest

from bmc.compiler import import_graph
from bmc.frontend.onnx import import_model
from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder
from bmc.ops.fusion import fuse_attention
from bmc.testing.reference import run_reference
from tests.frontend.test_models import FIXTURES, MODELS, load_case

LAYERS = {"xattn_legacy": 1, "xattn_dynamo": 1}  # attention layers: 2 in the others (llama_dynamo23's through
# ONNX's Attention body); the cross-attention block's SDPA zeroes rows masked everywhere (where(isnan(p), 0, p))
# fixtures whose attention is left spelled out, and why
# two biases are added to each other first: equal up to rounding (bmc/ops/fusion.py)
TWO_BIASES = {"t5enc_dynamo", "bloom_dynamo", "deberta_dynamo"}
# key/value heads the fused attention reads: the Llama exports' repeat_kv copies are dropped (2 heads for q's 4;
# llama_dynamo23's ONNX Attention body scales and transposes the repeated key: done to the 2 heads instead),
# Falcon's one; Mixtral's grouped-query attention as Llama's
KV_HEADS = {"llama_legacy": 2, "llama_dynamo": 2, "llama_dynamo23": 2, "falcon_dynamo": 1, "mixtral_legacy": 2,
            "mixtral_dynamo": 2, "qwenmoe_dynamo": 2, "gemma2_dynamo": 2, "phi3_dynamo": 2,
            "olmo2_dynamo": 2, "gptoss_dynamo": 2}
SOFTCAP = {"gemma2_dynamo": 50.0}  # Gemma 2's attention logit soft-capping


@pytest.mark.parametrize("name", MODELS)
def test_fixture_attention_is_fused_and_the_reference_is_unchanged(name):
    inputs, _ = load_case(name)
    shapes = {k: v.shape for k, v in inputs.items()}
    plain = import_model(FIXTURES / f"{name}.onnx", shapes)
    before = run_reference(plain, inputs)
    fused = import_graph(FIXTURES / f"{name}.onnx", shapes)
    counts = fused.op_counts()
    layers = LAYERS.get(name, 2)
    assert counts.get("attention", 0) == layers
    assert counts.get("softmax", 0) == plain.op_counts()["softmax"] - layers
    for node in (n for n in fused.nodes if n.op == "attention"):
        q, k, v = (x.type.shape for x in node.inputs[:3])
        assert k[1] == v[1] == KV_HEADS.get(name, q[1])
        assert node.attrs["softcap"] == SOFTCAP.get(name, 0.0)
    after = run_reference(fused, inputs)
    for key, want in before.items():
        if name in TWO_BIASES:
            np.testing.assert_allclose(after[key], want, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(after[key], want)  # the fused reference runs the replaced references


def _scores_graph(*, scale_op="mul", bias=True, extra_reader=False, batch_q=(2, 3), batch_k=(2, 3), batch_v=(2, 3),
                  rows_zeroed=None, position_bias=False, softcap=None):
    b = GraphBuilder("attn")
    q = b.input("q", TensorType("float32", batch_q + (4, 8)))
    kt = b.input("kt", TensorType("float32", batch_k + (8, 6)))
    v = b.input("v", TensorType("float32", batch_v + (6, 5)))
    s = b.emit1("matmul", [q, kt])
    if scale_op:
        s = b.emit1(scale_op, [s, b.constant(np.float32(0.5))])
    if softcap is not None:  # Gemma 2: c * tanh(s / c), the inner and outer constants given apart
        inner, outer = softcap
        s = b.emit1("mul", [b.constant(np.float32(outer)),
                            b.emit1("tanh", [b.emit1("div", [s, b.constant(np.float32(inner))])])])
    if position_bias:  # T5: a position bias per head, then the mask
        s = b.emit1("add", [s, b.input("position", TensorType("float32", (1, 3, 4, 6)))])
    if bias:
        s = b.emit1("add", [b.input("mask", TensorType("float32", (2, 1, 4, 6))), s])
    p = b.emit1("softmax", [s], axis=-1)
    if rows_zeroed is not None:  # ONNX Attention's `where(fully_masked_rows, 0, p)`
        p = b.emit1("where", [b.constant(np.asarray(rows_zeroed).reshape(1, 1, 4, 1)), b.constant(np.float32(0)), p])
    outs = [b.emit1("matmul", [p, v], "out")]
    if extra_reader:
        outs.append(b.emit1("reduce_sum", [p], axes=(-1,), keepdims=False))
    return b.finish(outs)


@pytest.mark.parametrize("scale_op,bias", [("mul", True), ("div", True), (None, True), ("mul", False), (None, False)])
def test_spellings_that_fuse(scale_op, bias):
    graph = _scores_graph(scale_op=scale_op, bias=bias)
    rng = np.random.default_rng(0)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    want = run_reference(graph, feeds)["out"]
    fused = fuse_attention(graph)
    (node,) = fused.nodes
    assert node.op == "attention" and len(node.inputs) == (4 if bias else 3)
    assert node.attrs["scale"] == {"mul": 0.5, "div": 2.0, None: 1.0}[scale_op]
    np.testing.assert_allclose(run_reference(fused, feeds)["out"], want, rtol=1e-6, atol=1e-7)


def test_soft_capped_scores_fuse_and_compile():
    """``c * tanh(s / c)`` between the scaling and the mask becomes the op's ``softcap``: the same reference, and
    the compiled CPU kernel within float32 rounding; other constants inside and outside are not a soft cap (and
    not a scale either), so nothing fuses."""
    from bmc.testing.compiled import run_compiled

    graph = _scores_graph(softcap=(1.5, 1.5))
    rng = np.random.default_rng(2)
    feeds = {v.name: (rng.standard_normal(v.type.shape) * 3).astype(np.float32) for v in graph.inputs}
    want = run_reference(graph, feeds)["out"]
    (node,) = fuse_attention(graph).nodes
    assert node.op == "attention" and node.attrs["softcap"] == 1.5 and node.attrs["scale"] == 0.5
    fused = fuse_attention(_scores_graph(softcap=(1.5, 1.5)))
    np.testing.assert_array_equal(run_reference(fused, feeds)["out"], want)
    np.testing.assert_allclose(run_compiled(fused, feeds)["out"], want, rtol=1e-5, atol=1e-5)
    assert "attention" not in fuse_attention(_scores_graph(softcap=(1.5, 2.0))).op_counts()


def _sinks_graph(*, shift: bool, first: int = 0, last: int = -1):
    """GPT-OSS's attention: ``softmax(concat(s, sink) [- its row max])[..., first:last] @ v``."""
    b = GraphBuilder("sinks")
    q = b.input("q", TensorType("float32", (2, 4, 5, 8)))
    kt = b.input("kt", TensorType("float32", (2, 4, 8, 6)))
    v = b.input("v", TensorType("float32", (2, 4, 6, 3)))
    s = b.emit1("mul", [b.emit1("matmul", [q, kt]), b.constant(np.float32(0.5))])
    s = b.emit1("add", [s, b.input("mask", TensorType("float32", (1, 1, 5, 6)))])
    c = b.emit1("concat", [s, b.input("sink", TensorType("float32", (2, 4, 5, 1)))], axis=-1)
    if shift:
        c = b.emit1("sub", [c, b.emit1("reduce_max", [c], axes=(-1,), keepdims=True)])
    p = b.emit1("slice", [b.emit1("softmax", [c], axis=-1)], starts=(first,), ends=(last,), axes=(3,), steps=(1,))
    return b.finish([b.emit1("matmul", [p, v], "out")])


@pytest.mark.parametrize("shift", [True, False], ids=["shifted", "plain"])
def test_attention_sinks_fuse_and_compile(shift):
    """The sink's column of the softmax dropped before ``@ v`` (with or without the row max taken off first) is the
    op's ``sink`` operand: the same reference bit for bit, the compiled CPU kernel (its log-sum-exp form) within
    float32 rounding, a row masked everywhere 0; a slice keeping another column than the sink's does not fuse."""
    from bmc.testing.compiled import run_compiled

    rng = np.random.default_rng(4)
    graph = _sinks_graph(shift=shift)
    feeds = {v.name: (rng.standard_normal(v.type.shape) * 2).astype(np.float32) for v in graph.inputs}
    feeds["mask"] = np.where(np.tril(np.ones((5, 6), bool), 1), 0, -np.inf).astype(np.float32).reshape(1, 1, 5, 6)
    feeds["mask"][..., 3, :] = -np.inf
    want = run_reference(graph, feeds)["out"]
    assert np.all(want[:, :, 3] == 0)
    fused = fuse_attention(_sinks_graph(shift=shift))
    (node,) = fused.nodes
    assert node.op == "attention" and len(node.inputs) == 5 and node.attrs["sink"]
    assert node.attrs["sink_shift"] == shift and node.attrs["scale"] == 0.5
    np.testing.assert_array_equal(run_reference(fused, feeds)["out"], want)
    np.testing.assert_allclose(run_compiled(fused, feeds)["out"], want, rtol=1e-5, atol=1e-6)
    assert "attention" not in fuse_attention(_sinks_graph(shift=shift, first=1, last=7)).op_counts()


def test_a_transposed_key_is_read_in_place():
    """``q @ transpose(k)`` with k ``[..., N, D]`` (a key cache's layout): the transpose is absorbed."""
    b = GraphBuilder("attn")
    q, k, v = (b.input(n, TensorType("float32", s)) for n, s in (("q", (2, 4, 8)), ("k", (2, 6, 8)), ("v", (2, 6, 5))))
    s = b.emit1("matmul", [q, b.emit1("transpose", [k], perm=(0, 2, 1))])
    graph = b.finish([b.emit1("matmul", [b.emit1("softmax", [s], axis=-1), v], "out")])
    feeds = {n: np.random.default_rng(1).standard_normal(x.type.shape).astype(np.float32)
             for n, x in zip("qkv", graph.inputs)}
    want = run_reference(graph, feeds)["out"]
    fused = fuse_attention(graph)
    (node,) = fused.nodes
    assert node.attrs["transpose_k"] and node.inputs[1].name == "k"
    np.testing.assert_allclose(run_reference(fused, feeds)["out"], want, rtol=1e-6, atol=1e-7)


def test_a_key_permuted_straight_to_kt_becomes_k():
    """``heads(k).transpose(-1, -2)`` written as one permute ``(0, 2, 3, 1)`` of ``[b, s, h, d]`` (the GPU benchmark's
    stack): fused with the permute to ``k [b, h, s, d]`` (``(0, 2, 1, 3)``, rows the kernels read contiguously) and
    ``transpose_k``; equal to the composition, compiled too."""
    from bmc.testing.compiled import run_compiled

    b = GraphBuilder("attn")
    q = b.input("q", TensorType("float32", (2, 3, 4, 8)))
    k = b.input("k", TensorType("float32", (2, 6, 3, 8)))
    v = b.input("v", TensorType("float32", (2, 3, 6, 5)))
    s = b.emit1("matmul", [q, b.emit1("transpose", [k], perm=(0, 2, 3, 1))])
    graph = b.finish([b.emit1("matmul", [b.emit1("softmax", [s], axis=-1), v], "out")])
    rng = np.random.default_rng(4)
    feeds = {x.name: rng.standard_normal(x.type.shape).astype(np.float32) for x in graph.inputs}
    want = run_reference(graph, feeds)["out"]
    fused = fuse_attention(graph)
    perm, att = fused.nodes
    assert perm.op == "transpose" and perm.attrs["perm"] == (0, 2, 1, 3) and perm.outputs[0].type.shape == (2, 3, 6, 8)
    assert att.op == "attention" and att.attrs["transpose_k"] and att.inputs[1] is perm.outputs[0]
    np.testing.assert_allclose(run_reference(fused, feeds)["out"], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(run_compiled(fused, feeds)["out"], want, rtol=1e-5, atol=1e-5)


def test_spellings_left_alone():
    assert "attention" not in fuse_attention(_scores_graph(extra_reader=True)).op_counts()  # the probabilities are read
    # q broadcasts against a larger key batch: the output is not q's shape
    assert "attention" not in fuse_attention(_scores_graph(batch_q=(1, 3))).op_counts()
    # a row really zeroed (its mask hides every key): not the plain composition
    assert "attention" not in fuse_attention(_scores_graph(rows_zeroed=[False, True, False, False])).op_counts()


@pytest.mark.parametrize("spelling", ["multi_query", "position_bias"])
def test_multi_query_and_two_biases_fuse_and_compile(spelling):
    """One key/value head broadcast over q's heads (Falcon), and a position bias plus a mask (T5): fused, equal to
    the composition's reference (two biases are added first: equal up to rounding), and the compiled native kernel
    (the key and value broadcast to q's heads for it) equal to both."""
    from bmc.testing.compiled import run_compiled

    kw = {"batch_k": (2, 1), "batch_v": (2, 1)} if spelling == "multi_query" else {"position_bias": True}
    graph = _scores_graph(**kw)
    rng = np.random.default_rng(2)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    want = run_reference(graph, feeds)["out"]
    fused = fuse_attention(graph)
    assert [n.op for n in fused.nodes] == (["attention"] if spelling == "multi_query" else ["add", "attention"])
    np.testing.assert_allclose(run_reference(fused, feeds)["out"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run_compiled(fused, feeds)["out"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling", ["expand", "tile", "expand-5d-input", "one-head-expanded", "onnx-attention"])
def test_repeated_key_value_heads_are_read_shared(spelling):
    """Grouped-query attention as the exporters write Llama's ``repeat_kv`` (2 key/value heads for 6 query heads):
    ``k[:, :, None]`` (a reshape), an expand (or a tile), a reshape to q's heads; the fused op reads the 2 heads
    themselves (query head i reads i // 3), the copies are gone, and both the reference and the compiled native
    kernel equal the composition. One head expanded to every query head (multi-query) is read the same way, and
    so is ONNX's ``Attention`` body (a reshape there and back after the copy, then the key transposed and scaled:
    both done to the 2 heads instead)."""
    from bmc.codegen.relax_module import to_relax
    from bmc.testing.compiled import run_compiled

    b = GraphBuilder("gqa")
    heads, kv, n, d = 6, 1 if spelling == "one-head-expanded" else 2, 7, 8
    q = b.input("q", TensorType("float32", (2, heads, 4, d)))

    def repeat_kv(name):
        if spelling == "one-head-expanded":
            x = b.input(name, TensorType("float32", (2, 1, n, d)))
            return b.emit1("broadcast_to", [x], shape=(2, heads, n, d))
        if spelling == "expand-5d-input":  # no reshape above the expand to read instead: one is made
            x = b.input(name, TensorType("float32", (2, kv, 1, n, d)))
        else:
            x = b.emit1("reshape", [b.input(name, TensorType("float32", (2, kv, n, d)))], shape=(2, kv, 1, n, d))
        g = heads // kv
        x = b.emit1("tile", [x], repeats=(1, 1, g, 1, 1)) if spelling == "tile" else \
            b.emit1("broadcast_to", [x], shape=(2, kv, g, n, d))
        return b.emit1("reshape", [x], shape=(2, heads, n, d))

    k, v = repeat_kv("k"), repeat_kv("v")
    if spelling == "onnx-attention":
        k = b.emit1("reshape", [b.emit1("reshape", [k], shape=(2, heads, 1, n, d))], shape=(2, heads, n, d))
        root = b.constant(np.float32(d ** -0.25))
        kt = b.emit1("mul", [b.emit1("transpose", [k], perm=(0, 1, 3, 2)), root])
        s = b.emit1("matmul", [b.emit1("mul", [q, root]), kt])
    else:
        s = b.emit1("mul", [b.emit1("matmul", [q, b.emit1("transpose", [k], perm=(0, 1, 3, 2))]),
                            b.constant(np.float32(d ** -0.5))])
    graph = b.finish([b.emit1("matmul", [b.emit1("softmax", [s], axis=-1), v], "out")])
    rng = np.random.default_rng(5)
    feeds = {x.name: rng.standard_normal(x.type.shape).astype(np.float32) for x in graph.inputs}
    want = run_reference(graph, feeds)["out"]
    fused = fuse_attention(graph)
    assert not {"tile", "broadcast_to"} & set(fused.op_counts())
    (att,) = [n for n in fused.nodes if n.op == "attention"]
    transposed = spelling != "onnx-attention"
    assert att.inputs[1].type.shape == ((2, kv, n, d) if transposed else (2, kv, d, n))
    assert att.inputs[2].type.shape == (2, kv, n, d) and att.attrs["transpose_k"] == transposed
    np.testing.assert_array_equal(run_reference(fused, feeds)["out"], want)
    np.testing.assert_allclose(run_compiled(fused, feeds)["out"], want, rtol=1e-5, atol=1e-5)
    # the GPU's composition: each key/value head's query heads are rows of one product with it, nothing repeated
    script = to_relax(fused, "cuda").script()
    assert "R.repeat" not in script and f"R.shape([2, {kv}, {heads // kv * 4}, {d}])" in script


def test_a_repeat_that_is_not_of_whole_heads_stays():
    """Tiling the heads (head i reads i % 2, not i // 3: ``k.repeat(1, 3, 1, 1)``) is not grouped-query sharing:
    the copy stays and the attention reads it."""
    b = GraphBuilder("tiled")
    q = b.input("q", TensorType("float32", (2, 6, 4, 8)))
    k, v = (b.emit1("reshape", [b.emit1("tile", [b.emit1("reshape", [b.input(n, TensorType("float32", (2, 2, 7, 8)))],
                                                          shape=(2, 1, 2, 7, 8))], repeats=(1, 3, 1, 1, 1))],
                    shape=(2, 6, 7, 8)) for n in "kv")
    s = b.emit1("matmul", [q, b.emit1("transpose", [k], perm=(0, 1, 3, 2))])
    graph = b.finish([b.emit1("matmul", [b.emit1("softmax", [s], axis=-1), v], "out")])
    fused = fuse_attention(graph)
    (att,) = [n for n in fused.nodes if n.op == "attention"]
    assert att.inputs[1].type.shape == (2, 6, 7, 8) and fused.op_counts()["tile"] == 2


def test_regrouped_batch_dims_fuse_and_compile():
    """BLOOM's spelling: ``bmm`` over [B * H, M, N] with ALiBi added there, the scores regrouped to [B, H, M, N] for
    the mask and the softmax, and back for the second ``bmm``. Fused in the softmax's dims (q, k, v and ALiBi
    reshaped, the output reshaped back); equal to the composition, compiled too."""
    from bmc.testing.compiled import run_compiled

    bsz, heads, m, d = 2, 3, 5, 4
    b = GraphBuilder("bloom")
    q, k, v = (b.input(n, TensorType("float32", (bsz * heads, m, d))) for n in "qkv")
    alibi = b.input("alibi", TensorType("float32", (bsz * heads, 1, m)))
    mask = b.input("mask", TensorType("float32", (bsz, 1, m, m)))
    s = b.emit1("add", [b.emit1("mul", [b.emit1("matmul", [q, b.emit1("transpose", [k], perm=(0, 2, 1))]),
                                        b.constant(np.float32(0.5))]), alibi])
    s = b.emit1("add", [b.emit1("reshape", [s], shape=(bsz, heads, m, m)), mask])
    p = b.emit1("reshape", [b.emit1("softmax", [s], axis=-1)], shape=(bsz * heads, m, m))
    graph = b.finish([b.emit1("matmul", [p, v], "out")])
    rng = np.random.default_rng(3)
    feeds = {x.name: rng.standard_normal(x.type.shape).astype(np.float32) for x in graph.inputs}
    want = run_reference(graph, feeds)["out"]
    fused = fuse_attention(graph)
    ops = [n.op for n in fused.nodes]
    assert ops.count("attention") == 1 and "softmax" not in ops and ops[-1] == "reshape"
    (att,) = [n for n in fused.nodes if n.op == "attention"]
    assert att.inputs[0].type.shape == (bsz, heads, m, d) and att.attrs["transpose_k"]
    np.testing.assert_allclose(run_reference(fused, feeds)["out"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run_compiled(fused, feeds)["out"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lowest, fused", [(-3.4028235e38, True), (-np.inf, True), (-1e4, False)])
def test_a_masked_fill_is_a_bias(lowest, fused):
    """``masked_fill(mask, lowest)`` before the softmax (MPT, DeBERTa) is ``+ where(mask, lowest, 0)`` when the fill
    is so low that any score plus it rounds to it: fused, bit for bit the composition. A fill of -1e4 is not."""
    b = GraphBuilder("fill")
    q, kt, v = (b.input(n, TensorType("float32", s)) for n, s in (("q", (2, 4, 8)), ("kt", (2, 8, 6)),
                                                                  ("v", (2, 6, 5))))
    mask = b.constant(np.triu(np.ones((4, 6), bool), 1))
    s = b.emit1("where", [mask, b.constant(np.float32(lowest)), b.emit1("matmul", [q, kt])])
    graph = b.finish([b.emit1("matmul", [b.emit1("softmax", [s], axis=-1), v], "out")])
    feeds = {x.name: np.random.default_rng(4).standard_normal(x.type.shape).astype(np.float32) for x in graph.inputs}
    want = run_reference(graph, feeds)["out"]
    result = fuse_attention(graph)
    assert ("attention" in result.op_counts()) == fused
    np.testing.assert_array_equal(run_reference(result, feeds)["out"], want)


def _sdpa_graph(probs_read: bool = False):
    """PyTorch's SDPA decomposition with a boolean mask hiding row 2 of batch 1 everywhere."""
    b = GraphBuilder("sdpa")
    q, kt, v = (b.input(n, TensorType("float32", s)) for n, s in (("q", (2, 4, 8)), ("kt", (2, 8, 6)),
                                                                  ("v", (2, 6, 5))))
    keep = np.ones((2, 4, 6), bool)
    keep[1, 2] = False
    bias = b.emit1("where", [b.constant(keep), b.constant(np.float32(0)), b.constant(np.float32(-np.inf))])
    p = b.emit1("softmax", [b.emit1("add", [b.emit1("matmul", [q, kt]), bias])], axis=-1)
    p = b.emit1("where", [b.emit1("isnan", [p]), b.constant(np.float32(0)), p], "probs")
    return b.finish([b.emit1("matmul", [p, v], "out")] + ([p] if probs_read else []))


def test_sdpa_zeroing_of_masked_rows_fuses():
    """PyTorch's SDPA with a boolean mask, as both exporters write it: ``where(isnan(p), 0, p)`` after the softmax
    zeroes the rows the mask hides everywhere (-inf). Fused into ``attention`` followed by ``where(isnan(o), 0, o)``:
    bit for bit the composition (a hidden row is 0, the others unchanged), compiled too. A NaN-zeroing that
    something else also reads is left alone."""
    from bmc.testing.compiled import run_compiled

    graph = _sdpa_graph()
    feeds = {x.name: np.random.default_rng(5).standard_normal(x.type.shape).astype(np.float32) for x in graph.inputs}
    with np.errstate(invalid="ignore"):
        want = run_reference(graph, feeds)["out"]
        fused = fuse_attention(graph)
        assert fused.op_counts()["attention"] == 1 and "softmax" not in fused.op_counts()
        np.testing.assert_array_equal(run_reference(fused, feeds)["out"], want)
    assert not want[1, 2].any() and np.isfinite(want).all()
    np.testing.assert_allclose(run_compiled(fused, feeds)["out"], want, rtol=1e-5, atol=1e-5)
    assert "attention" not in fuse_attention(_sdpa_graph(probs_read=True)).op_counts()


# ---- gathered expert weights (fuse_gathered_matmuls) -----------------------------------------------------------

def _experts_graph(*, transposed=True, nd=False, extra_reader=False, routed_by_topk=False):
    """Hugging Face's batched experts: each row's expert weight gathered, then a batched product with the row."""
    b = GraphBuilder("moe")
    rows, experts, n, k = 6, 4, 5, 3
    w = b.input("w", TensorType("float32", (experts, n, k) if transposed else (experts, k, n)))
    x = b.input("x", TensorType("float32", (rows, k, 1) if transposed else (rows, 1, k)))
    if routed_by_topk:
        logits = b.input("logits", TensorType("float32", (rows // 2, experts)))
        idx = b.emit1("reshape", [b.emit("topk", [logits], k=2)[1]], shape=(rows,))
    else:
        idx = b.input("idx", TensorType("int64", (rows,)))
    if nd:
        g = b.emit1("gather_nd", [w, b.emit1("reshape", [idx], shape=(rows, 1))], batch_dims=0)
    else:
        g = b.emit1("gather", [w, idx], axis=0)
    y = b.emit1("matmul", [g, x] if transposed else [x, g])
    graph = b.finish([y, g] if extra_reader else [y])
    r = np.random.default_rng(3)
    feeds = {v.name: r.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs if v.name != "idx"}
    if not routed_by_topk:
        feeds["idx"] = np.array([2, -1, 0, 2, -4, 3], np.int64)  # negative: counted from the end, as Gather does
    return graph, feeds


@pytest.mark.parametrize("nd", [False, True], ids=["gather", "gather_nd"])
@pytest.mark.parametrize("transposed", [True, False], ids=["w[E,N,K]", "w[E,K,N]"])
def test_gathered_expert_weights_become_one_gather_matmul(transposed, nd):
    from bmc.ops.fusion import fuse_gathered_matmuls

    graph, feeds = _experts_graph(transposed=transposed, nd=nd)
    before = run_reference(graph, feeds)
    fused = fuse_gathered_matmuls(graph)
    counts = fused.op_counts()
    assert counts["gather_matmul"] == 1 and "gather" not in counts and "gather_nd" not in counts
    assert counts["where"] == 1  # the negative indices wrapped
    (node,) = [n for n in fused.nodes if n.op == "gather_matmul"]
    assert node.attrs["transpose_w"] == transposed and node.inputs[1].name == "w"  # the weights where they lie
    after = run_reference(fused, feeds)
    for key, want in before.items():
        np.testing.assert_array_equal(after[key], want)  # the fused reference runs the replaced matmul


def test_topk_indices_are_not_wrapped_and_a_gather_read_elsewhere_stays():
    from bmc.ops.fusion import fuse_gathered_matmuls

    graph, feeds = _experts_graph(routed_by_topk=True)
    fused = fuse_gathered_matmuls(graph)
    assert fused.op_counts()["gather_matmul"] == 1 and "where" not in fused.op_counts()
    graph, _ = _experts_graph(extra_reader=True)  # the gathered weights are an output too: nothing to save
    assert "gather_matmul" not in fuse_gathered_matmuls(graph).op_counts()


@pytest.mark.parametrize("name, layers", [("mixtral_legacy", 2), ("mixtral_dynamo", 2), ("qwenmoe_dynamo", 2),
                                          ("dsv3_dynamo", 1)])
def test_expert_layers_read_their_weights_in_place(name, layers):
    """The MoE fixtures (batched_mm experts; DeepSeek-V3's first layer is dense): each expert layer's two products
    are gather_matmuls sharing one index vector (topk's: not wrapped); no [rows, N, K] copy of the weights is
    left."""
    inputs, _ = load_case(name)
    fused = import_graph(FIXTURES / f"{name}.onnx", {k: v.shape for k, v in inputs.items()})
    products = [n for n in fused.nodes if n.op == "gather_matmul"]
    assert len(products) == 2 * layers and len({id(n.inputs[2]) for n in products}) == layers
    assert "where" not in {n.op for n in fused.nodes if n.outputs[0] in {p.inputs[2] for p in products}}
    assert all(n.inputs[0].type.rank < 3 for n in fused.nodes if n.op in ("gather", "gather_nd"))  # embeddings


# ---- fused projections -------------------------------------------------------------------------------------------

FUSED = {"gpt2_legacy": ("split", 2), "gpt2_dynamo": ("split", 2), "mixtral_legacy": ("slice", 4),
         "mixtral_dynamo": ("split", 2), "qwenmoe_dynamo": ("split", 2), "dsv3_dynamo": ("split", 3)}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_projections_become_one_product_a_part(name):
    """GPT-2's fused QKV, the batched experts' gate_up and DeepSeek-V3's latent projections: every split (or pair
    of slices) of a product by a weight goes, each part its own product by its block of the weight (a view, equal
    to the fused weight's columns), with the reference unchanged."""
    from bmc.ops.fusion import split_fused_products

    inputs, _ = load_case(name)
    graph = import_graph(FIXTURES / f"{name}.onnx", {k: v.shape for k, v in inputs.items()})
    before, counts = run_reference(graph, inputs), graph.op_counts()
    weights = {p.name: graph.weights[p.name] for p in graph.params}
    graph = split_fused_products(graph)
    op, gone = FUSED[name]
    assert graph.op_counts().get(op, 0) == counts[op] - gone
    cuts = [p for p in graph.params if p.name not in weights]
    assert cuts and all(graph.weights[p.name].describe().startswith("columns") for p in cuts)
    for p in cuts:
        base, cols = p.name.rsplit(".cols", 1)
        a, b = map(int, cols.split("_"))
        whole = weights[base].numpy()
        axis = next(d for d, (m, n) in enumerate(zip(p.type.shape, whole.shape)) if m != n)
        np.testing.assert_array_equal(graph.weights[p.name].numpy(), np.take(whole, np.arange(a, b), axis=axis))
    after = run_reference(graph, inputs)
    for key, want in before.items():
        np.testing.assert_allclose(after[key], want, rtol=1e-6, atol=1e-6)


def test_a_product_read_whole_or_annotated_stays_fused():
    from bmc.ops.fusion import split_fused_products

    b = GraphBuilder()
    x = b.input("x", TensorType("float32", (4, 8)))
    w = b.param("w", np.arange(8 * 6, dtype=np.float32).reshape(8, 6))
    y = b.emit1("matmul", [x, w])
    first, second = b.emit("split", [y], axis=1, sizes=(3, 3))
    graph = b.finish([first, second])
    assert split_fused_products(graph, keep={"w"}).op_counts()["matmul"] == 1  # annotated: left as written
    assert split_fused_products(graph).op_counts()["matmul"] == 2
    b = GraphBuilder()
    x = b.input("x", TensorType("float32", (4, 8)))
    y = b.emit1("matmul", [x, b.param("w", np.ones((8, 6), np.float32))])
    graph = b.finish(b.emit("split", [y], axis=1, sizes=(3, 3)) + [b.emit1("tanh", [y])])
    assert split_fused_products(graph).op_counts()["matmul"] == 1  # the whole result is read too
    b = GraphBuilder()
    x = b.input("x", TensorType("float32", (4, 8)))
    w = b.param("w", np.ones((8, 6), np.float32))
    graph = b.finish(b.emit("split", [b.emit1("matmul", [x, w])], axis=1, sizes=(3, 3))
                     + [b.emit1("matmul", [b.emit1("neg", [x]), w])])
    assert split_fused_products(graph).op_counts()["matmul"] == 2  # the weight is read elsewhere: not stored twice


@pytest.mark.parametrize("major", [True, False], ids=["parts-major", "parts-per-head"])
def test_columns_cut_into_parts_by_a_reshape_split_by_part(major):
    """ModernBERT's ``Wqkv(x).view(b, s, 3, h, d).unbind(2)``: slices of the parts dim of a reshape that cuts the
    columns as ``[3, h, d]`` are column blocks, one product a part, the same reference; cut as ``[h, 3, d]``
    (BLOOM's per-head interleaving) a part is no column block and nothing is split."""
    from bmc.ops.fusion import split_fused_products

    rng = np.random.default_rng(5)
    b = GraphBuilder()
    x = b.input("x", TensorType("float32", (2, 5, 8)))
    y = b.emit1("matmul", [x, b.param("w", rng.standard_normal((8, 24)).astype(np.float32))])
    y = b.emit1("reshape", [y], shape=(2, 5, 3, 2, 4) if major else (2, 5, 2, 3, 4))
    axis = 2 if major else 3
    parts = [b.emit1("reshape", [b.emit1("slice", [y], starts=(i,), ends=(i + 1,), axes=(axis,), steps=(1,))],
                     shape=(2, 5, 2, 4) if major else (2, 5, 2, 4)) for i in range(3)]
    graph = b.finish(parts)
    feeds = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    want = run_reference(graph, feeds)
    split = split_fused_products(graph)
    assert split.op_counts()["matmul"] == (3 if major else 1)
    for key, got in run_reference(split, feeds).items():
        np.testing.assert_allclose(got, want[key], rtol=1e-6, atol=1e-6)
