"""ONNX functions: ops that bmc has no converter for, but that ONNX defines by a body of other ops.

Two sources, both inlined node by node into the importer's walk (the body's ops then go through their converters,
or are expanded again):

- **schema functions** of the default domain at the model's opset: a fixed body (``AffineGrid``, the window ops) or
  one built for the node's attributes and input types (*context-dependent*: ``Attention`` and ``RotaryEmbedding``
  of opset 23, which PyTorch's exporter emits for ``scaled_dot_product_attention`` and rotary embeddings, and
  ``LinearAttention``, ``CenterCropPad`` ...);
- **model-local functions** (``ModelProto.functions``), which exporters use for modules kept as functions.

The body's tensors get the prefix ``<node name>/`` (unique per expansion), ``ref_attr_name`` attributes take the
node's attribute or the schema's default, and missing optional inputs and outputs stay empty, as in ONNX's own
``function_expand_helper`` (``onnx.backend.test.case.node``) that the ``_expanded`` conformance cases come from.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import AttributeProto, FunctionProto, GraphProto, NodeProto, TypeProto

from bmc.frontend.onnx.loader import onnx_elem_type
from bmc.ir.types import TensorType

DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_DEPTH = 16  # nested expansions (a body using another function op); deeper is a recursive definition


@dataclass(frozen=True)
class Expansion:
    nodes: list[NodeProto]
    opset: int  # the default-domain opset the body is written for


class Functions:
    """The functions a model can call: its local ones, and the schema functions of its opset."""

    def __init__(self, proto: onnx.ModelProto, opset: int):
        self.opset = opset
        self.local = {(f.domain, f.name): f for f in proto.functions}
        self._count = 0

    def has(self, node: NodeProto) -> bool:
        """Whether ``node`` can be expanded (without building a context-dependent body yet)."""
        if (node.domain, node.op_type) in self.local:
            return True
        schema = self._schema(node)
        return schema is not None and any(_versions(schema, self.opset))

    def expand(self, node: NodeProto, input_types: list[TensorType | None]) -> Expansion:
        """The body of ``node`` with its edges renamed into the calling graph. ``input_types`` are the types of
        the node's inputs (None where absent), which context-dependent bodies are built for."""
        local = self.local.get((node.domain, node.op_type))
        if local is not None:
            body, attrs = local, {a.name: a for a in node.attribute}
            for a in local.attribute_proto:  # attributes declared with a default
                attrs.setdefault(a.name, a)
            opset = next((o.version for o in local.opset_import if o.domain in DEFAULT_DOMAINS), self.opset)
        else:
            schema = self._schema(node)
            plain, dependent = _versions(schema, self.opset)
            attrs = {a.name: a for a in node.attribute}
            for name, a in schema.attributes.items():
                if name not in attrs and a.default_value is not None and a.default_value.type != 0:
                    attrs[name] = a.default_value
            body = FunctionProto()
            if dependent and (not plain or dependent[-1] >= plain[-1]):
                full = NodeProto()
                full.CopyFrom(node)
                full.ClearField("attribute")
                full.attribute.extend(attrs.values())
                types = [_type_proto(t).SerializeToString() for t in input_types]
                body.ParseFromString(schema.get_context_dependent_function_with_opset_version(
                    dependent[-1], full.SerializeToString(), types))
            else:
                body.ParseFromString(schema.get_function_with_opset_version(plain[-1]))
            opset = next((o.version for o in body.opset_import if o.domain in DEFAULT_DOMAINS), self.opset)
        self._count += 1
        prefix = f"{node.name or node.op_type}/{self._count}/"
        names = {formal: (node.input[i] if i < len(node.input) else "") for i, formal in enumerate(body.input)}
        names.update({formal: node.output[i] for i, formal in enumerate(body.output)
                      if i < len(node.output) and node.output[i]})
        return Expansion([_renamed(n, names, attrs, prefix) for n in body.node], opset)

    def _schema(self, node: NodeProto):
        if node.domain not in DEFAULT_DOMAINS:
            return None
        try:
            return onnx.defs.get_schema(node.op_type, self.opset, "")
        except onnx.defs.SchemaError:
            return None


def _versions(schema, opset: int) -> tuple[list[int], list[int]]:
    """The opset versions (<= the model's) of the schema's plain and context-dependent function bodies."""
    plain = sorted(v for v in schema.function_opset_versions if v <= opset) if schema.has_function else []
    dependent = (sorted(v for v in schema.context_dependent_function_opset_versions if v <= opset)
                 if schema.has_context_dependent_function else [])
    return plain, dependent


def _type_proto(t: TensorType | None) -> TypeProto:
    if t is None:
        return TypeProto()
    return onnx.helper.make_tensor_type_proto(onnx_elem_type(t.dtype), list(t.shape))


def _renamed(node: NodeProto, names: dict[str, str], attrs: dict[str, AttributeProto], prefix: str) -> NodeProto:
    out = NodeProto()
    out.CopyFrom(node)
    out.name = prefix + (node.name or node.op_type)

    def rename(name: str) -> str:
        return names.get(name, prefix + name) if name else ""

    out.ClearField("input")
    out.input.extend(rename(n) for n in node.input)
    out.ClearField("output")
    out.output.extend(rename(n) for n in node.output)
    out.ClearField("attribute")
    for a in node.attribute:
        if a.HasField("ref_attr_name"):
            if a.ref_attr_name in attrs:  # else: the node gives none and there is no default; leave it out
                ref = AttributeProto()
                ref.CopyFrom(attrs[a.ref_attr_name])
                ref.name = a.name
                out.attribute.append(ref)
        elif a.type == AttributeProto.GRAPH:  # an If branch or a loop body: its reads of the body's tensors too
            sub = AttributeProto()
            sub.CopyFrom(a)
            sub.g.CopyFrom(_renamed_outer(a.g, rename))
            out.attribute.append(sub)
        else:
            out.attribute.append(a)
    return out


def _renamed_outer(graph: GraphProto, rename) -> GraphProto:
    """``graph`` with the names it reads from enclosing scopes renamed (its own names stay: they are its scope)."""
    out = GraphProto()
    out.CopyFrom(graph)
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    local |= {o for n in graph.node for o in n.output}

    def outer(name: str) -> str:
        return name if name in local else rename(name)

    for node in out.node:
        inputs = [outer(n) for n in node.input]
        node.ClearField("input")
        node.input.extend(inputs)
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                a.g.CopyFrom(_renamed_outer(a.g, outer))
    for o in out.output:
        o.name = outer(o.name)
    return out
