"""Donated inputs: updates written into the input's own buffer (``--donate``).

A decoding step with a fixed-size key/value cache takes the cache as an input, writes the new token's keys and values
at the step's position (an ONNX ScatterElements or ScatterND) and returns the updated cache as an output. Run as
written, every step copies the whole cache to change one position: for a long cache the step is that copy.
ONNX Runtime GenAI's ``past_present_share_buffer`` and XLA's buffer donation (``input_output_alias``) are the usual
answer, and this is bmc's: an input the user *donates* may be written over, so a scatter that is the input's only
reader runs in place on it (``relax.call_tir_inplace`` of a kernel that writes the updates and nothing else), and the
output it makes *is* the input's buffer.

:func:`donated_updates` decides, on the program to be built (the partitioned one when sharded), which scatters run in
place and why a donated input cannot; :func:`scatter_kernel` makes the kernel, which every scatter without a reduction
uses (into a copy of the data when not in place). Only scatters without a reduction run in place (with one, repeated
indices would race in a parallel loop); an index out of range writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bmc.ir.graph import Graph, Node

#: the ops that can update a donated input in place (without a reduction)
IN_PLACE_OPS = ("scatter_elements", "scatter_nd")


@dataclass
class Donated:
    """What donation gives a program: the scatters that run in place (node → the input they write), which output is
    which input's buffer (output value name → input name), and each donated input that could not be used (why)."""

    updates: dict[Node, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)


def donated_updates(graph: Graph, donate, sharded: bool = False) -> Donated:
    """Which of ``donate`` (input names of ``graph``; ``sharded``: a partitioned program) a scatter can update in
    place: the input must be read by that one node only, as its data, and must not also be an output."""
    out = Donated()
    users = graph.users()
    inputs = {v.name: v for v in graph.inputs}
    for name in donate:
        v = inputs[name]
        readers = users.get(v, [])
        if v in graph.outputs:
            out.unused[name] = "it is also returned as an output"
        elif not readers:
            out.unused[name] = "nothing reads it"
        elif len(readers) > 1 or readers[0].inputs.count(v) > 1:
            ops = ", ".join(sorted({n.op for n in readers}))
            what = f"{len(readers)} nodes ({ops})" if len(readers) > 1 else f"one {ops} node more than once"
            out.unused[name] = f"it is read by {what}; only an input read by one scatter alone can be written over"
        elif readers[0].op not in IN_PLACE_OPS or readers[0].inputs[0] is not v:
            node = readers[0]
            hint = (" (the plan splits it, so the program cuts this device's block: add --input-shard for it to feed "
                    "each device its block)") if sharded and node.op == "gather" else ""
            out.unused[name] = f"its only reader is a {node.op} node{hint}; in place bmc runs only the data of a " \
                               "ScatterElements or ScatterND"
        elif readers[0].attrs.get("reduction", "none") != "none":
            out.unused[name] = f"its scatter has reduction={readers[0].attrs['reduction']!r} (repeated indices would " \
                               "race in place); only reduction='none' runs in place"
        else:
            out.updates[readers[0]] = name
            if readers[0].output in graph.outputs:
                out.aliases[readers[0].output.name] = name
    return out


def scatter_kernel(node: Node, in_place: bool = True):
    """The TIR kernel of a scatter without a reduction: arguments (data, indices, updates), data written in place;
    or, not ``in_place``, (data, indices, updates, out) with data copied into out first. Negative indices count from
    the end; out-of-range ones write nothing. (A separate copy kernel would not do: Relax turns an identity copy into
    a view of its input, and the scatter would then write into that.)"""
    from tvm.script import from_source

    data, idx, upd = (v.type for v in node.inputs)
    it, target = idx.dtype, "data" if in_place else "out"

    def positive(at: str, n: int) -> str:
        return f"T.if_then_else({at} < T.{it}(0), {at} + T.{it}({n}), {at})"

    def block(name: str, shape, body: str) -> list[str]:
        """``body`` (in terms of v0, v1, ...) over every index of ``shape``, in one spatial block."""
        shape = shape or (1,)  # (0-d: one iteration; a function that is one bare block is left unscheduled)
        vs = ", ".join(f"v{k}" for k in range(len(shape)))
        loops = ", ".join(f"i{k}" for k in range(len(shape)))
        return [f"    for {loops} in T.grid({', '.join(map(str, shape))}):",
                f'        with T.sblock("{name}"):',
                f"            {vs} = T.axis.remap(\"{'S' * len(shape)}\", [{loops}])",
                f"            {body}"]

    vs = [f"v{k}" for k in range(len(upd.shape))]
    if node.op == "scatter_elements":
        axis = node.attrs["axis"] % data.rank
        at = f"idx[{', '.join(vs)}]"
        targets = [positive(at, data.shape[axis]) if k == axis else v for k, v in enumerate(vs)]
        checks, bounds = [targets[axis]], [data.shape[axis]]
    else:  # scatter_nd: updates[p..., q...] goes to data[indices[p..., :], q...]
        depth, batch = idx.shape[-1], len(idx.shape) - 1
        checks = [positive(f"idx[{', '.join(vs[:batch] + [str(j)])}]", data.shape[j]) for j in range(depth)]
        targets = checks + vs[batch:]
        bounds = list(data.shape[:depth])
    guard = " and ".join(f"T.{it}(0) <= {t} and {t} < T.{it}({n})" for t, n in zip(checks, bounds))
    store = f"{target}[{', '.join(targets)}] = upd[{', '.join(vs) or '()'}]"
    every = ", ".join(f"v{k}" for k in range(data.rank))
    out = "" if in_place else f", out: T.Buffer({tuple(data.shape)}, \"{data.dtype}\")"
    source = "\n".join([
        "@T.prim_func(s_tir=True)",
        f"def {node.op}{'_in_place' if in_place else ''}(data: T.Buffer({tuple(data.shape)}, \"{data.dtype}\"), "
        f"idx: T.Buffer({tuple(idx.shape)}, \"{it}\"), upd: T.Buffer({tuple(upd.shape)}, \"{upd.dtype}\"){out}):",
        '    T.func_attr({"tirx.noalias": True})',
        *([] if in_place else block("copy", data.shape, f"out[{every}] = data[{every}]")),
        *block("scatter", upd.shape, f"if {guard}:\n{' ' * 16}{store}")])
    # no global symbol of its own: the module names it after its GlobalVar, so scatters of two shapes (two
    # functions, scatter_elements and scatter_elements1) do not both export "scatter_elements" (Qwen3-Next)
    return from_source(source).without_attr("global_symbol")
