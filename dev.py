#!/usr/bin/env python3
"""Set-up and entry point for developers and CI. Needs only Python >= 3.11.

    python3 dev.py demo     # create .venv, install bmc + deps from PyPI, compile and run the embedded model
    python3 dev.py test     # same set-up, then the whole test suite (fast default set)
    python3 dev.py test -m slow   # extra pytest arguments are passed through
    python3 dev.py gpu-check      # prepare .gpu/ (CUDA artifacts, runtime-only TVM, wheels) for a lent GPU machine,
                                  # which then runs `bash scripts/gpu_check.sh` (needs nvcc here)

The venv is reinstalled only when pyproject.toml, CMakeLists.txt or cpp/ change (their hash is stored in the venv).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"bmc needs Python >= 3.11, this is {sys.version.split()[0]}")
    stamp = VENV / ".bmc-installed"
    # the install builds the native libraries into the package: a change to their sources reinstalls too
    sources = [ROOT / "pyproject.toml", ROOT / "CMakeLists.txt", *sorted((ROOT / "cpp").glob("*"))]
    want = hashlib.sha256(b"".join(p.read_bytes() for p in sources if p.is_file())).hexdigest()
    if stamp.exists() and stamp.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev.py: installing bmc and its dependencies (PyPI)", flush=True)
    subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e",
                           f"{ROOT}[test]"])
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "gpu-check"):
        print(__doc__)
        return 2
    ensure_venv()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if argv[0] == "demo":
        cmd = [str(PY), "-m", "bmc", "demo", *argv[1:]]
    elif argv[0] == "gpu-check":
        cmd = [str(PY), str(ROOT / "scripts" / "prepare_gpu_check.py"), *argv[1:]]
    else:
        cmd = [str(PY), "-m", "pytest", *argv[1:]]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
