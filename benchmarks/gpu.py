#!/usr/bin/env python3
"""GPU benchmark: bmc's CUDA matmuls against cuBLAS, and bf16 transformer layer stacks against PyTorch eager.

    python benchmarks/gpu.py prepare --out .gpubench [--quick]   # here (full TVM + nvcc): CUDA libraries, bench.json
    python benchmarks/gpu.py run --root .gpubench [--json OUT] [--repeat N]   # on the GPU machine
    python benchmarks/gpu.py run --root .gpubench --dry-run      # no GPU: bench.json, files and imports only

``prepare`` compiles every case for sm_90 into ``DIR/<case>.<gemm>.so`` and writes ``DIR/bench.json``: per case the
signature in the VM's argument order (inputs, then parameters) with how to fill each tensor, FLOPs, the runtime
kernels the library needs (``requires``), or the build error. No weights are stored: ``run`` draws them on the GPU
from a seed, and the same torch tensors feed bmc (zero-copy through DLPack) and the references. ``run`` needs a
runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``), torch with CUDA and this repository on the path; it prints one table
and writes ``benchmarks/results/gpu.json`` (or ``--json``); a failing case keeps its row, with the error.

Every case is built twice: ``gemm=cublas`` (bmc's default: matmuls offloaded to the runtime kernel
``bmc.cuda.matmul``) and ``gemm=tvm`` (``BMC_CUDA_GEMM=tvm``: TVM's dlight kernels); the ``kernel`` column says
what the library really calls (``cuBLAS`` when it requires ``bmc.cuda.matmul``). ``prepare --tune-db DIR`` adds
``gemm=tuned`` stacks: cuBLAS plus the TVM kernels the tuning database has schedules for (``bmc tune import``).

(a) ``mm-*``: one ``matmul`` node ``[M,K] @ [K,N]``: 4096^3 in bfloat16, float16 and float32; the GPT layer GEMMs
    at T = 8192 tokens in bfloat16, GPT-2 small (QKV 768x2304, proj 768x768, fc1 768x3072, fc2 3072x768) and
    1.3B-shaped (d=2048, ffn=8192). TFLOP/s = 2MNK / time against ``torch.matmul`` (cuBLAS; float32 without TF32,
    torch's default). Goal: >= 70% of cuBLAS on large GEMMs (2MNK >= 1e11: 4096^3, the 1.3B shapes).
(b) ``stack-*``: pre-LN decoder blocks in bfloat16, ``[b,s,d]`` in and out: LN -> fused QKV (+bias) -> split ->
    heads -> ``q k^T / sqrt(hd)`` + causal mask (an input, ``triu(-1e9)``) -> softmax -> ``@ v`` -> out proj (+bias)
    -> residual -> LN -> fc1 (+bias) -> tanh-GELU -> fc2 (+bias) -> residual. GPT-2 small: d=768, 12 heads, ffn 3072,
    batch 8 x seq 1024, 12 layers; 1.3B-shaped: d=2048, 16 heads of 128, ffn 8192, batch 4 x seq 2048, 4 layers.
    Model FLOPs = layers * (2 * b*s * (4 d^2 + 2 d ffn) + 4 * b * s^2 * d): the four linears and the two attention
    products (the causal half not discounted). MFU = FLOPs / time / 989e12 (dense bf16, H100 SXM and H200). Against
    PyTorch eager (the same math, explicit matmul/softmax, ``torch.no_grad()``) and onnxruntime's CUDA EP where
    installed. Error: max |bmc - torch| / max |torch|. Goals: faster than torch, error <= 1e-2, >= 40% MFU (1.3B).

(c) ``attn-*``: attention alone, ``softmax(q k^T / sqrt(hd) + mask) @ v`` on ``[b, h, s, hd]`` bfloat16 heads with the
    causal mask as an input, at the stacks' shapes. FLOPs = 4 b h s^2 hd. Against torch eager (the same explicit
    math) and, for reference, ``F.scaled_dot_product_attention`` with the same float mask (``torch_sdpa_ms``).

Stacks and attention are also built as ``gemm=fused``: cuBLAS plus bmc's fused attention kernel
(``BMC_CUDA_ATTENTION=fused``, ``cpp/cuda_attention.cuh``; kernel column ``cuBLAS+FA``), the graph's attention fused
by ``bmc.ops.fusion`` as ``bmc compile`` does.

``--quick``: one 1024^3 matmul and a two-layer toy stack (a smoke test). Timing: 3 warm-up calls, then samples of
``inner`` back-to-back calls between ``torch.cuda.synchronize()`` (``inner``: a sample of about 1 ms), ``--repeat``
samples (default 20) or a 2 s budget per case, median. bmc's VM and torch both launch on the legacy default stream.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "gpu.json"
ARCHS = ("sm_90",)
PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak, H100 SXM and H200
GOALS = {"matmul_vs_cublas": 0.70, "large_gemm_flops": 1e11, "mfu_1.3b": 0.40, "speedup_vs_torch": 1.0,
         "rel_err": 1e-2}
LIMIT_BYTES = 8 * 2**20
GEMMS = ("cublas", "tvm")
T = 8192
MATMULS = [("4096", 4096, 4096, 4096, "bfloat16"), ("4096", 4096, 4096, 4096, "float16"),
           ("4096", 4096, 4096, 4096, "float32"),
           *[(f"gpt2-{n}", T, k, m, "bfloat16") for n, k, m in
             (("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768))],
           *[(f"1.3b-{n}", T, k, m, "bfloat16") for n, k, m in
             (("qkv", 2048, 6144), ("proj", 2048, 2048), ("fc1", 2048, 8192), ("fc2", 8192, 2048))]]
STACKS = {"gpt2-small": {"d": 768, "heads": 12, "ffn": 3072, "batch": 8, "seq": 1024, "layers": 12},
          "1.3b": {"d": 2048, "heads": 16, "ffn": 8192, "batch": 4, "seq": 2048, "layers": 4}}
QUICK_MATMULS = [("1024", 1024, 1024, 1024, "bfloat16")]
QUICK_STACKS = {"toy": {"d": 256, "heads": 4, "ffn": 1024, "batch": 2, "seq": 128, "layers": 2}}
WEIGHT = {"kind": "normal", "mean": 0.0, "std": 0.02}  # how ``run`` fills each tensor
GAIN = {"kind": "normal", "mean": 1.0, "std": 0.1}  # LayerNorm gains (``*_g``)
UNIT = {"kind": "normal", "mean": 0.0, "std": 1.0}
INIT = {"x": UNIT, "q": UNIT, "k": UNIT, "v": UNIT, "mask": {"kind": "causal_mask", "value": -1e9}}
ATTENTION = ("cublas", "fused")  # how attention is built: the composition (cuBLAS + softmax kernel), or fused
LN_EPS = 1e-5


# --- build side (here: full TVM, nvcc) -------------------------------------------------------------------------
def matmul_graph(m: int, k: int, n: int, dtype: str):
    from bmc.ir.tensor import FillTensor
    from bmc.ir.types import TensorType
    from bmc.ops.builder import GraphBuilder

    b = GraphBuilder("matmul")
    x = b.input("x", TensorType(dtype, (m, k)))
    w = b.param("w", FillTensor(0.0, TensorType(dtype, (k, n))))  # never materialized: weights are not stored
    return b.finish([b.emit1("matmul", [x, w], "y")])


def stack_graph(cfg: dict):
    """The decoder stack of the module docstring; parameters ``l<i>.<name>``, inputs ``x`` and ``mask``."""
    from bmc.ir.tensor import FillTensor
    from bmc.ir.types import TensorType
    from bmc.ops.builder import GraphBuilder

    d, nh, f, bs, s = cfg["d"], cfg["heads"], cfg["ffn"], cfg["batch"], cfg["seq"]
    hd, bf = d // nh, "bfloat16"
    b = GraphBuilder("stack")
    x = b.input("x", TensorType(bf, (bs, s, d)))
    mask = b.input("mask", TensorType(bf, (s, s)))
    scale = b.constant(1 / math.sqrt(hd), dtype=bf)

    def param(name, *shape):
        return b.param(name, FillTensor(0.0, TensorType(bf, shape)))

    def linear(v, name, n_in, n_out):
        return b.emit1("add", [b.emit1("matmul", [v, param(f"{name}_w", n_in, n_out)]), param(f"{name}_b", n_out)])

    def norm(v, name):
        return b.emit1("layer_norm", [v, param(f"{name}_g", d), param(f"{name}_b", d)], epsilon=LN_EPS)

    def heads(v, perm):
        return b.emit1("transpose", [b.emit1("reshape", [v], shape=(bs, s, nh, hd))], perm=perm)

    for i in range(cfg["layers"]):
        q, k, v = b.emit("split", [linear(norm(x, f"l{i}.ln1"), f"l{i}.qkv", d, 3 * d)], axis=-1, sizes=(d, d, d))
        scores = b.emit1("matmul", [heads(q, (0, 2, 1, 3)), heads(k, (0, 2, 3, 1))])
        scores = b.emit1("add", [b.emit1("mul", [scores, scale]), mask])
        ctx = b.emit1("matmul", [b.emit1("softmax", [scores], axis=-1), heads(v, (0, 2, 1, 3))])
        ctx = b.emit1("reshape", [b.emit1("transpose", [ctx], perm=(0, 2, 1, 3))], shape=(bs, s, d))
        x = b.emit1("add", [x, linear(ctx, f"l{i}.o", d, d)])
        h = b.emit1("gelu", [linear(norm(x, f"l{i}.ln2"), f"l{i}.fc1", d, f)], approximate="tanh")
        x = b.emit1("add", [x, linear(h, f"l{i}.fc2", f, d)], "y" if i == cfg["layers"] - 1 else None)
    return b.finish([x])


def attention_graph(cfg: dict):
    """``softmax(q k^T / sqrt(hd) + mask) @ v`` on the heads of a stack config; inputs ``q k v mask``."""
    from bmc.ir.types import TensorType
    from bmc.ops.builder import GraphBuilder

    nh, bs, s = cfg["heads"], cfg["batch"], cfg["seq"]
    hd, bf = cfg["d"] // nh, "bfloat16"
    b = GraphBuilder("attention")
    q, k, v = (b.input(n, TensorType(bf, (bs, nh, s, hd))) for n in "qkv")
    mask = b.input("mask", TensorType(bf, (s, s)))
    scores = b.emit1("matmul", [q, b.emit1("transpose", [k], perm=(0, 1, 3, 2))])
    scores = b.emit1("add", [b.emit1("mul", [scores, b.constant(1 / math.sqrt(hd), dtype=bf)]), mask])
    return b.finish([b.emit1("matmul", [b.emit1("softmax", [scores], axis=-1), v], "y")])


def compile_case(out: Path, case: dict, graph) -> dict:
    """Build one case into ``out/<name>.<gemm>.so``; a build error is kept in the case (``run`` reports it)."""
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec
    from bmc.runtime.artifact import graph_signature

    case.update(graph_signature(graph), lib=f"{case['name']}.{case['gemm']}.so", requires=[])
    for entry in case["inputs"] + case["params"]:
        entry["init"] = INIT.get(entry["name"], GAIN if entry["name"].endswith("_g") else WEIGHT)
    env = {"tvm": {"BMC_CUDA_GEMM": "tvm"}, "fused": {"BMC_CUDA_ATTENTION": "fused"}}.get(case["gemm"], {})
    t0, old = time.perf_counter(), {k: os.environ.pop(k, None) for k in ("BMC_CUDA_GEMM", "BMC_CUDA_ATTENTION")}
    try:
        os.environ.update(env)  # none: bmc's default (cuBLAS, attention as its composition)
        if case["gemm"] == "fused":
            from bmc.ops.fusion import fuse_attention

            graph = fuse_attention(graph)
        built = build(graph, TargetSpec.parse("cuda", ARCHS), tune_db=case.get("tune_db"))
        built.export(out / case["lib"])
    except Exception as e:  # noqa: BLE001  (one case failing to build must not lose the others)
        case["error"] = f"build: {type(e).__name__}: {e}"
        print(f"  {case['name']:20s} {case['gemm']:6s} {case['error']}", flush=True)
        return case
    finally:
        for k, v in old.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    info = built.kernels["cuda"]
    if "tune_db" in case:
        case["tuned_kernels"] = info.get("tuning", {}).get("applied", 0)
    case.update(requires=list(info.get("requires", [])), kernels=info["num_kernels"],
                build_s=round(time.perf_counter() - t0, 2), nvcc_s=info["nvcc_s"],
                lib_bytes=(out / case["lib"]).stat().st_size)
    print(f"  {case['name']:20s} {case['gemm']:6s} {case['kernels']:3d} kernels  build {case['build_s']:6.2f} s  "
          f"(nvcc {case['nvcc_s']:5.2f} s)  {case['lib_bytes'] / 1024:6.0f} KiB  requires {case['requires']}",
          flush=True)
    return case


def prepare(out: Path, quick: bool, tune_db: Path | None = None) -> int:
    from importlib import metadata

    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.so"), out / "bench.json"]:
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    cases = []
    for name, m, k, n, dtype in QUICK_MATMULS if quick else MATMULS:
        for gemm in GEMMS:
            case = {"name": f"mm-{name}-{dtype}", "kind": "matmul", "gemm": gemm, "flops": 2.0 * m * k * n}
            cases.append(compile_case(out, case, matmul_graph(m, k, n, dtype)))
    for name, cfg in (QUICK_STACKS if quick else STACKS).items():
        d, f, tokens, s = cfg["d"], cfg["ffn"], cfg["batch"] * cfg["seq"], cfg["seq"]
        flops = cfg["layers"] * (2.0 * tokens * (4 * d * d + 2 * d * f) + 4.0 * tokens * s * d)  # see the docstring
        for gemm in GEMMS + ("fused",) + (("tuned",) if tune_db else ()):  # tuned: + the database's schedules
            case = {"name": f"stack-{name}", "kind": "stack", "gemm": gemm, "config": cfg, "flops": flops}
            if gemm == "tuned":
                case["tune_db"] = str(tune_db)
            cases.append(compile_case(out, case, stack_graph(cfg)))
        for gemm in ATTENTION:
            case = {"name": f"attn-{name}", "kind": "attention", "gemm": gemm, "config": cfg,
                    "flops": 4.0 * tokens * s * d}
            cases.append(compile_case(out, case, attention_graph(cfg)))
    bench = {"archs": list(ARCHS), "tvm_version": metadata.version("apache-tvm"), "quick": quick,
             "prepare_s": round(time.perf_counter() - t0, 1), "cases": cases}
    (out / "bench.json").write_text(json.dumps(bench, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"{out}: {len(cases)} cases, {total / 2**20:.2f} MiB in {bench['prepare_s']} s")
    if total > LIMIT_BYTES:
        print(f"error: {total / 2**20:.2f} MiB is over the {LIMIT_BYTES / 2**20:.0f} MiB limit", file=sys.stderr)
        return 1
    return 0


# --- run side (GPU machine: runtime-only TVM, torch) ---------------------------------------------------------------
def make_tensor(entry: dict, gen, device="cuda"):
    import torch

    init, shape, dtype = entry["init"], entry["shape"], getattr(torch, entry["dtype"])
    if init["kind"] == "causal_mask":
        return torch.full(shape, init["value"], device=device).triu(diagonal=1).to(dtype)
    return (torch.randn(shape, generator=gen, device=device) * init["std"] + init["mean"]).to(dtype)


def torch_stack(cfg: dict, x, mask, p: dict):
    """PyTorch eager version of :func:`stack_graph` (same parameter names)."""
    import torch.nn.functional as F

    d, nh, bs, s = cfg["d"], cfg["heads"], cfg["batch"], cfg["seq"]
    hd = d // nh

    def heads(v):
        return v.reshape(bs, s, nh, hd).transpose(1, 2)

    def lin(v, n):
        return v @ p[f"{n}_w"] + p[f"{n}_b"]

    def norm(v, n):
        return F.layer_norm(v, (d,), p[f"{n}_g"], p[f"{n}_b"], LN_EPS)

    for i in range(cfg["layers"]):
        q, k, v = lin(norm(x, f"l{i}.ln1"), f"l{i}.qkv").split(d, dim=-1)
        scores = heads(q) @ heads(k).transpose(-1, -2) * (1 / math.sqrt(hd)) + mask
        ctx = (scores.softmax(dim=-1) @ heads(v)).transpose(1, 2).reshape(bs, s, d)
        x = x + lin(ctx, f"l{i}.o")
        x = x + lin(F.gelu(lin(norm(x, f"l{i}.ln2"), f"l{i}.fc1"), approximate="tanh"), f"l{i}.fc2")
    return x


def onnx_stack(cfg: dict, weights: dict, elem: int):
    """The same stack as an ONNX model (opset 20) for onnxruntime: ``weights`` maps each parameter name to (dims, raw
    little-endian bytes of ONNX element type ``elem``); float32 ``x`` and ``mask`` in, float32 ``y`` out."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    d, nh, bs, s = cfg["d"], cfg["heads"], cfg["batch"], cfg["seq"]
    nodes, inits = [], [helper.make_tensor(n, elem, dims, raw, raw=True) for n, (dims, raw) in weights.items()]

    def op(kind, ins, **attrs):
        nodes.append(helper.make_node(kind, ins, [f"t{len(nodes)}"], **attrs))
        return nodes[-1].output[0]

    def ints(*values):
        inits.append(numpy_helper.from_array(np.array(values, np.int64), f"c{len(inits)}"))
        return inits[-1].name

    def lin(v, n):
        return op("Add", [op("MatMul", [v, f"{n}_w"]), f"{n}_b"])

    def heads(v, perm):
        return op("Transpose", [op("Reshape", [v, ints(bs, s, nh, d // nh)])], perm=perm)

    scale = op("Cast", [op("Constant", [], value_float=1 / math.sqrt(d // nh))], to=elem)
    x, mask = op("Cast", ["x"], to=elem), op("Cast", ["mask"], to=elem)
    for i in range(cfg["layers"]):
        h = op("LayerNormalization", [x, f"l{i}.ln1_g", f"l{i}.ln1_b"], axis=-1, epsilon=LN_EPS)
        qkv = lin(h, f"l{i}.qkv")
        q, k, v = (op("Slice", [qkv, ints(j * d), ints((j + 1) * d), ints(2)]) for j in range(3))
        scores = op("MatMul", [heads(q, (0, 2, 1, 3)), heads(k, (0, 2, 3, 1))])
        probs = op("Softmax", [op("Add", [op("Mul", [scores, scale]), mask])], axis=-1)
        ctx = op("Transpose", [op("MatMul", [probs, heads(v, (0, 2, 1, 3))])], perm=(0, 2, 1, 3))
        x = op("Add", [x, lin(op("Reshape", [ctx, ints(bs, s, d)]), f"l{i}.o")])
        h = op("LayerNormalization", [x, f"l{i}.ln2_g", f"l{i}.ln2_b"], axis=-1, epsilon=LN_EPS)
        x = op("Add", [x, lin(op("Gelu", [lin(h, f"l{i}.fc1")], approximate="tanh"), f"l{i}.fc2")])
    nodes.append(helper.make_node("Cast", [x], ["y"], to=TensorProto.FLOAT))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shp) for n, shp in
          (("x", (bs, s, d)), ("mask", (s, s)), ("y", (bs, s, d)))]
    graph = helper.make_graph(nodes, "stack", io[:2], io[2:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def ort_row(cfg: dict, tensors: dict, params: dict, ref, repeat: int) -> dict:
    """onnxruntime's CUDA EP on the same weights, I/O bound to torch tensors; "n/a" without that provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"ort": "n/a (no onnxruntime)"}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"ort": "n/a (no CUDA EP)"}
    try:
        import numpy as np
        import torch
        from onnx import TensorProto

        weights = {n: (list(t.shape), t.contiguous().view(torch.int16).cpu().numpy().tobytes())
                   for n, t in params.items()}
        sess = ort.InferenceSession(onnx_stack(cfg, weights, TensorProto.BFLOAT16).SerializeToString(),
                                    providers=["CUDAExecutionProvider"])
        xf, mf = tensors["x"].float().contiguous(), tensors["mask"].float().contiguous()
        y, io = torch.empty_like(xf), sess.io_binding()
        for name, t in (("x", xf), ("mask", mf), ("y", y)):
            bind = io.bind_output if name == "y" else io.bind_input
            bind(name, "cuda", 0, np.float32, list(t.shape), t.data_ptr())
        ms = timed(lambda: sess.run_with_iobinding(io), repeat)
        return {"ort_ms": ms, "ort_rel_err": rel_err(y, ref)}
    except Exception as e:  # noqa: BLE001  (no onnx package, an op without a bf16 CUDA kernel, ...)
        return {"ort": f"error: {type(e).__name__}: {str(e).strip()[:200]}"}


def timed(fn, repeat: int, budget_s: float = 2.0) -> float:
    """Median milliseconds per call (see the module docstring)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    inner = max(1, min(100, int(1e-3 / max(time.perf_counter() - t0, 1e-6))))
    samples, start = [], time.perf_counter()
    while len(samples) < repeat and (len(samples) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples) * 1e3


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def rel_err(got, want) -> float:
    want = want.float()
    return float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def load_main(root: Path, case: dict):
    """The case's compiled ``main`` in a TVM VM on GPU 0 (runtime kernels registered first)."""
    import tvm
    import tvm.runtime.vm  # runtime-only TVM does not import it with tvm

    from bmc.runtime import cuda as bcuda

    bcuda.enable()  # TVM's CUDA module loader (idempotent)
    if case["requires"]:
        bcuda.register_kernels(case["requires"])
    return tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(root / case["lib"])), tvm.cuda(0))["main"]


def bmc_call(root: Path, case: dict, tensors: dict):
    """A zero-argument call of the case's ``main`` on the given torch tensors (zero-copy, by signature name)."""
    import tvm_ffi

    main = load_main(root, case)
    args = [tvm_ffi.from_dlpack(tensors[e["name"]]) for e in case["inputs"] + case["params"]]
    return lambda: main(*args)


def reference(case: dict, repeat: int) -> dict:
    """Seeded tensors, torch's output and time (and onnxruntime's, for a stack) for one case."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = {e["name"]: make_tensor(e, gen) for e in case["inputs"] + case["params"]}
    params = {e["name"]: tensors[e["name"]] for e in case["params"]}
    with torch.no_grad():
        if case["kind"] == "matmul":
            def fn():
                return torch.matmul(tensors["x"], tensors["w"])
        elif case["kind"] == "attention":
            q, k, v, mask = (tensors[n] for n in ("q", "k", "v", "mask"))
            scale = 1 / math.sqrt(q.shape[-1])

            def fn():
                return (q @ k.transpose(-1, -2) * scale + mask).softmax(dim=-1) @ v
        else:
            def fn():
                return torch_stack(case["config"], tensors["x"], tensors["mask"], params)
        ref = {"tensors": tensors, "ref": fn(), "torch_ms": timed(fn, repeat), "fn": fn}
    if case["kind"] == "stack":
        ref["ort"] = ort_row(case["config"], tensors, params, ref["ref"], repeat)
    if case["kind"] == "attention":  # the state of the art, for reference (flash/efficient/cuDNN backends)
        import torch.nn.functional as F

        with torch.no_grad():
            ref["torch_sdpa_ms"] = timed(lambda: F.scaled_dot_product_attention(
                tensors["q"], tensors["k"], tensors["v"], attn_mask=tensors["mask"]), repeat)
    return ref


def kernel_profile(fn, calls: int = 3, top: int = 12) -> list[dict]:
    """CUDA time per kernel over ``calls`` calls of ``fn`` (torch.profiler/CUPTI sees TVM's and cuBLAS' kernels
    too): the ``top`` kernels by total time, in ms per call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:70], "ms_per_call": e.device_time_total / 1e3 / calls, "launches": e.count // calls}
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["ms_per_call"])[:top]


def run_case(root: Path, case: dict, repeat: int, cache: dict, profile: bool = False) -> dict:
    """One row. The gemm variants of a shape share tensors and the torch timing; torch runs first, so its numbers
    survive a bmc failure (the error goes into the row)."""
    import torch

    row = {k: case[k] for k in ("name", "kind", "gemm")}
    fused = {"bmc.cuda.attention", "bmc.cuda.attention_bias"} & set(case["requires"])
    row["kernel"] = "-" if "error" in case else "cuBLAS+FA" if fused else "cuBLAS" if "bmc.cuda.matmul" in \
        case["requires"] else "TVM"
    if case["name"] not in cache:
        cache.clear()
        torch.cuda.empty_cache()
        cache[case["name"]] = reference(case, repeat)
    ref = cache[case["name"]]
    row["torch_ms"] = ref["torch_ms"]
    row.update(ref.get("ort", {}))
    if "torch_sdpa_ms" in ref:
        row["torch_sdpa_ms"] = ref["torch_sdpa_ms"]
    if "error" in case:  # the build failed
        row["error"] = case["error"]
    else:
        try:
            fn = bmc_call(root, case, ref["tensors"])
            row["rel_err"] = rel_err(torch.from_dlpack(fn()[0]), ref["ref"])
            row["bmc_ms"] = timed(fn, repeat)
            if profile and case["kind"] in ("stack", "attention"):
                row["profile"] = kernel_profile(fn)
                if "torch_profile" not in ref:
                    with torch.no_grad():
                        ref["torch_profile"] = kernel_profile(ref["fn"])
                row["torch_profile"] = ref["torch_profile"]
                for who in ("profile", "torch_profile"):
                    for k in row[who]:
                        print(f"    {case['name']}.{case['gemm']} {who}: {k['ms_per_call']:8.3f} ms "
                              f"x{k['launches']:<4d} {k['kernel']}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {first_line(e)}"
    for who in ("torch", "bmc"):
        if f"{who}_ms" in row:
            row[f"{who}_tflops"] = case["flops"] / row[f"{who}_ms"] / 1e9
            row[f"{who}_mfu"] = row[f"{who}_tflops"] * 1e12 / PEAK_FLOPS
    if "bmc_ms" in row:
        row["vs_torch"] = row["torch_ms"] / row["bmc_ms"]  # > 1: bmc is faster
        if case["kind"] == "stack":
            row["goal_met"] = (row["vs_torch"] >= GOALS["speedup_vs_torch"] and row["rel_err"] <= GOALS["rel_err"]
                               and (case["name"] != "stack-1.3b" or row["bmc_mfu"] >= GOALS["mfu_1.3b"]))
        elif case["flops"] >= GOALS["large_gemm_flops"]:
            row["goal_met"] = row["vs_torch"] >= GOALS["matmul_vs_cublas"]
    return row


def goal_text(r: dict) -> str:
    met = {True: "met", False: "NOT met"}.get(r.get("goal_met"), "-")
    if r["kind"] == "matmul":
        return f">= {GOALS['matmul_vs_cublas']:.0%} of cuBLAS: {met}" if "goal_met" in r else ""
    if r["kind"] == "attention":
        return f"torch SDPA {r['torch_sdpa_ms']:.3f} ms" if "torch_sdpa_ms" in r else ""
    mfu = f", MFU >= {GOALS['mfu_1.3b']:.0%}" if r["name"] == "stack-1.3b" else ""
    ort = f"{r['ort_ms']:.2f} ms (err {r['ort_rel_err']:.1e})" if "ort_ms" in r else r.get("ort", "-")
    return f"faster than torch, err <= {GOALS['rel_err']:g}{mfu}: {met}; onnxruntime {ort}"


def print_table(device: str, rows: list[dict]) -> None:
    cols = [("bmc_ms", "bmc ms", ".3f"), ("torch_ms", "torch ms", ".3f"), ("bmc_tflops", "bmc TF/s", ".1f"),
            ("torch_tflops", "torch TF/s", ".1f"), ("vs_torch", "bmc/torch", ".2f"), ("bmc_mfu", "MFU", ".1%"),
            ("torch_mfu", "torch MFU", ".1%"), ("rel_err", "rel err", ".1e")]
    print(f"\n{device}: bmc vs torch; bmc/torch = speed ratio (> 1: bmc faster); MFU at {PEAK_FLOPS / 1e12:.0f} "
          "TFLOP/s bf16")
    print(f"{'case':20s} {'gemm':6s} {'kernel':9s} " + " ".join(f"{h:>10s}" for _, h, _ in cols) + "  goal / notes")
    for r in rows:
        vals = " ".join(f"{format(r[k], f) if k in r else '-':>10s}" for k, _, f in cols)
        err = f"  ERROR {r['error']}" if "error" in r else ""
        print(f"{r['name']:20s} {r['gemm']:6s} {r['kernel']:9s} {vals}  {goal_text(r)}{err}")


def dry_run(root: Path, cases: list[dict]) -> None:
    """What needs no GPU: the imports ``run`` uses, the SASS in every library, loading them where a driver (or a
    stub ``libcuda.so.1``) is found (a VM whose program has constants needs a device: that error is expected)."""
    from bmc.codegen.cuda import find_fatbins

    for mod in ("tvm", "tvm_ffi", "bmc.runtime.cuda", "torch", "onnxruntime"):
        try:
            __import__(mod)
            print(f"  import {mod}: ok")
        except Exception as e:  # noqa: BLE001
            print(f"  import {mod}: {type(e).__name__}: {e}")
    try:
        from bmc.runtime import cuda as bcuda

        bcuda.enable()
        driver = True
    except Exception as e:  # noqa: BLE001
        print(f"  libraries not loaded: {type(e).__name__}: {first_line(e)}")
        driver = False
    for c in cases:
        fat = find_fatbins((root / c["lib"]).read_bytes())
        sass = sorted({e["arch"] for f in fat for e in f if e["kind"] == "elf"})
        loaded = ""
        try:
            if driver:
                load_main(root, c)
                loaded = ", VM ok"
        except Exception as e:  # noqa: BLE001
            loaded = f", not loaded: {type(e).__name__}: {first_line(e)[:100]}"
        print(f"  {c['lib']:32s} SASS {sass}, requires {c['requires']}{loaded}")
    print("dry run: nothing timed, no JSON written")


def run(root: Path, json_out: Path, repeat: int, dry: bool, profile: bool = False) -> int:
    bench = json.loads((root / "bench.json").read_text())
    cases = bench["cases"]
    missing = [c["lib"] for c in cases if "error" not in c and not (root / c["lib"]).is_file()]
    failed = [f"{c['name']}.{c['gemm']}" for c in cases if "error" in c]
    print(f"{root}: {len(cases)} cases (archs {bench['archs']}, TVM {bench['tvm_version']}); "
          f"missing libraries: {missing or 'none'}; failed to build: {failed or 'none'}")
    if missing or dry:
        if dry:
            dry_run(root, [c for c in cases if "error" not in c and c["lib"] not in missing])
        return 1 if missing else 0
    import torch

    device = torch.cuda.get_device_name()
    rows, cache, t0 = [], {}, time.perf_counter()
    for case in cases:
        try:
            rows.append(run_case(root, case, repeat, cache, profile))
        except Exception as e:  # noqa: BLE001  (e.g. out of memory in the reference: keep the other rows)
            traceback.print_exc()
            rows.append({k: case[k] for k in ("name", "kind", "gemm")} | {"kernel": "?", "error": repr(e)[:300]})
        print(f"  {case['name']} ({case['gemm']}) done at {time.perf_counter() - t0:.0f} s", flush=True)
    print_table(device, rows)
    result = {"device": device, "torch": torch.__version__, "tf32": torch.backends.cuda.matmul.allow_tf32,
              "peak_flops": PEAK_FLOPS, "goals": GOALS, "repeat": repeat, "run_s": round(time.perf_counter() - t0, 1),
              "bench": {k: v for k, v in bench.items() if k != "cases"}, "rows": rows}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {json_out}")
    return 1 if any("error" in r for r in rows) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("prepare", help="compile the CUDA libraries and write bench.json (needs TVM and nvcc)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="one small matmul and toy stacks")
    p.add_argument("--tune-db", type=Path, help="also build the stacks with this tuning database (gemm=tuned)")
    r = sub.add_parser("run", help="time the cases on the GPU (runtime-only TVM, torch)")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--json", type=Path, default=DEFAULT_JSON)
    r.add_argument("--repeat", type=int, default=20, help="timed samples per case (a 2 s budget stops earlier)")
    r.add_argument("--dry-run", action="store_true", help="no GPU: check bench.json, the files and the imports")
    r.add_argument("--profile", action="store_true", help="stacks: CUDA time per kernel, bmc and torch")
    args = ap.parse_args(argv)
    if args.mode == "prepare":
        return prepare(args.out.resolve(), args.quick, args.tune_db)
    return run(args.root.resolve(), args.json, args.repeat, args.dry_run, args.profile)


if __name__ == "__main__":
    sys.exit(main())
