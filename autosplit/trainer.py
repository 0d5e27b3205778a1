"""Stage 2 (and unsplit) training: accelerate for devices and precision, peft for LoRA.

Split runs read the stage-1 values from the cache; unsplit runs (`train.split = false`) compute
them every step from the dataset with the stage-1 components resident. Everything after that is
the same code, which is why the two learn the same weights.

Under `accelerate launch --num_processes N` the model is wrapped in DDP: each rank reads its own
shards, every rank runs the same number of batches, gradients are all-reduced, the logged loss is
the mean over ranks, and only the main process writes plan.json, the log, checkpoints and weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from autosplit.adapters.base import empty_component, save_lora
from autosplit.cache import open_reader
from autosplit.checkpoint import TrainState, checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint
from autosplit.data import Sample
from autosplit.errors import CheckpointError, ConfigError, TrainingError
from autosplit.graph import UnitContext, run_units
from autosplit.loader import PrefetchLoader, collate, decode_sources, to_device
from autosplit.models import load_components
from autosplit.planner import SOURCE, Plan
from autosplit.session import Session, check_components_present
from autosplit.stage1 import compute_sample, stage1_context

log = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "lora.safetensors"
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


def step_generator(seed: int, micro_step: int, rank: int = 0) -> torch.Generator:
    """The RNG of one micro-step on one rank: a pure function of (seed, step, rank), so resumes and
    split/unsplit runs draw the same noise and timesteps, and ranks draw different ones."""
    entropy = [seed, micro_step] if rank == 0 else [seed, micro_step, rank]  # rank 0: as one-process runs
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors' dtypes, shapes and bytes, in name order: equal digests mean bit-identical
    weights. Names are not hashed, so the saved LoRA file (its keys prefixed with the component)
    digests as the state dict does. Ranks of a DDP run log theirs to show they agree."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_lora_targets(model: torch.nn.Module, targets: list[str], *, component: str) -> None:
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--lora_target_modules: {unknown} match no module of {component}; "
                          f"Linear module names there include {leaves[:12]}")


#: a text encoder's LoRA targets when `lora.text_encoder_target_modules` is empty: the attention
#: projections it has (Qwen2.5-VL and CLIP: q/k/v_proj + o_proj/out_proj; T5: q, k, v, o)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "q", "k", "v", "o")


def lora_targets(session: Session, component: str, model: torch.nn.Module | None = None) -> list[str]:
    """`--lora_target_modules` (the denoiser) or `lora.text_encoder_target_modules`, or the default
    list when empty: the family's for the denoiser; for a text encoder, the projections `model` has."""
    lora = session.config.lora
    denoiser = component == session.trainable[0]
    given = lora.target_modules if denoiser else lora.text_encoder_target_modules
    targets = [t.strip() for t in given.split(",") if t.strip()]
    if targets:
        return targets
    if denoiser:
        return list(session.adapter.default_lora_targets)
    names = {name.rsplit(".", 1)[-1] for name, m in (model.named_modules() if model is not None else ())
             if isinstance(m, torch.nn.Linear)}
    return [t for t in TEXT_ENCODER_TARGETS if t in names]


def check_trainable_early(session: Session) -> None:
    """Check the LoRA target modules on a weightless copy of each trained component, so a typo
    fails before stage 1 rather than after it."""
    if session.config.lora.full_finetune:
        return
    check_components_present(session, list(session.trainable))
    for name in session.trainable:
        model = empty_component(session.adapter, session.model_root, name)
        check_lora_targets(model, lora_targets(session, name, model), component=name)


def make_trainable(session: Session, model: torch.nn.Module, component: str) -> list[torch.nn.Parameter]:
    """Attach the LoRA (or unfreeze for full fine-tuning); return the trainable parameters (fp32)."""
    lora = session.config.lora
    if lora.full_finetune:
        model.requires_grad_(True)
    else:
        from peft import LoraConfig

        targets = lora_targets(session, component, model)
        check_lora_targets(model, targets, component=component)
        torch.manual_seed(session.config.train.seed)  # LoRA init draws from the global RNG
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, target_modules=targets)
        if component == session.trainable[0]:
            model.add_adapter(config)  # diffusers' PEFT integration
        else:  # a transformers text encoder: peft directly (transformers' add_adapter wants a newer peft)
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, model, adapter_name="default")
            model.peft_config = {"default": config}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # train in fp32 even when the frozen weights are bf16
        p.data = p.data.float()
    if session.config.train.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()  # diffusers models; a text encoder keeps its activations
    model.train()
    return params


