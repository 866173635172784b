"""Reduced precision: run a float32 model in float16 or bfloat16 (``--dtype``).

Every float32 value of the graph becomes ``dtype``: weights are converted lazily when they are written, constants
and ``cast`` targets are rewritten, inputs are cast on entry and outputs back to float32, so the model's signature
does not change. Normalizations are still computed in float32 by their lowerings where TVM needs it.

Two values keep more precision, as mixed-precision training and inference do (PyTorch autocast keeps the residual
stream of a float32 model in float32; Megatron-LM's ``fp32_residual_connection``):

- **The residual stream stays float32.** A residual add (:func:`residual_adds`: pre-LN and post-LN transformers
  alike) is computed and kept in float32; a layer/RMS norm reads it in float32; other consumers read it rounded
  to ``dtype``. Rounding the stream to bfloat16 at every layer compounds: on the
  ViT fixture with the GPU's rounding points it alone took the error from 0.74e-2 to 1.01e-2 of max |ref|. It costs
  the stream's bandwidth twice over (a few % of a transformer layer's time).
- **Integers scaled by a float stay float32** where ``dtype`` cannot hold them: a float32 constant with finite values
  that overflow ``dtype`` and only ``mul`` readers (a QDQ model's int32 bias codes, folded to float at import, times
  their scale) is kept, and those products are computed in float32 (QDQ GPT-2 in float16: ``inf`` before).
  Other constants are clamped to ``dtype``'s range (attention-mask fills of -3.4e38: finite, as in float32).
- **Inputs and outputs stay float32, unless named by ``io``** (``--dtype-io``): those are passed in ``dtype`` (a key/value
  cache: half the bytes in and out, no cast of the whole cache each step, and ``--donate`` can then write it in place).
- **Outputs are not rounded before their cast back**: an output cast carries ``excess_precision`` and takes the
  float32 result of the last op's lowering (a matmul's accumulator, a norm computed in float32) as it is (XLA's
  "excess precision"). A model's own casts still round.
"""

from __future__ import annotations

import numpy as np

from bmc.errors import UsageError
from bmc.ir.graph import Graph, Value
from bmc.ir.tensor import CastTensor
from bmc.ir.types import np_dtype
from bmc.ops.builder import GraphBuilder

REDUCED = ("float16", "bfloat16")
NORMS = ("layer_norm", "rms_norm")


def residual_adds(graph: Graph) -> set[int]:
    """ids of the float32 ``add`` outputs that carry a residual stream. Candidates add two activations (values
    computed from the graph's inputs, not from weights alone); a candidate is residual when a layer/RMS norm reads
    it or when it reads or feeds another candidate (the chain ``x + attn(x) + mlp(...)``, also where the norm is
    spelled out in elementwise ops, as in the Llama exports). A lone add of activations (rotary embeddings, the
    attention mask) is not."""
    active = {id(v) for v in graph.inputs}
    for node in graph.nodes:
        if any(id(v) in active for v in node.inputs):
            active.update(id(v) for v in node.outputs)
    candidates = {id(n.outputs[0]): n for n in graph.nodes
                  if n.op == "add" and n.outputs[0].type.dtype == "float32" and all(id(v) in active for v in n.inputs)}
    users = graph.users()
    residual = set()
    for key, n in candidates.items():
        readers = users.get(n.outputs[0], ())
        if (any(u.op in NORMS or id(u.outputs[0]) in candidates for u in readers)
                or any(id(v) in candidates for v in n.inputs)):
            residual.add(key)
    return residual


def _overflows(value, dtype: str) -> bool:
    """A float32 array with finite values that ``dtype`` rounds to infinity."""
    a = np.asarray(value)
    if a.dtype != np.float32:
        return False
    with np.errstate(over="ignore"):
        return bool(np.any(np.isfinite(a) & np.isinf(a.astype(np_dtype(dtype)))))


def _saturated(value, dtype: str) -> np.ndarray:
    """A float32 constant in ``dtype``, finite values beyond its range clamped to its largest (a mask fill of
    float32's lowest, -3.4e38, becomes float16's -65504, not -inf: a row masked everywhere then still softmaxes to
    equal weights, as in float32, where -inf would give NaN, which the next attention spreads to every row)."""
    import ml_dtypes

    a = np.asarray(value)
    top = float(ml_dtypes.finfo(np_dtype(dtype)).max)
    return np.where(np.isfinite(a), np.clip(a, -top, top), a).astype(np_dtype(dtype))


