"""ONNX → bmc IR.

The importer walks the ONNX nodes in topological order with an environment mapping each ONNX tensor name to an
*operand*: either an IR ``Value`` (known only at run time) or a numpy array (known at compile time). Converters
emit IR through ``Context.emit``; when every operand of an op is known and the result is small, ``emit`` runs the
op's numpy reference instead of emitting a node. That is how the exporters' shape subgraphs
(Shape → Gather → Concat → Reshape) fold away: ``Shape`` of a statically typed value is a constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from bmc.errors import ModelError, UsageError
from bmc.frontend.onnx import loader
from bmc.frontend.onnx.functions import DEFAULT_DOMAINS, MAX_DEPTH, Functions
from bmc.ir.graph import Graph, Value
from bmc.ir.passes import eliminate_dead_code
from bmc.ir.tensor import ArrayTensor, FillTensor, MappedTensor, Tensor
from bmc.ir.types import FLOAT_DTYPES, ShapeError, TensorType, dtype_of
from bmc.ops import OpError, get_op
from bmc.ops.builder import GraphBuilder

Operand = Value | np.ndarray
FOLD_LIMIT = 1 << 16  # folded results up to this many elements stay compile-time constants
SMALL_WEIGHT = 16  # float and quantized (8-/4-bit) initializers up to this many elements are constants, larger
# ones weights; other integer and bool initializers (shapes, indices, masks) are constants up to FOLD_LIMIT
WEIGHT_DTYPES = FLOAT_DTYPES | {"int8", "uint8"}

# by op type, or "domain::op type" outside the default domain
CONVERTERS: dict[str, Callable[["Context", onnx.NodeProto], Sequence[Operand | None]]] = {}


def converter(*op_types: str):
    def deco(fn):
        for op in op_types:
            CONVERTERS[op] = fn
        return fn

    return deco


def op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


class ConvertError(Exception):
    """Raised by converters for a supported op with an unsupported attribute/input form (FAILURES.md 5)."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.fix = fix


