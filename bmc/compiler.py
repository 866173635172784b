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


STRATEGIES = ("auto", "replicate", "dp", "megatron", "dp+megatron")


def import_graph(model, input_shapes=None, dtype: str = "float32", dump_dir: str | Path | None = None) -> Graph:
    """ONNX → verified bmc IR, in ``dtype`` (float32 models can run in float16/bfloat16)."""
    from bmc.frontend.onnx import import_model
    from bmc.ir.passes import Pass
    from bmc.ops.fusion import fuse_attention
    from bmc.ops.precision import convert_float32

    passes = [Pass("fuse_attention", fuse_attention)]
    if dtype != "float32":
        passes.append(Pass(f"convert_to_{dtype}", lambda g: convert_float32(g, dtype)))
    return run_passes(import_model(model, input_shapes), passes, verify=verify_graph, dump_dir=dump_dir)


def plan_model(model, *, mesh, shard: Mapping | None = None, strategy: str | None = None,
               input_shapes: Mapping[str, Sequence[int] | int] | None = None, dump_dir: str | Path | None = None,
               dtype: str = "float32", device: str = "h100", memory_per_device: int | None = None,
               mesh_bandwidth: str | None = None, time_limit_s: float = 20.0, warn=None):
    """Import and plan without code generation: ``(global graph, local program, plan.json dict)``.

    ``strategy`` is ``auto`` (the ILP search; the default on a mesh of several devices), or a named manual plan whose
    annotations ``shard`` extends (``shard`` wins), completed by propagation. Every plan is priced by one cost model
    (``device`` profile; mesh links from ``mesh_bandwidth`` or the 8-GPUs-per-node defaults)."""
    from bmc.sharding.cost import parse_device, parse_mesh_bandwidth, plan_cost, with_links
    from bmc.sharding.partition import partition
    from bmc.sharding.propagate import propagate
    from bmc.sharding.report import plan_json

    if isinstance(mesh, str):
        from bmc.sharding.mesh import Mesh

        mesh = Mesh.parse(mesh)
    strategy = strategy or ("auto" if mesh.size > 1 and not shard else None)
    if strategy and strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}", where="--strategy", fix=f"use one of {STRATEGIES}")
    profile = parse_device(device)
    mesh = with_links(mesh, parse_mesh_bandwidth(mesh_bandwidth, mesh) if mesh_bandwidth else None)
    budget = memory_per_device or profile.memory_bytes
    graph = import_graph(model, input_shapes, dtype, dump_dir)
    stats = None
    if strategy == "auto":
        from bmc.sharding.auto import auto_plan

        plan, stats = auto_plan(graph, mesh, shard or {}, device=profile, memory_per_device=budget,
                                time_limit_s=time_limit_s)
        for w in stats.get("warnings", []):
            (warn or _warn)(w)
    else:
        annotations = {}
        if strategy:
            from bmc.sharding.manual import named_strategy

            try:
                annotations = named_strategy(graph, strategy, mesh.names)
            except ValueError as e:
                raise UsageError(str(e), where="--strategy", fix="use a mesh with two axes, e.g. --mesh 2x2") from None
        annotations.update(shard or {})
        plan = propagate(graph, mesh, annotations)
    prog = partition(graph, plan)
    verify_graph(prog.graph)
    data = plan_json(prog, plan_cost(graph, plan, profile), budget, profile.name)
    data["strategy"] = strategy or "propagation"
    if stats is not None:
        data["solver"] = stats
    return graph, prog, data


def _warn(message: str) -> None:
    import sys

    print(f"bmc: warning: {message}", file=sys.stderr)


def compile_model(model, output, *, target: str = "llvm", cuda_archs: Sequence[str] = ("sm_90",),
                  input_shapes: Mapping[str, Sequence[int] | int] | None = None,
                  dump_dir: str | Path | None = None, mesh=None, shard: Mapping | None = None,
                  strategy: str | None = None, dtype: str = "float32", tune_trials: int = 0,
                  tune_db: str | Path | None = None, tune_export: str | Path | None = None,
                  **plan_options) -> dict:
    """Compile ``model`` (path, bytes or ModelProto) into the artifact at ``output``; returns a summary dict.
    With a mesh of more than one device (or ``shard`` annotations) the program is the partitioned SPMD program and
    every rank gets its own weight shards."""
    from bmc.codegen.targets import TargetSpec
    from bmc.sharding.mesh import Mesh

    out = _check_output_path(model, output)
    spec = TargetSpec.parse(target, tuple(cuda_archs))
    mesh = Mesh.parse(mesh) if isinstance(mesh, str) else mesh if mesh is not None else Mesh.parse("1")
    if spec.kind == "cuda":  # FAILURES.md 30: a missing toolkit is reported before any work
        from bmc.codegen.cuda import find_toolkit

        find_toolkit()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sharded = mesh.size > 1 or bool(shard)
    if sharded:
        graph, prog, plan = plan_model(model, mesh=mesh, shard=shard, strategy=strategy, input_shapes=input_shapes,
                                       dump_dir=dump_dir, dtype=dtype, **plan_options)
        program = prog.graph
    else:
        graph = import_graph(model, input_shapes, dtype, dump_dir)
        program, plan = graph, single_device_plan(graph)
    timings["import_and_plan_s"] = time.perf_counter() - t0

    from bmc.codegen.build import build
    from bmc.runtime.artifact import write_artifact

    built = build(program, spec, tune_trials=tune_trials, tune_db=tune_db, tune_export=tune_export)
    timings.update(built.timings)
    t0 = time.perf_counter()
    extra = {"kernels": built.kernels} if built.kernels else {}
    if sharded:
        from bmc.sharding.layout import ShardTensor
        from bmc.sharding.partition import MESH_COORD

        extra["implicit_inputs"] = [MESH_COORD]
        weights = {rank: [(p.name, program.weights[p.name].at(mesh.coordinate(rank)).numpy)
                          if isinstance(program.weights[p.name], ShardTensor) else
                          (p.name, program.weights[p.name].numpy) for p in program.params]
                   for rank in range(mesh.size)}
    else:
        weights = [(p.name, program.weights[p.name].numpy) for p in program.params]
    path = write_artifact(
        out, signature=signature_of(program), weights=weights, export_library=built.export,
        target=spec.to_json(), source=_source_info(model), plan=plan, extra=extra or None, mesh=mesh.to_json())
    timings["package_s"] = time.perf_counter() - t0
    plan_text = None
    if sharded:
        from bmc.sharding.report import format_plan

        plan_text = format_plan(prog, plan)
    return {"output": str(path), "target": spec.to_json(), "nodes": len(program.nodes), "ops": program.op_counts(),
            "plan_text": plan_text,
            "weight_bytes": graph.weight_bytes(), "timings": timings, "mesh": mesh.to_json(),
            "collectives": len(plan.get("collectives", [])),
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
