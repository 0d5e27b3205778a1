"""Batch order (a pure function of seed and epoch), collation and the prefetching loader."""

from __future__ import annotations

import math
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autosplit.storage.loader import PrefetchLoader, collate, epoch_batches, epoch_order, shard_groups

# 23 samples in three shape buckets, unevenly filled
BUCKETS = [(64, 64) if i % 3 else (96, 64) for i in range(20)] + [(32, 32)] * 3


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


# --- epoch_batches ----------------------------------------------------------------------------


def test_epoch_batches_is_a_pure_function_of_seed_and_epoch():
    first = epoch_batches(BUCKETS, batch_size=4, seed=3, epoch=1, repeat=2)
    assert epoch_batches(BUCKETS, batch_size=4, seed=3, epoch=1, repeat=2) == first
    assert epoch_batches(BUCKETS, batch_size=4, seed=3, epoch=2, repeat=2) != first
    assert epoch_batches(BUCKETS, batch_size=4, seed=4, epoch=1, repeat=2) != first


def test_epoch_batches_golden_order():
    # frozen: a change here silently changes every run's data order and breaks resuming old runs
    # (changed on purpose in issue 4: shard permutation + shuffling within windows of shards)
    assert epoch_batches([0] * 8, batch_size=1, seed=0, epoch=0) == [[6], [4], [2], [7], [0], [5], [3], [1]]
    assert epoch_batches(["a", "b"] * 4, batch_size=2, seed=0, epoch=0) == [[5, 1], [4, 0], [7, 3], [6, 2]]
    assert epoch_batches([0] * 8, batch_size=1, seed=0, epoch=0, shard_size=2, window=2) == [
        [0],
        [4],
        [1],
        [5],
        [7],
        [2],
        [6],
        [3],
    ]


@pytest.mark.parametrize("repeat", [1, 2, 5])
def test_every_sample_appears_exactly_repeat_times(repeat):
    batches = epoch_batches(BUCKETS, batch_size=4, seed=0, epoch=0, repeat=repeat)
    assert Counter(flat(batches)) == {i: repeat for i in range(len(BUCKETS))}


@pytest.mark.parametrize("batch_size", [1, 3, 4, 100])
def test_batches_hold_one_bucket_and_respect_batch_size(batch_size):
    batches = epoch_batches(BUCKETS, batch_size=batch_size, seed=1, epoch=0, repeat=2)
    per_bucket = Counter()
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({BUCKETS[i] for i in batch}) == 1, batch
        per_bucket[BUCKETS[batch[0]]] += 1
    # only the last batch of each bucket may be short: as few batches as possible
    counts = Counter(BUCKETS)
    assert per_bucket == {b: math.ceil(2 * n / batch_size) for b, n in counts.items()}


def test_batches_are_ordered_by_their_first_sample_in_the_epoch_order():
    order = epoch_order(shard_groups(BUCKETS, 64), seed=5, epoch=0)
    batches = epoch_batches(BUCKETS, batch_size=3, seed=5, epoch=0)
    firsts = [order.index(b[0]) for b in batches]
    assert firsts == sorted(firsts)
    for b in batches:  # inside a batch, samples keep the epoch order
        assert [order.index(i) for i in b] == sorted(order.index(i) for i in b)


def test_shards_follow_the_cache_layout():
    from autosplit.storage.cache import make_buckets

    shards = shard_groups(BUCKETS, 4)
    cache_shards = [list(b.samples[lo:hi]) for b in make_buckets(BUCKETS) for lo, hi in b.shards(4)]
    assert shards == cache_shards
    assert sorted(i for s in shards for i in s) == list(range(len(BUCKETS)))


