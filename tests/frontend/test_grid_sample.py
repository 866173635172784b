"""GridSample (a composition of gathers) against ONNX's reference implementation, at points up to 2.5x outside
the image (several reflections): every mode, padding and corner alignment in 2-D, and 3-D volumes (the
conformance suite adds its 18 cases)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import bmc.onnx_backend as backend


def _check(mode, padding, align, x_shape, g_shape, seed):
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(seed)
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32),
             "grid": rng.uniform(-2.5, 2.5, g_shape).astype(np.float32)}
    node = helper.make_node("GridSample", ["X", "grid"], ["Y"], mode=mode, padding_mode=padding, align_corners=align)
    vi = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in feeds.items()]
    model = helper.make_model(helper.make_graph([node], "g", vi, [helper.make_tensor_value_info("Y", 1, None)]),
                              opset_imports=[helper.make_opsetid("", 20)])
    got = backend.prepare(model).run(list(feeds.values()))[0]
    np.testing.assert_allclose(got, ReferenceEvaluator(model).run(None, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_2d_matches_the_reference(mode, padding, align):
    _check(mode, padding, align, (2, 3, 5, 4), (2, 4, 3, 2), seed=len(mode) * 7 + len(padding) + align)


@pytest.mark.parametrize("mode, padding, align", [("linear", "reflection", 0), ("nearest", "border", 1)])
def test_grid_sample_3d_matches_the_reference(mode, padding, align):
    _check(mode, padding, align, (1, 2, 3, 4, 5), (1, 2, 3, 2, 3), seed=3)
