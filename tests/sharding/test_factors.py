"""Factor rules of every op, checked against the reference interpreter by the rule checker.

Float results are compared with atol 1e-5 * max(1, max|reference|); integer and bool results exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bmc.sharding.factors as factors
from bmc.ir.types import TensorType, dtype_of
from bmc.ops import OPS
from bmc.sharding.factors import rule_for
from bmc.sharding.mesh import Mesh
from bmc.sharding.rules import Factor, factor_of_dim
from bmc.sharding.spec import Spec
from bmc.testing.rule_checker import (all_valid_assignments, check_rule, invalid_reason, random_assignments,
                                      structure_problems)
from tests.ops.cases import CASES

MESHES = ("2", "2x2", "2x3")
CASE_IDS = [f"{i}-{op}" for i, (op, _, _) in enumerate(CASES)]


def types_of(inputs):
    return [TensorType(dtype_of(a.dtype), a.shape) for a in inputs]


def rule_of(op, inputs, attrs):
    return rule_for(op, types_of(inputs), OPS[op].check_attrs(attrs))


def check_strategies(op, inputs, attrs, mesh_text, seed, n=3):
    """The replicated strategy and up to ``n`` random valid ones pass the checker; returns how many split."""
    mesh = Mesh.parse(mesh_text)
    rule = rule_of(op, inputs, attrs)
    split = random_assignments(rule, mesh, np.random.default_rng(seed), n)
    for assignment in [rule.replicated()] + split:
        check_rule(op, inputs, attrs, mesh, assignment)
    return len(split)


# ---- (1) coverage and structure ------------------------------------------------------------------------------

def test_every_op_has_a_rule():
    assert factors.MISSING == []
    assert [name for name, op in OPS.items() if not callable(op.factors)] == []


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_rule_fits_the_tensors(case):
    op, inputs, attrs = CASES[case]
    full = OPS[op].check_attrs(attrs)
    rule = rule_for(op, types_of(inputs), full)
    assert structure_problems(rule, types_of(inputs), OPS[op].infer(types_of(inputs), full)) == []


def test_structure_problems_catch_a_wrong_rule():
    rule = rule_for("add", [TensorType("float32", (2, 3))] * 2, {})
    wrong = dataclasses.replace(rule, factors=(Factor("d0", 2), Factor("d1", 4)))
    problems = structure_problems(wrong, [TensorType("float32", (2, 3))] * 2, [TensorType("float32", (2, 3))])
    assert len(problems) == 3 and "size 3" in problems[0]


# ---- (2) every sample case on every mesh ---------------------------------------------------------------------

@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_rule_checker_passes_on_sample_cases(case, mesh):
    op, inputs, attrs = CASES[case]
    check_strategies(op, inputs, attrs, mesh, seed=[case, MESHES.index(mesh)], n=4)


def test_sample_cases_exercise_split_strategies():
    """Not only the replicated strategy: most cases have splits on a 2-device mesh, every family has some."""
    split_by_family: dict[str, int] = {}
    for case, (op, inputs, attrs) in enumerate(CASES):
        n = check_strategies(op, inputs, attrs, "2", seed=case, n=2)
        split_by_family[OPS[op].family] = split_by_family.get(OPS[op].family, 0) + n
    assert all(split_by_family[f] > 0 for f in ("elementwise", "linalg", "reduce", "shape", "nn"))


def test_random_assignments_are_distinct_valid_and_split():
    rule = rule_for("matmul", [TensorType("float32", (4, 6, 8)), TensorType("float32", (8, 12))], {})
    mesh = Mesh.parse("2x2")
    got = random_assignments(rule, mesh, np.random.default_rng(0), 6)
    assert len(got) == 6 and len(set(got)) == 6
    assert all(any(a) and invalid_reason(rule, a, mesh) is None for a in got)
    assert set(got) <= set(all_valid_assignments(rule, mesh))


# ---- the checker fails wrong rules ---------------------------------------------------------------------------

def test_checker_rejects_softmax_with_a_split_axis():
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    rule = rule_of("softmax", [x], {"axis": -1})
    wrong = dataclasses.replace(rule, factors=tuple(dataclasses.replace(f, kind="pass") for f in rule.factors))
    with pytest.raises(AssertionError, match="differs from the reference"):
        check_rule("softmax", [x], {"axis": -1}, Mesh.parse("2"), ((), ("x",)), rule=wrong)


def test_checker_rejects_vocab_split_gather_without_its_local_hook():
    data = np.arange(12, dtype=np.float32).reshape(6, 2)
    ids = np.array([0, 5, 3], np.int64)
    rule = rule_of("gather", [data, ids], {"axis": 0})
    vocab = factor_of_dim(rule, 0, None, 0)[0]
    assignment = tuple(("x",) if i == vocab else () for i in range(len(rule.factors)))
    check_rule("gather", [data, ids], {"axis": 0}, Mesh.parse("2"), assignment)
    with pytest.raises(AssertionError):
        check_rule("gather", [data, ids], {"axis": 0}, Mesh.parse("2"), assignment,
                   rule=dataclasses.replace(rule, local=None))


def test_minor_factor_of_a_compound_dim_alone_is_not_a_block_layout():
    rule = rule_for("reshape", [TensorType("float32", (4, 6))], {"shape": (24,)})
    assert [factor_of_dim(rule, None, 0, 0)] == [(0, 1)]
    mesh = Mesh.parse("2x2")
    assert "major to it" in rule.check(((), ("x",)), mesh)  # dim 0 would not be a contiguous block
    assert rule.check((("x", "y"), ()), mesh) is None
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    with pytest.raises(ValueError, match="invalid assignment"):
        check_rule("reshape", [x], {"shape": (24,)}, mesh, ((), ("x",)))
    check_rule("reshape", [x], {"shape": (24,)}, mesh, (("x", "y"), ()))


# ---- (4) Megatron facts --------------------------------------------------------------------------------------

def megatron_fc1():
    b, s, h = 2, 4, 8
    return rule_for("matmul", [TensorType("float32", (b, s, h)), TensorType("float32", (h, 4 * h))], {})


def only(rule, factor, axes):
    return tuple(axes if i == factor else () for i in range(len(rule.factors)))


def test_megatron_column_split_matmul():
    rule = megatron_fc1()
    n = factor_of_dim(rule, 1, None, 1)[0]
    assignment = only(rule, n, ("y",))
    assert rule.check(assignment, Mesh.parse("2x2")) is None
    assert rule.operand_specs(assignment) == [Spec.parse("[{}, {}, {}]"), Spec.parse("[{}, {y}]")]
    assert rule.result_specs(assignment) == [Spec.parse("[{}, {}, {y}]")]


def test_megatron_row_split_matmul_is_a_partial_sum():
    rule = megatron_fc1()
    k = factor_of_dim(rule, 0, None, 2)[0]
    assert factor_of_dim(rule, 1, None, 0) == (k,) and rule.factors[k].kind == "reduction"
    assignment = only(rule, k, ("y",))
    assert rule.operand_specs(assignment) == [Spec.parse("[{}, {}, {y}]"), Spec.parse("[{y}, {}]")]
    assert rule.result_specs(assignment) == [Spec.parse("[{}, {}, {}] partial{y}")]
    rng = np.random.default_rng(0)
    check_rule("matmul", [rng.standard_normal((2, 4, 8)).astype(np.float32),
                          rng.standard_normal((8, 32)).astype(np.float32)], {}, Mesh.parse("2x2"), assignment)


def test_embedding_vocab_split_gives_a_partial_result():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((8, 4)).astype(np.float32)
    ids = rng.integers(-8, 8, size=(2, 3)).astype(np.int64)
    rule = rule_of("gather", [table, ids], {"axis": 0})
    vocab = factor_of_dim(rule, 0, None, 0)[0]
    assignment = only(rule, vocab, ("y",))
    assert rule.result_specs(assignment) == [Spec.parse("[{}, {}, {}] partial{y}")]
    check_rule("gather", [table, ids], {"axis": 0}, Mesh.parse("2x2"), assignment)
    batch_too = tuple(("x",) if i == factor_of_dim(rule, 1, None, 0)[0] else a for i, a in enumerate(assignment))
    assert rule.result_specs(batch_too) == [Spec.parse("[{x}, {}, {}] partial{y}")]
    check_rule("gather", [table, ids], {"axis": 0}, Mesh.parse("2x2"), batch_too)


@pytest.mark.parametrize("spelling", ["kt", "k-multi-query", "lowest-fill"])
def test_attention_over_split_keys_is_a_partial_sum(spelling):
    """Context parallelism: every valid strategy that splits the keys (alone, or with heads / rows / columns on the
    other axis of 2x2, and over both axes) gives a partial sum of the attention; a causal -inf mask leaves some
    devices' blocks all masked for some rows (log-sum-exp -inf, weight 0), one row is masked everywhere (NaN, as in
    the reference); float32's lowest as the fill makes such rows attend to every key alike. With ``lse`` (the op the
    hook emits) the keys may not be split."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
    transpose_k, kv_heads = spelling != "kt", 1 if spelling == "k-multi-query" else 4
    k = rng.standard_normal((2, kv_heads) + ((12, 8) if transpose_k else (8, 12))).astype(np.float32)
    v = rng.standard_normal((2, kv_heads, 12, 5)).astype(np.float32)
    fill = np.finfo(np.float32).min if spelling == "lowest-fill" else -np.inf
    bias = np.where(np.tril(np.ones((6, 12), bool), 6), 0, fill).astype(np.float32)
    bias[1] = fill
    attrs = {"scale": 0.3, "transpose_k": transpose_k}
    rule = rule_of("attention", [q, k, v, bias], attrs)
    keys = [f.name for f in rule.factors].index("n")
    mesh = Mesh.parse("2x2")
    split = [a for a in all_valid_assignments(rule, mesh) if a[keys]]
    assert len(split) >= 8
    with np.errstate(invalid="ignore"):
        for assignment in split:
            assert rule.result_specs(assignment)[0].partial == assignment[keys]
            check_rule("attention", [q, k, v, bias], attrs, mesh, assignment)
    lse = rule_of("attention", [q, k, v, bias], attrs | {"lse": True})
    assert lse.factors[keys].kind == "replicate"


