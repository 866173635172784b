"""Run every rank of a multi-device artifact in one process: one thread per mesh device, each with its own TVM VM and
weight shards, collectives simulated in numpy through a rendezvous. ``bmc.load(path, simulate=True)`` uses it so
that anyone can check any artifact on one machine; the MPI runtime replaces only the collective implementations.
"""

from __future__ import annotations

import json
import threading

import numpy as np

from bmc.errors import ExecutionError
from bmc.ops.collective import GROUP_REFERENCE

COLLECTIVE_TIMEOUT_S = 120.0


class Rendezvous:
    """Collective calls of one simulated run: ranks of a group meet, the last to arrive computes for all."""

    def __init__(self, rank_map: list[list[int]]):
        self.coords = [tuple(c) for c in rank_map]
        self.local = threading.local()
        self.cv = threading.Condition()
        self.slots: dict[tuple, dict] = {}
        self.failed: str | None = None

    def start(self, rank: int) -> None:
        self.local.rank, self.local.seq = rank, 0

    def fail(self, reason: str) -> None:
        with self.cv:
            self.failed = self.failed or reason
            self.cv.notify_all()

    def __call__(self, kind: str, x: np.ndarray, attrs: dict) -> np.ndarray:
        rank, seq = self.local.rank, self.local.seq
        self.local.seq += 1
        axes, n = attrs["axes"], attrs["group_size"]
        coord = self.coords[rank]
        key = (seq, kind, tuple(c for k, c in enumerate(coord) if k not in axes))
        with self.cv:
            slot = self.slots.setdefault(key, {"in": {}, "out": None, "taken": 0})
            slot["in"][rank] = np.array(x, copy=True)
            if len(slot["in"]) == n:
                members = sorted(slot["in"], key=lambda r: tuple(self.coords[r][k] for k in axes))
                outs = GROUP_REFERENCE[kind]([slot["in"][r] for r in members], attrs)
                slot["out"] = dict(zip(members, outs))
                self.cv.notify_all()
            elif not self.cv.wait_for(lambda: slot["out"] is not None or self.failed, COLLECTIVE_TIMEOUT_S):
                self.failed = f"collective #{seq} ({kind}) timed out on rank {rank}"
                self.cv.notify_all()
            if slot["out"] is None:
                raise ExecutionError(f"rank {rank}: collective #{seq} ({kind}) abandoned: {self.failed}")
            out = slot["out"][rank]
            slot["taken"] += 1
            if slot["taken"] == n:
                del self.slots[key]
        return out


_ACTIVE: list[Rendezvous] = []


def register_simulated_collectives() -> None:
    """Route ``bmc.all_reduce`` & co. to the active rendezvous (register before any VM is built)."""
    import tvm_ffi

    from bmc.runtime.kernels import host_array

    for kind in GROUP_REFERENCE:
        def impl(x, attrs, out, kind=kind):
            if x.device.dlpack_device_type() == 1:  # kDLCPU: zero-copy views (bfloat16 through its pointer)
                host_array(out)[...] = _ACTIVE[-1](kind, host_array(x), json.loads(attrs))
            else:  # a GPU tensor: through the host
                out.copyfrom(_ACTIVE[-1](kind, x.numpy(), json.loads(attrs)))
        tvm_ffi.register_global_func(f"bmc.{kind}", impl, override=True)


def run_ranks(rank_map: list[list[int]], call_rank) -> list:
    """Run ``call_rank(rank)`` on one thread per rank with a fresh rendezvous; returns each rank's result."""
    rv = Rendezvous(rank_map)
    _ACTIVE.append(rv)
    results: list = [None] * len(rank_map)
    errors: list[tuple[int, BaseException]] = []

    def worker(rank):
        rv.start(rank)
        try:
            results[rank] = call_rank(rank)
        except BaseException as e:  # noqa: BLE001  (reported below with the rank)
            errors.append((rank, e))
            rv.fail(f"rank {rank} raised {type(e).__name__}")

    try:
        threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(len(rank_map))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        _ACTIVE.remove(rv)
    if errors:
        rank, err = min(errors, key=lambda e: e[0])
        raise ExecutionError(f"[rank {rank}] {err}") from err
    return results
