"""Command line: `autosplit run`, `autosplit plan`, `autosplit profile`, `autosplit inspect`, `autosplit bench`,
`autosplit convert-lora`, and `autosplit launch` (their multi-process form, through accelerate).

Each verb has `add_<verb>_parser(subparsers)` and `<verb>_command(args) -> int`. User errors
(AutosplitError) become one line on stderr and exit code 2; anything else keeps its traceback.
Only the command functions import torch, diffusers or accelerate, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from autosplit import __version__
from autosplit.config import (
    BUILTIN_PRESET,
    FLAGS,
    LIST_FLAGS,
    LORA_FORMATS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    REPORT_TO,
    TIMESTEP_SAMPLING,
    WEIGHTING_SCHEMES,
    RunConfig,
    load_config,
)
from autosplit.errors import AutosplitError, ConfigError

log = logging.getLogger("autosplit")

#: flags of the seed's commands that autosplit accepts and does not need
_COMPAT_FLAGS = ("remove_prefix_in_ckpt",)
_FLAG_HELP = {
    "dataset_base_path": "dataset folder (stage 1), or the cache folder (--task sft:train) (default: the built-in "
    "synthetic dataset)",
    "dataset_metadata_path": "metadata.csv / metadata.jsonl (default: the one in the dataset folder)",
    "dataset_repeat": "times each sample is seen per epoch",
    "dataset_num_workers": "loader threads reading ahead of the trainer",
    "max_pixels": "images of more pixels than this are scaled down",
    "learning_rate": "the optimizer's learning rate (the peak of --lr_scheduler; Prodigy: its multiplier, ~1)",
    "num_epochs": "epochs of stage 2",
    "task": "sft or direct_distill (plan, stage 1 if needed, stage 2); TASK:data_process (stage 1 only), "
    "TASK:train (stage 2 only)",
    "seed": "seed of LoRA init, data order, noise and timesteps",
    "batch_size": "samples per batch (one shape bucket per batch)",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_steps": "stop after this many optimizer steps (0: no limit)",
    "mixed_precision": "accelerate mixed precision: no, bf16, fp16",
    "output_path": "output folder (LoRA, logs; the cache for sft:data_process)",
    "lora_base_model": "component(s) that get the LoRA, comma-separated: dit (the family's denoiser), transformer or "
    "unet, plus text_encoder (or text_encoder_2) to train a text encoder too",
    "lora_target_modules": "comma-separated module names to wrap with LoRA (default: the family's list)",
    "lora_rank": "LoRA rank",
    "model_paths": "local diffusers pipeline folder (default: the built-in tiny pipeline)",
    "pipeline": "model family: qwen_image (default), flux, sd, sdxl, wan",
    "device": "auto, cpu, cuda, cuda:N",
    "dtype": "weights dtype: auto, float32, bfloat16, float16",
    "cache_path": "cache folder for --task sft (default: OUTPUT_PATH/cache)",
    "profile": "how the planner measures units: fake (configs only, no weights), real (weights), none",
    "vram_budget": "GPU memory (GiB) stage 2 must fit; plan and run say whether it does before any work",
    "cache_variants": "cache K variants of each sample's random augmentations, so they stay in stage 1 "
    "(0: augment in stage 2)",
}


_FLAG_HELP.update(
    {
        "optimizer": f"optimizer: {', '.join(OPTIMIZERS)} (docs/training.md)",
        "adam_beta1": "AdamW / 8-bit AdamW / Prodigy first-moment decay",
        "adam_beta2": "AdamW / 8-bit AdamW / Prodigy second-moment decay",
        "adam_weight_decay": "decoupled weight decay (every optimizer)",
        "adam_epsilon": "AdamW / 8-bit AdamW / Prodigy epsilon",
        "lr_scheduler": f"learning-rate schedule over the run's optimizer steps: {', '.join(LR_SCHEDULERS)}",
        "lr_warmup_steps": "optimizer steps of linear warm-up (every schedule but constant)",
        "lr_num_cycles": "cosine_with_restarts: hard restarts",
        "lr_power": "polynomial: power of the decay",
        "max_grad_norm": "clip the gradients' total norm to this (0: no clipping)",
        "timestep_sampling": f"training sigmas: {', '.join(TIMESTEP_SAMPLING)}",
        "logit_mean": "logit_normal: mean of the normal",
        "logit_std": "logit_normal: standard deviation of the normal",
        "mode_scale": "mode: its scale, -1 to 1.75",
        "sigmoid_scale": "sigmoid: scale of the normal before the sigmoid",
        "weighting_scheme": f"loss weight by sigma: {', '.join(WEIGHTING_SCHEMES)}",
        "guidance_scale": "guidance value of guidance-distilled FLUX.1 (dev) in training",
        "report_to": f"trackers besides train_log.jsonl, under OUTPUT_PATH/logs: {', '.join(REPORT_TO)}",
        "validation_prompt": "a prompt to sample with the model as it trains (repeatable): encoded once after stage 1 "
        "(stage 2 builds no text encoder), images in OUTPUT_PATH/samples/step-N/ and the trackers; steps, guidance, "
        "seed, size and decoder device are train.validation_* keys (docs/training.md) (default: none, no validation)",
        "validation_prompts_file": "a text file of more validation prompts, one a line, # starts a comment "
        "(default: none)",
        "validation_steps": "sample the validation prompts every N optimizer steps, and after the last (0: after "
        "the last step only)",
        "num_validation_images": "images per validation prompt (image k from seed train.validation_seed + k)",
    }
)


def _flag_help(flag: str) -> str | None:
    """The help of a seed or trainer flag, ending with the config's default (its argparse default is
    None: the config supplies the value), unless the text already says it."""
    text = _FLAG_HELP.get(flag)
    key = FLAGS[flag]
    owner, _, name = key.rpartition(".")
    value = getattr(getattr(RunConfig(), owner) if owner else RunConfig(), name)
    if text is None or "default" in text or value in ("", []):
        return text
    preset = f"; {_shown(BUILTIN_PRESET[key])} on the built-in dataset" if key in BUILTIN_PRESET else ""
    return f"{text} (default: {_shown(value)}{preset})"


def _shown(value: Any) -> str:
    """A default as docs/config.md writes it: true, 1e-4, 30."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value and abs(value) < 1e-2:
        mantissa, _, exponent = f"{value:e}".partition("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (keys as in docs/config.md)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.learning_rate=5e-5 (repeatable)",
    )
    for flag in FLAGS:
        action = "append" if flag in LIST_FLAGS else "store"
        parser.add_argument(f"--{flag}", dest=flag, default=None, action=action, help=_flag_help(flag))
    parser.add_argument(
        "--use_gradient_checkpointing", action="store_true", help="gradient checkpointing on the trained model"
    )
    parser.add_argument(
        "--no-split",
        dest="no_split",
        action="store_true",
        help="train unsplit: every unit runs every step, nothing is cached",
    )
    parser.add_argument("--full_finetune", action="store_true", help="train all weights instead of a LoRA")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue stage 2 from the newest checkpoint in OUTPUT_PATH/checkpoints (see "
        "train.checkpoint_every); an error if there is none (--set train.resume=auto: "
        "continue only if there is one)",
    )
    parser.add_argument(
        "--model_id_with_origin_paths",
        default=None,
        help="seed-compatible model spec; resolved from the local Hugging Face cache only",
    )
    for flag in _COMPAT_FLAGS:
        parser.add_argument(f"--{flag}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--blocks_to_swap",
        default=None,
        metavar="N|auto",
        help="keep N of the denoiser's repeated blocks in pinned host memory, copied to the GPU ahead "
        "of use (lossless; needs --use_gradient_checkpointing); auto: the planner chooses the "
        "fastest that fits --vram_budget, none without one (default: auto; see train.blocks_to_swap)",
    )
    parser.add_argument(
        "--base_precision",
        default=None,
        choices=("dtype", "fp8", "auto"),
        help="frozen Linear weights of the denoiser's blocks: dtype (the run's, lossless), fp8 (e4m3 "
        "with per-channel scales: half the bytes, lossy), auto (the planner may choose fp8 under "
        "--vram_budget) (default: dtype; see train.base_precision)",
    )
    parser.add_argument(
        "--find_unused_parameters",
        nargs="?",
        const="true",
        default=None,
        metavar="BOOL",
        help="multi-process stage 2: DDP finds trainable parameters without a gradient each step "
        "(default true; see train.find_unused_parameters)",
    )
    parser.add_argument(
        "--lora_format",
        default=None,
        metavar="FORMAT",
        help="also write the LoRA as OUTPUT_PATH/lora_FORMAT.safetensors in kohya or comfyui key "
        "format (lora.format; default: diffusers, lora.safetensors only; docs/lora-formats.md)",
    )
    parser.add_argument(
        "--lora_checkpoint",
        default=None,
        metavar="PATH",
        help="start the LoRA from this file, in diffusers, kohya or ComfyUI format (lora.checkpoint): "
        "its weights only; --resume restores the optimizer and the data order too",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    flags = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    sets = list(args.set)
    if args.use_gradient_checkpointing:
        sets.append("train.gradient_checkpointing=true")
    if args.no_split:
        sets.append("train.split=false")
    if args.full_finetune:
        sets.append("lora.full_finetune=true")
    if getattr(args, "resume", False):
        sets.append("train.resume=yes")
    if getattr(args, "blocks_to_swap", None) is not None:
        sets.append(f"train.blocks_to_swap={args.blocks_to_swap}")
    if getattr(args, "base_precision", None) is not None:
        sets.append(f"train.base_precision={args.base_precision}")
    if getattr(args, "find_unused_parameters", None) is not None:
        sets.append(f"train.find_unused_parameters={args.find_unused_parameters}")
    if getattr(args, "lora_format", None) is not None:
        sets.append(f"lora.format={args.lora_format}")
    if getattr(args, "lora_checkpoint", None) is not None:
        sets.append(f"lora.checkpoint={args.lora_checkpoint}")
    if args.model_id_with_origin_paths and "model_paths" not in flags:
        from autosplit.adapters.components import resolve_hub_id

        flags["model_paths"] = str(resolve_hub_id(args.model_id_with_origin_paths))
    return load_config(toml_path=args.config, sets=sets, flags=flags)


def add_run_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="plan, cache (stage 1) and train (stage 2)",
        description="Train with split preprocessing. With no arguments: the built-in tiny Qwen-Image pipeline "
        "on a synthetic dataset, both stages.",
    )
    _add_config_flags(parser)
    parser.set_defaults(command=run_command)


