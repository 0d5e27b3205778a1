"""Stage 1: run the plan's stage-1 units over the dataset, once per sample, into the cache.

Resumable: progress is recorded shard by shard, and a re-run writes only the missing shards.
Parallel: under `accelerate launch`, rank r writes the shards whose global number is r modulo the
number of processes; the main process creates the cache before and marks it complete after a
barrier. Incremental: when only the dataset changed (samples edited, added or removed) and the
old cache is complete, `autosplit run` writes a new cache next to it, copying every sample whose
source digest it already holds and encoding only the others, then swaps the two.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from autosplit.adapters.base import truncation_report
from autosplit.config import CacheConfig
from autosplit.data import Sample, SourceDigest, source_digest
from autosplit.errors import CacheError
from autosplit.graph import Unit, UnitContext, UnitGraph, run_units
from autosplit.plan import Plan
from autosplit.planning.stages import stage_units
from autosplit.storage.cache import (
    Bucket,
    CacheReader,
    CacheWriter,
    make_buckets,
    read_manifest,
)
from autosplit.storage.codec import encode_source
from autosplit.training.placement import ComponentSource
from autosplit.training.stage1_pipeline import (
    Batch,
    Decoder,
    PhaseTimes,
    Writer,
    combine,
    cuda_events,
    decode_workers,
    split_host_units,
    to_host,
)

log = logging.getLogger(__name__)


def sample_sources(samples: list[Sample]) -> dict[str, Any]:
    """The dataset values of a batch of samples (lists)."""
    sources = [s.sources() for s in samples]
    return {key: [value for source in sources for value in source[key]] for key in sources[0]}


@torch.no_grad()
def compute_samples(
    units: list[Unit],
    samples: list[Sample],
    ctx: UnitContext,
    names: list[str],
    *,
    to_cpu: bool,
    ragged: Mapping[str, int] | None = None,
    absent: tuple[str, ...] = (),
) -> list[dict[str, torch.Tensor]]:
    """Run `units` on a batch of samples of one shape; return each sample's values in `names`.

    Ragged values of a batch are padded to the batch's longest; each sample's are cut back to its
    own length: the last position that is non-zero in any of its ragged values. Raises CacheError
    when a value in `names` is None, or one in `absent` (None when the plan was made) is not.
    """
    values = run_units(units, sample_sources(samples), ctx)
    _check_presence(values, names, absent, samples)
    return split_samples(values, names, samples, ragged=ragged, to_cpu=to_cpu)


def split_samples(
    values: Mapping[str, Any],
    names: list[str],
    samples: list[Sample],
    *,
    ragged: Mapping[str, int] | None,
    to_cpu: bool,
) -> list[dict[str, torch.Tensor]]:
    """Each sample's values in `names` from a batch's `values` (see `compute_samples`)."""
    out = []
    for j in range(len(samples)):
        item = {name: values[name][j] for name in names}
        trimmed = [n for n in ragged or () if isinstance(item.get(n), torch.Tensor)]  # not text sources
        if len(samples) > 1 and trimmed:
            length = max(_used_length(item[n]) for n in trimmed)
            item = {n: v[:length] if n in trimmed else v for n, v in item.items()}
        out.append({n: _encoded(n, v, samples[j]).cpu() if to_cpu else v for n, v in item.items()})
    return out


def _check_presence(
    values: Mapping[str, Any], names: list[str], absent: tuple[str, ...], samples: list[Sample]
) -> None:
    """Raise CacheError when a value the plan caches is None, or one it found absent is not."""
    where = f"sample {samples[0].index} ({samples[0].image_path})"
    for name in names:
        if values.get(name) is None:
            raise CacheError(
                f"value {name!r} is None for {where}, but the plan caches it (it was there when the plan was "
                f"made): give every sample what it is made from, or none of them and re-run `autosplit plan`"
            )
    for name in absent:
        if values.get(name) is not None:
            raise CacheError(
                f"value {name!r} is there for {where}, but it was absent (None) when the plan was made, so it is "
                f"not cached: give every sample what it is made from, or none, and re-run `autosplit plan`"
            )


def _encoded(name: str, value: Any, sample: Sample) -> torch.Tensor:
    try:
        return encode_source(value)
    except TypeError:
        raise CacheError(
            f"value {name!r} of sample {sample.index} ({sample.image_path}) is a {type(value).__name__}, which "
            f"the cache cannot hold (tensors, numbers, strings, lists of ints): return a tensor from the unit "
            f"that makes it, or compute it in the unit that reads it"
        ) from None


def _used_length(t: torch.Tensor) -> int:
    nonzero = t.reshape(t.shape[0], -1).ne(0).any(dim=1).nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def compute_sample(
    units: list[Unit], sample: Sample, ctx: UnitContext, names: list[str], *, to_cpu: bool
) -> dict[str, torch.Tensor]:
    """Run `units` on one sample; return the values in `names` without their batch axis."""
    return compute_samples(units, [sample], ctx, names, to_cpu=to_cpu)[0]


def stage_context(
    plan: Plan, graph: UnitGraph, *, models: ComponentSource, unit_settings: Mapping[str, Any]
) -> tuple[list[Unit], UnitContext]:
    """The stage-1 units of `plan` and a context holding their components (no step generator:
    stage 1 draws nothing per step)."""
    components = models.load(plan.components(1))
    units = stage_units(plan, graph, 1)
    return units, UnitContext(components, models.device, models.dtype, generator=None, settings=dict(unit_settings))


#: key entries that depend on which samples the dataset holds; a cache differing only in these can
#: be updated sample by sample instead of rebuilt
DATASET_KEYS = ("dataset_sha256", "num_samples")


@dataclass(frozen=True)
class Stage1Job:
    """What stage 1 reads: the plan and graph, the samples, where their components come from, the
    cache settings, and the key and dataset record the cache is stamped with."""

    plan: Plan
    graph: UnitGraph
    samples: list[Sample]
    #: each sample's source digest (what its cached values were made from)
    digests: list[SourceDigest]
    models: ComponentSource
    cache: CacheConfig
    #: everything stage-1 outputs depend on (a cache made under another key is stale)
    key: dict[str, Any]
    unit_settings: Mapping[str, Any]
    #: where the samples came from, recorded in the manifest for `autosplit inspect`
    dataset: dict[str, str]


@dataclass(frozen=True)
class _Target:
    """Where stage 1 writes (`path`), and a complete older cache to copy unchanged samples from."""

    path: Path
    reuse: Path | None
    rebuild: bool


def _choose_target(cache_path: Path, key: dict[str, Any], *, replace_stale: bool) -> _Target:
    existing = read_manifest(cache_path)
    if existing is None or existing.get("key") == key:
        return _Target(cache_path, None, False)
    if not replace_stale:
        return _Target(cache_path, None, False)  # CacheWriter raises, naming what changed
    old_key = existing.get("key") or {}
    changed = sorted(k for k in set(old_key) | set(key) if old_key.get(k) != key.get(k))
    if existing.get("complete") and set(changed) <= set(DATASET_KEYS):
        return _Target(cache_path.with_name(cache_path.name + ".next"), cache_path, False)
    log.warning("cache %s is stale (changed: %s); rebuilding it", cache_path, ", ".join(changed))
    return _Target(cache_path, None, True)


def _distributed(device: torch.device) -> Any:
    from accelerate import PartialState

    return _Ranks(PartialState(cpu=device.type == "cpu"), device)  # as the trainer's Accelerator will be


class _Ranks:
    """accelerate's process state, with a barrier that works for CPU processes on a GPU host too
    (accelerate's `wait_for_everyone` passes `device_ids`, which sends gloo to CUDA device `rank`)."""

    def __init__(self, state: Any, device: torch.device):
        self.state, self.device = state, device
        self.is_main_process, self.process_index = state.is_main_process, state.process_index
        self.num_processes = state.num_processes

    def wait_for_everyone(self) -> None:
        if self.device.type == "cpu" and self.num_processes > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        else:
            self.state.wait_for_everyone()


@dataclass(frozen=True)
class Stage1Result:
    #: the finished cache's manifest
    manifest: dict[str, Any]
    #: the cache was already complete and current: nothing was encoded
    skipped: bool


def run_stage1(job: Stage1Job, cache_path: Path, *, replace_stale: bool = False) -> Stage1Result:
    """Write (or finish) the cache at `cache_path`.

    Shards already written by an interrupted run with the same key are kept. A cache made under
    another key raises CacheError, or, when `replace_stale` is set, is updated sample by sample
    (only the dataset changed) or rebuilt. Raises CacheError when the disk fills up.
    """
    job.models.check_present(job.plan.components(1))  # before anything is written
    digests = job.digests
    buckets = make_buckets([s.bucket for s in job.samples])
    state = _distributed(job.models.device)
    target = _choose_target(cache_path, job.key, replace_stale=replace_stale)
    state.wait_for_everyone()  # every rank chose before the main process changes anything
    extra: dict[str, np.ndarray] = {
        "image_sha256": np.frombuffer(b"".join(d.image for d in digests), np.uint8).reshape(-1, 32),
        "prompt_sha256": np.frombuffer(b"".join(d.prompt for d in digests), np.uint8).reshape(-1, 32),
        "size": np.array([d.size for d in digests], dtype=np.int32).reshape(-1, 2),
    }

    def open_writer(create: bool) -> CacheWriter:
        return CacheWriter(
            target.path,
            plan=job.plan,
            buckets=buckets,
            key=job.key,
            shard_size=job.cache.shard_size,
            zstd_level=job.cache.zstd_level,
            source_sha256=[d.source for d in digests],
            extra_index=extra,
            info={"dataset": job.dataset},
            create=create,
        )

    if state.is_main_process:
        if target.rebuild:
            shutil.rmtree(target.path)
        writer = _guard_disk(target.path, lambda: open_writer(True))
    state.wait_for_everyone()
    if not state.is_main_process:
        writer = open_writer(False)
    if writer.manifest["complete"]:
        log.info("cache %s is complete and current; stage 1 skipped", target.path)
        return Stage1Result(writer.manifest, skipped=True)
    _write_shards(job, writer, target, rank=state.process_index, world=state.num_processes)
    state.wait_for_everyone()
    if state.is_main_process:
        _guard_disk(target.path, writer.finish)
        if target.reuse is not None:
            _swap(target.path, cache_path)
    state.wait_for_everyone()
    manifest = read_manifest(cache_path)
    assert manifest is not None  # just finished
    return Stage1Result(manifest, skipped=False)


def _guard_disk(path: Path, write: Callable[[], Any]) -> Any:
    try:
        return write()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(
                f"{path}: no space left on device ({exc}); free space then re-run the same command: "
                f"finished shards are kept and the cache is not marked complete"
            ) from exc
        raise


def _swap(new: Path, cache_path: Path) -> None:
    old = cache_path.with_name(cache_path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(cache_path, old)
    os.replace(new, cache_path)
    shutil.rmtree(old)


class Progress:
    """A tqdm bar on terminals; where it is not shown (stderr is not a terminal, or TQDM_DISABLE),
    a log line every `every_s` seconds (0: every update; None: never) and at the end: done/total,
    the rate (units per second, since this run started) and the ETA, plus `fields` such as the loss."""

    def __init__(self, *, total: int, desc: str, unit: str, every_s: float | None, initial: int = 0):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None)  # None: terminals only
        self.total, self.done, self.first, self.desc, self.unit = total, initial, initial, desc, unit
        self.every_s, self.start = every_s, time.perf_counter()
        self.logged = self.start

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def update(self, n: int, **fields: str) -> None:
        self.done += n
        self.bar.update(n)
        if fields:
            self.bar.set_postfix(fields)
        now = time.perf_counter()
        if not self._line_due(now):
            return
        self.logged = now
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        eta = format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        shown = "".join(f", {k} {v}" for k, v in fields.items())
        log.info(
            "%s %d/%d %ss, %s %ss/s%s, ETA %s",
            self.desc,
            self.done,
            self.total,
            self.unit,
            f"{rate:.3g}" if rate < 1000 else f"{rate:.0f}",
            self.unit,
            shown,
            eta,
        )

    def _line_due(self, now: float) -> bool:
        if self.every_s is None or not self.bar.disable:  # no lines asked for, or the bar shows it all
            return False
        return now - self.logged >= self.every_s or self.done >= self.total


def format_seconds(seconds: float) -> str:
    """`seconds` as 42s, 3m05s or 2h07m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _write_shards(job: Stage1Job, writer: CacheWriter, target: _Target, *, rank: int, world: int) -> None:
    mine = [(b, k) for g, (b, k) in enumerate(writer.shards) if g % world == rank and not writer.shard_done(b.id, k)]
    log.info("stage 1, process %d of %d: %d shards to write", rank, world, len(mine))
    if not mine:
        return
    desc = "stage 1: caching" if world == 1 else f"stage 1, process {rank} of {world}: caching"
    times = PhaseTimes()
    sizes = {(b.id, k): len(range(*b.shards(writer.shard_size)[k])) for b, k in mine}
    with Progress(total=sum(sizes.values()), desc=desc, unit="sample", every_s=job.cache.log_every_s) as progress:
        tick = time.perf_counter()
        stage = _Stage(job, target.reuse, world=world)
        first_s = stage.run(mine, writer, progress=progress.update, times=times)
        seconds = time.perf_counter() - tick
    cut = truncation_report()
    if cut:
        log.warning("stage 1: %s", cut)
    stats = {
        "rank": rank,
        "world_size": world,
        "shards": len(mine),
        "samples": sum(sizes.values()),
        "encoded": stage.encoded,
        "seconds": round(seconds, 3),  # encode + write, models loaded; the first shard carries the warm-up
        "first_shard_samples": sizes[mine[0][0].id, mine[0][1]],
        "first_shard_seconds": round(first_s if first_s is not None else seconds, 3),
        "batch_size": stage.batch_size,
        "decode_workers": stage.workers,
        #: seconds per phase, summed over the threads that run it (docs/benchmarks.md says which)
        "phases_s": times.as_dict(),
    }
    log.info("stage 1: %s", _summary(stats))
    log.info("stage 1 stats %s", json.dumps(stats))


def _summary(stats: Mapping[str, Any]) -> str:
    """Where stage 1's time went, in words."""
    phases, seconds = stats["phases_s"], stats["seconds"]
    parts = [f"{name.replace('_', ' ')} {value:.1f}s" for name, value in phases.items() if value >= 0.05]
    rate = stats["samples"] / seconds if seconds > 0 else float("inf")
    return f"{stats['samples']} samples in {seconds:.1f}s ({rate:.3g} samples/s); " + ", ".join(parts)


@torch.no_grad()
def encode_batch(stage: _Stage, samples: list[Sample], decoded: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the stage-1 units after the host ones on one batch of decoded samples (one shape
    bucket); returns the values, on the device. Raises CacheError as `compute_samples` does."""
    values = combine(decoded)
    if values is None:  # the host units' values do not stack: run every unit on the batch
        values = run_units(stage.host + stage.rest, sample_sources(samples), stage.ctx)
    else:
        values = run_units(stage.rest, values, stage.ctx)
    _check_presence(values, stage.names, stage.plan.absent, samples)
    return values


class _Stage:
    """Stage 1 of one process: its units (the host ones split off), context, batch size and
    the older cache to copy unchanged samples from; `run` writes shards through the pipeline."""

    def __init__(self, job: Stage1Job, reuse: Path | None, *, world: int):
        self.job, self.plan, self.samples = job, job.plan, job.samples
        units, self.ctx = stage_context(self.plan, job.graph, models=job.models, unit_settings=job.unit_settings)
        self.batch_size = job.cache.batch_size
        if any(u.is_split for u in self.plan.units) and self.batch_size != 1:
            log.info("stage 1 runs one sample at a time: a split unit records its random part per sample")
            self.batch_size = 1
        self.host, self.rest = split_host_units(units, self.samples[0].sources())
        self.names = [v.name for v in self.plan.cached]
        self.ragged = {v.name: v.ragged_axis for v in self.plan.cached if v.ragged_axis is not None}
        self.workers, self.encoded = decode_workers(world), 0
        self.old, self.where = None, {}
        if reuse is not None:
            self.old = CacheReader(reuse)
            self.where = {bytes(sha): i for i, sha in enumerate(self.old.group["index/source_sha256"][...])}
            log.info(
                "updating cache %s: %d of %d samples are unchanged and copied",
                reuse,
                sum(source_digest(s).source in self.where for s in self.samples),
                len(self.samples),
            )

    def _shards(self, mine: list[tuple[Bucket, int]], shard_size: int) -> list[tuple[Any, list[Sample], list[int]]]:
        """(key, samples, positions to encode) of each shard to write; the others are copied."""
        out = []
        for bucket, k in mine:
            lo, hi = bucket.shards(shard_size)[k]
            shard = [self.samples[i] for i in bucket.samples[lo:hi]]
            todo = [j for j, s in enumerate(shard) if self.old is None or source_digest(s).source not in self.where]
            out.append(((bucket.id, k), shard, todo))
        return out

    def run(
        self, mine: list[tuple[Bucket, int]], writer: CacheWriter, *, progress: Callable[[int], None], times: PhaseTimes
    ) -> float | None:
        """Write the shards `mine`; returns the seconds until the first one was written."""
        shards = self._shards(mine, writer.shard_size)
        buckets = {b.id: b for b, _ in mine}
        events = cuda_events(self.job.models.device)

        def write(key: Any, outputs: list[dict[str, torch.Tensor]]) -> None:
            shard_times: dict[str, float] = {}
            write_one = functools.partial(writer.write_shard, buckets[key[0]], key[1], outputs, times=shard_times)
            _guard_disk(writer.path, write_one)
            times.add("checksum_compress", shard_times.get("encode_s", 0.0))
            times.add("write", shard_times.get("write_s", 0.0))

        out = Writer(
            sizes={key: len(shard) for key, shard, _ in shards},
            split=lambda b: split_samples(b.values or {}, self.names, b.samples, ragged=self.ragged, to_cpu=True),
            write=write,
            on_samples=progress,
            times=times,
            depth=max(2, writer.shard_size // self.batch_size),
        )
        decoder = Decoder(
            self.host,
            self.ctx,
            [shard[j] for _, shard, todo in shards for j in todo],
            workers=self.workers,
            lookahead=2 * self.batch_size + self.workers,
            times=times,
        )
        try:
            for key, shard, todo in shards:
                self._copy(key, shard, todo, out, times)
                for lo in range(0, len(todo), self.batch_size):
                    part = todo[lo : lo + self.batch_size]
                    out.put(self._encode(key, part, [shard[j] for j in part], decoder, events, times))
            out.close()
        except BaseException:
            out.abort()
            raise
        finally:
            decoder.close()
        return out.first_shard_s

    def _copy(self, key: Any, shard: list[Sample], todo: list[int], out: Writer, times: PhaseTimes) -> None:
        encoded = set(todo)
        copied = [j for j in range(len(shard)) if j not in encoded]
        if copied and self.old is not None:
            with times.timed("copy_unchanged"):
                outputs = [self.old.read(self.where[source_digest(shard[j]).source]) for j in copied]
            out.put(Batch(key, copied, [shard[j] for j in copied], outputs=outputs))

    def _encode(
        self, key: Any, part: list[int], samples: list[Sample], decoder: Decoder, events: Any, times: PhaseTimes
    ) -> Batch:
        decoded = [decoder.next() for _ in part]
        with times.timed("encode"):
            start = events() if events else None
            values = encode_batch(self, samples, decoded)
            encoded = events() if events else None
            values = to_host(values, self.names)  # on CUDA: copies in flight, `ready` once done
            ready = events() if events else None
        self.encoded += len(part)
        return Batch(key, part, samples, values=values, ready=ready, events=(start, encoded))