def test_windows_keep_reads_within_a_few_shards():
    buckets = [0] * 64
    shards = shard_groups(buckets, 4)  # 16 shards of 4
    order = epoch_order(shards, seed=1, epoch=0, window=2)
    shard_of = {i: k for k, s in enumerate(shards) for i in s}
    for lo in range(0, 64, 8):  # each run of 8 samples comes from exactly 2 shards
        assert len({shard_of[i] for i in order[lo : lo + 8]}) == 2
    assert sorted(order) == list(range(64))
    assert order != sorted(order)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_whole_shards_and_get_equal_batch_counts(world_size):
    shards = shard_groups(BUCKETS, 2)
    shard_of = {i: k for k, s in enumerate(shards) for i in s}
    per_rank = [
        epoch_batches(BUCKETS, batch_size=2, seed=4, epoch=1, shard_size=2, window=2, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) > 0
    owned = [{shard_of[i] for i in flat(b)} for b in per_rank]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not owned[a] & owned[b]
    seen = Counter(i for b in per_rank for i in flat(b))
    assert all(n == 1 for n in seen.values())  # no sample twice; a few may be dropped to even out ranks
    assert len(seen) >= len(BUCKETS) - world_size * 2 * 3


def test_two_rank_loaders_get_the_same_number_of_batches():
    loaders = [make_loader(shard_size=2, window=2, rank=r, world_size=2, repeat=1) for r in (0, 1)]
    got = [[indices(b) for b in loader.iter_epoch(0)] for loader in loaders]
    assert len(got[0]) == len(got[1]) == len(loaders[0]) == len(loaders[1])
    assert not set(flat(got[0])) & set(flat(got[1]))


def test_epoch_batches_of_an_empty_dataset():
    assert epoch_batches([], batch_size=2, seed=0, epoch=0, repeat=3) == []


@settings(max_examples=60, deadline=None)
@given(
    buckets=st.lists(st.sampled_from("abc"), max_size=30),
    batch_size=st.integers(1, 6),
    repeat=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 100),
)
def test_epoch_batches_invariants(buckets, batch_size, repeat, seed, epoch):
    batches = epoch_batches(buckets, batch_size=batch_size, seed=seed, epoch=epoch, repeat=repeat)
    assert Counter(flat(batches)) == {i: repeat for i in range(len(buckets))}
    assert all(1 <= len(b) <= batch_size and len({buckets[i] for i in b}) == 1 for b in batches)
    short = Counter(buckets[b[0]] for b in batches if len(b) < batch_size)
    assert all(n == 1 for n in short.values())  # at most one short batch per bucket


# --- aspect-ratio buckets ---------------------------------------------------------------------


def random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(w), int(h)) for w, h in rng.integers(48, 400, size=(n, 2))]


