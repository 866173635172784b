"""Donated inputs: updates written into the input's own buffer (``--donate``).

A decoding step with a fixed-size key/value cache takes the cache as an input, writes the new token's keys and values
at the step's position (an ONNX ScatterElements or ScatterND) and returns the updated cache as an output. Run as
written, every step copies the whole cache to change one position: for a long cache the step is that copy.
ONNX Runtime GenAI's ``past_present_share_buffer`` and XLA's buffer donation (``input_output_alias``) are the usual
answer, and this is bmc's: an input the user *donates* may be written over, so a scatter that is the input's only
reader runs in place on it (``relax.call_tir_inplace`` of a kernel that writes the updates and nothing else), and the
output it makes *is* the input's buffer.

:func:`donated_updates` decides, on the program to be built (the partitioned one when sharded), which scatters run in
place and why a donated input cannot; :func:`scatter_kernel` makes the kernel. Only scatters without a reduction run
in place (with one, repeated indices would race in a parallel loop); an index out of range writes nothing.
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
            out.unused[name] = f"it is read by {len(readers)} nodes ({ops}); only an input read by one scatter alone " \
                               "can be written over"
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


def scatter_kernel(node: Node):
    """The TIR kernel that writes ``node``'s updates into its data argument and nothing else: arguments (data,
    indices, updates), data written in place. Negative indices count from the end; out-of-range ones write nothing."""
    from tvm.script import from_source

    data, idx, upd = (v.type for v in node.inputs)
    loops = [f"i{k}" for k in range(len(upd.shape))]
    vs = [f"v{k}" for k in range(len(upd.shape))]
    it = idx.dtype

    def positive(at: str, n: int) -> str:
        return f"T.if_then_else({at} < T.{it}(0), {at} + T.{it}({n}), {at})"

    if node.op == "scatter_elements":
        axis = node.attrs["axis"] % data.rank
        at = f"idx[{', '.join(vs)}]"
        targets = [positive(at, data.shape[axis]) if k == axis else v for k, v in enumerate(vs)]
        checks = [targets[axis]]
        bounds = [data.shape[axis]]
    else:  # scatter_nd: updates[p..., q...] goes to data[indices[p..., :], q...]
        depth, batch = idx.shape[-1], len(idx.shape) - 1
        checks = [positive(f"idx[{', '.join(vs[:batch] + [str(j)])}]", data.shape[j]) for j in range(depth)]
        targets = checks + vs[batch:]
        bounds = list(data.shape[:depth])
    guard = " and ".join(f"T.{it}(0) <= {t} and {t} < T.{it}({n})" for t, n in zip(checks, bounds))
    store = f"data[{', '.join(targets)}] = upd[{', '.join(vs) or '()'}]"
    if not vs:  # 0-d updates (scatter_nd of one whole-data index tuple): no loop
        body = [f"    if {guard}:", f"        {store}"]
    else:
        body = [f"    for {', '.join(loops)} in T.grid({', '.join(map(str, upd.shape))}):",
                '        with T.sblock("scatter"):',
                f"            {', '.join(vs)} = T.axis.remap(\"{'S' * len(vs)}\", [{', '.join(loops)}])",
                f"            if {guard}:",
                f"                {store}"]
    source = "\n".join([
        "@T.prim_func(s_tir=True)",
        f"def {node.op}_in_place(data: T.Buffer({tuple(data.shape)}, \"{data.dtype}\"), "
        f"idx: T.Buffer({tuple(idx.shape)}, \"{it}\"), upd: T.Buffer({tuple(upd.shape)}, \"{upd.dtype}\")):",
        '    T.func_attr({"tirx.noalias": True})',
        *body])
    return from_source(source)
