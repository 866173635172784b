"""Load a verified ``.bmc`` artifact and run it on one device with the TVM Relax VM.

    model = load("model.bmc")
    logits = model(input_ids=ids)              # one output → the array; several → a tuple in signature order
    outs = model.run({"input.1": x})           # any input name, identifier or not → {output name: array}

``load`` verifies the artifact (format, TVM/tvm-ffi versions, every digest) before the library is loaded or a weight
is mapped; the weights are then copied to the device once and reused by every call. Inputs are checked against the
signature before anything runs (FAILURES.md 44). This module imports only numpy, tvm and bmc's runtime-side modules,
never the frontend, codegen or sharding (a test enforces it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tvm
import tvm.runtime.vm  # noqa: F401  (runtime-only TVM does not import it with `import tvm`)

from bmc.errors import ArtifactError, ExecutionError, UsageError
from bmc.ir.types import np_dtype
from bmc.runtime.artifact import verify_artifact
from bmc.runtime.safetensors import SafetensorsFile


def _fmt(dtype: str, shape) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]"


class Model:
    """A loaded artifact: call it with inputs by position or name, or ``run`` it with a dict."""

    def __init__(self, path: Path, manifest: dict, ranks: list, device):
        self._path = path
        self._manifest = manifest
        self._ranks = ranks  # per simulated rank (one unless simulating): (VM main function, weights)
        self._device = device
        implicit = set(manifest.get("implicit_inputs", []))
        self._all_inputs = manifest["signature"]["inputs"]
        self._inputs = [i for i in self._all_inputs if i["name"] not in implicit]
        self._outputs = manifest["signature"]["outputs"]

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

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run with ``{input name: array}``; returns ``{output name: array}`` in signature order."""
        return dict(zip(self.output_names, self._execute(dict(inputs))))

    def _execute(self, inputs: dict[str, Any]) -> list[np.ndarray]:
        given = dict(zip(self.input_names, self._check_inputs(inputs)))
        rank_map = self._manifest["rank_map"]

        def call_rank(rank: int) -> list[np.ndarray]:
            main, params = self._ranks[rank]
            arrays = [given[i["name"]] if i["name"] in given else np.array(rank_map[rank], dtype=np.int64)
                      for i in self._all_inputs]  # the one implicit input is the device's mesh coordinate
            args = [tvm.runtime.tensor(a, self._device) for a in arrays]
            return [t.numpy() for t in main(*args, *params)]

        try:
            if len(self._ranks) == 1:
                return call_rank(0)
            from bmc.runtime.simulate import run_ranks

            return run_ranks(rank_map, call_rank)[0]  # outputs are replicated: rank 0 has them all
        except ExecutionError:
            raise
        except Exception as e:  # noqa: BLE001  (TVM raises many types; inputs were already checked)
            raise ExecutionError(f"the program failed: {e}", where=str(self._path)) from e

    def _check_inputs(self, inputs: dict[str, Any]) -> list[np.ndarray]:
        """Arrays in signature order, or one ``ExecutionError`` listing every problem with expected vs got."""
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
            arr = np.asarray(value)
            if not isinstance(value, np.ndarray) and arr.dtype != want and np.can_cast(arr.dtype, want, "same_kind"):
                arr = arr.astype(want)  # Python scalars and lists take the declared dtype when that loses no kind
            expected, got = _fmt(spec["dtype"], spec["shape"]), _fmt(str(arr.dtype), arr.shape)
            if arr.dtype != want or list(arr.shape) != list(spec["shape"]):
                problems.append(f"input {spec['name']!r}: expected {expected}, got {got}")
            arrays.append(np.require(arr, requirements="C"))  # keeps 0-d inputs 0-d
        if problems:
            real = ", ".join(f"{i['name']}: {_fmt(i['dtype'], i['shape'])}" for i in self._inputs)
            raise ExecutionError("bad inputs: " + "; ".join(problems), where=str(self._path),
                                 fix=f"the model takes {real}")
        return arrays

    def __repr__(self) -> str:
        ins = ", ".join(f"{i['name']}: {_fmt(i['dtype'], i['shape'])}" for i in self._inputs)
        outs = ", ".join(f"{o['name']}: {_fmt(o['dtype'], o['shape'])}" for o in self._outputs)
        return f"<bmc.Model {self._path} ({ins}) -> ({outs})>"


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
        _enable_cuda(where)
    dev = tvm.cpu(0) if kind == "cpu" else tvm.cuda(int(index or 0))
    if not dev.exist:
        raise ExecutionError(f"device {device} is not available on this machine", where=where)
    return dev


