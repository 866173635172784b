"""Relax lowerings of bmc ops, one file per op family (mirroring ``bmc/ops``).

A lowering is ``fn(ctx, node, args) -> relax.Expr | list[relax.Expr]`` where ``args`` are the Relax expressions of
the node's inputs; ``ctx.bb`` is the block builder (use ``ctx.emit`` for intermediate expressions).
"""

from __future__ import annotations

from typing import Callable

LOWERINGS: dict[str, Callable] = {}


def lowering(*ops: str):
    def deco(fn):
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"lowering for {op} registered twice")
            LOWERINGS[op] = fn
        return fn

    return deco


def const(array):
    """A Relax constant with exactly the array's dtype (``relax.const`` alone turns int64 into int32)."""
    import numpy as np
    from tvm import relax

    array = np.asarray(array, order="C")  # not ascontiguousarray: that turns 0-d into 1-d
    return relax.const(array, dtype=array.dtype.name)


def load_all() -> dict[str, Callable]:
    from bmc.codegen.lower import collective, elementwise, linalg, nn, reduce, shape  # noqa: F401

    return LOWERINGS
