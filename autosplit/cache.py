"""The stage-1 cache: a Zarr v3 group (see docs/cache-format.md).

Layout::

    CACHE/zarr.json                      group; attributes["autosplit"] is the manifest
    CACHE/plan.json                      the plan that made it (a readable copy)
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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosplit.errors import CacheError
from autosplit.planner import Plan

CACHE_FORMAT_VERSION = 2
TOKEN_CHUNK = 64

_TORCH_TO_NUMPY = {
    torch.float32: "float32", torch.float16: "float16", torch.float64: "float64", torch.int64: "int64",
    torch.int32: "int32", torch.int16: "int16", torch.uint8: "uint8", torch.bool: "bool",
}


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A tensor as the numpy array the cache stores (bf16 viewed as uint16, bit-exact)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    if t.dtype not in _TORCH_TO_NUMPY:
        raise CacheError(f"cannot cache tensors of dtype {t.dtype}; cast it in the unit that produces it")
    return t.numpy()


def from_storage(a: np.ndarray, logical_dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if logical_dtype == "bfloat16" else t


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
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=level), Crc32cCodec()]


class CacheWriter:
    """Creates a cache group and writes whole shards into it.

    `key` is everything the cache content depends on (plan, settings, fingerprints); reopening an
    existing cache with a different key raises CacheError instead of mixing two runs' outputs.
    Progress is the array `index/shard_done` (one chunk file per shard, written after the shard's
    data), so several processes can each record their own shards without sharing a file; only
    the main process writes the manifest. `create=False` opens a cache the main process created.
    """

    def __init__(self, path: Path, *, plan: Plan, buckets: list[Bucket], key: dict[str, Any],
                 shard_size: int, zstd_level: int, source_sha256: list[bytes],
                 extra_index: dict[str, np.ndarray] | None = None, info: dict[str, Any] | None = None,
                 create: bool = True):
        import zarr

        self.path = Path(path)
        self.plan, self.buckets, self.shard_size, self.zstd_level = plan, buckets, shard_size, zstd_level
        self.shards = [(b, k) for b in buckets for k in range(len(b.shards(shard_size)))]
        existing = _read_manifest(self.path)
        if existing is not None and existing.get("key") != key:
            raise CacheError(
                f"{self.path} holds a cache made with other settings ({_key_diff(existing.get('key'), key)}); "
                f"delete it or choose another output path"
            )
        if existing is None and not create:
            raise CacheError(f"{self.path}: the main process did not create the cache; check its error above")
        if existing is None and self.path.exists() and any(self.path.iterdir()):
            raise CacheError(f"{self.path} exists and is not an autosplit cache; choose an empty or new folder")
        self.group = zarr.open_group(str(self.path), mode="a")
        if existing is None:
            self.manifest = {
                "format_version": CACHE_FORMAT_VERSION, "complete": False, "index_written": False, "key": key,
                "plan": json.loads(plan.to_json()),
                "num_samples": sum(len(b.samples) for b in buckets), "shard_size": shard_size,
                "buckets": [{"id": b.id, "key": list(b.key), "num_samples": len(b.samples)} for b in buckets],
                "shards_done": [], "values": {}, **(info or {}),
            }
            self._save_manifest()  # first, so a kill from here on leaves a cache that the next run recognizes
        else:
            self.manifest = existing
        if create and not self.manifest["index_written"]:
            self._create_index(buckets, source_sha256, extra_index or {})
            (self.path / "plan.json").write_text(plan.to_json())
            self.manifest["index_written"] = True
            self._save_manifest()
        elif create:
            _remove_partial_writes(self.path)
        self._progress = self.group["index/shard_done"]
        self._done = set(np.flatnonzero(self._progress[...]).tolist())

    def _create_index(self, buckets: list[Bucket], source_sha256: list[bytes],
                      extra: dict[str, np.ndarray]) -> None:
        n = sum(len(b.samples) for b in buckets)
        bucket_of, row_of = np.zeros(n, np.int32), np.zeros(n, np.int64)
        for b in buckets:
            for row, i in enumerate(b.samples):
                bucket_of[i], row_of[i] = b.id, row
        sha = np.frombuffer(b"".join(source_sha256), dtype=np.uint8).reshape(n, 32)
        for name, data in (("bucket", bucket_of), ("row", row_of), ("source_sha256", sha), *extra.items()):
            arr = self.group.create_array(f"index/{name}", shape=data.shape, dtype=data.dtype, overwrite=True,
                                          chunks=data.shape, compressors=_codecs(self.zstd_level))
            arr[...] = data
        self.group.create_array("index/shard_done", shape=(len(self.shards),), dtype="uint8", chunks=(1,),
                                fill_value=0, overwrite=True, compressors=_codecs(self.zstd_level))

    def _save_manifest(self) -> None:
        self.group.attrs["autosplit"] = self.manifest

    def shard_id(self, bucket: int, shard: int) -> int:
        """The global number of a bucket's shard (buckets in order, then shards)."""
        return self.shards.index(next(s for s in self.shards if s[0].id == bucket and s[1] == shard))

    def shard_done(self, bucket: int, shard: int) -> bool:
        return self.shard_id(bucket, shard) in self._done

    def done_shards(self) -> list[list[int]]:
        """[bucket, shard] pairs recorded as written, by any process."""
        self._done = set(np.flatnonzero(self._progress[...]).tolist())
        return [[self.shards[g][0].id, self.shards[g][1]] for g in sorted(self._done)]

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
            rest = tuple(storage.shape[1:])
            # at most 64 inner chunks per row: the shard index holds 16 B for every chunk, written or not
            token_chunk = min(max(TOKEN_CHUNK, -(-value.max_len // 64)), value.max_len)
            cap = -(-value.max_len // token_chunk) * token_chunk  # shards must hold whole inner chunks
            shape, chunks, shards = (n, cap, *rest), (1, token_chunk, *rest), (s, cap, *rest)
            self._open_or_create(f"{path}.length", shape=(n,), dtype="int64", chunks=(s,), compressors=codecs)
        else:
            shape, chunks, shards = (n, *storage.shape), (1, *storage.shape), (s, *storage.shape)
        return self._open_or_create(path, shape=shape, dtype=storage.dtype, chunks=chunks, shards=shards,
                                    compressors=codecs, fill_value=0, config={"write_empty_chunks": False},
                                    attributes={"dtype": torch_dtype_name(sample.dtype)})

    def write_shard(self, bucket: Bucket, shard: int, outputs: list[dict[str, torch.Tensor]]) -> None:
        """Write one shard's samples (per-sample tensors, no batch axis), then record it as done.

        Each shard file is replaced whole (zarr's local store writes a temporary file and renames
        it), so a kill leaves either the old file or the new one; the shard counts as done only
        once its progress chunk exists, which is written last.
        """
        lo = shard * self.shard_size
        hi = lo + len(outputs)
        for value in self.plan.cached:
            tensors = [o[value.name] for o in outputs]
            arr = self._array(bucket, value.name, tensors[0])
            if value.ragged_axis is None:
                arr[lo:hi] = np.stack([to_storage(t) for t in tensors])
                continue
            lengths = np.array([t.shape[0] for t in tensors], dtype=np.int64)
            if lengths.max() > value.max_len:
                raise CacheError(f"value {value.name!r} has {lengths.max()} tokens, above its cap {value.max_len}")
            longest = int(lengths.max())
            padded = np.zeros((len(tensors), longest, *arr.shape[2:]), dtype=arr.dtype)
            for j, t in enumerate(tensors):
                padded[j, : t.shape[0]] = to_storage(t)
            arr[lo:hi, :longest] = padded
            self.group[f"buckets/{bucket.id}/{value.name}.length"][lo:hi] = lengths
        g = self.shard_id(bucket.id, shard)
        self._progress[g] = 1
        self._done.add(g)

    def finish(self) -> None:
        """Mark the cache complete (main process, after every writer finished)."""
        done = self.done_shards()
        if len(done) != len(self.shards):
            raise CacheError(f"{self.path}: {len(done)} of {len(self.shards)} shards written; re-run stage 1 "
                             f"to write the rest")
        self.manifest["shards_done"] = done
        self.manifest["values"] = {v.name: {"dtype": self.group[f"buckets/{self.buckets[0].id}/{v.name}"].attrs["dtype"],
                                            "ragged_axis": v.ragged_axis} for v in self.plan.cached}
        self.manifest["complete"] = True
        self._save_manifest()


def _remove_partial_writes(path: Path) -> None:
    """Delete temporary files of writes a kill interrupted (zarr's local store names them *.partial)."""
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get("autosplit")
    except json.JSONDecodeError:
        return None


def _key_diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "no key recorded"
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "changed: " + ", ".join(changed)


def count_done_shards(path: Path) -> int:
    import zarr

    try:
        return int(zarr.open_group(str(path), mode="r")["index/shard_done"][...].sum())
    except (KeyError, FileNotFoundError, ValueError):
        return 0


def cache_status(path: Path) -> str:
    """'missing', 'incomplete' or 'complete'."""
    manifest = _read_manifest(path)
    if manifest is None:
        return "missing"
    return "complete" if manifest.get("complete") else "incomplete"


class CacheReader:
    """Reads samples of a complete cache: `read(i)` -> {value: tensor without batch axis}."""

    def __init__(self, path: Path):
        import zarr

        self.path = Path(path)
        manifest = _read_manifest(self.path)
        if manifest is None:
            raise CacheError(f"{self.path} is not an autosplit cache (no manifest); run stage 1 "
                             f"(--task sft:data_process) with --output_path {self.path}")
        if manifest.get("format_version") != CACHE_FORMAT_VERSION:
            raise CacheError(f"{self.path}: cache format {manifest.get('format_version')} is not "
                             f"{CACHE_FORMAT_VERSION}; re-run stage 1")
        if not manifest.get("complete"):
            raise CacheError(f"{self.path}: cache is incomplete ({count_done_shards(self.path)} shards written); "
                             f"re-run stage 1 to finish it")
        self.manifest = manifest
        self.plan = Plan.from_dict(manifest["plan"])
        self.group = zarr.open_group(str(self.path), mode="r")
        self.bucket_of = self.group["index/bucket"][...]
        self.row_of = self.group["index/row"][...]
        self._arrays = {b["id"]: {v.name: self.group[f"buckets/{b['id']}/{v.name}"] for v in self.plan.cached}
                        for b in manifest["buckets"]}
        self._lengths = {b["id"]: {v.name: self.group[f"buckets/{b['id']}/{v.name}.length"][...]
                                   for v in self.plan.cached if v.ragged_axis is not None}
                         for b in manifest["buckets"]}

    def __len__(self) -> int:
        return len(self.bucket_of)

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def bucket_keys(self) -> list[int]:
        return [int(b) for b in self.bucket_of]

    def read(self, index: int) -> dict[str, torch.Tensor]:
        bucket, row = int(self.bucket_of[index]), int(self.row_of[index])
        out = {}
        for v in self.plan.cached:
            arr = self._arrays[bucket][v.name]
            try:
                if v.ragged_axis is None:
                    data = arr[row]
                else:
                    data = arr[row, : int(self._lengths[bucket][v.name][row])]
            except Exception as exc:  # zarr raises codec-specific errors on corrupt chunks
                raise CacheError(f"{self.path}: cannot read array buckets/{bucket}/{v.name} of sample {index} "
                                 f"(row {row}): {exc}; the cache is corrupt, re-run stage 1") from exc
            out[v.name] = from_storage(data, arr.attrs["dtype"])
        return out


def describe_cache(path: Path) -> dict[str, Any]:
    """Schema, sample count, bytes on disk vs raw (unpadded) bytes, completeness and fingerprints."""
    import zarr

    manifest = _read_manifest(path)
    if manifest is None:
        raise CacheError(f"{path} is not an autosplit cache (no manifest in zarr.json); pass a stage-1 output folder")
    group = zarr.open_group(str(path), mode="r")
    arrays, raw = {}, 0
    for b in manifest["buckets"]:
        for name in manifest["plan"]["cached"]:
            key = f"buckets/{b['id']}/{name['name']}"
            if key not in group:
                continue
            arr = group[key]
            per_row = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
            if f"{key}.length" in group:
                per_token = int(np.prod(arr.shape[2:])) * arr.dtype.itemsize
                raw += int(group[f"{key}.length"][...].sum()) * per_token
            else:
                raw += arr.shape[0] * per_row
            arrays[key] = {"shape": list(arr.shape), "dtype": arr.attrs.get("dtype"), "stored_as": str(arr.dtype),
                           "chunks": list(arr.chunks), "shards": list(arr.shards or [])}
    disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"path": str(path), "format_version": manifest["format_version"], "complete": manifest["complete"],
            "num_samples": manifest["num_samples"], "shards_done": count_done_shards(path),
            "shard_size": manifest["shard_size"], "arrays": arrays, "bytes_on_disk": disk, "raw_bytes": raw,
            "compression_ratio": round(raw / disk, 3) if disk else None,
            "fingerprints": {"components": manifest["key"].get("components", {}),
                             "dataset_sha256": manifest["key"].get("dataset_sha256"),
                             "max_pixels": manifest["key"].get("max_pixels"), "versions": manifest["key"].get("versions")}}


def verify_cache(path: Path) -> list[str]:
    """Read every stored chunk (checking its crc32c and its shard index's); one line per failure,
    naming the array and the sample. An empty list means every checksum matched."""
    import zarr

    manifest = _read_manifest(path)
    if manifest is None:
        raise CacheError(f"{path} is not an autosplit cache (no manifest in zarr.json); pass a stage-1 output folder")
    group = zarr.open_group(str(path), mode="r")
    problems = []
    for name in ("bucket", "row", "source_sha256", "shard_done"):
        try:
            group[f"index/{name}"][...]
        except Exception as exc:  # codec errors of any kind mean a corrupt chunk
            problems.append(f"{path}: array index/{name} is corrupt ({exc}); re-run stage 1")
    if problems:
        return problems
    bucket_of, row_of = group["index/bucket"][...], group["index/row"][...]
    sample_of = {(int(b), int(r)): i for i, (b, r) in enumerate(zip(bucket_of, row_of))}
    for b in manifest["buckets"]:
        for key in sorted(k for k, _ in group[f"buckets/{b['id']}"].arrays()) if f"buckets/{b['id']}" in group else []:
            arr = group[f"buckets/{b['id']}/{key}"]
            for row in range(arr.shape[0]):
                try:
                    arr[row]
                except Exception as exc:
                    problems.append(f"{path}: array buckets/{b['id']}/{key} of sample {sample_of.get((b['id'], row))} "
                                    f"(row {row}) fails its checksum ({exc}); re-run stage 1")
    return problems


class TensorStoreReader(CacheReader):
    """The hot read path: the same cache read through tensorstore, with every read of a batch in
    flight at once (`submit`). Same results as CacheReader, bit for bit; crc32c is checked too.

    `threads` caps tensorstore's decode and file threads so it fits beside the trainer; its cache
    pool (`cache_bytes`) keeps shard indexes so they are not read again for every sample.
    """

    def __init__(self, path: Path, *, threads: int = 2, cache_bytes: int = 64 << 20):
        import tensorstore as ts

        super().__init__(path)
        context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes},
                              "data_copy_concurrency": {"limit": threads},
                              "file_io_concurrency": {"limit": max(2, 2 * threads)}})
        self._ts = {b["id"]: {v.name: ts.open({"driver": "zarr3", "kvstore": {
            "driver": "file", "path": str(self.path / f"buckets/{b['id']}/{v.name}")}}, context=context,
            read=True).result() for v in self.plan.cached} for b in self.manifest["buckets"]}

    def _start(self, index: int) -> list[tuple[Any, str, Any]]:
        bucket, row = int(self.bucket_of[index]), int(self.row_of[index])
        pending = []
        for v in self.plan.cached:
            arr = self._ts[bucket][v.name]
            part = arr[row] if v.ragged_axis is None else arr[row, : int(self._lengths[bucket][v.name][row])]
            pending.append((v, self._arrays[bucket][v.name].attrs["dtype"], part.read()))
        return pending

    def _finish(self, index: int, pending: list[tuple[Any, str, Any]]) -> dict[str, torch.Tensor]:
        out = {}
        for v, dtype, future in pending:
            try:
                data = future.result()
            except Exception as exc:  # tensorstore reports a checksum mismatch as DATA_LOSS
                bucket, row = int(self.bucket_of[index]), int(self.row_of[index])
                raise CacheError(f"{self.path}: cannot read array buckets/{bucket}/{v.name} of sample {index} "
                                 f"(row {row}): {exc}; the cache is corrupt, re-run stage 1") from exc
            out[v.name] = from_storage(data, dtype)
        return out

    def read(self, index: int) -> dict[str, torch.Tensor]:
        return self._finish(index, self._start(index))

    def submit(self, indices: list[int]) -> "_PendingBatch":
        """Start every read of `indices` now; `.result()` waits for them and returns the samples."""
        return _PendingBatch(self, [(i, self._start(i)) for i in indices])


class _PendingBatch:
    def __init__(self, reader: TensorStoreReader, pending: list[tuple[int, Any]]):
        self.reader, self.pending = reader, pending

    def result(self) -> list[dict[str, torch.Tensor]]:
        return [self.reader._finish(i, p) for i, p in self.pending]


def open_reader(path: Path, *, kind: str = "tensorstore") -> CacheReader:
    """The reader of `cache.reader`: "tensorstore" (hot path) or "zarr" (zarr-python, the reference)."""
    return TensorStoreReader(path) if kind == "tensorstore" else CacheReader(path)
