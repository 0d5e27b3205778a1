"""The cache's fast readers (the reference, `CacheReader`, and the writer are in cache.py):
`DirectReader`, the hot path (shard files mapped and read directly, storage/shards.py), and
`TensorStoreReader` (tensorstore's asynchronous reads); `open_reader` picks one for
`cache.reader`. Both return what `CacheReader` returns, bit for bit, and check every crc32c.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosplit.errors import CacheError
from autosplit.storage.cache import CacheReader
from autosplit.storage.codec import from_storage
from autosplit.storage.integrity import _file_keys, _one_line, _rebuild
from autosplit.storage.loader import RowsOfBatch
from autosplit.storage.shards import BufferPool, ShardError, ShardFiles, ShardLayout, layout_of


class TensorStoreReader(CacheReader):
    """The hot read path: the same cache read through tensorstore, with every read of a batch in
    flight at once (`submit`). Same results as CacheReader, bit for bit; crc32c is checked too.

    `threads` caps tensorstore's decode and file threads so it fits beside the trainer; its cache
    pool (`cache_bytes`) keeps shard indexes so they are not read again for every sample.
    """

    def __init__(self, path: Path, *, threads: int = 2, cache_bytes: int = 64 << 20):
        import tensorstore as ts

        super().__init__(path)
        context = ts.Context(
            {
                "cache_pool": {"total_bytes_limit": cache_bytes},
                "data_copy_concurrency": {"limit": threads},
                "file_io_concurrency": {"limit": max(2, 2 * threads)},
            }
        )
        self._ts = {
            b: {name: self._open(ts, f"buckets/{b}/{name}", context) for name in values}
            for b, values in self._arrays.items()
        }

    def _open(self, ts: Any, name: str, context: Any) -> Any:
        try:
            return ts.open(
                {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)}},
                context=context,
                read=True,
            ).result()
        except Exception as exc:
            raise CacheError(
                f"{self.path}: tensorstore cannot open array {name} ({_one_line(exc)}); {_rebuild(self.path)}"
            ) from exc

    def _start(self, index: int) -> list[tuple[Any, str, Any]]:
        """Start every read of sample `index`; never raises (the loader calls it from its thread):
        an error is kept and raised by `_finish`."""
        pending = []
        for v in self.plan.cached:
            bucket, _, region = self._region(index, v.name)
            try:
                future = self._ts[bucket][v.name][region].read()
            except Exception as exc:
                future = exc
            pending.append((v, self._dtypes[bucket][v.name], future))
        return pending

    def _finish(self, index: int, pending: list[tuple[Any, str, Any]]) -> dict[str, torch.Tensor]:
        out = {}
        for v, dtype, future in pending:
            try:
                if isinstance(future, BaseException):
                    raise future
                data = future.result()
            except Exception as exc:  # tensorstore reports a checksum mismatch as DATA_LOSS
                raise self._read_error(index, v.name, exc) from exc
            out[v.name] = from_storage(data, dtype)
        return out

    def read(self, index: int) -> dict[str, torch.Tensor]:
        return self._finish(index, self._start(index))

    def submit(self, indices: list[int]) -> _PendingBatch:
        """Start every read of `indices` now; `.result()` waits for them and returns the samples."""
        return _PendingBatch(self, [(i, self._start(i)) for i in indices])


class _PendingBatch:
    def __init__(self, reader: TensorStoreReader, pending: list[tuple[int, Any]]):
        self.reader, self.pending = reader, pending

    def result(self) -> list[dict[str, torch.Tensor]]:
        return [self.reader._finish(i, p) for i, p in self.pending]


class DirectReader(CacheReader):
    """The hot read path: the shard files read directly (storage/shards.py: each mapped once, every
    chunk copied into place and its crc32c checked while in cache; compressed ones decompressed),
    each batch straight into the batch's tensors, so collating copies nothing. Same results as
    CacheReader, bit for bit. `submit` reads in the calling thread (the loader's own: off the
    trainer's thread), or, with `threads`, on that many more (no faster on 2 shared cores,
    docs/benchmarks.md).
    """

    def __init__(self, path: Path, *, threads: int = 0):
        from concurrent.futures import ThreadPoolExecutor

        super().__init__(path)
        self._files = ShardFiles()
        #: (bucket, value) -> its layout, each shard file's path and recorded size, its lengths
        self._where: dict[tuple[int, str], tuple[ShardLayout, list[str], list[int], np.ndarray | None]] = {}
        for b, values in self._arrays.items():
            for name in values:
                array = f"buckets/{b}/{name}"
                try:
                    layout = layout_of(json.loads((self.path / array / "zarr.json").read_bytes()))
                except ShardError as exc:
                    raise CacheError(
                        f"{self.path}: array {array}: {exc}; read it with --set cache.reader=zarr, "
                        f"or {_rebuild(self.path)}"
                    ) from None
                record = self._records[array]
                files = [str(self.path / array / k) for k in _file_keys(record["shape"], record["file_shape"])]
                self._where[b, name] = (layout, files, record["file_bytes"], self._lengths[b].get(name))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="autosplit-cache-read") if threads else None
        self._buffers = BufferPool()

    def _shape(self, index: int, name: str) -> tuple[int, ...]:
        bucket, row = int(self.bucket_of[index]), int(self.row_of[index])
        layout, _, _, lengths = self._where[bucket, name]
        return layout.row_shape if lengths is None else (int(lengths[row]), *layout.row_shape[1:])

    def _read_into(self, index: int, outs: dict[str, np.ndarray], padding: list[np.ndarray]) -> None:
        """Sample `index`'s values into `outs` (a C-contiguous array each, of its bytes), and zeros
        into `padding` (the rest of its ragged rows)."""
        for pad in padding:
            pad[...] = 0
        bucket, row = int(self.bucket_of[index]), int(self.row_of[index])
        for name, out in outs.items():
            layout, files, sizes, _ = self._where[bucket, name]
            file, at = divmod(row, layout.rows)
            try:
                self._files.read_row(files[file], layout, at, out, size=sizes[file])
            except Exception as exc:  # ShardError, OSError: a damaged or changed file
                raise self._read_error(index, name, exc) from exc

    def read(self, index: int) -> dict[str, torch.Tensor]:
        return self.submit([index]).result()[0]

    def submit(self, indices: list[int]) -> _Batch | _Several:
        """Start reading `indices` (one shape bucket) into one batch; `.result()` waits for them and
        returns the samples, whose tensors are rows of the batch's tensors (`collate` takes those
        whole). Ragged values are zero-padded to the batch's longest, as `collate` pads them. The
        batch lives in one buffer of a pool (`BufferPool`), used again once the batch is dropped."""
        bucket, n = int(self.bucket_of[indices[0]]), len(indices)
        if any(int(self.bucket_of[i]) != bucket for i in indices):  # not one batch: read each on its own
            return _Several([self.submit([i]) for i in indices])
        parts = self._parts(bucket, indices)
        whole = torch.from_numpy(self._buffers.take(parts[-1].end(n)))
        tensors: dict[str, torch.Tensor] = {}
        samples: list[dict[str, torch.Tensor]] = [{} for _ in indices]
        targets: list[dict[str, np.ndarray]] = [{} for _ in indices]  # where each sample's bytes go
        padding: list[list[np.ndarray]] = [[] for _ in indices]  # the rest of its ragged rows, zeroed
        for part in parts:
            region = whole[part.offset : part.offset + part.row_bytes * n]
            stored = region.view(torch.from_numpy(np.empty(0, part.dtype)).dtype).reshape(n, *part.row_shape)
            logical = self._dtypes[bucket][part.name]
            tensors[part.name] = stored.view(torch.bfloat16) if logical == "bfloat16" else stored
            for j in range(n):
                row, used = region[j * part.row_bytes : (j + 1) * part.row_bytes], part.used_bytes(j)
                samples[j][part.name] = (
                    tensors[part.name][j] if part.lengths is None else tensors[part.name][j, : part.lengths[j]]
                )
                targets[j][part.name] = row[:used].numpy()
                if used < part.row_bytes:
                    padding[j].append(row[used:].numpy())
        jobs = list(zip(indices, targets, padding))
        if self._pool is not None:  # one task per batch: fewer hand-offs between threads
            futures = [self._pool.submit(self._read_all, jobs)]
        else:
            futures = [_done(self._read_all, jobs)]
        return _Batch(futures, tensors, samples)

    def _read_all(self, jobs: list[tuple[int, dict[str, np.ndarray], list[np.ndarray]]]) -> None:
        for job in jobs:
            self._read_into(*job)

    def _parts(self, bucket: int, indices: list[int]) -> list[_Part]:
        """Where each value of a batch of `indices` lies in the batch's buffer."""
        parts: list[_Part] = []
        for v in self.plan.cached:
            layout, _, _, lengths = self._where[bucket, v.name]
            mine = None if lengths is None else [int(lengths[self.row_of[i]]) for i in indices]
            row_shape = layout.row_shape if mine is None else (max(mine), *layout.row_shape[1:])
            parts.append(_Part(v.name, layout.dtype, row_shape, mine, parts[-1].end(len(indices)) if parts else 0))
        return parts


