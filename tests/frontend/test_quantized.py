"""int8 models made by onnxruntime's quantizer (``scripts/quantize_fixtures.py``, from the ``gpt2_dynamo`` fixture),
compiled for llvm and run through the artifact.

Oracles and tolerances: the dynamically quantized model (``DynamicQuantizeLinear`` + ``MatMulInteger``) against
onnxruntime, the QDQ model against ``onnx.reference`` and against onnxruntime with graph optimizations off (with
them on, onnxruntime fuses each QDQ group into integer kernels that round differently: 1.3e-2 of max |ref| from
the spec on this model). Both: max abs error <= 1e-5 x max|ref|; bmc's integer products are exact (float64
accumulation), so what is left is float32 rounding in the float ops between the quantizers.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

import bmc
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


def test_dynamically_quantized_gpt2_tensor_parallel_matches_one_device(compiled, tmp_path):
    """Megatron over two devices: the int8 weights are split like float ones, row-parallel MatMulInteger partial
    sums are all-reduced in float64 (exact), and DynamicQuantizeLinear's max/min see the whole activation."""
    inputs = _inputs()
    path = tmp_path / "tp.bmc"
    bmc.compile(QUANTIZED / "gpt2_dynamic.onnx", path, mesh=Mesh.parse("1x2"), strategy="megatron",
                input_shapes={k: v.shape for k, v in inputs.items()})
    _assert_close(bmc.load(path, simulate=True).run(inputs), bmc.load(compiled["gpt2_dynamic"]).run(inputs))


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
