"""Text form of bmc IR: a printer and a parser that round-trip (golden tests compare this text).

    graph @main(%x: f32[2,3]) params(%w: f32[3,4]) {
      %y = matmul(%x, %w) : f32[2,4]  # "MatMul_0"
      %a, %b = split(%y) {axis = 1, sizes = [2, 2]} : f32[2,2], f32[2,2]
      return %a, %b
    }

Names that are not plain identifiers are written as JSON strings (``%"a b"``). The trailing ``# "..."`` is the
ONNX node the IR node came from. Parameters print without their data; the parser binds data from ``weights``
or, when absent, zero fills of the right type.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from bmc.errors import UsageError
from bmc.ir.graph import Graph, Node, Value
from bmc.ir.tensor import FillTensor, Tensor
from bmc.ir.types import SHORT_TO_DTYPE, TensorType, dtype_of, np_dtype

_PLAIN = re.compile(r"[A-Za-z0-9_.\-/]+\Z")


def _name(v: Value) -> str:
    return "%" + (v.name if _PLAIN.match(v.name) else json.dumps(v.name))


def _float(x: float) -> str:
    return repr(float(x)) if np.isfinite(x) else json.dumps(str(float(x)))


def format_attr(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return _float(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, np.ndarray):
        t = TensorType(dtype_of(value.dtype), value.shape)
        flat = value.reshape(-1)
        if t.dtype == "bool":
            items = ["true" if x else "false" for x in flat]
        elif value.dtype.kind in "iu":
            items = [str(int(x)) for x in flat]
        else:
            items = [_float(x) for x in flat.astype(np.float64)]
        return f"tensor<{t}>[{', '.join(items)}]"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_attr(x) for x in value) + "]"
    raise TypeError(f"cannot print attribute value {value!r}")


def print_graph(graph: Graph) -> str:
    ins = ", ".join(f"{_name(v)}: {v.type}" for v in graph.inputs)
    params = ", ".join(f"{_name(v)}: {v.type}" for v in graph.params)
    lines = [f"graph @{graph.name}({ins}) params({params}) {{"]
    for node in graph.nodes:
        outs = ", ".join(_name(v) for v in node.outputs)
        args = ", ".join(_name(v) for v in node.inputs)
        attrs = ", ".join(f"{k} = {format_attr(v)}" for k, v in node.attrs.items())
        types = ", ".join(str(v.type) for v in node.outputs)
        line = f"  {outs} = {node.op}({args})" + (f" {{{attrs}}}" if attrs else "") + f" : {types}"
        if node.source:
            line += f"  # {json.dumps(node.source)}"
        lines.append(line)
    lines.append("  return " + ", ".join(_name(v) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Parser

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<name>%(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_.\-/]+))
  | (?P<graph>@[A-Za-z0-9_.\-]+)
  | (?P<type>(?:f64|f32|f16|bf16|i64|i32|i16|i8|u8|bool)\[[0-9,]*\])
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?(?:[0-9]+\.[0-9]*(?:e[-+]?[0-9]+)?|[0-9]+e[-+]?[0-9]+|[0-9]+|inf|nan))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[()\[\]{}<>,:=])
""", re.VERBOSE)


class _Tokens:
    def __init__(self, text: str):
        self.items: list[tuple[str, str, int]] = []
        pos, line = 0, 1
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise UsageError(f"IR text line {line}: cannot read {text[pos:pos + 20]!r}")
            kind = m.lastgroup
            if kind == "comment":
                self.items.append(("comment", m.group(), line))
            elif kind != "ws":
                self.items.append((kind, m.group(), line))
            line += m.group().count("\n")
            pos = m.end()
        self.i = 0

    def _index(self, skip_comments=True):
        i = self.i
        while skip_comments and i < len(self.items) and self.items[i][0] == "comment":
            i += 1
        return i

    def peek(self, skip_comments=True):
        i = self._index(skip_comments)
        return self.items[i] if i < len(self.items) else ("eof", "", -1)

    def next(self, kind=None, text=None, skip_comments=True):
        tok = self.peek(skip_comments)
        if (kind and tok[0] != kind) or (text and tok[1] != text):
            raise UsageError(f"IR text line {tok[2]}: expected {text or kind}, found {tok[1]!r}")
        self.i = self._index(skip_comments) + 1
        return tok[1]

    def accept(self, text, skip_comments=True):
        if self.peek(skip_comments)[1] == text:
            self.next(text=text, skip_comments=skip_comments)
            return True
        return False


