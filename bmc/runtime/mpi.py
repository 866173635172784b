"""Running an artifact on real MPI ranks: pre-flight, communicators, collectives, watchdog and aborts.

Every rank of ``mpiexec -n N`` runs the same SPMD program; this module gives it

* **pre-flight** (FAILURES.md 39-41), on every rank and before any communication: the MPI world must have exactly
  the artifact's ``world_size`` ranks; a multi-rank artifact without a launcher gets the exact ``mpiexec -n N ...``
  command; a launcher whose environment says N ranks while MPI sees 1 (a launcher of another MPI than the one mpi4py
  loaded: every process is "rank 0 of 1") is detected and explained;
* **communicators**: rank r sits at mesh coordinate ``rank_map[r]``; for every non-empty set of mesh axes, one
  sub-communicator ``world.Split(color = coordinate on the other axes, key = block index on the axes)`` (created
  once, at load time, on every rank), so group member i holds block i — the order ``bmc.ops.collective`` and the
  simulator use;
* **collectives** ``bmc.all_reduce | all_gather | reduce_scatter | all_to_all`` with the program's call signature
  ``(x: Tensor, attrs: JSON str, out: Tensor)``, on the tensors' own memory (``np.from_dlpack``; buffer-based
  non-blocking MPI calls, no pickle). Two implementations behind that one signature: Python (mpi4py, below; the
  reference) and native C++ (``cpp/mpi_collectives.cc``, ``libbmc_mpi_collectives.so``; the default when built);
* **a watchdog**: every collective is non-blocking (``Iallreduce`` ...) and polled against a deadline,
  ``BMC_COLLECTIVE_TIMEOUT_S`` (default 300 s): a lost rank ends the job with a non-zero exit naming the collective
  and its sequence number instead of a hang (FAILURES.md 42);
* **aborts**: :meth:`MPIContext.abort` prints ``[rank k] ...`` and calls ``MPI_Abort`` so every rank exits promptly
  (FAILURES.md 43); errors that every rank can see (bad inputs, a damaged weights file) are *agreed* instead: every
  rank raises the same error and the job ends normally with the CLI's exit code;
* **collective order checks** (FAILURES.md 47, ``BMC_CHECK_COLLECTIVES=1``): before each collective the group
  all-gathers (world rank, sequence number, kind, dtype, shape, attrs) and aborts naming the ranks that disagree.

Environment: ``BMC_COLLECTIVE_TIMEOUT_S`` (seconds, default 300), ``BMC_CHECK_COLLECTIVES`` (0/1),
``BMC_COLLECTIVES=python|native|auto`` (default auto: native when built), ``BMC_FAULT_INJECT=ACTION:RANK:SEQ``
(tests only: ``raise``, ``kill`` (SIGKILL) or ``hang`` on world rank RANK at its collective number SEQ).

This module imports numpy, mpi4py (only once a launcher is detected or MPI is asked for), tvm-ffi and bmc's
runtime-side modules; never the frontend, sharding or codegen.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zlib
from itertools import combinations, permutations
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bmc.errors import BmcError, ExecutionError
from bmc.ir.types import np_dtype

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
_P2P_TAG = 17  # pipeline sends; MPI keeps messages of one (source, tag, communicator) in order
DEFAULT_TIMEOUT_S = 300.0
ABORT_DRAIN_S = 0.5
ROOT = Path(__file__).resolve().parents[2]
NATIVE_TARGET = "bmc_mpi_collectives"
NATIVE_LIB = f"lib{NATIVE_TARGET}.so"

# (env var for the rank, env var for the size, env var for ranks on this host, launcher name)
_LAUNCHER_VARS = (
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS", "MPICH hydra (PMI)"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "Open MPI"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_SIZE", "PMIx"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE", "MVAPICH2"),
)


def launcher_env() -> dict | None:
    """What the environment says about an MPI launcher: ``{"launcher", "rank", "size", "local_size"}`` or None.

    Read before mpi4py is imported, so that a plain ``python script.py`` never initialises MPI.
    """
    for rank_var, size_var, local_var, name in _LAUNCHER_VARS:
        if rank_var in os.environ or size_var in os.environ:
            def num(var):
                v = os.environ.get(var, "").strip()
                return int(v) if v.isdigit() else None
            return {"launcher": name, "rank": num(rank_var), "size": num(size_var), "local_size": num(local_var)}
    if "PMI_FD" in os.environ or "HYDRA_CONTROL_FD" in os.environ or "PMI_PORT" in os.environ:
        return {"launcher": "MPICH hydra (PMI)", "rank": None, "size": None, "local_size": None}
    return None


def mpiexec_path() -> str:
    """The ``mpiexec`` that matches the MPI library mpi4py loads here: the venv's (mpich wheel), else the PATH's."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def launch_command(n: int, argv: list[str] | None = None) -> str:
    """The exact command that launches this program on ``n`` ranks (``mpiexec -n N bmc run ...``)."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]).name if argv else ""
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "bmc":
        cmd = [sys.executable, "-m", "bmc", *argv[1:]]
    elif prog == "bmc":
        cmd = ["bmc", *argv[1:]]
    elif argv and argv[0] not in ("", "-c"):
        cmd = [sys.executable, *argv]
    else:
        cmd = [sys.executable, "YOUR_SCRIPT.py"]
    return f"mpiexec -n {n} " + shlex.join(cmd)


def _import_mpi():
    """``mpi4py.MPI`` (initialises MPI: single-threaded use from the VM's thread is all bmc needs)."""
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.thread_level = "serialized"
    from mpi4py import MPI

    return MPI


def _mpi_library() -> str:
    try:
        MPI = _import_mpi()
        return MPI.Get_library_version().strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return "unknown MPI library"


def preflight(manifest: dict, where: str, *, force: bool = False):
    """Check the launch against the artifact on every rank, before any communication; returns ``mpi4py.MPI`` or None.

    None: not launched by an MPI launcher and not forced, and the artifact is single-rank (run it in-process).
    Raises ``ExecutionError`` — the same message on every rank — for a wrong world size (39), a multi-rank artifact
    without a launcher (40) and a mismatched launcher (41).
    """
    world = int(manifest["world_size"])
    mesh = "x".join(map(str, manifest["mesh"]["shape"]))
    env = launcher_env()
    command = launch_command(world)
    if env is None and not force:
        if world == 1:
            return None
        raise ExecutionError(
            f"the artifact is for {world} ranks (mesh {mesh}) but this process was not started by an MPI launcher",
            where=where,
            fix=f"launch it with: {command}   (the mpiexec of this environment is {mpiexec_path()}); or, to check "
                "it on one machine, run every rank in this process: `bmc run --simulate` / bmc.load(path, "
                "simulate=True)")
    MPI = _import_mpi()
    size, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    if env is not None and env.get("size") and env["size"] != size:
        raise ExecutionError(
            f"mismatched MPI launcher: {env['launcher']} started {env['size']} processes (this one is rank "
            f"{env.get('rank')}), but the MPI library mpi4py uses ({_mpi_library()}) sees every process as rank "
            f"{rank} of {size}: the launcher belongs to another MPI installation", where=where,
            fix=f"use the mpiexec that matches mpi4py's MPI: {mpiexec_path()} -n {world} ... (e.g. {command}), "
                "or rebuild mpi4py against the system MPI (MPI4PY_BUILD_MPICC=mpicc pip install --no-binary mpi4py "
                "mpi4py). Open MPI refusing to run as root needs --allow-run-as-root; oversubscription "
                "(more ranks than cores) needs --oversubscribe with Open MPI, nothing with MPICH")
    if size != world:
        raise ExecutionError(
            f"the artifact is for {world} ranks (mesh {mesh}) but {size} MPI rank{'s were' if size != 1 else ' was'} "
            "launched", where=where, fix=f"launch it with: {command}")
    return MPI


# ------------------------------------------------------------------------------------------ byte agreement

class CollectiveError(ExecutionError):
    """A collective timed out, disagreed between ranks, or failed in MPI."""


def _poll(req, deadline: float, what) -> None:
    """Wait for ``req`` (an mpi4py Request) until ``deadline``; ``what()`` describes it for the timeout message."""
    spins = 0
    start = time.monotonic()
    while not req.Test():
        spins += 1
        if spins < 64:
            continue
        now = time.monotonic()
        if now > deadline:
            raise CollectiveError(f"{what()} did not complete within {now - start:.1f} s: a rank of the group died, "
                                  "is stuck, or issued another collective",
                                  fix="see the other ranks' messages; raise BMC_COLLECTIVE_TIMEOUT_S for long "
                                      "steps")
        if now - start > 0.05:
            time.sleep(0.0002)  # a long wait: leave the cores to the ranks that still compute
        else:
            os.sched_yield()


class MPIContext:
    """One rank's view of the job: world, mesh coordinate, group communicators, timeout, sequence numbers."""

    def __init__(self, MPI, manifest: dict, where: str, *, timeout_s: float | None = None,
                 check: bool | None = None, comm=None):
        self.MPI = MPI
        self.world = comm or MPI.COMM_WORLD  # a pipeline stage's ranks have a communicator of their own
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self.world_rank = MPI.COMM_WORLD.Get_rank()  # what messages name (a stage's ranks count from 0 in self.world)
        self.where = where
        self.shape = tuple(manifest["mesh"]["shape"])
        self.rank_map = [tuple(c) for c in manifest["rank_map"]]
        self.coord = self.rank_map[self.rank]
        env_timeout = os.environ.get("BMC_COLLECTIVE_TIMEOUT_S", "").strip()
        self.timeout_s = float(timeout_s if timeout_s is not None else env_timeout or DEFAULT_TIMEOUT_S)
        self.check = bool(int(os.environ.get("BMC_CHECK_COLLECTIVES", "0") or 0)) if check is None else check
        self.seq = 0
        self.impl = "python"
        self.native = None
        self._fault = _parse_fault(os.environ.get("BMC_FAULT_INJECT", ""))
        self.groups: dict[tuple[int, ...], object] = {}
        # one communicator per non-empty set of axes, in every order a program may name them (the block order
        # follows it); meshes of more than 3 axes get the ascending orders only (others are split on first use)
        ndim = len(self.shape)
        for k in range(1, ndim + 1):
            for subset in (permutations(range(ndim), k) if ndim <= 3 else combinations(range(ndim), k)):
                self._split(subset)
        node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED, key=MPI.COMM_WORLD.Get_rank())  # GPUs are per host
        self.local_size, self.local_rank = node.Get_size(), node.Get_rank()
        node.Free()

    # -- communicators
    def _split(self, axes: tuple[int, ...]):
        others = [k for k in range(len(self.shape)) if k not in axes]
        color = int(np.ravel_multi_index([self.coord[k] for k in others], [self.shape[k] for k in others])) \
            if others else 0
        key = int(np.ravel_multi_index([self.coord[k] for k in axes], [self.shape[k] for k in axes]))
        comm = self.world.Split(color=color, key=key)
        self.groups[tuple(axes)] = comm
        return comm

    def group(self, axes) -> object:
        """The communicator of this rank's group over mesh axes ``axes`` (member i = block i)."""
        axes = tuple(int(a) for a in axes)
        comm = self.groups.get(axes)
        if comm is None:  # an axis order the eager split did not make (> 3 mesh axes): every rank gets here together
            comm = self._split(axes)
            if self.native is not None:
                self.native["module"]["set_comm"](_axes_key(axes), int(comm.py2f()))
        return comm

    def group_ranks(self, axes) -> list[int]:
        """World ranks of this rank's group over ``axes``, in block order."""
        axes = tuple(axes)
        mine = [c for k, c in enumerate(self.coord) if k not in axes]
        members = [r for r, c in enumerate(self.rank_map) if [v for k, v in enumerate(c) if k not in axes] == mine]
        return sorted(members, key=lambda r: tuple(self.rank_map[r][k] for k in axes))

    # -- control messages (small, with the watchdog)
    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def _wait(self, req, what) -> None:
        """Wait for a control message; a timeout means a rank is lost outside the program: abort the job."""
        try:
            _poll(req, self.deadline(), lambda: f"rank {self.world_rank}: {what()}")
        except CollectiveError as e:
            self.abort(f"bmc: runtime error: {self.where}: {e.what}\n  fix: {e.fix}")

    def allgather_bytes(self, data: bytes, comm=None) -> list[bytes]:
        """Every rank's ``data`` (any length), with the collective timeout."""
        comm = comm or self.world
        n = comm.Get_size()
        sizes = np.zeros(n, np.int64)
        self._wait(comm.Iallgather(np.array([len(data)], np.int64), sizes), lambda: "exchanging sizes")
        recv = np.empty(int(sizes.sum()), np.uint8)
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        send = np.frombuffer(data, np.uint8) if data else np.empty(0, np.uint8)
        self._wait(comm.Iallgatherv(send, [recv, sizes.astype(np.int32), displs.astype(np.int32), self.MPI.BYTE]),
                   lambda: "exchanging messages")
        return [recv[d:d + s].tobytes() for d, s in zip(displs, sizes)]

    def agree(self, error: BaseException | None) -> None:
        """Collective: when any rank passes an error, every rank raises the first failing rank's error (same type
        and text, ``[rank k]`` prefixed), so the job ends normally with the CLI's exit code instead of hanging."""
        payload = b"" if error is None else json.dumps(_error_record(error)).encode()
        records = self.allgather_bytes(payload)
        for r, rec in enumerate(records):
            if rec:
                raise _error_from_record(r, json.loads(rec), error if r == self.rank else None)

    def bcast_arrays(self, arrays: dict | None, error: BaseException | None, root: int = 0,
                     what: str = "input") -> dict:
        """Rank ``root``'s ``{name: array}`` on every rank (metadata as JSON, data with ``Ibcast`` on the arrays'
        memory)."""
        meta = b""
        arrays = arrays or {}
        if self.rank == root:
            rec = {"error": _error_record(error)} if error is not None else \
                {"arrays": [[k, str(a.dtype), list(a.shape)] for k, a in arrays.items()]}
            meta = json.dumps(rec).encode()
        n = np.array([len(meta)], np.int64)
        self._wait(self.world.Ibcast(n, root=root), lambda: f"broadcasting the {what}s' size")
        buf = np.frombuffer(meta, np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self._wait(self.world.Ibcast(buf, root=root), lambda: f"broadcasting the {what}s' metadata")
        rec = json.loads(buf.tobytes())
        if "error" in rec:
            raise _error_from_record(root, rec["error"], error)
        out = {}
        for name, dtype, shape in rec["arrays"]:
            a = np.ascontiguousarray(arrays[name]) if self.rank == root else np.empty(shape, np_dtype(dtype))
            if a.nbytes:
                self._wait(self.world.Ibcast(_bytes_view(a), root=root),
                           lambda name=name: f"broadcasting {what} {name!r}")
            out[name] = a
        return out

    # -- point to point (pipeline stages), with the watchdog
    def send_arrays(self, dest: int, arrays: list[np.ndarray], what: str) -> None:
        """Send ``arrays`` to rank ``dest``, in order."""
        for a in arrays:
            if a.nbytes:
                v = _bytes_view(np.ascontiguousarray(a))
                self._wait(self.world.Isend(v, dest=dest, tag=_P2P_TAG), lambda: what)

    def recv_arrays(self, source: int, specs: list[tuple[str, str, list[int]]]) -> dict[str, np.ndarray]:
        """Receive ``(name, dtype, shape)`` arrays, in order, from rank ``source``."""
        out = {}
        for name, dtype, shape in specs:
            a = out[name] = np.empty(shape, np_dtype(dtype))
            if a.nbytes:
                self._wait(self.world.Irecv(_bytes_view(a), source=source, tag=_P2P_TAG),
                           lambda name=name: f"receiving {name!r} from rank {source}")
        return out

    def abort(self, message: str, exit_code: int = ExecutionError.exit_code) -> None:
        """Print ``[rank k] message`` to stderr and end every rank of the job (``MPI_Abort``); does not return."""
        text = "\n".join(f"[rank {self.world_rank}] {line}" for line in str(message).splitlines() or [""])
        try:
            sys.stdout.flush()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            # the launcher forwards output asynchronously and MPI_Abort tears the job down at once: without a moment
            # to drain the pipes the message is sometimes lost (seen with MPICH's hydra)
            time.sleep(ABORT_DRAIN_S)
        finally:
            self.MPI.COMM_WORLD.Abort(int(exit_code))
            os._exit(int(exit_code))  # pragma: no cover  (MPI_Abort does not return)

    # -- the collectives (Python implementation)
    def next_seq(self, kind: str, attrs_text: str, xa: np.ndarray, comm, axes) -> int:
        seq = self.seq
        self.seq += 1
        if self._fault and self._fault[1] == self.world_rank and self._fault[2] == seq:
            _inject(self._fault[0], self.world_rank, seq, kind)
        if self.check:
            self.check_order(seq, kind, attrs_text, xa.dtype, xa.shape, comm, axes)
        return seq

    def check_order(self, seq, kind, attrs_text, dtype, shape, comm, axes) -> None:
        """All-gather (world rank, seq, kind, attrs hash, dtype, shape) over the group; raise on any difference."""
        shape = list(shape)[:8]
        dt = np.dtype(dtype)
        code = {"i": 0, "u": 1, "f": 2, "b": 6}.get(dt.kind, 255) * 256 + dt.itemsize * 8  # DLPack code, bits
        row = np.array([self.rank, seq, KINDS.index(kind) if kind in KINDS else -1,
                        zlib.crc32(attrs_text.encode()), code, len(shape),
                        *shape, *([0] * (8 - len(shape)))], np.int64)
        rows = np.empty((comm.Get_size(), row.size), np.int64)
        _poll(comm.Iallgather(row, rows), self.deadline(), lambda: self._describe(seq, kind, axes) + " (order check)")
        if (rows[:, 1:] != row[1:]).any():
            def desc(r):
                k = KINDS[r[2]] if 0 <= r[2] < len(KINDS) else "?"
                return f"rank {r[0]} at collective #{r[1]} {k} shape {list(r[6:6 + r[5]])}"
            raise CollectiveError("collectives issued in different orders on different ranks (a bug in the program "
                                  f"or the runtime): group over axes {list(axes)}: " + "; ".join(map(desc, rows)),
                                  fix="every rank must issue the same collectives in the same order")

    def _describe(self, seq, kind, axes) -> str:
        return (f"collective #{seq} ({kind} over mesh axes {list(axes)}, group of world ranks "
                f"{self.group_ranks(axes)}) on rank {self.rank}")

    def python_collective(self, kind: str, x, attrs_text: str, out) -> None:
        """``bmc.<kind>`` on host tensors, through zero-copy numpy views (DLPack; bfloat16 through its pointer)."""
        from bmc.runtime.kernels import host_array

        self.host_collective(kind, host_array(x), attrs_text, host_array(out))

    def host_collective(self, kind: str, xa: np.ndarray, attrs_text: str, oa: np.ndarray) -> None:
        """``bmc.<kind>`` on numpy arrays (also the host side of the host-staged GPU path)."""
        attrs = json.loads(attrs_text)
        axes = tuple(attrs["axes"])
        comm = self.group(axes)
        seq = self.next_seq(kind, attrs_text, xa, comm, axes)
        run = _PY_IMPLS[kind]
        run(self, comm, xa, oa, attrs, self.deadline(), lambda: self._describe(seq, kind, axes))


# MPI can reduce these numpy dtypes (float16/bfloat16 and the rest take the all-gather path below)
_MPI_REDUCIBLE = {np.dtype(t) for t in ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                        "uint32", "uint64")}


