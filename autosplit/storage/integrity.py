"""Checking a cache against its own record: the manifest's list of arrays (shape, dtype, files
and their sizes, the digest of each `zarr.json`), the index arrays, and the files on disk. The
cache's writer records; its readers and `verify_cache` check through these helpers, so damage is
a one-line CacheError naming the array, its samples and the fix, never zeros or a traceback."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from autosplit.errors import CacheError
from autosplit.plan import Plan

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 3
#: what the manifest of a cache must hold, and of which type
_MANIFEST_FIELDS = {"complete": bool, "num_samples": int, "shard_size": int, "buckets": list, "plan": dict, "key": dict}
_RECORD_FIELDS = ("shape", "dtype", "file_shape", "file_bytes", "metadata_sha256")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest in `path`/zarr.json, or None if there is none (not an autosplit cache); raises
    CacheError if that file is not JSON (a damaged cache)."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        node = json.loads(meta.read_bytes())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CacheError(
            f"{meta} is not valid JSON ({_one_line(exc)}): the cache's manifest is damaged; {_rebuild(Path(path))}"
        ) from exc
    attributes = node.get("attributes") if isinstance(node, dict) else None
    manifest = attributes.get("autosplit") if isinstance(attributes, dict) else None
    return manifest if isinstance(manifest, dict) else None


def _shard_key(ndim: int, index: int) -> str:
    """The chunk file (relative to its array's folder) holding block `index` along axis 0: every
    cache array has a sample (or shard) axis 0 and is split along it only, one file per shard (or
    chunk, if unsharded)."""
    return "/".join(["c", str(index), *["0"] * (ndim - 1)])


def _file_keys(shape: list[int], file_shape: list[int]) -> list[str]:
    """Every chunk file an array of this shape and file block (shard or chunk) shape must have."""
    return [_shard_key(len(shape), i) for i in range(-(-shape[0] // file_shape[0]))]


def _file_rows(record: dict[str, Any], file: int) -> list[int]:
    """The rows (axis 0) that chunk file number `file` of an array holds."""
    per_file = record["file_shape"][0]
    return list(range(file * per_file, min((file + 1) * per_file, record["shape"][0])))


def _per_shard(name: str) -> bool:
    """Whether each file of array `name` belongs to one shard, which stage 1 can write again."""
    return name.startswith("buckets/") or name == "index/shard_done"


def _file_size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _array_record(path: Path, name: str, arr: Any) -> dict[str, Any]:
    """What array `name` must be: its shape, stored dtype, the block one chunk file holds, each chunk
    file's size in bytes (None: not there) and the sha256 of its zarr.json."""
    shape, file_shape = list(arr.shape), list(arr.shards or arr.chunks)
    assert shape and all(f >= n for n, f in zip(shape[1:], file_shape[1:])), (name, shape, file_shape)  # axis 0
    return {
        "shape": shape,
        "dtype": str(arr.dtype),
        "file_shape": file_shape,
        "file_bytes": [_file_size(path / name / key) for key in _file_keys(shape, file_shape)],
        "metadata_sha256": _sha256(path / name / "zarr.json"),
    }


def _one_line(exc: BaseException) -> str:
    """An exception as one short line (tensorstore's messages carry its whole spec)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 160 else text[:157] + "..."


def _stage1(path: Path) -> str:
    return f"stage 1 (--task sft:data_process --output_path {path})"


def _rewrite(path: Path) -> str:
    return f"re-run {_stage1(path)}, which writes only the missing shards again"


def _rebuild(path: Path) -> str:
    return f"delete {path} and re-run {_stage1(path)}"


def _span(values: list[int]) -> str:
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values[:8])) + (f", ... ({len(values)} in all)" if len(values) > 8 else "")


def _counted(word: str, values: list[int]) -> str:
    return f"{word}{'s' if len(values) > 1 else ''} {_span(values)}"


class _Rows:
    """Names the samples that rows of an array hold, for messages: from index/bucket and index/row,
    read when first needed (only rows are named if they cannot be read)."""

    def __init__(self, group: Any, manifest: dict[str, Any]):
        self.group, self.manifest = group, manifest
        self._index: dict[str, np.ndarray] | None = None

    def _samples(self, bucket: int, rows: list[int]) -> list[int] | None:
        if self._index is None:
            try:
                self._index = {name: np.asarray(self.group[f"index/{name}"][...]) for name in ("bucket", "row")}
            except Exception:  # a damaged index: messages name rows only
                self._index = {}
        if not self._index:
            return None
        mine = np.flatnonzero(self._index["bucket"] == bucket)
        sample_of = dict(zip(self._index["row"][mine].tolist(), mine.tolist()))
        return [sample_of[r] for r in rows] if all(r in sample_of for r in rows) else None

    def text(self, name: str, rows: list[int]) -> str:
        """'sample 3 (row 0)', 'samples 3, 9 (rows 0, 1)', 'samples 0-15' or 'shard 2 (...)'."""
        if name == "index/shard_done":
            if len(rows) != 1:
                return _counted("shard", rows)
            bucket, bucket_rows = self._shard(rows[0])
            return f"shard {rows[0]}: bucket {bucket}, {self.text(f'buckets/{bucket}/', bucket_rows)}"
        if not name.startswith("buckets/"):
            return _counted("sample", rows)
        bucket = int(name.split("/")[1])
        samples = self._samples(bucket, rows)
        if samples is None:
            return f"{_counted('row', rows)} of bucket {bucket}"
        return f"{_counted('sample', samples)} ({_counted('row', rows)})"

    def _shard(self, g: int) -> tuple[int, list[int]]:
        """The bucket and rows of global shard `g` (buckets in order, then their shards)."""
        size = int(self.manifest["shard_size"])
        for b in self.manifest["buckets"]:
            n = int(b["num_samples"])
            if g < -(-n // size):
                return int(b["id"]), list(range(g * size, min((g + 1) * size, n)))
            g -= -(-n // size)
        return -1, [g]


def _open_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the cache at `path`, of this format and well formed; raises CacheError."""
    manifest = read_manifest(path)
    if manifest is None:
        raise CacheError(
            f"{path} is not an autosplit cache (no manifest in zarr.json); pass a stage-1 output "
            f"folder, or run stage 1 (--task sft:data_process) with --output_path {path}"
        )
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format {manifest.get('format_version')} is not {CACHE_FORMAT_VERSION} "
            f"(written by another autosplit version); {_rebuild(path)}"
        )
    wrong = [k for k, kind in _MANIFEST_FIELDS.items() if not isinstance(manifest.get(k), kind)]
    if wrong:
        raise CacheError(
            f"{path}/zarr.json: the manifest's {', '.join(wrong)} is missing or malformed; {_rebuild(path)}"
        )
    return manifest


