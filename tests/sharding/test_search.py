"""The automatic sharder (ILP) against the oracles of ANCHORS.md, as they apply to forward graphs, plus the cost
model's parsers and calibration, the problem's JSON round trip, determinism, infeasible budgets and solver fallbacks.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from bmc.errors import PlanningError, UsageError
from bmc.frontend.onnx import import_model
from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder
from bmc.sharding import ilp, strategies
from bmc.sharding.auto import auto_plan, compare_strategies, manual_plans
from bmc.sharding.cost import (DEVICES, calibrate, parse_device, parse_mesh_bandwidth, parse_size, plan_cost,
                               with_links)
from bmc.sharding.mesh import Mesh
from bmc.sharding.partition import partition, rule_of
from bmc.testing.spmd_sim import simulate

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
H100 = DEVICES["h100"]
TOL = 1e-4


def transformer(layers=2, b=2, s=64, h=256, heads=8, ffn=None, seed=0):
    """Pre-LN decoder layers with separate Q/K/V projections: x[b,s,h] → x[b,s,h]."""
    ffn = ffn or 4 * h
    d = h // heads
    rng = np.random.default_rng(seed)
    g = GraphBuilder()
    x = g.input("x", TensorType("float32", (b, s, h)))

    def w(name, shape):
        return g.param(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    scale = g.constant(np.float32(1 / np.sqrt(d)))
    for i in range(layers):
        p = f"l{i}."
        y = g.emit1("layer_norm", [x, w(p + "ln1", (h,))], axis=-1)

        def heads_of(t, perm):
            return g.emit1("transpose", [g.emit1("reshape", [t], shape=(b, s, heads, d))], perm=perm)

        q = heads_of(g.emit1("matmul", [y, w(p + "wq", (h, h))]), (0, 2, 1, 3))
        k = heads_of(g.emit1("matmul", [y, w(p + "wk", (h, h))]), (0, 2, 3, 1))
        v = heads_of(g.emit1("matmul", [y, w(p + "wv", (h, h))]), (0, 2, 1, 3))
        probs = g.emit1("softmax", [g.emit1("mul", [g.emit1("matmul", [q, k]), scale])], axis=-1)
        ctx = g.emit1("reshape", [g.emit1("transpose", [g.emit1("matmul", [probs, v])], perm=(0, 2, 1, 3))],
                      shape=(b, s, h))
        x = g.emit1("add", [x, g.emit1("matmul", [ctx, w(p + "wo", (h, h))])])
        y = g.emit1("layer_norm", [x, w(p + "ln2", (h,))], axis=-1)
        f = g.emit1("gelu", [g.emit1("matmul", [y, w(p + "w1", (h, ffn))])])
        x = g.emit1("add", [x, g.emit1("matmul", [f, w(p + "w2", (ffn, h))])])
    return g.finish([x])


def fixture(name):
    data = np.load(FIXTURES / f"{name}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("output:")}
    expected = {k[len("output:"):]: data[k] for k in data.files if k.startswith("output:")}
    return import_model(FIXTURES / f"{name}.onnx", {k: v.shape for k, v in inputs.items()}), inputs, expected


def specs_of(graph, plan, layer):
    return {p.name[len(layer):]: str(plan.specs[p.name]) for p in graph.params if p.name.startswith(layer)}


MEGATRON = {"wq": "[{}, {A}]", "wk": "[{}, {A}]", "wv": "[{}, {A}]", "wo": "[{A}, {}]", "w1": "[{}, {A}]",
            "w2": "[{A}, {}]", "ln1": "[{}]", "ln2": "[{}]"}


# ---- cost model -------------------------------------------------------------------------------------------------

def test_flag_parsers_and_their_usage_errors():
    assert parse_size("80GB") == 80 * 10**9 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_device("H100") is DEVICES["h100"] and parse_device("a100").peak("bfloat16") == 312e12
    mesh = Mesh.parse("8x8")
    bw = parse_mesh_bandwidth("x=45GB,y=400GB/s@7us", mesh)
    assert bw == {"x": (45e9, None), "y": (400e9, 7e-6)}
    m = with_links(mesh, bw)
    assert m.axis("x").latency_s == 15e-6 and m.axis("y").bandwidth_Bps == 400e9 and m.axis("y").latency_s == 7e-6
    assert parse_size("4096") == 4096  # plain bytes
    for bad in ("eighty GB", "-1GB", "80XB", "0GB"):
        with pytest.raises(UsageError, match="NUMBER"):
            parse_size(bad)
    for bad in ("x=45", "x=45GB,x=1GB", "z=1GB", "x:45GB", "x=45GB@fast"):
        with pytest.raises(UsageError):
            parse_mesh_bandwidth(bad, mesh)
    with pytest.raises(UsageError, match="h100"):
        parse_device("tpu")


def test_calibration_recovers_alpha_and_beta():
    mesh = with_links(Mesh.parse("2x4"))
    alpha, bw = 12e-6, 80e9
    meas = [("all_reduce", ("x",), b, alpha + b / bw) for b in (1 << 20, 1 << 24, 1 << 26)]
    m = calibrate(mesh, meas)
    assert m.axis("x").latency_s == pytest.approx(alpha, rel=1e-6)
    assert m.axis("x").bandwidth_Bps == pytest.approx(bw, rel=1e-6)
    assert m.axis("y") == mesh.axis("y")  # no measurements: unchanged


def test_strategies_respect_divisibility_and_use_each_axis_once():
    g = GraphBuilder()
    x = g.input("x", TensorType("float32", (6, 8)))
    w = g.param("w", np.zeros((8, 4), np.float32))
    graph = g.finish([g.emit1("matmul", [x, w])])
    mesh = Mesh.parse("2x4")
    rule = rule_of(graph.nodes[0])
    found = strategies.enumerate_strategies(rule, mesh)
    assert found[0] == rule.replicated()
    assert len(set(found)) == len(found)
    for a in found:
        assert rule.check(a, mesh) is None
        used = [ax for axes in a for ax in axes]
        assert len(used) == len(set(used))
        assert "y" not in a[0]  # 6 rows cannot be split 4 ways
    assert (("x",), (), ("y",)) in found


# ---- oracles ----------------------------------------------------------------------------------------------------

def test_memory_pressure_on_a_1d_mesh_gives_megatron():
    """ANCHORS: L layers on a 1-D mesh of 4 with the weights forced to be split → QKV/FC1 column-split,
    out-proj/FC2 row-split, exactly 2 all-reduces of b·s·h per layer (forward)."""
    layers, b, s, h = 3, 2, 16, 256
    graph = transformer(layers, b, s, h)
    mesh = with_links(Mesh.parse("4"))
    weights = graph.weight_bytes()
    activations = plan_cost(graph, manual_plans(graph, mesh)["replicate"], H100).memory.peak_bytes - weights
    # weights must be split 4 ways; activations may stay whole (with less room the ILP picks Megatron's sequence
    # parallel variant: reduce-scatter + all-gather instead of all-reduce, to split the residual stream too)
    plan, stats = auto_plan(graph, mesh, device="h100", memory_per_device=0.3 * weights + activations)
    assert stats["status"] == "optimal" and stats["chosen"] == "ilp"
    for i in range(layers):
        assert specs_of(graph, plan, f"l{i}.") == {k: v.replace("A", "x") for k, v in MEGATRON.items()}
    prog = partition(graph, plan)
    assert [c.kind for c in prog.collectives] == ["all_reduce"] * (2 * layers)
    assert all(c.bytes == int(2 * 3 / 4 * b * s * h * 4) for c in prog.collectives)


def test_fast_second_axis_gets_tensor_parallelism_and_the_slow_one_the_batch():
    """ANCHORS: 2×2 mesh, second axis 10× faster → data parallel on the slow axis, Megatron on the fast one."""
    graph = transformer(layers=3, b=8, s=32, h=512, heads=8)
    mesh = with_links(Mesh.parse("2x2"), {"x": (100e9, 5e-6), "y": (1000e9, 0.5e-6)})
    weights = graph.weight_bytes()
    activations = plan_cost(graph, manual_plans(graph, mesh)["replicate"], H100).memory.peak_bytes - weights
    # the weights must be split at least 2 ways; the activations may stay whole
    plan, stats = auto_plan(graph, mesh, memory_per_device=0.55 * weights + activations, check_manual=False)
    assert str(plan.specs["x"]) == "[{x}, {}, {}]"
    assert specs_of(graph, plan, "l1.") == {k: v.replace("A", "y") for k, v in MEGATRON.items()}
    reduces = [c for c in partition(graph, plan).collectives if c.kind == "all_reduce"]
    assert reduces and all(c.axes == ("y",) for c in reduces)


def test_large_batch_small_model_is_pure_data_parallel():
    """ANCHORS: tokens per step ≫ hidden and the model fits → pure data parallel."""
    graph = transformer(layers=2, b=64, s=128, h=256, heads=4)
    mesh = with_links(Mesh.parse("4"))
    plan, _ = auto_plan(graph, mesh, check_manual=False)
    assert str(plan.specs["x"]) == "[{x}, {}, {}]"
    assert all(plan.specs[p.name].is_replicated() for p in graph.params)
    assert all(c.node == "output" for c in partition(graph, plan).collectives)


FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.onnx"))


def _budget(graph, mesh):
    """60% of the replicated plan's peak: some weights must be split."""
    return 0.6 * plan_cost(graph, manual_plans(graph, mesh)["replicate"], H100).memory.peak_bytes


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_auto_is_never_worse_than_the_best_manual_strategy(name):
    graph, _, _ = fixture(name)
    mesh = with_links(Mesh.parse("1x4" if name.startswith(("bert", "vit")) else "2x2"))
    budget = _budget(graph, mesh)
    manual = {k: plan_cost(graph, p, H100) for k, p in manual_plans(graph, mesh).items()}
    fitting = [c.total_s for c in manual.values() if c.memory.peak_bytes <= budget]
    plan, stats = auto_plan(graph, mesh, memory_per_device=budget)
    cost = plan_cost(graph, plan, H100)
    assert cost.memory.peak_bytes <= budget
    if fitting:
        assert cost.total_s <= min(fitting) * (1 + 1e-9)
        # the ILP alone is within 1% of the best manual plan (it prices a reshard per consumer)
        assert stats["ilp_cost"]["total_s"] <= min(fitting) * 1.01


