"""Reading an ONNX model safely: parse, validate structure, map dtypes, and bind initializers lazily.

Nothing here loads external weight data: external tensors become memory-mapped ``ExternalTensor`` views after their
location, size and bounds are checked (FAILURES.md 1-3, 6-13).
"""

from __future__ import annotations

import os
from math import prod
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from bmc.errors import ModelError, UsageError
from bmc.ir.tensor import ArrayTensor, ExternalTensor, Tensor
from bmc.ir.types import MAX_ELEMENTS, TensorType, np_dtype

MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()
MAX_IR_VERSION = onnx.IR_VERSION
MAX_PROTO_BYTES = 2**31 - 1

_ONNX_DTYPES = {
    TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
    TensorProto.INT16: "int16", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.UINT16: "uint16",
    TensorProto.UINT32: "uint32", TensorProto.UINT64: "uint64", TensorProto.BOOL: "bool",
}
# Narrow types, which the IR carries in 8-bit tensors: integers as their values (int4/uint4/int2/uint2 in
# int8/uint8), floats as their bit codes in uint8 (``bmc.ops.minifloat``: float4 one code a byte). ONNX stores the
# 4- and 2-bit ones several a byte, the first in the lowest bits (``PACKED_BITS``).
NARROW: dict[int, str] = {
    TensorProto.INT4: "int4", TensorProto.UINT4: "uint4", TensorProto.INT2: "int2", TensorProto.UINT2: "uint2",
    TensorProto.FLOAT8E4M3FN: "float8e4m3fn", TensorProto.FLOAT8E4M3FNUZ: "float8e4m3fnuz",
    TensorProto.FLOAT8E5M2: "float8e5m2", TensorProto.FLOAT8E5M2FNUZ: "float8e5m2fnuz",
    TensorProto.FLOAT8E8M0: "float8e8m0", TensorProto.FLOAT4E2M1: "float4e2m1",
}
CARRIER = {name: "int8" if name in ("int4", "int2") else "uint8" for name in NARROW.values()}
PACKED_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4, TensorProto.INT2: 2,
               TensorProto.UINT2: 2}
INT_RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3)}


def coded(narrow: str | None) -> bool:
    """Whether a narrow type is carried as bit codes (a float format), not as its values."""
    return narrow in CARRIER and narrow not in INT_RANGES


_EXTERNAL_KEYS = {"location", "offset", "length", "checksum", "basepath"}


def onnx_dtype_name(code: int) -> str:
    try:
        return TensorProto.DataType.Name(code).lower()
    except ValueError:
        return f"dtype#{code}"


def onnx_elem_type(dtype: str) -> int:
    """The ONNX element type of a bmc dtype."""
    return next(code for code, name in _ONNX_DTYPES.items() if name == dtype)


def to_dtype(code: int, where: str, what: str, narrow: bool = False) -> str:
    """bmc dtype of an ONNX element type, or a ModelError naming the unsupported dtype (FAILURES.md 15). With
    ``narrow``, a narrow type (``NARROW``) maps to the 8-bit dtype that carries it."""
    if code in _ONNX_DTYPES:
        return _ONNX_DTYPES[code]
    if narrow and code in NARROW:
        return CARRIER[NARROW[code]]
    raise ModelError(f"dtype {onnx_dtype_name(code)} is not supported for {what}", where=where,
                     fix=f"bmc supports {', '.join(sorted(set(_ONNX_DTYPES.values())))}"
                         + (f" and {', '.join(NARROW.values())}" if narrow else "") + "; cast the model first")


