"""The classic CNNs that the onnx package ships (backend/test/data/light, opset 9): import, compile for llvm, run, and
match onnxruntime on a seeded random image. Their weights are ``ConstantOfShape`` fills of 0.02, which make every
channel alike and the logits huge (SqueezeNet's are ~9e9, where one ulp is 1024 and a softmax of them turns a
rounding difference into a 0.001 error): the tests replace each fill by seeded random values of its shape (He-scaled
weights, batch norms near the identity), so a mixed-up channel shows and the outputs are well conditioned.
float32 tolerance: max abs error <= 1e-4 x max(1, max|expected|). Big ones (minutes of untuned TVM compile/run on
2 cores) are marked slow."""

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bmc.frontend.onnx import import_model
from bmc.testing.compiled import run_compiled

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
FAST = ["squeezenet", "bvlc_alexnet", "zfnet512", "inception_v1"]
SLOW = ["shufflenet", "resnet50", "inception_v2", "densenet121", "vgg19"]


def random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """``model`` with every ``ConstantOfShape`` fill replaced by an initializer of seeded random values, chosen by
    what reads it: a Conv/Gemm weight He-scaled (std sqrt(2 / fan-in)), a batch norm's or a Mul's scale near 1, a
    variance in [0.5, 1.5], anything else (biases, means, shifts) small."""
    rng = np.random.default_rng(seed)
    shapes = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    reader = {}
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            reader.setdefault(name, (n, k))
    fills = [n for n in model.graph.node if n.op_type == "ConstantOfShape"]
    for n in fills:
        shape = tuple(int(d) for d in shapes[n.input[0]])
        user, k = reader[n.output[0]]
        while user.op_type == "Unsqueeze":  # a per-channel scale or shift unsqueezed to [C, 1, 1]
            user, k = reader[user.output[0]]
        if user.op_type in ("Conv", "Gemm") and k == 1:
            fan_in = shape[0] if user.op_type == "Gemm" and not any(
                a.name == "transB" and a.i for a in user.attribute) else int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif (user.op_type, k) in (("BatchNormalization", 1), ("Mul", 1), ("Mul", 0)):
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif (user.op_type, k) == ("BatchNormalization", 4):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), n.output[0]))
    for n in fills:
        model.graph.node.remove(n)
    read = {name for n in model.graph.node for name in n.input}
    for init in [i for i in model.graph.initializer if i.name not in read]:  # the fills' shapes
        model.graph.initializer.remove(init)
    for inp in [i for i in model.graph.input if i.name not in read]:  # (opset 9 lists initializers as inputs)
        model.graph.input.remove(inp)
    return model


def case(name):
    """(model with random weights, its logits made an output too, input name, seeded image): a softmax of large
    logits (ResNet-50's and ShuffleNet's, past 16 residual blocks) saturates to 0 and 1, which would hide errors
    in the logits themselves."""
    model = random_weights(onnx.load(os.path.join(LIGHT, f"light_{name}.onnx")))
    for n in model.graph.node:
        if n.op_type == "Softmax":
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.input[0]))
    inits = {i.name for i in model.graph.initializer}
    (inp,) = [i for i in model.graph.input if i.name not in inits]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    return model, inp.name, np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def check(name):
    import onnxruntime as ort

    model, input_name, x = case(name)
    got = run_compiled(import_model(model), {input_name: x})
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {input_name: x})
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


def test_audio_front_end_matches_onnxruntime():
    """Whisper's and wav2vec2's 1-D convolutions (a 2-D one of height 1 on the CPU's native kernels, bias and GELU
    after them): two convs with biases and erf GELUs, the second of stride 2, then a grouped positional conv with
    pads (16 groups) added back as a residual, against onnxruntime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 80, 200)).astype(np.float32)
    inits = {"w1": rng.standard_normal((64, 80, 3)) / np.sqrt(240), "b1": 0.1 * rng.standard_normal(64),
             "w2": rng.standard_normal((64, 64, 3)) / np.sqrt(192), "b2": 0.1 * rng.standard_normal(64),
             "wp": rng.standard_normal((64, 4, 16)) / 8, "bp": 0.1 * rng.standard_normal(64),
             "sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5}
    nodes = []

    def gelu(v: str, out: str) -> str:
        nodes.extend([helper.make_node("Div", [v, "sqrt2"], [f"{out}.d"]), helper.make_node("Erf", [f"{out}.d"],
                      [f"{out}.e"]), helper.make_node("Add", [f"{out}.e", "one"], [f"{out}.a"]),
                      helper.make_node("Mul", [v, f"{out}.a"], [f"{out}.m"]),
                      helper.make_node("Mul", [f"{out}.m", "half"], [out])])
        return out

    nodes.append(helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1]))
    nodes.append(helper.make_node("Conv", [gelu("c1", "g1"), "w2", "b2"], ["c2"], pads=[1, 1], strides=[2]))
    h = gelu("c2", "g2")
    nodes.append(helper.make_node("Conv", [h, "wp", "bp"], ["p"], pads=[8, 7], group=16))
    nodes.append(helper.make_node("Add", [h, gelu("p", "gp")], ["y"]))
    graph = helper.make_graph(nodes, "front_end", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (got,) = run_compiled(import_model(model), {"x": x}).values()
    assert got.shape == want.shape == (1, 64, 100)
    assert float(np.max(np.abs(got - want))) <= 1e-4 * max(1.0, float(np.max(np.abs(want))))
