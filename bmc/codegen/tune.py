"""Optional MetaSchedule tuning of the TVM kernels, with a JSON database reused across compiles.

Matmuls/convs are offloaded to BLAS/cuBLAS before this runs; what MetaSchedule sees are the fused elementwise /
reduction / softmax / layer_norm PrimFuncs. A kernel whose workload is already in the database is not tuned
again (its best record is applied); kernels MetaSchedule cannot schedule keep their dlight/fallback schedule.

**Tuning for a device this machine does not have** (a login node without GPUs, or this project's CI): the search
runs here and writes its candidates, compiled, to a folder (:func:`export_candidates`, ``bmc compile --tune N
--tune-export DIR``); ``bmc tune measure DIR`` times them on the device's machine with nothing but the runtime
(:mod:`bmc.runtime.measure`); ``bmc tune import DIR`` puts the times into the database (:func:`import_timings`),
after which a compile with ``--tune-db`` applies the best schedules. Measured this way the search cannot learn
from the times as it goes: candidates are sampled at random from MetaSchedule's design space ("replay-trace"),
and each kernel's default (dlight) schedule is measured beside them, so a kernel only gets a tuned schedule that
beats it.

Needs ``cloudpickle`` (the builder/runner process pools) and, for the default cost model, ``xgboost``
(without it the random cost model is used). Two workarounds (docs TVM-NOTES §2): apache-tvm-ffi 0.1.14.post1,
and :func:`fast_build` instead of the default builder function, whose worker imports ``tvm.s_tir.tensor_intrin``
(29 s) and times out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax


def fast_build(mod, target, _params):
    """The LocalBuilder's build function, without the slow ``tvm.s_tir.tensor_intrin`` import."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def default_db_dir(target) -> Path:
    """``$BMC_TUNING_DIR`` or ``~/.cache/bmc/tuning``, then one folder per (target, TVM version); ``target``: a
    Target or its ``str``."""
    root = Path(os.environ.get("BMC_TUNING_DIR") or Path.home() / ".cache" / "bmc" / "tuning")
    key = hashlib.sha256(f"{target}|tvm {tvm.__version__}".encode()).hexdigest()[:16]
    return root / key


def open_database(db_dir: Path):
    from tvm.s_tir import meta_schedule as ms

    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(db_dir / "database_workload.json"),
                                    path_tuning_record=str(db_dir / "database_tuning_record.json"),
                                    module_equality="structural")


def _fresh_logging() -> None:
    """MetaSchedule's logging set-up names every handler its logger already has and fails on an unnamed one (a
    second search in one process under pytest did); the last search's file handlers point into its work folder.
    Each search starts with none."""
    import logging

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def _cost_model() -> str:
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"


def _scheduled(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get("tirx.is_scheduled")}


def tune_and_apply(mod: tvm.IRModule, target, trials: int, db_dir: Path | None = None, *, seed: int = 0,
                   record: dict | None = None) -> tvm.IRModule:
    """Tune the not-yet-scheduled PrimFuncs of ``mod`` (at most ``trials`` measurements in all, shared by the
    kernels not in the database yet), then apply the database's best schedules. Call with ``target`` current.

    ``record`` (if given) receives ``db, tasks, tuned, reused, trials, cost_model, applied, tune_s``: the database
    folder, kernels found, newly tuned, found in the database, measurements added, the cost model, kernels given
    a database schedule, seconds. A kernel counts as tuned once its workload is in the database (a later compile
    with more ``trials`` does not re-tune it; use a fresh ``db_dir`` for that)."""
    from bmc.runtime.kernels import cache_lock

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    with cache_lock(db_dir):  # FAILURES.md 32: compiles tuning into one database take turns
        return _tune_and_apply(mod, target, trials, db_dir, seed, record)


