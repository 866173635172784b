"""Our own reader and writer of the safetensors format (no pickle, no third-party package).

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON, then the tensor bytes back to back::

    {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}, ..., "__metadata__": {"k": "v"}}

Offsets are relative to the start of the data. The header is padded with spaces to a multiple of 8 bytes.

The writer streams one tensor at a time: the header is computed from declared dtypes and shapes first, then each
tensor is produced (a provider callable may read it lazily), checked against its declaration, written and dropped, so
memory stays bounded by the largest tensor. The reader validates the whole header before it maps anything
(FAILURES.md 9): every problem is an ``ArtifactError`` naming the file and the tensor. Arrays come back as read-only
``np.memmap`` views.
"""

from __future__ import annotations

import hashlib
import json
import struct
from math import prod
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Union

import numpy as np

from bmc.errors import ArtifactError, InternalError
from bmc.ir.types import itemsize, np_dtype

# safetensors dtype code ↔ bmc dtype name
CODE_TO_DTYPE: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}
DTYPE_TO_CODE = {v: k for k, v in CODE_TO_DTYPE.items()}

# A header larger than this is refused before it is read (the reference implementation uses the same bound).
MAX_HEADER_BYTES = 100 * 1024 * 1024
_METADATA = "__metadata__"

ArrayOrProvider = Union[np.ndarray, Callable[[], np.ndarray]]


def _shape_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return prod(shape) * itemsize(dtype)


def build_header(entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    """The padded header bytes (length prefix included) for ``(name, dtype, shape)`` entries in file order."""
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise InternalError(f"safetensors metadata must map str to str; bad keys: {bad}")
        header[_METADATA] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        if name in header:
            raise InternalError(f"tensor {name!r} is written twice (or collides with {_METADATA})")
        if dtype not in DTYPE_TO_CODE:
            raise InternalError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        size = _shape_bytes(dtype, tuple(shape))
        header[name] = {"dtype": DTYPE_TO_CODE[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, str, tuple[int, ...], ArrayOrProvider]],
                      metadata: Mapping[str, str] | None = None) -> dict:
    """Write ``(name, dtype, shape, array_or_provider)`` entries to ``path``, one tensor in memory at a time.

    ``tensors`` is iterated twice (header first, then data), so pass a list of descriptors, not a generator.
    A provider returning a different dtype or shape than declared is a bug in the caller (``InternalError``).
    Returns ``{"size": bytes, "sha256": hex, "tensors": {name: hex}}``: the written file's size and SHA-256, and each
    tensor's SHA-256 (of its bytes), computed while writing.
    """
    entries = list(tensors)
    header = build_header(((n, d, tuple(s)) for n, d, s, _ in entries), metadata)
    digest = hashlib.sha256(header)
    size = len(header)
    each = {}
    with open(path, "wb") as f:
        f.write(header)
        for name, dtype, shape, source in entries:
            each[name] = hashlib.sha256()
            arr = source() if callable(source) else source
            arr = np.asarray(arr)
            if arr.dtype != np_dtype(dtype) or arr.shape != tuple(shape):
                raise InternalError(f"tensor {name!r} was declared {dtype}{list(shape)} but its data is "
                                    f"{arr.dtype}{list(arr.shape)}")
            if arr.size:
                raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
                f.write(raw)
                digest.update(raw)
                each[name].update(raw)
                size += raw.nbytes
                del raw
            del arr  # drop this tensor before the next provider runs
    return {"size": size, "sha256": digest.hexdigest(), "tensors": {n: h.hexdigest() for n, h in each.items()}}


