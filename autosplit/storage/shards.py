"""Shard files of the cache's value arrays, written and read here without zarr's per-call machinery.

A shard file is what zarr v3's `sharding_indexed` codec defines, index at the end: the inner
chunks' bytes one after another, each being the chunk's raw little-endian bytes (zstd-compressed
when the array says so) followed by their crc32c (4 bytes, little-endian); then the index, one
(offset, nbytes) uint64 pair per inner chunk in C order of the shard's chunk grid, (2**64-1,
2**64-1) for a chunk not stored, followed by the index's own crc32c. zarr-python and tensorstore
read these files as they read their own (the tests read every cache back with zarr-python).

Every array of the cache is split along axis 0 only, one sample (row) per inner chunk along it; a
ragged value's row is further split into chunks of `chunk_len` tokens. This module writes a
sample's chunks next to each other and leaves out the chunks past a ragged row's length, so
padding costs nothing on disk. Reading maps each shard file once (`ShardFiles`) and checks each
chunk's crc32c before copying (or decompressing) it into the caller's buffer: on a warm page cache
a read is a checksum and one copy, with no decoding when the array is stored uncompressed.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

EMPTY = np.uint64(2**64 - 1)
_IOV_MAX = 1024  # writev takes at most this many buffers per call (Linux)


class ShardError(ValueError):
    """A shard file that does not hold what its index or checksums say: damage."""


@dataclass(frozen=True)
class ShardLayout:
    """How one array's shard files are laid out (read from its zarr.json by `layout_of`)."""

    #: samples (rows) per shard file
    rows: int
    #: the shape of one row: a fixed value's shape, or (cap, *rest) of a ragged one
    row_shape: tuple[int, ...]
    #: numpy dtype of the stored values
    dtype: np.dtype
    #: extent of an inner chunk along the row's first axis (a ragged row's tokens per chunk; a
    #: fixed row is one chunk); None for rows of one element
    chunk_len: int | None
    #: zstd level of the inner chunks; None: stored uncompressed (crc32c only)
    zstd_level: int | None

    @cached_property
    def chunks_per_row(self) -> int:
        return 1 if self.chunk_len is None else -(-self.row_shape[0] // self.chunk_len)

    @cached_property
    def token_bytes(self) -> int:
        """Bytes of one step along the row's first axis (one token of a ragged row)."""
        return int(np.prod(self.row_shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @cached_property
    def chunk_bytes(self) -> int:
        """Raw bytes of one inner chunk (before compression and checksum)."""
        return self.dtype.itemsize if self.chunk_len is None else self.chunk_len * self.token_bytes

    @cached_property
    def index_bytes(self) -> int:
        return 16 * self.rows * self.chunks_per_row + 4


def layout_of(meta: dict[str, Any]) -> ShardLayout:
    """The layout of an array from its zarr.json; raises ShardError for any layout autosplit does
    not write (another codec chain, index at the start, chunks split along other axes)."""
    try:
        (sharding,) = meta["codecs"]
        config = sharding["configuration"]
        shard_shape, inner = list(meta["chunk_grid"]["configuration"]["chunk_shape"]), list(config["chunk_shape"])
        names = [c["name"] for c in config["codecs"]]
        endian = [c.get("configuration", {}).get("endian", "little") for c in config["codecs"][:1]]
        index = [(c["name"], c.get("configuration", {}).get("endian", "little")) for c in config["index_codecs"]]
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardError(f"not a sharded array of the layout autosplit writes ({exc!r})") from exc
    ok = (
        sharding["name"] == "sharding_indexed"
        and config.get("index_location", "end") == "end"
        and index == [("bytes", "little"), ("crc32c", "little")]
        and names in (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"])
        and endian == ["little"]
        and len(inner) == len(shard_shape) >= 1
        and inner[0] == 1
        and inner[2:] == shard_shape[2:]
        and (len(inner) == 1 or shard_shape[1] % inner[1] == 0)
        and meta.get("fill_value", 0) in (0, 0.0, False)
    )
    if not ok:
        raise ShardError("not a sharded array of the layout autosplit writes (codecs, chunks or index location)")
    zstd = config["codecs"][1].get("configuration", {}).get("level", 0) if names[1] == "zstd" else None
    return ShardLayout(shard_shape[0], tuple(shard_shape[1:]), dtype, inner[1] if len(inner) > 1 else None, zstd)


def _crc(data: Any, more: Any = None) -> int:
    value = google_crc32c.value(data)
    return value if more is None else google_crc32c.extend(value, more)


def _crc_bytes(value: int) -> bytes:
    return value.to_bytes(4, "little")


def encode_shard(layout: ShardLayout, rows: list[np.ndarray], *, ragged: bool) -> list[Any]:
    """The bytes of one shard file holding `rows`, as a list of buffers to write one after another.
    Each row has `layout.row_shape`, or, `ragged`, any length up to the cap along its first axis:
    its chunks past that length are not stored. Rows past len(rows) (the short last shard of a
    bucket) are not stored either."""
    from numcodecs.zstd import Zstd

    compressor = None if layout.zstd_level is None else Zstd(level=layout.zstd_level)
    index = np.full((layout.rows * layout.chunks_per_row, 2), EMPTY, dtype="<u8")
    parts: list[Any] = []
    offset = 0
    for r, row in enumerate(rows):
        row = np.asarray(row, dtype=layout.dtype)
        row = row if row.flags.c_contiguous else row.copy()  # (not ascontiguousarray: it makes a scalar 1-d)
        for c, chunk in enumerate(_row_chunks(layout, row, ragged=ragged)):
            pad = bytes(layout.chunk_bytes - chunk.nbytes)  # a ragged row's last chunk: zeros to its end
            if compressor is not None:
                data = compressor.encode(chunk.tobytes() + pad if pad else chunk)
                pieces = [data, _crc_bytes(_crc(data))]
            else:
                pieces = [chunk.reshape(-1).view(np.uint8), pad, _crc_bytes(_crc(chunk, pad or None))]
            nbytes = sum(memoryview(p).nbytes for p in pieces)
            index[r * layout.chunks_per_row + c] = (offset, nbytes)
            parts += [p for p in pieces if memoryview(p).nbytes]
            offset += nbytes
    table = index.tobytes()
    return parts + [table, _crc_bytes(_crc(table))]


def _row_chunks(layout: ShardLayout, row: np.ndarray, *, ragged: bool) -> list[np.ndarray]:
    """A row's stored chunks: the whole row, or its chunks up to its length (a ragged row's last one
    without its padding, which `encode_shard` adds as zeros)."""
    if ragged:
        fits = row.ndim >= 1 and row.shape[1:] == layout.row_shape[1:] and row.shape[0] <= layout.row_shape[0]
    else:
        fits = row.shape == layout.row_shape
    if not fits:
        raise ShardError(f"a row of shape {list(row.shape)} in an array of rows {list(layout.row_shape)}")
    if layout.chunk_len is None:
        return [row]
    return [row[lo : lo + layout.chunk_len] for lo in range(0, row.shape[0], layout.chunk_len)]


def write_file(path: Path, parts: list[Any]) -> None:
    """Write `parts` to `path` as one new file: into a temporary `*.partial` file, renamed over
    `path` when complete, so a kill leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            written = os.writev(fd, views[:_IOV_MAX])
            while views and written >= views[0].nbytes:  # drop what was written, keep the rest
                written -= views[0].nbytes
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
    except BaseException:
        os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(partial, path)


class _Mapped:
    """One shard file mapped read-only, with its index parsed and checked, and, per row, where its
    leading chunks lie one after another, all stored (`run` of them from `start`): such chunks are
    read with one strided copy."""

    def __init__(self, path: str, layout: ShardLayout, size: int | None):
        with open(path, "rb") as f:
            found = os.fstat(f.fileno()).st_size
            if size is not None and found != size:  # replaced or truncated since the reader opened the cache
                raise ShardError(f"the file is {found} bytes, stage 1 wrote {size} (truncated or replaced)")
            if found < layout.index_bytes:
                raise ShardError(f"the file is {found} bytes, too short for its index")
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self.map, dtype=np.uint8)
        table = self.data[found - layout.index_bytes :]
        if _crc(table[:-4]) != int.from_bytes(table[-4:].tobytes(), "little"):
            raise ShardError("the file's shard index fails its crc32c")
        self.index = np.frombuffer(table[:-4].tobytes(), dtype="<u8").reshape(-1, 2)
        stored = self.index[:, 0] != EMPTY
        ends = self.index[stored, 0] + self.index[stored, 1]
        step = layout.chunk_bytes + 4
        if ends.size and int(ends.max()) > found - layout.index_bytes:
            raise ShardError("the file's shard index points outside its data")
        if layout.zstd_level is None and not np.all(self.index[stored, 1] == step):
            raise ShardError("the file's shard index holds chunks of the wrong size")
        offsets = self.index[:, 0].astype(np.int64).reshape(layout.rows, layout.chunks_per_row)
        follows = stored.reshape(offsets.shape) & (offsets == offsets[:, :1] + step * np.arange(offsets.shape[1]))
        self.start = offsets[:, 0]
        self.run = np.cumprod(follows, axis=1).sum(axis=1) if layout.zstd_level is None else np.zeros(layout.rows, int)

    def chunk(self, k: int) -> np.ndarray | None:
        """Inner chunk `k`'s stored bytes, checksum checked and cut off; None if not stored."""
        offset, nbytes = self.index[k]
        if offset == EMPTY:
            return None
        data = self.data[int(offset) : int(offset) + int(nbytes)]
        if _crc(data[:-4]) != int.from_bytes(data[-4:].tobytes(), "little"):
            raise ShardError(f"inner chunk {k} fails its crc32c")
        return data[:-4]


class ShardFiles:
    """Reads rows of sharded arrays into caller-provided buffers. Each shard file is mapped once,
    when first read, and stays mapped (a cache of tens of files); thread-safe."""

    def __init__(self) -> None:
        self._files: dict[str, _Mapped] = {}
        self._lock = threading.Lock()

    def _file(self, path: str, layout: ShardLayout, size: int | None) -> _Mapped:
        found = self._files.get(path)
        if found is None:
            with self._lock:
                found = self._files.get(path)
                if found is None:
                    found = self._files[path] = _Mapped(path, layout, size)
        return found

    def read_row(self, path: str, layout: ShardLayout, row: int, out: np.ndarray, *, size: int | None) -> None:
        """Row `row` (of this shard file) into `out` (C-contiguous): the row's shape, or (length,
        *rest) of a ragged row, which reads its first `length` tokens. `size` is the file's size
        stage 1 recorded. Chunks not stored read as zeros. Raises ShardError (or OSError) saying
        what is damaged."""
        assert out.flags.c_contiguous, "read_row writes into a view of `out`"
        mapped = self._file(path, layout, size)
        flat = out.reshape(-1).view(np.uint8)
        span = layout.chunk_bytes
        count = -(-flat.nbytes // span)
        if count and mapped.run[row] >= count:
            _copy_run(mapped.data, int(mapped.start[row]), flat, span, count, row * layout.chunks_per_row)
            return
        first = row * layout.chunks_per_row
        for c in range(count):
            lo, hi = c * span, min((c + 1) * span, flat.nbytes)
            data = mapped.chunk(first + c)
            if data is None:
                flat[lo:hi] = 0
            elif layout.zstd_level is None:
                flat[lo:hi] = data[: hi - lo]
            else:
                _decompress(data, flat[lo:hi], span)


def _copy_run(data: np.ndarray, start: int, flat: np.ndarray, span: int, count: int, first: int) -> None:
    """Copy `count` uncompressed chunks stored one after another from `start` into `flat` (the
    last one up to flat's end), checking each chunk's crc32c on its copy while it is in cache."""
    stored = data[start : start + count * (span + 4)].reshape(count, span + 4)
    want = stored[:, span:].copy().view("<u4").reshape(-1)
    for c in range(count):
        lo = c * span
        hi = min(lo + span, flat.nbytes)
        flat[lo:hi] = stored[c, : hi - lo]
        got = _crc(flat[lo:hi], stored[c, hi - lo : span] if hi - lo < span else None)
        if got != want[c]:
            raise ShardError(f"inner chunk {first + c} fails its crc32c")


def _decompress(data: np.ndarray, out: np.ndarray, raw_bytes: int) -> None:
    from numcodecs.zstd import Zstd

    if out.nbytes == raw_bytes:
        decoded = Zstd().decode(data, out=out)
        if memoryview(decoded).nbytes != raw_bytes:
            raise ShardError(f"a chunk decompressed to {memoryview(decoded).nbytes} bytes, not {raw_bytes}")
        return
    whole = np.frombuffer(Zstd().decode(data), dtype=np.uint8)
    if whole.nbytes != raw_bytes:
        raise ShardError(f"a chunk decompressed to {whole.nbytes} bytes, not {raw_bytes}")
    out[:] = whole[: out.nbytes]


class BufferPool:
    """Byte buffers for batches, reused once nothing refers to them any more: first-touching fresh
    memory (page faults) cost more than reading a batch into it. `take(n)` returns a new view of
    n bytes of a free buffer; the buffer is free again when that view object is gone, which it is
    only when every tensor made from it (`torch.from_numpy` holds the view) is gone. Thread-safe."""

    def __init__(self, *, keep: int = 16):
        self.keep = keep
        self._buffers: list[tuple[np.ndarray, Any]] = []  # (buffer, weakref to the view in use, or None)
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        import weakref

        with self._lock:
            free = [k for k, (buf, used) in enumerate(self._buffers) if buf.nbytes >= nbytes and not _alive(used)]
            if free:
                k = min(free, key=lambda k: self._buffers[k][0].nbytes)
            else:
                if len(self._buffers) >= self.keep:  # forget a free one (or, if all are in use, keep none)
                    idle = [k for k, (_, used) in enumerate(self._buffers) if not _alive(used)]
                    if not idle:
                        return np.empty(nbytes, dtype=np.uint8)
                    self._buffers.pop(idle[0])
                self._buffers.append((np.empty(nbytes + nbytes // 8, dtype=np.uint8), None))
                k = len(self._buffers) - 1
            buf = self._buffers[k][0]
            view = buf[:nbytes]
            self._buffers[k] = (buf, weakref.ref(view))
            return view


def _alive(ref: Any) -> bool:
    return ref is not None and ref() is not None
