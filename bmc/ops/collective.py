"""Collectives over groups of mesh devices. They appear only in partitioned (local) programs.

``group_size`` is the number of devices in the group (the product of the sizes of ``axes``), so shape inference
stays local. ``reference`` runs one device's view with a group of one (identity); ``group_reference`` takes the
inputs of every device in a group, in group order, and returns each device's output: that is what the mesh
simulator uses.
"""

from __future__ import annotations

import numpy as np

from bmc.ops.registry import contiguous, Attr, Cost, OpDef, OpError, normalize_axis, register


def _group(attrs):
    n = attrs["group_size"]
    if n < 1:
        raise OpError(f"collective group_size must be >= 1, got {n}")
    return n


def _all_reduce_infer(ins, attrs):
    _group(attrs)
    if attrs["reduce"] not in ("sum", "max", "min", "mean"):
        raise OpError(f"all_reduce reduce={attrs['reduce']!r} is not one of sum, max, min, mean")
    return [ins[0]]


def _all_gather_infer(ins, attrs):
    (t,) = ins
    dim = normalize_axis(attrs["dim"], t.rank)
    return [t.with_shape(t.shape[:dim] + (t.shape[dim] * _group(attrs),) + t.shape[dim + 1:])]


def _reduce_scatter_infer(ins, attrs):
    (t,) = ins
    n, dim = _group(attrs), normalize_axis(attrs["dim"], t.rank)
    if t.shape[dim] % n:
        raise OpError(f"reduce_scatter dim {dim} of {t.shape} is not divisible by the group size {n}")
    return [t.with_shape(t.shape[:dim] + (t.shape[dim] // n,) + t.shape[dim + 1:])]


def _all_to_all_infer(ins, attrs):
    (t,) = ins
    n = _group(attrs)
    split, concat = normalize_axis(attrs["split_dim"], t.rank), normalize_axis(attrs["concat_dim"], t.rank)
    if t.shape[split] % n:
        raise OpError(f"all_to_all split dim {split} of {t.shape} is not divisible by the group size {n}")
    shape = list(t.shape)
    shape[split] //= n
    shape[concat] *= n
    return [t.with_shape(shape)]


_REDUCERS = {"sum": np.sum, "max": np.max, "min": np.min, "mean": np.mean}


def all_reduce_group(xs, attrs):
    out = _REDUCERS[attrs["reduce"]](np.stack(xs), axis=0).astype(xs[0].dtype)
    return [out.copy() for _ in xs]


def all_gather_group(xs, attrs):
    out = np.concatenate(xs, axis=attrs["dim"])
    return [out.copy() for _ in xs]


def reduce_scatter_group(xs, attrs):
    total = np.sum(np.stack(xs), axis=0).astype(xs[0].dtype)
    return [contiguous(p) for p in np.split(total, len(xs), axis=attrs["dim"])]


def all_to_all_group(xs, attrs):
    n = len(xs)
    pieces = [np.split(x, n, axis=attrs["split_dim"]) for x in xs]  # pieces[src][dst]
    return [np.concatenate([pieces[src][dst] for src in range(n)], axis=attrs["concat_dim"]) for dst in range(n)]


def _single(group_fn):
    def ref(ins, attrs):
        return [group_fn([ins[0]], dict(attrs, group_size=1))[0]]

    return ref


def _comm_cost(factor):
    def cost(ins, outs, attrs):
        n = attrs["group_size"]
        return Cost(0, int(factor(n) * max(ins[0].nbytes, outs[0].nbytes)))

    return cost


_BASE = {"axes": Attr("ints"), "group_size": Attr("int")}
_DEFS = [
    ("all_reduce", dict(_BASE, reduce=Attr("str", "sum")), _all_reduce_infer, all_reduce_group,
     lambda n: 2 * (n - 1) / n),
    ("all_gather", dict(_BASE, dim=Attr("int")), _all_gather_infer, all_gather_group, lambda n: (n - 1) / n),
    ("reduce_scatter", dict(_BASE, dim=Attr("int")), _reduce_scatter_infer, reduce_scatter_group,
     lambda n: (n - 1) / n),
    ("all_to_all", dict(_BASE, split_dim=Attr("int"), concat_dim=Attr("int")), _all_to_all_infer, all_to_all_group,
     lambda n: (n - 1) / n / n),
]
GROUP_REFERENCE = {}
for _name, _attrs, _infer, _group_fn, _factor in _DEFS:
    register(OpDef(_name, "collective", (1, 1), _attrs, _infer, _single(_group_fn), _comm_cost(_factor),
                   collective=True))
    GROUP_REFERENCE[_name] = _group_fn
