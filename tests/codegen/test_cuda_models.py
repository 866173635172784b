"""Every kernel of every model fixture compiles for sm_90 here (nvcc at build time), through ``bmc compile``."""

import json
from pathlib import Path

import numpy as np
import pytest

import bmc
from bmc.codegen import cuda
from bmc.errors import CompileError

pytestmark = pytest.mark.cuda
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
MODELS = sorted(p.stem for p in FIXTURES.glob("*.onnx"))
QUANTIZED = FIXTURES.parent / "quantized"


@pytest.fixture(scope="module", autouse=True)
def toolkit():
    try:
        return cuda.find_toolkit()
    except CompileError as e:
        pytest.skip(f"no CUDA toolkit: {e.what}")


@pytest.mark.parametrize("name", MODELS)
def test_fixture_compiles_for_sm90(name, tmp_path):
    data = np.load(FIXTURES / f"{name}.npz")
    shapes = {k: data[k].shape for k in data.files if not k.startswith("output:")}
    summary = bmc.compile(FIXTURES / f"{name}.onnx", tmp_path / "m.bmc", target="cuda", input_shapes=shapes)
    manifest = json.loads((tmp_path / "m.bmc" / "manifest.json").read_text())
    info = manifest["kernels"]["cuda"]
    assert summary["target"]["archs"] == ["sm_90"] and info["sass"] == ["sm_90"]
    assert info["num_kernels"] > 0 and all(k["sass_bytes"].get("sm_90", 0) > 0 for k in info["kernels"])
    library = (tmp_path / "m.bmc" / "programs" / "main.so").read_bytes()
    assert b"__global__" not in library  # compiled images only, no CUDA source left for load time


@pytest.mark.parametrize("name", ["gpt2_dynamic", "gpt2_qdq", "llama_nbits"])
def test_quantized_fixture_compiles_for_sm90(name, tmp_path):
    """Quantized models (``scripts/quantize_fixtures.py``): int8 (float64 integer matmuls, the QDQ chains cut by
    ``bound_fusion``) and int4 (``MatMulNBits``: packed weights unpacked in the dequantizing kernel)."""
    data = np.load(FIXTURES / ("llama_dynamo.npz" if name.startswith("llama") else "gpt2_dynamo.npz"))
    bmc.compile(QUANTIZED / f"{name}.onnx", tmp_path / "m.bmc", target="cuda", input_shapes={"input_ids": data[
        "input_ids"].shape})
    info = json.loads((tmp_path / "m.bmc" / "manifest.json").read_text())["kernels"]["cuda"]
    assert info["num_kernels"] > 0 and all(k["sass_bytes"].get("sm_90", 0) > 0 for k in info["kernels"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_compiles_for_sm80_and_sm90(dtype, tmp_path):
    bmc.compile(FIXTURES / "llama_dynamo.onnx", tmp_path / "m.bmc", target="cuda", cuda_archs=("sm_80", "sm_90"),
                dtype=dtype, input_shapes={"batch": 2, "seq": 16})
    manifest = json.loads((tmp_path / "m.bmc" / "manifest.json").read_text())
    assert manifest["kernels"]["cuda"]["sass"] == ["sm_80", "sm_90"]
    assert {p["dtype"] for p in manifest["signature"]["params"]} == {dtype}
    assert [o["dtype"] for o in manifest["signature"]["outputs"]] == ["float32"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_context_parallel_attention_compiles_for_sm90(dtype, tmp_path):
    """The cross-attention fixture with its memory split over 2 devices: each rank's attention over its keys
    returns the log-sum-exps with it (the composition on CUDA, 16-bit scores in float32) and compiles."""
    bmc.compile(FIXTURES / "xattn_dynamo.onnx", tmp_path / "m.bmc", target="cuda", mesh="2", dtype=dtype,
                shard={"memory": "[{},{x},{}]", "memory_mask": "[{},{x}]"}, input_shapes={"batch": 2, "seq": 48})
    plan = json.loads((tmp_path / "m.bmc" / "plan.json").read_text())
    assert [c.get("reduce") for c in plan["collectives"]][:2] == ["max", "sum"]
    info = json.loads((tmp_path / "m.bmc" / "manifest.json").read_text())["kernels"]["cuda"]
    assert info["num_kernels"] > 0 and all(k["sass_bytes"].get("sm_90", 0) > 0 for k in info["kernels"])
