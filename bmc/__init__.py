"""bmc: a big-model compiler. ONNX in, sharded SPMD programs compiled with Apache TVM out, run under MPI.

    import bmc
    bmc.compile("model.onnx", "model.bmc", target="llvm")
    model = bmc.load("model.bmc")
    outputs = model(input_ids=ids)
"""

__version__ = "0.1.0"


def compile(model, output, **options):  # noqa: A001  (the natural name for the public API)
    """Compile an ONNX model (path or ModelProto) into a ``.bmc`` artifact; see ``bmc.compiler.compile_model``."""
    from bmc.compiler import compile_model

    return compile_model(model, output, **options)


def load(path, **options):
    """Load a ``.bmc`` artifact (verified before anything is loaded) and return a callable model."""
    from bmc.runtime.executor import load as _load

    return _load(path, **options)


__all__ = ["__version__", "compile", "load"]
