"""Pipeline stages: the cut (balance, what crosses it) and the stages' composition against the reference interpreter."""

from pathlib import Path

import numpy as np
import pytest

from bmc.compiler import compile_model, import_graph
from bmc.errors import UsageError
from bmc.sharding.cost import DEVICES, roofline_s, with_links
from bmc.sharding.mesh import Mesh
from bmc.sharding.pipeline import split_stages, stage_mesh
from bmc.testing.reference import run_reference

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "models"


@pytest.fixture(scope="module")
def gpt2():
    return import_graph(FIXTURES / "gpt2_dynamo.onnx", {"batch": 2, "seq": 16})


def _cost(node):
    return 0.0 if node.op == "constant" else roofline_s(node.op, [v.type for v in node.inputs],
                                                        [v.type for v in node.outputs], node.attrs, DEVICES["h100"])


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_the_stages_compose_to_the_whole_model(gpt2, stages):
    """Running the stage graphs one after the other, each on what the earlier ones made, gives the whole graph's
    outputs bit for bit (numpy reference interpreter); every node is in exactly one stage, in order."""
    cuts = split_stages(gpt2, stages, device=DEVICES["h100"], mesh=with_links(Mesh.parse(str(stages))))
    assert [(st.start, st.end) for st in cuts] == list(zip([0] + [st.end for st in cuts[:-1]],
                                                           [st.start for st in cuts[1:]] + [len(gpt2.nodes)]))
    assert all(st.end > st.start for st in cuts)
    data = np.load(FIXTURES / "gpt2_dynamo.npz")
    inputs = {v.name: data[v.name] for v in gpt2.inputs}
    env = dict(inputs)
    for st in cuts:
        env.update(run_reference(st.graph, {v.name: env[v.name] for v in st.graph.inputs}))
        assert all(name in env for name in st.sends)
    want = run_reference(gpt2, inputs)
    for name, ref in want.items():
        np.testing.assert_array_equal(env[name], ref)


def test_the_cut_balances_compute_and_sends_only_what_later_stages_read(gpt2):
    """Two stages: neither holds more than half the work plus the largest node; what stage 0 sends is exactly the
    values it made that stage 1 reads (no constant: stage 1 makes its own copies); the same graph, the same cut
    (FAILURES.md 28)."""
    first, second = split_stages(gpt2, 2, device=DEVICES["h100"], mesh=with_links(Mesh.parse("2")))
    again = split_stages(gpt2, 2, device=DEVICES["h100"], mesh=with_links(Mesh.parse("2")))
    assert [(st.start, st.end, st.sends) for st in again] == [(st.start, st.end, st.sends) for st in (first, second)]
    costs = [_cost(n) for n in gpt2.nodes]
    assert max(sum(costs[:first.end]), sum(costs[first.end:])) <= sum(costs) / 2 + max(costs)
    made = {v.name for n in gpt2.nodes[:first.end] for v in n.outputs}
    read = {v.name for n in second.graph.nodes for v in n.inputs}
    consts = {v.name for n in gpt2.nodes if n.op == "constant" for v in n.outputs}
    assert set(first.sends) == (made & read) - consts
    assert {v.name for v in second.graph.inputs} == set(first.sends) | ({v.name for v in gpt2.inputs} & read)
    assert first.send_bytes == sum(gpt2.value(n).type.nbytes for n in first.sends)
    # the two-layer transformer is cut between its layers: only the residual stream crosses
    assert len(first.sends) == 1 and gpt2.value(first.sends[0]).type.shape == (2, 16, 32)


def test_stage_meshes():
    assert stage_mesh(Mesh.parse("4x2"), 2).shape == (2, 2)
    assert stage_mesh(Mesh.parse("2x2"), 2).shape == (2,) and stage_mesh(Mesh.parse("2x2"), 2).names == ("y",)
    assert stage_mesh(Mesh.parse("2"), 2).shape == (1,)
    with pytest.raises(UsageError, match="do not divide") as e:
        stage_mesh(Mesh.parse("3x2"), 2)
    assert e.value.where == "--stages" and "--mesh 6x2" in e.value.fix


