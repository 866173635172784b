"""CUDA on the runtime side: TVM's CUDA loader, the GPU a rank uses, cuBLAS for compiled programs, GPU collectives.

* :func:`enable` registers TVM's CUDA module loader (``libtvm_runtime_cuda.so``): ``import tvm`` skips it when it
  cannot load it (no driver) and a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``) never loads it.
* :func:`register_kernels` binds the library kernels a CUDA program may call — ``bmc.cuda.matmul`` (cuBLAS GEMMs,
  ``cpp/cuda_kernels.cc``; the codegen offloads matmuls to it, see ``bmc/codegen/build.py``) and
  ``bmc.cuda.attention[_bias]`` (fused attention, ``cpp/cuda_attention.cuh``) — before a VM is built.
  cuBLAS is not a dependency of bmc: it is found where PyTorch/CuPy/JAX put it (the ``nvidia-cublas`` wheel), in a
  CUDA toolkit, or at ``$BMC_CUBLAS``.
* :func:`pick_device` maps an MPI rank to a GPU by its rank on the host; several ranks per GPU are allowed (tests,
  small machines), and then collectives go through the host.
* GPU collectives (registered by :func:`bmc.runtime.mpi.register_collectives`): **NCCL** (through CuPy's
  binding of the ``nvidia-nccl`` library; one communicator per group of mesh axes, its unique id broadcast over the
  group's MPI communicator) when every rank has a GPU of its own and NCCL loads, else **host-staged** MPI (copy to
  host, the Python MPI collectives, copy back: :func:`host_staged`), which works everywhere, also with several
  ranks on one GPU.

Imports numpy and tvm-ffi (and CuPy for NCCL only when asked); never the frontend, sharding or codegen.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

from bmc.errors import ExecutionError

MATMUL_KERNEL = "bmc.cuda.matmul"
#: ``bmc.cuda.attention(q, k, v, scale, transpose_k, out)`` and ``..._bias(q, k, v, bias, scale, transpose_k, out)``:
#: fused float16/bfloat16 attention on tensor cores (``cpp/cuda_attention.cuh``; the ``attention`` op)
ATTENTION_KERNEL = "bmc.cuda.attention"
ATTENTION_BIAS_KERNEL = "bmc.cuda.attention_bias"
#: ``bmc.cuda.attention_softcap(q, k, v, bias, scale, softcap, transpose_k, out)``: the same with the scaled scores
#: soft-capped before the bias, ``softcap * tanh(s / softcap)`` (the bias a scalar 0 for none)
ATTENTION_SOFTCAP_KERNEL = "bmc.cuda.attention_softcap"
#: every kernel name a CUDA artifact may require (its manifest's ``kernels.cuda.requires``)
CUDA_KERNELS = (MATMUL_KERNEL, ATTENTION_KERNEL, ATTENTION_BIAS_KERNEL, ATTENTION_SOFTCAP_KERNEL)
_SYMBOLS = {MATMUL_KERNEL: "cuda_matmul", ATTENTION_KERNEL: "cuda_attention",
            ATTENTION_BIAS_KERNEL: "cuda_attention_bias", ATTENTION_SOFTCAP_KERNEL: "cuda_attention_softcap"}
_STATE: dict = {}


# ------------------------------------------------------------------------------------------ TVM's CUDA runtime

def enable(where: str = "cuda") -> None:
    """Register TVM's CUDA module loader (idempotent)."""
    import tvm  # noqa: F401  (loads libtvm_runtime)
    import tvm_ffi
    from tvm.base import _LOADED_LIBS

    if "ffi.Module.load_from_bytes.cuda" in tvm_ffi.registry.list_global_func_names():
        return
    lib = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(lib))
    except OSError as e:
        raise ExecutionError(f"TVM's CUDA runtime cannot be loaded: {e}", where=where,
                             fix="a CUDA device needs the NVIDIA driver (libcuda.so.1) and libcudart.so.13") from e
    import tvm.runtime.vm  # noqa: F401  (a runtime-only `import tvm` does not import it)


