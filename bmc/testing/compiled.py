"""Compile a bmc IR graph for llvm in memory and run it in the TVM VM (no artifact): for tests and the backend."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from bmc.ir.graph import Graph
from bmc.runtime.kernels import pack_params


class CompiledGraph:
    """A graph compiled for the host CPU with its weights already on the device."""

    def __init__(self, graph: Graph):
        import tvm
        from tvm import relax

        from bmc.codegen.build import build
        from bmc.codegen.targets import TargetSpec

        self.graph = graph
        self.device = tvm.cpu()
        built = build(graph, TargetSpec.parse("llvm"))
        self.vm = relax.VirtualMachine(built.executable, self.device)
        self.params = pack_params(built.kernels.get("cpu"), [p.name for p in graph.params],
                                  [tvm.runtime.tensor(np.require(graph.weights[p.name].numpy(), requirements="C"),
                                                      self.device) for p in graph.params])

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        args = [tvm.runtime.tensor(np.require(inputs[v.name], requirements="C"), self.device)
                for v in self.graph.inputs]
        out = self.vm["main"](*args, *self.params)
        return {v.name: t.numpy() for v, t in zip(self.graph.outputs, out)}


def run_compiled(graph: Graph, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return CompiledGraph(graph)(inputs)
