"""``bmc demo``: compile the embedded GPT-style model, run it, compare with onnxruntime, print a summary."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = Path(__file__).parent / "models" / "gpt2-tiny.onnx"
TOLERANCE = 1e-4  # max abs error relative to the output's scale (float32)


def main(target: str = "llvm", batch: int = 2, seq: int = 16, keep: str | None = None) -> int:
    import bmc

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(batch, seq), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(keep) if keep else Path(tmp) / "gpt2-tiny.bmc"
        t0 = time.perf_counter()
        summary = bmc.compile(MODEL, out, target=target, input_shapes={"input_ids": (batch, seq)})
        compile_s = time.perf_counter() - t0
        model = bmc.load(out)
        t0 = time.perf_counter()
        logits = model(input_ids=ids)
        run_s = time.perf_counter() - t0
    expected = _onnxruntime(ids)
    err = float(np.max(np.abs(logits - expected)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    ok = err <= TOLERANCE * scale
    print(f"bmc demo: {MODEL.name} ({summary['nodes']} IR nodes, {summary['weight_bytes'] / 1e3:.1f} kB weights)")
    print(f"  compiled for {target} in {compile_s:.2f} s -> artifact {summary['size_bytes'] / 1e3:.0f} kB")
    print(f"  ran input_ids {ids.shape} -> logits {logits.shape} in {run_s * 1e3:.1f} ms")
    print(f"  vs onnxruntime: max abs error {err:.2e} (tolerance {TOLERANCE:.0e} x scale {scale:.2f}): "
          f"{'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _onnxruntime(ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]
