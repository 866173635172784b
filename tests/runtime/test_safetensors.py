"""bmc's safetensors reader/writer: round trips, spec conformance, bounded-memory streaming, header validation."""

from __future__ import annotations

import gc
import json
import struct
import weakref

import ml_dtypes
import numpy as np
import pytest

from bmc.errors import ArtifactError, InternalError
from bmc.ir.types import np_dtype
from bmc.runtime.safetensors import CODE_TO_DTYPE, SafetensorsFile, write_safetensors


def _raw_file(path, header: dict, data: bytes, *, length: int | None = None, pad: bool = True) -> None:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def test_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for dtype in CODE_TO_DTYPE.values():
        a = rng.standard_normal((2, 3)) * 10
        arrays[dtype] = (a > 0) if dtype == "bool" else a.astype(np_dtype(dtype))
    arrays["scalar"] = np.float32(3.5).reshape(())
    arrays["empty"] = np.zeros((0, 4), np.float32)
    entries = [(n, "float32" if n in ("scalar", "empty") else n, a.shape, a) for n, a in arrays.items()]
    info = write_safetensors(tmp_path / "w.safetensors", entries, {"rank": "0"})

    assert info["size"] == (tmp_path / "w.safetensors").stat().st_size
    st = SafetensorsFile(tmp_path / "w.safetensors")
    assert st.names() == list(arrays) == list(st.keys())
    assert st.metadata == {"rank": "0"}
    for name, want in arrays.items():
        got = st.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))
        assert not got.flags.writeable
    assert isinstance(st["float32"], np.memmap)
    assert st.get("bfloat16").dtype == np.dtype(ml_dtypes.bfloat16)


def test_writer_layout_follows_the_spec(tmp_path):
    a, b = np.arange(3, dtype=np.int8), np.arange(2, dtype=np.float32)
    write_safetensors(tmp_path / "w", [("a", "int8", (3,), a), ("b", "float32", (2,), lambda: b)])
    raw = (tmp_path / "w").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")  # padded with spaces
    header = json.loads(raw[8:8 + n])
    assert header["a"] == {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]}
    assert header["b"] == {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}  # back to back, no alignment
    assert raw[8 + n:] == a.tobytes() + b.astype("<f4").tobytes()


def test_reads_a_hand_made_file(tmp_path):
    # built straight from the spec, independent of our writer; unpadded header is legal too
    data = np.array([1.5, -2.0], "<f4").tobytes() + np.array([7], "<i8").tobytes()
    header = {"__metadata__": {"source": "hand"}, "b": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _raw_file(tmp_path / "h", header, data, pad=False)
    st = SafetensorsFile(tmp_path / "h")
    assert st.get("a").tolist() == [1.5, -2.0] and st.get("b").tolist() == [7]
    assert st.info("b") == ("int64", (1,)) and st.metadata == {"source": "hand"}


def test_writer_holds_one_tensor_at_a_time(tmp_path):
    alive: list[weakref.ref] = []

    def provider(i):
        def make():
            gc.collect()
            assert all(r() is None for r in alive), "an earlier tensor is still referenced by the writer"
            a = np.full((64, 64), i, np.float32)
            alive.append(weakref.ref(a))
            return a
        return make

    write_safetensors(tmp_path / "w", [(f"t{i}", "float32", (64, 64), provider(i)) for i in range(4)])
    assert len(alive) == 4
    assert SafetensorsFile(tmp_path / "w").get("t3")[0, 0] == 3


def test_writer_refuses_data_that_does_not_match_its_declaration(tmp_path):
    with pytest.raises(InternalError, match="'w' was declared float32\\[2\\] but its data is float64\\[2\\]"):
        write_safetensors(tmp_path / "w", [("w", "float32", (2,), np.zeros(2))])


def test_missing_tensor_lists_the_real_names(tmp_path):
    write_safetensors(tmp_path / "w", [("alpha", "float32", (1,), np.zeros(1, np.float32))])
    with pytest.raises(ArtifactError, match="no tensor 'beta'.*alpha"):
        SafetensorsFile(tmp_path / "w").get("beta")


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, length, message", [
    ({"w": F32x2}, b"\0" * 8, 1 << 40, "header length"),
    ({"w": F32x2}, b"\0" * 8, 0, "header length"),
    ({"w": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, None, "'w': unknown dtype 'F8'"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "'w': 8 bytes stored but"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "'w': shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "'w': data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "'w': entry must have"),
    ({"w": F32x2}, b"\0" * 4, None, "'w'.*past the end.*truncated"),
    ({"w": F32x2, "v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None,
     "'v' overlaps tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "before tensor 'w'"),
    ({"w": F32x2}, b"\0" * 12, None, "4 trailing bytes"),
    ({"__metadata__": {"k": 1}, "w": F32x2}, b"\0" * 8, None, "__metadata__ must map strings"),
    ([1, 2], b"", None, "not a JSON object"),
])
def test_bad_headers_are_refused_naming_the_tensor(tmp_path, header, data, length, message):
    _raw_file(tmp_path / "bad", header, data, length=length)
    with pytest.raises(ArtifactError, match=message) as info:
        SafetensorsFile(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(info.value)


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 8) + b"{not jso", "not valid JSON"),
    (struct.pack("<Q", 16) + b'{"a":{},"a":{}} ', "duplicate key"),
])
def test_unreadable_headers(tmp_path, raw, message):
    (tmp_path / "bad").write_bytes(raw)
    with pytest.raises(ArtifactError, match=message):
        SafetensorsFile(tmp_path / "bad")