def bucketed(sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    from autosplit.data import aspect_buckets, nearest_bucket

    buckets = aspect_buckets(max_pixels=128 * 128, step=16, max_aspect=4)
    return [nearest_bucket(w, h, buckets) for w, h in sizes]


def full_fraction(batches: list[list[int]], batch_size: int) -> float:
    return sum(len(b) for b in batches if len(b) == batch_size) / sum(len(b) for b in batches)


@pytest.mark.parametrize("batch_size", [2, 4, 8])
def test_aspect_buckets_give_full_batches_per_bucket(batch_size):
    keys = bucketed(random_sizes(200))
    for epoch in range(3):
        batches = epoch_batches(keys, batch_size=batch_size, seed=0, epoch=epoch, shard_size=16, window=2)
        assert Counter(flat(batches)) == {i: 1 for i in range(200)}
        assert all(len({keys[i] for i in b}) == 1 for b in batches)  # one bucket per batch
        short = Counter(keys[b[0]] for b in batches if len(b) < batch_size)
        assert all(n == 1 for n in short.values())  # only a bucket's last batch of the epoch may be short
        assert full_fraction(batches, batch_size) >= 1 - len(set(keys)) * (batch_size - 1) / 200


def test_aspect_buckets_fill_batches_that_per_image_sizes_cannot():
    from autosplit.data import train_size

    sizes = random_sizes(200)
    own = [train_size(w, h, max_pixels=128 * 128, multiple=16) for w, h in sizes]
    keys = bucketed(sizes)
    assert len(set(keys)) <= 9 < len(set(own))
    bucketed_fill = full_fraction(epoch_batches(keys, batch_size=4, seed=0, epoch=0), 4)
    own_fill = full_fraction(epoch_batches(own, batch_size=4, seed=0, epoch=0), 4)
    assert bucketed_fill >= 0.9 and bucketed_fill > own_fill + 0.15  # 0.90 and 0.70 (51 sizes) here


def test_bucketed_epoch_order_is_a_pure_function_of_seed_and_epoch():
    keys = bucketed(random_sizes(200))
    first = epoch_batches(keys, batch_size=4, seed=3, epoch=1, shard_size=16)
    assert epoch_batches(list(keys), batch_size=4, seed=3, epoch=1, shard_size=16) == first
    assert epoch_batches(keys, batch_size=4, seed=3, epoch=2, shard_size=16) != first


@pytest.mark.parametrize("world_size", [2, 3])
def test_bucketed_ranks_get_equal_batch_counts_of_full_batches(world_size):
    keys = bucketed(random_sizes(200))
    per_rank = [
        epoch_batches(keys, batch_size=4, seed=1, epoch=0, shard_size=8, window=2, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) > 0
    seen = Counter(i for b in per_rank for i in flat(b))
    assert all(n == 1 for n in seen.values())
    for batches in per_rank:
        assert all(len({keys[i] for i in b}) == 1 for b in batches)


# --- collate ----------------------------------------------------------------------------------


def test_collate_stacks_tensors_and_pads_the_ragged_axis_with_zeros():
    a = {"latents": torch.ones(2, 2), "tokens": torch.tensor([1, 2, 3]), "mask": torch.ones(1, 3)}
    b = {"latents": torch.full((2, 2), 2.0), "tokens": torch.tensor([4]), "mask": torch.ones(1, 1)}
    batch = collate([a, b], {"tokens": 0, "mask": 1})
    assert torch.equal(batch["latents"], torch.stack([torch.ones(2, 2), torch.full((2, 2), 2.0)]))
    assert torch.equal(batch["tokens"], torch.tensor([[1, 2, 3], [4, 0, 0]]))
    assert torch.equal(batch["mask"], torch.tensor([[[1.0, 1.0, 1.0]], [[1.0, 0.0, 0.0]]]))
    assert batch["tokens"].dtype == torch.int64
    assert set(batch) == {"latents", "tokens", "mask"}


def test_collate_ragged_axis_of_equal_lengths_is_a_plain_stack():
    items = [{"x": torch.arange(3)}, {"x": torch.arange(3) + 10}]
    assert torch.equal(collate(items, {"x": 0})["x"], torch.tensor([[0, 1, 2], [10, 11, 12]]))


def test_collate_without_ragged_rejects_different_shapes():
    with pytest.raises(RuntimeError):
        collate([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}], {})


def test_collate_turns_non_tensors_into_lists():
    items = [
        {"prompt": "a cat", "image_path": Path("a.png"), "size": (64, 64), "x": torch.tensor(1.0)},
        {"prompt": "a dog", "image_path": Path("b.png"), "size": (96, 64), "x": torch.tensor(2.0)},
    ]
    batch = collate(items, {})
    assert batch["prompt"] == ["a cat", "a dog"]
    assert batch["image_path"] == [Path("a.png"), Path("b.png")]
    assert batch["size"] == [(64, 64), (96, 64)]
    assert torch.equal(batch["x"], torch.tensor([1.0, 2.0]))


# --- PrefetchLoader ---------------------------------------------------------------------------


def read_index(i: int) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor([i])}


def make_loader(read=read_index, *, seed=7, **kwargs) -> PrefetchLoader:
    options = dict(batch_size=3, repeat=2, num_workers=3, prefetch=2)
    options.update(kwargs)
    return PrefetchLoader(read, BUCKETS, make_batch=lambda samples: collate(samples, {}), seed=seed, **options)


def indices(batch) -> list[int]:
    return batch["x"].flatten().tolist()


def test_loader_yields_batches_in_epoch_batches_order():
    loader = make_loader()
    for epoch in (0, 1):
        expected = epoch_batches(BUCKETS, batch_size=3, seed=7, epoch=epoch, repeat=2)
        got = [indices(b) for b in loader.iter_epoch(epoch)]
        assert got == expected
        assert loader.state_dict() == {
            "seed": 7,
            "epoch": epoch,
            "position": len(expected),
            "batch_size": 3,
            "repeat": 2,
            "num_samples": len(BUCKETS),
            "world_size": 1,
            "history": [],
        }
    assert len(loader) == len(epoch_batches(BUCKETS, batch_size=3, seed=7, epoch=1, repeat=2))


