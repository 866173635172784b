"""The compile driver: ONNX → IR → (single-device plan) → TVM → ``.bmc`` artifact."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

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
               dtype: str = "float32", **plan_options):
    """Import and plan without code generation: ``(global graph, local program, plan.json dict)``; see
    :func:`plan_graph` for the options."""
    graph = import_graph(model, input_shapes, dtype, dump_dir)
    return (graph, *plan_graph(graph, mesh=mesh, shard=shard, strategy=strategy, **plan_options))


def plan_graph(graph: Graph, *, mesh, shard: Mapping | None = None, strategy: str | None = None,
               device: str = "h100", memory_per_device: int | None = None, mesh_bandwidth: str | None = None,
               time_limit_s: float = 20.0, warn=None):
    """Plan and partition an imported graph: ``(local program, plan.json dict)``.

    ``strategy`` is ``auto`` (the ILP search; the default on a mesh of several devices), or a named manual plan whose
    annotations ``shard`` extends (``shard`` wins), completed by propagation. Every plan is priced by one cost model
    (``device`` profile; mesh links from ``mesh_bandwidth`` or the 8-GPUs-per-node defaults)."""
    from bmc.sharding.cost import plan_cost
    from bmc.sharding.partition import partition
    from bmc.sharding.propagate import propagate
    from bmc.sharding.report import plan_json

    if isinstance(mesh, str):
        from bmc.sharding.mesh import Mesh

        mesh = Mesh.parse(mesh)
    strategy = strategy or ("auto" if mesh.size > 1 and not shard else None)
    if strategy and strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}", where="--strategy", fix=f"use one of {STRATEGIES}")
    profile, mesh = _cost_model(mesh, device, mesh_bandwidth)
    budget = memory_per_device or profile.memory_bytes
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
    return prog, data


def _cost_model(mesh, device: str, mesh_bandwidth: str | None):
    """The device profile and ``mesh`` with its links (``--mesh-bandwidth`` or the defaults)."""
    from bmc.sharding.cost import parse_device, parse_mesh_bandwidth, with_links

    return parse_device(device), with_links(mesh, parse_mesh_bandwidth(mesh_bandwidth, mesh) if mesh_bandwidth
                                            else None)


def _warn(message: str) -> None:
    import sys

    print(f"bmc: warning: {message}", file=sys.stderr)


def compile_model(model, output, *, target: str = "llvm", cuda_archs: Sequence[str] = ("sm_90",),
                  input_shapes: Mapping[str, Sequence[int] | int] | None = None,
                  dump_dir: str | Path | None = None, mesh=None, shard: Mapping | None = None,
                  strategy: str | None = None, dtype: str = "float32", tune_trials: int = 0,
                  tune_db: str | Path | None = None, tune_export: str | Path | None = None,
                  stages: int = 1, microbatches: int = 1, **plan_options) -> dict:
    """Compile ``model`` (path, bytes or ModelProto) into the artifact at ``output``; returns a summary dict.
    With a mesh of more than one device (or ``shard`` annotations) the program is the partitioned SPMD program and
    every rank gets its own weight shards. ``stages`` > 1 cuts the model into pipeline stages, each planned on its
    submesh (:mod:`bmc.sharding.pipeline`), run ``microbatches`` at a time (the inputs' first dim split evenly)."""
    from bmc.codegen.targets import TargetSpec
    from bmc.runtime.artifact import write_artifact

    out = _check_output_path(model, output)
    spec = TargetSpec.parse(target, tuple(cuda_archs))
    mesh = _mesh(mesh)
    _check_pipeline_flags(mesh, stages, microbatches)
    if spec.kind == "cuda":  # FAILURES.md 30: a missing toolkit is reported before any work
        from bmc.codegen.cuda import find_toolkit

        find_toolkit()
    t0 = time.perf_counter()
    graph = import_graph(model, input_shapes, dtype, dump_dir)
    if stages > 1:
        micro = graph if microbatches == 1 else _microbatch_graph(model, graph, microbatches, dtype)
        pipe = plan_pipeline(micro, mesh=mesh, stages=stages, microbatches=microbatches, shard=shard,
                             strategy=strategy, **plan_options)
        planned, plan = pipe.planned, pipe.plan_json()
    else:
        planned = [_plan(graph, mesh, shard or {}, strategy, plan_options)]
        plan = planned[0].plan
    timings = {"import_and_plan_s": time.perf_counter() - t0}
    programs = [_build(p, spec, tune_trials=tune_trials, tune_db=tune_db, tune_export=tune_export,
                       timings=timings) for p in planned]
    if stages > 1:
        pipeline = {"stages": [{"program": f"stage{st.index}", "ranks": ranks, "mesh": p.mesh.to_json(),
                                "signature": signature_of(p.graph), "nodes": [st.start, st.end], "sends": st.sends,
                                **c.extra} for st, ranks, p, c in zip(pipe.cuts, pipe.ranks, planned, programs)],
                    "microbatches": microbatches}
        signature = {**signature_of(graph), "params": []}
        exports = {f"stage{i}": c.built.export for i, c in enumerate(programs)}
        weights = {rank: c.weights[local] for c, ranks in zip(programs, pipe.ranks)
                   for local, rank in enumerate(ranks)}
        extra, plan_text = None, pipe.text()
    else:
        (p,), (c,) = planned, programs
        pipeline, signature, exports, extra, plan_text = None, signature_of(p.graph), c.built.export, c.extra, \
            p.plan_text
        weights = dict(enumerate(c.weights)) if p.sharded else c.weights[0]
    t0 = time.perf_counter()
    path = write_artifact(
        out, signature=signature, weights=weights, export_library=exports, target=spec.to_json(),
        source=_source_info(model), plan=plan, extra=extra or None, mesh=mesh.to_json(), pipeline=pipeline)
    timings["package_s"] = time.perf_counter() - t0
    return {"output": str(path), "target": spec.to_json(), "nodes": sum(len(p.graph.nodes) for p in planned),
            "ops": _merged_counts(p.graph.op_counts() for p in planned), "plan_text": plan_text,
            "weight_bytes": graph.weight_bytes(), "timings": timings, "mesh": mesh.to_json(),
            "stages": [[st.start, st.end] for st in pipe.cuts] if stages > 1 else None,
            "collectives": sum(len(p.plan.get("collectives", [])) for p in planned),
            "size_bytes": sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())}


