"""Control flow with static structure, imported inline (bmc's IR has no control flow): ``If``, ``Scan``, ``Loop``
with a compile-time trip count and the recurrent layers (``RNN``, ``GRU``, ``LSTM``).

- ``If`` with a condition known at compile time imports the branch taken; with a run-time condition both branches
  are imported and each output is ``where(cond, then, else)`` (ONNX branches have no side effects, so computing
  both is only work; their outputs must have the same types).
- ``Scan`` (opset 9 and later) is unrolled over its static sequence length: each step imports the body with the
  states and this step's slices of the scan inputs; the scan outputs are the steps' slices stacked.
- ``Loop`` is unrolled the same way when its trip count and its body's condition are compile-time values.
- ``RNN``, ``GRU`` and ``LSTM`` are unrolled into their equations (one input-projection matmul for all steps).

Unrolling makes the graph grow with the sequence: ``MAX_UNROLLED_NODES`` bounds it with a clear error.
"""

from __future__ import annotations

import numpy as np

from bmc.frontend.onnx.importer import Context, ConvertError, Operand, converter
from bmc.ir.types import np_dtype
from bmc.ops.registry import normalize_axis

#: body nodes an unrolled Scan or Loop may import in all (steps x body nodes)
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
    return states + [_stack(ctx, ys[::-1] if d else ys, axis) for ys, axis, d in zip(per_step, out_axes, out_dirs)]


def _stack(ctx: Context, values: list[Operand], axis: int) -> Operand:
    """``values`` (one shape) stacked along a new dim ``axis`` (the steps of a Scan's or Loop's scan output)."""
    shape = ctx.type(values[0]).shape
    axis = normalize_axis(axis, len(shape) + 1)
    parts = [ctx.emit1("reshape", [y], shape=shape[:axis] + (1,) + shape[axis:]) for y in values]
    return ctx.emit1("concat", parts, axis=axis) if len(parts) > 1 else parts[0]


@converter("Loop")
def _loop(ctx: Context, node):
    """A Loop whose trip count and condition are known at compile time (a trip count from a bound shape, a
    condition the body keeps constant) is unrolled: each iteration imports the body with the iteration number and
    the loop-carried values; the scan outputs are the iterations' values stacked on a new first axis."""
    body, where = ctx.attr("body"), ctx.where
    trips = ctx.known(ctx.operand(0)) if ctx.has(0) else None
    cond = ctx.known(ctx.operand(1)) if ctx.has(1) else np.array(True)
    if (ctx.has(0) and trips is None) or cond is None:
        raise ConvertError("Loop with a trip count or condition known only at run time is not supported (bmc "
                           "unrolls loops)", fix="bind the input shapes the trip count comes from (--input-shape)")
    if trips is None and not cond.reshape(-1)[0]:
        trips = np.array(0)
    if trips is None:
        raise ConvertError("Loop without a trip count is not supported (bmc unrolls loops)")
    trips = int(np.asarray(trips).reshape(-1)[0])
    carried = [ctx.operand(i) for i in range(2, len(node.input))]
    if trips * max(1, len(body.node)) > MAX_UNROLLED_NODES:
        raise ConvertError(f"Loop of {trips} iterations of a {len(body.node)}-node body is too large to unroll "
                           f"(up to {MAX_UNROLLED_NODES} body nodes in all)")
    scans: list[list[Operand]] = [[] for _ in range(len(body.output) - 1 - len(carried))]
    keep_going = bool(cond.reshape(-1)[0])
    for i in range(trips):
        if not keep_going:
            break
        outs = ctx.subgraph(body, [np.array(i, np.int64), np.array(keep_going)] + carried, f"{where}, iteration {i}")
        known = ctx.known(outs[0])
        if known is None:
            raise ConvertError("Loop's condition is computed at run time; bmc unrolls loops and needs it constant")
        keep_going = bool(known.reshape(-1)[0])
        carried = outs[1:1 + len(carried)]
        for j, y in enumerate(outs[1 + len(carried):]):
            scans[j].append(y)
    if any(not s for s in scans):
        raise ConvertError("Loop with scan outputs that runs no iteration is not supported")
    return carried + [_stack(ctx, s, 0) for s in scans]


_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Tanh": "tanh", "Relu": "relu"}