def test_loader_batches_have_the_collated_shape():
    batch = next(iter(make_loader(batch_size=4, repeat=1).iter_epoch(0)))
    assert batch["x"].shape[1] == 1 and 1 <= batch["x"].shape[0] <= 4


def test_loader_reads_samples_in_background_threads():
    names, lock = set(), threading.Lock()

    def read(i):
        with lock:
            names.add(threading.current_thread().name)
        return read_index(i)

    list(make_loader(read).iter_epoch(0))
    assert names
    assert all(name.startswith("autosplit-read") for name in names), names
    assert threading.main_thread().name not in names


def test_loader_reraises_a_worker_error_at_its_batch():
    def read(i):
        if i == 13:
            raise RuntimeError("cannot read sample 13")
        return read_index(i)

    expected = epoch_batches(BUCKETS, batch_size=3, seed=7, epoch=0, repeat=2)
    failing = next(k for k, b in enumerate(expected) if 13 in b)
    loader = make_loader(read)
    got = []
    with pytest.raises(RuntimeError, match="cannot read sample 13"):
        for batch in loader.iter_epoch(0):
            got.append(indices(batch))
    assert got == expected[:failing]
    assert loader.state_dict()["position"] == failing


def test_loader_reraises_a_make_batch_error():
    def make_batch(samples):
        raise ValueError("bad batch")

    loader = PrefetchLoader(read_index, BUCKETS, make_batch=make_batch, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="bad batch"):
        list(loader.iter_epoch(0))


@pytest.mark.parametrize("consumed", [0, 1, 5, 15, 16])
def test_resume_continues_exactly_the_remaining_sequence(consumed):
    epoch = 1
    uninterrupted = [indices(b) for b in make_loader().iter_epoch(epoch)]
    assert len(uninterrupted) == 16  # 26 draws of (64,64), 14 of (96,64), 6 of (32,32): 9 + 5 + 2 batches

    first = make_loader()
    it = first.iter_epoch(epoch)
    head = [indices(next(it)) for _ in range(consumed)]
    state = first.state_dict()
    it.close()
    assert (state["seed"], state["position"]) == (7, consumed)
    if consumed:  # an epoch whose generator never started has not moved the state yet
        assert state["epoch"] == epoch

    second = make_loader()
    second.load_state_dict(state)
    tail = [indices(b) for b in second.iter_epoch(epoch)]
    assert head + tail == uninterrupted
    assert tail == uninterrupted[consumed:]
    # the next epoch after the resumed one starts from its beginning
    assert [indices(b) for b in second.iter_epoch(epoch + 1)] == [indices(b) for b in make_loader().iter_epoch(2)]


def test_iterating_another_epoch_resets_the_position():
    loader = make_loader()
    loader.load_state_dict({"seed": 7, "epoch": 0, "position": 4})
    assert [indices(b) for b in loader.iter_epoch(3)] == epoch_batches(BUCKETS, batch_size=3, seed=7, epoch=3, repeat=2)