def test_bad_pipeline_flags_are_usage_errors(tmp_path):
    model = FIXTURES / "gpt2_dynamo.onnx"
    cases = [({"microbatches": 2}, "--microbatches", "needs"),
             ({"stages": 2, "mesh": "3"}, "--stages", "do not divide"),
             ({"stages": 2, "mesh": "2", "microbatches": 3}, "--microbatches", "not a multiple"),
             ({"stages": 2, "mesh": "2", "shard": {"nope": "[{x}]"}}, "--shard", "no stage")]
    for options, where, text in cases:
        with pytest.raises(UsageError, match=text) as e:
            compile_model(model, tmp_path / "m.bmc", input_shapes={"batch": 2, "seq": 16}, **options)
        assert e.value.where == where, (options, e.value)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_a_static_batch_cannot_be_split_into_microbatches(tmp_path):
    from bmc.frontend.onnx import import_model  # noqa: F401  (the frontend is needed: onnx installed)
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Tanh", ["r"], ["y"])],
                              "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "static.onnx"
    onnx.save(model, path)
    with pytest.raises(UsageError, match="microbatch") as e:
        compile_model(path, tmp_path / "m.bmc", stages=2, mesh="2", microbatches=2)
    assert e.value.where == "--microbatches" and "dynamic batch" in e.value.fix


def _mlp(path: Path, layers: int = 8, d: int = 256, ffn: int = 1024) -> Path:
    """A residual MLP stack with a dynamic token dim."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array((rng.standard_normal((d, ffn)) * 0.05).astype(np.float32), f"w1_{i}"),
                  numpy_helper.from_array((rng.standard_normal((ffn, d)) * 0.05).astype(np.float32), f"w2_{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"a{i}"]),
                  helper.make_node("MatMul", [f"a{i}", f"w2_{i}"], [f"o{i}"]),
                  helper.make_node("Add", [x, f"o{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", d])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["tokens", d])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_the_stage_search_pipelines_only_when_memory_and_a_slow_axis_make_it_pay(tmp_path):
    """``--stages auto`` on 2×2: with memory to spare the whole mesh runs one program (no stage boundary to wait
    at); when the weights must be split over the slow first axis too (7 MB a device, 10 GB/s between nodes) two
    stages, each splitting its half of the weights inside a node, are cheaper than all-reduces over the slow axis;
    every candidate is priced, and the chosen one is the fastest that fits."""
    from bmc.compiler import search_stages

    model = _mlp(tmp_path / "mlp.onnx")
    whole, micro = import_graph(model, {"tokens": 256}), import_graph(model, {"tokens": 64})
    free = search_stages(whole, micro, mesh="2x2", microbatches=4)
    assert free.stages == 1 and free.pipeline is None and [r["stages"] for r in free.table] == [1, 2]
    tight = search_stages(whole, micro, mesh="2x2", microbatches=4, mesh_bandwidth="x=10GB",
                          memory_per_device=7 << 20)
    assert tight.stages == 2 and tight.pipeline is not None
    assert all(r["fits"] for r in tight.table)
    one, two = tight.table
    assert two["latency_s"] < one["latency_s"] and two["peak_bytes_per_device"] <= 7 << 20
    assert "<- chosen" in tight.text().splitlines()[2]


def test_a_cut_keeps_every_stage_within_the_memory_budget(gpt2):
    """With a budget the cut is the fastest whose every stage's weights fit (split over its devices); none fits is
    a planning error naming the flag."""
    from bmc.errors import PlanningError

    mesh = with_links(Mesh.parse("2"))
    total = sum(p.type.nbytes for p in gpt2.params)
    free = split_stages(gpt2, 2, device=DEVICES["h100"], mesh=mesh)
    heavy = max(st.graph.weight_bytes() for st in free)
    budget = heavy - 1  # the free cut's heavier stage no longer fits
    cut = split_stages(gpt2, 2, device=DEVICES["h100"], mesh=mesh, memory_per_device=budget)
    assert max(st.graph.weight_bytes() for st in cut) <= budget and cut[0].end != free[0].end
    with pytest.raises(PlanningError, match="no cut into 2 stages fits") as e:
        split_stages(gpt2, 2, device=DEVICES["h100"], mesh=mesh, memory_per_device=total // 4)
    assert e.value.where == "--memory-per-device"