def _op(ctx, reduce: str):
    return {"sum": ctx.MPI.SUM, "mean": ctx.MPI.SUM, "max": ctx.MPI.MAX, "min": ctx.MPI.MIN}[reduce]


def _bytes_view(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)


def _gather_all(ctx, comm, xa, deadline, what) -> np.ndarray:
    """(n, *x.shape): every member's ``xa`` (as bytes, so any dtype travels)."""
    n = comm.Get_size()
    stage = np.empty((n,) + xa.shape, xa.dtype)
    _poll(comm.Iallgather(_bytes_view(np.ascontiguousarray(xa)), stage.reshape(n, -1).view(np.uint8)), deadline,
          what)
    return stage


def _py_all_reduce(ctx, comm, xa, oa, attrs, deadline, what):
    from bmc.ops.collective import all_reduce_group

    n = comm.Get_size()
    if xa.dtype not in _MPI_REDUCIBLE:  # float16/bfloat16/bool: gather, then the reference's arithmetic
        oa[...] = all_reduce_group(list(_gather_all(ctx, comm, xa, deadline, what)), attrs)[0]
        return
    send = ctx.MPI.IN_PLACE if _same_memory(xa, oa) else xa
    _poll(comm.Iallreduce(send, oa, op=_op(ctx, attrs["reduce"])), deadline, what)
    if attrs["reduce"] == "mean":
        if oa.dtype.kind == "f":
            np.divide(oa, oa.dtype.type(n), out=oa)
        else:
            oa[...] = (oa.astype(np.float64) / n).astype(oa.dtype)


