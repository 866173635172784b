"""The ``.bmc`` artifact: schema, atomic writer and verifier.

An artifact is a directory::

    model.bmc/
      manifest.json              what the rest is: versions, target, mesh, signature, digests (written last)
      plan.json                  the sharding plan (``{}`` while there is none)
      programs/main.so           the compiled program, one for every rank of a homogeneous mesh
                                 (a pipeline artifact has programs/stage0.so, stage1.so, ... instead)
      weights/rank0.safetensors  the weights rank 0 needs, in the order the program takes them

Manifest keys (``format_version`` 1): ``format`` ("bmc-artifact"), ``format_version``, ``bmc_version``,
``tvm_version``, ``tvm_ffi_version``, ``onnx_version``, ``numpy_version``, ``created`` (UTC ISO 8601), ``target``
(``{"kind", "archs", "mcpu"}``), ``mesh`` (``{"shape", "axes"}``), ``world_size``, ``rank_map`` (rank → mesh
coordinate), ``signature`` (``{"inputs", "outputs", "params"}``, each a list of ``{"name", "dtype", "shape"}``; the
program takes inputs then params in this order and returns a tuple of the outputs), ``programs`` (name → file),
``weights`` (rank as a string → file), ``source`` (where the model came from), ``files`` (every file but the
manifest → ``{"sha256", "size"}``; a weights file's entry also ``"tensors"``: name → SHA-256 of that tensor's bytes,
what ``load(share_weights=...)`` matches weights by; an artifact without them shares nothing), plus any keys the
caller adds through ``extra``.

Format 2 adds pipeline artifacts (written as 2 only when they are one, so older bmc versions still read the
others): ``pipeline`` = ``{"stages": [...], "microbatches": K, "outputs": [...]}``, each stage ``{"program",
"ranks", "mesh", "signature", "nodes", "sends", "kernels"?, "implicit_inputs"?}``, ``outputs`` the values (by the
stages' names) that are the model's outputs; the top-level ``signature`` is the whole model's (no params: each
stage's signature lists its ranks' weights) and ``mesh`` the whole mesh.

Format 3 (written only for the artifacts that need it; the others keep the older numbers): a pipeline's graph
outputs leave the stage that makes them straight for every rank (a stage's program outputs include them; ``sends``
no longer carries them along the chain, so a format-2 runtime would not find them), and an output left split on the
mesh (``--output-shard``), or an input fed as blocks (``--input-shard``), has in the signature its global ``shape``
plus ``spec``, ``local_shape`` (what the program returns or takes) and ``blocks`` (per rank, where its block starts
in each dim).

Format 4 (written only for artifacts with donated inputs, ``--donate``): the program writes over an input marked
``"donated": true`` in the signature, and an output with ``"aliases": NAME`` is that input's buffer. A format-3
runtime would let the program overwrite its caller's arrays without knowing, so it refuses these.

Guarantees:

- Writing is atomic: everything is built in ``.<name>.tmp-<pid>-<random>`` next to the output and renamed into place
  at the end; on any failure, Ctrl-C included, the temporary directory is removed (FAILURES.md 23, 31).
- ``verify_artifact`` checks the format version, the TVM and tvm-ffi versions and the size and SHA-256 of every file
  before anything is loaded or mapped (FAILURES.md 33-35, 38). The loader hashes the weights as it reads them, in
  one pass (:class:`HashingReader`): no weight is used before its file's digest has matched.
- Out of scope (FAILURES.md 37): the digests live in the manifest itself, so they detect accidental damage, not
  tampering. Someone who can edit the files can also rewrite ``manifest.json`` to match; only a signature over the
  manifest (not implemented) would detect that. Load artifacts only from sources you trust: the program is native
  code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import metadata as _metadata
from pathlib import Path
from typing import Callable

import numpy as np

from bmc.errors import ArtifactError, BmcError, InternalError, UsageError
from bmc.ir.types import DTYPES
from bmc.runtime.safetensors import write_safetensors

FORMAT = "bmc-artifact"
FORMAT_VERSION = 4  # the newest format (see above); an artifact is written with the oldest number that describes it
MIN_FORMAT_VERSION = 1  # oldest format this bmc still loads
MANIFEST = "manifest.json"
PLAN = "plan.json"


_REQUIRED = {"format": str, "format_version": int, "bmc_version": str, "tvm_version": str, "tvm_ffi_version": str,
             "created": str, "target": dict, "mesh": dict, "world_size": int, "rank_map": list, "signature": dict,
             "programs": dict, "weights": dict, "source": dict, "files": dict}


# --- versions ------------------------------------------------------------------------------------------------------
def _dist_version(name: str) -> str:
    try:
        return _metadata.version(name)
    except _metadata.PackageNotFoundError:
        return "not installed"


def installed_versions() -> dict[str, str]:
    """Versions of bmc and what an artifact depends on, read without importing TVM or ONNX."""
    from bmc import __version__

    return {"bmc_version": __version__, "tvm_version": _dist_version("apache-tvm"),
            "tvm_ffi_version": _dist_version("apache-tvm-ffi"), "onnx_version": _dist_version("onnx"),
            "numpy_version": np.__version__}


# --- signature -----------------------------------------------------------------------------------------------------
def graph_signature(graph) -> dict:
    """The signature of a bmc IR graph (duck-typed: ``inputs``, ``outputs``, ``params`` of named typed values)."""
    def entries(values):
        return [{"name": v.name, "dtype": v.type.dtype, "shape": list(v.type.shape)} for v in values]

    return {"inputs": entries(graph.inputs), "outputs": entries(graph.outputs), "params": entries(graph.params)}


def signature_problems(signature) -> list[str]:
    """Everything wrong with a signature dict (empty when it is well formed)."""
    if not isinstance(signature, dict):
        return ["signature is not an object"]
    problems = []
    for kind in ("inputs", "outputs", "params"):
        items = signature.get(kind)
        if not isinstance(items, list):
            problems.append(f"signature.{kind} is not a list")
            continue
        seen = set()
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                problems.append(f"signature.{kind}[{i}] has no name")
                continue
            name = item["name"]
            if name in seen:
                problems.append(f"signature.{kind}: {name!r} appears twice")
            seen.add(name)
            if item.get("dtype") not in DTYPES:
                problems.append(f"signature.{kind} {name!r}: unknown dtype {item.get('dtype')!r}")
            shape = item.get("shape")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                problems.append(f"signature.{kind} {name!r}: shape {shape!r} is not a list of non-negative ints")
            elif kind != "params" and "blocks" in item and not _blocks_fit(item, shape):
                problems.append(f"signature.{kind} {name!r}: blocks {item.get('blocks')!r} of local shape "
                                f"{item.get('local_shape')!r} do not lie inside its shape {shape}")
    if not problems:
        problems += _alias_problems(signature)
    return problems


def _alias_problems(signature: dict) -> list[str]:
    """An output that is a donated input's buffer (``aliases``) must name a donated input of its dtype and shape."""
    inputs = {i["name"]: i for i in signature["inputs"]}
    problems = [f"signature.inputs {i['name']!r}: donated {i['donated']!r} is not true" for i in inputs.values()
                if "donated" in i and i["donated"] is not True]
    for o in signature["outputs"]:
        if "aliases" not in o:
            continue
        i = inputs.get(o["aliases"]) if isinstance(o["aliases"], str) else None
        if i is None or i.get("donated") is not True or i["dtype"] != o["dtype"] or \
                i.get("local_shape", i["shape"]) != o.get("local_shape", o["shape"]):
            problems.append(f"signature.outputs {o['name']!r}: aliases {o['aliases']!r}, which is not a donated input "
                            "of its dtype and shape")
    return problems


