"""Run the CUDA artifacts of ``.gpu/`` on a real GPU, compare with the reference outputs, time them, print a table.

Started by ``scripts/gpu_check.sh`` (which puts the carried tvm-ffi wheel, ``.gpu/site`` and ``.gpu/src`` on the
path and sets ``TVM_USE_RUNTIME_LIB=1``). ``--dry-run`` does everything that needs no GPU: imports, manifest
verification, library loading (must not compile anything), VM construction and reading the references; it is what
``scripts/prepare_gpu_check.py`` runs against a stub driver.

Each builder model is run twice: through ``bmc.load(path, device="cuda")`` (the real runtime, end to end: host
inputs in, host outputs out) and through a direct TVM VM with inputs already on the device (kernel time). Pass:
every element has ``|out - ref| <= 1e-4 * max(1, |ref|)``.

Each model fixture (``fixtures/``) runs through ``bmc.load`` and is compared with onnxruntime's outputs stored in
``tests/fixtures/{models,quantized}/<name>.npz``: float32 as above (the quantized ones: an int8 QDQ GPT-2 and an
int4 ``MatMulNBits`` Llama; the QDQ one, which quantizes activations, ``max|out - ref| <= 5e-2 * max|ref|``),
float16/bfloat16 ``max|out - ref| <= 1e-2 * max|ref|``. The ``-fa`` builds compute attention with bmc's fused
kernel (``BMC_CUDA_ATTENTION=fused``, ``cpp/cuda_attention.cuh``): the same bound, and ``vs_composition`` reports
their distance from the same build without it; ``attention kernel`` calls that kernel directly on the shapes
of its CPU emulator tests (``bmc.testing.attention_cases``) and a causal mask.
The two-rank artifacts run under ``mpiexec -n 2 python -m bmc run`` on the one GPU (host-staged collectives) and must
match onnxruntime and the one-rank run. ``decstep_dynamo-donate`` and ``llamastep_dynamo-donate`` run five steps of
the exported decoding steps with their caches donated (the in-place cache kernels) against onnxruntime's outputs and
caches, first with numpy caches (``e2e_ms``: a step moving them over PCIe both ways), then with the caches in GPU
memory (torch's tensors by DLPack when torch is there) and the outputs left there (``device_io_ms``; the caches must
come back in the memory passed), and a second load sharing the first's weights (``share_weights``) must hold none of
its own and give the same step. ``nccl`` is a one-rank smoke test of the NCCL path (a single GPU cannot
host an NCCL group of two).

``tune/`` (if prepared) holds MetaSchedule candidates for the 1.3B-shaped layer's TVM kernels, sampled and compiled
on the build machine (``bmc compile --tune N --tune-export``): they are timed here (``bmc tune measure``) and the
times, manifest and search records are copied to ``$OUT/tune`` for ``bmc tune import`` on the build machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

RTOL = 1e-4
RTOL_REDUCED = 1e-2
# fixtures that quantize activations: a float rounding that differs from the CPU's at a code boundary moves a code
# by one step, and a row of the next matmul with it (CPU float16: 2.0e-2 of max |ref| on gpt2_qdq)
QUANTIZED_ACTIVATIONS = {"gpt2_qdq"}
RTOL_QUANTIZED = 5e-2
REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "models"


def enable_cuda_runtime(root: Path) -> str:
    """The hook bmc's executor needs for ``device="cuda"`` on a runtime-only TVM: load ``libtvm_runtime_cuda.so``
    (which registers the ``cuda`` module loader; runtime-only TVM does not autoload it) and ``tvm.runtime.vm``.
    Returns which libcudart was used."""
    cudart = "system libcudart.so.13"
    try:
        ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(str(root / "lib" / "libcudart.so.13"), mode=ctypes.RTLD_GLOBAL)
        cudart = str(root / "lib" / "libcudart.so.13")
    import tvm
    import tvm.runtime.vm  # noqa: F401  (not imported by `import tvm` when relax is absent)
    import tvm_ffi
    from tvm.base import _LOADED_LIBS

    if "ffi.Module.load_from_bytes.cuda" not in tvm_ffi.registry.list_global_func_names():
        lib = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
        try:
            _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(lib))
        except OSError as e:
            raise SystemExit(f"cannot load {lib}: {e}\n(it needs the NVIDIA driver's libcuda.so.1 and {cudart})")
    return cudart


def register_cuda_kernels(dry: bool) -> None:
    """bmc.cuda.matmul (cuBLAS), which the programs call; a dry run (no cuBLAS here) registers the library's
    function unbound: enough to build a VM, not to run it."""
    if not dry:
        from bmc.runtime.cuda import register_kernels

        register_kernels()
        return
    import tvm_ffi

    lib = tvm_ffi.load_module(os.environ["BMC_CUDA_KERNELS_LIB"])
    tvm_ffi.register_global_func("bmc.cuda.matmul", lib["cuda_matmul"], override=True)


def direct_vm(path: Path, dev):
    """Load an artifact's program and weights with TVM alone (no bmc.runtime.executor): (main, params, manifest)."""
    import tvm

    from bmc.runtime.artifact import verify_artifact
    from bmc.runtime.safetensors import SafetensorsFile

    manifest = verify_artifact(path)
    lib = tvm.runtime.load_module(str(path / manifest["programs"]["main"]))
    vm = tvm.runtime.vm.VirtualMachine(lib, dev)
    st = SafetensorsFile(path / manifest["weights"]["0"])
    params = [tvm.runtime.tensor(st.get(p["name"]), dev) for p in manifest["signature"]["params"]]
    return vm["main"], params, manifest