def _mesh(mesh):
    from bmc.sharding.mesh import Mesh

    return Mesh.parse(mesh) if isinstance(mesh, str) else mesh if mesh is not None else Mesh.parse("1")


def _check_pipeline_flags(mesh, stages: int, microbatches: int) -> None:
    """Refuse bad --stages / --microbatches before any work."""
    if microbatches < 1 or (microbatches > 1 and stages == 1):
        raise UsageError(f"--microbatches {microbatches} needs a positive number and --stages 2 or more",
                         where="--microbatches", fix="add --stages N (N > 1), or leave --microbatches out")
    if stages != 1:
        from bmc.sharding.pipeline import stage_mesh

        stage_mesh(mesh, stages)


@dataclass
class _Planned:
    """One program, planned: the graph to build (the partitioned SPMD program when sharded), its plan.json."""

    graph: Graph
    plan: dict
    mesh: Any
    sharded: bool
    plan_text: str | None


def _plan(graph: Graph, mesh, shard: Mapping, strategy: str | None, plan_options: Mapping) -> _Planned:
    if not (mesh.size > 1 or shard):
        return _Planned(graph, single_device_plan(graph), mesh, False, None)
    from bmc.sharding.report import format_plan

    prog, plan = plan_graph(graph, mesh=mesh, shard=shard, strategy=strategy, **plan_options)
    return _Planned(prog.graph, plan, mesh, True, format_plan(prog, plan))


@dataclass
class _Compiled:
    """One program, built: the build, each of its ranks' weights, its manifest keys (kernels, implicit_inputs)."""

    built: Any
    weights: list[list]  # per rank of its mesh: [(param name, provider)]
    extra: dict


def _build(p: _Planned, spec, *, tune_trials: int, tune_db, tune_export, timings: dict) -> _Compiled:
    from bmc.codegen.build import build

    program = p.graph
    built = build(program, spec, tune_trials=tune_trials, tune_db=tune_db, tune_export=tune_export)
    for k, v in built.timings.items():
        timings[k] = timings.get(k, 0.0) + v
    extra = {"kernels": built.kernels} if built.kernels else {}
    if not p.sharded:
        return _Compiled(built, [[(w.name, program.weights[w.name].numpy) for w in program.params]], extra)
    from bmc.sharding.layout import ShardTensor
    from bmc.sharding.partition import MESH_COORD

    extra["implicit_inputs"] = [MESH_COORD]
    weights = [[(w.name, program.weights[w.name].at(p.mesh.coordinate(rank)).numpy)
                if isinstance(program.weights[w.name], ShardTensor) else
                (w.name, program.weights[w.name].numpy) for w in program.params]
               for rank in range(p.mesh.size)]
    return _Compiled(built, weights, extra)


