"""Outputs left split on the mesh (``--output-shard NAME=SPEC``) and inputs fed as blocks (``--input-shard``): the
plan neither gathers the outputs nor slices the inputs, the manifest says which block each rank holds, an in-process
run takes whole inputs and gives whole outputs (against onnxruntime), and bad requests are usage errors naming the
flag. The real-MPI side (each rank's blocks in and out, ``gather_outputs``, ``bmc run``) is in ``test_mpi.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bmc
from bmc.compiler import plan_model
from bmc.errors import ExecutionError, UsageError
from bmc.sharding.htmlreport import plan_html
from bmc.sharding.layout import shard
from bmc.sharding.mesh import Mesh
from bmc.sharding.spec import Spec

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "models"
DECODING = ROOT / "tests" / "fixtures" / "decoding"  # scripts/export_decoder_step.py
SHAPES = {"batch": 2, "seq": 16}


@pytest.mark.parametrize("strategy, layout", [("auto", "[{}, {}, {x,y}]"), ("dp+megatron", "[{x}, {}, {y}]")])
def test_split_outputs_match_onnxruntime_and_say_where_each_block_lies(tmp_path, strategy, layout):
    data = np.load(FIXTURES / "gpt2_dynamo.npz")
    out = tmp_path / "gpt2.bmc"
    bmc.compile(FIXTURES / "gpt2_dynamo.onnx", out, mesh="2x2", strategy=strategy, input_shapes=SHAPES,
                output_shards={"logits": layout})
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["signature"]["outputs"]
    spec, mesh, want = Spec.parse(layout), Mesh.parse("2x2"), data["output:logits"]
    assert entry["shape"] == list(want.shape) and entry["spec"] == str(spec)
    assert entry["local_shape"] == list(spec.local_shape(want.shape, mesh))
    for rank, start in enumerate(entry["blocks"]):  # each rank's block is the one the layout gives its coordinate
        block = tuple(slice(b, b + n) for b, n in zip(start, entry["local_shape"]))
        np.testing.assert_array_equal(want[block], shard(want, spec, mesh, mesh.coordinate(rank)))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["output_specs"] == {"logits": str(spec)}
    assert not [c for c in plan["collectives"] if c["at"] == len(plan["nodes"])]  # nothing gathered at the end
    model = bmc.load(out, simulate=True)
    assert model.output_slices == {"logits": tuple(slice(0, n) for n in want.shape)}
    logits = model(input_ids=data["input_ids"])  # every rank in process: the blocks put back together
    assert logits.shape == want.shape
    assert float(np.max(np.abs(logits - want))) <= 1e-4 * max(1.0, float(np.max(np.abs(want))))
    assert model.gather_outputs({"logits": logits})["logits"] is not None


def test_the_search_prices_the_gather_it_no_longer_needs():
    """With the logits left split the searched plan is never dearer than with them gathered (the gathered plan
    plus a free local slice is one of its candidates), and it drops the final all-gathers."""
    kwargs = dict(mesh="2x2", input_shapes=SHAPES, memory_per_device=150_000)
    _, _, whole = plan_model(FIXTURES / "gpt2_dynamo.onnx", **kwargs)
    _, _, split = plan_model(FIXTURES / "gpt2_dynamo.onnx", output_shards={"logits": "[{}, {}, {x,y}]"}, **kwargs)
    end = len(whole["nodes"])
    assert [c["kind"] for c in whole["collectives"] if c["at"] == end]  # the budget splits the logits: gathered
    assert not [c for c in split["collectives"] if c["at"] == end]
    assert split["cost"]["total_s"] <= whole["cost"]["total_s"] * (1 + 1e-6)


def test_inputs_fed_as_blocks_match_onnxruntime(tmp_path):
    """Context parallelism with the memory fed as blocks (``--input-shard memory=[{},{x},{}] memory_mask=[{},{x}]``)
    on 4 devices: the program's inputs are the 12-token blocks, nothing slices or gathers the memory, and the
    simulated run (whole inputs, each device given its block) matches onnxruntime."""
    data = np.load(FIXTURES / "xattn_dynamo.npz")
    shards = {"memory": "[{},{x},{}]", "memory_mask": "[{},{x}]"}
    out = tmp_path / "xattn.bmc"
    bmc.compile(FIXTURES / "xattn_dynamo.onnx", out, mesh="4", input_shards=shards,
                input_shapes={"batch": 2, "seq": 48})
    manifest = json.loads((out / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["signature"]["inputs"]}
    assert entries["memory"]["shape"] == [2, 48, 32] and entries["memory"]["local_shape"] == [2, 12, 32]
    assert [b[1] for b in entries["memory_mask"]["blocks"]] == [0, 12, 24, 36] and "blocks" not in entries["x"]
    assert manifest["format_version"] == 3
    plan = json.loads((out / "plan.json").read_text())
    assert [(c["kind"], c.get("reduce")) for c in plan["collectives"]] == [
        ("all_reduce", "max"), ("all_reduce", "sum"), ("all_reduce", "sum")]
    assert plan["input_specs"] == {"memory": "[{}, {x}, {}]", "memory_mask": "[{}, {x}]"}
    assert "inputs as blocks (--input-shard)" in plan_html(plan, "xattn")
    model = bmc.load(out, simulate=True)
    got = model(**{k: data[k] for k in ("x", "memory", "memory_mask")})
    want = data["output:hidden"]
    assert float(np.max(np.abs(got - want))) <= 1e-5 * float(np.max(np.abs(want)))
    with pytest.raises(ExecutionError, match=r"expected float32\[2,48,32\], got float32\[2,12,32\]"):
        model(x=data["x"], memory=data["memory"][:, :12], memory_mask=data["memory_mask"])  # in process: whole


@pytest.mark.parametrize("kind, request_, match", [
    ("output", {"logit": "[{}, {}, {y}]"}, "did you mean 'logits'"),
    ("output", {"logits": "[{}, {}, {y}] partial{x}"}, "partial"),
    ("output", {"logits": "[{x,y}, {}, {}]"}, "not divisible"),
    ("output", {"logits": "[{}, {z}, {}]"}, "axis z"),
    ("input", {"input_id": "[{x}, {}]"}, "did you mean 'input_ids'"),
    ("input", {"logits": "[{x}, {}, {}]"}, "not an input"),
])
def test_bad_shards_are_usage_errors(kind, request_, match):
    with pytest.raises(UsageError, match=match) as e:
        plan_model(FIXTURES / "gpt2_dynamo.onnx", mesh="2x2", input_shapes=SHAPES, **{f"{kind}_shards": request_})
    assert e.value.where.startswith(f"--{kind}-shard")


def test_an_input_with_two_layouts_is_a_usage_error():
    with pytest.raises(UsageError, match="one layout") as e:
        plan_model(FIXTURES / "gpt2_dynamo.onnx", mesh="2x2", input_shapes=SHAPES, shard={"input_ids": "[{y}, {}]"},
                   input_shards={"input_ids": "[{x}, {}]"})
    assert e.value.where == "--input-shard"


@pytest.mark.parametrize("kind, name, spec", [("output", "logits", "[{}, {}, {y}]"),
                                              ("input", "input_ids", "[{x}, {}]")])
def test_split_io_and_stages_do_not_mix(tmp_path, kind, name, spec):
    with pytest.raises(UsageError, match="pipeline") as e:
        bmc.compile(FIXTURES / "gpt2_dynamo.onnx", tmp_path / "x.bmc", mesh="2x2", stages=2, input_shapes=SHAPES,
                    **{f"{kind}_shards": {name: spec}})
    assert e.value.where == f"--{kind}-shard" and not (tmp_path / "x.bmc").exists()


def test_the_cli_flag(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "bmc", "plan", str(FIXTURES / "gpt2_dynamo.onnx"), "--mesh", "2x2",
            "--input-shape", "batch=2", "--input-shape", "seq=16"]
    r = subprocess.run([*base, "--output-shard", "logits={y}"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--output-shard" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "plan.json"
    r = subprocess.run([*base, "--output-shard", "logits=[{},{},{y}]", "--json", str(out)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["output_specs"] == {"logits": "[{}, {}, {y}]"}


def test_a_key_value_cache_split_over_heads_stays_split(tmp_path):
    """A decoding step's cache update (ScatterElements of the new keys at the position, along the length dim) with
    the cache fed and returned as blocks over the heads: the plan moves no cache bytes at all (only the small
    per-head summary is gathered), and three steps fed back through the in-process run equal numpy."""
    import onnx
    from onnx import TensorProto, helper

    b, h, length, d = 2, 4, 8, 3
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("ScatterElements", ["cache", "pos", "new"], ["cache_out"], axis=2),
         helper.make_node("ReduceSum", ["cache_out", "axes"], ["summary"], keepdims=0)], "step",
        [vi("cache", TensorProto.FLOAT, [b, h, length, d]), vi("pos", TensorProto.INT64, [b, h, 1, d]),
         vi("new", TensorProto.FLOAT, [b, h, 1, d])],
        [vi("cache_out", TensorProto.FLOAT, [b, h, length, d]), vi("summary", TensorProto.FLOAT, [b, h, d])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "step.onnx"))
    heads = "[{}, {x}, {}, {}]"
    bmc.compile(tmp_path / "step.onnx", tmp_path / "step.bmc", mesh="2", input_shards={"cache": heads},
                output_shards={"cache_out": heads})
    plan = json.loads((tmp_path / "step.bmc" / "plan.json").read_text())
    assert {c["value"] for c in plan["collectives"]} <= {"summary"} and plan["values"]["cache_out"]["spec"] == heads
    model = bmc.load(tmp_path / "step.bmc", simulate=True)
    rng = np.random.default_rng(0)
    cache, want = np.zeros((b, h, length, d), np.float32), np.zeros((b, h, length, d), np.float32)
    for step in range(3):
        new = rng.standard_normal((b, h, 1, d)).astype(np.float32)
        out = model.run({"cache": cache, "pos": np.full((b, h, 1, d), step, np.int64), "new": new})
        want[:, :, step:step + 1] = new
        np.testing.assert_array_equal(out["cache_out"], want)
        np.testing.assert_allclose(out["summary"], want.sum(axis=2), rtol=1e-6)
        cache = out["cache_out"]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_decoding_loop_with_its_cache_split_over_heads_matches_onnxruntime(tmp_path, exporter):
    """A decoding step exported by PyTorch with an explicit fixed-size key/value cache (``decstep_*``, made by
    ``scripts/export_decoder_step.py``): Megatron over 2 devices with the caches fed and returned as blocks over the
    heads. The only collective is the output projection's all-reduce of the step's one token (the caches never
    move); five steps, each fed the caches the one before returned, give onnxruntime's outputs and caches."""
    data = np.load(DECODING / f"decstep_{exporter}.npz")
    heads = "[{}, {x}, {}, {}]"
    out = tmp_path / "dec.bmc"
    bmc.compile(DECODING / f"decstep_{exporter}.onnx", out, mesh="2", strategy="megatron",
                input_shards={"k_cache": heads, "v_cache": heads},
                output_shards={"k_cache_out": heads, "v_cache_out": heads})
    plan = json.loads((out / "plan.json").read_text())
    assert [(c["kind"], c["value"]) for c in plan["collectives"]] == [("all_reduce", "y")]
    model = bmc.load(out, simulate=True)
    k = v = np.zeros(data["output:k_cache"].shape, np.float32)
    for i in range(5):
        got = model.run({"x": data[f"x{i}"], "pos": np.array([i]), "k_cache": k, "v_cache": v})
        k, v = got["k_cache_out"], got["v_cache_out"]
        assert float(np.max(np.abs(got["y"] - data[f"output:y{i}"]))) <= 1e-5, i
    np.testing.assert_allclose(k, data["output:k_cache"], atol=1e-6)
    np.testing.assert_allclose(v, data["output:v_cache"], atol=1e-6)