def _say_stage1(result: Any) -> None:
    """Stage 1's line, printed by the main process as stage 1 ends (before stage 2 starts)."""
    if not result.is_main_process:
        return
    if result.stage1_skipped:
        print(
            f"stage 1: skipped, the cache in {result.cache} is complete and current ({result.num_cached} samples)",
            flush=True,
        )
    else:
        print(f"stage 1: {result.num_cached} samples cached in {result.cache}", flush=True)


def run_command(args: argparse.Namespace) -> int:
    from autosplit.workflow.run import run

    result = run(config_from_args(args), on_stage1=_say_stage1)
    if not result.is_main_process or (result.training is not None and not result.training.is_main_process):
        return 0  # the main process reports the run
    training = result.training
    if training is None:
        return 0
    if not training.losses:
        print(f"stage 2: no optimizer step in {training.seconds:.1f} s; weights in {training.output}")
        return 0
    tenth = max(1, len(training.losses) // 10)
    first, last = (sum(part) / len(part) for part in (training.losses[:tenth], training.losses[-tenth:]))
    print(
        f"stage 2: {training.steps} steps in {training.seconds:.1f} s; loss {first:.4f} -> {last:.4f} "
        f"(mean of the first and last {tenth} steps); weights in {training.output}"
    )
    return 0


def _add_profile_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fake",
        action="store_true",
        help="profile from configs alone with fake tensors (no weights, no GPU); without "
        "--model_paths this is the family's full-size configuration",
    )
    parser.add_argument(
        "--image_size",
        default=None,
        metavar="WxH",
        help="profile a synthetic image of this size instead of the dataset's first sample",
    )
    parser.add_argument("--prompt_tokens", type=int, default=None, help="profile a prompt of about this many tokens")
    parser.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="video families: profile a synthetic clip of this many frames (4k+1, e.g. 81) of --image_size",
    )


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--image_size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    return width, height


