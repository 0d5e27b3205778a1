"""Command line: `autosplit run`, `autosplit plan`, `autosplit profile`, `autosplit inspect`, `autosplit bench`.

Each verb has `add_<verb>_parser(subparsers)` and `<verb>_command(args) -> int`. User errors
(AutosplitError) become one line on stderr and exit code 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from autosplit.config import SEED_FLAGS, RunConfig, load_config
from autosplit.errors import AutosplitError, CacheError, ConfigError
from autosplit.storage import fetch, is_remote, local_path, upload

log = logging.getLogger("autosplit")

#: flags of the seed's commands that autosplit accepts and does not need
_COMPAT_FLAGS = ("remove_prefix_in_ckpt",)
_FLAG_HELP = {
    "dataset_base_path": "dataset folder (stage 1), or the cache folder (--task sft:train)",
    "dataset_metadata_path": "metadata.csv / metadata.jsonl (default: the one in the dataset folder)",
    "dataset_repeat": "times each sample is seen per epoch",
    "dataset_num_workers": "loader threads reading ahead of the trainer",
    "max_pixels": "images larger than this are scaled down (pixels)",
    "learning_rate": "AdamW learning rate",
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
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (keys as in docs/config.md)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.learning_rate=5e-5 (repeatable)")
    for flag in SEED_FLAGS:
        parser.add_argument(f"--{flag}", dest=flag, default=None, help=_FLAG_HELP.get(flag))
    parser.add_argument("--use_gradient_checkpointing", action="store_true",
                        help="gradient checkpointing on the trained model")
    parser.add_argument("--no-split", dest="no_split", action="store_true",
                        help="train unsplit: every unit runs every step, nothing is cached")
    parser.add_argument("--full_finetune", action="store_true", help="train all weights instead of a LoRA")
    parser.add_argument("--resume", action="store_true",
                        help="continue stage 2 from the newest checkpoint in OUTPUT_PATH/checkpoints "
                             "(see train.checkpoint_every)")
    parser.add_argument("--model_id_with_origin_paths", default=None,
                        help="seed-compatible model spec; resolved from the local Hugging Face cache only")
    for flag in _COMPAT_FLAGS:
        parser.add_argument(f"--{flag}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--find_unused_parameters", nargs="?", const="true", default=None, metavar="BOOL",
                        help="multi-process stage 2: DDP finds trainable parameters without a gradient each step "
                             "(default true; see train.find_unused_parameters)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    flags = {k: getattr(args, k) for k in SEED_FLAGS if getattr(args, k) is not None}
    sets = list(args.set)
    if args.use_gradient_checkpointing:
        sets.append("train.gradient_checkpointing=true")
    if args.no_split:
        sets.append("train.split=false")
    if args.full_finetune:
        sets.append("lora.full_finetune=true")
    if getattr(args, "resume", False):
        sets.append("train.resume=true")
    if getattr(args, "find_unused_parameters", None) is not None:
        sets.append(f"train.find_unused_parameters={args.find_unused_parameters}")
    if args.model_id_with_origin_paths and "model_paths" not in flags:
        from autosplit.models import resolve_hub_id

        flags["model_paths"] = str(resolve_hub_id(args.model_id_with_origin_paths))
    return load_config(toml_path=args.config, sets=sets, flags=flags)


def add_run_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run", help="plan, cache (stage 1) and train (stage 2)",
        description="Train with split preprocessing. With no arguments: the built-in tiny Qwen-Image pipeline "
                    "on a synthetic dataset, both stages.")
    _add_config_flags(parser)
    parser.set_defaults(command=run_command)


def run_command(args: argparse.Namespace) -> int:
    from autosplit.session import open_session
    from autosplit.stage1 import run_stage1
    from autosplit.trainer import check_trainable_early, train

    config = config_from_args(args)
    session = open_session(config)
    if session.mode != "data_process" and is_remote(config.output_path):
        raise ConfigError(f"--output_path {config.output_path}: LoRA and logs are written to a local folder; "
                          f"a URL is taken as the cache of --task sft:data_process (or use --cache_path URL)")
    output = Path(config.output_path)
    if session.mode != "data_process":
        check_trainable_early(session)
    if session.mode == "train":
        cache, plan = _stage2_cache(config, session)
        result = train(session, plan, output, cache_path=cache)
    else:
        plan = session.plan()
        _say_budget(plan, config.plan.vram_budget_gib)
        if session.mode == "data_process" and not plan.split:
            raise ConfigError("--task sft:data_process writes a cache; drop --no-split")
        samples = session.samples()
        if session.mode == "data_process" or plan.split:
            location = config.output_path if session.mode == "data_process" else _cache_location(config)
            cache = local_path(location)
            manifest = run_stage1(session, plan, samples, cache, replace_stale=session.mode == "")
            if is_remote(location) and _is_main_process():
                upload(cache, location)
            print(f"stage 1: {manifest['num_samples']} samples cached in {location}")
            if session.mode == "data_process":
                return 0
            result = train(session, plan, output, cache_path=cache)
        else:
            result = train(session, plan, output, samples=samples)
    if not result.is_main_process:
        return 0  # the main process reports the run
    tenth = max(1, len(result.losses) // 10)
    first, last = (sum(part) / len(part) for part in (result.losses[:tenth], result.losses[-tenth:]))
    print(f"stage 2: {result.steps} steps in {result.seconds:.1f} s; loss {first:.4f} -> {last:.4f} "
          f"(mean of the first and last {tenth} steps); weights in {result.output}")
    return 0


def _say_budget(plan: Any, budget_gib: float) -> None:
    """With --vram_budget, say (before any work) whether the predicted stage 2 fits."""
    from autosplit.report import plan_summary, with_budget

    if budget_gib and plan.predicted:
        plan = dataclasses.replace(plan, predicted=with_budget(plan.predicted, budget_gib))
        line = plan_summary(plan)[-1]
        (log.warning if not plan.predicted["fits_budget"] else log.info)("%s", line)


def _cache_location(config: RunConfig) -> str:
    """Where `--task sft` keeps its cache: cache.path (a folder or an fsspec URL) or OUTPUT/cache."""
    return config.cache.path or str(Path(config.output_path) / "cache")


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _stage2_cache(config: RunConfig, session: Any) -> tuple[Path, Any]:
    """The cache `--task sft:train` reads and the plan that made it (stage 2 executes that plan),
    checked against this run's graph, trained component and model folder."""
    from autosplit.cache import CacheReader
    from autosplit.models import fingerprint_component

    if not config.data.base_path:
        raise ConfigError("--task sft:train reads a cache: pass --dataset_base_path <the stage-1 output_path>")
    cache = fetch(config.data.base_path) if is_remote(config.data.base_path) else local_path(config.data.base_path)
    reader = CacheReader(cache)
    plan = reader.plan
    plan.check_graph(session.graph)
    key = reader.manifest["key"]
    if plan.trainable != session.trainable:
        raise CacheError(f"{cache} was planned for training {list(plan.trainable)}, this run trains "
                         f"{list(session.trainable)}; re-run stage 1 with the same --lora_base_model")
    for name, digest in key["components"].items():
        if (session.model_root / name).is_dir() and fingerprint_component(session.model_root, name) != digest:
            raise CacheError(f"{cache} was made with other {name} weights than {session.model_root / name}; "
                             f"re-run stage 1 (--task sft:data_process)")
    if key.get("replay_device", session.device.type) != session.device.type:
        raise CacheError(f"{cache} holds units split inside, recorded on {key['replay_device']}; their replay needs "
                         f"the same device type, this run is on {session.device.type}: re-run stage 1 with "
                         f"--device {session.device.type} (or train with --device {key['replay_device']})")
    if key.get("max_pixels") != config.data.max_pixels:
        raise CacheError(f"{cache} was made with --max_pixels {key.get('max_pixels')}, this run has "
                         f"{config.data.max_pixels} (a preprocessing setting changed); re-run stage 1 or pass "
                         f"--max_pixels {key.get('max_pixels')}")
    check_sources(cache, reader, session)
    return cache, dataclasses.replace(plan, settings=config.to_dict(), split=True)


