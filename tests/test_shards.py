"""Shard files written and read directly (storage/shards.py) and the direct reader: plain zarr reads
what we write, we read what zarr writes, a sample's chunks lie together, damage is a CacheError
naming the sample, batches are read in place and their buffers reused only once they are free."""

from __future__ import annotations

import gc
import hashlib
import json

import numpy as np
import pytest
import torch
import zarr

from autosplit.errors import CacheError
from autosplit.plan import CachedValue, Plan, UnitPlacement
from autosplit.storage.cache import CacheReader, CacheWriter, make_buckets
from autosplit.storage.loader import collate
from autosplit.storage.readers import DirectReader, TensorStoreReader
from autosplit.storage.shards import EMPTY, BufferPool, ShardError, layout_of, write_file

PLAN = Plan(
    pipeline="t",
    task="sft",
    split=True,
    trainable=("transformer",),
    units=(UnitPlacement("encode", 1, "stage 1"),),
    cached=(
        CachedValue("latents", "encode"),
        CachedValue("text", "encode", ragged_axis=0, max_len=100),
        CachedValue("scale", "encode"),
        CachedValue("prompt", "encode", ragged_axis=0, max_len=40),
    ),
)
NUM = 7  # shards of 3: the last one is short


def sample(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "latents": torch.randn(4, 3, 5, generator=g).bfloat16(),
        "text": torch.randn(1 + 13 * i, 6, generator=g),  # 1 to 79 tokens: 1 to 5 chunks of 16
        "scale": torch.tensor(float(i), dtype=torch.float64),
        "prompt": torch.tensor(list(f"prompt {i}".encode()), dtype=torch.uint8),
    }


def write(path, *, zstd_level: int) -> None:
    buckets = make_buckets([(1,)] * NUM)
    writer = CacheWriter(
        path,
        plan=PLAN,
        buckets=buckets,
        key={"k": 1},
        shard_size=3,
        zstd_level=zstd_level,
        source_sha256=[hashlib.sha256(bytes([i])).digest() for i in range(NUM)],
    )
    for shard, (lo, hi) in enumerate(buckets[0].shards(3)):
        writer.write_shard(buckets[0], shard, [sample(i) for i in range(lo, hi)])
    writer.finish()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.bfloat16:
        a, b = a.view(torch.uint16), b.view(torch.uint16)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("zstd_level", [0, 1])
def test_every_reader_reads_what_was_written_bit_for_bit(tmp_path, zstd_level):
    write(tmp_path / "c", zstd_level=zstd_level)
    readers = [CacheReader(tmp_path / "c"), TensorStoreReader(tmp_path / "c"), DirectReader(tmp_path / "c")]
    readers.append(DirectReader(tmp_path / "c", threads=2))
    for i in range(NUM):
        want = sample(i)
        for reader in readers:
            got = reader.read(i)
            assert sorted(got) == sorted(want) and all(same(got[k], want[k]) for k in want), (type(reader), i)


def test_uncompressed_values_are_stored_with_crc32c_only_in_small_token_chunks(tmp_path):
    write(tmp_path / "c", zstd_level=0)
    text = zarr.open_group(str(tmp_path / "c"), mode="r")["buckets/0/text"]
    assert [c.__class__.__name__ for c in text.compressors] == ["Crc32cCodec"]
    assert text.chunks == (1, 16, 6) and text.shards == (3, 112, 6)  # the cap, 100 tokens, in whole chunks


def test_a_samples_chunks_lie_together_and_padding_chunks_are_not_stored(tmp_path):
    write(tmp_path / "c", zstd_level=0)
    meta = json.loads((tmp_path / "c/buckets/0/text/zarr.json").read_text())
    layout = layout_of(meta)
    data = (tmp_path / "c/buckets/0/text/c/2/0/0").read_bytes()  # rows 6 (79 tokens) and two not there
    index = np.frombuffer(data[-layout.index_bytes : -4], "<u8").reshape(layout.rows, layout.chunks_per_row, 2)
    assert (index[0, :5, 0] == np.arange(5) * (16 * 6 * 4 + 4)).all()  # 5 chunks of 79 tokens, one after another
    assert (index[0, 5:] == EMPTY).all() and (index[1:] == EMPTY).all()
    assert len(data) == 5 * (16 * 6 * 4 + 4) + layout.index_bytes


