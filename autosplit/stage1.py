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
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from autosplit.cache import CacheReader, CacheWriter, _read_manifest, make_buckets
from autosplit.data import Sample, source_digest
from autosplit.errors import CacheError
from autosplit.graph import Unit, UnitContext, run_units
from autosplit.loader import encode_source
from autosplit.models import load_components
from autosplit.planner import Plan
from autosplit.session import DATASET_KEYS, Session, check_components_present

log = logging.getLogger(__name__)


def sample_sources(samples: list[Sample]) -> dict[str, Any]:
    """The dataset values of a batch of samples (lists)."""
    sources = [s.sources() for s in samples]
    return {key: [value for source in sources for value in source[key]] for key in sources[0]}


@torch.no_grad()
def compute_samples(units: list[Unit], samples: list[Sample], ctx: UnitContext, names: list[str], *,
                    to_cpu: bool, ragged: Mapping[str, int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Run `units` on a batch of samples of one shape; return each sample's values in `names`.

    Ragged values of a batch are padded to the batch's longest; each sample's are cut back to its
    own length: the last position that is non-zero in any of its ragged values.
    """
    values = run_units(units, sample_sources(samples), ctx)
    out = []
    for j in range(len(samples)):
        item = {name: values[name][j] for name in names}
        trimmed = [n for n in ragged or () if isinstance(item.get(n), torch.Tensor)]  # not text sources
        if len(samples) > 1 and trimmed:
            length = max(_used_length(item[n]) for n in trimmed)
            item = {n: v[:length] if n in trimmed else v for n, v in item.items()}
        out.append({n: encode_source(v).cpu() if to_cpu else v for n, v in item.items()})
    return out


def _used_length(t: torch.Tensor) -> int:
    nonzero = t.reshape(t.shape[0], -1).ne(0).any(dim=1).nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def compute_sample(units: list[Unit], sample: Sample, ctx: UnitContext, names: list[str], *,
                   to_cpu: bool) -> dict[str, torch.Tensor]:
    """Run `units` on one sample; return the values in `names` without their batch axis."""
    return compute_samples(units, [sample], ctx, names, to_cpu=to_cpu)[0]


def stage1_context(session: Session, plan: Plan) -> tuple[list[Unit], UnitContext]:
    check_components_present(session, plan.components(1))
    components = load_components(session.adapter, session.model_root, plan.components(1),
                                 device=session.device, dtype=session.dtype)
    units = plan.runnable_units(session.graph, 1)
    ctx = UnitContext(components, session.device, session.dtype, generator=None, settings=session.settings)
    return units, ctx


@dataclass(frozen=True)
class _Target:
    """Where stage 1 writes (`path`), and a complete older cache to copy unchanged samples from."""

    path: Path
    reuse: Path | None
    rebuild: bool


def _choose_target(cache_path: Path, key: dict[str, Any], *, replace_stale: bool) -> _Target:
    existing = _read_manifest(cache_path)
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


def run_stage1(session: Session, plan: Plan, samples: list[Sample], cache_path: Path, *,
               replace_stale: bool = False) -> dict[str, Any]:
    """Write (or finish) the cache at `cache_path`; returns the cache manifest.

    Shards already written by an interrupted run with the same key are kept. A cache made under
    another key raises CacheError, or, when `replace_stale` is set, is updated sample by sample
    (only the dataset changed) or rebuilt. Raises CacheError when the disk fills up.
    """
    cache_cfg = session.config.cache
    check_components_present(session, plan.components(1))  # before anything is written
    digests = [source_digest(s) for s in samples]
    key = session.stage1_key(plan, samples, [d.source for d in digests])
    buckets = make_buckets([s.bucket for s in samples])
    state = _distributed(session.device)
    target = _choose_target(cache_path, key, replace_stale=replace_stale)
    state.wait_for_everyone()  # every rank chose before the main process changes anything
    extra = {"image_sha256": np.frombuffer(b"".join(d.image for d in digests), np.uint8).reshape(-1, 32),
             "prompt_sha256": np.frombuffer(b"".join(d.prompt for d in digests), np.uint8).reshape(-1, 32),
             "size": np.array([d.size for d in digests], dtype=np.int32).reshape(-1, 2)}
    info = {"dataset": _dataset_info(session)}

    def open_writer(create: bool) -> CacheWriter:
        return CacheWriter(target.path, plan=plan, buckets=buckets, key=key, shard_size=cache_cfg.shard_size,
                           zstd_level=cache_cfg.zstd_level, source_sha256=[d.source for d in digests],
                           extra_index=extra, info=info, create=create)

    if state.is_main_process:
        if target.rebuild:
            shutil.rmtree(target.path)
        writer = _guard_disk(target.path, lambda: open_writer(True))
    state.wait_for_everyone()
    if not state.is_main_process:
        writer = open_writer(False)
    if writer.manifest["complete"]:
        log.info("cache %s is complete and current; stage 1 skipped", target.path)
        return writer.manifest
    _write_shards(session, plan, samples, writer, target, rank=state.process_index, world=state.num_processes)
    state.wait_for_everyone()
    if state.is_main_process:
        _guard_disk(target.path, writer.finish)
        if target.reuse is not None:
            _swap(target.path, cache_path)
    state.wait_for_everyone()
    return _read_manifest(cache_path)


def _dataset_info(session: Session) -> dict[str, str]:
    data = session.config.data
    return {"base_path": str(session.dataset_folder().resolve()),
            "metadata_path": str(Path(data.metadata_path).resolve()) if data.metadata_path else ""}


def _guard_disk(path: Path, write: Callable[[], Any]) -> Any:
    try:
        return write()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"{path}: no space left on device ({exc}); free space then re-run the same command: "
                             f"finished shards are kept and the cache is not marked complete") from exc
        raise


def _swap(new: Path, cache_path: Path) -> None:
    old = cache_path.with_name(cache_path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(cache_path, old)
    os.replace(new, cache_path)
    shutil.rmtree(old)


def _write_shards(session: Session, plan: Plan, samples: list[Sample], writer: CacheWriter, target: _Target, *,
                  rank: int, world: int) -> None:
    shard_size, batch_size = writer.shard_size, session.config.cache.batch_size
    mine = [(b, k) for g, (b, k) in enumerate(writer.shards) if g % world == rank and not writer.shard_done(b.id, k)]
    log.info("stage 1, process %d of %d: %d shards to write", rank, world, len(mine))
    if not mine:
        return
    produce = _producer(session, plan, samples, target.reuse, batch_size)
    shard_seconds, shard_samples = [], []
    with tqdm(total=sum(len(range(*b.shards(shard_size)[k])) for b, k in mine), desc="stage 1: caching",
              unit="sample", disable=None) as bar:  # disable=None: a bar on terminals only
        for bucket, shard in mine:
            tick = time.perf_counter()
            lo, hi = bucket.shards(shard_size)[shard]
            outputs = produce([samples[i] for i in bucket.samples[lo:hi]])
            _guard_disk(writer.path, lambda: writer.write_shard(bucket, shard, outputs))
            _synchronize(session.device)
            shard_seconds.append(time.perf_counter() - tick)
            shard_samples.append(hi - lo)
            bar.update(hi - lo)
    # encode + write time, models already loaded; the first shard carries the warm-up
    log.info("stage 1 stats %s", json.dumps({"rank": rank, "world_size": world, "shards": len(mine),
                                             "samples": sum(shard_samples), "seconds": sum(shard_seconds),
                                             "first_shard_samples": shard_samples[0],
                                             "first_shard_seconds": shard_seconds[0]}))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _producer(session: Session, plan: Plan, samples: list[Sample], reuse: Path | None,
              batch_size: int) -> Callable[[list[Sample]], list[dict[str, torch.Tensor]]]:
    """A function from one shard's samples to their stage-1 outputs: copied from `reuse` where its
    cache holds the same source digest, computed (in batches of `batch_size`) otherwise."""
    units, ctx = stage1_context(session, plan)
    if any(u.replays for u in plan.units) and batch_size != 1:
        log.info("stage 1 runs one sample at a time: a split unit records its random part per sample")
        batch_size = 1
    names = [v.name for v in plan.cached]
    ragged = {v.name: v.ragged_axis for v in plan.cached if v.ragged_axis is not None}
    old, where = None, {}
    if reuse is not None:
        old = CacheReader(reuse)
        where = {bytes(sha): i for i, sha in enumerate(old.group["index/source_sha256"][...])}

    def produce(shard: list[Sample]) -> list[dict[str, torch.Tensor]]:
        digests = [source_digest(s).source if old is not None else b"" for s in shard]
        out: list[dict[str, torch.Tensor] | None] = [old.read(where[d]) if d in where else None for d in digests]
        todo = [j for j, o in enumerate(out) if o is None]
        for lo in range(0, len(todo), batch_size):
            part = todo[lo:lo + batch_size]
            for j, values in zip(part, compute_samples(units, [shard[j] for j in part], ctx, names, to_cpu=True,
                                                       ragged=ragged)):
                out[j] = values
        return out  # type: ignore[return-value]

    if old is not None:
        log.info("updating cache %s: %d of %d samples are unchanged and copied", reuse,
                 sum(source_digest(s).source in where for s in samples), len(samples))
    return produce
