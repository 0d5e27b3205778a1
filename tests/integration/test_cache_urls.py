"""Caches at fsspec URLs: `file://` is a local folder; `memory://` (like s3:// or gs://) is staged
locally, uploaded whole when complete, and downloaded for stage 2."""

from __future__ import annotations

import shutil

import torch
import zarr
from safetensors.torch import load_file

from autosplit.cli import main
from autosplit.storage.remote import local_path

ARGS = ["--num_epochs", "1", "--dataset_repeat", "1", "--lora_rank", "4", "--seed", "3", "--max_steps", "5"]


def two_stages(cache: str, out) -> dict[str, torch.Tensor]:
    assert main(["run", "--task", "sft:data_process", "--output_path", cache, *ARGS]) == 0
    if cache.startswith("memory://"):
        shutil.rmtree(local_path(cache))  # stage 2 must download it, not reuse the staged copy
    assert main(["run", "--task", "sft:train", "--dataset_base_path", cache, "--output_path", str(out), *ARGS]) == 0
    return load_file(out / "lora.safetensors")


def test_file_and_memory_urls_train_what_a_folder_trains(tmp_path, tiny_model, tiny_dataset, capsys):
    folder = two_stages(str(tmp_path / "c"), tmp_path / "o1")
    file_url = two_stages(f"file://{tmp_path / 'c2'}", tmp_path / "o2")
    assert (tmp_path / "c2" / "zarr.json").is_file()
    memory = two_stages("memory://autosplit-tests/cache", tmp_path / "o3")
    for weights in (file_url, memory):
        assert sorted(weights) == sorted(folder) and all(torch.equal(weights[k], folder[k]) for k in folder)
    group = zarr.open_group("memory://autosplit-tests/cache", mode="r")  # plain zarr reads the uploaded cache
    assert group.attrs["autosplit"]["complete"] is True
    capsys.readouterr()
    assert main(["inspect", "memory://autosplit-tests/cache", "--verify"]) == 0
    assert "every checksum matched" in capsys.readouterr().out


def test_url_errors_are_one_line(tmp_path, tiny_model, capsys):
    assert (
        main(
            [
                "run",
                "--task",
                "sft:train",
                "--dataset_base_path",
                "memory://autosplit-tests/nothing",
                "--output_path",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "not an autosplit cache" in capsys.readouterr().err
    assert main(["run", "--output_path", "memory://autosplit-tests/out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output_path memory://autosplit-tests/out" in err[0] and "--cache_path" in err[0]
