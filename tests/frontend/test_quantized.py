"""int8 and int4 models made by onnxruntime's quantizers (``scripts/quantize_fixtures.py``, from the ``gpt2_dynamo``
and ``llama_dynamo`` fixtures and a two-layer MLP), compiled for llvm and run through the artifact.

Oracles and tolerances: the dynamically quantized model (``DynamicQuantizeLinear`` + ``MatMulInteger``) against
onnxruntime, the QDQ model against ``onnx.reference`` and against onnxruntime with graph optimizations off (with
them on, onnxruntime fuses each QDQ group into integer kernels that round differently: 1.3e-2 of max |ref| from
the spec on this model). Both: max abs error <= 1e-5 x max|ref|; bmc's integer products are exact (float64
accumulation), so what is left is float32 rounding in the float ops between the quantizers. The int4 models
(weight-only: ``com.microsoft::MatMulNBits`` and blocked int4/uint4 ``DequantizeLinear``) against onnxruntime with
its optimizations off, and the QDQ ones against ``onnx.reference`` too, with the same tolerance.
"""

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

import bmc
from bmc.frontend.onnx import import_model
from bmc.sharding.mesh import Mesh
from tests.frontend.test_models import load_case

QUANTIZED = Path(__file__).resolve().parents[1] / "fixtures" / "quantized"
TOL = 1e-5


def _inputs():
    inputs, _ = load_case("gpt2_dynamo")
    return inputs


def _onnxruntime(path, inputs, optimize=True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))


def _onnx_reference(path, inputs):
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    return dict(zip(evaluator.output_names, evaluator.run(None, inputs)))


def _assert_close(got, want, tol=TOL):
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype
        err = float(np.max(np.abs(got[k] - v)))
        assert err <= tol * max(1.0, float(np.max(np.abs(v)))), f"{k}: max abs error {err}"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> compiled single-device artifact of each quantized fixture."""
    out = {}
    for name in ("gpt2_dynamic", "gpt2_qdq"):
        path = tmp_path_factory.mktemp(name) / "m.bmc"
        bmc.compile(QUANTIZED / f"{name}.onnx", path, input_shapes={k: v.shape for k, v in _inputs().items()})
        out[name] = path
    return out


def test_manifest_matches_the_fixtures():
    import hashlib

    manifest = json.loads((QUANTIZED / "MANIFEST.json").read_text())
    for entry in manifest["fixtures"]:
        assert hashlib.sha256((QUANTIZED / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    ops = {e["file"]: e["ops"] for e in manifest["fixtures"]}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= set(ops["gpt2_dynamic.onnx"])
    assert ops["gpt2_qdq.onnx"]["QuantizeLinear"] > 50 and ops["gpt2_qdq.onnx"]["DequantizeLinear"] > 50
    assert ops["llama_nbits.onnx"]["MatMulNBits"] == 15 and ops["llama_int4_qdq.onnx"]["DequantizeLinear"] == 15
    assert ops["mlp_nbits.onnx"]["MatMulNBits"] == 2 and ops["mlp_int4_qdq.onnx"]["DequantizeLinear"] == 2


def test_dynamically_quantized_gpt2_matches_onnxruntime(compiled):
    inputs = _inputs()
    _assert_close(bmc.load(compiled["gpt2_dynamic"]).run(inputs), _onnxruntime(QUANTIZED / "gpt2_dynamic.onnx", inputs))


def test_qdq_gpt2_matches_the_onnx_spec(compiled):
    """The QDQ model chains ~85 quantize/dequantize pairs; its fused kernels nest a ``round`` per quantize, which
    ``bound_fusion`` cuts before TVM's vectorizer (exponential in that depth) would run for many minutes."""
    inputs = _inputs()
    got = bmc.load(compiled["gpt2_qdq"]).run(inputs)
    _assert_close(got, _onnx_reference(QUANTIZED / "gpt2_qdq.onnx", inputs))
    _assert_close(got, _onnxruntime(QUANTIZED / "gpt2_qdq.onnx", inputs, optimize=False))


def test_quantization_changes_the_result_by_a_quantization_error(compiled):
    """A sanity check of the fixtures themselves: int8 is close to, but not the same as, the float model."""
    inputs, float_out = load_case("gpt2_dynamo")
    got = bmc.load(compiled["gpt2_dynamic"]).run(inputs)["logits"]
    rel = float(np.max(np.abs(got - float_out["logits"]))) / float(np.max(np.abs(float_out["logits"])))
    assert 1e-4 < rel < 0.1


