"""The stage-1 cache: a Zarr v3 group (see docs/cache-format.md).

Layout::

    CACHE/zarr.json                      group; attributes["autosplit"] is the manifest
    CACHE/index/bucket   int32[N]        sample -> shape bucket
    CACHE/index/row      int64[N]        sample -> row inside its bucket
    CACHE/index/source_sha256 uint8[N,32] what each sample was made from (+ image_sha256, prompt_sha256, size)
    CACHE/index/shard_done uint8[S]      1 once a shard is fully written (one chunk file per shard)
    CACHE/buckets/<k>/<value>            [n_k, *shape]          fixed-shape values
    CACHE/buckets/<k>/<value>            [n_k, max_len, *rest]  ragged values (text tokens) ...
    CACHE/buckets/<k>/<value>.length     int64[n_k]             ... and their lengths

Every array is sharded (one shard holds `shard_size` samples of a bucket), one sample per inner
chunk (ragged values: 64 tokens per inner chunk, empty chunks not stored), compressed with zstd
and checksummed with crc32c. bfloat16 is stored as uint16 with the logical dtype in the array's
attributes: bit-exact and zero-copy. Writers own whole shards and record each in `index/shard_done`
after its data; the main process sets the manifest's `complete` only after the last one. No pickle
anywhere.

A cache is untrusted input: `finish()` records in the manifest what every array must be (shape,
dtype, each chunk file's size, its zarr.json's digest); the readers check that record when they
open a cache, `verify_cache` also reads every chunk, and every failure is a one-line CacheError
naming the array, the samples and the fix, never zeros read from a file that is gone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosplit.errors import CacheError
from autosplit.plan import Plan
from autosplit.storage.codec import from_storage, to_storage, torch_dtype_name
from autosplit.storage.integrity import (
    CACHE_FORMAT_VERSION,
    _array_record,
    _checked_array,
    _counted,
    _file_keys,
    _file_problems,
    _index_problem,
    _length_problem,
    _manifest_plan,
    _one_line,
    _open_array,
    _open_group,
    _open_manifest,
    _per_shard,
    _read_problems,
    _read_whole,
    _rebuild,
    _records,
    _rewrite,
    _Rows,
    _shard_key,
    read_manifest,
)
from autosplit.storage.shards import (
    ShardError,
    ShardLayout,
    encode_shard,
    layout_of,
    write_file,
)

log = logging.getLogger(__name__)

#: tokens per inner chunk of a ragged value: compressed, padding zeros cost little, chunks are
#: larger; uncompressed, the padding of a row's last chunk is stored, so chunks are smaller
TOKEN_CHUNK = 64
RAW_TOKEN_CHUNK = 16


@dataclass(frozen=True)
class Bucket:
    """Samples that share one shape; `samples` are dataset indices in row order."""

    id: int
    key: tuple[int, ...]
    samples: tuple[int, ...]

    def shards(self, shard_size: int) -> list[tuple[int, int]]:
        return [(lo, min(lo + shard_size, len(self.samples))) for lo in range(0, len(self.samples), shard_size)]


def make_buckets(keys: list[tuple[int, ...]]) -> list[Bucket]:
    """Group sample indices by shape key, buckets ordered by first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(tuple(key), []).append(i)
    return [Bucket(k, key, tuple(idx)) for k, (key, idx) in enumerate(groups.items())]


