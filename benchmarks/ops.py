#!/usr/bin/env python3
"""Single ONNX ops on the CPU: bmc against onnxruntime, side by side in one process, same thread count.

    python benchmarks/ops.py                               # every op below
    python benchmarks/ops.py --only conv1d_whisper,conv3d_3x3x3 --budget 1 --json /tmp/ops.json

A sweep for performance cliffs: each case is a one-op (or one-activation) ONNX graph with seeded random inputs,
compiled into an artifact and loaded with ``bmc.load`` (its outputs are views of the program's tensors, not
copies), timed against an onnxruntime session (spinning off, so that its idle threads do not take bmc's core);
the table lists the median latencies, their ratio and bmc's max abs error relative to max |onnxruntime|. Shapes
are those of real models (the comment on each case). Convolutions and other compute-bound ops read fairly; an op
that only moves memory is skewed against bmc, whose output is allocated every call where onnxruntime reuses its
arena, so its ratio overstates what it costs inside a model. Prints a table and writes
``benchmarks/results/ops.json``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.quantized import _median_s, run_main  # noqa: E402 (after the path set-up)

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "ops.json"


def cases() -> dict:
    """name → (ONNX model, inputs): one op each, seeded."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def model(node, inputs: dict, inits: dict, opset: int = 17):
        graph = helper.make_graph(
            node if isinstance(node, list) else [node], "op",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), inputs

    def conv(x, w, group=1, **attrs):
        return model(helper.make_node("Conv", ["x", "w"], ["y"], group=group, **attrs), {"x": x}, {"w": w})

    ones, zeros = np.ones(320, np.float32), np.zeros(320, np.float32)
    map64 = normal(1, 64, 112, 112)
    return {
        # convolutions
        "conv3x3_resnet": conv(normal(1, 64, 56, 56), normal(64, 64, 3, 3), pads=[1] * 4),
        "conv1x1_7x7": conv(normal(1, 2048, 7, 7), normal(512, 2048, 1, 1)),
        "conv_grouped_resnext": conv(normal(1, 128, 56, 56), normal(128, 4, 3, 3), group=32, pads=[1] * 4),
        "conv_depthwise_5x5s2": conv(normal(1, 256, 56, 56), normal(256, 1, 5, 5), group=256, strides=[2, 2],
                                     pads=[2] * 4),
        "conv_dilated_deeplab": conv(normal(1, 256, 33, 33), normal(256, 256, 3, 3), dilations=[6, 6], pads=[6] * 4),
        "conv1d_whisper": conv(normal(1, 80, 3000), normal(384, 80, 3), pads=[1, 1]),
        "conv1d_wav2vec2_pos": conv(normal(1, 768, 500), normal(768, 48, 128), group=16, pads=[64, 64]),
        "conv3d_stem": conv(normal(1, 3, 16, 112, 112), normal(64, 3, 3, 7, 7), strides=[1, 2, 2],
                            pads=[1, 3, 3, 1, 3, 3]),
        "conv3d_3x3x3": conv(normal(1, 64, 8, 28, 28), normal(64, 64, 3, 3, 3), pads=[1] * 6),
        "conv_transpose_s2": model(helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2],
                                                    pads=[1, 1, 1, 1], output_padding=[1, 1]),
                                   {"x": normal(1, 128, 32, 32)}, {"w": normal(128, 64, 3, 3)}),
        # normalizations and reductions
        "group_norm_sd": model(helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=32),
                               {"x": normal(1, 320, 64, 64)}, {"s": ones, "b": zeros}, 21),
        "instance_norm": model(helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"]),
                               {"x": normal(1, 320, 64, 64)}, {"s": ones, "b": zeros}),
        "global_mean_hw": model(helper.make_node("ReduceMean", ["x", "axes"], ["y"]), {"x": map64},
                                {"axes": np.array([2, 3], np.int64)}, 18),
        "softmax_4096": model(helper.make_node("Softmax", ["x"], ["y"]), {"x": normal(64, 4096)}, {}),
        "topk_50_of_4096": model(helper.make_node("TopK", ["x", "k"], ["y", "i"]), {"x": normal(64, 4096)},
                                 {"k": np.array([50], np.int64)}),
        # pools and resampling
        "max_pool_3x3s2": model(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                                 pads=[1] * 4), {"x": map64}, {}),
        "avg_pool_3x3s2": model(helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                                 pads=[1] * 4), {"x": map64}, {}),
        "resize_bilinear_x2": model(helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear"),
                                    {"x": normal(1, 128, 32, 32)}, {"scales": np.array([1, 1, 2, 2], np.float32)},
                                    18),
        # recurrences (100 steps of 256)
        "lstm": model(helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=256),
                      {"x": normal(100, 1, 256)}, {"W": 0.05 * normal(1, 1024, 256), "R": 0.05 * normal(1, 1024, 256),
                                                   "B": np.zeros((1, 2048), np.float32)}),
        "gru": model(helper.make_node("GRU", ["x", "W", "R", "B"], ["y"], hidden_size=256), {"x": normal(100, 1, 256)},
                     {"W": 0.05 * normal(1, 768, 256), "R": 0.05 * normal(1, 768, 256),
                      "B": np.zeros((1, 1536), np.float32)}),
        # products
        "einsum_attention": model(helper.make_node("Einsum", ["q", "k"], ["y"], equation="bqhd,bkhd->bhqk"),
                                  {"q": normal(1, 256, 12, 64), "k": normal(1, 256, 12, 64)}, {}),
        "batched_matmul": model(helper.make_node("MatMul", ["a", "b"], ["y"]),
                                {"a": normal(16, 256, 256), "b": normal(16, 256, 256)}, {}),
    }


def run(args) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    import bmc
    from bmc.compiler import compile_model

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bmc-ops-") as tmp:
        for name, (proto, feeds) in cases().items():
            if args.only and name not in args.only:
                continue
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(proto, path)
            compile_model(path, Path(tmp) / f"{name}.bmc", target="llvm")
            model = bmc.load(Path(tmp) / f"{name}.bmc", threads=args.threads)
            session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            got = model(**feeds)
            got = np.asarray(got[0] if isinstance(got, (list, tuple)) else
                             next(iter(got.values())) if isinstance(got, dict) else got)
            want = session.run(["y"], feeds)[0]
            t_bmc = _median_s(lambda: model(**feeds), args.budget)
            t_ort = _median_s(lambda: session.run(["y"], feeds), args.budget)
            rows[name] = {"bmc_s": t_bmc, "onnxruntime_s": t_ort, "ratio": t_bmc / t_ort,
                          "rel_error": float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))}
    return {"benchmark": "ops", "threads": args.threads, "budget_s": args.budget,
            "host": {"machine": platform.machine(), "python": platform.python_version()}, "ops": rows}


def table(report: dict) -> str:
    lines = [f"single ops, bmc vs onnxruntime, {report['threads']} threads (ratio: bmc's median time / onnxruntime's)",
             f"{'op':24s} {'bmc ms':>9s} {'ort ms':>9s} {'ratio':>7s} {'rel err':>9s}"]
    for name, r in report["ops"].items():
        lines.append(f"{name:24s} {r['bmc_s'] * 1e3:9.3f} {r['onnxruntime_s'] * 1e3:9.3f} {r['ratio']:7.2f} "
                     f"{r['rel_error']:9.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma-separated case names")
    p.set_defaults(budget=1.0)
    return run_main(p, argv, DEFAULT_JSON, run, table)


if __name__ == "__main__":
    sys.exit(main())
