"""The native runtime library (CMakeLists.txt + cpp/): configure, build, load, call its tvm-ffi globals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tools_or_skip() -> tuple[str, str | None]:
    """cmake and a C++ compiler are needed (ninja is used when present); skip, saying which is missing."""
    cmake = shutil.which("cmake")
    cxx = os.environ.get("CXX") or next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)
    missing = [name for name, tool in (("cmake", cmake), ("a C++ compiler (c++, g++, clang++ or $CXX)", cxx))
               if not tool]
    if missing:
        pytest.skip(f"cannot build the native library: {' and '.join(missing)} not found "
                    "(pip install cmake ninja; apt-get install g++)")
    return cmake, shutil.which("ninja")


@pytest.fixture(scope="module")
def native_lib(tmp_path_factory) -> Path:
    """Configure + build into a fresh directory and return the path of libbmc_runtime.so."""
    cmake, ninja = _tools_or_skip()
    build = tmp_path_factory.mktemp("native-build")
    configure = [cmake, "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"]
    if ninja:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    t0 = time.perf_counter()
    for cmd in (configure, [cmake, "--build", str(build)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(f"native build: {time.perf_counter() - t0:.1f} s")
    (lib,) = [p for p in build.glob("libbmc_runtime.*") if p.suffix in (".so", ".dylib")]
    return lib


@pytest.fixture(scope="module")
def loaded(native_lib):
    import tvm_ffi

    return tvm_ffi.load_module(str(native_lib))


def test_version(loaded):
    import tvm

    version = tvm.get_global_func("bmc.native.version")()
    assert isinstance(version, str) and version.startswith("bmc-native 0.1.0 (tvm-ffi ")


def test_add_one_through_tvm(loaded):
    import tvm

    add_one = tvm.get_global_func("bmc.native.add_one")
    x = np.random.default_rng(0).standard_normal((3, 5)).astype("float32")
    out = tvm.runtime.empty(x.shape, "float32")
    add_one(tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), x + 1)


def test_add_one_rejects_bad_arguments(loaded):
    import tvm

    add_one = tvm.get_global_func("bmc.native.add_one")
    out = tvm.runtime.empty((4,), "float32")
    with pytest.raises(TypeError, match="x must be float32, got int32"):
        add_one(tvm.runtime.tensor(np.zeros(4, "int32")), out)
    with pytest.raises(ValueError, match="x has 3 elements but out has 4"):
        add_one(tvm.runtime.tensor(np.zeros(3, "float32")), out)


def test_mpi_world_size_needs_initialized_mpi(native_lib, loaded):
    """-1 before MPI_Init (the library never initializes MPI), the world size after mpi4py did.

    Runs in a fresh interpreter so this test session's MPI state is not touched.
    """
    import tvm

    if "MPI" not in tvm.get_global_func("bmc.native.version")():
        pytest.skip("built without MPI (no MPI C++ compiler wrapper found)")
    pytest.importorskip("mpi4py")
    script = textwrap.dedent(f"""
        import tvm_ffi
        tvm_ffi.load_module({str(native_lib)!r})
        world_size = tvm_ffi.get_global_func("bmc.native.mpi_world_size")
        before = world_size()
        from mpi4py import MPI
        print(before, world_size(), MPI.COMM_WORLD.Get_size())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    before, after, expected = map(int, proc.stdout.split())
    assert (before, after) == (-1, expected)


LOCK_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bmc.runtime.kernels import cache_lock
    folder, log, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    with cache_lock(folder):
        with open(log, "a") as f:
            f.write(f"start {name}\\n")
        time.sleep(0.4)
        with open(log, "a") as f:
            f.write(f"end {name}\\n")
""")


def test_builds_and_tuning_into_one_cache_take_turns(tmp_path):  # FAILURES.md 32
    """Three processes holding the lock of one cache folder (what a native build and a tuning database take) run
    their critical sections one at a time, never interleaved."""
    script = tmp_path / "lock.py"
    script.write_text(LOCK_SCRIPT)
    log = tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(log), str(i)], env=env)
             for i in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    lines = log.read_text().split()
    pairs = list(zip(lines[0::4], lines[1::4], lines[2::4], lines[3::4]))
    assert len(pairs) == 3 and all(a == "start" and c == "end" and b == d for a, b, c, d in pairs)
