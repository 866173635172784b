"""The benchmark model generator: a tiny GPT-2-like model is valid ONNX and runs in onnxruntime."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bmc.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(layers=2, hidden=64, heads=4, seq=16, batch=1, vocab=128)


def _load_models():
    """benchmarks/ is not a package on sys.path under pytest, so load the module from its file."""
    spec = importlib.util.spec_from_file_location("bmc_benchmarks_models", ROOT / "benchmarks" / "models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


models = _load_models()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return models.gpt2_like(tmp_path_factory.mktemp("gpt2") / "tiny.onnx", **TINY)


def test_tiny_passes_checker_with_external_data(tiny):
    onnx.checker.check_model(str(tiny), full_check=True)
    assert (tiny.parent / "tiny.onnx.data").stat().st_size > 0
    proto = onnx.load(str(tiny), load_external_data=False)
    big = [t for t in proto.graph.initializer if t.name == "wte"][0]
    assert big.data_location == onnx.TensorProto.EXTERNAL
    assert [o for o in proto.opset_import if o.domain in ("", "ai.onnx")][0].version >= 17
    ops = {n.op_type for n in proto.graph.node}
    assert {"Gather", "LayerNormalization", "MatMul", "Split", "Softmax", "Tanh", "Transpose"} <= ops


def test_tiny_runs_in_onnxruntime(tiny):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, TINY["vocab"], size=(1, TINY["seq"]), dtype=np.int64)
    (logits,) = sess.run(None, {"input_ids": ids})
    assert logits.shape == (1, TINY["seq"], TINY["vocab"])
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    # causal: logits at position t must not depend on tokens after t
    changed = ids.copy()
    changed[0, -1] = (changed[0, -1] + 1) % TINY["vocab"]
    (logits2,) = sess.run(None, {"input_ids": changed})
    np.testing.assert_allclose(logits2[:, :-1], logits[:, :-1], rtol=1e-5, atol=1e-5)


def test_deterministic_and_sized(tmp_path):
    a = models.gpt2_like(tmp_path / "a.onnx", **TINY)
    models.gpt2_like(tmp_path / "b.onnx", **TINY)
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()
    h, f, v, s = TINY["hidden"], 4 * TINY["hidden"], TINY["vocab"], TINY["seq"]
    per_layer = 4 * h + 3 * h * h + 3 * h + h * h + h + h * f + f + f * h + h
    weights = 4 * (2 * v * h + s * h + 2 * h + TINY["layers"] * per_layer)
    assert weights <= models.initializer_bytes(a) <= weights + 4 * s * s + 1024  # + mask and small constants
    assert not list(tmp_path.glob(".tmp-*"))


def test_bad_sizes_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="multiple of heads"):
        models.gpt2_like(tmp_path / "bad.onnx", hidden=64, heads=12)


def test_resnext50_is_resnext_shaped_and_runs_in_onnxruntime(tmp_path):
    """ResNeXt-50 32x4d: its 25.0M parameters (batch norms folded into biases), 16 grouped 3x3 convolutions of 32
    groups, logits that onnxruntime computes finite and that depend on the image."""
    ort = pytest.importorskip("onnxruntime")
    path = models.resnext50_path(tmp_path)
    assert models.resnext50_path(tmp_path) == path  # written once, then found
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert sum(int(np.prod(t.dims)) for t in proto.graph.initializer) == 24_993_792
    groups = [a.i for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert len(groups) == 53 and sorted(set(groups)) == [1, 32] and groups.count(32) == 16
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 1, 3, 224, 224), dtype=np.float32)
    a, b = (sess.run(None, {"x": xi})[0] for xi in x)
    assert a.shape == (1, 1000) and np.isfinite(a).all() and not np.allclose(a, b)