def _py_all_gather(ctx, comm, xa, oa, attrs, deadline, what):
    dim = attrs["dim"] % xa.ndim
    if int(np.prod(xa.shape[:dim])) == 1:  # the blocks are contiguous in the output: gather straight into it
        _poll(comm.Iallgather(_bytes_view(np.ascontiguousarray(xa)), _bytes_view(oa)), deadline, what)
        return
    stage = _gather_all(ctx, comm, xa, deadline, what)
    np.concatenate(list(stage), axis=dim, out=oa)


def _py_reduce_scatter(ctx, comm, xa, oa, attrs, deadline, what):
    from bmc.ops.collective import reduce_scatter_group

    n = comm.Get_size()
    dim = attrs["dim"] % xa.ndim
    if xa.dtype not in _MPI_REDUCIBLE:
        oa[...] = reduce_scatter_group(list(_gather_all(ctx, comm, xa, deadline, what)), attrs)[comm.Get_rank()]
        return
    if int(np.prod(xa.shape[:dim])) == 1:
        send = np.ascontiguousarray(xa)
    else:  # block j (for member j) contiguous: (n, *block shape)
        send = np.ascontiguousarray(np.stack(np.split(xa, n, axis=dim)))
    _poll(comm.Ireduce_scatter_block(send.reshape(-1), oa.reshape(-1), op=ctx.MPI.SUM), deadline, what)


