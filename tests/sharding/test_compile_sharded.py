"""The sharded compile path: ``bmc compile --mesh ... --strategy/--shard`` writes the local SPMD program with the
mesh, rank map, per-rank weights and plan; ``bmc.load(path, simulate=True)`` runs every rank with the TVM-compiled
program and simulated collectives and matches onnxruntime; ``bmc plan --json`` writes the documented keys, and
``bmc plan/show --html`` the report."""

import json
import re
import shutil
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bmc
from bmc.errors import ExecutionError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sharded_gpt2(tmp_path_factory):
    from bmc.sharding.mesh import Mesh

    out = tmp_path_factory.mktemp("sharded") / "gpt2.bmc"
    bmc.compile(FIXTURES / "gpt2_dynamo.onnx", out, mesh=Mesh.parse("2x2"), strategy="dp+megatron",
                input_shapes={"batch": 2, "seq": 16})
    return out


def test_manifest_holds_mesh_rank_map_and_per_rank_weights(sharded_gpt2):
    manifest = json.loads((sharded_gpt2 / "manifest.json").read_text())
    assert manifest["mesh"] == {"shape": [2, 2], "axes": ["x", "y"]} and manifest["world_size"] == 4
    assert manifest["rank_map"] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert sorted(manifest["weights"]) == ["0", "1", "2", "3"]
    plan = json.loads((sharded_gpt2 / "plan.json").read_text())
    assert [c["kind"] for c in plan["collectives"]].count("all_reduce") == 4
    from bmc.runtime.safetensors import SafetensorsFile

    w0 = SafetensorsFile(sharded_gpt2 / "weights" / "rank0.safetensors")
    w1 = SafetensorsFile(sharded_gpt2 / "weights" / "rank1.safetensors")
    name = "model.transformer.h.0.mlp.c_fc.weight"  # column-parallel over y: ranks 0 and 1 hold different halves
    assert w0.info(name)[1] == (32, 64) and not np.array_equal(w0.get(name), w1.get(name))


def test_simulated_run_matches_onnxruntime(sharded_gpt2):
    data = np.load(FIXTURES / "gpt2_dynamo.npz")
    model = bmc.load(sharded_gpt2, simulate=True)
    assert model.input_names == ["input_ids"]  # the mesh coordinate is supplied by the runtime
    logits = model(input_ids=data["input_ids"])
    want = data["output:logits"]
    assert float(np.max(np.abs(logits - want))) <= 1e-4 * max(1.0, float(np.max(np.abs(want))))


def test_multi_rank_artifact_needs_mpiexec_or_simulate(sharded_gpt2):
    with pytest.raises(ExecutionError, match="mpiexec -n 4"):
        bmc.load(sharded_gpt2)