def _sample_reader(session: Session, plan: Plan, cache_path: Path | None, samples: list[Sample] | None):
    """(read_sample, bucket keys, make_batch, per-step stage-1 runner or None, shard size, async submit or None)."""
    ragged = {v.name: v.ragged_axis for v in plan.cached if v.ragged_axis is not None}
    if plan.split:
        reader = open_reader(cache_path, kind=session.config.cache.reader)
        submit = getattr(reader, "submit", None)
        sources = [v.name for v in plan.cached if v.producer == SOURCE]
        return (reader.read, reader.bucket_keys, lambda items: decode_sources(collate(items, ragged), sources), None,
                reader.shard_size, submit)
    units, ctx = stage1_context(session, plan)
    names = [v.name for v in plan.cached]

    def run_stage1_inline(items: list[Sample]) -> dict[str, Any]:
        return collate([compute_sample(units, s, ctx, names, to_cpu=False) for s in items], ragged)

    return (samples.__getitem__, [s.bucket for s in samples], list, run_stage1_inline, session.config.cache.shard_size,
            None)


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


def _one_variant_per_epoch(read: Any, buckets: list, submit: Any, variants: int, seed: int) -> tuple:
    pick = _VariantPicker(variants, seed)
    if variants <= 0:
        return read, buckets, submit, pick
    wrapped_submit = None if submit is None else (lambda indices: submit([pick(i) for i in indices]))
    return (lambda i: read(pick(i))), list(buckets)[::variants], wrapped_submit, pick