@pytest.mark.parametrize("shift", [False, True], ids=["sink", "sink-shifted"])
def test_attention_sinks_under_every_strategy(shift):
    """GPT-OSS's attention sinks (one more logit per head in every row's softmax): every valid strategy on 2x2, the
    heads split (the sink with them) or the keys (the sink counted once, in the combination of the blocks), equals
    the reference, a causal -inf mask and a row masked everywhere (whose output is 0: its probability all goes to
    the sink) included."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 12, 8)).astype(np.float32), rng.standard_normal((2, 2, 12, 5)).astype(np.float32)
    bias = np.where(np.tril(np.ones((6, 12), bool), 6), 0, -np.inf).astype(np.float32)
    bias[1] = -np.inf
    sink = rng.standard_normal((1, 4, 1, 1)).astype(np.float32) * 3
    attrs = {"scale": 0.3, "transpose_k": True, "sink": True, "sink_shift": shift}
    (ref,) = OPS["attention"].reference([q, k, v, bias, sink], OPS["attention"].check_attrs(attrs))
    assert np.all(ref[:, :, 1] == 0) and np.isfinite(ref).all()
    rule = rule_of("attention", [q, k, v, bias, sink], attrs)
    keys = [f.name for f in rule.factors].index("n")
    mesh = Mesh.parse("2x2")
    assignments = all_valid_assignments(rule, mesh)
    assert sum(bool(a[keys]) for a in assignments) >= 8 and len(assignments) > 20
    with np.errstate(invalid="ignore"):  # a block of keys all masked in a row: NaN there, weighted 0
        for assignment in assignments:
            check_rule("attention", [q, k, v, bias, sink], attrs, mesh, assignment)


@pytest.mark.parametrize("kv_shape", [(2, 2), (1, 2), (2, 1)], ids=["grouped", "grouped-batch-1", "multi-query"])
@pytest.mark.parametrize("mesh_text", ["2x2", "4"])
def test_grouped_query_attention_splits_heads_in_blocks(kv_shape, mesh_text):
    """4 query heads over 2 key/value heads (head i reads i // 2): q's head dim and k/v's are a grouped pair of
    factors. Splitting the query heads splits the key/value heads in the same blocks as far as they go (2 ways);
    split 4 ways, each device's query head reads one key/value head, which the local program takes from its block
    (whole on a mesh of 4). Every valid strategy (with the keys too) equals the reference."""
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
    k, v = (rng.standard_normal(kv_shape + s).astype(np.float32) for s in ((12, 8), (12, 5)))
    bias = np.where(np.tril(np.ones((6, 12), bool), 6), 0, -np.inf).astype(np.float32)
    attrs = {"scale": 0.3, "transpose_k": True}
    rule = rule_of("attention", [q, k, v, bias], attrs)
    (heads,) = rule.operands[0][1]
    kv = {1: (), 2: (heads + 1,)}[kv_shape[1]]
    assert rule.operands[1][1] == rule.operands[2][1] == kv
    assert rule.grouped == (((heads, heads + 1),) if kv else ())
    mesh = Mesh.parse(mesh_text)
    assignments = all_valid_assignments(rule, mesh)
    if kv:
        assert all(a[kv[0]] == rule.nested_axes(heads, kv[0], a[heads], mesh) for a in assignments)
        if mesh_text == "4":  # q's heads 4 ways, k and v whole
            assert ((), ("x",)) in {(a[kv[0]], a[heads]) for a in assignments}
        else:  # 4 ways over (x, y): k and v 2 ways over x; over y alone: 2 ways, the same blocks
            assert {(a[heads], a[kv[0]]) for a in assignments if a[heads]} >= {(("x", "y"), ("x",)), (("y",), ("y",))}
    with np.errstate(invalid="ignore"):
        for assignment in assignments:
            check_rule("attention", [q, k, v, bias], attrs, mesh, assignment)


@pytest.mark.parametrize("mesh_text", ["2x4", "4x2"])
def test_grouped_query_heads_split_beyond_their_key_value_heads(mesh_text):
    """8 query heads over 2 key/value heads on 8 devices: over (x, y) the key/value heads take the major axis when
    its size divides them (2x4: x), else none (4x2: whole), and each device's query head finds its one key/value
    head in its block; equal to the reference, with the lse variant too. 6 query heads over 3 split 2 ways would
    cut a group (3 heads each, reading key/value heads 0, 0 and 1) and is refused."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((8, 3, 4)).astype(np.float32)
    k, v = rng.standard_normal((2, 5, 4)).astype(np.float32), rng.standard_normal((2, 5, 3)).astype(np.float32)
    attrs = {"transpose_k": True}
    mesh = Mesh.parse(mesh_text)
    for lse in (False, True):
        rule = rule_of("attention", [q, k, v], attrs | {"lse": lse})
        (outer, inner), = rule.grouped
        assignment = rule.complete(tuple(("x", "y") if f == outer else () for f in range(len(rule.factors))), mesh)
        assert assignment[inner] == {"2x4": ("x",), "4x2": ()}[mesh_text]
        check_rule("attention", [q, k, v], attrs | {"lse": lse}, mesh, assignment)
    rule = rule_of("attention", [q[:6], k[:1].repeat(3, 0), v[:1].repeat(3, 0)], attrs)
    (outer, inner), = rule.grouped
    two = rule.complete(tuple(("x",) if f == outer else () for f in range(len(rule.factors))), Mesh.parse("2"))
    assert "would cut a group" in rule.check(two, Mesh.parse("2"))


def test_mean_over_a_split_dim_is_a_scaled_partial_sum():
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    attrs = {"axes": (1,), "keepdims": False}
    rule = rule_of("reduce_mean", [x], attrs)
    assignment = ((), ("x", "y"))
    assert rule.result_specs(assignment) == [Spec.parse("[{}] partial{x,y}")]
    check_rule("reduce_mean", [x], attrs, Mesh.parse("2x3"), assignment)


# ---- (3) properties on random shapes -------------------------------------------------------------------------

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)
DIMS = st.sampled_from([1, 2, 3, 4, 6])
MESH_TEXT = st.sampled_from(["2", "3", "4", "2x2", "2x3"])
SEED = st.integers(0, 2 ** 16)


