"""One error hierarchy for bmc.

Every user-facing error says *what* is wrong, *where* (ONNX node, op, tensor, flag, file) and *how to fix it*.
The CLI prints ``str(err)`` without a traceback (unless ``-v``) and exits with ``err.exit_code``; the exit code
differs by category so scripts can tell a bad flag from a bad model from a broken artifact.
"""

from __future__ import annotations


class BmcError(Exception):
    """Base of every error bmc raises on purpose."""

    exit_code = 1
    category = "error"

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [self.what]
        if self.where:
            parts[0] = f"{self.where}: {self.what}"
        if self.fix:
            parts.append(f"  fix: {self.fix}")
        return "\n".join(parts)


class UsageError(BmcError):
    """A bad command-line flag or API argument."""

    exit_code = 2
    category = "usage error"


class ModelError(BmcError):
    """The ONNX model cannot be read or imported (malformed, unsupported ops, bad shapes)."""

    exit_code = 3
    category = "model error"


class PlanningError(BmcError):
    """No sharding plan satisfies the constraints."""

    exit_code = 4
    category = "planning error"


class CompileError(BmcError):
    """Lowering or code generation failed for an op or target."""

    exit_code = 5
    category = "compile error"


class ArtifactError(BmcError):
    """A .bmc artifact is missing, corrupted, or from an incompatible version."""

    exit_code = 6
    category = "artifact error"


class ExecutionError(BmcError):
    """A run failed: bad inputs, a failing rank, a lost collective."""

    exit_code = 7
    category = "runtime error"


class InternalError(BmcError):
    """A bug in bmc: always reported with a traceback and the versions."""

    exit_code = 70
    category = "internal error (a bug in bmc; please report it with the traceback below)"


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``: sizes in messages and reports."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover
