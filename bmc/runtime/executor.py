"""Load a verified ``.bmc`` artifact and run it on one device with the TVM Relax VM.

    model = load("model.bmc")
    logits = model(input_ids=ids)              # one output → the array; several → a tuple in signature order
    outs = model.run({"input.1": x})           # any input name, identifier or not → {output name: array}

``load`` verifies the artifact (format, TVM/tvm-ffi versions, sizes, every digest but the weights') before the library
is loaded; the weights are read once, straight to the device, and hashed as they stream in: the model comes back only
if their digest matched. They stay on the device for every call. Inputs are checked against the
signature before anything runs (FAILURES.md 44). Inputs are numpy arrays or any DLPack tensor (torch, CuPy, JAX,
TVM); outputs are numpy arrays, or TVM tensors left on the model's GPU (``run(outputs=...)``: by default when an input
was given on that GPU), so a GPU decoding loop keeps its cache on the GPU. This module imports only numpy, tvm and
bmc's runtime-side modules, never the frontend, codegen or sharding (a test enforces it).

A multi-device artifact runs in one of two ways:

* **under MPI** (``mpiexec -n N python script.py`` / ``mpiexec -n N bmc run ...``): every rank calls
  ``bmc.load(path)`` (MPI mode is picked automatically when an MPI launcher is detected; ``mpi=True`` forces it).
  Pre-flight checks the world size against the artifact (``bmc.runtime.mpi``); each rank verifies and reads only
  its own weights file, registers the collectives (native C++ when built, else mpi4py; ``collectives=``) and builds
  its VM. ``model(**inputs)`` is called on every rank with the *global* inputs either on rank 0 only (the other ranks
  call ``model()`` with no inputs: rank 0's are broadcast) or on every rank (used as given, no broadcast); it returns
  the *global* outputs on every rank (the program ends with replicated outputs), except an output compiled to stay
  split (``--output-shard``): each rank gets its own block (``model.output_slices`` says where it lies;
  ``model.gather_outputs`` assembles the whole on one rank); an input compiled to be fed as blocks
  (``--input-shard``) may be passed whole or, when every rank passes inputs, as each rank's own block
  (``model.input_slices``), so a split output can be fed back without a gather. A failure that every rank sees (bad
  inputs, a damaged weights file) raises the same error on every rank; a failure of one rank during the run prints
  ``[rank k] ...`` and aborts the whole job (``MPI_Abort``), because the other ranks are inside collectives.
  ``model.mpi`` holds the rank, mesh coordinate, communicators and the collectives implementation;
  ``model.stats["bytes_read"]`` the bytes this rank read from the artifact (its weights file, the program and plan).
* **simulated** (``simulate=True``): every rank in this process, one thread each, collectives in numpy; split
  outputs come back whole, their blocks put in place.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tvm
import tvm.runtime.vm  # noqa: F401  (runtime-only TVM does not import it with `import tvm`)
import tvm_ffi

from bmc.errors import ArtifactError, BmcError, ExecutionError, UsageError, human_bytes
from bmc.ir.types import np_dtype
from bmc.runtime.artifact import HashingReader, verify_artifact
from bmc.runtime.kernels import host_array, pack_params
from bmc.runtime.safetensors import SafetensorsFile


#: numpy dtype kinds that cross DLPack both ways (bool, ints, floats); ml_dtypes' bfloat16 and float8 (kind "V")
#: cross as unsigned integers of their size, viewed back on the other side (:func:`_to_tvm`, ``kernels.host_array``)
_NUMPY_KINDS = "biufV"
#: the data alignment TVM's kernels assume of every tensor argument (tvm.runtime.from_dlpack checks it)
_ALIGNMENT = 64
#: DLPack device types (dlpack.h) that :func:`_imported` treats specially
_DL_CPU, _DL_CUDA, _DL_ROCM = 1, 2, 10
#: what ``Model.run(outputs=...)`` accepts
_OUTPUT_KINDS = ("auto", "numpy", "device")


def _fmt(dtype: str, shape) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]"


class Model:
    """A loaded artifact: call it with inputs by position or name, or ``run`` it with a dict."""

    def __init__(self, path: Path, manifest: dict, ranks: list, device, mpi=None, stats: dict | None = None):
        self._path = path
        self.mpi = mpi  # bmc.runtime.mpi.MPIContext under MPI: ranks[0] is this rank's (main, params)
        self.stats = stats or {}
        self._manifest = manifest
        self._ranks = ranks  # per simulated rank (one unless simulating): (VM main function, weights)
        self._device = device
        implicit = set(manifest.get("implicit_inputs", []))
        self._all_inputs = manifest["signature"]["inputs"]
        self._inputs = [i for i in self._all_inputs if i["name"] not in implicit]
        self._outputs = manifest["signature"]["outputs"]
        # per rank and input, a tensor that holds an input array the program cannot read in place: allocated on the
        # first call, refilled by later ones (a fresh buffer per call page-faults its way in: 8 of the 10 ms of a
        # decoding step with 6 MiB key/value inputs)
        self._arguments: dict[int, dict[int, Any]] = {}
        # on the CPU, an input array is read in place and an output the call allocates afresh
        # (``kernels.<target>.owned_outputs``, recorded by the compiler) is returned as a numpy view, not copied;
        # with outputs left on the device (``run(outputs=...)``) such an output is returned as its tensor
        self._in_place = device.dlpack_device_type() == tvm.cpu(0).dlpack_device_type()
        fresh = next((k.get("owned_outputs") for k in (manifest.get("kernels") or {}).values()
                      if isinstance(k, dict) and k.get("owned_outputs")), None) or []
        self._fresh = [bool(f) for f in fresh] if len(fresh) == len(self._outputs) else [False] * len(self._outputs)
        self._owned = [f and self._in_place and np.dtype(np_dtype(o["dtype"])).kind in _NUMPY_KINDS
                       for f, o in zip(self._fresh, self._outputs)]
        # donated inputs (``--donate``) the program writes over, and per output the input whose buffer it is
        self._donated = [bool(i.get("donated")) for i in self._all_inputs]
        index = {i["name"]: k for k, i in enumerate(self._all_inputs)}
        self._aliases = [index.get(o.get("aliases")) for o in self._outputs]
        self._lock = threading.Lock()  # calls take turns: they share those tensors

    def _shareable(self, rank: int) -> dict:
        """This model's loaded weights of rank ``rank`` (under MPI: this process's rank, else none) by
        :func:`_weight_keys`, for another model to use (``load(share_weights=...)``)."""
        if self.mpi is not None:
            mine = rank == self.mpi.rank
            rank, held = self.mpi.rank, self._ranks[0][1] if mine else []
        else:
            held = self._ranks[rank][1] if rank < len(self._ranks) else []
        return {k: t for k, t in zip(_weight_keys(self._manifest, rank), held) if k is not None}

    @property
    def manifest(self) -> dict:
        """The artifact's manifest (versions, target, signature, digests)."""
        return self._manifest

    @property
    def signature(self) -> dict:
        """``{"inputs", "outputs", "params"}``, each a list of ``{"name", "dtype", "shape"}``."""
        return self._manifest["signature"]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self._outputs]

    @property
    def output_slices(self) -> dict[str, tuple[slice, ...]]:
        """Where each output this process returns lies in the model's whole output: all of it, except an output left
        split (``--output-shard``) under MPI: this rank's block."""
        return self._slices(self._outputs)

    @property
    def input_slices(self) -> dict[str, tuple[slice, ...]]:
        """Which part of each whole input this process's program reads: all of it, except an input fed as blocks
        (``--input-shard``) under MPI: this rank's block (what it may pass instead of the whole input)."""
        return self._slices(self._inputs)

    def _slices(self, entries: list[dict]) -> dict[str, tuple[slice, ...]]:
        rank = self.mpi.rank if self.mpi is not None else None
        return {e["name"]: _block(e, rank) if rank is not None and "blocks" in e else
                tuple(slice(0, n) for n in e["shape"]) for e in entries}

    def gather_outputs(self, outputs: Mapping[str, np.ndarray], root: int = 0) -> dict[str, np.ndarray] | None:
        """The whole outputs from every rank's ``run`` result: under MPI, called on every rank, the blocks of split
        outputs go to rank ``root`` (point to point, one rank per distinct block), which returns them all whole;
        the other ranks return None. Without MPI the outputs are already whole: returned as given."""
        if self.mpi is None:
            return dict(outputs)
        ctx, out = self.mpi, dict(outputs) if self.mpi.rank == root else None
        for o in self._outputs:
            name, blocks = o["name"], {}
            for r in _block_owners(o) if "blocks" in o else []:
                if ctx.rank == root:
                    blocks[r] = _host(outputs[name]) if r == root else \
                        ctx.recv_arrays(r, [(name, o["dtype"], o["local_shape"])])[name]
                elif ctx.rank == r:
                    ctx.send_arrays(root, [_host(outputs[name])], f"sending output {name!r} to rank {root}")
            if out is not None and blocks:
                out[name] = _assembled(o, blocks)
        return out

    def __call__(self, *args: Any, **kwargs: Any):
        """Inputs by position (signature order) and/or by name; one output → array, else a tuple."""
        names = self.input_names
        if len(args) > len(names):
            raise ExecutionError(f"{len(args)} positional inputs given but the model takes {len(names)}: "
                                 f"{', '.join(names)}", where=str(self._path))
        inputs = dict(zip(names, args))
        twice = sorted(set(inputs) & set(kwargs))
        if twice:
            raise ExecutionError(f"input(s) {', '.join(twice)} given both by position and by name",
                                 where=str(self._path))
        inputs.update(kwargs)
        outs = self._execute(inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    #: whether ``run(outputs="device")`` can leave outputs on the device (a pipeline's stages exchange host arrays)
    _device_outputs = True

    def run(self, inputs: Mapping[str, Any], *, outputs: str = "auto") -> dict[str, Any]:
        """Run with ``{input name: array}``; returns ``{output name: array}`` in signature order.

        An input is a numpy array (or anything ``np.asarray`` takes) or any DLPack tensor (torch, CuPy, JAX, TVM),
        read without a copy where the program can (see :meth:`_filled`). ``outputs``: ``"numpy"`` returns numpy
        arrays; ``"device"`` returns TVM tensors on the model's device (DLPack producers: ``torch.from_dlpack(t)``
        shares their memory), so a GPU decoding loop that feeds its cache back moves nothing over PCIe; ``"auto"``
        (what calling the model does) is ``"device"`` when the model runs on a GPU and an input was given as a
        tensor on that GPU, else ``"numpy"``. Simulated ranks always return numpy arrays."""
        if outputs not in _OUTPUT_KINDS or (outputs == "device" and not self._device_outputs):
            can = _OUTPUT_KINDS if self._device_outputs else ("auto", "numpy")
            raise UsageError(f"outputs={outputs!r} is not one of {', '.join(map(repr, can))}" +
                             ("" if self._device_outputs else " for a pipeline artifact"),
                             where=str(self._path), fix="pass outputs='numpy' or 'auto'")
        return dict(zip(self.output_names, self._execute(dict(inputs), outputs)))

    def _execute(self, inputs: dict[str, Any], outputs: str = "auto") -> list:
        with self._lock:
            return self._execute_locked(inputs, outputs)

    def _device_mode(self, outputs: str, arrays: list) -> bool:
        """Whether this call returns device tensors (see :meth:`run`)."""
        if outputs == "auto":
            return not self._in_place and any(not isinstance(a, np.ndarray) and a.device == self._device
                                              for a in arrays)
        return outputs == "device"

    def _readable(self, i: int, arrays: list, private: bool) -> bool:
        """Whether the program may take input ``i`` as it is: memory on this model's device, C-ordered and aligned as
        TVM's kernels assume (a numpy array also writable and of a type DLPack carries); a donated input only when no
        other input shares its memory, and never when ``private``."""
        a = arrays[i]
        if isinstance(a, np.ndarray):
            ok = (self._in_place and a.dtype.kind in _NUMPY_KINDS and a.ctypes.data % _ALIGNMENT == 0
                  and a.flags.c_contiguous and a.flags.writeable)
        else:
            ok = a.device == self._device and a.is_contiguous() and a.data_ptr() % _ALIGNMENT == 0
        return ok and not (self._donated[i] and (private or any(_overlap(a, b) for j, b in enumerate(arrays)
                                                                 if j != i)))

    def _filled(self, rank: int, arrays: list, private: bool = False) -> tuple[list, list[bool]]:
        """This rank's input tensors holding ``arrays`` (signature order, implicit inputs included: numpy arrays, or
        TVM tensors on a device), and which of them are the arrays themselves. An array in memory the program can
        read (:meth:`_readable`: on the CPU writable, C-ordered, 64-byte-aligned memory, as the outputs this class
        returns are; on a GPU a tensor already there) is read in place, so a decoding loop that feeds its key/value
        cache back copies nothing; any other array is copied into a tensor kept for the next call. A donated input
        is written over: in place only when no other input shares its memory, and never when ``private``
        (simulated ranks, which share the caller's arrays)."""
        kept = self._arguments.setdefault(rank, {})
        tensors, in_place = [], []
        for i, (a, spec) in enumerate(zip(arrays, self._all_inputs)):
            if self._readable(i, arrays, private):
                tensors.append(_to_tvm(a, spec["dtype"]) if isinstance(a, np.ndarray) else a)
                in_place.append(True)
                continue
            t = kept.get(i)
            if t is None:
                t = kept[i] = tvm.runtime.empty(a.shape, spec["dtype"], self._device)
            t.copyfrom(a)
            tensors.append(t)
            in_place.append(False)
        return tensors, in_place

    def _returned(self, rank: int, tensors, arrays: list, in_place: list[bool], device: bool = False) -> list:
        """The program's outputs as numpy arrays, or with ``device`` as tensors on the model's device: those the call
        allocated afresh as they are (numpy: views), the others copied (a view of an input or a weight, a constant
        of the program, a repeated output). An output that is a donated input's buffer is the caller's array when
        the program wrote into it; on the CPU (or with ``device``) otherwise the tensor that held the input, which
        this rank then stops keeping (the caller owns it now)."""
        out = []
        for t, o, fresh, own, j in zip(tensors, self._outputs, self._fresh, self._owned, self._aliases):
            if j is not None and in_place[j]:  # the caller's memory, written by the program
                a = arrays[j]
                out.append((_to_tvm(a, o["dtype"]) if isinstance(a, np.ndarray) else a) if device else _host(a))
            elif j is not None and (device or self._in_place):
                out.append(t if device else host_array(t))
                self._arguments[rank].pop(j, None)
            elif device:
                out.append(t if fresh else t.copyto(self._device))
            else:
                out.append(host_array(t) if own else t.numpy())
        return out

    def _execute_locked(self, inputs: dict[str, Any], outputs: str = "auto") -> list:
        if self.mpi is not None:
            return self._execute_mpi(inputs, outputs)
        given = dict(zip(self.input_names, self._check_inputs(inputs)))
        rank_map = self._manifest["rank_map"]
        device = len(self._ranks) == 1 and self._device_mode(outputs, list(given.values()))

        def call_rank(rank: int) -> list:
            main, params = self._ranks[rank]
            arrays = [_own(i, given[i["name"]], rank) if i["name"] in given else
                      np.array(rank_map[rank], dtype=np.int64)
                      for i in self._all_inputs]  # the one implicit input is the device's mesh coordinate
            tensors, in_place = self._filled(rank, arrays, private=len(self._ranks) > 1)
            return self._returned(rank, main(*tensors, *params), arrays, in_place, device)

        try:
            if len(self._ranks) == 1:
                return call_rank(0)
            from bmc.runtime.simulate import run_ranks

            per_rank = run_ranks(rank_map, call_rank)
            return [_assembled(o, [outs[k] for outs in per_rank]) if "blocks" in o else per_rank[0][k]
                    for k, o in enumerate(self._outputs)]  # replicated outputs: rank 0 has them whole
        except ExecutionError:
            raise
        except Exception as e:  # noqa: BLE001  (TVM raises many types; inputs were already checked)
            raise ExecutionError(f"the program failed: {e}", where=str(self._path)) from e

    def _execute_mpi(self, inputs: dict[str, Any], outputs: str = "auto") -> list:
        """This rank's part of an MPI run: agree on the inputs, run the program, return its outputs (replicated ones
        whole, split ones this rank's block)."""
        given = self._agreed_inputs(inputs)
        ctx = self.mpi
        coord = np.array(ctx.coord, dtype=np.int64)  # the one implicit input is the device's mesh coordinate
        main, params = self._ranks[0]
        try:
            arrays = [_own(i, given[i["name"]], ctx.rank) if i["name"] in given else coord for i in self._all_inputs]
            tensors, in_place = self._filled(0, arrays)
            return self._returned(0, main(*tensors, *params), arrays, in_place,
                                  self._device_mode(outputs, list(given.values())))
        except BaseException as e:  # noqa: BLE001  (the other ranks wait in collectives: end the whole job)
            self._abort(e)

    def _abort(self, e: BaseException):
        """A failure during an MPI run: the other ranks wait in collectives, so end the whole job."""
        if isinstance(e, KeyboardInterrupt):
            raise e
        what = e.what if isinstance(e, ExecutionError) else f"{type(e).__name__}: {e}"
        fix = getattr(e, "fix", None)
        self.mpi.abort(f"bmc: runtime error: {self._path}: the program failed: {what}" + (f"\n  fix: {fix}" if fix
                                                                                          else ""),
                       ExecutionError.exit_code)
        raise e  # pragma: no cover  (abort does not return)

    def _agreed_inputs(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The checked inputs on every rank: as given when every rank passed them, else rank 0's, broadcast; bad
        inputs on any rank are the same error on every rank."""
        ctx = self.mpi
        error, arrays = None, None
        if inputs:
            try:
                arrays = dict(zip(self.input_names, self._check_inputs(inputs, blocks=True)))
            except ExecutionError as e:
                error = e
        # who holds inputs: every rank (use them as given) or rank 0 (broadcast); one small all-gather decides
        states = ctx.allgather_bytes(b"e" if error is not None else b"y" if arrays is not None else b"n")
        if all(s == b"y" for s in states):
            given = arrays
        elif states[0] == b"n" and self._inputs:
            raise ExecutionError("no inputs on rank 0", where=str(self._path),
                                 fix="pass the global inputs on rank 0 (the others may pass none) or on every rank")
        else:
            bad = [r for r, s in enumerate(states) if s == b"e" and r != 0]
            if states[0] != b"e" and bad:  # a non-root rank passed bad inputs: every rank says so
                ctx.agree(error)
            if ctx.rank == 0 and error is None:  # a block of rank 0's cannot stand for the others' blocks
                blocks = [i["name"] for i in self._inputs if "blocks" in i and
                          list(arrays[i["name"]].shape) != list(i["shape"])]
                if blocks:
                    error = ExecutionError(f"input(s) {', '.join(map(repr, blocks))} given as rank 0's block, with "
                                           "the other ranks passing no inputs", where=str(self._path),
                                           fix="pass the whole input on rank 0, or every rank's own block on "
                                               "every rank (model.input_slices)")
            given = self._distributed(arrays if arrays is None else {n: _host(a) for n, a in arrays.items()}, error)
        return given

    def _distributed(self, arrays: dict | None, error: BaseException | None) -> dict[str, np.ndarray]:
        """Rank 0's checked inputs on every rank (or rank 0's error raised on every rank)."""
        return self.mpi.bcast_arrays(arrays, error)

    def _check_inputs(self, inputs: dict[str, Any], blocks: bool = False) -> list[np.ndarray]:
        """Arrays in signature order, or one ``ExecutionError`` listing every problem with expected vs got; with
        ``blocks`` (under MPI) an input fed as blocks may also be this rank's block."""
        names = self.input_names
        problems = []
        unknown = [n for n in inputs if n not in names]
        missing = [n for n in names if n not in inputs]
        if unknown:
            problems.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
        if missing:
            problems.append(f"missing input(s) {', '.join(map(repr, missing))}")
        arrays = []
        for spec in self._inputs:
            if spec["name"] not in inputs:
                continue
            value, want = inputs[spec["name"]], np_dtype(spec["dtype"])
            if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
                try:
                    arr = _imported(value, self._device_outputs)
                except Exception as e:  # noqa: BLE001  (producers raise many types: BufferError, RuntimeError, ...)
                    problems.append(f"input {spec['name']!r}: its {type(value).__name__} cannot be read through "
                                    f"DLPack ({e})")
                    continue
            else:
                arr = np.asarray(value)
                if (not isinstance(value, np.ndarray) and arr.dtype != want
                        and np.can_cast(arr.dtype, want, "same_kind")):
                    arr = arr.astype(want)  # Python scalars and lists take the declared dtype when that loses no kind
            expected, got = _fmt(spec["dtype"], spec["shape"]), _fmt(str(arr.dtype), arr.shape)
            shapes = [list(spec["shape"])] + ([spec["local_shape"]] if blocks and "blocks" in spec else [])
            if str(arr.dtype) != str(np.dtype(want)) or list(arr.shape) not in shapes:
                if len(shapes) > 1:
                    expected += f" (or this rank's block {_fmt(spec['dtype'], spec['local_shape'])})"
                problems.append(f"input {spec['name']!r}: expected {expected}, got {got}")
            elif not isinstance(arr, np.ndarray) and not arr.is_contiguous():
                problems.append(f"input {spec['name']!r}: a strided view on {arr.device}; pass a contiguous tensor "
                                "(torch: x.contiguous())")
            arrays.append(np.require(arr, requirements="C") if isinstance(arr, np.ndarray) else arr)  # keeps 0-d
        if problems:
            real = ", ".join(f"{i['name']}: {_fmt(i['dtype'], i['shape'])}" for i in self._inputs)
            raise ExecutionError("bad inputs: " + "; ".join(problems), where=str(self._path),
                                 fix=f"the model takes {real}")
        return arrays

    def __repr__(self) -> str:
        ins = ", ".join(f"{i['name']}: {_fmt(i['dtype'], i['shape'])}" for i in self._inputs)
        outs = ", ".join(f"{o['name']}: {_fmt(o['dtype'], o['shape'])}" for o in self._outputs)
        return f"<bmc.Model {self._path} ({ins}) -> ({outs})>"


_LOADED: dict[str, str] = {}  # program path -> sha256 of the library this process loaded from it
_LOADED_LOCK = threading.Lock()


def _to_tvm(a: np.ndarray, dtype: str):
    """A TVM tensor on ``a``'s memory (no copy). numpy's DLPack refuses ml_dtypes' types: those cross as unsigned
    integers of their size and are viewed as ``dtype`` in TVM."""
    if a.dtype.kind != "V":
        return tvm.runtime.from_dlpack(a)
    return tvm.runtime.from_dlpack(a.view(f"u{a.dtype.itemsize}"))._create_view(a.shape, dtype)


def _imported(value, device: bool = True):
    """A DLPack tensor (torch, CuPy, JAX, TVM) without a copy: in host memory as a numpy array (ml_dtypes' types for
    bfloat16 and the float8s), on a device as a TVM tensor (or, unless ``device``, copied to a numpy array). A GPU
    producer is asked to order its pending work before the legacy default stream, where bmc's kernels run (the
    array API's stream 1 on CUDA, 0 on ROCm)."""
    kind, _ = value.__dlpack_device__()
    stream = {_DL_CUDA: 1, _DL_ROCM: 0}.get(int(kind))
    try:
        capsule = value.__dlpack__(stream=stream)
    except TypeError:  # a producer older than the stream keyword
        capsule = value.__dlpack__()
    t = tvm_ffi.from_dlpack(capsule)
    if int(kind) == _DL_CPU:
        return host_array(t)
    return t if device else t.numpy()


def _host(a):
    """``a`` as a numpy array (a device tensor copied to the host)."""
    return a if isinstance(a, np.ndarray) else a.numpy()


def _overlap(a, b) -> bool:
    """Whether two input arrays (numpy arrays or device tensors) may share memory."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.may_share_memory(a, b)

    def span(t) -> tuple[int, int]:
        return t.data_ptr(), t.data_ptr() + t.numel() * np.dtype(np_dtype(str(t.dtype))).itemsize

    (a0, a1), (b0, b1) = span(a), span(b)
    return a.device == b.device and a0 < b1 and b0 < a1


def _block(output: dict, rank: int) -> tuple[slice, ...]:
    """Rank ``rank``'s block of a split output (its signature entry: ``blocks``, ``local_shape``)."""
    return tuple(slice(b, b + n) for b, n in zip(output["blocks"][rank], output["local_shape"]))


def _own(entry: dict, array: np.ndarray, rank: int) -> np.ndarray:
    """What rank ``rank``'s program reads of an input: the array, or its block of an input fed as blocks (unless the
    array already is the block)."""
    if "blocks" not in entry or list(array.shape) == entry["local_shape"]:
        return array
    return _host(array)[_block(entry, rank)]


def _block_owners(output: dict) -> list[int]:
    """The first rank holding each distinct block of a split output (the others hold replicas of those)."""
    first: dict[tuple, int] = {}
    for r, b in enumerate(output["blocks"]):
        first.setdefault(tuple(b), r)
    return sorted(first.values())


def _assembled(output: dict, blocks) -> np.ndarray:
    """A split output whole, from ``blocks[rank]`` of (at least) each distinct block's first rank."""
    owners = _block_owners(output)
    whole = np.empty(output["shape"], blocks[owners[0]].dtype)
    for r in owners:
        whole[_block(output, r)] = blocks[r]
    return whole


def load_program(program: Path, sha256: str):
    """The TVM module of an artifact's program library (its digest already verified). dlopen hands back the library
    it already has for a path, so a program recompiled into the same folder and loaded again in this process would
    run the old code: a path seen before with another digest is loaded through a copy named by its digest
    (``$BMC_CACHE_DIR/programs/``)."""
    from bmc.runtime.kernels import cache_dir

    key = os.path.realpath(program)
    with _LOADED_LOCK:
        if _LOADED.setdefault(key, sha256) != sha256:
            copy = cache_dir() / "programs" / f"{sha256}{program.suffix}"
            if not copy.exists():
                data = program.read_bytes()
                if hashlib.sha256(data).hexdigest() != sha256:
                    raise ArtifactError("the program changed while it was loaded", where=str(program),
                                        fix="load the artifact again")
                copy.parent.mkdir(parents=True, exist_ok=True)
                tmp = copy.with_name(f".{copy.name}.{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, copy)  # atomic: another process sees no file or the whole one
            program = copy
    return tvm.runtime.load_module(str(program))


def _device(device: str, target: dict, where: str):
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise UsageError(f"unknown device {device!r}", where="device", fix="use cpu, cuda or cuda:N")
    wants = "cpu" if target.get("kind") == "llvm" else "cuda"
    if kind != wants:
        raise ArtifactError(f"the artifact was compiled for target {target.get('kind')!r} but device {device!r} was "
                            f"requested", where=where, fix=f"load it with device={wants!r} or recompile for the "
                                                           f"other target")
    if kind == "cuda":
        from bmc.runtime import cuda

        cuda.enable(where)
    dev = tvm.cpu(0) if kind == "cpu" else tvm.cuda(int(index or 0))
    if not dev.exist:
        raise ExecutionError(f"device {device} is not available on this machine", where=where)
    return dev


def _weight_keys(manifest: dict, rank: int) -> list[tuple | None]:
    """Per weight of rank ``rank``'s program (signature order), what makes two loaded weights interchangeable: the
    SHA-256 of its bytes (recorded per tensor when the artifact was written), dtype, shape and the form the program
    reads it in (packed into panels for bmc's CPU kernels, and how, or as stored); None in an artifact written
    before per-tensor digests."""
    digests = (manifest["files"].get(manifest["weights"].get(str(rank), "")) or {}).get("tensors") or {}
    cpu = (manifest.get("kernels") or {}).get("cpu") or {}
    panels, int8 = cpu.get("packed_weights") or {}, set(cpu.get("packed_int8_weights") or ())
    return [(digests[n], p["dtype"], tuple(p["shape"]),
             ("panels", bool(panels[n])) if n in panels else "int8" if n in int8 else None) if n in digests else None
            for p in manifest["signature"]["params"] for n in [p["name"]]]


def _reused(manifest: dict, rank: int, shared: dict) -> dict[str, Any]:
    """Rank ``rank``'s weights (by name) that ``shared`` (:meth:`Model._shareable`) already holds as needed."""
    return {p["name"]: shared[k] for p, k in zip(manifest["signature"]["params"], _weight_keys(manifest, rank))
            if k is not None and k in shared}


def _load_weights(path: Path, manifest: dict, dev, rank: int = 0, *, staged: bool | None = None,
                  shared: dict | None = None) -> list:
    """Rank ``rank``'s weights on ``dev``, in signature order. The file is read once, front to back, straight into
    the device tensors (on the CPU) or through a host buffer (``staged``, default: off the CPU), hashed on the way,
    and the tensors are returned only once its SHA-256 matched the manifest's; a weight the program reads packed
    (``kernels.cpu.packed_weights``, ``packed_int8_weights``) is packed then, one weight at a time. A weight that
    ``shared`` (another model's loaded weights, :meth:`Model._shareable`) holds in the same form is that tensor:
    its bytes are read and hashed but not kept."""
    reuse = _reused(manifest, rank, shared) if shared else {}
    rel = manifest["weights"][str(rank)]
    file = path / rel
    st = SafetensorsFile(file)
    for spec in manifest["signature"]["params"]:
        if spec["name"] not in st:
            raise ArtifactError(f"weight {spec['name']!r} of the signature is not in the weights file",
                                where=str(file), fix="the artifact is inconsistent; recompile the model")
        dtype, shape = st.info(spec["name"])
        if dtype != spec["dtype"] or list(shape) != list(spec["shape"]):
            raise ArtifactError(f"weight {spec['name']!r} is {_fmt(dtype, shape)} in the file but "
                                f"{_fmt(spec['dtype'], spec['shape'])} in the signature", where=str(file),
                                fix="the artifact is inconsistent; recompile the model")
    if staged is None:
        staged = dev.dlpack_device_type() != tvm.cpu(0).dlpack_device_type()
    tensors = {}
    with HashingReader(path, rel, manifest["files"][rel]) as reader:
        reader.readinto(bytearray(st.data_start))  # the header: hashed, already parsed
        for name, dtype, shape, nbytes in st.layout():
            if name in reuse:
                reader.skip(nbytes)
                continue
            if nbytes == 0:
                tensors[name] = tvm.runtime.empty(shape, dtype, dev)
                continue
            raw = tvm.runtime.empty((nbytes,), "uint8", dev)
            if staged:  # a host buffer per tensor: the reader hashes it after this returns
                host = np.empty(nbytes, np.uint8)
                reader.readinto(host)
                raw.copyfrom(host)
            else:
                reader.readinto(np.from_dlpack(raw))
            tensors[name] = raw._create_view(shape, dtype)
        reader.finish()
    names = [spec["name"] for spec in manifest["signature"]["params"]]
    own = [n for n in names if n not in reuse]
    loaded = dict(zip(own, pack_params((manifest.get("kernels") or {}).get("cpu"), own,
                                       [tensors.pop(n) for n in own])))
    return [reuse[n] if n in reuse else loaded[n] for n in names]


def load(path, *, device: str | None = None, simulate: bool = False, threads: int | None = None,
         mpi: bool | None = None, collectives: str | None = None, share_weights: Model | None = None) -> Model:
    """Verify the artifact at ``path``, then load its program and weights onto ``device`` (``cpu``, ``cuda[:N]``;
    default: the artifact's target, and under MPI each rank takes a GPU by its rank on the host).

    A multi-device artifact runs under ``mpiexec`` (MPI mode: chosen automatically when an MPI launcher is detected,
    ``mpi=True`` forces it, ``mpi=False`` refuses it; see the module docstring); ``simulate=True`` runs all of its
    ranks in this process instead (one thread and one set of weight shards per mesh device, collectives simulated).
    ``threads`` sizes the CPU thread pools (default: BMC_NUM_THREADS, TVM_NUM_THREADS, OMP_NUM_THREADS, then the CPUs
    this process may use, divided among the MPI ranks on this host). ``collectives``: ``"native"``, ``"python"`` or
    ``None`` (native when built, else Python; ``BMC_COLLECTIVES``); for a CUDA artifact ``"nccl"``, ``"host"``
    (host-staged MPI) or ``None`` (NCCL when every rank has a GPU of its own and NCCL loads, else host-staged).

    ``share_weights``: a model already loaded on the same device (and, under MPI, by this rank) whose weights this one
    uses wherever they are the same bytes in the same form (e.g. a prefill and a decoding program compiled from one
    model for two sequence lengths with the same plan): one copy on the device; ``model.stats["shared_bytes"]``
    says how much was shared."""
    path = Path(path)
    if simulate or mpi is False:
        manifest = verify_artifact(path, hash_weights=False)  # hashed as read
        ctx = None
        if manifest["world_size"] != 1 and not simulate:
            from bmc.runtime.mpi import launch_command

            world = manifest["world_size"]
            raise ExecutionError(f"the artifact is for {world} ranks (mesh {manifest['mesh']['shape']}); this "
                                 "process is one", where=str(path),
                                 fix=f"launch it with {launch_command(world)}, or load it with simulate=True to run "
                                     "every rank in this process")
    else:
        from bmc.runtime.artifact import read_manifest
        from bmc.runtime.mpi import MPIContext, preflight

        manifest = read_manifest(path)
        MPI = preflight(manifest, str(path), force=bool(mpi))  # FAILURES 39-41, same message on every rank
        if MPI is None:
            manifest = verify_artifact(path, hash_weights=False)  # hashed as read
            ctx = None
        else:
            ctx = MPIContext(MPI, manifest, str(path))
    device = device or ("cuda" if manifest["target"].get("kind") == "cuda" else "cpu")
    if share_weights is not None and (not isinstance(share_weights, Model) or "pipeline" in manifest):
        raise UsageError("share_weights takes a loaded bmc model, and a pipeline artifact cannot use it",
                         where=str(path), fix="load the two artifacts without share_weights")
    if "pipeline" in manifest:
        from bmc.runtime.pipeline import load_pipeline

        return load_pipeline(path, manifest, ctx, device=device, threads=threads, collectives=collectives)
    if ctx is not None:
        return _load_mpi(path, manifest, ctx, device=device, threads=threads, collectives=collectives,
                         share=share_weights)
    return _load_local(path, manifest, device=device, threads=threads, share=share_weights)


def _sharing(share: Model | None, dev, rank: int, where: str) -> dict:
    """What ``share`` offers rank ``rank`` loading onto ``dev`` (:meth:`Model._shareable`); a model on another
    device is a usage error."""
    if share is None:
        return {}
    if share._device != dev:
        raise UsageError(f"share_weights is a model on {share._device}, this one loads onto {dev}", where=where,
                         fix="load both on the same device (device=...)")
    return share._shareable(rank)


def _load_local(path: Path, manifest: dict, *, device: str, threads: int | None, share: Model | None = None) -> Model:
    """Every rank of ``manifest`` in this process (one, or all of them simulated)."""
    world = manifest["world_size"]
    if "main" not in manifest["programs"] or any(str(r) not in manifest["weights"] for r in range(world)):
        raise ArtifactError("manifest.json names no program 'main' or misses a rank's weights", where=str(path),
                            fix="the artifact is damaged; recompile the model")
    dev = _device(device, manifest["target"], str(path))
    shared = [_sharing(share, dev, r, str(path)) for r in range(world)]
    check_memory(manifest, dev, world, str(path),  # every simulated rank's memory is this process's
                 reused=sum(_shared_bytes(manifest, r, shared[r]) for r in range(world)))
    _register_kernels(path, manifest, threads)
    if world > 1:
        from bmc.runtime.simulate import register_simulated_collectives

        register_simulated_collectives()  # before the VMs are built: they resolve function names then
    program = path / manifest["programs"]["main"]
    try:
        lib = load_program(program, manifest["files"][manifest["programs"]["main"]]["sha256"])
        mains = [tvm.runtime.vm.VirtualMachine(lib, dev)["main"] for _ in range(world)]
    except Exception as e:  # noqa: BLE001  (TVM raises many types)
        raise ArtifactError(f"TVM could not load the program: {e}", where=str(program),
                            fix="recompile the model for this machine") from e
    ranks = [(mains[r], _load_weights(path, manifest, dev, r, shared=shared[r])) for r in range(world)]
    stats = {"shared_bytes": sum(_shared_bytes(manifest, r, shared[r]) for r in range(world))} if share else None
    return Model(path, manifest, ranks, dev, stats=stats)


def _shared_bytes(manifest: dict, rank: int, shared: dict) -> int:
    """The bytes of rank ``rank``'s weights (as stored) that ``shared`` holds already."""
    reused = _reused(manifest, rank, shared) if shared else {}
    return sum(int(np.prod(p["shape"])) * np.dtype(np_dtype(p["dtype"])).itemsize
               for p in manifest["signature"]["params"] if p["name"] in reused)


def check_memory(manifest: dict, dev, sharing: int, where: str, reused: int = 0) -> None:
    """FAILURES.md 45: refuse to load when the plan's peak per device (``manifest.memory``: weights plus the live
    activations, a lower bound of what the program uses), less the ``reused`` bytes of weights another model already
    holds, exceeds this device's free memory over the ``sharing`` ranks that load onto it. The free memory is
    ``BMC_AVAILABLE_MEMORY`` bytes when set, else the device's (on the CPU, MemAvailable); ``BMC_MEMORY_CHECK=0``
    skips the check."""
    need = (manifest.get("memory") or {}).get("peak_bytes_per_device")
    if not need or os.environ.get("BMC_MEMORY_CHECK", "1").strip() == "0":
        return
    need = max(0, need - reused // max(1, sharing))
    free = _free_memory(dev)
    if not free:  # not known here: nothing to check against
        return
    share = free // max(1, sharing)
    if need > share:
        shared = f" shared by {sharing} ranks" if sharing > 1 else ""
        raise ExecutionError(f"the plan needs {human_bytes(need)} a device (its peak: weights plus live "
                             f"activations) but this {dev} has {human_bytes(free)} free{shared}",
                             where=where, fix="run on more devices (compile for a larger --mesh, or with "
                                              "--memory-per-device so the plan fits), put fewer ranks on a host, or "
                                              "set BMC_MEMORY_CHECK=0 to try anyway")


def _free_memory(dev) -> int | None:
    """Free bytes of ``dev``: ``BMC_AVAILABLE_MEMORY`` when set; the CPU's MemAvailable (Linux); a GPU's free memory."""
    given = os.environ.get("BMC_AVAILABLE_MEMORY", "").strip()
    try:
        if given:
            return int(given)
        if dev.dlpack_device_type() == tvm.cpu(0).dlpack_device_type():
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return int(dev.available_global_memory or 0)
    except Exception:  # noqa: BLE001  (no such query here, e.g. a runtime-only TVM: the free memory is unknown)
        return None


def _register_kernels(path: Path, manifest: dict, threads: int | None) -> None:
    if manifest["target"].get("kind") == "cuda":  # library kernels the program calls (cuBLAS GEMMs)
        required = ((manifest.get("kernels") or {}).get("cuda") or {}).get("requires", [])
        if required:
            from bmc.runtime.cuda import register_kernels

            try:
                register_kernels(required)
            except RuntimeError as e:
                raise ArtifactError(str(e), where=str(path), fix="install cuBLAS (nvidia-cublas) or recompile with "
                                                                 "BMC_CUDA_GEMM=tvm") from e
    elif manifest["target"].get("kind") == "llvm":  # library kernels the program calls (BLAS GEMM), host CPU check
        from bmc.runtime.kernels import check_host_cpu, register_cpu_kernels

        cpu = (manifest.get("kernels") or {}).get("cpu") or {}
        try:
            check_host_cpu(cpu)
            register_cpu_kernels(required=cpu.get("requires", []), threads=threads)
        except RuntimeError as e:
            raise ArtifactError(str(e), where=str(path), fix="recompile the model on this machine") from e


def _load_mpi(path: Path, manifest: dict, ctx, *, device: str, threads: int | None, collectives: str | None,
              share: Model | None = None) -> Model:
    """MPI mode: this rank verifies and loads only its own files; every step ends with an agreement, so a failure on
    one rank becomes the same error on every rank instead of a hang."""
    from bmc.runtime.artifact import PLAN, check_library_versions, verify_file
    from bmc.runtime.mpi import place_rank, register_collectives, threads_per_rank

    rank = ctx.rank
    weights = manifest["weights"].get(str(rank), "")
    mine = [PLAN, manifest["programs"].get("main", ""), weights]
    stats = {"rank": rank, "coord": list(ctx.coord), "bytes_read": 0}
    error, shared = None, {}
    try:
        check_library_versions(manifest, str(path))
        if not all(mine):
            raise ArtifactError(f"manifest.json names no program 'main' or no weights for rank {rank}",
                                where=str(path), fix="the artifact is damaged; recompile the model")
        for rel in mine:  # what this rank reads, and nothing else (other ranks' weights stay unread)
            if rel not in manifest["files"]:
                raise ArtifactError(f"manifest.json lists no digest for {rel}", where=str(path),
                                    fix="the artifact is damaged; recompile the model")
            verify_file(path, rel, manifest["files"][rel], hash=rel != weights)  # the weights: hashed as read
            stats["bytes_read"] += manifest["files"][rel]["size"]
        gpu = None
        if manifest["target"].get("kind") == "cuda" and device == "cuda":  # each rank takes a GPU of its host
            from bmc.runtime.cuda import enable, pick_device

            enable(str(path))
            gpu = pick_device(ctx.local_rank, ctx.local_size)
            device = f"cuda:{gpu[0]}"
            stats["gpu"] = {"index": gpu[0], "shared": gpu[1]}
        elif manifest["target"].get("kind") == "cuda":  # an explicit device: maybe the same on every rank
            gpu = (int(device.partition(":")[2] or 0), ctx.local_size > 1)
        dev = _device(device, manifest["target"], str(path))
        shared = _sharing(share, dev, rank, str(path))
        stats["shared_bytes"] = _shared_bytes(manifest, rank, shared)
        sharing = ctx.local_size  # the ranks of this host share its memory (on the CPU) or this rank's GPU
        if gpu is not None and not gpu[1]:
            sharing = 1
        elif "gpu" in stats:  # round robin over the host's GPUs
            from bmc.runtime.cuda import device_count

            sharing = len(range(gpu[0], ctx.local_size, device_count()))
        check_memory(manifest, dev, sharing, str(path), reused=stats["shared_bytes"] * sharing)
        try:
            allowed = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            allowed = None
        if threads is None and not any(os.environ.get(v, "").strip() for v in
                                       ("BMC_NUM_THREADS", "TVM_NUM_THREADS", "OMP_NUM_THREADS")):
            threads = threads_per_rank(ctx)  # ranks sharing a host share its cores
        with warnings.catch_warnings():  # one rank says it (e.g. "native CPU kernels unavailable"), not N
            if rank != 0:
                warnings.simplefilter("ignore")
            _register_kernels(path, manifest, threads)
        if allowed is not None:  # TVM's thread pool set-up pinned this thread to core 0, as on every rank
            from bmc.runtime.kernels import info

            stats["cores"] = sorted(place_rank(ctx, allowed, int(info().get("threads") or 1)))
    except BmcError as e:
        error = e
    ctx.agree(error)
    try:
        stats["collectives"] = register_collectives(ctx, collectives, gpu)  # before the VM is built
    except BmcError as e:
        error = e
    ctx.agree(error)
    program = path / manifest["programs"]["main"]
    try:
        lib = load_program(program, manifest["files"][manifest["programs"]["main"]]["sha256"])
        main = tvm.runtime.vm.VirtualMachine(lib, dev)["main"]
        params = _load_weights(path, manifest, dev, rank, shared=shared)
    except BmcError as e:
        error = e
    except Exception as e:  # noqa: BLE001  (TVM raises many types)
        error = ArtifactError(f"TVM could not load the program: {e}", where=str(program),
                              fix="recompile the model for this machine")
    ctx.agree(error)
    stats["threads"] = threads
    return Model(path, manifest, [(main, params)], dev, mpi=ctx, stats=stats)
