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


def _graph():
    b = GraphBuilder("tune")
    x = b.input("x", TensorType("float32", (64, 256)))
    scale = b.constant(np.linspace(0.5, 1.5, 256, dtype="float32"))
    bias = b.constant(np.linspace(-0.25, 0.25, 256, dtype="float32"))
    y = b.emit1("softmax", [x], axis=-1)
    y = b.emit1("layer_norm", [y, scale, bias], axis=-1, epsilon=1e-5)
    return b.finish([b.emit1("gelu", [y], approximate="none")])


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
