"""Loading and running real compiled artifacts (FAILURES.md 33, 36, 44), and the runtime's import boundary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bmc
from bmc.errors import ArtifactError, ExecutionError, UsageError
from bmc.ir.types import TensorType, np_dtype
from bmc.ops.builder import GraphBuilder
from bmc.runtime.artifact import file_digest
from bmc.runtime.executor import Model, load
from bmc.testing.reference import run_reference

REPO = Path(__file__).resolve().parents[2]


def _close(got, ref):
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    assert err <= 1e-5 * max(1.0, float(np.max(np.abs(ref)))), err


def _x(seed=1):
    return np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)


def test_outputs_match_the_reference_interpreter(tiny_artifact, tiny_graph):
    model = load(tiny_artifact)
    x = _x()
    ref = run_reference(tiny_graph, {"x": x})
    y, z = model(x)
    _close(y, ref["y"])
    _close(z, ref["z"])
    by_name = model(x=x)
    assert all(np.array_equal(a, b) for a, b in zip(by_name, (y, z)))
    outs = model.run({"x": x})
    assert list(outs) == ["y", "z"] and np.array_equal(outs["y"], y)
    assert isinstance(model, Model) and model.output_names == ["y", "z"] and model.input_names == ["x"]
    assert model.signature["params"][0] == {"name": "w", "dtype": "float32", "shape": [3, 4]}
    assert model.manifest["format"] == "bmc-artifact"


def test_repeated_calls_reuse_the_bound_weights(tiny_artifact):
    model = bmc.load(tiny_artifact)  # the public entry point
    a, b = _x(1), _x(2)
    first = model(a)[0]
    model(b)
    assert np.array_equal(model(a)[0], first)


def test_calls_from_threads_each_get_their_own_inputs_results(tiny_artifact, tiny_graph):
    """The input tensors are allocated once and refilled by every call: calls from several threads take turns, so
    none computes on another's inputs."""
    from concurrent.futures import ThreadPoolExecutor

    model = bmc.load(tiny_artifact)
    xs = [_x(seed) for seed in range(16)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda x: model(x)[0], xs))
    for x, y in zip(xs, outs):
        _close(y, run_reference(tiny_graph, {"x": x})["y"])


def test_single_output_and_non_identifier_input_name(tmp_path, build_artifact):
    b = GraphBuilder("one")
    x = b.input("input.1", TensorType("float32", (2, 3)))
    w = b.param("w", np.full((3, 2), 0.5, np.float32))
    g = b.finish([b.emit1("matmul", [x, w], "out:0")])
    model = load(build_artifact(g, tmp_path / "one.bmc"))
    x = _x()
    assert isinstance(model(x), np.ndarray)  # one output → the array itself
    outs = model.run({"input.1": x})
    _close(outs["out:0"], run_reference(g, {"input.1": x})["out:0"])
    assert np.array_equal(model(**{"input.1": x}), outs["out:0"])


def test_a_program_recompiled_into_the_same_folder_runs_its_new_code(tmp_path, build_artifact, monkeypatch):
    """dlopen keeps one library per path: after a recompile into the same folder, a second ``load`` in this
    process must run the new program (it is loaded through a copy named by its digest), and the first model keeps
    running the old one."""
    import shutil

    monkeypatch.setenv("BMC_CACHE_DIR", str(tmp_path / "cache"))
    path, x = tmp_path / "m.bmc", _x()

    def compiled(op):
        b = GraphBuilder("same")
        graph = b.finish([b.emit1(op, [b.input("x", TensorType("float32", x.shape))], "y")])
        shutil.rmtree(path, ignore_errors=True)
        return load(build_artifact(graph, path))

    first = compiled("relu")
    second = compiled("neg")
    np.testing.assert_array_equal(second(x), -x)
    np.testing.assert_array_equal(first(x), np.maximum(x, 0))
    assert len(list((tmp_path / "cache" / "programs").iterdir())) == 1


def test_python_lists_take_the_declared_dtype(tiny_artifact):
    model = load(tiny_artifact)
    x = _x()
    assert np.allclose(model(x.tolist())[0], model(x)[0])


# --- FAILURES.md 44: inputs checked against the signature, expected vs got ----------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda m, x: m(x=x.astype(np.float64)), "input 'x': expected float32\\[2,3\\], got float64\\[2,3\\]"),
    (lambda m, x: m(x[:1]), "input 'x': expected float32\\[2,3\\], got float32\\[1,3\\]"),
    (lambda m, x: m.run({"X": x}), "unknown input\\(s\\) 'X'; missing input\\(s\\) 'x'"),
    (lambda m, x: m(), "missing input\\(s\\) 'x'"),
    (lambda m, x: m(x, x), "2 positional inputs given but the model takes 1: x"),
    (lambda m, x: m(x, x=x), "given both by position and by name"),
])
def test_bad_inputs_are_refused_before_running(tiny_artifact, call, message):
    model = load(tiny_artifact)
    with pytest.raises(ExecutionError, match=message) as info:
        call(model, _x())
    assert info.value.exit_code == 7
    if "positional" not in message and "both" not in message:
        assert "the model takes x: float32[2,3]" in str(info.value)


