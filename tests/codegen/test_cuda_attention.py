"""The fused CUDA attention kernel (``cpp/cuda_attention.cuh``) without a GPU.

* Its code runs in the CPU emulator of CUDA (``tests/native/cuda_emulator.h``: fibers for threads, WMMA with strict
  alignment rules, barriers that expose races) against numpy, over the shapes that stress the tiling: rows and keys
  that are not multiples of the tiles, fewer keys than a tile, broadcast k/v (multi-query) and biases, kt or k, a
  fully masked row, every head dim (16 to 128) and both 16-bit types. The emulator is an extra check beside the
  real GPU run (``scripts/gpu_check.sh``), which nothing here replaces; it is shown to catch a missing
  ``__syncwarp``.
* nvcc's build of it is embedded in ``libbmc_cuda_kernels`` for sm_80 and sm_90 (with PTX), and
  ``BMC_CUDA_ATTENTION=fused`` makes the CUDA codegen call it.

The cases, the oracle and the tolerances are ``bmc.testing.attention_cases`` (the GPU check runs the real kernel on
the same cases).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bmc.errors import CompileError
from bmc.ir.types import TensorType
from bmc.ops.builder import GraphBuilder
from bmc.testing.attention_cases import CASES, TOL, causal_bias, lowest, make_case, reference, rel_error

ROOT = Path(__file__).resolve().parents[2]


def _compile_emulator(out: Path, include_first: Path | None = None) -> Path:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = out / "attention_emulated"
    cmd = [cxx, "-std=c++17", "-O2", "-w", *([f"-I{include_first}"] if include_first else []), f"-I{ROOT / 'cpp'}",
           f"-I{ROOT / 'tests' / 'native'}", str(ROOT / "tests" / "native" / "attention_emulated.cc"), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return _compile_emulator(tmp_path_factory.mktemp("emu"))


def _run(exe: Path, work: Path, dtype, q, k, v, bias, transpose_k, scale, reverse=False, softcap=0.0):
    work.mkdir(parents=True, exist_ok=True)
    for name, a in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        if a is not None:
            a.tofile(work / f"{name}.bin")

    def dims(a):
        return "-1" if a is None else f"{a.ndim} " + " ".join(map(str, a.shape))

    (work / "case.txt").write_text(f"{dtype} {int(reverse)} {int(transpose_k)} {scale!r} {softcap!r} {dims(q)} "
                                   f"{dims(k)} {dims(v)} {dims(bias)}\n")
    proc = subprocess.run([str(exe), str(work)], capture_output=True, text=True, timeout=300)
    if proc.returncode:
        return proc
    return np.fromfile(work / "out.bin", q.dtype).reshape(q.shape).astype(np.float32)


@pytest.mark.parametrize("reverse", [False, True], ids=["threads-in-order", "threads-reversed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_kernel_matches_numpy(emulator, tmp_path, case, reverse):
    dtype, qs, ks, vs, bs, transpose_k, scale = CASES[case]
    q, k, v, bias = make_case(dtype, qs, ks, vs, bs)
    got = _run(emulator, tmp_path, dtype, q, k, v, bias, transpose_k, scale, reverse)
    assert isinstance(got, np.ndarray), got.stderr
    want = reference(q, k, v, bias, transpose_k, scale)
    err = rel_error(got, want)
    assert np.isfinite(got).all() and err <= TOL[dtype], err


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_keys_past_a_causal_mask_are_skipped(emulator, tmp_path, dtype):
    """With a causal mask the first block of 64 query rows needs the first 64 keys only, the composition computes
    the rest to weight 0. Observable: v rows the first block never needs set to NaN leave its rows finite and equal
    to the reference (the other rows do need them: NaN there)."""
    m = n = 130
    q, k, v, _ = make_case(dtype, (1, 2, m, 32), (1, 2, n, 32), (1, 2, n, 32), None)
    bias = causal_bias(dtype, m, n)
    want = reference(q, k, v, bias, True, 0.177)
    v_nan = v.copy()
    v_nan[..., 64:, :] = np.nan
    got = _run(emulator, tmp_path, dtype, q, k, v_nan, bias, True, 0.177)
    first = got[..., :64, :]
    assert np.isfinite(first).all() and np.isnan(got[..., 64:, :]).all()
    assert np.abs(first - want[..., :64, :]).max() / np.abs(want).max() <= TOL[dtype]
    full = _run(emulator, tmp_path / "plain", dtype, q, k, v, bias, True, 0.177)
    assert rel_error(full, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_keys_before_a_sliding_window_are_skipped(emulator, tmp_path, dtype):
    """A causal window of 40 keys over 200 (Mistral's, Gemma's local layers): the third block of 64 query rows
    sees keys from 89 on, so it starts at the second tile of keys, and the fourth at the third. Observable as
    above: v rows 0-63 set to NaN leave rows 128-199 finite and equal to the reference, rows 0-127 (which need
    that tile) NaN."""
    m = n = 200
    q, k, v, _ = make_case(dtype, (1, 2, m, 32), (1, 2, n, 32), (1, 2, n, 32), None)
    i, j = np.arange(m)[:, None], np.arange(n)[None, :]
    bias = np.where((j <= i) & (j > i - 40), 0.0, lowest(dtype)).astype(q.dtype)
    want = reference(q, k, v, bias, True, 0.177)
    v_nan = v.copy()
    v_nan[..., :64, :] = np.nan
    got = _run(emulator, tmp_path, dtype, q, k, v_nan, bias, True, 0.177)
    assert np.isfinite(got[..., 128:, :]).all() and np.isnan(got[..., :128, :]).all()
    assert np.abs(got[..., 128:, :] - want[..., 128:, :]).max() / np.abs(want).max() <= TOL[dtype]
    full = _run(emulator, tmp_path / "plain", dtype, q, k, v, bias, True, 0.177)
    assert rel_error(full, want) <= TOL[dtype]


@pytest.mark.parametrize("case", ["grouped-decode", "d128-padding-mask", "f16-kt-no-bias"])
def test_soft_capped_scores(emulator, tmp_path, case):
    """Gemma 2's soft-capping, ``c * tanh(s / c)`` of the scaled scores before the bias, with c = 2 against
    scores of up to ~20 (so the tanh saturates): equal to the composition within the case's tolerance."""
    dtype, qs, ks, vs, bs, transpose_k, scale = CASES[case]
    q, k, v, bias = make_case(dtype, qs, ks, vs, bs)
    got = _run(emulator, tmp_path, dtype, q, k, v, bias, transpose_k, scale, softcap=2.0)
    assert isinstance(got, np.ndarray), got.stderr
    want = reference(q, k, v, bias, transpose_k, scale, softcap=2.0)
    assert rel_error(want, reference(q, k, v, bias, transpose_k, scale)) > 10 * TOL[dtype]  # the cap matters
    assert np.isfinite(got).all() and rel_error(got, want) <= TOL[dtype]


