#!/usr/bin/env python3
"""Quantized models on the CPU: bmc against onnxruntime, side by side in one process, same thread count.

    python benchmarks/quantized.py                  # 4 GPT-2-small MLP blocks, M = 1 and 128 rows
    python benchmarks/quantized.py --layers 2 --rows 1,32 --json /tmp/q.json

The model is a stack of GPT-2-small-shaped MLP blocks (``x + W2 · gelu(W1 · x)``, 768 → 3072 → 768, seeded random
weights) in these forms:

- ``float32``   as built;
- ``int8-dyn``  onnxruntime's ``quantize_dynamic`` (int8 weights, ``DynamicQuantizeLinear`` + ``MatMulInteger``);
- ``int8-qdq``  onnxruntime's ``quantize_static`` in its default QDQ format (int8 activations and weights,
                calibrated on seeded random inputs);
- ``int4``      ``com.microsoft::MatMulNBits`` (4-bit symmetric, blocks of 32 along K), quantized here in numpy the
                way onnxruntime's ``MatMulNBitsQuantizer`` writes it (that quantizer needs ``onnx-ir``);
- ``int4-qdq``  the same codes as ONNX's standard form: blocked int4 ``DequantizeLinear`` (axis 0) into ``MatMul``;
- ``fp8``       float8 e4m3fn weights with a float scale per output channel, ``DequantizeLinear`` into ``MatMul``
                (weight-only FP8, as FP8 checkpoints ship);
- ``bf16``, ``fp16``  the float32 model compiled by bmc with ``--dtype bfloat16`` / ``float16`` (16-bit weights and
                activations, float32 accumulation), against onnxruntime running the float32 model (its CPU provider
                has no bfloat16 MatMul).

For each form and row count M: bmc's and onnxruntime's median latency (and the ratio bmc / onnxruntime), the
weight bytes of bmc's artifact, and bmc's max abs error against onnxruntime relative to max |onnxruntime|. M = 1 is
a decoding step (reading the weights dominates), M = 128 a prefill. The 8-bit forms run on bmc's integer matmul
(AVX-512 VNNI), ``int4`` on its fused 4-bit kernel; onnxruntime has fused integer kernels for all of them. Prints a
table and writes ``benchmarks/results/quantized.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "quantized.json"
HIDDEN, FFN, BLOCK = 768, 3072, 32
FORMS = ("float32", "int8-dyn", "int8-qdq", "int4", "int4-qdq", "fp8", "bf16", "fp16")
#: forms that are the float32 model compiled by bmc in another dtype
DTYPE_FORMS = {"bf16": "bfloat16", "fp16": "float16"}


def mlp_stack(layers: int, seed: int = 0):
    """The float model: ``layers`` MLP blocks with residuals, input ``x[M, 768]`` (M symbolic)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w1 = (rng.standard_normal((HIDDEN, FFN)) / np.sqrt(HIDDEN)).astype(np.float32)
        w2 = (rng.standard_normal((FFN, HIDDEN)) / np.sqrt(FFN)).astype(np.float32)
        inits += [numpy_helper.from_array(w1, f"w1_{i}"), numpy_helper.from_array(w2, f"w2_{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"]),
                  helper.make_node("Gelu", [f"h{i}"], [f"g{i}"]),
                  helper.make_node("MatMul", [f"g{i}", f"w2_{i}"], [f"o{i}"]),
                  helper.make_node("Add", [x, f"o{i}"], [f"x{i + 1}"])]
        x = f"x{i + 1}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["M", HIDDEN]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "mlp_stack", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _quantize_4bit(w):
    """Symmetric 4-bit codes of ``w [K, N]`` in blocks of ``BLOCK`` along K: (int4 codes [K, N], scales
    [blocks, N]); K is padded to whole blocks with zeros."""
    import numpy as np

    k, n = w.shape
    blocks = -(-k // BLOCK)
    padded = np.zeros((blocks * BLOCK, n), np.float32)
    padded[:k] = w
    scale = np.abs(padded.reshape(blocks, BLOCK, n)).max(axis=1) / 7
    scale[scale == 0] = 1
    codes = np.clip(np.round(padded / np.repeat(scale, BLOCK, axis=0)), -8, 7).astype(np.int8)
    return codes[:k], scale.astype(np.float32)


def to_int4_qdq(model):
    """Every ``MatMul`` by a 2-D initializer → ``MatMul(x, DequantizeLinear(int4 W, blocked along K))``."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, keep = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            name = node.input[1]
            codes, scale = _quantize_4bit(numpy_helper.to_array(inits.pop(name)))
            keep += [helper.make_tensor(f"{name}_q4", TensorProto.INT4, codes.shape, codes.reshape(-1).tolist()),
                     numpy_helper.from_array(scale, f"{name}_scale")]
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q4", f"{name}_scale"], [f"{name}_dq"], axis=0,
                                          block_size=BLOCK))
            node = helper.make_node("MatMul", [node.input[0], f"{name}_dq"], list(node.output))
        nodes.append(node)
    graph = helper.make_graph(nodes, model.graph.name, model.graph.input, model.graph.output,
                              list(inits.values()) + keep)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def to_float8(model):
    """Every ``MatMul`` by a 2-D initializer → ``MatMul(x, DequantizeLinear(float8e4m3fn W, scale per column))``,
    the scale mapping each column's largest magnitude to 448 (e4m3fn's largest)."""
    import ml_dtypes
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, keep = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            name = node.input[1]
            w = numpy_helper.to_array(inits.pop(name))
            scale = (np.abs(w).max(axis=0) / 448).astype(np.float32)
            keep += [numpy_helper.from_array((w / scale).astype(ml_dtypes.float8_e4m3fn), f"{name}_f8"),
                     numpy_helper.from_array(scale, f"{name}_scale")]
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_f8", f"{name}_scale"], [f"{name}_dq"], axis=1))
            node = helper.make_node("MatMul", [node.input[0], f"{name}_dq"], list(node.output))
        nodes.append(node)
    graph = helper.make_graph(nodes, model.graph.name, model.graph.input, model.graph.output,
                              list(inits.values()) + keep)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def to_matmul_nbits(model):
    """Every ``MatMul`` by a 2-D initializer → ``MatMulNBits`` (4-bit symmetric, default zero point 8)."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, keep = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits.pop(node.input[1]))  # [K, N]
        k, n = w.shape
        codes, scale = _quantize_4bit(w)
        blocks = scale.shape[0]
        wt = np.zeros((n, blocks * BLOCK), np.uint8)
        wt[:, :k] = (codes.astype(np.int16) + 8).T  # unsigned codes, zero point 8
        wt = wt.reshape(n, blocks, BLOCK)
        packed = wt[..., 0::2] | (wt[..., 1::2] << 4)
        name = node.input[1]
        keep += [numpy_helper.from_array(packed, f"{name}_Q4"),
                 numpy_helper.from_array(np.ascontiguousarray(scale.T), f"{name}_scales")]
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{name}_Q4", f"{name}_scales"], list(node.output),
                                      domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK))
    graph = helper.make_graph(nodes, model.graph.name, model.graph.input, model.graph.output,
                              list(inits.values()) + keep)
    return helper.make_model(graph, opset_imports=list(model.opset_import) + [helper.make_opsetid("com.microsoft", 1)])


