#!/usr/bin/env python3
"""Single-device benchmark: GPT-2-small, BERT-base, ResNet-50 and ResNeXt-50 ONNX models through bmc on CPU, against
onnxruntime.

    python benchmarks/single_device.py --quick          # small transformer configs (+ the CNNs): a smoke test
    python benchmarks/single_device.py                  # GPT-2 small, BERT-base (12 x 768, 12 heads, seq 128), CNNs
    python benchmarks/single_device.py --models resnet50,resnext50 --threads 2 --json /tmp/out.json

Models (``--models``, comma-separated, default all four):

- ``gpt2``     GPT-2-small-shaped decoder (pre-LN, tanh GELU, vocab 50257), ``benchmarks.models.gpt2_like``
- ``bert``     BERT-base-shaped encoder (post-LN, erf GELU, vocab 30522), ``benchmarks.models.bert_like``
- ``resnet50`` the onnx package's ``light_resnet50.onnx``, batch 1 x 3 x 224 x 224 (weights are ConstantOfShape
               fills: fine for timing, the output itself says little)
- ``resnext50`` ResNeXt-50 32x4d (grouped 3x3 convolutions, batch norms folded), ``benchmarks.models.resnext50_path``,
               input ``x`` 1 x 3 x 224 x 224, seeded He-scaled weights

``--layers/--hidden/--heads/--seq/--vocab/--ffn`` shape both transformers (``--quick``: a tiny config); the CNNs
have one size. Per model, each stage in a fresh subprocess so memory and import costs are its own:

1. ``generate``    the ONNX model (helper API, seeded random weights, external data), cached in ``--cache-dir
2. ``import``      ``bmc.frontend.onnx.import_model`` time
3. ``compile``     ``bmc.compiler.compile_model(..., target="llvm")`` time and peak RSS (vs. weight bytes)
4. ``onnxruntime`` and ``bmc`` latency with the same thread count, warm-up first, best and median
5. max abs error of bmc's first output against onnxruntime's

and once per run:

6. ``matmul``      GFLOP/s of bmc's matmul (a one-op graph through bmc's llvm pipeline, same threads) against numpy's
                   BLAS for the GPT-2 shapes (``--no-matmul`` skips it)

Every stage runs with ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` removed from the environment (set on some machines
for old OpenBLAS builds, they slow down the one numpy ships, which bmc's matmul kernel uses too).

The headline is one row per model: the latency ratio bmc / onnxruntime, absolute numbers alongside. The JSON keeps
its older layout for the first model (GPT-2 when selected: ``config``, ``model``, ``stages`` with ``matmul``,
``headline``, ``goals``) and adds ``models: {name: {config, model, stages, weight_bytes, headline, goals}}``. A failing stage is reported
with its reason (and the stages that need it are skipped); the table and the JSON are written either way, and the
exit status is 1 when any stage failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = ROOT / "benchmarks" / ".cache"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "single_device.json"
GOALS = {"compile_s": 60.0, "peak_rss_over_weights": 3.0, "matmul_vs_numpy": 0.8, "latency_ratio": 2.0}
FULL = dict(layers=12, hidden=768, heads=12, seq=128, vocab=50257, budget=20.0, timeout=3600.0)
QUICK = dict(layers=2, hidden=128, heads=4, seq=32, vocab=1000, budget=2.0, timeout=300.0)
MODELS = ("gpt2", "bert", "resnet50", "resnext50")
DEFAULT_VOCAB = {"gpt2": 50257, "bert": 30522}
CNN_INPUTS = {"resnet50": ("gpu_0/data_0", (1, 3, 224, 224)), "resnext50": ("x", (1, 3, 224, 224))}
#: (batch, M, K, N): GPT-2 small's matmuls at 128 tokens (QKV, attention output, FFN up, FFN down, LM head) and
#: the batched attention product (12 heads of 128x64 @ 64x128)
MATMUL_SHAPES = [(1, 128, 768, 2304), (1, 128, 768, 768), (1, 128, 768, 3072), (1, 128, 3072, 768),
                 (1, 128, 768, 50257), (12, 128, 64, 128)]
QUICK_MATMUL_SHAPES = [(1, 32, 128, 384), (1, 32, 128, 512), (1, 32, 512, 128), (4, 32, 32, 32)]
BLAS_ENV_DROP = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # dropped together (see the module doc)
SMALL_WEIGHTS = 256 * 2**20  # below this, peak RSS is mostly the interpreter + TVM, not the model
ORT_MAX_REPEAT = 200  # adaptive repeats stop here even when the time budget is not spent


# ---------------------------------------------------------------------------------------------- child side
# Each stage runs as `python single_device.py --child STAGE SPEC.json RESULT.json` and writes one JSON object.

def _rss_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux); VmHWM is the exact peak of this address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memory() -> dict:
    import resource

    peak = _rss_bytes("VmHWM")
    if peak is None:  # not Linux: ru_maxrss (kB on Linux/BSD, bytes on macOS)
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_rss_bytes": peak, "peak_rss_subprocess_bytes": kids}


def _time_calls(fn, *, warmup: int, repeat: int | None, budget_s: float, min_repeat: int, max_repeat: int):
    """Call ``fn`` ``warmup`` times, then ``repeat`` times (or until ``budget_s`` is spent); return last output."""
    out = None
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        out = fn()
        warm.append(time.perf_counter() - t0)
    times: list[float] = []
    cpu0 = time.process_time()  # all threads of this process: cpu / wall says how many cores were busy
    while True:
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if repeat is not None:
            if len(times) >= repeat:
                break
        elif len(times) >= max_repeat or (len(times) >= min_repeat and sum(times) >= budget_s):
            break
    cpu = time.process_time() - cpu0
    return out, {"warmup_s": warm, "times_s": times, "n": len(times), "best_s": min(times),
                 "median_s": _median(times), "cores_busy": cpu / sum(times)}


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _first_output(out):
    """bmc's outputs as one numpy array: accepts an array, a tvm tensor, a dict (``logits`` first) or a list."""
    import numpy as np

    if isinstance(out, dict):
        out = out["logits"] if "logits" in out else next(iter(out.values()))
    elif isinstance(out, (list, tuple)):
        out = out[0]
    return out.numpy() if hasattr(out, "numpy") else np.asarray(out)


