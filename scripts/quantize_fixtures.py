#!/usr/bin/env python3
"""Quantize a model fixture with onnxruntime's quantizer into the two int8 formats it writes:

- ``gpt2_dynamic.onnx`` — ``quantize_dynamic``: int8 weights, activations quantized at run time
  (``DynamicQuantizeLinear`` → ``MatMulInteger`` → scale), what onnxruntime recommends for transformers on CPU;
- ``gpt2_qdq.onnx`` — ``quantize_static`` in QDQ format, per-channel int8 weights and uint8 activations calibrated
  on the fixture's inputs (``QuantizeLinear``/``DequantizeLinear`` pairs around float ops), the format TensorRT and
  onnxruntime's GPU providers take.

Run with the project venv (onnxruntime is a test dependency): ``.venv/bin/python scripts/quantize_fixtures.py``.
The source is ``tests/fixtures/models/gpt2_dynamo.onnx`` (made by ``export_fixtures.py``); its ``.npz`` inputs are
the calibration data and the tests' inputs. Writes ``tests/fixtures/quantized/`` and its ``MANIFEST.json``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tests" / "fixtures" / "models" / "gpt2_dynamo.onnx"
OUT = REPO / "tests" / "fixtures" / "quantized"


class _Inputs(CalibrationDataReader):
    def __init__(self, feeds):
        self._it = iter([feeds])

    def get_next(self):
        return next(self._it, None)


def main() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's "run pre-processing first" advice
    data = np.load(SOURCE.with_suffix(".npz"))
    feeds = {k: data[k] for k in data.files if not k.startswith("output:")}
    OUT.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(SOURCE, OUT / "gpt2_dynamic.onnx", weight_type=QuantType.QInt8)
    quantize_static(SOURCE, OUT / "gpt2_qdq.onnx", _Inputs(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    entries = []
    for path in sorted(OUT.glob("*.onnx")):
        model = onnx.load(path)
        entries.append({"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "ops": dict(collections.Counter(n.op_type for n in model.graph.node).most_common())})
    manifest = {"source": SOURCE.relative_to(REPO).as_posix(),
                "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
                "inputs": SOURCE.with_suffix(".npz").relative_to(REPO).as_posix(),
                "onnxruntime": ort.__version__, "onnx": onnx.__version__, "fixtures": entries}
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for e in entries:
        print(e["file"], e["ops"])


if __name__ == "__main__":
    main()
