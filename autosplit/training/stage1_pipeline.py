"""Stage 1's pipeline: the encoders never wait for decoding, copies or writes.

Four parts run at once, each bounded:

- **decode**: the graph's host units (no components; they read only dataset values and each
  other's outputs: image decoding, resizing, cropping) run sample by sample on a thread pool, a
  few batches ahead of the encoders (PIL and torch release the GIL);
- **encode**: the calling thread stacks a batch of decoded samples (one shape bucket), runs the
  other stage-1 units on it on the device, and starts copying their outputs to host memory
  (pinned, `non_blocking`, on CUDA);
- **pack**: a writer thread waits for that copy, splits the batch into samples (ragged values cut
  back to each sample's length, dataset values encoded), and
- **write**: writes each shard once all its samples are there (checksums, compression, files)
  and only then marks it done, so a kill leaves whole shards and the next run writes the rest.

A batch of one is computed exactly as before (`compute_samples`), so `cache.batch_size = 1` stays
bit-exact to unsplit training. `PhaseTimes` adds up where the time goes; `run_pipeline` returns it.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from autosplit.data import Sample
from autosplit.graph import Unit, UnitContext, run_units


class PhaseTimes:
    """Seconds spent in each phase of stage 1, summed over the threads that run it; thread-safe."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = collections.defaultdict(float)
        self._lock = threading.Lock()

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self._seconds[phase] += seconds

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 3) for k, v in self._seconds.items()}


def split_host_units(units: list[Unit], sources: Mapping[str, Any]) -> tuple[list[Unit], list[Unit]]:
    """(host, rest): the units that use no component and read only dataset values (`sources`) or
    other host units' outputs, which run per sample ahead of the encoders, and the others, in order."""
    known, host, rest = set(sources), [], []
    for unit in units:
        if not unit.components and set(unit.inputs) <= known:
            host.append(unit)
            known |= set(unit.outputs)
        else:
            rest.append(unit)
    return host, rest