def check_sources(cache: Path, reader: Any, session: Any) -> None:
    """Raise CacheError if the dataset the cache was made from changed since (image bytes, captions,
    training sizes, samples added or removed). Skipped, with a warning, if the dataset is gone."""
    from autosplit.data import source_digest

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
    index = {name: reader.group[f"index/{name}"][...] for name in ("image_sha256", "prompt_sha256", "size")}
    for i, sample in enumerate(samples):
        d = source_digest(sample)
        for what, mine, theirs in (("image bytes", d.image, bytes(index["image_sha256"][i])),
                                   ("caption", d.prompt, bytes(index["prompt_sha256"][i])),
                                   ("training size", list(d.size), index["size"][i].tolist())):
            if mine != theirs:
                raise CacheError(f"{cache} is stale: the {what} of sample {i} ({sample.image_path}) changed since "
                                 f"stage 1; {fix}")


def _add_profile_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fake", action="store_true",
                        help="profile from configs alone with fake tensors (no weights, no GPU); without "
                             "--model_paths this is the family's full-size configuration")
    parser.add_argument("--image_size", default=None, metavar="WxH",
                        help="profile a synthetic image of this size instead of the dataset's first sample")
    parser.add_argument("--prompt_tokens", type=int, default=None, help="profile a prompt of about this many tokens")
    parser.add_argument("--num_frames", type=int, default=None,
                        help="video families: profile a synthetic clip of this many frames (4k+1, e.g. 81) of "
                             "--image_size")


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--image_size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    return width, height