def device_count() -> int:
    import tvm

    n = 0
    while n < 64 and tvm.cuda(n).exist:
        n += 1
    return n


def pick_device(local_rank: int, local_size: int) -> tuple[int, bool]:
    """(GPU index, shared) for the rank ``local_rank`` of ``local_size`` ranks on this host: round robin over the
    visible GPUs (``CUDA_VISIBLE_DEVICES``); ``shared`` when some GPU serves several ranks."""
    n = device_count()
    if n == 0:
        raise ExecutionError("no CUDA device is visible to this process", where="device",
                             fix="check nvidia-smi and CUDA_VISIBLE_DEVICES, or run a --target llvm artifact")
    return local_rank % n, local_size > n


# ------------------------------------------------------------------------------------------ library kernels

def _loaded(prefix: str) -> str | None:
    """Path of a loaded shared library whose file name starts with ``prefix`` (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith(prefix):
                    return path
    except OSError:
        pass
    return None


def find_cublas() -> str | None:
    """``$BMC_CUBLAS``; a cuBLAS already loaded (PyTorch, CuPy); the ``nvidia-cublas`` wheel on ``sys.path``; a CUDA
    toolkit (``$CUDA_PATH``, /usr/local/cuda); else the dynamic linker's search path."""
    env = os.environ.get("BMC_CUBLAS")
    if env:
        return env if Path(env).exists() else None
    loaded = _loaded("libcublas.so")
    if loaded:
        return loaded
    roots = [str(Path(p) / "nvidia" / "*" / "lib") for p in sys.path if p]  # nvidia/cu13/lib, nvidia/cublas/lib
    roots += [str(Path(os.environ[v]) / "lib64") for v in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(v)]
    roots.append("/usr/local/cuda/lib64")
    for name in ("libcublas.so.13", "libcublas.so.12"):
        for root in roots:
            found = sorted(glob.glob(os.path.join(root, name)))
            if found:
                return found[0]
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return _loaded("libcublas.so")
    return None


def _kernel_library() -> str:
    """Path of ``libbmc_cuda_kernels.so`` (built into the cache from ``cpp/`` in a source checkout without one)."""
    from bmc.runtime.kernels import ROOT, build_native, native_library_path

    lib = native_library_path("bmc_cuda_kernels", "BMC_CUDA_KERNELS_LIB")
    if lib is None and (ROOT / "cpp").is_dir():
        lib = build_native(target="bmc_cuda_kernels")
    if lib is None:
        raise RuntimeError("libbmc_cuda_kernels.so is not installed (reinstall bmc, or set BMC_CUDA_KERNELS_LIB)")
    return str(lib)


def fused_attention_available() -> bool:
    """Whether the kernel library carries the fused attention kernels (it was built with nvcc); needs no GPU."""
    if "attention_image" not in _STATE:
        import tvm_ffi

        _STATE["attention_image"] = int(tvm_ffi.load_module(_kernel_library())["cuda_attention_image_bytes"]())
    return _STATE["attention_image"] > 0


