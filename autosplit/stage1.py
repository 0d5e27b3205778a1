"""Stage 1: run the plan's stage-1 units over the dataset, once per sample, into the cache."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from autosplit.cache import CacheWriter, cache_status, make_buckets
from autosplit.data import Sample
from autosplit.errors import CacheError
from autosplit.graph import Unit, UnitContext, run_units
from autosplit.models import load_components
from autosplit.planner import Plan
from autosplit.session import Session, check_components_present, source_hashes

log = logging.getLogger(__name__)


def sample_sources(sample: Sample) -> dict[str, Any]:
    """The dataset values of one sample, as a batch of one (lists)."""
    return sample.sources()


@torch.no_grad()
def compute_sample(units: list[Unit], sample: Sample, ctx: UnitContext, names: list[str], *,
                   to_cpu: bool) -> dict[str, torch.Tensor]:
    """Run `units` on one sample; return the values in `names` without their batch axis."""
    values = run_units(units, sample_sources(sample), ctx)
    out = {}
    for name in names:
        value = values[name][0]
        out[name] = value.cpu() if to_cpu else value
    return out


def stage1_context(session: Session, plan: Plan) -> tuple[list[Unit], UnitContext]:
    check_components_present(session, plan.components(1))
    components = load_components(session.adapter, session.model_root, plan.components(1),
                                 device=session.device, dtype=session.dtype)
    units = [session.graph[name] for name in plan.stage_units(1)]
    ctx = UnitContext(components, session.device, session.dtype, generator=None, settings=session.settings)
    return units, ctx


def run_stage1(session: Session, plan: Plan, samples: list[Sample], cache_path: Path, *,
               replace_stale: bool = False) -> dict[str, Any]:
    """Write (or finish) the cache at `cache_path`; returns the cache manifest.

    Shards already written by an interrupted run with the same key are kept. A cache made under
    another key raises CacheError, or is deleted and rebuilt when `replace_stale` is set.
    """
    cache_cfg = session.config.cache
    check_components_present(session, plan.components(1))  # before anything is written
    sha = source_hashes(samples)
    key = session.stage1_key(plan, samples, sha)
    buckets = make_buckets([s.bucket for s in samples])
    try:
        writer = CacheWriter(cache_path, plan=plan, buckets=buckets, key=key, shard_size=cache_cfg.shard_size,
                             zstd_level=cache_cfg.zstd_level, source_sha256=sha)
    except CacheError:
        if not (replace_stale and cache_status(cache_path) != "missing"):
            raise
        log.warning("cache %s is stale; rebuilding it", cache_path)
        shutil.rmtree(cache_path)
        writer = CacheWriter(cache_path, plan=plan, buckets=buckets, key=key, shard_size=cache_cfg.shard_size,
                             zstd_level=cache_cfg.zstd_level, source_sha256=sha)
    if writer.manifest["complete"]:
        log.info("cache %s is complete and current; stage 1 skipped", cache_path)
        return writer.manifest
    units, ctx = stage1_context(session, plan)
    names = [v.name for v in plan.cached]
    with tqdm(total=len(samples), desc="stage 1: caching", unit="sample") as bar:
        for bucket in buckets:
            for shard, (lo, hi) in enumerate(bucket.shards(cache_cfg.shard_size)):
                if not writer.shard_done(bucket.id, shard):
                    outputs = [compute_sample(units, samples[i], ctx, names, to_cpu=True)
                               for i in bucket.samples[lo:hi]]
                    writer.write_shard(bucket, shard, outputs)
                bar.update(hi - lo)
    writer.finish()
    return writer.manifest


def measured_values(outputs: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """(shape, dtype, bytes) of each per-sample value, for plan tables."""
    return {name: (tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
            for name, t in outputs.items()}