def _median_s(fn, budget_s: float, min_repeat: int = 5, max_repeat: int = 200) -> float:
    fn()
    times: list[float] = []
    while len(times) < min_repeat or (sum(times) < budget_s and len(times) < max_repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


class _Calibration:
    """onnxruntime's ``CalibrationDataReader`` protocol: a few seeded random batches of ``x``."""

    def __init__(self, batches: int = 4, rows: int = 16):
        import numpy as np

        rng = np.random.default_rng(7)
        self._feeds = iter([{"x": rng.standard_normal((rows, HIDDEN), dtype=np.float32)} for _ in range(batches)])

    def get_next(self):
        return next(self._feeds, None)


def run(args) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    import bmc
    from bmc.runtime.kernels import register_cpu_kernels

    register_cpu_kernels(threads=args.threads)
    work = Path(tempfile.mkdtemp(prefix="bmc-quantized-"))
    onnx.save(mlp_stack(args.layers), work / "float32.onnx")
    quantize_dynamic(work / "float32.onnx", work / "int8-dyn.onnx", weight_type=QuantType.QInt8)
    quantize_static(work / "float32.onnx", work / "int8-qdq.onnx", _Calibration(), quant_format=QuantFormat.QDQ)
    onnx.save(to_matmul_nbits(onnx.load(work / "float32.onnx")), work / "int4.onnx")
    onnx.save(to_int4_qdq(onnx.load(work / "float32.onnx")), work / "int4-qdq.onnx")
    onnx.save(to_float8(onnx.load(work / "float32.onnx")), work / "fp8.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # bmc runs in this process too
    rows = []
    for form in args.forms:
        source = work / ("float32.onnx" if form in DTYPE_FORMS else f"{form}.onnx")
        sess = ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
        for m in args.rows:
            x = np.random.default_rng(m).standard_normal((m, HIDDEN), dtype=np.float32)
            artifact = work / f"{form}-{m}.bmc"
            t0 = time.perf_counter()
            bmc.compile(source, artifact, input_shapes={"M": m}, dtype=DTYPE_FORMS.get(form, "float32"))
            compile_s = time.perf_counter() - t0
            model = bmc.load(artifact)
            want = sess.run(None, {"x": x})[0]
            got = model(x=x)
            ort_s = _median_s(lambda: sess.run(None, {"x": x}), args.budget)
            bmc_s = _median_s(lambda: model(x=x), args.budget)
            rows.append({"form": form, "rows": m, "bmc_s": bmc_s, "onnxruntime_s": ort_s, "ratio": bmc_s / ort_s,
                         "compile_s": compile_s,
                         "weight_bytes": sum(f.stat().st_size for f in (artifact / "weights").iterdir()),
                         "rel_error": float(np.max(np.abs(got - want)) / np.max(np.abs(want)))})
            print(f"[{form} M={m}] bmc {bmc_s * 1e3:.2f} ms, onnxruntime {ort_s * 1e3:.2f} ms", file=sys.stderr)
    return {"config": {"layers": args.layers, "hidden": HIDDEN, "ffn": FFN, "block": BLOCK, "threads": args.threads},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "versions": {"onnxruntime": ort.__version__, "bmc": bmc.__version__}, "rows": rows}


def table(report: dict) -> str:
    lines = [f"{'form':9} {'M':>4} {'bmc ms':>9} {'ort ms':>9} {'bmc/ort':>8} {'weights MB':>11} {'rel err':>9}"]
    for r in report["rows"]:
        lines.append(f"{r['form']:9} {r['rows']:>4} {r['bmc_s'] * 1e3:>9.2f} {r['onnxruntime_s'] * 1e3:>9.2f} "
                     f"{r['ratio']:>7.2f}x {r['weight_bytes'] / 2**20:>11.1f} {r['rel_error']:>9.1e}")
    return "\n".join(lines)


def run_main(p: argparse.ArgumentParser, argv, default_json: Path, run_fn, table_fn) -> int:
    """The benchmarks' common ending: ``--threads/--budget/--json``, run, print the table, write the JSON."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per measurement")
    p.add_argument("--json", type=Path, default=default_json)
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    report = run_fn(args)
    print(table_fn(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[1, 128])
    p.add_argument("--forms", type=lambda s: s.split(","), default=list(FORMS),
                   help=f"comma-separated subset of {','.join(FORMS)}")
    return run_main(p, argv, DEFAULT_JSON, run, table)


if __name__ == "__main__":
    sys.exit(main())