def test_a_fully_masked_row_averages_v_as_softmax_does(emulator, tmp_path):
    """Every key of row 3 hidden by the lowest bfloat16 (a padded query): the composition's softmax is uniform
    there (all scores equal), so the row is the mean of v, not 0 or NaN."""
    q, k, v, bias = make_case("bf16", (1, 8, 64), (1, 100, 64), (1, 100, 64), (1, 8, 100), masked_row=3)
    got = _run(emulator, tmp_path, "bf16", q, k, v, bias, True, 0.125)
    want = reference(q, k, v, bias, True, 0.125)
    np.testing.assert_allclose(got[0, 3], v[0].astype(np.float32).mean(0), atol=2e-2)
    assert rel_error(got, want) <= TOL["bf16"]


@pytest.mark.parametrize("shapes,why", [
    (((1, 4, 80), (1, 6, 80), (1, 6, 80)), "head dim 80"),
    (((1, 4, 8), (1, 6, 8), (1, 6, 8)), "head dim 8"),
    (((1, 4, 64), (1, 6, 64), (1, 6, 32)), "v must be"),
    (((2, 4, 64), (3, 6, 64), (3, 6, 64)), "batch dims"),
])
def test_shapes_the_kernel_lacks_are_refused(emulator, tmp_path, shapes, why):
    q, k, v, _ = make_case("bf16", *shapes, None)
    proc = _run(emulator, tmp_path, "bf16", q, k, v, None, True, 1.0)
    assert proc.returncode == 2 and why in proc.stderr