def io_values(graph: Graph, patterns) -> set[int]:
    """ids of the float32 inputs and outputs (by the model's names) that ``patterns`` (``--dtype-io`` names or
    ``fnmatch`` patterns) match; one that matches no float32 input or output is a usage error."""
    import difflib
    import fnmatch

    named = [(v.name, v) for v in graph.inputs] + list(zip(graph.output_names or [v.name for v in graph.outputs],
                                                           graph.outputs))
    floats = [(n, v) for n, v in named if v.type.dtype == "float32"]
    out = set()
    for pattern in patterns:
        hit = [v for n, v in floats if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            near = difflib.get_close_matches(pattern, [n for n, _ in floats], n=5, cutoff=0.5)
            raise UsageError(f"--dtype-io {pattern!r} matches no float32 input or output of the model (they are: "
                             f"{', '.join(n for n, _ in floats) or 'none'})", where="--dtype-io",
                             fix=("did you mean " + ", ".join(map(repr, near)) + "?") if near else
                             "name a float32 input or output, or a pattern such as 'present.*'")
        out.update(id(v) for v in hit)
    return out


def convert_float32(graph: Graph, dtype: str, io=()) -> Graph:
    """``graph`` computing in ``dtype`` (see the module's docstring); ``io``: ``--dtype-io`` names or patterns of the
    inputs and outputs passed in ``dtype`` too."""
    if dtype == "float32":
        if io:
            raise UsageError("--dtype-io passes inputs and outputs in the --dtype precision, and --dtype is float32",
                             where="--dtype-io", fix="add --dtype bfloat16 (or float16), or leave out --dtype-io")
        return graph
    if dtype not in REDUCED:
        raise UsageError(f"unknown dtype {dtype!r}", where="--dtype", fix="use float32, float16 or bfloat16")
    reduced_io = io_values(graph, io)
    b = GraphBuilder(graph.name)
    env: dict[int, Value] = {}
    narrowed: dict[int, Value] = {}  # a float32 residual value rounded to dtype, made once for its other readers
    # the outputs each made in the precision it is returned in: float32, or dtype for those named by ``io``
    target = {id(v): dtype if id(v) in reduced_io else "float32" for v in graph.outputs if v.type.dtype == "float32"}
    residual = residual_adds(graph)
    users = graph.users()
    wide_constants = {id(n.outputs[0]) for n in graph.nodes
                      if n.op == "constant" and _overflows(n.attrs["value"], dtype)
                      and all(u.op == "mul" for u in users[n.outputs[0]])}

    def narrow(v: Value, x: Value) -> Value:
        return b.emit1("cast", [x], dtype=dtype) if v.type.dtype == "float32" else x

    def read(v: Value, wide: bool) -> Value:
        """``v``'s converted value for a consumer that computes in float32 (``wide``) or in ``dtype``."""
        x = env[id(v)]
        if wide and x.type.dtype == dtype and v.type.dtype == "float32":
            return b.emit1("cast", [x], dtype="float32")
        if not wide and x.type.dtype == "float32" and v.type.dtype == "float32":
            if id(v) not in narrowed:
                narrowed[id(v)] = b.emit1("cast", [x], dtype=dtype)
            return narrowed[id(v)]
        return x

    for v in graph.inputs:
        env[id(v)] = b.input(v.name, v.type.with_dtype(dtype)) if id(v) in reduced_io else narrow(v, b.input(v.name,
                                                                                                              v.type))
    for p in graph.params:
        data = graph.weights[p.name]
        env[id(p)] = b.param(p.name, CastTensor(data, dtype) if p.type.dtype == "float32" else data)
    for node in graph.nodes:
        b.source = node.source
        attrs = dict(node.attrs)
        wide_mul = node.op == "mul" and any(id(v) in wide_constants for v in node.inputs)
        if (node.op == "constant" and np.asarray(attrs["value"]).dtype == np.float32
                and id(node.outputs[0]) not in wide_constants):
            attrs["value"] = _saturated(attrs["value"], dtype)
        if node.op == "cast" and attrs["dtype"] == "float32":
            attrs["dtype"] = dtype
        # a residual add, or a norm of the residual stream, computes in float32
        wide_add = id(node.outputs[0]) in residual or wide_mul
        wide_norm = node.op in NORMS and id(node.inputs[0]) in residual
        made = "float32" if wide_add else dtype  # (a wide norm's outputs are cast to dtype below)
        names = [f"{v.name}.{made}" if target.get(id(v), made) != made else v.name for v in node.outputs]
        outs = b.emit(node.op, [read(v, wide_add or wide_norm) for v in node.inputs],
                      names=[n + ".float32" for n in names] if wide_norm else names, **attrs)
        if wide_norm:  # its readers (a matmul, the next layer) take it in dtype
            outs = [b.emit1("cast", [o], n, dtype=dtype) for o, n in zip(outs, names)]
        env.update({id(v): o for v, o in zip(node.outputs, outs)})
    b.source = ""
    outputs = [b.emit1("cast", [env[id(v)]], v.name, dtype=target[id(v)], excess_precision=target[id(v)] == "float32")
               if id(v) in target and env[id(v)].type.dtype != target[id(v)] else env[id(v)] for v in graph.outputs]
    return b.finish(outputs)
