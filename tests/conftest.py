"""Shared fixtures: a tiny graph, and a real compiled artifact built from it (no mocks of TVM)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder


def make_tiny_graph(input_name: str = "x"):
    """``x: f32[2,3]`` → ``y = gelu(x @ w + b)``; outputs ``(y, x @ w + b)``."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("tiny")
    x = b.input(input_name, TensorType("float32", (2, 3)))
    w = b.param("w", rng.standard_normal((3, 4)).astype(np.float32))
    bias = b.param("b", rng.standard_normal(4).astype(np.float32))
    z = b.emit1("add", [b.emit1("matmul", [x, w]), bias], "z")
    y = b.emit1("gelu", [z], "y")
    return b.finish([y, z])


def build_artifact(graph, output: Path, **overrides) -> Path:
    """Compile ``graph`` for llvm with bmc's codegen and write it as an artifact at ``output``."""
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec
    from bmc.runtime.artifact import graph_signature, write_artifact

    spec = TargetSpec.parse("llvm")
    built = build(graph, spec)
    options = dict(signature=graph_signature(graph),
                   weights=[(p.name, graph.weights[p.name].numpy) for p in graph.params],
                   export_library=built.export, target=spec.to_json(),
                   source={"model": "tiny.onnx", "sha256": "0" * 64, "opset": 20},
                   extra={"kernels": built.kernels} if built.kernels else None)
    options.update(overrides)
    return write_artifact(output, **options)


@pytest.fixture
def tiny_graph():
    """A GraphBuilder graph: one input, two weight params, matmul + add + gelu, two outputs."""
    return make_tiny_graph()


@pytest.fixture(name="build_artifact")
def build_artifact_fixture():
    """``build_artifact(graph, output, **write_artifact_overrides) -> Path``: compile and package a graph."""
    return build_artifact


@pytest.fixture(scope="session")
def _tiny_artifact_master(tmp_path_factory):
    return build_artifact(make_tiny_graph(), tmp_path_factory.mktemp("artifact") / "tiny.bmc")


@pytest.fixture
def tiny_artifact(_tiny_artifact_master, tmp_path) -> Path:
    """A fresh copy (safe to damage) of a real compiled artifact of ``make_tiny_graph()``."""
    return Path(shutil.copytree(_tiny_artifact_master, tmp_path / "tiny.bmc"))
