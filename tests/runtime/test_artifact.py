"""The artifact writer and verifier: schema, atomic writes, corruption and version checks (FAILURES.md 23, 33-35, 38).

The writer is exercised with a plain byte-writing ``export_library`` where the test is about files, not programs;
loading real compiled programs is covered in test_executor.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

import ml_dtypes
import numpy as np
import pytest

import bmc.runtime.artifact as artifact
from bmc.errors import ArtifactError, InternalError, UsageError
from bmc.runtime.artifact import FORMAT_VERSION, read_manifest, verify_artifact, write_artifact
from bmc.runtime.safetensors import SafetensorsFile

SIGNATURE = {"inputs": [{"name": "x", "dtype": "float32", "shape": [2, 3]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": [2, 4]}],
             "params": [{"name": "w", "dtype": "float32", "shape": [3, 4]},
                        {"name": "b", "dtype": "bfloat16", "shape": [4]}]}
W = np.arange(12, dtype=np.float32).reshape(3, 4)


def _write(output, **overrides):
    from bmc.ir.types import np_dtype

    options = dict(signature=SIGNATURE,
                   weights=[("w", lambda: W), ("b", lambda: np.ones(4, np_dtype("bfloat16")))],
                   export_library=lambda p: p.write_bytes(b"\x7fELF not really a library"),
                   target={"kind": "llvm", "archs": [], "mcpu": "znver4"},
                   source={"model": "m.onnx", "sha256": "ab" * 32, "opset": 20})
    options.update(overrides)
    return write_artifact(output, **options)


def _leftovers(folder, keep=("out.bmc",)):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_written_artifact_has_the_documented_layout_and_manifest(tmp_path):
    out = _write(tmp_path / "out.bmc", plan={"values": {}}, extra={"timings": {"compile_s": 1.0}})
    m = verify_artifact(out)
    assert m == read_manifest(out) == json.loads((out / "manifest.json").read_text())
    assert (m["format"], m["format_version"], m["world_size"]) == ("bmc-artifact", 1, 1)
    assert m["mesh"] == {"shape": [1], "axes": ["x"]} and m["rank_map"] == [[0]]
    assert m["programs"] == {"main": "programs/main.so"} and m["weights"] == {"0": "weights/rank0.safetensors"}
    assert m["signature"] == SIGNATURE and m["target"]["mcpu"] == "znver4" and m["source"]["opset"] == 20
    assert m["timings"] == {"compile_s": 1.0}
    for key in ("bmc_version", "tvm_version", "tvm_ffi_version", "onnx_version", "numpy_version", "created"):
        assert isinstance(m[key], str) and m[key]
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {"manifest.json"}
    for rel, info in m["files"].items():
        assert {k: info[k] for k in ("sha256", "size")} == artifact.file_digest(out / rel)
    assert m["files"]["weights/rank0.safetensors"]["tensors"] == {
        "w": hashlib.sha256(W.tobytes()).hexdigest(),
        "b": hashlib.sha256(np.ones(4, ml_dtypes.bfloat16).tobytes()).hexdigest()}
    st = SafetensorsFile(out / "weights/rank0.safetensors")
    assert st.names() == ["w", "b"] and np.array_equal(st.get("w"), W)
    assert json.loads((out / "plan.json").read_text()) == {"values": {}}
    assert _leftovers(tmp_path) == []


def test_rewriting_replaces_a_previous_artifact_without_leftovers(tmp_path):
    _write(tmp_path / "out.bmc")
    (tmp_path / "out.bmc" / "stale.txt").write_text("from the old artifact")
    out = _write(tmp_path / "out.bmc", source={"model": "second.onnx"})
    assert read_manifest(out)["source"] == {"model": "second.onnx"}
    assert not (out / "stale.txt").exists()
    assert _leftovers(tmp_path) == []


def test_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "out.bmc").mkdir()
    verify_artifact(_write(tmp_path / "out.bmc"))


# --- FAILURES.md 23: unwritable, not an artifact, disk full: an error and no partial files ------------------------
def test_missing_parent_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist") as info:
        _write(tmp_path / "nope" / "out.bmc")
    assert "mkdir" in str(info.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder_is_a_usage_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(UsageError, match="permission denied") as info:
            _write(locked / "out.bmc")
        assert str(locked / "out.bmc") in str(info.value)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_unwritable_folder_even_as_root(tmp_path, monkeypatch):
    # root passes every permission check, so simulate what an ordinary user sees: os.access says no
    monkeypatch.setattr(artifact.os, "access", lambda path, mode: False)
    with pytest.raises(UsageError, match="cannot write into the folder"):
        _write(tmp_path / "out.bmc")
    assert _leftovers(tmp_path, keep=()) == []


def test_permission_error_while_writing_is_a_usage_error(tmp_path):
    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with pytest.raises(UsageError, match="Permission denied"):
        _write(tmp_path / "out.bmc", export_library=denied)
    assert _leftovers(tmp_path, keep=()) == []


def test_existing_folder_that_is_not_an_artifact_is_left_alone(tmp_path):
    (tmp_path / "out.bmc").mkdir()
    (tmp_path / "out.bmc" / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match="not a bmc artifact") as info:
        _write(tmp_path / "out.bmc")
    assert "fix:" in str(info.value) and str(tmp_path / "out.bmc") in str(info.value)
    assert (tmp_path / "out.bmc" / "thesis.tex").read_text() == "precious"
    assert _leftovers(tmp_path) == []


def test_existing_file_is_refused(tmp_path):
    (tmp_path / "out.bmc").write_text("a file")
    with pytest.raises(UsageError, match="it is a file"):
        _write(tmp_path / "out.bmc")
    assert (tmp_path / "out.bmc").read_text() == "a file"


def test_disk_full_removes_every_partial_file(tmp_path, monkeypatch):
    def full_disk(path, *args, **kwargs):
        path.write_bytes(b"half a weight")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact, "write_safetensors", full_disk)
    with pytest.raises(ArtifactError, match="disk full"):
        _write(tmp_path / "out.bmc")
    assert _leftovers(tmp_path, keep=()) == []


def test_disk_full_while_replacing_keeps_the_previous_artifact(tmp_path, monkeypatch):
    _write(tmp_path / "out.bmc")
    before = read_manifest(tmp_path / "out.bmc")

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ArtifactError, match="disk full"):
        _write(tmp_path / "out.bmc", export_library=full_disk)
    assert verify_artifact(tmp_path / "out.bmc") == before
    assert _leftovers(tmp_path) == []


def test_interrupt_removes_the_temporary_folder(tmp_path):
    def interrupted(path):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "out.bmc", export_library=interrupted)
    assert _leftovers(tmp_path, keep=()) == []


def test_weights_that_do_not_match_the_signature_are_a_bug(tmp_path):
    with pytest.raises(InternalError, match="do not match signature params"):
        _write(tmp_path / "out.bmc", weights=[("w", lambda: W)])
    assert _leftovers(tmp_path, keep=()) == []


# --- FAILURES.md 33: corrupted files are named -------------------------------------------------------------------
def _truncate(p):
    p.write_bytes(p.read_bytes()[:-3])


def _flip(p):
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))


@pytest.mark.parametrize("rel, damage, message", [
    ("weights/rank0.safetensors", _truncate, "weights/rank0.safetensors is truncated: .* bytes, expected"),
    ("programs/main.so", _flip, "programs/main.so is corrupted: sha256"),
    ("weights/rank0.safetensors", _flip, "weights/rank0.safetensors is corrupted"),
    ("plan.json", lambda p: p.unlink(), "plan.json is missing"),
    ("plan.json", lambda p: p.write_text('{"values": {}, "x": 1}\n'), "plan.json is longer than written"),
])
def test_damaged_files_are_named(tmp_path, rel, damage, message):
    out = _write(tmp_path / "out.bmc")
    damage(out / rel)
    with pytest.raises(ArtifactError, match=message) as info:
        verify_artifact(out)
    assert info.value.exit_code == 6 and "fix:" in str(info.value)


def test_manifest_without_digest_for_a_program_is_refused(tmp_path):
    out = _write(tmp_path / "out.bmc")
    m = read_manifest(out)
    del m["files"]["programs/main.so"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="no digest for programs/main.so"):
        verify_artifact(out)


def test_files_outside_the_artifact_are_refused(tmp_path):
    out = _write(tmp_path / "out.bmc")
    (tmp_path / "secret").write_text("x")
    m = read_manifest(out)
    m["files"]["../secret"] = artifact.file_digest(tmp_path / "secret")
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        verify_artifact(out)


# --- FAILURES.md 34, 35: format and library versions ---------------------------------------------------------------
def _edit_manifest(out, **changes):
    m = json.loads((out / "manifest.json").read_text())
    m.update(changes)
    (out / "manifest.json").write_text(json.dumps(m))


def test_newer_format_needs_a_newer_bmc(tmp_path):
    out = _write(tmp_path / "out.bmc")
    _edit_manifest(out, format_version=FORMAT_VERSION + 1, bmc_version="0.9.0")
    with pytest.raises(ArtifactError, match=f"format {FORMAT_VERSION + 1} is newer.*needs bmc >= 0.9.0") as info:
        read_manifest(out)
    assert "upgrade bmc" in str(info.value)


def test_older_unsupported_format_says_how_to_recompile(tmp_path):
    out = _write(tmp_path / "out.bmc")
    _edit_manifest(out, format_version=0)
    with pytest.raises(ArtifactError, match="no longer supported") as info:
        verify_artifact(out)
    assert "bmc compile m.onnx -o out.bmc" in str(info.value)


@pytest.mark.parametrize("key, shown", [("tvm_version", "tvm 0.1.0 (artifact) vs "),
                                        ("tvm_ffi_version", "tvm-ffi 0.1.0 (artifact) vs ")])
def test_library_version_mismatch_shows_both(tmp_path, key, shown):
    out = _write(tmp_path / "out.bmc")
    installed = artifact.installed_versions()[key]
    _edit_manifest(out, **{key: "0.1.0"})
    with pytest.raises(ArtifactError, match="compiled with other library versions") as info:
        verify_artifact(out)
    assert shown + f"{installed} (installed)" in str(info.value)
    verify_artifact(out, check_versions=False)  # digests alone still pass


def test_malformed_manifest_names_the_keys(tmp_path):
    out = _write(tmp_path / "out.bmc")
    m = json.loads((out / "manifest.json").read_text())
    del m["files"]
    m["signature"]["inputs"][0]["dtype"] = "float128"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="files \\(expected dict\\).*unknown dtype 'float128'"):
        read_manifest(out)


# --- FAILURES.md 38: not an artifact at all ------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.write_bytes(b"\x08\x01")])
def test_not_an_artifact(tmp_path, make):
    make(tmp_path / "thing")
    with pytest.raises(ArtifactError, match="not a bmc artifact \\(no manifest.json\\)"):
        verify_artifact(tmp_path / "thing")


def test_foreign_manifest_is_not_an_artifact(tmp_path):
    (tmp_path / "thing").mkdir()
    (tmp_path / "thing" / "manifest.json").write_text('{"name": "some other tool"}')
    with pytest.raises(ArtifactError, match="not a bmc artifact"):
        read_manifest(tmp_path / "thing")


def test_missing_path(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        read_manifest(tmp_path / "gone.bmc")
