"""bmc runtime: the artifact format (read, write, verify), the safetensors weights, and the executor.

Importing this package is cheap: TVM is imported only when ``load`` (``bmc.runtime.executor``) is used.
"""

from bmc.runtime.artifact import (FORMAT_VERSION, graph_signature, read_manifest, verify_artifact,
                                  write_artifact)
from bmc.runtime.safetensors import SafetensorsFile, write_safetensors


def load(path, **options):
    """Verify and load an artifact; see ``bmc.runtime.executor.load``."""
    from bmc.runtime.executor import load as _load

    return _load(path, **options)


__all__ = ["FORMAT_VERSION", "SafetensorsFile", "graph_signature", "load", "read_manifest", "verify_artifact",
           "write_artifact", "write_safetensors"]