def _profile(args: argparse.Namespace, session: Any) -> Any:
    from autosplit.profiling import profile_fake, profile_real

    size = _image_size(args.image_size)
    if args.num_frames is not None:
        if session.adapter.media != "video":
            raise ConfigError(f"--num_frames: the {session.adapter.name} family trains on images; drop the flag")
        if size is None or args.num_frames < 1 or args.num_frames % 4 != 1:
            raise ConfigError(f"--num_frames {args.num_frames}: give 4k+1 frames (1, 5, ..., 81) with --image_size WxH")
    mode = "fake" if args.fake else session.config.plan.profile
    if mode == "none":
        return None
    if mode == "fake":
        if args.fake and session.config.model.dtype == "auto":  # planning for a GPU: its dtype
            session = dataclasses.replace(session, dtype=torch.bfloat16)
        return profile_fake(session, full_size=args.fake, image_size=size, prompt_tokens=args.prompt_tokens,
                            num_frames=args.num_frames)
    return profile_real(session, image_size=size, prompt_tokens=args.prompt_tokens, num_frames=args.num_frames)


def add_profile_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("profile", help="measure every unit: memory, FLOPs, time, grad, randomness",
                                   description="Run one traced step per unit and write the profile JSON.")
    _add_config_flags(parser)
    _add_profile_flags(parser)
    parser.add_argument("--profile_path", type=Path, default=None,
                        help="where to write the profile (default: OUTPUT_PATH/profile.json)")
    parser.set_defaults(command=profile_command)


def profile_command(args: argparse.Namespace) -> int:
    from autosplit.report import profile_table
    from autosplit.session import open_session

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
    parser = subparsers.add_parser("plan", help="show which units run in which stage and write plan.json",
                                   description="Profile, plan the split and print it as a table.")
    _add_config_flags(parser)
    _add_profile_flags(parser)
    parser.add_argument("--profile_json", type=Path, default=None,
                        help="plan from a profile written by `autosplit profile` instead of profiling")
    parser.add_argument("--plan_path", type=Path, default=None, help="where to write plan.json "
                        "(default: OUTPUT_PATH/plan.json)")
    parser.add_argument("--report", type=Path, default=None, help="also write an HTML page with per-unit memory "
                        "bars and the cut marked")
    parser.set_defaults(command=plan_command)


def plan_command(args: argparse.Namespace) -> int:
    from autosplit.planner import replace_predicted
    from autosplit.profiler import Profile
    from autosplit.report import plan_html, plan_table, with_budget
    from autosplit.session import open_session

    config = config_from_args(args)
    session = open_session(config)
    if args.profile_json is not None:
        try:
            profile = Profile.from_dict(json.loads(args.profile_json.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--profile_json {args.profile_json}: not a readable profile ({exc})") from exc
    else:
        profile = _profile(args, session)
    plan = session.plan(profile) if profile is not None else session.plan()
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
    parser = subparsers.add_parser("inspect", help="describe (and verify) a cache",
                                   description="Print a cache's schema, size, compression, completeness and "
                                               "fingerprints as JSON.")
    parser.add_argument("cache", help="cache folder, or an fsspec URL (memory://..., s3://...)")
    parser.add_argument("--verify", action="store_true",
                        help="read every chunk and check every checksum; exit 2 naming the array and sample of "
                             "each failure")
    parser.set_defaults(command=inspect_command)


def inspect_command(args: argparse.Namespace) -> int:
    from autosplit.cache import describe_cache, verify_cache

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
        "bench", help="profile the pipeline and compare its memory and FLOPs with a baseline budget",
        description="Profile as `autosplit plan` does and check the predicted peaks, the training step and every "
                    "unit against a budget file (see docs/benchmarks.md). Exit 1 on a regression.")
    _add_config_flags(parser)
    _add_profile_flags(parser)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="budget file (JSON) to compare with, e.g. profiles/budgets.json")
    parser.add_argument("--write-baseline", dest="write_baseline", type=Path, default=None,
                        help="write (or update) this measurement's entry in this budget file")
    parser.add_argument("--budget_key", default=None,
                        help="entry of the budget file (default: PIPELINE-MODEL-MODE, e.g. qwen_image-tiny-fake)")
    parser.set_defaults(command=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    from autosplit.gate import budget_entry, budget_key, check_budget, compare_budget, load_budgets, make_budget, \
        profile_inputs, write_budget
    from autosplit.report import budget_table
    from autosplit.session import open_session

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
    dtype = torch.bfloat16 if args.fake and config.model.dtype == "auto" else session.dtype  # as _profile does
    inputs = profile_inputs(dtype, image_size=args.image_size, prompt_tokens=args.prompt_tokens,
                            num_frames=args.num_frames)
    status = 0
    if baseline is not None:
        budget = budget_entry(baseline, key, args.baseline)
        print(f"{key}: measured vs {args.baseline} (tolerance: memory +{baseline['tolerance']['memory'] * 100:g}%, "
              f"FLOPs {baseline['tolerance']['flops'] * 100:g}%, cut exact)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autosplit", description="Split diffusion fine-tuning into a cached "
                                     "preprocessing stage and a training stage.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_run_parser(subparsers)
    add_plan_parser(subparsers)
    add_profile_parser(subparsers)
    add_inspect_parser(subparsers)
    add_bench_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="autosplit: %(message)s", stream=sys.stderr)
    try:
        return args.command(args)
    except AutosplitError as exc:
        print(f"autosplit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
