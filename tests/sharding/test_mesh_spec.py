"""Meshes and specs: text round-trips, validation against shapes and meshes, and an explicit 8x8 mesh run."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bmc.errors import UsageError
from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder
from bmc.sharding.mesh import Mesh, MeshAxis
from bmc.sharding.partition import partition
from bmc.sharding.propagate import propagate
from bmc.sharding.spec import Spec, SpecError, parse_spec_flag
from bmc.testing.reference import run_reference
from bmc.testing.spmd_sim import simulate


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=4))
def test_mesh_text_round_trips(sizes):
    text = "x".join(map(str, sizes))
    mesh = Mesh.parse(text)
    assert str(mesh) == text and Mesh.parse(str(mesh)) == mesh and mesh.size == int(np.prod(sizes))
    if mesh.size <= 512:  # ranks map to distinct coordinates in row-major order
        coords = [mesh.coordinate(r) for r in range(mesh.size)]
        assert coords == sorted(set(coords))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.data())
def test_spec_text_round_trips(data):
    axes = data.draw(st.permutations(["x", "y", "z", "dp", "tp"]))
    rank = data.draw(st.integers(0, 4))
    dims = [[] for _ in range(rank)]
    partial = []
    for a in axes:
        slot = data.draw(st.integers(-2, rank - 1))
        if slot >= 0:
            dims[slot].append(a)
        elif slot == -2:
            partial.append(a)
    spec = Spec(tuple(tuple(d) for d in dims), tuple(partial))
    assert Spec.parse(str(spec)) == spec


def test_spec_validation_against_shape_and_mesh():
    mesh = Mesh.parse("2x4", "dp,tp")
    Spec.parse("[{dp}, {tp}]").validate((4, 8), mesh)
    with pytest.raises(SpecError, match="not divisible by 4"):
        Spec.parse("[{}, {tp}]").validate((4, 6), mesh)
    with pytest.raises(SpecError, match="names axis x, which mesh"):
        Spec.parse("[{x}, {}]").validate((4, 8), mesh)
    with pytest.raises(SpecError, match="has 1 dims but the tensor has rank 2"):
        Spec.parse("[{dp}]").validate((4, 8), mesh)
    with pytest.raises(SpecError, match="more than once"):
        Spec.parse("[{dp}, {dp}]")
    assert Spec.parse("[{dp,tp}, {}]").local_shape((16, 3), mesh) == (2, 3)


def test_shard_flag_grammar():
    assert parse_spec_flag("a/b:0=[{x}, {}]") == ("a/b:0", Spec.parse("[{x},{}]"))
    with pytest.raises(UsageError, match="malformed --shard value"):
        parse_spec_flag("w:{x}")
    with pytest.raises(UsageError, match="not in braces"):
        parse_spec_flag("w=[x]")


def test_eight_by_eight_mesh_runs_on_the_simulator():
    rng = np.random.default_rng(0)
    b = GraphBuilder()
    x = b.input("x", TensorType("float32", (16, 32)))
    w1 = b.param("w1", rng.standard_normal((32, 64)).astype(np.float32))
    w2 = b.param("w2", rng.standard_normal((64, 32)).astype(np.float32))
    y = b.emit1("matmul", [b.emit1("gelu", [b.emit1("matmul", [x, w1])]), w2])
    graph = b.finish([b.emit1("softmax", [y], axis=-1)])
    mesh = Mesh.parse("8x8")
    plan = propagate(graph, mesh, {"x": Spec.parse("[{x},{}]"), "w1": Spec.parse("[{},{y}]"),
                                   "w2": Spec.parse("[{y},{}]")})
    prog = partition(graph, plan)
    assert [(c.kind, c.axes) for c in prog.collectives if c.node != "output"] == [("all_reduce", ("y",))]
    xin = rng.standard_normal((16, 32)).astype(np.float32)
    res = simulate(prog, {"x": xin})
    want = run_reference(graph, {"x": xin})[graph.outputs[0].name]
    np.testing.assert_allclose(res.outputs[graph.outputs[0].name], want, atol=1e-5)


@pytest.mark.parametrize("mesh_text, axis, major", [("4", "x", 2), ("2x8", "y", 4), ("2x6", "y", 3), ("8x2", "x", 2)])
def test_a_view_cuts_an_axis_without_moving_any_block(mesh_text, axis, major):
    """``Mesh.split_axis``: the axis becomes a major part of ``major`` devices and a minor rest, with its links; the
    ranks keep their order, so a spec on the mesh carried onto the view (``Spec.onto``) gives every rank the same
    block, and a spec over the major part alone gives the ranks of one major index the same block."""
    mesh = Mesh.parse(mesh_text)
    mesh = Mesh(tuple(MeshAxis(a.name, a.size, 3e-6, 7e9) for a in mesh.axes))
    view = mesh.split_axis(axis, major)
    k = mesh.names.index(axis)
    parts = (f"{axis}_0", f"{axis}_1")
    assert view.names == mesh.names[:k] + parts + mesh.names[k + 1:] and view.size == mesh.size
    assert view.parts() == {axis: parts} and view.axis(parts[0]).size == major
    assert all(view.axis(p).bandwidth_Bps == 7e9 and view.axis(p).latency_s == 3e-6 for p in parts)
    assert view.to_json()["parts"] == {axis: list(parts)} and "parts" not in mesh.to_json()
    shape = (24, mesh.size * 2)
    for spec in (Spec(((axis,), ())), Spec(((), tuple(mesh.names))), Spec.replicated(2)):
        on_view = spec.onto(view)
        assert set(on_view.axes()) <= set(view.names) and axis not in on_view.axes()
        for rank in range(mesh.size):
            assert on_view.block_slices(shape, view, view.coordinate(rank)) == \
                spec.block_slices(shape, mesh, mesh.coordinate(rank))
    major_only = Spec(((parts[0],), ()))
    blocks = {}
    for rank in range(mesh.size):
        c = view.coordinate(rank)
        blocks.setdefault(c[k], set()).add(tuple((s.start, s.stop) for s in major_only.block_slices(shape, view, c)))
    assert len(blocks) == major and all(len(b) == 1 for b in blocks.values())


def test_a_view_refuses_a_cut_that_does_not_divide_and_avoids_taken_names():
    mesh = Mesh.parse("6", "x")
    for major in (1, 4, 6):
        with pytest.raises(ValueError, match="cannot split mesh axis x"):
            mesh.split_axis("x", major)
    taken = Mesh((MeshAxis("x_0", 1), MeshAxis("x", 4)))
    assert taken.split_axis("x", 2).names == ("x_0", "x__0", "x__1")
    assert Mesh.parse("4").split_axis("x", 2).describe_parts() == "x as x_0 (2, major) by x_1 (2)"