def _profile(args: argparse.Namespace, session: Any) -> Any:
    from autosplit.workflow.profiling import profile_as_asked

    return profile_as_asked(
        session,
        fake=args.fake,
        image_size=_image_size(args.image_size),
        prompt_tokens=args.prompt_tokens,
        num_frames=args.num_frames,
    )


def add_profile_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="measure every unit: memory, FLOPs, time, grad, randomness",
        description="Run one traced step per unit and write the profile JSON.",
    )
    _add_config_flags(parser)
    _add_profile_flags(parser)
    parser.add_argument(
        "--profile_path", type=Path, default=None, help="where to write the profile (default: OUTPUT_PATH/profile.json)"
    )
    parser.set_defaults(command=profile_command)


def profile_command(args: argparse.Namespace) -> int:
    from autosplit.planning.report import profile_table
    from autosplit.workflow.session import open_session

    config = config_from_args(args)
    session = open_session(config)
    if config.plan.profile == "none" and not args.fake:
        raise ConfigError("--profile none measures nothing; use --profile fake or real")
    profile = _profile(args, session)
    path = args.profile_path or Path(config.output_path) / "profile.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    print(profile_table(profile))
    print(f"profile written to {path}")
    return 0


def add_plan_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="show which units run in which stage and write plan.json",
        description="Profile, plan the split and print it as a table.",
    )
    _add_config_flags(parser)
    _add_profile_flags(parser)
    parser.add_argument(
        "--profile_json",
        type=Path,
        default=None,
        help="plan from a profile written by `autosplit profile` instead of profiling",
    )
    parser.add_argument(
        "--plan_path", type=Path, default=None, help="where to write plan.json (default: OUTPUT_PATH/plan.json)"
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="also write an HTML page with per-unit memory bars and the cut marked"
    )
    parser.set_defaults(command=plan_command)


