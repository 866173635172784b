"""Optional MetaSchedule tuning of the llvm path's TVM kernels, with a JSON database reused across compiles.

Matmuls/convs are offloaded to BLAS before this runs; what MetaSchedule sees are the fused elementwise /
reduction / softmax / layer_norm PrimFuncs. A kernel whose workload is already in the database is not tuned
again (its best record is applied); kernels MetaSchedule cannot schedule keep their dlight/fallback schedule.

Needs ``cloudpickle`` (the builder/runner process pools) and, for the default cost model, ``xgboost``
(without it the random cost model is used). Two workarounds (docs TVM-NOTES §2): apache-tvm-ffi 0.1.14.post1,
and :func:`fast_build` instead of the default builder function, whose worker imports ``tvm.s_tir.tensor_intrin``
(29 s) and times out.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import tvm
from tvm import relax


def fast_build(mod, target, _params):
    """The LocalBuilder's build function, without the slow ``tvm.s_tir.tensor_intrin`` import."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def default_db_dir(target) -> Path:
    """``$BMC_TUNING_DIR`` or ``~/.cache/bmc/tuning``, then one folder per (target, TVM version)."""
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
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import (
        extract_tasks,
        extracted_tasks_to_tune_contexts,
    )

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    db = open_database(db_dir)
    t0 = time.perf_counter()
    tasks = [t for t in extract_tasks(mod, target) if not t.mod.attrs or not t.mod.attrs.get("tirx.is_scheduled")]
    new = [t for t in tasks if not db.has_workload(t.dispatched[0])]
    cost_model = _cost_model()
    trials_run = 0
    if new and trials > 0:
        per_iter = max(1, min(64, trials // len(new)))
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


def tune_pass(target, trials: int, db_dir: Path | None = None, record: dict | None = None) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="BmcMetaScheduleTune")
    def _tune(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        sub: dict = {}
        out = tune_and_apply(mod, target, trials, db_dir, record=sub)
        if record is not None:
            record["tuning"] = sub
        return out

    return _tune


