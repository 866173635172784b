"""Compilation targets: the host CPU (LLVM) and NVIDIA GPUs (CUDA)."""

from __future__ import annotations

from dataclasses import dataclass

from bmc.errors import UsageError

CUDA_ARCHS = ("sm_80", "sm_90", "sm_90a")


@dataclass(frozen=True)
class TargetSpec:
    """What the user asked for: ``llvm`` (host CPU) or ``cuda`` with one or more SM architectures."""

    kind: str
    archs: tuple[str, ...] = ()
    mcpu: str = ""

    @classmethod
    def parse(cls, text: str, cuda_archs: tuple[str, ...] = ("sm_90",)) -> "TargetSpec":
        kind = text.strip().lower()
        if kind == "llvm":
            return cls("llvm", mcpu=host_cpu())
        if kind == "cuda":
            bad = [a for a in cuda_archs if a not in CUDA_ARCHS]
            if bad or not cuda_archs:
                raise UsageError(f"unknown CUDA architecture(s) {', '.join(bad) or '(none)'}", where="--cuda-arch",
                                 fix=f"use one or more of {', '.join(CUDA_ARCHS)}")
            return cls("cuda", archs=tuple(cuda_archs))
        raise UsageError(f"unknown target {text!r}", where="--target", fix="use llvm or cuda")

    def tvm_target(self):
        import tvm

        if self.kind == "llvm":
            return tvm.target.Target({"kind": "llvm", "mcpu": self.mcpu, "num-cores": 1})
        host = tvm.target.Target({"kind": "llvm"})
        return tvm.target.Target({"kind": "cuda", "arch": self.archs[0]}, host=host)

    def to_json(self) -> dict:
        return {"kind": self.kind, "archs": list(self.archs), "mcpu": self.mcpu}


def host_cpu() -> str:
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())
