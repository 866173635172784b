#!/usr/bin/env python3
"""Quantize model fixtures with onnxruntime's quantizers, into the int8 and int4 formats they write.

int8, from the GPT-2 fixture:

- ``gpt2_dynamic.onnx`` — ``quantize_dynamic``: int8 weights, activations quantized at run time
  (``DynamicQuantizeLinear`` → ``MatMulInteger`` → scale), what onnxruntime recommends for transformers on CPU;
- ``gpt2_qdq.onnx`` — ``quantize_static`` in QDQ format, per-channel int8 weights and uint8 activations calibrated
  on the fixture's inputs (``QuantizeLinear``/``DequantizeLinear`` pairs around float ops), the format TensorRT and
  onnxruntime's GPU providers take.

int4 weight-only (``MatMulNBitsQuantizer``, blocks of 32 along K), from the Llama fixture and from a two-layer MLP
built here whose weights (200×512, 512×200) are too large to fold, so they stay packed in the artifact:
- ``llama_nbits.onnx``, ``mlp_nbits.onnx`` — ``com.microsoft::MatMulNBits`` (what onnxruntime-genai ships), the
  Llama asymmetric (packed uint8 zero points), the MLP symmetric (the default zero point 8);
- ``llama_int4_qdq.onnx``, ``mlp_int4_qdq.onnx`` — blocked ``DequantizeLinear`` of int4 (symmetric) and uint4
  (asymmetric) weights into ``MatMul``, ONNX's standard form (opset 21).

Run with the project venv plus ``onnx-ir``, which onnxruntime's 4-bit quantizer imports
(``.venv/bin/pip install onnx-ir``): ``.venv/bin/python scripts/quantize_fixtures.py``. The sources are
``tests/fixtures/models/{gpt2,llama}_dynamo.onnx`` (made by ``export_fixtures.py``); the GPT-2 ``.npz`` inputs are
the calibration data. Writes ``tests/fixtures/quantized/``: each ``<fixture>.onnx`` with a ``<fixture>.npz`` of its
inputs and onnxruntime's outputs (optimizations off), and ``MANIFEST.json``.
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
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "tests" / "fixtures" / "models"
SOURCE = MODELS / "gpt2_dynamo.onnx"
OUT = REPO / "tests" / "fixtures" / "quantized"
MLP_DIMS = (200, 512)  # K = 200 is not a multiple of the block: the last block is padded


class _Inputs(CalibrationDataReader):
    def __init__(self, feeds):
        self._it = iter([feeds])

    def get_next(self):
        return next(self._it, None)


def main() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's "run pre-processing first" advice
    data = np.load(SOURCE.with_suffix(".npz"))
    feeds = {k: data[k] for k in data.files if not k.startswith("output:")}
    data = np.load(MODELS / "llama_dynamo.npz")
    llama_feeds = {k: data[k] for k in data.files if not k.startswith("output:")}
    OUT.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(SOURCE, OUT / "gpt2_dynamic.onnx", weight_type=QuantType.QInt8)
    quantize_static(SOURCE, OUT / "gpt2_qdq.onnx", _Inputs(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    for source, stem in ((onnx.load(MODELS / "llama_dynamo.onnx"), "llama"), (mlp(), "mlp")):
        symmetric = stem == "mlp"
        _int4(source, OUT / f"{stem}_nbits.onnx", QuantFormat.QOperator, symmetric)
        _int4(source, OUT / f"{stem}_int4_qdq.onnx", QuantFormat.QDQ, not symmetric)
    entries = []
    for path in sorted(OUT.glob("*.onnx")):
        model = onnx.load(path)
        _store_outputs(path, feeds if path.stem.startswith("gpt2") else llama_feeds if path.stem.startswith("llama")
                       else mlp_inputs())
        entries.append({"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "ops": dict(collections.Counter(n.op_type for n in model.graph.node).most_common())})
    manifest = {"source": SOURCE.relative_to(REPO).as_posix(), "int4_sources": ["tests/fixtures/models/llama_dynamo.onnx",
                                                                                f"scripts/quantize_fixtures.py: mlp() (K={MLP_DIMS[0]}, H={MLP_DIMS[1]})"],
                "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
                "inputs": SOURCE.with_suffix(".npz").relative_to(REPO).as_posix(),
                "onnxruntime": ort.__version__, "onnx": onnx.__version__, "fixtures": entries}
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for e in entries:
        print(e["file"], e["ops"])


def mlp() -> onnx.ModelProto:
    """x[4, K] @ W1[K, H] -> Gelu -> @ W2[H, K]: a Megatron-shaped MLP with seeded random weights."""
    import onnx.helper as oh

    k, h = MLP_DIMS
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((k, h)) / np.sqrt(k)).astype(np.float32)
    w2 = (rng.standard_normal((h, k)) / np.sqrt(h)).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Gelu", ["h"], ["g"]),
         oh.make_node("MatMul", ["g", "w2"], ["y"])], "mlp",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, k])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, k])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)])


def mlp_inputs() -> dict:
    return {"x": np.random.default_rng(1).standard_normal((4, MLP_DIMS[0]), dtype=np.float32)}


def _store_outputs(path: Path, feeds: dict) -> None:
    """``<fixture>.npz``: the inputs and onnxruntime's outputs (``output:<name>``) with its graph optimizations off
    (with them on it fuses QDQ groups into kernels that round differently from the spec)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    np.savez(path.with_suffix(".npz"), **feeds, **{f"output:{k}": v for k, v in outputs.items()})


def _int4(model: onnx.ModelProto, path: Path, quant_format, symmetric: bool) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, quant_format=quant_format)
    quantizer = MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()), algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, path)


if __name__ == "__main__":
    main()
