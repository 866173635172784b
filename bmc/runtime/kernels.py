"""CPU library kernels that compiled programs call by name, and the thread settings they run with.

An llvm artifact may call ``bmc.cpu.matmul(a, b, trans_a, trans_b, out)``, ``bmc.cpu.conv2d(x, w, strides...,
pads..., dilations..., groups, out)`` and ``bmc.cpu.conv3d`` (the codegen offloads float32/float64 matmuls and large
1-D, 2-D and 3-D convolutions to bmc's GEMM or BLAS, see ``bmc/codegen/cpu.py``; ``bmc.cpu.conv2d_fused[_act]``
also applies a bias, batch norm, residual add and ReLU, Clip or SiLU), and the quantized matmuls ``bmc.cpu.matmul_nbits[_zp]`` (4-bit weights) and
``bmc.cpu.matmul_integer`` (8-bit integer products), and ``bmc.cpu.attention[_bias]`` (fused attention); the
manifest lists the names under ``kernels.cpu.requires``. The TVM VM resolves packed-function names when it is
constructed, so the runtime calls

    register_cpu_kernels()            # idempotent, cheap after the first call

before ``tvm.runtime.vm.VirtualMachine(...)``. The implementation is, in order of preference:

1. ``native``: ``libbmc_cpu_kernels.so`` (``cpp/cpu_kernels.cc``) calling ``cblas_sgemm``/``cblas_dgemm`` of the
   OpenBLAS that numpy's wheel ships (the library numpy itself uses, so one thread pool), when the library is found
   (``$BMC_NATIVE_LIB``, the build cache ``$BMC_CACHE_DIR/native/<key>/`` or ``<repo>/build/native/``);
2. ``numpy``: the same contract in Python with ``np.matmul(..., out=...)`` on zero-copy DLPack views (a few µs more
   per call, the same BLAS underneath). Used when the native library is not built.

``build_native()`` builds the native library into the cache with cmake (+ ninja) from the venv.
``set_num_threads(n)`` sets both BLAS's and TVM's thread pools; ``default_threads()`` reads ``BMC_NUM_THREADS``,
``TVM_NUM_THREADS``, ``OMP_NUM_THREADS`` (first set wins), else the CPUs this process may use.

This module imports numpy and tvm-ffi only (it is on the runtime side: no codegen imports).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from bmc.ir.types import np_dtype

MATMUL_KERNEL = "bmc.cpu.matmul"
#: ``bmc.cpu.conv2d(x, w, stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dil_h, dil_w, groups, out)``
CONV2D_KERNEL = "bmc.cpu.conv2d"
#: ``bmc.cpu.conv3d(x, w, stride_d, stride_h, stride_w, pad_front, pad_top, pad_left, pad_back, pad_bottom,
#: pad_right, dil_d, dil_h, dil_w, groups, out)``: NCDHW x OIDHW, float32 (16-bit x and w widened; float32 out)
CONV3D_KERNEL = "bmc.cpu.conv3d"
#: ``bmc.cpu.conv2d_fused(x, w, scale, shift, residual, relu, stride_h, ..., groups, out)``: float32 ``conv2d`` whose
#: result is stored as ``relu?(conv * scale[c] + shift[c] + residual)``; an empty (``[0]``) scale, shift or
#: residual is left out (a conv's bias or batch norm, a residual add and a ReLU applied as the GEMM stores)
CONV2D_FUSED_KERNEL = "bmc.cpu.conv2d_fused"
#: ``bmc.cpu.conv2d_fused_act(x, w, scale, shift, residual, act, lo, hi, stride_h, ..., groups, out)``: the same
#: with another activation than a ReLU: ``act`` is one of :data:`CONV_ACTIVATIONS` (a clamp to ``[lo, hi]``: ReLU6,
#: any Clip; SiLU ``v * sigmoid(v)``; HardSwish ``v * min(max(v / 6 + 1/2, 0), 1)``)
CONV2D_FUSED_ACT_KERNEL = "bmc.cpu.conv2d_fused_act"
#: the activation codes of ``bmc.cpu.conv2d_fused_act``
CONV_ACTIVATIONS = {"none": 0, "clamp": 1, "silu": 2, "hardswish": 3}
#: ``bmc.cpu.matmul_nbits(a, codes, scales, out)`` and ``..._zp(a, codes, scales, zero_points, out)``: float32
#: ``a @ W.T`` with W given as 4-bit codes ``[N, blocks, block/2]`` (the ``matmul_nbits`` op)
MATMUL_NBITS_KERNEL = "bmc.cpu.matmul_nbits"
MATMUL_NBITS_ZP_KERNEL = "bmc.cpu.matmul_nbits_zp"
#: ``bmc.cpu.matmul_integer(a, bt, a_zero_point, b_zero_point, out)``: the exact int32 ``(a - za) @ (bt - zb).T``
#: of 8-bit operands (the ``matmul_integer`` op)
MATMUL_INTEGER_KERNEL = "bmc.cpu.matmul_integer"
#: ``bmc.cpu.attention(q, k, v, scale, transpose_k, out)`` and ``..._bias(q, k, v, bias, scale, transpose_k, out)``:
#: float32 ``softmax(scale * q @ kt + bias) @ v`` without the score matrix (the ``attention`` op; ``k`` is kt
#: ``[..., D, N]``, or ``[..., N, D]`` with ``transpose_k``)
ATTENTION_KERNEL = "bmc.cpu.attention"
ATTENTION_BIAS_KERNEL = "bmc.cpu.attention_bias"
#: ``bmc.cpu.attention[_bias]_lse(..., out, lse)``: the same, and each row's float32 log-sum-exp of the scores
#: ``[..., M]`` (the ``attention`` op with ``lse``: attention to a block of the keys, for context parallelism)
ATTENTION_LSE_KERNEL = "bmc.cpu.attention_lse"
ATTENTION_BIAS_LSE_KERNEL = "bmc.cpu.attention_bias_lse"
#: ``bmc.cpu.attention_softcap(q, k, v, bias, scale, softcap, transpose_k, out)`` and ``..._softcap_lse(..., out,
#: lse)``: the same with the scaled scores soft-capped before the bias, ``softcap * tanh(s / softcap)`` (the bias a
#: scalar 0 for none)
ATTENTION_SOFTCAP_KERNEL = "bmc.cpu.attention_softcap"
ATTENTION_SOFTCAP_LSE_KERNEL = "bmc.cpu.attention_softcap_lse"
#: ``bmc.cpu.matmul_float8(a, codes, table, scale, mantissa_bits, bias, out)``: float32 ``a @ (table[codes] *
#: scale).T`` of float8 codes ``[N, K]`` whose 256 values are ``table`` (the format's mantissa bits and bias let the
#: native kernel decode most codes arithmetically) and a scale per row of the codes, or one (the ``matmul_float8`` op)
MATMUL_FLOAT8_KERNEL = "bmc.cpu.matmul_float8"
#: ``bmc.cpu.gather_matmul(x, w, idx, transpose_w, out)``: ``out[s] = x[s] @ w[idx[s]]`` (``w[idx[s]].T``; float32, or
#: float16/bfloat16 accumulated in float32)
#: of x ``[S, K]``, w ``[E, K, N]`` (``[E, N, K]``), a row with an index outside ``[0, E)`` zero (the
#: ``gather_matmul`` op: a mixture of experts' expert layers, one GEMM per expert with its rows)
GATHER_MATMUL_KERNEL = "bmc.cpu.gather_matmul"
#: ``bmc.cpu.matmul_packed(a, wp, n, out)``: ``a [..., M, K] @ w`` with the weight ``w [K, N]`` packed once, when
#: the model is loaded, by ``bmc.cpu.pack_weight(w, trans, wp)`` into panels ``[ceil(N / 32), K, 32]`` of its dtype
#: (``trans``: w is stored ``[N, K]``): float32, or float16/bfloat16 with a float32 or 16-bit result; see
#: :func:`pack_params`
MATMUL_PACKED_KERNEL = "bmc.cpu.matmul_packed"
PACK_WEIGHT_KERNEL = "bmc.cpu.pack_weight"
#: columns per panel of a packed weight
PACK_PANEL = 32
#: rows of a up to which ``bmc.cpu.matmul`` reads a 16-bit weight where it lies (its few-row kernels); a 16-bit
#: weight is packed at load only for products with more rows
SKINNY_ROWS = 8
#: ``bmc.cpu.matmul_integer_packed(a, bp, a_zero_point, b_zero_point, n, out)``: ``bmc.cpu.matmul_integer`` with
#: its 8-bit weight ``bt [N, K]`` packed once, when the model is loaded, by ``bmc.cpu.pack_int8_weight(bt, bp)``
#: (:func:`packed_int8_shape`; a uint8 weight is flipped to int8, its zero point says which it was)
MATMUL_INTEGER_PACKED_KERNEL = "bmc.cpu.matmul_integer_packed"
PACK_INT8_WEIGHT_KERNEL = "bmc.cpu.pack_int8_weight"
#: ``minmax(x, out)``: ``out [2] = [min(x), max(x)]`` of a float32 tensor in one pass (NaN in x: both NaN)
MINMAX_KERNEL = "bmc.cpu.minmax"
#: rows of ``bt`` per panel of a packed 8-bit weight
INT8_PANEL = 16
#: default TVM_THREAD_POOL_SPIN_COUNT (see set_num_threads): how many times an idle TVM worker yields before it
#: sleeps (waking a sleeping one costs ~45 us on the test VM; bmc's native kernels run on TVM's pool too)
TVM_SPIN_COUNT = int(os.environ.get("BMC_TVM_SPIN_COUNT", "10000"))
#: every kernel name an llvm artifact may require, with what ``register_cpu_kernels`` installs for it
CPU_KERNELS = (MATMUL_KERNEL, CONV2D_KERNEL, CONV3D_KERNEL, CONV2D_FUSED_KERNEL, CONV2D_FUSED_ACT_KERNEL,
               MATMUL_NBITS_KERNEL, MATMUL_NBITS_ZP_KERNEL, MATMUL_INTEGER_KERNEL, ATTENTION_KERNEL, ATTENTION_BIAS_KERNEL,
               ATTENTION_LSE_KERNEL, ATTENTION_BIAS_LSE_KERNEL, ATTENTION_SOFTCAP_KERNEL, ATTENTION_SOFTCAP_LSE_KERNEL,
               MATMUL_FLOAT8_KERNEL, GATHER_MATMUL_KERNEL, MATMUL_PACKED_KERNEL, PACK_WEIGHT_KERNEL,
               MATMUL_INTEGER_PACKED_KERNEL, PACK_INT8_WEIGHT_KERNEL, MINMAX_KERNEL)

ROOT = Path(__file__).resolve().parents[2]


def packaged_library(name: str) -> Path | None:
    """A native library installed by the package build (scikit-build-core) as ``bmc/lib/<name>``: next to these
    sources for a wheel install, or in site-packages for an editable install (found via the distribution's files)."""
    here = Path(__file__).resolve().parents[1] / "lib" / name
    if here.exists():
        return here
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        path = Path(distribution("bmc").locate_file(f"bmc/lib/{name}"))
    except (PackageNotFoundError, OSError):
        return None
    return path if path.exists() else None

_LOCK = threading.Lock()
_STATE: dict = {}  # "impl" -> "native" | "numpy", "native_lib", "blas", "threads"


# ------------------------------------------------------------------------------------------ host CPU check

#: SIMD features (LLVM spelling) whose absence makes generated code fault; the compiler records the ones its
#: target uses in the manifest (``kernels.cpu.features``), :func:`check_host_cpu` compares them with this host
SIMD_FEATURES = ("sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512bw", "avx512dq",
                 "avx512vl", "avx512vnni", "avx512bf16", "avx512fp16", "avx512vbmi", "amx-tile", "amx-bf16",
                 "amx-int8", "neon", "sve", "sve2")
_CPUINFO_NAMES = {"sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
                  "avx512fp16": "avx512_fp16", "amx-tile": "amx_tile", "amx-bf16": "amx_bf16",
                  "amx-int8": "amx_int8", "neon": "asimd"}


def host_cpu_features() -> set[str] | None:
    """This host's SIMD features in LLVM spelling (from /proc/cpuinfo), or None where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return {f for f in SIMD_FEATURES if _CPUINFO_NAMES.get(f, f) in flags}


def check_host_cpu(cpu_record: dict | None) -> None:
    """Raise ``RuntimeError`` naming what is missing when the artifact's code needs SIMD features this host lacks.

    ``cpu_record`` is the manifest's ``kernels.cpu`` (``{"mcpu": ..., "features": [...]}``); nothing to check when it
    has no feature list (older artifacts) or the host's features cannot be read.
    """
    need = set((cpu_record or {}).get("features") or ())
    have = host_cpu_features()
    if not need or have is None:
        return
    missing = sorted(need - have)
    if missing:
        raise RuntimeError(f"the program was compiled for CPU {cpu_record.get('mcpu')!r} and uses "
                           f"{', '.join(missing)}, which this CPU lacks")


# ------------------------------------------------------------------------------------------ BLAS discovery

def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "/" in line and ".so" in line})
    except OSError:
        return []


def find_openblas() -> dict | None:
    """numpy's OpenBLAS: ``{"path", "sgemm", "dgemm", "set_threads", "get_threads", "int64", "corename"}``.

    The scipy-openblas build numpy wheels ship prefixes and suffixes its symbols (``scipy_cblas_sgemm64_``: ILP64);
    a plain ``libopenblas`` has ``cblas_sgemm`` (LP64). Looks at what numpy already loaded, then next to numpy.
    """
    if "blas" in _STATE:
        return _STATE["blas"]
    import numpy  # noqa: F401  (loads its BLAS)

    candidates = [p for p in _loaded_libraries() if "openblas" in Path(p).name.lower()]
    np_dir = Path(np.__file__).resolve().parent
    candidates += sorted(glob.glob(str(np_dir.parent / "numpy.libs" / "*openblas*.so*")))
    candidates += sorted(glob.glob(str(np_dir / ".dylibs" / "*openblas*")))
    found = None
    for path in dict.fromkeys(candidates):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix, int64 in (("scipy_", "64_", True), ("", "64_", True), ("scipy_", "", False),
                                      ("", "", False)):
            names = {k: f"{prefix}{stem}{suffix}" for k, stem in
                     (("sgemm", "cblas_sgemm"), ("dgemm", "cblas_dgemm"),
                      ("set_threads", "openblas_set_num_threads"), ("get_threads", "openblas_get_num_threads"),
                      ("corename", "openblas_get_corename"))}
            if all(hasattr(lib, names[k]) for k in ("sgemm", "dgemm")):
                found = {"path": path, "int64": int64, **names}
                try:
                    fn = getattr(lib, names["corename"])
                    fn.restype = ctypes.c_char_p
                    found["core"] = fn().decode()
                except (AttributeError, OSError):
                    found["core"] = None
                break
        if found:
            break
    _STATE["blas"] = found
    return found


def _blas_call(name_key: str, *args):
    blas = find_openblas()
    if not blas or not blas.get(name_key):
        return None
    fn = getattr(ctypes.CDLL(blas["path"]), blas[name_key], None)
    return None if fn is None else fn(*args)


# ------------------------------------------------------------------------------------------ threads

def default_threads() -> int:
    """``BMC_NUM_THREADS`` / ``TVM_NUM_THREADS`` / ``OMP_NUM_THREADS`` (first set), else the usable CPUs."""
    for var in ("BMC_NUM_THREADS", "TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_num_threads(threads: int | None = None) -> int:
    """Size BLAS's and TVM's thread pools (``None``: :func:`default_threads`); returns the number used.

    TVM's pool reads ``TVM_NUM_THREADS`` when it is first used, so the variable is set too (for pools created
    later, e.g. on other threads), and the live pool is reconfigured with ``runtime.config_threadpool``.
    """
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    os.environ["TVM_NUM_THREADS"] = str(n)
    # TVM's pool workers yield for a while after each parallel kernel before they sleep. bmc's native kernels run
    # on the same pool (``cpp/cpu_kernels.cc``, RunOnTvmPool), so only OpenBLAS (float64 and transposed-a
    # products) can fight them for the cores: that made GPT-2 small 2.7 s against 0.20 s when its GEMMs were
    # OpenBLAS', with TVM's default spin. Read when the pool is (re)created; a user's setting wins.
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(TVM_SPIN_COUNT))
    _blas_call("set_threads", ctypes.c_int(n))
    if "native_module" in _STATE:
        _STATE["native_module"]["set_kernel_threads"](n)
    try:
        import tvm_ffi

        tvm_ffi.get_global_func("runtime.config_threadpool")(0, n)  # mode 0: default affinity, n workers
    except Exception:  # noqa: BLE001 (older TVM: the environment variable still applies to new pools)
        pass
    _STATE["threads"] = n
    return n


# ------------------------------------------------------------------------------------------ numpy kernel

def host_array(t) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor that keeps it alive; ml_dtypes' types (bfloat16), for which numpy's
    DLPack has no type, by way of an unsigned integer view of their size."""
    dtype = np.dtype(np_dtype(str(t.dtype)))
    if dtype.kind != "V":
        return np.from_dlpack(t)
    return np.from_dlpack(t._create_view(t.shape, f"uint{8 * dtype.itemsize}")).view(dtype)