def plan_command(args: argparse.Namespace) -> int:
    from autosplit.planning.memory import replace_predicted
    from autosplit.planning.profile import Profile
    from autosplit.planning.report import plan_html, plan_table, with_budget
    from autosplit.workflow.profiling import plan_run
    from autosplit.workflow.session import open_session

    config = config_from_args(args)
    session = open_session(config)
    if args.profile_json is not None:
        try:
            profile = Profile.from_dict(json.loads(args.profile_json.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--profile_json {args.profile_json}: not a readable profile ({exc})") from exc
    else:
        profile = _profile(args, session)
    plan = session.plan(profile) if profile is not None else plan_run(session)
    plan = replace_predicted(plan, with_budget(plan.predicted, config.plan.vram_budget_gib))
    path = args.plan_path or Path(config.output_path) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.to_json())
    print(plan_table(plan))
    print(f"plan written to {path}")
    if args.report is not None:
        args.report.write_text(plan_html(plan))
        print(f"report written to {args.report}")
    return 0


def add_inspect_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="describe (and verify) a cache",
        description="Print a cache's schema, size, compression, completeness and fingerprints as JSON.",
    )
    parser.add_argument("cache", help="cache folder, or an fsspec URL (memory://..., s3://...)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="read every chunk and check every checksum; exit 2 naming the array and sample of each failure",
    )
    parser.set_defaults(command=inspect_command)


def inspect_command(args: argparse.Namespace) -> int:
    from autosplit.storage.cache import describe_cache, verify_cache
    from autosplit.storage.remote import fetch, is_remote, local_path

    args.cache = fetch(str(args.cache)) if is_remote(str(args.cache)) else local_path(str(args.cache))
    print(json.dumps(describe_cache(args.cache), indent=2))
    if not args.verify:
        return 0
    problems = verify_cache(args.cache)
    for line in problems:
        print(f"autosplit: error: {line}", file=sys.stderr)
    if problems:
        return 2
    print("verify: every chunk read and every checksum matched")
    return 0