@dataclass(frozen=True)
class _Part:
    """Where one value of a batch lies in the batch's buffer: `n` rows of `row_shape` (a ragged
    value's padded to the batch's longest) from `offset`."""

    name: str
    dtype: np.dtype
    row_shape: tuple[int, ...]
    #: each row's length, for a ragged value
    lengths: list[int] | None
    offset: int

    @cached_property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.dtype.itemsize

    def used_bytes(self, j: int) -> int:
        """Bytes of row j that hold values (the rest is padding)."""
        if self.lengths is None:
            return self.row_bytes
        return self.lengths[j] * (self.row_bytes // self.row_shape[0]) if self.row_shape[0] else 0

    def end(self, n: int) -> int:
        """Where the next part starts: every part is 64-byte aligned."""
        return self.offset + -(-self.row_bytes * n // 64) * 64


def _done(fn: Any, *args: Any) -> Any:
    """A finished future of fn(*args), holding its result or its exception."""
    from concurrent.futures import Future

    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


class _Batch:
    def __init__(self, futures: list[Any], tensors: dict[str, torch.Tensor], samples: list[dict[str, torch.Tensor]]):
        self.futures, self.tensors, self.samples = futures, tensors, samples

    def result(self) -> list[dict[str, torch.Tensor]]:
        for future in self.futures:
            future.result()  # raises the read's CacheError
        return RowsOfBatch(list(self.samples), self.tensors)

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()


class _Several:
    def __init__(self, batches: list[Any]):
        self.batches = batches

    def result(self) -> list[dict[str, torch.Tensor]]:
        return [sample for batch in self.batches for sample in batch.result()]

    def cancel(self) -> None:
        for batch in self.batches:
            batch.cancel()


def open_reader(path: Path, *, kind: str = "direct") -> CacheReader:
    """The reader of `cache.reader`: "direct" (the hot path: shard files read directly),
    "tensorstore" (tensorstore's async reads) or "zarr" (zarr-python, the reference)."""
    if kind == "direct":
        return DirectReader(path)
    return TensorStoreReader(path) if kind == "tensorstore" else CacheReader(path)