def compare(outs: dict, ref: dict) -> tuple[float, bool]:
    import numpy as np

    worst, ok = 0.0, True
    for name, want in ref.items():
        got = np.asarray(outs[name], dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            return float("inf"), False
        err = np.abs(got - want)
        worst = max(worst, float(err.max(initial=0.0)))
        ok &= bool(np.all(err <= RTOL * np.maximum(1.0, np.abs(want))))
    return worst, ok


def timed(fn, sync, warmup: int, repeat: int) -> float:
    """Median wall time of ``fn`` in ms, synchronizing the device after each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_model(root: Path, name: str, dry: bool, repeat: int) -> dict:
    import numpy as np
    import tvm

    from bmc.codegen.cuda import find_fatbins

    path = root / "artifacts" / name
    row = {"model": name}
    data = np.load(root / "artifacts" / f"{name}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("output:")}
    ref = {k[len("output:"):]: data[k] for k in data.files if k.startswith("output:")}
    dev = tvm.cuda(0)
    t0 = time.perf_counter()
    main, params, manifest = direct_vm(path, dev) if not dry else (None, None, None)
    if dry:
        from bmc.runtime.artifact import verify_artifact

        manifest = verify_artifact(path)
        lib = tvm.runtime.load_module(str(path / manifest["programs"]["main"]))
        try:
            tvm.runtime.vm.VirtualMachine(lib, dev)
        except Exception as e:  # noqa: BLE001  (a program with constants allocates them on the device at init)
            if "cudaErrorInsufficientDriver" not in str(e) and "NO_DEVICE" not in str(e):
                raise
            row["vm"] = "needs a device (constants)"
    row["load_s"] = time.perf_counter() - t0
    program = (path / manifest["programs"]["main"]).read_bytes()
    fat = find_fatbins(program)
    row["sass"] = sorted({e["arch"] for f in fat for e in f if e["kind"] == "elf"})
    row["kernels"] = manifest.get("kernels", {}).get("cuda", {}).get("num_kernels", "?")
    if b"__global__" in program or not row["sass"]:
        raise RuntimeError(f"{path}: the program carries CUDA source or no SASS ({row['sass']})")
    if dry:  # bmc's own loader gets as far as the device check (no GPU here)
        try:
            import bmc

            bmc.load(path, device="cuda")
            row["bmc_load"] = "loaded"
        except Exception as e:  # noqa: BLE001
            row["bmc_load"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        row["status"] = "dry-run ok"
        return row

    names = [i["name"] for i in manifest["signature"]["inputs"]]
    args = [tvm.runtime.tensor(inputs[n], dev) for n in names]
    result = main(*args, *params)
    outs = dict(zip((o["name"] for o in manifest["signature"]["outputs"]), (t.numpy() for t in result)))
    row["err_direct"], ok_direct = compare(outs, ref)
    row["device_ms"] = timed(lambda: main(*args, *params), dev.sync, 3, repeat)

    try:
        import bmc

        t0 = time.perf_counter()
        model = bmc.load(path, device="cuda")
        row["bmc_load_s"] = time.perf_counter() - t0
        row["err_bmc"], ok_bmc = compare(model.run(inputs), ref)
        row["e2e_ms"] = timed(lambda: model.run(inputs), dev.sync, 3, repeat)
    except Exception as e:  # noqa: BLE001  (report and go on: the direct path already checked the kernels)
        row["bmc_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ok_bmc = False
    row["status"] = "PASS" if ok_direct and ok_bmc else ("FAIL" if not ok_direct else "PASS(direct) bmc.load failed")
    return row


def check_fixture(root: Path, row: dict, dry: bool, repeat: int, outputs: dict) -> dict:
    """One compiled fixture vs onnxruntime's stored outputs (and, for two ranks, vs the one-rank run)."""
    import numpy as np

    tag, world, dtype = row["artifact"], row["world"], row["dtype"]
    path = root / "fixtures" / tag
    data = np.load(FIXTURES.parent / row.get("folder", "models") / f"{row['fixture']}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("output:")}
    ref = {k[len("output:"):]: data[k] for k in data.files if k.startswith("output:")}
    res = {"model": tag, "kernels": row["kernels"], "cublas": row.get("cublas_matmuls", 0)}
    if dry:
        from bmc.runtime.artifact import verify_artifact

        verify_artifact(path)
        res["status"] = "dry-run ok"
        return res
    if world == 1:
        import bmc
        import tvm

        t0 = time.perf_counter()
        model = bmc.load(path)
        res["load_s"] = time.perf_counter() - t0
        outs = model.run(inputs)
        res["e2e_ms"] = timed(lambda: model.run(inputs), tvm.cuda(0).sync, 3, repeat)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            np.savez(f"{tmp}/in.npz", **inputs)
            cmd = ["mpiexec", "-n", str(world), sys.executable, "-m", "bmc", "run", str(path), "--inputs",
                   f"{tmp}/in.npz", "--output", f"{tmp}/out.npz"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            res["wall_s"] = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}: "
                                   f"{(proc.stderr or proc.stdout)[-1500:]}")
            got = np.load(f"{tmp}/out.npz")
            outs = {k: got[k] for k in got.files}
        one = outputs.get(f"{row['fixture']}-float32")
        if one is not None:
            res["vs_1rank"] = max(float(np.abs(outs[k].astype(np.float64) - one[k]).max()) for k in one)
    outputs[tag] = outs
    unfused = outputs.get(f"{row['fixture']}-{dtype}") if row.get("attention") == "fused" else None
    if unfused is not None:  # the same build with the attention composition (cuBLAS + softmax kernel)
        res["vs_composition"] = max(float(np.abs(np.asarray(outs[k], np.float64) - unfused[k]).max() /
                                          max(np.abs(unfused[k]).max(), 1e-30)) for k in unfused)
    if dtype == "float32" and row["fixture"] not in QUANTIZED_ACTIVATIONS:
        res["err"], ok = compare(outs, ref)
    else:  # relative to the largest reference magnitude
        res["err"] = max(float(np.abs(np.asarray(outs[k], np.float64) - ref[k]).max() / max(np.abs(ref[k]).max(),
                                                                                             1e-30)) for k in ref)
        ok = res["err"] <= (RTOL_QUANTIZED if row["fixture"] in QUANTIZED_ACTIVATIONS else RTOL_REDUCED)
    if "vs_1rank" in res:
        ok &= res["vs_1rank"] <= 1e-5
    res["status"] = "PASS" if ok else "FAIL"
    return res


def check_decoding(root: Path, row: dict, dry: bool, repeat: int) -> dict:
    """A decoding step with donated caches (in-place cache kernels on the GPU): five steps from empty caches, each
    fed the caches the one before returned, against onnxruntime's outputs and final caches (the fixture's npz: the
    step's input ``x<i>`` or token ids ``ids<i>``, its output ``y<i>`` or ``logits<i>``; the caches are the inputs
    named ``*cache*``, returned as ``<name>_out``)."""
    import numpy as np

    path = root / "decoding" / row["artifact"]
    res = {"model": row["artifact"], "kernels": "", "cublas": ""}
    if dry:
        from bmc.runtime.artifact import verify_artifact

        verify_artifact(path)
        res["status"] = "dry-run ok"
        return res
    import bmc
    import tvm

    data = np.load(FIXTURES.parent / "decoding" / f"{row['fixture']}.npz")
    model = bmc.load(path)
    token, out = ("ids", "logits") if "ids0" in data.files else ("x", "y")
    caches = {i: np.zeros(data[f"output:{i}"].shape, np.float32) for i in model.input_names if "cache" in i}
    errs = []
    for i in range(5):
        got = model.run({token: data[f"{token}{i}"], "pos": np.array([i]), **caches})
        caches = {c: got[f"{c}_out"] for c in caches}
        want = data[f"output:{out}{i}"]
        errs.append(float(np.abs(got[out] - want).max()) / max(1.0, float(np.abs(want).max())))
    errs += [float(np.abs(a - data[f"output:{c}"]).max()) for c, a in caches.items()]
    step = {token: data[f"{token}4"], "pos": np.array([4]), **caches}
    res["e2e_ms"] = timed(lambda: model.run(step), tvm.cuda(0).sync, 3, repeat)
    # the same loop in device memory: caches made on the GPU (by torch when it is there: its tensors cross by
    # DLPack), outputs left on the device (`outputs="device"`) and fed back as they are; nothing crosses PCIe
    # but the token and the step's output
    shapes = {c: data[f"output:{c}"].shape for c in caches}
    try:
        import torch

        on_gpu = {c: torch.zeros(s, dtype=torch.float32, device="cuda") for c, s in shapes.items()}
        res["io"] = "torch"
    except Exception:  # noqa: BLE001  (no torch, or no CUDA in it)
        on_gpu = {c: tvm.runtime.empty(s, "float32", tvm.cuda(0)).copyfrom(np.zeros(s, np.float32))
                  for c, s in shapes.items()}
        res["io"] = "tvm"
    memory = {c: t.data_ptr() for c, t in on_gpu.items()}
    for i in range(5):
        got = model.run({token: data[f"{token}{i}"], "pos": np.array([i]), **on_gpu}, outputs="device")
        on_gpu = {c: got[f"{c}_out"] for c in on_gpu}
        want = data[f"output:{out}{i}"]
        errs.append(float(np.abs(got[out].numpy() - want).max()) / max(1.0, float(np.abs(want).max())))
    errs += [float(np.abs(t.numpy() - data[f"output:{c}"]).max()) for c, t in on_gpu.items()]
    in_place = all(t.data_ptr() == memory[c] for c, t in on_gpu.items())
    step = {token: data[f"{token}4"], "pos": np.array([4]), **on_gpu}
    res["device_io_ms"] = timed(lambda: model.run(step, outputs="device"), tvm.cuda(0).sync, 3, repeat)
    # a second load of the same artifact sharing the first's weights on the GPU (one copy): same output
    again = bmc.load(path, share_weights=model)
    shared = again.stats["shared_bytes"] == sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
                                                for p in model.signature["params"])
    errs.append(float(np.abs(again.run(step, outputs="numpy")[out] - model.run(step, outputs="numpy")[out]).max()))
    res["err"] = max(errs)
    res["status"] = ("FAIL (caches copied)" if not in_place else "FAIL (weights not shared)" if not shared else
                     "PASS" if res["err"] <= 1e-5 else "FAIL")
    return res


