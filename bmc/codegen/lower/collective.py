"""Relax lowering of collectives: destination-passing calls of runtime functions ``bmc.<op>``.

The runtime registers ``bmc.all_reduce`` etc. (mpi4py or native) before the VM is built. Attributes travel as one
JSON string argument so a single registered function serves every group and reduction.
"""

from __future__ import annotations

import json

from tvm import relax

from bmc.codegen.lower import lowering


@lowering("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
def _collective(ctx, node, args):
    out = node.outputs[0].type
    attrs = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in node.attrs.items()}, sort_keys=True)
    return relax.call_dps_packed(f"bmc.{node.op}", [args[0], relax.expr.String(attrs)],
                                 out_ty=relax.TensorType(list(out.shape), out.dtype))