@dataclass
class Context:
    builder: GraphBuilder
    opset: int
    env: dict[str, Operand] = field(default_factory=dict)
    narrow: dict[str, str] = field(default_factory=dict)  # ONNX tensor name -> its narrow type (loader.NARROW)
    # ONNX tensor name of a dequantized weight -> how to multiply by it better than by its values: called with A, A's
    # ONNX name and whether the weight is used transposed (Gemm's transB); None declines
    weight_matmuls: dict[str, Callable[[Operand, str, bool], Operand | None]] = field(default_factory=dict)
    # ONNX tensor name of a dequantized 8-bit convolution weight -> the node's convolution by it computed on the
    # codes, called with the input's ONNX name; None declines
    weight_convs: dict[str, Callable[[str], Operand | None]] = field(default_factory=dict)
    # ONNX tensor name of a per-tensor 8-bit DequantizeLinear's output -> (codes, scale, zero point or None)
    dequantized: dict[str, tuple[Operand, Operand, Operand | None]] = field(default_factory=dict)
    node: onnx.NodeProto | None = None
    where: str = ""  # the node being converted, for errors (its function body and subgraph nesting included)
    _materialized: dict[int, tuple[np.ndarray, Value]] = field(default_factory=dict)  # by id; holds the array
    # alive so its id cannot be reused by another array
    _layouts: dict[tuple[str, str], Value] = field(default_factory=dict)  # (weight, layout) -> its parameter
    functions: Functions | None = None  # the model's function bodies, for subgraphs' nodes
    base_dir: Any = None  # where the model's external data lives
    _subgraph_initializers: dict[int, tuple[onnx.TensorProto, Operand]] = field(default_factory=dict)

    # ---- operands -------------------------------------------------------------------------------------------
    def has(self, idx: int) -> bool:
        return idx < len(self.node.input) and self.node.input[idx] != ""

    def operand(self, idx: int) -> Operand:
        return self.env[self.node.input[idx]]

    def optional(self, idx: int) -> Operand | None:
        return self.operand(idx) if self.has(idx) else None

    def weight(self, x: Operand) -> Tensor | None:
        """The data of ``x`` when it is a weight (a parameter), else None."""
        if isinstance(x, Value) and x.producer is None:
            return self.builder.graph.weights.get(x.name)
        return None

    def known(self, x: Operand) -> np.ndarray | None:
        """The value of ``x`` when it is known at compile time (a constant, or a weight used as one), else None."""
        if isinstance(x, np.ndarray):
            return x
        w = self.weight(x)
        return None if w is None else np.asarray(w.numpy())

    def const(self, idx: int, what: str) -> np.ndarray | None:
        """The compile-time value of input ``idx`` (None if absent); a ConvertError if only known at run time."""
        if not self.has(idx):
            return None
        x = self.known(self.operand(idx))
        if x is not None:
            return x
        source = self._input_read(self.operand(idx))
        raise ConvertError(f"input {idx} ({what}) must be a compile-time constant, but {self.node.input[idx]!r} is "
                           "computed at run time" + (f" from the values of graph input {source!r}" if source else ""),
                           fix="bmc compiles static shapes: export the model so that this is a constant (a size "
                               "that depends on the data, such as the tokens each expert of a mixture gets, cannot "
                               "be; Hugging Face mixtures export statically with experts_implementation="
                               "'batched_mm')" if source else "bind the input shapes with --input-shape so it can "
                                                             "be folded")

    def _input_read(self, x: Operand) -> str | None:
        """The name of a graph input whose values ``x`` is computed from, if any (every shape is bound by the time
        ops are converted, so such a value is data-dependent)."""
        weights, seen, stack = self.builder.graph.weights, set(), [x]
        while stack:
            v = stack.pop()
            if not isinstance(v, Value) or id(v) in seen:
                continue
            seen.add(id(v))
            if v.producer is None and v.name not in weights:
                return v.name
            stack.extend(v.producer.inputs if v.producer is not None else ())
        return None

    def weight_layout(self, x: Operand, layout: str, fn: Callable[[np.ndarray], np.ndarray],
                      type_: TensorType) -> Value | None:
        """The weight ``x`` stored in another layout: a parameter holding ``fn`` of its data (computed when the
        artifact is written, made once per weight and layout), or None when ``x`` is not a weight."""
        data = self.weight(x)
        if data is None:
            return None
        key = (x.name, layout)
        if key not in self._layouts:
            self._layouts[key] = self.builder.param(f"{x.name}.{layout}",
                                                    MappedTensor(data, fn, type_, f"{layout} layout"))
        return self._layouts[key]

    def subgraph(self, graph: onnx.GraphProto, bindings: Sequence[Operand], where: str) -> list[Operand]:
        """Import ``graph`` (an If branch, a Scan body) inline: its inputs bound to ``bindings``, its nodes seeing
        the tensors of this scope; returns its outputs. The names it defines stay inside it."""
        if len(bindings) != len(graph.input):
            raise ConvertError(f"the subgraph {graph.name!r} has {len(graph.input)} inputs; {len(bindings)} given")
        saved = self.env, self.node, self.builder.source, self.where
        self.env = dict(self.env)
        try:
            for init in graph.initializer:
                self.env[init.name] = self._subgraph_initializer(init)
            self.env.update({i.name: x for i, x in zip(graph.input, bindings)})
            for idx, node in enumerate(loader.check_graph(graph, outer=set(saved[0]))):
                _import_node(self, node, f"{where}, subgraph {graph.name!r} {loader.node_label(node, idx)}",
                             self.functions)
            return [self.env[o.name] for o in graph.output]
        finally:
            self.env, self.node, self.builder.source, self.where = saved

    def _subgraph_initializer(self, init: onnx.TensorProto) -> Operand:
        """A subgraph's initializer, made once however many times the subgraph is imported (a Scan's steps)."""
        if init.data_type in loader.NARROW:
            raise ConvertError(f"{loader.NARROW[init.data_type]} initializer {init.name!r} inside a subgraph is not "
                               "supported")
        if id(init) not in self._subgraph_initializers:
            t = loader.initializer_tensor(init, self.base_dir)
            self._subgraph_initializers[id(init)] = (init, _initializer(self.builder, init.name, t))
        return self._subgraph_initializers[id(init)][1]

    def type(self, x: Operand) -> TensorType:
        return x.type if isinstance(x, Value) else TensorType(dtype_of(x.dtype), x.shape)

    def value(self, x: Operand) -> Value:
        """An IR value for an operand, materializing constants (small as constant nodes, large as weights)."""
        if isinstance(x, Value):
            return x
        key = id(x)
        if key not in self._materialized:
            v = (self.builder.constant(x) if x.size <= FOLD_LIMIT
                 else self.builder.param(f"const.{len(self._materialized)}", ArrayTensor(x)))
            self._materialized[key] = (x, v)
        return self._materialized[key][1]

    # ---- emission -------------------------------------------------------------------------------------------
    def emit(self, op: str, inputs: Sequence[Operand], **attrs: Any) -> list[Operand]:
        opdef = get_op(op)
        if all(isinstance(x, np.ndarray) for x in inputs):
            full = opdef.check_attrs(attrs)
            types = opdef.infer([self.type(x) for x in inputs], full)
            if sum(t.numel for t in types) <= FOLD_LIMIT:
                with np.errstate(all="ignore"):  # log(0), inf -> int, ... fold as the kernels would compute them
                    return [np.asarray(a) for a in opdef.reference(list(inputs), full)]
        return self.builder.emit(op, [self.value(x) for x in inputs], **attrs)

    def emit1(self, op: str, inputs: Sequence[Operand], **attrs: Any) -> Operand:
        (out,) = self.emit(op, inputs, **attrs)
        return out

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def text(self, name: str, default: str) -> str:
        """A string attribute (onnx gives bytes) as ``str``."""
        v = self.attr(name, default)
        return v.decode() if isinstance(v, bytes) else v


