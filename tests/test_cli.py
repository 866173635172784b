"""The ``bmc`` command line, run as ``python -m bmc`` in a subprocess where the exit code and stderr matter."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import bmc.cli as cli
from bmc.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def bmc(*args, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "bmc", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_help_lists_every_command():
    proc = bmc("--help")
    assert proc.returncode == 0
    for command in ("compile", "run", "show", "verify", "demo"):
        assert command in proc.stdout


def test_no_command_is_an_argparse_usage_error():
    proc = bmc()
    assert proc.returncode == 2 and "usage: bmc" in proc.stderr


def test_run_writes_outputs_by_name(tiny_artifact, tiny_graph, tmp_path):
    from bmc.testing.reference import run_reference

    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    proc = bmc("run", tiny_artifact, "--inputs", _npz(tmp_path / "in.npz", x=x), "-o", tmp_path / "out.npz")
    assert proc.returncode == 0, proc.stderr
    ref = run_reference(tiny_graph, {"x": x})
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        assert sorted(out.files) == ["y", "z"]
        for name in ("y", "z"):
            assert np.max(np.abs(out[name] - ref[name])) <= 1e-5 * max(1.0, np.max(np.abs(ref[name])))
    assert "y: float32[2,4]" in proc.stdout


@pytest.mark.parametrize("arrays, expected", [
    ({"x": np.zeros((3, 3), np.float32)}, "input 'x': expected float32[2,3], got float32[3,3]"),
    ({"x": np.zeros((2, 3), np.int32)}, "input 'x': expected float32[2,3], got int32[2,3]"),
    ({"input": np.zeros((2, 3), np.float32)}, "unknown input(s) 'input'; missing input(s) 'x'"),
])
def test_run_with_bad_inputs_exits_7_without_traceback(tiny_artifact, tmp_path, arrays, expected):
    proc = bmc("run", tiny_artifact, "--inputs", _npz(tmp_path / "in.npz", **arrays), "-o", tmp_path / "out.npz")
    assert proc.returncode == 7
    assert proc.stderr.startswith("bmc: runtime error: ") and expected in proc.stderr
    assert "the model takes x: float32[2,3]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.npz").exists()


def test_show_prints_the_manifest_summary(tiny_artifact):
    proc = bmc("show", tiny_artifact)
    assert proc.returncode == 0, proc.stderr
    for text in ("tvm 0.27", "tvm-ffi", "target     llvm", "x: float32[2,3]", "y: float32[2,4]",
                 "programs/main.so", "weights/rank0.safetensors", "240 B"):
        assert text in proc.stdout


def test_verify_ok_and_reports_nonfinite_weights(tmp_path, tiny_graph, build_artifact):
    w = tiny_graph.weights["w"].numpy().copy()
    w[0, 0], w[1, 1], w[2, 2] = np.nan, np.inf, -np.inf
    out = build_artifact(tiny_graph, tmp_path / "nan.bmc",
                         weights=[("w", lambda: w), ("b", tiny_graph.weights["b"].numpy)])
    proc = bmc("verify", out)
    assert proc.returncode == 0, proc.stderr  # NaN/Inf weights are allowed (FAILURES.md 14), only reported
    assert "1 NaN and 2 Inf values in 1 tensor(s)" in proc.stdout and "w: 1 NaN, 2 Inf" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK")


def test_verify_corrupted_artifact_exits_6_naming_the_file(tiny_artifact):
    weights = tiny_artifact / "weights/rank0.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    proc = bmc("verify", tiny_artifact)
    assert proc.returncode == 6
    assert proc.stderr.startswith("bmc: artifact error: ") and "weights/rank0.safetensors is corrupted" in proc.stderr
    assert "Traceback" not in proc.stderr and "OK" not in proc.stdout


def test_verbose_shows_the_traceback(tmp_path):
    proc = bmc("-v", "show", tmp_path)
    assert proc.returncode == 6
    assert "Traceback (most recent call last)" in proc.stderr
    assert "bmc: artifact error: " in proc.stderr and "not a bmc artifact (no manifest.json)" in proc.stderr


def test_sigterm_runs_cleanup_and_exits_143(tmp_path):
    marker = tmp_path / "cleaned"
    code = ("import os, signal, time, bmc.cli\n"
            "bmc.cli.install_sigterm_handler()\n"
            "try:\n    os.kill(os.getpid(), signal.SIGTERM); time.sleep(10)\n"
            f"finally:\n    open({str(marker)!r}, 'w').close()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 143 and marker.exists()


def test_sigterm_while_writing_an_artifact_leaves_nothing_behind(tmp_path):
    # FAILURES.md 31: the writer's cleanup runs because SIGTERM becomes SystemExit(143)
    code = ("import os, signal, time, numpy as np, bmc.cli\n"
            "from bmc.runtime.artifact import write_artifact\n"
            "def export(path):\n"
            "    path.write_bytes(b'partial library')\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(10)\n"
            "bmc.cli.install_sigterm_handler()\n"
            "sig = {'inputs': [], 'outputs': [], 'params': [{'name': 'w', 'dtype': 'float32', 'shape': [2]}]}\n"
            f"write_artifact({str(tmp_path / 'out.bmc')!r}, signature=sig, weights=[('w', lambda: np.zeros(2, "
            "np.float32))], export_library=export, target={'kind': 'llvm'}, source={})\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 143, proc.stderr
    assert list(tmp_path.iterdir()) == []


# --- in-process: flag parsing and error routing --------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("input_ids=2,16", ("input_ids", (2, 16))),
    ("input_ids=2x16", ("input_ids", (2, 16))),
    ("a=b=3", ("a=b", (3,))),
    ("pixel_values=1, 3, 224, 224", ("pixel_values", (1, 3, 224, 224))),
])
def test_parse_input_shape(text, expected):
    assert cli.parse_input_shape(text) == expected


@pytest.mark.parametrize("text", ["input_ids", "=2,3", "x=", "x=2,,3", "x=2,0", "x=-1", "x=2.5", "x=2*3"])
def test_malformed_input_shape_shows_the_grammar(text):
    with pytest.raises(UsageError, match="--input-shape: malformed value") as info:
        cli.parse_input_shape(text)
    assert "NAME=D1,D2" in str(info.value)


def test_compile_passes_the_flags_to_compile_model(monkeypatch, tmp_path, capsys):
    calls = []

    def compile_model(model, output, **options):
        calls.append((model, output, options))
        Path(output).mkdir()
        return {"output": str(output), "target": {"kind": "cuda", "archs": ["sm_80"]}, "size_bytes": 2048}

    monkeypatch.setitem(sys.modules, "bmc.compiler", types.SimpleNamespace(compile_model=compile_model))
    out = tmp_path / "m.bmc"
    code = cli.main(["compile", "m.onnx", "-o", str(out), "--target", "cuda", "--cuda-arch", "sm_80",
                     "--input-shape", "ids=1x8", "--input-shape", "batch=4", "--dump-dir", "dumps",
                     "--mesh", "2x4", "--mesh-axes", "dp,tp"])
    assert code == 0
    (model, output, options), = calls
    mesh = options.pop("mesh")
    assert (model, output) == ("m.onnx", str(out)) and (mesh.shape, mesh.names) == ((2, 4), ("dp", "tp"))
    assert options == {"target": "cuda", "cuda_archs": ("sm_80",), "input_shapes": {"ids": (1, 8), "batch": 4},
                       "dump_dir": "dumps"}
    assert f"wrote {out} (target cuda sm_80, 2.0 KiB" in capsys.readouterr().out


def test_compile_flag_errors_exit_2_before_compiling(capsys):
    assert cli.main(["compile", "m.onnx", "-o", "m.bmc", "--input-shape", "ids=1;8"]) == 2
    assert capsys.readouterr().err.startswith("bmc: usage error: --input-shape: malformed value 'ids=1;8'")
    assert cli.main(["compile", "m.onnx", "-o", "m.bmc", "--cuda-arch", "sm_90"]) == 2
    assert cli.main(["compile", "m.onnx", "-o", "m.bmc", "--mesh", "8x0"]) == 2
    assert "--mesh: invalid mesh '8x0'" in capsys.readouterr().err


def test_interrupt_exits_130(monkeypatch, tiny_artifact, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_show", interrupted)
    assert cli.main(["show", str(tiny_artifact)]) == 130
    assert "bmc: interrupted" in capsys.readouterr().err


def test_unexpected_exception_is_reported_as_a_bug(monkeypatch, tiny_artifact, capsys):
    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "cmd_show", broken)
    assert cli.main(["show", str(tiny_artifact)]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug in bmc" in err and "ZeroDivisionError: boom" in err
    assert "versions: bmc 0.1.0, tvm 0.27" in err and "tvm-ffi" in err and "python 3." in err
