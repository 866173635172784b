"""benchmarks/ops.py, the single-op sweep against onnxruntime: onnxruntime loads every case, one op each, and
a run of two cases (a 1-D and a 3-D convolution, compiled, loaded and timed) writes their rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_ops():
    spec = importlib.util.spec_from_file_location("bmc_benchmarks_ops", ROOT / "benchmarks" / "ops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_case_loads_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    cases = _load_ops().cases()
    assert len(cases) >= 20
    for name, (model, feeds) in cases.items():
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert {i.name for i in session.get_inputs()} == set(feeds), name
        assert model.graph.output[0].name == "y" and len(model.graph.node) == 1, name


def test_a_run_writes_rows_close_to_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "ops.json"
    assert _load_ops().main(["--only", "conv1d_whisper,conv3d_3x3x3", "--budget", "0.05", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["ops"]
    assert set(rows) == {"conv1d_whisper", "conv3d_3x3x3"}
    for r in rows.values():
        assert r["bmc_s"] > 0 and r["onnxruntime_s"] > 0 and r["rel_error"] < 1e-4