def register_kernels(required=None) -> dict:
    """Bind cuBLAS and register ``bmc.cuda.matmul`` and ``bmc.cuda.attention[_bias]`` (idempotent); returns
    ``{"kernels_lib", "cublas"}``.

    ``required``: the kernel names an artifact needs; unknown ones raise ``RuntimeError`` (a newer artifact on an
    older runtime). Raises ``RuntimeError`` with what is missing when cuBLAS or the kernel library is not found."""
    unknown = sorted(set(required or ()) - set(CUDA_KERNELS))
    if unknown:
        raise RuntimeError(f"the program needs CUDA kernel(s) {', '.join(unknown)} that this bmc runtime does not "
                           "provide; upgrade bmc")
    if "matmul" in _STATE:
        return {k: _STATE[k] for k in ("kernels_lib", "cublas")}
    import tvm_ffi

    enable()
    lib = _kernel_library()
    if {ATTENTION_KERNEL, ATTENTION_BIAS_KERNEL, ATTENTION_SOFTCAP_KERNEL} & set(required or ()) and \
            not fused_attention_available():
        raise RuntimeError(f"the program calls the fused attention kernels, but {lib} was built without them "
                           "(no nvcc at install): reinstall bmc with the CUDA toolkit on PATH, or recompile "
                           "without BMC_CUDA_ATTENTION=fused")
    cublas, cudart = find_cublas(), _loaded("libcudart.so")
    if cublas is None:
        raise RuntimeError("this program calls cuBLAS for its matmuls, but no libcublas.so.13/.12 was found: "
                           "`pip install nvidia-cublas` (PyTorch and CuPy install it too), set BMC_CUBLAS to the "
                           "library, or recompile with BMC_CUDA_GEMM=tvm")
    if cudart is None:
        raise RuntimeError("libcudart is not loaded (TVM's CUDA runtime is missing)")
    module = tvm_ffi.load_module(lib)
    module["cublas_bind"](cublas, cudart)
    _STATE.update(module=module, matmul=module["cuda_matmul"], kernels_lib=lib, cublas=cublas)
    for name, symbol in _SYMBOLS.items():
        tvm_ffi.register_global_func(name, module[symbol], override=True)
    return {"kernels_lib": lib, "cublas": cublas}


# ------------------------------------------------------------------------------------------ collectives

def host_staged(run_host):
    """A ``bmc.<kind>(x, attrs, out)`` for GPU tensors from a host implementation ``run_host(x, attrs, out)`` on
    numpy arrays: device→host copy (which waits for the kernels before it on the stream), MPI, host→device copy."""
    def impl(x, attrs, out):
        xh = x.numpy()
        oh = np.empty(tuple(out.shape), xh.dtype)
        run_host(xh, attrs, oh)
        out.copyfrom(oh)
    return impl


# NCCL's ncclDataType_t / ncclRedOp_t values (nccl.h; stable since NCCL 2.10)
_NCCL_DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
                "float32": 7, "float64": 8, "bfloat16": 9}
_NCCL_OPS = {"sum": 0, "max": 2, "min": 3, "mean": 4}