# --- FAILURES.md 33: nothing is loaded from a damaged artifact -----------------------------------------------------
def test_corrupted_program_is_refused_by_digest_not_by_tvm(tiny_artifact):
    so = tiny_artifact / "programs/main.so"
    so.write_bytes(b"garbage, not an ELF file" * 100)
    with pytest.raises(ArtifactError, match="programs/main.so is .*(corrupted|truncated|longer)") as info:
        load(tiny_artifact)
    assert "TVM" not in str(info.value)

    # the same garbage with a matching digest does reach TVM, which fails differently: the check above came first
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    m["files"]["programs/main.so"] = file_digest(so)
    (tiny_artifact / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="TVM could not load the program"):
        load(tiny_artifact)


def test_damaged_weights_are_refused_by_the_single_reading_pass(tiny_artifact):
    """The loader hashes the weights as it reads them (one pass): a flipped byte of tensor data, which no header
    check can see, is still refused, and no model comes back."""
    weights = tiny_artifact / "weights/rank0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights/rank0.safetensors is corrupted: sha256") as info:
        load(tiny_artifact)
    assert info.value.exit_code == 6
    with pytest.raises(ArtifactError, match="weights/rank0.safetensors is corrupted"):
        load(tiny_artifact, simulate=True)


def test_weights_of_every_dtype_load_bit_exact(tmp_path, build_artifact):
    """Weights reach the device through byte views of one buffer per tensor: every dtype, empty tensors and odd
    byte counts come back bit for bit (bfloat16 via its bits)."""
    from bmc.runtime.executor import _load_weights

    b = GraphBuilder("dtypes")
    x = b.input("x", TensorType("float32", (3,)))
    rng = np.random.default_rng(0)
    values = {"f64": rng.standard_normal((2, 3)), "i8": rng.integers(-128, 127, (5,), dtype=np.int8),
              "bool": np.array([True, False, True]), "empty": np.zeros((0, 4), np.float32),
              "i64": rng.integers(-2**40, 2**40, (3,), dtype=np.int64), "f16": rng.standard_normal(7).astype(np.float16),
              "bf16": rng.standard_normal((2, 2)).astype(np_dtype("bfloat16"))}
    outs = [b.emit1("cast", [b.param(name, v)], dtype="float32", name=f"out_{name}") for name, v in values.items()]
    g = b.finish([b.emit1("add", [x, b.param("f32", np.ones(3, np.float32))], "y"), *outs])
    artifact = build_artifact(g, tmp_path / "dtypes.bmc")
    manifest = json.loads((artifact / "manifest.json").read_text())
    import tvm

    names = [p["name"] for p in manifest["signature"]["params"]]
    for staged in (False, True):  # straight into the tensors (CPU), or through host buffers (the GPU's path)
        params = dict(zip(names, _load_weights(artifact, manifest, tvm.cpu(0), staged=staged)))
        for name, v in values.items():
            got = params[name].numpy()
            assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes(), (name, staged)


