"""Time the kernel candidates of ``bmc compile --tune N --tune-export DIR`` on this machine's device.

Needs only the TVM runtime (no compiler): this runs on the machine with the GPU, which may have nothing else of
TVM (``scripts/gpu_check.sh`` runs it with a runtime-only TVM). Each candidate is a library holding one kernel;
its arguments are random (floats normal, integers zero, so an index is always in range). A candidate that fails
to load or run is reported with its error and the others are still measured. The times go to ``timings.json``
in the folder, for ``bmc tune import`` on the compiling machine.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from bmc.errors import UsageError


def _tensor(arg: dict, rng: np.random.Generator, dev):
    import tvm

    dtype, shape = arg["dtype"], tuple(arg["shape"])
    if dtype == "bfloat16":  # the float32 values' upper halves (no ml_dtypes needed on the device's machine)
        bits = (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return tvm.runtime.empty(shape, dtype, dev).copyfrom(bits)
    np_dtype = np.dtype(dtype)
    data = rng.standard_normal(shape).astype(np_dtype) if np_dtype.kind == "f" else np.zeros(shape, np_dtype)
    return tvm.runtime.tensor(data, dev)


def measure_candidates(folder: Path, *, number: int = 10, repeat: int = 3, min_repeat_ms: int = 20) -> dict:
    """Time every candidate of ``folder`` (``repeat`` medians of ``number`` calls, each at least ``min_repeat_ms``);
    writes and returns ``timings.json``: ``{file: {"secs": [...]}}`` or ``{file: {"error": "..."}}``."""
    import tvm

    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the candidates' manifest: {e}", where=str(folder / "manifest.json"),
                         fix="export the candidates with `bmc compile --tune N --tune-export DIR`") from None
    if manifest.get("kind") == "cuda":
        from bmc.runtime.cuda import device_count, enable

        enable()
        if device_count() == 0:
            raise UsageError("the candidates are CUDA kernels and this machine has no GPU", where=str(folder),
                             fix="run `bmc tune measure` on the machine with the GPU")
        dev = tvm.cuda(0)
    else:
        dev = tvm.cpu()
    rng = np.random.default_rng(0)
    out: dict = {"device": str(dev), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "candidates": {}}
    for c in manifest["candidates"]:
        try:
            lib = tvm.runtime.load_module(str(folder / c["file"]))
            args = [_tensor(a, rng, dev) for a in c["args"]]
            timer = lib.time_evaluator(c["func"], dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
            out["candidates"][c["file"]] = {"secs": [float(t) for t in timer(*args).results]}
        except Exception as e:  # noqa: BLE001  (a candidate that does not run is reported, not fatal)
            out["candidates"][c["file"]] = {"error": (str(e).strip().splitlines() or [type(e).__name__])[0]}
    tmp = folder / f".timings.json.{os.getpid()}"
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(folder / "timings.json")
    return out


def best_per_kernel(manifest: dict, timings: dict) -> list[dict]:
    """Per kernel of ``manifest``: its default schedule's and its fastest candidate's median seconds (None when
    nothing of the kind was measured), that candidate's file and trace digest, and how many candidates ran."""
    import statistics

    measured = timings.get("candidates", {})
    median = {c["file"]: statistics.median(measured[c["file"]]["secs"]) for c in manifest["candidates"]
              if measured.get(c["file"], {}).get("secs")}
    rows = []
    for i, name in enumerate(manifest["tasks"]):
        mine = [c for c in manifest["candidates"] if c["task"] == i and c["file"] in median]
        default = next((median[c["file"]] for c in mine if c["trace"] is None), None)
        best = min((c for c in mine if c["trace"] is not None), key=lambda c: median[c["file"]], default=None)
        rows.append({"kernel": name, "default_s": default, "best_s": median[best["file"]] if best else None,
                     "best_file": best["file"] if best else None, "trace": best["trace"] if best else None,
                     "measured": sum(c["trace"] is not None for c in mine)})
    return rows
