"""Bad model inputs (FAILURES.md 1-8, 10, 15, 16, 24): a clear, located error, never a crash or a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bmc.errors import ModelError, UsageError
from bmc.frontend.onnx import import_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
ROOT = Path(__file__).resolve().parents[2]


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def vi(name, dtype=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dtype, shape)


def raw_tensor(name, dims, raw):
    """A float tensor proto with raw bytes as given (helper.make_tensor refuses inconsistent sizes itself)."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    t.raw_data = raw
    return t


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "bmc", *args], capture_output=True, text=True, env=env, timeout=120)


# 1 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"this is not a protobuf \xff\xfe", None])
def test_not_a_valid_model(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content is None:  # truncated real model
        content = (FIXTURES / "gpt2_legacy.onnx").read_bytes()[:5000]
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        import_model(path)


def test_cli_reports_invalid_model_without_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    r = run_cli("compile", str(bad), "-o", str(tmp_path / "out.bmc"))
    assert r.returncode == ModelError.exit_code
    assert "not a valid ONNX model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.bmc").exists()


# 2 ---------------------------------------------------------------------------------------------------------------
def test_dangling_input_names_the_node():
    m = make_model([helper.make_node("Relu", ["nowhere"], ["y"], name="relu_1")], [vi("x")], [vi("y")])
    with pytest.raises(ModelError, match=r"'relu_1'.*'nowhere' is not a graph input"):
        import_model(m)


def test_cycle_is_reported_with_its_path():
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="n_a"),
             helper.make_node("Relu", ["a"], ["b"], name="n_b"),
             helper.make_node("Relu", ["b"], ["c"], name="n_c")]
    with pytest.raises(ModelError, match=r"cycle: .*n_a.*n_b.*n_c"):
        import_model(make_model(nodes, [vi("x")], [vi("c")]))


def test_duplicate_outputs_are_reported():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r1"), helper.make_node("Neg", ["x"], ["y"], name="r2")]
    with pytest.raises(ModelError, match="'y' is produced more than once"):
        import_model(make_model(nodes, [vi("x")], [vi("y")]))


# 3 ---------------------------------------------------------------------------------------------------------------
def test_opset_too_new_and_too_old():
    node = helper.make_node("Relu", ["x"], ["y"])
    with pytest.raises(ModelError, match=r"opset 99 is newer than supported \(bmc supports opsets 7\.\."):
        import_model(make_model([node], [vi("x")], [vi("y")], opset=99))
    with pytest.raises(ModelError, match="(?s)older than supported.*Relu was redefined.*version_converter"):
        import_model(make_model([node], [vi("x")], [vi("y")], opset=3))  # Relu-1 had consumed_inputs
    # an old model of ops unchanged since (Not-1 is still Not at opset 7) imports
    not_node = helper.make_node("Not", ["b"], ["c"])
    graph = import_model(make_model([not_node], [vi("b", TensorProto.BOOL)], [vi("c", TensorProto.BOOL)], opset=1))
    assert [n.op for n in graph.nodes] == ["logical_not"]


# 4 ---------------------------------------------------------------------------------------------------------------
def test_all_unsupported_ops_in_one_error():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok"),
             helper.make_node("DeformConv", ["a"], ["b"], name="hm1"),
             helper.make_node("Det", ["b"], ["c"], name="det1"),
             helper.make_node("DeformConv", ["c"], ["d"], name="hm2"),
             helper.make_node("FusedThing", ["d"], ["e"], name="custom1", domain="com.example")]
    m = make_model(nodes, [vi("x")], [vi("e")])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelError) as e:
        import_model(m)
    msg = str(e.value)
    assert "4 node(s) use 3 unsupported op(s)" in msg
    assert "DeformConv ×2: hm1, hm2" in msg and "Det ×1: det1" in msg and "com.example::FusedThing ×1: custom1" in msg


# 5 ---------------------------------------------------------------------------------------------------------------
def test_unsupported_attribute_names_node_and_attribute():
    node = helper.make_node("LpPool", ["x"], ["y"], name="lp1", kernel_shape=[2, 2], ceil_mode=1)
    m = make_model([node], [vi("x", shape=(1, 1, 5, 5))], [vi("y", shape=(1, 1, 3, 3))], opset=18)
    with pytest.raises(ModelError, match="'lp1'.*ceil_mode=1"):
        import_model(m)