def test_load_state_dict_rejects_a_different_seed():
    loader = make_loader(seed=2)
    with pytest.raises(ValueError, match="loader state was saved with seed 1, this loader uses 2"):
        loader.load_state_dict({"seed": 1, "epoch": 0, "position": 3})
    assert (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (0, 0)  # unchanged


@pytest.mark.parametrize("key, value", [("batch_size", 4), ("repeat", 1), ("num_samples", 5)])
def test_load_state_dict_rejects_another_sequence(key, value):
    loader = make_loader()
    state = {**loader.state_dict(), key: value, "position": 3}
    with pytest.raises(ValueError, match=f"loader state was saved with {key} {value}"):
        loader.load_state_dict(state)
    assert loader.state_dict()["position"] == 0


def test_abandoning_an_epoch_early_stops_the_background_threads():
    before = {t.ident for t in threading.enumerate()}
    loader = make_loader(prefetch=1)
    it = loader.iter_epoch(0)
    next(it)
    it.close()
    leftover = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert leftover == []
    assert loader.state_dict()["position"] == 1


# --- resuming on another number of processes ---------------------------------------------------


def run_stretch(loaders: list[PrefetchLoader], epoch: int, steps: int | None) -> list[list[int]]:
    """Advance every rank's loader by `steps` batches (all of them: None), as DDP ranks do in lock step."""
    seen = []
    for loader in loaders:
        for n, batch in enumerate(loader.iter_epoch(epoch)):
            seen.append(indices(batch))
            if steps is not None and n + 1 == steps:
                break
    return seen


def world(size: int, state=None, **kwargs) -> list[PrefetchLoader]:
    loaders = [make_loader(rank=r, world_size=size, shard_size=2, **kwargs) for r in range(size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    return loaders


@pytest.mark.parametrize("sizes", [(2, 1), (1, 2), (3, 2), (2, 3, 1)])
def test_changing_the_world_size_mid_epoch_finishes_the_epoch_without_repeats(sizes):
    full = [i for r in range(sizes[0]) for b in world(sizes[0])[r].batches(0) for i in b]
    seen, state = [], None
    for size in sizes[:-1]:
        loaders = world(size, state)
        seen += run_stretch(loaders, 0, 2)
        state = loaders[0].state_dict()
        assert all(lo.state_dict() == state for lo in loaders)  # ranks agree, so rank 0's state is the run's
    last = world(sizes[-1], state)
    seen += run_stretch(last, 0, None)
    consumed = flat(seen)
    assert not [i for i, n in Counter(consumed).items() if n > Counter(full)[i]]  # nothing seen twice
    dropped = Counter(full) - Counter(consumed)  # at most the batches cut so that every rank has as many
    assert sum(dropped.values()) <= sum(s - 1 for s in sizes[1:]) * 3
    # the next epoch is the normal order for the new world size, whatever happened before
    nxt = run_stretch(last, 1, None)
    assert nxt == [b for r in range(sizes[-1]) for b in world(sizes[-1])[r].batches(1)]


def test_the_same_world_size_resumes_the_exact_sequence_even_after_a_change():
    two = world(2)
    run_stretch(two, 0, 1)
    one = world(1, two[0].state_dict())
    run_stretch(one, 0, 2)
    state = one[0].state_dict()
    assert state["history"] == [[2, 1]] and state["world_size"] == 1
    rest = run_stretch(one, 0, None)
    again = run_stretch(world(1, state), 0, None)
    assert again == rest


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 6), st.integers(1, 4))
@settings(max_examples=40, deadline=None)
def test_remainder_is_exactly_the_unreached_batches(old, new, done, batch_size):
    from autosplit.storage.loader import deal, remaining_batches

    kw = dict(batch_size=batch_size, seed=5, epoch=0, repeat=2, shard_size=2, window=2)
    per_rank = [epoch_batches(BUCKETS, rank=r, world_size=old, **kw) for r in range(old)]
    done = min(done, len(per_rank[0]))
    left = remaining_batches(BUCKETS, history=[[old, done]], **kw)
    assert sorted(left) == sorted(b for batches in per_rank for b in batches[done:])
    dealt = [deal(left, rank=r, world_size=new) for r in range(new)]
    assert len({len(d) for d in dealt}) == 1 and len(left) - sum(map(len, dealt)) < new


def test_dataset_sources_round_trip_through_the_cache_encoding():
    from autosplit.storage.codec import decode_sources, encode_source
    from autosplit.storage.loader import collate

    samples = [
        {"prompt": "a red circle", "sample_id": 3, "image_size": (64, 48), "cfg_scale": 1.5},
        {"prompt": "ünïcode ✓", "sample_id": 11, "image_size": (32, 32), "cfg_scale": 4.0},
        {"prompt": "", "sample_id": 0, "image_size": (16, 16), "cfg_scale": 0.0},
    ]
    encoded = [{k: encode_source(v) for k, v in s.items()} for s in samples]
    batch = decode_sources(collate(encoded, {"prompt": 0}), ["prompt", "sample_id", "image_size", "cfg_scale"])
    assert batch == {k: [s[k] for s in samples] for k in samples[0]}
