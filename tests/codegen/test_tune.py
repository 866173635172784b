"""MetaSchedule tuning on the llvm path (bmc.codegen.tune): numerics, the JSON database, reuse across compiles.

Real TVM MetaSchedule with a real builder/runner (process pools) on this machine; needs ``cloudpickle``
(skipped, saying so, without it); uses the xgboost cost model when xgboost is installed, else the random one.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder


def _graph(twins: bool = False):
    """softmax → layer norm → gelu; ``twins`` adds outputs x + 1 and x + 2: two kernels that differ only in a
    constant, whose sampled schedules can be the same trace."""
    b = GraphBuilder("tune")
    x = b.input("x", TensorType("float32", (64, 256)))
    scale = b.constant(np.linspace(0.5, 1.5, 256, dtype="float32"))
    bias = b.constant(np.linspace(-0.25, 0.25, 256, dtype="float32"))
    y = b.emit1("softmax", [x], axis=-1)
    y = b.emit1("layer_norm", [y, scale, bias], axis=-1, epsilon=1e-5)
    extra = [b.emit1("add", [x, b.constant(np.float32(c))]) for c in (1, 2)] if twins else []
    return b.finish([b.emit1("gelu", [y], approximate="none"), *extra])


def _reference(x):
    from scipy import special

    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    y = e / e.sum(-1, keepdims=True)
    y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
    y = y * np.linspace(0.5, 1.5, 256, dtype="float32") + np.linspace(-0.25, 0.25, 256, dtype="float32")
    return 0.5 * y * (1 + special.erf(y / np.sqrt(2)))


def _run(built, x):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(built.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()


def test_default_db_dir_is_per_target(monkeypatch, tmp_path):
    from bmc.codegen.tune import default_db_dir

    monkeypatch.setenv("BMC_TUNING_DIR", str(tmp_path))
    a, b = default_db_dir("llvm"), default_db_dir("llvm -mcpu=znver3")
    assert a.parent == tmp_path and b.parent == tmp_path and a != b
    assert default_db_dir("llvm") == a
    monkeypatch.delenv("BMC_TUNING_DIR")
    assert default_db_dir("llvm").parent.parts[-3:] == (".cache", "bmc", "tuning")


@pytest.mark.slow
def test_tuned_build_matches_reference_and_reuses_database(tmp_path):
    pytest.importorskip("cloudpickle", reason="MetaSchedule's process pools need cloudpickle (pip install cloudpickle)")
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    g, db = _graph(), tmp_path / "db"
    x = np.random.default_rng(0).standard_normal((64, 256)).astype("float32")
    ref = _reference(x)

    t0 = time.perf_counter()
    first = build(g, TargetSpec.parse("llvm"), tune_trials=4, tune_db=db)
    first_s = time.perf_counter() - t0
    info = first.kernels["cpu"]["tuning"]
    assert info["tasks"] >= 2 and info["tuned"] == info["tasks"] and info["reused"] == 0
    assert info["trials"] > 0 and info["applied"] == info["tasks"], info
    json.dumps(first.kernels)  # goes into the manifest
    np.testing.assert_allclose(_run(first, x), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))

    records = db / "database_tuning_record.json"
    n_records = len(records.read_text().splitlines())
    assert n_records == info["trials"]
    assert len((db / "database_workload.json").read_text().splitlines()) == info["tasks"]

    t0 = time.perf_counter()
    second = build(g, TargetSpec.parse("llvm"), tune_trials=4, tune_db=db)
    second_s = time.perf_counter() - t0
    info2 = second.kernels["cpu"]["tuning"]
    assert info2["tuned"] == 0 and info2["trials"] == 0 and info2["reused"] == info["tasks"], info2
    assert info2["applied"] == info["tasks"]  # the records are applied, not just found
    assert len(records.read_text().splitlines()) == n_records  # no new measurements
    assert second_s < first_s / 5, (first_s, second_s)
    np.testing.assert_allclose(_run(second, x), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_candidates_measured_elsewhere_are_imported_and_applied(tmp_path):
    """The flow for a device the compiling machine lacks, here with llvm so that every step runs: the compile
    writes sampled schedules, compiled, plus each kernel's default (``--tune-export``); ``bmc tune measure`` times
    them in another process with only the TVM runtime loaded; ``bmc tune import`` keeps, per kernel, the fastest
    candidate if it beats the default; a compile with ``--tune-db`` applies those and still computes the model."""
    import os
    import subprocess
    import sys

    from bmc.cli import main
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec

    from tvm_ffi import structural_hash

    from bmc.codegen.tune import open_database, record_digest

    g, db, cands = _graph(twins=True), tmp_path / "db", tmp_path / "cands"
    exported = build(g, TargetSpec.parse("llvm"), tune_trials=8, tune_db=db, tune_export=cands)
    info = exported.kernels["cpu"]["tuning"]["export"]
    manifest = json.loads((cands / "manifest.json").read_text())
    assert info["candidates"] == len(manifest["candidates"]) >= info["tasks"] + 1 and info["tasks"] >= 3
    assert {c["task"] for c in manifest["candidates"] if c["trace"] is None} == set(range(info["tasks"]))
    records = open_database(cands / "search").get_all_tuning_records()
    pairs = {(str(r.trace), str(structural_hash(r.workload.mod))) for r in records}  # random samples repeat
    assert len({t for t, _ in pairs}) < len(pairs) == len({record_digest(r) for r in records})  # one trace, 2 kernels
    assert not (db / "database_tuning_record.json").exists() or not (db / "database_tuning_record.json").read_text()

    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    subprocess.run([sys.executable, "-c", "import tvm, tvm_ffi; "
                    "assert 'relax.analysis.free_vars' not in tvm_ffi.registry.list_global_func_names()"],
                   env=env, check=True)  # the compiler is not loaded
    done = subprocess.run([sys.executable, "-m", "bmc", "tune", "measure", str(cands), "--number", "2"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    timings = json.loads((cands / "timings.json").read_text())["candidates"]
    assert set(timings) == {c["file"] for c in manifest["candidates"]}
    assert all(v["secs"] and min(v["secs"]) > 0 for v in timings.values()), timings

    assert main(["tune", "import", str(cands), "--tune-db", str(db)]) == 0
    from bmc.runtime.measure import best_per_kernel

    rows = best_per_kernel(manifest, json.loads((cands / "timings.json").read_text()))
    assert all(r["default_s"] and r["best_s"] for r in rows) and len(rows) == info["tasks"]
    tuned = [r for r in rows if r["best_s"] < r["default_s"]]  # only these may enter the database
    imported = open_database(db).get_all_tuning_records()
    assert sorted(float(r.run_secs[0]) for r in imported) == pytest.approx(sorted(r["best_s"] for r in tuned))

    applied = build(g, TargetSpec.parse("llvm"), tune_db=db)
    assert applied.kernels["cpu"]["tuning"]["applied"] == len(tuned) and applied.kernels["cpu"]["tuning"]["trials"] == 0
    x = np.random.default_rng(0).standard_normal((64, 256)).astype("float32")
    ref = _reference(x)
    np.testing.assert_allclose(_run(applied, x), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_tune_export_needs_trials_and_import_needs_timings(tmp_path, capsys):
    from bmc.cli import main

    assert main(["compile", "model.onnx", "-o", str(tmp_path / "m.bmc"), "--tune-export", str(tmp_path / "c")]) == 2
    assert "--tune-export" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    assert main(["tune", "import", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "manifest" in err and "Traceback" not in err
