"""CUDA: find the toolkit, compile TVM's generated kernels with nvcc at build time, embed the image in the library.

Why this shape (TVM 0.27 / tvm-ffi 0.1.14, measured):

* TVM's CUDA codegen builds its device module through ``ffi.Module.create.cuda``, which lives in
  ``libtvm_runtime_cuda.so``. That library links the driver (``libcuda.so.1``); on a machine without one it is
  silently not loaded, and codegen falls back to a placeholder module that holds the CUDA C++ *source* with
  ``fmt="cuda"``. ``export_library`` stores that source, and the runtime compiles it at *load* time by calling the
  Python callback ``tvm_callback_cuda_compile``.
* So registering our own ``tvm_callback_cuda_compile`` at build time (option a) does nothing here: it is never
  called during ``tvm.compile`` (checked: zero calls). Where the runtime *is* loaded (a GPU box) it would be called,
  but TVM tags whatever it returns as ``cubin``/``ptx`` by sniffing the first byte, for the one target arch only.
* Rebuilding the device module from a fatbin (option b, ``ffi.Module.create.cuda``) needs that same runtime
  library, hence a driver (or a stub driver) inside the compiler process.
* What is left, and what this module does (option c): the serialized CUDA module is ``[fmt][fmap][code]``
  (tvm ``CUDAModuleNode::SaveToBytes``; the fallback module mirrors it byte for byte), and ``export_library``
  accepts ``fpack_imports`` to produce the blob of imported modules (``__tvm_ffi__library_bin``: ``<u64 n>
  <import tree> (<kind> [<bytes>])*``, tvm-ffi ``ProcessLibraryBin``). We take TVM's own blob
  (``runtime.ModulePackImportsToTensor``), replace each ``cuda`` module's ``fmt="cuda"``/source with
  ``fmt="fatbin"``/the nvcc image, keep ``fmap`` byte for byte, and link the new blob with ``.incbin``. The loader
  (``CUDAModuleLoadFromBytes``) only JIT-compiles when ``fmt == "cuda"``; for anything else it hands the bytes to
  ``cuModuleLoadData``, which accepts a fatbin and picks the SASS for the device (or JITs the embedded PTX).
  Every layout assumption is checked and a mismatch raises ``CompileError`` instead of writing a bad library.
* ``TVM_COMPILE_FORCE_FALLBACK=1`` during ``tvm.compile`` keeps the placeholder module even where the CUDA runtime
  is loaded, so a GPU build machine does not JIT at build time and the blob always carries source to replace.

nvcc gets one ``-gencode`` per requested SASS arch, plus PTX for the newest requested architecture family (forward
compatibility with later GPUs), no ``--use_fast_math`` (bmc compares against a float32 reference at 1e-4).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bmc.errors import CompileError

FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KIND = {1: "ptx", 2: "elf"}
_LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"
_GLOBAL_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\s*\(')
NVCC_FLAGS = (
    "-O3", "-w", "--expt-relaxed-constexpr", "--expt-extended-lambda",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
)


# ---------------------------------------------------------------------------------------------------------------
# toolkit


@dataclass(frozen=True)
class CudaToolkit:
    """A usable CUDA toolkit: its root and the real ``nvcc`` binary (not a wrapper script)."""

    root: Path
    nvcc: Path
    version: str

    def env(self) -> dict[str, str]:
        """Environment for nvcc and TVM's NVRTC path (which derives headers from ``CUDA_PATH``)."""
        return {**os.environ, "CUDA_PATH": str(self.root), "CUDA_HOME": str(self.root)}


_NOT_FOUND_FIX = ("install the CUDA toolkit (12.x or 13.x) and put its bin/ on PATH, or set CUDA_PATH to its root "
                  "(the directory holding bin/nvcc); or compile with --target llvm")


