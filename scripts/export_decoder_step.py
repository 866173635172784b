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
(``output:y<i>``, and the last caches as ``output:k_cache``, ``output:v_cache``). It also writes
``llamastep_<exporter>.{onnx,npz}``: a 2-layer Llama-shaped step (grouped-query attention, rotary embeddings,
RMSNorm, SwiGLU) whose per-layer caches are written with ``index_copy`` (ONNX ScatterND); see :class:`LlamaStep`.
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


V, LAYERS, KV_HEADS, FFN = 64, 2, 2, 64


class RMSNorm(torch.nn.Module):
    """Spelled out, as the Llama exports do (the legacy exporter has no ``aten::rms_norm``)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(D))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class LlamaStep(torch.nn.Module):
    """A 2-layer Llama-shaped decoder step with per-layer caches (token ids in, logits out): RMSNorm, rotary
    embeddings at the step's position, grouped-query attention (4 query heads share 2 key/value heads), SwiGLU, tied
    nothing. The caches [B, 2, 16, 8] are written with ``index_copy`` (ONNX ScatterND, as static-cache exports do)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        lin = torch.nn.Linear
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict(dict(
            q=lin(D, D, bias=False), k=lin(D, KV_HEADS * HD, bias=False), v=lin(D, KV_HEADS * HD, bias=False),
            o=lin(D, D, bias=False), gate=lin(D, FFN, bias=False), up=lin(D, FFN, bias=False),
            down=lin(FFN, D, bias=False), ln1=RMSNorm(), ln2=RMSNorm()))
            for _ in range(LAYERS))
        self.norm, self.head = RMSNorm(), lin(D, V, bias=False)
        for p in self.parameters():  # random norm gains too, so that a wrong one shows
            torch.nn.init.normal_(p, std=0.2 if p.dim() > 1 else 1.0)

    @staticmethod
    def rotate(t, pos):
        half = HD // 2
        freq = pos.float().view(1, 1, 1, 1) * (10000.0 ** (-torch.arange(half).float() / half))
        cos, sin = torch.cat([freq.cos()] * 2, -1), torch.cat([freq.sin()] * 2, -1)
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    def forward(self, ids, pos, *caches):
        b = ids.shape[0]
        h = self.embed(ids)  # [b, 1, D]
        out = []
        for i, layer in enumerate(self.layers):
            x = layer["ln1"](h)
            q = self.rotate(layer["q"](x).view(b, 1, HEADS, HD).transpose(1, 2), pos)
            k = self.rotate(layer["k"](x).view(b, 1, KV_HEADS, HD).transpose(1, 2), pos)
            v = layer["v"](x).view(b, 1, KV_HEADS, HD).transpose(1, 2)
            k_cache, v_cache = caches[2 * i].index_copy(2, pos, k), caches[2 * i + 1].index_copy(2, pos, v)
            out += [k_cache, v_cache]
            kk = k_cache.repeat_interleave(HEADS // KV_HEADS, dim=1)
            vv = v_cache.repeat_interleave(HEADS // KV_HEADS, dim=1)
            scores = q @ kk.transpose(-1, -2) / math.sqrt(HD)
            future = torch.arange(LENGTH).view(1, 1, 1, LENGTH) > pos.view(1, 1, 1, 1)
            scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
            h = h + layer["o"]((scores.softmax(-1) @ vv).transpose(1, 2).reshape(b, 1, D))
            x = layer["ln2"](h)
            h = h + layer["down"](torch.nn.functional.silu(layer["gate"](x)) * layer["up"](x))
        return (self.head(self.norm(h)), *out)


CACHES = [f"{kv}_cache_{i}" for i in range(LAYERS) for kv in "kv"]


def export(exporter: str, model, args, path: Path, names=None) -> None:
    names = names or dict(input_names=["x", "pos", "k_cache", "v_cache"],
                          output_names=["y", "k_cache_out", "v_cache_out"])
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
    export_llama(out)
    return 0


def export_llama(out: Path) -> None:
    """``llamastep_<exporter>.{onnx,npz}``: :class:`LlamaStep` fed the token ids ``ids<i>`` [2, 1] one step at a
    time from empty caches, with onnxruntime's logits ``output:logits<i>`` and the last caches ``output:<cache>``."""
    torch.manual_seed(11)
    model = LlamaStep().eval()
    ids = [torch.randint(0, V, (B, 1)) for _ in range(STEPS)]
    empty = torch.zeros(B, KV_HEADS, LENGTH, HD)
    names = dict(input_names=["ids", "pos", *CACHES], output_names=["logits", *[c + "_out" for c in CACHES]])
    for exporter in ("legacy", "dynamo"):
        path = out / f"llamastep_{exporter}.onnx"
        export(exporter, model, (ids[0], torch.tensor([0]), *[empty.clone() for _ in CACHES]), path, names)
        sess = ort.InferenceSession(str(path))
        caches, tcaches, data = [empty.numpy()] * len(CACHES), [empty] * len(CACHES), {}
        for i, t in enumerate(ids):
            logits, *caches = sess.run(None, {"ids": t.numpy(), "pos": np.array([i], np.int64),
                                              **dict(zip(CACHES, caches))})
            with torch.no_grad():
                tlogits, *tcaches = model(t, torch.tensor([i]), *tcaches)
            assert np.abs(logits - tlogits.numpy()).max() <= 1e-4 * max(1.0, float(np.abs(logits).max())), exporter
            data[f"ids{i}"], data[f"output:logits{i}"] = t.numpy(), logits
        data.update({f"output:{c}": a for c, a in zip(CACHES, caches)})
        np.savez(out / f"llamastep_{exporter}.npz", **data)
        print(f"wrote {path} ({path.stat().st_size} bytes), {STEPS} steps")


if __name__ == "__main__":
    raise SystemExit(main())
