"""`run(config)`: one training run as the CLI's `autosplit run` does it, callable from Python.

The modes of `train.task` (DiffSynth-Studio's `--task` values):

- `sft` (or `direct_distill`): plan, then stage 1 if the cache is missing, incomplete or stale
  (only the changed samples when just the dataset changed), then stage 2; unsplit
  (`train.split = false`) trains from the dataset directly.
- `sft:data_process`: plan and stage 1 only; `output_path` is the cache.
- `sft:train`: stage 2 only, from the cache at `data.base_path`, checked against this run's graph,
  trained components, weights, device and dataset before a step is taken.

Each stage gets the parts of the resolved run it reads (`Stage1Job`, `TrainInputs`, the config's
sections); nothing below this layer sees the config as a whole.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autosplit.adapters.components import fingerprint_component
from autosplit.config import RunConfig
from autosplit.data import source_digest
from autosplit.errors import CacheError, ConfigError, ModelError
from autosplit.plan import Plan
from autosplit.planning.plan_check import cut_difference, cut_rule_problem
from autosplit.planning.planner import place_memory
from autosplit.planning.report import placement_lines, plan_summary, with_budget
from autosplit.storage.cache import CacheReader
from autosplit.storage.remote import fetch, is_remote, local_path, upload
from autosplit.tasks import graph_layouts
from autosplit.training.lora import check_trainable_early
from autosplit.training.stage1 import run_stage1
from autosplit.training.trainer import (
    TrainInputs,
    TrainResult,
    cache_inputs,
    checkpoint_to_resume,
    inline_inputs,
    train,
)
from autosplit.workflow.profiling import plan_run
from autosplit.workflow.session import Session, open_session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a run did: its plan; the cache's location and size if stage 1 was part of it (and
    whether stage 1 encoded anything or found the cache complete); stage 2's result, unless the
    mode was `data_process`."""

    plan: Plan
    cache: str | None = None
    num_cached: int | None = None
    stage1_skipped: bool = False
    training: TrainResult | None = None
    #: false on the other ranks of a multi-process run (the main process reports the run)
    is_main_process: bool = True


def run(config: RunConfig, *, on_stage1: Callable[[RunResult], None] | None = None) -> RunResult:
    """Run `config` as `autosplit run` does; raises AutosplitError subclasses on bad input.
    `on_stage1` is called with the result so far once stage 1 is done (before stage 2 starts)."""
    session = open_session(config)
    if session.mode != "data_process" and is_remote(config.output_path):
        raise ConfigError(
            f"--output_path {config.output_path}: LoRA and logs are written to a local folder; "
            f"a URL is taken as the cache of --task sft:data_process (or use --cache_path URL)"
        )
    if session.mode != "data_process":
        session.models.check_present(list(session.trainable))
        check_trainable_early(config.lora, session.adapter, session.model_root, session.trainable)
        checkpoint_to_resume(config.train.resume, Path(config.output_path))  # no --resume without one, before work
    if session.mode == "train":
        cache, plan = training_cache(session)
        plan = place_memory(plan, session.memory_request())  # this run's budget, the cache's measurements
        say_budget(plan, config.plan.vram_budget_gib)
        inputs = cache_inputs(plan, cache, reader_kind=config.cache.reader)
        return RunResult(plan, training=stage2(session, plan, inputs))
    plan = plan_run(session)
    say_budget(plan, config.plan.vram_budget_gib)
    if session.mode == "data_process" and not plan.split:
        raise ConfigError("--task sft:data_process writes a cache; drop --no-split")
    samples = session.samples()
    if not plan.split:
        _process_state(session)  # each process's device is set before the stage-1 models are placed on it
        inputs = inline_inputs(
            plan,
            session.graph,
            samples,
            models=session.models,
            unit_settings=session.settings,
            shard_size=config.cache.shard_size,
        )
        return RunResult(plan, training=stage2(session, plan, inputs))
    location = config.output_path if session.mode == "data_process" else cache_location(config)
    cache = local_path(location)
    manifest, skipped = stage1(session, plan, samples, cache, replace_stale=session.mode == "")
    if is_remote(location) and _is_main_process():
        upload(cache, location)
    result = RunResult(
        plan,
        cache=location,
        num_cached=manifest["num_samples"],
        stage1_skipped=skipped,
        is_main_process=_is_main_process(),
    )
    if on_stage1 is not None:
        on_stage1(result)
    if session.mode == "data_process":
        return result
    problem = cut_difference(Plan.from_dict(manifest["plan"]).cut_signature(), plan.cut_signature())
    if problem is not None:  # the key holds the cut, so only an edited manifest differs
        raise CacheError(
            f"{cache}: its plan is not the plan this run makes ({problem}); delete the cache or re-run "
            f"stage 1 (--task sft:data_process)"
        )
    session.settings["cache_path"] = str(cache)
    inputs = cache_inputs(plan, cache, reader_kind=config.cache.reader)
    return dataclasses.replace(result, training=stage2(session, plan, inputs))