def test_integer_matmuls_read_the_int8_weights(compiled):
    """Every MatMulInteger is the IR's ``matmul_integer`` on the CPU's integer kernel, reading its int8 weight stored
    transposed (``[N, K]``, one byte a value) and packed at load; no float64 matmul is left. The QDQ model's linear layers too."""
    manifest = json.loads((compiled["gpt2_dynamic"] / "manifest.json").read_text())
    matmuls = sum(n.op_type == "MatMulInteger" for n in onnx.load(QUANTIZED / "gpt2_dynamic.onnx").graph.node)
    transposed = [p for p in manifest["signature"]["params"] if p["name"].endswith(".T")]
    assert matmuls == 9 and len(transposed) == matmuls  # 4 a layer and the LM head
    assert all(p["dtype"] == "int8" and len(p["shape"]) == 2 for p in transposed)
    cpu = manifest["kernels"]["cpu"]  # each packed once, at load, for the VNNI panel tiles
    assert "bmc.cpu.matmul_integer_packed" in cpu["requires"] and "bmc.cpu.matmul_integer" not in cpu["requires"]
    assert cpu["packed_int8_weights"] == sorted(p["name"] for p in transposed)
    graph = import_model(QUANTIZED / "gpt2_dynamic.onnx", {k: v.shape for k, v in _inputs().items()})
    assert sum(n.op == "matmul_integer" for n in graph.nodes) == matmuls
    assert not [n for n in graph.nodes if n.op == "matmul" and n.outputs[0].type.dtype == "float64"]
    # the static QDQ model: its 8 Gemms and the LM head's MatMul by dequantized weights too; attention stays float
    graph = import_model(QUANTIZED / "gpt2_qdq.onnx", {k: v.shape for k, v in _inputs().items()})
    ops = collections.Counter(n.op for n in graph.nodes)
    assert ops["matmul_integer"] == 9 and ops["matmul"] == 4


@pytest.mark.parametrize("name, extremes", [("gpt2_dynamic", 4), ("gpt2_qdq", 0)])
def test_quantized_gpt2_tensor_parallel_matches_one_device(compiled, tmp_path, name, extremes):
    """Megatron over two devices communicates as for the float model: the int8 weights are split like float ones
    (row-parallel MatMulInteger partial sums are all-reduced in int32, exactly), the fused QKV projection is found
    through its dequantization, so only the logits are gathered. DynamicQuantizeLinear's max and min over a split
    activation are each an all-reduce of one value, not an all-gather of the activation."""
    inputs = _inputs()
    path = tmp_path / "tp.bmc"
    bmc.compile(QUANTIZED / f"{name}.onnx", path, mesh=Mesh.parse("1x2"), strategy="megatron",
                input_shapes={k: v.shape for k, v in inputs.items()})
    collectives = json.loads((path / "plan.json").read_text())["collectives"]
    counts = collections.Counter((c["kind"], c.get("reduce")) for c in collectives)
    assert counts == {("all_reduce", "sum"): 4, ("all_gather", None): 1,  # as the float GPT-2's plan
                      **({("all_reduce", "max"): extremes, ("all_reduce", "min"): extremes} if extremes else {})}
    assert all(c["bytes"] == 4 for c in collectives if c.get("reduce") in ("max", "min"))  # 2 (n - 1) / n x 4 B
    _assert_close(bmc.load(path, simulate=True).run(inputs), bmc.load(compiled[name]).run(inputs))


