"""CUDA codegen without a GPU: kernels compiled by nvcc at build time, embedded in the library, reloadable with no
compiler. Real TVM, real nvcc; the reload runs in a subprocess against a stub driver (``libcuda.so.1``)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bmc.codegen import cuda
from bmc.errors import CompileError
from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder

pytestmark = pytest.mark.cuda

ARCHS = ("sm_90", "sm_80")


def _toolkit_or_skip() -> cuda.CudaToolkit:
    try:
        return cuda.find_toolkit()
    except CompileError as e:
        pytest.skip(f"no CUDA toolkit: {e.what}")


def many_ops_graph():
    """conv → relu → max_pool → avg_pool → reshape → matmul → gelu → layer_norm → softmax, plus a reduce_sum."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("many_ops")
    x = b.input("x", TensorType("float32", (1, 4, 16, 16)))
    w = b.param("conv_w", rng.standard_normal((8, 4, 3, 3)).astype(np.float32))
    y = b.emit1("conv", [x, w], pads=(1, 1, 1, 1))
    y = b.emit1("relu", [y])
    y = b.emit1("max_pool", [y], kernel=(2, 2), strides=(2, 2))
    y = b.emit1("avg_pool", [y], kernel=(2, 2), strides=(2, 2))
    y = b.emit1("reshape", [y], shape=(8, 16))
    y = b.emit1("matmul", [y, b.param("fc_w", rng.standard_normal((16, 32)).astype(np.float32))])
    y = b.emit1("gelu", [y])
    y = b.emit1("layer_norm", [y, b.param("ln_g", np.ones(32, np.float32)), b.param("ln_b", np.zeros(32, np.float32))])
    probs = b.emit1("softmax", [y], "probs")
    total = b.emit1("reduce_sum", [y], "total", axes=(1,), keepdims=False)
    return b.finish([probs, total])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    _toolkit_or_skip()
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    result = build(many_ops_graph(), TargetSpec.parse("cuda", ARCHS))
    path = tmp_path_factory.mktemp("cuda") / "many_ops.so"
    result.export(path)
    return result, path


def _elf_arch(elf: bytes) -> int:
    """SM number from a cubin's ELF header flags (byte 1 of e_flags, e.g. 0x5a = 90)."""
    return (struct.unpack_from("<I", elf, 0x30)[0] >> 8) & 0xFF


def _readelf_functions(elf: bytes, tmp: Path) -> set[str]:
    """Global FUNC symbols according to binutils' readelf (an oracle independent of bmc's ELF reader)."""
    p = tmp / "k.cubin"
    p.write_bytes(elf)
    out = subprocess.run(["readelf", "-sW", str(p)], capture_output=True, text=True, check=True).stdout
    return {cols[-1] for cols in (ln.split() for ln in out.splitlines())
            if len(cols) >= 8 and cols[3] == "FUNC" and cols[4] == "GLOBAL"}


def test_library_carries_compiled_kernels_for_every_arch(built, tmp_path):
    result, path = built
    data = path.read_bytes()
    source = cuda.cuda_modules(result.executable)[0].inspect_source()
    kernels = set(cuda.kernel_names(source))
    assert len(kernels) >= 5, sorted(kernels)  # conv, pools, matmul+gelu, layer_norm, softmax, reduce each fuse

    assert b'extern "C" __global__' not in data and b"__launch_bounds__" not in data  # no CUDA source shipped
    fatbins = cuda.find_fatbins(data)
    assert len(fatbins) == 1
    elfs = {e["arch"]: e["data"] for e in fatbins[0] if e["kind"] == "elf"}
    ptx = [e["arch"] for e in fatbins[0] if e["kind"] == "ptx"]
    assert sorted(elfs) == ["sm_80", "sm_90"] and ptx == ["compute_90"]
    for arch, elf in elfs.items():
        assert elf[:4] == b"\x7fELF" and _elf_arch(elf) == int(arch[3:])
        found = _readelf_functions(elf, tmp_path) if shutil.which("readelf") else set(cuda.elf_functions(elf))
        assert kernels <= found, f"{arch} lacks {sorted(kernels - found)}"

    info = result.kernels["cuda"]
    assert info["sass"] == ["sm_80", "sm_90"] and info["ptx"] == ["compute_90"]
    assert {k["name"] for k in info["kernels"]} == kernels
    assert all(set(k["sass_bytes"]) == {"sm_80", "sm_90"} and min(k["sass_bytes"].values()) > 0
               for k in info["kernels"])
    assert info["image_bytes"] == len(result.device_code.images[0].fatbin) and info["nvcc_s"] > 0
    assert json.loads(json.dumps(info)) == info  # manifest-ready


