#!/usr/bin/env python3
"""Mixture-of-experts layers on the CPU: bmc against onnxruntime, side by side in one process, same thread count.

    python benchmarks/moe.py                          # 2 layers, 8 experts (2 a token), 1024 -> 1024 x 2 -> 1024
    python benchmarks/moe.py --rows 1,16 --layers 1 --json /tmp/moe.json

The model is a stack of Mixtral-shaped expert layers (``x + moe(x)``: a router ``x @ Wr`` softmaxed, the top 2
experts of each token weighted by their renormalized probabilities, each expert ``W2 · (silu(W1g · x) * W1u · x)``;
seeded random weights) in two forms with the same weights:

- ``hf``   as both PyTorch exporters write Hugging Face's ``batched_mm`` experts (what they can export: the default
           loop over the experts has data-dependent shapes): each routed token's expert weights gathered
           (``Gather`` of ``[E, 2F, H]``: 2F x H floats a token and expert), then batched ``MatMul``s. onnxruntime runs
           it as written; bmc fuses each gather and product into one ``gather_matmul`` that reads the weights where
           they lie, one GEMM per expert with its tokens (``bmc.cpu.gather_matmul``).
- ``ort``  onnxruntime's fused ``com.microsoft::MoE`` op (what onnxruntime-genai's model builder writes): its best
           kernel for the same layer (its outputs are checked against ``hf``'s); bmc imports the op into the same
           ``gather_matmul``s.

For each row count M (tokens; M = 1 a decoding step, which reads 2 of the 8 experts' weights): the median latency of
bmc on ``hf``, onnxruntime on ``hf`` and onnxruntime's ``MoE``, the ratios, and bmc's max abs error against
onnxruntime relative to max |onnxruntime|; bmc on ``ort`` (its time, ``moe_rel_error`` against onnxruntime's
kernel); and bmc's ``--dtype bfloat16`` compile of ``hf`` (its time and error; a
token whose top 2 experts change in bfloat16 differs by far more than a rounding). Prints a table and writes ``benchmarks/results/moe.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.quantized import _median_s, run_main  # noqa: E402 (after the path set-up)

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "moe.json"


def moe_weights(layers: int, hidden: int, ffn: int, experts: int, seed: int = 0) -> list[dict]:
    """Per layer: the router ``[H, E]``, the gate and up projections ``[E, F, H]`` and the down projection
    ``[E, H, F]`` (PyTorch's ``[out, in]`` layout), float32."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def normal(shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    return [{"router": normal((hidden, experts), hidden), "gate": normal((experts, ffn, hidden), hidden),
             "up": normal((experts, ffn, hidden), hidden), "down": normal((experts, hidden, ffn), ffn)}
            for _ in range(layers)]


