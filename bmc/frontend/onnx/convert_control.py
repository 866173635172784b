"""Control flow with static structure: ``If`` and ``Scan``, imported inline (bmc's IR has no control flow).

- ``If`` with a condition known at compile time imports the branch taken; with a run-time condition both branches
  are imported and each output is ``where(cond, then, else)`` (ONNX branches have no side effects, so computing
  both is only work; their outputs must have the same types).
- ``Scan`` (opset 9 and later) is unrolled over its static sequence length: each step imports the body with the
  states and this step's slices of the scan inputs; the scan outputs are the steps' slices stacked.
"""

from __future__ import annotations

import numpy as np

from bmc.frontend.onnx.importer import Context, ConvertError, Operand, converter
from bmc.ops.registry import normalize_axis

#: body nodes an unrolled Scan may import in all (steps x body nodes)
MAX_UNROLLED_NODES = 200_000


@converter("If")
def _if(ctx: Context, node):
    cond = ctx.operand(0)
    if ctx.type(cond).numel != 1 or ctx.type(cond).dtype != "bool":
        raise ConvertError(f"If's condition must be one bool, got {ctx.type(cond)}")
    where = ctx.where
    known = ctx.known(cond)
    if known is not None:
        return ctx.subgraph(ctx.attr("then_branch" if bool(known.reshape(-1)[0]) else "else_branch"), [], where)
    then = ctx.subgraph(ctx.attr("then_branch"), [], f"{where}, then branch")
    other = ctx.subgraph(ctx.attr("else_branch"), [], f"{where}, else branch")
    cond = ctx.emit1("reshape", [cond], shape=())
    outs = []
    for k, (a, b) in enumerate(zip(then, other)):
        if ctx.type(a) != ctx.type(b):
            raise ConvertError(f"If output {k} is {ctx.type(a)} in the then branch and {ctx.type(b)} in the else "
                               "branch; with a condition known only at run time bmc computes both and selects, "
                               "which needs one type", fix="bind the inputs the condition depends on "
                               "(--input-shape) so that it folds to a constant")
        outs.append(ctx.emit1("where", [cond, a, b]))
    return outs


@converter("Scan")
def _scan(ctx: Context, node):
    if ctx.opset < 9:
        raise ConvertError("Scan before opset 9 (batched, with sequence_lens) is not supported",
                           fix="convert the model to opset 9 or later")
    body, where = ctx.attr("body"), ctx.where
    m = ctx.attr("num_scan_inputs")
    n = len(node.input) - m
    k = len(body.output) - n
    states = [ctx.operand(i) for i in range(n)]
    xs = [ctx.operand(n + j) for j in range(m)]
    in_axes = [normalize_axis(a, ctx.type(x).rank) for a, x in zip(ctx.attr("scan_input_axes", [0] * m), xs)]
    in_dirs = list(ctx.attr("scan_input_directions", [0] * m))
    out_axes, out_dirs = list(ctx.attr("scan_output_axes", [0] * k)), list(ctx.attr("scan_output_directions", [0] * k))
    lengths = {ctx.type(x).shape[a] for x, a in zip(xs, in_axes)}
    if len(lengths) != 1 or not m:
        raise ConvertError(f"Scan's {m} scan inputs must have one length along their scan axes, got {sorted(lengths)}")
    steps = lengths.pop()
    if steps == 0 or steps * len(body.node) > MAX_UNROLLED_NODES:
        raise ConvertError(f"Scan over {steps} steps of a {len(body.node)}-node body is not supported (bmc unrolls "
                           f"a Scan, up to {MAX_UNROLLED_NODES} body nodes in all)",
                           fix="bind a shorter sequence with --input-shape")
    per_step: list[list[Operand]] = [[] for _ in range(k)]
    for t in range(steps):
        slices = [ctx.emit1("gather", [x, np.array(t if d == 0 else steps - 1 - t, np.int64)], axis=a)
                  for x, a, d in zip(xs, in_axes, in_dirs)]
        outs = ctx.subgraph(body, states + slices, f"{where}, step {t}")
        states = outs[:n]
        for j, y in enumerate(outs[n:]):
            per_step[j].append(y)
    scanned = []
    for ys, axis, d in zip(per_step, out_axes, out_dirs):
        shape = ctx.type(ys[0]).shape
        axis = normalize_axis(axis, len(shape) + 1)
        parts = [ctx.emit1("reshape", [y], shape=shape[:axis] + (1,) + shape[axis:]) for y in (ys[::-1] if d else ys)]
        scanned.append(ctx.emit1("concat", parts, axis=axis) if len(parts) > 1 else parts[0])
    return states + scanned
