"""Batch order and the prefetching loader.

The order of an epoch is a pure function of (seed, epoch): a seeded permutation of the samples
(`repeat` times over), then batches formed inside shape buckets. Split and unsplit runs use the
same order, which is what lets them learn the same weights. The loader reads and collates
batches in background threads into a bounded queue, ahead of the trainer; its state is
(epoch, batches consumed), so a resumed run continues the same sequence.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch


def epoch_batches(bucket_of: Sequence[Hashable], *, batch_size: int, seed: int, epoch: int,
                  repeat: int = 1) -> list[list[int]]:
    """The batches (lists of sample indices) of one epoch; each batch holds one shape bucket."""
    n = len(bucket_of)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    order = np.concatenate([rng.permutation(n) for _ in range(repeat)]) if n else np.zeros(0, np.int64)
    open_batches: dict[Hashable, list[int]] = {}
    batches: list[tuple[int, list[int]]] = []  # (position of first sample, batch)
    for pos, i in enumerate(order.tolist()):
        key = bucket_of[i]
        batch = open_batches.setdefault(key, [])
        if not batch:
            batches.append((pos, batch))
        batch.append(i)
        if len(batch) == batch_size:
            del open_batches[key]
    return [b for _, b in sorted(batches, key=lambda item: item[0])]


def collate(samples: list[Mapping[str, Any]], ragged: Mapping[str, int]) -> dict[str, Any]:
    """Stack per-sample values into a batch; ragged values are zero-padded to the longest.

    Non-tensor values (paths, prompts, sizes) become lists.
    """
    batch: dict[str, Any] = {}
    for name in samples[0]:
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
            value = (value.pin_memory() if pin else value).to(device, non_blocking=pin)
        out[name] = value
    return out


class PrefetchLoader:
    """Reads batches ahead of the trainer with `num_workers` threads into a bounded queue.

    `read_sample(i)` returns one sample's values; `make_batch(samples)` collates them. Errors in
    a worker are re-raised in the trainer's thread at the batch where they happened.
    """

    def __init__(self, read_sample: Callable[[int], Mapping[str, Any]], bucket_of: Sequence[Hashable], *,
                 make_batch: Callable[[list[Mapping[str, Any]]], Any], batch_size: int, seed: int,
                 repeat: int = 1, num_workers: int = 2, prefetch: int = 4):
        self.read_sample, self.bucket_of, self.make_batch = read_sample, list(bucket_of), make_batch
        self.batch_size, self.seed, self.repeat = batch_size, seed, repeat
        self.num_workers, self.prefetch = num_workers, prefetch
        self.epoch, self.position = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.bucket_of, batch_size=self.batch_size, seed=self.seed, epoch=epoch,
                             repeat=self.repeat)

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                "repeat": self.repeat, "num_samples": len(self.bucket_of)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from `state`; raises ValueError if it was saved for another sequence."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "repeat", "num_samples"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"loader state was saved with {key} {state[key]}, this loader uses {mine[key]}")
        self.epoch, self.position = state["epoch"], state["position"]

    def iter_epoch(self, epoch: int) -> Iterator[Any]:
        """Yield the batches of `epoch`, starting at the saved position if resuming that epoch."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        todo = self.batches(epoch)[self.position:]
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            with ThreadPoolExecutor(self.num_workers, thread_name_prefix="autosplit-read") as pool:
                for indices in todo:
                    if stop.is_set():
                        return
                    try:
                        item = ("ok", self.make_batch(list(pool.map(self.read_sample, indices))))
                    except BaseException as exc:  # handed to the consumer, which re-raises it
                        item = ("error", exc)
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if item[0] == "error":
                        return

        thread = threading.Thread(target=produce, name="autosplit-prefetch", daemon=True)
        thread.start()
        try:
            for _ in todo:
                kind, item = ready.get()
                if kind == "error":
                    raise item
                self.position += 1
                yield item
        finally:
            stop.set()
            thread.join()
