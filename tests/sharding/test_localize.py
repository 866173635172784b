"""Finding where a compiled model departs from the reference (FAILURES.md 49, 50): ``bmc verify --inputs``, and the
localizers under it, each shown a real fault (a wrong collective in a real partitioned program, a weight changed
in an artifact, a model that makes NaN) and required to name it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import bmc
from bmc.compiler import import_graph, plan_graph
from bmc.runtime.artifact import file_digest
from bmc.runtime.safetensors import SafetensorsFile, write_safetensors
from bmc.testing.localize import check_outputs, first_divergence, first_nonfinite
from bmc.testing.reference import run_reference

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "models"
SHAPES = {"batch": 2, "seq": 16}


@pytest.fixture(scope="module")
def gpt2():
    graph = import_graph(FIXTURES / "gpt2_dynamo.onnx", SHAPES)
    inputs = {"input_ids": np.load(FIXTURES / "gpt2_dynamo.npz")["input_ids"]}
    return graph, inputs, run_reference(graph, inputs, keep=True)


def test_a_correct_program_has_no_divergence(gpt2):
    graph, inputs, reference = gpt2
    prog, _ = plan_graph(graph, mesh="2x2", strategy="dp+megatron")
    assert first_divergence(prog, inputs, reference, 1e-5) is None


def test_a_wrong_collective_is_found_at_the_node_it_serves(gpt2):
    """The second all-reduce of the Megatron plan made a max instead of a sum: the first wrong tensor is the result
    of the node that all-reduce serves (plan.json's ``at``), on every device."""
    graph, inputs, reference = gpt2
    prog, data = plan_graph(graph, mesh="2x2", strategy="dp+megatron")
    reduces = [n for n in prog.graph.nodes if n.op == "all_reduce"]
    served = [c["at"] for c in data["collectives"] if c["kind"] == "all_reduce"]
    assert len(reduces) == len(served) == 4
    reduces[1].attrs["reduce"] = "max"
    found = first_divergence(prog, inputs, reference, 1e-5)
    assert found is not None and found.index == served[1] and found.error > 1e-3
    assert found.value in [v.name for v in graph.nodes[served[1]].outputs]


def test_the_first_node_making_nan_is_named():
    b = helper
    graph = b.make_graph([b.make_node("Mul", ["x", "x"], ["sq"], name="square"),
                          b.make_node("Sub", ["x", "sq"], ["d"], name="diff"),
                          b.make_node("Log", ["d"], ["l"], name="log_of_diff"),
                          b.make_node("Exp", ["l"], ["y"], name="exp")], "nan",
                         [b.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                         [b.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = b.make_model(graph, opset_imports=[b.make_opsetid("", 17)])
    g = import_graph(model)
    values = run_reference(g, {"x": np.array([0.5, 2.0, 0.25, 3.0], np.float32)}, keep=True)
    found = first_nonfinite(g, values)
    assert (found.node, found.op) == ("log_of_diff", "log")
    assert first_nonfinite(g, run_reference(g, {"x": np.full(4, 0.5, np.float32)}, keep=True)) is None


def test_check_outputs_counts_nonfinite_values_the_reference_does_not_have():
    want = {"y": np.array([1.0, np.nan, 3.0])}
    (ok,) = check_outputs({"y": np.array([1.0, np.nan, 3.00001])}, want, 1e-4)
    (bad,) = check_outputs({"y": np.array([np.inf, np.nan, 3.0])}, want, 1e-4)
    assert ok.ok and ok.nonfinite == 0 and not bad.ok and bad.nonfinite == 1


def _verify(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "bmc", "verify", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_bmc_verify_inputs_compares_and_localizes(tmp_path):
    """A sharded GPT-2 verifies OK against the reference; with one weight of rank 3 changed (digests updated, so
    only the numbers are wrong) the output is a MISMATCH, and the sharded program planned again from the model
    matches at every tensor, which points at the artifact; wrong flags are usage errors."""
    art = tmp_path / "g.bmc"
    bmc.compile(FIXTURES / "gpt2_dynamo.onnx", art, mesh="2x2", strategy="dp+megatron", input_shapes=SHAPES)
    data = np.load(FIXTURES / "gpt2_dynamo.npz")
    np.savez(tmp_path / "in.npz", input_ids=data["input_ids"])
    model = FIXTURES / "gpt2_dynamo.onnx"
    r = _verify(art, "--inputs", tmp_path / "in.npz", "--model", model)
    assert r.returncode == 0 and "logits" in r.stdout and ": OK" in r.stdout, r.stdout + r.stderr

    bad = Path(shutil.copytree(art, tmp_path / "bad.bmc"))
    rel = json.loads((bad / "manifest.json").read_text())["weights"]["3"]
    st = SafetensorsFile(bad / rel)
    tensors = [(n, *st.info(n)[:2], st.get(n).copy()) for n in st.names()]
    name = "model.transformer.h.0.mlp.c_proj.weight"
    for t in tensors:
        if t[0] == name:
            t[3][...] *= 3
    del st
    write_safetensors(bad / rel, tensors, metadata={"format": "bmc-artifact", "rank": "3"})
    m = json.loads((bad / "manifest.json").read_text())
    m["files"][rel] = file_digest(bad / rel)
    (bad / "manifest.json").write_text(json.dumps(m))
    r = _verify(bad, "--inputs", tmp_path / "in.npz", "--model", model)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "MISMATCH" in r.stdout and "matches the reference at every tensor" in r.stdout

    r = _verify(art, "--inputs", tmp_path / "in.npz")
    assert r.returncode == 2 and "--model" in r.stderr and "Traceback" not in r.stderr
    r = _verify(art, "--inputs", tmp_path / "in.npz", "--model", FIXTURES / "bert_dynamo.onnx")
    assert r.returncode == 2 and "not the model this artifact was compiled from" in r.stderr
