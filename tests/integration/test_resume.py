"""Stage-2 checkpoints and `autosplit run --resume`: a stopped or killed run continues exactly as an
uninterrupted one (every loss, every LoRA weight), and never from a checkpoint of other settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autosplit.cli import main
from autosplit.training.checkpoint import latest_checkpoint

BASE = ["--num_epochs", "2", "--dataset_repeat", "1", "--lora_rank", "4", "--seed", "3"]


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)
    wa, wb = load_file(a / "lora.safetensors"), load_file(b / "lora.safetensors")
    assert sorted(wa) == sorted(wb)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    path = tmp_path_factory.mktemp("resume") / "cache"
    assert main(["run", "--task", "sft:data_process", "--output_path", str(path), *BASE]) == 0
    return path


def train(cache: Path, out: Path, *extra: str) -> int:
    return main(
        ["run", "--task", "sft:train", "--dataset_base_path", str(cache), "--output_path", str(out), *BASE, *extra]
    )


@pytest.mark.parametrize("extra", [[], ["--batch_size", "3", "--gradient_accumulation_steps", "2"]])
def test_stop_then_resume_continues_the_exact_loss_sequence(cache, tmp_path, extra):
    assert train(cache, tmp_path / "full", *extra) == 0
    every = ["--set", "train.checkpoint_every=2"]
    assert train(cache, tmp_path / "cut", *extra, *every, "--max_steps", "5") == 0
    assert latest_checkpoint(tmp_path / "cut").name == "step-5"  # the final state is saved too
    assert train(cache, tmp_path / "cut", *extra, *every, "--resume") == 0
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    assert len(losses(tmp_path / "full")) == (32 if not extra else 6)  # 16 x 2 epochs; 6 x 2 / accumulation 2


def test_resume_without_a_checkpoint_is_refused_naming_the_folder_and_the_fix(cache, tmp_path, capsys):
    assert train(cache, tmp_path / "b", "--max_steps", "3", "--resume") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"autosplit: error: --resume: no checkpoint in {tmp_path / 'b' / 'checkpoints'}; drop --resume "
        f"to start from step 0, or pass --set train.resume=auto to continue only where a checkpoint "
        f"exists"
    )
    assert not (tmp_path / "b").exists()  # refused before anything is written


def test_resume_auto_without_a_checkpoint_starts_from_step_0(cache, tmp_path):
    assert train(cache, tmp_path / "a", "--max_steps", "3") == 0
    assert train(cache, tmp_path / "b", "--max_steps", "3", "--set", "train.resume=auto") == 0
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_resume_auto_with_a_checkpoint_continues(cache, tmp_path):
    every = ["--set", "train.checkpoint_every=2"]
    assert train(cache, tmp_path / "full", "--max_steps", "6") == 0
    assert train(cache, tmp_path / "cut", *every, "--max_steps", "3") == 0
    assert train(cache, tmp_path / "cut", *every, "--max_steps", "6", "--set", "train.resume=auto") == 0
    assert_same_run(tmp_path / "full", tmp_path / "cut")


@pytest.mark.parametrize(
    "toml, sets, expected",
    [
        ("", [], "no"),
        ("resume = true", [], "yes"),
        ("resume = false", [], "no"),
        ('resume = "auto"', [], "auto"),
        ("", ["train.resume=true"], "yes"),
        ("", ["train.resume=Auto"], "auto"),
        ("resume = true", ["train.resume=no"], "no"),
    ],
)
def test_resume_setting_spellings(tmp_path, toml, sets, expected):
    from autosplit.config import load_config

    (tmp_path / "run.toml").write_text(f"[train]\n{toml}\n")
    config = load_config(toml_path=tmp_path / "run.toml", sets=sets, flags={})
    assert config.train.resume == expected


def test_resume_flag_means_yes_and_a_bad_value_is_refused():
    from autosplit.cli import build_parser, config_from_args
    from autosplit.config import load_config
    from autosplit.errors import ConfigError

    assert config_from_args(build_parser().parse_args(["run", "--resume"])).train.resume == "yes"
    with pytest.raises(ConfigError, match=r"train.resume='maybe' must be no, yes .* or auto"):
        load_config(toml_path=None, sets=["train.resume=maybe"], flags={})


def test_resume_with_other_settings_is_refused(cache, tmp_path, capsys):
    assert train(cache, tmp_path / "o", "--max_steps", "2", "--set", "train.checkpoint_every=1") == 0
    before = (tmp_path / "o/train_log.jsonl").read_text()
    assert train(cache, tmp_path / "o", "--learning_rate", "0.5", "--resume") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step-2 was saved with other settings (changed: train.learning_rate)" in line and "--resume" in line
    assert (tmp_path / "o/train_log.jsonl").read_text() == before  # nothing overwritten


def test_checkpoints_keep_only_the_newest(cache, tmp_path):
    assert (
        train(
            cache,
            tmp_path / "o",
            "--max_steps",
            "7",
            "--set",
            "train.checkpoint_every=2",
            "--set",
            "train.checkpoints_kept=2",
        )
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "o/checkpoints").iterdir())
    assert names == ["step-6", "step-7"]
    files = sorted(p.name for p in (tmp_path / "o/checkpoints/step-7").iterdir())
    assert files == ["optimizer.json", "optimizer.safetensors", "rng.safetensors", "state.json", "weights.safetensors"]


@pytest.mark.slow
def test_sigkill_during_stage2_then_resume(cache, tmp_path):
    args = [
        sys.executable,
        "-m",
        "autosplit",
        "run",
        "--task",
        "sft:train",
        "--dataset_base_path",
        str(cache),
        *BASE,
        "--num_epochs",
        "3",
        "--set",
        "train.checkpoint_every=4",
    ]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    assert train(cache, tmp_path / "full", "--num_epochs", "3") == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--output_path", str(out)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while latest_checkpoint(out) is None or latest_checkpoint(out).name == "step-4":
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = len(losses(out))
    assert 8 <= killed_at < 48  # killed mid-run, with log lines past the newest checkpoint possible
    assert subprocess.run([*args, "--output_path", str(out), "--resume"], env=env, capture_output=True).returncode == 0
    assert_same_run(tmp_path / "full", out)


def test_a_loss_that_stops_being_a_number_ends_the_run_with_a_clear_error(cache, tmp_path, capsys):
    # a learning rate of 1e30 overflows the LoRA weights within a few steps
    assert train(cache, tmp_path / "nan", "--learning_rate", "1e30", "--set", "train.checkpoint_every=1") == 2
    err = capsys.readouterr().err
    assert "autosplit: error: stage 2: the loss is nan at step 2 (epoch 0), so the weights are not saved" in err
    assert "Lower --learning_rate" in err
    assert not (tmp_path / "nan/lora.safetensors").exists()  # nothing saved from non-numbers
    newest = latest_checkpoint(tmp_path / "nan")  # step 1's update was huge but finite: it is kept
    assert newest.name == "step-1"
    assert all(torch.isfinite(t).all() for t in load_file(newest / "weights.safetensors").values())


def test_no_checkpoint_is_written_from_weights_that_are_not_numbers(cache, tmp_path, capsys, monkeypatch):
    real_step = torch.optim.AdamW.step
    steps = []

    def overflowing_step(self, *args, **kwargs):  # fault injection: the second update overflows
        out = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    assert train(cache, tmp_path / "inf", "--set", "train.checkpoint_every=1") == 2
    err = capsys.readouterr().err
    assert "stage 2: the weights hold NaN or inf after step 2, so no checkpoint is written" in err
    assert latest_checkpoint(tmp_path / "inf").name == "step-1"