_LOAD = textwrap.dedent("""
    import json, sys, tvm, tvm_ffi
    from tvm import relax
    # the cuBLAS kernel the program calls: resolvable without cuBLAS (bound only when it runs)
    tvm_ffi.register_global_func("bmc.cuda.matmul", tvm_ffi.load_module(sys.argv[2])["cuda_matmul"])
    # an arch in scope, so that a library holding CUDA source would get as far as calling nvcc (see the control)
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}):
        lib = tvm.runtime.load_module(sys.argv[1])
    kinds = []
    stack = [lib]
    while stack:
        m = stack.pop(); kinds.append(m.kind); stack.extend(m.imports)
    vm = relax.VirtualMachine(lib, tvm.cuda(0))
    print(json.dumps({"kinds": kinds, "vm": type(vm).__name__}))
""")


@pytest.fixture(scope="module")
def cuda_kernels_lib(tmp_path_factory) -> Path:
    from bmc.runtime.kernels import build_native

    return build_native(tmp_path_factory.mktemp("cuda-kernels"), target="bmc_cuda_kernels")


def _load_without_compiler(lib: Path, tmp: Path, kernels_lib: Path):
    """Load ``lib`` in a fresh Python with a stub driver, a failing ``nvcc`` first on PATH and no CUDA_PATH."""
    stub = cuda.write_stub_libcuda(tmp / "stub")
    fake = tmp / "fakebin"
    fake.mkdir(exist_ok=True)
    marker = tmp / "nvcc-was-called"
    (fake / "nvcc").write_text(f"#!/bin/sh\ntouch '{marker}'\necho 'fake nvcc: no compiler here' >&2\nexit 1\n")
    (fake / "nvcc").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH", "CUDA_HOME")}
    env.update(PATH=f"{fake}{os.pathsep}{env.get('PATH', '')}", LD_LIBRARY_PATH=str(stub.parent),
               TVM_CUDA_COMPILE_MODE="nvcc")
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(lib), str(kernels_lib)], capture_output=True, text=True, env=env,
                          timeout=120)
    return proc, marker.exists()


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("nm")), reason="needs gcc and nm for the stub driver")
def test_reload_needs_no_compiler(built, tmp_path, cuda_kernels_lib):
    result, path = built
    proc, nvcc_called = _load_without_compiler(path, tmp_path, cuda_kernels_lib)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not nvcc_called
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cuda" in report["kinds"] and report["vm"] == "VirtualMachine"

    # control: TVM's own export (CUDA source) compiles at load time, so the same harness sees nvcc being called
    source_lib = tmp_path / "source.so"
    result.executable.export_library(str(source_lib))
    proc, nvcc_called = _load_without_compiler(source_lib, tmp_path / "control", cuda_kernels_lib)
    assert nvcc_called and proc.returncode != 0


def test_outputs_the_program_allocates_are_recorded(built):
    """Both outputs of the CUDA program are its own fresh tensors (``kernels.cuda.owned_outputs``): a call that leaves
    its outputs on the GPU (``run(outputs="device")``) returns them without a device copy."""
    assert built[0].kernels["cuda"]["owned_outputs"] == [True, True]


