#!/usr/bin/env python3
"""Attention on the CPU: bmc's fused kernel against the unfused composition and onnxruntime, side by side in one
process, same thread count.

    python benchmarks/attention.py                       # GPT-2-small heads (12 x 64), causal, seq 128, 512, 2048,
                                                         # one decoding step (1 query, 2048 keys), and seq 2048
                                                         # with a sliding window of 256 keys
    python benchmarks/attention.py --seqs 256,1024 --decode 4096 --json /tmp/a.json

The model is the attention core as the PyTorch exporters write it (``softmax(q @ k.T * 0.125 + causal_mask) @
v``, q/k/v ``[batch, 12, seq, 64]``, the key transposed by a ``Transpose`` node, the mask a constant). bmc compiles
it twice (``queries`` = ``seq`` for a prefill; a decoding step's one query sees every key): as it does by default (``fuse_attention`` makes it one ``attention`` op, the native kernel
``bmc.cpu.attention_bias``: no ``[seq, seq]`` score matrix is stored) and with the fusion turned off (BLAS batched
matmuls around TVM's softmax, what bmc did before). Per sequence length: median latency of the three, and of the
fused build given its inputs in 64-byte-aligned memory ("in place": read where they are, as a decoding loop feeding
bmc's own key/value outputs back gets; numpy's own arrays are copied into the program's tensors), the ratios, the
score bytes the unfused program writes and reads, and the max abs error of both bmc builds against onnxruntime
relative to max |onnxruntime|. ``--windows`` adds prefills of the longest ``--seqs`` with a causal sliding window
(each query sees itself and the ``window - 1`` keys before it: Mistral's, Gemma's local layers): the mask is still
a constant, and the fused kernel computes only the keys a block of query rows sees. Prints a table and writes
``benchmarks/results/attention.json``. ``--sinks`` times GPT-OSS's form instead (a sink logit per head in every
row's softmax; the fused build is the kernel's log-sum-exp form times ``sigmoid(lse - sink)``) and writes
``benchmarks/results/attention_sinks.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "attention.json"
HEADS, HEAD_DIM = 12, 64

from benchmarks.quantized import _median_s, run_main  # noqa: E402 (after the path set-up)


def attention_core(batch: int, seq: int, queries: int, window: int | None = None, sinks: bool = False):
    """The last ``queries`` positions of a causal attention over ``seq`` keys (each seeing the last ``window``
    keys up to itself, when given); with ``sinks`` GPT-OSS's form: a learned logit per head concatenated to every
    row of the scores, the row's max taken off, the softmax, the sink's column dropped."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    shape = [batch, HEADS, seq, HEAD_DIM]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [batch, HEADS, queries, HEAD_DIM])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("k", "v")]
    visible = np.tril(np.ones((queries, seq), bool), seq - queries)
    if window is not None:
        visible &= ~np.tril(np.ones((queries, seq), bool), seq - queries - window)
    mask = np.where(visible, 0, np.finfo(np.float32).min).astype(np.float32)
    inits = [numpy_helper.from_array(mask[None, None], "mask"),
             numpy_helper.from_array(np.array(HEAD_DIM ** -0.5, np.float32), "scale")]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
             helper.make_node("Add", ["scaled", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["out"])]
    if sinks:
        sink = np.random.default_rng(0).standard_normal((1, HEADS, 1, 1)).astype(np.float32)
        inits += [numpy_helper.from_array(sink, "sink"), numpy_helper.from_array(
            np.array([batch, HEADS, queries, 1], np.int64), "rows"),
            numpy_helper.from_array(np.array([-1], np.int64), "last"),
            *(numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("minus1", -1)))]
        nodes[4:5] = [helper.make_node("Expand", ["sink", "rows"], ["sinks"]),
                      helper.make_node("Concat", ["masked", "sinks"], ["joined"], axis=-1),
                      helper.make_node("ReduceMax", ["joined", "last"], ["top"], keepdims=1),
                      helper.make_node("Sub", ["joined", "top"], ["shifted"]),
                      helper.make_node("Softmax", ["shifted"], ["all_probs"], axis=-1),
                      helper.make_node("Slice", ["all_probs", "zero", "minus1", "last"], ["probs"])]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, HEADS, queries, HEAD_DIM])
    graph = helper.make_graph(nodes, "attention", inputs, [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _aligned(a):
    """A copy of ``a`` in 64-byte-aligned memory (numpy's large arrays start 16 bytes past a page boundary)."""
    import numpy as np

    raw = np.empty(a.nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def run(args) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    import bmc
    import bmc.compiler
    from bmc.runtime.kernels import register_cpu_kernels

    register_cpu_kernels(threads=args.threads)
    work = Path(tempfile.mkdtemp(prefix="bmc-attention-"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # bmc runs in this process too
    rows = []
    cases = [(s, s, None) for s in args.seqs] + [(s, 1, None) for s in args.decode] + \
        [(max(args.seqs), max(args.seqs), w) for w in args.windows]
    for seq, queries, window in cases:
        path = work / f"attention-{seq}-{queries}-{window}.onnx"
        onnx.save(attention_core(args.batch, seq, queries, window, args.sinks), path)
        rng = np.random.default_rng(seq)
        feeds = {n: rng.standard_normal((args.batch, HEADS, queries if n == "q" else seq, HEAD_DIM), dtype=np.float32)
                 for n in "qkv"}
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        want = sess.run(None, feeds)[0]
        row = {"seq": seq, "queries": queries, "window": window, "onnxruntime_s": _median_s(lambda: sess.run(None, feeds), args.budget),
               "scores_bytes": 4 * args.batch * HEADS * queries * seq}
        for name, fused in (("fused", True), ("unfused", False)):
            artifact = work / f"attention-{seq}-{queries}-{window}-{name}.bmc"
            if fused:
                bmc.compile(path, artifact)
            else:  # the same compile with the fusion pass made a no-op
                from unittest import mock

                with mock.patch("bmc.ops.fusion.fuse_attention", lambda g: g):
                    bmc.compile(path, artifact)
            model = bmc.load(artifact)
            got = model(**feeds)
            row[f"{name}_s"] = _median_s(lambda: model(**feeds), args.budget)
            if fused:  # the inputs in 64-byte-aligned memory, as bmc's own outputs are: read in place, not copied
                aligned = {n: _aligned(a) for n, a in feeds.items()}
                row["fused_in_place_s"] = _median_s(lambda: model(**aligned), args.budget)
            row[f"{name}_rel_error"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        row["fused_vs_unfused"] = row["fused_s"] / row["unfused_s"]
        row["fused_vs_onnxruntime"] = row["fused_s"] / row["onnxruntime_s"]
        row["fused_in_place_vs_onnxruntime"] = row["fused_in_place_s"] / row["onnxruntime_s"]
        rows.append(row)
        print(f"[seq {seq}, {queries} queries, window {window}] fused {row['fused_s'] * 1e3:.2f} ms, unfused {row['unfused_s'] * 1e3:.2f} ms, "
              f"onnxruntime {row['onnxruntime_s'] * 1e3:.2f} ms", file=sys.stderr)
    return {"config": {"batch": args.batch, "heads": HEADS, "head_dim": HEAD_DIM, "threads": args.threads,
                       "sinks": args.sinks},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "versions": {"onnxruntime": ort.__version__, "bmc": bmc.__version__}, "rows": rows}


def table(report: dict) -> str:
    lines = [f"{'seq':>5} {'queries':>7} {'window':>6} {'fused ms':>9} {'in place':>9} {'unfused ms':>10} {'ort ms':>9} "
             f"{'fused/unfused':>13} {'fused/ort':>9} {'in place/ort':>12} {'scores MiB':>10} {'rel err':>8}"]
    for r in report["rows"]:
        lines.append(f"{r['seq']:>5} {r['queries']:>7} {str(r.get('window') or '-'):>6} {r['fused_s'] * 1e3:>9.2f} {r['fused_in_place_s'] * 1e3:>9.2f} "
                     f"{r['unfused_s'] * 1e3:>10.2f} {r['onnxruntime_s'] * 1e3:>9.2f} {r['fused_vs_unfused']:>12.2f}x "
                     f"{r['fused_vs_onnxruntime']:>8.2f}x {r['fused_in_place_vs_onnxruntime']:>11.2f}x "
                     f"{r['scores_bytes'] / 2**20:>10.1f} {r['fused_rel_error']:>8.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=lambda s: [int(v) for v in s.split(",")], default=[128, 512, 2048])
    p.add_argument("--decode", type=lambda s: [int(v) for v in s.split(",") if v], default=[2048],
                   help="key counts of decoding steps (one query), comma-separated; '' for none")
    p.add_argument("--windows", type=lambda s: [int(v) for v in s.split(",") if v], default=[256],
                   help="sliding windows for prefills of the longest --seqs, comma-separated; '' for none")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sinks", action="store_true", help="GPT-OSS's attention with a sink per head (writes "
                   "attention_sinks.json unless --json)")
    sinks = "--sinks" in (argv if argv is not None else sys.argv[1:])
    return run_main(p, argv, DEFAULT_JSON.with_name("attention_sinks.json") if sinks else DEFAULT_JSON, run, table)


if __name__ == "__main__":
    sys.exit(main())
