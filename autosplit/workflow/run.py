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

import torch

from autosplit.adapters.components import fingerprint_component
from autosplit.config import RunConfig, validation_prompts
from autosplit.data import source_digest
from autosplit.errors import CacheError, ConfigError, ModelError
from autosplit.plan import Plan
from autosplit.planning.plan_check import cut_difference, cut_rule_problem
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
from autosplit.training.validation import (
    FILE as VALIDATION_FILE,
)
from autosplit.training.validation import (
    ValidationJob,
    ValidationSettings,
    encode_prompts,
    encoding_metadata,
    prompt_rows,
    prompt_unit,
    read_encodings,
    read_metadata,
    recorded_size,
    sampling_of,
    stale_entry,
    write_encodings,
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
    check_validation(session)
    if session.mode == "train":
        cache, plan = training_cache(session)
        size = validation_size(session, cache=cache) if validation_prompts(config.train) else None
        plan = session.place_cached(plan, validation_size=size)  # this run's budget, the cache's measurements
        say_budget(plan, config.plan.vram_budget_gib)
        job = validation_job(session, plan, cache=cache)
        inputs = cache_inputs(plan, cache, reader_kind=config.cache.reader)
        return RunResult(plan, training=stage2(session, plan, inputs, validation=job))
    plan = plan_run(session)
    say_budget(plan, config.plan.vram_budget_gib)
    if session.mode == "data_process" and not plan.split:
        raise ConfigError("--task sft:data_process writes a cache; drop --no-split")
    samples = session.samples()
    if not plan.split:
        _process_state(session)  # each process's device is set before the stage-1 models are placed on it
        job = validation_job(session, plan, samples=samples)
        inputs = inline_inputs(
            plan,
            session.graph,
            samples,
            models=session.models,
            unit_settings=session.settings,
            shard_size=config.cache.shard_size,
        )
        return RunResult(plan, training=stage2(session, plan, inputs, validation=job))
    location = config.output_path if session.mode == "data_process" else cache_location(config)
    cache = local_path(location)
    manifest, skipped = stage1(session, plan, samples, cache, replace_stale=session.mode == "")
    job = validation_job(session, plan, samples=samples, cache=cache, write=True)
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
    return dataclasses.replace(result, training=stage2(session, plan, inputs, validation=job))


def stage1(
    session: Session, plan: Plan, samples: list[Any], cache: Path, *, replace_stale: bool
) -> tuple[dict[str, Any], bool]:
    """Stage 1 of `session` into the local folder `cache`: (the manifest, whether the cache was
    already complete and current, so nothing was encoded)."""
    result = run_stage1(session.stage1_job(plan, samples), cache, replace_stale=replace_stale)
    return result.manifest, result.skipped


def stage2(
    session: Session, plan: Plan, inputs: TrainInputs, *, validation: ValidationJob | None = None
) -> TrainResult:
    """Stage 2 (or the unsplit loop) of `session` on `inputs`, into `output_path`, sampling
    `validation`'s prompts as it goes."""
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
        validation=validation,
    )


def say_budget(plan: Plan, budget_gib: float) -> None:
    """Say (before any work) where stage 2's weights go and, with --vram_budget, whether the run
    about to be done fits: stage 2's predicted peak, or the unsplit one for --no-split."""
    for line in placement_lines(plan):
        log.info("%s", line)
    predicted = plan.predicted
    if "validation_peak_bytes" in predicted:
        gib = 1 << 30
        log.info(
            "validation images: the VAE decoder runs on %s; a round's predicted peak %.2f GiB (decoder %.2f GiB, "
            "decode %.2f GiB), training's %.2f GiB",
            predicted["validation_decoder_device"],
            predicted["validation_peak_bytes"] / gib,
            predicted["validation_decoder_bytes"] / gib,
            predicted["validation_decode_peak_bytes"] / gib,
            predicted["stage2_train_peak_bytes"] / gib,
        )
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


# --- validation images (docs/training.md): the prompts' encodings beside the cache ------------------


def check_validation(session: Session) -> None:
    """Before any work: ConfigError, naming the flag, for validation images this run cannot make."""
    train = session.config.train
    if not validation_prompts(train):
        return
    sampling_of(session.adapter)
    prompt_unit(session.adapter)
    if train.validation_decoder_device == "cuda" and session.device.type != "cuda":
        raise ConfigError(
            f"--set train.validation_decoder_device=cuda: this run is on {session.device.type}; use "
            f"train.validation_decoder_device=cpu (or auto)"
        )
    multiple = session.adapter.image_multiple
    if train.validation_width % multiple or train.validation_height % multiple:
        raise ConfigError(
            f"train.validation_width={train.validation_width}, train.validation_height={train.validation_height}: "
            f"{session.adapter.name} samples sizes that are multiples of {multiple} pixels; e.g. "
            f"{train.validation_width // multiple * multiple or multiple}x"
            f"{train.validation_height // multiple * multiple or multiple}"
        )