def _enable_cuda(where: str) -> None:
    """Register TVM's CUDA module loader: ``import tvm`` skips libtvm_runtime_cuda.so when it cannot load it (no
    driver) and runtime-only TVM never loads it, which otherwise surfaces later as 'loader ... not registered'."""
    import ctypes

    import tvm_ffi
    from tvm.base import _LOADED_LIBS

    if "ffi.Module.load_from_bytes.cuda" in tvm_ffi.registry.list_global_func_names():
        return
    lib = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(lib))
    except OSError as e:
        raise ExecutionError(f"TVM's CUDA runtime cannot be loaded: {e}", where=where,
                             fix="a CUDA device needs the NVIDIA driver (libcuda.so.1) and libcudart.so.13") from e


def _load_weights(path: Path, manifest: dict, dev, rank: int = 0) -> list:
    file = path / manifest["weights"][str(rank)]
    st = SafetensorsFile(file)
    params = []
    for spec in manifest["signature"]["params"]:
        if spec["name"] not in st:
            raise ArtifactError(f"weight {spec['name']!r} of the signature is not in the weights file",
                                where=str(file), fix="the artifact is inconsistent; recompile the model")
        dtype, shape = st.info(spec["name"])
        if dtype != spec["dtype"] or list(shape) != list(spec["shape"]):
            raise ArtifactError(f"weight {spec['name']!r} is {_fmt(dtype, shape)} in the file but "
                                f"{_fmt(spec['dtype'], spec['shape'])} in the signature", where=str(file),
                                fix="the artifact is inconsistent; recompile the model")
        params.append(tvm.runtime.tensor(st.get(spec["name"]), dev))
    return params


def load(path, *, device: str = "cpu", simulate: bool = False, threads: int | None = None) -> Model:
    """Verify the artifact at ``path``, then load its program and weights onto ``device`` (``cpu``, ``cuda[:N]``).
    A multi-device artifact runs under ``mpiexec``; ``simulate=True`` runs all of its ranks in this process instead
    (one thread and one set of weight shards per mesh device, collectives simulated). ``threads`` sizes the CPU
    thread pools (default: BMC_NUM_THREADS, TVM_NUM_THREADS, OMP_NUM_THREADS, then the CPUs this process may use)."""
    path = Path(path)
    manifest = verify_artifact(path)
    world = manifest["world_size"]
    if world != 1 and not simulate:
        raise ExecutionError(f"the artifact is for {world} ranks (mesh {manifest['mesh']['shape']}); this process "
                             "is one", where=str(path),
                             fix=f"launch it with mpiexec -n {world} bmc run {path} ..., or load it with "
                                 "simulate=True to run every rank in this process")
    if "main" not in manifest["programs"] or any(str(r) not in manifest["weights"] for r in range(world)):
        raise ArtifactError("manifest.json names no program 'main' or misses a rank's weights", where=str(path),
                            fix="the artifact is damaged; recompile the model")
    dev = _device(device, manifest["target"], str(path))
    if manifest["target"].get("kind") == "llvm":  # library kernels the program calls (BLAS GEMM), host CPU check
        from bmc.runtime.kernels import check_host_cpu, register_cpu_kernels

        cpu = (manifest.get("kernels") or {}).get("cpu") or {}
        try:
            check_host_cpu(cpu)
            register_cpu_kernels(required=cpu.get("requires", []), threads=threads)
        except RuntimeError as e:
            raise ArtifactError(str(e), where=str(path), fix="recompile the model on this machine") from e
    if world > 1:
        from bmc.runtime.simulate import register_simulated_collectives

        register_simulated_collectives()  # before the VMs are built: they resolve function names then
    program = path / manifest["programs"]["main"]
    try:
        lib = tvm.runtime.load_module(str(program))
        mains = [tvm.runtime.vm.VirtualMachine(lib, dev)["main"] for _ in range(world)]
    except Exception as e:  # noqa: BLE001  (TVM raises many types)
        raise ArtifactError(f"TVM could not load the program: {e}", where=str(program),
                            fix="recompile the model for this machine") from e
    ranks = [(mains[r], _load_weights(path, manifest, dev, r)) for r in range(world)]
    return Model(path, manifest, ranks, dev)