def stage1(
    session: Session, plan: Plan, samples: list[Any], cache: Path, *, replace_stale: bool
) -> tuple[dict[str, Any], bool]:
    """Stage 1 of `session` into the local folder `cache`: (the manifest, whether the cache was
    already complete and current, so nothing was encoded)."""
    result = run_stage1(session.stage1_job(plan, samples), cache, replace_stale=replace_stale)
    return result.manifest, result.skipped


def stage2(session: Session, plan: Plan, inputs: TrainInputs) -> TrainResult:
    """Stage 2 (or the unsplit loop) of `session` on `inputs`, into `output_path`."""
    config = session.config
    return train(
        plan,
        session.graph,
        inputs,
        Path(config.output_path),
        models=session.models,
        trained=session.trainable,
        train=config.train,
        lora=config.lora,
        data=config.data,
        variants=config.cache.variants,
        unit_settings=session.settings,
    )


def say_budget(plan: Plan, budget_gib: float) -> None:
    """Say (before any work) where stage 2's weights go and, with --vram_budget, whether the run
    about to be done fits: stage 2's predicted peak, or the unsplit one for --no-split."""
    for line in placement_lines(plan):
        log.info("%s", line)
    if not budget_gib or "stage2_peak_bytes" not in plan.predicted:
        return
    plan = dataclasses.replace(plan, predicted=with_budget(plan.predicted, budget_gib))
    line = plan_summary(plan)[-1]
    (log.warning if not plan.predicted["fits_budget"] else log.info)("%s", line)


def cache_location(config: RunConfig) -> str:
    """Where `--task sft` keeps its cache: cache.path (a folder or an fsspec URL) or OUTPUT/cache."""
    return config.cache.path or str(Path(config.output_path) / "cache")


def _process_state(session: Session) -> None:
    from accelerate import PartialState

    PartialState(cpu=session.device.type == "cpu")  # as the trainer's Accelerator will be


def _is_main_process() -> bool:
    from accelerate import PartialState

    return bool(PartialState().is_main_process)


def training_cache(session: Session) -> tuple[Path, Plan]:
    """The cache `--task sft:train` reads (a local copy of it, for a URL) and the plan it holds
    (its cut; this run's settings), checked against this run's graph, trained components, model
    folder, device, preprocessing settings and dataset, and against the plan this run makes
    (`check_cached_plan`). Records the cache in the session's unit settings (`cache_path`), so
    that a unit replayed from it names it in its errors."""
    config = session.config
    if not config.data.base_path:
        raise ConfigError("--task sft:train reads a cache: pass --dataset_base_path <the stage-1 output_path>")
    cache = fetch(config.data.base_path) if is_remote(config.data.base_path) else local_path(config.data.base_path)
    reader = CacheReader(cache)
    plan = reader.plan
    plan.check_graph(session.graph)
    key = reader.manifest["key"]
    if plan.trainable != session.trainable:
        raise CacheError(
            f"{cache} was planned for training {list(plan.trainable)}, this run trains "
            f"{list(session.trainable)}; re-run stage 1 with the same --lora_base_model"
        )
    for name, digest in key["components"].items():
        if (session.model_root / name).is_dir() and fingerprint_component(session.model_root, name) != digest:
            raise CacheError(
                f"{cache} was made with other {name} weights than {session.model_root / name}; "
                f"re-run stage 1 (--task sft:data_process)"
            )
    if key.get("replay_device", session.device.type) != session.device.type:
        raise CacheError(
            f"{cache} holds units split inside, recorded on {key['replay_device']}; their replay needs "
            f"the same device type, this run is on {session.device.type}: re-run stage 1 with "
            f"--device {session.device.type} (or train with --device {key['replay_device']})"
        )
    if key.get("max_pixels") != config.data.max_pixels:
        raise CacheError(
            f"{cache} was made with --max_pixels {key.get('max_pixels')}, this run has "
            f"{config.data.max_pixels} (a preprocessing setting changed); re-run stage 1 or pass "
            f"--max_pixels {key.get('max_pixels')}"
        )
    check_sources(cache, reader, session)
    check_cached_plan(cache, reader, session)
    session.settings["cache_path"] = str(cache)
    return cache, dataclasses.replace(plan, settings=config.to_dict(), split=True)