def validation_size(
    session: Session, *, samples: list[Any] | None = None, cache: Path | None = None
) -> tuple[int, int]:
    """The validation images' (width, height): train.validation_width/height, else the size the
    cached encodings were made for, else the training size of the dataset's first sample (with
    `--task sft:train`, of the dataset the cache was made from). Raises ConfigError when that
    dataset is gone."""
    train = session.config.train
    if train.validation_width:
        return train.validation_width, train.validation_height
    recorded = recorded_size(cache / VALIDATION_FILE) if cache is not None else None
    if recorded is not None:
        return recorded
    if samples is None and session.mode == "train" and cache is not None:
        info = CacheReader(cache).manifest.get("dataset", {})
        base = Path(info.get("base_path") or "")
        if not info.get("base_path") or not base.is_dir():
            raise ConfigError(
                f"--validation_prompt: the dataset {base} that {cache} was made from is not here to take the "
                f"training size from; pass --set train.validation_width=W --set train.validation_height=H"
            )
        samples = session.samples(base, Path(info["metadata_path"]) if info.get("metadata_path") else None)
    samples = samples if samples is not None else session.samples()
    width, height = samples[0].size
    return width, height


def validation_settings(session: Session, plan: Plan, size: tuple[int, int]) -> ValidationSettings:
    """This run's validation images, resolved: the family's guidance unless given, and the decoder
    on the device the plan chose (`validation_decoder_device`), else on the GPU only without a
    budget to check it against."""
    train = session.config.train
    decided = plan.predicted.get("validation_decoder_device")
    if decided is None:
        asked = train.validation_decoder_device
        on_gpu = session.device.type == "cuda" and (
            asked == "cuda" or (asked == "auto" and not session.config.plan.vram_budget_gib)
        )
        decided = "cuda" if on_gpu else "cpu"
    return ValidationSettings(
        prompts=tuple(validation_prompts(train)),
        negative_prompt=train.validation_negative_prompt,
        every_steps=train.validation_steps,
        num_images=train.num_validation_images,
        num_steps=train.validation_num_inference_steps,
        guidance_scale=train.validation_guidance_scale or sampling_of(session.adapter).default_guidance,
        seed=train.validation_seed,
        width=size[0],
        height=size[1],
        decoder_device=session.device if decided == "cuda" else torch.device("cpu"),
    )


def validation_job(
    session: Session,
    plan: Plan,
    *,
    samples: list[Any] | None = None,
    cache: Path | None = None,
    write: bool = False,
) -> ValidationJob | None:
    """What stage 2 samples (None without validation prompts). A split run whose prompt unit runs in
    stage 1 reads the prompts' encodings from `cache/validation.safetensors`; with `write` (after
    stage 1) the main process first encodes them there if they are missing or stale, with the
    stage-1 text encoder; otherwise (`--task sft:train`) stale ones are a CacheError. Unsplit runs,
    and runs training a text encoder, encode them in stage 2 (no encodings here)."""
    if not validation_prompts(session.config.train):
        return None
    settings = validation_settings(session, plan, validation_size(session, samples=samples, cache=cache))
    unit = prompt_unit(session.adapter)
    if cache is None or not plan.split or all(c in plan.components(2) for c in unit.components):
        return ValidationJob(settings)
    path = cache / VALIDATION_FILE
    expected = encoding_metadata(
        session.adapter, settings, dtype=session.dtype, fingerprints=_encoder_fingerprints(session, unit, cache)
    )
    if write and _is_main_process() and stale_entry(read_metadata(path), expected) is not None:
        rows = prompt_rows(session.adapter, settings.prompts, settings.negative_prompt)
        encoders = session.models.load(list(unit.components))
        encodings = encode_prompts(session.adapter, rows, encoders, device=session.device, dtype=session.dtype)
        del encoders
        write_encodings(path, encodings, expected)
        log.info("validation: %d prompt(s) encoded into %s", len(settings.prompts), path)
    if session.mode == "data_process" or not _is_main_process():
        return ValidationJob(settings)  # only the main process samples
    return ValidationJob(settings, read_encodings(path, expected))


def _encoder_fingerprints(session: Session, unit: Any, cache: Path) -> dict[str, str]:
    """The prompt unit's components' fingerprints: of the model folder's, or where the folder lacks
    one (stage 2 needs no text encoder), the cache's record of the one stage 1 used."""
    recorded = CacheReader(cache).manifest.get("key", {}).get("components", {})
    return {
        name: fingerprint_component(session.model_root, name)
        if (session.model_root / name).is_dir()
        else str(recorded.get(name, ""))
        for name in unit.components
    }
