"""Pass infrastructure: a pass is a named pure function Graph → Graph; pipelines are plain lists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from bmc.ir.graph import Graph


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[Graph], Graph]

    def __call__(self, graph: Graph) -> Graph:
        return self.fn(graph)


def graph_pass(fn: Callable[[Graph], Graph]) -> Pass:
    """Decorator: turn a function into a pass named after it."""
    return Pass(fn.__name__, fn)


def run_passes(graph: Graph, passes: Sequence[Pass], *, verify: Callable[[Graph], None] | None = None,
               dump_dir: str | Path | None = None) -> Graph:
    """Run passes in order; verify after each (when given) and dump the IR text after each (when asked)."""
    from bmc.ir.text import print_graph

    if dump_dir is not None:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(dump_dir) / "00-input.bmcir").write_text(print_graph(graph))
    for i, p in enumerate(passes, 1):
        graph = p(graph)
        if verify is not None:
            verify(graph)
        if dump_dir is not None:
            (Path(dump_dir) / f"{i:02d}-{p.name}.bmcir").write_text(print_graph(graph))
    return graph


def eliminate_dead_code(graph: Graph) -> Graph:
    """Drop nodes whose results are unused and parameters nothing reads."""
    live = set(map(id, graph.outputs))
    kept = []
    for node in reversed(graph.nodes):
        if any(id(v) in live for v in node.outputs):
            kept.append(node)
            live.update(id(v) for v in node.inputs)
    graph.nodes = kept[::-1]
    unused = [p for p in graph.params if id(p) not in live]
    graph.params = [p for p in graph.params if id(p) in live]
    for p in unused:
        del graph.weights[p.name]
    return graph