def import_graph(proto: onnx.ModelProto, base_dir, input_shapes: Mapping[str, Sequence[int] | int] | None = None,
                 name: str = "main") -> Graph:
    opset = loader.check_versions(proto)
    g = proto.graph
    order = loader.check_graph(g)
    functions = Functions(proto, opset)
    _check_supported(order, functions)
    b = GraphBuilder(name)
    ctx = Context(b, opset, functions=functions, base_dir=base_dir)

    weights: dict[str, Tensor] = {}
    for init in g.initializer:
        weights[init.name] = loader.initializer_tensor(init, base_dir)
    loader.check_external_overlaps(weights)
    narrow = {i.name: i for i in g.initializer if i.data_type in loader.NARROW}
    for init_name, t in weights.items():
        if init_name in narrow:
            ctx.env[init_name] = _narrow_initializer(ctx, narrow[init_name], t)
            continue
        ctx.env[init_name] = _initializer(b, init_name, t)

    for inp, ty in bind_input_shapes(g, input_shapes or {}).items():
        ctx.env[inp] = b.input(inp, ty)
    ctx.narrow.update({i.name: loader.NARROW[i.type.tensor_type.elem_type] for i in g.input
                       if i.type.tensor_type.elem_type in loader.NARROW})

    for idx, node in enumerate(order):
        b.source = node.name or f"{node.op_type}_{idx}"
        _import_node(ctx, node, loader.node_label(node, idx), functions)
    outputs = []
    for o in g.output:
        out = ctx.env[o.name]
        v = ctx.value(out)
        if v.producer is None or v in outputs:  # an input, parameter or repeated output needs its own value
            v = b.emit1("reshape", [v], shape=v.type.shape)
        if v.name != o.name and o.name not in (x.name for x in b.graph.values()):
            v.name = o.name
        outputs.append(v)
    graph = b.finish(outputs)
    if any(v.name != o.name for v, o in zip(outputs, g.output)):
        graph.output_names = [o.name for o in g.output]
    return eliminate_dead_code(graph)


def _initializer(b: GraphBuilder, name: str, t: Tensor) -> Operand:
    """A small initializer is a compile-time constant, a larger one (a weight) a parameter."""
    small = t.type.numel <= (SMALL_WEIGHT if t.type.dtype in WEIGHT_DTYPES else FOLD_LIMIT)
    return np.asarray(t.numpy()) if small else b.param(name, t)


def _narrow_initializer(ctx: Context, proto: onnx.TensorProto, stored: Tensor) -> Operand:
    """A narrow initializer's values or codes, in its carrier. A float8 weight is its codes, a byte each; a 4-bit
    weight packed by rows stays packed, for an ``unpack_int4`` node to read; a small one, a 2-bit one, or one whose
    rows share bytes (odd last dim), is unpacked here."""
    dims, code = tuple(proto.dims), proto.data_type
    ctx.narrow[proto.name] = loader.NARROW[code]
    big = np.prod(dims) > SMALL_WEIGHT
    if code not in loader.PACKED_BITS:
        return ctx.builder.param(proto.name, stored) if big else np.asarray(stored.numpy()).reshape(dims)
    if big and loader.PACKED_BITS[code] == 4 and dims and dims[-1] % 2 == 0:
        return ctx.emit1("unpack_int4", [ctx.builder.param(proto.name, stored)], signed=code == onnx.TensorProto.INT4)
    arr = loader.unpack_narrow(stored.numpy(), code, dims)
    return ctx.builder.param(proto.name, ArrayTensor(arr)) if big else arr


