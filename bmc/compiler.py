"""The compile driver: ONNX → IR → (single-device plan) → TVM → ``.bmc`` artifact."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Mapping, Sequence

from bmc.errors import UsageError
from bmc.ir.graph import Graph
from bmc.ir.passes import run_passes
from bmc.ir.verify import verify
from bmc.ops import infer_types


def verify_graph(graph: Graph) -> None:
    """Structural and type verification against the op table."""
    verify(graph, infer_types)


def signature_of(graph: Graph) -> dict:
    def entry(v):
        return {"name": v.name, "dtype": v.type.dtype, "shape": list(v.type.shape)}

    return {"inputs": [entry(v) for v in graph.inputs], "outputs": [entry(v) for v in graph.outputs],
            "params": [entry(v) for v in graph.params]}


def single_device_plan(graph: Graph) -> dict:
    """The trivial plan (everything replicated on one device) in the plan.json format the sharding issue extends."""
    return {"mesh": {"shape": [1], "axes": ["x"]}, "strategy": "single-device", "collectives": [],
            "values": {v.name: {"shape": list(v.type.shape), "dtype": v.type.dtype, "spec": "[]",
                                "origin": "default"} for v in graph.values() if v.producer is None},
            "weight_bytes": graph.weight_bytes(), "op_counts": graph.op_counts()}


def _check_output_path(model, output) -> Path:
    out = Path(output)
    if isinstance(model, (str, Path)) and Path(model).resolve() == out.resolve():
        raise UsageError("the output path is the input model", where="-o/--output",
                         fix="write the artifact to a new path, e.g. model.bmc")
    return out


def compile_model(model, output, *, target: str = "llvm", cuda_archs: Sequence[str] = ("sm_90",),
                  input_shapes: Mapping[str, Sequence[int] | int] | None = None,
                  dump_dir: str | Path | None = None, mesh=None) -> dict:
    """Compile ``model`` (path, bytes or ModelProto) into the artifact at ``output``; returns a summary dict."""
    from bmc.codegen.targets import TargetSpec
    from bmc.frontend.onnx import import_model

    out = _check_output_path(model, output)
    if mesh is not None and mesh.size > 1:
        raise UsageError(f"mesh {mesh} has {mesh.size} devices, but this bmc compiles for one device only: "
                         "sharding and the MPI runtime are not implemented yet", where="--mesh",
                         fix="compile with --mesh 1 (the default)")
    spec = TargetSpec.parse(target, tuple(cuda_archs))
    if spec.kind == "cuda":  # FAILURES.md 30: a missing toolkit is reported before any work
        from bmc.codegen.cuda import find_toolkit

        find_toolkit()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    graph = import_model(model, input_shapes)
    timings["import_s"] = time.perf_counter() - t0
    graph = run_passes(graph, [], verify=verify_graph, dump_dir=dump_dir)
    verify_graph(graph)

    from bmc.codegen.build import build
    from bmc.runtime.artifact import write_artifact

    built = build(graph, spec)
    timings.update(built.timings)
    t0 = time.perf_counter()
    source = _source_info(model)
    path = write_artifact(
        out, signature=signature_of(graph),
        weights=[(p.name, graph.weights[p.name].numpy) for p in graph.params],
        export_library=built.export, target=spec.to_json(), source=source, plan=single_device_plan(graph),
        extra={"kernels": built.kernels} if built.kernels else None)
    timings["package_s"] = time.perf_counter() - t0
    return {"output": str(path), "target": spec.to_json(), "nodes": len(graph.nodes), "ops": graph.op_counts(),
            "weight_bytes": graph.weight_bytes(), "timings": timings,
            "size_bytes": sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())}


def _source_info(model) -> dict:
    if isinstance(model, (str, Path)):
        p = Path(model)
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return {"model": p.name, "sha256": h.hexdigest()}
    return {"model": "<in-memory>"}