def attention_kernel(dry: bool) -> dict:
    """``bmc.cuda.attention[_bias]`` called directly on CUDA tensors over the CPU emulator tests' cases
    (``bmc.testing.attention_cases``: ragged tiles, kt, multi-query, broadcast masks, every head dim, both 16-bit
    types) plus causal masks and soft-capped scores, against numpy. PASS: every case within its tolerance."""
    import numpy as np
    import tvm

    from bmc.runtime import cuda
    from bmc.testing import attention_cases as ac

    row = {"model": f"attention kernel ({len(ac.CASES) + 4} cases)"}
    if not cuda.fused_attention_available():
        return {**row, "status": "FAIL: the kernel library has no attention kernels"}
    if dry:
        return {**row, "status": "dry-run ok"}
    cuda.register_kernels([cuda.ATTENTION_KERNEL, cuda.ATTENTION_BIAS_KERNEL, cuda.ATTENTION_SOFTCAP_KERNEL])
    dev = tvm.cuda(0)
    cases = dict(ac.CASES)
    cases["causal-d128"] = ("bf16", (1, 2, 200, 128), (1, 2, 200, 128), (1, 2, 200, 128), "causal", True, 0.088)
    cases["f16-causal-kv-cache"] = ("f16", (2, 4, 70, 64), (2, 4, 300, 64), (2, 4, 300, 64), "causal", True, 0.125)
    # soft-capped (Gemma 2): c * tanh(s / c) of the scaled scores before the bias, with c = 2
    cases["softcap-grouped-decode"] = ac.CASES["grouped-decode"] + (2.0,)
    cases["softcap-causal-f16"] = ("f16", (1, 2, 130, 64), (1, 2, 130, 64), (1, 2, 130, 64), "causal", True, 0.125,
                                   2.0)
    worst, failed = 0.0, []
    for name, (dtype, qs, ks, vs, bs, transpose_k, scale, *softcap) in cases.items():
        q, k, v, bias = ac.make_case(dtype, qs, ks, vs, None if bs == "causal" else bs)
        if bs == "causal":
            bias = ac.causal_bias(dtype, qs[-2], ks[-2])
        softcap = softcap[0] if softcap else 0.0
        if softcap and bias is None:
            bias = np.zeros((), q.dtype)
        args = [tvm.runtime.tensor(a, dev) for a in (q, k, v, bias) if a is not None]
        out = tvm.runtime.empty(q.shape, str(q.dtype), dev)
        if softcap:
            tvm.get_global_func(cuda.ATTENTION_SOFTCAP_KERNEL)(*args, float(scale), float(softcap), int(transpose_k),
                                                                out)
        else:
            kernel = cuda.ATTENTION_BIAS_KERNEL if bias is not None else cuda.ATTENTION_KERNEL
            tvm.get_global_func(kernel)(*args, float(scale), int(transpose_k), out)
        err = ac.rel_error(out.numpy().astype(np.float32), ac.reference(q, k, v, bias, transpose_k, scale, softcap))
        worst = max(worst, err)
        if not err <= ac.TOL[dtype]:
            failed.append(f"{name} {err:.1e}")
    return {**row, "err": worst, "status": "PASS" if not failed else f"FAIL {', '.join(failed)}"[:200]}