@pytest.mark.parametrize("name", ["gpt2_legacy", "llama_dynamo", "opt_dynamo", "falcon_dynamo", "bloom_dynamo",
                                  "t5enc_dynamo", "deberta_dynamo"])
def test_auto_plans_run_on_the_simulator(name):
    graph, inputs, expected = fixture(name)
    mesh = with_links(Mesh.parse("2x2"))
    plan, _ = auto_plan(graph, mesh, memory_per_device=_budget(graph, mesh), check_manual=False)
    assert any(not plan.specs[p.name].is_replicated() for p in graph.params)
    prog = partition(graph, plan)
    res = simulate(prog, inputs)
    for k, want in expected.items():
        got = res.outputs[k]
        assert float(np.max(np.abs(got - want))) <= TOL * max(1.0, float(np.max(np.abs(want))))
    assert res.collective_bytes == [c.bytes for c in prog.collectives]


def test_same_inputs_same_plan():  # FAILURES.md 28
    graph, _, _ = fixture("gpt2_dynamo")
    mesh = with_links(Mesh.parse("2x2"))
    budget = _budget(graph, mesh)
    runs = [auto_plan(graph, mesh, memory_per_device=budget, check_manual=False)[0] for _ in range(2)]
    assert runs[0].strategies == runs[1].strategies and runs[0].specs == runs[1].specs
    problems = [ilp.build_problem(strategies.analyze(graph, mesh), H100, budget).dumps() for _ in range(2)]
    assert problems[0] == problems[1]


