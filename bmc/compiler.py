"""The compile driver: ONNX → IR → (single-device plan) → TVM → ``.bmc`` artifact."""

from __future__ import annotations

import contextlib
import difflib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from bmc.errors import PlanningError, UsageError
from bmc.ir.graph import Graph
from bmc.ir.passes import run_passes
from bmc.ir.verify import verify
from bmc.ops import infer_types


def verify_graph(graph: Graph) -> None:
    """Structural and type verification against the op table."""
    verify(graph, infer_types)


def signature_of(graph: Graph, output_names: Sequence[str] | None = None) -> dict:
    """The artifact signature of ``graph``; ``output_names`` (the model's, see ``Graph.output_names``) name the
    outputs where they can (a name an earlier output already has stays the value's)."""
    def entry(v, name=None):
        return {"name": name or v.name, "dtype": v.type.dtype, "shape": list(v.type.shape)}

    names, taken = [], set()
    for v, name in zip(graph.outputs, output_names or [v.name for v in graph.outputs]):
        names.append(name if name not in taken else v.name)
        taken.add(names[-1])
    return {"inputs": [entry(v) for v in graph.inputs], "outputs": [entry(v, n) for v, n in zip(graph.outputs, names)],
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


def import_graph(model, input_shapes=None, dtype: str = "float32", dump_dir: str | Path | None = None,
                 dtype_io=()) -> Graph:
    """ONNX → verified bmc IR, in ``dtype`` (float32 models can run in float16/bfloat16; the inputs and outputs
    ``dtype_io`` names are then passed in ``dtype`` too, the others stay float32)."""
    from bmc.frontend.onnx import import_model
    from bmc.ir.passes import Pass
    from bmc.ops.fusion import fuse_attention, fuse_gathered_matmuls, untranspose_scatters
    from bmc.ops.precision import convert_float32

    passes = [Pass("untranspose_scatters", untranspose_scatters), Pass("fuse_attention", fuse_attention),
              Pass("fuse_gathered_matmuls", fuse_gathered_matmuls)]
    if dtype != "float32" or dtype_io:
        passes.append(Pass(f"convert_to_{dtype}", lambda g: convert_float32(g, dtype, dtype_io)))
    imported = import_model(model, input_shapes)
    graph = run_passes(imported, passes, verify=verify_graph, dump_dir=dump_dir)
    graph.output_names = imported.output_names  # (passes keep the outputs' order)
    return graph


def plan_model(model, *, mesh, shard: Mapping | None = None, strategy: str | None = None,
               input_shapes: Mapping[str, Sequence[int] | int] | None = None, dump_dir: str | Path | None = None,
               dtype: str = "float32", **plan_options):
    """Import and plan without code generation: ``(global graph, local program, plan.json dict)``; see
    :func:`plan_graph` for the options."""
    graph = import_graph(model, input_shapes, dtype, dump_dir)
    return (graph, *plan_graph(graph, mesh=mesh, shard=shard, strategy=strategy, **plan_options))


def plan_graph(graph: Graph, *, mesh, shard: Mapping | None = None, strategy: str | None = None,
               device: str = "h100", memory_per_device: int | None = None, mesh_bandwidth: str | None = None,
               time_limit_s: float = 20.0, output_shards: Mapping | None = None, input_shards: Mapping | None = None,
               warn=None):
    """Plan and partition an imported graph: ``(local program, plan.json dict)``.

    ``strategy`` is ``auto`` (the ILP search; the default on a mesh of several devices), or a named manual plan whose
    annotations ``shard`` extends (``shard`` wins), completed by propagation. Every plan is priced by one cost model
    (``device`` profile; mesh links from ``mesh_bandwidth`` or the 8-GPUs-per-node defaults). ``output_shards``
    (``{output name: spec}``) leaves those outputs split on the mesh: each device returns its block instead of the
    whole value (no gather at the end; the search prices that). ``input_shards`` (``{input name: spec}``) has those
    inputs fed as each device's block (an annotation too: the plan takes them in that layout)."""
    from bmc.sharding.cost import plan_cost
    from bmc.sharding.partition import partition
    from bmc.sharding.propagate import propagate, resolve_io_specs
    from bmc.sharding.spec import Spec
    from bmc.sharding.report import plan_json

    if isinstance(mesh, str):
        from bmc.sharding.mesh import Mesh

        mesh = Mesh.parse(mesh)
    strategy = strategy or ("auto" if mesh.size > 1 and not shard else None)
    if strategy and strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}", where="--strategy", fix=f"use one of {STRATEGIES}")
    profile, mesh = _cost_model(mesh, device, mesh_bandwidth)
    _split_fused(graph, mesh, shard)
    mesh, view = _plan_mesh(graph, mesh, [*(shard or {}).values(), *(output_shards or {}).values(),
                                          *(input_shards or {}).values()])
    with _view_hint(mesh, view):
        budget = memory_per_device or profile.memory_bytes
        output_specs = resolve_io_specs(graph, mesh, output_shards or {}, "output")
        input_specs = resolve_io_specs(graph, mesh, input_shards or {}, "input")
        shard = dict(shard or {})
        for name, spec in input_specs.items():
            given = shard.get(name)
            if given is not None and (Spec.parse(given) if isinstance(given, str) else given).onto(mesh) != spec:
                raise UsageError(f"input {name!r} has --shard {given} and --input-shard {spec}", where="--input-shard",
                                 fix="give the input one layout (--input-shard alone is enough)")
            shard[name] = spec
        stats = None
        if strategy == "auto":
            from bmc.sharding.auto import auto_plan

            plan, stats = auto_plan(graph, mesh, shard or {}, device=profile, memory_per_device=budget,
                                    time_limit_s=time_limit_s, output_specs=output_specs)
            for w in stats.get("warnings", []):
                (warn or _warn)(w)
        else:
            from bmc.sharding.manual import manual_plan

            if strategy:
                plan = manual_plan(graph, strategy, mesh, shard, output_specs, profile)
            else:
                plan = propagate(graph, mesh, shard)
                plan.output_specs = output_specs
        plan.input_specs = input_specs
        prog = partition(graph, plan)
        verify_graph(prog.graph)
        data = plan_json(prog, plan_cost(graph, plan, profile), budget, profile.name)
        data["strategy"] = strategy or "propagation"
        if stats is not None:
            data["solver"] = stats
        if data["idle_axes"] and len(data["idle_axes"]) == sum(a.size > 1 for a in plan.mesh.axes):  # FAILURES.md 22
            (warn or _warn)(f"the plan splits nothing over mesh {mesh}: every device holds every tensor whole "
                            f"and repeats the same work (the model is too small for this mesh, or splitting costs "
                            f"more than it saves); a smaller --mesh, a larger batch or --strategy dp would use the "
                            f"devices")
        return prog, data