def shapes(min_rank=0, max_rank=4):
    return st.lists(DIMS, min_size=min_rank, max_size=max_rank).map(tuple)


def f32(draw, shape):
    seed = draw(SEED)
    return np.random.default_rng(seed).uniform(-2, 2, size=shape).astype(np.float32)


@st.composite
def broadcast_operand(draw, out):
    """A suffix of ``out`` with some dims set to 1."""
    rank = draw(st.integers(0, len(out)))
    return tuple(1 if draw(st.booleans()) else d for d in out[len(out) - rank:])


@PROPERTY
@given(st.data(), shapes(), st.sampled_from(["add", "mul", "maximum", "where"]), MESH_TEXT, SEED)
def test_elementwise_broadcasting(data, out, op, mesh, seed):
    n = 3 if op == "where" else 2
    operands = [data.draw(broadcast_operand(out)) for _ in range(n)]
    inputs = [f32(data.draw, s) for s in operands]
    if op == "where":
        inputs[0] = inputs[0] > 0
    check_strategies(op, inputs, {}, mesh, seed)


@PROPERTY
@given(st.data(), shapes(0, 2), DIMS, DIMS, DIMS, st.booleans(), st.booleans(), MESH_TEXT, SEED)
def test_matmul_batched(data, batch, m, k, n, a_vector, b_vector, mesh, seed):
    a = (k,) if a_vector else data.draw(broadcast_operand(batch)) + (m, k)
    b = (k,) if b_vector else data.draw(broadcast_operand(batch)) + (k, n)
    check_strategies("matmul", [f32(data.draw, a), f32(data.draw, b)], {}, mesh, seed)


