"""ONNX frontend: ``import_model(path_or_proto, input_shapes)`` → bmc IR ``Graph``."""

from __future__ import annotations

from typing import Mapping, Sequence

from bmc.frontend.onnx import (convert_control, convert_extra, convert_math, convert_nn,  # noqa: F401  (registers
                               convert_quant, convert_tensor)                                 # them)
from bmc.frontend.onnx.importer import CONVERTERS, import_graph
from bmc.frontend.onnx.loader import load_model
from bmc.ir.graph import Graph


def import_model(model, input_shapes: Mapping[str, Sequence[int] | int] | None = None) -> Graph:
    """Import an ONNX model (path, bytes or ModelProto). Weights stay lazy (external data is memory-mapped)."""
    proto, base_dir = load_model(model)
    return import_graph(proto, base_dir, input_shapes)


def supported_ops() -> list[str]:
    return sorted(CONVERTERS)


__all__ = ["import_model", "supported_ops"]
