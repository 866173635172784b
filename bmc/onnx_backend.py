"""An ``onnx.backend`` backend for bmc: ONNX → bmc IR → TVM (llvm) → Relax VM, all in memory.

    import bmc.onnx_backend as backend
    rep = backend.prepare(model)              # checks and imports lazily; compiles at the first run
    outs = rep.run([x, y])                    # a namedtuple-like of the outputs, in graph output order
    outs = backend.run_node(node, [x, y])     # one node, wrapped into a one-node model

A model is compiled once per input-shape signature (symbolic dims are bound from the arrays given to ``run``) and
the compiled program is cached on the ``BmcBackendRep``. bmc errors (``ModelError`` for an unsupported op or
attribute, ``CompileError`` for a TVM failure, ...) propagate as they are.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
from onnx.backend.base import Backend, BackendRep, Device, DeviceType, namedtupledict

from bmc.errors import ExecutionError, UsageError


# bmc carries narrow integers' values in 8-bit tensors, and float8/float4 as their codes in uint8
_INT_CARRIERS = {"int4": np.int8, "uint4": np.uint8, "int2": np.int8, "uint2": np.uint8}


def _contiguous(x: Any) -> np.ndarray:
    """A C-contiguous numpy array (0-d stays 0-d, unlike ``np.ascontiguousarray``); TensorProtos are decoded, and
    ml_dtypes' narrow types become the 8-bit arrays that carry them (integers' values, floats' codes)."""
    if isinstance(x, onnx.TensorProto):
        x = onnx.numpy_helper.to_array(x)
    try:
        a = np.asarray(x)
    except ValueError as e:  # ragged: a sequence of tensors (an ONNX sequence input), not a tensor
        raise UsageError(f"an input is not a tensor ({e})", where="BmcBackendRep.run",
                         fix="pass one numpy array per graph input; sequence inputs are not supported") from None
    if a.dtype.name in _INT_CARRIERS:
        a = a.astype(_INT_CARRIERS[a.dtype.name])
    elif a.dtype.name.startswith(("float8", "float4")):
        a = a.view(np.uint8)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _from_carrier(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A narrow output as its ml_dtypes type: integers from their values, floats from their codes."""
    return a.astype(dtype) if dtype.name in _INT_CARRIERS else a.view(dtype)


class _Compiled:
    """One compiled program: the VM entry point and the parameters bound after the inputs."""

    def __init__(self, graph):
        import tvm
        from tvm import relax

        from bmc.codegen.build import build
        from bmc.codegen.targets import TargetSpec
        from bmc.compiler import verify_graph
        from bmc.runtime.kernels import pack_params

        verify_graph(graph)
        self.graph = graph
        self.built = build(graph, TargetSpec.parse("llvm"))
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(self.built.executable, self.device)
        self.params = pack_params(self.built.kernels.get("cpu"), [p.name for p in graph.params],
                                  [tvm.runtime.tensor(_contiguous(graph.weights[p.name].numpy()), self.device)
                                   for p in graph.params])
        self.input_types = [v.type for v in graph.inputs]

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        import tvm

        args = [tvm.runtime.tensor(a, self.device) for a in arrays]
        out = self.vm["main"](*args, *self.params)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [o.numpy() for o in outs]


SHAPE_LIKE_ELEMENTS = 64  # integer inputs up to this size may be folded in when a shape is computed from them
_NEEDS_CONSTANT = re.compile(r"must be a compile-time constant, but '(.*)' is computed at run time")


def _runtime_input_needed(err: Exception) -> str | None:
    """The tensor whose value the importer needed at compile time, from its ModelError (None if another error)."""
    m = _NEEDS_CONSTANT.search(str(err))
    return m.group(1) if m else None


class BmcBackendRep(BackendRep):
    """A prepared model: compiles per input-shape signature on first use and caches the result."""

    def __init__(self, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any):
        from bmc.frontend.onnx.loader import NARROW, check_graph, check_versions

        self.model = model
        self.device = device
        self.kwargs = kwargs
        check_versions(model)
        check_graph(model.graph)
        init_names = {i.name for i in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in init_names]
        self.output_names = [o.name for o in model.graph.output]
        self._narrow_outputs = {k: onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)
                                for k, o in enumerate(model.graph.output) if o.type.tensor_type.elem_type in NARROW}
        self._cache: dict[tuple, _Compiled] = {}
        # inputs whose *values* the importer needs at compile time (a Reshape's shape, a Slice's starts, ...):
        # bmc's IR has static shapes, so the program is specialized on their values (part of the cache key)
        self.value_inputs: set[str] = set()

    # ---- inputs -------------------------------------------------------------------------------------------
    def _arrays(self, inputs: Any) -> list[np.ndarray]:
        if isinstance(inputs, (np.ndarray, onnx.TensorProto)) or np.isscalar(inputs):
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise ExecutionError(f"missing input(s) {', '.join(missing)}", where="BmcBackendRep.run",
                                     fix=f"the model takes {', '.join(self.input_names)}")
            inputs = [inputs[n] for n in self.input_names]
        inputs = list(inputs)
        if len(inputs) != len(self.input_names):
            raise ExecutionError(f"{len(inputs)} input(s) given but the model takes {len(self.input_names)}: "
                                 f"{', '.join(self.input_names)}", where="BmcBackendRep.run")
        return [_contiguous(x) for x in inputs]

    def compiled(self, arrays: Sequence[np.ndarray]) -> _Compiled:
        """The program for these inputs' shapes and dtypes (imported, verified and built at first use)."""
        from bmc.errors import ModelError

        while True:
            key = tuple((a.shape, a.dtype.str, a.tobytes() if n in self.value_inputs else None)
                        for n, a in zip(self.input_names, arrays))
            prog = self._cache.get(key)
            if prog is not None:
                return prog
            try:
                graph = self._import(arrays)
            except ModelError as e:
                name = _runtime_input_needed(e)
                if name is None:
                    raise
                if name in self.input_names:
                    wanted = {name}
                else:  # computed from the inputs: fold every small integer input (shape-like) in
                    wanted = {n for n, a in zip(self.input_names, arrays)
                              if a.dtype.kind in "iu" and a.size <= SHAPE_LIKE_ELEMENTS}
                if not wanted - self.value_inputs:
                    raise
                self.value_inputs |= wanted  # retry with those inputs' values folded in
                continue
            prog = self._cache[key] = _Compiled(graph)
            return prog

    def _import(self, arrays: Sequence[np.ndarray]):
        from bmc.frontend.onnx import import_model

        model = self.model
        if self.value_inputs:
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
            for n, a in zip(self.input_names, arrays):
                if n in self.value_inputs:
                    model.graph.initializer.append(onnx.numpy_helper.from_array(a, n))
        shapes = {n: tuple(int(d) for d in a.shape) for n, a in zip(self.input_names, arrays)
                  if n not in self.value_inputs}
        return import_model(model, shapes)

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        from bmc.ir.types import np_dtype

        arrays = self._arrays(inputs)
        prog = self.compiled(arrays)
        runtime = [(n, a) for n, a in zip(self.input_names, arrays) if n not in self.value_inputs]
        for (name, a), t in zip(runtime, prog.input_types):
            want = np_dtype(t.dtype)
            if a.dtype != want:
                raise ExecutionError(f"input {name!r} has dtype {a.dtype}, the model declares {t.dtype}",
                                     where="BmcBackendRep.run", fix=f"pass a {t.dtype} array")
        outs = prog([a for n, a in zip(self.input_names, arrays) if n not in self.value_inputs])
        outs = [_from_carrier(o, self._narrow_outputs[k]) if k in self._narrow_outputs else o
                for k, o in enumerate(outs)]
        return namedtupledict("Outputs", self.output_names)(*outs)


class BmcBackend(Backend):
    """bmc as an ONNX backend (CPU only: programs are compiled for llvm and run in the TVM Relax VM)."""

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        from bmc.frontend.onnx import supported_ops

        ops = set(supported_ops())
        return cls.supports_device(device) and all(
            n.domain in ("", "ai.onnx") and n.op_type in ops for n in model.graph.node)

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> BmcBackendRep:
        if not cls.supports_device(device):
            raise UsageError(f"device {device!r} is not supported by the bmc ONNX backend", where="device",
                             fix="use device='CPU'")
        return BmcBackendRep(model, device, **kwargs)

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple[Any, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU",
                 outputs_info: Sequence[tuple[np.dtype, tuple[int, ...]]] | None = None,
                 **kwargs: Any) -> tuple[Any, ...]:
        """Run one node: it is wrapped into a one-node model whose inputs are the node's non-empty inputs."""
        names = [n for n in node.input if n]
        if isinstance(inputs, Mapping):
            arrays = [_contiguous(inputs[n]) for n in names]
        else:
            arrays = [_contiguous(x) for x in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
        if len(arrays) != len(names):
            raise ExecutionError(f"node {node.op_type} has {len(names)} input(s) but {len(arrays)} were given",
                                 where="run_node")
        seen: dict[str, np.ndarray] = {}
        for n, a in zip(names, arrays):
            seen.setdefault(n, a)
        graph_inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                        for n, a in seen.items()]
        graph_outputs = []
        for k, n in enumerate(o for o in node.output if o):
            if outputs_info is not None and k < len(outputs_info):
                dtype, shape = outputs_info[k]
                graph_outputs.append(onnx.helper.make_tensor_value_info(
                    n, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
            else:
                graph_outputs.append(onnx.helper.make_empty_tensor_value_info(n))
        graph = onnx.helper.make_graph([node], f"{node.op_type}_node", graph_inputs, graph_outputs)
        opset = kwargs.pop("opset_version", None) or onnx.defs.onnx_opset_version()
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        return cls.prepare(model, device, **kwargs).run(list(seen.values()))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        try:
            return Device(device).type == DeviceType.CPU
        except (AttributeError, ValueError):
            return False


backend = BmcBackend
prepare = BmcBackend.prepare
run_model = BmcBackend.run_model
run_node = BmcBackend.run_node
supports_device = BmcBackend.supports_device
is_compatible = BmcBackend.is_compatible

__all__ = ["BmcBackend", "BmcBackendRep", "backend", "prepare", "run_model", "run_node", "supports_device",
           "is_compatible"]
