"""The ``bmc`` command line: ``bmc compile | run | show | verify | demo`` (also ``python -m bmc``).

Exit codes: 0 success; a ``BmcError``'s ``exit_code`` (usage 2, model 3, planning 4, compile 5, artifact 6,
runtime 7); 2 for argparse usage errors; 130 on Ctrl-C; 143 on SIGTERM (raised as ``SystemExit`` so ``finally``
blocks, e.g. the artifact writer's cleanup, still run); 70 for anything unexpected, which is a bug and is reported
with the traceback and the versions. ``-v`` adds the traceback to user errors too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path

from bmc.errors import BmcError, InternalError, UsageError, human_bytes

_SHAPE_GRAMMAR = "NAME=D1,D2,... or NAME=D1xD2x... with positive integers, e.g. input_ids=1,128"


class Terminated(SystemExit):
    """Raised by the SIGTERM handler so cleanup code runs on the way out."""

    def __init__(self):
        super().__init__(143)


def _on_sigterm(signum, frame):
    raise Terminated()


def install_sigterm_handler() -> None:
    """Turn SIGTERM into ``Terminated`` (exit 143) so ``finally`` blocks run."""
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _on_sigterm)


# --- argument helpers ------------------------------------------------------------------------------------------------
def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=2,16`` or ``name=2x16`` → ``("name", (2, 16))``; splits on the last ``=``."""
    name, sep, dims = text.rpartition("=")
    parts = re.split(r"[,x]", dims.strip()) if dims.strip() else []
    if not sep or not name or not parts or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"malformed value {text!r}", where="--input-shape", fix=f"use {_SHAPE_GRAMMAR}")
    return name, tuple(int(p) for p in parts)


def parse_input_shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for text in values or []:
        name, dims = parse_input_shape(text)
        if name in shapes:
            raise UsageError(f"input {name!r} is given twice", where="--input-shape",
                             fix="give each input's shape once")
        shapes[name] = dims
    return shapes


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fmt(entry: dict) -> str:
    split = f" split {entry['spec']} (a rank's block [{','.join(map(str, entry['local_shape']))}])" \
        if "spec" in entry else ""
    donated = " donated (written in place)" if entry.get("donated") else \
        f" (the buffer of input {entry['aliases']})" if "aliases" in entry else ""
    return f"{entry['name']}: {entry['dtype']}[{','.join(map(str, entry['shape']))}]{split}{donated}"


# --- commands ------------------------------------------------------------------------------------------------------
def cmd_compile(args) -> int:
    if args.cuda_arch and args.target != "cuda":
        raise UsageError("--cuda-arch needs --target cuda", where="--cuda-arch", fix="add --target cuda")
    # flags first: a typo fails before anything heavy loads. A single number stays an int so that it can also
    # bind a symbolic dim by name (SYMBOL=SIZE); the frontend reads an int as a rank-1 shape for an input.
    input_shapes = {k: (v[0] if len(v) == 1 else v) for k, v in parse_input_shapes(args.input_shape).items()}
    from bmc.sharding.mesh import Mesh

    mesh = Mesh.parse(args.mesh, args.mesh_axes)
    shard = parse_shards(args.shard)
    from bmc.compiler import compile_model

    start = time.perf_counter()
    summary = compile_model(args.model, args.output, target=args.target,
                            cuda_archs=tuple(args.cuda_arch or ("sm_90",)), input_shapes=input_shapes,
                            dump_dir=args.dump_dir, mesh=mesh, **({"shard": shard} if shard else {}),
                            **({"strategy": args.strategy} if args.strategy else {}),
                            **({"dtype": args.dtype} if args.dtype != "float32" else {}),
                            **({"stages": args.stages} if args.stages != 1 else {}),
                            **({"microbatches": args.microbatches} if args.microbatches != 1 else {}),
                            **({"donate": args.donate} if args.donate else {}),
                            **({"dtype_io": args.dtype_io} if args.dtype_io else {}),
                            **_tune_options(args),
                            **_plan_options(args))
    elapsed = time.perf_counter() - start
    summary = summary if isinstance(summary, dict) else {}
    output = Path(summary.get("output", args.output))
    target = summary.get("target", args.target)
    if isinstance(target, dict):
        target = " ".join([target.get("kind", "?"), *target.get("archs", [])])
    size = summary.get("size_bytes", _size(output))
    if summary.get("plan_text"):
        print(summary["plan_text"], end="\n\n")
    print(f"wrote {output} (target {target}, {human_bytes(size)}, {elapsed:.1f} s)")
    return 0