def test_plan_json_has_the_documented_keys(tmp_path):
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "bmc", "plan", str(FIXTURES / "bert_dynamo.onnx"), "--mesh", "2x2",
                        "--strategy", "dp+megatron", "--input-shape", "batch=2", "--input-shape", "seq=16",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    assert plan["mesh"] == {"axes": ["x", "y"], "shape": [2, 2]}
    v = plan["values"]["input_ids"]
    assert v == {"shape": [2, 16], "dtype": "int64", "spec": "[{x}, {}]", "origin": "annotation"}
    assert {"kind", "axes", "bytes", "node"} <= set(plan["collectives"][0])
    assert {"peak_bytes_per_device", "budget_bytes"} <= set(plan["memory"])
    assert {"total_s", "compute_s", "comm_s"} <= set(plan["cost"])
    table = subprocess.run([sys.executable, "-m", "bmc", "plan", str(FIXTURES / "bert_dynamo.onnx"), "--mesh", "2x2",
                            "--strategy", "dp+megatron", "--input-shape", "batch=2", "--input-shape", "seq=16"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert "all_reduce" in table.stdout and "bytes/device" in table.stdout


def test_html_reports_of_a_plan_and_of_an_artifact(sharded_gpt2, tmp_path):
    """``bmc plan --html`` and ``bmc show --html`` write the same one-file report (from plan.json); a damaged
    plan.json or an unwritable path is a clear error and leaves no file."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "bmc"]
    out = tmp_path / "plan.html"
    r = subprocess.run([*cmd, "plan", str(FIXTURES / "gpt2_dynamo.onnx"), "--mesh", "2x2", "--strategy",
                        "dp+megatron", "--input-shape", "batch=2", "--input-shape", "seq=16", "--html", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {out}", r.stderr
    shown = tmp_path / "artifact.html"
    r = subprocess.run([*cmd, "show", str(sharded_gpt2), "--html", str(shown)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = json.loads((sharded_gpt2 / "plan.json").read_text())
    for page in (out.read_text(), shown.read_text()):
        embedded = re.search(r"<script type='application/json' id='bmc-plan'>(.*?)</script>", page, re.S).group(1)
        assert json.loads(embedded)["collectives"] == plan["collectives"]
        kinds = [c["kind"] for c in plan["collectives"]]
        assert kinds.count("all_reduce") == 4 and f"Collectives ({len(kinds)})" in page
        assert page.count("<tr class=coll>") == 4  # the four all-reduces, each on its node's row (the logits'
        # all-gathers are for the outputs)
    damaged = Path(shutil.copytree(sharded_gpt2, tmp_path / "damaged.bmc"))
    (damaged / "plan.json").write_text((damaged / "plan.json").read_text().replace("all_reduce", "all_gather"))
    r = subprocess.run([*cmd, "show", str(damaged), "--html", str(tmp_path / "d.html")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 6 and "plan.json is corrupted" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*cmd, "show", str(sharded_gpt2), "--html", str(tmp_path / "no" / "such" / "r.html")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--html" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.html", "damaged.bmc", "plan.html"]


def test_shard_flag_naming_a_missing_tensor_is_a_usage_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "bmc", "plan", str(FIXTURES / "gpt2_dynamo.onnx"), "--mesh", "2",
                        "--shard", "input_id=[{x},{}]", "--input-shape", "batch=2", "--input-shape", "seq=16"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "did you mean 'input_ids'" in r.stderr and "Traceback" not in r.stderr


def test_local_program_keeps_the_output_names(sharded_gpt2):
    manifest = json.loads((sharded_gpt2 / "manifest.json").read_text())
    assert [o["name"] for o in manifest["signature"]["outputs"]] == ["logits"]


@pytest.mark.parametrize("name, dtype", [("xattn_dynamo", "float32"), ("xattn_legacy", "float32"),
                                         ("xattn_dynamo", "bfloat16")])
def test_context_parallel_cross_attention_matches_onnxruntime(tmp_path, name, dtype):
    """Context parallelism on a real export (a decoder's cross-attention to a 48-token memory, PyTorch's SDPA with
    a key padding mask): ``--shard memory=[{},{x},{}] memory_mask=[{},{x}]`` on 4 devices splits the keys, each
    device runs the fused kernel on its 12 keys with their log-sum-exps, and the plan's only collectives are the
    per-row max and sum and the output's all-reduce (the memory is never gathered); within 1e-5 of onnxruntime,
    batch 1's padded keys (all of the last device's) included; with ``--dtype bfloat16`` (bfloat16 partial sums
    all-reduced) within 1e-2 of max |ref|."""
    data = np.load(FIXTURES / f"{name}.npz")
    out = tmp_path / "xattn.bmc"
    bmc.compile(FIXTURES / f"{name}.onnx", out, mesh="4", shard={"memory": "[{},{x},{}]", "memory_mask": "[{},{x}]"},
                input_shapes={"batch": 2, "seq": 48}, dtype=dtype)
    plan = json.loads((out / "plan.json").read_text())
    assert [(c["kind"], c.get("reduce")) for c in plan["collectives"]] == [
        ("all_reduce", "max"), ("all_reduce", "sum"), ("all_reduce", "sum")]
    assert "bmc.cpu.attention_bias_lse" in json.loads((out / "manifest.json").read_text())["kernels"]["cpu"]["requires"]
    got = bmc.load(out, simulate=True)(**{k: data[k] for k in ("x", "memory", "memory_mask")})
    want = data["output:hidden"]
    assert float(np.max(np.abs(got - want))) <= (1e-5 if dtype == "float32" else 1e-2) * float(np.max(np.abs(want)))


def test_a_mesh_the_plan_does_not_use_is_reported(capsys):  # FAILURES.md 22
    """Axes that split no tensor are listed in plan.json (``idle_axes``) and the table; a plan that splits nothing at
    all on a mesh of several devices is a warning (not an error): every device would repeat the same work."""
    from bmc.compiler import plan_model
    from bmc.sharding.report import format_plan

    warnings = []
    _, prog, data = plan_model(FIXTURES / "gpt2_dynamo.onnx", mesh="4", strategy="replicate",
                               input_shapes={"batch": 2, "seq": 16}, warn=warnings.append)
    assert data["idle_axes"] == ["x"] and len(warnings) == 1 and "splits nothing over mesh 4" in warnings[0]
    assert "axis x splits nothing" in format_plan(prog, data)
    warnings.clear()
    _, _, data = plan_model(FIXTURES / "gpt2_dynamo.onnx", mesh="2x2", strategy="megatron",
                            input_shapes={"batch": 2, "seq": 16}, warn=warnings.append)
    assert data["idle_axes"] == ["x"] and warnings == []  # one axis idle by choice: reported, no warning
    _, _, data = plan_model(FIXTURES / "gpt2_dynamo.onnx", mesh="2x2", strategy="dp+megatron",
                            input_shapes={"batch": 2, "seq": 16}, warn=warnings.append)
    assert data["idle_axes"] == [] and warnings == []