def find_toolkit(env: dict[str, str] | None = None) -> CudaToolkit:
    """Locate nvcc: ``CUDA_PATH``/``CUDA_HOME`` first, then ``nvcc`` on ``PATH`` (wrapper scripts resolved).

    ``env`` replaces ``os.environ`` for the lookup (tests pass an empty PATH). Raises ``CompileError`` naming what
    is missing.
    """
    env = dict(os.environ if env is None else env)
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if env.get(var):
            nvcc = Path(env[var]) / "bin" / "nvcc"
            if not _is_executable(nvcc):
                raise CompileError(f"{var}={env[var]} has no executable bin/nvcc", where="target cuda",
                                   fix=f"point {var} at a CUDA toolkit root, or unset it to use nvcc from PATH")
            return _describe(nvcc, env)
    found = shutil.which("nvcc", path=env.get("PATH", ""))
    if not found:
        raise CompileError("no CUDA toolkit: nvcc is not on PATH and CUDA_PATH is not set", where="target cuda",
                           fix=_NOT_FOUND_FIX)
    return _describe(Path(found), env)


def _is_executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def _describe(nvcc: Path, env: dict[str, str]) -> CudaToolkit:
    """Resolve a (possibly wrapper) nvcc to the real toolkit with ``nvcc -dryrun`` (prints ``_HERE_=<bin dir>``)."""
    try:
        dry = subprocess.run([str(nvcc), "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, env=env, timeout=60)
        ver = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CompileError(f"{nvcc} does not run: {e}", where="target cuda", fix=_NOT_FOUND_FIX) from e
    here = re.search(r"^#\$ _HERE_=(.+)$", dry.stdout + dry.stderr, re.M)
    m = re.search(r"release [\d.]+, V([\d.]+)", ver.stdout)
    if ver.returncode != 0 or not here or not m:
        raise CompileError(f"{nvcc} is not a working CUDA compiler driver: {(ver.stdout + ver.stderr).strip()[:300]}",
                           where="target cuda", fix=_NOT_FOUND_FIX)
    bindir = Path(here.group(1).strip()).resolve()
    real = bindir / "nvcc"
    if not _is_executable(real):
        raise CompileError(f"nvcc reports its directory as {bindir}, which has no nvcc", where="target cuda",
                           fix=_NOT_FOUND_FIX)
    return CudaToolkit(root=bindir.parent, nvcc=real, version=m.group(1))


# ---------------------------------------------------------------------------------------------------------------
# architectures


def _arch_key(arch: str) -> tuple[int, str]:
    m = re.fullmatch(r"sm_(\d+)([a-z]?)", arch)
    if not m:
        raise CompileError(f"bad CUDA architecture {arch!r}", where="--cuda-arch", fix="use e.g. sm_80, sm_90")
    return int(m.group(1)), m.group(2)


def codegen_arch(archs: tuple[str, ...]) -> str:
    """The arch TVM generates code for: the oldest requested one, so no kernel uses a feature another lacks."""
    return min(archs, key=_arch_key)


def tvm_target(archs: tuple[str, ...]):
    """The TVM target for ``archs`` (host: llvm), with the per-block limits every sm_80+ GPU has. MetaSchedule's
    CUDA rules refuse a target without ``max_threads_per_block`` (``--tune`` failed on it), dlight reads
    ``max_shared_memory_per_block`` where it stages data."""
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": codegen_arch(archs), "max_threads_per_block": 1024,
                              "max_shared_memory_per_block": 48 * 1024, "registers_per_block": 65536},
                             host=tvm.target.Target({"kind": "llvm"}))


def gencode_flags(archs: tuple[str, ...]) -> tuple[list[str], list[str], list[str]]:
    """(nvcc -gencode flags, SASS archs, PTX archs). PTX is the newest family asked for (``sm_90a`` → compute_90)."""
    sass = sorted(set(archs), key=_arch_key)
    flags: list[str] = []
    for a in sass:
        num, suffix = _arch_key(a)
        flags += ["-gencode", f"arch=compute_{num}{suffix},code=sm_{num}{suffix}"]
    ptx_num = max(_arch_key(a)[0] for a in sass)
    flags += ["-gencode", f"arch=compute_{ptx_num},code=compute_{ptx_num}"]
    return flags, sass, [f"compute_{ptx_num}"]


# ---------------------------------------------------------------------------------------------------------------
# compiling