def _py_all_to_all(ctx, comm, xa, oa, attrs, deadline, what):
    n = comm.Get_size()
    split, concat = attrs["split_dim"] % xa.ndim, attrs["concat_dim"] % xa.ndim
    if int(np.prod(xa.shape[:split])) == 1:
        send = np.ascontiguousarray(xa)
    else:
        send = np.ascontiguousarray(np.stack(np.split(xa, n, axis=split)))
    piece = list(xa.shape)
    piece[split] //= n
    direct = int(np.prod(oa.shape[:concat])) == 1
    recv = oa if direct else np.empty([n] + piece, xa.dtype)
    _poll(comm.Ialltoall(_bytes_view(send), _bytes_view(recv)), deadline, what)
    if not direct:
        np.concatenate(list(recv), axis=concat, out=oa)


_PY_IMPLS = {"all_reduce": _py_all_reduce, "all_gather": _py_all_gather, "reduce_scatter": _py_reduce_scatter,
             "all_to_all": _py_all_to_all}


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


# ------------------------------------------------------------------------------------------ faults

def _parse_fault(text: str):
    text = text.strip()
    if not text:
        return None
    action, rank, seq = text.split(":")
    if action not in ("raise", "kill", "hang"):
        raise ValueError(f"BMC_FAULT_INJECT={text!r}: the action must be raise, kill or hang")
    return action, int(rank), int(seq)