@dataclass
class PipelinePlan:
    """A graph cut into stages (:class:`bmc.sharding.pipeline.Stage`), each planned on its submesh."""

    cuts: list
    planned: list[_Planned]
    ranks: list[list[int]]  # per stage, its world ranks
    submesh: Any
    microbatches: int

    def plan_json(self) -> dict:
        """plan.json of a pipeline artifact: the cut, then each stage's own plan."""
        return {"pipeline": {"stages": [st.to_json() for st in self.cuts], "microbatches": self.microbatches,
                             "submesh": self.submesh.to_json()},
                "stages": [p.plan for p in self.planned]}

    def text(self) -> str:
        lines = []
        for st, ranks, p in zip(self.cuts, self.ranks, self.planned):
            sends = ", ".join(st.sends) or "(nothing)"
            lines.append(f"stage {st.index}: nodes {st.start}-{st.end - 1}, ranks {ranks} (mesh {self.submesh}), "
                         f"{len(p.graph.params)} weights, sends {sends} ({st.send_bytes} B)")
            if p.plan_text:
                lines += ["  " + line for line in p.plan_text.splitlines()]
        return "\n".join(lines)


def plan_pipeline(graph: Graph, *, mesh, stages: int, microbatches: int = 1, shard: Mapping | None = None,
                  strategy: str | None = None, **plan_options) -> PipelinePlan:
    """Cut ``graph`` (imported at the microbatch's shapes) into ``stages`` and plan each on its submesh."""
    from bmc.sharding.pipeline import split_stages, stage_mesh

    mesh = _mesh(mesh)
    _check_pipeline_flags(mesh, stages, microbatches)
    shard = shard or {}
    profile, linked = _cost_model(mesh, plan_options.get("device", "h100"), plan_options.get("mesh_bandwidth"))
    sub = stage_mesh(linked, stages)
    cuts = split_stages(graph, stages, device=profile, mesh=linked)
    names = [{v.name for v in st.graph.values()} for st in cuts]
    unknown = sorted(set(shard) - set().union(*names))
    if unknown:
        raise UsageError(f"--shard names {', '.join(map(repr, unknown))}, which no stage has", where="--shard",
                         fix="name graph inputs, weights or values of the model (see `bmc plan`)")
    planned = [_plan(st.graph, sub, {k: v for k, v in shard.items() if k in have}, strategy, plan_options)
               for st, have in zip(cuts, names)]
    ranks = [list(range(st.index * sub.size, (st.index + 1) * sub.size)) for st in cuts]
    return PipelinePlan(cuts, planned, ranks, sub, microbatches)


def plan_pipeline_model(model, *, mesh, stages: int, microbatches: int = 1, shard: Mapping | None = None,
                        strategy: str | None = None, input_shapes=None, dtype: str = "float32",
                        **plan_options) -> PipelinePlan:
    """Import ``model`` and plan it in pipeline stages (``bmc plan --stages``), without code generation."""
    mesh = _mesh(mesh)
    _check_pipeline_flags(mesh, stages, microbatches)
    graph = import_graph(model, input_shapes, dtype)
    micro = graph if microbatches == 1 else _microbatch_graph(model, graph, microbatches, dtype)
    return plan_pipeline(micro, mesh=mesh, stages=stages, microbatches=microbatches, shard=shard, strategy=strategy,
                         **plan_options)


def _microbatch_graph(model, graph: Graph, microbatches: int, dtype: str) -> Graph:
    """``model`` imported again with every input's first dim divided by ``microbatches``; its outputs must be the
    whole batch's split along their first dim."""
    shapes = {}
    for v in graph.inputs:
        if not v.type.shape or v.type.shape[0] % microbatches:
            raise UsageError(f"input {v.name!r} is {v.type}: its first dim (the batch) is not a multiple of "
                             f"--microbatches {microbatches}", where="--microbatches",
                             fix="use a number of microbatches that divides the batch (see --input-shape)")
        shapes[v.name] = (v.type.shape[0] // microbatches, *v.type.shape[1:])
    try:
        micro = import_graph(model, shapes, dtype)
    except UsageError as e:
        raise UsageError(f"the model cannot be compiled for a microbatch: {e.what}", where="--microbatches",
                         fix="export the model with a dynamic batch dim, or leave --microbatches out") from None
    for g, m in zip(graph.outputs, micro.outputs):
        stacked = (m.type.shape[0] * microbatches, *m.type.shape[1:]) if m.type.shape else None
        if g.type.shape != stacked:
            raise UsageError(f"output {g.name!r} is {g.type} for the whole batch but {m.type} for a microbatch: it "
                             f"is not the microbatches' results stacked along the first dim", where="--microbatches",
                             fix="leave --microbatches out for this model")
    return micro


def _merged_counts(counts) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def _source_info(model) -> dict:
    if isinstance(model, (str, Path)):
        p = Path(model)
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return {"model": p.name, "sha256": h.hexdigest()}
    return {"model": "<in-memory>"}
