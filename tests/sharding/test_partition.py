"""Partitioned programs on the mesh simulator equal the reference interpreter on the global graph.

Random small graphs from the op table on random meshes (1-3 axes, sizes 1-4, plus 8x8) with random valid specs on
inputs and weights; real models with Megatron annotations. float32 tolerance: max abs error <= 1e-4 x max(1, |ref|).
Set BMC_HYPOTHESIS_PROFILE=long for a longer run."""

import collections
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bmc.errors import PlanningError, UsageError
from bmc.frontend.onnx import import_model
from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder
from bmc.sharding.manual import named_strategy
from bmc.sharding.mesh import Mesh
from bmc.sharding.partition import partition
from bmc.sharding.propagate import propagate
from bmc.sharding.spec import Spec
from bmc.testing.localize import first_divergence
from bmc.testing.reference import run_reference
from bmc.testing.spmd_sim import simulate

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("BMC_HYPOTHESIS_PROFILE", "ci")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
TOL = 1e-4


def assert_close(got, want):
    assert got.shape == want.shape
    assert float(np.max(np.abs(got - want))) <= TOL * max(1.0, float(np.max(np.abs(want))))


@st.composite
def meshes(draw):
    if draw(st.integers(0, 9)) == 0:
        return Mesh.parse("8x8")
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    return Mesh.parse("x".join(map(str, sizes)))


@st.composite
def random_spec(draw, shape, mesh):
    dims = [[] for _ in shape]
    for a in draw(st.permutations(mesh.names)):
        d = draw(st.integers(-1, len(shape) - 1))
        if d >= 0:
            dims[d].append(a)
    spec = Spec(tuple(tuple(x) for x in dims))
    for i, n in enumerate(shape):  # drop axes that do not divide
        while n % spec.num_shards(i, mesh):
            spec = spec.with_dim(i, spec.dims[i][:-1])
    return spec