def add_bench_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="profile the pipeline and compare its memory and FLOPs with a baseline budget",
        description="Profile as `autosplit plan` does and check the predicted peaks, the training step and every "
        "unit against a budget file (see docs/benchmarks.md). Exit 1 on a regression.",
    )
    _add_config_flags(parser)
    _add_profile_flags(parser)
    parser.add_argument(
        "--baseline", type=Path, default=None, help="budget file (JSON) to compare with, e.g. profiles/budgets.json"
    )
    parser.add_argument(
        "--write-baseline",
        dest="write_baseline",
        type=Path,
        default=None,
        help="write (or update) this measurement's entry in this budget file",
    )
    parser.add_argument(
        "--budget_key",
        default=None,
        help="entry of the budget file (default: PIPELINE-MODEL-MODE, e.g. qwen_image-tiny-fake)",
    )
    parser.set_defaults(command=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    from autosplit.planning.budget import (
        budget_entry,
        budget_key,
        check_budget,
        compare_budget,
        load_budgets,
        make_budget,
        profile_inputs,
        write_budget,
    )
    from autosplit.planning.report import budget_table
    from autosplit.workflow.profiling import profile_dtype
    from autosplit.workflow.session import open_session

    if args.baseline is None and args.write_baseline is None:
        raise ConfigError("autosplit bench needs --baseline FILE (compare) or --write-baseline FILE (record), or both")
    config = config_from_args(args)
    session = open_session(config)
    baseline = load_budgets(args.baseline) if args.baseline is not None else None  # fail early on a bad file
    profile = _profile(args, session)
    if profile is None:
        raise ConfigError("--profile none measures nothing; use --profile fake or real")
    plan = session.plan(profile)
    model = Path(config.model.path).name if config.model.path else ("full" if args.fake else "tiny")
    key = args.budget_key or budget_key(session.adapter.name, model, profile.mode, session.task)
    dtype = profile_dtype(session, fake=args.fake)
    inputs = profile_inputs(
        dtype, image_size=args.image_size, prompt_tokens=args.prompt_tokens, num_frames=args.num_frames
    )
    status = 0
    if baseline is not None:
        budget = budget_entry(baseline, key, args.baseline)
        print(
            f"{key}: measured vs {args.baseline} (tolerance: memory +{baseline['tolerance']['memory'] * 100:g}%, "
            f"FLOPs {baseline['tolerance']['flops'] * 100:g}%, cut exact)"
        )
        print(budget_table(compare_budget(profile, plan, budget, tolerance=baseline["tolerance"])))
        problems = check_budget(profile, plan, budget, tolerance=baseline["tolerance"], inputs=inputs)
        for line in problems:
            print(f"autosplit: regression: {line}", file=sys.stderr)
        print(f"{len(problems)} regression(s)" if problems else "no regression")
        status = 1 if problems else 0
    if args.write_baseline is not None:
        write_budget(args.write_baseline, key, make_budget(profile, plan, inputs=inputs))
        print(f"budget {key} written to {args.write_baseline}")
    return status


def add_convert_lora_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert-lora",
        help="convert a LoRA file between diffusers, kohya and ComfyUI key formats",
        description="Read a LoRA file in any format the family has (diffusers, kohya, comfyui; found from its keys) "
        "and write it in --to FORMAT. Converting there and back gives the same tensors. "
        "docs/lora-formats.md says which tool reads which format.",
    )
    parser.add_argument("source", type=Path, metavar="IN", help="LoRA .safetensors to read")
    parser.add_argument("target", type=Path, metavar="OUT", help="LoRA .safetensors to write")
    parser.add_argument("--pipeline", required=True, help="model family: qwen_image, flux, sd, sdxl, wan")
    parser.add_argument("--to", required=True, choices=LORA_FORMATS, help="the format to write")
    parser.add_argument(
        "--model_paths",
        type=Path,
        default=None,
        help="the LoRA's diffusers pipeline folder, whose denoiser config numbers SDXL's UNet blocks "
        "(default: the family's published full-size config)",
    )
    parser.set_defaults(command=convert_lora_command)