def test_the_direct_reader_reads_shards_zarr_wrote(tmp_path):
    """Caches written before autosplit wrote its own shard files: zarr's chunk order, zstd."""
    write(tmp_path / "c", zstd_level=1)
    group = zarr.open_group(str(tmp_path / "c"), mode="a")
    arr = group["buckets/0/text"]
    cap = arr.shape[1]
    arr[0:3] = np.stack([np.pad(sample(i)["text"].numpy(), ((0, cap - 1 - 13 * i), (0, 0))) for i in range(3)])
    reader = DirectReader(tmp_path / "c")
    for i in range(3):
        assert same(reader.read(i)["text"], sample(i)["text"])


def test_a_flipped_byte_is_a_cache_error_naming_the_sample_and_its_neighbour_still_reads(tmp_path):
    write(tmp_path / "c", zstd_level=0)
    shard = tmp_path / "c/buckets/0/latents/c/1/0/0/0"  # rows 3, 4, 5
    data = bytearray(shard.read_bytes())
    data[4 * 3 * 5 * 2 + 4 + 10] ^= 0xFF  # inside row 4's chunk
    shard.write_bytes(bytes(data))
    reader = DirectReader(tmp_path / "c")
    with pytest.raises(CacheError, match=r"cannot read array buckets/0/latents of sample 4 \(row 4\): .*crc32c"):
        reader.read(4)
    with pytest.raises(CacheError, match="sample 4"):
        reader.submit([3, 4]).result()
    assert same(reader.read(5)["latents"], sample(5)["latents"])


def test_a_file_replaced_after_the_cache_was_opened_is_refused(tmp_path):
    write(tmp_path / "c", zstd_level=0)
    reader = DirectReader(tmp_path / "c")
    shard = tmp_path / "c/buckets/0/scale/c/0"
    shard.write_bytes(shard.read_bytes() + b"\0")
    wrote = r"sample 0 .*the file is \d+ bytes, stage 1 wrote \d+ .truncated or replaced.*delete .*c/0 "
    with pytest.raises(CacheError, match=wrote):
        reader.read(0)


def test_a_batch_is_read_in_place_and_collated_without_a_copy(tmp_path):
    write(tmp_path / "c", zstd_level=0)
    reader, ref = DirectReader(tmp_path / "c"), CacheReader(tmp_path / "c")
    ragged = {"text": 0, "prompt": 0}
    samples = reader.submit([6, 1, 3]).result()
    batch, want = collate(samples, ragged), collate([ref.read(i) for i in (6, 1, 3)], ragged)
    assert all(same(batch[k], want[k]) for k in want)
    assert batch["text"].shape == (3, 79, 6) and batch["text"].is_contiguous()
    assert batch["text"].data_ptr() == samples[0]["text"].data_ptr()  # the samples are its rows


def test_a_batch_buffer_is_reused_only_once_nothing_refers_to_it():
    pool = BufferPool()
    first = torch.from_numpy(pool.take(1000))
    row = first[10:20]  # a view keeps the buffer in use
    del first
    gc.collect()
    second = torch.from_numpy(pool.take(1000))
    assert second.data_ptr() != row.data_ptr() - 10
    start = row.data_ptr() - 10
    del row
    gc.collect()
    assert torch.from_numpy(pool.take(900)).data_ptr() == start  # free again: the same memory
    assert second.data_ptr() != start


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "a" / "file"
    write_file(path, [b"old"])
    with pytest.raises(TypeError):
        write_file(path, [b"new", object()])
    assert path.read_bytes() == b"old" and [p.name for p in path.parent.iterdir()] == ["file"]


def test_a_layout_autosplit_does_not_write_is_refused():
    meta = {
        "shape": [4, 8],
        "data_type": "uint16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 8]}},
        "fill_value": 0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
    }
    with pytest.raises(ShardError, match="not a sharded array"):
        layout_of(meta)