def test_weights_inconsistent_with_the_signature(tiny_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    m["signature"]["params"][1]["shape"] = [5]
    (tiny_artifact / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="weight 'b' is float32\\[4\\] in the file but float32\\[5\\]"):
        load(tiny_artifact)


# --- FAILURES.md 36 (device half): an llvm artifact runs on the CPU only -----------------------------------------
def test_device_must_match_the_target(tiny_artifact):
    with pytest.raises(ArtifactError, match="compiled for target 'llvm' but device 'cuda'"):
        load(tiny_artifact, device="cuda")
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        load(tiny_artifact, device="tpu")


def test_runtime_does_not_import_the_compiler():
    code = ("import sys, bmc.runtime.executor\n"
            "bad = sorted(m for m in sys.modules if m == 'onnx' or m.startswith(('onnx.', 'bmc.frontend',"
            " 'bmc.codegen', 'bmc.sharding')))\n"
            "print(repr(bad)); assert 'tvm' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- outputs handed over without a copy, inputs read in place ---------------------------------------------------
def _aliasing_onnx():
    """Outputs of every kind: the input, a view of it, a weight, a folded constant, a product, the product again."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([8, 4], np.int64), "shape")]
    nodes = [helper.make_node("Identity", ["x"], ["same"]),
             helper.make_node("Reshape", ["x", "shape"], ["view"]),
             helper.make_node("Identity", ["w"], ["weight"]),
             helper.make_node("Constant", [], ["const"], value=numpy_helper.from_array(np.array([1.5, 2.5],
                                                                                               np.float32))),
             helper.make_node("MatMul", ["x", "w"], ["product"]),
             helper.make_node("Identity", ["product"], ["again"])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
            for n in ("same", "view", "weight", "const", "product", "again")]
    graph = helper.make_graph(nodes, "aliasing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def test_only_outputs_the_call_allocates_are_handed_over_uncopied(tmp_path):
    """An output that is a view of an input or a weight, a constant of the program, or a repeat is copied; the
    product is returned as a view of the program's own fresh tensor. Writing into every output changes neither a
    later call nor the weights, and a later call does not overwrite an output held from an earlier one."""
    from bmc.compiler import compile_model

    onnx_model, w = _aliasing_onnx()
    model = load(compile_model(onnx_model, tmp_path / "alias.bmc")["output"])
    assert model.manifest["kernels"]["cpu"]["owned_outputs"] == [False, False, False, False, True, False]
    x = np.random.default_rng(4).standard_normal((4, 8)).astype(np.float32)
    first = model(x.copy())
    for out in first:
        out[...] = 7.0
    x2 = 2 * x
    second = model.run({"x": x2})
    assert np.array_equal(second["same"], x2) and np.array_equal(second["view"], x2.reshape(8, 4))
    assert np.array_equal(second["weight"], w) and np.array_equal(second["const"], [1.5, 2.5])
    _close(second["product"], x2.astype(np.float64) @ w)
    assert np.array_equal(second["again"], second["product"])
    assert not np.shares_memory(second["again"], second["product"])
    assert np.all(first[4] == 7.0)  # the earlier product is still the caller's


def test_aligned_inputs_are_read_in_place_and_left_unchanged(tmp_path, build_artifact):
    """A 64-byte-aligned, writable, C-ordered input (an output of bmc, fed back as a decoding loop feeds its cache)
    is passed to the program without a copy; any other input is copied into a kept tensor. Both give the
    reference's result, and the program does not write into the caller's array."""
    b = GraphBuilder("square")
    x = b.input("x", TensorType("float32", (16, 16)))
    w = np.random.default_rng(5).standard_normal((16, 16)).astype(np.float32) / 4
    g = b.finish([b.emit1("matmul", [x, b.param("w", w)], "y")])
    model = load(build_artifact(g, tmp_path / "square.bmc"))
    raw = np.empty(16 * 16 + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4 + 1  # 4 bytes past a 64-byte boundary
    unaligned = raw[start:start + 256].reshape(16, 16)
    unaligned[...] = np.random.default_rng(6).standard_normal((16, 16))
    y1 = model(unaligned)
    assert 0 in model._arguments[0]  # copied into the kept tensor
    _close(y1, unaligned.astype(np.float64) @ w)
    assert y1.ctypes.data % 64 == 0 and y1.flags.writeable and y1.flags.c_contiguous
    model._arguments.clear()
    kept = y1.copy()
    y2 = model(y1)
    assert not model._arguments[0]  # read in place: no kept tensor was needed
    assert np.array_equal(y1, kept)
    _close(y2, kept.astype(np.float64) @ w)
    y1.setflags(write=False)  # DLPack cannot say read-only: such an array is copied
    assert np.array_equal(model(y1), y2) and 0 in model._arguments[0]


# --- DLPack inputs, outputs left on the device ------------------------------------------------------------------
class _Producer:
    """A DLPack producer with nothing else (no ``__array__``), recording the stream each export was asked for."""

    def __init__(self, array: np.ndarray):
        self.array, self.streams = array, []

    def __dlpack__(self, *, stream=None):
        self.streams.append(stream)
        return self.array.__dlpack__()

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


class _Refusing(_Producer):
    def __dlpack__(self, *, stream=None):
        raise BufferError("Can't export tensors that require gradient, use tensor.detach()")


def test_dlpack_inputs_from_any_producer_give_the_numpy_result(tiny_artifact):
    """A TVM tensor, a strided TVM view and a bare DLPack producer are read like the numpy array they hold (the
    producer asked for host memory's stream, None), and return numpy arrays on the CPU."""
    import tvm
    import tvm_ffi

    model = load(tiny_artifact)
    x = _x()
    want = model(x)
    tensor = tvm.runtime.empty(x.shape, "float32", tvm.cpu()).copyfrom(x)
    wide = np.zeros((2, 6), np.float32)
    wide[:, ::2] = x
    producer = _Producer(x.copy())
    for given in (tensor, tvm_ffi.from_dlpack(wide[:, ::2]), producer):
        got = model(given)
        assert all(isinstance(g, np.ndarray) and np.array_equal(g, w) for g, w in zip(got, want)), type(given)
    assert producer.streams == [None]


@pytest.mark.parametrize("given, message", [
    (lambda x: _Producer(x.astype(np.float64)), "input 'x': expected float32\\[2,3\\], got float64\\[2,3\\]"),
    (lambda x: _Producer(x[:1]), "input 'x': expected float32\\[2,3\\], got float32\\[1,3\\]"),
    (lambda x: _Refusing(x), "input 'x': its _Refusing cannot be read through DLPack \\(Can't export tensors that"),
])
def test_bad_dlpack_inputs_are_refused_with_their_name(tiny_artifact, given, message):
    with pytest.raises(ExecutionError, match=message):
        load(tiny_artifact)(given(_x()))


def test_a_bfloat16_dlpack_input_needs_no_numpy_type(tmp_path, build_artifact):
    """A bfloat16 tensor from a DLPack producer (numpy has no bfloat16: torch's would not pass ``np.asarray``) is
    read as it is and gives the ml_dtypes array's result."""
    import ml_dtypes
    import tvm

    b = GraphBuilder("double")
    x = b.input("x", TensorType("bfloat16", (4, 8)))
    model = load(build_artifact(b.finish([b.emit1("add", [x, x], "y")]), tmp_path / "double.bmc"))
    host = np.random.default_rng(7).standard_normal((4, 8)).astype(ml_dtypes.bfloat16)
    tensor = tvm.runtime.empty(host.shape, "bfloat16", tvm.cpu()).copyfrom(host)
    got = model(tensor)
    assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got, model(host))
    assert np.array_equal(got.astype(np.float32), 2 * host.astype(np.float32))


def test_outputs_left_on_the_device_are_tensors_the_caller_owns(tmp_path):
    """``run(outputs="device")`` returns TVM tensors (here on the CPU): the product the call allocated as it is, the
    other kinds copied, so writing into every output changes neither the weights nor a later call; the values are
    the numpy run's. ``"auto"`` on the CPU is numpy; an unknown kind is a usage error."""
    import tvm

    from bmc.compiler import compile_model

    onnx_model, w = _aliasing_onnx()
    model = load(compile_model(onnx_model, tmp_path / "alias.bmc")["output"])
    x = np.random.default_rng(4).standard_normal((4, 8)).astype(np.float32)
    want = model.run({"x": x.copy()})
    first = model.run({"x": x.copy()}, outputs="device")
    assert all(isinstance(t, tvm.runtime.Tensor) and t.device == tvm.cpu(0) for t in first.values())
    for name, t in first.items():
        assert np.array_equal(t.numpy(), want[name]), name
    views = {n: np.from_dlpack(t) for n, t in first.items()}
    assert not np.shares_memory(views["again"], views["product"])
    for v in views.values():
        v[...] = 7.0
    second = model.run({"x": x.copy()}, outputs="device")
    for name, t in second.items():
        assert np.array_equal(t.numpy(), want[name]), name
    assert np.all(views["product"] == 7.0)  # the earlier product is still the caller's
    assert all(isinstance(a, np.ndarray) for a in model.run({"x": x}, outputs="auto").values())
    with pytest.raises(UsageError, match="outputs='gpu' is not one of 'auto', 'numpy', 'device'"):
        model.run({"x": x}, outputs="gpu")


# --- FAILURES.md 45: a plan bigger than the free memory is refused before anything is loaded ------------------------

def test_a_plan_bigger_than_the_free_memory_is_refused(tmp_path, monkeypatch):
    """The manifest records the plan's peak per device (weights plus live activations: at least the weights);
    loading compares it with the free memory (here ``BMC_AVAILABLE_MEMORY``; MemAvailable on the CPU otherwise),
    over the simulated ranks that share this process, and refuses with both sizes; ``BMC_MEMORY_CHECK=0`` skips."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "models"
    out = bmc.compile(fixtures / "gpt2_dynamo.onnx", tmp_path / "g.bmc", mesh="2", strategy="megatron",
                      input_shapes={"batch": 2, "seq": 16})["output"]
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    peak = manifest["memory"]["peak_bytes_per_device"]
    plan = json.loads((Path(out) / "plan.json").read_text())
    assert peak == plan["memory"]["peak_bytes_per_device"] > plan["memory"]["weight_bytes_per_device"] > 0
    monkeypatch.setenv("BMC_AVAILABLE_MEMORY", str(2 * peak - 1))  # one device fits, the 2 simulated ranks do not
    with pytest.raises(ExecutionError, match=r"needs .* a device .* free shared by 2 ranks") as e:
        load(out, simulate=True)
    assert "BMC_MEMORY_CHECK=0" in e.value.fix
    monkeypatch.setenv("BMC_MEMORY_CHECK", "0")
    assert load(out, simulate=True).output_names == ["logits"]
    monkeypatch.delenv("BMC_MEMORY_CHECK")
    monkeypatch.setenv("BMC_AVAILABLE_MEMORY", str(2 * peak))
    assert load(out, simulate=True).output_names == ["logits"]
