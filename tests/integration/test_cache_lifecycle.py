"""The cache over its life: stale caches are caught before training (naming what changed), updated
sample by sample, resumed after SIGKILL and after a full disk, written by two processes."""

from __future__ import annotations

import csv
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from autosplit.cli import main
from autosplit.errors import CacheError
from autosplit.storage.cache import CacheReader, cache_status, count_done_shards

# bit-for-bit comparisons across processes: on the CPU, on a GPU host too (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("on_the_cpu")

SMALL = ["--num_epochs", "1", "--dataset_repeat", "1", "--lora_rank", "4", "--max_steps", "2"]


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a cache, by path (progress chunks excluded: they are bookkeeping)."""
    group = zarr.open_group(str(path), mode="r")
    return {name: arr[...] for name, arr in group.arrays()} | {
        f"{g}/{name}": arr[...] for g, sub in group.groups() for name, arr in _walk(sub)
    }


def _walk(group):
    for name, arr in group.arrays():
        yield name, arr
    for gname, sub in group.groups():
        for name, arr in _walk(sub):
            yield f"{gname}/{name}", arr


def assert_same_cache(a: Path, b: Path) -> None:
    got, want = arrays(a), arrays(b)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name


def edit_metadata(dataset: Path, row: int, column: int, value: str) -> None:
    rows = list(csv.reader((dataset / "metadata.csv").open()))
    rows[row + 1][column] = value
    with (dataset / "metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture()
def dataset(tmp_path, tiny_dataset) -> Path:
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    """A cache of the built-in dataset written in one uninterrupted run, shard_size 3."""
    path = tmp_path_factory.mktemp("ref") / "cache"
    assert (
        main(
            [
                "run",
                "--task",
                "sft:data_process",
                "--output_path",
                str(path),
                "--dataset_base_path",
                str(tiny_dataset),
                "--set",
                "cache.shard_size=3",
            ]
        )
        == 0
    )
    return path


# --- staleness: detected before training, naming what changed --------------------------------


def stage1(data: Path, cache: Path, *extra: str) -> None:
    assert (
        main(
            ["run", "--task", "sft:data_process", "--dataset_base_path", str(data), "--output_path", str(cache), *extra]
        )
        == 0
    )


def stage2_error(capsys, cache: Path, out: Path, *extra: str) -> str:
    code = main(
        ["run", "--task", "sft:train", "--dataset_base_path", str(cache), "--output_path", str(out), *SMALL, *extra]
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("autosplit: error: ")
    assert not (out / "lora.safetensors").exists() and not (out / "train_log.jsonl").exists()
    return line


def test_changed_stage1_weights_file_is_detected(capsys, tmp_path, dataset, tiny_model):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    stage1(dataset, tmp_path / "c", "--model_paths", str(model))
    weights = next((model / "vae").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    line = stage2_error(capsys, tmp_path / "c", tmp_path / "o", "--model_paths", str(model))
    assert "made with other vae weights" in line and "re-run stage 1" in line


def test_changed_image_bytes_are_detected(capsys, tmp_path, dataset, tiny_model):
    stage1(dataset, tmp_path / "c")
    from PIL import Image

    with Image.open(dataset / "0005.png") as im:
        pixels = np.array(im)
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(dataset / "0005.png")
    line = stage2_error(capsys, tmp_path / "c", tmp_path / "o")
    assert "the image bytes of sample 5" in line and "0005.png" in line and "re-run stage 1" in line


def test_changed_caption_is_detected(capsys, tmp_path, dataset, tiny_model):
    stage1(dataset, tmp_path / "c")
    edit_metadata(dataset, 7, 1, "a new caption")
    line = stage2_error(capsys, tmp_path / "c", tmp_path / "o")
    assert "the caption of sample 7" in line


def test_changed_max_pixels_is_detected(capsys, tmp_path, dataset, tiny_model):
    stage1(dataset, tmp_path / "c")
    line = stage2_error(capsys, tmp_path / "c", tmp_path / "o", "--max_pixels", "4096")
    assert "--max_pixels 1048576, this run has 4096 (a preprocessing setting changed)" in line


def test_one_command_run_updates_only_the_changed_samples(tmp_path, dataset, tiny_model, caplog):
    out = tmp_path / "o"
    base = [
        "run",
        "--dataset_base_path",
        str(dataset),
        "--output_path",
        str(out),
        *SMALL,
        "--set",
        "cache.shard_size=3",
    ]
    assert main(base) == 0
    edit_metadata(dataset, 2, 1, "a brand new caption")
    rows = list(csv.reader((dataset / "metadata.csv").open()))
    with (dataset / "metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows[:-1])  # one sample removed
    import autosplit.training.stage1 as stage1_module

    computed = []
    real = stage1_module.encode_batch
    stage1_module.encode_batch = lambda stage, samples, *a, **k: (
        computed.extend(s.index for s in samples) or real(stage, samples, *a, **k)
    )
    try:
        caplog.set_level("INFO", logger="autosplit")
        assert main(base) == 0
    finally:
        stage1_module.encode_batch = real
    assert computed == [2]  # only the edited sample was encoded again
    assert "14 of 15 samples are unchanged and copied" in caplog.text
    fresh = tmp_path / "fresh"
    stage1(dataset, fresh, "--set", "cache.shard_size=3")
    assert_same_cache(out / "cache", fresh)
    assert not (tmp_path / "o/cache.next").exists() and not (tmp_path / "o/cache.old").exists()


# --- resumable: SIGKILL at random points --------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_stage1_then_resume_gives_the_same_cache(tmp_path, reference, tiny_dataset):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    rng = random.Random(4)
    for trial in range(3):
        cache = tmp_path / f"c{trial}"
        cmd = [
            sys.executable,
            "-m",
            "autosplit",
            "run",
            "--task",
            "sft:data_process",
            "--output_path",
            str(cache),
            "--dataset_base_path",
            str(tiny_dataset),
            "--set",
            "cache.shard_size=3",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill once the cache exists plus a random extra delay: mid-index, mid-shard or between shards
        deadline = time.monotonic() + 120
        while not (cache / "zarr.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert cache_status(cache) != "complete" or proc.returncode == 0
        status = cache_status(cache)
        if status == "incomplete":  # nothing partial is read as complete
            with pytest.raises(CacheError, match="incomplete"):
                CacheReader(cache)
        elif status == "complete":  # the run finished before the kill: the cache reads whole
            assert len(CacheReader(cache)) == 16
        assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
        assert cache_status(cache) == "complete" and count_done_shards(cache) == 6
        assert_same_cache(cache, reference)
        assert not list(cache.rglob("*.partial"))


# --- disk full ---------------------------------------------------------------------------------


def test_disk_full_during_stage1_is_a_clean_error_and_resumes(tmp_path, reference, tiny_dataset, capsys, monkeypatch):
    import zarr.storage._local as local

    real_put, writes = local._put, []

    def full_disk(path, value, exclusive=False):
        writes.append(path)
        if "/buckets/" in str(path) and len([w for w in writes if "/buckets/" in str(w)]) > 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", full_disk)
    cache = tmp_path / "c"
    args = [
        "run",
        "--task",
        "sft:data_process",
        "--output_path",
        str(cache),
        "--dataset_base_path",
        str(tiny_dataset),
        "--set",
        "cache.shard_size=3",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cache) in err[0] and "no space left on device" in err[0]
    assert "free space then re-run" in err[0]
    assert cache_status(cache) == "incomplete" and 0 < count_done_shards(cache) < 6
    monkeypatch.setattr(local, "_put", real_put)  # space freed
    assert main(args) == 0
    assert_same_cache(cache, reference)


# --- two processes -----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_write_the_same_cache_as_one(tmp_path, reference, tiny_dataset):
    launcher = Path(sys.executable).with_name("accelerate")
    cache = tmp_path / "c"
    # torchrun gives each worker one thread unless told; the reference used torch's default, and a
    # float32 convolution's bits depend on how its sums were split across threads
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process (its simple launcher); `--multi_gpu` starts
    # two through torchrun, which run on CPU over gloo (--device cpu: on a GPU host too)
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
            "--task",
            "sft:data_process",
            "--output_path",
            str(cache),
            "--dataset_base_path",
            str(tiny_dataset),
            "--set",
            "cache.shard_size=3",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2: 3 shards to write" in result.stderr
    assert "process 1 of 2: 3 shards to write" in result.stderr
    assert cache_status(cache) == "complete" and count_done_shards(cache) == 6
    assert_same_cache(cache, reference)