def parse_shards(values, flag: str = "--shard") -> dict:
    """``--shard NAME=SPEC`` (or ``flag``) flags → {name: Spec}; a malformed one is a usage error with the grammar."""
    from bmc.sharding.spec import parse_spec_flag

    return dict(parse_spec_flag(text, flag) for text in values or [])


def _plan_options(args) -> dict:
    """--device / --memory-per-device / --mesh-bandwidth / --time-limit, only those given."""
    from bmc.sharding.cost import parse_size

    out = {}
    if args.device:
        out["device"] = args.device
    if args.memory_per_device:
        out["memory_per_device"] = parse_size(args.memory_per_device, "--memory-per-device")
    if args.mesh_bandwidth:
        out["mesh_bandwidth"] = args.mesh_bandwidth
    if args.time_limit:
        out["time_limit_s"] = args.time_limit
    if args.output_shard:
        out["output_shards"] = parse_shards(args.output_shard, "--output-shard")
    if args.input_shard:
        out["input_shards"] = parse_shards(args.input_shard, "--input-shard")
    return out


def _stages(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of stages or 'auto'") from None


def _add_plan_flags(p) -> None:
    p.add_argument("--stages", type=_stages, default=1, metavar="S",
                   help="cut the model into S pipeline stages, each on the mesh with its first axis divided by S; "
                        "auto: the fastest S that fits (default 1)")
    p.add_argument("--microbatches", type=int, default=1, metavar="K",
                   help="with --stages: run the batch (the inputs' first dim) as K microbatches through the stages "
                        "(default 1)")
    p.add_argument("--strategy", choices=("auto", "replicate", "dp", "megatron", "dp+megatron"),
                   help="auto: the ILP search (default on a mesh of several devices); or a named manual plan "
                        "completed by propagation (--shard annotations win)")
    p.add_argument("--device", choices=("h100", "a100"), help="device profile for the cost model (default h100)")
    p.add_argument("--memory-per-device", metavar="SIZE", help="memory budget per device, e.g. 80GB")
    p.add_argument("--mesh-bandwidth", metavar="AXIS=BW[@LAT],...",
                   help="link bandwidth/latency per mesh axis, e.g. x=45GB,y=400GB@7us")
    p.add_argument("--time-limit", type=float, metavar="S", help="solver time limit in seconds (default 20)")
    p.add_argument("--input-shard", action="append", metavar="NAME=SPEC",
                   help="feed a model input as blocks, e.g. past_key=[{},{y},{},{}]: under MPI each rank may pass "
                        "just its block (or the whole input; repeatable)")
    p.add_argument("--output-shard", action="append", metavar="NAME=SPEC",
                   help="leave a model output split on the mesh, e.g. logits=[{x},{},{y}]: each rank returns its "
                        "block (bmc run still writes the whole output; repeatable)")


def _tune_options(args) -> dict:
    if args.tune < 0:
        raise UsageError(f"--tune must be >= 0, got {args.tune}", where="--tune", fix="give a number of trials")
    if args.tune_export and not args.tune:
        raise UsageError("--tune-export writes the candidates of a search: it needs --tune N", where="--tune-export",
                         fix="add --tune N (e.g. --tune 64)")
    opts = {"tune_trials": args.tune} if args.tune else {}
    opts.update({k: v for k, v in (("tune_db", args.tune_db), ("tune_export", args.tune_export)) if v})
    return opts


def cmd_tune_measure(args) -> int:
    from bmc.runtime.measure import measure_candidates

    result = measure_candidates(Path(args.folder), number=args.number, repeat=args.repeat)
    done = [v for v in result["candidates"].values() if "secs" in v]
    print(f"measured {len(done)} of {len(result['candidates'])} candidates on {result['device']}; "
          f"wrote {Path(args.folder) / 'timings.json'}")
    for name, v in result["candidates"].items():
        if "error" in v:
            print(f"  {name}: {v['error']}")
    return 0 if done else 1


def cmd_tune_import(args) -> int:
    from bmc.codegen.tune import import_timings

    report = import_timings(Path(args.folder), Path(args.tune_db) if args.tune_db else None)
    print(f"{'kernel':40} {'default':>12} {'best tuned':>12}  chosen")
    for k in report["kernels"]:
        cells = [f"{k[s] * 1e6:10.1f}us" if k[s] is not None else f"{'-':>12}" for s in ("default_s", "best_s")]
        print(f"{k['kernel'][:40]:40} {cells[0]} {cells[1]}  {k['chosen']}")
    print(f"database: {report['db']} (compile with --tune-db {report['db']} to apply it)")
    return 0


def cmd_plan(args) -> int:
    from bmc.sharding.mesh import Mesh

    mesh = Mesh.parse(args.mesh, args.mesh_axes)
    shard = parse_shards(args.shard)
    input_shapes = {k: (v[0] if len(v) == 1 else v) for k, v in parse_input_shapes(args.input_shape).items()}
    from bmc.compiler import plan_model, plan_pipeline_model
    from bmc.sharding.report import format_plan

    if args.stages != 1 or args.microbatches != 1:
        data, text = plan_pipeline_model(args.model, mesh=mesh, stages=args.stages, microbatches=args.microbatches,
                                         shard=shard, strategy=args.strategy, input_shapes=input_shapes,
                                         **_plan_options(args))
    else:
        _, prog, data = plan_model(args.model, mesh=mesh, shard=shard, strategy=args.strategy,
                                   input_shapes=input_shapes, **_plan_options(args))
        text = format_plan(prog, data)
    if args.html:
        from bmc.sharding.htmlreport import plan_html

        _write_text(Path(args.html), plan_html(data, Path(args.model).name, f"plan on mesh {mesh}"), "--html")
    if args.json:
        _write_text(Path(args.json), json.dumps(data, indent=1) + "\n", "--json")
    if not (args.json or args.html):
        print(text)
    return 0


def _write_text(out: Path, text: str, flag: str) -> None:
    """Write ``text`` to ``out`` through a temporary file renamed into place (nothing half-written is left)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, "utf-8")
        os.replace(tmp, out)
    except OSError as e:
        raise UsageError(f"cannot write {str(out)!r}: {e.strerror or e}", where=flag,
                         fix="pass a path in an existing, writable folder") from e
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}")


def cmd_run(args) -> int:
    """Run an artifact. Under ``mpiexec -n N`` every rank runs this: all ranks load (each its own weights), rank 0
    reads the ``.npz`` (broadcast to the others), writes the outputs and prints; a failure every rank sees is printed
    once, by rank 0, with the usual exit code; a failure of one rank mid-run is printed as ``[rank k] ...`` and
    aborts the job (``MPI_Abort``) with that exit code."""
    from bmc.runtime.executor import load

    rank = _launcher_rank()
    try:
        model = None
        inputs_path = Path(args.inputs)
        if not args.simulate and rank is not None:  # MPI: load first (collective), read the inputs on rank 0 only
            model = load(args.artifact, device=args.device, threads=args.threads, collectives=args.collectives)
            rank = model.mpi.rank if model.mpi is not None else 0
        inputs, error = {}, None
        if rank in (None, 0):
            try:
                inputs = _read_npz(inputs_path)
            except UsageError as e:
                if model is None or model.mpi is None:
                    raise
                error = e
        if model is not None and model.mpi is not None:
            model.mpi.agree(error)  # a bad .npz on rank 0 ends every rank with the same usage error
        if model is None:
            model = load(args.artifact, device=args.device, simulate=args.simulate, threads=args.threads,
                         collectives=args.collectives)
        outputs = model.run(inputs)
        if model.mpi is not None:  # outputs left split (--output-shard) are assembled on rank 0
            outputs = model.gather_outputs(outputs)
        error = None
        if rank in (None, 0):
            try:
                _write_npz(Path(args.output), outputs)
            except (UsageError, OSError) as e:
                error = e if isinstance(e, UsageError) else UsageError(f"cannot write {args.output!r}: {e}",
                                                                        where="-o/--output")
                if model.mpi is None:
                    raise error from e
        if model.mpi is not None:
            model.mpi.agree(error)
    except BmcError as err:
        if _mpi_rank(rank) not in (None, 0):  # every rank raised the same agreed error: rank 0 prints it
            return err.exit_code
        raise
    if rank in (None, 0):
        for name, arr in outputs.items():
            print(f"{name}: {arr.dtype}[{','.join(map(str, arr.shape))}]")
        if model.mpi is not None:
            stages = f"{len(model.manifest['pipeline']['stages'])} pipeline stages, " \
                if "pipeline" in model.manifest else ""
            print(f"ran on {model.mpi.size} MPI ranks (mesh {'x'.join(map(str, model.mpi.shape))}, {stages}"
                  f"{model.mpi.impl} collectives)")
        print(f"wrote {args.output}")
    return 0


def _launcher_rank() -> int | None:
    """This process's rank when an MPI launcher started it (from its environment; MPI is not initialised here)."""
    from bmc.runtime.mpi import launcher_env

    env = launcher_env()
    return None if env is None else (env.get("rank") or 0)


def _mpi_rank(fallback: int | None) -> int | None:
    """MPI's rank of this process once MPI is initialised (a mismatched launcher makes every process rank 0 there)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank()
    return fallback


def _read_npz(inputs_path: Path) -> dict:
    import numpy as np

    if not inputs_path.is_file():
        raise UsageError(f"no such file {str(inputs_path)!r}", where="--inputs",
                         fix="pass an .npz file whose keys are the model's input names")
    try:
        with np.load(inputs_path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {str(inputs_path)!r} as .npz: {e}", where="--inputs",
                         fix="write it with numpy.savez(path, **{input_name: array})") from e


def _write_npz(out: Path, outputs: dict) -> None:
    import numpy as np

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **outputs)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_show(args) -> int:
    import json

    from bmc.runtime.artifact import read_manifest

    m = read_manifest(args.artifact)
    if args.html:
        from bmc.runtime.artifact import PLAN, verify_file
        from bmc.sharding.htmlreport import plan_html

        path = Path(args.artifact)
        plan = json.loads(verify_file(path, PLAN, m["files"].get(PLAN)).read_text("utf-8"))
        if not plan:
            raise UsageError(f"{args.artifact} holds no plan", where="--html",
                             fix="plan reports are for artifacts compiled by this bmc for a mesh")
        target = m["target"].get("kind", "?") + "".join(f" {a}" for a in m["target"].get("archs") or [])
        _write_text(Path(args.html), plan_html(plan, path.name, f"artifact for {target}, mesh "
                                               f"{'x'.join(map(str, m['mesh']['shape']))}"), "--html")
        return 0
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    target = m["target"]
    archs = ",".join(target.get("archs") or [])
    print(f"artifact   {args.artifact} (format {m['format_version']}, created {m['created']})")
    print(f"versions   bmc {m['bmc_version']}, tvm {m['tvm_version']}, tvm-ffi {m['tvm_ffi_version']}, "
          f"onnx {m.get('onnx_version', '?')}, numpy {m.get('numpy_version', '?')}")
    print(f"target     {target.get('kind')}" + (f" {archs}" if archs else "")
          + (f" (mcpu {target['mcpu']})" if target.get("mcpu") else ""))
    mesh = m["mesh"]
    print(f"mesh       {'x'.join(map(str, mesh['shape']))} axes {','.join(mesh['axes'])}, "
          f"world size {m['world_size']}")
    if m["source"]:
        print("source     " + ", ".join(f"{k}={v}" for k, v in m["source"].items()))
    sig = m["signature"]
    for kind in ("inputs", "outputs"):
        implicit = set(m.get("implicit_inputs", [])) if kind == "inputs" else set()
        entries = [_fmt(e) + (" (supplied by the runtime)" if e["name"] in implicit else "") for e in sig[kind]]
        print(f"{kind:<10} " + ("; ".join(entries) or "(none)"))
    pipe = m.get("pipeline")
    if pipe:
        print(f"pipeline   {len(pipe['stages'])} stages, {pipe['microbatches']} microbatch(es)")
        for st in pipe["stages"]:
            print(f"  {st['program']:<8} ranks {st['ranks']} mesh {'x'.join(map(str, st['mesh']['shape']))}, "
                  f"nodes {st['nodes'][0]}-{st['nodes'][1] - 1}, {len(st['signature']['params'])} params, "
                  f"sends {', '.join(st['sends']) or '(nothing)'}")
    else:
        print(f"params     {len(sig['params'])} tensors")
    print("files")
    for rel, info in m["files"].items():
        print(f"  {rel:<32} {human_bytes(info['size']):>10}  sha256 {info['sha256'][:16]}")
    return 0


def cmd_verify(args) -> int:
    from bmc.runtime.artifact import verify_artifact

    path = Path(args.artifact)
    manifest = verify_artifact(path, check_versions=not args.skip_versions)
    print(f"{path}: digests of {len(manifest['files'])} files OK" +
          ("" if args.skip_versions else f", tvm {manifest['tvm_version']} / tvm-ffi {manifest['tvm_ffi_version']} OK"))
    bad = weight_nonfinite(path, manifest)
    if bad:
        total_nan = sum(n for n, _ in bad.values())
        total_inf = sum(i for _, i in bad.values())
        print(f"weights: {total_nan} NaN and {total_inf} Inf values in {len(bad)} tensor(s) (allowed; reported):")
        for name, (nan, inf) in bad.items():
            print(f"  {name}: {nan} NaN, {inf} Inf")
    else:
        print("weights: all finite")
    if args.inputs:
        return _verify_numerics(path, manifest, args)
    print("OK")
    return 0


def _verify_numerics(path: Path, manifest: dict, args) -> int:
    """``bmc verify --inputs``: the artifact's outputs against the reference interpreter on the source model, and
    where they part (FAILURES.md 49, 50)."""
    from bmc.compiler import import_graph, plan_graph
    from bmc.runtime.artifact import file_digest
    from bmc.runtime.executor import load
    from bmc.sharding.mesh import Mesh
    from bmc.testing.localize import check_outputs, first_divergence, first_nonfinite
    from bmc.testing.reference import run_reference

    if not args.model:
        raise UsageError("--inputs needs the model the artifact was compiled from", where="--model",
                         fix="add --model MODEL.onnx")
    model_path = Path(args.model)
    if not model_path.is_file():
        raise UsageError(f"no such file {args.model!r}", where="--model", fix="pass the source .onnx file")
    source = manifest.get("source") or {}
    if source.get("sha256") and file_digest(model_path)["sha256"] != source["sha256"]:
        raise UsageError(f"{args.model} is not the model this artifact was compiled from ({source.get('model')}, "
                         f"sha256 {source['sha256'][:16]}...)", where="--model", fix="pass the source .onnx file")
    inputs = _read_npz(Path(args.inputs))
    options = manifest.get("options") or {}
    dtype = options.get("dtype", "float32")
    tolerance = args.tolerance or (1e-4 if dtype == "float32" else 1e-2)
    model = load(path, simulate=manifest["world_size"] > 1)
    got = model.run({k: v.copy() for k, v in inputs.items()})  # (a donated input is written over)
    shapes = {i["name"]: tuple(i["shape"]) for i in manifest["signature"]["inputs"] if i["name"] in model.input_names}
    graph = import_graph(model_path, shapes)
    reference = run_reference(graph, inputs, keep=True)
    names = graph.output_names or [v.name for v in graph.outputs]
    checks = check_outputs(got, {n: reference[v.name] for n, v in zip(names, graph.outputs)}, tolerance)
    print(f"outputs vs the single-device reference ({model_path.name}, numpy), tolerance {tolerance:g} x "
          "max(1, max |reference|):")
    for c in checks:
        extra = f", {c.nonfinite} NaN/Inf where the reference is finite" if c.nonfinite else ""
        print(f"  {c.name:<32} max abs error {c.max_abs:.3e} ({c.relative:.2e} of scale {c.scale:.3g}){extra}: "
              f"{'OK' if c.ok else 'MISMATCH'}")
    made = first_nonfinite(graph, reference)
    if made is not None:
        print(f"the model itself makes NaN/Inf first at node #{made.index} {made.node} ({made.op}), value "
              f"{made.value!r}, on these inputs")
    if all(c.ok for c in checks):
        print("OK")
        return 0
    if "pipeline" in manifest or manifest["world_size"] == 1 or dtype != "float32":  # (--stages auto may have
        # chosen one program: that is planned again like any)
        why = ("a pipeline" if "pipeline" in manifest else "one device" if manifest["world_size"] == 1
               else f"{dtype}")
        print(f"(the search for the first differing tensor runs on float32 single programs over a mesh; this artifact "
              f"is {why}: the difference is in its compiled kernels or weights)")
        return 1
    mesh = Mesh.parse("x".join(map(str, manifest["mesh"]["shape"])), ",".join(manifest["mesh"]["axes"]))
    plan_options = {k: v for k, v in options.items() if k not in ("dtype", "strategy", "shard", "stages",
                                                                    "microbatches", "donate", "dtype_io")}
    prog, _ = plan_graph(graph, mesh=mesh, shard=options.get("shard") or None, strategy=options.get("strategy"),
                         warn=lambda _m: None, **plan_options)
    found = first_divergence(prog, inputs, reference, tolerance)
    if found is None:
        print("the sharded program, planned again and run on the simulator, matches the reference at every tensor: "
              "the difference is in the compiled kernels or the artifact's weights")
    else:
        where = f" (first on device {list(found.device)})" if found.device is not None else ""
        print(f"first tensor that differs in the sharded program: {found.value!r}, made by node #{found.index} "
              f"{found.node} ({found.op}): error {found.error:.3e} of its scale{where}")
    return 1


def weight_nonfinite(path: Path, manifest: dict, chunk: int = 1 << 22) -> dict[str, tuple[int, int]]:
    """``{tensor: (NaN count, Inf count)}`` over every rank's weights, for tensors that have any (FAILURES.md 14)."""
    import numpy as np

    from bmc.ir.types import FLOAT_DTYPES
    from bmc.runtime.safetensors import SafetensorsFile

    found: dict[str, tuple[int, int]] = {}
    for rank, rel in manifest["weights"].items():
        st = SafetensorsFile(path / rel)
        for name in st.names():
            if st.info(name)[0] not in FLOAT_DTYPES:
                continue
            flat = st.get(name).reshape(-1)
            nan = inf = 0
            for i in range(0, flat.size, chunk):  # bounded memory for huge tensors
                block = flat[i:i + chunk]
                nan += int(np.isnan(block).sum())
                inf += int(np.isinf(block).sum())
            if nan or inf:
                found[name if len(manifest["weights"]) == 1 else f"[rank {rank}] {name}"] = (nan, inf)
    return found


def cmd_demo(args) -> int:
    from bmc.demo import main as demo_main

    result = demo_main()
    return result if isinstance(result, int) else 0


# --- parser and main -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bmc", description="bmc: compile ONNX models with Apache TVM and run them.")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile an ONNX model into a .bmc artifact")
    c.add_argument("model", help="the .onnx file")
    c.add_argument("-o", "--output", required=True, help="the artifact folder to write, e.g. model.bmc")
    c.add_argument("--target", choices=("llvm", "cuda"), default="llvm", help="llvm (host CPU) or cuda")
    c.add_argument("--cuda-arch", action="append", metavar="SM", help="CUDA architecture, e.g. sm_90 (repeatable)")
    c.add_argument("--input-shape", action="append", metavar="NAME=DIMS",
                   help=f"bind an input's shape or a symbolic dim (SYMBOL=SIZE): {_SHAPE_GRAMMAR}")
    c.add_argument("--tune", type=int, default=0, metavar="N",
                   help="tune the TVM kernels with N MetaSchedule trials (cuda: needs a GPU here; the `tune` extra: "
                        "pip install 'bmc[tune]'); results are kept in a database reused by later compiles")
    c.add_argument("--tune-db", metavar="DIR", help="the tuning database folder (default ~/.cache/bmc/tuning/...); "
                   "given without --tune, its schedules are applied and nothing is tuned")
    c.add_argument("--tune-export", metavar="DIR", help="with --tune N: write N sampled kernel schedules, compiled, "
                   "into DIR instead of measuring them here (for a GPU this machine lacks: `bmc tune measure DIR` "
                   "there, then `bmc tune import DIR` here)")
    c.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="run a float32 model in this precision (weights converted; inputs/outputs stay float32 "
                        "unless named by --dtype-io)")
    c.add_argument("--dtype-io", action="append", metavar="NAME",
                   help="with --dtype: pass this float32 input or output in that precision too (a name or pattern, "
                        "e.g. 'past_key_values.*'; repeatable): a key/value cache then takes half the bytes")
    c.add_argument("--mesh", default="1", help="device mesh, e.g. 8x8 (SIZE[xSIZE...]; default 1)")
    c.add_argument("--mesh-axes", help="names of the mesh axes, e.g. dp,tp (default x,y,z,w)")
    c.add_argument("--shard", action="append", metavar="NAME=SPEC",
                   help="sharding annotation for an input, weight or intermediate tensor, e.g. w=[{},{y}]")
    _add_plan_flags(c)
    c.add_argument("--donate", action="append", metavar="NAME",
                   help="let the program write over this input (a name or pattern, e.g. 'past_key_values.*'; "
                        "repeatable): a scatter that alone reads it updates it in place, and the output it makes is "
                        "the input's own array (a key/value cache step copies only the new token)")
    c.add_argument("--dump-dir", help="write the IR after every pass into this folder")
    c.set_defaults(func=cmd_compile)

    pl = sub.add_parser("plan", help="plan the sharding of an ONNX model on a mesh (no code generation)")
    pl.add_argument("model", help="the .onnx file")
    pl.add_argument("--mesh", default="1", help="device mesh, e.g. 2x4")
    pl.add_argument("--mesh-axes", help="names of the mesh axes, e.g. dp,tp")
    pl.add_argument("--shard", action="append", metavar="NAME=SPEC", help="sharding annotation (repeatable)")
    _add_plan_flags(pl)
    pl.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=f"as for compile: {_SHAPE_GRAMMAR}")
    pl.add_argument("--json", metavar="PATH", help="write the plan as JSON instead of printing the table")
    pl.add_argument("--html", metavar="PATH", help="write the plan as a one-file HTML report (charts of time and "
                    "memory, every collective, each device's blocks of the largest tensors, every node)")
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser("run", help="run an artifact on inputs from an .npz file")
    r.add_argument("artifact")
    r.add_argument("--inputs", required=True, help=".npz whose keys are the input names")
    r.add_argument("-o", "--output", required=True, help=".npz to write, keyed by output name")
    r.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: BMC_NUM_THREADS / OMP_NUM_THREADS "
                   "or the CPUs this process may use)")
    r.add_argument("--simulate", action="store_true",
                   help="run every rank of a multi-device artifact in this process (simulated collectives)")
    r.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: the artifact's target; under MPI "
                   "each rank takes a GPU by its rank on the host)")
    r.add_argument("--collectives", choices=("auto", "python", "native", "nccl", "host"),
                   help="host tensors: native C++ (built on first use), python (mpi4py); GPU tensors: nccl or host "
                        "(host-staged MPI); auto (default, or BMC_COLLECTIVES): native when built / NCCL when every "
                        "rank has its own GPU")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("show", help="print an artifact's manifest summary")
    s.add_argument("artifact")
    s.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    s.add_argument("--html", metavar="PATH", help="write the artifact's sharding plan as a one-file HTML report")
    s.set_defaults(func=cmd_show)

    v = sub.add_parser("verify", help="check an artifact's digests and versions; report NaN/Inf in the weights")
    v.add_argument("artifact")
    v.add_argument("--skip-versions", action="store_true", help="do not compare TVM/tvm-ffi versions")
    v.add_argument("--inputs", metavar="NPZ", help="also run the artifact (every rank in this process) on these inputs "
                   "and compare each output with the single-device reference of --model; on a mismatch, name the "
                   "first tensor of the sharded program that differs, and the first node making NaN/Inf")
    v.add_argument("--model", help="with --inputs: the .onnx file the artifact was compiled from")
    v.add_argument("--tolerance", type=float, metavar="T", help="with --inputs: max abs error allowed, over "
                   "max(1, max |reference|) (default 1e-4; 1e-2 for float16/bfloat16 artifacts)")
    v.set_defaults(func=cmd_verify)

    t = sub.add_parser("tune", help="tuning for a device elsewhere: measure exported candidates, import the times")
    tsub = t.add_subparsers(dest="tune_command", required=True, metavar="ACTION")
    tm = tsub.add_parser("measure", help="time the candidates of `bmc compile --tune-export DIR` on this machine's "
                         "device (needs only the TVM runtime); writes DIR/timings.json")
    tm.add_argument("folder")
    tm.add_argument("--number", type=int, default=10, help="calls per timing (default 10)")
    tm.add_argument("--repeat", type=int, default=3, help="timings per candidate (default 3)")
    tm.set_defaults(func=cmd_tune_measure)
    ti = tsub.add_parser("import", help="put the measured times into the tuning database (a kernel gets a tuned "
                         "schedule only when it beats its default one)")
    ti.add_argument("folder")
    ti.add_argument("--tune-db", metavar="DIR", help="the database folder (default: the target's, as for compile)")
    ti.set_defaults(func=cmd_tune_import)

    d = sub.add_parser("demo", help="compile and run a small bundled model end to end")
    d.set_defaults(func=cmd_demo)
    return p


def _versions() -> str:
    from bmc.runtime.artifact import installed_versions

    try:
        v = installed_versions()
        return (f"bmc {v['bmc_version']}, tvm {v['tvm_version']}, tvm-ffi {v['tvm_ffi_version']}, "
                f"python {sys.version.split()[0]}")
    except Exception:  # noqa: BLE001  (never fail while reporting a failure)
        return f"python {sys.version.split()[0]}"


def _report_bug(err: BaseException) -> int:
    traceback.print_exception(err, file=sys.stderr)
    print(f"bmc: {InternalError.category}: {type(err).__name__}: {err}", file=sys.stderr)
    print(f"versions: {_versions()}", file=sys.stderr)
    return InternalError.exit_code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to ``sys.exit``)."""
    install_sigterm_handler()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InternalError as err:
        return _report_bug(err)
    except BmcError as err:
        if args.verbose:
            traceback.print_exception(err, file=sys.stderr)
        print(f"bmc: {err.category}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print("bmc: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("bmc: terminated", file=sys.stderr)
        return 143
    except Exception as err:  # noqa: BLE001  (anything else is a bug in bmc)
        return _report_bug(err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
