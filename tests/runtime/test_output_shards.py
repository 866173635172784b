"""Outputs left split on the mesh (``--output-shard NAME=SPEC``): the plan ends without gathering them, the
manifest says which block each rank holds, an in-process run assembles them whole (against onnxruntime), and bad
requests are usage errors naming the flag. The real-MPI side (each rank's block, ``gather_outputs``, ``bmc run``)
is in ``test_mpi.py``."""

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
from bmc.errors import UsageError
from bmc.sharding.layout import shard
from bmc.sharding.mesh import Mesh
from bmc.sharding.spec import Spec

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "models"
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


@pytest.mark.parametrize("request_, match", [
    ({"logit": "[{}, {}, {y}]"}, "did you mean 'logits'"),
    ({"logits": "[{}, {}, {y}] partial{x}"}, "partial"),
    ({"logits": "[{x,y}, {}, {}]"}, "not divisible"),
    ({"logits": "[{}, {z}, {}]"}, "axis z"),
])
def test_bad_output_shards_are_usage_errors(request_, match):
    with pytest.raises(UsageError, match=match) as e:
        plan_model(FIXTURES / "gpt2_dynamo.onnx", mesh="2x2", input_shapes=SHAPES, output_shards=request_)
    assert e.value.where.startswith("--output-shard")


def test_output_shards_and_stages_do_not_mix(tmp_path):
    with pytest.raises(UsageError, match="pipeline") as e:
        bmc.compile(FIXTURES / "gpt2_dynamo.onnx", tmp_path / "x.bmc", mesh="2x2", stages=2, input_shapes=SHAPES,
                    output_shards={"logits": "[{}, {}, {y}]"})
    assert e.value.where == "--output-shard" and not (tmp_path / "x.bmc").exists()


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