class StageUnavailable(RuntimeError):
    """A stage needs a part of bmc that is not written (importable) yet: reported without a traceback."""


def _import_stage_module(module: str, stage: str):
    """Import a bmc module, turning "not written yet" into a message that says so."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise StageUnavailable(f"needs {module}, which is not importable yet ({type(err).__name__}: {err}); "
                               "the other stages still ran") from err


def child_generate(spec: dict) -> dict:
    from benchmarks.models import bert_like, gpt2_like

    t0 = time.perf_counter()
    {"gpt2": gpt2_like, "bert": bert_like}[spec.get("kind", "gpt2")](spec["model"], **spec["config"])
    return {"generate_s": time.perf_counter() - t0}


def child_import(spec: dict) -> dict:
    t0 = time.perf_counter()
    frontend = _import_stage_module("bmc.frontend.onnx", "import")
    t1 = time.perf_counter()
    graph = frontend.import_model(spec["model"], input_shapes=None)
    t2 = time.perf_counter()
    result = {"module_import_s": t1 - t0, "import_s": t2 - t1, "nodes": len(getattr(graph, "nodes", []))}
    if hasattr(graph, "op_counts"):
        result["op_counts"] = dict(graph.op_counts())
    return result


def child_compile(spec: dict) -> dict:
    t0 = time.perf_counter()
    compiler = _import_stage_module("bmc.compiler", "compile")
    t1 = time.perf_counter()
    rss_before = _rss_bytes("VmRSS")
    summary = compiler.compile_model(spec["model"], spec["artifact"], target="llvm")
    t2 = time.perf_counter()
    return {"module_import_s": t1 - t0, "compile_s": t2 - t1, "rss_before_compile_bytes": rss_before,
            "artifact_bytes": _tree_bytes(Path(spec["artifact"])), "summary": _jsonable(summary)}


def child_onnxruntime(spec: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = spec["threads"]
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    t0 = time.perf_counter()
    sess = ort.InferenceSession(spec["model"], opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    feeds = dict(np.load(spec["inputs"]))
    out, timing = _time_calls(lambda: sess.run(None, feeds)[0], warmup=spec["warmup"], repeat=spec["repeat"],
                              budget_s=spec["budget"], min_repeat=3, max_repeat=ORT_MAX_REPEAT)
    np.save(spec["output"], out)
    return {"load_s": load_s, **timing}


def _register_kernels(threads: int) -> dict:
    """bmc's CPU kernels (BLAS matmul) and thread pools, before the VM is built; {} when this bmc has none."""
    try:
        from bmc.runtime.kernels import register_cpu_kernels
    except ImportError:
        return {}
    return register_cpu_kernels(threads=threads)