def hf_moe(weights: list[dict], topk: int = 2):
    """The ``hf`` form: ``x [M, H]`` (M symbolic) -> ``y [M, H]``, Gather + batched MatMul experts."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    hidden, ffn = weights[0]["down"].shape[1:]
    consts = {"k": np.array([topk], np.int64), "flat": np.array([-1], np.int64),
              "tile": np.array([1, topk, 1], np.int64), "rows_h": np.array([-1, hidden], np.int64),
              "rows_2f": np.array([-1, 2 * ffn], np.int64), "rows_1": np.array([-1, 1], np.int64),
              "tok_k_h": np.array([-1, topk, hidden], np.int64), "ax1": np.array([1], np.int64),
              "ax2": np.array([2], np.int64), "split": np.array([ffn, ffn], np.int64)}
    inits += [numpy_helper.from_array(v, k) for k, v in consts.items()]
    for i, w in enumerate(weights):
        p = f"l{i}."
        inits += [numpy_helper.from_array(w["router"], p + "router"),
                  numpy_helper.from_array(np.concatenate([w["gate"], w["up"]], axis=1), p + "gate_up"),
                  numpy_helper.from_array(w["down"], p + "down")]

        def n(op, ins, outs, **attrs):  # names are this layer's, except the shared constants
            nodes.append(helper.make_node(op, [a if a in consts else p + a for a in ins], [p + o for o in outs],
                                          **attrs))

        nodes.append(helper.make_node("MatMul", [x, p + "router"], [p + "logits"]))
        n("Softmax", ["logits"], ["probs"], axis=-1)
        n("TopK", ["probs", "k"], ["top", "idx"], axis=-1)
        n("ReduceSum", ["top", "ax1"], ["topsum"], keepdims=1)
        n("Div", ["top", "topsum"], ["scores"])
        n("Reshape", ["idx", "flat"], ["ids"])
        nodes.append(helper.make_node("Unsqueeze", [x, "ax1"], [p + "x1"]))
        n("Tile", ["x1", "tile"], ["xk"])
        n("Reshape", ["xk", "rows_h"], ["xs"])
        n("Unsqueeze", ["xs", "ax2"], ["xcol"])
        n("Gather", ["gate_up", "ids"], ["w1"], axis=0)
        n("MatMul", ["w1", "xcol"], ["h"])
        n("Reshape", ["h", "rows_2f"], ["h2"])
        n("Split", ["h2", "split"], ["g", "u"], axis=1)
        n("Sigmoid", ["g"], ["sg"])
        n("Mul", ["g", "sg"], ["silu"])
        n("Mul", ["silu", "u"], ["act"])
        n("Unsqueeze", ["act", "ax2"], ["acol"])
        n("Gather", ["down", "ids"], ["w2"], axis=0)
        n("MatMul", ["w2", "acol"], ["o"])
        n("Reshape", ["o", "rows_h"], ["o2"])
        n("Reshape", ["scores", "rows_1"], ["s1"])
        n("Mul", ["o2", "s1"], ["ow"])
        n("Reshape", ["ow", "tok_k_h"], ["ok"])
        n("ReduceSum", ["ok", "ax1"], ["y"], keepdims=0)
        nodes.append(helper.make_node("Add", [x, p + "y"], [f"x{i + 1}"]))
        x = f"x{i + 1}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["M", hidden]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "moe_hf", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def ort_moe(weights: list[dict], topk: int = 2):
    """The ``ort`` form: the same layers as ``com.microsoft::MoE`` (router logits in; softmax, top-k and the
    renormalization inside the op). Its CPU kernel takes the gate and up projections as one interleaved SwiGLU
    weight ``[E, 2F, H]`` (row 2j the gate's j, row 2j + 1 the up's; ``swiglu_fusion=1``: no separate fc3), with
    ``silu(gate) * up`` as ``gate * sigmoid(alpha * gate) * (up + beta)`` at alpha 1, beta 0."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    experts, ffn, hidden = weights[0]["gate"].shape
    for i, w in enumerate(weights):
        p = f"l{i}."
        fc1 = np.stack([w["gate"], w["up"]], axis=2).reshape(experts, 2 * ffn, hidden)
        inits += [numpy_helper.from_array(w["router"], p + "router"), numpy_helper.from_array(fc1, p + "fc1"),
                  numpy_helper.from_array(w["down"], p + "down")]
        nodes += [helper.make_node("MatMul", [x, p + "router"], [p + "logits"]),
                  helper.make_node("MoE", [x, p + "logits", p + "fc1", "", p + "down"], [p + "y"],
                                   domain="com.microsoft", k=topk, activation_type="swiglu", swiglu_fusion=1,
                                   activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1),
                  helper.make_node("Add", [x, p + "y"], [f"x{i + 1}"])]
        x = f"x{i + 1}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["M", hidden]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "moe_ort", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft",
                                                                                                      1)])


