"""The reshard table: any spec A to any spec B preserves the value on the simulator, the steps are the expected
collectives, and the bytes the plan counts equal the bytes the simulator moves."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder
from bmc.sharding.mesh import Mesh
from bmc.sharding.partition import partition
from bmc.sharding.plan import Plan
from bmc.sharding.reshard import plan_reshard
from bmc.sharding.spec import Spec
from bmc.testing.spmd_sim import simulate


@st.composite
def mesh_and_two_specs(draw):
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    mesh = Mesh.parse("x".join(map(str, sizes)))
    rank = draw(st.integers(1, 3))

    def spec():
        dims = [[] for _ in range(rank)]
        for a in draw(st.permutations(mesh.names)):
            slot = draw(st.integers(-1, rank - 1))
            if slot >= 0:
                dims[slot].append(a)
        return Spec(tuple(tuple(d) for d in dims))

    a, b = spec(), spec()
    # every dim divisible by the shards either spec cuts it into
    shape = tuple(a.num_shards(i, mesh) * b.num_shards(i, mesh) * draw(st.integers(1, 2)) for i in range(rank))
    return mesh, a, b, shape


def identity_graph(shape):
    b = GraphBuilder()
    x = b.input("x", TensorType("float32", shape))
    return b.finish([b.emit1("neg", [x], "y")])


@settings(max_examples=80, deadline=None, derandomize=True)
@given(mesh_and_two_specs())
def test_resharding_preserves_the_value(case):
    from bmc.sharding import factors  # noqa: F401

    mesh, a, b, shape = case
    graph = identity_graph(shape)
    rank = len(shape)
    plan = Plan(mesh, {"x": a}, {0: tuple(a.dims[i] for i in range(rank))}, output_specs={"y": b})
    prog = partition(graph, plan)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    res = simulate(prog, {"x": x})
    np.testing.assert_array_equal(res.outputs["y"], -x)
    assert res.replica_error == 0.0
    assert res.collective_bytes == [c.bytes for c in prog.collectives]


@pytest.mark.parametrize("src,dst,kinds", [
    ("[{},{}] partial{y}", "[{},{}]", [("all_reduce", ("y",))]),
    ("[{},{}] partial{x,y}", "[{},{}]", [("all_reduce", ("x", "y"))]),
    ("[{},{}] partial{y}", "[{},{y}]", [("reduce_scatter", ("y",))]),
    ("[{x},{}]", "[{},{x}]", [("all_to_all", ("x",))]),
    ("[{x,y},{}]", "[{x},{}]", [("all_gather", ("y",))]),
    ("[{},{}]", "[{y},{x}]", [("local_slice", ("y",)), ("local_slice", ("x",))]),
    ("[{x},{}]", "[{x},{}]", []),
])
def test_reshard_steps(src, dst, kinds):
    steps = plan_reshard(Spec.parse(src), Spec.parse(dst), Mesh.parse("2x2"))
    assert [(s.kind, s.axes) for s in steps] == kinds


def test_collective_costs_follow_the_ring_formulas():
    mesh = Mesh.parse("4")
    t = TensorType("float32", (8, 1024))  # 32 KiB
    (ar,) = plan_reshard(Spec.parse("[{},{}] partial{x}"), Spec.parse("[{},{}]"), mesh)
    (ag,) = plan_reshard(Spec.parse("[{x},{}]"), Spec.parse("[{},{}]"), mesh)
    assert ar.bytes_per_device(t, mesh) == int(2 * 3 / 4 * t.nbytes)
    assert ag.bytes_per_device(t, mesh) == int(3 / 4 * t.nbytes)
    ax = mesh.axis("x")
    assert ar.time_s(t, mesh) == pytest.approx(ax.latency_s + 2 * 3 / 4 * t.nbytes / ax.bandwidth_Bps)
