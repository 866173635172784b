"""The op table. Importing this package registers every op family."""

from bmc.ops import collective, elementwise, linalg, nn, reduce, shape  # noqa: F401  (registration)
from bmc.ops.registry import OPS, Attr, Cost, OpDef, OpError, get_op, infer_types

FAMILIES = ("elementwise", "linalg", "reduce", "shape", "nn", "collective")

__all__ = ["OPS", "Attr", "Cost", "OpDef", "OpError", "get_op", "infer_types", "FAMILIES"]
