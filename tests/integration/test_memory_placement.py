"""Stage 2's weight placement end to end on the built-in tiny Qwen-Image (CPU): with blocks swapped,
split training still equals unsplit bit for bit; the evicted host copies are never read; the
swapper moves exactly the bytes the plan predicted; the flags refuse what cannot work in one line;
an out-of-memory error becomes one line; the budget verdict is of the run about to be done; fp8
trains; full-size planning on fake tensors chooses a swap count; DDP trains with swapped blocks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autosplit.cli import main
from autosplit.training import placement, trainer

# bit-for-bit comparisons: on the CPU, also on a GPU host (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("on_the_cpu")

STEPS = [
    "--num_epochs",
    "1",
    "--dataset_repeat",
    "1",
    "--max_steps",
    "6",
    "--lora_rank",
    "4",
    "--seed",
    "5",
    "--use_gradient_checkpointing",
    "--device",
    "cpu",
    "--dtype",
    "float32",
]


def lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "lora.safetensors")


def stats(text: str) -> dict:
    return json.loads(text.split("stage 2 stats ", 1)[1].splitlines()[0])


@pytest.fixture(scope="module")
def swapped_unsplit(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    out = tmp_path_factory.mktemp("swap_unsplit")
    assert main(["run", "--no-split", "--blocks_to_swap", "1", "--output_path", str(out), *STEPS]) == 0
    return out


def test_split_equals_unsplit_with_a_block_swapped(swapped_unsplit, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="autosplit")
    assert main(["run", "--blocks_to_swap", "1", "--output_path", str(tmp_path), *STEPS]) == 0
    a, b = lora(swapped_unsplit), lora(tmp_path)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the swapper held exactly what the plan predicted: one block in host memory, one slot of it
    placed = json.loads((tmp_path / "plan.json").read_text())["predicted"]["placement"]
    moved = stats(caplog.text)["swap"]
    assert placed["blocks_to_swap"] == moved["blocks"] == 1 and placed["swapped"] == [1]
    assert moved["host_bytes"] == placed["host_pinned_bytes"] and moved["slot_bytes"] == moved["host_bytes"]
    assert "stage 2 weights: 1 of 2 repeated blocks in pinned host memory" in caplog.text


def test_evicted_host_copies_are_never_read(swapped_unsplit, tmp_path, monkeypatch):
    made = []

    def poisoned(*args, **kwargs):
        swapper = placement.place_denoiser(*args, **kwargs, poison=True, record=True)
        made.append(swapper)
        return swapper

    monkeypatch.setattr(trainer, "place_denoiser", poisoned)
    assert main(["run", "--no-split", "--blocks_to_swap", "2", "--output_path", str(tmp_path), *STEPS]) == 0
    (swapper,) = made
    # 6 steps, each block used in the forward and the backward, both blocks swapped through 2 slots
    assert len(swapper.events) == 6 * 4 and all(e.block in e.on_device for e in swapper.events)
    with_nan_evicted = lora(tmp_path)
    assert all(torch.isfinite(w).all() for w in with_nan_evicted.values())
    monkeypatch.undo()
    reference = tmp_path / "reference"
    assert main(["run", "--no-split", "--blocks_to_swap", "2", "--output_path", str(reference), *STEPS]) == 0
    expected = lora(reference)
    assert all(torch.equal(expected[k], with_nan_evicted[k]) for k in expected)


def test_swapping_without_gradient_checkpointing_is_refused_in_one_line(tmp_path, capsys):
    flags = [s for s in STEPS if s != "--use_gradient_checkpointing"]
    assert main(["run", "--blocks_to_swap", "4", "--output_path", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--blocks_to_swap 4 needs gradient checkpointing" in err
    assert "add --use_gradient_checkpointing" in err


def test_swapping_a_unet_and_too_many_blocks_are_refused(tmp_path, capsys):
    assert main(["run", "--pipeline", "sd", "--blocks_to_swap", "1", "--output_path", str(tmp_path), *STEPS]) == 2
    assert "sd family's unet has no repeated-block lists" in capsys.readouterr().err
    assert main(["run", "--blocks_to_swap", "3", "--output_path", str(tmp_path), *STEPS]) == 2
    assert "transformer has 2 repeated blocks; pass at most 2" in capsys.readouterr().err
    assert main(["run", "--blocks_to_swap", "two", "--output_path", str(tmp_path), *STEPS]) == 2
    assert "must be a count of blocks or auto" in capsys.readouterr().err


def test_out_of_memory_in_stage_2_is_one_line_with_the_prediction_and_a_fix(tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(trainer, "run_units", out_of_memory)
    assert main(["run", "--vram_budget", "1", "--output_path", str(tmp_path), *STEPS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("autosplit: error: stage 2 ran out of GPU memory while training step 1")
    assert "the plan predicted a peak of" in err and "--vram_budget 1 GiB" in err
    assert "--blocks_to_swap auto" in err


def test_the_budget_verdict_judges_the_unsplit_run_for_no_split(tmp_path, capsys):
    # 0.13 GiB: stage 2 (1.8 MB + the allocator's headroom) fits, unsplit (8.4 MB + headroom) does not
    assert main(["plan", "--vram_budget", "0.13", "--output_path", str(tmp_path), *STEPS]) == 0
    assert "budget 133.12 MiB: stage 2 fits" in capsys.readouterr().out
    assert main(["plan", "--no-split", "--vram_budget", "0.13", "--output_path", str(tmp_path), *STEPS]) == 0
    assert "budget 133.12 MiB: unsplit does NOT fit" in capsys.readouterr().out


def test_fp8_storage_trains_and_the_plan_names_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="autosplit")
    assert (
        main(["run", "--base_precision", "fp8", "--blocks_to_swap", "1", "--output_path", str(tmp_path), *STEPS]) == 0
    )
    placed = json.loads((tmp_path / "plan.json").read_text())["predicted"]["placement"]
    assert placed["base_precision"] == "fp8" and "fp8 (lossy)" in placed["reason"]
    assert stats(caplog.text)["swap"]["host_bytes"] == placed["host_pinned_bytes"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(0 < x < 10 for x in losses)


def test_full_size_planning_on_fake_tensors_chooses_the_swapped_blocks(tmp_path, capsys):
    assert (
        main(
            [
                "plan",
                "--fake",
                "--image_size",
                "1024x1024",
                "--prompt_tokens",
                "128",
                "--use_gradient_checkpointing",
                "--vram_budget",
                "24",
                "--blocks_to_swap",
                "auto",
                "--set",
                "plan.host_ram_gib=128",
                "--output_path",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    placed = json.loads((tmp_path / "plan.json").read_text())["predicted"]["placement"]
    assert placed["fits"] and placed["num_blocks"] == 60 and 25 <= placed["blocks_to_swap"] <= 40
    assert placed["judged_reserved_bytes"] <= 24 << 30
    assert f"stage 2 weights: {placed['blocks_to_swap']} of 60 repeated blocks in pinned host memory" in out


@pytest.mark.slow
def test_two_processes_train_the_same_weights_with_blocks_swapped(tmp_path, tiny_model, tiny_dataset):
    launcher = Path(sys.executable).with_name("accelerate")

    def launch(out: Path, *extra: str) -> list[dict]:
        result = subprocess.run(
            [
                str(launcher),
                "launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "-m",
                "autosplit",
                "run",
                "--no-split",
                "--output_path",
                str(out),
                *STEPS,
                *extra,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
            timeout=400,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return [
            json.loads(line.split("stage 2 stats ", 1)[1])
            for line in result.stderr.splitlines()
            if "stage 2 stats " in line
        ]

    swapped, resident = launch(tmp_path / "swapped", "--blocks_to_swap", "1"), launch(tmp_path / "resident")
    digests = {s["weights_sha256"] for s in swapped + resident}
    assert len(digests) == 1 and all("swap" in s for s in swapped)
