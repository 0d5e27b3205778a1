"""Batch order and the prefetching loader.

The order of an epoch is a pure function of (seed, epoch): a seeded permutation of the shards
(groups of `shard_size` samples of one shape bucket, as the cache stores them), samples shuffled
inside windows of a few shards, `repeat` times over, then batches formed inside shape buckets:
each bucket fills its batch in epoch order and a batch is cut when full, so only a bucket's last
batch of an epoch may be short (with aspect-ratio buckets, `data.buckets = "aspect"`, images of
different sizes share buckets and so fill batches). Split and unsplit runs use the
same order, which is what lets them learn the same weights. The loader reads and collates
batches in background threads into a bounded queue, ahead of the trainer; its state is
(epoch, batches consumed, world size), so a resumed run continues the same sequence.

A run resumed on another number of processes finishes the interrupted epoch with the batches the
old ranks had not reached yet, dealt round-robin to the new ranks (`remaining_batches`), so no
sample of that epoch is seen twice; later epochs split the full order over the new ranks.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch


def shard_groups(bucket_of: Sequence[Hashable], shard_size: int) -> list[list[int]]:
    """The samples of each shard, as the cache lays them out: buckets in first-seen order, samples
    in index order, `shard_size` per shard. Unsplit runs (no cache) use the same grouping."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(bucket_of):
        groups.setdefault(key, []).append(i)
    return [idx[lo : lo + shard_size] for idx in groups.values() for lo in range(0, len(idx), shard_size)]


def epoch_order(
    shards: list[list[int]],
    *,
    seed: int,
    epoch: int,
    repeat: int = 1,
    window: int = 4,
    rank: int = 0,
    world_size: int = 1,
) -> list[int]:
    """The sample order of one epoch on one rank: for each repeat, a seeded permutation of the shards
    (the same on every rank), rank r taking every world_size-th shard, then samples shuffled inside
    windows of `window` consecutive shards. Reads stay within a few shards at a time."""
    order: list[int] = []
    for r in range(repeat):
        perm = np.random.default_rng(np.random.SeedSequence([seed, epoch, r])).permutation(len(shards))
        mine = perm[rank::world_size]
        shuffle = np.random.default_rng(np.random.SeedSequence([seed, epoch, r, rank + 1]))
        for lo in range(0, len(mine), window):
            samples = [i for s in mine[lo : lo + window] for i in shards[s]]
            order += [samples[j] for j in shuffle.permutation(len(samples))]
    return order


def _batches_of(order: list[int], bucket_of: Sequence[Hashable], batch_size: int) -> list[list[int]]:
    open_batches: dict[Hashable, list[int]] = {}
    batches: list[list[int]] = []  # in order of their first sample
    for i in order:
        key = bucket_of[i]
        batch = open_batches.setdefault(key, [])
        if not batch:
            batches.append(batch)
        batch.append(i)
        if len(batch) == batch_size:
            del open_batches[key]
    return batches


