"""bmc IR: typed static-shape SSA graphs, their text form, verifier and pass infrastructure."""

from bmc.ir.graph import Graph, Module, NameAllocator, Node, Value
from bmc.ir.passes import Pass, graph_pass, run_passes
from bmc.ir.tensor import ArrayTensor, ExternalTensor, FillTensor, Tensor
from bmc.ir.text import parse_graph, print_graph
from bmc.ir.types import DTYPES, TensorType, np_dtype
from bmc.ir.verify import verify

__all__ = ["Graph", "Module", "NameAllocator", "Node", "Value", "Pass", "graph_pass", "run_passes", "ArrayTensor",
           "ExternalTensor", "FillTensor", "Tensor", "parse_graph", "print_graph", "DTYPES", "TensorType",
           "np_dtype", "verify"]