def test_infeasible_memory_says_what_fits():  # FAILURES.md 25
    graph = transformer(layers=2, b=2, s=64, h=256)
    with pytest.raises(PlanningError, match=r"infeasible: smallest peak found [0-9.]+ MB on device \(0,\).*"
                                            r"largest tensors per device: l\d\.w[12].*try a larger mesh or "
                                            r"--memory-per-device") as e:
        auto_plan(graph, with_links(Mesh.parse("4")), memory_per_device=0.1 * graph.weight_bytes())
    assert "--stages auto" in e.value.fix


def test_problem_json_round_trip_replays_the_solution(tmp_path):
    graph = transformer(layers=4, b=2, s=64, h=256)
    mesh = with_links(Mesh.parse("4"))
    path = tmp_path / "problem.json"
    _, stats = auto_plan(graph, mesh, memory_per_device=0.3 * graph.weight_bytes(), check_manual=False,
                         save_problem=str(path))
    problem = ilp.Problem.from_json(json.loads(path.read_text()))
    assert problem.dumps() == path.read_text()
    first, again = ilp.solve(problem), ilp.solve(ilp.Problem.from_json(json.loads(problem.dumps())))
    assert first.choice == again.choice and first.status == "optimal"
    assert first.objective_s == pytest.approx(stats["objective_s"])