def epoch_batches(
    bucket_of: Sequence[Hashable],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    repeat: int = 1,
    shard_size: int = 64,
    window: int = 4,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """The batches (lists of sample indices) of one epoch on `rank`; each batch holds one shape bucket.

    A pure function of its arguments. Every rank gets the same number of batches: ranks with more
    drop their last ones (a different few each epoch, as the shard permutation changes).
    """
    shards = shard_groups(bucket_of, shard_size)

    def of_rank(r: int) -> list[list[int]]:
        order = epoch_order(shards, seed=seed, epoch=epoch, repeat=repeat, window=window, rank=r, world_size=world_size)
        return _batches_of(order, bucket_of, batch_size)

    mine = of_rank(rank)
    if world_size > 1:
        mine = mine[: min(len(of_rank(r)) for r in range(world_size))]
    return mine


def remaining_batches(
    bucket_of: Sequence[Hashable],
    *,
    history: Sequence[Sequence[int]],
    batch_size: int,
    seed: int,
    epoch: int,
    repeat: int = 1,
    shard_size: int = 64,
    window: int = 4,
) -> list[list[int]]:
    """The batches of `epoch` no rank had reached when the world size last changed, in a global order.

    `history` lists the (world_size, batches consumed per rank) of each stretch of the epoch run
    before the latest change, oldest first. The first stretch ran the epoch's normal batches
    (`epoch_batches`); each later one ran the remainder of the one before, dealt as `deal` does.
    The remainder interleaves the ranks' unreached batches (rank 0's next, rank 1's next, ...).
    """
    (world, done), *later = history
    per_rank = [
        epoch_batches(
            bucket_of,
            batch_size=batch_size,
            seed=seed,
            epoch=epoch,
            repeat=repeat,
            shard_size=shard_size,
            window=window,
            rank=r,
            world_size=world,
        )
        for r in range(world)
    ]
    left = _interleave([b[done:] for b in per_rank])
    for world, done in later:
        left = _interleave([deal(left, rank=r, world_size=world)[done:] for r in range(world)])
    return left


def deal(batches: list[list[int]], *, rank: int, world_size: int) -> list[list[int]]:
    """Rank `rank`'s share of `batches`: every world_size-th one, all ranks cut to the same count
    (the last `len(batches) % world_size` batches are dropped, as DDP needs equal counts)."""
    return batches[rank::world_size][: len(batches) // world_size]


def _interleave(per_rank: list[list[list[int]]]) -> list[list[int]]:
    return [b for group in zip(*per_rank) for b in group]


class RowsOfBatch(list):
    """Samples a reader read straight into the rows of batch tensors: `whole[name]` is what
    `collate` would make of the samples' `name` (stacked; ragged values zero-padded to the longest),
    so it takes it as it is instead of copying every row again."""

    def __init__(self, samples: Sequence[Mapping[str, Any]], whole: Mapping[str, torch.Tensor]):
        super().__init__(samples)
        self.whole = dict(whole)


def collate(samples: list[Mapping[str, Any]], ragged: Mapping[str, int]) -> dict[str, Any]:
    """Stack per-sample values into a batch; ragged values are zero-padded to the longest.

    Non-tensor values (paths, prompts, sizes) become lists. Samples read into one batch already
    (`RowsOfBatch`) give their batch tensors unchanged.
    """
    batch: dict[str, Any] = {}
    whole = samples.whole if isinstance(samples, RowsOfBatch) else {}
    for name in samples[0]:
        if name in whole:
            batch[name] = whole[name]
            continue
        items = [s[name] for s in samples]
        if not isinstance(items[0], torch.Tensor):
            batch[name] = items
            continue
        axis = ragged.get(name)
        if axis is not None:
            longest = max(t.shape[axis] for t in items)
            items = [_pad_axis(t, axis, longest) for t in items]
        batch[name] = torch.stack(items)
    return batch


def _pad_axis(t: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    missing = length - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=axis)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    pin = device.type == "cuda"
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            staged = pin and value.device.type == "cpu"  # an unsplit run computes its batch on the GPU already
            value = (value.pin_memory() if staged else value).to(device, non_blocking=staged)
        out[name] = value
    return out


class PrefetchLoader:
    """Reads batches ahead of the trainer into a bounded queue.

    `read_sample(i)` returns one sample's values; `make_batch(samples)` collates them. Reads run on
    `num_workers` threads with `prefetch` batches submitted ahead; a reader with its own async reads
    (tensorstore) passes `submit_batch(indices)`, returning an object whose `result()` is the list of
    samples, and keeps its reads in flight itself. With `pin_memory`, batches are pinned in the
    background so the copy to the GPU can be `non_blocking`. Errors in a worker are re-raised in
    the trainer's thread at the batch where they happened.
    """

    def __init__(
        self,
        read_sample: Callable[[int], Mapping[str, Any]],
        bucket_of: Sequence[Hashable],
        *,
        make_batch: Callable[[list[Mapping[str, Any]]], Any],
        batch_size: int,
        seed: int,
        repeat: int = 1,
        num_workers: int = 2,
        prefetch: int = 4,
        shard_size: int = 64,
        window: int = 4,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        submit_batch: Callable[[list[int]], Any] | None = None,
    ):
        self.read_sample, self.bucket_of, self.make_batch = read_sample, list(bucket_of), make_batch
        self.batch_size, self.seed, self.repeat = batch_size, seed, repeat
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory
        self.shard_size, self.window, self.rank, self.world_size = shard_size, window, rank, world_size
        self.submit_batch = submit_batch
        self.epoch, self.position = 0, 0
        #: (world_size, position) of each stretch of the current epoch run on another world size
        self.history: list[list[int]] = []
        #: the sample indices of the batch last yielded
        self.current: list[int] = []

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch` (of its remainder, if the world size changed during it)."""
        kwargs = dict(
            batch_size=self.batch_size,
            seed=self.seed,
            epoch=epoch,
            repeat=self.repeat,
            shard_size=self.shard_size,
            window=self.window,
        )
        if self.history and epoch == self.epoch:
            left = remaining_batches(self.bucket_of, history=self.history, **kwargs)
            return deal(left, rank=self.rank, world_size=self.world_size)
        return epoch_batches(self.bucket_of, rank=self.rank, world_size=self.world_size, **kwargs)

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "repeat": self.repeat,
            "num_samples": len(self.bucket_of),
            "world_size": self.world_size,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state`; raises ValueError if it was saved for another sequence.

        Saved on another world size mid-epoch, the rest of that epoch is the batches no old rank
        reached (see `remaining_batches`), dealt to this loader's ranks.
        """
        mine = self.state_dict()
        for key in ("seed", "batch_size", "repeat", "num_samples"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"loader state was saved with {key} {state[key]}, this loader uses {mine[key]}")
        self.epoch, self.position = state["epoch"], state["position"]
        self.history = [list(h) for h in state.get("history", [])]
        saved_world = state.get("world_size", self.world_size)
        if saved_world != self.world_size:
            self.history.append([saved_world, self.position])
            self.position = 0

    def _load(self, pending: Any) -> Any:
        samples = pending.result()
        batch = self.make_batch(samples if isinstance(samples, list) else list(samples))
        if self.pin_memory and isinstance(batch, dict):
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def _produce(self, todo: list[list[int]], ready: queue.Queue, stop: threading.Event) -> None:
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="autosplit-read") as pool:

            def submit(indices: list[int]) -> Any:
                if self.submit_batch is not None:
                    return self.submit_batch(indices)
                return _Gather([pool.submit(self.read_sample, i) for i in indices])

            pending: collections.deque = collections.deque()
            upcoming = iter(todo)
            while not stop.is_set():
                for indices in upcoming:  # keep `prefetch` batches in flight
                    pending.append(submit(indices))
                    if len(pending) >= self.prefetch:
                        break
                if not pending:
                    return
                try:
                    item = ("ok", self._load(pending.popleft()))
                except BaseException as exc:  # handed to the consumer, which re-raises it
                    item = ("error", exc)
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[0] == "error":
                    stop.set()
            for p in pending:
                getattr(p, "cancel", lambda: None)()

    def iter_epoch(self, epoch: int) -> Iterator[Any]:
        """Yield the batches of `epoch`, starting at the saved position if resuming that epoch."""
        if epoch != self.epoch:
            self.epoch, self.position, self.history = epoch, 0, []
        todo = self.batches(epoch)[self.position :]
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._produce, args=(todo, ready, stop), name="autosplit-prefetch", daemon=True
        )
        thread.start()
        try:
            for indices in todo:
                kind, item = ready.get()
                if kind == "error":
                    raise item
                self.position += 1
                self.current = indices
                yield item
        finally:
            stop.set()
            thread.join()


class _Gather:
    """The results of per-sample futures, in order."""

    def __init__(self, futures: list[Any]):
        self.futures = futures

    def result(self) -> list[Any]:
        return [f.result() for f in self.futures]

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()