def _open_group(path: Path) -> Any:
    import zarr

    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise CacheError(f"{path}: zarr cannot open the cache ({_one_line(exc)}); {_rebuild(path)}") from exc


def _manifest_plan(path: Path, manifest: dict[str, Any]) -> Plan:
    try:
        return Plan.from_dict(manifest["plan"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(
            f"{path}/zarr.json: the manifest's plan is malformed ({_one_line(exc)}); {_rebuild(path)}"
        ) from exc


def _records(path: Path, manifest: dict[str, Any], plan: Plan) -> dict[str, dict[str, Any]]:
    """The manifest's record of every array, each array the readers need among them."""
    records = manifest.get("arrays")
    if not isinstance(records, dict) or not all(
        isinstance(r, dict) and all(k in r for k in _RECORD_FIELDS) for r in records.values()
    ):
        raise CacheError(
            f"{path}/zarr.json: the manifest's record of the arrays is missing or malformed; {_rebuild(path)}"
        )
    need = ["index/bucket", "index/row", "index/shard_done"] + [
        f"buckets/{b['id']}/{v.name}{suffix}"
        for b in manifest["buckets"]
        for v in plan.cached
        for suffix in ("", ".length")
        if not suffix or v.ragged_axis is not None
    ]
    missing = [name for name in need if name not in records]
    if missing:
        raise CacheError(f"{path}/zarr.json: the manifest records no array {missing[0]}; {_rebuild(path)}")
    return records


def _open_array(path: Path, group: Any, name: str, record: dict[str, Any]) -> Any:
    """Array `name`, checked against the manifest's record (shape, dtype, its zarr.json's sha256);
    raises CacheError naming it and the fix."""
    if not (path / name / "zarr.json").is_file():
        raise CacheError(f"{path}: array {name} is missing ({name}/zarr.json is not there); {_rebuild(path)}")
    try:
        arr = group[name]
        shape, dtype = list(arr.shape), str(arr.dtype)
    except Exception as exc:  # bad JSON, or metadata zarr rejects
        raise CacheError(
            f"{path}: cannot open array {name} ({_one_line(exc)}): its zarr.json is damaged; {_rebuild(path)}"
        ) from exc
    if (shape, dtype) != (record["shape"], record["dtype"]):
        raise CacheError(
            f"{path}: array {name} is {dtype} {shape} but stage 1 wrote {record['dtype']} "
            f"{record['shape']} (its zarr.json was changed); {_rebuild(path)}"
        )
    if _sha256(path / name / "zarr.json") != record["metadata_sha256"]:
        raise CacheError(
            f"{path}: array {name}: its zarr.json is not the one stage 1 wrote (another sha256); {_rebuild(path)}"
        )
    return arr


def _file_problems(path: Path, name: str, record: dict[str, Any], rows: _Rows) -> list[tuple[int, str]]:
    """(file number, one line) for each chunk file of `name` missing or not the size stage 1 wrote."""
    problems = []
    for file, (key, size) in enumerate(zip(_file_keys(record["shape"], record["file_shape"]), record["file_bytes"])):
        found = _file_size(path / name / key)
        if found == size:
            continue
        what = "is missing" if found is None else f"is {found} bytes, stage 1 wrote {size} (truncated or replaced)"
        fix = _rewrite(path) if _per_shard(name) else _rebuild(path)
        problems.append(
            (
                file,
                f"{path}: array {name}: its file {key} {what}; it holds "
                f"{rows.text(name, _file_rows(record, file))}; {fix}",
            )
        )
    return problems


def _checked_array(path: Path, group: Any, name: str, record: dict[str, Any], rows: _Rows) -> Any:
    arr = _open_array(path, group, name, record)
    problems = _file_problems(path, name, record, rows)
    if problems:
        raise CacheError(problems[0][1])
    return arr


def _read_problems(path: Path, name: str, arr: Any, record: dict[str, Any], rows: _Rows) -> list[str]:
    """One line per chunk file of `name` that cannot be read (checksum, codec), naming its samples."""
    problems = []
    for file, key in enumerate(_file_keys(record["shape"], record["file_shape"])):
        span = _file_rows(record, file)
        # a shard row by row (bounded memory, and the failing sample is named), a chunk whole
        selections = [[r] for r in span] if arr.shards else [span]
        bad: list[int] = []
        first: Exception | None = None
        for sel in selections:
            try:
                arr[sel[0] : sel[-1] + 1]
            except Exception as exc:
                first, bad = first or exc, bad + sel
        if first is not None:
            fix = f"delete {path / name / key} and {_rewrite(path)}" if _per_shard(name) else _rebuild(path)
            problems.append(
                f"{path}: array {name} of {rows.text(name, bad)} fails its checksum ({_one_line(first)}); {fix}"
            )
    return problems


def _read_whole(path: Path, name: str, arr: Any, record: dict[str, Any], rows: _Rows) -> np.ndarray:
    try:
        return np.asarray(arr[...])
    except Exception as exc:
        found = _read_problems(path, name, arr, record, rows)
        raise CacheError(
            found[0] if found else f"{path}: cannot read array {name} ({_one_line(exc)}); {_rebuild(path)}"
        ) from exc


def _index_problem(manifest: dict[str, Any], bucket_of: np.ndarray, row_of: np.ndarray) -> str | None:
    """What is wrong if index/bucket and index/row do not give every bucket's rows exactly once."""
    sizes = {int(b["id"]): int(b["num_samples"]) for b in manifest["buckets"]}
    ids = np.array(sorted(sizes), np.int64)
    counts = np.array([sizes[k] for k in sorted(sizes)], np.int64)
    want_bucket = np.repeat(ids, counts)
    want_row = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    if bucket_of.shape == row_of.shape == want_bucket.shape:
        order = np.lexsort((row_of, bucket_of))
        if np.array_equal(bucket_of[order], want_bucket) and np.array_equal(row_of[order], want_row):
            return None
    return (
        f"index/bucket and index/row do not map the {len(bucket_of)} samples one to one onto the "
        f"{int(counts.sum())} rows of buckets {ids.tolist()}"
    )


def _length_problem(name: str, lengths: np.ndarray, cap: int) -> str | None:
    if lengths.size and (int(lengths.min()) < 0 or int(lengths.max()) > cap):
        return f"array {name} holds lengths from {int(lengths.min())} to {int(lengths.max())}, outside 0-{cap}"
    return None
