"""The Zarr cache: bit-exact round trips, buckets, ragged values, manifest and completion."""

from __future__ import annotations

import hashlib

import pytest
import torch
import zarr

from autosplit.cache import CacheReader, CacheWriter, cache_status, make_buckets
from autosplit.errors import CacheError
from autosplit.planner import CachedValue, Plan, UnitPlacement

PLAN = Plan(pipeline="t", task="sft", split=True, trainable=("transformer",),
            units=(UnitPlacement("encode", 1, "stage 1"), UnitPlacement("loss", 2, "stage 2")),
            cached=(CachedValue("latents", "encode"), CachedValue("text", "encode", ragged_axis=0, max_len=200),
                    CachedValue("scale", "encode")))


def sample(i: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"latents": torch.randn(4, *size, generator=g).to(torch.bfloat16),
            "text": torch.randn(3 + 5 * i, 8, generator=g),
            "scale": torch.tensor(float(i), dtype=torch.float64)}


SIZES = [(2, 3), (4, 4), (2, 3), (2, 3), (4, 4)]


def write(path, *, shard_size=2, key=None, upto=None) -> CacheWriter:
    buckets = make_buckets(SIZES)
    sha = [hashlib.sha256(str(i).encode()).digest() for i in range(len(SIZES))]
    writer = CacheWriter(path, plan=PLAN, buckets=buckets, key=key or {"plan": PLAN_DICT}, shard_size=shard_size,
                         zstd_level=1, source_sha256=sha)
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
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.0e38],
                           dtype=torch.bfloat16).view(torch.uint16)
    special[0] = 0x7FC1  # a NaN with a payload
    plan = Plan("t", "sft", True, (), (UnitPlacement("e", 1, "r"),), (CachedValue("x", "e"),))
    writer = CacheWriter(tmp_path / "s", plan=plan, buckets=make_buckets([(6,)]), key={"k": 1}, shard_size=1,
                         zstd_level=1, source_sha256=[b"\0" * 32])
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
    with pytest.raises(CacheError, match="cache is incomplete .2 shards written.; re-run stage 1"):
        CacheReader(tmp_path / "c")
    write(tmp_path / "c")  # same key: keeps the written shards, writes the rest
    assert cache_status(tmp_path / "c") == "complete"
    assert torch.equal(CacheReader(tmp_path / "c").read(3)["text"], sample(3, SIZES[3])["text"])


def test_other_key_is_refused_naming_what_changed(tmp_path):
    write(tmp_path / "c")
    with pytest.raises(CacheError, match="other settings .changed: max_pixels.; delete it"):
        write(tmp_path / "c", key={"plan": PLAN_DICT, "max_pixels": 5})
    assert cache_status(tmp_path / "c") == "complete"


def test_finish_refuses_missing_shards(tmp_path):
    writer = write(tmp_path / "c", upto=1)
    with pytest.raises(CacheError, match="1 of 3 shards written"):
        writer.finish()
    assert cache_status(tmp_path / "c") == "incomplete"


def test_text_longer_than_its_cap_is_refused(tmp_path):
    plan = Plan("t", "sft", True, (), (UnitPlacement("e", 1, "r"),), (CachedValue("t", "e", 0, 4),))
    writer = CacheWriter(tmp_path / "s", plan=plan, buckets=make_buckets([()]), key={}, shard_size=1,
                         zstd_level=1, source_sha256=[b"\0" * 32])
    with pytest.raises(CacheError, match="has 5 tokens, above its cap 4"):
        writer.write_shard(writer.buckets[0], 0, [{"t": torch.zeros(5, 2)}])


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="not an autosplit cache"):
        CacheReader(tmp_path)
    assert cache_status(tmp_path) == "missing"
