#!/usr/bin/env python3
"""Export a decoding step with an explicit fixed-size key/value cache to ONNX test fixtures, with both exporters.

Run with the separate export venv (torch must NOT live in the project venv):

    /work/export-venv/bin/python scripts/export_decoder_step.py [--out tests/fixtures/decoding]

The model is one attention layer of a decoder, the way static-cache LLM exports write it: the step's token ``x``
[2, 1, 32], its position ``pos`` [1] (int64), and the caches ``k_cache``/``v_cache`` [2, 4 heads, 16, 8] come in;
the new key and value are written at ``pos`` (``Tensor.scatter``: ONNX ScatterElements), the query attends to the
positions up to ``pos``, and the output and the updated caches come out. For each exporter this writes
``decstep_<exporter>.onnx`` and ``decstep_<exporter>.npz``: ``x<i>`` for STEPS steps, and onnxruntime's outputs when
the steps are run one after the other from empty caches, each step fed the caches the previous one returned
(``output:y<i>``, and the last caches as ``output:k_cache``, ``output:v_cache``).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

B, D, HEADS, LENGTH, STEPS = 2, 32, 4, 16, 5
HD = D // HEADS


class DecoderStep(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(D, D, bias=False) for _ in range(4))

    def forward(self, x, pos, k_cache, v_cache):
        b = x.shape[0]

        def heads(t):
            return t.view(b, 1, HEADS, HD).transpose(1, 2)  # [b, heads, 1, hd]

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        where = pos.view(1, 1, 1, 1).expand(b, HEADS, 1, HD)
        k_cache = k_cache.scatter(2, where, k)
        v_cache = v_cache.scatter(2, where, v)
        scores = q @ k_cache.transpose(-1, -2) / math.sqrt(HD)  # [b, heads, 1, length]
        future = torch.arange(LENGTH).view(1, 1, 1, LENGTH) > pos.view(1, 1, 1, 1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        y = (scores.softmax(-1) @ v_cache).transpose(1, 2).reshape(b, 1, D)
        return self.o(y), k_cache, v_cache


def export(exporter: str, model, args, path: Path) -> None:
    names = dict(input_names=["x", "pos", "k_cache", "v_cache"], output_names=["y", "k_cache_out", "v_cache_out"])
    if exporter == "legacy":
        torch.onnx.export(model, args, str(path), opset_version=17, dynamo=False, **names)
    else:
        torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, **names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "decoding"))
    out = Path(ap.parse_args(argv).out)
    torch.manual_seed(7)
    model = DecoderStep().eval()
    xs = [torch.randn(B, 1, D) for _ in range(STEPS)]
    empty = torch.zeros(B, HEADS, LENGTH, HD)
    for exporter in ("legacy", "dynamo"):
        path = out / f"decstep_{exporter}.onnx"
        export(exporter, model, (xs[0], torch.tensor([0]), empty.clone(), empty.clone()), path)  # distinct caches:
        # the dynamo exporter makes one input of two arguments that are the same tensor
        sess = ort.InferenceSession(str(path))
        k = v = empty.numpy()
        tk = tv = empty
        data = {}
        for i, x in enumerate(xs):
            y, k, v = sess.run(None, {"x": x.numpy(), "pos": np.array([i], np.int64), "k_cache": k, "v_cache": v})
            with torch.no_grad():  # the export must be the module: onnxruntime against PyTorch, step by step
                ty, tk, tv = model(x, torch.tensor([i]), tk, tv)
            assert np.abs(y - ty.numpy()).max() <= 1e-5 and np.abs(k - tk.numpy()).max() <= 1e-6, exporter
            data[f"x{i}"], data[f"output:y{i}"] = x.numpy(), y
        data["output:k_cache"], data["output:v_cache"] = k, v
        np.savez(out / f"decstep_{exporter}.npz", **data)
        print(f"wrote {path} ({path.stat().st_size} bytes), {STEPS} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