@PROPERTY
@given(st.data(), shapes(1, 4), st.booleans(), st.booleans(), MESH_TEXT, SEED)
def test_reduce_sum(data, shape, keepdims, integer, mesh, seed):
    axes = data.draw(st.none() | st.lists(st.sampled_from(range(len(shape))), min_size=1, unique=True).map(tuple))
    x = f32(data.draw, shape)
    x = (x * 10).astype(np.int64) if integer else x
    check_strategies("reduce_sum", [x], {"axes": axes, "keepdims": keepdims}, mesh, seed)


@st.composite
def reshape_shapes(draw):
    """Two groupings of one list of pieces (so they can be aligned), sometimes with 1s or the output reversed."""
    pieces = draw(st.lists(st.sampled_from([2, 3, 4]), min_size=1, max_size=4))

    def grouping():
        cuts = sorted(draw(st.sets(st.integers(1, len(pieces) - 1))) if len(pieces) > 1 else set())
        bounds = [0] + cuts + [len(pieces)]
        dims = [int(np.prod(pieces[a:b])) for a, b in zip(bounds, bounds[1:])]
        if draw(st.booleans()):
            dims.insert(draw(st.integers(0, len(dims))), 1)
        return tuple(dims)

    src, dst = grouping(), grouping()
    if draw(st.integers(0, 3)) == 0:
        dst = dst[::-1]
    return src, dst