def test_missing_toolkit_is_a_clear_compile_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CompileError) as e:
        cuda.find_toolkit(env={"PATH": str(empty)})
    assert "nvcc is not on PATH" in str(e.value) and "CUDA_PATH" in str(e.value) and e.value.fix
    with pytest.raises(CompileError, match=f"CUDA_PATH={empty} has no executable bin/nvcc"):
        cuda.find_toolkit(env={"PATH": str(empty), "CUDA_PATH": str(empty)})

    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    monkeypatch.setenv("PATH", str(empty))
    for var in ("CUDA_PATH", "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(CompileError, match="no CUDA toolkit"):
        build(many_ops_graph(), TargetSpec.parse("cuda"))


def test_toolkit_resolves_wrapper_scripts():
    tk = _toolkit_or_skip()
    assert tk.nvcc.name == "nvcc" and (tk.root / "bin" / "nvcc").samefile(tk.nvcc)
    assert (tk.root / "include" / "cuda_runtime.h").exists() or any(tk.root.glob("targets/*/include/cuda_runtime.h"))


def test_nvcc_failure_names_the_error(tmp_path):
    tk = _toolkit_or_skip()
    flags, sass, ptx = cuda.gencode_flags(("sm_90",))
    b = cuda.CudaBuild(tk, ("sm_90",), [*cuda.NVCC_FLAGS, *flags], sass, ptx)
    with pytest.raises(CompileError, match=r"(?s)nvcc failed .*undefined_thing"):
        cuda.compile_source('extern "C" __global__ void k(float* a) { a[0] = undefined_thing; }', b, 1)


def test_gencode_and_codegen_arch():
    flags, sass, ptx = cuda.gencode_flags(("sm_90a", "sm_80"))
    assert sass == ["sm_80", "sm_90a"] and ptx == ["compute_90"]
    assert flags == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
                     "-gencode", "arch=compute_90,code=compute_90"]
    assert cuda.codegen_arch(("sm_90", "sm_80")) == "sm_80"


def _blob(modules: list[tuple[bytes, bytes | None]]) -> bytes:
    """A library blob: import-tree CSR (no edges), then each module's kind and serialized bytes."""
    s = cuda._str  # noqa: SLF001  (the same length-prefixed string writer the blob uses)
    n = len(modules)
    body = struct.pack("<Q", n + 1) + b"".join(struct.pack("<Q", 0) for _ in range(n + 1)) + struct.pack("<Q", 0)
    for kind, payload in modules:
        body += s(kind) + (b"" if payload is None else s(payload))
    return struct.pack("<Q", len(body)) + body


def test_blob_rewrite_swaps_source_and_keeps_fmap():
    src, fmap = 'extern "C" __global__ void k() {}', b"\x01\x00FMAP-BYTES"
    s = cuda._str  # noqa: SLF001
    blob = _blob([(b"_lib", None), (b"cuda", s(b"cuda") + fmap + s(src.encode()))])
    new = cuda.replace_cuda_sources(blob, {src: b"IMAGE"})
    assert new.endswith(s(b"cuda") + s(s(b"fatbin") + fmap + s(b"IMAGE")))
    assert struct.unpack_from("<Q", new)[0] == len(new) - 8
    with pytest.raises(CompileError, match="does not match any compiled source"):
        cuda.replace_cuda_sources(blob, {"other source": b"IMAGE"})
    compiled = _blob([(b"cuda", s(b"cubin") + fmap + s(b"\x7fELF"))])
    with pytest.raises(CompileError, match="already holds 'cubin'"):
        cuda.replace_cuda_sources(compiled, {src: b"IMAGE"})


def test_matmuls_go_to_cublas_unless_asked_not_to(built, monkeypatch):
    """The default CUDA pipeline turns the matmul into a call of bmc.cuda.matmul (listed in the manifest's
    requires); BMC_CUDA_GEMM=tvm keeps it as a dlight-scheduled TVM kernel."""
    _toolkit_or_skip()
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    info = built[0].kernels["cuda"]
    assert info["requires"] == ["bmc.cuda.matmul"] and info["matmul"]["blas"] == 1 and info["matmul"]["tvm"] == 0
    assert not any("matmul" in k["name"] for k in info["kernels"])
    monkeypatch.setenv("BMC_CUDA_GEMM", "tvm")
    own = build(many_ops_graph(), TargetSpec.parse("cuda", ("sm_90",))).kernels["cuda"]
    assert "requires" not in own and any("matmul" in k["name"] for k in own["kernels"])


