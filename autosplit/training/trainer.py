"""Stage 2 (and unsplit) training: accelerate for devices and precision, peft for LoRA.

Split runs read the stage-1 values from the cache; unsplit runs (`train.split = false`) compute
them every step from the dataset with the stage-1 components resident. Everything after that is
the same code, which is why the two learn the same weights.

Under `accelerate launch --num_processes N` the model is wrapped in DDP: each rank reads its own
shards, every rank runs the same number of batches, gradients are all-reduced, the logged loss is
the mean over ranks, and only the main process writes plan.json, the log, checkpoints and weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosplit.config import DataConfig, LoraConfig, TrainConfig
from autosplit.data import Sample
from autosplit.errors import CheckpointError, ConfigError, TrainingError
from autosplit.graph import UnitContext, UnitGraph, run_units
from autosplit.plan import Plan
from autosplit.planning.stages import stage_units
from autosplit.storage.codec import decode_sources
from autosplit.storage.loader import PrefetchLoader, collate, to_device
from autosplit.storage.readers import open_reader
from autosplit.tasks import check_step_settings, step_settings
from autosplit.training.checkpoint import (
    TrainState,
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from autosplit.training.lora import make_trainable, save_trained
from autosplit.training.optim import LrSchedule, check_optimizer_device, grad_norm, make_optimizer
from autosplit.training.placement import ComponentSource, place_denoiser, weight_placement
from autosplit.training.rng import step_generator
from autosplit.training.stage1 import Progress, compute_sample, stage_context
from autosplit.training.swap import BlockSwapper
from autosplit.training.tracking import RunLog, tracker_kwargs
from autosplit.training.validation import ValidationJob, Validator

log = logging.getLogger(__name__)

#: debugging: a folder where each rank appends the sample indices of every batch it trains on
#: (`rank-R.jsonl`: epoch, micro_step, samples)
TRACE_ENV = "AUTOSPLIT_TRACE_SAMPLES"


@dataclass(frozen=True)
class TrainResult:
    steps: int
    losses: list[float]
    output: Path
    seconds: float
    #: false on the other ranks of a multi-process run (they write nothing)
    is_main_process: bool = True


@dataclass(frozen=True)
class TrainInputs:
    """Where stage 2's samples come from: the cache (split) or the dataset with stage 1 run inline
    every step (unsplit)."""

    #: sample index -> its values (a cached sample, or a dataset `Sample` for `inline`)
    read: Callable[[int], Any]
    #: each sample's shape bucket: a batch holds one bucket
    bucket_keys: Sequence[Hashable]
    #: the loader's list of read samples -> one batch
    make_batch: Callable[[list[Any]], Any]
    #: samples per shard (the unit of the epoch order and of the ranks' split)
    shard_size: int
    #: unsplit: runs the stage-1 units on a batch of samples, every step
    inline: Callable[[list[Sample]], dict[str, Any]] | None = None
    #: the cache reader's asynchronous batch read, if it has one
    submit: Callable[[list[int]], Any] | None = None
    #: unsplit: the stage-1 components it holds (validation images encode and decode with them)
    components: Mapping[str, Any] = field(default_factory=dict)


def cache_inputs(plan: Plan, cache_path: Path, *, reader_kind: str) -> TrainInputs:
    """Stage 2 reads the cached values of `plan` from the cache at `cache_path`."""
    ragged = {v.name: v.ragged_axis for v in plan.cached if v.ragged_axis is not None}
    reader = open_reader(cache_path, kind=reader_kind)
    sources = plan.python_values()  # dataset sources and Python values units return: lists again
    return TrainInputs(
        reader.read,
        reader.bucket_keys,
        lambda items: decode_sources(collate(items, ragged), sources),
        reader.shard_size,
        submit=getattr(reader, "submit", None),
    )


def inline_inputs(
    plan: Plan,
    graph: UnitGraph,
    samples: list[Sample],
    *,
    models: ComponentSource,
    unit_settings: Mapping[str, Any],
    shard_size: int,
) -> TrainInputs:
    """Unsplit: stage 2 computes the values stage 1 would have cached, every step, from `samples`."""
    ragged = {v.name: v.ragged_axis for v in plan.cached if v.ragged_axis is not None}
    units, ctx = stage_context(plan, graph, models=models, unit_settings=unit_settings)
    names = [v.name for v in plan.cached]

    def run_stage1_inline(items: list[Sample]) -> dict[str, Any]:
        return collate([compute_sample(units, s, ctx, names, to_cpu=False) for s in items], ragged)

    return TrainInputs(
        samples.__getitem__,
        [s.bucket for s in samples],
        list,
        shard_size,
        inline=run_stage1_inline,
        components=ctx.components,
    )


class _VariantPicker:
    """Maps sample i to row K*i + v of the K cached variants, v a pure function of (seed, epoch, i)."""

    def __init__(self, variants: int, seed: int):
        self.variants, self.seed, self.loader = variants, seed, None

    def __call__(self, i: int) -> int:
        if self.variants <= 0:
            return i
        epoch = self.loader.epoch if self.loader is not None else 0
        v = np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0] % self.variants
        return i * self.variants + int(v)


def _one_variant_per_epoch(read: Any, buckets: Sequence[Hashable], submit: Any, variants: int, seed: int) -> tuple:
    pick = _VariantPicker(variants, seed)
    if variants <= 0:
        return read, buckets, submit, pick
    wrapped_submit = None if submit is None else (lambda indices: submit([pick(i) for i in indices]))
    return (lambda i: read(pick(i))), list(buckets)[::variants], wrapped_submit, pick


#: LoRA settings a resumed run may change: the extra file format written at the end, and the file
#: the first run started from (the checkpoint holds the weights since)
_NOT_RESUMED_LORA_KEYS = ("format", "checkpoint")


#: train settings of the optimizer, schedule and objective a resumed run must keep; recorded only
#: when not at their defaults, so that checkpoints written before they existed still resume
_OPTIMIZATION_KEYS = (
    "optimizer",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    "max_grad_norm",
    "timestep_sampling",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "sigmoid_scale",
    "weighting_scheme",
    "guidance_scale",
)


def resume_settings(
    train: TrainConfig, lora: LoraConfig, data: DataConfig, *, shard_size: int, dtype: torch.dtype
) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it (epochs and max_steps may
    grow, unless the learning-rate schedule depends on the run's length: `LrSchedule`)."""
    train_keys = ("learning_rate", "batch_size", "gradient_accumulation_steps", "seed", "mixed_precision")
    default = TrainConfig()
    return {
        **{f"train.{k}": getattr(train, k) for k in train_keys},
        **{f"train.{k}": getattr(train, k) for k in _OPTIMIZATION_KEYS if getattr(train, k) != getattr(default, k)},
        **{f"lora.{k}": v for k, v in vars(lora).items() if k not in _NOT_RESUMED_LORA_KEYS},
        "data.repeat": data.repeat,
        "data.shuffle_window": data.shuffle_window,
        "shard_size": shard_size,
        "model.dtype": str(dtype),
    }


