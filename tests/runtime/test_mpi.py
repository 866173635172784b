"""Real MPI runs: ``mpiexec -n N`` subprocesses (2 or 4 ranks, with timeouts) of compiled sharded artifacts, the
Python and native collectives (bit-identical), and the faults of FAILURES.md 39-43 and 47.

Artifacts are compiled once in this process; the ranks only load them. ``BMC_CPU_KERNELS=numpy`` keeps the ranks
quiet when the native CPU kernels are not built (the MPI path does not depend on them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "models"
MPIEXEC = str(Path(sys.executable).parent / "mpiexec") if (Path(sys.executable).parent / "mpiexec").exists() \
    else shutil.which("mpiexec")

if MPIEXEC is None:  # pragma: no cover
    pytest.skip("mpiexec is not installed (pip install mpich mpi4py)", allow_module_level=True)
pytest.importorskip("mpi4py")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_", "MPI_LOCAL", "BMC_FAULT"))
           and k not in ("TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")}  # set by this process's compiles
    env.update(PYTHONPATH=str(ROOT), BMC_CPU_KERNELS="numpy", BMC_CHECK_COLLECTIVES="1",
               BMC_COLLECTIVE_TIMEOUT_S="60")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def mpirun(n: int, args: list[str], *, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([MPIEXEC, "-n", str(n), *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(**env), cwd=str(ROOT))


def bmc_run(n: int, artifact: Path, inputs: Path, output: Path, *extra: str, timeout: float = 120, **env):
    args = [sys.executable, "-m", "bmc", "run", str(artifact), "--inputs", str(inputs), "-o", str(output), *extra]
    return mpirun(n, args, timeout=timeout, **env) if n else subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=str(ROOT))


# ------------------------------------------------------------------------------------------ fixtures

_ARTIFACTS: dict = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mpi")


@pytest.fixture(scope="module")
def compiled(workdir):
    """``compiled(model, mesh) -> (artifact, inputs.npz, {output name: reference})``, compiled once per module."""
    import bmc

    def get(model: str, mesh: str):
        key = (model, mesh)
        if key not in _ARTIFACTS:
            data = np.load(FIXTURES / f"{model}_dynamo.npz")
            out = workdir / f"{model}_{mesh}.bmc"
            bmc.compile(FIXTURES / f"{model}_dynamo.onnx", out, mesh=mesh, strategy="dp+megatron",
                        input_shapes={"batch": 2, "seq": 16})
            inputs = workdir / f"{model}_in.npz"
            np.savez(inputs, **{k: data[k] for k in data.files if not k.startswith("output:")})
            refs = [data[k] for k in data.files if k.startswith("output:")]
            _ARTIFACTS[key] = (out, inputs, refs)
        return _ARTIFACTS[key]

    return get


@pytest.fixture(scope="module")
def native_lib(tmp_path_factory) -> Path:
    """The native MPI collectives, built once into a temporary folder (skips when cmake or a compiler is missing)."""
    from bmc.runtime.mpi import build_native

    try:
        return build_native(tmp_path_factory.mktemp("mpi-native"))
    except RuntimeError as e:  # pragma: no cover
        pytest.skip(f"the native MPI collectives cannot be built here: {e}")


def _check(outputs: Path, refs: list[np.ndarray]) -> None:
    with np.load(outputs) as got:
        assert len(got.files) == len(refs)
        for name, want in zip(got.files, refs):
            err = float(np.max(np.abs(got[name] - want)))
            assert err <= 1e-4 * max(1.0, float(np.max(np.abs(want)))), (name, err)


# ------------------------------------------------------------------------------------------ end to end

@pytest.mark.parametrize("model,mesh", [("gpt2", "1x2"), ("bert", "2x1")])
def test_bmc_run_matches_onnxruntime(compiled, workdir, model, mesh):
    artifact, inputs, refs = compiled(model, mesh)
    out = workdir / f"{model}_{mesh}.out.npz"
    r = bmc_run(2, artifact, inputs, out, "--collectives", "python")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("wrote ") == 1 and "ran on 2 MPI ranks" in r.stdout  # only rank 0 prints
    _check(out, refs)


def test_native_and_python_collectives_are_bit_identical_on_2x2(compiled, workdir, native_lib):
    artifact, inputs, refs = compiled("gpt2", "2x2")
    outs = {}
    for impl in ("python", "native"):
        out = workdir / f"gpt2_2x2.{impl}.npz"
        r = bmc_run(4, artifact, inputs, out, "--collectives", impl, BMC_MPI_NATIVE_LIB=native_lib)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"ran on 4 MPI ranks (mesh 2x2, {impl} collectives)" in r.stdout
        _check(out, refs)
        with np.load(out) as f:
            outs[impl] = {k: f[k] for k in f.files}
    for name in outs["python"]:
        assert outs["python"][name].tobytes() == outs["native"][name].tobytes(), name


_SLOW_CASES = [(m, mesh) for m in ("gpt2", "bert", "llama", "opt") for mesh in ("1x2", "2x1", "2x2")]


@pytest.mark.slow
@pytest.mark.parametrize("model,mesh", _SLOW_CASES)
@pytest.mark.parametrize("impl", ["python", "native"])
def test_every_fixture_on_every_mesh(compiled, workdir, native_lib, model, mesh, impl):
    artifact, inputs, refs = compiled(model, mesh)
    out = workdir / f"{model}_{mesh}.{impl}.npz"
    n = int(np.prod([int(s) for s in mesh.split("x")]))
    r = bmc_run(n, artifact, inputs, out, "--collectives", impl, BMC_MPI_NATIVE_LIB=native_lib)
    assert r.returncode == 0, r.stdout + r.stderr
    _check(out, refs)


API_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import bmc
    artifact, inputs, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = bmc.load(artifact)
    rank = model.mpi.rank
    data = dict(np.load(inputs))
    a = model.run(data if rank == 0 else {})          # inputs on rank 0 only: broadcast
    b = model.run(data)                                # inputs on every rank: used as given
    same = all(np.array_equal(a[k], b[k]) for k in a)
    with open(f"{out}.r{rank}.json", "w") as f:
        json.dump({"rank": rank, "coord": model.mpi.coord, "same": same, "stats": model.stats,
                   "names": list(a), "sum": float(sum(float(v.sum()) for v in a.values()))}, f)
""")