def _import_node(ctx: Context, node: onnx.NodeProto, where: str, functions: Functions, depth: int = 0) -> None:
    """Convert one ONNX node, or inline its function body (the body's IR nodes keep the node's ``source``)."""
    op = op_key(node)
    if op in CONVERTERS:
        _convert(ctx, node, where)
        return
    if depth >= MAX_DEPTH:
        raise ModelError(f"function bodies nest more than {MAX_DEPTH} deep (a recursive function?)", where=where)
    if not functions.has(node):
        raise ModelError(f"op {op} is not supported and has no ONNX function body to expand", where=where,
                         fix="bmc supports " + ", ".join(sorted(CONVERTERS)))
    types = [ctx.type(ctx.env[name]) if name else None for name in node.input]
    try:
        expansion = functions.expand(node, types)
    except Exception as e:  # noqa: BLE001  (onnx's C++ function builders raise several types)
        raise ModelError(f"the ONNX function body of {op} cannot be built for this node: {e}", where=where,
                         fix="check the node's attributes and input types against the op's definition") from None
    outer, ctx.opset = ctx.opset, expansion.opset
    try:
        for sub in expansion.nodes:
            _import_node(ctx, sub, f"{where}, function body node {sub.name!r} ({sub.op_type})", functions, depth + 1)
    finally:
        ctx.opset = outer


# Ops that move values without computing on them (the positions of their data inputs; None: all): a narrow type
# passes through them, codes staying codes. Ops in _READS_CODES read a float8/float4 tensor's codes knowingly; any
# other op given one is refused (it would compute on the codes).
_MOVES: dict[str, tuple[int, ...] | None] = {
    "Identity": (0,), "Reshape": (0,), "Transpose": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Flatten": (0,),
    "Expand": (0,), "Tile": (0,), "Slice": (0,), "Gather": (0,), "GatherElements": (0,), "GatherND": (0,),
    "Split": (0,), "Concat": None, "Where": (1, 2), "DepthToSpace": (0,), "SpaceToDepth": (0,), "Pad": (0, 2),
}
_READS_CODES = {"Cast", "CastLike", "QuantizeLinear", "DequantizeLinear", "Shape", "Size"}


def _narrow_inputs(ctx: Context, node: onnx.NodeProto, where: str) -> str | None:
    """The narrow type a data-movement node passes on (None if none); refuses computing on float8/float4 codes."""
    default = node.domain in DEFAULT_DOMAINS
    moves = default and node.op_type in _MOVES
    for k, name in enumerate(node.input):
        kind = ctx.narrow.get(name) if name else None
        if kind is None:
            continue
        if moves:
            if _MOVES[node.op_type] is None or k in _MOVES[node.op_type]:
                return kind
        elif loader.coded(kind) and not (default and node.op_type in _READS_CODES):
            raise ModelError(f"input {name!r} is {kind}, which bmc carries as codes: {op_key(node)} cannot compute "
                             "on it", where=where, fix=f"cast {name!r} to a wider float first (Cast to=FLOAT); bmc "
                             "reads float8/float4 tensors only in casts, (de)quantization and data movement")
    return None


def _convert(ctx: Context, node: onnx.NodeProto, where: str) -> None:
    b = ctx.builder
    ctx.node, ctx.where = node, where
    first_new = len(b.graph.nodes)
    passes_on = _narrow_inputs(ctx, node, where) if ctx.narrow else None
    try:
        outs = CONVERTERS[op_key(node)](ctx, node)
    except ConvertError as e:
        raise ModelError(str(e), where=where, fix=e.fix) from None
    except (OpError, ShapeError) as e:
        raise ModelError(str(e), where=where, fix="check the bound input shapes (--input-shape) and the node's "
                         "attributes") from None
    fresh = {id(v) for n in b.graph.nodes[first_new:] for v in n.outputs}
    for out_name, out in zip(node.output, outs):
        if out_name and out is not None:
            if isinstance(out, Value) and id(out) in fresh and out.name != out_name:
                out.name = b.names(out_name)  # keep the ONNX tensor name (for --shard, plans, errors)
            ctx.env[out_name] = out
            if passes_on:
                ctx.narrow[out_name] = passes_on