def test_a_size_computed_from_input_values_names_the_input():
    """A split whose sizes are summed from an input's values (a mixture's tokens per expert): data-dependent, so
    the error names the input and says to export it statically, not to bind shapes (every shape is bound)."""
    nodes = [helper.make_node("ReduceSum", ["counts", "axis0"], ["sizes"], keepdims=0),
             helper.make_node("Split", ["x", "sizes"], ["a", "b"], name="split_by_counts", axis=1)]
    axis0 = numpy_helper.from_array(np.array([0], np.int64), "axis0")
    m = make_model(nodes, [vi("x", shape=(2, 6)), vi("counts", TensorProto.INT64, (3, 2))],
                   [vi("a", shape=None), vi("b", shape=None)], [axis0], opset=18)
    with pytest.raises(ModelError, match="'split_by_counts'.*computed at run time from the values of graph input "
                                         "'counts'") as info:
        import_model(m)
    assert "export the model so that this is a constant" in str(info.value)


# 6, 7 -------------------------------------------------------------------------------------------------------------
def test_initializer_byte_length_mismatch():
    w = raw_tensor("w", (3, 4), b"\x00" * 40)  # needs 48 bytes
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x")], [vi("y", shape=(2, 4))], [w])
    with pytest.raises(ModelError, match=r"'w'.*raw data has 40 bytes but dims \(3, 4\) of float32 need 48"):
        import_model(m)


def test_absurd_sizes_rejected_before_allocation():
    w = raw_tensor("w", (1 << 30, 1 << 30, 4), b"")
    m = make_model([helper.make_node("Relu", ["w"], ["y"])], [], [vi("y")], [w])
    with pytest.raises(ModelError, match="over the limit"):
        import_model(m)


def test_an_intermediate_of_absurd_size_names_its_node():
    shape = numpy_helper.from_array(np.array([1 << 29, 1 << 28], np.int64), "shape")
    m = make_model([helper.make_node("Expand", ["x", "shape"], ["y"], name="too_big")], [vi("x", shape=(1, 1))],
                   [vi("y", shape=None)], [shape])
    with pytest.raises(ModelError, match=r"more than the limit") as e:
        import_model(m)
    assert "too_big" in str(e.value)


def test_a_batched_mixture_of_experts_far_larger_than_memory_imports_fused():
    """The exporters' batched experts gather every routed row's expert weights: at 2^29 tokens (2 experts a token)
    an intermediate of 2^43 elements, beyond what a stored tensor may have. It is never allocated: the import
    infers it and the fusion turns each gather + product into a ``gather_matmul``, whose result is 2^36."""
    import importlib.util

    from bmc.compiler import import_graph
    from bmc.ir.types import MAX_ELEMENTS

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "moe.py"
    spec = importlib.util.spec_from_file_location("bmc_benchmarks_moe", path)
    moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moe)
    model = moe.hf_moe(moe.moe_weights(1, 64, 64, 2))
    assert max(v.type.numel for v in import_model(model, {"M": 1 << 29}).values()) > MAX_ELEMENTS
    graph = import_graph(model, {"M": 1 << 29})
    assert graph.op_counts()["gather_matmul"] == 2
    assert max(v.type.numel for v in graph.values()) <= MAX_ELEMENTS


# 8, 9, 10 ---------------------------------------------------------------------------------------------------------
W_SHAPE = (3, 1024)  # large enough to stay a lazily loaded weight, not a folded constant
W_DATA = np.arange(3 * 1024, dtype=np.float32)


