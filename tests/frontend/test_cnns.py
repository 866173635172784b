"""The classic CNNs that the onnx package ships (backend/test/data/light, opset 9, weights from ConstantOfShape):
import, compile for llvm, run, and match onnxruntime on a seeded random image. float32 tolerance: max abs error
<= 1e-4 x max(1, max|expected|). Big ones (minutes of untuned TVM compile/run on 2 cores) are marked slow."""

import os

import numpy as np
import onnx
import pytest

from bmc.frontend.onnx import import_model
from bmc.testing.compiled import run_compiled

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
FAST = ["squeezenet", "bvlc_alexnet", "zfnet512", "inception_v1"]
SLOW = ["shufflenet", "resnet50", "inception_v2", "densenet121", "vgg19"]


def case(name):
    path = os.path.join(LIGHT, f"light_{name}.onnx")
    model = onnx.load(path)
    inits = {i.name for i in model.graph.initializer}
    (inp,) = [i for i in model.graph.input if i.name not in inits]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    return path, inp.name, np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def check(name):
    import onnxruntime as ort

    path, input_name, x = case(name)
    graph = import_model(path)
    got = run_compiled(graph, {input_name: x})
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {input_name: x})
    assert len(got) == len(want)
    for g, w in zip(got.values(), want):
        assert g.shape == w.shape
        assert float(np.max(np.abs(g - w))) <= 1e-4 * max(1.0, float(np.max(np.abs(w))))


@pytest.mark.parametrize("name", FAST)
def test_light_cnn(name):
    check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_light_cnn_slow(name):
    check(name)
