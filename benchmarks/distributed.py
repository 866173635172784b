"""Distributed benchmark: collectives, tensor-parallel scaling, and bmc vs PyTorch tensor parallelism.

    python benchmarks/distributed.py            # about 2-4 minutes on 2 cores; prints tables, writes
                                                # benchmarks/results/distributed.json
    python benchmarks/distributed.py --quick    # fewer sizes and repetitions

(a) per-collective latency and bandwidth on 2 MPI ranks, 4 KB ... 64 MB (float32): bmc's native C++ collectives,
    bmc's Python (mpi4py) collectives, and raw mpi4py (blocking ``Allreduce``/``Allgather`` on numpy arrays). All
    three are called from a Python loop (the native/Python ones through their tvm-ffi function, like the VM calls
    them), so the difference is the implementations' overhead.
(b) a compute-bound MLP stack of GPT-2-medium width (d=1024, ffn=4096, ReLU, residual; LAYERS layers, TOKENS tokens),
    compiled by bmc for 1 device and for mesh 1x2 (Megatron: column- then row-parallel, one all-reduce per layer),
    run on 1 rank with 1 thread (one device = one core), 1 rank with 2 threads, and 2 MPI ranks with 1 thread each.
    Parallel efficiency = t(1 rank, 1 thread) / (2 * t(2 ranks)).
(c) the same MLP with PyTorch tensor parallelism (column/row-parallel shards, ``dist.all_reduce`` over gloo) on 2
    processes with 1 thread each, from a separate venv (``/work/torch-venv``, ``BMC_TORCH_PYTHON``) so torch never
    enters bmc's environment; skipped (and said so) when that interpreter has no torch.
(d) context parallelism: a multi-query cross-attention layer (ROWS query rows, 8 heads of 64, one key/value head)
    over a MEMORY-token memory, compiled for 1 device and for a mesh of 2 with the memory's tokens split
    (``--shard memory=[{},{x},{}]``: each rank projects and attends to its half of the keys; the halves combine by
    a per-row all-reduce max and sum, then the output's all-reduce), run like (b).
(e) pipeline parallelism: the MLP stack of (b) (with a dynamic token dim) compiled with ``--mesh 2 --stages 2``,
    run with ``--microbatches`` microbatches (default 4; GPipe's forward schedule: stage 1 works on microbatch k
    while stage 0 works on k + 1) and with one (no overlap: the stages take turns), run like (b).
(g) a decoding step with its key/value cache split over the heads: one attention layer (d=1024, 16 heads of 64,
    a 2048-position cache of 2 x 8 MB written at the step's position with ScatterElements), Megatron on 2 ranks,
    the caches passed whole and returned whole every step (sliced in the program, all-gathered at its end) vs
    passed and returned as each rank's heads (``--input-shard``/``--output-shard``); and on 1 rank. Each variant
    also with its caches donated (``--donate``: the ScatterElements writes the one new position into the cache it
    was given instead of copying the whole cache). Every step feeds back the caches the step before returned; the
    same loop in onnxruntime (its default threads) for reference; and on 1 rank in bfloat16 (``--dtype``) with the
    caches float32 vs bfloat16 (``--dtype-io``) and donated.
(h) the decoding step of (g) with grouped-query attention: 4 key/value heads for the 16 query heads (caches of
    4 heads, donated), on 1 rank: the heads repeated as Hugging Face's ``repeat_kv`` exports it (unsqueeze, expand,
    reshape; bmc's attention reads each shared head in place) vs as a Gather (the same copy in a spelling bmc does
    not read through: what each step cost before), and onnxruntime on the first.
(i) expert parallelism: a stack of Mixtral-shaped expert layers (``benchmarks/moe.py``'s ``hf`` form: 8 experts, 2 a
    token, d=1024, ffn=1024, MOE_LAYERS layers, MOE_TOKENS tokens), compiled for 1 device and for a mesh of 2 with
    Megatron's layout (each rank holds 4 of each layer's 8 experts and computes the tokens routed to them; one
    all-reduce a layer), run like (b).
(f) outputs left split: a language-model head (TOKENS x 768 activations times a 768 x 32768 vocabulary weight),
    Megatron's column-parallel split of the vocabulary on 2 ranks, its logits gathered whole on every rank (the
    default) or left split (``--output-shard logits=[{},{x}]``: each rank returns its half); 2 ranks each way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"
MPIEXEC = str(Path(sys.executable).parent / "mpiexec") if (Path(sys.executable).parent / "mpiexec").exists() \
    else (shutil.which("mpiexec") or "mpiexec")
TORCH_PYTHON = os.environ.get("BMC_TORCH_PYTHON", "/work/torch-venv/bin/python")
D, FFN = 1024, 4096


# ------------------------------------------------------------------------------------------ (a) collectives

def worker_collectives(out: str, quick: bool) -> None:
    import tvm
    import tvm_ffi

    from bmc.runtime import mpi

    manifest = {"world_size": 2, "mesh": {"shape": [2], "axes": ["x"]}, "rank_map": [[0], [1]]}
    os.environ["BMC_CHECK_COLLECTIVES"] = "0"
    MPI = mpi.preflight(manifest, "bench", force=True)
    ctx = mpi.MPIContext(MPI, manifest, "bench", check=False)
    native = mpi.load_native(ctx, build=True)
    comm = ctx.group((0,))
    sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20] if not quick else [4 << 10, 1 << 20, 16 << 20]
    rows = []
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        for nbytes in sizes:
            n = nbytes // 4
            x = np.random.default_rng(ctx.rank).standard_normal(n).astype(np.float32)
            out_n = {"all_reduce": n, "all_gather": 2 * n, "reduce_scatter": n // 2, "all_to_all": n}[kind]
            attrs = json.dumps({"axes": [0], "group_size": 2, **({"reduce": "sum"} if kind == "all_reduce" else
                                {"split_dim": 0, "concat_dim": 0} if kind == "all_to_all" else {"dim": 0})},
                               sort_keys=True)
            xt, ot = tvm.runtime.tensor(x), tvm.runtime.empty((out_n,), "float32")
            xa, oa = np.from_dlpack(xt), np.from_dlpack(ot)
            py_fn = tvm_ffi.convert(lambda a, s, b, kind=kind: ctx.python_collective(kind, a, s, b))
            impls = {
                "native": lambda: native[kind](xt, attrs, ot),
                "python": lambda: py_fn(xt, attrs, ot),
                "mpi4py": {"all_reduce": lambda: comm.Allreduce(xa, oa, op=MPI.SUM),
                           "all_gather": lambda: comm.Allgather(xa, oa),
                           "reduce_scatter": lambda: comm.Reduce_scatter_block(xa, oa, op=MPI.SUM),
                           "all_to_all": lambda: comm.Alltoall(xa, oa)}[kind],
            }
            iters = max(3, min(2000, int((64 << 20) / nbytes) * (2 if quick else 4)))
            result = {"kind": kind, "bytes": nbytes}
            for rep in range(2):  # interleaved repetitions, best per implementation
                for name, fn in impls.items():
                    for _ in range(min(iters, 10)):
                        fn()
                    comm.Barrier()
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        fn()
                    dt = (time.perf_counter() - t0) / iters
                    worst = np.zeros(1)
                    comm.Allreduce(np.array([dt]), worst, op=MPI.MAX)
                    result[name] = min(result.get(name, 1e9), float(worst[0]))
            rows.append(result)
    if ctx.rank == 0:
        Path(out).write_text(json.dumps(rows))


def run_collectives(tmp: Path, quick: bool) -> list[dict]:
    out = tmp / "collectives.json"
    cmd = [MPIEXEC, "-n", "2", sys.executable, __file__, "--worker", "collectives", "--out", str(out)] + \
        (["--quick"] if quick else [])
    subprocess.run(cmd, check=True, timeout=1200, env=_env())
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------ (b) MLP

def make_mlp(path: Path, layers: int, tokens: int | str) -> None:
    """The MLP stack as ONNX; ``tokens`` a number, or a name for a dynamic first dim."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        w1 = (rng.standard_normal((D, FFN)) * 0.02).astype(np.float32)
        b1 = (rng.standard_normal(FFN) * 0.02).astype(np.float32)
        w2 = (rng.standard_normal((FFN, D)) * 0.02).astype(np.float32)
        b2 = (rng.standard_normal(D) * 0.02).astype(np.float32)
        for name, arr in ((f"w1_{i}", w1), (f"b1_{i}", b1), (f"w2_{i}", w2), (f"b2_{i}", b2)):
            inits.append(numpy_helper.from_array(arr, name))
        nodes += [helper.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"]),
                  helper.make_node("Add", [f"h{i}", f"b1_{i}"], [f"hb{i}"]),
                  helper.make_node("Relu", [f"hb{i}"], [f"a{i}"]),
                  helper.make_node("MatMul", [f"a{i}", f"w2_{i}"], [f"o{i}"]),
                  helper.make_node("Add", [f"o{i}", f"b2_{i}"], [f"ob{i}"]),
                  helper.make_node("Add", [x, f"ob{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, D])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [tokens, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def worker_model(artifact: str, out: str, iters: int, threads: int | None) -> None:
    """Time ``iters`` runs of the artifact on random float32 inputs (after 2 warm-up runs); rank 0 writes the
    times and saves the first output."""
    import bmc
    from bmc.ir.types import np_dtype

    model = bmc.load(artifact, threads=threads)
    rank = model.mpi.rank if model.mpi is not None else 0
    rng = np.random.default_rng(1)
    inputs = {i["name"]: rng.standard_normal(i["shape"]).astype(np.float32) if i["dtype"] == "float32" else
              np.zeros(i["shape"], np_dtype(i["dtype"])) for i in model.signature["inputs"]
              if i["name"] in model.input_names}
    # an output named NAME_out (a decoding step's cache) is fed back as input NAME, as a decoding loop does
    feed = {o: o[:-len("_out")] for o in model.output_names if o.endswith("_out") and o[:-len("_out")] in inputs}

    def step():
        y = model.run(inputs)
        inputs.update({i: y[o] for o, i in feed.items()})
        return y

    for _ in range(2):
        y = step()
    times = []
    for _ in range(iters):
        if model.mpi is not None:
            model.mpi.world.Barrier()
        t0 = time.perf_counter()
        y = step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        np.save(out + ".npy", next(iter(y.values())))
        Path(out).write_text(json.dumps({"median_s": statistics.median(times), "min_s": min(times),
                                         "times": times, "stats": model.stats,
                                         "collectives": model.mpi.impl if model.mpi else None}))


def run_mlp(tmp: Path, layers: int, tokens: int, iters: int) -> dict:
    import bmc

    onnx_path = tmp / "mlp.onnx"
    make_mlp(onnx_path, layers, tokens)
    single, tp = tmp / "mlp_1.bmc", tmp / "mlp_1x2.bmc"
    t0 = time.perf_counter()
    bmc.compile(onnx_path, single)
    bmc.compile(onnx_path, tp, mesh="1x2", strategy="dp+megatron")
    res = {"layers": layers, "tokens": tokens, "d": D, "ffn": FFN, "compile_s": time.perf_counter() - t0,
           "flops": 4 * tokens * D * FFN * layers}
    return res | scaling(tmp, "mlp", single, tp, iters)


def scaling(tmp: Path, tag: str, single: Path, sharded: Path, iters: int) -> dict:
    """The plan's collectives, and 1 rank with 1 and 2 threads against 2 ranks with 1 thread each: times, speedup,
    parallel efficiency and the sharded output's max |diff| from the single-device one."""
    plan = json.loads((sharded / "plan.json").read_text())
    res: dict = {"collectives_in_plan": [c["kind"] + (f"({c['reduce']})" if c.get("reduce", "sum") != "sum" else "")
                                         for c in plan.get("collectives", [])],
                "collective_bytes_per_device": sum(c["bytes"] for c in plan.get("collectives", []))}
    runs = {"1 rank, 1 thread": (1, single, 1),
            "1 rank, 2 threads": (1, single, 2),
            "2 ranks, 1 thread each": (2, sharded, None)}
    outs = {}
    for name, (ranks, artifact, threads) in runs.items():
        res[name], outs[name] = timed_run(tmp / f"{tag}-{len(outs)}.json", ranks, artifact, iters, threads)
    ref = outs["1 rank, 1 thread"]
    res["max_abs_diff_sharded_vs_single"] = float(np.max(np.abs(outs["2 ranks, 1 thread each"] - ref)))
    t1, t2 = res["1 rank, 1 thread"]["median_s"], res["2 ranks, 1 thread each"]["median_s"]
    res["speedup"] = t1 / t2
    res["parallel_efficiency"] = t1 / (2 * t2)
    return res


def timed_run(out: Path, ranks: int, artifact: Path, iters: int, threads: int | None = None):
    """``worker_model`` on ``ranks`` processes (MPI when more than one): (its JSON record, the first output)."""
    launcher = [MPIEXEC, "-n", str(ranks), sys.executable] if ranks > 1 else [sys.executable]
    cmd = launcher + [__file__, "--worker", "model", "--artifact", str(artifact), "--out", str(out),
                      "--iters", str(iters)] + (["--threads", str(threads)] if threads else [])
    subprocess.run(cmd, check=True, timeout=1200, env=_env())
    return json.loads(out.read_text()), np.load(str(out) + ".npy")


# ------------------------------------------------------------------------------------------ (e) pipeline

def run_pipeline(tmp: Path, layers: int, tokens: int, iters: int, microbatches: int) -> dict:
    """The MLP stack of (b) in 2 pipeline stages on 2 ranks, with ``microbatches`` microbatches and with one."""
    import bmc

    onnx_path = tmp / "mlp_dyn.onnx"
    make_mlp(onnx_path, layers, "tokens")
    single, piped, whole = tmp / "mlp_dyn_1.bmc", tmp / "mlp_pipe.bmc", tmp / "mlp_pipe1.bmc"
    shapes = {"tokens": tokens}
    bmc.compile(onnx_path, single, input_shapes=shapes)
    summary = bmc.compile(onnx_path, piped, input_shapes=shapes, mesh="2", stages=2, microbatches=microbatches)
    bmc.compile(onnx_path, whole, input_shapes=shapes, mesh="2", stages=2)
    res = {"layers": layers, "tokens": tokens, "microbatches": microbatches, "stages": summary["stages"],
           "flops": 4 * tokens * D * FFN * layers} | scaling(tmp, "pipe", single, piped, iters)
    res["gpipe_bound"] = 2 * microbatches / (microbatches + 1)  # 2 stages: each idles one microbatch in K + 1
    res["2 ranks, 1 microbatch"], y = timed_run(tmp / "pipe-k1.json", 2, whole, iters)
    res["speedup_1_microbatch"] = res["1 rank, 1 thread"]["median_s"] / res["2 ranks, 1 microbatch"]["median_s"]
    res["max_abs_diff_1_microbatch_vs_single"] = float(np.max(np.abs(y - np.load(str(tmp / "pipe-0.json") +
                                                                                   ".npy"))))
    return res


# ------------------------------------------------------------------------------------------ (f) split outputs

HEAD_D, VOCAB = 768, 32768


def run_output_layout(tmp: Path, tokens: int, iters: int) -> dict:
    """The vocabulary projection on 2 ranks, its logits gathered on every rank vs left split."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import bmc

    w = (np.random.default_rng(0).standard_normal((HEAD_D, VOCAB)) * 0.02).astype(np.float32)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "head",
                              [vi("x", TensorProto.FLOAT, [tokens, HEAD_D])],
                              [vi("logits", TensorProto.FLOAT, [tokens, VOCAB])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp / "head.onnx"))
    whole, split = tmp / "head_whole.bmc", tmp / "head_split.bmc"
    bmc.compile(tmp / "head.onnx", whole, mesh="2", strategy="megatron")
    bmc.compile(tmp / "head.onnx", split, mesh="2", strategy="megatron", output_shards={"logits": "[{}, {x}]"})
    res: dict = {"tokens": tokens, "d": HEAD_D, "vocab": VOCAB, "logits_bytes": tokens * VOCAB * 4,
                 "flops": 2 * tokens * HEAD_D * VOCAB}
    for name, art in (("whole", whole), ("split", split)):
        res[f"collectives_{name}"] = [c["kind"] for c in json.loads((art / "plan.json").read_text())["collectives"]]
    res["2 ranks, logits gathered"], y_whole = timed_run(tmp / "head-whole.json", 2, whole, iters)
    res["2 ranks, logits left split"], y_split = timed_run(tmp / "head-split.json", 2, split, iters)
    res["gathered_over_split_time"] = (res["2 ranks, logits gathered"]["median_s"]
                                       / res["2 ranks, logits left split"]["median_s"])
    res["max_abs_diff_rank0_block"] = float(np.max(np.abs(y_split - y_whole[:, :VOCAB // 2])))
    return res


# ------------------------------------------------------------------------------------------ (g) decoding step

DEC_D, DEC_HEADS, DEC_LENGTH, DEC_KV_HEADS = 1024, 16, 2048, 4


def make_decoder_step(path: Path, kv_heads: int = DEC_HEADS, repeat: str = "expand") -> None:
    """One attention layer of a decoding step with its cache as inputs and outputs (the structure of
    ``scripts/export_decoder_step.py``'s export, at a benchmark's size). With fewer ``kv_heads`` than heads
    (grouped-query attention) the caches hold ``kv_heads`` heads, each read by consecutive query heads: repeated
    to every query head as Hugging Face's ``repeat_kv`` exports it (``repeat="expand"``: Unsqueeze, Expand,
    Reshape) or as a Gather of head ``i // group`` (``repeat="gather"``: the same copy, in a spelling bmc does
    not read through)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hd, group = DEC_D // DEC_HEADS, DEC_HEADS // kv_heads
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((DEC_D, DEC_D if t in "qo" else kv_heads * hd)) * 0.02)
                                     .astype(np.float32), f"w{t}") for t in "qkvo"]
    inits += [numpy_helper.from_array(np.array(s, np.int64), n) for n, s in
              (("heads_shape", [1, 1, DEC_HEADS, hd]), ("kv_heads_shape", [1, 1, kv_heads, hd]),
               ("pos_shape", [1, 1, 1, 1]), ("idx_shape", [1, kv_heads, 1, hd]), ("out_shape", [1, 1, DEC_D]))]
    if group > 1:
        inits += [numpy_helper.from_array(np.array(s, np.int64), n) for n, s in (
            [("head_of", np.arange(DEC_HEADS) // group)] if repeat == "gather" else
            [("unsqueeze_axes", [2]), ("grouped_shape", [1, kv_heads, group, DEC_LENGTH, hd]),
             ("repeated_shape", [1, DEC_HEADS, DEC_LENGTH, hd])])]
    inits += [numpy_helper.from_array(np.arange(DEC_LENGTH, dtype=np.int64).reshape(1, 1, 1, -1), "positions"),
              numpy_helper.from_array(np.float32(1 / np.sqrt(hd)), "scale"),
              numpy_helper.from_array(np.float32(-1e30), "masked")]
    n = helper.make_node
    nodes = []
    for t in "qkv":
        shape = "heads_shape" if t == "q" else "kv_heads_shape"
        nodes += [n("MatMul", ["x", f"w{t}"], [f"{t}_lin"]), n("Reshape", [f"{t}_lin", shape], [f"{t}_4d"]),
                  n("Transpose", [f"{t}_4d"], [t], perm=[0, 2, 1, 3])]
    nodes += [n("Reshape", ["pos", "pos_shape"], ["pos_4d"]), n("Expand", ["pos_4d", "idx_shape"], ["idx"]),
              n("ScatterElements", ["k_cache", "idx", "k"], ["k_cache_out"], axis=2),
              n("ScatterElements", ["v_cache", "idx", "v"], ["v_cache_out"], axis=2)]
    for t in "kv":
        if group == 1:
            nodes.append(n("Identity", [f"{t}_cache_out"], [f"{t}_all"]))
        elif repeat == "gather":
            nodes.append(n("Gather", [f"{t}_cache_out", "head_of"], [f"{t}_all"], axis=1))
        else:
            nodes += [n("Unsqueeze", [f"{t}_cache_out", "unsqueeze_axes"], [f"{t}_5d"]),
                      n("Expand", [f"{t}_5d", "grouped_shape"], [f"{t}_grouped"]),
                      n("Reshape", [f"{t}_grouped", "repeated_shape"], [f"{t}_all"])]
    nodes += [n("Transpose", ["k_all"], ["kt"], perm=[0, 1, 3, 2]), n("MatMul", ["q", "kt"], ["qk"]),
              n("Mul", ["qk", "scale"], ["scores"]), n("Greater", ["positions", "pos_4d"], ["future"]),
              n("Where", ["future", "masked", "scores"], ["masked_scores"]),
              n("Softmax", ["masked_scores"], ["p"], axis=-1), n("MatMul", ["p", "v_all"], ["attn"]),
              n("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1, 3]),
              n("Reshape", ["attn_t", "out_shape"], ["merged"]), n("MatMul", ["merged", "wo"], ["y"])]
    vi = helper.make_tensor_value_info
    cache = [1, kv_heads, DEC_LENGTH, hd]
    graph = helper.make_graph(nodes, "decoder_step",
                              [vi("x", TensorProto.FLOAT, [1, 1, DEC_D]), vi("pos", TensorProto.INT64, [1]),
                               vi("k_cache", TensorProto.FLOAT, cache), vi("v_cache", TensorProto.FLOAT, cache)],
                              [vi("y", TensorProto.FLOAT, [1, 1, DEC_D]), vi("k_cache_out", TensorProto.FLOAT, cache),
                               vi("v_cache_out", TensorProto.FLOAT, cache)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def run_decoding(tmp: Path, iters: int) -> dict:
    """The decoding step on 1 rank, and on 2 ranks with the caches whole in and out vs as each rank's heads; 1 rank
    and the split caches also with the caches donated."""
    import bmc

    make_decoder_step(tmp / "dec.onnx")
    heads = "[{}, {x}, {}, {}]"
    split = dict(mesh="2", strategy="megatron", input_shards={"k_cache": heads, "v_cache": heads},
                 output_shards={"k_cache_out": heads, "v_cache_out": heads})
    donated = {"donate": ["k_cache", "v_cache"]}
    bf16 = {"dtype": "bfloat16", "dtype_io": ["k_cache*", "v_cache*"]}
    variants = {"1 rank": {}, "1 rank, caches donated": donated, "1 rank, bfloat16": {"dtype": "bfloat16"},
                "1 rank, bfloat16, caches bfloat16 and donated": {**bf16, **donated},
                "2 ranks, caches whole": dict(mesh="2", strategy="megatron"),
                "2 ranks, caches split over heads": split,
                "2 ranks, caches split over heads, donated": {**split, **donated}}
    res: dict = {"d": DEC_D, "heads": DEC_HEADS, "length": DEC_LENGTH, "cache_bytes": 2 * DEC_LENGTH * DEC_D * 4}
    for k, (name, options) in enumerate(variants.items()):
        art = tmp / f"dec_{k}.bmc"
        bmc.compile(tmp / "dec.onnx", art, **options)
        if name.startswith("2 ranks"):
            res[f"collectives, {name}"] = [f"{c['kind']} {c['value']} {c['bytes']}" for c in
                                           json.loads((art / "plan.json").read_text())["collectives"]]
        res[name], _ = timed_run(tmp / f"dec-{k}.json", 1 if name.startswith("1 rank") else 2, art, iters)
    res["onnxruntime, 1 process"] = _ort_decoding(tmp / "dec.onnx", iters)
    t = {name: res[name]["median_s"] for name in [*variants, "onnxruntime, 1 process"]}
    res["onnxruntime_over_donated_time_1_rank"] = t["onnxruntime, 1 process"] / t["1 rank, caches donated"]
    res["whole_over_split_time"] = t["2 ranks, caches whole"] / t["2 ranks, caches split over heads"]
    res["copied_over_donated_time_1_rank"] = t["1 rank"] / t["1 rank, caches donated"]
    res["bfloat16_over_bfloat16_caches_donated_time"] = (t["1 rank, bfloat16"]
                                                          / t["1 rank, bfloat16, caches bfloat16 and donated"])
    res["copied_over_donated_time_2_ranks"] = (t["2 ranks, caches split over heads"]
                                               / t["2 ranks, caches split over heads, donated"])
    return res


def run_grouped_decoding(tmp: Path, iters: int) -> dict:
    """(h) The decoding step of (g) with grouped-query attention (DEC_KV_HEADS key/value heads, each read by
    DEC_HEADS / DEC_KV_HEADS query heads) on 1 rank, its caches donated: the heads repeated as ``repeat_kv`` exports
    it (bmc's attention reads the shared heads: no copy) vs as a Gather (the same copy, a spelling bmc does not
    read through: what every step cost before), and onnxruntime on the first. Equal outputs are checked."""
    import bmc

    res: dict = {"heads": DEC_HEADS, "kv_heads": DEC_KV_HEADS, "length": DEC_LENGTH,
                 "cache_bytes": 2 * DEC_LENGTH * DEC_KV_HEADS * (DEC_D // DEC_HEADS) * 4}
    outs = {}
    for repeat in ("expand", "gather"):
        make_decoder_step(tmp / f"gqa_{repeat}.onnx", DEC_KV_HEADS, repeat)
        art = tmp / f"gqa_{repeat}.bmc"
        bmc.compile(tmp / f"gqa_{repeat}.onnx", art, donate=["k_cache", "v_cache"])
        name = {"expand": "1 rank, shared heads read", "gather": "1 rank, heads copied (Gather)"}[repeat]
        res[name], outs[repeat] = timed_run(tmp / f"gqa-{repeat}.json", 1, art, iters)
    res["max_abs_diff_shared_vs_copied"] = float(np.max(np.abs(outs["expand"] - outs["gather"])))
    res["onnxruntime, 1 process"] = _ort_decoding(tmp / "gqa_expand.onnx", iters, DEC_KV_HEADS)
    t = {k: v["median_s"] for k, v in res.items() if isinstance(v, dict)}
    res["copied_over_shared_time"] = t["1 rank, heads copied (Gather)"] / t["1 rank, shared heads read"]
    res["onnxruntime_over_shared_time"] = t["onnxruntime, 1 process"] / t["1 rank, shared heads read"]
    return res


def _ort_decoding(path: Path, iters: int, kv_heads: int = DEC_HEADS) -> dict:
    """The decoding loop of :func:`worker_model` in onnxruntime: median and min step time."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cache = np.zeros((1, kv_heads, DEC_LENGTH, DEC_D // DEC_HEADS), np.float32)
    inputs = {"x": np.random.default_rng(1).standard_normal((1, 1, DEC_D)).astype(np.float32),
              "pos": np.zeros(1, np.int64), "k_cache": cache, "v_cache": cache.copy()}
    times = []
    for i in range(iters + 2):
        t0 = time.perf_counter()
        _, inputs["k_cache"], inputs["v_cache"] = sess.run(None, inputs)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times[2:]), "min_s": min(times[2:])}


# ------------------------------------------------------------------------------------------ (d) context parallel

ROWS, MEMORY, HEADS, HEAD_DIM = 8, 16384, 8, 64


def make_cross_attention(path: Path) -> None:
    """LayerNorm(memory) → k, v (one head each, [1, 1, N, 64]); x → q [1, 8, ROWS, 64]; softmax(q kᵀ / 8) v → the
    output projection (opset 17, as the legacy exporter writes attention)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    e, hd = HEADS * HEAD_DIM, HEAD_DIM
    weights = {"wq": (e, e), "wk": (e, hd), "wv": (e, hd), "wo": (e, e)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), k)
             for k, s in weights.items()]
    inits += [numpy_helper.from_array(np.ones(e, np.float32), "ln_g"), numpy_helper.from_array(np.zeros(e, np.float32),
                                                                                             "ln_b"),
              numpy_helper.from_array(np.array([1, ROWS, HEADS, hd], np.int64), "q_shape"),
              numpy_helper.from_array(np.array([1, MEMORY, 1, hd], np.int64), "kv_shape"),
              numpy_helper.from_array(np.array([1, ROWS, e], np.int64), "o_shape"),
              numpy_helper.from_array(np.array(hd ** -0.5, np.float32), "scale")]
    mk = helper.make_node
    nodes = [mk("LayerNormalization", ["memory", "ln_g", "ln_b"], ["mem"], axis=-1),
             mk("MatMul", ["x", "wq"], ["q0"]), mk("Reshape", ["q0", "q_shape"], ["q1"]),
             mk("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3])]
    for t in ("k", "v"):
        nodes += [mk("MatMul", ["mem", f"w{t}"], [f"{t}0"]), mk("Reshape", [f"{t}0", "kv_shape"], [f"{t}1"]),
                  mk("Transpose", [f"{t}1"], [t], perm=[0, 2, 1, 3])]
    nodes += [mk("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), mk("MatMul", ["q", "kt"], ["s0"]),
              mk("Mul", ["s0", "scale"], ["s"]), mk("Softmax", ["s"], ["p"], axis=-1), mk("MatMul", ["p", "v"], ["a"]),
              mk("Transpose", ["a"], ["a1"], perm=[0, 2, 1, 3]), mk("Reshape", ["a1", "o_shape"], ["a2"]),
              mk("MatMul", ["a2", "wo"], ["y"])]
    graph = helper.make_graph(nodes, "cross_attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS, e]),
                               helper.make_tensor_value_info("memory", TensorProto.FLOAT, [1, MEMORY, e])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, ROWS, e])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def run_context(tmp: Path, iters: int) -> dict:
    import bmc

    onnx_path = tmp / "xattn.onnx"
    make_cross_attention(onnx_path)
    single, cp = tmp / "xattn_1.bmc", tmp / "xattn_2.bmc"
    bmc.compile(onnx_path, single)
    bmc.compile(onnx_path, cp, mesh="2", shard={"memory": "[{}, {x}, {}]"})
    e = HEADS * HEAD_DIM
    flops = 2 * MEMORY * e * 2 * HEAD_DIM + 2 * 2 * HEADS * ROWS * MEMORY * HEAD_DIM + 2 * 2 * ROWS * e * e
    return {"rows": ROWS, "memory": MEMORY, "heads": HEADS, "head_dim": HEAD_DIM, "kv_heads": 1,
            "flops": flops} | scaling(tmp, "xattn", single, cp, iters)


# ------------------------------------------------------------------------------------------ (i) experts

MOE_LAYERS, MOE_TOKENS, MOE_EXPERTS = 2, 256, 8


def run_experts(tmp: Path, iters: int) -> dict:
    import onnx

    import bmc
    from benchmarks.moe import hf_moe, moe_weights

    onnx_path = tmp / "moe.onnx"
    onnx.save(hf_moe(moe_weights(MOE_LAYERS, D, D, MOE_EXPERTS)), onnx_path)
    single, ep = tmp / "moe_1.bmc", tmp / "moe_2.bmc"
    bmc.compile(onnx_path, single, input_shapes={"M": MOE_TOKENS})
    bmc.compile(onnx_path, ep, input_shapes={"M": MOE_TOKENS}, mesh="2", strategy="megatron")
    flops = MOE_LAYERS * MOE_TOKENS * (2 * D * MOE_EXPERTS + 2 * 3 * 2 * D * D)  # router + 2 experts of 3 matmuls
    return {"layers": MOE_LAYERS, "tokens": MOE_TOKENS, "experts": MOE_EXPERTS, "topk": 2, "d": D, "ffn": D,
            "flops": flops} | scaling(tmp, "moe", single, ep, iters)


# ------------------------------------------------------------------------------------------ (c) torch

TORCH_SCRIPT = r"""
import json, os, statistics, sys, time
import numpy as np
import torch, torch.distributed as dist
torch.set_num_threads(1)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
layers, tokens, d, ffn, iters, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6]
rng = np.random.default_rng(0)
params = []
for i in range(layers):  # the same weights as the ONNX model; this rank keeps its Megatron shards
    w1 = (rng.standard_normal((d, ffn)) * 0.02).astype(np.float32)
    b1 = (rng.standard_normal(ffn) * 0.02).astype(np.float32)
    w2 = (rng.standard_normal((ffn, d)) * 0.02).astype(np.float32)
    b2 = (rng.standard_normal(d) * 0.02).astype(np.float32)
    s = slice(rank * ffn // world, (rank + 1) * ffn // world)
    params.append(tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (w1[:, s], b1[s], w2[s, :], b2)))
x = torch.from_numpy(np.random.default_rng(1).standard_normal((tokens, d)).astype(np.float32))
@torch.inference_mode()
def step(x):
    for w1, b1, w2, b2 in params:
        h = torch.relu(x @ w1 + b1) @ w2
        dist.all_reduce(h)
        x = x + h + b2
    return x
for _ in range(2):
    y = step(x)
times = []
for _ in range(iters):
    dist.barrier()
    t0 = time.perf_counter()
    y = step(x)
    times.append(time.perf_counter() - t0)
if rank == 0:
    np.save(out + ".npy", y.numpy())
    with open(out, "w") as f:
        json.dump({"median_s": statistics.median(times), "min_s": min(times), "times": times,
                   "torch": torch.__version__}, f)
dist.destroy_process_group()
"""


def run_torch(tmp: Path, layers: int, tokens: int, iters: int) -> dict:
    if not Path(TORCH_PYTHON).exists():
        return {"skipped": f"no torch interpreter at {TORCH_PYTHON} (set BMC_TORCH_PYTHON)"}
    probe = subprocess.run([TORCH_PYTHON, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return {"skipped": f"{TORCH_PYTHON} cannot import torch: {probe.stderr.strip()[-300:]}"}
    script = tmp / "torch_tp.py"
    script.write_text(TORCH_SCRIPT)
    out = tmp / "torch.json"
    port = str(29500 + os.getpid() % 1000)
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "HYDRA_"))}
        env.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([TORCH_PYTHON, str(script), str(layers), str(tokens), str(D), str(FFN),
                                       str(iters), str(out)], env=env))
    for p in procs:
        if p.wait(timeout=1200) != 0:
            return {"skipped": f"the torch run failed (exit {p.returncode})"}
    res = json.loads(out.read_text())
    res["y"] = str(out) + ".npy"
    return res


# ------------------------------------------------------------------------------------------ main

def _env() -> dict:
    # (TVM_NUM_THREADS / spin count: set in this process by bmc.compile's thread set-up, not by the user)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_"))
           and k not in ("TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("BMC_CHECK_COLLECTIVES", "0")
    return env


def _print_scaling(res: dict, gflop: float, label: str) -> None:
    for name in ("1 rank, 1 thread", "1 rank, 2 threads", "2 ranks, 1 thread each"):
        t = res[name]["median_s"]
        print(f"  {name:<32}{t * 1e3:>10.1f} ms{gflop / t:>10.1f} GFLOP/s")
    print(f"  speedup {label} vs 1 rank/1 thread: {res['speedup']:.2f}x, parallel efficiency "
          f"{res['parallel_efficiency'] * 100:.0f}%  (max |diff| {res['max_abs_diff_sharded_vs_single']:.2e})")


def _print_steps(res: dict, names) -> None:
    for name in names:
        print(f"  {name:<48}{res[name]['median_s'] * 1e3:>10.2f} ms")


def _human(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=("collectives", "model"))
    ap.add_argument("--out")
    ap.add_argument("--artifact")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--skip", action="append", default=[], choices=("a", "b", "c", "d", "e", "f", "g", "h", "i"))
    args = ap.parse_args()
    if args.worker == "collectives":
        worker_collectives(args.out, args.quick)
        return 0
    if args.worker == "model":
        worker_model(args.artifact, args.out, args.iters, args.threads)
        return 0

    from bmc.runtime.mpi import build_native, native_library_path

    if native_library_path() is None:
        build_native()
    iters = 3 if args.quick else args.iters
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                 "platform": platform.platform()}, "mpiexec": MPIEXEC}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    with tempfile.TemporaryDirectory(prefix="bmc-dist-") as tmp_s:
        tmp = Path(tmp_s)
        if "a" not in args.skip:
            rows = run_collectives(tmp, args.quick)
            results["collectives"] = rows
            print("\n(a) collectives on 2 ranks, float32; time per call (µs) and algorithm bandwidth (GB/s)")
            print(f"{'kind':<15}{'size':>8}{'native µs':>12}{'python µs':>12}{'mpi4py µs':>12}"
                  f"{'native GB/s':>13}{'native/mpi4py':>15}")
            for r in rows:
                print(f"{r['kind']:<15}{_human(r['bytes']):>8}{r['native'] * 1e6:>12.1f}{r['python'] * 1e6:>12.1f}"
                      f"{r['mpi4py'] * 1e6:>12.1f}{r['bytes'] / r['native'] / 1e9:>13.2f}"
                      f"{r['native'] / r['mpi4py']:>15.3f}")
        if "b" not in args.skip:
            mlp = run_mlp(tmp, args.layers, args.tokens, iters)
            results["mlp"] = mlp
            gflop = mlp["flops"] / 1e9
            print(f"\n(b) MLP stack: {mlp['layers']} layers, d={D}, ffn={FFN}, {mlp['tokens']} tokens "
                  f"({gflop:.1f} GFLOP/step), median of {iters} steps")
            _print_scaling(mlp, gflop, "2 ranks (1x2 Megatron)")
        if "c" not in args.skip and "mlp" in results:
            tr = run_torch(tmp, args.layers, args.tokens, iters)
            if "y" in tr:
                y = np.load(tr.pop("y"))
                ref = np.load(str(tmp / "mlp-0.json") + ".npy")
                tr["max_abs_diff_vs_bmc"] = float(np.max(np.abs(y - ref)))
            results["torch"] = tr
            if "skipped" in tr:
                print(f"\n(c) PyTorch tensor parallel: skipped: {tr['skipped']}")
            else:
                bmc_t = results["mlp"]["2 ranks, 1 thread each"]["median_s"]
                tr["bmc_over_torch_time"] = bmc_t / tr["median_s"]
                print(f"\n(c) PyTorch {tr['torch']} tensor parallel (gloo, 2 processes, 1 thread each): "
                      f"{tr['median_s'] * 1e3:.1f} ms; bmc {bmc_t * 1e3:.1f} ms -> bmc time / torch time "
                      f"{tr['bmc_over_torch_time']:.2f} (max |diff| {tr.get('max_abs_diff_vs_bmc', float('nan')):.2e})")
        if "d" not in args.skip:
            cp = run_context(tmp, iters)
            results["context_parallel"] = cp
            gflop = cp["flops"] / 1e9
            print(f"\n(d) context parallelism: {ROWS} rows attending to {MEMORY} memory tokens (8 heads x 64, one "
                  f"key/value head; {gflop:.1f} GFLOP/step), median of {iters} steps; collectives: "
                  f"{', '.join(cp['collectives_in_plan'])}")
            _print_scaling(cp, gflop, "2 ranks (memory split)")
        if "e" not in args.skip:
            pp = run_pipeline(tmp, args.layers, args.tokens, iters, args.microbatches)
            results["pipeline"] = pp
            gflop = pp["flops"] / 1e9
            print(f"\n(e) pipeline: the MLP stack of (b) in 2 stages (nodes {pp['stages']}) on 2 ranks, "
                  f"{pp['microbatches']} microbatches of {args.tokens // pp['microbatches']} tokens, median of "
                  f"{iters} steps")
            _print_scaling(pp, gflop, f"2 ranks ({pp['microbatches']} microbatches)")
            print(f"  (the schedule's bound with {pp['microbatches']} microbatches: {pp['gpipe_bound']:.2f}x)")
            t = pp["2 ranks, 1 microbatch"]["median_s"]
            print(f"  {'2 ranks, 1 microbatch':<32}{t * 1e3:>10.1f} ms{gflop / t:>10.1f} GFLOP/s  (no overlap: "
                  f"{pp['speedup_1_microbatch']:.2f}x, max |diff| {pp['max_abs_diff_1_microbatch_vs_single']:.2e})")
        if "f" not in args.skip:
            ol = run_output_layout(tmp, args.tokens, iters)
            results["split_outputs"] = ol
            print(f"\n(f) split outputs: logits [{ol['tokens']}, {ol['vocab']}] ({_human(ol['logits_bytes'])}), the "
                  f"vocabulary split over 2 ranks, median of {iters} steps")
            for name in ("2 ranks, logits gathered", "2 ranks, logits left split"):
                print(f"  {name:<32}{ol[name]['median_s'] * 1e3:>10.1f} ms")
            print(f"  gathered / split time: {ol['gathered_over_split_time']:.2f}x (collectives: "
                  f"{ol['collectives_whole'] or 'none'} vs {ol['collectives_split'] or 'none'}; rank 0's block max "
                  f"|diff| {ol['max_abs_diff_rank0_block']:.2e})")
        if "g" not in args.skip:
            dec = run_decoding(tmp, max(iters, 10))
            results["decoding"] = dec
            print(f"\n(g) decoding step: d={DEC_D}, {DEC_HEADS} heads, a {DEC_LENGTH}-position key/value cache "
                  f"({_human(dec['cache_bytes'])}), median step")
            _print_steps(dec, ("onnxruntime, 1 process", "1 rank", "1 rank, caches donated", "1 rank, bfloat16",
                               "1 rank, bfloat16, caches bfloat16 and donated", "2 ranks, caches whole",
                               "2 ranks, caches split over heads", "2 ranks, caches split over heads, donated"))
            print(f"  caches whole / split over heads: {dec['whole_over_split_time']:.2f}x; caches copied / donated: "
                  f"{dec['copied_over_donated_time_1_rank']:.2f}x on 1 rank, "
                  f"{dec['copied_over_donated_time_2_ranks']:.2f}x on 2 ranks (split); onnxruntime / bmc donated "
                  f"(1 rank): {dec['onnxruntime_over_donated_time_1_rank']:.2f}x; bfloat16 with float32 caches / "
                  f"with bfloat16 caches donated: {dec['bfloat16_over_bfloat16_caches_donated_time']:.2f}x")
        if "h" not in args.skip:
            gqa = run_grouped_decoding(tmp, max(iters, 10))
            results["grouped_decoding"] = gqa
            print(f"\n(h) grouped-query decoding step: {gqa['heads']} query heads over {gqa['kv_heads']} key/value "
                  f"heads, caches of {_human(gqa['cache_bytes'])} donated, median step")
            _print_steps(gqa, ("onnxruntime, 1 process", "1 rank, shared heads read", "1 rank, heads copied (Gather)"))
            print(f"  heads copied / shared: {gqa['copied_over_shared_time']:.2f}x; onnxruntime / bmc shared: "
                  f"{gqa['onnxruntime_over_shared_time']:.2f}x (max |diff| {gqa['max_abs_diff_shared_vs_copied']:.1e})")
        if "i" not in args.skip:
            moe = run_experts(tmp, iters)
            results["expert_parallel"] = moe
            gflop = moe["flops"] / 1e9
            print(f"\n(i) expert parallelism: {moe['layers']} layers of {moe['experts']} experts (2 a token, d={D}), "
                  f"{moe['tokens']} tokens ({gflop:.1f} GFLOP/step), median of {iters} steps; collectives: "
                  f"{', '.join(moe['collectives_in_plan'])} ({_human(moe['collective_bytes_per_device'])} a device)")
            _print_scaling(moe, gflop, "2 ranks (experts split)")
    # with --skip, the sections not run keep the results last recorded; measured_at: each section's commit
    kept = json.loads(RESULTS.read_text()) if args.skip and RESULTS.exists() else {}
    measured = ({k: "an earlier run" for k in kept if k not in ("machine", "mpiexec", "measured_at")}
                | kept.pop("measured_at", {}) | {k: commit for k in results if k not in ("machine", "mpiexec")})
    results = kept | results | {"measured_at": measured}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