def combine(per_sample: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The values of a batch from its samples' values (each a batch of one): lists joined, tensors
    concatenated along the batch axis, as the units would have made them for the whole batch; None
    if a value is neither (the units then run on the batch instead)."""
    if len(per_sample) == 1:
        return per_sample[0]
    out: dict[str, Any] = {}
    for name, first in per_sample[0].items():
        items = [values[name] for values in per_sample]
        if all(isinstance(v, list) for v in items):
            out[name] = [x for v in items for x in v]
        elif all(isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == 1 for v in items):
            if any(v.shape != first.shape for v in items):
                return None
            out[name] = torch.cat(items)
        else:
            return None
    return out


def to_host(values: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """The values in `names`, with device tensors copied to host memory: pinned and asynchronous on
    CUDA (wait for `torch.cuda.current_stream()` before reading them), synchronous elsewhere."""
    out = {}
    for name in names:
        value = values[name]
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            out[name] = host.copy_(value, non_blocking=True)
        elif isinstance(value, torch.Tensor) and value.device.type != "cpu":
            out[name] = value.cpu()
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class Batch:
    """One batch of stage 1: the samples of one shard (`shard`, an opaque key) at positions
    `positions`, and either their host values (`values`, to split after `ready`) or, copied from an
    older cache, their per-sample outputs."""

    shard: Any
    positions: list[int]
    samples: list[Sample]
    values: Mapping[str, Any] | None = None
    outputs: list[dict[str, torch.Tensor]] | None = None
    #: a CUDA event recorded after the copies, or None (already on the host)
    ready: Any = None
    #: CUDA events around the encoding and around the copies, for the device times
    events: tuple[Any, ...] = ()


class Writer:
    """The writer thread: packs batches (`split`) into their shards and writes each shard when it is
    whole (`write(shard, outputs)`), in the order batches arrive. `put` blocks while `depth`
    batches wait (bounded memory) and re-raises the thread's error; `close` waits for it."""

    def __init__(
        self,
        *,
        sizes: Mapping[Any, int],
        split: Callable[[Batch], list[dict[str, torch.Tensor]]],
        write: Callable[[Any, list[dict[str, torch.Tensor]]], None],
        on_samples: Callable[[int], None],
        times: PhaseTimes,
        depth: int,
    ):
        self.sizes, self.split, self.write, self.on_samples, self.times = sizes, split, write, on_samples, times
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._pending: dict[Any, list[Any]] = {}
        self.error: BaseException | None = None
        self.first_shard_s: float | None = None
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="autosplit-stage1-writer", daemon=True)
        self._thread.start()

    def put(self, batch: Batch) -> None:
        start = time.perf_counter()
        try:
            while True:
                self._raise()
                try:
                    self._queue.put(batch, timeout=0.1)
                    return
                except queue.Full:
                    continue
        finally:
            self.times.add("wait_for_writer", time.perf_counter() - start)

    def close(self) -> None:
        """Wait until every batch is written; re-raise the thread's error."""
        self.put(None)  # type: ignore[arg-type]
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop without writing what is left (after an error in the caller's thread)."""
        self.error = self.error or _Aborted()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=60)

    def _raise(self) -> None:
        if self.error is not None and not isinstance(self.error, _Aborted):
            raise self.error

    def _run(self) -> None:
        try:
            while (batch := self._queue.get()) is not None and self.error is None:
                self._take(batch)
        except BaseException as exc:  # handed to the caller's thread by put/close
            self.error = exc

    def _take(self, batch: Batch) -> None:
        if batch.ready is not None:
            with self.times.timed("wait_for_copy"):
                batch.ready.synchronize()
            encoded, copied = batch.events[0].elapsed_time(batch.events[1]), batch.events[1].elapsed_time(batch.ready)
            self.times.add("encode_on_device", encoded / 1000)
            self.times.add("device_to_host", copied / 1000)
        if batch.outputs is not None:
            outputs = batch.outputs
        else:
            with self.times.timed("pack"):
                outputs = self.split(batch)
        shard = self._pending.setdefault(batch.shard, [None] * self.sizes[batch.shard])
        for position, values in zip(batch.positions, outputs):
            shard[position] = values
        self.on_samples(len(outputs))
        if all(values is not None for values in shard):
            self.write(batch.shard, self._pending.pop(batch.shard))
            if self.first_shard_s is None:
                self.first_shard_s = time.perf_counter() - self._start


class _Aborted(Exception):
    pass


class Decoder:
    """Runs the host units on samples in the order `samples` lists them, on `workers` threads,
    at most `lookahead` samples ahead of `next()`."""

    def __init__(
        self,
        units: list[Unit],
        ctx: UnitContext,
        samples: list[Sample],
        *,
        workers: int,
        lookahead: int,
        times: PhaseTimes,
    ):
        self.units, self.ctx, self.times = units, ctx, times
        self._todo = iter(samples)
        self._futures: collections.deque[Future] = collections.deque()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="autosplit-stage1-decode")
        self.lookahead = max(1, lookahead)
        self._fill()

    @torch.no_grad()
    def _decode(self, sample: Sample) -> dict[str, Any]:
        with self.times.timed("decode"):
            return run_units(self.units, sample.sources(), self.ctx)

    def _fill(self) -> None:
        while len(self._futures) < self.lookahead:
            sample = next(self._todo, None)
            if sample is None:
                return
            self._futures.append(self._pool.submit(self._decode, sample))

    def next(self) -> dict[str, Any]:
        """The next sample's values (its sources and the host units' outputs, a batch of one)."""
        future = self._futures.popleft()
        self._fill()
        with self.times.timed("wait_for_decode"):
            return future.result()

    def close(self) -> None:
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)


def decode_workers(world_size: int) -> int:
    """Decoding threads per process: the host's cores shared by the processes, one left for the
    encoding thread, at least one and at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // max(1, world_size) - 1))


def cuda_events(device: torch.device) -> Callable[[], Any] | None:
    """A maker of timing events on CUDA, else None."""
    if device.type != "cuda":
        return None
    return lambda: _recorded(torch.cuda.Event(enable_timing=True))


def _recorded(event: Any) -> Any:
    event.record()
    return event