def run(args) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    import bmc
    from bmc.runtime.kernels import register_cpu_kernels

    register_cpu_kernels(threads=args.threads)
    work = Path(tempfile.mkdtemp(prefix="bmc-moe-"))
    weights = moe_weights(args.layers, args.hidden, args.ffn, args.experts)
    onnx.save(hf_moe(weights, args.topk), work / "hf.onnx")
    onnx.save(ort_moe(weights, args.topk), work / "ort.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # bmc runs in this process too
    sessions = {form: ort.InferenceSession(str(work / f"{form}.onnx"), opts, providers=["CPUExecutionProvider"])
                for form in ("hf", "ort")}
    rows = []
    for m in args.rows:
        x = np.random.default_rng(m).standard_normal((m, args.hidden), dtype=np.float32)
        artifact = work / f"hf-{m}.bmc"
        t0 = time.perf_counter()
        bmc.compile(work / "hf.onnx", artifact, input_shapes={"M": m})
        compile_s = time.perf_counter() - t0
        model = bmc.load(artifact)
        bmc.compile(work / "hf.onnx", work / f"hf-{m}-bf16.bmc", input_shapes={"M": m}, dtype="bfloat16")
        bf16 = bmc.load(work / f"hf-{m}-bf16.bmc")
        bmc.compile(work / "ort.onnx", work / f"ort-{m}.bmc", input_shapes={"M": m})
        from_moe = bmc.load(work / f"ort-{m}.bmc")
        want = sessions["hf"].run(None, {"x": x})[0]
        fused = sessions["ort"].run(None, {"x": x})[0]
        got = model(x=x)
        times = {form: _median_s(lambda s=s: s.run(None, {"x": x}), args.budget) for form, s in sessions.items()}
        bmc_s = _median_s(lambda: model(x=x), args.budget)
        bf16_s = _median_s(lambda: bf16(x=x), args.budget)
        moe_s = _median_s(lambda: from_moe(x=x), args.budget)
        scale = float(np.max(np.abs(want)))
        rows.append({"rows": m, "bmc_s": bmc_s, "onnxruntime_s": times["hf"], "onnxruntime_moe_s": times["ort"],
                     "ratio": bmc_s / times["hf"], "ratio_moe": bmc_s / times["ort"], "compile_s": compile_s,
                     "bmc_moe_s": moe_s, "moe_rel_error": float(np.max(np.abs(from_moe(x=x) - fused))) / scale,
                     "bmc_bf16_s": bf16_s, "bf16_rel_error": float(np.max(np.abs(bf16(x=x) - want))) / scale,
                     "rel_error": float(np.max(np.abs(got - want))) / scale,
                     "ort_moe_rel_error": float(np.max(np.abs(fused - want))) / scale})
        print(f"[M={m}] bmc {bmc_s * 1e3:.2f} ms, onnxruntime {times['hf'] * 1e3:.2f} ms, onnxruntime MoE "
              f"{times['ort'] * 1e3:.2f} ms", file=sys.stderr)
    return {"config": {"layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "experts": args.experts,
                       "topk": args.topk, "threads": args.threads},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "versions": {"onnxruntime": ort.__version__, "bmc": bmc.__version__}, "rows": rows}


def table(report: dict) -> str:
    lines = [f"{'M':>4} {'bmc ms':>8} {'ort ms':>8} {'ort MoE ms':>11} {'bmc/ort':>8} {'bmc/MoE':>8} {'rel err':>8} "
             f"{'bmc MoE ms':>11} {'bmc bf16 ms':>12} {'bf16 err':>9}"]
    for r in report["rows"]:
        lines.append(f"{r['rows']:>4} {r['bmc_s'] * 1e3:>8.2f} {r['onnxruntime_s'] * 1e3:>8.2f} "
                     f"{r['onnxruntime_moe_s'] * 1e3:>11.2f} {r['ratio']:>7.2f}x {r['ratio_moe']:>7.2f}x "
                     f"{r['rel_error']:>8.1e} {r['bmc_moe_s'] * 1e3:>11.2f} {r['bmc_bf16_s'] * 1e3:>12.2f} "
                     f"{r['bf16_rel_error']:>9.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 128])
    return run_main(p, argv, DEFAULT_JSON, run, table)


if __name__ == "__main__":
    sys.exit(main())