def nccl_smoke() -> dict:
    """The NCCL path of bmc.runtime.cuda on one rank: communicator set-up over MPI, all_reduce and all_gather on
    CUDA tensors (bfloat16 and float32) through CuPy's binding."""
    import numpy as np
    import tvm
    from mpi4py import MPI

    from bmc.runtime import cuda
    from bmc.runtime.mpi import MPIContext

    why = cuda.nccl_available()
    if why is not None:
        return {"model": "nccl (1 rank)", "status": f"n/a: {why[:100]}"}
    from cupy.cuda import nccl

    ctx = MPIContext(MPI, {"mesh": {"shape": [1]}, "rank_map": [[0]]}, "nccl-smoke", check=False)
    impl = cuda.Nccl(ctx, 0)
    dev = tvm.cuda(0)
    worst = 0.0
    import ml_dtypes

    for dtype in (np.float32, ml_dtypes.bfloat16):
        x = np.arange(24, dtype=np.float32).reshape(2, 3, 4).astype(dtype)
        for kind, attrs in (("all_reduce", {"axes": [0], "reduce": "sum"}), ("all_gather", {"axes": [0], "dim": 1})):
            xt, ot = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(np.zeros_like(x), dev)
            impl(kind, xt, json.dumps(attrs), ot)
            worst = max(worst, float(np.abs(ot.numpy().astype(np.float32) - x.astype(np.float32)).max()))
    return {"model": "nccl (1 rank)", "err": worst, "status": "PASS" if worst == 0 else "FAIL",
            "nccl": str(nccl.get_version())}