def test_python_api_under_mpi_returns_global_outputs_on_every_rank(compiled, workdir):
    artifact, inputs, refs = compiled("gpt2", "1x2")
    script = workdir / "api.py"
    script.write_text(API_SCRIPT)
    r = mpirun(2, [sys.executable, str(script), str(artifact), str(inputs), str(workdir / "api")],
               BMC_COLLECTIVES="python")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads((workdir / f"api.r{rank}.json").read_text()) for rank in range(2)]
    assert [d["rank"] for d in rows] == [0, 1] and [d["coord"] for d in rows] == [[0, 0], [0, 1]]
    assert all(d["same"] for d in rows) and rows[0]["sum"] == rows[1]["sum"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    for d in rows:  # each rank reads its own weights file (+ program and plan), never the other's
        own = manifest["files"][manifest["weights"][str(d["rank"])]]["size"]
        other = manifest["files"][manifest["weights"][str(1 - d["rank"])]]["size"]
        program = sum(v["size"] for k, v in manifest["files"].items() if not k.startswith("weights/"))
        assert own <= d["stats"]["bytes_read"] <= own + program < own + other + program


SPLIT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import bmc
    artifact, inputs, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = bmc.load(artifact)
    rank = model.mpi.rank
    got = model.run(dict(np.load(inputs)) if rank == 0 else {})
    where = model.output_slices["logits"]
    np.savez(f"{out}.r{rank}.npz", block=got["logits"], start=[s.start for s in where], stop=[s.stop for s in where])
    whole = model.gather_outputs(got)
    assert (whole is None) == (rank != 0)
    if rank == 0:
        np.savez(f"{out}.whole.npz", **whole)
""")


def test_split_outputs_under_mpi_each_rank_its_block(workdir):
    """``--output-shard logits=[{x},{},{y}]`` on 4 real ranks: each rank returns its block of the logits (where
    ``output_slices`` says), ``gather_outputs`` puts them together on rank 0, and ``bmc run`` writes them whole, all
    equal to onnxruntime's."""
    import bmc

    data = np.load(FIXTURES / "gpt2_dynamo.npz")
    artifact = workdir / "gpt2_split.bmc"
    bmc.compile(FIXTURES / "gpt2_dynamo.onnx", artifact, mesh="2x2", strategy="dp+megatron",
                input_shapes={"batch": 2, "seq": 16}, output_shards={"logits": "[{x}, {}, {y}]"})
    inputs = workdir / "gpt2_split_in.npz"
    np.savez(inputs, input_ids=data["input_ids"])
    want, tol = data["output:logits"], 1e-4 * max(1.0, float(np.max(np.abs(data["output:logits"]))))
    script = workdir / "split.py"
    script.write_text(SPLIT_SCRIPT)
    r = mpirun(4, [sys.executable, str(script), str(artifact), str(inputs), str(workdir / "split")])
    assert r.returncode == 0, r.stdout + r.stderr
    starts = set()
    for rank in range(4):
        with np.load(workdir / f"split.r{rank}.npz") as got:
            where = tuple(slice(a, b) for a, b in zip(got["start"], got["stop"]))
            assert got["block"].shape == (1, 16, 128)
            assert float(np.max(np.abs(got["block"] - want[where]))) <= tol
            starts.add(tuple(got["start"]))
    assert len(starts) == 4  # four different blocks
    with np.load(workdir / "split.whole.npz") as whole:
        assert float(np.max(np.abs(whole["logits"] - want))) <= tol
    r = bmc_run(4, artifact, inputs, workdir / "split_out.npz")
    assert r.returncode == 0, r.stdout + r.stderr
    _check(workdir / "split_out.npz", [want])


FED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import bmc
    from bmc.errors import ExecutionError
    xattn, loop, data_path, out = sys.argv[1:5]
    data = dict(np.load(data_path))
    res = {}
    model = bmc.load(xattn)
    rank = model.mpi.rank
    names = ("x", "memory", "memory_mask")
    own = {n: data[n][model.input_slices[n]] for n in names}           # every rank passes its own blocks
    res["blocks"] = model.run(own)["hidden"].tolist()
    res["whole"] = model.run({n: data[n] for n in names} if rank == 0 else {})["hidden"].tolist()
    try:                                                                # rank 0's block alone: refused everywhere
        model.run(own if rank == 0 else {})
        res["error"] = None
    except ExecutionError as e:
        res["error"] = str(e)
    double = bmc.load(loop)                                             # y = 2x, x fed and y returned as blocks
    x = data["loop_x"][double.input_slices["x"]]
    for _ in range(3):
        x = double.run({"x": x})["y"]                                   # each rank's block, fed straight back
    res["loop"] = x.tolist()
    res["loop_slices"] = [[s.start, s.stop] for s in double.output_slices["y"]]
    with open(f"{out}.r{rank}.json", "w") as f:
        json.dump(res, f)
""")


def test_inputs_fed_as_blocks_under_mpi(tmp_path):
    """2 real ranks: the cross-attention fixture with its memory fed as blocks gives onnxruntime's output whether
    every rank passes just its blocks or rank 0 passes the whole inputs; rank 0 passing only its block is one error
    on every rank; and an output left split fed back as a split input (``y = 2x``, three steps) never leaves its
    rank (the plan has no collective)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import bmc

    data = dict(np.load(FIXTURES / "xattn_dynamo.npz"))
    bmc.compile(FIXTURES / "xattn_dynamo.onnx", tmp_path / "xattn.bmc", mesh="2",
                input_shards={"memory": "[{},{x},{}]", "memory_mask": "[{},{x}]"},
                input_shapes={"batch": 2, "seq": 48})
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double",
                              [vi("x", TensorProto.FLOAT, [4, 8])], [vi("y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(np.float32(2.0), "two")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "double.onnx"))
    bmc.compile(tmp_path / "double.onnx", tmp_path / "double.bmc", mesh="2", input_shards={"x": "[{x}, {}]"},
                output_shards={"y": "[{x}, {}]"})
    assert json.loads((tmp_path / "double.bmc" / "plan.json").read_text())["collectives"] == []
    data["loop_x"] = np.arange(32, dtype=np.float32).reshape(4, 8)
    np.savez(tmp_path / "data.npz", **data)
    script = tmp_path / "fed.py"
    script.write_text(FED_SCRIPT)
    r = mpirun(2, [sys.executable, str(script), str(tmp_path / "xattn.bmc"), str(tmp_path / "double.bmc"),
                   str(tmp_path / "data.npz"), str(tmp_path / "fed")])
    assert r.returncode == 0, r.stdout + r.stderr
    want = data["output:hidden"]
    for rank in range(2):
        res = json.loads((tmp_path / f"fed.r{rank}.json").read_text())
        for key in ("blocks", "whole"):
            assert float(np.max(np.abs(np.array(res[key]) - want))) <= 1e-5 * float(np.max(np.abs(want))), key
        assert "given as rank 0's block" in res["error"] and "[rank 0]" in res["error"]
        rows = slice(*res["loop_slices"][0])
        np.testing.assert_array_equal(np.array(res["loop"]), 8 * data["loop_x"][rows])
        assert res["loop_slices"][0] == [2 * rank, 2 * rank + 2]


DECODE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import bmc
    artifact, data_path, out, outputs, fed, made = sys.argv[1:7]  # the step's other input and output
    data = np.load(data_path)
    model = bmc.load(artifact)
    rank = model.mpi.rank
    caches = [n for n in model.input_names if "cache" in n]
    zeros = np.zeros(data[f"output:{caches[0]}"].shape, np.float32)  # one array for all: the first step copies it
    state = {c: zeros[model.input_slices[c]] for c in caches}  # this rank's heads only
    if outputs == "device":  # TVM tensors (DLPack), kept as tensors from step to step
        import tvm
        state = {c: tvm.runtime.empty(a.shape, "float32", tvm.cpu()).copyfrom(a) for c, a in state.items()}
    memory = lambda t: t.ctypes.data if isinstance(t, np.ndarray) else t.data_ptr()
    errors, same = [], []
    for i in range(5):
        got = model.run({fed: data[f"{fed}{i}"], "pos": np.array([i]), **state}, outputs=outputs)
        same.append(all(memory(got[c + "_out"]) == memory(state[c]) for c in caches))
        state = {c: got[c + "_out"] for c in caches}
        y = np.asarray(got[made].numpy() if outputs == "device" else got[made])
        errors.append(float(np.max(np.abs(y - data[f"output:{made}{i}"]))))
    whole = model.gather_outputs(got)
    res = {"errors": errors, "block": list(state[caches[0]].shape), "same": same}
    if rank == 0:
        res["caches"] = max(float(np.max(np.abs(whole[c + "_out"] - data[f"output:{c}"]))) for c in caches)
    with open(f"{out}.r{rank}.json", "w") as f:
        json.dump(res, f)
""")


@pytest.mark.parametrize("exporter, donate, outputs", [("legacy", False, "auto"), ("dynamo", False, "auto"),
                                                        ("dynamo", True, "auto"), ("dynamo", True, "device")])
def test_a_decoding_loop_keeps_each_ranks_heads_of_the_cache(tmp_path, exporter, donate, outputs):
    """The exported decoding step (``tests/fixtures/decoding``) on 2 real ranks, Megatron over the heads: each rank
    starts from its own half of an empty cache and feeds back the half it gets, five steps; every step's output
    equals onnxruntime's on both ranks and the caches gathered at the end equal its caches. With the caches donated
    (``--donate``) each step from the second on writes into the arrays it was given (the first step's one zeros
    array, passed as both caches, is copied). With the caches passed as TVM tensors and ``outputs="device"`` (a GPU
    loop's form) each step writes into the memory passed, the first included (TVM's allocations are aligned), and
    ``gather_outputs`` takes the tensors."""
    import bmc

    heads = "[{}, {x}, {}, {}]"
    decoding = ROOT / "tests" / "fixtures" / "decoding"
    bmc.compile(decoding / f"decstep_{exporter}.onnx", tmp_path / "dec.bmc", mesh="2", strategy="megatron",
                input_shards={"k_cache": heads, "v_cache": heads},
                output_shards={"k_cache_out": heads, "v_cache_out": heads},
                donate=["k_cache", "v_cache"] if donate else ())
    script = tmp_path / "decode.py"
    script.write_text(DECODE_SCRIPT)
    r = mpirun(2, [sys.executable, str(script), str(tmp_path / "dec.bmc"), str(decoding / f"decstep_{exporter}.npz"),
                   str(tmp_path / "dec"), outputs, "x", "y"])
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in range(2):
        res = json.loads((tmp_path / f"dec.r{rank}.json").read_text())
        assert res["block"] == [2, 2, 16, 8] and max(res["errors"]) <= 1e-5, res
        assert res["same"] == [outputs == "device"] + [donate] * 4, res
    assert json.loads((tmp_path / "dec.r0.json").read_text())["caches"] <= 1e-6


def test_a_grouped_query_decoding_loop_holds_one_key_value_head_a_rank(tmp_path):
    """The exported Llama step (4 query heads over 2 key/value heads) on 4 real ranks by Megatron: the mesh of 4 is
    planned as its view x_0 × x_1 (2 × 2), the key/value projections and the donated caches split over x_0, so
    each rank holds the one key/value head its query head reads (duplicated on 2 ranks, as vLLM does) where a
    plan on the mesh itself would keep both on every rank; five steps equal onnxruntime on every rank, the
    caches gathered at the end equal its caches, and nothing but the sublayers' all-reduces (and the logits'
    gather) is communicated."""
    import bmc

    heads = "[{}, {x_0}, {}, {}]"
    caches = [f"{kv}_cache_{i}" for i in range(2) for kv in "kv"]
    decoding = ROOT / "tests" / "fixtures" / "decoding"
    bmc.compile(decoding / "llamastep_dynamo.onnx", tmp_path / "dec.bmc", mesh="4", strategy="megatron",
                input_shards={c: heads for c in caches}, output_shards={c + "_out": heads for c in caches},
                donate=caches)
    plan = json.loads((tmp_path / "dec.bmc" / "plan.json").read_text())
    assert plan["mesh"] == {"axes": ["x_0", "x_1"], "shape": [2, 2], "parts": {"x": ["x_0", "x_1"]}}
    assert [c["kind"] for c in plan["collectives"] if c["value"] != "logits"] == ["all_reduce"] * 4
    script = tmp_path / "decode.py"
    script.write_text(DECODE_SCRIPT)
    r = mpirun(4, [sys.executable, str(script), str(tmp_path / "dec.bmc"), str(decoding / "llamastep_dynamo.npz"),
                   str(tmp_path / "dec"), "auto", "ids", "logits"])
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in range(4):
        res = json.loads((tmp_path / f"dec.r{rank}.json").read_text())
        assert res["block"] == [2, 1, 16, 8] and max(res["errors"]) <= 1e-5, res
        assert res["same"] == [False] + [True] * 4, res
    assert json.loads((tmp_path / "dec.r0.json").read_text())["caches"] <= 1e-5


SHARE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import bmc
    long, short, out = sys.argv[1:4]
    first = bmc.load(long)
    second = bmc.load(short, share_weights=first)
    ids = np.arange(4).reshape(1, 4)
    same = bool(np.array_equal(second(input_ids=ids), bmc.load(short)(input_ids=ids)))
    held = sum(int(np.prod(p["shape"])) * 4 for p in second.signature["params"])
    with open(f"{out}.r{first.mpi.rank}.json", "w") as f:
        json.dump({"shared": second.stats["shared_bytes"], "held": held, "same": same}, f)
""")


def test_each_rank_shares_its_own_weights_between_two_programs(tmp_path):
    """Llama by Megatron on 2 real ranks, compiled for 2 × 16 and 1 × 4 tokens: each rank's short program uses the
    long one's weights of that rank (all of them) and gives what it gives loaded alone."""
    import bmc

    for name, shapes in (("long", {"batch": 2, "seq": 16}), ("short", {"batch": 1, "seq": 4})):
        bmc.compile(FIXTURES / "llama_dynamo.onnx", tmp_path / f"{name}.bmc", mesh="2", strategy="megatron",
                    input_shapes=shapes)
    script = tmp_path / "share.py"
    script.write_text(SHARE_SCRIPT)
    r = mpirun(2, [sys.executable, str(script), str(tmp_path / "long.bmc"), str(tmp_path / "short.bmc"),
                   str(tmp_path / "share")])
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in range(2):
        res = json.loads((tmp_path / f"share.r{rank}.json").read_text())
        assert res["same"] and res["shared"] == res["held"] > 0, res


COLLECTIVES_SCRIPT = textwrap.dedent("""
    # every collective kind on leading and inner dims, on a 2x2 mesh, against GROUP_REFERENCE
    import json, sys
    import numpy as np
    import tvm, tvm_ffi
    from bmc.runtime import mpi
    from bmc.ops.collective import GROUP_REFERENCE
    impl, out_path = sys.argv[1], sys.argv[2]
    manifest = {"world_size": 4, "mesh": {"shape": [2, 2], "axes": ["x", "y"]},
                "rank_map": [[0, 0], [0, 1], [1, 0], [1, 1]]}
    MPI = mpi.preflight(manifest, "test", force=True)
    ctx = mpi.MPIContext(MPI, manifest, "test")
    assert mpi.register_collectives(ctx, impl) == impl
    shape = (4, 8, 12)
    cases = []
    for axes in ([0], [1], [0, 1], [1, 0]):
        n = 4 if len(axes) == 2 else 2
        for dtype in ("float32", "int64", "float64"):
            for reduce in ("sum", "max", "min", "mean"):
                if reduce == "mean" and dtype == "int64":
                    continue
                cases.append(("all_reduce", {"axes": axes, "group_size": n, "reduce": reduce}, dtype))
        for dim in (0, 1, 2, -1):
            cases.append(("all_gather", {"axes": axes, "dim": dim, "group_size": n}, "float32"))
            cases.append(("all_gather", {"axes": axes, "dim": dim, "group_size": n}, "bool"))
            cases.append(("reduce_scatter", {"axes": axes, "dim": dim, "group_size": n}, "float32"))
        for s in range(3):
            for c in range(3):
                cases.append(("all_to_all", {"axes": axes, "split_dim": s, "concat_dim": c, "group_size": n},
                              "float32"))
    def make(rank, i, dtype):
        rng = np.random.default_rng(1000 * i + rank)
        if dtype == "bool":
            return rng.random(shape) > 0.5
        return (rng.standard_normal(shape) * 100).astype(dtype)
    coords = manifest["rank_map"]
    results, bad = {}, []
    for i, (kind, attrs, dtype) in enumerate(cases):
        x = make(ctx.rank, i, dtype)
        members = ctx.group_ranks(attrs["axes"])
        want = GROUP_REFERENCE[kind]([make(r, i, dtype) for r in members], attrs)[members.index(ctx.rank)]
        out = tvm.runtime.empty(want.shape, dtype)
        text = json.dumps(attrs, sort_keys=True)
        tvm_ffi.get_global_func("bmc." + kind)(tvm.runtime.tensor(x), text, out)
        got = out.numpy()
        exact = kind not in ("all_reduce", "reduce_scatter") or len(members) == 2 or dtype == "int64" \\
            or attrs.get("reduce") in ("max", "min")
        ok = np.array_equal(got, want) if exact else np.allclose(got, want, rtol=1e-5, atol=1e-3)
        if not ok:
            bad.append((i, kind, attrs, dtype))
        results[f"c{i}"] = got
    np.savez(out_path.replace(".npz", f".r{ctx.rank}.npz"), **results)
    with open(out_path.replace(".npz", f".r{ctx.rank}.json"), "w") as f:
        json.dump({"rank": ctx.rank, "cases": len(cases), "bad": bad, "seq": mpi.sequence_number(ctx)}, f)
""")


@pytest.mark.parametrize("check", ["0", "1"])
def test_each_collective_matches_the_reference_and_native_equals_python(workdir, native_lib, check):
    script = workdir / "collectives.py"
    script.write_text(COLLECTIVES_SCRIPT)
    rows = {}
    for impl in ("python", "native"):
        out = workdir / f"coll-{impl}-{check}.npz"
        r = mpirun(4, [sys.executable, str(script), impl, str(out)], BMC_MPI_NATIVE_LIB=native_lib,
                   BMC_CHECK_COLLECTIVES=check)
        assert r.returncode == 0, r.stdout + r.stderr
        rows[impl] = [json.loads((workdir / f"coll-{impl}-{check}.r{rank}.json").read_text()) for rank in range(4)]
        assert len(rows[impl]) == 4 and all(not d["bad"] for d in rows[impl]), rows[impl]
        assert all(d["seq"] == d["cases"] for d in rows[impl])
    for rank in range(4):
        with np.load(workdir / f"coll-python-{check}.r{rank}.npz") as p, \
                np.load(workdir / f"coll-native-{check}.r{rank}.npz") as q:
            for k in p.files:
                assert p[k].tobytes() == q[k].tobytes(), (rank, k)


HALF_SCRIPT = textwrap.dedent("""
    # float16/bfloat16 reductions on 2 ranks: the native collectives reduce in float32 and round once
    import json, sys
    import ml_dtypes
    import numpy as np
    import tvm, tvm_ffi
    from bmc.runtime import mpi
    from bmc.ops.collective import GROUP_REFERENCE
    impl, out_path = sys.argv[1], sys.argv[2]
    manifest = {"world_size": 2, "mesh": {"shape": [2], "axes": ["x"]}, "rank_map": [[0], [1]]}
    MPI = mpi.preflight(manifest, "test", force=True)
    ctx = mpi.MPIContext(MPI, manifest, "test")
    assert mpi.register_collectives(ctx, impl) == impl
    cases = [("all_reduce", {"axes": [0], "group_size": 2, "reduce": r}) for r in ("sum", "max", "min", "mean")]
    cases += [("reduce_scatter", {"axes": [0], "dim": d, "group_size": 2}) for d in (0, 2)]
    bad = []
    for dtype in (ml_dtypes.bfloat16, np.float16):
        for i, (kind, attrs) in enumerate(cases):
            xs = [(np.random.default_rng(10 * i + r).standard_normal((4, 6, 8)) * 50).astype(dtype) for r in (0, 1)]
            # the sum of two 16-bit values is exact in float32: one rounding gives the nearest 16-bit value
            want = GROUP_REFERENCE[kind]([x.astype(np.float32) for x in xs], attrs)[ctx.rank].astype(dtype)
            out = tvm.runtime.empty(want.shape, np.dtype(dtype).name)
            tvm_ffi.get_global_func("bmc." + kind)(tvm.runtime.tensor(xs[ctx.rank]), json.dumps(attrs, sort_keys=True),
                                                   out)
            if out.numpy().tobytes() != want.tobytes():
                bad.append((np.dtype(dtype).name, kind, attrs))
    with open(out_path.replace(".json", f".r{ctx.rank}.json"), "w") as f:
        json.dump({"bad": bad, "cases": 2 * len(cases)}, f)
""")


@pytest.mark.parametrize("impl", ["native", "python"])
def test_16_bit_float_reductions(workdir, native_lib, impl):
    """float16/bfloat16 all-reduces (sum, max, min, mean) and reduce-scatters, which MPI has no type for: the native
    collectives widen to float32, reduce and round once (they refused these dtypes before, so a `--dtype bfloat16`
    plan on a mesh failed by default); both equal the float32 reference rounded to the dtype, bit for bit."""
    script = workdir / "half_collectives.py"
    script.write_text(HALF_SCRIPT)
    out = workdir / f"half-{impl}.json"
    r = mpirun(2, [sys.executable, str(script), impl, str(out)], BMC_MPI_NATIVE_LIB=native_lib)
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in range(2):
        d = json.loads((workdir / f"half-{impl}.r{rank}.json").read_text())
        assert d["cases"] == 12 and not d["bad"], d


def test_bfloat16_model_tensor_parallel_on_two_ranks(workdir):
    """``--dtype bfloat16`` with a Megatron plan on 2 ranks, default (native) collectives: within the reduced-
    precision bound (1e-2 of max |ref|) of onnxruntime's float32 outputs."""
    import bmc

    data = np.load(FIXTURES / "gpt2_dynamo.npz")
    inputs = workdir / "gpt2_bf16_in.npz"
    np.savez(inputs, **{k: data[k] for k in data.files if not k.startswith("output:")})
    refs = [data[k] for k in data.files if k.startswith("output:")]
    out = workdir / "gpt2_bf16_2.bmc"
    bmc.compile(FIXTURES / "gpt2_dynamo.onnx", out, mesh="2", strategy="megatron",
                input_shapes={"batch": 2, "seq": 16}, dtype="bfloat16")
    r = bmc_run(2, out, inputs, workdir / "bf16_out.npz")
    assert r.returncode == 0 and "native collectives" in r.stdout, r.stdout + r.stderr
    with np.load(workdir / "bf16_out.npz") as got:
        (name,) = got.files
        assert np.abs(got[name] - refs[0]).max() <= 1e-2 * np.abs(refs[0]).max()


# ------------------------------------------------------------------------------------------ faults

def test_wrong_world_size_fails_in_preflight_on_every_rank(compiled, workdir):  # FAILURES.md 39
    artifact, inputs, _ = compiled("gpt2", "2x2")
    start = time.monotonic()
    r = bmc_run(2, artifact, inputs, workdir / "x.npz", timeout=60)
    assert r.returncode == 7, r.stdout + r.stderr
    assert r.stderr.count("the artifact is for 4 ranks (mesh 2x2) but 2 MPI ranks were launched") == 1
    assert "mpiexec -n 4" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - start < 60


def test_no_launcher_gives_the_exact_mpiexec_command(compiled, workdir):  # FAILURES.md 40
    artifact, inputs, _ = compiled("gpt2", "2x2")
    out = workdir / "x.npz"
    r = bmc_run(0, artifact, inputs, out, timeout=60)
    assert r.returncode == 7 and "not started by an MPI launcher" in r.stderr
    assert f"mpiexec -n 4 {sys.executable} -m bmc run {artifact} --inputs {inputs} -o {out}" in r.stderr
    assert "--simulate" in r.stderr and "Traceback" not in r.stderr


def test_mismatched_launcher_is_detected(compiled, workdir):  # FAILURES.md 41
    artifact, inputs, _ = compiled("gpt2", "2x2")
    # what Open MPI's mpirun sets; the mpich-linked mpi4py then sees every process as rank 0 of 1
    r = bmc_run(0, artifact, inputs, workdir / "x.npz", timeout=60, OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_RANK=2)
    assert r.returncode == 7, r.stdout + r.stderr
    assert "mismatched MPI launcher: Open MPI started 4 processes" in r.stderr and "rank 0 of 1" in r.stderr
    assert "mpiexec" in r.stderr


def test_damaged_weights_of_one_rank_fail_every_rank(compiled, tmp_path):  # FAILURES.md 33 under MPI
    artifact, inputs, _ = compiled("gpt2", "1x2")
    damaged = tmp_path / "damaged.bmc"
    shutil.copytree(artifact, damaged)
    weights = damaged / "weights/rank1.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # tensor data: only the digest, computed while loading, can see it
    weights.write_bytes(bytes(data))
    start = time.monotonic()
    r = bmc_run(2, damaged, inputs, tmp_path / "out.npz", timeout=60)
    assert r.returncode == 6, r.stdout + r.stderr
    assert "weights/rank1.safetensors is corrupted" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.npz").exists()
    assert time.monotonic() - start < 60


def test_too_little_memory_fails_on_every_rank_before_loading(compiled, workdir):  # FAILURES.md 45
    artifact, inputs, _ = compiled("gpt2", "1x2")
    r = bmc_run(2, artifact, inputs, workdir / "x.npz", timeout=60, BMC_AVAILABLE_MEMORY="1000")
    assert r.returncode == 7, r.stdout + r.stderr
    assert r.stderr.count("the plan needs") == 1 and "shared by 2 ranks" in r.stderr and "MPI_Abort" not in r.stderr


def test_a_rank_raising_aborts_every_rank_promptly(compiled, workdir):  # FAILURES.md 43
    artifact, inputs, _ = compiled("gpt2", "2x2")
    start = time.monotonic()
    r = bmc_run(4, artifact, inputs, workdir / "x.npz", timeout=60, BMC_FAULT_INJECT="raise:1:2")
    assert r.returncode == 7, r.stdout + r.stderr
    assert "[rank 1] bmc: runtime error:" in r.stderr and "injected fault" in r.stderr
    assert "collective #2" in r.stderr
    assert time.monotonic() - start < 30


def test_a_killed_rank_ends_the_job_within_the_timeout(compiled, workdir):  # FAILURES.md 42
    artifact, inputs, _ = compiled("gpt2", "2x2")
    start = time.monotonic()
    r = bmc_run(4, artifact, inputs, workdir / "x.npz", timeout=60, BMC_FAULT_INJECT="kill:2:1",
                BMC_COLLECTIVE_TIMEOUT_S=5)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "wrote" not in r.stdout
    assert time.monotonic() - start < 30


def test_a_stuck_rank_trips_the_collective_watchdog(compiled, workdir):  # FAILURES.md 42 (no launcher help)
    artifact, inputs, _ = compiled("gpt2", "2x2")
    start = time.monotonic()
    r = bmc_run(4, artifact, inputs, workdir / "x.npz", timeout=60, BMC_FAULT_INJECT="hang:3:1",
                BMC_COLLECTIVE_TIMEOUT_S=3)
    assert r.returncode == 7, r.stdout + r.stderr
    # the first rank whose group includes rank 3 and whose deadline passes reports (which one is a race)
    assert "did not complete within 3" in r.stderr and "group of world ranks [" in r.stderr
    assert re.search(r"\[rank [012]\] bmc: runtime error: .*collective #\d+ \((all_reduce|all_gather)", r.stderr)
    assert time.monotonic() - start < 30


def test_bad_inputs_on_rank_0_fail_on_every_rank_without_abort(compiled, workdir):  # FAILURES.md 44 under MPI
    artifact, _, _ = compiled("gpt2", "1x2")
    bad = workdir / "bad.npz"
    np.savez(bad, input_ids=np.zeros((3, 16), np.int64))
    r = bmc_run(2, artifact, bad, workdir / "x.npz", timeout=60)
    assert r.returncode == 7, r.stdout + r.stderr
    assert r.stderr.count("expected int64[2,16], got int64[3,16]") == 1 and "MPI_Abort" not in r.stderr


ORDER_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tvm, tvm_ffi
    from bmc.runtime import mpi
    manifest = {"world_size": 2, "mesh": {"shape": [2], "axes": ["x"]}, "rank_map": [[0], [1]]}
    ctx = mpi.MPIContext(mpi.preflight(manifest, "test", force=True), manifest, "test")
    mpi.register_collectives(ctx, sys.argv[1])
    x = tvm.runtime.tensor(np.ones(4, np.float32))
    order = ["all_reduce", "all_gather"] if ctx.rank == 0 else ["all_gather", "all_reduce"]
    try:
        for kind in order:
            attrs = {"axes": [0], "group_size": 2, **({"reduce": "sum"} if kind == "all_reduce" else {"dim": 0})}
            out = tvm.runtime.empty((4,) if kind == "all_reduce" else (8,), "float32")
            tvm_ffi.get_global_func("bmc." + kind)(x, json.dumps(attrs, sort_keys=True), out)
    except Exception as e:
        ctx.abort(f"bmc: runtime error: {e}")
    print("no mismatch detected", flush=True)
""")


@pytest.mark.parametrize("impl", ["python", "native"])
def test_mismatched_collective_order_is_detected(workdir, native_lib, impl):  # FAILURES.md 47
    script = workdir / "order.py"
    script.write_text(ORDER_SCRIPT)
    start = time.monotonic()
    r = mpirun(2, [sys.executable, str(script), impl], timeout=60, BMC_MPI_NATIVE_LIB=native_lib,
               BMC_COLLECTIVE_TIMEOUT_S=10)
    assert r.returncode == 7, r.stdout + r.stderr
    assert "different orders" in r.stderr
    assert "rank 0 at collective #0 all_reduce" in r.stderr and "rank 1 at collective #0 all_gather" in r.stderr
    assert "no mismatch detected" not in r.stdout
    assert time.monotonic() - start < 30


_GPU_SELECTION = textwrap.dedent("""
    import json, sys
    import numpy as np, tvm, tvm_ffi
    from bmc.errors import ExecutionError
    from bmc.runtime import mpi
    manifest = {"world_size": 2, "mesh": {"shape": [2], "axes": ["x"]}, "rank_map": [[0], [1]]}
    MPI = mpi.preflight(manifest, "t", force=True)
    ctx = mpi.MPIContext(MPI, manifest, "t")
    out = {}
    try:  # two ranks on one GPU: NCCL cannot be used, and asking for it says so on every rank
        mpi.register_collectives(ctx, "nccl", gpu=(0, True))
    except ExecutionError as e:
        out["nccl"] = e.what
    out["auto"] = mpi.register_collectives(ctx, "auto", gpu=(0, True))
    # the host-staged implementation (tensor.numpy() -> MPI -> copyfrom), on CPU tensors here
    x = np.arange(8, dtype=np.float32).reshape(2, 4) + 10 * ctx.rank
    for kind, attrs, shape in (("all_reduce", {"axes": [0], "reduce": "sum"}, (2, 4)),
                               ("all_gather", {"axes": [0], "dim": 1}, (2, 8)),
                               ("reduce_scatter", {"axes": [0], "dim": 1}, (2, 2)),
                               ("all_to_all", {"axes": [0], "split_dim": 1, "concat_dim": 0}, (4, 2))):
        o = tvm.runtime.tensor(np.zeros(shape, np.float32))
        tvm_ffi.get_global_func("bmc." + kind)(tvm.runtime.tensor(x), json.dumps(attrs), o)
        out[kind] = o.numpy().tolist()
    with open(sys.argv[1] + f".{ctx.rank}", "w") as f:  # a file per rank: mpiexec may interleave long stdout lines
        json.dump(out, f)
""")


def test_gpu_collective_selection_and_host_staging(tmp_path):
    """Collectives for GPU tensors: with a GPU shared by two ranks, NCCL is refused with the reason and `auto` picks
    the host-staged path (every rank agrees), whose copy-out / MPI / copy-in plumbing gives the reference results
    (run here on CPU tensors: the copies are the same calls)."""
    proc = mpirun(2, [sys.executable, "-c", _GPU_SELECTION, str(tmp_path / "out")], timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r: json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)}
    xs = [np.arange(8, dtype=np.float32).reshape(2, 4) + 10 * r for r in range(2)]
    for rank, out in results.items():
        assert "a GPU serves several ranks" in out["nccl"] and out["auto"] == "host"
        np.testing.assert_array_equal(out["all_reduce"], xs[0] + xs[1])
        np.testing.assert_array_equal(out["all_gather"], np.concatenate(xs, axis=1))
        np.testing.assert_array_equal(out["reduce_scatter"], np.split(xs[0] + xs[1], 2, axis=1)[rank])
        np.testing.assert_array_equal(out["all_to_all"], np.concatenate([np.split(x, 2, axis=1)[rank] for x in xs]))


@pytest.mark.parametrize("name, source", [("gpt2_dynamic", "gpt2_dynamo"), ("llama_nbits", "llama_dynamo")])
def test_quantized_model_tensor_parallel_on_two_ranks(tmp_path, native_lib, name, source):
    """Quantized models from ``tests/fixtures/quantized``, Megatron on 2 real ranks with the native collectives:
    the dynamically quantized GPT-2 (int8 weight shards, float64 all-reduces of the integer products) and the
    int4 Llama (``MatMulNBits``: packed 4-bit weight shards); equal to onnxruntime."""
    import onnxruntime as ort

    import bmc
    from bmc.sharding.mesh import Mesh

    model = ROOT / "tests" / "fixtures" / "quantized" / f"{name}.onnx"
    ids = np.load(ROOT / "tests" / "fixtures" / "models" / f"{source}.npz")["input_ids"]
    bmc.compile(model, tmp_path / "q.bmc", mesh=Mesh.parse("1x2"), strategy="megatron",
                input_shapes={"input_ids": ids.shape})
    np.savez(tmp_path / "in.npz", input_ids=ids)
    r = bmc_run(2, tmp_path / "q.bmc", tmp_path / "in.npz", tmp_path / "out.npz", "--collectives", "native",
                BMC_MPI_NATIVE_LIB=native_lib)
    assert r.returncode == 0, r.stdout + r.stderr
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    _check(tmp_path / "out.npz", sess.run(None, {"input_ids": ids}))


@pytest.mark.parametrize("name", ["mixtral_dynamo", "qwenmoe_dynamo"])
def test_expert_parallel_mixture_of_experts_on_two_ranks(tmp_path, native_lib, name):
    """The Mixtral and Qwen2-MoE fixtures (4 experts, 2 a token; Qwen: and a gated shared expert) with Megatron's
    layout on 2 real ranks: attention tensor parallel, each rank holding 2 of each layer's 4 experts and computing
    the rows routed to them; 2 all-reduces a layer, each of one row a token (the expert layer's after the tokens'
    rows are summed, with the shared expert's). Equal to onnxruntime."""
    import bmc

    data = np.load(FIXTURES / f"{name}.npz")
    bmc.compile(FIXTURES / f"{name}.onnx", tmp_path / "ep.bmc", mesh="2", strategy="megatron",
                input_shapes={"input_ids": data["input_ids"].shape})
    plan = json.loads((tmp_path / "ep.bmc" / "plan.json").read_text())
    reduces = [(c["kind"], c["bytes"]) for c in plan["collectives"] if c["node"] != "output"]
    assert reduces == [("all_reduce", data["input_ids"].size * 64 * 4)] * 4  # hidden 64, float32, 2 (n-1)/n = 1
    np.savez(tmp_path / "in.npz", input_ids=data["input_ids"])
    r = bmc_run(2, tmp_path / "ep.bmc", tmp_path / "in.npz", tmp_path / "out.npz", "--collectives", "native",
                BMC_MPI_NATIVE_LIB=native_lib)
    assert r.returncode == 0, r.stdout + r.stderr
    _check(tmp_path / "out.npz", [data["output:logits"]])


@pytest.mark.parametrize("collectives", ["native", "python"])
def test_context_parallel_attention_on_two_ranks(tmp_path, native_lib, collectives):
    """The cross-attention fixture with its memory split over 2 real ranks (``--shard``): each rank attends to
    half of the keys and the ranks combine their rows' log-sum-exps by an all-reduce max and sum; equal to
    onnxruntime with either collectives implementation."""
    import bmc

    data = np.load(FIXTURES / "xattn_dynamo.npz")
    bmc.compile(FIXTURES / "xattn_dynamo.onnx", tmp_path / "cp.bmc", mesh="2",
                shard={"memory": "[{},{x},{}]", "memory_mask": "[{},{x}]"}, input_shapes={"batch": 2, "seq": 48})
    np.savez(tmp_path / "in.npz", **{k: data[k] for k in ("x", "memory", "memory_mask")})
    r = bmc_run(2, tmp_path / "cp.bmc", tmp_path / "in.npz", tmp_path / "out.npz", "--collectives", collectives,
                BMC_MPI_NATIVE_LIB=native_lib)
    assert r.returncode == 0, r.stdout + r.stderr
    _check(tmp_path / "out.npz", [data["output:hidden"]])


# ------------------------------------------------------------------------------------------ pipeline stages

@pytest.fixture(scope="module")
def pipelines(workdir):
    """gpt2 in 2 stages: on 2 ranks with 2 microbatches, and on 4 ranks (2 per stage, both data parallel)."""
    import bmc

    data = np.load(FIXTURES / "gpt2_dynamo.npz")
    np.savez(workdir / "pipe_in.npz", input_ids=data["input_ids"])
    shapes = {"batch": 2, "seq": 16}
    bmc.compile(FIXTURES / "gpt2_dynamo.onnx", workdir / "pipe2.bmc", mesh="2", stages=2, microbatches=2,
                input_shapes=shapes)
    bmc.compile(FIXTURES / "gpt2_dynamo.onnx", workdir / "pipe4.bmc", mesh="4", stages=2,
                shard={"input_ids": "[{x},{}]", "logits": "[{x},{},{}]"}, input_shapes=shapes)
    return workdir / "pipe_in.npz", [data["output:logits"]]


@pytest.mark.parametrize("ranks,collectives", [(2, "python"), (4, "native")])
def test_a_pipeline_on_real_ranks_matches_onnxruntime(pipelines, workdir, native_lib, ranks, collectives):
    """Each rank loads only its stage; the stages pass the residual stream rank to rank (microbatches overlap
    on 2 ranks) and every rank returns the outputs."""
    inputs, refs = pipelines
    r = bmc_run(ranks, workdir / f"pipe{ranks}.bmc", inputs, workdir / f"pipe{ranks}_out.npz",
                "--collectives", collectives, BMC_MPI_NATIVE_LIB=native_lib)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ran on {ranks} MPI ranks" in r.stdout
    _check(workdir / f"pipe{ranks}_out.npz", refs)


def test_a_failing_rank_of_a_later_stage_aborts_the_pipeline(pipelines, workdir):  # FAILURES.md 43
    inputs, _ = pipelines
    start = time.monotonic()
    r = bmc_run(4, workdir / "pipe4.bmc", inputs, workdir / "x.npz", timeout=60, BMC_FAULT_INJECT="raise:3:0")
    assert r.returncode == 7, r.stdout + r.stderr
    assert "[rank 3] bmc: runtime error:" in r.stderr and "injected fault" in r.stderr
    assert time.monotonic() - start < 30


def test_bad_inputs_fail_on_every_stage_without_abort(pipelines, workdir):  # FAILURES.md 44
    bad = workdir / "pipe_bad.npz"
    np.savez(bad, input_ids=np.zeros((3, 16), np.int64))
    r = bmc_run(2, workdir / "pipe2.bmc", bad, workdir / "x.npz", timeout=60)
    assert r.returncode == 7, r.stdout + r.stderr
    assert r.stderr.count("expected int64[2,16], got int64[3,16]") == 1 and "MPI_Abort" not in r.stderr


def test_a_bfloat16_pipeline_passes_16_bit_values_between_stages(tmp_path):
    """Llama in bfloat16, 2 stages with 2 microbatches on 2 ranks: what crosses the cut includes a bfloat16 value
    (the rotary tables every layer reads) next to the float32 residual stream; within the 16-bit tolerance of
    onnxruntime's float32 outputs."""
    import json

    import bmc

    data = np.load(FIXTURES / "llama_dynamo.npz")
    bmc.compile(FIXTURES / "llama_dynamo.onnx", tmp_path / "p.bmc", mesh="2", stages=2, microbatches=2,
                dtype="bfloat16", input_shapes={"batch": 2, "seq": 16})
    stage0 = json.loads((tmp_path / "p.bmc" / "manifest.json").read_text())["pipeline"]["stages"][0]
    sent = {o["name"]: o["dtype"] for o in stage0["signature"]["outputs"] if o["name"] in stage0["sends"]}
    assert {"bfloat16", "float32"} <= set(sent.values()), sent
    np.savez(tmp_path / "in.npz", input_ids=data["input_ids"])
    r = bmc_run(2, tmp_path / "p.bmc", tmp_path / "in.npz", tmp_path / "out.npz")
    assert r.returncode == 0, r.stdout + r.stderr
    with np.load(tmp_path / "out.npz") as got:
        want = data["output:logits"]
        assert float(np.max(np.abs(got["logits"] - want))) <= 1e-2 * float(np.max(np.abs(want)))


STAGE_INPUTS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import bmc
    artifact, inputs, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = bmc.load(artifact)
    got = model.run(dict(np.load(inputs)) if model.mpi.rank == 0 else {})
    if model.mpi.rank == 0:
        np.savez(out + ".npz", **got)
    with open(f"{out}.r{model.mpi.rank}.json", "w") as f:
        json.dump({"input_bytes": model.stats["input_bytes"], "stage": model.stats["stage"]}, f)
""")


def test_outputs_and_inputs_go_straight_to_where_they_are_needed(tmp_path):
    """3 stages on 3 ranks: outputs made by stage 0 (one of them read later, one not), a graph input returned as is
    and one read only by the last layers; equal to onnxruntime on every rank, and each rank but rank 0 held only the
    graph inputs its stage reads."""
    import onnxruntime as ort

    import bmc
    from tests.runtime.test_pipeline import _branchy

    model = _branchy(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((4, 16)).astype(np.float32),
              "bias": rng.standard_normal((4, 16)).astype(np.float32)}
    bmc.compile(model, tmp_path / "p.bmc", mesh="3", stages=3, input_shapes={"b": 4})
    np.savez(tmp_path / "in.npz", **inputs)
    want = ort.InferenceSession(str(model)).run(None, inputs)
    r = bmc_run(3, tmp_path / "p.bmc", tmp_path / "in.npz", tmp_path / "out.npz")
    assert r.returncode == 0, r.stdout + r.stderr
    _check(tmp_path / "out.npz", want)
    script = tmp_path / "stage_inputs.py"
    script.write_text(STAGE_INPUTS_SCRIPT)
    r = mpirun(3, [sys.executable, str(script), str(tmp_path / "p.bmc"), str(tmp_path / "in.npz"),
                   str(tmp_path / "api")])
    assert r.returncode == 0, r.stdout + r.stderr
    _check(tmp_path / "api.npz", want)
    stages = json.loads((tmp_path / "p.bmc" / "manifest.json").read_text())["pipeline"]["stages"]
    held = []
    for rank in range(3):
        d = json.loads((tmp_path / f"api.r{rank}.json").read_text())
        reads = {i["name"] for i in stages[d["stage"]]["signature"]["inputs"]} & set(inputs)
        held.append(d["input_bytes"])
        assert d["input_bytes"] == (sum(a.nbytes for a in inputs.values()) if rank == 0 else
                                    sum(inputs[n].nbytes for n in reads))
    assert min(held) < max(held)  # some stage reads fewer inputs than rank 0 holds
