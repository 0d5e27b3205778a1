"""The Zarr cache: bit-exact round trips, buckets, ragged values, manifest and completion."""

from __future__ import annotations

import hashlib

import pytest
import torch
import zarr

from autosplit.errors import CacheError
from autosplit.plan import CachedValue, Plan, UnitPlacement
from autosplit.storage.cache import (
    CACHE_FORMAT_VERSION,
    CacheReader,
    CacheWriter,
    cache_status,
    make_buckets,
    read_manifest,
)
from autosplit.storage.readers import DirectReader, TensorStoreReader

PLAN = Plan(
    pipeline="t",
    task="sft",
    split=True,
    trainable=("transformer",),
    units=(UnitPlacement("encode", 1, "stage 1"), UnitPlacement("loss", 2, "stage 2")),
    cached=(
        CachedValue("latents", "encode"),
        CachedValue("text", "encode", ragged_axis=0, max_len=200),
        CachedValue("scale", "encode"),
    ),
)


def sample(i: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "latents": torch.randn(4, *size, generator=g).to(torch.bfloat16),
        "text": torch.randn(3 + 5 * i, 8, generator=g),
        "scale": torch.tensor(float(i), dtype=torch.float64),
    }


SIZES = [(2, 3), (4, 4), (2, 3), (2, 3), (4, 4)]


def write(path, *, shard_size=2, key=None, upto=None) -> CacheWriter:
    buckets = make_buckets(SIZES)
    sha = [hashlib.sha256(str(i).encode()).digest() for i in range(len(SIZES))]
    writer = CacheWriter(
        path,
        plan=PLAN,
        buckets=buckets,
        key=key or {"plan": PLAN_DICT},
        shard_size=shard_size,
        zstd_level=1,
        source_sha256=sha,
    )
    done = 0
    for bucket in buckets:
        for shard, (lo, hi) in enumerate(bucket.shards(shard_size)):
            if upto is not None and done >= upto:
                return writer
            if not writer.shard_done(bucket.id, shard):
                writer.write_shard(bucket, shard, [sample(i, SIZES[i]) for i in bucket.samples[lo:hi]])
            done += 1
    writer.finish()
    return writer


PLAN_DICT = __import__("json").loads(PLAN.to_json())


def test_buckets_group_by_shape_in_first_seen_order():
    buckets = make_buckets(SIZES)
    assert [(b.key, b.samples) for b in buckets] == [((2, 3), (0, 2, 3)), ((4, 4), (1, 4))]
    assert buckets[0].shards(2) == [(0, 2), (2, 3)]


def test_round_trip_is_bit_exact_including_bf16_specials(tmp_path):
    write(tmp_path / "c")
    reader = CacheReader(tmp_path / "c")
    assert len(reader) == 5 and reader.bucket_keys == [0, 1, 0, 0, 1]
    for i, size in enumerate(SIZES):
        got, want = reader.read(i), sample(i, size)
        assert got["latents"].dtype == torch.bfloat16
        assert torch.equal(got["latents"].view(torch.uint16), want["latents"].view(torch.uint16))
        assert torch.equal(got["text"], want["text"]) and got["text"].shape == (3 + 5 * i, 8)
        assert got["scale"].dtype == torch.float64 and got["scale"].item() == i


def test_bf16_specials(tmp_path):
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.0e38], dtype=torch.bfloat16).view(
        torch.uint16
    )
    special[0] = 0x7FC1  # a NaN with a payload
    plan = Plan("t", "sft", True, (), (UnitPlacement("e", 1, "r"),), (CachedValue("x", "e"),))
    writer = CacheWriter(
        tmp_path / "s",
        plan=plan,
        buckets=make_buckets([(6,)]),
        key={"k": 1},
        shard_size=1,
        zstd_level=1,
        source_sha256=[b"\0" * 32],
    )
    writer.write_shard(writer.buckets[0], 0, [{"x": special.view(torch.bfloat16)}])
    writer.finish()
    assert torch.equal(CacheReader(tmp_path / "s").read(0)["x"].view(torch.uint16), special)


def test_layout_is_plain_sharded_zarr(tmp_path):
    write(tmp_path / "c")
    group = zarr.open_group(str(tmp_path / "c"), mode="r")
    text = group["buckets/0/text"]
    assert text.shape == (3, 256, 8) and text.shards == (2, 256, 8) and text.chunks == (1, 64, 8)
    assert group["buckets/0/latents"].dtype == "uint16" and group["buckets/0/latents"].attrs["dtype"] == "bfloat16"
    assert [c.__class__.__name__ for c in text.compressors] == ["ZstdCodec", "Crc32cCodec"]
    assert list(group["buckets/0/text.length"][...]) == [3, 13, 18]
    assert group["index/source_sha256"].shape == (5, 32)


def test_incomplete_cache_is_refused_and_resumes(tmp_path):
    writer = write(tmp_path / "c", upto=2)
    assert cache_status(tmp_path / "c") == "incomplete"
    assert writer.done_shards() == [[0, 0], [0, 1]]
    with pytest.raises(CacheError, match=r"cache is incomplete .2 shards written.; re-run stage 1"):
        CacheReader(tmp_path / "c")
    write(tmp_path / "c")  # same key: keeps the written shards, writes the rest
    assert cache_status(tmp_path / "c") == "complete"
    assert torch.equal(CacheReader(tmp_path / "c").read(3)["text"], sample(3, SIZES[3])["text"])