def load_model(model: str | os.PathLike | bytes | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    """Parse a model without its external data; returns the proto and the folder external data is relative to."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    if isinstance(model, (bytes, bytearray)):
        if len(model) > MAX_PROTO_BYTES:
            raise UsageError("models over 2 GiB cannot be passed as bytes", fix="pass the model's path instead")
        return _parse(bytes(model), "<bytes>"), None
    path = Path(model)
    if not path.is_file():
        raise UsageError(f"model file {str(path)!r} does not exist" if not path.exists() else
                         f"{str(path)!r} is not a file", where="model", fix="pass the path of an .onnx file")
    with open(path, "rb") as f:
        data = f.read()
    return _parse(data, str(path)), path.resolve().parent


def _parse(data: bytes, name: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # noqa: BLE001  (protobuf raises DecodeError and friends)
        raise ModelError(f"not a valid ONNX model ({type(e).__name__}: {e})", where=name,
                         fix="check that the file is a complete .onnx protobuf (not truncated, not another format)")
    if not data or proto.ir_version == 0 or not proto.HasField("graph"):
        raise ModelError("not a valid ONNX model (no IR version or no graph)", where=name,
                         fix="check that the file is a complete .onnx protobuf (not truncated, not another format)")
    return proto


def check_versions(proto: onnx.ModelProto) -> int:
    """The default-domain opset; refuses versions bmc does not know (FAILURES.md 3)."""
    if proto.ir_version > MAX_IR_VERSION:
        raise ModelError(f"ONNX IR version {proto.ir_version} is newer than supported ({MAX_IR_VERSION})",
                         where="model", fix="re-export with an older IR version or upgrade bmc's onnx")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ModelError("the model imports no default-domain (ai.onnx) opset", where="model")
    if opset > MAX_OPSET:
        raise ModelError(f"opset {opset} is newer than supported (bmc supports opsets {MIN_OPSET}..{MAX_OPSET})",
                         where="model", fix=f"re-export with opset <= {MAX_OPSET}")
    if opset < MIN_OPSET:
        changed = _changed_since(proto.graph, opset)
        if changed is not None:
            raise ModelError(f"opset {opset} is older than supported (bmc supports opsets {MIN_OPSET}..{MAX_OPSET}); "
                             f"{changed} was redefined since", where="model",
                             fix="convert it with onnx.version_converter.convert_version(model, 13)")
        return MIN_OPSET  # every op it uses means the same at MIN_OPSET
    return opset


def _changed_since(graph: onnx.GraphProto, opset: int) -> str | None:
    """The first default-domain op of ``graph`` whose definition at ``opset`` is not its definition at MIN_OPSET
    (or one with a subgraph, not looked into), or None: an old model of unchanged ops reads as MIN_OPSET."""
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return node.op_type
        try:
            old = onnx.defs.get_schema(node.op_type, opset).since_version
            new = onnx.defs.get_schema(node.op_type, MIN_OPSET).since_version
        except onnx.defs.SchemaError:
            return node.op_type
        if old != new:
            return node.op_type
    return None


def outer_inputs(graph: onnx.GraphProto) -> set[str]:
    """The names a (sub)graph's nodes and outputs read from enclosing scopes: not its inputs, initializers or node
    outputs (nested subgraphs included)."""
    local = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    local |= {o for n in graph.node for o in n.output}
    used = {o.name for o in graph.output}
    for node in graph.node:
        used |= set(node.input) | node_outer_inputs(node)
    return used - local


def node_outer_inputs(node: onnx.NodeProto) -> set[str]:
    """What ``node``'s subgraphs (If's branches, Scan's and Loop's bodies) read from outside them."""
    return {name for a in node.attribute if a.type == onnx.AttributeProto.GRAPH for name in outer_inputs(a.g)} | {
        name for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs
        for name in outer_inputs(g)}


def check_graph(graph: onnx.GraphProto, outer: set[str] = frozenset()) -> list[onnx.NodeProto]:
    """Validate names and dataflow; return the nodes in a topological order (FAILURES.md 2). ``outer``: names an
    enclosing scope defines (a subgraph's)."""
    defined = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""} | set(outer)
    producers: dict[str, int] = {}
    for idx, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producers or out in defined - {""}:
                raise ModelError(f"tensor {out!r} is produced more than once", where=node_label(node, idx),
                                 fix="every tensor name must have exactly one producer")
            producers[out] = idx
    reads = [list(node.input) + sorted(node_outer_inputs(node)) for node in graph.node]
    for idx, node in enumerate(graph.node):
        for name in reads[idx]:
            if name not in defined and name not in producers:
                raise ModelError(f"input {name!r} is not a graph input, initializer or node output",
                                 where=node_label(node, idx), fix="the graph has a dangling edge; re-export it")
    order, state = [], [0] * len(graph.node)  # 0 new, 1 on stack, 2 done
    for root in range(len(graph.node)):
        if state[root]:
            continue
        stack = [(root, iter(reads[root]))]
        state[root] = 1
        while stack:
            idx, it = stack[-1]
            nxt = next((producers[n] for n in it if n in producers), None)
            if nxt is None:
                state[idx] = 2
                order.append(graph.node[idx])
                stack.pop()
            elif state[nxt] == 1:
                path = [graph.node[i] for i, _ in stack]
                start = next(k for k, (i, _) in enumerate(stack) if i == nxt)
                loop = [graph.node[nxt]] + path[start:][::-1]  # in dataflow order: producer -> consumer
                cycle = " -> ".join(node_label(n, -1) for n in loop)
                raise ModelError(f"the graph has a cycle: {cycle}", where="graph", fix="ONNX graphs must be acyclic")
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(reads[nxt])))
    outputs = [o.name for o in graph.output]
    dup = sorted({o for o in outputs if outputs.count(o) > 1})
    if dup:
        raise ModelError(f"graph output(s) {', '.join(dup)} are listed more than once", where="graph outputs")
    for o in outputs:
        if o not in defined and o not in producers:
            raise ModelError(f"graph output {o!r} is never produced", where="graph outputs")
    return order