def _parse_type(s: str) -> TensorType:
    short, dims = s[:-1].split("[")
    return TensorType(SHORT_TO_DTYPE[short], tuple(int(d) for d in dims.split(",") if d))


def _value_name(tok: str) -> str:
    body = tok[1:]
    return json.loads(body) if body.startswith('"') else body


def _parse_scalar(tok_kind: str, tok: str):
    if tok_kind == "number":
        return float(tok) if any(c in tok for c in ".ein") else int(tok)
    if tok_kind == "string":
        s = json.loads(tok)
        return float(s) if s in ("inf", "-inf", "nan") else s
    if tok == "true":
        return True
    if tok == "false":
        return False
    if tok == "none":
        return None
    raise UsageError(f"IR text: bad attribute value {tok!r}")


def _parse_attr(t: _Tokens):
    kind, tok, _ = t.peek()
    if tok == "[":
        t.next()
        items = []
        while not t.accept("]"):
            items.append(_parse_attr(t))
            t.accept(",")
        return tuple(items)
    if tok == "tensor":
        t.next()
        t.next(text="<")
        ty = _parse_type(t.next("type"))
        t.next(text=">")
        flat = _parse_attr(t)
        return np.array(flat, dtype=np_dtype(ty.dtype)).reshape(ty.shape)
    t.next()
    return _parse_scalar(kind, tok)


def parse_graph(text: str, weights: dict[str, Tensor] | None = None) -> Graph:
    """Parse the printer's text back into a Graph (types are taken as written; verify separately)."""
    t = _Tokens(text)
    t.next(text="graph")
    graph = Graph(t.next("graph")[1:])
    env: dict[str, Value] = {}

    def decl_list(into):
        t.next(text="(")
        while not t.accept(")"):
            name = _value_name(t.next("name"))
            t.next(text=":")
            v = Value(name, _parse_type(t.next("type")))
            env[name] = v
            into.append(v)
            t.accept(",")

    decl_list(graph.inputs)
    t.next(text="params")
    decl_list(graph.params)
    for p in graph.params:
        graph.weights[p.name] = (weights or {}).get(p.name) or FillTensor(0, p.type)
    t.next(text="{")
    while t.peek()[1] != "return":
        outs = [_value_name(t.next("name"))]
        while t.accept(","):
            outs.append(_value_name(t.next("name")))
        t.next(text="=")
        op = t.next("ident")
        t.next(text="(")
        args = []
        while not t.accept(")"):
            tok = t.next("name")
            name = _value_name(tok)
            if name not in env:
                raise UsageError(f"IR text: %{name} is used before it is defined")
            args.append(env[name])
            t.accept(",")
        attrs = {}
        if t.accept("{"):
            while not t.accept("}"):
                key = t.next("ident")
                t.next(text="=")
                attrs[key] = _parse_attr(t)
                t.accept(",")
        t.next(text=":")
        types = [_parse_type(t.next("type"))]
        while t.accept(",", skip_comments=False):
            types.append(_parse_type(t.next("type")))
        source = ""
        kind, tok, _ = t.peek(skip_comments=False)
        if kind == "comment":
            t.i += 1
            source = json.loads(tok[1:].strip())
        if len(types) != len(outs):
            raise UsageError(f"IR text: {op} has {len(outs)} results but {len(types)} types")
        values = [Value(n, ty) for n, ty in zip(outs, types)]
        for v in values:
            env[v.name] = v
        graph.nodes.append(Node(op, args, values, attrs, source))
    t.next(text="return")
    graph.outputs.append(env[_value_name(t.next("name"))])
    while t.accept(","):
        graph.outputs.append(env[_value_name(t.next("name"))])
    t.next(text="}")
    return graph
