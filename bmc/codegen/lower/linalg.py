"""Relax lowering of linear algebra."""

from __future__ import annotations

from tvm import relax

from bmc.codegen.lower import lowering


ACCUMULATE_IN_FLOAT32 = ("float16", "bfloat16")


@lowering("matmul")
def _matmul(ctx, node, args):
    dtype = node.inputs[0].type.dtype
    if dtype in ACCUMULATE_IN_FLOAT32:  # reduced-precision inputs, float32 accumulation (as tensor cores do)
        return relax.op.astype(ctx.emit(relax.op.matmul(args[0], args[1], out_dtype="float32")), dtype)
    return relax.op.matmul(args[0], args[1])
