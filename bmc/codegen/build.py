"""Relax IRModule → compiled library, per target, with fusion on and a place for schedule rules."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax

from bmc.codegen.relax_module import to_relax
from bmc.codegen.rewrite import owned_outputs
from bmc.codegen.targets import TargetSpec
from bmc.errors import BmcError, CompileError
from bmc.ir.graph import Graph


@dataclass
class Built:
    """A compiled program, ready to export into an artifact."""

    executable: object
    target: TargetSpec
    timings: dict[str, float] = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)  # per-target kernel info (e.g. compiled CUDA images)
    device_code: object = field(default=None, repr=False)  # cuda: bmc.codegen.cuda.CudaBuild (the nvcc images)
    donated: object = None  # bmc.codegen.inplace.Donated: the donated inputs written in place, and why not others

    @property
    def packed_weights(self) -> dict:
        """Weights the program reads packed (name → stored transposed): ``bmc.runtime.kernels.pack_params``."""
        return self.kernels.get("cpu", {}).get("packed_weights", {})

    def export(self, path: Path) -> None:
        if self.device_code is not None and self.device_code.images:  # cuda: link the nvcc images, not the source
            self.executable.export_library(str(path), fpack_imports=self.device_code.pack_imports)
        else:
            self.executable.export_library(str(path))


def cpu_pipeline(target, record: dict | None = None, tune=None) -> tvm.transform.Pass:
    """LLVM: decompose inference ops, offload matmuls to BLAS, legalize, fold, fuse, CPU schedule rules, lower.

    The pieces live in :mod:`bmc.codegen.cpu`; ``record`` receives the per-op kernel choices (for the manifest).
    """
    from bmc.codegen import cpu

    return cpu.cpu_pipeline(target, record, tune=tune)


def gpu_pipeline(target, record: dict | None = None, tune=None) -> tvm.transform.Pass:
    """CUDA: see :func:`bmc.codegen.gpu.gpu_pipeline`."""
    from bmc.codegen import gpu

    return gpu.gpu_pipeline(target, record, tune)


def _require_gpu_for_tuning() -> None:
    """MetaSchedule measures every candidate kernel on the device: CUDA tuning needs a GPU in this process."""
    try:
        from bmc.runtime.cuda import device_count, enable

        enable()
        count = device_count()
    except Exception:  # noqa: BLE001  (no driver: TVM's CUDA runtime does not load)
        count = 0
    if count == 0:
        from bmc.errors import UsageError

        raise UsageError("--tune with --target cuda measures kernels on a GPU, and this machine has none",
                         where="--tune", fix="compile without --tune here (the kernels keep their dlight "
                                             "schedules), or compile with --tune on a machine with a GPU")


def _tuning(target: TargetSpec, tvm_target, trials: int, db: Path | str | None, export: Path | str | None,
            record: dict):
    """The MetaSchedule pass for :func:`build`, or None: tune in this process (``trials``), export candidates to be
    measured elsewhere (``export``), or only apply the database (``db`` given, no trials)."""
    if export is not None and trials <= 0:
        from bmc.errors import UsageError

        raise UsageError("exporting tuning candidates needs trials to sample", where="--tune-export",
                         fix="add --tune N (tune_trials=N), N > 0")
    if trials <= 0 and db is None:
        return None
    from bmc.codegen.tune import CandidateExport, tune_pass

    if export is not None:
        export = CandidateExport(Path(export), target.archs)
    elif target.kind == "cuda" and trials > 0:
        _require_gpu_for_tuning()
    return tune_pass(tvm_target, trials, Path(db) if db is not None else None, record, export=export)


def build(graph: Graph, target: TargetSpec, *, threads: int | None = None, tune_trials: int = 0,
          tune_db: Path | str | None = None, tune_export: Path | str | None = None, donate=(),
          sharded: bool = False) -> Built:
    """Compile ``graph`` for ``target``. llvm: ``threads`` sizes the BLAS/TVM thread pools of this process (the
    in-process VM that tests build right after; an artifact's loader sizes its own), ``None`` keeps the default.
    ``tune_trials > 0`` tunes the TVM kernels with MetaSchedule (:mod:`bmc.codegen.tune`; cuda: on this machine's
    GPU), reusing and extending the JSON database in ``tune_db`` (default ``~/.cache/bmc/tuning/<target hash>/``);
    with ``tune_export`` the candidates are written there instead, to be measured on another machine
    (``bmc tune measure``) and imported into the database (``bmc tune import``); ``tune_db`` alone applies the
    database's schedules. ``donate`` names inputs the program may write over (:mod:`bmc.codegen.inplace`;
    ``sharded``: ``graph`` is a partitioned program, for the reasons given when one cannot be)."""
    from bmc.codegen.inplace import donated_updates

    donated = donated_updates(graph, donate, sharded)
    timings: dict[str, float] = {}
    cpu_record: dict = {}
    cuda_record: dict = {}
    t0 = time.perf_counter()
    lowered_kernels: set[str] = set()
    mod = to_relax(graph, target.kind, lowered_kernels, donated.updates)
    if target.kind == "llvm" and lowered_kernels:  # (a pass that replaces all of a kernel's calls drops it)
        cpu_record["requires"] = sorted(lowered_kernels)
    timings["to_relax_s"] = time.perf_counter() - t0
    tvm_target = target.tvm_target()
    t0 = time.perf_counter()
    try:
        if target.kind == "llvm":
            tune = _tuning(target, tvm_target, tune_trials, tune_db, tune_export, cpu_record)
            ex = tvm.compile(mod, target=tvm_target, relax_pipeline=cpu_pipeline(tvm_target, cpu_record, tune=tune))
        else:
            from bmc.codegen import cuda

            toolkit = cuda.find_toolkit()  # fail before any TVM work when nvcc is missing
            tvm_target = cuda.tvm_target(target.archs)
            tune = _tuning(target, tvm_target, tune_trials, tune_db, tune_export, cuda_record)
            with tvm_target:
                mod = gpu_pipeline(tvm_target, cuda_record, tune)(mod)
                lowering = tvm.transform.Sequential([relax.get_default_pipeline(tvm_target),
                                                     owned_outputs(cuda_record)])
            with cuda.codegen_env():
                ex = tvm.compile(mod, target=tvm_target, relax_pipeline=lowering)
    except BmcError:
        raise
    except Exception as e:  # noqa: BLE001  (TVM raises TVMError/ValueError/...)
        raise CompileError(f"TVM failed to compile graph {graph.name} for {target.kind}: {e}",
                           where=f"target {target.kind}") from e
    timings["tvm_compile_s"] = time.perf_counter() - t0
    if target.kind == "llvm":
        if cpu_record.get("requires"):
            # the in-process VM (bmc.testing.compiled, the ONNX backend) is built right after: make the kernels
            # resolvable now; a loader in another process calls register_cpu_kernels itself
            from bmc.runtime.kernels import register_cpu_kernels

            register_cpu_kernels(threads=threads)
        from bmc.codegen.cpu import simd_features

        return Built(ex, target, timings, {"cpu": {"mcpu": target.mcpu, "features": simd_features(tvm_target),
                                                   **cpu_record}}, donated=donated)
    if lowered_kernels:
        cuda_record["requires"] = sorted(set(cuda_record.get("requires", [])) | lowered_kernels)
    device_code = cuda.compile_executable(ex, target.archs, toolkit)
    timings["nvcc_s"] = sum(img.nvcc_s for img in device_code.images)
    return Built(ex, target, timings, {"cuda": {**device_code.info(), **cuda_record}}, device_code, donated)