def _plan_mesh(graph: Graph, mesh, specs: list):
    """``(mesh to plan on, Megatron's view)``: the view (``manual.megatron_view``: the last axis cut for key/value
    heads fewer than its devices) is planned on where one of ``specs`` names one of its parts. (Otherwise Megatron's
    plans are made on both and the faster is kept, ``manual.manual_plan``; the search stays on the mesh: on a view
    of one more axis it takes ~10x longer.)"""
    from bmc.sharding.manual import strategy_mesh
    from bmc.sharding.spec import Spec, SpecError

    view = strategy_mesh(graph, "megatron", mesh)
    named = set()
    for s in specs:
        try:
            named.update((Spec.parse(s) if isinstance(s, str) else s).axes())
        except SpecError:  # reported where the spec is read
            pass
    return (view if named & (set(view.names) - set(mesh.names)) else mesh), view


@contextlib.contextmanager
def _view_hint(mesh, view):
    """A spec that does not divide a dim, reported with the parts of Megatron's view it could name instead."""
    try:
        yield
    except UsageError as e:
        if view is mesh or "not divisible" not in e.what:
            raise
        raise UsageError(e.what, where=e.where, fix=f"{e.fix}; Megatron's view of the mesh has "
                         f"{view.describe_parts()}: a key/value head's dim splits over the major part") from None