def node_label(node: onnx.NodeProto, idx: int) -> str:
    name = node.name or (f"#{idx}" if idx >= 0 else node.output[0] if node.output else "?")
    return f"ONNX node {name!r} ({node.op_type})"


def tensor_type(proto: TensorProto, where: str) -> TensorType:
    """The stored type: a narrow tensor is uint8 (its codes or values); a packed one of dims ``[..., n]`` is stored
    as bytes ``[..., n / per_byte]`` when ``n`` divides (each row packs on its own), else as a flat run of bytes."""
    code = proto.data_type
    dtype = "uint8" if code in NARROW else to_dtype(code, where, f"tensor {proto.name!r}")
    dims = tuple(int(d) for d in proto.dims)
    if any(d < 0 for d in dims):
        raise ModelError(f"tensor {proto.name!r} has negative dims {dims}", where=where)
    if prod(dims) > MAX_ELEMENTS:
        raise ModelError(f"tensor {proto.name!r} has {prod(dims)} elements (dims {dims}), over the limit of "
                         f"{MAX_ELEMENTS}", where=where, fix="the model is corrupted or absurdly large")
    if code in PACKED_BITS:
        per = 8 // PACKED_BITS[code]
        dims = dims[:-1] + (dims[-1] // per,) if dims and dims[-1] % per == 0 else (-(-prod(dims) // per),)
    return TensorType(dtype, dims)


def unpack_narrow(stored: np.ndarray, code: int, dims: tuple[int, ...]) -> np.ndarray:
    """The values (integers) or codes (floats) of a narrow tensor stored as ``tensor_type`` says, in its carrier."""
    stored = np.ascontiguousarray(stored, np.uint8).reshape(-1)
    bits = PACKED_BITS.get(code, 8)
    per = 8 // bits
    parts = np.stack([(stored >> (bits * k)) & ((1 << bits) - 1) for k in range(per)], axis=-1).reshape(-1)
    values = parts[:prod(dims)].reshape(dims)
    name = NARROW[code]
    if name in ("int4", "int2"):  # two's complement in ``bits`` bits
        return np.where(values >= 1 << (bits - 1), values.astype(np.int16) - (1 << bits), values).astype(np.int8)
    return values.astype(np.uint8)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-bit codes (uint8, the low bits of each) several a byte, as ONNX stores them."""
    per = 8 // bits
    padded = np.zeros(-(-codes.size // per) * per, np.uint8)
    padded[:codes.size] = codes.reshape(-1) & ((1 << bits) - 1)
    lanes = padded.reshape(-1, per)
    return np.bitwise_or.reduce(lanes << (bits * np.arange(per, dtype=np.uint8)), axis=1).astype(np.uint8)


def initializer_tensor(proto: TensorProto, base_dir: Path | None) -> Tensor:
    """A lazy view of an initializer; validates sizes and external-data locations first (FAILURES.md 6-12)."""
    where = f"initializer {proto.name!r}"
    ty = tensor_type(proto, where)
    if proto.data_location == TensorProto.EXTERNAL:
        return _external(proto, ty, base_dir, where)
    if proto.HasField("raw_data"):
        if len(proto.raw_data) != ty.nbytes:
            raise ModelError(f"raw data has {len(proto.raw_data)} bytes but dims {ty.shape} of {ty.dtype} need "
                             f"{ty.nbytes}", where=where, fix="the model file is corrupted; re-export it")
        arr = np.frombuffer(proto.raw_data, dtype=np_dtype(ty.dtype)).reshape(ty.shape)
        return ArrayTensor(arr)
    try:
        arr = onnx.numpy_helper.to_array(proto)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot decode tensor data: {e}", where=where) from e
    if proto.data_type in NARROW:  # onnx decodes to ml_dtypes' types: their codes, packed again as stored
        codes = arr.view(np.uint8) if coded(NARROW[proto.data_type]) else arr.astype(np.int8).view(np.uint8)
        arr = _pack(codes, PACKED_BITS[proto.data_type]) if proto.data_type in PACKED_BITS else codes
    if arr.size != ty.numel:
        raise ModelError(f"tensor has {arr.size} elements but dims {ty.shape} need {ty.numel}", where=where)
    return ArrayTensor(arr.astype(np_dtype(ty.dtype), copy=False).reshape(ty.shape))


def _external(proto: TensorProto, ty: TensorType, base_dir: Path | None, where: str) -> Tensor:
    info = {e.key: e.value for e in proto.external_data}
    unknown = sorted(set(info) - _EXTERNAL_KEYS)
    if unknown:
        raise ModelError(f"external data has unknown key(s) {', '.join(unknown)}", where=where,
                         fix=f"allowed keys are {', '.join(sorted(_EXTERNAL_KEYS))}")
    location = info.get("location", "")
    if base_dir is None:
        raise UsageError(f"tensor uses external data ({location!r}) but the model was not given as a path",
                         where=where, fix="pass the model's file path so its external data can be found")
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts:
        raise ModelError(f"external data location {location!r} is absolute or leaves the model folder", where=where,
                         fix="external data must be a relative path inside the model's folder")
    path = base_dir / rel
    if not path.exists():
        raise ModelError(f"external data file {location!r} is missing (looked in {base_dir})", where=where,
                         fix="put the .data file next to the .onnx file")
    real = path.resolve()
    if base_dir.resolve() not in real.parents:
        raise ModelError(f"external data location {location!r} leaves the model folder (symlink to {real})",
                         where=where, fix="external data must live inside the model's folder")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else ty.nbytes
    except ValueError:
        raise ModelError("external data offset/length are not integers", where=where) from None
    size = real.stat().st_size
    if offset < 0 or length != ty.nbytes or offset + length > size:
        raise ModelError(f"external data range offset {offset} + length {length} does not fit: file {location!r} "
                         f"has {size} bytes and dims {ty.shape} of {ty.dtype} need {ty.nbytes}", where=where,
                         fix="the external data file is truncated or does not belong to this model")
    return ExternalTensor(real, offset, ty)


def check_external_overlaps(tensors: dict[str, Tensor]) -> None:
    """Two initializers may not claim overlapping bytes of one file (FAILURES.md 9)."""
    by_file: dict[Path, list[tuple[int, int, str]]] = {}
    for name, t in tensors.items():
        if isinstance(t, ExternalTensor) and t.type.nbytes:
            by_file.setdefault(t.path, []).append((t.offset, t.offset + t.type.nbytes, name))
    for path, ranges in by_file.items():
        ranges.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(ranges, ranges[1:]):
            if b0 < a1:
                raise ModelError(f"initializers {an!r} and {bn!r} overlap in {path.name} (bytes {b0}..{a1})",
                                 where=f"initializer {bn!r}", fix="the external data layout is corrupted")