def test_the_emulator_catches_a_missing_syncwarp(tmp_path):
    """The oracle can fail: without the ``__syncwarp`` between storing the scores and reading them back (each lane
    stores only its part of a fragment), the emulated result is wrong."""
    mutated = tmp_path / "mutated"
    mutated.mkdir()
    shutil.copy(ROOT / "cpp" / "cuda_attention.h", mutated)
    source = (ROOT / "cpp" / "cuda_attention.cuh").read_text()
    store = "wmma::store_matrix_sync(ss + j * 16, s, L::kLdS, wmma::mem_row_major);\n    }\n    __syncwarp();"
    assert source.count(store) == 1
    (mutated / "cuda_attention.cuh").write_text(source.replace(store, store.replace("__syncwarp();", "")))
    exe = _compile_emulator(tmp_path, include_first=mutated)
    dtype, qs, ks, vs, bs, transpose_k, scale = CASES["rows-and-keys-ragged"]
    q, k, v, bias = make_case(dtype, qs, ks, vs, bs)
    got = _run(exe, tmp_path / "run", dtype, q, k, v, bias, transpose_k, scale)
    want = reference(q, k, v, bias, transpose_k, scale)
    assert not np.allclose(got, want, atol=0.1)


# ------------------------------------------------------------------------------------------ nvcc build, codegen

@pytest.mark.cuda
def test_library_embeds_the_kernels_for_sm80_and_sm90():
    """With nvcc at build time, the installed kernel library carries a fatbin with the eight kernels as SASS for
    sm_80 and sm_90, plus PTX for later GPUs."""
    from bmc.codegen import cuda
    from bmc.runtime.cuda import _kernel_library, fused_attention_available

    try:
        cuda.find_toolkit()
    except CompileError as e:
        pytest.skip(f"no CUDA toolkit: {e.what}")
    assert fused_attention_available()
    images = [e for fatbin in cuda.find_fatbins(Path(_kernel_library()).read_bytes()) for e in fatbin]
    names = {f"bmc_attention_{t}_d{d}" for t in ("bf16", "f16") for d in (16, 32, 64, 128)}
    sass = {e["arch"]: set(cuda.elf_functions(e["data"])) for e in images if e["kind"] == "elf"}
    assert set(sass) == {"sm_80", "sm_90"} and all(names <= fns for fns in sass.values()), sass
    assert [e["arch"] for e in images if e["kind"] == "ptx"] == ["compute_90"]


def _attention_graph(dtype="bfloat16", hd=64, softcap=None):
    b = GraphBuilder("attn")
    q, k, v = (b.input(n, TensorType(dtype, (2, 4, 128, hd))) for n in "qkv")
    mask = b.input("mask", TensorType(dtype, (128, 128)))
    s = b.emit1("matmul", [q, b.emit1("transpose", [k], perm=(0, 1, 3, 2))])
    s = b.emit1("mul", [s, b.constant(0.125, dtype=dtype)])
    if softcap:  # Gemma 2: c * tanh(s / c)
        c = b.constant(softcap, dtype=dtype)
        s = b.emit1("mul", [b.emit1("tanh", [b.emit1("div", [s, c])]), c])
    s = b.emit1("add", [s, mask])
    return b.finish([b.emit1("matmul", [b.emit1("softmax", [s], axis=-1), v], "y")])


@pytest.mark.cuda
def test_codegen_calls_the_kernel_when_asked(monkeypatch):
    """``BMC_CUDA_ATTENTION=fused``: the attention op becomes one call of ``bmc.cuda.attention_bias`` (listed in
    the manifest's requires; no softmax kernel left; soft-capped scores ``bmc.cuda.attention_softcap``); by
    default, and for a head dim the kernel lacks, the composition (cuBLAS + bmc's softmax kernel); a bad value is a
    clear error."""
    from bmc.codegen import cuda
    from bmc.codegen.build import build
    from bmc.codegen.targets import TargetSpec
    from bmc.ops.fusion import fuse_attention

    try:
        cuda.find_toolkit()
    except CompileError as e:
        pytest.skip(f"no CUDA toolkit: {e.what}")
    target = TargetSpec.parse("cuda", ("sm_90",))

    def compiled(**kw):
        info = build(fuse_attention(_attention_graph(**kw)), target).kernels["cuda"]
        return info.get("requires", []), [k["name"] for k in info["kernels"]]

    requires, names = compiled()
    assert "bmc.cuda.attention_bias" not in requires and any("softmax" in n for n in names)
    monkeypatch.setenv("BMC_CUDA_ATTENTION", "fused")
    requires, names = compiled()
    assert "bmc.cuda.attention_bias" in requires and not any("softmax" in n for n in names), names
    requires, names = compiled(softcap=30.0)
    assert "bmc.cuda.attention_softcap" in requires and not any("softmax" in n for n in names), names
    requires, names = compiled(hd=48)
    assert "bmc.cuda.attention_bias" not in requires and any("softmax" in n for n in names)
    monkeypatch.setenv("BMC_CUDA_ATTENTION", "flash")
    with pytest.raises(CompileError, match="BMC_CUDA_ATTENTION"):
        compiled()