@PROPERTY
@given(st.data(), reshape_shapes(), MESH_TEXT, SEED)
def test_reshape_compound_merge_and_split(data, src_dst, mesh, seed):
    src, dst = src_dst
    check_strategies("reshape", [f32(data.draw, src)], {"shape": dst}, mesh, seed, n=4)


@PROPERTY
@given(st.data(), shapes(1, 4), MESH_TEXT, SEED)
def test_transpose(data, shape, mesh, seed):
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    check_strategies("transpose", [f32(data.draw, shape)], {"perm": perm}, mesh, seed)


@PROPERTY
@given(st.data(), st.sampled_from([2, 4, 6, 8, 12]), shapes(0, 2), shapes(0, 2), st.booleans(), MESH_TEXT, SEED)
def test_gather_embedding(data, vocab, ids_shape, rest, axis1, mesh, seed):
    table_shape = ((2,) if axis1 else ()) + (vocab,) + rest
    ids = np.random.default_rng(seed).integers(-vocab, vocab, size=ids_shape).astype(np.int64)
    inputs = [f32(data.draw, table_shape), ids]
    attrs = {"axis": int(axis1)}
    check_strategies("gather", inputs, attrs, mesh, seed)
    rule = rule_of("gather", inputs, attrs)
    vocab_factor = factor_of_dim(rule, 0, None, int(axis1))[0]
    axes = Mesh.parse(mesh).names[:1]
    if rule.check(only(rule, vocab_factor, axes), Mesh.parse(mesh)) is None:  # the vocab split itself
        check_rule("gather", inputs, attrs, Mesh.parse(mesh), only(rule, vocab_factor, axes))


@PROPERTY
@given(st.data(), st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.sampled_from([1, 2, 4]),
       st.sampled_from([1, 2, 4]), st.lists(st.integers(3, 6), min_size=1, max_size=2), MESH_TEXT, SEED)
def test_conv_channel_splits(data, batch, group, c_per_group, m_per_group, spatial, mesh, seed):
    nd = len(spatial)
    kernel = tuple(data.draw(st.integers(1, 3)) for _ in range(nd))
    attrs = {"strides": tuple(data.draw(st.integers(1, 2)) for _ in range(nd)),
             "pads": tuple(data.draw(st.integers(0, 1)) for _ in range(2 * nd)), "group": group}
    x = f32(data.draw, (batch, group * c_per_group) + tuple(spatial))
    w = f32(data.draw, (group * m_per_group, c_per_group) + kernel)
    check_strategies("conv", [x, w], attrs, mesh, seed, n=4)


@PROPERTY
@given(st.data(), shapes(1, 3), st.sampled_from(["softmax", "log_softmax", "layer_norm", "rms_norm"]),
       MESH_TEXT, SEED)
def test_softmax_and_norms(data, shape, op, mesh, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    inputs = [f32(data.draw, shape)]
    if op in ("layer_norm", "rms_norm"):
        inputs.append(f32(data.draw, shape[axis % len(shape):]))
    check_strategies(op, inputs, {"axis": axis}, mesh, seed)