def _blocks_fit(item: dict, shape: list[int]) -> bool:
    """A split input's or output's ``blocks`` (per rank, its block's start in each dim) and ``local_shape`` lie in
    ``shape``."""
    local, blocks = item.get("local_shape"), item.get("blocks")
    ints = (lambda xs: isinstance(xs, list) and len(xs) == len(shape) and all(type(x) is int and x >= 0 for x in xs))
    return ints(local) and isinstance(blocks, list) and bool(blocks) and all(
        ints(b) and all(o + n <= d for o, n, d in zip(b, local, shape)) for b in blocks)


def _split_io(signature: dict) -> bool:
    return any("blocks" in e for kind in ("inputs", "outputs") for e in signature.get(kind, []))


def _format_version(signature: dict, pipeline) -> int:
    """The oldest format number that describes an artifact (see the module's docstring)."""
    if any(i.get("donated") for i in signature.get("inputs", [])):
        return 4
    return 3 if pipeline or _split_io(signature) else 1


# --- writing -------------------------------------------------------------------------------------------------------
def write_artifact(output, *, signature: dict,
                   weights: list[tuple[str, Callable[[], np.ndarray]]] | dict[int, list[tuple[str, Callable]]],
                   export_library: Callable[[Path], None] | dict[str, Callable[[Path], None]], target: dict,
                   source: dict, plan: dict | None = None, extra: dict | None = None, mesh: dict | None = None,
                   pipeline: dict | None = None) -> Path:
    """Write an artifact to ``output`` atomically and return its path.

    ``weights`` are ``(param name, provider)`` in the order of ``signature["params"]`` — one list for a single
    device, or ``{rank: list}`` with each rank's own shards; each provider is called once, while its weights file is
    streamed, so only one weight is in memory at a time. ``mesh`` is ``{"shape": [...], "axes": [...]}`` (default: one
    device); ranks map to mesh coordinates in row-major order. ``export_library(path)`` writes the compiled program.
    ``extra`` adds top-level manifest keys (it may not override the ones above).
    A pipeline artifact (``pipeline = {"stages": [...], "microbatches": K}``) has one program per stage
    (``export_library`` maps each stage's ``program`` name to its writer); each stage names its world ``ranks``, its
    submesh and its own ``signature``, whose params are what its ranks' weights files hold.
    An existing artifact at ``output`` is replaced; any other existing path is refused.
    """
    output = Path(output)
    mesh = dict(mesh or {"shape": [1], "axes": ["x"]})
    world = int(np.prod(mesh["shape"]))
    per_rank = weights if isinstance(weights, dict) else {0: weights}
    programs = export_library if isinstance(export_library, dict) else {"main": export_library}
    problems = signature_problems(signature)
    rank_signature = {rank: signature for rank in range(world)}
    for st in (pipeline or {}).get("stages", []):
        problems += [f"stage {st.get('program')}: {p}" for p in signature_problems(st.get("signature"))]
        if st.get("program") not in programs:
            problems.append(f"stage program {st.get('program')!r} has no library")
        rank_signature.update({rank: st["signature"] for rank in st.get("ranks", [])})
    if sorted(per_rank) != list(range(world)):
        problems.append(f"weights for ranks {sorted(per_rank)} but the mesh {mesh['shape']} has {world} ranks")
    for rank, ws in per_rank.items():
        names = [p["name"] for p in rank_signature.get(rank, {}).get("params", [])]
        if not problems and [n for n, _ in ws] != names:
            problems.append(f"rank {rank} weights {[n for n, _ in ws]} do not match signature params {names}")
    clash = sorted(set(extra or {}) & (set(_REQUIRED) | {"onnx_version", "numpy_version", "pipeline"}))
    if clash:
        problems.append(f"extra manifest keys {clash} would override reserved keys")
    if problems:
        raise InternalError("cannot write artifact: " + "; ".join(problems), where=str(output))
    _check_output(output)

    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise _os_error(e, output, "create a temporary directory next to") from e
    try:
        (tmp / "programs").mkdir()
        (tmp / "weights").mkdir()
        files: dict[str, dict] = {}
        program_files = {name: program_path(name) for name in programs}
        for name, export in programs.items():
            export(tmp / program_files[name])
        weight_files = {}
        for rank in range(world):
            rel = weights_path(rank)
            params = {p["name"]: p for p in rank_signature[rank]["params"]}
            files[rel] = write_safetensors(
                tmp / rel, [(n, params[n]["dtype"], tuple(params[n]["shape"]), provider)
                            for n, provider in per_rank[rank]], metadata={"format": FORMAT, "rank": str(rank)})
            weight_files[str(rank)] = rel
        _write_json(tmp / PLAN, plan if plan is not None else {})
        for rel in (*program_files.values(), PLAN):
            files[rel] = file_digest(tmp / rel)
        manifest = {
            "format": FORMAT, "format_version": _format_version(signature, pipeline),
            **installed_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target": dict(target), "mesh": {"shape": list(mesh["shape"]), "axes": list(mesh["axes"])},
            "world_size": world, "rank_map": [list(c) for c in np.ndindex(*mesh["shape"])],
            "signature": signature, "programs": program_files, "weights": weight_files,
            "source": dict(source), "files": dict(sorted(files.items())), **(extra or {}),
            **({"pipeline": pipeline} if pipeline else {}),
        }
        for rel in files:
            _fsync(tmp / rel)
        _write_json(tmp / MANIFEST, manifest)
        _fsync(tmp / MANIFEST)
        _move_into_place(tmp, output)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, BmcError):
            raise _os_error(e, output, "write") from e
        raise
    return output