def _split_fused(graph: Graph, mesh, shard: Mapping | None) -> None:
    """On a mesh of several devices, a fused projection read in parts becomes one product a part, so that each can
    split like any projection (``bmc.ops.fusion.split_fused_products``; annotated tensors are left alone)."""
    if mesh.size > 1:
        from bmc.ops.fusion import split_fused_products

        split_fused_products(graph, keep=set(shard or {}))


def _cost_model(mesh, device: str, mesh_bandwidth: str | Mapping | None):
    """The device profile and ``mesh`` with its links (``--mesh-bandwidth`` text, or ``{axis: (bytes/s, latency)}``,
    over the defaults)."""
    from bmc.sharding.cost import parse_device, parse_mesh_bandwidth, with_links

    links = parse_mesh_bandwidth(mesh_bandwidth, mesh) if isinstance(mesh_bandwidth, str) else mesh_bandwidth
    return parse_device(device), with_links(mesh, links or None)


def _warn(message: str) -> None:
    import sys

    print(f"bmc: warning: {message}", file=sys.stderr)


def compile_model(model, output, *, target: str = "llvm", cuda_archs: Sequence[str] = ("sm_90",),
                  input_shapes: Mapping[str, Sequence[int] | int] | None = None,
                  dump_dir: str | Path | None = None, mesh=None, shard: Mapping | None = None,
                  strategy: str | None = None, dtype: str = "float32", tune_trials: int = 0,
                  tune_db: str | Path | None = None, tune_export: str | Path | None = None,
                  stages: int | str = 1, microbatches: int = 1, donate: Sequence[str] = (),
                  dtype_io: Sequence[str] = (), **plan_options) -> dict:
    """Compile ``model`` (path, bytes or ModelProto) into the artifact at ``output``; returns a summary dict.
    With a mesh of more than one device (or ``shard`` annotations) the program is the partitioned SPMD program and
    every rank gets its own weight shards. ``stages`` > 1 cuts the model into pipeline stages, each planned on its
    submesh (:mod:`bmc.sharding.pipeline`), run ``microbatches`` at a time (the inputs' first dim split evenly);
    ``"auto"`` picks the number of stages (:func:`search_stages`). ``donate`` (input names or ``fnmatch`` patterns)
    lets the program write over those inputs: a scatter that is such an input's only reader updates it in place and
    its output is the input's buffer (:mod:`bmc.codegen.inplace`; the runtime returns the caller's array).
    ``dtype_io`` (names or patterns of float32 inputs and outputs) passes those in ``dtype`` instead of float32."""
    from bmc.codegen.targets import TargetSpec
    from bmc.runtime.artifact import write_artifact

    out = _check_output_path(model, output)
    spec = TargetSpec.parse(target, tuple(cuda_archs))
    mesh = _mesh(mesh)
    _check_pipeline_flags(mesh, stages, microbatches, plan_options, donate, dtype_io)
    if spec.kind == "cuda":  # FAILURES.md 30: a missing toolkit is reported before any work
        from bmc.codegen.cuda import find_toolkit

        find_toolkit()
    t0 = time.perf_counter()
    graph = import_graph(model, input_shapes, dtype, dump_dir, dtype_io)
    donate = resolve_donated(graph, donate)
    if stages != 1:
        pipe, planned, plan, plan_text = _planned_stages(model, graph, mesh=mesh, stages=stages,
                                                         microbatches=microbatches, shard=shard, strategy=strategy,
                                                         dtype=dtype, plan_options=plan_options)
    else:
        pipe, planned = None, [_plan(graph, mesh, shard or {}, strategy, plan_options)]
        plan, plan_text = planned[0].plan, planned[0].plan_text
    timings = {"import_and_plan_s": time.perf_counter() - t0}
    programs = [_build(p, spec, tune_trials=tune_trials, tune_db=tune_db, tune_export=tune_export,
                       timings=timings, donate=donate) for p in planned]
    if pipe is not None:
        pipeline = {"stages": [{"program": f"stage{st.index}", "ranks": ranks, "mesh": p.mesh.to_json(),
                                "signature": signature_of(p.graph), "nodes": [st.start, st.end], "sends": st.sends,
                                **c.extra} for st, ranks, p, c in zip(pipe.cuts, pipe.ranks, planned, programs)],
                    "microbatches": microbatches, "outputs": [v.name for v in graph.outputs]}
        signature = {**signature_of(graph, graph.output_names), "params": []}
        exports = {f"stage{i}": c.built.export for i, c in enumerate(programs)}
        weights = {rank: c.weights[local] for c, ranks in zip(programs, pipe.ranks)
                   for local, rank in enumerate(ranks)}
        extra = None
    else:
        (p,), (c,) = planned, programs
        pipeline, exports, extra = None, c.built.export, c.extra
        signature = _donated(_split_io(signature_of(p.graph, graph.output_names), graph, p), p.graph,
                             c.built.donated)
        weights = dict(enumerate(c.weights)) if p.sharded else c.weights[0]
    from bmc.sharding.cost import parse_device

    profile = parse_device(plan_options.get("device", "h100"))
    peak = max(_priced(p, profile)[1] for p in planned)  # the runtime's memory pre-flight (FAILURES.md 45)
    options = {"dtype": dtype, "strategy": strategy, "shard": {k: str(v) for k, v in (shard or {}).items()},
               "stages": stages, "microbatches": microbatches, "donate": list(donate),
               "dtype_io": list(dtype_io)} | {
        k: ({n: str(s) for n, s in v.items()} if k.endswith("_shards") else v) for k, v in plan_options.items()}
    t0 = time.perf_counter()
    path = write_artifact(
        out, signature=signature, weights=weights, export_library=exports, target=spec.to_json(),
        source=_source_info(model), plan=plan, mesh=(mesh if pipe is not None else planned[0].mesh).to_json(),
        pipeline=pipeline,
        extra={**(extra or {}), "options": options, "memory": {"peak_bytes_per_device": int(peak)}})
    timings["package_s"] = time.perf_counter() - t0
    return {"output": str(path), "target": spec.to_json(), "nodes": sum(len(p.graph.nodes) for p in planned),
            "ops": _merged_counts(p.graph.op_counts() for p in planned), "plan_text": plan_text,
            "weight_bytes": graph.weight_bytes(), "timings": timings, "mesh": mesh.to_json(),
            "stages": [[st.start, st.end] for st in pipe.cuts] if pipe is not None else None,
            "collectives": sum(len(p.plan.get("collectives", [])) for p in planned),
            "size_bytes": sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())}


