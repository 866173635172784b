"""onnxruntime's QOperator format: its ``com.microsoft`` quantized ops (QLinearAdd, QLinearMul, QLinearLeakyRelu,
QLinearSigmoid, QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat, QLinearSoftmax, QLinearWhere, QGemm)
one node at a time, the three paths of an integer convolution, and a small CNN quantized by onnxruntime's own
quantizer, all against onnxruntime.

Oracles and tolerances: bmc follows onnxruntime's arithmetic for each op (scale ratios in float32, the zero point
added before rounding or, for its table-driven kernels, after), so every 8-bit result here equals onnxruntime's
today; as float32 transcendentals (TVM's fast exp) may round differently on another CPU, single ops allow one
unit in at most 0.5% of the elements. ConvInteger's int32 results must be exact. The whole CNN allows a few
units (a flipped unit propagates through the next layers).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bmc.onnx_backend as backend

MS = "com.microsoft"
U8, I8 = TensorProto.UINT8, TensorProto.INT8


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _run_both(nodes, inputs: dict, inits, out_elem=U8, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
                     for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", out_elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    got = backend.prepare(model).run(list(inputs.values()))[0]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    return got, ref


def _assert_within_one_unit(got, ref):
    diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
    assert diff.max() <= 1, diff.max()
    assert np.mean(diff > 0) <= 0.005, np.mean(diff > 0)


def _q(rng, shape, dtype=np.uint8):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, size=shape).astype(dtype)


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_binary_ops(op, dtype):
    rng = np.random.default_rng(0)
    a, b = _q(rng, (2, 8, 5, 5), dtype), _q(rng, (8, 1, 5), dtype)  # broadcasting
    zp = lambda v: np.array(v, dtype)  # noqa: E731
    inits = [_init("as", np.float32(0.05)), _init("az", zp(3)), _init("bs", np.float32(0.02)), _init("bz", zp(-5)
             if dtype == np.int8 else zp(130)), _init("cs", np.float32(0.04 if op == "QLinearAdd" else 0.3)),
             _init("cz", zp(7))]
    node = helper.make_node(op, ["a", "as", "az", "b", "bs", "bz", "cs", "cz"], ["y"], domain=MS)
    _assert_within_one_unit(*_run_both([node], {"a": a, "b": b}, inits, U8 if dtype == np.uint8 else I8))


@pytest.mark.parametrize("op, attrs", [("QLinearLeakyRelu", {"alpha": 0.1}), ("QLinearSigmoid", {}),
                                       ("QLinearSoftmax", {"axis": -1, "opset": 13}),
                                       ("QLinearSoftmax", {"axis": 1, "opset": 11}),
                                       ("QLinearGlobalAveragePool", {"channels_last": 0}),
                                       ("QLinearGlobalAveragePool", {"channels_last": 1}),
                                       ("QLinearAveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                               "strides": [2, 2], "channels_last": 0}),
                                       ("QLinearAveragePool", {"kernel_shape": [2, 2], "count_include_pad": 1,
                                                               "pads": [0, 1, 1, 0], "channels_last": 1})],
                         ids=["leaky_relu", "sigmoid", "softmax13", "softmax11", "gap", "gap_last", "avgpool",
                              "avgpool_last"])
def test_qlinear_unary_ops(op, attrs):
    rng = np.random.default_rng(1)
    x = _q(rng, (2, 6, 9, 9))
    out_scale = np.float32(1 / 256 if "Softmax" in op or "Sigmoid" in op else 0.05)
    inits = [_init("xs", np.float32(0.06)), _init("xz", np.uint8(120)), _init("ys", out_scale),
             _init("yz", np.uint8(0 if "Softmax" in op or "Sigmoid" in op else 110))]
    node = helper.make_node(op, ["x", "xs", "xz", "ys", "yz"], ["y"], domain=MS, **attrs)
    _assert_within_one_unit(*_run_both([node], {"x": x}, inits))


def test_qlinear_concat_requantizes_each_input():
    rng = np.random.default_rng(2)
    a, b = _q(rng, (1, 3, 4, 4)), _q(rng, (1, 5, 4, 4))
    inits = [_init("ys", np.float32(0.1)), _init("yz", np.uint8(128)), _init("as", np.float32(0.05)),
             _init("az", np.uint8(100)), _init("bs", np.float32(0.2)), _init("bz", np.uint8(140))]
    node = helper.make_node("QLinearConcat", ["ys", "yz", "a", "as", "az", "b", "bs", "bz"], ["y"], domain=MS, axis=1)
    _assert_within_one_unit(*_run_both([node], {"a": a, "b": b}, inits))


def test_qlinear_where():
    rng = np.random.default_rng(3)
    c, a, b = rng.random((4, 7)) < 0.5, _q(rng, (4, 7)), _q(rng, (1, 7))
    inits = [_init("as", np.float32(0.05)), _init("az", np.uint8(100)), _init("bs", np.float32(0.2)),
             _init("bz", np.uint8(140)), _init("ys", np.float32(0.1)), _init("yz", np.uint8(128))]
    node = helper.make_node("QLinearWhere", ["c", "a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"], domain=MS)
    _assert_within_one_unit(*_run_both([node], {"c": c, "a": a, "b": b}, inits))


@pytest.mark.parametrize("trans_b, per_column, bias, quantized", [(1, True, True, True), (0, False, False, True),
                                                                  (1, True, True, False)])
def test_qgemm(trans_b, per_column, bias, quantized):
    """A quantized Linear layer as onnxruntime's quantizer writes it: B int8 (stored [N, K] with transB), its scale
    per column, an int32 bias at scale a_scale * b_scale; the output quantized or (no y_scale) float32."""
    rng = np.random.default_rng(4)
    m, k, n = 5, 48, 24
    a, b = _q(rng, (m, k)), _q(rng, (n, k) if trans_b else (k, n), np.int8)
    b_scale = (rng.uniform(0.01, 0.03, n) if per_column else np.array([0.02])).astype(np.float32)
    inits = [_init("as", np.float32(0.05)), _init("az", np.uint8(120)), _init("b", b), _init("bs", b_scale),
             _init("bz", np.zeros(b_scale.shape, np.int8)), _init("c", rng.integers(-500, 500, n).astype(np.int32))]
    names = ["a", "as", "az", "b", "bs", "bz", "c" if bias else ""]
    if quantized:
        inits += [_init("ys", np.float32(0.5)), _init("yz", np.uint8(128))]
        names += ["ys", "yz"]
    node = helper.make_node("QGemm", names, ["y"], domain=MS, transB=trans_b, alpha=1.0)
    got, ref = _run_both([node], {"a": a}, inits, U8 if quantized else TensorProto.FLOAT)
    if quantized:
        _assert_within_one_unit(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


#: (x shape, w shape, group, pads, strides): the paths of an integer convolution
INTEGER_CONVS = [((2, 40, 6, 7), (24, 40, 1, 1), 1, (0, 0, 0, 0), (1, 1)),    # pointwise: matmul_integer
                 ((1, 32, 9, 9), (32, 1, 3, 3), 32, (1, 1, 1, 1), (2, 2)),    # depthwise, 9 terms: float32, exact
                 ((1, 3, 11, 11), (8, 3, 3, 3), 1, (1, 0, 1, 0), (1, 1)),     # 27 terms: float32
                 ((2, 64, 7, 6), (16, 64, 3, 3), 1, (1, 2, 0, 1), (2, 1)),    # 576 terms: im2col + matmul_integer
                 ((1, 320, 8, 8), (16, 320, 1, 1), 1, (0, 0, 0, 0), (2, 2)),  # strided 1x1: im2col of one tap
                 ((1, 64, 6, 6), (32, 16, 3, 3), 4, (1, 1, 1, 1), (1, 1)),    # grouped, 144 terms: float32
                 ((1, 128, 6, 6), (32, 64, 3, 3), 2, (1, 1, 1, 1), (1, 1))]   # grouped, 576 terms: float64
IDS = ["pointwise", "depthwise", "first_layer", "im2col", "strided_1x1", "grouped", "grouped_float64"]
PATHS = ["matmul_integer", "float32", "float32", "matmul_integer", "matmul_integer", "float32", "float64"]


@pytest.mark.parametrize("case", INTEGER_CONVS, ids=IDS)
def test_conv_integer_is_exact(case):
    """ConvInteger's int32 sums equal onnxruntime's exactly on every path, with extreme values (all 255 against
    zero point 0: the largest terms) in part of the input."""
    x_shape, w_shape, group, pads, strides = case
    rng = np.random.default_rng(5)
    x, w = _q(rng, x_shape), _q(rng, w_shape, np.int8)
    x[..., :2] = 255
    inits = [_init("w", w), _init("xz", np.uint8(0)), _init("wz", np.int8(0))]
    node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], group=group, pads=list(pads),
                            strides=list(strides))
    got, ref = _run_both([node], {"x": x}, inits, TensorProto.INT32, opset=10)
    np.testing.assert_array_equal(got, ref)
    from bmc.frontend.onnx import import_model

    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", U8, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)], inits)
    nodes = import_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])).nodes
    paths = {"matmul_integer" if n.op == "matmul_integer" else n.inputs[0].type.dtype for n in nodes
             if n.op in ("matmul_integer", "conv")}
    assert paths == {PATHS[INTEGER_CONVS.index(case)]}, paths


@pytest.mark.parametrize("case", INTEGER_CONVS, ids=IDS)
def test_qlinear_conv_paths(case):
    x_shape, w_shape, group, pads, strides = case
    rng = np.random.default_rng(6)
    x, w = _q(rng, x_shape), _q(rng, w_shape, np.int8)
    m = w_shape[0]
    inits = [_init("xs", np.float32(0.02)), _init("xz", np.uint8(125)), _init("w", w),
             _init("ws", rng.uniform(0.002, 0.01, m).astype(np.float32)), _init("wz", np.zeros(m, np.int8)),
             _init("ys", np.float32(0.05)), _init("yz", np.uint8(128)),
             _init("bias", rng.integers(-2000, 2000, m).astype(np.int32))]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "bias"], ["y"],
                            group=group, pads=list(pads), strides=list(strides))
    _assert_within_one_unit(*_run_both([node], {"x": x}, inits, opset=10))


@pytest.mark.parametrize("fmt", ["QOperator", "QDQ"])
def test_cnn_quantized_by_onnxruntime_matches_it(tmp_path, fmt):
    """A small CNN (a 3x3 conv, a depthwise conv, pointwise convs, a residual add, LeakyRelu, global pooling,
    a concat, a Gemm, a softmax) quantized statically by onnxruntime's quantizer in the QOperator format, and in
    the QDQ format, whose pointwise and depthwise convolutions bmc computes on the codes (``matmul_integer``, an
    exact float32 convolution) as onnxruntime's fused QLinearConv does."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(7)

    def conv(name, x, cin, cout, k, group=1, stride=1):
        w = (rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2 / (cin // group * k * k))).astype(np.float32)
        inits.append(_init(f"{name}_w", w))
        inits.append(_init(f"{name}_b", (rng.standard_normal(cout) * 0.1).astype(np.float32)))
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name], group=group,
                                      pads=[k // 2] * 4, strides=[stride, stride]))
        return name

    nodes, inits = [], []
    h = conv("c1", "x", 3, 16, 3, stride=2)
    nodes.append(helper.make_node("Relu", [h], ["r1"]))
    d = conv("dw", "r1", 16, 16, 3, group=16)
    nodes.append(helper.make_node("LeakyRelu", [d], ["l1"], alpha=0.1))
    p = conv("pw", "l1", 16, 16, 1)
    nodes.append(helper.make_node("Add", [p, "r1"], ["res"]))
    e = conv("ex", "res", 16, 24, 1)
    nodes += [helper.make_node("GlobalAveragePool", ["res"], ["g1"]), helper.make_node("GlobalAveragePool", [e], ["g2"]),
              helper.make_node("Concat", ["g1", "g2"], ["cat"], axis=1),
              helper.make_node("Flatten", ["cat"], ["flat"])]
    inits.append(_init("fc_w", (rng.standard_normal((10, 40)) * 0.3).astype(np.float32)))
    inits.append(_init("fc_b", np.zeros(10, np.float32)))
    nodes += [helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
              helper.make_node("Softmax", ["logits"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    src, dst = tmp_path / "cnn.onnx", tmp_path / "cnn_qop.onnx"
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.left = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(4)]

        def get_next(self):
            return {"x": self.left.pop()} if self.left else None

    quantize_static(str(src), str(dst), Calibration(), quant_format=getattr(QuantFormat, fmt), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    model = onnx.load(dst)
    ops = {n.op_type for n in model.graph.node}
    if fmt == "QOperator":
        assert {"QLinearConv", "QLinearAdd", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearConcat",
                "QGemm"} <= ops, ops
    from bmc.frontend.onnx import import_model

    imported = [node.op for node in import_model(model).nodes]
    # the pointwise convs pw and ex; in QDQ the Gemm too (QGemm runs on dequantized operands)
    assert imported.count("matmul_integer") == (2 if fmt == "QOperator" else 3), imported
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(dst.read_bytes(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = backend.prepare(model).run([x])[0]
    # the output is a softmax quantized in steps of 1/256 (or a float after a last dequantization): a few steps
    np.testing.assert_allclose(got, ref, atol=4 / 256)
