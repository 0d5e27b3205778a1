"""Typed run configuration: dataclasses, loaded from TOML, overridden by `--set key=value` and by
the seed's flags (`--learning_rate` and friends, see `SEED_FLAGS`) and diffusers' training-script
flags (`--lr_scheduler` and friends, see `TRAINER_FLAGS`).

Every problem is collected and reported at once; unknown keys suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autosplit.errors import ConfigError


@dataclass
class ModelConfig:
    pipeline: str = "qwen_image"
    #: diffusers pipeline folder; empty means the built-in tiny pipeline
    path: str = ""
    #: "auto" (cuda if present, else cpu), "cpu", "cuda", "cuda:1"
    device: str = "auto"
    #: weights dtype: "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16"
    dtype: str = "auto"


@dataclass
class DataConfig:
    #: dataset folder; empty means the built-in synthetic dataset
    base_path: str = ""
    metadata_path: str = ""
    max_pixels: int = 1024 * 1024
    #: video datasets: at most this many frames per clip (clips keep k * 4 + 1 frames)
    max_frames: int = 81
    #: times each sample is seen per epoch
    repeat: int = 1
    #: loader threads reading the cache ahead of the trainer
    num_workers: int = 2
    #: batches kept ready ahead of the trainer
    prefetch: int = 4
    #: image latents from the VAE posterior: "mode" (deterministic), "sample" (fresh every step:
    #: the distribution is cached, sampling runs in stage 2), "frozen_sample" (one cached draw per image)
    vae_latents: str = "mode"
    #: probability of a random horizontal flip of each image, drawn anew every step (a random
    #: augmentation: stage 2 unless cache.variants > 0)
    random_flip: float = 0.0
    #: probability of training a sample on the empty prompt (caption dropout); the caption's and the
    #: empty prompt's encodings are both cached and stage 2 chooses between them
    caption_dropout: float = 0.0
    #: shards whose samples are shuffled together (epoch order: shard permutation, then windows)
    shuffle_window: int = 4
    #: read media paths that lead outside the dataset folder (`../x.png`, absolute paths, symlinks
    #: out of it); false makes such a row an error, since it usually names the wrong file
    allow_outside_paths: bool = False
    #: a folder without a metadata file: an image with no NAME.txt caption beside it is an "error",
    #: or trains on the "empty" prompt
    missing_caption: str = "error"
    #: training sizes: "none" (each image scaled to max_pixels and cropped to the family's multiple,
    #: so images of other sizes rarely share a batch) or "aspect" (aspect-ratio buckets near
    #: max_pixels: each image resized and centre-cropped to the bucket nearest its aspect ratio)
    buckets: str = "none"
    #: aspect buckets: their sides are multiples of this many pixels (a multiple of the family's factor)
    bucket_step: int = 64
    #: aspect buckets: the widest ratio, e.g. 4.0 for buckets from 1:4 to 4:1
    bucket_max_aspect: float = 4.0


@dataclass
class TrainConfig:
    #: sft or direct_distill, or <task>:data_process / <task>:train for the seed's manual stages
    task: str = "sft"
    #: false trains unsplit: every unit runs every step, nothing is cached
    split: bool = True
    learning_rate: float = 1e-4
    num_epochs: int = 1
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    #: stop after this many optimizer steps (0: no limit)
    max_steps: int = 0
    seed: int = 0
    gradient_checkpointing: bool = False
    #: accelerate's mixed precision: "no", "bf16", "fp16"
    mixed_precision: str = "no"
    #: save a checkpoint (OUTPUT/checkpoints/step-N) every this many optimizer steps (0: never)
    checkpoint_every: int = 0
    #: checkpoints kept on disk (the newest ones)
    checkpoints_kept: int = 2
    #: continue from the newest checkpoint in OUTPUT/checkpoints: "no", "yes" (--resume; an error
    #: without a checkpoint) or "auto" (resume if there is one, else start from step 0); TOML's
    #: true/false mean yes/no
    resume: str = "no"
    #: multi-process runs: DDP looks for trainable parameters that got no gradient each step (needed
    #: when some do, e.g. LoRA on Qwen-Image's last block's text path); false skips that search
    find_unused_parameters: bool = True
    #: cuDNN's fused attention (SDPA backend) in stage 2 on CUDA, for every model stage 2 runs:
    #: "false" (the default), "true", or "auto" (the family's measured choice: on for Qwen-Image,
    #: whose full-size denoiser it made 1.25x faster eager and 1.27x compiled on an H200). Off by
    #: default: its backward fails or returns NaN for some shapes since torch 2.11 (pytorch#196678;
    #: full-size FLUX.1-dev on an H200, tiny FLUX on an H100), and a text encoder or VAE stage 2
    #: runs too was not measured with it (docs/benchmarks.md)
    cudnn_attention: str = "false"
    #: torch.compile the denoiser's repeated blocks (diffusers' regional compilation,
    #: `compile_repeated_blocks`): "auto" (where measured: on CUDA with Triton, sft LoRA with gradient
    #: checkpointing of a family whose adapter opts in (Qwen-Image, FLUX), no block swapped or stored
    #: in fp8), "blocks" (always) or "none". Full-size Qwen-Image and FLUX.1-dev on an H200:
    #: 1.35-1.75x faster steps after a 17-35 s first step (bench/gpu/step_speed.py, docs/benchmarks.md)
    compile: str = "auto"
    #: when the progress bar is not shown (stderr is not a terminal, e.g. a log file): log step,
    #: steps/s, loss and ETA every this many seconds (0: every step)
    log_every_s: float = 30.0
    #: repeated blocks of the denoiser whose frozen weights stay in pinned host memory and are copied
    #: to the GPU ahead of each use (lossless; needs gradient checkpointing): a count, or "auto" (the
    #: planner chooses the fastest that fits --vram_budget; none without a budget); docs/memory.md
    blocks_to_swap: str = "auto"
    #: storage of the frozen Linear weights in the denoiser's repeated blocks: "dtype" (the run's
    #: dtype, lossless), "fp8" (e4m3 with per-channel scales, upcast per layer: lossy, half the
    #: bytes) or "auto" (the planner may choose fp8 where it is faster under --vram_budget)
    base_precision: str = "dtype"
    #: optimizer (docs/training.md): "adamw" (torch's), "adamw8bit" (bitsandbytes, CUDA only),
    #: "adafactor" (transformers', with --learning_rate as its fixed rate) or "prodigy" (prodigyopt)
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    #: decoupled weight decay (every optimizer; torch's AdamW default, as trained before it was a setting)
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    #: learning-rate schedule over the run's optimizer steps (diffusers' get_scheduler): "constant",
    #: "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    lr_scheduler: str = "constant"
    #: optimizer steps of linear warm-up from 0 (every schedule but "constant")
    lr_warmup_steps: int = 0
    #: cosine_with_restarts: number of hard restarts
    lr_num_cycles: int = 1
    #: polynomial: the decay's power (1: linear)
    lr_power: float = 1.0
    #: clip the gradients' total L2 norm to this before each optimizer step (0: no clipping)
    max_grad_norm: float = 0.0
    #: flow matching's training sigmas: "uniform" (an index into the shifted inference schedule),
    #: "logit_normal", "mode" (diffusers' densities over that index), "sigmoid" (sigmoid(scale * N(0, 1)),
    #: unshifted, as musubi-tuner); DDPM families map the same draws to integer timesteps
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    #: loss weight per sample by its sigma (flow matching): "none", "sigma_sqrt", "cosmap" (SD3),
    #: "diffsynth" (DiffSynth-Studio's FlowMatchScheduler training weights)
    weighting_scheme: str = "none"
    #: guidance value given to guidance-distilled transformers (FLUX.1-dev) in training
    guidance_scale: float = 3.5
    #: trackers besides train_log.jsonl: "none", "tensorboard", "wandb" (offline unless WANDB_MODE
    #: says otherwise) or "all"; written under OUTPUT/logs
    report_to: str = "none"
    #: validation images (docs/training.md): prompts sampled with the trained denoiser in stage 2,
    #: encoded once in stage 1 (their text encoder stays out of stage 2)
    validation_prompts: list[str] = field(default_factory=list)
    #: a UTF-8 text file of more validation prompts, one a line (blank lines and # comments skipped)
    validation_prompts_file: str = ""
    #: sample the validation prompts every this many optimizer steps (0: only after the last step)
    validation_steps: int = 0
    #: images per prompt: image k starts from the noise of seed validation_seed + k
    num_validation_images: int = 1
    validation_num_inference_steps: int = 20
    #: 0: the family's pipeline default (Qwen-Image 4 true CFG, FLUX.1-dev 3.5 embedded, SD 7.5,
    #: SDXL and Wan 5 CFG); 1: no guidance
    validation_guidance_scale: float = 0.0
    validation_negative_prompt: str = ""
    validation_seed: int = 0
    #: pixels; 0 and 0: the training size of the dataset's first sample
    validation_width: int = 0
    validation_height: int = 0
    #: where the VAE decoder runs: "auto" (the GPU when the plan's budget allows, else the CPU),
    #: "cpu" or "cuda" (the run's GPU)
    validation_decoder_device: str = "auto"


#: `lora.format` values (docs/lora-formats.md says which family writes what in each)
LORA_FORMATS = ("diffusers", "kohya", "comfyui")


@dataclass
class LoraConfig:
    #: component(s) to train, comma-separated, by the seed's name ("dit") or diffusers'
    #: ("transformer"); "dit,text_encoder" trains the text encoder too
    base_model: str = "dit"
    #: comma-separated module name suffixes of the denoiser; empty means the family's default list
    target_modules: str = ""
    #: the same for a trained text encoder; empty means its attention projections
    text_encoder_target_modules: str = ""
    rank: int = 32
    #: alpha; 0 means equal to rank (scale 1), as DiffSynth-Studio trains
    alpha: float = 0.0
    #: train every weight of the base model instead of a LoRA
    full_finetune: bool = False
    #: also write the LoRA as OUTPUT/lora_<format>.safetensors in another tool's key format:
    #: "kohya" or "comfyui" (docs/lora-formats.md); "diffusers" writes lora.safetensors only
    format: str = "diffusers"
    #: start the LoRA from this file (diffusers, kohya or ComfyUI format; DiffSynth-Studio's
    #: --lora_checkpoint): its weights only, not the optimizer or data position (that is --resume)
    checkpoint: str = ""


@dataclass
class CacheConfig:
    #: where `--task sft` keeps its cache; empty means <output_path>/cache
    path: str = ""
    #: samples per shard file; a shard is the unit of resumption and of parallel writing
    shard_size: int = 64
    #: zstd level of the cached values (0: stored uncompressed, crc32c only: the fastest reads;
    #: bf16 compresses ~1.3x, docs/cache-format.md)
    zstd_level: int = 0
    #: samples of one shape bucket encoded together in stage 1 (1 is bit-exact to unsplit training)
    batch_size: int = 1
    #: hot read path of stage 2: "direct" (the shard files read straight into batches), "tensorstore"
    #: (its async reads) or "zarr" (zarr-python, the reference)
    reader: str = "direct"
    #: cache K variants of each sample's random augmentations (seeded by sample and variant) so
    #: the VAE stays in stage 1; stage 2 picks one per sample per epoch. 0: augment in stage 2
    variants: int = 0
    #: when the progress bar is not shown (stderr is not a terminal): log stage 1's samples done,
    #: samples/s and ETA every this many seconds (0: every encoded batch)
    log_every_s: float = 30.0


@dataclass
class PlanConfig:
    #: how the planner learns each unit's cost: "fake" (configs only, no weights, CPU), "real"
    #: (the weights on the device), "none" (the units' declarations, no measurements)
    profile: str = "fake"
    #: "auto" (exact search up to 16 free units, else min-cut), "enumerate" or "mincut"
    solver: str = "auto"
    #: GPU memory to fit stage 2 into, GiB (0: no budget)
    vram_budget_gib: float = 0.0
    #: host RAM the placement may use, GiB (0: what this machine has)
    host_ram_gib: float = 0.0
    #: pinned host -> GPU copy bandwidth the planner assumes, GB/s (0: 55, measured on an H200)
    host_to_device_gbps: float = 0.0
    #: stage 2's effective training rate the planner times steps with, TFLOP/s (0: 157.7, measured:
    #: full-size Qwen-Image LoRA on an H200)
    train_tflops: float = 0.0


@dataclass
class RunConfig:
    output_path: str = "./autosplit_output"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: the seed's (DiffSynth-Studio's) flag names and the keys they set
SEED_FLAGS = {
    "dataset_base_path": "data.base_path",
    "dataset_metadata_path": "data.metadata_path",
    "dataset_repeat": "data.repeat",
    "dataset_num_workers": "data.num_workers",
    "max_pixels": "data.max_pixels",
    "learning_rate": "train.learning_rate",
    "num_epochs": "train.num_epochs",
    "task": "train.task",
    "seed": "train.seed",
    "batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "max_steps": "train.max_steps",
    "mixed_precision": "train.mixed_precision",
    "output_path": "output_path",
    "lora_base_model": "lora.base_model",
    "lora_target_modules": "lora.target_modules",
    "lora_rank": "lora.rank",
    "model_paths": "model.path",
    "pipeline": "model.pipeline",
    "device": "model.device",
    "dtype": "model.dtype",
    "cache_path": "cache.path",
    "profile": "plan.profile",
    "vram_budget": "plan.vram_budget_gib",
    "cache_variants": "cache.variants",
}


#: diffusers' (and musubi-tuner's) training-script flag names for the trainer's settings
TRAINER_FLAGS = {
    "optimizer": "train.optimizer",
    "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2",
    "adam_weight_decay": "train.adam_weight_decay",
    "adam_epsilon": "train.adam_epsilon",
    "lr_scheduler": "train.lr_scheduler",
    "lr_warmup_steps": "train.lr_warmup_steps",
    "lr_num_cycles": "train.lr_num_cycles",
    "lr_power": "train.lr_power",
    "max_grad_norm": "train.max_grad_norm",
    "timestep_sampling": "train.timestep_sampling",
    "logit_mean": "train.logit_mean",
    "logit_std": "train.logit_std",
    "mode_scale": "train.mode_scale",
    "sigmoid_scale": "train.sigmoid_scale",
    "weighting_scheme": "train.weighting_scheme",
    "guidance_scale": "train.guidance_scale",
    "report_to": "train.report_to",
    "validation_prompt": "train.validation_prompts",
    "validation_prompts_file": "train.validation_prompts_file",
    "validation_steps": "train.validation_steps",
    "num_validation_images": "train.num_validation_images",
}
#: flags that may be given more than once, each adding to the list of their key
LIST_FLAGS = ("validation_prompt",)
#: every flag that sets one config key
FLAGS = {**SEED_FLAGS, **TRAINER_FLAGS}

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode", "sigmoid")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap", "diffsynth")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
#: mode sampling's map stays monotonic on [0, 1] only for these scales (1 / (pi / 2 - 1) = 1.75)
MODE_SCALE_RANGE = (-1.0, 1.75)


def all_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(RunConfig):
        section: Any = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            keys += [f"{f.name}.{sub.name}" for sub in dataclasses.fields(section)]
        else:
            keys.append(f.name)
    return keys


def _field_type(owner: Any, name: str) -> type:
    hints = typing.get_type_hints(type(owner))
    return hints[name]


def _coerce(key: str, value: Any, kind: type) -> Any:
    if typing.get_origin(kind) is list:  # a list of strings: TOML's list, or one item from --set
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError(f"{key}={value!r}: expected a list of strings")
        return list(items)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{key}={value!r}: expected true or false")
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{key}={value!r}: expected {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and not isinstance(value, str):
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key}={value!r}: expected {kind.__name__}")
    return value


#: other spellings of the values of keys whose values are words (TOML's true/false, --set KEY=on)
_ALIASES = {
    "train.resume": {"true": "yes", "false": "no", "1": "yes", "0": "no", "on": "yes", "off": "no"},
    "train.cudnn_attention": {"yes": "true", "no": "false", "1": "true", "0": "false", "on": "true", "off": "false"},
}


def apply_overrides(config: RunConfig, overrides: dict[str, Any], *, origin: str) -> list[str]:
    """Set dotted keys on `config`; return one problem string per bad key or value."""
    problems = []
    valid = all_keys()
    for key, value in overrides.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            problems.append(f"{origin}: unknown key {key!r}{hint}")
            continue
        owner, _, name = key.rpartition(".")
        target = getattr(config, owner) if owner else config
        try:
            value = _coerce(key, value, _field_type(target, name))
            if key in _ALIASES:
                value = _ALIASES[key].get(value.strip().lower(), value.strip().lower())
            setattr(target, name, value)
        except ValueError as exc:
            problems.append(f"{origin}: {exc}")
    return problems


def flatten_toml(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten_toml(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def validate(config: RunConfig) -> list[str]:
    """Every value problem in `config`, as strings naming the key and the fix."""
    problems = validation_problems(config.train)
    checks = [
        ("data.max_pixels", config.data.max_pixels >= 256, "must be at least 256"),
        ("data.repeat", config.data.repeat >= 1, "must be at least 1"),
        ("data.max_frames", config.data.max_frames >= 1, "must be at least 1"),
        ("data.num_workers", config.data.num_workers >= 1, "must be at least 1"),
        ("data.prefetch", config.data.prefetch >= 1, "must be at least 1"),
        (
            "data.vae_latents",
            config.data.vae_latents in ("mode", "sample", "frozen_sample"),
            "must be mode, sample or frozen_sample",
        ),
        ("data.shuffle_window", config.data.shuffle_window >= 1, "must be at least 1"),
        ("data.random_flip", 0.0 <= config.data.random_flip <= 1.0, "must be a probability, 0 to 1"),
        ("data.caption_dropout", 0.0 <= config.data.caption_dropout <= 1.0, "must be a probability, 0 to 1"),
        ("data.missing_caption", config.data.missing_caption in ("error", "empty"), "must be error or empty"),
        ("data.buckets", config.data.buckets in ("none", "aspect"), "must be none or aspect"),
        ("data.bucket_step", config.data.bucket_step >= 1, "must be at least 1 (pixels)"),
        (
            "data.bucket_max_aspect",
            config.data.bucket_max_aspect >= 1.0,
            "must be at least 1 (the widest width:height ratio, e.g. 4 for 1:4 to 4:1)",
        ),
        ("lora.format", config.lora.format in LORA_FORMATS, "must be diffusers, kohya or comfyui"),
        ("cache.variants", config.cache.variants >= 0, "must be 0 (augment in stage 2) or a count of variants"),
        ("train.learning_rate", config.train.learning_rate > 0, "must be positive"),
        ("train.num_epochs", config.train.num_epochs >= 1, "must be at least 1"),
        ("train.batch_size", config.train.batch_size >= 1, "must be at least 1"),
        ("train.gradient_accumulation_steps", config.train.gradient_accumulation_steps >= 1, "must be at least 1"),
        ("train.max_steps", config.train.max_steps >= 0, "must be 0 (no limit) or positive"),
        ("train.seed", config.train.seed >= 0, "must be 0 or positive"),
        ("train.checkpoint_every", config.train.checkpoint_every >= 0, "must be 0 (never) or positive"),
        ("train.checkpoints_kept", config.train.checkpoints_kept >= 1, "must be at least 1"),
        ("train.mixed_precision", config.train.mixed_precision in ("no", "bf16", "fp16"), "must be no, bf16 or fp16"),
        (
            "train.resume",
            config.train.resume in ("no", "yes", "auto"),
            "must be no, yes (--resume: continue from the newest checkpoint) or auto (continue if there is one)",
        ),
        ("train.log_every_s", config.train.log_every_s >= 0, "must be 0 (log every step) or positive seconds"),
        ("cache.log_every_s", config.cache.log_every_s >= 0, "must be 0 (log every batch) or positive seconds"),
        ("lora.rank", config.lora.rank >= 1, "must be at least 1"),
        ("cache.shard_size", config.cache.shard_size >= 1, "must be at least 1"),
        ("cache.zstd_level", -7 <= config.cache.zstd_level <= 22, "must be between -7 and 22"),
        ("plan.profile", config.plan.profile in ("fake", "real", "none"), "must be fake, real or none"),
        ("plan.solver", config.plan.solver in ("auto", "enumerate", "mincut"), "must be auto, enumerate or mincut"),
        ("plan.vram_budget_gib", config.plan.vram_budget_gib >= 0, "must be 0 (no budget) or positive"),
        ("plan.host_ram_gib", config.plan.host_ram_gib >= 0, "must be 0 (this machine's RAM) or positive"),
        (
            "plan.host_to_device_gbps",
            config.plan.host_to_device_gbps >= 0,
            "must be 0 (the measured default) or positive",
        ),
        ("plan.train_tflops", config.plan.train_tflops >= 0, "must be 0 (the measured default) or positive"),
        ("cache.batch_size", config.cache.batch_size >= 1, "must be at least 1"),
        ("cache.reader", config.cache.reader in ("direct", "tensorstore", "zarr"), "must be direct, tensorstore, zarr"),
        (
            "model.dtype",
            config.model.dtype in ("auto", "float32", "bfloat16", "float16"),
            "must be auto, float32, bfloat16 or float16",
        ),
    ]
    for key, ok, fix in checks:
        if not ok:
            owner, _, name = key.partition(".")
            problems.append(f"{key}={getattr(getattr(config, owner), name)!r} {fix}")
    return problems + _placement_problems(config) + trainer_problems(config.train, device=config.model.device)


#: `train.compile` values
COMPILE = ("none", "blocks", "auto")
#: `train.cudnn_attention` values
SWITCH = ("auto", "true", "false")


def _choice(key: str, value: str, choices: tuple[str, ...], flag: str) -> list[str]:
    if value in choices:
        return []
    return [f"{key}={value!r} is not one of {', '.join(choices)} ({flag})"]


def trainer_problems(train: TrainConfig, *, device: str = "auto") -> list[str]:
    """The optimizer, schedule, timestep, weighting and tracker settings' problems, each naming
    the flag and its valid values; optional packages that are not installed. Lower-cases the
    optimizer's name (diffusers spells it "AdamW")."""
    train.optimizer = train.optimizer.strip().lower()
    problems = _choice("train.optimizer", train.optimizer, OPTIMIZERS, "--optimizer")
    problems += _choice("train.lr_scheduler", train.lr_scheduler, LR_SCHEDULERS, "--lr_scheduler")
    problems += _choice("train.timestep_sampling", train.timestep_sampling, TIMESTEP_SAMPLING, "--timestep_sampling")
    problems += _choice("train.report_to", train.report_to, REPORT_TO, "--report_to")
    problems += _choice("train.compile", train.compile, COMPILE, "--set train.compile=...")
    problems += _choice("train.cudnn_attention", train.cudnn_attention, SWITCH, "--set train.cudnn_attention=...")
    if train.weighting_scheme in ("logit_normal", "mode"):
        problems.append(
            f"train.weighting_scheme={train.weighting_scheme!r} is a timestep sampling here: diffusers' "
            f"--weighting_scheme {train.weighting_scheme} is --timestep_sampling {train.weighting_scheme} "
            f"--weighting_scheme none (valid --weighting_scheme values: {', '.join(WEIGHTING_SCHEMES)})"
        )
    else:
        problems += _choice("train.weighting_scheme", train.weighting_scheme, WEIGHTING_SCHEMES, "--weighting_scheme")
    low, high = MODE_SCALE_RANGE
    checks = [
        ("adam_beta1", 0.0 <= train.adam_beta1 < 1.0, "must be in [0, 1) (--adam_beta1)"),
        ("adam_beta2", 0.0 <= train.adam_beta2 < 1.0, "must be in [0, 1) (--adam_beta2)"),
        ("adam_weight_decay", train.adam_weight_decay >= 0, "must be 0 or positive (--adam_weight_decay)"),
        ("adam_epsilon", train.adam_epsilon > 0, "must be positive (--adam_epsilon)"),
        ("lr_warmup_steps", train.lr_warmup_steps >= 0, "must be 0 or a count of steps (--lr_warmup_steps)"),
        ("lr_num_cycles", train.lr_num_cycles >= 1, "must be at least 1 (--lr_num_cycles)"),
        ("lr_power", train.lr_power > 0, "must be positive (--lr_power)"),
        ("max_grad_norm", train.max_grad_norm >= 0, "must be 0 (no clipping) or positive (--max_grad_norm)"),
        ("logit_std", train.logit_std > 0, "must be positive (--logit_std)"),
        ("mode_scale", low <= train.mode_scale <= high, f"must be between {low:g} and {high:g} (--mode_scale)"),
        ("sigmoid_scale", train.sigmoid_scale > 0, "must be positive (--sigmoid_scale)"),
        ("guidance_scale", train.guidance_scale >= 0, "must be 0 or positive (--guidance_scale)"),
    ]
    problems += [f"train.{key}={getattr(train, key)!r} {fix}" for key, ok, fix in checks if not ok]
    if train.lr_scheduler == "constant" and train.lr_warmup_steps > 0:
        problems.append(
            f"--lr_warmup_steps {train.lr_warmup_steps} does nothing with --lr_scheduler constant; "
            f"use --lr_scheduler constant_with_warmup (or another schedule) for a warm-up"
        )
    return problems + _package_problems(train, device=device)