def train(
    plan: Plan,
    graph: UnitGraph,
    inputs: TrainInputs,
    output: Path,
    *,
    models: ComponentSource,
    trained: tuple[str, ...],
    train: TrainConfig,
    lora: LoraConfig,
    data: DataConfig,
    variants: int,
    unit_settings: Mapping[str, Any],
    validation: ValidationJob | None = None,
) -> TrainResult:
    """Run stage 2 (or the unsplit loop) and write `output/lora.safetensors` (or the full weights).

    `trained` lists the trained components, the denoiser first; `variants` is the number of cached
    augmentation variants per sample (`cache.variants`); `unit_settings` reach the units through
    their context. With `train.checkpoint_every`, checkpoints go to `output/checkpoints/step-N/`;
    with `train.resume`, the run continues from the newest one exactly as if it had never stopped.
    With `validation`, the main process samples its prompts every `validation_steps` optimizer steps
    and after the last (autosplit.training.validation), without changing what is trained.
    Raises CheckpointError for `train.resume = "yes"` without a checkpoint, and ConfigError when
    an optimizer step needs more micro-batches than an epoch has, both before anything is written.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    cfg = train
    resume_from = checkpoint_to_resume(cfg.resume, output)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
    accelerator = Accelerator(
        cpu=models.device.type == "cpu",
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        kwargs_handlers=[ddp],
        **tracker_kwargs(cfg.report_to, output),
    )
    device = accelerator.device
    check_optimizer_device(cfg, device)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(uses_cudnn_attention(cfg.cudnn_attention, models.adapter))
    placement = weight_placement(plan, models.adapter, trained[0])
    with _out_of_memory_as_error(plan, device, stage="loading the models"):
        components = models.load(
            plan.components(2), device=device, on_host=(trained[0],) if placement.on_host_first else ()
        )
        params = [
            p
            for name in trained
            for p in make_trainable(
                components[name],
                name,
                lora=lora,
                adapter=models.adapter,
                denoiser=name == trained[0],
                seed=cfg.seed,
                gradient_checkpointing=cfg.gradient_checkpointing,
            )
        ]
        swapper = place_denoiser(components[trained[0]], placement, device=device)
        if compiles_blocks(
            cfg.compile,
            components[trained[0]],
            device=device,
            placement=placement,
            adapter=models.adapter,
            measured_run=plan.task == "sft" and not lora.full_finetune and cfg.gradient_checkpointing,
        ):
            components[trained[0]].compile_repeated_blocks(fullgraph=False)  # compiled at the first step
            logging.getLogger(__name__).info(  # (`log` is the step log in this function)
                "stage 2: torch.compile of %s's repeated blocks (train.compile=%s): the first step compiles "
                "them (tens of seconds), the others run faster",
                trained[0],
                cfg.compile,
            )
    settings_of_step = {**unit_settings, **step_settings(cfg)}
    check_step_settings(graph, components.get("scheduler"), settings_of_step)
    optimizer = make_optimizer(params, cfg)
    schedule_optimizer = optimizer  # the schedule steps the optimizer itself, not accelerate's wrapper
    # the models are on their devices already (the swapped blocks' frozen weights on the host)
    *prepared, optimizer = accelerator.prepare(
        *[components[name] for name in trained], optimizer, device_placement=[False] * len(trained) + [True]
    )
    components.update(zip(trained, prepared))
    read, buckets, submit, pick = _one_variant_per_epoch(
        inputs.read, inputs.bucket_keys, inputs.submit, variants, cfg.seed
    )
    loader = PrefetchLoader(
        read,
        buckets,
        make_batch=inputs.make_batch,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        repeat=data.repeat,
        num_workers=data.num_workers,
        prefetch=data.prefetch,
        shard_size=inputs.shard_size,
        window=data.shuffle_window,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        pin_memory=device.type == "cuda",
        submit_batch=submit,
    )
    pick.loader = loader
    _check_accumulation(len(loader), train=cfg, repeat=data.repeat, world_size=accelerator.num_processes)
    whole_run = _planned_steps(
        loader, done=0, num_epochs=cfg.num_epochs, max_steps=cfg.max_steps, accumulation=cfg.gradient_accumulation_steps
    )
    lr_schedule = LrSchedule(schedule_optimizer, cfg, num_training_steps=whole_run)
    units = stage_units(plan, graph, 2)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "plan.json").write_text(plan.to_json())
    model = trained_modules({name: accelerator.unwrap_model(components[name]) for name in trained})
    settings = resume_settings(cfg, lora, data, shard_size=loader.shard_size, dtype=models.dtype)
    state = _maybe_resume(
        resume_from, accelerator, model, optimizer, loader, settings=settings, lr_schedule=lr_schedule
    )
    log, micro, start = list(state.log), state.micro_step, time.perf_counter()
    total = _planned_steps(
        loader,
        done=len(log),
        num_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        accumulation=cfg.gradient_accumulation_steps,
    )
    step_seconds: list[float] = []
    samples_in_step, lr, norm = 0, 0.0, 0.0
    accelerator.step = micro  # gradient accumulation continues its cycle

    def checkpoint() -> None:
        if cfg.checkpoint_every and accelerator.is_main_process:
            if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
                raise TrainingError(
                    f"stage 2: the weights hold NaN or inf after step {len(log)}, so no checkpoint "
                    f"is written (earlier ones are kept). Lower --learning_rate, or train in "
                    f"float32 (--dtype float32) to find the op"
                )
            state = TrainState(len(log), micro, loader.epoch, loader.state_dict(), log, settings)
            save_checkpoint(
                output,
                model=model,
                optimizer=optimizer,
                keep=cfg.checkpoints_kept,
                state=state,
                lr_schedule=lr_schedule,
            )

    run_log = RunLog(accelerator, output, log, report_to=cfg.report_to, hparams=_hparams(cfg, lora))
    validator = None
    if validation is not None and accelerator.is_main_process:
        validator = _validator(
            validation, accelerator, components, inputs, trained, models=models, output=output, settings=unit_settings
        )

    def validate() -> None:
        assert validator is not None  # called only with validation images
        with _out_of_memory_as_error(plan, device, stage=f"sampling the validation images at step {len(log)}"):
            validator.run(len(log), run_log)

    trainable = [p for p in model.parameters() if p.requires_grad]
    trace = _open_trace(accelerator.process_index)
    stop = cfg.max_steps or None  # otherwise every batch of every epoch
    tick = time.perf_counter()
    training = _out_of_memory_as_error(plan, device, stage=lambda: f"training step {len(log) + 1}")
    with (
        training,
        Progress(
            total=total,
            initial=len(log),
            desc="stage 2: training",
            unit="step",
            every_s=cfg.log_every_s if accelerator.is_main_process else None,
        ) as progress,
    ):
        for epoch in range(state.epoch, cfg.num_epochs):
            if stop and len(log) >= stop:
                break
            num_batches = len(loader.batches(epoch))
            for batch in loader.iter_epoch(epoch):
                if trace is not None:
                    trace.write(json.dumps({"epoch": epoch, "micro_step": micro, "samples": loader.current}) + "\n")
                if inputs.inline is not None:
                    batch = inputs.inline(batch)
                batch = to_device(batch, device)
                samples_in_step += len(loader.current) * accelerator.num_processes
                with accelerator.accumulate(*prepared):
                    generator = step_generator(cfg.seed, micro, accelerator.process_index)
                    ctx = UnitContext(
                        components, device, models.dtype, generator=generator, settings=dict(settings_of_step)
                    )
                    loss = run_units(units, batch, ctx)[graph.loss]
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        norm = _clip_or_measure(accelerator, trainable, cfg.max_grad_norm)
                        lr = lr_schedule.lr
                    optimizer.step()
                    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                        lr_schedule.step()
                    optimizer.zero_grad()
                micro += 1
                if accelerator.sync_gradients:
                    mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()  # = loss on 1 process
                    if not math.isfinite(mean_loss):
                        raise TrainingError(
                            f"stage 2: the loss is {mean_loss} at step {len(log) + 1} (epoch {epoch}), so the weights "
                            f"are not saved (earlier checkpoints, all finite, are kept). Lower --learning_rate, or "
                            f"train in float32 (--dtype float32) to find the op"
                        )
                    step_seconds.append(time.perf_counter() - tick)
                    tick = time.perf_counter()
                    log.append({"step": len(log) + 1, "epoch": epoch, "loss": mean_loss, "lr": lr, "grad_norm": norm})
                    run_log.log_step(log[-1], _step_scalars(log[-1], samples_in_step / step_seconds[-1], device))
                    samples_in_step = 0
                    progress.update(1, loss=f"{mean_loss:.4f}")
                    if validator is not None and validator.due(len(log)):
                        validate()  # before the step's checkpoint
                    last = len(log) == stop or (epoch == cfg.num_epochs - 1 and loader.position == num_batches)
                    if cfg.checkpoint_every and len(log) % cfg.checkpoint_every == 0 and not last:
                        checkpoint()  # the last one is written after the loop
                    if len(log) == stop:
                        break
        if validator is not None and validator.last_step != len(log):
            validate()  # after the last step
    run_log.close()
    if trace is not None:
        trace.close()
    if swapper is not None:
        swapper.close()
    checkpoint()
    digest = save_trained(
        {name: accelerator.unwrap_model(components[name]) for name in trained},
        output,
        adapter=models.adapter,
        full_finetune=lora.full_finetune,
        write=accelerator.is_main_process,
        lora_format=lora.format,
    )
    _log_stats(
        accelerator, device, steps=len(log) - state.step, step_seconds=step_seconds, digest=digest, swapper=swapper
    )
    return TrainResult(
        len(log), [entry["loss"] for entry in log], output, time.perf_counter() - start, accelerator.is_main_process
    )


def _validator(
    job: ValidationJob,
    accelerator: Any,
    components: Mapping[str, Any],
    inputs: TrainInputs,
    trained: tuple[str, ...],
    *,
    models: ComponentSource,
    output: Path,
    settings: Mapping[str, Any],
) -> Validator:
    """The validation rounds of this run: the trained components unwrapped, beside every other
    component the run holds; a VAE it does not hold is loaded on the host (in float32 when it
    decodes on the CPU)."""
    available = {**inputs.components, **components, **{n: accelerator.unwrap_model(components[n]) for n in trained}}
    dtype = models.dtype if job.settings.decoder_device.type == "cuda" else torch.float32

    def load_vae() -> Any:
        return replace(models, dtype=dtype).load(["vae"], device=torch.device("cpu"))["vae"]

    return Validator(
        job,
        adapter=models.adapter,
        components=available,
        trained=trained,
        load_vae=load_vae,
        device=accelerator.device,
        dtype=models.dtype,
        output=output,
        unit_settings=settings,
    )


def _clip_or_measure(accelerator: Any, params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' total norm to `max_norm` through accelerate (0: leave them), and return
    their norm before clipping, unscaled (fp16)."""
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    scaler = getattr(accelerator, "scaler", None)
    return grad_norm(params, scale=float(scaler.get_scale()) if scaler is not None else 1.0)