def _qdq_linear_model(op, a_type, w_type, per_channel, k=96, n=40):
    """QuantizeLinear -> DequantizeLinear of x (per tensor), times DequantizeLinear of an 8-bit weight (per tensor or
    per output channel): ``MatMul`` by W [K, N], or ``Gemm`` with transB by W [N, K] plus a bias."""
    rng = np.random.default_rng(k + n + per_channel)
    transposed = op == "Gemm"
    info = np.iinfo(onnx.helper.tensor_dtype_to_np_dtype(w_type))
    w = rng.integers(info.min, info.max + 1, size=(n, k) if transposed else (k, n)).astype(info.dtype)
    shape = (n,) if per_channel else ()
    w_scale = (rng.random(shape) * 0.02 + 0.001).astype(np.float32)
    w_zp = rng.integers(info.min // 8, info.max // 8, size=shape).astype(info.dtype)
    a_np = onnx.helper.tensor_dtype_to_np_dtype(a_type)
    inits = [onnx.numpy_helper.from_array(v, name) for v, name in (
        (w, "w"), (w_scale, "w_scale"), (w_zp, "w_zp"), (np.array(0.05, np.float32), "a_scale"),
        (np.array(3, a_np), "a_zp"), (rng.standard_normal(n).astype(np.float32), "bias"))]
    nodes = [oh.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["xq"]),
             oh.make_node("DequantizeLinear", ["xq", "a_scale", "a_zp"], ["xd"]),
             oh.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], axis=0 if transposed else 1),
             oh.make_node("Gemm", ["xd", "wd", "bias"], ["y"], transB=1) if transposed
             else oh.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = oh.make_graph(nodes, "qdq_linear", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [5, k])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [5, n])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