@converter("RNN", "GRU", "LSTM")
def _recurrent(ctx: Context, node):
    """RNN, GRU and LSTM unrolled over their static sequence length (forward, reverse or both directions, either
    layout): the input projection of every step is one matmul, then each step multiplies the state by R and
    applies the gates (ONNX's equations: GRU's gate order z, r, h and ``linear_before_reset``; LSTM's i, o, f, c,
    peepholes and ``input_forget``)."""
    kind, e = node.op_type, ctx.emit1
    gates = _GATES[kind]
    x, w, r = ctx.operand(0), ctx.operand(1), ctx.operand(2)
    layout = ctx.attr("layout", 0)
    if layout:
        x = e("transpose", [x], perm=(1, 0, 2))
    steps, batch, _ = ctx.type(x).shape
    dtype = ctx.type(x).dtype
    hidden = ctx.attr("hidden_size", ctx.type(w).shape[1] // gates)
    direction = ctx.text("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    if steps * dirs > MAX_UNROLLED_NODES // 64:
        raise ConvertError(f"{kind} over {steps} steps is not supported (bmc unrolls it)",
                           fix="bind a shorter sequence with --input-shape")
    if ctx.has(4):
        lengths = ctx.const(4, "sequence_lens")
        if np.any(lengths != steps):
            raise ConvertError(f"{kind} with sequence_lens {lengths.tolist()} shorter than the {steps} steps is not "
                               "supported", fix="pad every sequence to the full length")
    names = [a.decode() if isinstance(a, bytes) else a
             for a in ctx.attr("activations", _DEFAULT_ACTIVATIONS[kind] * dirs)]
    if any(a not in _ACTIVATIONS for a in names):
        raise ConvertError(f"{kind} activations {names} are not supported", fix="bmc takes Sigmoid, Tanh and Relu")
    clip = ctx.attr("clip", None)

    def act(name, v):
        if clip is not None:
            v = e("clip", [v], min=-float(clip), max=float(clip))
        return e(_ACTIVATIONS[name], [v])

    def part(v, g, count=1):  # gate columns g .. g + count of a [.., gates * hidden] value
        return e("slice", [v], starts=(g * hidden,), ends=((g + count) * hidden,), axes=(-1,), steps=(1,))

    def per_dir(idx, d):
        v = ctx.optional(idx)
        if v is None:
            return None
        batch_first = layout and idx in (5, 6)  # initial_h/initial_c: [batch, dirs, hidden]
        return e("gather", [v, np.array(d, np.int64)], axis=1 if batch_first else 0)

    zeros = np.zeros((batch, hidden), np_dtype(dtype))
    ys, finals_h, finals_c = [], [], []
    for d in range(dirs):
        f, g, h_act = (names[d * len(_DEFAULT_ACTIVATIONS[kind]):][:3] + [None, None])[:3]
        w_t = e("transpose", [e("gather", [w, np.array(d, np.int64)], axis=0)], perm=(1, 0))  # [in, G*H]
        r_t = e("transpose", [e("gather", [r, np.array(d, np.int64)], axis=0)], perm=(1, 0))  # [H, G*H]
        bias = per_dir(3, d)
        projected = e("matmul", [x, w_t])  # every step's input projection, [steps, batch, G*H]
        r_bias = None
        if bias is not None:
            projected = e("add", [projected, part(bias, 0, gates)])
            r_bias = e("slice", [bias], starts=(gates * hidden,), ends=(2 * gates * hidden,), axes=(0,), steps=(1,))
        h = per_dir(5, d) if ctx.has(5) else zeros
        c = (per_dir(6, d) if ctx.has(6) else zeros) if kind == "LSTM" else None
        peep = per_dir(7, d) if kind == "LSTM" and ctx.has(7) else None
        order = range(steps) if (d == 0 and direction != "reverse") else range(steps - 1, -1, -1)
        out = [None] * steps
        if kind == "GRU" and not ctx.attr("linear_before_reset", 0):  # R_h and Rb_h, sliced once, not every step
            r_h, rb_h = part(r_t, 2), None if r_bias is None else part(r_bias, 2)
        for t in order:
            xt = e("gather", [projected, np.array(t, np.int64)], axis=0)
            hr = e("matmul", [h, r_t])
            if r_bias is not None:
                hr = e("add", [hr, r_bias])
            if kind == "RNN":
                h = act(f, e("add", [xt, hr]))
            elif kind == "GRU":
                z = act(f, e("add", [part(xt, 0), part(hr, 0)]))
                reset = act(f, e("add", [part(xt, 1), part(hr, 1)]))
                if ctx.attr("linear_before_reset", 0):  # r * (h R_h + Rb_h)
                    cand = act(g, e("add", [part(xt, 2), e("mul", [reset, part(hr, 2)])]))
                else:  # (r * h) R_h + Rb_h
                    rh = e("matmul", [e("mul", [reset, h]), r_h])
                    if rb_h is not None:
                        rh = e("add", [rh, rb_h])
                    cand = act(g, e("add", [part(xt, 2), rh]))
                h = e("add", [e("mul", [e("sub", [np.array(1, np_dtype(dtype)), z]), cand]), e("mul", [z, h])])
            else:
                pre = e("add", [xt, hr])
                i_pre, o_pre, f_pre = part(pre, 0), part(pre, 1), part(pre, 2)
                if peep is not None:
                    i_pre = e("add", [i_pre, e("mul", [part(peep, 0), c])])
                    f_pre = e("add", [f_pre, e("mul", [part(peep, 2), c])])
                i = act(f, i_pre)
                fg = e("sub", [np.array(1, np_dtype(dtype)), i]) if ctx.attr("input_forget", 0) else act(f, f_pre)
                c = e("add", [e("mul", [fg, c]), e("mul", [i, act(g, part(pre, 3))])])
                if peep is not None:
                    o_pre = e("add", [o_pre, e("mul", [part(peep, 1), c])])
                h = e("mul", [act(f, o_pre), e(_ACTIVATIONS[h_act], [c])])  # clip: gate inputs only, as onnxruntime
            out[t] = e("reshape", [h], shape=(1, 1, batch, hidden))
        ys.append(e("concat", out, axis=0) if steps > 1 else out[0])
        finals_h.append(e("reshape", [h], shape=(1, batch, hidden)))
        if c is not None:
            finals_c.append(e("reshape", [c], shape=(1, batch, hidden)))

    def cat(values, axis):
        return e("concat", values, axis=axis) if len(values) > 1 else values[0]

    y, y_h = cat(ys, 1), cat(finals_h, 0)  # [steps, dirs, batch, H], [dirs, batch, H]
    y_c = cat(finals_c, 0) if finals_c else None
    if layout:
        y = e("transpose", [y], perm=(2, 0, 1, 3))
        y_h = e("transpose", [y_h], perm=(1, 0, 2))
        y_c = e("transpose", [y_c], perm=(1, 0, 2)) if y_c is not None else None
    return [y, y_h] + ([y_c] if kind == "LSTM" else [])