def _mesh(mesh):
    from bmc.sharding.mesh import Mesh

    return Mesh.parse(mesh) if isinstance(mesh, str) else mesh if mesh is not None else Mesh.parse("1")


def _check_pipeline_flags(mesh, stages: int | str, microbatches: int, plan_options: Mapping, donate=(),
                          dtype_io=()) -> None:
    """Refuse bad --stages / --microbatches (and --input-shard / --output-shard / --donate / --dtype-io with stages)
    before any work."""
    for kind in ("input", "output"):
        if stages != 1 and plan_options.get(f"{kind}_shards"):
            raise UsageError(f"--{kind}-shard is for a single program; a pipeline's {kind}s are whole",
                             where=f"--{kind}-shard", fix=f"leave out --stages or --{kind}-shard")
    for flag, given in (("--donate", donate), ("--dtype-io", dtype_io)):
        if stages != 1 and given:
            raise UsageError(f"{flag} is for a single program; a pipeline's inputs and outputs are float32 and "
                             "travel between stages", where=flag, fix=f"leave out --stages or {flag}")
    if stages != "auto" and not isinstance(stages, int):
        raise UsageError(f"--stages {stages!r} is neither a number nor 'auto'", where="--stages",
                         fix="use --stages N (N >= 1) or --stages auto")
    if microbatches < 1 or (microbatches > 1 and stages == 1):
        raise UsageError(f"--microbatches {microbatches} needs a positive number and --stages 2 or more (or auto)",
                         where="--microbatches", fix="add --stages N (N > 1), or leave --microbatches out")
    if isinstance(stages, int) and stages != 1:
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
    split: dict = field(default_factory=dict)  # input/output value name → Spec: fed or returned as blocks