def measure_tuning(folder: Path, dry: bool, out: Path) -> dict:
    """Time the MetaSchedule candidates exported on the build machine (``bmc tune measure``) and bring back what
    ``bmc tune import`` needs there (manifest, search records, times) in ``out/tune``. Dry run: every candidate
    library loads without a compiler. PASS when every kernel's default schedule and some candidate of each ran."""
    import tvm

    from bmc.runtime.measure import best_per_kernel

    manifest = json.loads((folder / "manifest.json").read_text())
    row = {"model": f"tune candidates ({len(manifest['candidates'])})"}
    if dry:
        for c in manifest["candidates"]:
            tvm.runtime.load_module(str(folder / c["file"]))
        return {**row, "status": "dry-run ok"}
    # its own process: a candidate that faults the GPU must not take the CUDA context of this one with it
    done = subprocess.run([sys.executable, "-m", "bmc", "tune", "measure", str(folder)], capture_output=True,
                          text=True, timeout=600)
    print(done.stdout + done.stderr, end="")
    if not (folder / "timings.json").exists():
        return {**row, "status": f"ERROR bmc tune measure exited {done.returncode}"}
    timings = json.loads((folder / "timings.json").read_text())
    kept = out / "tune"
    if kept.exists():
        shutil.rmtree(kept)
    shutil.copytree(folder, kept, ignore=shutil.ignore_patterns("*.so"))
    kernels = best_per_kernel(manifest, timings)
    for k in kernels:
        gain = k["default_s"] / k["best_s"] if k["default_s"] and k["best_s"] else None
        print(f"tune {k['kernel'][:48]:48} default {_us(k['default_s'])} best of {k['measured']:3} "
              f"{_us(k['best_s'])}" + (f"  {gain:.2f}x" if gain else ""))
    ok = all(k["default_s"] and k["best_s"] for k in kernels)
    return {**row, "kernels": len(kernels), "status": "PASS" if ok else "FAIL (a kernel did not run)"}


