"""The CLI in daily use (issue 18): `--help` imports no torch and shows the defaults, `--version`,
`autosplit launch` keeps a user error to one line and exit code 2 on every process, progress
appears as log lines where no bar is shown, and the summaries say what happened."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autosplit import __version__
from autosplit.cli import build_parser, main
from autosplit.config import FLAGS
from autosplit.training.stage1 import Progress, format_seconds
from autosplit.training.trainer import TrainResult
from autosplit.workflow.run import RunResult

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "zarr", "numpy")

#: runs autosplit's main() on argv, then prints which heavy packages got imported
IMPORTS_AFTER = """
import sys
from autosplit.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY)))
""".replace("HEAVY", repr(HEAVY))


def run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--help"], "launch"),
        (["run", "--help"], "--learning_rate"),
        (["launch", "--help"], "accelerate launch"),
        (["--version"], f"autosplit {__version__}"),
    ],
)
def test_help_and_version_import_no_torch(argv, expected):
    result = run_python("-c", IMPORTS_AFTER, *argv)
    assert result.returncode == 0, result.stderr
    *shown, imported = result.stdout.strip().splitlines()
    assert imported == "[]"
    assert expected in "\n".join(shown)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == "autosplit 0.1.0\n"


def test_run_help_shows_the_config_defaults():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    text = " ".join(run.format_help().split())
    assert (
        "the optimizer's learning rate (the peak of --lr_scheduler; Prodigy: its multiplier, ~1) (default: 1e-4)"
        in text
    )
    assert "clip the gradients' total norm to this (0: no clipping) (default: 0)" in text
    assert "epochs of stage 2 (default: 1; 8 on the built-in dataset)" in text
    assert "micro-batches per optimizer step (default: 1)" in text
    helps = {action.dest: action.help for action in run._actions}
    assert all("default" in (helps[flag] or "") for flag in FLAGS), [
        flag for flag in FLAGS if "default" not in (helps[flag] or "")
    ]


def launch(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    return run_python(
        "-m",
        "autosplit",
        "launch",
        *options,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "run",
        "--task",
        "sft:train",
        "--dataset_base_path",
        str(tmp_path / "nonexistent"),
        "--output_path",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    )


def assert_one_line_error(result: subprocess.CompletedProcess, tmp_path: Path) -> list[str]:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("autosplit: error: ") and "nonexistent is not an autosplit cache" in lines[-1]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    return [line for line in lines if line.startswith("autosplit: error: ")]


def test_launch_one_process_error_is_one_line_exit_2(tmp_path):
    result = launch(tmp_path, "--cpu", "--num_processes", "1")
    assert len(assert_one_line_error(result, tmp_path)) == 1


@pytest.mark.slow
def test_launch_two_processes_error_is_one_line_exit_2_on_each(tmp_path):
    # `--multi_gpu` on the CPU: torchrun starts two processes, which fail alike
    result = launch(tmp_path, "--multi_gpu", "--num_processes", "2")
    errors = assert_one_line_error(result, tmp_path)
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1  # a process stopped by the first one's exit prints none
    assert "closing signal" not in result.stderr and "exitcode" not in result.stderr  # torchrun's failure report


def test_launch_without_a_command_is_a_one_line_error(capsys):
    assert main(["launch", "--cpu", "--num_processes", "1"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("autosplit: error: autosplit launch --cpu --num_processes 1: no autosplit command")


STAGE1_LINE = re.compile(r"^stage 1: caching (\d+)/16 samples, [\d.]+ samples/s, ETA \d+s$")
STAGE2_LINE = re.compile(r"^stage 2: training (\d+)/3 steps, [\d.]+ steps/s, loss (\d+\.\d{4}), ETA \d+s$")


def test_progress_is_logged_per_sample_and_per_step_then_a_rerun_says_stage1_was_skipped(
    tmp_path, tiny_model, tiny_dataset, caplog, capsys
):
    caplog.set_level(logging.INFO, logger="autosplit")
    out = tmp_path / "o"
    every = ["--set", "cache.log_every_s=0", "--set", "train.log_every_s=0"]
    assert main(["run", "--output_path", str(out), "--max_steps", "3", *every]) == 0
    messages = [r.getMessage() for r in caplog.records]
    stage1 = [int(m.group(1)) for m in map(STAGE1_LINE.match, messages) if m]
    assert stage1 == list(range(1, 17))  # one line per encoded sample (batch of 1), not one per shard
    stage2 = [m.groups() for m in map(STAGE2_LINE.match, messages) if m]
    logged = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert stage2 == [(str(i + 1), f"{loss:.4f}") for i, loss in enumerate(logged)]
    assert "stage 1: 16 samples cached in" in capsys.readouterr().out

    caplog.clear()
    assert main(["run", "--output_path", str(out), "--max_steps", "3"]) == 0  # log_every_s: 30 s
    printed = capsys.readouterr().out
    assert f"stage 1: skipped, the cache in {out / 'cache'} is complete and current (16 samples)" in printed
    assert "samples cached" not in printed
    messages = [r.getMessage() for r in caplog.records]
    assert not any(map(STAGE1_LINE.match, messages))
    assert [m.group(1) for m in map(STAGE2_LINE.match, messages) if m] == ["3"]  # the last step only


def test_progress_logs_at_its_interval_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="autosplit")
    with Progress(total=3, desc="stage 2: training", unit="step", every_s=3600) as progress:
        for _ in range(3):
            progress.update(1, loss="0.5000")
    with Progress(total=3, desc="quiet", unit="step", every_s=None) as progress:
        progress.update(3)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("stage 2: training 3/3 steps, ")
    assert lines[0].endswith(", loss 0.5000, ETA 0s")
    assert [format_seconds(s) for s in (42.2, 185, 7620)] == ["42s", "3m05s", "2h07m"]


def test_gradient_accumulation_longer_than_the_run_is_refused_before_anything_is_written(
    tmp_path, tiny_model, tiny_dataset, capsys
):
    out = tmp_path / "o"
    # unsplit: nothing is cached, so any file in `out` would be stage 2's; 16 samples, 16 batches
    code = main(
        [
            "run",
            "--no-split",
            "--output_path",
            str(out),
            "--dataset_repeat",
            "1",
            "--num_epochs",
            "1",
            "--gradient_accumulation_steps",
            "17",
        ]
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert line.startswith(
        "autosplit: error: --gradient_accumulation_steps 17 is more than the 16 batches of the "
        "whole run on each process (1 epoch(s) of 16"
    )
    assert "pass --gradient_accumulation_steps 16 or less" in line
    assert not out.exists()  # no plan.json, no train_log.jsonl, no lora.safetensors


def test_gradient_accumulation_carries_across_epochs(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "o"  # 2 epochs of 16 batches, 20 per step: one step, completed in the second epoch
    assert (
        main(
            [
                "run",
                "--no-split",
                "--output_path",
                str(out),
                "--dataset_repeat",
                "1",
                "--num_epochs",
                "2",
                "--gradient_accumulation_steps",
                "20",
            ]
        )
        == 0
    )
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1


def test_summary_of_a_run_without_optimizer_steps(monkeypatch, tmp_path, capsys):
    import autosplit.workflow.run

    result = RunResult(plan=None, training=TrainResult(0, [], tmp_path, 0.5))  # type: ignore[arg-type]
    monkeypatch.setattr(autosplit.workflow.run, "run", lambda config, **kwargs: result)
    assert main(["run", "--output_path", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"stage 2: no optimizer step in 0.5 s; weights in {tmp_path}\n"


def test_resume_without_a_checkpoint_is_refused_before_stage1(tmp_path, tiny_model, tiny_dataset, capsys):
    out = tmp_path / "o"
    assert main(["run", "--output_path", str(out), "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("autosplit: error: --resume: no checkpoint in ")
    assert not out.exists()  # not even the cache: stage 1 never started


def test_a_complete_cache_whose_plan_was_edited_is_refused(tmp_path, tiny_model, tiny_dataset, capsys):
    out = tmp_path / "o"
    assert main(["run", "--output_path", str(out), "--max_steps", "1"]) == 0
    meta = out / "cache" / "zarr.json"
    node = json.loads(meta.read_text())
    node["attributes"]["autosplit"]["plan"]["cached"].pop()  # the key still matches: only the plan differs
    meta.write_text(json.dumps(node))
    capsys.readouterr()
    assert main(["run", "--output_path", str(out), "--max_steps", "1"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"autosplit: error: {out / 'cache'}: its plan is not the plan this run makes (value ")