@pytest.mark.parametrize("a_type, w_type", [(TensorProto.UINT8, TensorProto.INT8),
                                            (TensorProto.INT8, TensorProto.UINT8)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_int8_linear_layers_run_on_the_integer_kernel(op, a_type, w_type, per_channel, tmp_path):
    """The static-QDQ form of an 8-bit linear layer is ``matmul_integer`` on the codes (the weight read at 1 byte a
    value, stored transposed for MatMul and as it is for Gemm's transB) times the two scales: the spec's result, to
    float32 rounding."""
    model = _qdq_linear_model(op, a_type, w_type, per_channel)
    onnx.save(model, tmp_path / "m.onnx")
    graph = import_model(tmp_path / "m.onnx")
    assert [n.op for n in graph.nodes if "matmul" in n.op] == ["matmul_integer"]
    assert any(p.name.endswith(".T") for p in graph.params) == (op == "MatMul")
    bmc.compile(tmp_path / "m.onnx", tmp_path / "m.bmc")
    x = np.random.default_rng(2).standard_normal((5, 96), dtype=np.float32)
    got = bmc.load(tmp_path / "m.bmc").run({"x": x})
    _assert_close(got, _onnx_reference(tmp_path / "m.onnx", {"x": x}))
    _assert_close(got, _onnxruntime(tmp_path / "m.onnx", {"x": x}, optimize=False))


def _weight_only_model(k=256, n=512):
    """x @ DequantizeLinear(W int8, per-column scale and zero point): a weight-only int8 linear layer, W larger
    than the importer's constant-folding limit so it must stay a weight."""
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
    scale = (rng.random(n, dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    zp = rng.integers(-3, 4, size=n, dtype=np.int8)
    graph = oh.make_graph(
        [oh.make_node("DequantizeLinear", ["w", "scale", "zp"], ["wf"], axis=1),
         oh.make_node("MatMul", ["x", "wf"], ["y"])], "weight_only",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(scale, "scale"),
         onnx.numpy_helper.from_array(zp, "zp")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]), w


def test_int8_weights_stay_int8_in_the_artifact(tmp_path):
    model, w = _weight_only_model()
    onnx.save(model, tmp_path / "q.onnx")
    bmc.compile(tmp_path / "q.onnx", tmp_path / "q.bmc")
    manifest = json.loads((tmp_path / "q.bmc" / "manifest.json").read_text())
    params = {p["name"]: p for p in manifest["signature"]["params"]}
    assert params["w"]["dtype"] == "int8" and tuple(params["w"]["shape"]) == w.shape
    assert all(p["dtype"] != "float32" or np.prod(p["shape"]) < w.size for p in params.values())
    weights = sum(f.stat().st_size for f in (tmp_path / "q.bmc" / "weights").iterdir())
    assert w.nbytes <= weights < 2 * w.nbytes  # one byte per weight, not four
    # onnxruntime's optimizer turns DequantizeLinear -> MatMul into a kernel that also quantizes x (0.43 of 78 off
    # the spec here), so its unoptimized graph and onnx.reference are the oracles
    x = np.random.default_rng(1).standard_normal((4, w.shape[0]), dtype=np.float32)
    got = bmc.load(tmp_path / "q.bmc").run({"x": x})
    _assert_close(got, _onnxruntime(tmp_path / "q.onnx", {"x": x}, optimize=False))
    _assert_close(got, _onnx_reference(tmp_path / "q.onnx", {"x": x}))


# ---- int4 ---------------------------------------------------------------------------------------------------
INT4 = ("llama_nbits", "llama_int4_qdq", "mlp_nbits", "mlp_int4_qdq")
MLP_FLOAT_BYTES = 4 * 2 * 200 * 512  # the MLP's two float weights


def _int4_inputs(name):
    if name.startswith("llama"):
        return load_case("llama_dynamo")[0]
    return {"x": np.random.default_rng(1).standard_normal((4, 200), dtype=np.float32)}


@pytest.fixture(scope="module")
def compiled_int4(tmp_path_factory):
    out = {}
    for name in INT4:
        path = tmp_path_factory.mktemp(name) / "m.bmc"
        bmc.compile(QUANTIZED / f"{name}.onnx", path, input_shapes={k: v.shape for k, v in _int4_inputs(name).items()})
        out[name] = path
    return out


@pytest.mark.parametrize("name", INT4)
def test_int4_models_match_onnxruntime(compiled_int4, name):
    inputs = _int4_inputs(name)
    got = bmc.load(compiled_int4[name]).run(inputs)
    _assert_close(got, _onnxruntime(QUANTIZED / f"{name}.onnx", inputs, optimize=False))
    if name.endswith("qdq"):
        _assert_close(got, _onnx_reference(QUANTIZED / f"{name}.onnx", inputs))


@pytest.mark.parametrize("name", ("mlp_nbits", "mlp_int4_qdq"))
def test_int4_weights_stay_packed_in_the_artifact(compiled_int4, name):
    """Two 4-bit values a byte in the artifact (and in memory): the weights file is the packed codes plus a float
    scale (and a 4-bit zero point) per block of 32, under a fifth of the float weights."""
    path = compiled_int4[name]
    params = json.loads((path / "manifest.json").read_text())["signature"]["params"]
    packed = [p for p in params if p["dtype"] == "uint8" and "Q4" in p["name"]]
    codes = sum(int(np.prod(p["shape"])) for p in packed)  # bytes; MatMulNBits pads K = 200 to 7 blocks of 32
    assert codes == {"mlp_nbits": (512 * 224 + 200 * 512) // 2, "mlp_int4_qdq": 2 * 200 * 512 // 2}[name]
    weights = sum(f.stat().st_size for f in (path / "weights").iterdir())
    assert weights < MLP_FLOAT_BYTES / 5


@pytest.mark.parametrize("name, all_reduces", [("mlp_nbits", 1), ("mlp_int4_qdq", 1), ("llama_nbits", 4)])
def test_int4_tensor_parallel_splits_the_packed_weights(compiled_int4, name, all_reduces, tmp_path):
    """Megatron finds the matmuls by dequantized weights, and propagation carries each split back through the
    dequantization to the packed codes: every rank stores half of every packed weight; one all-reduce per
    row-parallel matmul; equal to one device."""
    from bmc.runtime.safetensors import SafetensorsFile

    inputs = _int4_inputs(name)
    path = tmp_path / "tp.bmc"
    bmc.compile(QUANTIZED / f"{name}.onnx", path, mesh=Mesh.parse("1x2"), strategy="megatron",
                input_shapes={k: v.shape for k, v in inputs.items()})
    kinds = [c["kind"] for c in json.loads((path / "plan.json").read_text())["collectives"]]
    assert kinds.count("all_reduce") == all_reduces
    full, rank0 = (SafetensorsFile(p) for p in (compiled_int4[name] / "weights" / "rank0.safetensors",
                                                  path / "weights" / "rank0.safetensors"))
    codes = [n for n in full.names() if n.endswith("Q4")]
    assert codes and all(2 * np.prod(rank0.info(n)[1]) == np.prod(full.info(n)[1]) for n in codes)
    _assert_close(bmc.load(path, simulate=True).run(inputs), bmc.load(compiled_int4[name]).run(inputs))


def test_cast_to_int4_wraps_inside_the_graph():
    """Cast to int4/uint4 wraps around like numpy's casts (the values carried in 8 bits are the wrapped ones)."""
    from onnx.reference import ReferenceEvaluator

    import bmc.onnx_backend as backend

    x = np.arange(-20, 21, dtype=np.float32)
    for four_bit in (TensorProto.INT4, TensorProto.UINT4):
        graph = oh.make_graph(
            [oh.make_node("Cast", ["x"], ["q"], to=four_bit), oh.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT)],
            "wrap", [oh.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
            [oh.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)])
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
        lo = -8 if four_bit == TensorProto.INT4 else 0
        want = (x - lo) % 16 + lo
        np.testing.assert_array_equal(backend.prepare(model).run([x])[0], want)
        np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {"x": x})[0], want)


@pytest.mark.parametrize("attrs, inputs, message", [
    ({"bits": 2}, ["a", "b", "s"], "bits=2 is not supported"),
    ({}, ["a", "b", "s", "", "g_idx"], "g_idx"),
    ({"K": 48}, ["a", "b", "s"], r"B is u8\[8,2,8\], but K=48"),
])
def test_matmul_nbits_refusals_name_the_node(attrs, inputs, message):
    from bmc.errors import ModelError
    from bmc.frontend.onnx import import_model

    node = oh.make_node("MatMulNBits", inputs, ["y"], name="lm_head", domain="com.microsoft",
                        **{"K": 32, "N": 8, "bits": 4, "block_size": 16, **attrs})
    inits = [onnx.numpy_helper.from_array(np.zeros((8, 2, 8), np.uint8), "b"),
             onnx.numpy_helper.from_array(np.ones((8, 2), np.float32), "s"),
             onnx.numpy_helper.from_array(np.zeros(32, np.int32), "g_idx")]
    graph = oh.make_graph([node], "nbits", [oh.make_tensor_value_info("a", TensorProto.FLOAT, [2, 32])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])
    with pytest.raises(ModelError, match=message) as err:
        import_model(model, {})
    assert "lm_head" in str(err.value)


@pytest.mark.parametrize("name, dtype, tol", [
    ("llama_nbits", "bfloat16", 1e-2), ("llama_int4_qdq", "float16", 1e-2),
    # activations quantized from float16: a code moves by one wherever float16 rounds x / scale across a boundary
    # (measured 2.0e-2); before int32 bias codes were kept in float32 this was 0.26 (they overflowed to inf)
    ("gpt2_qdq", "float16", 5e-2),
])
def test_quantized_models_in_reduced_precision(name, dtype, tol, tmp_path):
    inputs = _int4_inputs(name) if name.startswith("llama") else _inputs()
    bmc.compile(QUANTIZED / f"{name}.onnx", tmp_path / "m.bmc", dtype=dtype,
                input_shapes={k: v.shape for k, v in inputs.items()})
    got = bmc.load(tmp_path / "m.bmc").run(inputs)
    _assert_close(got, _onnxruntime(QUANTIZED / f"{name}.onnx", inputs, optimize=False), tol=tol)


def _matmul_nbits_model(bits, zero_points, bias, k, a_shape, n=24, block=None):
    """One ``MatMulNBits`` node with seeded random codes, scales and (packed uint8 or float) zero points."""
    block = block or (16 if k % 16 == 0 and k < 128 else 32)
    rng = np.random.default_rng(bits * 100 + k)
    blocks = -(-k // block)
    codes = rng.integers(0, 2 ** bits, size=(n, blocks, block), dtype=np.uint8)
    b = codes[..., 0::2] | (codes[..., 1::2] << 4) if bits == 4 else codes
    scales = (rng.random((n, blocks)) * 0.1 + 0.01).astype(np.float32)
    inputs = ["a", "b", "s"]
    inits = [onnx.numpy_helper.from_array(b, "b"), onnx.numpy_helper.from_array(scales.reshape(-1), "s")]
    if zero_points == "packed":  # each row's zero points packed like the codes, padded to whole bytes
        zp = np.zeros((n, blocks + blocks % 2 if bits == 4 else blocks), np.uint8)
        zp[:, :blocks] = rng.integers(0, 2 ** bits, size=(n, blocks))
        zp = zp[:, 0::2] | (zp[:, 1::2] << 4) if bits == 4 else zp
        inits.append(onnx.numpy_helper.from_array(zp.reshape(-1), "zp"))
        inputs.append("zp")
    elif zero_points == "float":
        zp = (rng.random(n * blocks) * 2 ** bits).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    if bias:
        inputs += [""] * (5 - len(inputs)) + ["bias"]
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"))
    node = oh.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)
    graph = oh.make_graph([node], "nbits", [oh.make_tensor_value_info("a", TensorProto.FLOAT, list(a_shape))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, list(a_shape[:-1]) + [n])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("bits, zero_points, bias, k, a_shape", [
    (4, None, True, 200, (2, 5, 200)),    # default zero point 8, bias, K padded to 7 blocks, 3-D A
    (4, "packed", False, 200, (3, 200)),  # an odd block count: each row's zero points end in half a byte
    (4, "float", True, 64, (3, 64)),
    (8, None, False, 64, (3, 64)),        # default zero point 128
    (8, "packed", True, 200, (2, 5, 200)),
])
def test_matmul_nbits_forms_match_onnxruntime(bits, zero_points, bias, k, a_shape):
    """The forms the fixtures do not reach; onnxruntime's CPU kernel is the oracle (it refuses 8-bit codes with
    float zero points)."""
    import bmc.onnx_backend as backend

    model = _matmul_nbits_model(bits, zero_points, bias, k, a_shape)
    a = np.random.default_rng(1).standard_normal(a_shape).astype(np.float32)
    got = backend.prepare(model).run([a])[0]
    import onnxruntime as ort

    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    _assert_close({"y": got}, {"y": want})


def test_int4_weights_from_external_data(compiled_int4, tmp_path):
    """4-bit initializers in an external data file (how big models ship) are read as the packed bytes they are."""
    onnx.save(onnx.load(QUANTIZED / "mlp_int4_qdq.onnx"), tmp_path / "m.onnx", save_as_external_data=True,
              location="m.data", size_threshold=64)
    stored = onnx.load(tmp_path / "m.onnx", load_external_data=False).graph.initializer
    assert all(i.data_location == TensorProto.EXTERNAL for i in stored if i.data_type == TensorProto.UINT4)
    bmc.compile(tmp_path / "m.onnx", tmp_path / "m.bmc")
    x = _int4_inputs("mlp_int4_qdq")
    np.testing.assert_array_equal(bmc.load(tmp_path / "m.bmc").run(x)["y"],
                                  bmc.load(compiled_int4["mlp_int4_qdq"]).run(x)["y"])


@pytest.mark.parametrize("name", ("gpt2_dynamic", "gpt2_qdq") + INT4)
def test_stored_outputs_are_onnxruntimes(name):
    """Each fixture's ``.npz`` (what the GPU check compares with) holds its inputs and onnxruntime's outputs with
    its graph optimizations off, as ``scripts/quantize_fixtures.py`` wrote them."""
    data = np.load(QUANTIZED / f"{name}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("output:")}
    stored = {k[len("output:"):]: data[k] for k in data.files if k.startswith("output:")}
    _assert_close(stored, _onnxruntime(QUANTIZED / f"{name}.onnx", inputs, optimize=False), tol=0.0)


@pytest.mark.parametrize("four_bit", [TensorProto.INT4, TensorProto.UINT4])
@pytest.mark.parametrize("with_zero_point", [False, True])
def test_blocked_int4_dequantize_matmul_becomes_matmul_nbits(four_bit, with_zero_point, tmp_path):
    """``MatMul(x, DequantizeLinear(W int4/uint4 [K, N], blocks along K))`` runs as ``matmul_nbits`` on codes
    repacked at compile time (each signedness, with and without zero points); equal to ONNX's reference. The
    initializer scales are transposed to ``[N, blocks]`` at compile time too (a transpose op would run every call)."""
    k, n, block = 64, 48, 16
    rng = np.random.default_rng(four_bit + with_zero_point)
    lo, hi = (-8, 8) if four_bit == TensorProto.INT4 else (0, 16)
    w = rng.integers(lo, hi, size=(k, n))
    scale = (rng.random((k // block, n)) * 0.1 + 0.01).astype(np.float32)
    inits = [oh.make_tensor("w", four_bit, w.shape, w.reshape(-1).tolist()),
             onnx.numpy_helper.from_array(scale, "scale")]
    inputs = ["w", "scale"]
    if with_zero_point:
        zp = rng.integers(lo, hi, size=(k // block, n))
        inits.append(oh.make_tensor("zp", four_bit, zp.shape, zp.reshape(-1).tolist()))
        inputs.append("zp")
    graph = oh.make_graph(
        [oh.make_node("DequantizeLinear", inputs, ["wf"], axis=0, block_size=block),
         oh.make_node("MatMul", ["x", "wf"], ["y"])], "qdq4",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
    onnx.save(model, tmp_path / "m.onnx")
    ops = collections.Counter(node.op for node in import_model(model).nodes)
    assert ops["matmul_nbits"] == 1 and ops["transpose"] == (1 if with_zero_point else 0)  # only the unpacked zp's
    bmc.compile(tmp_path / "m.onnx", tmp_path / "m.bmc")
    requires = json.loads((tmp_path / "m.bmc" / "manifest.json").read_text())["kernels"]["cpu"]["requires"]
    assert any(r.startswith("bmc.cpu.matmul_nbits") for r in requires)
    x = np.random.default_rng(1).standard_normal((3, k), dtype=np.float32)
    _assert_close(bmc.load(tmp_path / "m.bmc").run({"x": x}), _onnx_reference(tmp_path / "m.onnx", {"x": x}))


# ---- float8 / float4 ------------------------------------------------------------------------------------------
def _manifest_params(path):
    return json.loads((path / "manifest.json").read_text())["signature"]["params"]


def _fp8_mlp(w_type: int, k: int = 64, n: int = 48, hidden: int = 32, rows: int = 4):
    """x @ DequantizeLinear(w1: float8 [K, H], per-channel scale) -> Relu -> @ DequantizeLinear(w2 [H, N])."""
    from bmc.frontend.onnx.loader import NARROW
    from bmc.ops.minifloat import FORMATS

    fmt = FORMATS[NARROW[w_type]]
    rng = np.random.default_rng(w_type)
    inits, nodes = [], []
    for name, shape in (("w1", (k, hidden)), ("w2", (hidden, n))):
        w = rng.standard_normal(shape).astype(np.float32)
        scale = (np.abs(w).max(axis=0) / 200).astype(np.float32)  # within every format's range
        codes = (w / scale).astype(fmt.np_dtype)
        inits += [onnx.numpy_helper.from_array(codes, name), onnx.numpy_helper.from_array(scale, f"{name}_s")]
        nodes.append(oh.make_node("DequantizeLinear", [name, f"{name}_s"], [f"{name}_f"], axis=1))
    nodes += [oh.make_node("MatMul", ["x", "w1_f"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
              oh.make_node("MatMul", ["r", "w2_f"], ["y"])]
    graph = oh.make_graph(nodes, "fp8_mlp", [oh.make_tensor_value_info("x", TensorProto.FLOAT, (rows, k))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, (rows, n))], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


@pytest.mark.parametrize("w_type", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E4M3FNUZ,
                                    TensorProto.FLOAT8E5M2FNUZ])
def test_float8_weights_stay_one_byte_and_match_the_spec(w_type, tmp_path):
    """float8 weights are uint8 codes in the artifact (a byte a weight), stored transposed for ``matmul_float8``,
    which reads them directly; the result matches onnx.reference, and onnxruntime where it has the format (e4m3fn,
    e5m2), for a decoding step (M = 4 rows: decoded a weight row at a time) and a prefill (M = 64: decoded, sgemm)."""
    onnx.save(_fp8_mlp(w_type), tmp_path / "m.onnx")
    counts = import_model(tmp_path / "m.onnx").op_counts()
    assert counts.get("matmul_float8") == 2 and "decode_float" not in counts
    bmc.compile(tmp_path / "m.onnx", tmp_path / "m.bmc")
    params = {p["name"]: p for p in _manifest_params(tmp_path / "m.bmc")}
    assert params["w1.T"]["dtype"] == params["w2.T"]["dtype"] == "uint8" and params["w1.T"]["shape"] == [32, 64]
    assert all(p["dtype"] == "uint8" or np.prod(p["shape"]) <= 48 for p in params.values())  # scales only
    x = {"x": np.random.default_rng(0).standard_normal((4, 64), dtype=np.float32)}
    got = bmc.load(tmp_path / "m.bmc").run(x)
    _assert_close(got, _onnx_reference(tmp_path / "m.onnx", x))
    if w_type in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):
        _assert_close(got, _onnxruntime(tmp_path / "m.onnx", x, optimize=False))
    onnx.save(_fp8_mlp(w_type, rows=64), tmp_path / "m64.onnx")
    many = {"x": np.random.default_rng(1).standard_normal((64, 64), dtype=np.float32)}
    bmc.compile(tmp_path / "m64.onnx", tmp_path / "m64.bmc")
    _assert_close(bmc.load(tmp_path / "m64.bmc").run(many), _onnx_reference(tmp_path / "m64.onnx", many))


def test_float8_weights_split_for_tensor_parallelism(tmp_path):
    """Megatron splits the float8 matmuls like float ones (the first by its output columns, the second by K): every
    rank stores half of each transposed code matrix; one all-reduce; equal to one device."""
    from bmc.runtime.safetensors import SafetensorsFile

    onnx.save(_fp8_mlp(TensorProto.FLOAT8E4M3FN), tmp_path / "m.onnx")
    bmc.compile(tmp_path / "m.onnx", tmp_path / "one.bmc")
    bmc.compile(tmp_path / "m.onnx", tmp_path / "tp.bmc", mesh=Mesh.parse("1x2"), strategy="megatron")
    kinds = [c["kind"] for c in json.loads((tmp_path / "tp.bmc" / "plan.json").read_text())["collectives"]]
    assert kinds.count("all_reduce") == 1
    rank0 = SafetensorsFile(tmp_path / "tp.bmc" / "weights" / "rank0.safetensors")
    assert [rank0.info(w) for w in ("w1.T", "w2.T")] == [("uint8", (16, 64)), ("uint8", (48, 16))]
    x = {"x": np.random.default_rng(0).standard_normal((4, 64), dtype=np.float32)}
    _assert_close(bmc.load(tmp_path / "tp.bmc", simulate=True).run(x), bmc.load(tmp_path / "one.bmc").run(x))


def test_mxfp4_weights_stay_packed_and_match_the_spec(tmp_path):
    """The MX form of 4-bit weights: float4e2m1 codes, two a byte, with a float8e8m0 (power of two) scale per
    block of 32 along K. The codes stay packed in the artifact; the result matches onnx.reference."""
    import ml_dtypes

    k, n, block = 128, 64, 32
    rng = np.random.default_rng(4)
    w = rng.standard_normal((k, n)).astype(np.float32)
    exponents = np.ceil(np.log2(np.abs(w).reshape(k // block, block, n).max(axis=1) / 6.0))
    scale = np.exp2(exponents).astype(ml_dtypes.float8_e8m0fnu)
    codes = (w / np.repeat(scale.astype(np.float32), block, axis=0)).astype(ml_dtypes.float4_e2m1fn)
    graph = oh.make_graph(
        [oh.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=0, block_size=block, output_dtype=TensorProto.FLOAT),
         oh.make_node("MatMul", ["x", "wf"], ["y"])], "mxfp4",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, (4, k))],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, (4, n))],
        [onnx.numpy_helper.from_array(codes, "w"), onnx.numpy_helper.from_array(scale, "s")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 25)]), tmp_path / "m.onnx")
    bmc.compile(tmp_path / "m.onnx", tmp_path / "m.bmc")
    params = {p["name"]: p for p in _manifest_params(tmp_path / "m.bmc")}
    assert params["w"]["dtype"] == "uint8" and np.prod(params["w"]["shape"]) == k * n // 2
    x = {"x": rng.standard_normal((4, k), dtype=np.float32)}
    _assert_close(bmc.load(tmp_path / "m.bmc").run(x), _onnx_reference(tmp_path / "m.onnx", x))


def test_computing_on_float8_codes_is_refused():
    """An op that would compute on float8 codes (here Add) is a clear error naming the tensor and the fix."""
    from bmc.errors import ModelError

    graph = oh.make_graph(
        [oh.make_node("Cast", ["x"], ["q"], to=TensorProto.FLOAT8E4M3FN), oh.make_node("Reshape", ["q", "s"], ["r"]),
         oh.make_node("Add", ["r", "r"], ["y"])], "bad",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3))],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, (3, 2))],
        [onnx.numpy_helper.from_array(np.array([3, 2], np.int64), "s")])
    with pytest.raises(ModelError) as e:
        import_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]))
    msg = str(e.value)
    assert "'r' is float8e4m3fn" in msg and "Add" in msg and "Cast to=FLOAT" in msg