def _us(secs) -> str:
    return f"{secs * 1e6:9.1f} us" if secs else f"{'-':>12}"


def machine_report(dry: bool, cudart: str) -> None:
    import tvm

    print(f"python {sys.version.split()[0]}  tvm {tvm.__file__}  runtime-only={tvm.base._RUNTIME_ONLY}  "
          f"cudart: {cudart}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        print("nvidia-smi:", smi.stdout.strip() or smi.stderr.strip())
    except (OSError, subprocess.TimeoutExpired) as e:
        print("nvidia-smi: not available", e)
    dev = tvm.cuda(0)
    if not dry:
        if not dev.exist:
            raise SystemExit("tvm.cuda(0) does not exist: driver/runtime mismatch? (CUDA 13 runtime needs a >= 580 "
                             "driver)")
        print(f"device: {dev.device_name}  compute {dev.compute_version}  SMs {dev.multi_processor_count}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent / ".gpu")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    sys.path[:0] = [p for p in (str(root / "site"), str(root / "src")) if p not in sys.path]
    cudart = enable_cuda_runtime(root)
    machine_report(args.dry_run, cudart)
    os.environ.setdefault("BMC_CUDA_KERNELS_LIB", str(root / "lib" / "libbmc_cuda_kernels.so"))
    register_cuda_kernels(args.dry_run)
    meta = json.loads((root / "MANIFEST.json").read_text())
    names = args.models or [m["model"] for m in meta["models"]]
    rows, failed = [], 0
    for name in names:
        try:
            rows.append(check_model(root, name, args.dry_run, args.repeat))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"model": name, "status": f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
        failed += rows[-1]["status"] != ("dry-run ok" if args.dry_run else "PASS")
    outputs: dict = {}
    for row in meta.get("fixtures", []):
        if args.models and row["artifact"] not in args.models:
            continue
        try:
            rows.append(check_fixture(root, row, args.dry_run, args.repeat, outputs))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"model": row["artifact"], "status": f"ERROR {type(e).__name__}: {str(e)[:300]}"})
        failed += rows[-1]["status"] != ("dry-run ok" if args.dry_run else "PASS")
    for row in meta.get("decoding") or [] if not args.models else []:
        try:
            rows.append(check_decoding(root, row, args.dry_run, args.repeat))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"model": row["artifact"], "status": f"ERROR {type(e).__name__}: {str(e)[:300]}"})
        failed += rows[-1]["status"] != ("dry-run ok" if args.dry_run else "PASS")
    if (root / "tune" / "manifest.json").exists() and not args.models:
        try:
            rows.append(measure_tuning(root / "tune", args.dry_run, (args.json or root / "out" / "x").parent))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"model": "tune candidates", "status": f"ERROR {type(e).__name__}: {str(e)[:300]}"})
        failed += rows[-1]["status"] != ("dry-run ok" if args.dry_run else "PASS")
    if not args.models:
        try:
            rows.append(attention_kernel(args.dry_run))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"model": "attention kernel", "status": f"ERROR {type(e).__name__}: {str(e)[:300]}"})
        failed += rows[-1]["status"] != ("dry-run ok" if args.dry_run else "PASS")
    if not args.dry_run:
        try:
            rows.append(nccl_smoke())
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"model": "nccl (1 rank)", "status": f"ERROR {type(e).__name__}: {str(e)[:300]}"})
    print_table(rows)
    report = {"gpu_check": rows, "device": _device_name(args.dry_run)}
    print(json.dumps(report, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 1 if failed else 0


def _device_name(dry: bool) -> str:
    if dry:
        return "none (dry run)"
    import tvm

    return str(tvm.cuda(0).device_name)


def print_table(rows: list[dict]) -> None:
    cols = [("model", "{}"), ("kernels", "{}"), ("cublas", "{}"), ("sass", "{}"), ("load_s", "{:.3f}"),
            ("device_ms", "{:.3f}"), ("e2e_ms", "{:.3f}"), ("device_io_ms", "{:.3f}"), ("err_direct", "{:.2e}"),
            ("err_bmc", "{:.2e}"), ("err", "{:.2e}"), ("vs_1rank", "{:.2e}"), ("vs_composition", "{:.2e}"),
            ("status", "{}")]
    cells = [[c for c, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[c]) if c in r and r[c] is not None else "-" for c, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    for r in rows:
        if "bmc_error" in r:
            print(f"{r['model']}: bmc.load path failed: {r['bmc_error']}")


if __name__ == "__main__":
    sys.exit(main())
