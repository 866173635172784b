"""Pipeline artifacts (``--stages``, ``--microbatches``) compiled for real and run in this process (every stage, its
ranks simulated) against onnxruntime's outputs; the artifact's pipeline section; damage to one stage's files. The
runs on real MPI ranks are in test_mpi.py."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bmc
from bmc.errors import ArtifactError, ExecutionError, UsageError

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "models"


def _inputs(data, names):
    return {n: data[n] for n in names}


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert float(np.max(np.abs(got - want))) <= 1e-4 * max(1.0, float(np.max(np.abs(want))))


@pytest.mark.parametrize("model,mesh,stages,microbatches,shard", [
    ("gpt2_dynamo", "2", 2, 2, None),
    ("bert_legacy", "3", 3, 1, None),
    ("llama_dynamo", "4", 2, 1, {"input_ids": "[{x},{}]"}),  # stage 0 data parallel on its 2 devices
])
def test_a_pipeline_matches_onnxruntime(tmp_path, model, mesh, stages, microbatches, shard):
    data = np.load(FIXTURES / f"{model}.npz")
    summary = bmc.compile(FIXTURES / f"{model}.onnx", tmp_path / "p.bmc", mesh=mesh, stages=stages,
                          microbatches=microbatches, input_shapes={"batch": 2, "seq": 16}, **({"shard": shard} if
                                                                                               shard else {}))
    assert len(summary["stages"]) == stages
    m = bmc.load(tmp_path / "p.bmc", simulate=True)
    assert len(m.stages) == stages and m.microbatches == microbatches
    outs = m.run(_inputs(data, m.input_names))
    for name, got in outs.items():
        _close(got, data[f"output:{name}"])
    if microbatches > 1:  # DLPack inputs are split into microbatches as well; the outputs stay numpy arrays
        import tvm_ffi

        tensors = {n: tvm_ffi.from_dlpack(np.ascontiguousarray(data[n])) for n in m.input_names}
        assert all(np.array_equal(got, outs[n]) for n, got in m.run(tensors).items())
        with pytest.raises(UsageError, match="outputs='device' is not one of 'auto', 'numpy' for a pipeline"):
            m.run(tensors, outputs="device")
    manifest = m.manifest
    assert manifest["format_version"] == 3 and sorted(manifest["programs"]) == [f"stage{i}" for i in range(stages)]
    per_stage = int(mesh) // stages
    assert [st["ranks"] for st in manifest["pipeline"]["stages"]] == [
        list(range(i * per_stage, (i + 1) * per_stage)) for i in range(stages)]
    if shard:  # the sharded stage really is sharded: its plan has collectives, its ranks hold their own weights
        plan = json.loads((tmp_path / "p.bmc" / "plan.json").read_text())
        assert plan["stages"][0]["collectives"]


def test_each_stage_holds_only_its_weights(tmp_path):
    """A stage's ranks hold only the weights their stage reads: the stages' weights are the model's weights,
    each once (plus any weight both stages read, in both), and neither stage holds most of them."""
    model = FIXTURES / "opt_dynamo.onnx"
    bmc.compile(model, tmp_path / "one.bmc", input_shapes={"batch": 2, "seq": 16})
    bmc.compile(model, tmp_path / "two.bmc", mesh="2", stages=2, input_shapes={"batch": 2, "seq": 16})

    def nbytes(params):
        return sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in params)

    whole = json.loads((tmp_path / "one.bmc" / "manifest.json").read_text())["signature"]["params"]
    stages = [st["signature"]["params"] for st in
              json.loads((tmp_path / "two.bmc" / "manifest.json").read_text())["pipeline"]["stages"]]
    shared = [p for p in stages[0] if p["name"] in {q["name"] for q in stages[1]}]
    assert {p["name"] for p in stages[0]} | {p["name"] for p in stages[1]} == {p["name"] for p in whole}
    assert nbytes(stages[0]) + nbytes(stages[1]) == nbytes(whole) + nbytes(shared)
    assert max(nbytes(stages[0]), nbytes(stages[1])) < 0.7 * nbytes(whole)


def test_bad_inputs_and_a_damaged_stage(tmp_path):
    data = np.load(FIXTURES / "gpt2_dynamo.npz")
    bmc.compile(FIXTURES / "gpt2_dynamo.onnx", tmp_path / "p.bmc", mesh="2", stages=2, microbatches=2,
                input_shapes={"batch": 2, "seq": 16})
    m = bmc.load(tmp_path / "p.bmc", simulate=True)
    with pytest.raises(ExecutionError, match=r"input 'input_ids': expected int64\[2,16\], got int64\[1,16\]"):
        m(input_ids=data["input_ids"][:1])
    shutil.copytree(tmp_path / "p.bmc", tmp_path / "q.bmc")  # (the loaded library must not change under it)
    program = tmp_path / "q.bmc" / "programs" / "stage1.so"
    blob = bytearray(program.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    program.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="stage1.so is corrupted"):
        bmc.load(tmp_path / "q.bmc", simulate=True)


def test_the_cli_compiles_shows_and_runs_a_pipeline(tmp_path):
    data = np.load(FIXTURES / "gpt2_dynamo.npz")
    np.savez(tmp_path / "in.npz", input_ids=data["input_ids"])
    bmc_cli = [sys.executable, "-m", "bmc"]
    r = subprocess.run([*bmc_cli, "compile", str(FIXTURES / "gpt2_dynamo.onnx"), "-o", str(tmp_path / "p.bmc"),
                        "--input-shape", "batch=2", "--input-shape", "seq=16", "--mesh", "2", "--stages", "2",
                        "--microbatches", "2"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "stage 0: nodes 0-" in r.stdout and "stage 1: nodes" in r.stdout and "ranks [1] (mesh 1)" in r.stdout
    r = subprocess.run([*bmc_cli, "plan", str(FIXTURES / "gpt2_dynamo.onnx"), "--input-shape", "batch=2",
                        "--input-shape", "seq=16", "--mesh", "2x2", "--stages", "2", "--json",
                        str(tmp_path / "plan.json")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["pipeline"]["submesh"] == {"shape": [2], "axes": ["y"]} and len(plan["stages"]) == 2
    assert all(p["mesh"]["shape"] == [2] for p in plan["stages"])
    r = subprocess.run([*bmc_cli, "show", str(tmp_path / "p.bmc")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "pipeline   2 stages, 2 microbatch(es)" in r.stdout, r.stdout + r.stderr
    assert "stage1   ranks [1]" in r.stdout
    r = subprocess.run([*bmc_cli, "verify", str(tmp_path / "p.bmc")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "digests of 5 files OK" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*bmc_cli, "run", str(tmp_path / "p.bmc"), "--inputs", str(tmp_path / "in.npz"), "-o",
                        str(tmp_path / "out.npz"), "--simulate"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "out.npz") as got:
        _close(got["logits"], data["output:logits"])
    r = subprocess.run([*bmc_cli, "compile", str(FIXTURES / "gpt2_dynamo.onnx"), "-o", str(tmp_path / "q.bmc"),
                        "--input-shape", "batch=2", "--input-shape", "seq=16", "--mesh", "2", "--stages", "4"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--stages" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "q.bmc").exists()


def test_stages_auto_compiles_the_chosen_pipeline(tmp_path):
    """``stages="auto"`` under memory pressure and a slow first axis (the case of the stage-search test) writes a
    2-stage artifact that matches onnxruntime; the search's table is in plan.json and printed by ``bmc plan``."""
    import onnxruntime as ort

    from tests.sharding.test_pipeline import _mlp

    model = _mlp(tmp_path / "mlp.onnx")
    options = dict(mesh="2x2", mesh_bandwidth="x=10GB", memory_per_device=7 << 20)
    summary = bmc.compile(model, tmp_path / "a.bmc", stages="auto", microbatches=4, input_shapes={"tokens": 256},
                          **options)
    assert len(summary["stages"]) == 2 and "<- chosen" in summary["plan_text"]
    plan = json.loads((tmp_path / "a.bmc" / "plan.json").read_text())
    assert [r["stages"] for r in plan["stage_search"]] == [1, 2]
    x = np.random.default_rng(3).standard_normal((256, 256)).astype(np.float32)
    want = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    got = bmc.load(tmp_path / "a.bmc", simulate=True)(x=x)
    _close(got, want)
    r = subprocess.run([sys.executable, "-m", "bmc", "plan", str(model), "--input-shape", "tokens=256", "--mesh", "2x2",
                        "--stages", "auto", "--microbatches", "4", "--mesh-bandwidth", "x=10GB",
                        "--memory-per-device", "7MiB"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s+2 .* <- chosen$", r.stdout, re.M) and "stage 1: nodes" in r.stdout


def _branchy(path: Path) -> Path:
    """Outputs made early (``y0``, read later too; ``t0``, read by no later layer), at the end, and a graph input
    returned as is; an input read only by the last layers; a constant read by every layer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    nodes, inits, x = [], [numpy_helper.from_array(np.float32(0.5), "half")], "x"
    for i in range(6):
        inits.append(numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]),
                  helper.make_node("Mul", [f"t{i}", "half"], [f"h{i}"])]
        if i >= 4:
            nodes.append(helper.make_node("Add", [f"h{i}", "bias"], [f"hb{i}"]))
        nodes.append(helper.make_node("Add", [x, f"hb{i}" if i >= 4 else f"h{i}"], [f"y{i}"]))
        x = f"y{i}"
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "branchy", [vi("x", TensorProto.FLOAT, ["b", 16]),
                                                 vi("bias", TensorProto.FLOAT, ["b", 16])],
                              [vi("y0", TensorProto.FLOAT, None), vi(x, TensorProto.FLOAT, None),
                               vi("bias", TensorProto.FLOAT, None), vi("t0", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("stages,microbatches", [(2, 2), (3, 1)])
def test_outputs_made_early_and_inputs_read_late_cross_the_stages(tmp_path, stages, microbatches):
    """Graph outputs made by the first stage (one read by later ones, one not: it is not sent along the chain), the
    last stage's output, a graph input returned as an output and an input only the last layers read: every stage
    count gives onnxruntime's outputs."""
    import onnxruntime as ort

    model = _branchy(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((4, 16)).astype(np.float32),
              "bias": rng.standard_normal((4, 16)).astype(np.float32)}
    want = ort.InferenceSession(str(model)).run(None, inputs)
    summary = bmc.compile(model, tmp_path / "p.bmc", mesh=str(stages), stages=stages, microbatches=microbatches,
                          input_shapes={"b": 4})
    assert len(summary["stages"]) == stages
    m = bmc.load(tmp_path / "p.bmc", simulate=True)
    assert m.output_names == ["y0", "y5", "bias", "t0"]  # the model's names (an input returned keeps its name)
    got = m(**inputs)
    for g, w in zip(got, want):
        _close(g, w)
    first = m.manifest["pipeline"]["stages"][0]
    assert "t0" in [o["name"] for o in first["signature"]["outputs"]] and "t0" not in first["sends"]
    single = bmc.compile(model, tmp_path / "one.bmc", input_shapes={"b": 4})
    assert single["output"] and bmc.load(tmp_path / "one.bmc").output_names == ["y0", "y5", "bias", "t0"]