def resume_settings(session: Session, loader: PrefetchLoader) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it (epochs and max_steps may grow)."""
    cfg = session.config
    train_keys = ("learning_rate", "batch_size", "gradient_accumulation_steps", "seed", "mixed_precision")
    return {**{f"train.{k}": getattr(cfg.train, k) for k in train_keys},
            **{f"lora.{k}": v for k, v in vars(cfg.lora).items()},
            "data.repeat": cfg.data.repeat, "data.shuffle_window": cfg.data.shuffle_window,
            "shard_size": loader.shard_size, "model.dtype": str(session.dtype)}


def train(session: Session, plan: Plan, output: Path, *, cache_path: Path | None = None,
          samples: list[Sample] | None = None) -> TrainResult:
    """Run stage 2 (or the unsplit loop) and write `output/lora.safetensors` (or the full weights).

    With `train.checkpoint_every`, checkpoints go to `output/checkpoints/step-N/`; with
    `train.resume`, the run continues from the newest one exactly as if it had never stopped.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    cfg = session.config.train
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
    accelerator = Accelerator(cpu=session.device.type == "cpu", mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps, kwargs_handlers=[ddp])
    device = accelerator.device
    if device.type == "cuda" and not cfg.cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)  # see train.cudnn_attention
    read, buckets, make_batch, inline, shard_size, submit = _sample_reader(session, plan, cache_path, samples)
    names = plan.components(2)
    check_components_present(session, names)
    components = load_components(session.adapter, session.model_root, names, device=device, dtype=session.dtype)
    trained = session.trainable  # the denoiser first, then any text encoder
    params = [p for name in trained for p in make_trainable(session, components[name], name)]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    *prepared, optimizer = accelerator.prepare(*[components[name] for name in trained], optimizer)
    components.update(zip(trained, prepared))
    read, buckets, submit, pick = _one_variant_per_epoch(read, buckets, submit, session.config.cache.variants,
                                                         cfg.seed)
    loader = PrefetchLoader(read, buckets, make_batch=make_batch, batch_size=cfg.batch_size, seed=cfg.seed,
                            repeat=session.config.data.repeat, num_workers=session.config.data.num_workers,
                            prefetch=session.config.data.prefetch, shard_size=shard_size,
                            window=session.config.data.shuffle_window,
                            rank=accelerator.process_index, world_size=accelerator.num_processes,
                            pin_memory=device.type == "cuda", submit_batch=submit)
    pick.loader = loader
    units = plan.runnable_units(session.graph, 2)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "plan.json").write_text(plan.to_json())
    model = trained_modules(session, {name: accelerator.unwrap_model(components[name]) for name in trained})
    state = _maybe_resume(session, accelerator, model, optimizer, loader, output)
    log, micro, start = list(state.log), state.micro_step, time.perf_counter()
    total = _planned_steps(loader, done=len(log), num_epochs=cfg.num_epochs, max_steps=cfg.max_steps,
                           accumulation=cfg.gradient_accumulation_steps)
    step_seconds: list[float] = []
    accelerator.step = micro  # gradient accumulation continues its cycle

    def checkpoint() -> None:
        if cfg.checkpoint_every and accelerator.is_main_process:
            if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
                raise TrainingError(f"stage 2: the weights hold NaN or inf after step {len(log)}, so no checkpoint "
                                    f"is written (earlier ones are kept). Lower --learning_rate, or train in "
                                    f"float32 (--dtype float32) to find the op")
            state = TrainState(len(log), micro, loader.epoch, loader.state_dict(), log, resume_settings(session, loader))
            save_checkpoint(output, model=model, optimizer=optimizer, keep=cfg.checkpoints_kept, state=state)

    log_file = _open_log(output, log, write=accelerator.is_main_process)
    trace = _open_trace(accelerator.process_index)
    stop = cfg.max_steps or None  # otherwise every batch of every epoch
    tick = time.perf_counter()
    with tqdm(total=total, initial=len(log), desc="stage 2: training", unit="step", disable=None) as bar:
        for epoch in range(state.epoch, cfg.num_epochs):
            if stop and len(log) >= stop:
                break
            num_batches = len(loader.batches(epoch))
            for batch in loader.iter_epoch(epoch):
                if trace is not None:
                    trace.write(json.dumps({"epoch": epoch, "micro_step": micro, "samples": loader.current}) + "\n")
                if inline is not None:
                    batch = inline(batch)
                batch = to_device(batch, device)
                with accelerator.accumulate(*prepared):
                    generator = step_generator(cfg.seed, micro, accelerator.process_index)
                    ctx = UnitContext(components, device, session.dtype, generator=generator, settings=session.settings)
                    loss = run_units(units, batch, ctx)[session.graph.loss]
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                micro += 1
                if accelerator.sync_gradients:
                    mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()  # = loss on 1 process
                    if not math.isfinite(mean_loss):
                        raise TrainingError(
                            f"stage 2: the loss is {mean_loss} at step {len(log) + 1} (epoch {epoch}), so the weights "
                            f"are not saved (earlier checkpoints, all finite, are kept). Lower --learning_rate, or "
                            f"train in float32 (--dtype float32) to find the op")
                    step_seconds.append(time.perf_counter() - tick)
                    tick = time.perf_counter()
                    log.append({"step": len(log) + 1, "epoch": epoch, "loss": mean_loss})
                    log_file.write(json.dumps(log[-1]) + "\n")
                    log_file.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
                    last = len(log) == stop or (epoch == cfg.num_epochs - 1 and loader.position == num_batches)
                    if cfg.checkpoint_every and len(log) % cfg.checkpoint_every == 0 and not last:
                        checkpoint()  # the last one is written after the loop
                    if len(log) == stop:
                        break
    log_file.close()
    if trace is not None:
        trace.close()
    checkpoint()
    digest = _save(session, accelerator, {name: accelerator.unwrap_model(components[name]) for name in trained},
                   output)
    _log_stats(accelerator, device, steps=len(log) - state.step, step_seconds=step_seconds, digest=digest)
    return TrainResult(len(log), [entry["loss"] for entry in log], output, time.perf_counter() - start,
                       accelerator.is_main_process)


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