def _matmul_numpy(a, b, trans_a, trans_b, out) -> None:
    """``bmc.cpu.matmul`` in numpy: out = op(a) @ op(b) on zero-copy views (op = swap the last two axes); 16-bit
    operands are multiplied in float32, as the native kernel does."""
    A, B, C = host_array(a), host_array(b), host_array(out)
    if A.dtype.itemsize == 2:
        A, B = A.astype(np.float32), B.astype(np.float32)
    target = C if C.dtype == A.dtype else np.empty(C.shape, A.dtype)
    if trans_a:
        A = np.swapaxes(A, -1, -2)
    if trans_b:
        B = np.swapaxes(B, -1, -2)
    if A.ndim > 2 and B.ndim == 2 and not trans_a:  # one GEMM with the batches stacked into M
        np.matmul(A.reshape(-1, A.shape[-1]), B, out=target.reshape(-1, target.shape[-1]))
    else:
        np.matmul(A, B, out=target)
    if target is not C:
        C[...] = target


def pack_weights_enabled() -> bool:
    """Whether compiles pack matmul weights (``BMC_CPU_PACK_WEIGHTS=0`` keeps them as stored)."""
    return os.environ.get("BMC_CPU_PACK_WEIGHTS", "1").strip() != "0"


def packed_int8_shape(n: int, k: int) -> tuple[int, int, int]:
    """The shape of an 8-bit weight ``bt [N, K]`` packed by ``bmc.cpu.pack_int8_weight``: ``ceil(N / 16)`` panels of
    16 rows, each ``ceil(K / 4)`` rows of 64 bytes (``[16][4]``: four bytes of K of each row) and one more holding the
    16 rows' sums as int32, int8."""
    return -(-n // INT8_PANEL), -(-k // 4) + 1, 64


def pack_params(cpu: dict | None, names: list[str], tensors: list) -> list:
    """``tensors`` (the program's weights, in ``names`` order) with the weights the program reads packed replaced by
    their packed form, in place: ``cpu`` is the kernel record (``kernels.cpu``) whose ``packed_weights`` (float32,
    float16 and bfloat16 matmul weights, name → stored transposed) go to panels of their dtype
    (``bmc.cpu.pack_weight``) and ``packed_int8_weights``
    (8-bit ``[N, K]``) to ``bmc.cpu.pack_int8_weight``'s layout. Each unpacked weight is dropped as its packed copy
    is made, so loading needs one weight more at most."""
    float32, int8 = (cpu or {}).get("packed_weights") or {}, set((cpu or {}).get("packed_int8_weights") or ())
    if not float32 and not int8:
        return tensors
    import tvm
    import tvm_ffi

    for i, name in enumerate(names):
        t = tensors[i]
        if name in float32:
            k, n = t.shape[::-1] if float32[name] else t.shape
            out = tvm.runtime.empty((-(-int(n) // PACK_PANEL), int(k), PACK_PANEL), str(t.dtype), t.device)
            tvm_ffi.get_global_func(PACK_WEIGHT_KERNEL)(t, int(float32[name]), out)
            tensors[i] = out
        elif name in int8:
            out = tvm.runtime.empty(packed_int8_shape(*(int(d) for d in t.shape)), "int8", t.device)
            tvm_ffi.get_global_func(PACK_INT8_WEIGHT_KERNEL)(t, out)
            tensors[i] = out
    return tensors


def _pack_weight_numpy(w, trans, out) -> None:
    """``bmc.cpu.pack_weight`` in numpy: the [K, N] weight as zero-padded panels ``[ceil(N / 32), K, 32]``."""
    W, P = host_array(w), host_array(out)
    W = W.T if trans else W
    panels = np.zeros((W.shape[0], P.shape[0] * PACK_PANEL), W.dtype)
    panels[:, :W.shape[1]] = W
    P[...] = panels.reshape(W.shape[0], P.shape[0], PACK_PANEL).transpose(1, 0, 2)


def _matmul_packed_numpy(a, wp, n, out) -> None:
    """``bmc.cpu.matmul_packed`` in numpy: the weight unpacked, then one BLAS GEMM (16-bit ones in float32)."""
    A, P, C = host_array(a), host_array(wp), host_array(out)
    W = P.transpose(1, 0, 2).reshape(P.shape[1], P.shape[0] * PACK_PANEL)[:, :n].astype(np.float32)
    rows = C.size // max(n, 1)
    C.reshape(rows, n)[...] = np.matmul(A.reshape(rows, A.shape[-1]).astype(np.float32), W)


def _matmul_nbits_numpy(a, codes, scales, *rest) -> None:
    """``bmc.cpu.matmul_nbits[_zp]`` in numpy: dequantize the whole weight, then one BLAS GEMM."""
    *zp, out = rest
    A, Q, S, C = (np.from_dlpack(t) for t in (a, codes, scales, out))
    n, blocks, half = Q.shape
    # (bmc.ops.linalg.dequantize_nbits, restated: the runtime imports numpy and tvm-ffi only)
    q = np.stack([Q & 15, Q >> 4], axis=-1).reshape(n, blocks, 2 * half).astype(np.float32)
    w = (q - (np.from_dlpack(zp[0])[..., None] if zp else np.float32(8))) * S[..., None]
    np.matmul(A.reshape(-1, A.shape[-1]), w.reshape(n, -1).T, out=C.reshape(-1, C.shape[-1]))


def _matmul_float8_numpy(a, codes, table, scale, mantissa_bits, bias, out) -> None:
    """``bmc.cpu.matmul_float8`` in numpy: decode the whole weight through the table, then one BLAS GEMM."""
    A, Q, T, S, C = (np.from_dlpack(t) for t in (a, codes, table, scale, out))
    w = T[Q] * S.reshape(-1, 1)
    np.matmul(A.reshape(-1, A.shape[-1]), w.T, out=C.reshape(-1, C.shape[-1]))


def _integer_product(A, B, za, zb, C) -> None:
    """``C = (A - za) @ (B - zb).T`` as float64, one BLAS GEMM (exact: every partial sum is an integer below 2^53);
    a zero point of several values is one per row (of A's last M, repeating over its batches; of B)."""
    def shifted(x, zp):
        return (x.astype(np.float64) - (zp.reshape(-1, 1) if zp.size > 1 else zp.reshape(()))).reshape(-1, x.shape[-1])

    C.reshape(-1, C.shape[-1])[...] = (shifted(A, za) @ shifted(B, zb).T).astype(np.int64).astype(np.int32)


def _matmul_integer_numpy(a, bt, a_zp, b_zp, out) -> None:
    """``bmc.cpu.matmul_integer`` in numpy."""
    _integer_product(np.from_dlpack(a), np.from_dlpack(bt), np.from_dlpack(a_zp).astype(np.float64),
                     np.from_dlpack(b_zp).astype(np.float64), np.from_dlpack(out))


def _minmax_numpy(x, out) -> None:
    """``bmc.cpu.minmax`` in numpy (an empty x: +inf and -inf, the identities)."""
    X = np.from_dlpack(x)
    np.from_dlpack(out)[...] = (X.min(), X.max()) if X.size else (np.inf, -np.inf)


def _pack_int8_weight_numpy(bt, out) -> None:
    """``bmc.cpu.pack_int8_weight`` in numpy (see :func:`packed_int8_shape`)."""
    B, P = np.from_dlpack(bt), np.from_dlpack(out)
    panels, quads = P.shape[0], P.shape[1] - 1
    full = np.zeros((panels * INT8_PANEL, quads * 4), np.int8)
    full[:B.shape[0], :B.shape[1]] = (B ^ 0x80).view(np.int8) if B.dtype == np.uint8 else B
    P[:, :quads] = full.reshape(panels, INT8_PANEL, quads, 4).transpose(0, 2, 1, 3).reshape(panels, quads, 64)
    sums = full.sum(axis=1, dtype=np.int64).astype("<i4")  # wraps like int32; little-endian bytes
    P[:, quads] = sums.view(np.int8).reshape(panels, 64)


def _matmul_integer_packed_numpy(a, bp, a_zp, b_zp, n, out) -> None:
    """``bmc.cpu.matmul_integer_packed`` in numpy: the weight unpacked (int8; a uint8 one's zero point moved by
    -128 as its codes were), then the same product as the unpacked kernel."""
    A, P = np.from_dlpack(a), np.from_dlpack(bp)
    panels, quads = P.shape[0], P.shape[1] - 1
    B = P[:, :quads].reshape(panels, quads, INT8_PANEL, 4).transpose(0, 2, 1, 3).reshape(panels * INT8_PANEL, -1)
    zb = np.from_dlpack(b_zp)
    _integer_product(A, B[:n, :A.shape[-1]], np.from_dlpack(a_zp).astype(np.float64),
                     zb.astype(np.float64) - (128 if zb.dtype == np.uint8 else 0), np.from_dlpack(out))


def _gather_matmul_numpy(x, w, idx, transpose_w, out) -> None:
    """``bmc.cpu.gather_matmul`` in numpy: one product per expert with rows."""
    X, W = (host_array(t).astype(np.float32, copy=False) for t in (x, w))  # (16-bit: widened)
    I, out = np.from_dlpack(idx), host_array(out)
    C = np.zeros(out.shape, np.float32)
    for e in np.unique(I[(I >= 0) & (I < W.shape[0])]):
        rows = np.flatnonzero(I == e)
        C[rows] = X[rows] @ (W[e].T if transpose_w else W[e])
    out[...] = C.astype(out.dtype)


def _attention_numpy(q, kt, v, *rest, lse=None, softcap=0.0) -> None:
    """``bmc.cpu.attention[_bias]`` in numpy: the scores of every head at once (the memory the native kernel
    saves), a max-shifted softmax, one batched GEMM."""
    *bias, scale, transpose_k, out = rest
    q = np.from_dlpack(q)

    def whole(x):  # 16-bit keys and values widened, as the kernel does; grouped batch dims repeated to q's
        x = host_array(x).astype(np.float32, copy=False)
        for axis, (a, b) in enumerate(zip(q.shape[:-2], x.shape[:-2])):
            x = np.repeat(x, a // b, axis=axis)
        return x

    k = whole(kt)
    s = np.matmul(q, np.swapaxes(k, -1, -2) if transpose_k else k) * np.float32(scale)
    if softcap:
        s = np.tanh(s / np.float32(softcap)) * np.float32(softcap)
    if bias:
        s += np.from_dlpack(bias[0])
    m = s.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # a row masked everywhere with -inf is NaN, as in the reference
        s = np.exp(s - m)
        total = s.sum(axis=-1, keepdims=True)
        s /= total
        if lse is not None:
            np.from_dlpack(lse)[...] = np.where(m == -np.inf, -np.inf, m + np.log(total))[..., 0]
    np.matmul(s, whole(v), out=np.from_dlpack(out))


def _attention_lse_numpy(q, kt, v, *rest) -> None:
    """``bmc.cpu.attention[_bias]_lse`` in numpy."""
    _attention_numpy(q, kt, v, *rest[:-1], lse=rest[-1])


def _attention_softcap_numpy(q, k, v, bias, scale, softcap, transpose_k, out, lse=None) -> None:
    """``bmc.cpu.attention_softcap[_lse]`` in numpy."""
    _attention_numpy(q, k, v, bias, scale, transpose_k, out, lse=lse, softcap=softcap)


_SCRATCH = threading.local()  # per thread: the im2col buffer of the last conv2d, reused (no page faults per call)


def _scratch(n: int, dtype) -> np.ndarray:
    """``n`` elements of this thread's scratch buffer for ``dtype`` (grown, never shrunk: the largest im2col
    matrix so far, 7.4 MB for ResNet-50's stem)."""
    key = np.dtype(dtype).char
    buf = getattr(_SCRATCH, key, None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1), dtype)
        setattr(_SCRATCH, key, buf)
    return buf[:n]


def _valid_outputs(n_out: int, size: int, offset: int, pad: int, stride: int) -> tuple[int, int]:
    """[lo, hi): the outputs ``o`` whose input index ``o * stride + offset - pad`` lies inside ``[0, size)``."""
    lo = max(0, -(-(pad - offset) // stride))
    last = size - 1 + pad - offset
    hi = min(n_out, last // stride + 1) if last >= 0 else 0
    return lo, max(lo, hi)


def conv2d_numpy(x, w, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups: int = 1, out=None):
    """NCHW x OIHW cross-correlation (Relax ``nn.conv2d`` / ONNX ``Conv`` without bias) as im2col + BLAS GEMMs.

    ``pads`` is (top, left, bottom, right), the order of ONNX's ``pads`` and of Relax's 4-value ``padding``. Per
    image, the column matrix [C*KH*KW, OH*OW] is written tap by tap (one strided slice of the *unpadded* input per
    kernel position, the padded border zero-filled: no padded copy of the input, 5-10% faster than copying a
    padded ``sliding_window_view``) into a per-thread scratch buffer; then one ``np.matmul`` (batched over the
    groups) writes [groups, M/g, OH*OW] straight into ``out``. A 1x1, stride-1, unpadded conv needs no copy: the
    input already is the column matrix.
    """
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    sh, sw = strides
    pt, pl, pb, pr = pads
    dh, dw = dilations
    g = int(groups)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if out is None:
        out = np.empty((n, m, oh, ow), dtype=np.result_type(x, w))
    mg, k = m // g, cg * kh * kw
    wmat = w.reshape(g, mg, k)
    direct = kh == kw == 1 and sh == sw == 1 and not any(pads)
    if not direct:
        cols = _scratch(c * kh * kw * oh * ow, x.dtype).reshape(c, kh, kw, oh, ow)
        row_ranges = [_valid_outputs(oh, h, i * dh, pt, sh) for i in range(kh)]
        col_ranges = [_valid_outputs(ow, wd, j * dw, pl, sw) for j in range(kw)]
    for b in range(n):
        if direct:
            col = x[b].reshape(g, k, oh * ow)
        else:
            xb = x[b]
            for i, (r0, r1) in enumerate(row_ranges):
                for j, (c0, c1) in enumerate(col_ranges):
                    tap = cols[:, i, j]
                    tap[:, :r0] = 0
                    tap[:, r1:] = 0
                    tap[:, r0:r1, :c0] = 0
                    tap[:, r0:r1, c1:] = 0
                    if r1 > r0 and c1 > c0:
                        y0, x0 = r0 * sh + i * dh - pt, c0 * sw + j * dw - pl
                        tap[:, r0:r1, c0:c1] = xb[:, y0:y0 + (r1 - r0 - 1) * sh + 1:sh,
                                                  x0:x0 + (c1 - c0 - 1) * sw + 1:sw]
            col = cols.reshape(g, k, oh * ow)
        dst = out[b].reshape(g, mg, oh * ow)
        if g == 1:
            np.matmul(wmat[0], col[0], out=dst[0])
        else:
            np.matmul(wmat, col, out=dst)
    return out


def _conv2d_numpy(x, w, stride_h, stride_w, pad_t, pad_l, pad_b, pad_r, dil_h, dil_w, groups, out) -> None:
    """``bmc.cpu.conv2d`` (destination-passing) on zero-copy DLPack views; see :func:`conv2d_numpy`. 16-bit x and
    w (with a float32 result) are widened first, as the native kernel does."""
    X, W = host_array(x), host_array(w)
    if X.dtype.itemsize == 2:
        X, W = X.astype(np.float32), W.astype(np.float32)
    conv2d_numpy(X, W, (stride_h, stride_w), (pad_t, pad_l, pad_b, pad_r), (dil_h, dil_w), groups,
                 out=np.from_dlpack(out))


def _conv3d_numpy(x, w, sd, sh, sw, pf, pt, pl, pk, pb, pr, dd, dh, dw, groups, out) -> None:
    """``bmc.cpu.conv3d``: each output depth slice a sum over the depth taps of :func:`conv2d_numpy` of the
    (depth-padded) input's slices."""
    X, W = host_array(x), host_array(w)
    if X.dtype.itemsize == 2:
        X, W = X.astype(np.float32), W.astype(np.float32)
    Y = np.from_dlpack(out)
    X = np.pad(X, ((0, 0), (0, 0), (pf, pk), (0, 0), (0, 0)))
    for z in range(Y.shape[2]):
        Y[:, :, z] = sum(conv2d_numpy(np.ascontiguousarray(X[:, :, z * sd + kz * dd]),
                                      np.ascontiguousarray(W[:, :, kz]), (sh, sw), (pt, pl, pb, pr), (dh, dw), groups)
                         for kz in range(W.shape[2]))


def _conv2d_fused_numpy(x, w, scale, shift, residual, relu, *conv) -> None:
    """``bmc.cpu.conv2d_fused``: ``bmc.cpu.conv2d``, then the epilogue on the output in place."""
    _conv2d_fused_act_numpy(x, w, scale, shift, residual, CONV_ACTIVATIONS["clamp" if relu else "none"], 0.0,
                            np.inf, *conv)


def _conv2d_fused_act_numpy(x, w, scale, shift, residual, act, lo, hi, *conv) -> None:
    """``bmc.cpu.conv2d_fused_act``: ``bmc.cpu.conv2d``, then the epilogue on the output in place."""
    if act not in CONV_ACTIVATIONS.values():
        raise ValueError(f"bmc.cpu.conv2d_fused_act: unknown activation {act} ({CONV_ACTIVATIONS})")
    _conv2d_numpy(x, w, *conv)
    y = np.from_dlpack(conv[-1])
    scale, shift, residual = (host_array(t) for t in (scale, shift, residual))
    if scale.size:
        y *= scale.reshape(-1, 1, 1)
    if shift.size:
        y += shift.reshape(-1, 1, 1)
    if residual.size:
        y += residual
    if act == CONV_ACTIVATIONS["clamp"]:
        np.minimum(np.maximum(y, np.float32(lo), out=y), np.float32(hi), out=y)
    elif act == CONV_ACTIVATIONS["silu"]:
        with np.errstate(over="ignore"):
            y *= 1 / (1 + np.exp(-y))
    elif act == CONV_ACTIVATIONS["hardswish"]:
        y *= np.clip(y * np.float32(1 / 6) + np.float32(0.5), 0, 1)


#: the native library's function behind each kernel name, and the numpy implementation of the same contract
_NATIVE_SYMBOLS = {MATMUL_KERNEL: "cpu_matmul", CONV2D_KERNEL: "cpu_conv2d", CONV3D_KERNEL: "cpu_conv3d",
                   CONV2D_FUSED_KERNEL: "cpu_conv2d_fused",
                   CONV2D_FUSED_ACT_KERNEL: "cpu_conv2d_fused_act",
                   MATMUL_NBITS_KERNEL: "cpu_matmul_nbits", MATMUL_NBITS_ZP_KERNEL: "cpu_matmul_nbits_zp",
                   MATMUL_INTEGER_KERNEL: "cpu_matmul_integer", ATTENTION_KERNEL: "cpu_attention",
                   ATTENTION_BIAS_KERNEL: "cpu_attention_bias", ATTENTION_LSE_KERNEL: "cpu_attention_lse",
                   ATTENTION_BIAS_LSE_KERNEL: "cpu_attention_bias_lse",
                   ATTENTION_SOFTCAP_KERNEL: "cpu_attention_softcap",
                   ATTENTION_SOFTCAP_LSE_KERNEL: "cpu_attention_softcap_lse", MATMUL_FLOAT8_KERNEL: "cpu_matmul_float8",
                   GATHER_MATMUL_KERNEL: "cpu_gather_matmul",
                   MATMUL_PACKED_KERNEL: "cpu_matmul_packed", PACK_WEIGHT_KERNEL: "cpu_pack_weight",
                   MATMUL_INTEGER_PACKED_KERNEL: "cpu_matmul_integer_packed",
                   PACK_INT8_WEIGHT_KERNEL: "cpu_pack_int8_weight", MINMAX_KERNEL: "cpu_minmax"}
_NUMPY_KERNELS = {MATMUL_KERNEL: _matmul_numpy, CONV2D_KERNEL: _conv2d_numpy, CONV3D_KERNEL: _conv3d_numpy,
                  CONV2D_FUSED_KERNEL: _conv2d_fused_numpy,
                  CONV2D_FUSED_ACT_KERNEL: _conv2d_fused_act_numpy,
                  MATMUL_NBITS_KERNEL: _matmul_nbits_numpy, MATMUL_NBITS_ZP_KERNEL: _matmul_nbits_numpy,
                  MATMUL_INTEGER_KERNEL: _matmul_integer_numpy, ATTENTION_KERNEL: _attention_numpy,
                  ATTENTION_BIAS_KERNEL: _attention_numpy, ATTENTION_LSE_KERNEL: _attention_lse_numpy,
                  ATTENTION_BIAS_LSE_KERNEL: _attention_lse_numpy, ATTENTION_SOFTCAP_KERNEL: _attention_softcap_numpy,
                  ATTENTION_SOFTCAP_LSE_KERNEL: _attention_softcap_numpy, MATMUL_FLOAT8_KERNEL: _matmul_float8_numpy,
                  GATHER_MATMUL_KERNEL: _gather_matmul_numpy,
                  MATMUL_PACKED_KERNEL: _matmul_packed_numpy, PACK_WEIGHT_KERNEL: _pack_weight_numpy,
                  MATMUL_INTEGER_PACKED_KERNEL: _matmul_integer_packed_numpy,
                  PACK_INT8_WEIGHT_KERNEL: _pack_int8_weight_numpy, MINMAX_KERNEL: _minmax_numpy}


# ------------------------------------------------------------------------------------------ native library

def _native_key() -> str:
    """Cache key: the sources, CMakeLists.txt and the tvm-ffi version (the library is built against its headers)."""
    from importlib import metadata

    h = hashlib.sha256()
    sources = ("cpp/cpu_kernels.cc", "cpp/cuda_kernels.cc", "cpp/matmul_shapes.h", "cpp/float16.h",
               "cpp/cuda_attention.h", "cpp/cuda_attention.cuh", "cpp/cuda_attention.cu", "CMakeLists.txt")
    for p in (ROOT / n for n in sources):
        if p.exists():
            h.update(p.name.encode() + p.read_bytes())
    try:
        h.update(metadata.version("apache-tvm-ffi").encode())
    except metadata.PackageNotFoundError:
        pass
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("BMC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bmc")
    return Path(base)


@contextlib.contextmanager
def cache_lock(folder: Path):
    """Hold the exclusive lock of a cache folder (FAILURES.md 32: concurrent compiles and builds into one cache take
    turns): ``flock`` on ``folder/.lock``, released when the block ends or the process dies."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def native_library_path(target: str = "bmc_cpu_kernels", env_var: str = "BMC_NATIVE_LIB") -> Path | None:
    """The kernel library ``lib<target>.so`` to load, or None: ``$<env_var>``, the package, the build cache, then
    ``<repo>/build/native``."""
    name = f"lib{target}.so"
    env = os.environ.get(env_var)
    if env:
        return Path(env) if Path(env).exists() else None
    packaged = packaged_library(name)
    if packaged is not None:
        return packaged
    if (ROOT / "cpp").is_dir():
        cached = cache_dir() / "native" / _native_key() / name
        if cached.exists():
            return cached
    local = ROOT / "build" / "native" / name  # a developer's `cmake --build build/native`
    return local if local.exists() else None


def build_native(dest: Path | None = None, *, quiet: bool = True, target: str = "bmc_cpu_kernels") -> Path:
    """Configure + build ``lib<target>.so`` (``bmc_cpu_kernels``, ``bmc_cuda_kernels``) with cmake (ninja when
    present) into the cache; returns its path.

    Needs cmake (``pip install cmake ninja``), a C++17 compiler and the venv's apache-tvm-ffi; about 5-10 s.
    """
    if not (ROOT / "CMakeLists.txt").exists():
        raise RuntimeError(f"no CMakeLists.txt under {ROOT}: the native sources are not installed")
    cmake = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    if not Path(cmake).exists() and not shutil.which(cmake):
        raise RuntimeError("cmake not found (pip install cmake ninja)")
    dest = Path(dest) if dest is not None else cache_dir() / "native" / _native_key()
    build = dest / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"]
    ninja = shutil.which("ninja") or (str(Path(sys.executable).parent / "ninja")
                                      if (Path(sys.executable).parent / "ninja").exists() else None)
    if ninja:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    with cache_lock(dest):  # one build at a time in the shared build folder
        for cmd in (configure, [cmake, "--build", str(build), "--target", target]):
            proc = subprocess.run(cmd, capture_output=quiet, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout or '')[-3000:]}\n"
                                   f"{(proc.stderr or '')[-3000:]}")
        lib = build / f"lib{target}.so"
        final = dest / lib.name
        tmp = dest / f".{lib.name}.{os.getpid()}"
        shutil.copy2(lib, tmp)
        os.replace(tmp, final)  # atomic: a concurrent loader sees the old file or the new one
    return final


def _load_native(path: Path) -> bool:
    """Load the library and bind numpy's BLAS to it; False (and why, in _STATE) when that is not possible."""
    import tvm_ffi

    blas = find_openblas()
    if blas is None:
        _STATE["native_error"] = "no OpenBLAS with cblas_sgemm found next to numpy"
        return False
    try:
        module = tvm_ffi.load_module(str(path))
        module["blas_bind"](blas["path"], blas["sgemm"], blas["dgemm"], blas["int64"])
        kernels = {name: module[symbol] for name, symbol in _NATIVE_SYMBOLS.items()}
    except Exception as e:  # noqa: BLE001 (a stale or foreign library: fall back)
        _STATE["native_error"] = f"{path}: {e}"
        return False
    _STATE["native_module"] = module  # keeps the library loaded
    _STATE["native_kernels"] = kernels
    _STATE["native_lib"] = str(path)
    return True


# ------------------------------------------------------------------------------------------ registration

def register_cpu_kernels(required=None, *, threads: int | None = None, native: bool | None = None) -> dict:
    """Register every ``bmc.cpu.*`` kernel (idempotent); returns ``{"impl", "native_lib", "blas", "threads"}``.

    ``required``: kernel names an artifact needs (its manifest's ``kernels.cpu.requires``); unknown names raise
    ``RuntimeError`` so a newer artifact fails clearly on an older runtime. ``threads``: size the BLAS and TVM
    thread pools (``None`` keeps them; the first call sizes them from the environment). ``native``: ``True``
    requires the native library, ``False`` forces numpy, ``None`` (default) prefers native, else numpy. ``BMC_CPU_KERNELS=numpy|native`` overrides ``native=None``.
    """
    unknown = sorted(set(required or ()) - set(CPU_KERNELS))
    if unknown:
        raise RuntimeError(f"the program needs CPU kernel(s) {', '.join(unknown)} that this bmc runtime does not "
                           "provide; upgrade bmc")
    with _LOCK:
        if native is None:
            pref = os.environ.get("BMC_CPU_KERNELS", "").strip().lower()
            native = {"native": True, "numpy": False}.get(pref)
        want = "numpy" if native is False else "native"
        if _STATE.get("impl") and (_STATE["impl"] == want or native is None):
            if threads is not None:
                set_num_threads(threads)
            return info()
        import tvm_ffi

        impl = "numpy"
        if native is not False:
            path = native_library_path()
            if path is not None and _load_native(path):
                impl = "native"
            elif native:
                raise RuntimeError("the native CPU kernels were requested but cannot be used: "
                                   f"{_STATE.get('native_error', 'libbmc_cpu_kernels.so is not built')} "
                                   "(bmc.runtime.kernels.build_native() builds it)")
            # else: the numpy kernel, silently — same BLAS, within 1-2% of native (benchmarks/single_device.py);
            # `info()` says which one runs
        for name, fn in (_STATE["native_kernels"] if impl == "native" else _NUMPY_KERNELS).items():
            tvm_ffi.register_global_func(name, fn, override=True)
        _STATE["impl"] = impl
        if threads is not None or "threads" not in _STATE:
            set_num_threads(threads)
        return info()


def info() -> dict:
    blas = _STATE.get("blas")
    return {"impl": _STATE.get("impl"), "native_lib": _STATE.get("native_lib"),
            "blas": None if not blas else {"path": blas["path"], "core": blas.get("core"), "int64": blas["int64"]},
            "threads": _STATE.get("threads")}