def _package_problems(train: TrainConfig, *, device: str) -> list[str]:
    """Optional packages a setting needs, and 8-bit AdamW's need of a CUDA device."""
    from importlib.util import find_spec

    problems = []
    if train.optimizer == "adamw8bit":
        if device == "cpu" or (device == "auto" and not _cuda_available()):
            problems.append(
                "--optimizer adamw8bit: bitsandbytes' 8-bit AdamW runs on CUDA GPUs only and this run is on "
                "the CPU; use --optimizer adamw here (or --optimizer adafactor for less optimizer memory)"
            )
        elif find_spec("bitsandbytes") is None:
            problems.append(
                "--optimizer adamw8bit needs bitsandbytes: pip install 'autosplit[bnb]', or use --optimizer adamw"
            )
    if train.optimizer == "prodigy" and find_spec("prodigyopt") is None:
        problems.append("--optimizer prodigy needs prodigyopt: pip install 'autosplit[prodigy]'")
    if (
        train.report_to in ("tensorboard", "all")
        and find_spec("tensorboard") is None
        and find_spec("tensorboardX") is None
    ):
        problems.append(
            f"--report_to {train.report_to} needs tensorboard: pip install tensorboard, or --report_to none"
        )
    if train.report_to in ("wandb", "all") and find_spec("wandb") is None:
        problems.append(f"--report_to {train.report_to} needs wandb: pip install wandb, or --report_to tensorboard")
    return problems


