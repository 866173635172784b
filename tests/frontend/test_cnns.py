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


@pytest.mark.parametrize("attrs,x_shape,w_shape", [
    ({"strides": [2, 3], "pads": [1, 0, 2, 1], "output_padding": [1, 2], "dilations": [1, 2]}, (2, 4, 5, 4),
     (4, 3, 3, 2)),
    ({"strides": [2, 2], "group": 2, "auto_pad": "SAME_UPPER"}, (1, 4, 3, 5), (4, 2, 3, 3)),
    ({"strides": [3], "output_shape": [13]}, (1, 2, 4), (2, 3, 2)),
])
def test_conv_transpose_matches_onnxruntime(attrs, x_shape, w_shape):
    """ConvTranspose becomes a convolution over the zero-spread, padded input with the flipped kernel: strides,
    dilations, output padding, groups, SAME padding and an output shape against onnxruntime, bias included."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[1] * attrs.get("group", 1)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (got,) = run_compiled(import_model(model), {"x": x}).values()
    assert got.shape == want.shape
    assert float(np.max(np.abs(got - want))) <= 1e-4 * max(1.0, float(np.max(np.abs(want))))


@pytest.mark.parametrize("attrs,scales,sizes", [
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 1, 2, 2], None),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, [1, 1, 1.5, 0.5], None),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [2, 3, 9, 4]),
    ({"mode": "cubic", "coordinate_transformation_mode": "half_pixel", "exclude_outside": 1}, [1, 1, 2.5, 1.75], None),
])
def test_resize_matches_onnxruntime(attrs, scales, sizes):
    """Resize as per-axis gathers with compile-time taps (what torch's interpolate exports to) vs onnxruntime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = np.random.default_rng(1).standard_normal((2, 3, 6, 5)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    inputs = ["x", "roi"]
    if scales is not None:
        inits.append(onnx.numpy_helper.from_array(np.asarray(scales, np.float32), "scales"))
        inputs.append("scales")
    else:
        inits.append(onnx.numpy_helper.from_array(np.asarray(sizes, np.int64), "sizes"))
        inputs += ["", "sizes"]
    node = helper.make_node("Resize", inputs, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (got,) = run_compiled(import_model(model), {"x": x}).values()
    assert got.shape == want.shape
    assert float(np.max(np.abs(got - want))) <= 1e-4 * max(1.0, float(np.max(np.abs(want))))