def _plan(graph: Graph, mesh, shard: Mapping, strategy: str | None, plan_options: Mapping) -> _Planned:
    if not (mesh.size > 1 or shard or plan_options.get("output_shards") or plan_options.get("input_shards")):
        return _Planned(graph, single_device_plan(graph), mesh, False, None)
    from bmc.sharding.report import format_plan

    prog, plan = plan_graph(graph, mesh=mesh, shard=shard, strategy=strategy, **plan_options)
    split = {k: s for k, s in {**prog.plan.input_specs, **prog.plan.output_specs}.items() if not s.is_replicated()}
    return _Planned(prog.graph, plan, prog.plan.mesh, True, format_plan(prog, plan), split)


def _split_io(signature: dict, graph: Graph, p: _Planned) -> dict:
    """The signature of a program with inputs fed and outputs returned as blocks (``p.split``): such an entry keeps
    the global ``shape`` and adds its ``spec``, ``local_shape`` (the program's) and ``blocks`` (per rank, where its
    block starts in each dim), so the runtime can place and cut blocks without the sharding code."""
    inputs = {v.name: v for v in graph.inputs}
    for entry, v in [(e, inputs.get(e["name"])) for e in signature["inputs"]] + list(zip(signature["outputs"],
                                                                                         graph.outputs)):
        spec = p.split.get(v.name) if v is not None else None
        if spec is None:
            continue
        entry.update(shape=list(v.type.shape), spec=str(spec), local_shape=entry["shape"],
                     blocks=[[s.start for s in spec.block_slices(v.type.shape, p.mesh, p.mesh.coordinate(r))]
                             for r in range(p.mesh.size)])
    return signature


@dataclass
class _Compiled:
    """One program, built: the build, each of its ranks' weights, its manifest keys (kernels, implicit_inputs)."""

    built: Any
    weights: list[list]  # per rank of its mesh: [(param name, provider)]
    extra: dict


def resolve_donated(graph: Graph, donate: Sequence[str]) -> list[str]:
    """``--donate`` names or ``fnmatch`` patterns → the input names they match, in input order; one that matches
    none is a usage error naming the inputs."""
    import fnmatch

    names = [v.name for v in graph.inputs]
    for pattern in donate:
        if not fnmatch.filter(names, pattern):
            near = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            raise UsageError(f"--donate {pattern!r} matches no input of the model (inputs: {', '.join(names)})",
                             where="--donate", fix=("did you mean " + ", ".join(map(repr, near)) + "?") if near
                             else "name an input, or a pattern such as 'past_key_values.*'")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in donate)]


def _donated(signature: dict, program: Graph, donated) -> dict:
    """The signature with the donated inputs a scatter writes in place (``donated: true``) and the outputs that are
    their buffers (``aliases``: the input's name); a donated input that cannot be written over is a warning."""
    for name, why in donated.unused.items():
        _warn(f"--donate {name}: not written in place: {why}")
    written = set(donated.updates.values())
    for entry in signature["inputs"]:
        if entry["name"] in written:
            entry["donated"] = True
    for entry, v in zip(signature["outputs"], program.outputs):
        if v.name in donated.aliases:
            entry["aliases"] = donated.aliases[v.name]
    return signature