def _blas_threadpools() -> list | None:
    """What threadpoolctl sees (which BLAS, which kernel, how many threads), when it is installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{k: d.get(k) for k in ("user_api", "internal_api", "version", "num_threads", "architecture",
                                   "filepath")} for d in threadpool_info()]


def child_bmc(spec: dict) -> dict:
    import numpy as np

    import bmc

    _import_stage_module("bmc.runtime.executor", "bmc")
    kernels = _register_kernels(spec["threads"])
    t0 = time.perf_counter()
    model = bmc.load(spec["artifact"])
    load_s = time.perf_counter() - t0
    feeds = dict(np.load(spec["inputs"]))
    out, timing = _time_calls(lambda: model(**feeds), warmup=spec["warmup"], repeat=spec["repeat"],
                              budget_s=spec["budget"], min_repeat=1, max_repeat=ORT_MAX_REPEAT)
    np.save(spec["output"], _first_output(out))
    return {"load_s": load_s, "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"), "kernels": kernels,
            "kernels_manifest": model.manifest.get("kernels"), **timing}


def _best_of(fn, budget_s: float, min_repeat: int = 3, max_repeat: int = 50) -> float:
    fn()  # warm-up
    times: list[float] = []
    while len(times) < min_repeat or (sum(times) < budget_s and len(times) < max_repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def child_matmul(spec: dict) -> dict:
    """GFLOP/s of one float32 matmul through bmc (graph → bmc's llvm build → TVM VM) and through numpy, per shape."""
    import numpy as np

    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec
    from bmc.ir.types import TensorType
    from bmc.ops.builder import GraphBuilder

    import tvm
    from tvm import relax

    kernels = _register_kernels(spec["threads"])
    rng = np.random.default_rng(0)
    target = TargetSpec.parse("llvm")
    dev = tvm.cpu()
    rows = []
    for batch, m, k, n in spec["shapes"]:
        a_shape = (batch, m, k) if batch > 1 else (m, k)
        b_shape = (batch, k, n) if batch > 1 else (k, n)
        a = rng.standard_normal(a_shape, dtype=np.float32)
        w = rng.standard_normal(b_shape, dtype=np.float32)
        gb = GraphBuilder("matmul")
        x = gb.input("a", TensorType("float32", a_shape))
        y = gb.input("b", TensorType("float32", b_shape))
        graph = gb.finish([gb.emit1("matmul", [x, y])])
        built = build(graph, target, threads=spec["threads"])
        vm = relax.VirtualMachine(built.executable, dev)
        ta, tw = tvm.runtime.tensor(a, dev), tvm.runtime.tensor(w, dev)
        flops = 2.0 * batch * m * k * n
        budget = spec["budget_per_shape"]
        bmc_s = _best_of(lambda: vm["main"](ta, tw), budget)
        out = np.empty((batch, m, n) if batch > 1 else (m, n), np.float32)
        numpy_s = _best_of(lambda: np.matmul(a, w, out=out), budget)
        got = vm["main"](ta, tw)[0].numpy()
        rows.append({"shape": [batch, m, k, n], "bmc_s": bmc_s, "numpy_s": numpy_s,
                     "bmc_gflops": flops / bmc_s / 1e9, "numpy_gflops": flops / numpy_s / 1e9,
                     "ratio": numpy_s / bmc_s, "kernel": built.kernels.get("cpu", {}).get("matmul"),
                     "max_rel_err": float(np.max(np.abs(got - out)) / max(float(np.max(np.abs(out))), 1e-30))})
    return {"rows": rows, "kernels": kernels, "threadpools": _blas_threadpools()}


CHILD_STAGES = {"generate": child_generate, "import": child_import, "compile": child_compile,
                "onnxruntime": child_onnxruntime, "bmc": child_bmc, "matmul": child_matmul}


def child_main(stage: str, spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = {"ok": True, **CHILD_STAGES[stage](spec)}
    except StageUnavailable as err:
        result = {"ok": False, "unavailable": True, "error": str(err)}
    except Exception as err:  # every failure becomes a row in the table, not a crash of the whole run
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    result.update(_memory())
    _write_json(Path(result_path), result)
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------------- parent side

def run_child(stage: str, spec: dict, workdir: Path, threads: int, timeout: float, label: str = "") -> dict:
    """Run one stage in a fresh interpreter; its stdout/stderr go to a log whose tail is kept on failure."""
    spec_path, result_path, log_path = (workdir / f"{stage}.{ext}" for ext in ("spec.json", "result.json", "log"))
    _write_json(spec_path, spec)
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for var in BLAS_ENV_DROP:
        env.pop(var, None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, str(spec_path), str(result_path)]
    tag = f"{label}/{stage}" if label else stage
    print(f"[{tag}] running ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.perf_counter() - t0
    if result_path.exists():
        result = json.loads(result_path.read_text())
    elif rc is None:
        result = {"ok": False, "error": f"timed out after {timeout:.0f} s (raise --timeout)"}
    else:
        result = {"ok": False, "error": f"the subprocess died with exit status {rc} before reporting"}
    result["wall_s"] = wall
    if not result["ok"] and not result.get("unavailable"):
        result["log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
    print(f"[{tag}] {'ok' if result['ok'] else 'FAILED'} in {wall:.1f} s", file=sys.stderr, flush=True)
    return result


def skipped(reason: str) -> dict:
    return {"ok": False, "skipped": True, "error": reason}


def ensure_model(cfg, cache_dir: Path, workdir: Path, threads: int, timeout: float,
                 kind: str = "gpt2") -> tuple[Path, dict]:
    """The cached model for ``cfg``, generated (in a subprocess) on first use; ResNet-50 ships with onnx, ResNeXt-50
    is written here (a second)."""
    if kind in CNN_INPUTS:
        from benchmarks.models import resnet50_path, resnext50_path

        try:
            if kind == "resnet50":
                return resnet50_path(), {"ok": True, "cached": True, "generate_s": 0.0}
            t0 = time.perf_counter()
            return resnext50_path(cache_dir), {"ok": True, "generate_s": time.perf_counter() - t0}
        except Exception as err:  # noqa: BLE001 (reported as the stage's failure)
            return Path("-"), {"ok": False, "error": str(err)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    ignore = cache_dir / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# generated benchmark models and artifacts: never commit\n*\n")
    path = cache_dir / f"{cfg.tag()}.onnx"
    if path.exists() and Path(f"{path}.data").exists():
        return path, {"ok": True, "cached": True, "generate_s": 0.0}
    result = run_child("generate", {"model": str(path), "config": asdict(cfg), "kind": kind}, workdir, threads,
                       timeout)
    return path, {"cached": False, **result}


def compare(ort_out: Path, bmc_out: Path) -> dict:
    import numpy as np

    ref, got = np.load(ort_out), np.load(bmc_out)
    if ref.shape != got.shape:
        return {"ok": False, "error": f"shape mismatch: bmc {got.shape} vs onnxruntime {ref.shape}"}
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    scale = float(np.max(np.abs(ref)))
    return {"ok": bool(np.isfinite(err)), "max_abs_err": err, "max_abs_ref": scale,
            "max_rel_err": err / max(scale, 1e-30)}


def model_inputs(kind: str, cfg, path: Path) -> dict:
    """Seeded inputs for one model: token ids for the transformers, a standard-normal image for the CNNs."""
    import numpy as np

    if kind in CNN_INPUTS:
        name, shape = CNN_INPUTS[kind]
        return {name: np.random.default_rng(1).standard_normal(shape, dtype=np.float32)}
    rng = np.random.default_rng(cfg.seed + 1)
    return {"input_ids": rng.integers(0, cfg.vocab, size=(cfg.batch, cfg.seq), dtype=np.int64)}


def run_model(args, kind: str, cfg, work: Path) -> dict:
    """The per-model stages, in order; a stage that cannot run says why, and what depends on it is skipped."""
    import numpy as np

    from benchmarks.models import initializer_bytes

    stages: dict[str, dict] = {}
    tag = cfg.tag() if cfg is not None else kind
    mwork = _mkdir(work / tag)
    model, stages["generate"] = ensure_model(cfg, args.cache_dir, mwork, args.threads, args.timeout, kind)
    if not stages["generate"]["ok"]:
        return {"model": str(model), "stages": stages, "weight_bytes": None}
    weight_bytes = initializer_bytes(model)
    inputs_path = mwork / "inputs.npz"
    np.savez(inputs_path, **model_inputs(kind, cfg, model))
    artifact = mwork / f"{tag}.bmc"
    common = {"model": str(model), "artifact": str(artifact), "inputs": str(inputs_path),
              "threads": args.threads, "warmup": args.warmup, "repeat": args.repeat, "budget": args.budget}

    def child(stage: str, **extra) -> dict:
        return run_child(stage, {**common, **extra}, mwork, args.threads, args.timeout, label=kind)

    stages["import"] = child("import")
    stages["compile"] = child("compile")
    stages["onnxruntime"] = child("onnxruntime", output=str(mwork / "ort.npy"))
    if stages["compile"]["ok"]:
        stages["bmc"] = child("bmc", output=str(mwork / "bmc.npy"))
    else:
        stages["bmc"] = skipped("compile did not succeed")
    if stages["onnxruntime"]["ok"] and stages["bmc"]["ok"]:
        stages["accuracy"] = compare(mwork / "ort.npy", mwork / "bmc.npy")
    else:
        stages["accuracy"] = skipped("needs both onnxruntime and bmc outputs")
    return {"model": str(model), "stages": stages, "weight_bytes": weight_bytes}


def run_benchmark(args, configs: dict) -> dict:
    """Every selected model, then the matmul table. The first model's results also sit at the top level (the
    JSON layout before there were several models); ``models`` has them all."""
    models: dict[str, dict] = {}
    matmul = None
    with tempfile.TemporaryDirectory(prefix="run-", dir=_mkdir(args.cache_dir)) as tmp:
        work = Path(tmp)
        for kind, cfg in configs.items():
            run = run_model(args, kind, cfg, work)
            models[kind] = {"config": asdict(cfg) if cfg is not None else {"input": list(CNN_INPUTS[kind][1])}, **run,
                            **summarize(run)}
        if args.matmul:
            shapes = QUICK_MATMUL_SHAPES if args.quick else MATMUL_SHAPES
            matmul = run_child("matmul", {"shapes": shapes, "budget_per_shape": min(2.0, args.budget / 4),
                                          "threads": args.threads}, _mkdir(work / "matmul"), args.threads,
                               args.timeout)
    first = next(iter(models.values()))
    stages = dict(first["stages"])
    if matmul is not None:
        stages["matmul"] = matmul
    return {"model": first["model"], "stages": stages, "weight_bytes": first["weight_bytes"], "models": models}


def summarize(run: dict) -> dict:
    """Headline ratios and goal checks from the stage results."""
    st, wb = run["stages"], run["weight_bytes"]
    head: dict = {}
    ort, bm, comp = st.get("onnxruntime", {}), st.get("bmc", {}), st.get("compile", {})
    if ort.get("ok") and bm.get("ok"):
        head["latency_ratio_median"] = bm["median_s"] / ort["median_s"]
        head["latency_ratio_best"] = bm["best_s"] / ort["best_s"]
    goals = {}
    if comp.get("ok"):
        goals["compile_s"] = {"value": comp["compile_s"], "goal": f"< {GOALS['compile_s']:.0f} s",
                              "met": comp["compile_s"] < GOALS["compile_s"]}
    if comp.get("ok") and comp.get("peak_rss_bytes") and wb:
        ratio = comp["peak_rss_bytes"] / wb
        goals["peak_rss_over_weights"] = {"value": ratio, "goal": f"< {GOALS['peak_rss_over_weights']:.0f}x",
                                          "met": ratio < GOALS["peak_rss_over_weights"]}
    return {"headline": head, "goals": goals}


# ------------------------------------------------------------------------------------------------- report

def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_b(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _latency_cell(r: dict) -> str:
    first = f", first {_fmt_s(r['warmup_s'][0])}" if r["warmup_s"] else ""
    return (f"median {_fmt_s(r['median_s'])}, best {_fmt_s(r['best_s'])} (n={r['n']}{first}, "
            f"load {_fmt_s(r['load_s'])}, {r['cores_busy']:.1f} cores busy)")


def table_rows(report: dict) -> list[tuple[str, str, str]]:
    """(what, measurement, goal/status) rows; failures show their reason instead of a number."""
    st, goals, head = report["stages"], report["goals"], report["headline"]
    rows = []
    if head.get("latency_ratio_median") is not None:
        rows.append(("latency bmc / onnxruntime", f"{head['latency_ratio_median']:.2f}x median, "
                     f"{head['latency_ratio_best']:.2f}x best", "headline"))

    def row(what, key, cell):
        r = st.get(key)
        if r is None:
            return
        status = "skipped" if r.get("skipped") else "unavailable" if r.get("unavailable") else "FAILED"
        rows.append((what, cell(r), "") if r.get("ok") else (what, r.get("error", "failed"), status))

    def goal(name):
        g = goals.get(name)
        return "" if g is None else f"{g['goal']}: {'met' if g['met'] else 'MISSED'}"

    row("generate model", "generate", lambda r: "cached" if r.get("cached") else _fmt_s(r["generate_s"]))
    row("bmc import", "import", lambda r: f"{_fmt_s(r['import_s'])} ({r['nodes']} nodes; "
        f"+{_fmt_s(r['module_import_s'])} module import)")
    row("bmc compile", "compile", lambda r: f"{_fmt_s(r['compile_s'])} (+{_fmt_s(r['module_import_s'])} import)")
    if rows and rows[-1][0] == "bmc compile" and rows[-1][2] == "":
        rows[-1] = (*rows[-1][:2], goal("compile_s"))
    comp = st.get("compile", {})
    if "peak_rss_over_weights" in goals:
        g = goals["peak_rss_over_weights"]
        rows.append(("peak RSS during compile", f"{_fmt_b(comp['peak_rss_bytes'])} = {g['value']:.2f}x "
                     f"weights (before compile {_fmt_b(comp.get('rss_before_compile_bytes'))})",
                     goal("peak_rss_over_weights")))
    row("latency onnxruntime", "onnxruntime", _latency_cell)
    row("latency bmc", "bmc", _latency_cell)
    row("max abs error vs ort", "accuracy", lambda r: f"{r['max_abs_err']:.3g} (max |logit| {r['max_abs_ref']:.3g}, "
        f"rel {r['max_rel_err']:.2g})")
    kern = (st.get("bmc") or {}).get("kernels")
    if kern:
        blas = kern.get("blas") or {}
        cpu = ((st.get("bmc") or {}).get("kernels_manifest") or {}).get("cpu") or {}
        offloaded = ", ".join(f"{op} {cpu[op]['blas']} native / {cpu[op]['tvm']} TVM" for op in ("matmul", "conv2d")
                              if isinstance(cpu.get(op), dict))
        packed = len(cpu.get("packed_weights") or {})
        rows.append(("bmc CPU kernels", f"{kern.get('impl')}, threads {kern.get('threads')} (float64: "
                     f"{Path(blas.get('path') or '-').name}, core {blas.get('core')})"
                     + (f"; {offloaded}" if offloaded else "") + f"; {packed} weights packed at load", ""))
    mm = st.get("matmul")
    if mm is not None and not mm.get("ok"):
        row("matmul GFLOP/s", "matmul", lambda r: "")
    elif mm is not None:
        for r in mm["rows"]:
            b, m, k, n = r["shape"]
            name = f"matmul {'%dx' % b if b > 1 else ''}{m}x{k}x{n}"
            rows.append((name, f"bmc {r['bmc_gflops']:.1f} GFLOP/s vs numpy {r['numpy_gflops']:.1f} = "
                         f"{r['ratio'] * 100:.0f}% ({_fmt_s(r['bmc_s'])} vs {_fmt_s(r['numpy_s'])})",
                         f">= {GOALS['matmul_vs_numpy'] * 100:.0f}%: {'met' if r['ratio'] >= GOALS['matmul_vs_numpy'] else 'MISSED'}"))
    return rows


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """One row per model: bmc / onnxruntime latency ratio (median, best) with the absolute medians."""
    rows = []
    for name, m in report.get("models", {}).items():
        st, head = m["stages"], m["headline"]
        if head.get("latency_ratio_median") is not None:
            ratio = head["latency_ratio_median"]
            rows.append((name, f"{ratio:.2f}x median, {head['latency_ratio_best']:.2f}x best: bmc "
                         f"{_fmt_s(st['bmc']['median_s'])} vs onnxruntime {_fmt_s(st['onnxruntime']['median_s'])} "
                         f"(best {_fmt_s(st['bmc']['best_s'])} vs {_fmt_s(st['onnxruntime']['best_s'])})",
                         f"<= {GOALS['latency_ratio']:.1f}x: {'met' if ratio <= GOALS['latency_ratio'] else 'MISSED'}"))
        else:
            bad = next((f"{k}: {r.get('error', 'failed')}" for k, r in st.items() if not r.get("ok")), "no result")
            rows.append((name, bad, "FAILED"))
    return rows


def _print_rows(rows) -> None:
    failed = ("FAILED", "skipped", "unavailable")
    if not rows:
        return
    w0 = max(len(r[0]) for r in rows)
    w1 = max([len(r[1]) for r in rows if r[2] not in failed], default=0)
    for what, value, note in rows:
        line = f"{note}: {value}" if note in failed else f"{value:<{w1}}  {note}"
        print(f"  {what:<{w0}}  {line}".rstrip())


def _describe(name: str, c: dict) -> str:
    if name in CNN_INPUTS:
        source = "light_resnet50.onnx" if name == "resnet50" else "32x4d, benchmarks.models"
        return f"{name} ({source}) input {'x'.join(map(str, c.get('input', [])))}"
    return (f"{name} layers={c['layers']} hidden={c['hidden']} heads={c['heads']} ffn={c['ffn']} seq={c['seq']} "
            f"batch={c['batch']} vocab={c['vocab']}")


def print_report(report: dict, json_path: Path) -> None:
    models = report.get("models") or {}
    print(f"\nbmc single-device benchmark: {', '.join(models) or '-'}; threads={report['threads']} (ORT intra-op, "
          f"TVM_NUM_THREADS), target llvm, {report['host']['cpu_count']} CPUs, load average "
          f"{report['host']['load_avg_1min_at_start'] or 0:.2f}\n")
    print("latency bmc / onnxruntime (same thread count):")
    _print_rows(summary_rows(report))
    for name, m in models.items():
        print(f"\n{_describe(name, m['config'])}, weights {_fmt_b(m['weight_bytes'])}:")
        _print_rows(table_rows(m))
        if "peak_rss_over_weights" in m["goals"] and (m["weight_bytes"] or 0) < SMALL_WEIGHTS:
            print("  note: the peak-RSS goal is meant for GPT-2-sized weights; at this size the interpreter and "
                  "library baseline dominates")
    mm = report["stages"].get("matmul")
    if mm is not None:
        print("\nmatmul (GPT-2 shapes):")
        _print_rows(table_rows({"stages": {"matmul": mm}, "goals": {}, "headline": {}}))
    for name, m in {**models, "": {"stages": {"matmul": mm} if mm else {}}}.items():
        for stage, r in m["stages"].items():
            if not r.get("ok") and r.get("log_tail"):
                print(f"\n[{name + '/' if name else ''}{stage}] last lines of its log:\n    "
                      + "\n    ".join(r["log_tail"]))
    print(f"\nresults: {json_path}")


def environment() -> dict:
    versions = {}
    for dist in ("apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    import bmc

    versions["bmc"] = bmc.__version__
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "git_commit": commit,
            "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                     "platform": platform.platform(), "load_avg_1min_at_start": _load_avg()}}


def _load_avg() -> float | None:
    """Other work on the machine skews latencies; recorded so a noisy run can be recognised."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# -------------------------------------------------------------------------------------------------- glue

def _jsonable(value):
    """The compile summary as JSON: unknown objects become their repr, so a new field never breaks the run."""
    return json.loads(json.dumps(value, default=repr))


def _tree_bytes(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, value) -> None:
    """Write via ``<path>.tmp`` and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=repr) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("layers", "hidden", "heads", "seq", "vocab"):
        p.add_argument(f"--{name}", type=int, help=f"transformer {name} (default {FULL[name]}"
                       + (", BERT 30522" if name == "vocab" else "") + f"; --quick: {QUICK[name]})")
    p.add_argument("--ffn", type=int, default=0, help="FFN width (default 4 x hidden)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)} (default all; the first is the JSON's top level)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="weights and input ids seed")
    p.add_argument("--threads", type=int, default=2, help="threads for onnxruntime and TVM alike (default 2)")
    p.add_argument("--repeat", type=int, help="timed runs per engine (default: adapt to --budget)")
    p.add_argument("--budget", type=float, help="seconds of timed runs per engine when --repeat is not given "
                   f"(default {FULL['budget']:.0f}; --quick: {QUICK['budget']:.0f}); bmc runs at least once")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--timeout", type=float, help="seconds per stage subprocess "
                   f"(default {FULL['timeout']:.0f}; --quick: {QUICK['timeout']:.0f})")
    p.add_argument("--quick", action="store_true", help="a small config that runs in < 1 minute (smoke test)")
    p.add_argument("--no-matmul", dest="matmul", action="store_false", help="skip the matmul GFLOP/s table")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where generated models are kept")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.vocab_given = args.vocab is not None
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown or not args.models:
        p.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; pick from {', '.join(MODELS)}")
    args.models = list(dict.fromkeys(args.models))
    for name in ("threads", "warmup", "repeat"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(*argv[1:4])
    args = parse_args(argv)
    from benchmarks.models import BertConfig, GPT2Config
    from bmc.errors import BmcError

    configs: dict = {}
    try:
        for kind in args.models:
            if kind in CNN_INPUTS:
                configs[kind] = None
                continue
            vocab = args.vocab if args.vocab_given or args.quick else DEFAULT_VOCAB[kind]
            cls = GPT2Config if kind == "gpt2" else BertConfig
            configs[kind] = cls(args.layers, args.hidden, args.heads, args.seq, args.batch, vocab, args.ffn,
                                args.seed)
    except BmcError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    t0 = time.perf_counter()
    env = environment()  # before the run: its load average is the machine's, not ours
    run = run_benchmark(args, configs)
    first = next(iter(run["models"].values()))
    report = {"benchmark": "single_device", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "config": first["config"], "threads": args.threads, "quick": args.quick, **env, **run,
              **summarize(run), "goal_thresholds": GOALS, "total_wall_s": time.perf_counter() - t0}
    failed = [f"{name}/{stage}" for name, m in run["models"].items() for stage, r in m["stages"].items()
              if not r.get("ok")]
    failed += ["matmul"] * (not report["stages"].get("matmul", {"ok": True}).get("ok"))
    report["failed_stages"] = failed
    report["ok"] = not failed
    _write_json(args.json, report)
    print_report(report, args.json)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