def external_model(tmp_path, location, data=W_DATA, offset=0, extra_keys=()):
    w = numpy_helper.from_array(np.zeros(W_SHAPE, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in [("location", location), ("offset", str(offset)), ("length", str(W_DATA.nbytes)), *extra_keys]:
        e = w.external_data.add()
        e.key, e.value = k, v
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x")], [vi("y", shape=(2, 1024))],
                   [w])
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    if data is not None:
        (d / "w.bin").write_bytes(data.tobytes())
    onnx.save(m, d / "m.onnx")
    return d / "m.onnx"


def test_external_data_is_memory_mapped_not_loaded(tmp_path):
    from bmc.ir.tensor import ExternalTensor

    g = import_model(external_model(tmp_path, "w.bin"))
    assert isinstance(g.weights["w"], ExternalTensor)
    assert isinstance(g.weights["w"].numpy(), np.memmap)
    np.testing.assert_array_equal(g.weights["w"].numpy(), W_DATA.reshape(W_SHAPE))


def test_missing_external_file(tmp_path):
    with pytest.raises(ModelError, match=r"'w'.*external data file 'w.bin' is missing"):
        import_model(external_model(tmp_path, "w.bin", data=None))


def test_external_data_too_short(tmp_path):
    with pytest.raises(ModelError, match="does not fit"):
        import_model(external_model(tmp_path, "w.bin", data=np.zeros(5, np.float32)))
    with pytest.raises(ModelError, match="does not fit"):
        import_model(external_model(tmp_path, "w.bin", offset=8))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_location_leaving_the_folder_is_refused(tmp_path, location):
    with pytest.raises(ModelError, match="leaves the model folder"):
        import_model(external_model(tmp_path, location))


def test_external_symlink_leaving_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(W_DATA.tobytes())
    path = external_model(tmp_path, "link.bin")
    (path.parent / "link.bin").symlink_to(outside)
    with pytest.raises(ModelError, match="symlink"):
        import_model(path)


def test_unknown_external_keys_are_rejected(tmp_path):
    with pytest.raises(ModelError, match="unknown key.*evil"):
        import_model(external_model(tmp_path, "w.bin", extra_keys=[("evil", "1")]))


# 15 ---------------------------------------------------------------------------------------------------------------
def test_unsupported_dtype_names_dtype_and_place():
    m = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", TensorProto.COMPLEX64)],
                   [vi("y", TensorProto.COMPLEX64)])
    with pytest.raises(ModelError, match="dtype complex64 is not supported for graph inputs"):
        import_model(m)
    m = make_model([helper.make_node("Cast", ["x"], ["y"], name="c8", to=TensorProto.COMPLEX128)], [vi("x")],
                   [vi("y", TensorProto.COMPLEX128)])
    with pytest.raises(ModelError, match="dtype complex128 is not supported for Cast"):
        import_model(m)


# 16, 17 -----------------------------------------------------------------------------------------------------------
def test_unbound_dynamic_dims_are_listed_with_the_flag():
    with pytest.raises(UsageError) as e:
        import_model(FIXTURES / "bert_legacy.onnx")
    msg = str(e.value)
    assert "input_ids[0] (batch)" in msg and "attention_mask[1] (seq)" in msg and "--input-shape" in msg


def test_binding_a_nonexistent_input_lists_the_real_ones():
    with pytest.raises(UsageError, match="inputs are input_ids, attention_mask"):
        import_model(FIXTURES / "bert_legacy.onnx", {"tokens": (2, 16)})


def test_inconsistent_bound_shape_names_the_node():
    x, y = vi("x", shape=("n", 3)), vi("y", shape=("n", 3))
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    m = make_model([helper.make_node("Add", ["x", "y"], ["z"], name="add_xy")], [x, y], [z])
    with pytest.raises(ModelError, match=r"'add_xy'.*do not broadcast"):
        import_model(m, {"x": (2, 3), "y": (4, 3)})


# 24 ---------------------------------------------------------------------------------------------------------------
def test_output_path_equal_to_input_is_refused(tmp_path):
    import bmc

    model = tmp_path / "m.onnx"
    model.write_bytes((FIXTURES / "gpt2_legacy.onnx").read_bytes())
    with pytest.raises(UsageError, match="output path is the input model"):
        bmc.compile(model, model)
    assert model.read_bytes() == (FIXTURES / "gpt2_legacy.onnx").read_bytes()


# 19, 20 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh", ["8x0", "0x8", "-2x4", "8x", "x", "8*8", "2.5", "2x2x2x2x2"])
def test_bad_mesh_is_a_usage_error_with_grammar(mesh):
    from bmc.sharding.mesh import Mesh

    with pytest.raises(UsageError, match=r"(?s)--mesh: invalid mesh .*SIZE\[xSIZE\.\.\.\]"):
        Mesh.parse(mesh)


def test_mesh_axes_must_match_rank_and_be_distinct():
    from bmc.sharding.mesh import Mesh

    assert Mesh.parse("2x4", "dp,tp").names == ("dp", "tp")
    with pytest.raises(UsageError, match="--mesh-axes names 3 axes"):
        Mesh.parse("2x4", "a,b,c")
    with pytest.raises(UsageError, match="repeat a name"):
        Mesh.parse("2x4", "a,a")
