"""``bmc demo``: the main job end to end on the embedded GPT-style model.

It compiles the model with the automatic plan for a 2x2 mesh, prints the plan summary (and writes it as an HTML
report, ``bmc-demo-plan.html`` in the temporary folder), runs the artifact on 4 MPI ranks (``mpiexec -n 4 bmc run
...``; in one process with simulated collectives when no ``mpiexec`` is found), then compares the logits with
onnxruntime and prints a short summary.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = Path(__file__).parent / "models" / "gpt2-tiny.onnx"
TOLERANCE = 1e-4  # max abs error relative to the output's scale (float32)
MPI_TIMEOUT_S = 300
# The tiny model fits any real device, so the search would rightly replicate it; a per-device budget below its
# replicated footprint makes the demo show a sharded plan (weights split, collectives inserted).
DEMO_MEMORY_PER_DEVICE = 150_000


def main(target: str = "llvm", batch: int = 2, seq: int = 16, mesh: str = "2x2") -> int:
    import bmc

    ids = np.random.default_rng(0).integers(0, 256, size=(batch, seq), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        art, inputs, outputs = Path(tmp) / "gpt2-tiny.bmc", Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        t0 = time.perf_counter()
        summary = bmc.compile(MODEL, art, target=target, mesh=mesh, input_shapes={"input_ids": (batch, seq)},
                              memory_per_device=DEMO_MEMORY_PER_DEVICE)
        compile_s = time.perf_counter() - t0
        plan = json.loads((art / "plan.json").read_text())
        report = Path(tempfile.gettempdir()) / "bmc-demo-plan.html"
        from bmc.sharding.htmlreport import plan_html

        report.write_text(plan_html(plan, MODEL.name, f"demo plan on mesh {mesh}"), "utf-8")
        np.savez(inputs, input_ids=ids)
        t0 = time.perf_counter()
        how = _run(art, inputs, outputs, plan)
        run_s = time.perf_counter() - t0
        with np.load(outputs) as out:
            logits = out["logits"]
    expected = _onnxruntime(ids)
    err = float(np.max(np.abs(logits - expected)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    ok = err <= TOLERANCE * scale
    kinds = collections.Counter(f"{c['kind']}({','.join(c['axes'])})" for c in plan["collectives"])
    solver = plan.get("solver", {})
    print(f"bmc demo: {MODEL.name} ({summary['weight_bytes'] / 1e3:.1f} kB weights), input_ids {ids.shape}")
    print(f"  plan for mesh {mesh} ({plan['strategy']}, {solver.get('status', 'n/a')} in "
          f"{solver.get('total_s', 0):.2f} s): {dict(kinds) or 'no collectives'}; peak "
          f"{plan['memory']['peak_bytes_per_device'] / 1e3:.1f} kB/device (budget {DEMO_MEMORY_PER_DEVICE / 1e3:.0f} kB)")
    print(f"  plan report: {report} (open it in a browser; `bmc show ARTIFACT --html FILE` writes one for any "
          "artifact)")
    print(f"  compiled for {target} in {compile_s:.2f} s -> artifact {summary['size_bytes'] / 1e3:.0f} kB, "
          f"{summary['mesh']['shape']} mesh, per-rank weights")
    print(f"  ran on {how} in {run_s:.1f} s -> logits {logits.shape}")
    print(f"  vs onnxruntime: max abs error {err:.2e} (tolerance {TOLERANCE:.0e} x scale {scale:.2f}): "
          f"{'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _run(art: Path, inputs: Path, outputs: Path, plan: dict) -> str:
    """Run the artifact on its ranks with mpiexec; without one, in this process with simulated collectives."""
    from bmc.runtime.mpi import mpiexec_path

    world = int(np.prod(plan["mesh"]["shape"]))
    mpiexec = mpiexec_path()
    if not Path(mpiexec).exists() and not _which(mpiexec):
        import bmc

        model = bmc.load(art, simulate=True)
        np.savez(outputs, **model.run(dict(np.load(inputs))))
        return f"{world} simulated ranks in one process (no mpiexec found)"
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")}
    cmd = [mpiexec, "-n", str(world), sys.executable, "-m", "bmc", "run", str(art), "--inputs", str(inputs),
           "--output", str(outputs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=MPI_TIMEOUT_S)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        from bmc.errors import ExecutionError

        raise ExecutionError(f"`mpiexec -n {world} bmc run` failed with exit code {proc.returncode}",
                             where="bmc demo", fix="see the ranks' output above")
    return f"{world} MPI ranks (mpiexec -n {world} bmc run)"


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def _onnxruntime(ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]
