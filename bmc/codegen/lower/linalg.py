"""Relax lowering of linear algebra."""

from __future__ import annotations

from tvm import relax

from bmc.codegen.lower import lowering


@lowering("matmul")
def _matmul(ctx, node, args):
    return relax.op.matmul(args[0], args[1])