def convert_lora_command(args: argparse.Namespace) -> int:
    from autosplit.adapters.base import get_adapter
    from autosplit.training.lora import convert_lora_file

    adapter = get_adapter(args.pipeline)
    if args.source.resolve() == args.target.resolve():
        raise ConfigError(f"convert-lora: IN and OUT are the same file ({args.source}); write OUT elsewhere")
    config = None
    if args.model_paths is not None:
        path = args.model_paths / adapter.base_model_aliases["dit"] / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"--model_paths {args.model_paths}: cannot read {path} ({exc}); point it at the "
                f"LoRA's diffusers pipeline folder"
            ) from exc
    fmt, count = convert_lora_file(args.source, args.target, adapter=adapter, to=args.to, denoiser_config=config)
    print(f"{args.source} ({fmt}, {count} LoRA layers) -> {args.target} ({args.to})")
    return 0


#: the verbs `autosplit launch` can start
_COMMANDS = ("run", "plan", "profile", "inspect", "bench")


def add_launch_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="run a COMMAND in the processes `accelerate launch` starts; errors stay one line",
        usage="autosplit launch [ACCELERATE LAUNCH OPTIONS] COMMAND [ARGS]",
        description="`autosplit launch --multi_gpu --num_processes 2 run ARGS` is `accelerate launch --multi_gpu "
        "--num_processes 2 -m autosplit run ARGS` (any option of `accelerate launch --help`, then an "
        "autosplit command: run, plan, profile, inspect, bench), except how a failure ends: each "
        "process prints its error in one line, and the exit code is the first failed process's "
        "(2 for a user error) instead of accelerate's traceback and exit code 1.",
        prefix_chars="+",
        add_help=False,
    )  # no options of its own: every argument goes on, in order
    parser.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(command=launch_command, launch_parser=parser)


def launch_command(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if not argv or argv[0] in ("-h", "--help"):
        args.launch_parser.print_help()
        return 0 if argv else 2
    split = next((i for i, word in enumerate(argv) if word in _COMMANDS), None)
    if split is None:
        raise ConfigError(
            f"autosplit launch {' '.join(argv)}: no autosplit command ({', '.join(_COMMANDS)}); name "
            f"one after accelerate's options, e.g. autosplit launch --multi_gpu --num_processes 2 "
            f"run --task sft:data_process ..."
        )
    return _accelerate_launch(argv[:split], [*(["-v"] if args.verbose else []), *argv[split:]])


def _accelerate_launch(options: list[str], command: list[str]) -> int:
    """`accelerate launch OPTIONS -m autosplit COMMAND`, returning the first failed process's exit
    code where accelerate would raise (CalledProcessError for one process, torchrun's
    ChildFailedError for several) and print a traceback."""
    import subprocess

    import torch.distributed.run  # noqa: F401  (creates torchrun's loggers, quieted below)
    from accelerate.commands.launch import launch_command as accelerate_launch
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launch_args = launch_command_parser().parse_args([*options, "-m", "autosplit", *command])
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)  # its per-process failure lines: the one line below says it
    try:
        accelerate_launch(launch_args)
    except subprocess.CalledProcessError as exc:
        return _process_failed(0, exc.returncode)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        return _process_failed(rank, failure.exitcode)
    return 0


def _process_failed(rank: int, exitcode: int) -> int:
    if exitcode == 2:
        return 2  # an AutosplitError: the process printed it, in one line
    what = f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with code {exitcode}"
    print(f"autosplit: error: process {rank} {what} (its output is above)", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosplit",
        description="Split diffusion fine-tuning into a cached preprocessing stage and a training stage.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"autosplit {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_run_parser(subparsers)
    add_plan_parser(subparsers)
    add_profile_parser(subparsers)
    add_inspect_parser(subparsers)
    add_bench_parser(subparsers)
    add_convert_lora_parser(subparsers)
    add_launch_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="autosplit: %(message)s", stream=sys.stderr
    )
    try:
        return args.command(args)
    except AutosplitError as exc:
        print(f"autosplit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
