"""Weights shared between loaded models (``bmc.load(..., share_weights=model)``): two programs compiled from one
model for different shapes hold one copy of its weights, with the second artifact's file still read and checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bmc
from bmc.errors import ArtifactError, UsageError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"


def _compiled(tmp_path, **options):
    """Llama (dynamo) compiled for 2 × 16 tokens (the fixture's shape) and for 1 × 4 (a short step)."""
    long, short = tmp_path / "long.bmc", tmp_path / "short.bmc"
    bmc.compile(FIXTURES / "llama_dynamo.onnx", long, input_shapes={"batch": 2, "seq": 16}, **options)
    bmc.compile(FIXTURES / "llama_dynamo.onnx", short, input_shapes={"batch": 1, "seq": 4}, **options)
    return long, short


def _weight_bytes(model) -> int:
    return sum(int(np.prod(p["shape"])) * 4 for p in model.signature["params"])


@pytest.mark.parametrize("options", [{}, {"mesh": "2", "strategy": "megatron"}], ids=["one-device", "megatron-2"])
def test_two_programs_of_one_model_hold_one_copy_of_its_weights(tmp_path, options):
    """The short program, loaded with ``share_weights`` = the long one, holds no weight of its own on any rank (every
    tensor is the long program's, packed panels included) and gives exactly what it gives loaded alone; the long
    one still matches onnxruntime."""
    long, short = _compiled(tmp_path, **options)
    simulate = "mesh" in options
    first = bmc.load(long, simulate=simulate)
    second = bmc.load(short, simulate=simulate, share_weights=first)
    alone = bmc.load(short, simulate=simulate)
    ranks = len(first._ranks)
    assert second.stats["shared_bytes"] == ranks * _weight_bytes(second) > 0
    for r in range(ranks):
        assert all(any(t is u for u in first._ranks[r][1]) for t in second._ranks[r][1]), r
    ids = np.random.default_rng(0).integers(0, 256, (1, 4))
    assert np.array_equal(second(input_ids=ids), alone(input_ids=ids))
    data = np.load(FIXTURES / "llama_dynamo.npz")
    want = data["output:logits"]
    assert float(np.max(np.abs(first(input_ids=data["input_ids"]) - want))) <= 1e-4 * max(1.0, np.abs(want).max())


def test_a_damaged_shared_weight_is_still_refused(tmp_path):
    """A flipped byte inside a weight the second artifact would share: its file is hashed as it is read, so the load
    fails on the digest though those bytes are never kept."""
    long, short = _compiled(tmp_path)
    first = bmc.load(long)
    manifest = json.loads((short / "manifest.json").read_text())
    weights = short / manifest["weights"]["0"]
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x40  # inside the last tensor's bytes
    weights.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="rank0.safetensors is corrupted: sha256"):
        bmc.load(short, share_weights=first)


def test_share_weights_takes_a_loaded_model(tmp_path):
    long, _ = _compiled(tmp_path)
    with pytest.raises(UsageError, match="share_weights takes a loaded bmc model"):
        bmc.load(long, share_weights="long.bmc")