def _log_stats(accelerator: Any, device: torch.device, *, steps: int, step_seconds: list[float],
               digest: str) -> None:
    """One JSON line per rank: steps, step times (s), peak CUDA memory (bytes), weights digest."""
    stats = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "steps": steps,
             "step_s_median": float(np.median(step_seconds)) if step_seconds else None,
             "step_s_mean_after_first": float(np.mean(step_seconds[1:])) if len(step_seconds) > 1 else None,
             "weights_sha256": digest}
    if device.type == "cuda":
        stats["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        stats["peak_reserved_bytes"] = torch.cuda.memory_stats(device).get("reserved_bytes.all.peak", 0)
    log.info("stage 2 stats %s", json.dumps(stats))


def _maybe_resume(session: Session, accelerator: Any, model: torch.nn.Module, optimizer: Any,
                  loader: PrefetchLoader, output: Path) -> TrainState:
    fresh = TrainState(0, 0, 0, loader.state_dict(), [], resume_settings(session, loader))
    if not session.config.train.resume:
        return fresh
    path = latest_checkpoint(output)
    if path is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", checkpoint_root(output))
        return fresh
    state = load_checkpoint(path, model=accelerator.unwrap_model(model), optimizer=optimizer,
                            settings=resume_settings(session, loader))
    try:
        loader.load_state_dict(state.loader)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}; resume with the same data settings") from exc
    log.info("resuming from %s (step %d)", path, state.step)
    saved_world = state.loader.get("world_size", loader.world_size)
    if saved_world != loader.world_size:
        log.info("the checkpoint was written by %d processes, this run has %d: epoch %d ends with the %d batches "
                 "per process that no process had reached", saved_world, loader.world_size, state.epoch,
                 len(loader))
    return state


def _open_trace(rank: int) -> Any:
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return (Path(folder) / f"rank-{rank}.jsonl").open("a", buffering=1)


def _open_log(output: Path, entries: list[dict[str, Any]], *, write: bool) -> Any:
    """train_log.jsonl holding exactly `entries` (a resumed run drops lines past its checkpoint)."""
    if not write:
        return open(os.devnull, "w")
    f = (output / "train_log.jsonl").open("w")
    for entry in entries:
        f.write(json.dumps(entry) + "\n")
    return f


def trained_modules(session: Session, models: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """What checkpoints save and restore: the trained component itself, or, when a text encoder
    trains too, a ModuleDict of them (parameter names prefixed with the component)."""
    return models[session.trainable[0]] if len(models) == 1 else torch.nn.ModuleDict(models)


def save_peft_adapter(folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """A LoRA in PEFT's folder format (`adapter_config.json`, `adapter_model.safetensors`), which
    `peft.PeftModel.from_pretrained(model, folder)` and transformers' `model.load_adapter(folder)` load."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors")


def _save(session: Session, accelerator: Any, models: dict[str, torch.nn.Module], output: Path) -> str:
    """Write the trained weights (main process only); return this rank's digest of them.

    LoRAs go to `lora.safetensors` through the family's diffusers pipeline for every component its
    `save_lora_weights` takes (the denoiser; SD, SDXL and FLUX text encoders too); a text encoder
    it does not take (Qwen-Image's, Wan's) is saved as a PEFT adapter folder, `<component>_lora/`,
    which `model.load_adapter(folder)` loads. Full fine-tuning saves each component's folder.
    """
    if session.config.lora.full_finetune:
        digest = weights_digest({f"{c}.{n}": p for c, m in models.items() for n, p in m.named_parameters()})
        if accelerator.is_main_process:
            for name, model in models.items():
                model.save_pretrained(output / name, safe_serialization=True)
        return digest
    from peft.utils import get_peft_model_state_dict

    states = {name: get_peft_model_state_dict(model) for name, model in models.items()}
    if accelerator.is_main_process:
        layers = {name: (state, models[name].peft_config["default"].to_dict()
                         if hasattr(models[name], "peft_config") else None) for name, state in states.items()}
        for name in save_lora(session.adapter, output, layers, weight_name=LORA_WEIGHT_NAME):
            save_peft_adapter(output / f"{name}_lora", *layers[name])
    return weights_digest({f"{c}.{n}": t for c, state in states.items() for n, t in state.items()})