def test_cuda_kernel_library_refuses_what_it_cannot_run(cuda_kernels_lib, tmp_path):
    """Without a GPU: the library loads anywhere (cuBLAS is dlopened, not linked); calling before cublas_bind, or
    binding a library without cuBLAS' symbols, is a clear error."""
    import tvm
    import tvm_ffi

    module = tvm_ffi.load_module(str(cuda_kernels_lib))
    a = tvm.runtime.tensor(np.ones((4, 4), np.float32))
    if module["cublas_bound"]() == "":
        with pytest.raises(Exception, match="no cuBLAS bound"):
            module["cuda_matmul"](a, a, 0, 0, a)
    with pytest.raises(Exception, match="cannot dlopen"):
        module["cublas_bind"](str(tmp_path / "missing.so"), str(tmp_path / "missing.so"))
    libm = next((p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6") if Path(p).exists()), None)
    if libm:
        with pytest.raises(Exception, match="has no symbol cublasCreate_v2"):
            module["cublas_bind"](libm, libm)


def test_cuda_tuning_without_a_gpu_is_a_usage_error(tmp_path):
    """MetaSchedule measures on the device: --tune with --target cuda on a machine without a GPU says so (before
    compiling) instead of ignoring the flag."""
    _toolkit_or_skip()
    from bmc.cli import main
    from bmc.runtime.cuda import device_count, enable

    try:
        enable()
        if device_count() > 0:
            pytest.skip("this machine has a GPU")
    except Exception:  # noqa: BLE001  (no driver: no GPU)
        pass
    onnx_path = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "gpt2_dynamo.onnx"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["compile", str(onnx_path), "--target", "cuda", "--tune", "4", "--input-shape", "input_ids=1,8",
                   "-o", str(tmp_path / "m.bmc")])
    assert rc == 2 and "--tune" in err.getvalue() and "has none" in err.getvalue(), err.getvalue()
    assert not (tmp_path / "m.bmc").exists()


def test_a_program_of_library_calls_only_builds(tmp_path):
    """A lone float32 matmul becomes a cuBLAS call and leaves no CUDA kernel: the build and export still work."""
    _toolkit_or_skip()
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    b = GraphBuilder("mm")
    x = b.input("x", TensorType("float32", (64, 64)))
    y = b.emit1("matmul", [x, b.param("w", np.ones((64, 64), np.float32))], "y")
    result = build(b.finish([y]), TargetSpec.parse("cuda", ("sm_90",)))
    assert result.kernels["cuda"]["num_kernels"] == 0 and result.kernels["cuda"]["requires"] == ["bmc.cuda.matmul"]
    result.export(tmp_path / "mm.so")
    assert (tmp_path / "mm.so").stat().st_size > 0


def test_bfloat16_attention_gets_bmcs_kernels():
    """A bfloat16 attention block (QKV projection, heads, scaled+masked softmax, context) compiles for sm_90 with
    bmc's CUDA passes and rules in place: one kernel per head tensor (split → slices, bias add pushed through), the
    key's transpose folded into cuBLAS (trans_b), the softmax one warp-per-row kernel taking in scale and mask,
    unrolled, with exp2 and no per-element division. (Speed is measured on a lent GPU: benchmarks/gpu.py.)"""
    _toolkit_or_skip()
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    bs, s, nh, hd = 2, 128, 2, 64
    d, bf = nh * hd, "bfloat16"
    b = GraphBuilder("attn")
    x = b.input("x", TensorType(bf, (bs, s, d)))
    mask = b.input("mask", TensorType(bf, (s, s)))
    qkv = b.emit1("add", [b.emit1("matmul", [x, b.param("w", np.zeros((d, 3 * d), np.float32).astype(_bf16()))]),
                          b.param("bias", np.zeros(3 * d, np.float32).astype(_bf16()))])
    q, k, v = (b.emit1("transpose", [b.emit1("reshape", [t], shape=(bs, s, nh, hd))], perm=perm)
               for t, perm in zip(b.emit("split", [qkv], axis=-1, sizes=(d, d, d)),
                                  ((0, 2, 1, 3), (0, 2, 3, 1), (0, 2, 1, 3))))
    scores = b.emit1("add", [b.emit1("mul", [b.emit1("matmul", [q, k]), b.constant(0.125, dtype=bf)]), mask])
    y = b.emit1("matmul", [b.emit1("softmax", [scores], axis=-1), v], "y")
    built = build(b.finish([y]), TargetSpec.parse("cuda", ("sm_90",)))
    info = built.kernels["cuda"]
    assert info["split_slices"] == 1 and info["narrow_normalizations"] == 1
    assert info["matmul"]["blas"] == 3 and info["matmul"]["transposes_folded"] == 1
    names = [k["name"] for k in info["kernels"]]
    assert sum("strided_slice" in n for n in names) == 3 and not any("split" in n for n in names), names
    source = "".join(m.inspect_source() for m in cuda.cuda_modules(built.executable))
    start = re.search(r"softmax_float32_kernel\([^)]*\) \{", source).end()
    body = source[start:source.index("\n}\n", start)]
    assert "__shfl_down_sync" in body and "__shared__" in body and "exp2f" in body
    assert "for (" not in body and " / " not in body.replace("0x1p+0f/*1.000000e+00*/ / ", "")


@pytest.mark.parametrize("op", ["reduce_max", "reduce_min"])
def test_max_and_min_reductions_get_a_warp_per_row(op):
    """dlight's Reduction rule takes sums only; a max/min (ONNX Attention's masked-row check) got one serial thread
    per output from the fallback. bmc's ``row_extremes`` gives each output a warp and a shuffle reduction, over the
    trailing axes and over everything."""
    _toolkit_or_skip()
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    for shape, axes in (((8, 64, 512), (-1,)), ((8, 64, 64), (1, 2)), ((64, 512), (0, 1))):
        b = GraphBuilder("r")
        x = b.input("x", TensorType("bfloat16", shape))
        built = build(b.finish([b.emit1(op, [x], axes=axes, keepdims=False)]), TargetSpec.parse("cuda", ("sm_90",)))
        source = "".join(m.inspect_source() for m in cuda.cuda_modules(built.executable))
        start = re.search(r"_(max|min)_kernel\([^)]*\) \{", source).end()
        body = source[start:source.index("\n}\n", start)]
        assert "__shfl_down_sync" in body and "threadIdx.x" in body, (shape, axes)


def test_a_mean_over_every_axis_compiles():
    """dlight's Reduction rule crashes in rfactor on it (TVM 0.27): the next rule takes the PrimFunc instead."""
    _toolkit_or_skip()
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    b = GraphBuilder("m")
    x = b.input("x", TensorType("float32", (64, 512)))
    built = build(b.finish([b.emit1("reduce_mean", [x], axes=(0, 1), keepdims=False)]),
                  TargetSpec.parse("cuda", ("sm_90",)))
    assert built.kernels["cuda"]["num_kernels"] >= 1


def test_float8_codes_and_bitcasts_compile(tmp_path):
    """A float8 weight decoded in the kernel that scales it, a float8 encode, a bitcast and a ``matmul_float8`` compile
    with nvcc for every arch (the bit arithmetic is the CPU's, checked there against ml_dtypes)."""
    _toolkit_or_skip()
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    b = GraphBuilder("fp8")
    x = b.input("x", TensorType("float32", (16, 64)))
    w = b.emit1("decode_float", [b.param("w", np.zeros((64, 64), np.uint8))], format="float8e4m3fn")
    y = b.emit1("matmul", [x, b.emit1("mul", [w, b.param("s", np.ones(64, np.float32))])])
    q = b.emit1("encode_float", [y], "q", format="float8e5m2", saturate=False)
    bits = b.emit1("bitcast", [y], "bits", dtype="int32")
    wt, ws = b.param("wt", np.zeros((32, 64), np.uint8)), b.param("ws", np.ones(32, np.float32))
    z = b.emit1("matmul_float8", [x, wt, ws], "z", format="float8e4m3fn")
    built = build(b.finish([q, bits, z]), TargetSpec.parse("cuda", ARCHS))
    names = " ".join(k["name"] for k in built.kernels["cuda"]["kernels"])
    assert "decode_float" in names and "encode_float" in names and "bitcast" in names, names
    built.export(tmp_path / "fp8.so")

def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def test_tuning_candidates_for_a_gpu_elsewhere(tmp_path, capsys):
    """``--tune N --tune-export``: MetaSchedule's CUDA search runs here (the target carries the block limits its
    rules need) and writes the sampled schedules and each kernel's default as libraries with compiled kernels (no
    CUDA source left to compile at load); measuring them needs the GPU, which this machine lacks: a clear error."""
    _toolkit_or_skip()
    from bmc.cli import main
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    b = GraphBuilder("sm")
    x = b.input("x", TensorType("float32", (64, 256)))
    g = b.finish([b.emit1("softmax", [b.emit1("mul", [x, x])], "y", axis=-1)])
    built = build(g, TargetSpec.parse("cuda", ("sm_90",)), tune_trials=4, tune_db=tmp_path / "db",
                  tune_export=tmp_path / "cands")
    info = built.kernels["cuda"]["tuning"]["export"]
    manifest = json.loads((tmp_path / "cands" / "manifest.json").read_text())
    assert manifest["kind"] == "cuda" and info["candidates"] == len(manifest["candidates"]) > info["tasks"] >= 1
    for c in manifest["candidates"]:
        lib = (tmp_path / "cands" / c["file"]).read_bytes()
        assert b"__global__" not in lib and lib.count(b"\x7fELF") >= 2, c["file"]  # host ELF + the cubin
    assert main(["tune", "measure", str(tmp_path / "cands")]) != 0
    err = capsys.readouterr().err  # no driver here; a driver without a GPU says "no GPU"
    assert ("libcuda.so.1" in err or "no GPU" in err) and "Traceback" not in err, err


def test_gpu_check_folder_is_carried_packed_and_unpacks_to_the_tree(tmp_path):
    """``scripts/prepare_gpu_check.py`` carries its folder packed (the manifest and the wheels as they are, the rest
    in one xz tarball: half the bytes under the device tool's 64 MiB); unpacked as the check does, it is the tree
    again, file for file, with a library's mode kept."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "prepare_gpu_check.py"
    spec = importlib.util.spec_from_file_location("prepare_gpu_check", script)
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    tree = tmp_path / "tree"
    files = {"MANIFEST.json": b"{}", "wheels/x-1-py3-none-any.whl": b"PK" + bytes(100),
             "site/tvm/lib/libtvm_runtime.so": bytes(range(256)) * 400, "fixtures/a/manifest.json": b"{\"a\": 1}"}
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    (tree / "site/tvm/lib/libtvm_runtime.so").chmod(0o755)
    size = prep.pack(tree, tmp_path / "carried")
    assert sorted(p.name for p in (tmp_path / "carried").iterdir()) == ["MANIFEST.json", prep.BUNDLE, "wheels"]
    assert size < sum(map(len, files.values())) / 4  # the library's repeated bytes compress
    back = prep.unpack(tmp_path / "carried", tmp_path / "unpacked")
    walked = [Path(d) / f for d, _, names in os.walk(back, followlinks=True) for f in names]  # wheels: a link
    assert {str(p.relative_to(back)): p.read_bytes() for p in walked} == files
    assert (back / "site/tvm/lib/libtvm_runtime.so").stat().st_mode & 0o100