@st.composite
def mlp_block(draw):
    """x[b,s,h] -> LN -> matmul(w1) + b1 -> act -> matmul(w2) -> + x -> softmax | reduce_sum/max/min | reshape |
    transpose."""
    mesh = draw(meshes())
    b, s, h = (draw(st.sampled_from([1, 2, 4, 8])) for _ in range(3))
    f = draw(st.sampled_from([4, 8, 16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    g = GraphBuilder()
    x = g.input("x", TensorType("float32", (b, s, h)))
    params = {
        "ln_g": rng.standard_normal(h).astype(np.float32), "w1": rng.standard_normal((h, f)).astype(np.float32),
        "b1": rng.standard_normal(f).astype(np.float32), "w2": rng.standard_normal((f, h)).astype(np.float32)}
    p = {k: g.param(k, v) for k, v in params.items()}
    y = g.emit1("layer_norm", [x, p["ln_g"]], axis=-1)
    y = g.emit1("add", [g.emit1("matmul", [y, p["w1"]]), p["b1"]])
    y = g.emit1(draw(st.sampled_from(["gelu", "relu", "tanh", "neg"])), [y])
    y = g.emit1("add", [g.emit1("matmul", [y, p["w2"]]), x])
    tail = draw(st.sampled_from(["softmax", "reduce_sum", "reduce_max", "reduce_min", "reshape", "transpose"]))
    if tail == "softmax":
        y = g.emit1("softmax", [y], axis=-1)
    elif tail.startswith("reduce"):
        y = g.emit1(tail, [y], axes=(2,), keepdims=False)
    elif tail == "reshape":
        y = g.emit1("reshape", [y], shape=(b * s, h))
    else:
        y = g.emit1("transpose", [y], perm=(2, 0, 1))
    graph = g.finish([y])
    annotations = {v.name: draw(random_spec(v.type.shape, mesh)) for v in graph.inputs + graph.params
                   if draw(st.booleans())}
    return graph, mesh, annotations, rng.standard_normal((b, s, h)).astype(np.float32)


@settings(settings.get_profile(PROFILE))
@given(mlp_block())
def test_random_graphs_match_the_reference(case):
    graph, mesh, annotations, x = case
    prog = partition(graph, propagate(graph, mesh, annotations))
    res = simulate(prog, {"x": x})
    ref = run_reference(graph, {"x": x})
    for name, want in ref.items():
        assert_close(res.outputs[name], want)
    assert res.replica_error <= TOL * max(1.0, float(np.abs(next(iter(ref.values()))).max()))
    # the plan's byte accounting is what the simulator's collectives moved
    assert res.collective_bytes == [c.bytes for c in prog.collectives]


@pytest.mark.parametrize("op, combine", [("reduce_max", np.max), ("reduce_min", np.min)])
def test_max_over_a_split_dim_is_an_all_reduce(op, combine):
    """A max (min) over a dim split 4 ways: each device reduces its block, then one all-reduce(max) over the axis
    (a scalar per row), not an all-gather of the whole tensor; equal to the reference."""
    g = GraphBuilder()
    x = g.input("x", TensorType("float32", (3, 16)))
    graph = g.finish([g.emit1(op, [g.emit1("neg", [x])], axes=(1,), keepdims=True)])
    mesh = Mesh.parse("4")
    prog = partition(graph, propagate(graph, mesh, {"x": Spec.parse("[{}, {x}]")}))
    [c] = prog.collectives
    # ring all-reduce: each device sends 2 (n - 1) / n of its 3 float32 values
    assert (c.kind, c.reduce, c.axes, c.bytes) == ("all_reduce", op[len("reduce_"):], ("x",), 18)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    res = simulate(prog, {"x": x})
    np.testing.assert_array_equal(res.outputs[graph.outputs[0].name], combine(-x, axis=1, keepdims=True))
    assert res.collective_bytes == [c.bytes]


def fixture(name):
    data = np.load(FIXTURES / f"{name}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("output:")}
    expected = {k[len("output:"):]: data[k] for k in data.files if k.startswith("output:")}
    graph = import_model(FIXTURES / f"{name}.onnx", {k: v.shape for k, v in inputs.items()})
    return graph, inputs, expected


TRANSFORMERS = [f"{m}_{e}" for m in ("gpt2", "bert", "llama", "opt") for e in ("legacy", "dynamo")]


@pytest.mark.parametrize("mesh_text", ["1x4", "2x2"])
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_megatron_on_real_models_matches_onnxruntime(name, mesh_text):
    graph, inputs, expected = fixture(name)
    mesh = Mesh.parse(mesh_text)
    prog = partition(graph, propagate(graph, mesh, named_strategy(graph, "dp+megatron", mesh)))
    res = simulate(prog, inputs)
    for k, want in expected.items():  # the stored onnxruntime outputs
        assert_close(res.outputs[k], want)
    reduces = [c for c in prog.collectives if c.kind == "all_reduce"]
    layers = 2
    b, s = next(iter(inputs.values())).shape
    h = {"llama": 64}.get(name.split("_")[0], 32)
    assert len(reduces) == 2 * layers  # forward Megatron: one after attention, one after the MLP, per layer
    if mesh_text == "2x2":  # batch split over x: each all-reduce carries b/2 * s * h floats
        assert all(c.axes == ("y",) and c.bytes == int(2 * (2 - 1) / 2 * (b // 2) * s * h * 4) for c in reduces)
    # anything else inside the model is mask-sized (BERT's attention mask: one value per token), never an
    # activation
    others = [c for c in prog.collectives if c.node != "output" and c.kind != "all_reduce"]
    assert all(c.bytes <= b * s * 4 for c in others), others


def test_unknown_annotation_lists_near_matches():
    graph, _, _ = fixture("gpt2_dynamo")
    with pytest.raises(UsageError, match="did you mean 'model.transformer.h.0.mlp.c_fc.weight'"):
        propagate(graph, Mesh.parse("2"), {"model.transformer.h.0.mlp.c_fc.weigth": Spec.parse("[{},{x}]")})


def test_indivisible_annotation_names_the_tensor():  # FAILURES.md 21
    graph, _, _ = fixture("gpt2_dynamo")
    with pytest.raises(UsageError, match=r"(?s)tensor 'model.transformer.h.0.mlp.c_fc.weight'.*not divisible by 3"):
        propagate(graph, Mesh.parse("3"), {"model.transformer.h.0.mlp.c_fc.weight": Spec.parse("[{x},{}]")})


def test_invalid_strategy_is_refused_by_the_partitioner():
    g = GraphBuilder()
    x = g.input("x", TensorType("float32", (4, 6)))
    graph = g.finish([g.emit1("softmax", [x], axis=-1)])
    plan = propagate(graph, Mesh.parse("2"), {})
    plan.strategies[0] = ((), ("x",))  # softmax's axis may not be split
    with pytest.raises(PlanningError, match="may not be split"):
        partition(graph, plan)


def test_provenance_is_recorded():
    graph, _, _ = fixture("bert_dynamo")
    mesh = Mesh.parse("2x2")
    plan = propagate(graph, mesh, named_strategy(graph, "dp", mesh))
    assert plan.origins["input_ids"] == "annotation"
    assert plan.origins["last_hidden_state"].startswith("propagated from node")
    assert collections.Counter(o.split(" ")[0] for o in plan.origins.values())["default"] >= 1


def cross_attention_graph(b=2, m=3, n=16, heads=4, kv_heads=4, d=8, e=16, mask=True, seed=0, keys_out=False):
    """Rows of a decoder ``x [b, m, e]`` attending to a long memory ``[b, n, e]`` (``kv_heads`` key/value heads:
    1 is multi-query), with a padding mask ``[b, 1, 1, n]`` (0 or -inf) and an output projection; returns the
    graph and its inputs (batch 0's last 5 keys masked: a block of them entirely on 4 devices). ``keys_out``:
    the keys' heads are an output too, ``keys`` (a cache a decoder returns)."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder()
    x, mem = g.input("x", TensorType("float32", (b, m, e))), g.input("memory", TensorType("float32", (b, n, e)))
    w = {k: g.param(k, (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32))
         for k, s in (("wq", (e, heads * d)), ("wk", (e, kv_heads * d)), ("wv", (e, kv_heads * d)),
                      ("wo", (heads * d, e)))}

    def heads_of(t, w, h, rows, name=None):
        return g.emit1("transpose", [g.emit1("reshape", [g.emit1("matmul", [t, w])], shape=(b, rows, h, d))],
                       name, perm=(0, 2, 1, 3))

    operands = [heads_of(x, w["wq"], heads, m), heads_of(mem, w["wk"], kv_heads, n, "keys" if keys_out else None),
                heads_of(mem, w["wv"], kv_heads, n)]
    feeds = {"x": rng.standard_normal((b, m, e)).astype(np.float32),
             "memory": rng.standard_normal((b, n, e)).astype(np.float32)}
    if mask:
        operands.append(g.input("mask", TensorType("float32", (b, 1, 1, n))))
        feeds["mask"] = np.zeros((b, 1, 1, n), np.float32)
        feeds["mask"][0, ..., n - 5:] = -np.inf
    a = g.emit1("attention", operands, scale=d ** -0.5, transpose_k=True)
    merged = g.emit1("reshape", [g.emit1("transpose", [a], perm=(0, 2, 1, 3))], shape=(b, m, heads * d))
    return g.finish([g.emit1("matmul", [merged, w["wo"]], "y")] + operands[1:2] * keys_out), feeds


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "grouped-query", "multi-query"])
@pytest.mark.parametrize("mesh_text", ["4", "2x2"])
def test_context_parallel_attention_over_a_split_memory(mesh_text, kv_heads):
    """Context parallelism: the memory's sequence dim split over x, so each device attends to its block of the
    keys (keys and values are never gathered) and the blocks combine by their rows' log-sum-exps (an all-reduce
    max and an all-reduce sum of one float per query row), then one all-reduce of the partial output; on 2x2 the
    batch is split over y too. Equal to the reference; the byte accounting is what the simulator moved."""
    graph, feeds = cross_attention_graph(kv_heads=kv_heads)
    mesh = Mesh.parse(mesh_text)
    batch = ("y",) if "y" in mesh.names else ()
    plan = propagate(graph, mesh, {"memory": Spec((batch, ("x",), ())), "mask": Spec((batch, (), (), ("x",))),
                                   "x": Spec((batch, (), ()))})
    prog = partition(graph, plan)
    res = simulate(prog, feeds)
    ref = run_reference(graph, feeds)
    assert_close(res.outputs["y"], ref["y"])
    assert res.collective_bytes == [c.bytes for c in prog.collectives]
    assert not any(c.kind == "all_gather" for c in prog.collectives if c.node != "output")
    reduces = [(c.reduce, c.bytes) for c in prog.collectives if c.kind == "all_reduce"]
    keys, local_batch = mesh.axis("x").size, 2 // (mesh.axis("y").size if batch else 1)
    ring = 2 * (keys - 1) / keys * local_batch * 4 * 3 * 4  # of (batch x heads x query rows) floats
    assert reduces[:2] == [("max", int(ring)), ("sum", int(ring))]
    assert len(reduces) == 3  # and the partial output's


@pytest.mark.parametrize("heads, kv_heads, mesh_text, view", [
    (4, 2, "4", {"x": (2, 2)}), (8, 2, "2x4", {"y": (2, 2)}), (8, 4, "8", {"x": (4, 2)}), (4, 4, "4", {}),
    (4, 1, "4", {})], ids=["2-of-4", "2-of-2x4", "4-of-8", "mha", "multi-query"])
def test_megatron_views_the_mesh_for_fewer_key_value_heads(heads, kv_heads, mesh_text, view):
    """Grouped-query attention with fewer key/value heads than Megatron's axis has devices (2 over 4): the axis is
    planned as its view, a major part of as many devices as key/value heads by the rest, and the key/value
    projections split over the major part (each device computes and holds the one head its query heads read),
    where on the mesh itself they stay whole; still one all-reduce, equal to the reference, and cheaper by the cost
    model (less compute, fewer weight bytes). With as many heads as devices, or one, the mesh is kept."""
    from bmc.sharding.cost import DEVICES, plan_cost
    from bmc.sharding.manual import manual_plan

    graph, feeds = cross_attention_graph(heads=heads, kv_heads=kv_heads, b=2)
    mesh = Mesh.parse(mesh_text)
    name = "dp+megatron" if len(mesh.axes) == 2 else "megatron"
    plan = manual_plan(graph, name, mesh)
    last = mesh.names[-1]
    if not view:
        assert plan.mesh == mesh
    else:
        major, minor = view[last]
        assert plan.mesh.shape == mesh.shape[:-1] + (major, minor)
        assert plan.mesh.parts() == {last: (f"{last}_0", f"{last}_1")}
        for w in ("wk", "wv"):
            assert plan.specs[w] == Spec(((), (f"{last}_0",)))
        assert plan.specs["wq"] == Spec(((), (f"{last}_0", f"{last}_1")))
        on_mesh = propagate(graph, mesh, named_strategy(graph, name, mesh))
        assert on_mesh.specs["wk"] == Spec(((), ()))
        viewed, plain = (plan_cost(graph, p, DEVICES["h100"]) for p in (plan, on_mesh))
        assert viewed.total_s < plain.total_s and viewed.memory.weight_bytes < plain.memory.weight_bytes
    prog = partition(graph, plan)
    assert [c.kind for c in prog.collectives] == ["all_reduce"] + ["all_gather"] * (name == "dp+megatron")  # (dp:
    # the batch of y gathered at the end)
    assert_close(simulate(prog, feeds).outputs["y"], run_reference(graph, feeds)["y"])


def test_a_whole_key_output_keeps_megatron_on_the_mesh_unless_laid_out_on_the_view():
    """The keys' heads returned as an output (a decoder's cache): returned whole, the view would gather them, so
    Megatron stays on the mesh (keys computed whole, nothing but the all-reduce); returned split over the view's
    major part (``--output-shard keys=[{}, {x_0}, {}, {}]``) each device returns its one head, again with only the
    all-reduce; split over the whole axis, which 2 heads cannot be, the error names the view's parts."""
    from bmc.compiler import plan_graph
    from bmc.sharding.manual import manual_plan

    graph, feeds = cross_attention_graph(kv_heads=2, keys_out=True)
    ref = run_reference(graph, feeds)
    assert manual_plan(graph, "megatron", Mesh.parse("4")).mesh == Mesh.parse("4")
    prog, data = plan_graph(graph, mesh="4", strategy="megatron", output_shards={"keys": "[{}, {x_0}, {}, {}]"})
    assert data["mesh"] == {"axes": ["x_0", "x_1"], "shape": [2, 2], "parts": {"x": ["x_0", "x_1"]}}
    assert [c.kind for c in prog.collectives] == ["all_reduce"]
    res = simulate(prog, feeds)
    assert_close(res.outputs["y"], ref["y"])
    assert_close(res.outputs["keys"], ref["keys"])
    with pytest.raises(UsageError, match=r"(?s)not divisible by 4.*view of the mesh has x as x_0 \(2, major\) by x_1 \(2\)"):
        plan_graph(graph, mesh="4", strategy="megatron", output_shards={"keys": "[{}, {x}, {}, {}]"})


@pytest.mark.parametrize("kv_heads, split", [(1, "n"), (8, "b1")], ids=["multi-query", "mha"])
def test_the_ilp_splits_the_keys_of_a_long_multi_query_memory(kv_heads, split):
    """4 rows attending to a 64k-token memory on 4 devices: with one key/value head (nothing else to split the
    keys' projection by) the automatic plan splits the keys, with 8 it splits the heads; the key split's only
    collectives are the two per-row all-reduces and the output's."""
    from bmc.sharding.auto import auto_plan
    from bmc.sharding.partition import rule_of

    graph, _ = cross_attention_graph(b=1, m=4, n=65536, heads=8, kv_heads=kv_heads, d=64, e=512, mask=False)
    plan, _ = auto_plan(graph, Mesh.parse("4"), time_limit_s=10)
    (i, att), = [(i, n) for i, n in enumerate(graph.nodes) if n.op == "attention"]
    rule = rule_of(att)
    assert {f.name for f, axes in zip(rule.factors, plan.strategies[i]) if axes} == {split}
    if split == "n":
        kinds = [(c.kind, c.reduce) for c in partition(graph, plan).collectives]
        assert kinds == [("all_reduce", "max"), ("all_reduce", "sum"), ("all_reduce", "sum")]


# ---- expert parallelism ------------------------------------------------------------------------------------------

def expert_layer_graph(*, other_index=False, rows_mixed=False, seed=0):
    """x @ w1[idx] -> sigmoid -> @ w2[idx]: an expert layer whose activation is not 0 at 0 (a device's rows that no
    local expert takes are not zero after it, so only a product routed the same way may read them unreduced);
    ``other_index``: the second product routed by other indices; ``rows_mixed``: the activation is also softmaxed
    over the rows (not row-wise)."""
    b = GraphBuilder("moe")
    rows, experts, h, f = 6, 4, 8, 5
    x = b.input("x", TensorType("float32", (rows, h)))
    idx = b.input("idx", TensorType("int64", (rows,)))
    w1 = b.input("w1", TensorType("float32", (experts, f, h)))
    w2 = b.input("w2", TensorType("float32", (experts, h, f)))
    second = b.input("idx2", TensorType("int64", (rows,))) if other_index else idx
    a = b.emit1("sigmoid", [b.emit1("gather_matmul", [x, w1, idx], transpose_w=True)])
    y = b.emit1("gather_matmul", [a, w2, second], transpose_w=True)
    outs = [y, b.emit1("softmax", [a], axis=0)] if rows_mixed else [y]
    graph = b.finish(outs)
    r = np.random.default_rng(seed)
    feeds = {v.name: r.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs
             if v.type.dtype == "float32"}
    feeds["idx"] = np.array([0, 3, 1, 3, 2, 0], np.int64)
    if other_index:
        feeds["idx2"] = np.array([1, 3, 0, 2, 2, 1], np.int64)
    return graph, feeds


@pytest.mark.parametrize("case, reduces", [({}, 1), ({"other_index": True}, 2), ({"rows_mixed": True}, 2)],
                         ids=["one-all-reduce", "other-routing", "rows-mixed"])
def test_expert_parallel_layer_reduces_once(case, reduces):
    """The experts split over x (each device holds 2 of 4): each device computes the rows routed to its experts;
    between the layer's two products routed by the same indices no all-reduce is needed (the second reads only
    those rows), otherwise it stays. Equal to the reference either way."""
    graph, feeds = expert_layer_graph(**case)
    mesh = Mesh.parse("2")
    split = Spec((("x",), (), ()))
    prog = partition(graph, propagate(graph, mesh, {"w1": split, "w2": split}))
    res = simulate(prog, feeds)
    ref = run_reference(graph, feeds)
    for k, want in ref.items():
        assert_close(res.outputs[k], want)
    assert [c.kind for c in prog.collectives] == ["all_reduce"] * reduces
    assert prog.graph.op_counts()["all_reduce"] == reduces
    assert res.collective_bytes == [c.bytes for c in prog.collectives]
    # the values read unreduced (exact on each device's routed rows only) are not taken for a divergence
    assert first_divergence(prog, feeds, run_reference(graph, feeds, keep=True), 1e-5) is None


@pytest.mark.parametrize("mesh_text", ["1x4", "2x2"])
@pytest.mark.parametrize("name", ["mixtral_legacy", "mixtral_dynamo", "qwenmoe_dynamo", "dsv3_dynamo"])
def test_megatron_with_expert_parallel_matches_onnxruntime(name, mesh_text):
    """dp+megatron on mixtures of experts (Megatron-LM's layout): attention tensor parallel, each expert layer
    split by its experts over the last axis (1 of 4 experts a device on 1x4, 2 on 2x2), the router left whole (and
    Qwen's per-token shared-expert gate, a [1, H] weight); only the second product of each expert layer is
    all-reduced, after the tokens' k rows are summed (and, in Qwen and DeepSeek, added to the shared expert's partial
    sum): one all-reduce after attention and one after the expert layer (DeepSeek's first: the dense MLP), per
    layer. Planned as a compile plans (fused projections split into their parts)."""
    from bmc.compiler import import_graph
    from bmc.ops.fusion import split_fused_products

    data = np.load(FIXTURES / f"{name}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("output:")}
    graph = split_fused_products(import_graph(FIXTURES / f"{name}.onnx", {k: v.shape for k, v in inputs.items()}))
    mesh = Mesh.parse(mesh_text)
    prog = partition(graph, propagate(graph, mesh, named_strategy(graph, "dp+megatron", mesh)))
    products = [n for n in graph.nodes if n.op == "gather_matmul"]
    assert all(prog.param_specs[n.inputs[1].name] == Spec((("y",), (), ())) for n in products)
    res = simulate(prog, inputs)
    assert_close(res.outputs["logits"], data["output:logits"])
    reduces = [c for c in prog.collectives if c.kind == "all_reduce"]
    assert not {c.value for c in reduces} & {n.outputs[0].name for n in products}
    assert all(c.axes == ("y",) for c in reduces)
    assert len(reduces) == 2 * 2 and {graph.value(c.value).type.shape for c in reduces} <= {(2, 16, 64), (32, 64)}
    if name.startswith("dsv3"):  # its latent attention's low-rank projections whole: no other collective in a layer
        assert [c.kind for c in prog.collectives if c.node != "output"] == ["all_reduce"] * 4


@pytest.mark.parametrize("name", ["gemma2_dynamo", "phi3_dynamo", "neox_dynamo", "olmo2_dynamo"])
def test_megatron_on_decoders_unlike_llama_matches_onnxruntime(name):
    """dp+megatron on 2x2 for decoders whose layers differ from Llama's: Gemma 2's soft-capped (fused) attention
    and norms after each sublayer, Phi-3's fused QKV and gate/up
    projections cut by slices (split into one product a part first, as a compile does), GPT-NeoX's partial rotary
    embedding with parallel attention and MLP, and OLMo 2's RMSNorm over the whole query and key projections
    (those projections stay column-parallel: the norm's mean of squares is all-reduced, one float a row). Each
    is one all-reduce after attention and one after the MLP per layer, over y, of the batch's half of the
    activations, no other collective inside the model (but OLMo 2's statistics), every 2-D weight split but the
    embedding, and matches onnxruntime."""
    from bmc.compiler import import_graph
    from bmc.ops.fusion import split_fused_products

    data = np.load(FIXTURES / f"{name}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("output:")}
    graph = split_fused_products(import_graph(FIXTURES / f"{name}.onnx", {k: v.shape for k, v in inputs.items()}))
    mesh = Mesh.parse("2x2")
    prog = partition(graph, propagate(graph, mesh, named_strategy(graph, "dp+megatron", mesh)))
    res = simulate(prog, inputs)
    assert_close(res.outputs["logits"], data["output:logits"])
    inside = [c for c in prog.collectives if c.node != "output"]
    assert all(c.kind == "all_reduce" and c.axes == ("y",) for c in inside)
    shapes = collections.Counter(graph.value(c.value).type.shape for c in inside)
    assert shapes == {(2, 16, 32): 4, **({(2, 16, 1): 4} if name.startswith("olmo2") else {})}
    assert res.collective_bytes == [c.bytes for c in prog.collectives]
    whole = [p.name for p in graph.params if p.type.rank == 2 and prog.param_specs[p.name].is_replicated()]
    assert len(whole) == 1  # the embedding


@pytest.mark.parametrize("mesh_text", ["1x4", "2x4"])
@pytest.mark.parametrize("name", ["llama_dynamo", "llama_legacy"])
def test_megatron_splits_query_heads_beyond_the_key_value_heads(name, mesh_text):
    """Llama's fused attention reads 2 key/value heads for its 4 query heads. Split 4 ways, the key/value
    projections stay whole (their 2 heads do not divide by 4) and each device's query head reads its key/value
    head from them: attention runs on a quarter of the heads with nothing gathered (before, q was all-gathered and
    every device computed attention whole). One all-reduce after attention, one after the MLP; equal to
    onnxruntime."""
    from bmc.compiler import import_graph
    from bmc.ops.fusion import split_fused_products

    data = np.load(FIXTURES / f"{name}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("output:")}
    graph = split_fused_products(import_graph(FIXTURES / f"{name}.onnx", {k: v.shape for k, v in inputs.items()}))
    attention = [n for n in graph.nodes if n.op == "attention"]
    assert [(n.inputs[0].type.shape[1], n.inputs[1].type.shape[1]) for n in attention] == [(4, 2)] * 2
    mesh = Mesh.parse(mesh_text)
    plan = propagate(graph, mesh, named_strategy(graph, "dp+megatron", mesh))
    assert all(plan.specs[n.inputs[0].name].dims[1] == ("y",) for n in attention)
    prog = partition(graph, plan)
    res = simulate(prog, inputs)
    assert_close(res.outputs["logits"], data["output:logits"])
    inside = [c for c in prog.collectives if c.node != "output"]
    assert [c.kind for c in inside] == ["all_reduce"] * 4 and all(c.axes == ("y",) for c in inside)


@pytest.mark.parametrize("mesh_text, heads_split", [("2", True), ("4", False)])
def test_megatron_splits_gpt2s_fused_qkv_by_heads(mesh_text, heads_split, monkeypatch):
    """Planned on a mesh, GPT-2's fused QKV is one product a part (``split_fused_products``), so Megatron splits
    the Q, K and V weights column-parallel: a device holds its heads' third of each, less than the fused weight
    whole, with the same collectives (one all-reduce after attention, one after the MLP). Its 2 heads do not
    divide by 4: there the projections stay whole and attention runs on every device, as before. Equal to
    onnxruntime."""
    from bmc.compiler import plan_model
    from bmc.ops import fusion

    _, inputs, outputs = fixture("gpt2_dynamo")
    shapes = {k: v.shape for k, v in inputs.items()}
    graph, prog, data = plan_model(FIXTURES / "gpt2_dynamo.onnx", mesh=mesh_text, strategy="megatron",
                                   input_shapes=shapes)
    cuts = {k: s for k, s in prog.param_specs.items() if "c_attn" in k}
    assert len(cuts) == 2 * 3 * 2 and all(".cols" in k for k in cuts)  # 2 layers, q/k/v, weight and bias
    assert all((s.axes() == ("x",)) == heads_split for s in cuts.values())
    assert_close(simulate(prog, inputs).outputs["logits"], outputs["logits"])
    monkeypatch.setattr(fusion, "split_fused_products", lambda g, keep=(): g)
    _, fused, fused_data = plan_model(FIXTURES / "gpt2_dynamo.onnx", mesh=mesh_text, strategy="megatron",
                                      input_shapes=shapes)
    assert [(c.kind, c.bytes) for c in prog.collectives] == [(c.kind, c.bytes) for c in fused.collectives]
    assert [c.kind for c in prog.collectives].count("all_reduce") == 2 * 2
    mine, theirs = (d["memory"]["weight_bytes_per_device"] for d in (data, fused_data))
    assert mine < theirs if heads_split else mine == theirs


def test_megatron_leaves_a_fused_product_whole_when_a_part_is_narrower_than_the_axis():
    """A product split into parts one of which has fewer columns than devices (Qwen3-Next's per-head gates beside
    its projections, 2 columns on 4 devices): Megatron used to annotate each part split over the axis, a usage error
    on a valid model; it now leaves that product whole, and the plan equals the reference. (Planned from the
    graph as written: ``plan_graph`` would first make it one product a part.)"""
    rng = np.random.default_rng(0)
    b = GraphBuilder("gates")
    x = b.input("x", TensorType("float32", (2, 5, 8)))
    y = b.emit1("matmul", [x, b.param("w", rng.standard_normal((8, 12)).astype(np.float32))])
    wide, narrow = b.emit("split", [y], axis=-1, sizes=(10, 2))  # 12 columns divide by 4; the parts do not
    out = b.emit1("matmul", [wide, b.param("w2", rng.standard_normal((10, 8)).astype(np.float32))])
    graph = b.finish([out, b.emit1("tanh", [narrow], "gate")])
    mesh = Mesh.parse("4")
    specs = named_strategy(graph, "megatron", mesh)
    assert not any(name.startswith("split") for name in specs), specs
    prog = partition(graph, propagate(graph, mesh, specs))
    feeds = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    want = run_reference(graph, feeds)
    got = simulate(prog, feeds).outputs
    for key in want:
        assert_close(got[key], want[key])


# ---- pending sums through linear ops -----------------------------------------------------------------------------

def parallel_residual_graph(*, bias=False, seed=0):
    """x + mlp(x) + mlp'(x), each a column- then row-parallel pair (GPT-J's parallel attention and MLP, Qwen-MoE's
    routed and shared experts); ``bias``: the second products add a bias (not linear: the sums cannot merge)."""
    b = GraphBuilder("parallel")
    rows, h, f = 8, 8, 16
    x = b.input("x", TensorType("float32", (rows, h)))
    branches = []
    for k in range(2):
        w1 = b.input(f"w1_{k}", TensorType("float32", (h, f)))
        w2 = b.input(f"w2_{k}", TensorType("float32", (f, h)))
        y = b.emit1("matmul", [b.emit1("gelu", [b.emit1("matmul", [x, w1])]), w2])
        if bias:
            y = b.emit1("add", [y, b.input(f"b_{k}", TensorType("float32", (h,)))])
        branches.append(y)
    gate = b.emit1("sigmoid", [b.emit1("reduce_mean", [x], axes=(1,), keepdims=True)])
    graph = b.finish([b.emit1("add", [x, b.emit1("sub", [branches[0], b.emit1("mul", [gate, branches[1]])])])])
    r = np.random.default_rng(seed)
    return graph, {v.name: r.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}


@pytest.mark.parametrize("mesh_text", ["2", "2x2"])
@pytest.mark.parametrize("bias", [False, True], ids=["merged", "biased"])
def test_partial_sums_of_parallel_branches_are_reduced_once(bias, mesh_text):
    """Two row-parallel products whose partial sums are combined linearly (one gated by a per-row value that every
    device of the axis holds) are all-reduced once, after the combination; a bias after each product keeps both
    all-reduces. Equal to the reference, with the partial intermediates compared as sums."""
    graph, feeds = parallel_residual_graph(bias=bias)
    mesh = Mesh.parse(mesh_text)
    tp = mesh.names[-1]
    ann = {f"w1_{k}": Spec(((), (tp,))) for k in range(2)} | {f"w2_{k}": Spec(((tp,), ())) for k in range(2)}
    if len(mesh.shape) == 2:
        ann["x"] = Spec((("x",), ()))
    prog = partition(graph, propagate(graph, mesh, ann))
    res = simulate(prog, feeds)
    assert_close(res.outputs[graph.outputs[0].name], run_reference(graph, feeds)[graph.outputs[0].name])
    reduces = [c for c in prog.collectives if c.kind == "all_reduce"]
    assert len(reduces) == (2 if bias else 1) and all(c.axes == (tp,) for c in reduces)
    if not bias:
        assert reduces[0].value == graph.nodes[-2].outputs[0].name  # the sub, before the residual add
    assert res.collective_bytes == [c.bytes for c in prog.collectives]
    assert first_divergence(prog, feeds, run_reference(graph, feeds, keep=True), 1e-5) is None


def test_an_all_reduce_then_a_block_of_it_is_a_reduce_scatter():
    """A row-parallel product's partial sum, kept whole by the node after it (as an ILP's follower of the product
    keeps it) and cut to each device's rows by the next (a local slice): the all-reduce moves down to the slice
    and the two become one reduce-scatter (half the bytes). Equal to the reference, intermediates summed."""
    from bmc.sharding.partition import rule_of

    b = GraphBuilder("scatter")
    a = b.input("a", TensorType("float32", (8, 16)))
    w = b.input("w", TensorType("float32", (16, 6)))
    p = b.input("p", TensorType("float32", (8, 6)))
    y = b.emit1("reshape", [b.emit1("matmul", [a, w])], shape=(8, 6, 1))
    graph = b.finish([b.emit1("mul", [b.emit1("reshape", [y], shape=(8, 6)), p])])
    plan = propagate(graph, Mesh.parse("4"), {"a": Spec(((), ("x",))), "w": Spec((("x",), ())),
                                              "p": Spec((("x",), ()))})
    for i, node in enumerate(graph.nodes):  # the reshapes whole, the product partial, the mul split by rows
        plan.strategies[i] = tuple(("x",) if (node.op, f.name) in (("matmul", "k"), ("mul", "d0")) else ()
                                   for f in rule_of(node).factors)
    prog = partition(graph, plan)
    third = 3 * 8 * 6 * 4 // 4  # (n - 1) / n of the product's bytes (an all-reduce: twice that)
    assert [(c.kind, c.bytes) for c in prog.collectives] == [("reduce_scatter", third), ("all_gather", third)]
    r = np.random.default_rng(2)
    feeds = {v.name: r.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    res = simulate(prog, feeds)
    ref = run_reference(graph, feeds, keep=True)
    assert_close(res.outputs[graph.outputs[0].name], ref[graph.outputs[0].name])
    assert res.collective_bytes == [c.bytes for c in prog.collectives]
    assert first_divergence(prog, feeds, ref, 1e-5) is None


@st.composite
def linear_branches(draw):
    """Two products ``x @ w`` (whose contraction random specs may split: partial sums), each through a random chain
    of linear ops (reshape, transpose, neg, a product with or a division by a broadcast operand, a sum over a dim,
    a slice), added or subtracted where their shapes allow, then maybe a tanh; random specs on every input."""
    mesh = draw(meshes())
    rows, k, cols = 4, 12, 6
    g = GraphBuilder("linear")
    x = g.input("x", TensorType("float32", (rows, k)))
    ends = []
    for branch in range(2):
        y = g.emit1("matmul", [x, g.input(f"w{branch}", TensorType("float32", (k, cols)))])
        for step in range(draw(st.integers(0, 3))):
            op = draw(st.sampled_from(["neg", "transpose", "reshape", "mul", "div", "reduce_sum", "slice"] if branch
                                      == 0 else ["neg", "mul", "div"]))
            r, c = y.type.shape
            if op in ("mul", "div"):
                shape = draw(st.sampled_from([(1, c), (r, 1), (r, c)]))
                operand = g.input(f"{op[0]}{branch}_{step}", TensorType("float32", shape))
                y = g.emit1(op, [operand, y] if op == "mul" and draw(st.booleans()) else [y, operand])
            elif op == "neg":
                y = g.emit1("neg", [y])
            elif op == "transpose":
                y = g.emit1("transpose", [y], perm=(1, 0))
            elif op == "reshape":
                y = g.emit1("reshape", [y], shape=(c, r))
            elif op == "reduce_sum":
                y = g.emit1("reduce_sum", [y], axes=(draw(st.integers(0, 1)),), keepdims=True)
            elif c > 1:
                y = g.emit1("slice", [y], starts=(0,), ends=(c // 2,), axes=(1,), steps=(1,))
        ends.append(y)
    a, b = (e.type.shape for e in ends)
    if all(p == q or 1 in (p, q) for p, q in zip(a, b)):
        ends = [g.emit1(draw(st.sampled_from(["add", "sub"])), ends)]
    if draw(st.booleans()):
        ends[0] = g.emit1("tanh", [ends[0]])
    graph = g.finish(ends)
    annotations = {v.name: draw(random_spec(v.type.shape, mesh)) for v in graph.inputs if draw(st.booleans())}
    r = np.random.default_rng(draw(st.integers(0, 2**16)))
    feeds = {v.name: r.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    feeds |= {n: np.abs(a) + 0.5 for n, a in feeds.items() if n.startswith("d")}
    return graph, mesh, annotations, feeds


@settings(settings.get_profile(PROFILE))
@given(linear_branches())
def test_moving_reduces_past_linear_ops_keeps_the_values(case):
    """Random partial sums through random linear ops on random meshes: equal to the reference, every intermediate
    equal as a sum of its shards, bytes as recorded, and never more collectives or bytes than without the moves."""
    from bmc.sharding import partition as partitioner

    graph, mesh, annotations, feeds = case
    plan = propagate(graph, mesh, annotations)
    prog = partition(graph, plan)
    res = simulate(prog, feeds)
    ref = run_reference(graph, feeds, keep=True)
    for v in graph.outputs:
        assert_close(res.outputs[v.name], ref[v.name])
    assert res.collective_bytes == [c.bytes for c in prog.collectives]
    assert first_divergence(prog, feeds, ref, 1e-4) is None
    with pytest.MonkeyPatch.context() as m:
        m.setattr(partitioner, "_sink_reduces", lambda prog, em: None)
        unmoved = partition(graph, plan).collectives
    assert len(prog.collectives) <= len(unmoved)
    assert sum(c.bytes for c in prog.collectives) <= sum(c.bytes for c in unmoved)


@pytest.mark.parametrize("weights", ["whole", "split"])
def test_a_partial_sum_is_reduced_where_it_is_smallest(weights):
    """A Mixtral-style combine: each token's k = 4 rows of a row-parallel product, weighted and summed. The partial
    sum is all-reduced after the sum (a quarter of the bytes, into the output) when every device holds the same
    weights; weights that differ along the axis (each device its block of the tokens) keep it before them (a
    reduce-scatter into those blocks)."""
    b = GraphBuilder("combine")
    tokens, k, h, f = 4, 4, 8, 16
    a = b.input("a", TensorType("float32", (tokens * k, f)))
    w = b.input("w", TensorType("float32", (f, h)))
    p = b.input("p", TensorType("float32", (tokens, k, 1)))
    rows = b.emit1("reshape", [b.emit1("matmul", [a, w])], shape=(tokens, k, h))
    graph = b.finish([b.emit1("reduce_sum", [b.emit1("mul", [rows, p])], axes=(1,), keepdims=False)])
    r = np.random.default_rng(1)
    feeds = {v.name: r.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    ann = {"a": Spec(((), ("x",))), "w": Spec((("x",), ()))}
    if weights == "split":
        ann["p"] = Spec((("x",), (), ()))
    prog = partition(graph, propagate(graph, Mesh.parse("2"), ann))
    res = simulate(prog, feeds)
    assert_close(res.outputs[graph.outputs[0].name], run_reference(graph, feeds)[graph.outputs[0].name])
    reduce = prog.collectives[0]  # (then, split, the output's all-gather)
    full = tokens * k * h * 4  # bytes of the product; an all-reduce sends 2 (n - 1) / n of them, a scatter half that
    assert (reduce.kind, reduce.bytes) == (("all_reduce", full // k) if weights == "whole" else
                                           ("reduce_scatter", full // 2))
    assert res.collective_bytes == [c.bytes for c in prog.collectives]
    assert first_divergence(prog, feeds, run_reference(graph, feeds, keep=True), 1e-5) is None
