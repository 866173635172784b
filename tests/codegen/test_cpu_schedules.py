"""The llvm path's schedule rules for softmax and norms (``bmc.codegen.cpu.schedule_rules``).

Two properties: the compiled ops equal a float64 numpy reference for one row, few rows, many rows and rows whose
length no vector width divides; and a scheduled function runs each of its blocks once per point of the block's
own domain (give or take the padding of a split), which TVM 0.27's own ``Reduction`` rule broke for one row: it
recomputed the row's max and sum once per column (O(n²), and racing on one buffer).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder
from bmc.testing.compiled import CompiledGraph

SHAPES = [(1, 1000), (1, 1, 4096), (1, 50257), (4, 1000), (2, 1, 768), (3, 197), (2, 12, 77, 77), (1, 12, 1, 64),
          (64, 768)]


def _reference(op: str, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    if op == "softmax":
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    if op == "log_softmax":
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    if op == "layer_norm":
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * gamma  # rms_norm


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "layer_norm", "rms_norm"])
def test_row_reductions_match_numpy(op, shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    gamma = rng.standard_normal(shape[-1]).astype(np.float32)
    beta = rng.standard_normal(shape[-1]).astype(np.float32)
    b = GraphBuilder("rows")
    v = b.input("x", TensorType("float32", shape))
    if op in ("softmax", "log_softmax"):
        y = b.emit1(op, [v], axis=-1)
    elif op == "layer_norm":
        y = b.emit1(op, [v, b.param("gamma", gamma), b.param("beta", beta)], axis=-1, epsilon=1e-5)
    else:
        y = b.emit1(op, [v, b.param("gamma", gamma)], axis=-1, epsilon=1e-5)
    graph = b.finish([y])
    got = CompiledGraph(graph)({"x": x})[graph.outputs[0].name]
    want = _reference(op, x, gamma, beta)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _executions(func) -> dict[str, tuple[int, int]]:
    """Per block of a scheduled PrimFunc: (times its body runs, the size of its iteration domain)."""
    import tvm

    found: dict[str, tuple[int, int]] = {}

    def visit(stmt, times: int):
        if isinstance(stmt, tvm.tirx.For):
            visit(stmt.body, times * int(stmt.extent))
        elif isinstance(stmt, tvm.tirx.SeqStmt):
            for s in stmt.seq:
                visit(s, times)
        elif isinstance(stmt, tvm.tirx.IfThenElse):
            visit(stmt.then_case, times)
            if stmt.else_case is not None:
                visit(stmt.else_case, times)
        elif type(stmt).__name__ == "SBlockRealize":
            block = stmt.block
            if block.iter_vars or block.name_hint != "root":
                domain = math.prod(int(iv.dom.extent) for iv in block.iter_vars)
                runs, size = found.get(block.name_hint, (0, 0))
                found[block.name_hint] = (runs + times, size + domain)
            visit(block.body, times)
        elif hasattr(stmt, "body"):
            visit(stmt.body, times)

    visit(func.body, 1)
    return found


def _scheduled(shape, op: str, rules):
    import tvm
    from tvm import te, topi

    x = te.placeholder(shape, "float32", name="x")
    if op == "softmax":
        func = te.create_prim_func([x, topi.nn.fast_softmax(x, len(shape) - 1)])
    else:
        g = te.placeholder(shape[-1:], "float32", name="g")
        func = te.create_prim_func([x, g, topi.nn.rms_norm(x, g, axis=[len(shape) - 1])])
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"})
    with target:
        for rule in rules:
            sch = rule.apply(func, target, False)
            if sch is not None:
                return type(rule).__name__, (sch[0] if isinstance(sch, list) else sch).mod["main"]
    return "unscheduled", func  # (as TVM's default lowering leaves it: serial)


ONE_OR_EVEN = [(1, 4096), (1, 1, 768), (1, 50257), (8, 4096), (2, 12, 64, 64)]


@pytest.mark.parametrize("op, shape, rule", [
    *[(op, s, "RowReduction") for op in ("softmax", "rms_norm") for s in ONE_OR_EVEN],
    # rows of 197 or 77 (no vector width divides them) stay with dlight's rule where it fits
    ("softmax", (3, 197), "RowsInParallel"), ("softmax", (2, 12, 77, 77), "RowsInParallel"),
    ("rms_norm", (3, 197), "unscheduled"), ("rms_norm", (2, 12, 77, 77), "ParallelFallback")], ids=str)
def test_each_block_runs_once_per_point(op, shape, rule):
    from bmc.codegen.cpu import schedule_rules

    chosen, func = _scheduled(shape, op, schedule_rules())
    assert chosen == rule
    for name, (runs, size) in _executions(func).items():
        assert runs <= 2 * size, f"{name} runs {runs} times for a domain of {size}"


def test_the_check_catches_tvms_reduction_rule_on_one_row():
    """TVM 0.27's dlight ``Reduction`` on one row recomputes the max and sum per column (why bmc replaces it)."""
    from tvm.s_tir.dlight.cpu import Reduction

    _, func = _scheduled((1, 4096), "softmax", [Reduction()])
    runs, size = _executions(func)["T_softmax_maxelem"]
    assert runs == 4096 * size


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"


@pytest.mark.parametrize("model", ["gpt2_dynamo", "llama_dynamo", "light_shufflenet"])
def test_no_kernel_of_a_model_recomputes_a_block(model):
    """Every TVM kernel of a model as the llvm pipeline schedules it, decoders at one token (where TVM's own rule
    recomputed each norm's statistics per feature) and a CNN with a classifier's softmax."""
    import onnx
    import tvm

    from bmc.codegen.build import to_relax
    from bmc.codegen.cpu import cpu_pipeline
    from bmc.codegen.targets import TargetSpec
    from bmc.compiler import import_graph

    if model.startswith("light_"):
        graph = import_graph(Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"{model}.onnx")
    else:
        with np.load(FIXTURES / f"{model}.npz") as data:
            ids = [k for k in data.files if not k.startswith("output")]
        graph = import_graph(FIXTURES / f"{model}.onnx", {k: (1, 1) for k in ids})
    target = TargetSpec.parse("llvm").tvm_target()
    with target:
        mod = cpu_pipeline(target, {})(to_relax(graph, "llvm", set(), {}))
    kernels = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert kernels
    recomputed = {(k, name): (runs, size) for k, f in kernels.items() for name, (runs, size) in _executions(f).items()
                  if runs > 2 * size}
    assert not recomputed
