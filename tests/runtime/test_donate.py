"""Donated inputs (``--donate``): a scatter that is a donated input's only reader writes into the input's buffer, and
the output it makes is the caller's array. Numerics against onnxruntime, the aliasing itself (``is``), the cases that
cannot run in place (a warning, and the program still right), the artifact's checks, the CLI flag, a CUDA build.
The real-MPI decoding loop with a donated cache is in ``test_mpi.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bmc
from bmc.codegen.inplace import donated_updates
from bmc.compiler import import_graph
from bmc.errors import ArtifactError, UsageError

ROOT = Path(__file__).resolve().parents[2]
DECODING = ROOT / "tests" / "fixtures" / "decoding"  # scripts/export_decoder_step.py
vi = helper.make_tensor_value_info


def _aligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` in 64-byte-aligned memory (what the runtime reads in place)."""
    raw = np.empty(a.nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _scatter_elements(shape, idx_shape, axis):
    return _model([helper.make_node("ScatterElements", ["data", "idx", "upd"], ["out"], axis=axis)],
                  [vi("data", TensorProto.FLOAT, shape), vi("idx", TensorProto.INT64, idx_shape),
                   vi("upd", TensorProto.FLOAT, idx_shape)], [vi("out", TensorProto.FLOAT, shape)])


def _scatter_nd(shape, idx_shape, upd_shape):
    return _model([helper.make_node("ScatterND", ["data", "idx", "upd"], ["out"])],
                  [vi("data", TensorProto.FLOAT, shape), vi("idx", TensorProto.INT64, idx_shape),
                   vi("upd", TensorProto.FLOAT, upd_shape)], [vi("out", TensorProto.FLOAT, shape)])


CASES = {
    # a cache [b, h, len, d] written at one position of each row, with negative positions among them
    "elements-axis2": (_scatter_elements([2, 4, 8, 3], [2, 4, 1, 3], 2),
                       lambda r: r.choice([1, -2, 5, -8], size=(2, 4, 1, 3))),
    "elements-axis0": (_scatter_elements([6, 5], [2, 5], 0), lambda r: np.array([[0, 1, 2, 3, 4], [-1, 5, -6, 2, 0]])),
    "nd-rows": (_scatter_nd([8, 3], [2, 1], [2, 3]), lambda r: np.array([[1], [-2]])),
    "nd-elements": (_scatter_nd([4, 5], [3, 2], [3]), lambda r: np.array([[0, 0], [3, -1], [-2, 2]])),
    "nd-one-element": (_scatter_nd([4, 5], [2], []), lambda r: np.array([2, 3])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scatters_written_in_place_match_onnxruntime(tmp_path, case):
    """Each in-place kernel (``bmc.codegen.inplace.scatter_kernel``) gives onnxruntime's output, and the output is
    the caller's own array, now holding it."""
    import onnxruntime as ort

    model, indices = CASES[case]
    rng = np.random.default_rng(0)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    data = rng.standard_normal(shapes["data"]).astype(np.float32)
    idx = np.asarray(indices(rng), np.int64).reshape(shapes["idx"])
    upd = rng.standard_normal(shapes["upd"]).astype(np.float32)
    (want,) = ort.InferenceSession(model.SerializeToString()).run(None, {"data": data, "idx": idx, "upd": upd})
    bmc.compile(model, tmp_path / "m.bmc", donate=["data"])
    m = bmc.load(tmp_path / "m.bmc")
    assert m.signature["inputs"][0]["donated"] and m.signature["outputs"][0]["aliases"] == "data"
    assert m.manifest["format_version"] == 4
    given = _aligned(data)
    out = m(given, idx, upd)
    np.testing.assert_array_equal(out, want)
    assert out is given


@st.composite
def _scatter_case(draw):
    """A ScatterElements or ScatterND of random shape with distinct targets (repeated ones are undefined in ONNX),
    negative indices among them, as (model, inputs)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    if draw(st.booleans()):
        axis = draw(st.integers(-len(shape), len(shape) - 1))
        upd_shape = [draw(st.integers(1, n)) for n in shape]
        n = shape[axis]
        upd_shape[axis] = draw(st.integers(1, n))
        # per line along the axis, distinct positions: the first entries of a permutation of the axis
        perm = np.argsort(rng.random((*upd_shape[:axis % len(shape)], n, *upd_shape[axis % len(shape) + 1:])),
                          axis=axis)
        idx = np.take(perm, np.arange(upd_shape[axis]), axis=axis)
        idx = np.where(rng.random(idx.shape) < 0.5, idx - n, idx)
        model = _scatter_elements(shape, list(idx.shape), axis)
    else:
        depth = draw(st.integers(1, len(shape)))
        cells = int(np.prod(shape[:depth]))
        count = draw(st.integers(1, min(cells, 6)))
        flat = rng.choice(cells, size=count, replace=False)
        idx = np.stack(np.unravel_index(flat, shape[:depth]), axis=-1)
        idx = np.where(rng.random(idx.shape) < 0.5, idx - np.array(shape[:depth]), idx)
        upd_shape = [count, *shape[depth:]]
        model = _scatter_nd(shape, list(idx.shape), upd_shape)
    data = rng.standard_normal(shape).astype(np.float32)
    return model, {"data": data, "idx": idx.astype(np.int64), "upd": rng.standard_normal(upd_shape).astype(np.float32)}


@settings(max_examples=12, deadline=None, derandomize=True)
@given(case=_scatter_case(), donate=st.booleans())
def test_random_scatters_match_onnxruntime(tmp_path_factory, case, donate):
    """bmc's scatter kernels, in place or into a copy, on random shapes, axes, depths and (negative) indices."""
    import onnxruntime as ort

    model, inputs = case
    (want,) = ort.InferenceSession(model.SerializeToString()).run(None, inputs)
    out = tmp_path_factory.mktemp("scatter") / "m.bmc"
    bmc.compile(model, out, donate=["data"] if donate else ())
    fed = {**inputs, "data": _aligned(inputs["data"])}
    got = bmc.load(out).run(fed)["out"]
    np.testing.assert_array_equal(got, want)
    assert (got is fed["data"]) == donate


def test_an_index_out_of_range_writes_nothing(tmp_path):
    """ONNX leaves an out-of-range index undefined; in place it must not write past the buffer: it writes nothing."""
    bmc.compile(_scatter_elements([3, 4], [1, 4], 0), tmp_path / "m.bmc", donate=["data"])
    data = _aligned(np.zeros((3, 4), np.float32))
    out = bmc.load(tmp_path / "m.bmc")(data, np.array([[0, 3, -4, 2]]), np.ones((1, 4), np.float32))
    np.testing.assert_array_equal(out, [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])


def test_a_decoding_loop_with_a_donated_cache_matches_onnxruntime(tmp_path):
    """The exported decoding step (both caches donated): five steps equal onnxruntime's outputs and caches, and from
    the first step on the caches returned are the arrays passed in (the first step's zeros were copied: numpy's
    allocation is not 64-byte aligned in general, so the runtime may not write into it; it hands back its own)."""
    data = np.load(DECODING / "decstep_dynamo.npz")
    out = tmp_path / "dec.bmc"
    bmc.compile(DECODING / "decstep_dynamo.onnx", out, donate=["*_cache"])
    m = bmc.load(out)
    assert [o.get("aliases") for o in m.signature["outputs"]] == [None, "k_cache", "v_cache"]
    k = np.zeros(data["output:k_cache"].shape, np.float32)
    v = np.zeros_like(k)
    for i in range(5):
        got = m.run({"x": data[f"x{i}"], "pos": np.array([i]), "k_cache": k, "v_cache": v})
        if i > 0:
            assert got["k_cache_out"] is k and got["v_cache_out"] is v, i
        k, v = got["k_cache_out"], got["v_cache_out"]
        assert float(np.max(np.abs(got["y"] - data[f"output:y{i}"]))) <= 1e-5, i
    np.testing.assert_allclose(k, data["output:k_cache"], atol=1e-6)
    np.testing.assert_allclose(v, data["output:v_cache"], atol=1e-6)


def test_a_decoding_loop_on_device_tensors_writes_the_callers_caches(tmp_path):
    """The same loop with the caches as TVM tensors (DLPack) and ``outputs="device"``, as a GPU loop keeps them on
    its GPU: every step writes into the very memory passed and returns tensors on it, fed back as they are; five
    steps equal onnxruntime's."""
    import tvm

    data = np.load(DECODING / "decstep_dynamo.npz")
    bmc.compile(DECODING / "decstep_dynamo.onnx", tmp_path / "dec.bmc", donate=["*_cache"])
    m = bmc.load(tmp_path / "dec.bmc")
    shape = data["output:k_cache"].shape
    k, v = (tvm.runtime.empty(shape, "float32", tvm.cpu()).copyfrom(np.zeros(shape, np.float32)) for _ in "kv")
    memory = (k.data_ptr(), v.data_ptr())
    for i in range(5):
        got = m.run({"x": data[f"x{i}"], "pos": np.array([i]), "k_cache": k, "v_cache": v}, outputs="device")
        k, v = got["k_cache_out"], got["v_cache_out"]
        assert isinstance(got["y"], tvm.runtime.Tensor) and (k.data_ptr(), v.data_ptr()) == memory, i
        assert float(np.max(np.abs(got["y"].numpy() - data[f"output:y{i}"]))) <= 1e-5, i
    np.testing.assert_allclose(k.numpy(), data["output:k_cache"], atol=1e-6)
    np.testing.assert_allclose(v.numpy(), data["output:v_cache"], atol=1e-6)


def test_a_bfloat16_cache_passed_and_donated(tmp_path):
    """The decoding step run in bfloat16 with its caches passed in bfloat16 too (``--dtype-io``) and donated: the
    caches are ml_dtypes arrays written in place (no float32 copy of them anywhere), and five steps stay within
    bfloat16's 1e-2 of onnxruntime's float32 outputs and caches."""
    import ml_dtypes

    data = np.load(DECODING / "decstep_dynamo.npz")
    bmc.compile(DECODING / "decstep_dynamo.onnx", tmp_path / "dec.bmc", dtype="bfloat16", dtype_io=["*_cache*"],
                donate=["*_cache"])
    m = bmc.load(tmp_path / "dec.bmc")
    assert [(i["dtype"], i.get("donated")) for i in m.signature["inputs"]] == [
        ("float32", None), ("int64", None), ("bfloat16", True), ("bfloat16", True)]
    assert [o["dtype"] for o in m.signature["outputs"]] == ["float32", "bfloat16", "bfloat16"]
    k = _aligned(np.zeros(data["output:k_cache"].shape, ml_dtypes.bfloat16))
    v = _aligned(np.zeros_like(k))
    for i in range(5):
        got = m.run({"x": data[f"x{i}"], "pos": np.array([i]), "k_cache": k, "v_cache": v})
        assert got["k_cache_out"] is k and got["v_cache_out"] is v, i
        want = data[f"output:y{i}"]
        assert float(np.abs(got["y"] - want).max()) <= 1e-2 * float(np.abs(want).max()), i
    for name, got in (("k_cache", k), ("v_cache", v)):
        want = data[f"output:{name}"]
        assert float(np.abs(got.astype(np.float32) - want).max()) <= 1e-2 * float(np.abs(want).max()), name


LLAMA_CACHES = [f"{kv}_cache_{i}" for i in range(2) for kv in "kv"]


def _llama_steps(artifact, data, dtype=np.float32, **load) -> tuple[list[np.ndarray], dict, bool]:
    """Five steps of the exported Llama step from empty caches: (each step's logits, the last caches, whether every
    step from the second on returned the very cache arrays it was given)."""
    m = bmc.load(artifact, **load)
    caches = {c: _aligned(np.zeros(data[f"output:{c}"].shape, dtype)) for c in LLAMA_CACHES}
    logits, same = [], True
    for i in range(5):
        got = m.run({"ids": data[f"ids{i}"], "pos": np.array([i]), **caches})
        same &= i == 0 or all(got[c + "_out"] is caches[c] for c in LLAMA_CACHES)
        caches = {c: got[c + "_out"] for c in LLAMA_CACHES}
        logits.append(got["logits"])
    return logits, caches, same


def _relative(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_an_exported_llama_step_with_donated_caches_matches_onnxruntime(tmp_path, exporter):
    """A 2-layer Llama-shaped decoding step (grouped-query attention, rotary embeddings, per-layer caches written
    with ``index_copy``: ScatterElements from the legacy exporter, transpose + ScatterND + transpose from dynamo,
    which :func:`bmc.ops.fusion.untranspose_scatters` makes one ScatterElements) with all four caches donated: five
    steps equal onnxruntime, each cache written in place; also on 2 simulated devices with the caches split over the
    key/value heads, and on 4 with each device's query head reading its one key/value head from the whole caches
    (only the sublayers' all-reduces, nothing gathered)."""
    data = np.load(DECODING / f"llamastep_{exporter}.npz")
    bmc.compile(DECODING / f"llamastep_{exporter}.onnx", tmp_path / "one.bmc", donate=["*_cache_*"])
    logits, caches, same = _llama_steps(tmp_path / "one.bmc", data)
    assert same
    heads = "[{}, {x}, {}, {}]"
    bmc.compile(DECODING / f"llamastep_{exporter}.onnx", tmp_path / "two.bmc", mesh="2", strategy="megatron",
                donate=["*_cache_*"], input_shards={c: heads for c in LLAMA_CACHES},
                output_shards={c + "_out": heads for c in LLAMA_CACHES})
    plan = json.loads((tmp_path / "two.bmc" / "plan.json").read_text())
    assert not any("cache" in c["value"] for c in plan["collectives"]), plan["collectives"]
    split_logits, split_caches, _ = _llama_steps(tmp_path / "two.bmc", data, simulate=True)
    bmc.compile(DECODING / f"llamastep_{exporter}.onnx", tmp_path / "four.bmc", mesh="4", strategy="megatron",
                donate=["*_cache_*"])
    plan = json.loads((tmp_path / "four.bmc" / "plan.json").read_text())
    assert [c["kind"] for c in plan["collectives"] if c["value"] != "logits"] == ["all_reduce"] * 4
    four = _llama_steps(tmp_path / "four.bmc", data, simulate=True)[:2]
    for run_logits, run_caches in ((logits, caches), (split_logits, split_caches), four):
        for i, got in enumerate(run_logits):
            assert _relative(got, data[f"output:logits{i}"]) <= 1e-5, i
        for c in LLAMA_CACHES:
            np.testing.assert_allclose(run_caches[c], data[f"output:{c}"], atol=1e-5)


def test_untranspose_scatters_leaves_the_reference_unchanged():
    """The dynamo export's cache updates become one ScatterElements each, no transpose of a cache is left, and the
    reference interpreter gives the same logits and caches before and after the rewrite."""
    from bmc.frontend.onnx import import_model
    from bmc.ops.fusion import untranspose_scatters
    from bmc.testing.reference import run_reference

    data = np.load(DECODING / "llamastep_dynamo.npz")
    graph = import_model(str(DECODING / "llamastep_dynamo.onnx"))
    feeds = {"ids": data["ids0"], "pos": np.array([3]),
             **{c: np.random.default_rng(0).standard_normal(data[f"output:{c}"].shape).astype(np.float32)
                for c in LLAMA_CACHES}}
    want = run_reference(graph, feeds)
    assert graph.op_counts()["scatter_nd"] == 4
    after = untranspose_scatters(graph)
    counts = after.op_counts()
    assert counts["scatter_elements"] == 4 and "scatter_nd" not in counts
    assert not any(n.op == "transpose" and n.inputs[0].name in LLAMA_CACHES for n in after.nodes)
    got = run_reference(after, feeds)
    for v in after.outputs:
        np.testing.assert_array_equal(got[v.name], want[v.name])


def test_sixteen_bit_llama_caches_passed_in_their_precision(tmp_path):
    """``--dtype-io`` moves only where the cache is rounded: a bfloat16 step with bfloat16 caches in and out (and
    donated) gives exactly the logits of the same step with float32 caches; float16 stays within 1e-2 of
    onnxruntime's float32."""
    import ml_dtypes

    data = np.load(DECODING / "llamastep_dynamo.npz")
    model = DECODING / "llamastep_dynamo.onnx"
    bmc.compile(model, tmp_path / "bf.bmc", dtype="bfloat16")
    bmc.compile(model, tmp_path / "bf_io.bmc", dtype="bfloat16", dtype_io=["*_cache_*"], donate=["*_cache_*"])
    bmc.compile(model, tmp_path / "fp_io.bmc", dtype="float16", dtype_io=["*_cache_*"], donate=["*_cache_*"])
    plain, _, _ = _llama_steps(tmp_path / "bf.bmc", data)
    narrow, caches, same = _llama_steps(tmp_path / "bf_io.bmc", data, ml_dtypes.bfloat16)
    assert same and all(a.dtype == ml_dtypes.bfloat16 for a in caches.values())
    for a, b in zip(plain, narrow):
        np.testing.assert_array_equal(a, b)
    half, _, same = _llama_steps(tmp_path / "fp_io.bmc", data, np.float16)
    assert same
    for i, got in enumerate(half):
        assert _relative(got, data[f"output:logits{i}"]) <= 1e-2, i


def test_inputs_the_program_cannot_write_into_are_copied(tmp_path):
    """A read-only array, and one array passed as both caches, are not written into (the runtime copies them), and
    the results are still right; the caller's arrays keep their values."""
    data = np.load(DECODING / "decstep_dynamo.npz")
    bmc.compile(DECODING / "decstep_dynamo.onnx", tmp_path / "dec.bmc", donate=["k_cache", "v_cache"])
    m = bmc.load(tmp_path / "dec.bmc")
    inputs = {"x": data["x0"], "pos": np.array([0])}
    zeros = _aligned(np.zeros(data["output:k_cache"].shape, np.float32))
    shared = m.run({**inputs, "k_cache": zeros, "v_cache": zeros})  # one array for both: neither is written
    assert not zeros.any()
    frozen = _aligned(np.zeros_like(zeros))
    frozen.flags.writeable = False
    ro = m.run({**inputs, "k_cache": frozen, "v_cache": _aligned(np.zeros_like(zeros))})
    assert not frozen.any()
    for got in (shared, ro):
        assert float(np.max(np.abs(got["y"] - data["output:y0"]))) <= 1e-5
        assert got["k_cache_out"][:, :, 0].any() and not got["k_cache_out"][:, :, 1:].any()


def test_a_sharded_program_writes_each_devices_block_in_place(tmp_path):
    """Megatron on 2 simulated devices with the caches fed and returned as head blocks and donated: the in-place
    kernels run on each device's block, and five steps equal onnxruntime (simulated ranks never write into the
    caller's arrays: they share them)."""
    data = np.load(DECODING / "decstep_legacy.npz")
    heads = "[{}, {x}, {}, {}]"
    out = tmp_path / "dec.bmc"
    bmc.compile(DECODING / "decstep_legacy.onnx", out, mesh="2", strategy="megatron", donate=["k_cache", "v_cache"],
                input_shards={"k_cache": heads, "v_cache": heads},
                output_shards={"k_cache_out": heads, "v_cache_out": heads})
    m = bmc.load(out, simulate=True)
    assert [o.get("aliases") for o in m.signature["outputs"]] == [None, "k_cache", "v_cache"]
    k = v = _aligned(np.zeros(data["output:k_cache"].shape, np.float32))
    for i in range(5):
        got = m.run({"x": data[f"x{i}"], "pos": np.array([i]), "k_cache": k, "v_cache": v})
        k, v = got["k_cache_out"], got["v_cache_out"]
        assert float(np.max(np.abs(got["y"] - data[f"output:y{i}"]))) <= 1e-5, i
    np.testing.assert_allclose(k, data["output:k_cache"], atol=1e-6)


def _graph(nodes, inputs, outputs, inits=()):
    return import_graph(_model(nodes, inputs, outputs, inits))


CACHE = vi("cache", TensorProto.FLOAT, [4, 3])
ROW = [vi("idx", TensorProto.INT64, [1, 3]), vi("new", TensorProto.FLOAT, [1, 3])]


@pytest.mark.parametrize("nodes, outputs, reason", [
    ([helper.make_node("ScatterElements", ["cache", "idx", "new"], ["out"]),
      helper.make_node("ReduceSum", ["cache"], ["total"], keepdims=0)],
     ["out", "total"], "read by 2 nodes"),
    ([helper.make_node("ScatterElements", ["cache", "idx", "new"], ["out"], reduction="add")],
     ["out"], "reduction='add'"),
    ([helper.make_node("Relu", ["cache"], ["out"])], ["out"], "only reader is a relu node"),
    ([helper.make_node("Relu", ["new"], ["out"])], ["out"], "nothing reads it"),
])
def test_why_a_donated_input_is_not_written_in_place(nodes, outputs, reason):
    shapes = {"out": [1, 3] if nodes[0].input[0] == "new" else [4, 3], "total": []}
    graph = _graph(nodes, [CACHE, *ROW], [vi(o, TensorProto.FLOAT, shapes[o]) for o in outputs])
    got = donated_updates(graph, ["cache"])
    assert not got.updates and not got.aliases and reason in got.unused["cache"], got.unused


def test_an_input_that_is_also_an_output_is_not_written_in_place():
    """(The ONNX importer makes such an output a copy; a graph built directly can return the input itself.)"""
    from bmc.ir.types import TensorType
    from bmc.ops.builder import GraphBuilder

    b = GraphBuilder("g")
    cache = b.input("cache", TensorType("float32", (4, 3)))
    idx, new = b.input("idx", TensorType("int64", (1, 3))), b.input("new", TensorType("float32", (1, 3)))
    out = b.emit1("scatter_elements", [cache, idx, new], "out", axis=0, reduction="none")
    got = donated_updates(b.finish([out, cache]), ["cache"])
    assert not got.updates and "returned as an output" in got.unused["cache"]


def test_a_donated_input_that_cannot_be_written_is_a_warning_and_still_right(tmp_path, capsys):
    """The cache also read by a ReduceSum: a warning says why, nothing is donated (format 1), the outputs are right
    and the caller's array is untouched."""
    model = _model([helper.make_node("ScatterElements", ["cache", "idx", "new"], ["out"]),
                    helper.make_node("ReduceSum", ["cache"], ["total"], keepdims=0)], [CACHE, *ROW],
                   [vi("out", TensorProto.FLOAT, [4, 3]), vi("total", TensorProto.FLOAT, [])])
    bmc.compile(model, tmp_path / "m.bmc", donate=["cache"])
    assert "--donate cache: not written in place: it is read by 2 nodes" in capsys.readouterr().err
    m = bmc.load(tmp_path / "m.bmc")
    assert m.manifest["format_version"] == 1 and "donated" not in m.signature["inputs"][0]
    cache = _aligned(np.arange(12, dtype=np.float32).reshape(4, 3))
    out, total = m(cache, np.array([[1, 2, 3]]), np.ones((1, 3), np.float32))
    assert total == 66  # the sum of the cache as given
    np.testing.assert_array_equal(cache, np.arange(12).reshape(4, 3))
    assert out[1, 0] == 1 and out[2, 1] == 1 and out[3, 2] == 1


def test_a_split_input_read_whole_says_to_feed_blocks(tmp_path, capsys):
    """On 2 devices with the cache split over heads but fed whole, each device cuts its block first: the warning
    names --input-shard as the fix."""
    bmc.compile(DECODING / "decstep_legacy.onnx", tmp_path / "dec.bmc", mesh="2", strategy="megatron",
                shard={"k_cache": "[{}, {x}, {}, {}]"}, donate=["k_cache"])
    err = capsys.readouterr().err
    assert "--donate k_cache: not written in place" in err and "--input-shard" in err, err


@pytest.mark.parametrize("donate, options, match", [
    (["kv_*"], {}, "matches no input"),
    (["k_cach"], {}, "did you mean 'k_cache'"),
    (["k_cache"], {"mesh": "2", "stages": 2}, "for a single program"),
    ((), {"mesh": "2", "stages": 2, "dtype": "bfloat16", "dtype_io": ["k_cache"]}, "for a single program"),
])
def test_bad_donations_are_usage_errors(tmp_path, donate, options, match):
    with pytest.raises(UsageError, match=match) as info:
        bmc.compile(DECODING / "decstep_legacy.onnx", tmp_path / "m.bmc", donate=donate, **options)
    assert info.value.where == ("--donate" if donate else "--dtype-io")
    assert not (tmp_path / "m.bmc").exists()


def test_an_alias_of_an_input_not_donated_is_refused_at_load(tmp_path):
    bmc.compile(_scatter_nd([8, 3], [2, 1], [2, 3]), tmp_path / "m.bmc", donate=["data"])
    path = tmp_path / "m.bmc" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["signature"]["inputs"][0]["donated"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="aliases 'data', which is not a donated input"):
        bmc.load(tmp_path / "m.bmc")


def test_the_cli_flag(tmp_path):
    onnx.save(_scatter_nd([8, 3], [2, 1], [2, 3]), str(tmp_path / "m.onnx"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "bmc", "compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.bmc")]
    r = subprocess.run([*base, "--donate", "dat"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "did you mean 'data'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*base, "--donate", "d*"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "m.bmc" / "manifest.json").read_text())
    assert manifest["signature"]["outputs"][0]["aliases"] == "data" and manifest["options"]["donate"] == ["data"]


@pytest.mark.cuda
@pytest.mark.parametrize("donate", [False, True])
def test_the_scatter_kernels_compile_for_sm90(tmp_path, donate):
    """Every scatter case, in place or into a copy, becomes GPU kernels (a kernel left unscheduled would be compiled
    for the host and read device memory there), and so does the decoding step."""
    from bmc.codegen import cuda
    from bmc.errors import CompileError

    try:
        cuda.find_toolkit()
    except CompileError as e:
        pytest.skip(f"no CUDA toolkit: {e.what}")
    suffix = "_in_place" if donate else ""
    for case, (model, _) in sorted(CASES.items()):
        bmc.compile(model, tmp_path / f"{case}.bmc", target="cuda", donate=["data"] if donate else ())
        manifest = json.loads((tmp_path / f"{case}.bmc" / "manifest.json").read_text())
        names = [k["name"] for k in manifest["kernels"]["cuda"]["kernels"]]
        assert any(n.startswith(f"scatter_{case.split('-')[0]}{suffix}_kernel") for n in names), (case, names)
    bmc.compile(DECODING / "decstep_dynamo.onnx", tmp_path / "dec.bmc", target="cuda",
                donate=["*_cache"] if donate else ())
    manifest = json.loads((tmp_path / "dec.bmc" / "manifest.json").read_text())
    names = [k["name"] for k in manifest["kernels"]["cuda"]["kernels"]]
    # (the two caches' scatters are one function; into a copy it is two kernels: the copy, then the scatter)
    assert sum(n.startswith(f"scatter_elements{suffix}_kernel") for n in names) == (1 if donate else 2), names