# ---- shrinking, annotations, solver trouble ---------------------------------------------------------------------

def test_repeated_layers_share_one_solution_at_no_loss():
    graph = transformer(layers=5, b=2, s=32, h=128, heads=4)
    mesh = with_links(Mesh.parse("4"))
    budget = 0.3 * graph.weight_bytes()
    on, s_on = auto_plan(graph, mesh, memory_per_device=budget, check_manual=False)
    off, s_off = auto_plan(graph, mesh, memory_per_device=budget, check_manual=False, dedup=False)
    assert s_on["repeated_layers"]["copies"] == 4 and s_on["problem_nodes"] < s_off["problem_nodes"]
    assert s_on["objective_s"] == pytest.approx(s_off["objective_s"], rel=1e-6)
    assert specs_of(graph, on, "l2.") == specs_of(graph, on, "l4.")


def test_annotations_are_constraints():
    graph = transformer(layers=1, b=4, s=32, h=128, heads=4)
    mesh = with_links(Mesh.parse("2x2"))
    plan, _ = auto_plan(graph, mesh, {"l0.w1": "[{x}, {}]", "x": "[{y}, {}, {}]"}, check_manual=False)
    assert str(plan.specs["l0.w1"]) == "[{x}, {}]" and str(plan.specs["x"]) == "[{y}, {}, {}]"
    assert plan.origins["l0.w1"] == "annotation"
    partition(graph, plan)  # a valid plan


def test_time_limit_keeps_a_plan_and_warns():  # FAILURES.md 26
    graph = transformer(layers=4, b=4, s=32, h=128, heads=4)
    mesh = with_links(Mesh.parse("2x2"))
    plan, stats = auto_plan(graph, mesh, memory_per_device=0.55 * graph.weight_bytes(), time_limit_s=0.01,
                            dedup=False, check_manual=False)
    assert stats["status"] in ("optimal", "time_limit", "greedy")
    if stats["status"] != "optimal":
        assert stats["warnings"]
    partition(graph, plan)


