"""Automatic sharding at scale: plan GPT-3 175B (and a 1.3B model, GPT-2 small, Mixtral 8x22B) for an 8x8 H100 mesh.

The models are GPT-2-structured ONNX graphs (``benchmarks.models``' layer code; Mixtral's MLPs are mixtures of
experts as the exporters write them, ``benchmarks/moe.py``'s ``hf`` form) whose float16 weights are external
data in a *sparse* file of the right size: the importer checks offsets against the file size, nothing reads it, so
a 350 GB model costs a few MB of disk and memory. Each model is planned with layer deduplication on and off in the
same run; the table reports plan time (import + search + plan), solver time, peak RSS, the estimated time split,
peak memory per device against the 80 GB budget and where tensor parallelism went (which mesh axis splits the
weights of the matmuls).

    python -m benchmarks.search                 # all four models, JSON in benchmarks/results/search.json
    python -m benchmarks.search --models gpt2-small   # one model; --no-dedup-175b skips the slow 175B run without dedup
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from benchmarks.models import IR_VERSION, OPSET, GPT2Config, _block, _Builder, separate_qkv_attention

RESULTS = Path(__file__).resolve().parent / "results" / "search.json"
MODELS = {
    # name: (layers, hidden, heads, ffn, batch, seq, vocab); vocabularies padded to a multiple of 64 as Megatron does
    "gpt3-175b": (96, 12288, 96, 49152, 8, 2048, 51200),
    "gpt-1.3b": (24, 2048, 16, 8192, 8, 2048, 51200),
    "gpt2-small": (12, 768, 12, 3072, 8, 1024, 50304),
    # Mixtral 8x22B's shapes (multi-head attention where it has 8 key/value heads: 3% more parameters)
    "mixtral-8x22b": (56, 6144, 48, 16384, 8, 2048, 32768),
}
EXPERTS = {"mixtral-8x22b": (8, 2)}  # experts, experts a token: a mixture of experts in place of each MLP
ALIGN = 4096


class _WeightFreeBuilder(_Builder):
    """``benchmarks.models``' builder with float16 weights that are external data at increasing offsets (never
    materialized) and small float16 constants inline."""

    def __init__(self, cfg: GPT2Config):
        super().__init__(cfg)
        self.offset = 0

    def external(self, name: str, shape: tuple[int, ...]) -> str:
        t = TensorProto()
        t.name = name
        t.data_type = TensorProto.FLOAT16
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        nbytes = 2 * math.prod(shape)
        for k, v in (("location", "weights.bin"), ("offset", str(self.offset)), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += (nbytes + ALIGN - 1) // ALIGN * ALIGN
        self.inits.append(t)
        return name

    def weight(self, name, shape, std=0.02):
        return self.external(name, tuple(shape))

    def const(self, name, value):
        value = np.asarray(value)
        if value.dtype.kind == "f":
            if value.size > 1024:  # the causal mask: external too
                return self.external(name, value.shape)
            value = value.astype(np.float16)
        return super().const(name, value)

    def layer_norm(self, x, name):
        h = self.cfg.hidden
        g, b = self.external(f"{name}.weight", (h,)), self.external(f"{name}.bias", (h,))
        return self.op("LayerNormalization", [x, g, b], name, axis=-1, epsilon=1e-5)


def _block_separate_qkv(b: _Builder, x: str, i: int) -> str:
    name = f"h.{i}"
    x = b.op("Add", [x, separate_qkv_attention(b, b.layer_norm(x, f"{name}.ln_1"), f"{name}.attn", causal=True,
                                                names=("q_proj", "k_proj", "v_proj", "out_proj"))],
             f"{name}.residual_1")
    fc1 = b.linear(b.layer_norm(x, f"{name}.ln_2"), b.cfg.hidden, b.cfg.ffn, f"{name}.mlp.fc1")
    fc2 = b.linear(b.gelu_tanh(fc1, f"{name}.mlp.gelu"), b.cfg.ffn, b.cfg.hidden, f"{name}.mlp.fc2")
    return b.op("Add", [x, fc2], f"{name}.residual_2")


def _block_moe(b: _Builder, x: str, i: int, experts: int, topk: int) -> str:
    """Attention, then Hugging Face's batched mixture of experts as the exporters write it (``benchmarks/moe.py``'s
    ``hf`` form: softmax router, top-k renormalized, every routed row's expert weights gathered for a batched
    product, SwiGLU, the k rows weighted and summed); bmc fuses each gather + product into a ``gather_matmul``."""
    cfg, name = b.cfg, f"h.{i}"
    h, f = cfg.hidden, cfg.ffn
    x = b.op("Add", [x, separate_qkv_attention(b, b.layer_norm(x, f"{name}.ln_1"), f"{name}.attn", causal=True,
                                                names=("q_proj", "k_proj", "v_proj", "o_proj"))],
             f"{name}.residual_1")
    c = {k: b.shared(f"moe.{k}", np.array(v, np.int64)) for k, v in (
        ("k", [topk]), ("flat", [-1]), ("tile", [1, topk, 1]), ("rows_h", [-1, h]), ("rows_2f", [-1, 2 * f]),
        ("rows_1", [-1, 1]), ("tok_k_h", [-1, topk, h]), ("ax1", [1]), ("ax2", [2]), ("split", [f, f]),
        ("out", [cfg.batch, cfg.seq, h]))}
    m = f"{name}.moe"
    rows = b.op("Reshape", [b.layer_norm(x, f"{name}.ln_2"), c["rows_h"]], f"{m}.rows")
    probs = b.op("Softmax", [b.op("MatMul", [rows, b.weight(f"{m}.router", (h, experts))], f"{m}.logits")],
                 f"{m}.probs", axis=-1)
    top, idx = b.op("TopK", [probs, c["k"]], f"{m}.topk", n_out=2, axis=-1)
    scores = b.op("Div", [top, b.op("ReduceSum", [top, c["ax1"]], f"{m}.topsum", keepdims=1)], f"{m}.scores")
    ids = b.op("Reshape", [idx, c["flat"]], f"{m}.ids")
    xs = b.op("Reshape", [b.op("Tile", [b.op("Unsqueeze", [rows, c["ax1"]], f"{m}.x1"), c["tile"]], f"{m}.xk"),
                          c["rows_h"]], f"{m}.xs")
    w1 = b.op("Gather", [b.weight(f"{m}.gate_up", (experts, 2 * f, h)), ids], f"{m}.w1", axis=0)
    gu = b.op("Reshape", [b.op("MatMul", [w1, b.op("Unsqueeze", [xs, c["ax2"]], f"{m}.xcol")], f"{m}.h"),
                          c["rows_2f"]], f"{m}.h2")
    g, u = b.op("Split", [gu, c["split"]], f"{m}.split", n_out=2, axis=1)
    act = b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g], f"{m}.sg")], f"{m}.silu"), u], f"{m}.act")
    w2 = b.op("Gather", [b.weight(f"{m}.down", (experts, h, f)), ids], f"{m}.w2", axis=0)
    o = b.op("Reshape", [b.op("MatMul", [w2, b.op("Unsqueeze", [act, c["ax2"]], f"{m}.acol")], f"{m}.o"),
                         c["rows_h"]], f"{m}.o2")
    weighted = b.op("Mul", [o, b.op("Reshape", [scores, c["rows_1"]], f"{m}.s1")], f"{m}.weighted")
    y = b.op("ReduceSum", [b.op("Reshape", [weighted, c["tok_k_h"]], f"{m}.ok"), c["ax1"]], f"{m}.sum", keepdims=0)
    return b.op("Add", [x, b.op("Reshape", [y, c["out"]], f"{m}.out")], f"{name}.residual_2")


def write_model(folder: Path, name: str, qkv: str = "separate") -> tuple[Path, int]:
    """The ONNX file and its sparse weight file; returns (path, parameter count)."""
    layers, hidden, heads, ffn, batch, seq, vocab = MODELS[name]
    cfg = GPT2Config(layers, hidden, heads, seq, batch, vocab, ffn)
    b = _WeightFreeBuilder(cfg)
    wte = b.weight("wte", (vocab, hidden))
    wpe = b.weight("wpe", (seq, hidden))
    x = b.op("Add", [b.op("Gather", [wte, "input_ids"], "embed.tokens", axis=0), wpe], "embed.add_positions")
    block = _block_separate_qkv if qkv == "separate" else _block
    for i in range(layers):
        x = _block_moe(b, x, i, *EXPERTS[name]) if name in EXPERTS else block(b, x, i)
    x = b.layer_norm(x, "ln_f")
    b.op("MatMul", [x, b.weight("lm_head.weight", (hidden, vocab))], "logits")
    graph = helper.make_graph(
        b.nodes, name, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, [batch, seq, vocab])], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bmc-benchmarks")
    model.ir_version = IR_VERSION
    path = folder / f"{name}.onnx"
    onnx.save(model, path)
    with open(folder / "weights.bin", "wb") as f:
        f.truncate(b.offset)  # sparse: no blocks are written, nothing is ever read while planning
    params = sum(math.prod(t.dims) for t in b.inits if t.data_location == TensorProto.EXTERNAL)
    return path, params


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_parallel_axes(graph, plan) -> dict[str, int]:
    """How the weights of weight matmuls are split: {"x", "y", "x,y", "none"} → count."""
    from bmc.sharding.manual import weight_source

    params = {id(p) for p in graph.params}
    out: dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "matmul" or node.inputs[1].type.rank != 2:
            continue
        src = weight_source(node.inputs[1])
        if src is None or id(src[0]) not in params:
            continue
        axes = ",".join(plan.specs[src[0].name].axes()) or "none"
        out[axes] = out.get(axes, 0) + 1
    return dict(sorted(out.items()))


def expert_layouts(graph, plan) -> dict[str, int]:
    """How the expert weights (a ``gather_matmul``'s) are split: spec → count (``[{y}, {}, {}]``: experts over y,
    expert parallelism)."""
    out: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "gather_matmul" and node.inputs[1].name in plan.specs:
            key = str(plan.specs[node.inputs[1].name])
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def plan_one(path: Path, mesh_text: str, device: str, budget: float, dedup: bool, time_limit_s: float,
             price: bool) -> dict:
    """Import (with ``bmc compile``'s fusions), plan (auto), and describe the plan. Timed: import + search; pricing
    runs after the clock stops."""
    from bmc.compiler import import_graph
    from bmc.ops.fusion import split_fused_products
    from bmc.sharding.auto import auto_plan
    from bmc.sharding.cost import DEVICES, plan_cost, with_links
    from bmc.sharding.mesh import Mesh

    t0 = time.perf_counter()
    graph = split_fused_products(import_graph(path))  # (as `bmc compile` does on a mesh of several devices)
    t_import = time.perf_counter() - t0
    mesh = with_links(Mesh.parse(mesh_text))
    plan, stats = auto_plan(graph, mesh, device=device, memory_per_device=budget, time_limit_s=time_limit_s,
                            dedup=dedup, check_manual=False)
    t_plan = time.perf_counter() - t0
    row = {"dedup": dedup, "plan_s": t_plan, "import_s": t_import, "solver_s": stats["solve_s"],
           "analyze_s": stats["analyze_s"], "build_s": stats["build_s"], "status": stats["status"],
           "gap": stats["gap"], "variables": stats["variables"], "constraints": stats["constraints"],
           "problem_nodes": stats["problem_nodes"], "graph_nodes": stats["nodes"],
           "repeated_layers": stats["repeated_layers"], "objective_s": stats["objective_s"],
           "ilp_peak_bytes": stats["peak_bytes_estimate"], "tensor_parallel": tensor_parallel_axes(graph, plan),
           "input_spec": {v.name: str(plan.specs[v.name]) for v in graph.inputs}, "warnings": stats["warnings"]}
    if any(n.op == "gather_matmul" for n in graph.nodes):
        row["experts"] = expert_layouts(graph, plan)
    if price:
        c = plan_cost(graph, plan, DEVICES[device])
        row.update({"cost": c.to_json(), "fits": c.memory.peak_bytes <= budget})
    row["peak_rss_bytes"] = peak_rss_bytes()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--mesh", default="8x8")
    ap.add_argument("--device", default="h100")
    ap.add_argument("--memory-per-device", type=float, default=80e9)
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--no-dedup-175b", action="store_true", help="skip GPT-3 175B without deduplication")
    ap.add_argument("--qkv", choices=("separate", "fused"), default="separate",
                    help="separate Q/K/V projections (OPT-175B) or GPT-2/GPT-3's fused QKV + split")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    results = {"qkv": args.qkv, "mesh": args.mesh, "device": args.device, "memory_per_device": args.memory_per_device,
               "time_limit_s": args.time_limit, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bmc-search-") as tmp:
        for name in args.models.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            path, params = write_model(folder, name, args.qkv)
            entry = {"parameters": params, "weight_bytes": 2 * params, "runs": []}
            for dedup in (True, False):
                if not dedup and name == "gpt3-175b" and args.no_dedup_175b:
                    continue
                gc.collect()
                row = plan_one(path, args.mesh, args.device, args.memory_per_device, dedup, args.time_limit,
                               price=True)
                entry["runs"].append(row)
                print(_line(name, row), flush=True)
            results["models"][name] = entry
    results["peak_rss_bytes"] = peak_rss_bytes()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


def _line(name: str, r: dict) -> str:
    c = r.get("cost", {})
    return (f"{name:11} dedup={'on ' if r['dedup'] else 'off'} plan {r['plan_s']:6.1f} s  solver {r['solver_s']:6.1f} s"
            f"  {r['status']:10} vars {r['variables']:7}  est {c.get('total_s', 0) * 1e3:8.2f} ms "
            f"(comm {c.get('comm_s', 0) * 1e3:7.2f})  peak {c.get('peak_bytes_per_device', 0) / 1e9:6.1f} GB "
            f"fits={r.get('fits')}  RSS {r['peak_rss_bytes'] / 2**30:4.2f} GiB  TP {r['tensor_parallel']} "
            f"in {r['input_spec']}" + (f"  experts {r['experts']}" if "experts" in r else ""))


if __name__ == "__main__":
    raise SystemExit(main())