def _codecs(level: int) -> list[Any]:
    """crc32c, after zstd at `level` unless it is 0 (stored uncompressed: docs/cache-format.md)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [Crc32cCodec()] if level == 0 else [ZstdCodec(level=level), Crc32cCodec()]


def _keep_empty(arr: Any) -> Any:
    """`arr` writing chunks that hold only the fill value too, so every chunk file of the grid exists
    and a missing one always means damage (never "all zeros, not stored")."""
    return arr.with_config({"write_empty_chunks": True})


class CacheWriter:
    """Creates a cache group and writes whole shards into it.

    `key` is everything the cache content depends on (plan, settings, fingerprints); reopening an
    existing cache with a different key raises CacheError instead of mixing two runs' outputs.
    Progress is the array `index/shard_done` (one chunk file per shard, written after the shard's
    data), so several processes can each record their own shards without sharing a file; only
    the main process writes the manifest. `create=False` opens a cache the main process created.
    Reopened by the main process, a cache whose shard files went missing (or changed size) since
    `finish()` forgets those shards, so this run writes them again.
    """

    def __init__(
        self,
        path: Path,
        *,
        plan: Plan,
        buckets: list[Bucket],
        key: dict[str, Any],
        shard_size: int,
        zstd_level: int,
        source_sha256: list[bytes],
        extra_index: dict[str, np.ndarray] | None = None,
        info: dict[str, Any] | None = None,
        create: bool = True,
    ):
        import zarr

        self.path = Path(path)
        self.plan, self.buckets, self.shard_size, self.zstd_level = plan, buckets, shard_size, zstd_level
        self.shards = [(b, k) for b in buckets for k in range(len(b.shards(shard_size)))]
        existing = read_manifest(self.path)
        if existing is not None and existing.get("format_version") != CACHE_FORMAT_VERSION:
            raise CacheError(
                f"{self.path} holds a cache of format {existing.get('format_version')}, this autosplit "
                f"writes format {CACHE_FORMAT_VERSION}; {_rebuild(self.path)}"
            )
        if existing is not None and existing.get("key") != key:
            raise CacheError(
                f"{self.path} holds a cache made with other settings ({_key_diff(existing.get('key'), key)}); "
                f"delete it or choose another output path"
            )
        if existing is None and not create:
            raise CacheError(f"{self.path}: the main process did not create the cache; check its error above")
        if existing is None and self.path.exists() and any(self.path.iterdir()):
            raise CacheError(f"{self.path} exists and is not an autosplit cache; choose an empty or new folder")
        self.group: Any = zarr.open_group(str(self.path), mode="a")
        if existing is None:
            self.manifest = {
                "format_version": CACHE_FORMAT_VERSION,
                "complete": False,
                "index_written": False,
                "key": key,
                "plan": json.loads(plan.to_json()),
                "num_samples": sum(len(b.samples) for b in buckets),
                "shard_size": shard_size,
                "buckets": [{"id": b.id, "key": list(b.key), "num_samples": len(b.samples)} for b in buckets],
                "shards_done": [],
                "values": {},
                **(info or {}),
            }
            self._save_manifest()  # first, so a kill from here on leaves a cache that the next run recognizes
        else:
            self.manifest = existing
        if create and not self.manifest["index_written"]:
            self._create_index(buckets, source_sha256, extra_index or {})
            self.manifest["index_written"] = True
            self._save_manifest()
        elif create:
            _remove_partial_writes(self.path)
            self._forget_damaged_shards()
        self._progress: Any = self.group["index/shard_done"]
        self._layouts: dict[str, ShardLayout] = {}
        self._done = set(np.flatnonzero(self._read_progress()).tolist())

    def _create_index(self, buckets: list[Bucket], source_sha256: list[bytes], extra: dict[str, np.ndarray]) -> None:
        n = sum(len(b.samples) for b in buckets)
        bucket_of, row_of = np.zeros(n, np.int32), np.zeros(n, np.int64)
        for b in buckets:
            for row, i in enumerate(b.samples):
                bucket_of[i], row_of[i] = b.id, row
        sha = np.frombuffer(b"".join(source_sha256), dtype=np.uint8).reshape(n, 32)
        index: list[tuple[str, np.ndarray]] = [("bucket", bucket_of), ("row", row_of), ("source_sha256", sha)]
        for name, data in index + list(extra.items()):
            arr = self.group.create_array(
                f"index/{name}",
                shape=data.shape,
                dtype=data.dtype,
                overwrite=True,
                chunks=data.shape,
                compressors=_codecs(self.zstd_level),
            )
            _keep_empty(arr)[...] = data
        self.group.create_array(
            "index/shard_done",
            shape=(len(self.shards),),
            dtype="uint8",
            chunks=(1,),
            fill_value=0,
            overwrite=True,
            compressors=_codecs(self.zstd_level),
        )

    def _save_manifest(self) -> None:
        self.group.attrs["autosplit"] = self.manifest

    def shard_id(self, bucket: int, shard: int) -> int:
        """The global number of a bucket's shard (buckets in order, then shards)."""
        return self.shards.index(next(s for s in self.shards if s[0].id == bucket and s[1] == shard))

    def shard_done(self, bucket: int, shard: int) -> bool:
        return self.shard_id(bucket, shard) in self._done

    def done_shards(self) -> list[list[int]]:
        """[bucket, shard] pairs recorded as written, by any process."""
        self._done = set(np.flatnonzero(self._read_progress()).tolist())
        return [[self.shards[g][0].id, self.shards[g][1]] for g in sorted(self._done)]

    def _read_progress(self) -> np.ndarray:
        """index/shard_done; a chunk that cannot be read counts as not written (and is removed)."""
        progress = self.group["index/shard_done"]
        try:
            return np.asarray(progress[...])
        except Exception:  # a corrupt progress chunk: find it, the shard is written again
            values = np.zeros(len(self.shards), np.uint8)
            for g in range(len(self.shards)):
                try:
                    values[g] = progress[g]
                except Exception:
                    (self.path / "index/shard_done" / _shard_key(1, g)).unlink(missing_ok=True)
            return values

    def _global_shard(self, name: str, file: int) -> int:
        """The shard that file number `file` of a per-shard array (see `_per_shard`) belongs to."""
        return file if name == "index/shard_done" else self.shard_id(int(name.split("/")[1]), file)

    def _forget_damaged_shards(self) -> None:
        """Shards whose files are missing or not the size `finish()` recorded, or whose progress chunk
        is gone, count as not written: the manifest says incomplete and this run writes them again.
        Damage that rewriting shards cannot mend (zarr.json, index arrays) raises CacheError."""
        records = self.manifest.get("arrays")
        if not records:
            return  # not finished yet: finish() checks every file
        rows, lost, damaged = _Rows(self.group, self.manifest), set(), []
        for name, record in records.items():
            _open_array(self.path, self.group, name, record)
            for file, line in _file_problems(self.path, name, record, rows):
                if not _per_shard(name):
                    raise CacheError(line)
                lost.add(self._global_shard(name, file))
                damaged.append(self.path / name / _file_keys(record["shape"], record["file_shape"])[file])
        if self.manifest["complete"]:  # a lost progress chunk: that shard is written again
            lost |= set(np.flatnonzero(self._read_progress() == 0).tolist())
        if not lost:
            return
        log.warning(
            "cache %s: shards %s lost files since stage 1 finished; writing them again", self.path, sorted(lost)
        )
        self.manifest["complete"] = False
        self._save_manifest()
        for g in lost:  # after the manifest: a kill in between leaves a cache the next run mends the same way
            (self.path / "index/shard_done" / _shard_key(1, g)).unlink(missing_ok=True)
        for file in damaged:  # a ragged shard is written in part: it must not merge with a damaged file
            file.unlink(missing_ok=True)

    def _open_or_create(self, path: str, **spec: Any) -> Any:
        from zarr.errors import ContainsArrayError

        if path in self.group:
            return self.group[path]
        try:
            return self.group.create_array(path, **spec)
        except ContainsArrayError:  # another process created it, with the same spec
            return self.group[path]

    def _array(self, bucket: Bucket, name: str, sample: torch.Tensor) -> Any:
        path = f"buckets/{bucket.id}/{name}"
        value = self.plan.cached_value(name)
        storage = to_storage(sample)
        n, s = len(bucket.samples), min(self.shard_size, len(bucket.samples))
        codecs = _codecs(self.zstd_level)
        if value.ragged_axis is not None:
            if value.ragged_axis != 0:
                raise CacheError(f"value {name!r}: only ragged axis 0 is supported")
            assert value.max_len is not None, name  # the planner caps every ragged value
            rest = tuple(storage.shape[1:])
            # at most 64 inner chunks per row: the shard index holds 16 B for every chunk, written or not
            least = TOKEN_CHUNK if self.zstd_level else RAW_TOKEN_CHUNK
            token_chunk = min(max(least, -(-value.max_len // 64)), value.max_len)
            cap = -(-value.max_len // token_chunk) * token_chunk  # shards must hold whole inner chunks
            if token_chunk > least and not self.zstd_level:
                # a long cap (a recorded graph: 1 MiB) makes chunks long: zeros would pad a short row's
                # chunk to 16 KiB on disk; zstd stores them as nothing (and reads stay direct)
                codecs = _codecs(1)
            shape, chunks, shards = (n, cap, *rest), (1, token_chunk, *rest), (s, cap, *rest)
            self._open_or_create(f"{path}.length", shape=(n,), dtype="int64", chunks=(s,), compressors=codecs)
        else:
            shape, chunks, shards = (n, *storage.shape), (1, *storage.shape), (s, *storage.shape)
        return self._open_or_create(
            path,
            shape=shape,
            dtype=storage.dtype,
            chunks=chunks,
            shards=shards,
            compressors=codecs,
            fill_value=0,
            config={"write_empty_chunks": False},
            attributes={"dtype": torch_dtype_name(sample.dtype)},
        )

    def write_shard(
        self,
        bucket: Bucket,
        shard: int,
        outputs: list[dict[str, torch.Tensor]],
        *,
        times: dict[str, float] | None = None,
    ) -> None:
        """Write one shard's samples (per-sample tensors, no batch axis), then record it as done.

        Each array's shard file is written whole under a temporary name and renamed into place
        (storage/shards.py), so a kill leaves either the old file or the new one; the shard counts
        as done only once its progress chunk exists, which is written last. Every array gets its
        shard file, even a shard of only zeros, so a missing file always means damage. `times`, if
        given, gains the seconds spent encoding ("encode_s": checksums, compression) and writing
        ("write_s").
        """
        lo = shard * self.shard_size
        hi = lo + len(outputs)
        spent = {"encode_s": 0.0, "write_s": 0.0}
        for value in self.plan.cached:
            tick = time.perf_counter()
            name = f"buckets/{bucket.id}/{value.name}"
            tensors = [o[value.name] for o in outputs]
            arr = self._array(bucket, value.name, tensors[0])
            rows = [to_storage(t) for t in tensors]
            if value.ragged_axis is not None:
                lengths = np.array([r.shape[0] for r in rows], dtype=np.int64)
                if lengths.max() > value.max_len:
                    raise CacheError(f"value {value.name!r} has {lengths.max()} tokens, above its cap {value.max_len}")
            try:
                parts = encode_shard(self._layout(name), rows, ragged=value.ragged_axis is not None)
            except ShardError as exc:
                raise CacheError(f"value {value.name!r} of bucket {bucket.id}, shard {shard}: {exc}") from None
            mid = time.perf_counter()
            write_file(self.path / name / _shard_key(arr.ndim, shard), parts)
            if value.ragged_axis is not None:
                _keep_empty(self.group[f"{name}.length"])[lo:hi] = lengths
            spent["encode_s"] += mid - tick
            spent["write_s"] += time.perf_counter() - mid
        g = self.shard_id(bucket.id, shard)
        self._progress[g] = 1
        self._done.add(g)
        for key, seconds in spent.items():
            if times is not None:
                times[key] = times.get(key, 0.0) + seconds

    def _layout(self, name: str) -> ShardLayout:
        """The shard layout of array `name`, from its zarr.json (as every reader sees it)."""
        if name not in self._layouts:
            self._layouts[name] = layout_of(json.loads((self.path / name / "zarr.json").read_bytes()))
        return self._layouts[name]

    def finish(self) -> None:
        """Record what every array must be (`_array_record`) and mark the cache complete (main
        process, after every writer finished). Shard files that went missing meanwhile count as not
        written: CacheError, and the next run writes them again."""
        done = self.done_shards()
        if len(done) != len(self.shards):
            raise CacheError(
                f"{self.path}: {len(done)} of {len(self.shards)} shards written; re-run stage 1 to write the rest"
            )
        records = self._record_arrays()
        lost = {name: [i for i, size in enumerate(r["file_bytes"]) if size is None] for name, r in records.items()}
        if any(files for name, files in lost.items() if not _per_shard(name)):
            raise CacheError(f"{self.path}: index files went missing while stage 1 ran; {_rebuild(self.path)}")
        shards = sorted({self._global_shard(name, i) for name, files in lost.items() for i in files})
        if shards:
            for g in shards:
                (self.path / "index/shard_done" / _shard_key(1, g)).unlink(missing_ok=True)
            raise CacheError(
                f"{self.path}: files of shards {shards} went missing while stage 1 ran; {_rewrite(self.path)}"
            )
        self.manifest["shards_done"] = done
        first = f"buckets/{self.buckets[0].id}"
        self.manifest["values"] = {
            v.name: {"dtype": self.group[f"{first}/{v.name}"].attrs["dtype"], "ragged_axis": v.ragged_axis}
            for v in self.plan.cached
        }
        self.manifest["arrays"] = records
        self.manifest["complete"] = True
        self._save_manifest()

    def _record_arrays(self) -> dict[str, dict[str, Any]]:
        names = [f"index/{name}" for name in sorted(self.group["index"].array_keys())]
        names += [
            f"buckets/{b.id}/{v.name}{suffix}"
            for b in self.buckets
            for v in self.plan.cached
            for suffix in ("", ".length")
            if not suffix or v.ragged_axis is not None
        ]
        return {name: _array_record(self.path, name, self.group[name]) for name in names}


def _remove_partial_writes(path: Path) -> None:
    """Delete temporary files of writes a kill interrupted (zarr's local store and
    storage/shards.py name them *.partial)."""
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)


def _key_diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "no key recorded"
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "changed: " + ", ".join(changed)


def count_done_shards(path: Path) -> int:
    import zarr

    try:
        group: Any = zarr.open_group(str(path), mode="r")
        return int(group["index/shard_done"][...].sum())
    except (KeyError, FileNotFoundError, ValueError):
        return 0


def cache_status(path: Path) -> str:
    """'missing', 'incomplete' or 'complete'."""
    manifest = read_manifest(path)
    if manifest is None:
        return "missing"
    return "complete" if manifest.get("complete") else "incomplete"


# --- what every array must be: recorded by finish(), checked on open and by verify_cache --------


class CacheReader:
    """Reads samples of a complete cache: `read(i)` -> {value: tensor without batch axis}.

    Opening checks every array against the manifest's record (shape, dtype, zarr.json, every chunk
    file there at the size stage 1 wrote) and reads the index (every index array, into `index`) and
    the ragged lengths; `read` then only wraps the read. Every failure is a CacheError naming the
    array, the sample and the fix.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = manifest = _open_manifest(self.path)
        if not manifest["complete"]:
            raise CacheError(
                f"{self.path}: cache is incomplete ({count_done_shards(self.path)} shards written); "
                f"re-run stage 1 to finish it"
            )
        self.plan = _manifest_plan(self.path, manifest)
        self.group = _open_group(self.path)
        self._records = _records(self.path, manifest, self.plan)
        rows = _Rows(self.group, manifest)
        arrays = {
            name: _checked_array(self.path, self.group, name, record, rows) for name, record in self._records.items()
        }
        #: every index array but the progress one (bookkeeping), by name: "bucket", "row", "source_sha256", ...
        self.index = {
            name.removeprefix("index/"): self._read_whole(name, arrays[name], rows)
            for name in arrays
            if name.startswith("index/") and name != "index/shard_done"
        }
        self.bucket_of, self.row_of = self.index["bucket"], self.index["row"]
        problem = _index_problem(manifest, self.bucket_of, self.row_of)
        if problem:
            raise CacheError(f"{self.path}: {problem}; {_rebuild(self.path)}")
        ids = [int(b["id"]) for b in manifest["buckets"]]
        self._arrays = {b: {v.name: arrays[f"buckets/{b}/{v.name}"] for v in self.plan.cached} for b in ids}
        self._dtypes = {
            b: {name: str(arr.attrs.get("dtype", arr.dtype)) for name, arr in values.items()}
            for b, values in self._arrays.items()
        }
        self._lengths = {
            b: {
                v.name: self._read_lengths(f"buckets/{b}/{v.name}", arrays, rows)
                for v in self.plan.cached
                if v.ragged_axis is not None
            }
            for b in ids
        }

    def _read_whole(self, name: str, arr: Any, rows: _Rows) -> np.ndarray:
        return _read_whole(self.path, name, arr, self._records[name], rows)

    def _read_lengths(self, name: str, arrays: dict[str, Any], rows: _Rows) -> np.ndarray:
        lengths = self._read_whole(f"{name}.length", arrays[f"{name}.length"], rows)
        problem = _length_problem(f"{name}.length", lengths, int(arrays[name].shape[1]))
        if problem:
            raise CacheError(f"{self.path}: {problem}; {_rebuild(self.path)}")
        return lengths

    def __len__(self) -> int:
        return len(self.bucket_of)

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def bucket_keys(self) -> list[int]:
        return [int(b) for b in self.bucket_of]

    def _region(self, index: int, name: str) -> tuple[int, int, tuple[Any, ...]]:
        """Sample `index`'s bucket, row and selection in array `name` (its row; ragged: up to its length)."""
        bucket, row = int(self.bucket_of[index]), int(self.row_of[index])
        lengths = self._lengths[bucket].get(name)
        return bucket, row, (row,) if lengths is None else (row, slice(0, int(lengths[row])))

    def _read_error(self, index: int, name: str, exc: BaseException) -> CacheError:
        bucket, row, _ = self._region(index, name)
        array = f"buckets/{bucket}/{name}"
        record = self._records[array]
        file = self.path / array / _shard_key(len(record["shape"]), row // record["file_shape"][0])
        return CacheError(
            f"{self.path}: cannot read array {array} of sample {index} (row {row}): {_one_line(exc)}; "
            f"the cache is corrupt: delete {file} and {_rewrite(self.path)}"
        )

    def read(self, index: int) -> dict[str, torch.Tensor]:
        out = {}
        for v in self.plan.cached:
            bucket, _, region = self._region(index, v.name)
            try:
                data = self._arrays[bucket][v.name][region]
            except Exception as exc:  # zarr raises codec-specific errors on corrupt chunks
                raise self._read_error(index, v.name, exc) from exc
            out[v.name] = from_storage(data, self._dtypes[bucket][v.name])
        return out


def describe_cache(path: Path) -> dict[str, Any]:
    """Schema, sample count, bytes on disk vs raw (unpadded) bytes, completeness and fingerprints.
    An array that cannot be read is described by its error (`verify_cache` names the damage)."""
    manifest = _open_manifest(path)
    plan, group = _manifest_plan(path, manifest), _open_group(path)
    arrays, raw = {}, 0
    for b in manifest["buckets"]:
        for value in plan.cached:
            key = f"buckets/{b['id']}/{value.name}"
            if not manifest["complete"] and not (Path(path) / key / "zarr.json").is_file():
                continue  # not written yet
            try:
                arrays[key], nbytes = _describe_array(group, key, ragged=value.ragged_axis is not None)
            except Exception as exc:  # a damaged array: described as far as it reads
                arrays[key], nbytes = {"error": _one_line(exc)}, 0
            raw += nbytes
    disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    key = manifest["key"]
    return {
        "path": str(path),
        "format_version": manifest["format_version"],
        "complete": manifest["complete"],
        "num_samples": manifest["num_samples"],
        "shards_done": count_done_shards(path),
        "shard_size": manifest["shard_size"],
        "arrays": arrays,
        "bytes_on_disk": disk,
        "raw_bytes": raw,
        "compression_ratio": round(raw / disk, 3) if disk else None,
        "fingerprints": {
            "components": key.get("components", {}),
            "dataset_sha256": key.get("dataset_sha256"),
            "max_pixels": key.get("max_pixels"),
            "versions": key.get("versions"),
        },
        "plan": {"stage1": plan.stage_units(1), "stage2": plan.stage_units(2), "cached": [v.name for v in plan.cached]},
    }


def _describe_array(group: Any, key: str, *, ragged: bool) -> tuple[dict[str, Any], int]:
    """An array's schema and its raw (unpadded) bytes."""
    arr = group[key]
    if ragged:
        per_token = int(np.prod(arr.shape[2:])) * arr.dtype.itemsize
        nbytes = int(group[f"{key}.length"][...].sum()) * per_token
    else:
        nbytes = arr.shape[0] * int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
    return {
        "shape": list(arr.shape),
        "dtype": arr.attrs.get("dtype"),
        "stored_as": str(arr.dtype),
        "chunks": list(arr.chunks),
        "shards": list(arr.shards or []),
    }, nbytes


def verify_cache(path: Path) -> list[str]:
    """Check every array against the manifest's record and read every chunk of every array (index
    arrays and per-sample digests too), checking each crc32c and its shard index's; then check that
    the index maps samples onto rows and that lengths fit. One line per damaged file, naming the
    array, its samples and the fix; an empty list means the cache is whole."""
    path = Path(path)
    manifest = _open_manifest(path)
    if not manifest["complete"]:
        return [f"{path}: cache is incomplete ({count_done_shards(path)} shards written); re-run stage 1 to finish it"]
    plan, group = _manifest_plan(path, manifest), _open_group(path)
    records = _records(path, manifest, plan)
    rows = _Rows(group, manifest)
    problems, whole = _group_problems(path, records), {}
    for name, record in records.items():
        try:
            arr = _open_array(path, group, name, record)
        except CacheError as exc:
            problems.append(str(exc))
            continue
        found = [line for _, line in _file_problems(path, name, record, rows)]
        found = found or _read_problems(path, name, arr, record, rows)
        problems.extend(found)
        if not found:
            whole[name] = arr
    if not problems:
        problems.extend(_content_problems(path, manifest, whole))
    return problems


def _group_problems(path: Path, records: dict[str, Any]) -> list[str]:
    """The groups above the arrays: training does not read them, plain zarr lists arrays through them."""
    groups = sorted({"/".join(name.split("/")[:i]) for name in records for i in range(1, name.count("/") + 1)})
    problems = []
    for name in groups:
        try:
            ok = json.loads((path / name / "zarr.json").read_bytes()).get("node_type") == "group"
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            problems.append(
                f"{path}: group {name}: its zarr.json is missing or damaged; write "
                f'\'{{"zarr_format": 3, "node_type": "group", "attributes": {{}}}}\' into '
                f"{path / name / 'zarr.json'}, or {_rebuild(path)}"
            )
    return problems


def _content_problems(path: Path, manifest: dict[str, Any], arrays: dict[str, Any]) -> list[str]:
    """Index arrays that read back but do not fit the manifest; every array is known to read."""
    problems = []
    problem = _index_problem(manifest, np.asarray(arrays["index/bucket"][...]), np.asarray(arrays["index/row"][...]))
    if problem:
        problems.append(f"{path}: {problem}; {_rebuild(path)}")
    undone = np.flatnonzero(np.asarray(arrays["index/shard_done"][...]) != 1).tolist()
    if undone:
        problems.append(
            f"{path}: array index/shard_done does not record {_counted('shard', undone)} as written; {_rewrite(path)}"
        )
    for name, arr in arrays.items():
        if name.endswith(".length"):
            problem = _length_problem(name, np.asarray(arr[...]), int(arrays[name.removesuffix(".length")].shape[1]))
            problems.extend([f"{path}: {problem}; {_rebuild(path)}"] if problem else [])
    return problems
