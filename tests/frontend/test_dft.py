"""DFT (matmuls by cosine and sine matrices, in float64) against numpy's FFT: forward, inverse, one-sided, irfft,
complex input, a zero-padded and a truncated ``dft_length``, a middle axis; and a Whisper-sized STFT."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import bmc.onnx_backend as backend


def _complex(x):
    return x[..., 0] + 1j * x[..., 1] if x.shape[-1] == 2 else x[..., 0]


@pytest.mark.parametrize("inverse, onesided, parts, length", [
    (0, 0, 1, None), (0, 1, 1, 12), (0, 0, 2, 7), (1, 0, 2, None), (1, 1, 2, 10), (1, 0, 2, 5)])
def test_dft_matches_numpy(inverse, onesided, parts, length):
    rng = np.random.default_rng(inverse * 10 + onesided * 5 + parts + (length or 0))
    x = rng.standard_normal((2, 9, 3, parts)).astype(np.float32)  # signal along axis 1
    inputs = ["x", "n" if length else "", "axis"]
    inits = [helper.make_tensor("axis", TensorProto.INT64, [], [1])]
    if length:
        inits.append(helper.make_tensor("n", TensorProto.INT64, [], [length]))
    node = helper.make_node("DFT", inputs, ["y"], inverse=inverse, onesided=onesided)
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 20)])
    got = backend.prepare(model).run([x])[0]
    signal = _complex(x.astype(np.float64))
    if inverse and onesided:
        want = np.fft.irfft(signal, n=length, axis=1)[..., None]
    else:
        n = length or x.shape[1]
        spectrum = (np.fft.ifft if inverse else np.fft.fft)(signal, n=n, axis=1)
        if onesided:
            spectrum = spectrum[:, : n // 2 + 1]
        want = np.stack([spectrum.real, spectrum.imag], axis=-1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_whisper_sized_stft_matches_numpy():
    """STFT as Whisper's front end takes it (400-sample Hann frames every 160 samples, one-sided) against numpy's
    float64 FFT of the same frames: within 1e-6 of the largest magnitude, the float64 DFT rounded once."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4000, 1)).astype(np.float32)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("STFT", ["x", "step", "window"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("step", TensorProto.INT64, [], [160]),
         helper.make_tensor("window", TensorProto.FLOAT, [400], window.tolist())]),
        opset_imports=[helper.make_opsetid("", 17)])
    got = backend.prepare(model).run([x])[0]
    starts = np.arange(1 + (4000 - 400) // 160)[:, None] * 160 + np.arange(400)
    spectrum = np.fft.rfft(x[:, starts, 0].astype(np.float64) * window, axis=-1)
    want = np.stack([spectrum.real, spectrum.imag], axis=-1)
    assert got.shape == want.shape == (2, 23, 201, 2)
    assert float(np.max(np.abs(got - want))) <= 1e-6 * float(np.max(np.abs(want)))