def check_cached_plan(cache: Path, reader: CacheReader, session: Session) -> None:
    """Raise CacheError unless the cache's plan decides what the plan this run makes decides (its
    `cut_signature`: placements, split units, cached values), naming the first difference. A cache
    is untrusted input: stage 2 executes only a cut it chose itself (the cache's plan is kept for
    its measurements). When this run cannot plan as stage 1 did (see `replanning_session`), the
    cut is checked against the planner's rules for this run's graph instead, with a warning."""
    planning, why = replanning_session(reader, session)
    if planning is not None:
        problem = cut_difference(reader.plan.cut_signature(), plan_run(planning).cut_signature())
    else:
        log.info(
            "%s: this run cannot make its own plan to check the cache's against (%s); checking the "
            "cache's plan against the planner's rules for this graph only",
            cache,
            why,
        )
        problem = cut_rule_problem(
            reader.plan, session.graph, trained=session.trainable, layouts=graph_layouts(session.adapter)
        )
    if problem is not None:
        raise CacheError(
            f"{cache}: its plan is not the plan this run makes ({problem}); stage 2 runs only a "
            f"plan it made itself: re-run stage 1 (--task sft:data_process) with this run's settings"
        )


def replanning_session(reader: CacheReader, session: Session) -> tuple[Session | None, str]:
    """This run as stage 1 planned it: split, profiling the first sample of the dataset the cache
    was made from. (None, why) when that profile cannot be made here: the dataset is gone, or a
    component of the graph (a stage-1 model) is not in this run's model folder."""
    config = session.config
    info = reader.manifest.get("dataset", {})
    base = str(info.get("base_path") or "")
    data = dataclasses.replace(config.data, base_path=base, metadata_path=str(info.get("metadata_path") or ""))
    planning = dataclasses.replace(
        session, config=dataclasses.replace(config, data=data, train=dataclasses.replace(config.train, split=True))
    )
    if config.plan.profile == "none":  # planned from the units' declarations: nothing to profile
        return planning, ""
    if config.plan.profile == "real":  # re-measuring would build every model here, and measure other numbers
        return None, "--profile real: its plan came from measuring every model on stage 1's machine"
    if not base or not Path(base).is_dir():
        return None, f"the dataset it was made from, {base or '(not recorded)'}, is not here to profile"
    try:
        session.models.check_present(sorted({c for unit in session.graph for c in unit.components}))
    except ModelError as exc:
        return None, f"a model to profile is missing: {exc}"
    return planning, ""


def check_sources(cache: Path, reader: CacheReader, session: Session) -> None:
    """Raise CacheError if the dataset the cache was made from changed since (image bytes, captions,
    training sizes, samples added or removed). The cache records where that dataset was (stage 1
    knew it; `--dataset_base_path` of `sft:train` names the cache); skipped, with a warning, if the
    dataset is gone."""
    info = reader.manifest.get("dataset", {})
    base = Path(info.get("base_path") or "")
    if not info.get("base_path") or not base.is_dir():
        log.warning("dataset %s of cache %s is not here; cannot check the cache against it", base, cache)
        return
    metadata = Path(info["metadata_path"]) if info.get("metadata_path") else None
    samples = session.samples(base, metadata)
    fix = "re-run stage 1 (--task sft:data_process), or `autosplit run`, which updates only the changed samples"
    if len(samples) != len(reader):
        raise CacheError(f"{cache} holds {len(reader)} samples but dataset {base} now has {len(samples)}; {fix}")
    index = reader.index  # read and checked against the manifest when the reader opened the cache
    for i, sample in enumerate(samples):
        d = source_digest(sample)
        for what, mine, theirs in (
            ("image bytes", d.image, bytes(index["image_sha256"][i])),
            ("caption", d.prompt, bytes(index["prompt_sha256"][i])),
            ("training size", list(d.size), index["size"][i].tolist()),
        ):
            if mine != theirs:
                raise CacheError(
                    f"{cache} is stale: the {what} of sample {i} ({sample.image_path}) changed since stage 1; {fix}"
                )