def test_solver_failure_falls_back_to_greedy(monkeypatch):  # FAILURES.md 27
    import scipy.optimize

    def broken(*a, **k):
        raise RuntimeError("numerical trouble")

    monkeypatch.setattr(scipy.optimize, "milp", broken)
    graph = transformer(layers=1, b=4, s=32, h=128, heads=4)
    plan, stats = auto_plan(graph, with_links(Mesh.parse("2x2")), check_manual=False)
    assert stats["status"] == "greedy" and "greedy" in stats["warnings"][0]
    partition(graph, plan)


def test_compare_strategies_prices_every_plan_the_same_way():
    graph = transformer(layers=1, b=4, s=32, h=128, heads=4)
    costs = compare_strategies(graph, with_links(Mesh.parse("2x2")))
    assert set(costs) == {"replicate", "dp", "megatron", "dp+megatron", "auto"}
    assert costs["auto"].total_s <= min(c.total_s for k, c in costs.items() if k != "auto") * (1 + 1e-9)
    assert costs["replicate"].comm_s == 0


def _expert_layers(hidden=64, tokens=64):
    """2 Mixtral-shaped expert layers (``benchmarks/moe.py``'s exported form, 8 experts, 2 a token), fused."""
    import importlib.util

    from bmc.compiler import import_graph

    spec = importlib.util.spec_from_file_location("bmc_benchmarks_moe", FIXTURES.parents[2] / "benchmarks" / "moe.py")
    moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moe)
    return import_graph(moe.hf_moe(moe.moe_weights(2, hidden, hidden, 8)), {"M": tokens})


@pytest.mark.parametrize("credit", [True, False], ids=["priced", "unpriced"])
def test_the_search_prices_expert_parallelism_as_partitioned(credit, monkeypatch):
    """The experts split (annotations): the partitioner drops the all-reduce between each layer's two products, and
    the ILP's objective is the partitioned plan's cost because it credits that all-reduce (without the credit it
    overprices the plan by it). The ILP does not price moving the layer's all-reduce past the sum of each token's
    two rows (``partition._sink_reduces``): with that move the plan costs less than its objective. Unconstrained but
    short of memory, the search splits every expert weight by experts itself: one all-reduce per layer, equal to
    the reference."""
    from bmc.sharding import partition as partitioner
    from bmc.sharding.spec import Spec
    from bmc.testing.reference import run_reference

    if not credit:
        monkeypatch.setattr(ilp, "_routed_pairs", lambda graph: [])
    graph = _expert_layers()
    mesh = with_links(Mesh.parse("2"))
    experts = [n.inputs[1].name for n in graph.nodes if n.op == "gather_matmul"]
    split = Spec((("x",), (), ()))
    plan, stats = auto_plan(graph, mesh, {w: split for w in experts}, check_manual=False)
    sunk = plan_cost(graph, plan, H100)
    with monkeypatch.context() as m:
        m.setattr(partitioner, "_sink_reduces", lambda prog, em: None)
        cost = plan_cost(graph, plan, H100)
    assert sunk.comm_s < cost.comm_s and sunk.collectives == cost.collectives
    assert [c.kind for c in partition(graph, plan).collectives if c.node != "output"] == ["all_reduce"] * 2
    assert (abs(stats["objective_s"] - cost.total_s) <= 1e-9 * cost.total_s) == credit
    if credit:
        weights = graph.weight_bytes()
        peak = plan_cost(graph, manual_plans(graph, mesh)["replicate"], H100).memory.peak_bytes
        plan, stats = auto_plan(graph, mesh, memory_per_device=peak - 0.4 * weights, check_manual=False)
        assert all(plan.specs[w] == split for w in experts)
        prog = partition(graph, plan)
        assert [c.kind for c in prog.collectives] == ["all_reduce"] * 2
        x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
        want = run_reference(graph, {"x": x})["y"]
        assert float(np.max(np.abs(simulate(prog, {"x": x}).outputs["y"] - want))) <= 1e-5 * float(np.abs(want).max())
