"""Stage 2 on two processes (DDP over gloo, real `accelerate launch`): both ranks end with the same
weights, the main process alone writes the outputs, and a checkpoint resumes on another number of
processes, finishing the interrupted epoch with each of its samples seen once (docs/multi-gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from autosplit.cli import main
from autosplit.training.lora import weights_digest
from autosplit.training.trainer import TRACE_ENV

# bit-for-bit comparisons across processes: on the CPU, on a GPU host too (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("on_the_cpu")

BASE = ["--lora_rank", "4", "--seed", "3", "--dataset_repeat", "1"]
NUM_SAMPLES = 16  # the built-in dataset


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    path = tmp_path_factory.mktemp("multi") / "cache"
    # 8 shards of 2: each of 2 ranks reads 4 shards, 8 samples, 8 batches of 1
    assert (
        main(["run", "--task", "sft:data_process", "--output_path", str(path), *BASE, "--set", "cache.shard_size=2"])
        == 0
    )
    return path


def train_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--task", "sft:train", "--dataset_base_path", str(cache), "--output_path", str(out), *BASE, *extra]


def launch_two(args: list[str], trace: Path) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("accelerate")
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process; `--multi_gpu` starts two through
    # torchrun, which run on CPU over gloo (--device cpu: on a GPU host too)
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
            *args,
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1", TRACE_ENV: str(trace)},
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def rank_stats(stderr: str) -> dict[int, dict]:
    stats = [json.loads(line.split("stage 2 stats ", 1)[1]) for line in stderr.splitlines() if "stage 2 stats " in line]
    return {s["rank"]: s for s in stats}


def traced(trace: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(trace.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_identical_weights_and_write_once(cache, tmp_path):
    out = tmp_path / "o"
    result = launch_two(
        train_args(cache, out, "--num_epochs", "1", "--set", "train.checkpoint_every=3"), tmp_path / "trace"
    )
    stats = rank_stats(result.stderr)
    assert sorted(stats) == [0, 1] and {s["world_size"] for s in stats.values()} == {2}
    saved = weights_digest(load_file(out / "lora.safetensors"))
    assert stats[0]["weights_sha256"] == stats[1]["weights_sha256"] == saved  # gradients were all-reduced
    assert result.stdout.count("stage 2: 8 steps") == 1  # one report, from the main process
    assert steps(out) == list(range(1, 9))  # one log, 8 batches per rank
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6", "step-8"]
    seen = traced(tmp_path / "trace")
    by_rank = [set(i for t in seen[r * 8 : (r + 1) * 8] for i in t["samples"]) for r in (0, 1)]
    assert not by_rank[0] & by_rank[1] and len(by_rank[0] | by_rank[1]) == NUM_SAMPLES  # disjoint shards


def check_epoch(seen: list[dict], *, dropped_at_most: int) -> None:
    """Epoch 0's samples: none seen twice, all but `dropped_at_most` seen."""
    counts = Counter(i for t in seen if t["epoch"] == 0 for i in t["samples"])
    assert max(counts.values()) == 1, counts
    assert NUM_SAMPLES - dropped_at_most <= len(counts) <= NUM_SAMPLES


@pytest.mark.slow
def test_two_processes_stop_then_resume_on_one(cache, tmp_path, caplog):
    out, trace = tmp_path / "o", tmp_path / "trace"
    every = ["--num_epochs", "2", "--set", "train.checkpoint_every=2"]
    launch_two(train_args(cache, out, *every, "--max_steps", "3"), trace)  # 3 steps x 2 ranks: 6 samples
    first = traced(trace)
    (trace / "rank-0.jsonl").rename(trace / "two-0.jsonl")
    (trace / "rank-1.jsonl").rename(trace / "two-1.jsonl")
    os.environ[TRACE_ENV] = str(trace)
    try:
        with caplog.at_level("INFO", logger="autosplit"):
            assert main(train_args(cache, out, *every, "--resume")) == 0
    finally:
        del os.environ[TRACE_ENV]
    assert "resuming from" in caplog.text and "written by 2 processes, this run has 1" in caplog.text
    resumed = traced(trace)
    assert resumed[0]["micro_step"] == 3  # the counters continue
    check_epoch(first + resumed, dropped_at_most=0)  # 2 -> 1: the 10 unreached samples, each once
    assert steps(out) == list(range(1, 3 + 10 + 16 + 1))  # then a full epoch of 16 on one process
    assert sorted(Counter(i for t in resumed if t["epoch"] == 1 for i in t["samples"]).values()) == [1] * 16


@pytest.mark.slow
def test_one_process_stop_then_resume_on_two(cache, tmp_path):
    out, trace = tmp_path / "o", tmp_path / "trace"
    every = ["--num_epochs", "1", "--set", "train.checkpoint_every=5"]
    os.environ[TRACE_ENV] = str(trace / "one")
    try:
        assert main(train_args(cache, out, *every, "--max_steps", "5")) == 0
    finally:
        del os.environ[TRACE_ENV]
    result = launch_two(train_args(cache, out, *every, "--resume"), trace / "two")
    stats = rank_stats(result.stderr)
    assert (
        stats[0]["weights_sha256"] == stats[1]["weights_sha256"] == weights_digest(load_file(out / "lora.safetensors"))
    )
    # 11 samples left, dealt 5 + 5 (one batch dropped: ranks need equal counts)
    check_epoch(traced(trace / "one") + traced(trace / "two"), dropped_at_most=1)
    assert steps(out) == list(range(1, 5 + 5 + 1))
    assert [t["micro_step"] for t in traced(trace / "two")] == [5, 6, 7, 8, 9] * 2