def program_path(name: str) -> str:
    """Where the program ``name`` (``main``, or a pipeline stage's) lives inside an artifact."""
    return f"programs/{name}.so"


def weights_path(rank: int) -> str:
    """Where rank ``rank``'s weights live inside an artifact."""
    return f"weights/rank{rank}.safetensors"


def _check_output(output: Path) -> None:
    parent = output.parent
    if not parent.is_dir():
        raise UsageError(f"the folder {str(parent)!r} for the artifact does not exist", where=str(output),
                         fix=f"create it first (mkdir -p {parent}) or choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write into the folder {str(parent)!r} (permission denied)", where=str(output),
                         fix="choose an output path in a folder you can write to")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise UsageError("the output path exists and is not a bmc artifact folder (it is a file or a link)",
                         where=str(output), fix="choose another output path, or delete that file first")
    if output.is_dir() and any(output.iterdir()) and not _is_artifact(output):
        raise UsageError("the output path is an existing folder that is not a bmc artifact; refusing to replace it",
                         where=str(output), fix="choose a new path such as model.bmc, or empty that folder first")


def _is_artifact(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text("utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _move_into_place(tmp: Path, output: Path) -> None:
    if not output.exists():
        os.rename(tmp, output)
        _fsync_dir(output.parent)
        return
    aside = output.parent / f".{output.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(output, aside)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(aside, output)  # put the previous artifact back
        raise
    _fsync_dir(output.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _os_error(e: OSError, output: Path, action: str) -> BmcError:
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return ArtifactError(f"disk full while writing the artifact; nothing was left behind ({e.strerror})",
                             where=str(output), fix="free some space or write to another disk")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UsageError(f"cannot {action} the artifact: {e.strerror}", where=str(output),
                          fix="choose an output path in a folder you can write to")
    return ArtifactError(f"could not {action} the artifact: {e}", where=str(output))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic


def file_digest(path: Path, chunk: int = 1 << 22) -> dict:
    """``{"sha256", "size"}`` of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "size": size}


# --- reading and verifying -----------------------------------------------------------------------------------------
def read_manifest(path) -> dict:
    """The manifest of the artifact at ``path``, after checking it is an artifact of a format this bmc reads."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise ArtifactError("no such file or directory", where=where, fix="check the artifact path")
    if not (path / MANIFEST).is_file():
        kind = "a file" if not path.is_dir() else "a folder"
        raise ArtifactError(f"not a bmc artifact (no manifest.json): it is {kind} without one", where=where,
                            fix="pass the .bmc folder written by `bmc compile`")
    try:
        manifest = json.loads((path / MANIFEST).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"manifest.json cannot be read: {e}", where=where,
                            fix="the artifact is damaged; recompile the model") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"not a bmc artifact (manifest.json has no \"format\": \"{FORMAT}\")", where=where,
                            fix="pass the .bmc folder written by `bmc compile`")
    _check_format_version(manifest, where)
    bad = [f"{k} (expected {t.__name__})" for k, t in _REQUIRED.items() if not isinstance(manifest.get(k), t)]
    bad += signature_problems(manifest.get("signature"))
    if not bad:
        bad += [f"signature.{kind} {e['name']!r}: {len(e['blocks'])} blocks for {manifest['world_size']} ranks"
                for kind in ("inputs", "outputs") for e in manifest["signature"][kind]
                if len(e.get("blocks", [None] * manifest["world_size"])) != manifest["world_size"]]
    if bad:
        raise ArtifactError("manifest.json is missing or has malformed keys: " + "; ".join(bad), where=where,
                            fix="the artifact is damaged; recompile the model")
    return manifest


def _check_format_version(manifest: dict, where: str) -> None:
    version = manifest.get("format_version")
    made_by = manifest.get("bmc_version", "?")
    if type(version) is not int:
        raise ArtifactError(f"format_version {version!r} is not an integer", where=where,
                            fix="the artifact is damaged; recompile the model")
    if version > FORMAT_VERSION:
        from bmc import __version__

        raise ArtifactError(f"artifact format {version} is newer than this bmc {__version__} reads (up to "
                            f"{FORMAT_VERSION}); it needs bmc >= {made_by}", where=where,
                            fix=f"upgrade bmc (pip install 'bmc>={made_by}') or recompile the model with this bmc")
    if version < MIN_FORMAT_VERSION:
        model = manifest.get("source", {}).get("model", "MODEL.onnx") if isinstance(manifest.get("source"), dict) \
            else "MODEL.onnx"
        raise ArtifactError(f"artifact format {version} (written by bmc {made_by}) is no longer supported; this bmc "
                            f"reads formats {MIN_FORMAT_VERSION} to {FORMAT_VERSION}", where=where,
                            fix=f"recompile: bmc compile {model} -o {Path(where).name}")


def check_library_versions(manifest: dict, where: str = "artifact") -> None:
    """Refuse an artifact built against another TVM or tvm-ffi (the program's ABI depends on both)."""
    here = installed_versions()
    diffs = [f"{key[:-8].replace('_', '-')} {manifest.get(key)} (artifact) vs {here[key]} (installed)"
             for key in ("tvm_version", "tvm_ffi_version") if manifest.get(key) != here[key]]
    if diffs:
        pins = f"apache-tvm=={manifest.get('tvm_version')} apache-tvm-ffi=={manifest.get('tvm_ffi_version')}"
        raise ArtifactError("compiled with other library versions: " + "; ".join(diffs), where=where,
                            fix=f"recompile the model with this installation, or install {pins}")


def verify_artifact(path, *, check_versions: bool = True, hash_weights: bool = True) -> dict:
    """Check an artifact completely (format, versions, size and SHA-256 of every file); return its manifest.

    Nothing is loaded or mapped: this is what ``bmc.load`` runs before touching the program. Without
    ``hash_weights`` the weight files get every check but the SHA-256, which the caller then owes while it reads
    them (the loader, through a :class:`HashingReader`: one pass over the bytes instead of two).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if check_versions:
        check_library_versions(manifest, str(path))
    files = manifest["files"]
    referenced = [PLAN, *manifest["programs"].values(), *manifest["weights"].values()]
    unlisted = sorted(set(referenced) - set(files))
    if unlisted:
        raise ArtifactError(f"manifest.json lists no digest for {', '.join(unlisted)}", where=str(path),
                            fix="the artifact is damaged; recompile the model")
    deferred = set() if hash_weights else set(manifest["weights"].values())
    for rel, expected in files.items():
        verify_file(path, rel, expected, hash=rel not in deferred)
    return manifest


_DAMAGED = "the artifact is damaged; restore it from a good copy or recompile the model"


def verify_file(root: Path, rel: str, expected, *, hash: bool = True) -> Path:
    """Check one file of the artifact at ``root`` against its manifest entry ``expected`` (inside the artifact,
    present, its size, and with ``hash`` its SHA-256); return its path."""
    root = Path(root)
    where = f"{root}/{rel}"
    if not isinstance(expected, dict) or not isinstance(expected.get("sha256"), str) \
            or type(expected.get("size")) is not int:
        raise ArtifactError(f"manifest entry for {rel} is malformed: {expected!r}", where=str(root), fix=_DAMAGED)
    resolved_root, file = root.resolve(), (root / rel).resolve()
    if file.parent != resolved_root and resolved_root not in file.parents:
        raise ArtifactError(f"file {rel!r} lies outside the artifact", where=str(root))
    if not file.is_file():
        raise ArtifactError(f"file {rel} is missing", where=where, fix=_DAMAGED)
    size = file.stat().st_size
    if size != expected["size"]:
        state = "truncated" if size < expected["size"] else "longer than written"
        raise ArtifactError(f"file {rel} is {state}: {size} bytes, expected {expected['size']}", where=where,
                            fix=_DAMAGED)
    if hash:
        _check_digest(rel, file_digest(file)["sha256"], expected["sha256"], where)
    return file


def _check_digest(rel: str, actual: str, expected: str, where: str) -> None:
    if actual != expected:
        raise ArtifactError(f"file {rel} is corrupted: sha256 {actual[:16]}..., expected {expected[:16]}...",
                            where=where, fix=_DAMAGED)


class HashingReader:
    """Reads one artifact file front to back, hashing every byte on the way; :meth:`finish` then compares the
    SHA-256 with the manifest's. Whatever was read must not be used unless ``finish`` returned.

    The hashing runs on one worker thread, in order, while the next bytes are read (both release the GIL): a load
    takes about the longer of reading and hashing instead of their sum. A buffer passed to :meth:`readinto` must
    stay unchanged until ``finish``.
    """

    def __init__(self, root: Path, rel: str, expected: dict):
        self.rel, self.where, self.expected = rel, f"{root}/{rel}", expected
        try:
            self._file = open(Path(root) / rel, "rb")
        except OSError as e:
            raise ArtifactError(f"file {rel} cannot be read: {e.strerror or e}", where=self.where) from None
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bmc-sha256")
        self._pos = 0

    def readinto(self, buffer) -> None:
        """Fill ``buffer`` (a writable buffer of bytes) with the next ``len(buffer)`` bytes of the file."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                raise ArtifactError(f"file {self.rel} ended after {self._pos + done} bytes while being read",
                                    where=self.where, fix=_DAMAGED)
            done += n
        self._hasher.submit(self._hash.update, view)
        self._pos += done

    def skip(self, n: int, chunk: int = 1 << 24) -> None:
        """Read (and hash) the next ``n`` bytes without keeping them, ``chunk`` bytes at a time (at most two chunks
        held while the hash catches up)."""
        pending = None
        while n > 0:
            buf = bytearray(min(n, chunk))
            self.readinto(buf)
            n -= len(buf)
            if pending is not None:
                pending.result()
            pending = self._hasher.submit(lambda: None)  # done once this chunk is hashed (one worker, in order)

    def finish(self) -> None:
        """Check that the whole file was read and that its digest is the manifest's (else ArtifactError)."""
        self._hasher.shutdown(wait=True)
        if self._file.read(1) or self._pos != self.expected["size"]:
            raise ArtifactError(f"file {self.rel} changed size while being read", where=self.where, fix=_DAMAGED)
        _check_digest(self.rel, self._hash.hexdigest(), self.expected["sha256"], self.where)

    def close(self) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)
        self._file.close()

    def __enter__(self) -> "HashingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