class SafetensorsFile:
    """A validated safetensors file; ``get(name)`` returns a read-only memory-mapped array.

    Construction reads and checks only the header: its length, JSON, every dtype, shape and offset range, that
    sizes equal ``prod(shape) * itemsize``, that ranges neither overlap nor leave holes, and that the file is exactly
    as long as the header says. No tensor data is touched until ``get``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries, self._metadata, self._data_start = _read_header(self.path)

    # --- mapping-like access -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._entries)

    keys = names

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(bmc dtype, shape)`` of a tensor, without reading it."""
        dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    @property
    def data_start(self) -> int:
        """Byte offset of the first tensor's data (the 8-byte length plus the JSON header before it)."""
        return self._data_start

    def layout(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """``(name, bmc dtype, shape, nbytes)`` of every tensor in the order its bytes follow the header; the
        validated layout has no holes, so reading these in turn after ``data_start`` bytes reads the whole file."""
        ordered = sorted(self._entries.items(), key=lambda kv: kv[1][2])
        return [(name, dtype, shape, end - begin) for name, (dtype, shape, begin, end) in ordered]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only array backed by the file (a copy only for empty tensors)."""
        dtype, shape, begin, end = self._entry(name)
        if begin == end:
            arr = np.zeros(shape, np_dtype(dtype))
            arr.flags.writeable = False
            return arr
        return np.memmap(self.path, dtype=np_dtype(dtype), mode="r", offset=self._data_start + begin, shape=shape)

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise ArtifactError(f"no tensor {name!r} in the file (it has {len(self._entries)}: "
                                f"{_preview(self._entries)})", where=str(self.path)) from None


def _preview(names, limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _read_header(path: Path):
    where = str(path)
    fix = "the weights file is damaged; recompile the model or restore the artifact from a good copy"
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ArtifactError(f"file is {file_size} bytes, too short for a safetensors header", where=where,
                                    fix=fix)
            (n,) = struct.unpack("<Q", prefix)
            if n == 0 or n > MAX_HEADER_BYTES or n > file_size - 8:
                raise ArtifactError(f"header length {n} is impossible for a file of {file_size} bytes "
                                    f"(limit {MAX_HEADER_BYTES})", where=where, fix=fix)
            raw = f.read(n)
    except OSError as e:
        raise ArtifactError(f"cannot read safetensors file: {e.strerror or e}", where=where) from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"header is not valid JSON: {e}", where=where, fix=fix) from e
    if not isinstance(header, dict):
        raise ArtifactError("header is not a JSON object", where=where, fix=fix)
    metadata = header.pop(_METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ArtifactError(f"{_METADATA} must map strings to strings", where=where, fix=fix)
    entries = {name: _check_entry(name, spec, where, fix) for name, spec in header.items()}
    data_size = file_size - 8 - n
    _check_layout(entries, data_size, where, fix)
    return entries, metadata, 8 + n


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    if dups:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, dups))}")
    return dict(pairs)


def _check_entry(name: str, spec, where: str, fix: str):
    def bad(what: str):
        return ArtifactError(f"tensor {name!r}: {what}", where=where, fix=fix)

    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"entry must have exactly dtype, shape and data_offsets; got {spec!r}"[:300])
    code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if code not in CODE_TO_DTYPE:
        raise bad(f"unknown dtype {code!r}; known: {', '.join(CODE_TO_DTYPE)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    dtype = CODE_TO_DTYPE[code]
    expected = _shape_bytes(dtype, tuple(shape))
    if offsets[1] - offsets[0] != expected:
        raise bad(f"{offsets[1] - offsets[0]} bytes stored but {code}{shape} needs {expected}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_layout(entries: dict, data_size: int, where: str, fix: str) -> None:
    cursor, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if end > data_size:
            raise ArtifactError(f"tensor {name!r}: bytes [{begin}, {end}) lie past the end of the data "
                                f"({data_size} bytes; the file is truncated)", where=where, fix=fix)
        if begin < cursor:
            raise ArtifactError(f"tensor {name!r} overlaps tensor {previous!r}", where=where, fix=fix)
        if begin > cursor:
            raise ArtifactError(f"bytes [{cursor}, {begin}) before tensor {name!r} belong to no tensor", where=where,
                                fix=fix)
        cursor, previous = end, name
    if cursor != data_size:
        raise ArtifactError(f"{data_size - cursor} trailing bytes after the last tensor", where=where, fix=fix)
