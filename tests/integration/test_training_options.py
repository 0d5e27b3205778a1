"""Issue 13's trainer options end to end on the tiny built-in pipelines, CPU fp32: every option keeps
split == unsplit bit for bit and changes what is learned; a schedule and each runnable optimizer
resume exactly; TensorBoard's event file holds the logged numbers and images."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from autosplit.cli import main

CPU = ["--device", "cpu", "--dtype", "float32"]
STEPS = ["--num_epochs", "1", "--dataset_repeat", "2", "--lora_rank", "4", "--seed", "7", "--max_steps", "8", *CPU]

#: together they use every schedule, every timestep sampling, every weighting scheme, clipping, the
#: Adam settings, each optimizer that runs on a CPU, and FLUX's training guidance
OPTIONS = {
    "cosine-clip-logit_normal-sigma_sqrt": [
        *("--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--max_grad_norm", "0.05"),
        *("--timestep_sampling", "logit_normal", "--logit_mean", "0.3", "--logit_std", "0.8"),
        *("--weighting_scheme", "sigma_sqrt"),
    ],
    "polynomial-adafactor-mode-cosmap": [
        *("--lr_scheduler", "polynomial", "--lr_power", "2", "--lr_warmup_steps", "1", "--optimizer", "adafactor"),
        *("--timestep_sampling", "mode", "--mode_scale", "0.5", "--weighting_scheme", "cosmap"),
    ],
    "linear-prodigy-sigmoid-diffsynth": [
        *("--lr_scheduler", "linear", "--optimizer", "prodigy", "--learning_rate", "1"),
        *("--timestep_sampling", "sigmoid", "--sigmoid_scale", "1.5", "--weighting_scheme", "diffsynth"),
    ],
    "restarts-adam_settings-diffsynth": [
        *("--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2", "--lr_warmup_steps", "1"),
        *("--adam_beta1", "0.8", "--adam_beta2", "0.99", "--adam_weight_decay", "0", "--adam_epsilon", "1e-6"),
        *("--weighting_scheme", "diffsynth"),
    ],
    "flux-warmup-guidance_1": [
        *("--pipeline", "flux", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2"),
        *("--guidance_scale", "1"),
    ],
    "sd-logit_normal": ["--pipeline", "sd", "--timestep_sampling", "logit_normal", "--logit_mean", "-0.5"],
}


def log_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "lora.safetensors"), load_file(b / "lora.safetensors")
    return sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def pipeline_of(options: list[str]) -> list[str]:
    return options[:2] if options[:1] == ["--pipeline"] else []


@pytest.fixture(scope="module")
def defaults(tmp_path_factory, tiny_model, tiny_dataset) -> dict[str, Path]:
    """One default run per family the options use (split, its cache kept for the option runs)."""
    root = tmp_path_factory.mktemp("defaults")
    runs = {}
    for family in ("qwen_image", "flux", "sd"):
        out = root / family
        assert main(["run", "--pipeline", family, "--output_path", str(out), *STEPS]) == 0
        runs[family] = out
    return runs


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_trains_split_exactly_as_unsplit_and_changes_the_run(name, defaults, tmp_path):
    options = OPTIONS[name]
    family = pipeline_of(options)[1] if pipeline_of(options) else "qwen_image"
    cache = defaults[family] / "cache"  # stage 1 is the same with every option: reused
    split, unsplit = tmp_path / "split", tmp_path / "unsplit"
    assert main(["run", "--cache_path", str(cache), "--output_path", str(split), *STEPS, *options]) == 0
    assert main(["run", "--no-split", "--output_path", str(unsplit), *STEPS, *options]) == 0
    assert log_of(split) == log_of(unsplit) and len(log_of(split)) == 8
    assert same_weights(split, unsplit)
    assert not same_weights(split, defaults[family])  # the option took effect
    assert [e["loss"] for e in log_of(split)] != [e["loss"] for e in log_of(defaults[family])]


def test_the_logged_rate_follows_the_schedule(defaults, tmp_path):
    out = tmp_path / "o"
    options = ["--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--learning_rate", "1e-3"]
    assert (
        main(
            ["run", "--cache_path", str(defaults["qwen_image"] / "cache"), "--output_path", str(out), *STEPS, *options]
        )
        == 0
    )
    rates = [e["lr"] for e in log_of(out)]
    expected = [0.0, 5e-4] + [1e-3 * 0.5 * (1 + np.cos(np.pi * (k - 2) / 6)) for k in range(2, 8)]
    assert rates == pytest.approx(expected)
    assert all(e["grad_norm"] > 0 for e in log_of(out))


BASE = ["--num_epochs", "2", "--dataset_repeat", "1", "--lora_rank", "4", "--seed", "3", *CPU]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    path = tmp_path_factory.mktemp("options-resume") / "cache"
    assert main(["run", "--task", "sft:data_process", "--output_path", str(path), *BASE]) == 0
    return path


def train(cache: Path, out: Path, *extra: str) -> int:
    args = ["run", "--task", "sft:train", "--dataset_base_path", str(cache), "--output_path", str(out), *BASE]
    return main([*args, *extra])


@pytest.mark.parametrize(
    "options",
    [
        ["--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--max_grad_norm", "0.05"],
        ["--optimizer", "adafactor", "--lr_scheduler", "polynomial", "--timestep_sampling", "logit_normal"],
        ["--optimizer", "prodigy", "--learning_rate", "1", "--lr_scheduler", "linear", "--weighting_scheme", "cosmap"],
    ],
    ids=["adamw-cosine", "adafactor-polynomial", "prodigy-linear"],
)
def test_resume_from_a_mid_run_checkpoint_is_exact(cache, tmp_path, options):
    every = ["--max_steps", "10", "--set", "train.checkpoint_every=3", "--set", "train.checkpoints_kept=10"]
    full = tmp_path / "full"
    assert train(cache, full, *options, *every) == 0
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-10", "step-3", "step-6", "step-9"]
    cut = tmp_path / "cut"  # the run as a kill after step 7 leaves it: checkpoint 6 is the newest
    shutil.copytree(full, cut)
    for stale in ("checkpoints/step-9", "checkpoints/step-10"):
        shutil.rmtree(cut / stale)
    (cut / "lora.safetensors").unlink()
    (cut / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log_of(full)[:7]))
    assert train(cache, cut, *options, *every, "--resume") == 0
    assert log_of(cut) == log_of(full)  # losses, rates and gradient norms
    assert same_weights(cut, full)


def test_resuming_a_length_dependent_schedule_over_another_length_is_refused(cache, tmp_path, capsys):
    cosine = ["--lr_scheduler", "cosine", "--set", "train.checkpoint_every=2"]
    assert train(cache, tmp_path / "o", *cosine, "--max_steps", "4") == 0
    assert train(cache, tmp_path / "o", *cosine, "--max_steps", "8", "--resume") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step-4: its --lr_scheduler cosine was planned over 4 optimizer steps, this run has 8" in line
    assert train(cache, tmp_path / "o", "--set", "train.checkpoint_every=2", "--max_steps", "8", "--resume") == 2
    assert "other settings (changed: train.lr_scheduler)" in capsys.readouterr().err


def test_tensorboard_event_file_holds_the_steps_scalars(cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert train(cache, out, "--max_steps", "3", "--report_to", "tensorboard", "--max_grad_norm", "1") == 0
    (events,) = (out / "logs/autosplit").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    steps = log_of(out)
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm")):
        logged = board.Scalars(tag)
        assert [s.step for s in logged] == [1, 2, 3]
        assert [s.value for s in logged] == pytest.approx([e[key] for e in steps], rel=1e-6)  # float32 there
    assert all(s.value > 0 for s in board.Scalars("train/samples_per_s"))
    assert all(s.value > 1 << 20 for s in board.Scalars("memory/host_peak_rss_bytes"))


def test_images_reach_tensorboard_through_the_image_entry_point(tmp_path):
    from accelerate import Accelerator
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from autosplit.training.tracking import RunLog, tracker_kwargs

    red = np.zeros((8, 12, 3), dtype=np.uint8)
    red[..., 0] = 255
    ramp = torch.linspace(0, 1, 8 * 12 * 3).reshape(8, 12, 3)  # float in [0, 1]
    run_log = RunLog(
        Accelerator(cpu=True, **tracker_kwargs("tensorboard", tmp_path)),
        tmp_path,
        [],
        report_to="tensorboard",
        hparams={"train.seed": 0},
    )
    run_log.log_images("validation/a prompt", [red, ramp], step=5)
    run_log.close()
    (events,) = (tmp_path / "logs/autosplit").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    (image,) = board.Images("validation/a prompt")
    assert (image.step, image.width, image.height) == (5, 24, 8)  # the batch side by side
    pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert np.array_equal(pixels[:, :12], red)
    assert np.array_equal(pixels[:, 12:], np.round(ramp.numpy() * 255).astype(np.uint8))


def test_without_report_to_no_tracker_writes(cache, tmp_path):
    assert train(cache, tmp_path / "o", "--max_steps", "2") == 0
    assert not (tmp_path / "o/logs").exists()
    assert list(log_of(tmp_path / "o")[0]) == ["step", "epoch", "loss", "lr", "grad_norm"]