def test_other_key_is_refused_naming_what_changed(tmp_path):
    write(tmp_path / "c")
    with pytest.raises(CacheError, match=r"other settings .changed: max_pixels.; delete it"):
        write(tmp_path / "c", key={"plan": PLAN_DICT, "max_pixels": 5})
    assert cache_status(tmp_path / "c") == "complete"


def test_finish_refuses_missing_shards(tmp_path):
    writer = write(tmp_path / "c", upto=1)
    with pytest.raises(CacheError, match="1 of 3 shards written"):
        writer.finish()
    assert cache_status(tmp_path / "c") == "incomplete"


def test_text_longer_than_its_cap_is_refused(tmp_path):
    plan = Plan("t", "sft", True, (), (UnitPlacement("e", 1, "r"),), (CachedValue("t", "e", 0, 4),))
    writer = CacheWriter(
        tmp_path / "s",
        plan=plan,
        buckets=make_buckets([()]),
        key={},
        shard_size=1,
        zstd_level=1,
        source_sha256=[b"\0" * 32],
    )
    with pytest.raises(CacheError, match="has 5 tokens, above its cap 4"):
        writer.write_shard(writer.buckets[0], 0, [{"t": torch.zeros(5, 2)}])


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="not an autosplit cache"):
        CacheReader(tmp_path)
    assert cache_status(tmp_path) == "missing"


# --- the manifest's record of every array: checked on open --------------------------------------


def test_manifest_records_every_array_and_every_file_exists_even_of_zeros(tmp_path):
    write(tmp_path / "c", shard_size=1)  # sample 0's scale is 0.0: a shard of only the fill value
    records = read_manifest(tmp_path / "c")["arrays"]
    assert sorted(records) == sorted(
        ["index/bucket", "index/row", "index/source_sha256", "index/shard_done"]
        + [f"buckets/{b}/{name}" for b in (0, 1) for name in ("latents", "text", "text.length", "scale")]
    )
    scale = records["buckets/0/scale"]
    assert (scale["shape"], scale["dtype"], scale["file_shape"]) == ([3], "float64", [1])
    assert (tmp_path / "c/buckets/0/scale/c/0").stat().st_size == scale["file_bytes"][0] > 0
    assert records["buckets/0/text"]["file_bytes"] == [
        (tmp_path / f"c/buckets/0/text/c/{k}/0/0").stat().st_size for k in range(3)
    ]
    assert CacheReader(tmp_path / "c").read(0)["scale"].item() == 0.0


@pytest.mark.parametrize("reader", [CacheReader, TensorStoreReader, DirectReader])
def test_a_missing_shard_is_refused_and_stage1_writes_only_it_again(tmp_path, monkeypatch, reader):
    write(tmp_path / "c")
    (tmp_path / "c/buckets/0/text/c/1/0/0").unlink()  # zarr would read it as zeros
    with pytest.raises(
        CacheError,
        match=r"array buckets/0/text: its file c/1/0/0 is missing; it holds sample 3 "
        r"\(row 2\); re-run stage 1 .*which writes only the missing shards again",
    ):
        reader(tmp_path / "c")
    written, real = [], CacheWriter.write_shard
    monkeypatch.setattr(
        CacheWriter,
        "write_shard",
        lambda self, bucket, shard, outputs: (written.append((bucket.id, shard)), real(self, bucket, shard, outputs)),
    )
    write(tmp_path / "c")
    assert written == [(0, 1)] and cache_status(tmp_path / "c") == "complete"
    assert torch.equal(reader(tmp_path / "c").read(3)["text"], sample(3, SIZES[3])["text"])


def test_a_truncated_shard_is_refused_at_open_naming_its_size(tmp_path):
    write(tmp_path / "c")
    shard = tmp_path / "c/buckets/1/latents/c/0/0/0/0"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(
        CacheError,
        match=rf"array buckets/1/latents: its file c/0/0/0/0 is 10 bytes, stage 1 wrote "
        rf"{size} .truncated or replaced.; it holds samples 1, 4 .rows 0, 1.",
    ):
        CacheReader(tmp_path / "c")


def test_a_cache_of_another_format_is_refused_naming_the_fix(tmp_path):
    write(tmp_path / "c")
    group = zarr.open_group(str(tmp_path / "c"), mode="a")
    group.attrs["autosplit"] = {**group.attrs["autosplit"], "format_version": 2}
    with pytest.raises(
        CacheError, match=f"cache format 2 is not {CACHE_FORMAT_VERSION} .*; delete .* and re-run stage 1"
    ):
        CacheReader(tmp_path / "c")
    with pytest.raises(
        CacheError, match=f"a cache of format 2, this autosplit writes format {CACHE_FORMAT_VERSION}; delete"
    ):
        write(tmp_path / "c")


def test_a_damaged_manifest_is_a_cache_error(tmp_path):
    write(tmp_path / "c")
    meta = tmp_path / "c/zarr.json"
    meta.write_bytes(meta.read_bytes()[:200])
    for open_it in (CacheReader, cache_status, write):
        with pytest.raises(CacheError, match=r"zarr.json is not valid JSON .*the cache's manifest is damaged; delete"):
            open_it(tmp_path / "c")