def _build(p: _Planned, spec, *, tune_trials: int, tune_db, tune_export, timings: dict, donate=()) -> _Compiled:
    from bmc.codegen.build import build

    program = p.graph
    built = build(program, spec, tune_trials=tune_trials, tune_db=tune_db, tune_export=tune_export, donate=donate,
                  sharded=p.sharded)
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
    _check_pipeline_flags(mesh, stages, microbatches, plan_options)
    shard = shard or {}
    _split_fused(graph, mesh, shard)  # (before the cut: the stages' nodes are the cut's)
    profile, linked = _cost_model(mesh, plan_options.get("device", "h100"), plan_options.get("mesh_bandwidth"))
    sub = stage_mesh(linked, stages)
    # a stage's submesh keeps the whole mesh's links (its first axis stays a between-node axis)
    options = {**plan_options, "mesh_bandwidth": {a.name: (a.bandwidth_Bps, a.latency_s) for a in sub.axes}}
    budget = plan_options.get("memory_per_device") or profile.memory_bytes
    cut_budget, first_error = budget, None
    while True:  # the cut bounds each stage's weights; a stage whose plan does not fit gets a tighter bound
        try:
            cuts = split_stages(graph, stages, device=profile, mesh=linked, memory_per_device=cut_budget)
        except PlanningError:
            if first_error is None:
                raise
            raise first_error from None
        names = [{v.name for v in st.graph.values()} for st in cuts]
        unknown = sorted(set(shard) - set().union(*names))
        if unknown:
            raise UsageError(f"--shard names {', '.join(map(repr, unknown))}, which no stage has", where="--shard",
                             fix="name graph inputs, weights or values of the model (see `bmc plan`)")
        try:
            planned = [_plan(st.graph, sub, {k: v for k, v in shard.items() if k in have}, strategy, options)
                       for st, have in zip(cuts, names)]
            break
        except PlanningError as e:
            first_error = first_error or e
            cut_budget = 0.8 * min(cut_budget, max(st.graph.weight_bytes() for st in cuts) / sub.size)
    ranks = [list(range(st.index * sub.size, (st.index + 1) * sub.size)) for st in cuts]
    return PipelinePlan(cuts, planned, ranks, sub, microbatches)


def plan_pipeline_model(model, *, mesh, stages: int | str, microbatches: int = 1, shard: Mapping | None = None,
                        strategy: str | None = None, input_shapes=None, dtype: str = "float32",
                        **plan_options) -> tuple[dict, str]:
    """Import ``model`` and plan it in pipeline stages (``bmc plan --stages``), without code generation:
    ``(plan.json dict, text)``."""
    mesh = _mesh(mesh)
    _check_pipeline_flags(mesh, stages, microbatches, plan_options)
    graph = import_graph(model, input_shapes, dtype)
    _, _, plan, text = _planned_stages(model, graph, mesh=mesh, stages=stages, microbatches=microbatches,
                                       shard=shard, strategy=strategy, dtype=dtype, plan_options=plan_options)
    return plan, text


def _planned_stages(model, graph: Graph, *, mesh, stages: int | str, microbatches: int, shard, strategy, dtype,
                    plan_options) -> tuple[PipelinePlan | None, list[_Planned], dict, str]:
    """``--stages N|auto``: (the pipeline, or None when ``auto`` chose one program; the planned programs; plan.json;
    the plan as text)."""
    micro = graph if microbatches == 1 else _microbatch_graph(model, graph, microbatches, dtype)
    if stages != "auto":
        pipe = plan_pipeline(micro, mesh=mesh, stages=stages, microbatches=microbatches, shard=shard,
                             strategy=strategy, **plan_options)
        return pipe, pipe.planned, pipe.plan_json(), pipe.text()
    search = search_stages(graph, micro, mesh=mesh, microbatches=microbatches, shard=shard, strategy=strategy,
                           **plan_options)
    pipe, single = search.pipeline, search.single
    plan = pipe.plan_json() if pipe else dict(single.plan)
    text = pipe.text() if pipe else single.plan_text or "one program on one device"
    plan["stage_search"] = search.table
    return pipe, pipe.planned if pipe else [single], plan, search.text() + "\n\n" + text


@dataclass
class StageSearch:
    """``--stages auto``: every number of stages tried, and the chosen plan (a pipeline, or the single program)."""

    stages: int
    pipeline: PipelinePlan | None
    single: _Planned | None
    table: list[dict]  # per candidate: stages, latency_s, peak_bytes_per_device, fits

    def text(self) -> str:
        rows = [f"{'stages':>6} {'estimated time':>15} {'peak/device':>14}"]
        for r in self.table:
            mark = "  <- chosen" if r["stages"] == self.stages else ""
            if r["latency_s"] is None:
                rows.append(f"{r['stages']:>6} {'-':>15} {'-':>14}  (no plan fits the memory budget)")
                continue
            rows.append(f"{r['stages']:>6} {r['latency_s'] * 1e3:>12.3f} ms {r['peak_bytes_per_device']:>14,}"
                        + ("" if r["fits"] else "  (over the memory budget)") + mark)
        return "\n".join(rows)


