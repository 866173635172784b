"""Every op in the table has every facet, a Relax lowering in the mirrored family file, and a sample case."""

import inspect

import numpy as np
import pytest

from bmc.ops import FAMILIES, OPS
from bmc.ops.registry import Attr, Cost
from tests.ops.cases import CASES


def test_every_op_has_every_facet():
    problems = []
    for name, op in OPS.items():
        if op.family not in FAMILIES:
            problems.append(f"{name}: unknown family {op.family}")
        for facet in ("infer", "reference", "cost"):
            if not callable(getattr(op, facet)):
                problems.append(f"{name}: missing {facet}")
        if not all(isinstance(a, Attr) for a in op.attrs.values()):
            problems.append(f"{name}: attribute schema is not made of Attr")
        if not hasattr(op, "factors"):
            problems.append(f"{name}: no sharding factor slot")
        if not inspect.getmodule(op.infer).__name__.endswith(f"ops.{op.family}"):
            problems.append(f"{name}: declared outside bmc/ops/{op.family}.py")
    assert not problems, "\n".join(problems)


def test_every_op_has_a_lowering_in_the_mirrored_file():
    from bmc.codegen.lower import load_all

    lowerings = load_all()
    problems = [f"{name}: no lowering" for name in OPS if name not in lowerings]
    problems += [f"{name}: lowering lives in {lowerings[name].__module__}, expected codegen.lower.{op.family}"
                 for name, op in OPS.items() if name in lowerings
                 and lowerings[name].__module__ != f"bmc.codegen.lower.{op.family}"]
    problems += [f"{name}: lowering for an op that does not exist" for name in lowerings if name not in OPS]
    assert not problems, "\n".join(problems)


def test_every_op_has_a_sample_case():
    covered = {op for op, _, _ in CASES}
    assert sorted(set(OPS) - covered) == []


@pytest.mark.parametrize("op,inputs,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_infer_reference_and_cost_agree(op, inputs, attrs):
    from bmc.ir.types import TensorType, dtype_of

    opdef = OPS[op]
    full = opdef.check_attrs(attrs)
    types = opdef.infer([TensorType(dtype_of(x.dtype), x.shape) for x in inputs], full)
    outs = opdef.reference(inputs, full)
    assert [(o.shape, dtype_of(o.dtype)) for o in outs] == [(t.shape, t.dtype) for t in types]
    cost = opdef.cost([TensorType(dtype_of(x.dtype), x.shape) for x in inputs], types, full)
    assert isinstance(cost, Cost) and cost.flops >= 0
    # collectives move nothing in a group of one; every other op at least writes its outputs
    assert cost.bytes >= (0 if opdef.collective else sum(t.nbytes for t in types))
    if op != "decode_float" and all(np.isfinite(x).all() for x in inputs if x.dtype.kind == "f"):  # NaN codes
        assert all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f")