class Nccl:
    """NCCL collectives on GPU tensors through CuPy's NCCL binding, one communicator per group of mesh axes.

    Every call runs on the legacy default stream, the one TVM launches its kernels on, so no extra synchronization
    is needed; data movement that NCCL cannot express directly (a gather along an inner dimension, all-to-all
    blocks) is done with CuPy copies on the same stream, over byte views (so bfloat16 needs no CuPy support)."""

    def __init__(self, ctx, device: int):
        import cupy
        from cupy.cuda import nccl

        self.cp, self.nccl, self.ctx, self.device = cupy, nccl, ctx, device
        cupy.cuda.Device(device).use()
        self.comms = {axes: self._communicator(comm) for axes, comm in ctx.groups.items()}

    def _communicator(self, comm):
        """One NCCL communicator over the MPI group ``comm``: rank 0's unique id (128 bytes) broadcast over MPI."""
        mine = self.nccl.get_unique_id()  # bytes in recent CuPy, a tuple of 128 small ints in older ones
        uid = np.frombuffer(mine, np.uint8).copy() if isinstance(mine, bytes) else \
            np.asarray(mine, np.int64).astype(np.int8).view(np.uint8)
        comm.Bcast(uid, root=0)
        common = uid.tobytes() if isinstance(mine, bytes) else tuple(int(v) for v in uid.view(np.int8))
        return self.nccl.NcclCommunicator(comm.Get_size(), common, comm.Get_rank())

    def _view(self, t, shape=None):
        """A CuPy byte array over a TVM tensor's memory: (*shape, itemsize) uint8."""
        cp = self.cp
        itemsize = np.dtype(np_dtype(t.dtype)).itemsize
        shape = tuple(t.shape) if shape is None else shape
        nbytes = int(np.prod(shape)) * itemsize
        mem = cp.cuda.UnownedMemory(t.data_ptr(), nbytes, t, self.device)
        return cp.ndarray(shape + (itemsize,), cp.uint8, cp.cuda.MemoryPointer(mem, 0))

    def __call__(self, kind: str, x, attrs_text: str, out) -> None:
        attrs = json.loads(attrs_text)
        axes = tuple(attrs["axes"])
        comm = self.comms.get(axes) or self.comms.setdefault(axes, self._communicator(self.ctx.group(axes)))
        n = comm.size()
        dtype = str(x.dtype)
        cp, xs = self.cp, tuple(x.shape)
        xv, ov = self._view(x), self._view(out)
        count = int(np.prod(xs))
        if kind == "all_reduce":
            if dtype not in _NCCL_DTYPES:
                raise ExecutionError(f"NCCL cannot reduce {dtype}", fix="use --collectives host")
            comm.allReduce(xv.data.ptr, ov.data.ptr, count, _NCCL_DTYPES[dtype], _NCCL_OPS[attrs["reduce"]], 0)
        elif kind == "all_gather":
            dim = attrs["dim"] % len(xs)
            stage = ov if int(np.prod(xs[:dim])) == 1 else cp.empty((n,) + xv.shape, cp.uint8)
            comm.allGather(xv.data.ptr, stage.data.ptr, xv.size, _NCCL_DTYPES["uint8"], 0)
            if stage is not ov:  # (n, *x) -> concatenation along dim
                ov[...] = cp.moveaxis(stage, 0, dim).reshape(ov.shape)
        elif kind == "reduce_scatter":
            if dtype not in _NCCL_DTYPES:
                raise ExecutionError(f"NCCL cannot reduce {dtype}", fix="use --collectives host")
            dim = attrs["dim"] % len(xs)
            send = xv if int(np.prod(xs[:dim])) == 1 else _blocks_first(cp, xv, dim, n)
            comm.reduceScatter(send.data.ptr, ov.data.ptr, int(np.prod(out.shape)), _NCCL_DTYPES[dtype],
                               _NCCL_OPS[attrs.get("reduce", "sum")], 0)
        elif kind == "all_to_all":
            split, concat = attrs["split_dim"] % len(xs), attrs["concat_dim"] % len(xs)
            send = _blocks_first(cp, xv, split, n)
            recv = cp.empty_like(send)
            block = send[0].size
            self.nccl.groupStart()
            for peer in range(n):
                comm.send(send[peer].data.ptr, block, _NCCL_DTYPES["uint8"], peer, 0)
                comm.recv(recv[peer].data.ptr, block, _NCCL_DTYPES["uint8"], peer, 0)
            self.nccl.groupEnd()
            ov[...] = cp.moveaxis(recv, 0, concat).reshape(ov.shape)
        else:
            raise ExecutionError(f"unknown collective {kind!r}")


def _blocks_first(cp, v, dim: int, n: int):
    """(n, *block) contiguous copy of byte view ``v`` split into n blocks along ``dim``."""
    shape = v.shape[:dim] + (n, v.shape[dim] // n) + v.shape[dim + 1:]
    return cp.ascontiguousarray(cp.moveaxis(v.reshape(shape), dim, 0))


def np_dtype(dtype) -> str:
    """numpy dtype name with the same item size (bfloat16 → uint16: for byte views and checks only)."""
    text = str(dtype)
    return "uint16" if text == "bfloat16" else text


def nccl_available() -> str | None:
    """None when CuPy's NCCL binding loads, else why not."""
    try:
        from cupy.cuda import nccl

        nccl.get_version()
    except Exception as e:  # noqa: BLE001  (ImportError, a missing libnccl, CUDA errors)
        return f"{type(e).__name__}: {e}"
    return None