def _inject(action: str, rank: int, seq: int, kind: str) -> None:
    if action == "raise":
        raise RuntimeError(f"injected fault (BMC_FAULT_INJECT) at collective #{seq} ({kind})")
    if action == "kill":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        time.sleep(1e9)


def _error_record(err: BaseException) -> dict:
    if isinstance(err, BmcError):
        return {"type": type(err).__name__, "what": err.what, "where": err.where, "fix": err.fix,
                "exit_code": err.exit_code}
    return {"type": type(err).__name__, "what": f"{type(err).__name__}: {err}", "where": None, "fix": None,
            "exit_code": ExecutionError.exit_code}


def _error_from_record(rank: int, rec: dict, own: BaseException | None) -> BmcError:
    from bmc import errors

    cls = getattr(errors, rec["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, BmcError)):
        cls = ExecutionError
    what = rec["what"] if rec["what"].startswith("[rank ") else f"[rank {rank}] {rec['what']}"
    err = cls(what, where=rec.get("where"), fix=rec.get("fix"))
    err.__cause__ = own
    return err


# ------------------------------------------------------------------------------------------ registration

_REGISTERED: dict = {}


def register_collectives(ctx: MPIContext, impl: str | None = None, gpu: tuple[int, bool] | None = None) -> str:
    """Register ``bmc.<kind>`` for this rank (before any VM is built); returns the implementation used.

    Host tensors: ``impl`` is ``"python"``, ``"native"`` (builds the native library when missing) or
    ``None``/``"auto"`` (``BMC_COLLECTIVES``, else native when built, else Python). A fault injection
    (``BMC_FAULT_INJECT``) runs through the Python implementation.
    GPU tensors (``gpu=(device index, shared)``, see :func:`bmc.runtime.cuda.pick_device`): ``"nccl"``, ``"host"``
    (host-staged Python MPI) or ``"auto"``: NCCL when no GPU is shared by two ranks and NCCL loads on every rank,
    else host-staged. Every rank makes the same choice (agreed over the world).
    """
    import tvm_ffi

    impl = (impl or os.environ.get("BMC_COLLECTIVES", "") or "auto").strip().lower()
    allowed = ("auto", "nccl", "host") if gpu is not None else ("auto", "python", "native")
    if impl not in allowed:
        raise ExecutionError(f"unknown collectives implementation {impl!r} for "
                             f"{'GPU' if gpu is not None else 'host'} tensors", fix=f"use {', '.join(allowed)}")
    if ctx._fault:
        impl = "python" if gpu is None else "host"
    if gpu is not None:
        return _register_gpu_collectives(ctx, impl, *gpu)
    native = None
    if impl in ("auto", "native"):
        native = load_native(ctx, build=impl == "native")
    if native is not None:
        for kind in KINDS:
            tvm_ffi.register_global_func(f"bmc.{kind}", native[kind], override=True)
        ctx.impl, ctx.native = "native", native
    else:
        for kind in KINDS:
            def fn(x, attrs, out, kind=kind):
                ctx.python_collective(kind, x, attrs, out)
            tvm_ffi.register_global_func(f"bmc.{kind}", fn, override=True)
        ctx.impl = "python"
    _REGISTERED["ctx"] = ctx
    return ctx.impl


def _register_gpu_collectives(ctx: MPIContext, impl: str, device: int, shared: bool) -> str:
    import tvm_ffi

    from bmc.runtime import cuda

    why = None
    if impl != "host":
        why = "a GPU serves several ranks" if shared else cuda.nccl_available()
    votes = ctx.allgather_bytes((why or "").encode())  # one choice for all ranks
    reasons = sorted({f"rank {r}: {w.decode()}" for r, w in enumerate(votes) if w})
    if impl == "nccl" and reasons:
        raise ExecutionError(f"NCCL collectives were requested but cannot be used ({'; '.join(reasons)})",
                             fix="use --collectives host (or auto)")
    use_nccl = impl != "host" and not reasons
    nccl = cuda.Nccl(ctx, device) if use_nccl else None
    for kind in KINDS:
        if nccl is not None:
            def fn(x, attrs, out, kind=kind):
                axes = tuple(json.loads(attrs)["axes"])
                meta = SimpleNamespace(dtype=np.dtype(cuda.np_dtype(x.dtype)), shape=tuple(x.shape))
                ctx.next_seq(kind, attrs, meta, ctx.group(axes), axes)  # numbering + the order check
                nccl(kind, x, attrs, out)
        else:
            fn = cuda.host_staged(lambda xa, attrs, oa, kind=kind: ctx.host_collective(kind, xa, attrs, oa))
        tvm_ffi.register_global_func(f"bmc.{kind}", fn, override=True)
    ctx.impl = "nccl" if use_nccl else "host"
    ctx.impl_note = "; ".join(reasons) if reasons and impl == "auto" else ""
    _REGISTERED["ctx"] = ctx
    return ctx.impl


def sequence_number(ctx: MPIContext) -> int:
    """Collectives this rank has issued so far (either implementation)."""
    return int(ctx.native["seq"]()) if ctx.native is not None else ctx.seq


# ------------------------------------------------------------------------------------------ native library

def _native_key() -> str:
    from importlib import metadata

    h = hashlib.sha256()
    for p in (ROOT / "cpp" / "mpi_collectives.cc", ROOT / "cpp" / "float16.h", ROOT / "CMakeLists.txt"):
        if p.exists():
            h.update(p.name.encode() + p.read_bytes())
    for dist in ("apache-tvm-ffi", "mpich", "mpi4py"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            pass
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def native_library_path() -> Path | None:
    """``$BMC_MPI_NATIVE_LIB``, else the build cache ``$BMC_CACHE_DIR/native/<key>/libbmc_mpi_collectives.so``."""
    from bmc.runtime.kernels import cache_dir

    env = os.environ.get("BMC_MPI_NATIVE_LIB")
    if env:
        return Path(env) if Path(env).exists() else None
    from bmc.runtime.kernels import packaged_library

    packaged = packaged_library(NATIVE_LIB)
    if packaged is not None:
        return packaged
    if not (ROOT / "cpp" / "mpi_collectives.cc").exists():
        return None
    lib = cache_dir() / "native" / _native_key() / NATIVE_LIB
    return lib if lib.exists() else None


def build_native(dest: Path | None = None, *, quiet: bool = True) -> Path:
    """Configure + build ``libbmc_mpi_collectives.so`` (cmake target ``bmc_mpi_collectives``) into the cache."""
    from bmc.runtime.kernels import cache_dir

    cmake = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    if not Path(cmake).exists() and not shutil.which(cmake):
        raise RuntimeError("cmake not found (pip install cmake ninja)")
    dest = Path(dest) if dest is not None else cache_dir() / "native" / _native_key()
    build = dest / f"build-mpi-{os.getpid()}"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"]
    ninja = shutil.which("ninja") or (str(Path(sys.executable).parent / "ninja")
                                      if (Path(sys.executable).parent / "ninja").exists() else None)
    if ninja:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    try:
        for cmd in (configure, [cmake, "--build", str(build), "--target", NATIVE_TARGET]):
            proc = subprocess.run(cmd, capture_output=quiet, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout or '')[-3000:]}\n"
                                   f"{(proc.stderr or '')[-3000:]}")
        final = dest / NATIVE_LIB
        tmp = dest / f".{NATIVE_LIB}.{os.getpid()}"
        shutil.copy2(build / NATIVE_LIB, tmp)
        os.replace(tmp, final)  # atomic: a concurrent loader sees the old file or the new one
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return final


_NATIVE_MODULE: dict = {}


def load_native(ctx: MPIContext | None, *, build: bool = False) -> dict | None:
    """The native collectives bound to ``ctx``'s communicators: ``{kind: ffi.Function, "seq": ...}``, or None.

    ``build=True``: build the library when missing (rank 0 builds, the others wait) and raise when it cannot be used.
    The library has no tvm-ffi globals (module functions only), so loading it twice is harmless.
    """
    import tvm_ffi

    path = native_library_path()
    if path is None and build:
        error = None
        if ctx is None or ctx.rank == 0:
            try:
                path = build_native()
            except Exception as e:  # noqa: BLE001
                error = ExecutionError(f"the native MPI collectives cannot be built: {e}",
                                       fix="install cmake, ninja and a C++ compiler, or use --collectives python")
        if ctx is not None:
            ctx.agree(error)
        elif error is not None:
            raise error
        path = native_library_path()
    if path is None:
        return None
    try:
        key = str(path)
        module = _NATIVE_MODULE.get(key) or tvm_ffi.load_module(key)
        _NATIVE_MODULE[key] = module
    except Exception as e:  # noqa: BLE001
        if build:
            raise ExecutionError(f"the native MPI collectives cannot be loaded: {e}", where=str(path),
                                 fix="delete the file to rebuild it, or use --collectives python") from e
        return None
    fns = {k: module[k] for k in KINDS}
    fns["seq"] = module["seq"]
    fns["module"] = module
    if ctx is not None:
        module["reset"](ctx.rank, float(ctx.timeout_s), bool(ctx.check))
        for axes, comm in ctx.groups.items():
            module["set_comm"](_axes_key(axes), int(comm.py2f()))
    return fns


def _axes_key(axes) -> int:
    """Axes in program order → one integer (4 bits per axis, +1 so that axis 0 counts): (1,) → 2, (0, 1) → 0x21."""
    key = 0
    for a in axes:
        key = key * 16 + (int(a) + 1)
    return key


# ------------------------------------------------------------------------------------------ threads

def threads_per_rank(ctx: MPIContext) -> int:
    """``max(1, cpus // ranks on this host)``; a launcher that already bound each rank to its own cores wins."""
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = os.cpu_count() or 1
    total = os.cpu_count() or mine
    if mine < total:  # pinned by the launcher (e.g. mpiexec -bind-to core): those cores are this rank's
        return max(1, mine)
    return max(1, mine // max(1, ctx.local_size))


def place_rank(ctx: MPIContext, allowed: set[int], threads: int) -> set[int]:
    """Give this rank its own cores: local rank r gets ``threads`` cores of ``allowed`` starting at ``r * threads``
    (when all local ranks fit), else all of ``allowed``. Needed because TVM's ``runtime.config_threadpool`` pins the
    calling thread to the first core: without this every rank of a host computes on core 0."""
    cores = sorted(allowed)
    if threads >= 1 and ctx.local_size * threads <= len(cores):
        mine = set(cores[ctx.local_rank * threads:(ctx.local_rank + 1) * threads])
    else:
        mine = set(cores)
    try:
        os.sched_setaffinity(0, mine)
    except (AttributeError, OSError):
        return allowed
    return mine

