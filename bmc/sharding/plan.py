"""A sharding plan: a spec for every value and a strategy (factor → mesh axes) for every node of a global graph.

Plans are values: built by propagation (or the search), read by the partitioner and the cost model, written to
``plan.json``. Nodes are keyed by their position in the graph's node list (stable for a given graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bmc.sharding.mesh import Mesh
from bmc.sharding.rules import Assignment
from bmc.sharding.spec import Spec


@dataclass
class Plan:
    mesh: Mesh
    specs: dict[str, Spec]  # every global value name → the spec it is produced (inputs: fed) in
    strategies: dict[int, Assignment]  # node index → factor assignment
    origins: dict[str, str] = field(default_factory=dict)  # value name → where its spec came from
    output_specs: dict[str, Spec] = field(default_factory=dict)  # graph outputs' final layout (default replicated)
    input_specs: dict[str, Spec] = field(default_factory=dict)  # graph inputs fed as blocks (default: fed whole)
    forced: dict[str, Spec] = field(default_factory=dict)  # annotated values their producer cannot make directly