def _check_supported(nodes: list[onnx.NodeProto], functions: Functions) -> None:
    """One error listing every unsupported op, with counts and node names (FAILURES.md 4)."""
    missing: dict[str, list[str]] = {}
    for idx, node in enumerate(nodes):
        key = op_key(node)
        if key not in CONVERTERS and not functions.has(node):
            missing.setdefault(key, []).append(node.name or f"#{idx}")
    if missing:
        lines = [f"  {op} ×{len(names)}: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}"
                 for op, names in sorted(missing.items())]
        raise ModelError(f"{sum(map(len, missing.values()))} node(s) use {len(missing)} unsupported op(s):\n"
                         + "\n".join(lines), where="model",
                         fix="bmc supports " + ", ".join(sorted(CONVERTERS)))


def bind_input_shapes(g: onnx.GraphProto, shapes: Mapping[str, Sequence[int] | int]) -> dict[str, TensorType]:
    """Static types for the graph inputs. ``shapes`` maps an input name to its full shape, or a symbolic dim name
    to its size. Unbound symbolic dims are one error listing them all (FAILURES.md 16)."""
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    symbols = {d.dim_param for i in inputs for d in i.type.tensor_type.shape.dim if d.dim_param}
    unknown = [k for k in shapes if k not in {i.name for i in inputs} and k not in symbols]
    if unknown:
        raise UsageError(f"--input-shape names {', '.join(map(repr, unknown))}, which is neither a graph input nor "
                         f"a symbolic dim", where="--input-shape",
                         fix=f"inputs are {', '.join(i.name for i in inputs)}"
                             + (f"; symbolic dims are {', '.join(sorted(symbols))}" if symbols else ""))
    out, unbound = {}, []
    for i in inputs:
        tt = i.type.tensor_type
        if not i.type.HasField("tensor_type"):
            raise ModelError("only tensor inputs are supported", where=f"graph input {i.name!r}")
        dtype = loader.to_dtype(tt.elem_type, f"graph input {i.name!r}", "graph inputs", narrow=True)
        if i.name in shapes:
            given = shapes[i.name]
            dims = (given,) if isinstance(given, int) else tuple(given)
            declared = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if tt.HasField("shape") and (len(dims) != len(declared) or any(
                    d is not None and d != g_ for d, g_ in zip(declared, dims))):
                raise UsageError(f"shape {dims} given for input {i.name!r} does not match its declared shape "
                                 f"{tuple(d if d is not None else '?' for d in declared)}", where="--input-shape")
            out[i.name] = TensorType(dtype, dims)
            continue
        dims = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif d.dim_param and d.dim_param in shapes:
                dims.append(int(shapes[d.dim_param]))
            else:
                unbound.append(f"{i.name}[{k}]" + (f" ({d.dim_param})" if d.dim_param else ""))
        if not tt.HasField("shape"):
            unbound.append(f"{i.name} (no shape at all)")
        out[i.name] = TensorType(dtype, tuple(dims)) if len(dims) == len(tt.shape.dim) else None
    if unbound:
        example = next((f"{i.name}=" + ",".join(str(d.dim_value or 1) for d in i.type.tensor_type.shape.dim)
                        for i in inputs if out.get(i.name) is None), "")
        raise UsageError(f"dynamic dims are not bound: {', '.join(unbound)}", where="--input-shape",
                         fix=f"bind them, e.g. --input-shape {example} (or SYMBOL=SIZE for a named dim)")
    return out


def fill(ctx: Context, shape: Sequence[int], value: np.ndarray) -> Operand:
    """ConstantOfShape: a folded array when small, a lazily materialized weight when large."""
    shape = tuple(int(d) for d in shape)
    ty = TensorType(dtype_of(value.dtype), shape)
    if ty.numel <= FOLD_LIMIT:
        return np.full(shape, value.reshape(-1)[0], dtype=value.dtype)
    return ctx.builder.param(ctx.node.output[0] or "fill", FillTensor(value.reshape(-1)[0].item(), ty))

