"""Relax IRModule → compiled library, per target, with fusion on and a place for schedule rules."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax

from bmc.codegen.relax_module import to_relax
from bmc.codegen.targets import TargetSpec
from bmc.errors import CompileError
from bmc.ir.graph import Graph


@dataclass
class Built:
    """A compiled program, ready to export into an artifact."""

    executable: object
    target: TargetSpec
    timings: dict[str, float] = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)  # per-target kernel info (e.g. compiled CUDA images)

    def export(self, path: Path) -> None:
        self.executable.export_library(str(path))


def cpu_pipeline(target) -> tvm.transform.Pass:
    """LLVM: decompose inference ops, legalize, fold, fuse; CPU schedule rules slot in after FuseTIR."""
    return tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.get_default_pipeline(target),
    ])


def gpu_pipeline(target) -> tvm.transform.Pass:
    """CUDA: the same front half, then dlight GPU rules (matmul, GEMV, reductions, fallback last)."""
    from tvm.s_tir import dlight as dl

    return tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                dl.gpu.Fallback()),
    ])


def build(graph: Graph, target: TargetSpec) -> Built:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    mod = to_relax(graph)
    timings["to_relax_s"] = time.perf_counter() - t0
    tvm_target = target.tvm_target()
    t0 = time.perf_counter()
    try:
        if target.kind == "llvm":
            ex = tvm.compile(mod, target=tvm_target, relax_pipeline=cpu_pipeline(tvm_target))
        else:
            with tvm_target:
                mod = gpu_pipeline(tvm_target)(mod)
            ex = tvm.compile(mod, target=tvm_target)
    except Exception as e:  # noqa: BLE001  (TVM raises TVMError/ValueError/...)
        raise CompileError(f"TVM failed to compile graph {graph.name} for {target.kind}: {e}",
                           where=f"target {target.kind}") from e
    timings["tvm_compile_s"] = time.perf_counter() - t0
    return Built(ex, target, timings)