def search_stages(graph: Graph, micro: Graph, *, mesh, microbatches: int = 1, shard: Mapping | None = None,
                  strategy: str | None = None, warn=None, **plan_options) -> StageSearch:
    """Pick the number of pipeline stages (Alpa's inter-operator choice, over equal submeshes): for every S that
    divides the mesh's first axis, cut ``micro`` (the graph at the microbatch's shapes) into S stages and plan each
    on its submesh; its estimated time for the whole batch is GPipe's Σ tᵢ + (K − 1)·max tᵢ, tᵢ a stage's planned
    time (compute and collectives) plus sending its boundary values. S = 1 is ``graph`` planned on the whole mesh.
    The fastest candidate whose every device fits the memory budget wins (else the one with the least memory)."""
    from bmc.sharding.pipeline import stage_mesh

    mesh = _mesh(mesh)
    profile, linked = _cost_model(mesh, plan_options.get("device", "h100"), plan_options.get("mesh_bandwidth"))
    budget = plan_options.get("memory_per_device") or profile.memory_bytes
    link = linked.axes[0]
    n_ops = sum(node.op != "constant" for node in micro.nodes)
    quiet = {**plan_options, "warn": lambda _message: None}  # the candidates' own planning warnings
    table, plans = [], {}
    for s in [d for d in range(1, mesh.axes[0].size + 1) if mesh.axes[0].size % d == 0 and d <= n_ops]:
        row = {"stages": s, "submesh": list(stage_mesh(mesh, s).shape)}
        try:
            if s == 1:
                single = _plan(graph, mesh, shard or {}, strategy, quiet)
                latency, peak = _priced(single, profile)
                plans[1] = single
            else:
                pipe = plan_pipeline(micro, mesh=mesh, stages=s, microbatches=microbatches, shard=shard,
                                     strategy=strategy, **quiet)
                priced = [_priced(p, profile) for p in pipe.planned]
                times = [t + (link.latency_s + st.send_bytes / link.bandwidth_Bps if st.send_bytes else 0.0)
                         for (t, _), st in zip(priced, pipe.cuts)]
                latency, peak = sum(times) + (microbatches - 1) * max(times), max(m for _, m in priced)
                plans[s] = pipe
        except PlanningError as e:  # the search found no plan within the memory budget
            table.append({**row, "latency_s": None, "peak_bytes_per_device": None, "fits": False, "error": e.what})
            continue
        table.append({**row, "latency_s": latency, "peak_bytes_per_device": peak, "fits": peak <= budget})
    fitting = [r for r in table if r["fits"]]
    priced_rows = [r for r in table if r["latency_s"] is not None]
    if not priced_rows:
        raise PlanningError("no number of stages has a plan within the memory budget: " +
                            "; ".join(f"{r['stages']} stage(s): {r['error']}" for r in table),
                            where="--memory-per-device", fix="use a larger mesh or raise --memory-per-device")
    best = min(fitting, key=lambda r: r["latency_s"]) if fitting else \
        min(priced_rows, key=lambda r: r["peak_bytes_per_device"])
    if not fitting:
        (warn or _warn)(f"no number of stages fits the memory budget of {budget:,} B per device; chose "
                        f"{best['stages']} (the least memory: {best['peak_bytes_per_device']:,} B)")
    chosen = plans[best["stages"]]
    if best["stages"] == 1:
        return StageSearch(1, None, chosen, table)
    return StageSearch(best["stages"], chosen, None, table)


def _priced(p: _Planned, profile) -> tuple[float, int]:
    """(estimated seconds, peak bytes per device) of a planned program; a single-device one is priced here."""
    if "cost" in p.plan:
        return p.plan["cost"]["total_s"], p.plan["memory"]["peak_bytes_per_device"]
    from bmc.sharding.cost import plan_cost
    from bmc.sharding.propagate import propagate

    cost = plan_cost(p.graph, propagate(p.graph, p.mesh, {}), profile)
    return cost.total_s, cost.memory.peak_bytes


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
        from bmc.runtime.artifact import file_digest

        return {"model": Path(model).name, "sha256": file_digest(Path(model))["sha256"]}
    return {"model": "<in-memory>"}