def _cuda_available() -> bool:
    """Whether device "auto" resolves to CUDA (as autosplit.workflow.session.resolve_device does).
    Imports torch: asked only for the settings that need a GPU."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _placement_problems(config: RunConfig) -> list[str]:
    """train.blocks_to_swap: "auto" or a count, and only where swapping can work; fp8 only for LoRA."""
    precision = config.train.base_precision
    if precision not in ("dtype", "fp8", "auto"):
        return [f"train.base_precision={precision!r} must be dtype, fp8 or auto (--base_precision)"]
    if precision != "dtype" and config.lora.full_finetune:
        return [
            f"--base_precision {precision} with --full_finetune: fp8 stores frozen weights, and a full fine-tune "
            f"trains them all; drop one of the two"
        ]
    swap = config.train.blocks_to_swap.strip().lower()
    if swap != "auto" and not (swap.isdigit()):
        return [
            f"train.blocks_to_swap={config.train.blocks_to_swap!r} must be a count of blocks or auto "
            f"(--blocks_to_swap N|auto)"
        ]
    config.train.blocks_to_swap = swap if swap == "auto" else str(int(swap))
    if swap in ("auto", "0"):
        return []
    if config.lora.full_finetune:
        return [
            f"--blocks_to_swap {swap} with --full_finetune: swapping moves frozen weights, and a full fine-tune "
            f"has none; drop one of the two"
        ]
    if not config.train.gradient_checkpointing:
        return [
            f"--blocks_to_swap {swap} needs gradient checkpointing (without it autograd keeps every swapped "
            f"block's weights on the GPU until the backward): add --use_gradient_checkpointing"
        ]
    return []


#: `train.validation_decoder_device` values
DECODER_DEVICES = ("auto", "cpu", "cuda")


def validation_prompts(train: TrainConfig) -> list[str]:
    """The validation prompts: `train.validation_prompts`, then the lines of
    `train.validation_prompts_file` (blank lines and lines starting with # skipped). Raises
    ConfigError naming the file when it cannot be read."""
    prompts = list(train.validation_prompts)
    if not train.validation_prompts_file:
        return prompts
    path = Path(train.validation_prompts_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"--validation_prompts_file {path}: cannot read it ({type(exc).__name__}: {exc}); give a UTF-8 "
            f"text file with one prompt a line"
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    return prompts + [line for line in lines if line and not line.startswith("#")]


def validation_problems(train: TrainConfig) -> list[str]:
    """The validation-image settings' problems, each naming the flag or key and the fix."""
    try:
        prompts = validation_prompts(train)
    except ConfigError as exc:
        return [str(exc)]
    checks = [
        ("validation_steps", train.validation_steps >= 0, "must be 0 (only after the last step) or a count of steps"),
        ("num_validation_images", train.num_validation_images >= 1, "must be at least 1"),
        ("validation_num_inference_steps", train.validation_num_inference_steps >= 1, "must be at least 1"),
        ("validation_guidance_scale", train.validation_guidance_scale >= 0, "must be 0 (the family's) or positive"),
        ("validation_seed", train.validation_seed >= 0, "must be 0 or positive"),
        ("validation_width", train.validation_width >= 0, "must be 0 (the training size) or pixels"),
        ("validation_height", train.validation_height >= 0, "must be 0 (the training size) or pixels"),
    ]
    problems = [f"train.{key}={getattr(train, key)!r} {fix}" for key, ok, fix in checks if not ok]
    problems += _choice(
        "train.validation_decoder_device", train.validation_decoder_device, DECODER_DEVICES, "--set ..."
    )
    if (train.validation_width == 0) != (train.validation_height == 0):
        problems.append(
            f"train.validation_width={train.validation_width} and train.validation_height="
            f"{train.validation_height}: give both, or neither (0 and 0: the training size)"
        )
    if train.validation_prompts_file and not prompts:
        problems.append(f"--validation_prompts_file {train.validation_prompts_file} holds no prompt; add one a line")
    elif train.validation_steps and not prompts:
        problems.append(
            f"--validation_steps {train.validation_steps} without a prompt to sample: add --validation_prompt "
            f"TEXT (or --validation_prompts_file FILE), or drop --validation_steps"
        )
    return problems


#: defaults of the built-in run (no dataset given): enough steps to watch the loss fall, ~30 s on 2 cores
BUILTIN_PRESET = {"train.num_epochs": 8, "data.repeat": 8}


def load_config(*, toml_path: Path | None, sets: list[str], flags: dict[str, Any]) -> RunConfig:
    """Build the run config: defaults < built-in preset < TOML file < `--set key=value` < flags.

    The built-in preset applies when no dataset is given (the built-in synthetic dataset is used).
    Raises ConfigError listing every problem at once.
    """
    config = _load(RunConfig(), toml_path=toml_path, sets=sets, flags=flags)
    if not config.data.base_path:
        preset = RunConfig()
        apply_overrides(preset, BUILTIN_PRESET, origin="preset")
        config = _load(preset, toml_path=toml_path, sets=sets, flags=flags)
    return config


def _load(config: RunConfig, *, toml_path: Path | None, sets: list[str], flags: dict[str, Any]) -> RunConfig:
    problems: list[str] = []
    if toml_path is not None:
        try:
            data = tomllib.loads(Path(toml_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"--config {toml_path}: cannot read ({exc})") from exc
        problems += apply_overrides(config, flatten_toml(data), origin=str(toml_path))
    parsed_sets = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"--set {item!r}: expected key=value")
        else:
            parsed_sets[key.strip()] = value
    problems += apply_overrides(config, parsed_sets, origin="--set")
    problems += apply_overrides(config, {FLAGS[k]: v for k, v in flags.items()}, origin="flag")
    problems += validate(config)  # a key that failed to parse kept its valid default
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def autosplit_home() -> Path:
    """Where autosplit keeps the built-in pipelines and datasets, memoized profiles and staged
    remote caches: $AUTOSPLIT_HOME, default ~/.cache/autosplit."""
    return Path(os.environ.get("AUTOSPLIT_HOME", Path.home() / ".cache" / "autosplit"))