def _step_scalars(entry: dict[str, Any], samples_per_s: float, device: torch.device) -> dict[str, float]:
    """What the trackers get each optimizer step: loss, rate, gradient norm, throughput, peak memory
    (the GPU's allocated peak, or on the CPU the process's peak resident memory), in bytes."""
    import resource

    scalars = {
        "train/loss": entry["loss"],
        "train/lr": entry["lr"],
        "train/grad_norm": entry["grad_norm"],
        "train/samples_per_s": samples_per_s,
    }
    if device.type == "cuda":
        scalars["memory/peak_allocated_bytes"] = float(torch.cuda.max_memory_allocated(device))
    else:
        scalars["memory/host_peak_rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return scalars


def _hparams(train: TrainConfig, lora: LoraConfig) -> dict[str, Any]:
    """The settings trackers record with the run."""
    return {**{f"train.{k}": v for k, v in vars(train).items()}, **{f"lora.{k}": v for k, v in vars(lora).items()}}


def compiles_blocks(
    mode: str, model: Any, *, device: torch.device, placement: Any, adapter: Any = None, measured_run: bool = False
) -> bool:
    """Whether stage 2 compiles the denoiser's repeated blocks (`train.compile`): "blocks" always
    (ConfigError for a model without diffusers' `_repeated_blocks`), "none" never, "auto" where it
    was measured: on CUDA with Triton, for a family whose adapter says `compile_blocks = True`
    (Qwen-Image, FLUX), in a run like the measured ones (`measured_run`: sft LoRA with gradient
    checkpointing), with the weights placed plainly (no swapped block, no fp8: hooks and custom
    autograd functions inside a compiled block are not measured)."""
    repeated = bool(getattr(model, "_repeated_blocks", None)) and hasattr(model, "compile_repeated_blocks")
    if mode == "blocks" and not repeated:
        raise ConfigError(
            f"--set train.compile=blocks: {type(model).__name__} declares no repeated blocks to compile "
            f"(diffusers' _repeated_blocks); use train.compile=none"
        )
    if mode == "auto":
        from torch.utils._triton import has_triton

        measured = bool(getattr(adapter, "compile_blocks", False)) and measured_run
        return repeated and measured and device.type == "cuda" and not placement.on_host_first and has_triton()
    return mode == "blocks"


def uses_cudnn_attention(mode: str, adapter: Any) -> bool:
    """Whether stage 2 lets SDPA take cuDNN's attention (`train.cudnn_attention`, process-wide:
    every model stage 2 runs): "auto" where the family's adapter measured it correct and faster for
    its denoiser (`cudnn_attention = True`: Qwen-Image), else as given."""
    if mode == "auto":
        return bool(getattr(adapter, "cudnn_attention", False))
    return mode == "true"


def _planned_steps(loader: PrefetchLoader, *, done: int, num_epochs: int, max_steps: int, accumulation: int) -> int:
    """Optimizer steps of the whole run, for the progress bar: those done, those left in the current
    epoch, then full epochs (of the current epoch's normal length), at most `max_steps`."""
    left = (len(loader) - loader.position) // accumulation
    full = len(epoch_batches_of(loader, loader.epoch)) // accumulation
    total = done + left + (num_epochs - loader.epoch - 1) * full
    return min(total, max_steps) if max_steps else total


def epoch_batches_of(loader: PrefetchLoader, epoch: int) -> list[list[int]]:
    """`loader`'s batches of a normal (not resumed-on-another-world-size) `epoch`."""
    history, loader.history = loader.history, []
    try:
        return loader.batches(epoch)
    finally:
        loader.history = history


def _log_stats(
    accelerator: Any,
    device: torch.device,
    *,
    steps: int,
    step_seconds: list[float],
    digest: str,
    swapper: BlockSwapper | None = None,
) -> None:
    """One JSON line per rank: steps, step times (s), peak CUDA memory (bytes), weights digest, the
    process's peak host memory (bytes) and, when blocks are swapped, what the swapper moved."""
    import resource

    stats = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "steps": steps,
        "step_s_median": float(np.median(step_seconds)) if step_seconds else None,
        "step_s_mean_after_first": float(np.mean(step_seconds[1:])) if len(step_seconds) > 1 else None,
        "weights_sha256": digest,
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if swapper is not None:
        stats["swap"] = {
            "blocks": len(swapper.swapped),
            "host_bytes": swapper.host_bytes,
            "slot_bytes": swapper.slot_bytes,
            "copies": swapper.stats.copies,
            "copied_bytes": swapper.stats.bytes,
        }
    if device.type == "cuda":
        memory = torch.cuda.memory_stats(device)
        stats["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        stats["peak_reserved_bytes"] = memory.get("reserved_bytes.all.peak", 0)
        stats["alloc_retries"] = memory.get("num_alloc_retries", 0)  # cache flushes at the memory limit
    log.info("stage 2 stats %s", json.dumps(stats))


@contextmanager
def _out_of_memory_as_error(plan: Plan, device: torch.device, *, stage: str | Callable[[], str]) -> Iterator[None]:
    """A CUDA out-of-memory error becomes one line: what the plan predicted, the budget, the fix."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        where = stage() if callable(stage) else stage
        raise TrainingError(out_of_memory_message(plan, device, stage=where, detail=str(exc))) from None


def out_of_memory_message(plan: Plan, device: torch.device, *, stage: str, detail: str = "") -> str:
    """The one-line TrainingError of stage 2 running out of GPU memory (see `_out_of_memory_as_error`)."""
    gib = 1 << 30
    placed = plan.predicted.get("placement") or {}
    swapped, total = int(placed.get("blocks_to_swap") or 0), placed.get("num_blocks")
    peak = placed.get("judged_peak_bytes") or plan.predicted.get(
        "stage2_peak_bytes" if plan.split else "unsplit_peak_bytes"
    )
    budget = placed.get("vram_budget_bytes") or 0
    free = ""
    if device.type == "cuda":
        _, total_bytes = torch.cuda.mem_get_info(device)
        free = f" (the GPU has {total_bytes / gib:.1f} GiB)"
    predicted = (
        f"the plan predicted a peak of {peak / gib:.2f} GiB" if peak else "the plan made no prediction (--profile none)"
    )
    blocks = (
        f" with {swapped} of {total} blocks swapped"
        if total
        else (f" with {swapped} blocks swapped" if swapped else "")
    )
    said = f", under --vram_budget {budget / gib:g} GiB" if budget else ", and no --vram_budget was given"
    if budget and peak and peak <= budget:
        fix = (
            f"this process gets less GPU memory than --vram_budget {budget / gib:g} GiB{free}: pass a --vram_budget "
            f"a few GiB below what it gets, with --blocks_to_swap auto"
        )
    else:
        fix = (
            f"pass --vram_budget with this GPU's memory in GiB{free} and --blocks_to_swap auto (the planner then "
            f"keeps what does not fit in host memory; needs --use_gradient_checkpointing), or --blocks_to_swap N "
            f"for more than {swapped}"
        )
    cuda = detail.splitlines()[0][:160] if detail else ""
    return f"stage 2 ran out of GPU memory while {stage} ({cuda}): {predicted}{blocks}{said}; {fix}"


def checkpoint_to_resume(resume: str, output: Path) -> Path | None:
    """The checkpoint `train.resume` continues from, or None to start from step 0. Raises
    CheckpointError for "yes" (--resume) when `output` holds no checkpoint."""
    if resume == "no":
        return None
    path = latest_checkpoint(output)
    if path is None and resume == "yes":
        raise CheckpointError(
            f"--resume: no checkpoint in {checkpoint_root(output)}; drop --resume to start from "
            f"step 0, or pass --set train.resume=auto to continue only where a checkpoint exists"
        )
    if path is None:
        log.info("train.resume=auto: no checkpoint in %s; starting from step 0", checkpoint_root(output))
    return path


def _check_accumulation(num_batches: int, *, train: TrainConfig, repeat: int, world_size: int) -> None:
    """Raise ConfigError when one optimizer step needs more micro-batches than the whole run has on
    each process (accumulation carries across epochs, so only then would no step complete)."""
    accumulation = train.gradient_accumulation_steps
    if num_batches == 0:
        raise ConfigError(
            f"stage 2: an epoch has no batch on some of the {world_size} process(es): the dataset has "
            f"fewer shards than processes; launch fewer processes or lower cache.shard_size"
        )
    total = num_batches * train.num_epochs
    if accumulation <= total:
        return
    raise ConfigError(
        f"--gradient_accumulation_steps {accumulation} is more than the {total} batches of the whole "
        f"run on each process ({train.num_epochs} epoch(s) of {num_batches}: --batch_size "
        f"{train.batch_size}, --dataset_repeat {repeat}, {world_size} process(es)), so no optimizer "
        f"step would complete; pass --gradient_accumulation_steps {total} or less, more --num_epochs, "
        f"a smaller --batch_size or a larger --dataset_repeat"
    )


def _maybe_resume(
    path: Path | None,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    loader: PrefetchLoader,
    *,
    settings: dict[str, Any],
    lr_schedule: LrSchedule,
) -> TrainState:
    if path is None:
        return TrainState(0, 0, 0, loader.state_dict(), [], settings)
    state = load_checkpoint(
        path, model=accelerator.unwrap_model(model), optimizer=optimizer, settings=settings, lr_schedule=lr_schedule
    )
    try:
        loader.load_state_dict(state.loader)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}; resume with the same data settings") from exc
    log.info("resuming from %s (step %d)", path, state.step)
    saved_world = state.loader.get("world_size", loader.world_size)
    if saved_world != loader.world_size:
        log.info(
            "the checkpoint was written by %d processes, this run has %d: epoch %d ends with the %d batches "
            "per process that no process had reached",
            saved_world,
            loader.world_size,
            state.epoch,
            len(loader),
        )
    return state


def _open_trace(rank: int) -> Any:
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return (Path(folder) / f"rank-{rank}.jsonl").open("a", buffering=1)


def trained_modules(models: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """What checkpoints save and restore: the trained component itself, or, when a text encoder
    trains too, a ModuleDict of them (parameter names prefixed with the component; `models` keeps
    the trained order, the denoiser first)."""
    return next(iter(models.values())) if len(models) == 1 else torch.nn.ModuleDict(models)
