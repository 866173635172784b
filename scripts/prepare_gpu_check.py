"""Prepare ``.gpu/``: everything ``scripts/gpu_check.sh`` needs on a lent GPU machine that has no TVM and no network.

    python scripts/prepare_gpu_check.py                 # writes .gpu/ (about 24 MiB), then dry-runs the check here
    python scripts/prepare_gpu_check.py --out DIR --archs sm_90 sm_80 --no-verify

The folder is built unpacked in ``.gpu-build/`` and carried packed in ``.gpu/``: ``MANIFEST.json``, ``wheels/`` (zips
already) and ``bundle.tar.xz``, the rest (xz halves it: 47 MiB to 24 with the wheels), which ``gpu_check.sh``
unpacks into a temp dir first. The device tool carries 64 MiB with the repository.

Contents of the unpacked folder:

- ``wheels/``: the cp312 ``apache-tvm-ffi`` wheel (the GPU machine runs Python 3.12; downloaded once with
  ``pip download``, or passed with ``--ffi-wheel``).
- ``site/tvm``: the installed TVM package without ``libtvm_compiler.so`` (259 MB), ``3rdparty/`` and the other parts
  only the compiler uses (``RUNTIME_UNUSED``). Imported with
  ``TVM_USE_RUNTIME_LIB=1`` it loads only ``libtvm_runtime.so`` (tvm/base.py); ``libtvm_runtime_cuda.so`` is then
  *not* autoloaded (tvm/backend/_autoload_backends.py skips backends in runtime-only mode), so the check loads it.
  ``site/apache_tvm-<v>.dist-info/METADATA`` makes ``importlib.metadata`` report the TVM version the artifacts'
  manifests were written with.
- ``lib/``: the CUDA runtime ``libcudart.so.13`` that ``libtvm_runtime_cuda.so`` links (used only when the machine
  has none); ``fallback/typing_extensions.py`` (tvm-ffi needs it; used only when missing).
- ``wheels/``: also the ``mpich`` and ``mpi4py`` wheels this venv uses (cp312), so the two-rank check runs with a
  known MPI whatever the GPU machine has.
- ``lib/libbmc_cuda_kernels.so``: bmc's cuBLAS kernel library, built here (it dlopens cuBLAS there).
- ``src/bmc``: the bmc source the artifacts were compiled with.
- ``artifacts/<model>/``: ``.bmc`` artifacts compiled here for CUDA (kernels are nvcc images, nothing compiles at
  load), and ``artifacts/<model>.npz``: inputs by name and reference outputs (``output:<name>``) computed here by
  bmc's reference interpreter.
- ``fixtures/<fixture>-<dtype>/``: the model fixtures (tests/fixtures/models, exported by PyTorch; their .npz holds
  onnxruntime's outputs and travels with the repository) compiled for CUDA in float32 (``FIXTURE_BUILDS``), and
  some in float16/bfloat16;
  ``fixtures/<fixture>-mesh2/``: one for 2 ranks (Megatron on a mesh of 2), ``<fixture>-pipe2``: the same as
  two pipeline stages with two microbatches; two quantized fixtures
  (tests/fixtures/quantized: ``gpt2_qdq``, ``llama_nbits``) in float32.
- ``bench/``: the CUDA libraries of ``benchmarks/gpu.py prepare`` (no weights).
- ``tune/``: MetaSchedule candidates (``--tune-trials``, sampled at random, compiled to cubin) and the default
  schedules of the TVM kernels of one 1.3B-shaped bf16 layer of ``benchmarks/gpu.py`` (``--tune-export``), which
  the check times for ``bmc tune import``.
- ``MANIFEST.json``: models, fixtures, archs, nvcc times, kernel counts, sizes, versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bmc.ir.types import TensorType  # noqa: E402
from bmc.ops.builder import GraphBuilder  # noqa: E402

FFI_VERSION = "0.1.14.post1"
CARRY_BYTES = 64 * 2**20  # what the device tool sends: the repository's tracked files and this folder together
MARGIN_BYTES = 2**20
#: what the runtime-only TVM leaves out: the compiler library, headers, its C++ and web sources, the model importers
#: (relax/frontend) and the compiler-side packages topi and s_tir (the dry run imports and loads everything without
#: them)
RUNTIME_UNUSED = ("__pycache__", "3rdparty", "libtvm_compiler.so", "include", "src", "web", "frontend", "topi",
                  "s_tir")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")


# --- models ----------------------------------------------------------------------------------------------------------
def _w(rng, *shape, scale=None):
    scale = scale if scale is not None else 1.0 / np.sqrt(shape[0])
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def mlp2():
    """x f32[8,64] → Linear(64,256) → gelu → Linear(256,64)."""
    rng = np.random.default_rng(1)
    b = GraphBuilder("mlp2")
    x = b.input("x", TensorType("float32", (8, 64)))
    h = b.emit1("add", [b.emit1("matmul", [x, b.param("w1", _w(rng, 64, 256))]), b.param("b1", _w(rng, 256))])
    h = b.emit1("gelu", [h])
    y = b.emit1("add", [b.emit1("matmul", [h, b.param("w2", _w(rng, 256, 64))]), b.param("b2", _w(rng, 64))], "y")
    return b.finish([y]), {"x": rng.standard_normal((8, 64)).astype(np.float32)}


def block():
    """A pre-LN transformer block: x f32[1,16,64], 4 heads of 16, MLP 128, residuals."""
    rng = np.random.default_rng(2)
    d, t, nh, hd = 64, 16, 4, 16
    b = GraphBuilder("block")
    x = b.input("x", TensorType("float32", (1, t, d)))

    def linear(v, name, n_in, n_out):
        return b.emit1("add", [b.emit1("matmul", [v, b.param(f"{name}_w", _w(rng, n_in, n_out))]),
                               b.param(f"{name}_b", _w(rng, n_out, scale=0.02))])

    def norm(v, name):
        return b.emit1("layer_norm", [v, b.param(f"{name}_g", 1 + _w(rng, d, scale=0.1)),
                                      b.param(f"{name}_b", _w(rng, d, scale=0.1))])

    def heads(v, perm):
        return b.emit1("transpose", [b.emit1("reshape", [v], shape=(1, t, nh, hd))], perm=perm)

    h = norm(x, "ln1")
    q, k, v = (linear(h, n, d, d) for n in ("q", "k", "v"))
    scores = b.emit1("matmul", [heads(q, (0, 2, 1, 3)), heads(k, (0, 2, 3, 1))])
    scores = b.emit1("mul", [scores, b.constant(np.float32(1 / np.sqrt(hd)))])
    ctx = b.emit1("matmul", [b.emit1("softmax", [scores], axis=-1), heads(v, (0, 2, 1, 3))])
    ctx = b.emit1("reshape", [b.emit1("transpose", [ctx], perm=(0, 2, 1, 3))], shape=(1, t, d))
    x = b.emit1("add", [x, linear(ctx, "o", d, d)])
    m = linear(b.emit1("gelu", [linear(norm(x, "ln2"), "fc1", d, 128)]), "fc2", 128, d)
    y = b.emit1("add", [x, m], "y")
    return b.finish([y]), {"x": rng.standard_normal((1, t, d)).astype(np.float32)}


def convnet():
    """conv → relu → max_pool → avg_pool → matmul → gelu → layer_norm → softmax, and a reduce_sum."""
    rng = np.random.default_rng(3)
    b = GraphBuilder("convnet")
    x = b.input("x", TensorType("float32", (2, 4, 16, 16)))
    y = b.emit1("relu", [b.emit1("conv", [x, b.param("conv_w", _w(rng, 8, 4, 3, 3, scale=0.3))], pads=(1, 1, 1, 1))])
    y = b.emit1("avg_pool", [b.emit1("max_pool", [y], kernel=(2, 2), strides=(2, 2))], kernel=(2, 2), strides=(2, 2))
    y = b.emit1("reshape", [y], shape=(2, 128))
    y = b.emit1("gelu", [b.emit1("matmul", [y, b.param("fc_w", _w(rng, 128, 32))])])
    y = b.emit1("layer_norm", [y, b.param("ln_g", np.ones(32, np.float32)), b.param("ln_b", np.zeros(32, np.float32))])
    probs = b.emit1("softmax", [y], "probs")
    total = b.emit1("reduce_sum", [y], "total", axes=(1,), keepdims=False)
    return b.finish([probs, total]), {"x": rng.standard_normal((2, 4, 16, 16)).astype(np.float32)}


MODELS = {"mlp2": mlp2, "block": block, "convnet": convnet}


# --- folder ----------------------------------------------------------------------------------------------------------
def compile_models(out: Path, archs: tuple[str, ...], names: list[str]) -> list[dict]:
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec
    from bmc.runtime.artifact import graph_signature, write_artifact
    from bmc.testing.reference import run_reference

    spec = TargetSpec.parse("cuda", archs)
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        graph, inputs = MODELS[name]()
        t0 = time.perf_counter()
        built = build(graph, spec)
        build_s = time.perf_counter() - t0
        path = out / "artifacts" / name
        write_artifact(path, signature=graph_signature(graph),
                       weights=[(p.name, graph.weights[p.name].numpy) for p in graph.params],
                       export_library=built.export, target=spec.to_json(),
                       source={"model": f"{name} (GraphBuilder, scripts/prepare_gpu_check.py)", "sha256": "0" * 64,
                               "opset": 0},
                       extra={"kernels": built.kernels})
        ref = run_reference(graph, inputs)
        np.savez(out / "artifacts" / f"{name}.npz", **inputs, **{f"output:{k}": v for k, v in ref.items()})
        info = built.kernels["cuda"]
        rows.append({"model": name, "archs": list(archs), "build_s": round(build_s, 2),
                     "tvm_compile_s": round(built.timings["tvm_compile_s"], 2), "nvcc_s": info["nvcc_s"],
                     "kernels": info["num_kernels"], "image_bytes": info["image_bytes"],
                     "artifact_bytes": _size(path)})
        print(f"  {name:8s} {info['num_kernels']:3d} kernels  tvm {built.timings['tvm_compile_s']:.2f} s  "
              f"nvcc {info['nvcc_s']:.2f} s  image {info['image_bytes'] / 1024:.0f} KiB", flush=True)
    return rows


FIXTURES = REPO / "tests" / "fixtures"
#: (folder, fixture, dtype, mesh): the dynamo exporter's model fixtures in float32 (the legacy exporter's run the
#: same kernels), but the mixtures of experts (large artifacts: Mixtral only, in bfloat16 and split by experts over
#: two ranks), so that the folder and the repository fit the device tool's 64 MiB; reduced precision and two ranks on
#: a few (GPT-2 Megatron, the cross-attention block context-parallel; Gemma 2 in float16: 1.4e-2 from onnxruntime
#: in bfloat16 on the CPU, over the check's bound, and its heads of 8 too small for the fused kernel; Llama by
#: Megatron on 4 ranks, each query head reading its one key/value head); an int8 (QDQ) and an int4 (MatMulNBits)
#: quantized fixture
MOE = ("mixtral", "qwenmoe", "dsv3")
#: fixtures whose CUDA kernels other builds already run: llama_dynamo23 (ONNX's Attention, inlined and fused, is
#: llama_dynamo's graph) and the decoders kept for their sharding (Phi-3, GPT-NeoX, OLMo 2: Llama's kernels); Gemma 2's
#: soft-capped attention is built (its composition is new on the GPU)
SAME_KERNELS = ("llama_dynamo23", "phi3", "neox", "olmo2")
FIXTURE_BUILDS = [("models", p.stem, "float32", "1") for p in sorted((FIXTURES / "models").glob("*_dynamo*.onnx"))
                  if not p.stem.startswith(MOE + SAME_KERNELS)] + [
    ("models", "gpt2_dynamo", "bfloat16", "1"), ("models", "llama_dynamo", "bfloat16", "1"),
    ("models", "bert_dynamo", "float16", "1"), ("models", "vit_dynamo", "bfloat16", "1"),
    ("models", "gemma2_dynamo", "float16", "1"),
    ("models", "gpt2_dynamo", "float32", "2"), ("models", "xattn_dynamo", "float32", "2"),
    ("models", "llama_dynamo", "float32", "4"),
    ("models", "mixtral_dynamo", "bfloat16", "1"), ("models", "mixtral_dynamo", "float32", "2"),
    ("quantized", "gpt2_qdq", "float32", "1"),
    ("quantized", "llama_nbits", "float32", "1")]
#: reduced-precision builds again with the fused attention kernel (``BMC_CUDA_ATTENTION=fused``; tag ``-fa``)
#: two-rank builds split by annotations instead of Megatron: the memory's tokens (context parallelism)
SHARD = {"xattn_dynamo": {"memory": "[{},{x},{}]", "memory_mask": "[{},{x}]"}}
FUSED_ATTENTION = {("gpt2_dynamo", "bfloat16"), ("llama_dynamo", "bfloat16"), ("bert_dynamo", "float16"),
                   ("vit_dynamo", "bfloat16")}
#: two-rank builds again as two pipeline stages with two microbatches (tag ``-pipe2``: one rank per stage)
PIPELINE = {"gpt2_dynamo"}


def compile_fixtures(out: Path, archs: tuple[str, ...]) -> list[dict]:
    import bmc

    rows = []
    (out / "fixtures").mkdir()
    builds = [(*b, "composition", "") for b in FIXTURE_BUILDS] + [
        (folder, name, dtype, mesh, "fused", "-fa") for folder, name, dtype, mesh in FIXTURE_BUILDS
        if mesh == "1" and (name, dtype) in FUSED_ATTENTION] + [
        (folder, name, dtype, mesh, "composition", "-pipe") for folder, name, dtype, mesh in FIXTURE_BUILDS
        if mesh == "2" and name in PIPELINE]
    for folder, name, dtype, mesh, attention, variant in builds:
        data = np.load(FIXTURES / folder / f"{name}.npz")
        shapes = {k: data[k].shape for k in data.files if not k.startswith("output:")}
        tag = f"{name}-pipe{mesh}" if variant == "-pipe" else f"{name}-mesh{mesh}" if mesh != "1" else \
            f"{name}-{dtype}{variant}"
        path = out / "fixtures" / tag
        t0 = time.perf_counter()
        extra = {} if mesh == "1" else {"mesh": mesh, "stages": int(mesh), "microbatches": 2} \
            if variant == "-pipe" else {"mesh": mesh, "shard": SHARD[name]} if name in SHARD else {
            "mesh": mesh, "strategy": "megatron"}
        os.environ["BMC_CUDA_ATTENTION"] = attention
        try:
            bmc.compile(FIXTURES / folder / f"{name}.onnx", path, target="cuda", cuda_archs=archs,
                        input_shapes=shapes, dtype=dtype, **extra)
        finally:
            del os.environ["BMC_CUDA_ATTENTION"]
        manifest = json.loads((path / "manifest.json").read_text())
        programs = [st["kernels"]["cuda"] for st in manifest["pipeline"]["stages"]] if "pipeline" in manifest \
            else [manifest["kernels"]["cuda"]]
        info = {"num_kernels": sum(p["num_kernels"] for p in programs),
                "requires": [r for p in programs for r in p.get("requires", [])],
                "matmul": {"blas": sum(p.get("matmul", {}).get("blas", 0) for p in programs)}}
        if attention == "fused" and not any(r.startswith("bmc.cuda.attention") for r in info["requires"]):
            raise RuntimeError(f"{tag}: the fused attention kernel was not used")
        rows.append({"artifact": tag, "folder": folder, "fixture": name, "dtype": dtype, "world": int(mesh),
                     "attention": attention, "build_s": round(time.perf_counter() - t0, 2),
                     "kernels": info["num_kernels"], "cublas_matmuls": info.get("matmul", {}).get("blas", 0),
                     "artifact_bytes": _size(path)})
        print(f"  {tag:22s} {info['num_kernels']:3d} kernels  {rows[-1]['cublas_matmuls']:2d} cuBLAS matmuls  "
              f"{rows[-1]['build_s']:.1f} s", flush=True)
    return rows


def compile_decoding(out: Path, archs: tuple[str, ...]) -> list[dict]:
    """The exported decoding steps (``tests/fixtures/decoding``: one attention layer, and a 2-layer Llama-shaped
    step) with their caches donated (``--donate``): the check runs five steps of each on the GPU with the in-place
    cache kernels."""
    import bmc

    rows = []
    (out / "decoding").mkdir()
    for fixture in ("decstep_dynamo", "llamastep_dynamo"):
        t0 = time.perf_counter()
        tag = f"{fixture}-donate"
        bmc.compile(FIXTURES / "decoding" / f"{fixture}.onnx", out / "decoding" / tag, target="cuda",
                    cuda_archs=archs, donate=["*cache*"])
        print(f"  {tag:22s} {time.perf_counter() - t0:.1f} s", flush=True)
        rows.append({"artifact": tag, "fixture": fixture})
    return rows


def copy_runtime(out: Path, toolkit) -> dict:
    import tvm
    from importlib import metadata

    from bmc.codegen import cuda

    src = Path(tvm.__file__).parent
    shutil.copytree(src, out / "site" / "tvm", ignore=shutil.ignore_patterns(*RUNTIME_UNUSED))
    dist = metadata.distribution("apache-tvm")
    info = out / "site" / f"apache_tvm-{dist.version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(dist.read_text("METADATA"))
    (info / "INSTALLER").write_text("bmc prepare_gpu_check (runtime only: no libtvm_compiler.so)\n")
    (out / "lib").mkdir()
    needed = subprocess.run(["readelf", "-d", str(cuda.runtime_cuda_library())], capture_output=True, text=True,
                            check=True).stdout
    cudart = next(w.strip("[]") for w in needed.split() if w.strip("[]").startswith("libcudart.so"))
    found = [p for p in toolkit.root.glob(f"**/{cudart}") if p.is_file()]
    if not found:
        raise SystemExit(f"{cudart} (needed by libtvm_runtime_cuda.so) is not under {toolkit.root}")
    shutil.copy2(found[0].resolve(), out / "lib" / cudart)
    from bmc.runtime.kernels import build_native

    shutil.copy2(build_native(out / "build-cuda-kernels", target="bmc_cuda_kernels"), out / "lib")
    shutil.rmtree(out / "build-cuda-kernels")
    import typing_extensions

    (out / "fallback").mkdir()
    shutil.copy2(typing_extensions.__file__, out / "fallback" / "typing_extensions.py")
    return {"tvm_version": dist.version, "cudart": cudart}


def wheels(out: Path, given: Path | None) -> list[str]:
    """cp312 wheels of apache-tvm-ffi (``--ffi-wheel`` or pip download) and of this venv's mpich and mpi4py."""
    from importlib import metadata

    (out / "wheels").mkdir()
    want = [f"mpich=={metadata.version('mpich')}", f"mpi4py=={metadata.version('mpi4py')}"]
    if given:
        shutil.copy2(given, out / "wheels" / given.name)
    else:
        want.append(f"apache-tvm-ffi=={FFI_VERSION}")
    cache = Path(os.environ.get("BMC_WHEEL_CACHE", tempfile.gettempdir())) / "bmc-gpu-wheels"
    cmd = [sys.executable, "-m", "pip", "download", *want, "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pip download of {' '.join(want)} (cp312) failed:\n{proc.stderr[-2000:]}")
    names = []
    for spec in want:
        dist, version = spec.split("==")
        found = sorted(cache.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
        if not found:
            raise SystemExit(f"no wheel for {spec} in {cache}")
        names.append(Path(shutil.copy2(found[0], out / "wheels" / found[0].name)).name)
    return names


def export_tuning(out: Path, archs: tuple[str, ...], trials: int) -> dict:
    """MetaSchedule candidates for the TVM kernels of one 1.3B-shaped layer (the benchmark's stack, bfloat16)."""
    import importlib.util

    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    spec = importlib.util.spec_from_file_location("bmc_bench_gpu", REPO / "benchmarks" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    graph = bench.stack_graph({**bench.STACKS["1.3b"], "layers": 1})
    with tempfile.TemporaryDirectory(prefix="bmc-tune-db-") as db:
        built = build(graph, TargetSpec.parse("cuda", archs), tune_trials=trials, tune_db=db, tune_export=out)
    return built.kernels["cuda"]["tuning"]["export"]


def _repository_bytes() -> int:
    """The bytes of what the device tool sends besides the carried folder: tracked files and untracked ones git does
    not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / os.fsdecode(n)).stat().st_size for n in listed if n and (REPO / os.fsdecode(n)).is_file())


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


BUNDLE = "bundle.tar.xz"
UNPACKED = ("MANIFEST.json", "wheels")  # carried as they are (the wheels are zips already)


def pack(tree: Path, carried: Path) -> int:
    """Write the carried folder: ``tree``'s manifest and wheels as they are, everything else in one xz tarball;
    its size in bytes."""
    import tarfile

    if carried.exists():
        shutil.rmtree(carried)
    carried.mkdir(parents=True)
    for name in UNPACKED:
        (shutil.copytree if (tree / name).is_dir() else shutil.copy2)(tree / name, carried / name)
    with tarfile.open(carried / BUNDLE, "w:xz", preset=6) as tar:
        for item in sorted(tree.iterdir()):
            if item.name not in UNPACKED:
                tar.add(item, arcname=item.name)
    return _size(carried)


def unpack(carried: Path, into: Path) -> Path:
    """What ``gpu_check.sh`` does with a carried folder before the check: the bundle extracted, the manifest and
    wheels beside it; the unpacked root."""
    import tarfile

    with tarfile.open(carried / BUNDLE) as tar:
        tar.extractall(into, filter="data")
    for name in UNPACKED:
        (into / name).symlink_to(carried / name)
    return into


def dry_run(carried: Path) -> int:
    """Run gpu_check.py --dry-run here on the carried folder unpacked, as the GPU machine would (runtime-only TVM
    from the folder) but against a stub driver: checks imports, manifests, library loading without nvcc, VM
    construction and the reference files."""
    from bmc.codegen import cuda

    with tempfile.TemporaryDirectory(prefix="bmc-gpu-dry-") as tmp:
        out = unpack(carried, Path(tmp) / "gpu")
        stub = cuda.write_stub_libcuda(Path(tmp))
        env = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH", "CUDA_HOME")}
        env.update(PYTHONPATH=f"{out / 'site'}{os.pathsep}{out / 'src'}", TVM_USE_RUNTIME_LIB="1",
                   LD_LIBRARY_PATH=str(stub.parent), PATH=f"{tmp}{os.pathsep}{env.get('PATH', '')}")
        (Path(tmp) / "nvcc").write_text("#!/bin/sh\necho 'nvcc must not run at load time' >&2\nexit 1\n")
        (Path(tmp) / "nvcc").chmod(0o755)
        (Path(tmp) / "out").mkdir()
        return subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--root", str(out),
                               "--dry-run", "--json", str(Path(tmp) / "out" / "gpu_check.json")], env=env,
                              cwd=tmp).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / ".gpu", help="the carried folder (packed)")
    ap.add_argument("--tree", type=Path, default=REPO / ".gpu-build", help="where the folder is built unpacked")
    ap.add_argument("--archs", nargs="+", default=["sm_90"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--ffi-wheel", type=Path, help="a local cp312 apache-tvm-ffi wheel (skips pip download)")
    ap.add_argument("--no-verify", action="store_true", help="skip the dry run of gpu_check.py")
    ap.add_argument("--no-fixtures", action="store_true", help="skip the model fixtures")
    ap.add_argument("--no-bench", action="store_true", help="skip benchmarks/gpu.py prepare")
    ap.add_argument("--tune-trials", type=int, default=32,
                    help="MetaSchedule candidates to export for the check to time (0: none)")
    ap.add_argument("--tune-db", type=Path, help="a tuning database (`bmc tune import` of an earlier check's "
                    "times): the benchmark also builds its stacks with it (gemm=tuned)")
    args = ap.parse_args(argv)

    from bmc.codegen import cuda

    toolkit = cuda.find_toolkit()
    out: Path = args.tree.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"preparing {out} (nvcc {toolkit.version} at {toolkit.nvcc})", flush=True)
    wheel_names = wheels(out, args.ffi_wheel)
    runtime = copy_runtime(out, toolkit)
    shutil.copytree(REPO / "bmc", out / "src" / "bmc", ignore=shutil.ignore_patterns("__pycache__", "lib"))
    rows = compile_models(out, tuple(args.archs), args.models)
    fixtures = compile_fixtures(out, tuple(args.archs)) if not args.no_fixtures else []
    decoding = compile_decoding(out, tuple(args.archs)) if not args.no_fixtures else []
    if not args.no_bench:
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "prepare", "--out", str(out / "bench"),
                        *(["--tune-db", str(args.tune_db.resolve())] if args.tune_db else [])], check=True)
    tuning = export_tuning(out / "tune", tuple(args.archs), args.tune_trials) if args.tune_trials > 0 else None
    manifest = {"created_s": round(time.perf_counter() - t0, 1), "archs": args.archs, "wheels": wheel_names,
                **runtime, "nvcc": toolkit.version, "models": rows, "fixtures": fixtures,
                "decoding": decoding, "tuning": tuning,
                "bytes": _size(out)}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    carried = args.out.resolve()
    total, limit = pack(out, carried), CARRY_BYTES - MARGIN_BYTES - _repository_bytes()
    print(f"{out}: {manifest['bytes'] / 2**20:.1f} MiB in {manifest['created_s']} s; packed into {carried}: "
          f"{total / 2**20:.1f} MiB of {limit / 2**20:.1f} MiB", flush=True)
    if total > limit:
        print(f"error: {total / 2**20:.1f} MiB is over the {limit / 2**20:.1f} MiB left of the device tool's "
              f"{CARRY_BYTES / 2**20:.0f} MiB by the repository ({_repository_bytes() / 2**20:.1f} MiB)",
              file=sys.stderr)
        return 1
    return 0 if args.no_verify else dry_run(carried)


if __name__ == "__main__":
    sys.exit(main())