def _tune_and_apply(mod: tvm.IRModule, target, trials: int, db_dir: Path, seed: int, record: dict | None):
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import (
        extract_tasks,
        extracted_tasks_to_tune_contexts,
    )

    db = open_database(db_dir)
    t0 = time.perf_counter()
    tasks = [t for t in extract_tasks(mod, target) if not t.mod.attrs or not t.mod.attrs.get("tirx.is_scheduled")]
    new = [t for t in tasks if not db.has_workload(t.dispatched[0])]
    cost_model = _cost_model()
    trials_run = 0
    if new and trials > 0:
        per_iter = max(1, min(64, trials // len(new)))
        _fresh_logging()
        contexts, weights = extracted_tasks_to_tune_contexts(new, str(db_dir), seed=seed)
        before = len(db)
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(db_dir), max_trials_global=trials,
                      max_trials_per_task=trials, num_trials_per_iter=per_iter,
                      builder=ms.builder.LocalBuilder(f_build=fast_build, timeout_sec=120, max_workers=2),
                      runner=ms.runner.LocalRunner(timeout_sec=60), database=db, cost_model=cost_model)
        trials_run = len(db) - before
    before_sched = _scheduled(mod)
    with target, db:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    if record is not None:
        record.update({"db": str(db_dir), "tasks": len(tasks), "tuned": len(new) if trials > 0 else 0,
                       "reused": len(tasks) - len(new), "trials": trials_run, "cost_model": cost_model,
                       "applied": len(_scheduled(mod) - before_sched), "tune_s": round(time.perf_counter() - t0, 3)})
    return mod


def tune_pass(target, trials: int, db_dir: Path | None = None, record: dict | None = None,
              export: "CandidateExport | None" = None) -> tvm.transform.Pass:
    """Tune (or, with ``export``, write the candidates for measuring elsewhere), then apply the database."""

    @tvm.transform.module_pass(opt_level=0, name="BmcMetaScheduleTune")
    def _tune(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        sub: dict = {}
        if export is not None:
            export_candidates(mod, target, trials, export, record=sub)
        out = tune_and_apply(mod, target, 0 if export is not None else trials, db_dir, record=sub)
        if record is not None:
            record["tuning"] = sub
        return out

    return _tune


# --- tuning for a device this machine does not have ------------------------------------------------------------

CANDIDATES_FORMAT = "bmc-tune-candidates"
CANDIDATES_VERSION = 1
#: what the search here is told each candidate took (it needs an answer to go on; replay-trace does not use it)
UNMEASURED_S = 1.0


@dataclass(frozen=True)
class CandidateExport:
    """Where :func:`export_candidates` writes, and the CUDA architectures its libraries are compiled for."""

    folder: Path
    archs: tuple[str, ...] = ()


def _unmeasured_builder_and_runner():
    """A MetaSchedule builder and runner that build and run nothing: every candidate "takes" UNMEASURED_S."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

    @derived_object
    class Unbuilt(PyBuilder):
        def build(self, build_inputs):
            return [BuilderResult("unbuilt", None) for _ in build_inputs]

    @derived_object
    class Unmeasured(PyRunnerFuture):
        def done(self) -> bool:
            return True

        def result(self):
            return RunnerResult([UNMEASURED_S], None)

    @derived_object
    class Deferred(PyRunner):
        def run(self, runner_inputs):
            return [Unmeasured() for _ in runner_inputs]

    return Unbuilt(), Deferred()


def _args(func: tvm.tirx.PrimFunc) -> list[dict]:
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    return [{"shape": [int(d) for d in a.shape], "dtype": str(a.dtype)} for a in ArgInfo.from_prim_func(func)]


def _compile_library(mod: tvm.IRModule, target, path: Path, archs: tuple[str, ...]) -> None:
    """One scheduled PrimFunc → a loadable library (CUDA: kernels compiled to cubin here, as in :func:`build`)."""
    if target.kind.name == "cuda":
        from bmc.codegen import cuda

        with cuda.codegen_env():
            ex = tvm.compile(mod, target=target)
        ex.export_library(str(path), fpack_imports=cuda.compile_executable(ex, archs).pack_imports)
    else:
        tvm.compile(mod, target=target).export_library(str(path))


def _default_schedule(mod: tvm.IRModule, target) -> tvm.IRModule:
    from tvm.s_tir import dlight as dl

    if target.kind.name == "cuda":
        from bmc.codegen.gpu import schedule_rules
    else:
        from bmc.codegen.cpu import schedule_rules
    copy = tvm.ir.load_json(tvm.ir.save_json(mod))  # dlight schedules the PrimFunc in place: keep the workload's
    with target:
        return dl.ApplyDefaultSchedule(*schedule_rules())(copy)


def export_candidates(mod: tvm.IRModule, target, trials: int, export: CandidateExport, *, seed: int = 0,
                      record: dict | None = None) -> Path:
    """Sample ``trials`` schedules in all for the unscheduled PrimFuncs of ``mod`` (MetaSchedule's design space,
    random decisions), compile each, and each kernel's default schedule, into ``export.folder`` with a
    ``manifest.json`` for :func:`bmc.runtime.measure.measure_candidates`. Candidates that fail to compile are left
    out. Writes into a temporary folder renamed into place at the end."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks, extracted_tasks_to_tune_contexts
    from tvm_ffi import structural_equal

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    final = Path(export.folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    t0 = time.perf_counter()
    try:
        tasks = [t for t in extract_tasks(mod, target) if not t.mod.attrs or not t.mod.attrs.get("tirx.is_scheduled")]
        search = open_database(work / "search")
        if tasks:
            _fresh_logging()
            contexts, weights = extracted_tasks_to_tune_contexts(tasks, str(work / "search"), strategy="replay-trace",
                                                                 seed=seed)
            builder, runner = _unmeasured_builder_and_runner()
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work / "search"),
                          max_trials_global=trials, max_trials_per_task=trials,
                          num_trials_per_iter=max(1, min(64, trials // len(tasks))), builder=builder,
                          runner=runner, database=search, cost_model="random",
                          measure_callbacks=[ms.measure_callback.AddToDatabase()])
            _fresh_logging()  # close its log files: the logs of a search that measured nothing are not kept
            shutil.rmtree(work / "search" / "logs", ignore_errors=True)
        search = open_database(work / "search")  # as the import will read it (the traces' digests must agree)
        workloads = [search.commit_workload(t.dispatched[0]) for t in tasks]
        candidates, failed = [], 0

        def add(task: int, name: str, scheduled: tvm.IRModule, trace: str | None) -> None:
            nonlocal failed
            (gv, func), = scheduled.functions_items()
            try:
                _compile_library(scheduled, target, work / name, export.archs)
            except Exception:  # noqa: BLE001  (a sampled schedule that does not compile: not a candidate)
                failed += 1
                return
            candidates.append({"file": name, "task": task, "trace": trace, "func": gv.name_hint,
                               "args": _args(func)})

        for i, wl in enumerate(workloads):
            base = _default_schedule(wl.mod, target)
            if all(f.attrs and f.attrs.get("tirx.is_scheduled") for _, f in base.functions_items()):
                add(i, f"k{i:03d}_default.so", base, None)
        for j, rec in enumerate(search.get_all_tuning_records()):
            i = next(k for k, wl in enumerate(workloads) if structural_equal(wl.mod, rec.workload.mod))
            sch = s_tir.Schedule(rec.workload.mod)
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
            add(i, f"k{i:03d}_c{j:04d}.so", sch.mod, record_digest(rec))
        manifest = {"format": CANDIDATES_FORMAT, "version": CANDIDATES_VERSION, "kind": target.kind.name,
                    "target": str(target), "tvm": tvm.__version__,
                    "archs": list(export.archs), "tasks": [t.task_name for t in tasks], "candidates": candidates}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # mkdtemp made it private
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if record is not None:
        record["export"] = {"folder": str(final), "tasks": len(tasks), "candidates": len(candidates),
                            "failed": failed, "export_s": round(time.perf_counter() - t0, 3)}
    return final


def record_digest(record) -> str:
    """What names a sampled schedule between the export and the import: its trace, as JSON, and its kernel (two
    kernels of the same shape can get the same trace)."""
    from tvm_ffi import structural_hash

    text = json.dumps([_plain(record.trace.as_json()), str(structural_hash(record.workload.mod))], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _plain(value):
    """TVM containers (Array, Map, String) as JSON values."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


def import_timings(folder: Path, db_dir: Path | None = None) -> dict:
    """Put the times ``bmc tune measure`` wrote (``timings.json``) into the tuning database: per kernel, the
    fastest candidate when it beats the kernel's default schedule (else nothing: the default stays). Returns a
    report: per kernel the default's and the best candidate's median seconds and what was chosen."""
    from bmc.errors import UsageError
    from bmc.runtime.kernels import cache_lock
    from bmc.runtime.measure import best_per_kernel

    folder = Path(folder)
    manifest, timings = (_read_json(folder / name, what) for name, what in
                         (("manifest.json", "the candidates' manifest"), ("timings.json", "the measured times")))
    if manifest.get("format") != CANDIDATES_FORMAT or manifest.get("version") != CANDIDATES_VERSION:
        raise UsageError(f"{folder} is not a bmc tuning-candidates folder of version {CANDIDATES_VERSION}",
                         where=str(folder / "manifest.json"), fix="export the candidates again with this bmc")
    if manifest.get("tvm") != tvm.__version__:
        raise UsageError(f"the candidates were made with TVM {manifest.get('tvm')}, this is TVM {tvm.__version__}",
                         where=str(folder), fix="export and measure them again with this TVM")
    records = {record_digest(r): r for r in open_database(folder / "search").get_all_tuning_records()}
    target = tvm.target.Target(manifest["target"])  # str(Target) is its JSON config, host included
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(manifest["target"])
    report = best_per_kernel(manifest, timings)
    with cache_lock(db_dir):
        _commit_best(report, records, open_database(db_dir), target, folder)
    return {"db": str(db_dir), "device": timings.get("device"), "kernels": report}


def _commit_best(report: list[dict], records: dict, db, target, folder: Path) -> None:
    """Each kernel's measured best into ``db`` where it beats the default schedule (``report`` gets ``chosen``)."""
    from tvm.s_tir import meta_schedule as ms

    from bmc.errors import UsageError

    for k in report:
        k["chosen"] = "tuned" if k["best_s"] is not None and (k["default_s"] is None
                                                              or k["best_s"] < k["default_s"]) else "default"
        if k["chosen"] == "tuned":
            rec = records.get(k["trace"])
            if rec is None:
                raise UsageError(f"the search records in {folder / 'search'} do not hold the schedule of {k['kernel']}",
                                 where=str(folder), fix="measure the folder as it was exported, then import")
            wl = db.commit_workload(rec.workload.mod)
            db.commit_tuning_record(ms.database.TuningRecord(rec.trace, wl, [k["best_s"]], target, rec.args_info))


def _read_json(path: Path, what: str) -> dict:
    from bmc.errors import UsageError

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{what} ({path.name}) is missing", where=str(path),
                         fix="run `bmc tune measure` on the candidates folder first" if path.name == "timings.json"
                         else "export the candidates with `bmc compile --tune N --tune-export DIR`") from None
    except ValueError as e:
        raise UsageError(f"{what} is not valid JSON: {e}", where=str(path), fix="measure or export again") from None