@dataclass
class CudaImage:
    """One compiled device module: the fatbin that replaces one CUDA source module of the executable."""

    source: str
    fatbin: bytes
    kernels: dict[str, dict[str, int]]  # kernel name -> {sm_XX: SASS bytes}
    entries: list[dict]  # fatbin entries: kind, arch, bytes, compressed
    nvcc_s: float


@dataclass
class CudaBuild:
    """Every CUDA module of an executable compiled for ``archs``; ``pack_imports`` is export_library's hook."""

    toolkit: CudaToolkit
    archs: tuple[str, ...]
    flags: list[str]
    sass: list[str]
    ptx: list[str]
    images: list[CudaImage] = field(default_factory=list)

    def info(self) -> dict:
        """What the manifest records about the kernels (JSON-ready)."""
        kernels = {}
        for img in self.images:
            for name, per_arch in img.kernels.items():
                kernels[name] = per_arch
        blob = b"".join(img.fatbin for img in self.images)
        return {
            "compiler": "nvcc",
            "toolkit_version": self.toolkit.version,
            "format": "fatbin",
            "sass": list(self.sass),
            "ptx": list(self.ptx),
            "flags": list(self.flags),
            "nvcc_s": round(sum(img.nvcc_s for img in self.images), 3),
            "modules": len(self.images),
            "source_bytes": sum(len(img.source.encode()) for img in self.images),
            "image_bytes": len(blob),
            "image_sha256": hashlib.sha256(blob).hexdigest(),
            "entries": [e for img in self.images for e in img.entries],
            "num_kernels": len(kernels),
            "kernels": [{"name": n, "sass_bytes": kernels[n]} for n in sorted(kernels)],
        }

    def pack_imports(self, mod, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        """``export_library(fpack_imports=...)``: TVM's import blob with each CUDA source swapped for its image."""
        if is_system_lib or symbol_prefix:
            raise CompileError("CUDA images cannot be packed into a system library", where="export")
        from tvm_ffi import get_global_func

        blob = bytes(get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        new = replace_cuda_sources(blob, {img.source: img.fatbin for img in self.images})
        bin_path = Path(workspace_dir) / "devc.bin"
        bin_path.write_bytes(new)
        asm = Path(workspace_dir) / "devc.S"
        asm.write_text(_incbin_asm(_LIBRARY_BIN_SYMBOL, bin_path, len(new)))
        return str(asm)


def cuda_modules(executable) -> list:
    """Every module of kind ``cuda`` under the executable's module tree (depth first, deduplicated)."""
    root = getattr(executable, "mod", executable)
    found, seen, stack = [], [], [root]
    while stack:
        m = stack.pop()
        if any(m.same_as(s) for s in seen):
            continue
        seen.append(m)
        if m.kind == "cuda":
            found.append(m)
        stack.extend(reversed(list(m.imports)))
    return found


def kernel_names(source: str) -> list[str]:
    """``extern "C" __global__`` function names in generated CUDA source (declarations and definitions merged)."""
    return sorted(set(_GLOBAL_KERNEL.findall(source)))


def compile_executable(executable, archs: tuple[str, ...], toolkit: CudaToolkit | None = None) -> CudaBuild:
    """Compile every CUDA module of a TVM executable with nvcc for ``archs`` (``CompileError`` on any failure)."""
    toolkit = toolkit or find_toolkit()
    flags, sass, ptx = gencode_flags(archs)
    build = CudaBuild(toolkit, tuple(archs), [*NVCC_FLAGS, *flags], sass, ptx)
    for m in cuda_modules(executable):  # none when every op became a library call (a lone cuBLAS matmul)
        source = m.inspect_source()
        if "__global__" not in source:
            raise CompileError("the CUDA module holds no CUDA source (was it already compiled?)",
                               where="target cuda", fix="build with TVM_COMPILE_FORCE_FALLBACK=1 (bmc sets it)")
        build.images.append(compile_source(source, build, len(sass) + 1))
    return build


def compile_source(source: str, build: CudaBuild, jobs: int) -> CudaImage:
    """nvcc one CUDA source into a fatbin (``jobs`` gencode targets in parallel, capped by the CPU count) and check
    that every ``__global__`` kernel of the source has SASS for every requested arch."""
    threads = max(1, min(jobs, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="bmc-nvcc-") as tmp:  # removed on error and on Ctrl-C
        cu, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        cu.write_text(source)
        cmd = [str(build.toolkit.nvcc), "-fatbin", *build.flags, "--threads", str(threads), str(cu), "-o", str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=build.toolkit.env(), cwd=tmp)
        except OSError as e:
            raise CompileError(f"cannot run nvcc: {e}", where="target cuda", fix=_NOT_FOUND_FIX) from e
        nvcc_s = time.perf_counter() - t0
        if proc.returncode != 0:
            log = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[:40])
            raise CompileError(f"nvcc failed (exit {proc.returncode}) on the generated kernels for "
                               f"{', '.join(build.sass)}:\n{log}", where="target cuda",
                               fix="report this as a bmc bug with the log above; --target llvm avoids CUDA")
        fatbin = out.read_bytes()
    entries = fatbin_entries(fatbin)
    kernels: dict[str, dict[str, int]] = {}
    for e in entries:
        if e["kind"] == "elf" and not e["compressed"]:
            for name, size in elf_functions(e["data"]).items():
                kernels.setdefault(name, {})[e["arch"]] = size
    expected = kernel_names(source)
    missing = [(k, a) for k in expected for a in build.sass if a not in kernels.get(k, {})]
    if missing:
        raise CompileError(f"nvcc output lacks {len(missing)} kernel image(s), e.g. {missing[:3]}", where="target cuda")
    return CudaImage(source, fatbin, {k: kernels[k] for k in expected},
                     [{k: v for k, v in e.items() if k != "data"} for e in entries], nvcc_s)


# ---------------------------------------------------------------------------------------------------------------
# binary formats: fatbin container, cubin ELF, tvm-ffi library blob


def fatbin_entries(data: bytes, offset: int = 0) -> list[dict]:
    """Entries of one fatbin container: kind (elf/ptx), arch (sm_90 / compute_90), size, compressed, data."""
    magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", data, offset)
    if magic != FATBIN_MAGIC:
        raise ValueError("not a fatbin")
    pos, end, out = offset + hsize, offset + hsize + fsize, []
    while pos < end:
        kind, _v, ehsize, psize = struct.unpack_from("<HHIQ", data, pos)
        arch = struct.unpack_from("<I", data, pos + 28)[0]
        flags = struct.unpack_from("<Q", data, pos + 40)[0]
        name = _FATBIN_KIND.get(kind, str(kind))
        prefix = "sm" if name == "elf" else "compute"
        body = data[pos + ehsize: pos + ehsize + psize]
        compressed = bool(flags & 0x8000) or body[:4] == b"\x28\xb5\x2f\xfd"
        out.append({"kind": name, "arch": f"{prefix}_{arch}", "bytes": psize, "compressed": compressed,
                    "data": body})
        pos += ehsize + psize
    return out


def find_fatbins(data: bytes) -> list[list[dict]]:
    """Every fatbin container embedded in a binary (e.g. an exported library), parsed."""
    found, pos, magic = [], 0, struct.pack("<I", FATBIN_MAGIC)
    while (pos := data.find(magic, pos)) >= 0:
        try:
            found.append(fatbin_entries(data, pos))
        except (ValueError, struct.error):
            pass
        pos += 4
    return found


def elf_functions(elf: bytes) -> dict[str, int]:
    """Global function symbols of an ELF64 (a cubin) with their sizes: the kernels."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not an ELF64 image")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    out = {}
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        strtab = sections[sh[6]]
        for i in range(sh[5] // 24):
            st_name, st_info, _other, _shndx, _value, size = struct.unpack_from("<IBBHQQ", elf, sh[4] + 24 * i)
            if st_info & 0xF == 2 and st_info >> 4 == 1:  # STT_FUNC, STB_GLOBAL
                start = strtab[4] + st_name
                out[elf[start: elf.index(b"\0", start)].decode()] = size
    return out


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def vec(self) -> list[int]:
        n = self.u64()
        return [self.u64() for _ in range(n)]

    def bytes_(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.data):
            raise CompileError("corrupt TVM import blob (string past the end)", where="export")
        v = self.data[self.pos: self.pos + n]
        self.pos += n
        return v


def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def replace_cuda_sources(blob: bytes, images: dict[str, bytes]) -> bytes:
    """Rewrite a ``__tvm_ffi__library_bin`` blob: each ``cuda`` module with ``fmt="cuda"`` whose source is a key
    of ``images`` gets ``fmt="fatbin"`` and the image; its function table is kept byte for byte."""
    (nbytes,) = struct.unpack_from("<Q", blob, 0)
    if nbytes + 8 != len(blob):
        raise CompileError(f"TVM import blob is {len(blob)} bytes but says {nbytes + 8}", where="export")
    r = _Reader(blob[8:])
    indptr, children = r.vec(), r.vec()
    head = blob[8: 8 + r.pos]
    parts, replaced = [head], 0
    for _ in range(len(indptr) - 1):
        kind = r.bytes_()
        parts.append(_str(kind))
        if kind == b"_lib":
            continue
        payload = r.bytes_()
        if kind == b"cuda":
            payload = _swap_cuda_payload(payload, images)
            replaced += 1
        parts.append(_str(payload))
    if r.pos != len(r.data) or len(children) != indptr[-1]:
        raise CompileError("unexpected TVM import blob layout (trailing bytes)", where="export")
    if replaced != len(images):
        raise CompileError(f"found {replaced} CUDA module(s) in the library blob, compiled {len(images)}",
                           where="export")
    body = b"".join(parts)
    return struct.pack("<Q", len(body)) + body


def _swap_cuda_payload(payload: bytes, images: dict[str, bytes]) -> bytes:
    r = _Reader(payload)
    fmt = r.bytes_()
    if fmt != b"cuda":
        raise CompileError(f"CUDA module already holds {fmt.decode(errors='replace')!r}, not source",
                           where="export", fix="build with TVM_COMPILE_FORCE_FALLBACK=1 (bmc sets it)")
    rest = payload[r.pos:]
    for source, image in images.items():
        code = _str(source.encode())
        if rest.endswith(code):
            return _str(b"fatbin") + rest[: len(rest) - len(code)] + _str(image)
    raise CompileError("a CUDA module in the library blob does not match any compiled source", where="export")


def _incbin_asm(symbol: str, path: Path, size: int) -> str:
    return (f'\t.section .rodata.{symbol},"a"\n\t.globl {symbol}\n\t.type {symbol}, @object\n\t.balign 16\n'
            f'{symbol}:\n\t.incbin "{path}"\n\t.size {symbol}, {size}\n'
            '\t.section .note.GNU-stack,"",@progbits\n')


# ---------------------------------------------------------------------------------------------------------------
# build-time environment and driver stub (for reload checks on machines without a GPU driver)


@contextlib.contextmanager
def codegen_env():
    """Keep TVM's CUDA codegen from JIT-compiling where the CUDA runtime is loaded (module stays source)."""
    old = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TVM_COMPILE_FORCE_FALLBACK", None)
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = old


def runtime_cuda_library() -> Path:
    """``libtvm_runtime_cuda.so`` of the installed TVM (found next to libtvm_runtime)."""
    import tvm.libinfo

    return Path(tvm.libinfo.find_libtvm_runtime()).resolve().parent / "libtvm_runtime_cuda.so"


def write_stub_libcuda(directory: Path, cc: str = "gcc") -> Path:
    """Build a ``libcuda.so.1`` whose every driver entry point TVM's CUDA runtime imports returns 100
    (CUDA_ERROR_NO_DEVICE): enough for ``load_module`` to register the cuda loader without a GPU."""
    directory.mkdir(parents=True, exist_ok=True)
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(runtime_cuda_library())], capture_output=True,
                        text=True, check=True)
    syms = sorted({ln.split()[-1].split("@")[0] for ln in nm.stdout.splitlines()
                   if re.search(r"\bcu[A-Z]\w*$", ln.split()[-1].split("@")[0])})
    src = directory / "stub_libcuda.c"
    src.write_text("".join(f"int {s}(void) {{ return 100; }}\n" for s in syms))
    out = directory / "libcuda.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(src)], check=True)
    return out
