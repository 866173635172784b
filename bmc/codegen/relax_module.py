"""bmc IR graph → TVM Relax IRModule, built with the Relax block builder.

The Relax function ``main`` takes the graph inputs first, then every parameter (weights are never baked into the
library as constants; the runtime binds them), carries ``num_input``, and always returns a tuple of the outputs.
"""

from __future__ import annotations

import tvm
from tvm import relax

from bmc.codegen.lower import load_all
from bmc.errors import CompileError
from bmc.ir.graph import Graph, Node, Value


class LowerContext:
    """What a lowering sees: the block builder, and the target kind (``"llvm"``, ``"cuda"``, or ``None`` for
    portable Relax) for the few ops that call a library kernel on one target; ``kernels`` collects those calls."""

    def __init__(self, bb: relax.BlockBuilder, target_kind: str | None = None, in_place=()):
        self.bb = bb
        self.target_kind = target_kind
        self.kernels: set[str] = set()
        self.in_place = in_place  # nodes that write into their donated data input (bmc.codegen.inplace)

    def emit(self, expr):
        return self.bb.emit(expr)

    @staticmethod
    def dtype_of(expr) -> str:
        return str(expr.ty.dtype)


def _var(v: Value) -> relax.Var:
    return relax.Var(v.name, relax.TensorType(list(v.type.shape), v.type.dtype))


def _where(node: Node) -> str:
    return f"node {node.source!r} ({node.op})" if node.source else f"node {node.op}"


def to_relax(graph: Graph, target_kind: str | None = None, kernels: set | None = None,
             in_place=()) -> tvm.IRModule:
    """The Relax module of ``graph``; library kernels its lowerings call for ``target_kind`` go into ``kernels``;
    the nodes in ``in_place`` write into their first input (a donated graph input: ``bmc.codegen.inplace``)."""
    lowerings = load_all()
    missing = sorted({n.op for n in graph.nodes if n.op not in lowerings})
    if missing:
        raise CompileError(f"no Relax lowering for op(s) {', '.join(missing)}", where=f"graph {graph.name}")
    bb = relax.BlockBuilder()
    ctx = LowerContext(bb, target_kind, in_place)
    params = [_var(v) for v in graph.inputs + graph.params]
    env: dict[Value, relax.Expr] = dict(zip(graph.inputs + graph.params, params))
    with bb.function("main", params, attrs={"num_input": len(graph.inputs), "global_symbol": "main"}):
        with bb.dataflow():
            for node in graph.nodes:
                try:
                    result = lowerings[node.op](ctx, node, [env[v] for v in node.inputs])
                    results = result if isinstance(result, list) else [result]
                    for v, expr in zip(node.outputs, results):
                        env[v] = expr if isinstance(expr, relax.Var) else bb.emit(expr, name_hint=_hint(v.name))
                except CompileError:
                    raise
                except Exception as e:  # noqa: BLE001  (TVM raises many types; name the node)
                    raise CompileError(f"lowering to Relax failed: {e}", where=_where(node)) from e
                for v in node.outputs:
                    _check_type(env[v], v, node)
            outs = [env[v] for v in graph.outputs]
            gv = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv)
    if kernels is not None:
        kernels |= ctx.kernels
    return bb.get()


def _check_type(expr: relax.Expr, v: Value, node: Node) -> None:
    """The lowering must produce exactly the IR type; a mismatch is a bmc bug caught here, not at run time."""
    ty = expr.ty
    shape = tuple(int(d) for d in ty.shape) if getattr(ty, "shape", None) is not None else None
    if str(ty.dtype) != v.type.dtype or shape != v.type.shape:
        raise CompileError(f"internal: Relax lowering produced {ty} for %{v.name}, the IR says {v.type}",
                           where=_where(node))


def _hint(name: str) -> str:
    hint = "".join(c if c.isalnum() or c == "_" else "_" for c in name).strip("_")
    return ("v_" + hint if hint[:1].isdigit() else hint)[:48] or "v"
