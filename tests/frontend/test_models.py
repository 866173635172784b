"""Real models exported by both torch exporters: import, compile for llvm, run through the artifact, and match
onnxruntime. Tolerance (float32): max abs error <= 1e-4 x max(1, max|expected|).

``llama_dynamo23`` (opset 23: ONNX ``Attention``, ``RotaryEmbedding``, ``RMSNormalization``) is checked against
ONNX's own reference implementation instead: onnxruntime 1.32 rejects the exporter's ``RotaryEmbedding`` (the
manifest records its error). The export script checked that reference against PyTorch (3e-7)."""

import json
from pathlib import Path

import numpy as np
import pytest

import bmc
from bmc.frontend.onnx import import_model
from bmc.testing.reference import run_reference

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
MODELS = sorted(p.stem for p in FIXTURES.glob("*.onnx"))
TOL = 1e-4


def load_case(name):
    data = np.load(FIXTURES / f"{name}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("output:")}
    outputs = {k[len("output:"):]: data[k] for k in data.files if k.startswith("output:")}
    return inputs, outputs


def onnxruntime_outputs(path, inputs):
    """The outputs of the fixture's reference runtime (onnxruntime, or ``onnx.reference`` where the manifest says
    onnxruntime cannot run the model)."""
    path = Path(path)
    entry = next((f for f in json.loads((path.parent / "MANIFEST.json").read_text())["fixtures"]
                  if f["file"] == path.name), {})
    if entry.get("reference_runtime") == "onnx.reference":
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(path))
        return dict(zip(evaluator.output_names, evaluator.run(None, inputs)))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, inputs)))


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    err = float(np.max(np.abs(got - want)))
    assert err <= TOL * max(1.0, float(np.max(np.abs(want)))), f"max abs error {err}"


def test_fixture_set_is_complete():
    manifest = json.loads((FIXTURES / "MANIFEST.json").read_text())
    entries = manifest["fixtures"] if isinstance(manifest, dict) and "fixtures" in manifest else manifest
    assert {f"{m}_{e}" for m in ("gpt2", "bert", "llama", "opt", "vit") for e in ("legacy", "dynamo")} <= set(MODELS)
    assert len(entries) >= 10


@pytest.mark.parametrize("name", MODELS)
def test_reference_interpreter_matches_onnxruntime(name):
    inputs, stored = load_case(name)
    ort_out = onnxruntime_outputs(FIXTURES / f"{name}.onnx", inputs)
    for k, v in stored.items():  # the stored oracle still agrees with today's onnxruntime
        np.testing.assert_allclose(ort_out[k], v, rtol=0, atol=1e-5)
    graph = import_model(FIXTURES / f"{name}.onnx", {k: v.shape for k, v in inputs.items()})
    assert [v.name for v in graph.outputs] == list(ort_out)
    ref = run_reference(graph, inputs)
    for k, v in ort_out.items():
        assert_close(ref[k], v)


@pytest.mark.parametrize("name", MODELS)
def test_compiled_artifact_matches_onnxruntime(name, tmp_path):
    inputs, _ = load_case(name)
    expected = onnxruntime_outputs(FIXTURES / f"{name}.onnx", inputs)
    bmc.compile(FIXTURES / f"{name}.onnx", tmp_path / "m.bmc", input_shapes={k: v.shape for k, v in inputs.items()})
    model = bmc.load(tmp_path / "m.bmc")
    got = model.run(inputs)
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert_close(got[k], v)


def test_other_input_shapes_are_bound_from_symbols(tmp_path):
    """The same model compiled for another batch/sequence (by symbolic dim name) still matches onnxruntime."""
    path = FIXTURES / "gpt2_legacy.onnx"
    ids = np.random.default_rng(3).integers(0, 256, size=(3, 9), dtype=np.int64)
    graph = import_model(path, {"batch": 3, "seq": 9})
    assert graph.inputs[0].type.shape == (3, 9)
    ref = run_reference(graph, {"input_ids": ids})
    assert_close(ref["logits"], onnxruntime_outputs(path, {"input_ids": ids})["logits"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["gpt2_dynamo", "bert_legacy", "llama_dynamo", "opt_legacy", "vit_dynamo",
                                  "llama_dynamo23", "falcon_dynamo", "bloom_dynamo", "t5enc_dynamo", "mixtral_dynamo"])
def test_reduced_precision_matches_onnxruntime(name, dtype):
    """--dtype: the float32 model runs in float16/bfloat16 (float32 accumulation); relative error <= 1e-2."""
    from bmc.compiler import import_graph
    from bmc.testing.compiled import run_compiled

    inputs, _ = load_case(name)
    expected = onnxruntime_outputs(FIXTURES / f"{name}.onnx", inputs)
    graph = import_graph(FIXTURES / f"{name}.onnx", {k: v.shape for k, v in inputs.items()}, dtype)
    assert {p.type.dtype for p in graph.params} == {dtype}
    got = run_compiled(graph, inputs)
    for k, want in expected.items():
        assert got[k].dtype == want.dtype  # the signature stays float32
        assert float(np.max(np.abs(got[k] - want))) <= 1e-2 * max(1.0, float(np.max(np.abs(want))))


def test_float16_keeps_a_float32_mask_fill_finite():
    """DeBERTa fills masked scores with float32's lowest (-3.4e38) and masks whole query rows (padding). In float16
    that constant is clamped to -65504, not rounded to -inf: a row masked everywhere softmaxes to equal weights, as
    in float32, instead of NaN, which the next layer's attention would spread to every row."""
    from bmc.compiler import import_graph
    from bmc.testing.compiled import run_compiled

    inputs, _ = load_case("deberta_dynamo")
    expected = onnxruntime_outputs(FIXTURES / "deberta_dynamo.onnx", inputs)
    graph = import_graph(FIXTURES / "deberta_dynamo.onnx", {k: v.shape for k, v in inputs.items()}, "float16")
    got = run_compiled(graph, inputs)
    for k, want in expected.items():
        assert not np.isnan(got[k]).any()
        assert float(np.max(np.abs(got[k] - want))) <= 1e-2 * max(1.0, float(np.max(np.abs(want))))
