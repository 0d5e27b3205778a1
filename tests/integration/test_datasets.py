"""Real dataset layouts end to end on the tiny Qwen-Image pipeline: folders of images with .txt
captions (flat and nested) and metadata.json train; broken ones are one-line errors with exit 2;
aspect-ratio buckets fill batches > 1 and split training still learns exactly what unsplit
training learns; the bucket setting is part of the cache's key; `--lora_checkpoint` starts from
a LoRA file's weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from safetensors.torch import load_file

from autosplit.cli import main
from autosplit.data import aspect_buckets
from autosplit.storage.cache import cache_status, read_manifest

pytestmark = pytest.mark.slow

FAST = ["--lora_rank", "4", "--seed", "3"]
BUCKETS = ["--max_pixels", "4096", "--set", "data.buckets=aspect", "--set", "data.bucket_step=16"]


def write_photos(root: Path, *, count: int, nested: bool = False, seed: int = 0) -> list[Path]:
    """`count` random-noise images of random sizes (32..128 px a side), captions beside them."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        folder = root / (f"set{i % 3}/part{i % 2}" if nested else "")
        folder.mkdir(parents=True, exist_ok=True)
        width, height = (int(x) for x in rng.integers(32, 129, size=2))
        path = folder / f"photo{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        path.with_suffix(".txt").write_text(f"a noisy photo, number {i}\n", encoding="utf-8")
        paths.append(path)
    return paths


def run(*args: str) -> int:
    return main(["run", *args])


def run_error(capsys, *args: str) -> str:
    code = main(["run", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("autosplit: error: ")
    return err[-1]


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", ["txt", "nested", "json"])
def test_real_dataset_layouts_train(layout, tmp_path, tiny_model):
    data = tmp_path / "photos"
    paths = write_photos(data, count=5, nested=layout != "txt")
    if layout == "json":  # DiffSynth-Studio's metadata.json (the .txt captions agree with it)
        rows = [
            {"image": p.relative_to(data).as_posix(), "prompt": p.with_suffix(".txt").read_text().strip()}
            for p in paths
        ]
        (data / "metadata.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    out = tmp_path / "out"
    assert run("--dataset_base_path", str(data), "--max_steps", "2", "--output_path", str(out), *FAST) == 0
    assert (out / "lora.safetensors").is_file() and len(losses(out)) == 2
    manifest = read_manifest(out / "cache")
    assert manifest["complete"] and manifest["num_samples"] == 5


def test_captionless_images_train_on_the_empty_prompt_when_asked(tmp_path, tiny_model, capsys):
    data = tmp_path / "photos"
    paths = write_photos(data, count=3)
    paths[1].with_suffix(".txt").unlink()
    line = run_error(capsys, "--dataset_base_path", str(data), "--output_path", str(tmp_path / "o"))
    assert line == (
        f"autosplit: error: {paths[1]}: no caption file photo01.txt beside it; write one (an empty file "
        f'for a deliberately empty prompt), or set data.missing_caption = "empty" to train captionless '
        f"images on the empty prompt"
    )
    assert not (tmp_path / "o").exists()
    assert (
        run(
            "--dataset_base_path",
            str(data),
            "--max_steps",
            "1",
            "--output_path",
            str(tmp_path / "o"),
            "--set",
            "data.missing_caption=empty",
            *FAST,
        )
        == 0
    )


def test_a_caption_that_is_not_utf8_is_a_one_line_error(tmp_path, tiny_model, capsys):
    data = tmp_path / "photos"
    paths = write_photos(data, count=3)
    caption = paths[2].with_suffix(".txt")
    caption.write_bytes("un café noir".encode("cp1252"))
    line = run_error(capsys, "--dataset_base_path", str(data), "--output_path", str(tmp_path / "o"))
    assert line == (f"autosplit: error: {caption}: line 1 is not UTF-8 text (byte 0xe9); save the caption as UTF-8")


def test_a_metadata_file_that_disagrees_with_the_captions_is_a_one_line_error(tmp_path, tiny_model, capsys):
    data = tmp_path / "photos"
    write_photos(data, count=3)
    (data / "metadata.csv").write_text(
        "image,prompt\nphoto00.png,a noisy photo number 0\nphoto01.png,a cat\n", encoding="utf-8"
    )
    line = run_error(capsys, "--dataset_base_path", str(data), "--output_path", str(tmp_path / "o"))
    assert line.startswith(
        f"autosplit: error: {data / 'metadata.csv'} row 1: the prompt 'a noisy photo number 0' "
        f"disagrees with the caption file {data / 'photo00.txt'} ('a noisy photo, number 0')"
    )
    assert line.endswith("make them agree or delete one")


# --- aspect-ratio buckets ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("mixed")
    write_photos(data, count=10, seed=1)
    return data


def test_split_with_buckets_learns_exactly_what_unsplit_learns(mixed_sizes, tmp_path, tiny_model):
    args = ["--dataset_base_path", str(mixed_sizes), "--batch_size", "2", *BUCKETS, *FAST]
    assert run("--output_path", str(tmp_path / "split"), *args) == 0
    assert run("--output_path", str(tmp_path / "unsplit"), "--no-split", *args) == 0
    a, b = load_file(tmp_path / "split/lora.safetensors"), load_file(tmp_path / "unsplit/lora.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(tmp_path / "split") == losses(tmp_path / "unsplit")
    assert len(losses(tmp_path / "split")) < 10  # batches of 2 from images of 10 different sizes
    sizes = zarr.open_group(str(tmp_path / "split/cache"), mode="r")["index/size"][...].tolist()
    buckets = aspect_buckets(max_pixels=4096, step=16, max_aspect=4)
    assert all(tuple(s) in buckets for s in sizes) and len({tuple(s) for s in sizes}) < 10


def test_the_bucket_setting_is_part_of_the_cache_key(mixed_sizes, tmp_path, tiny_model, caplog, capsys):
    out, args = tmp_path / "out", ["--dataset_base_path", str(mixed_sizes), "--max_steps", "1", *FAST]
    assert run("--output_path", str(out), *args, *BUCKETS) == 0
    key = read_manifest(out / "cache")["key"]
    assert key["buckets"] == {"mode": "aspect", "step": 16, "max_aspect": 4.0}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="autosplit"):
        assert run("--output_path", str(out), *args, *BUCKETS) == 0
    assert "stage 1 skipped" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autosplit"):
        assert run("--output_path", str(out), *args, *BUCKETS, "--set", "data.bucket_step=32") == 0
    assert "is stale (changed: buckets, dataset_sha256)" in caplog.text
    assert read_manifest(out / "cache")["key"]["buckets"]["step"] == 32 and cache_status(out / "cache") == "complete"
    line = run_error(
        capsys,
        "--task",
        "sft:train",
        "--dataset_base_path",
        str(out / "cache"),
        "--output_path",
        str(tmp_path / "t"),
        "--max_pixels",
        "4096",
        *FAST,
    )  # the cache has buckets, this run none
    assert "is stale: the training size of sample 0" in line


def test_a_bucket_step_the_family_cannot_use_is_a_config_error(mixed_sizes, tmp_path, tiny_model, capsys):
    line = run_error(
        capsys,
        "--dataset_base_path",
        str(mixed_sizes),
        "--output_path",
        str(tmp_path / "o"),
        "--set",
        "data.buckets=aspect",
        "--set",
        "data.bucket_step=24",
    )
    assert line == (
        "autosplit: error: data.bucket_step=24 must be a multiple of 16 for qwen_image (its VAE x patch "
        "factor); e.g. --set data.bucket_step=16"
    )


# --- --lora_checkpoint and --lora_format -------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(mixed_sizes, tmp_path_factory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("first")
    assert run("--dataset_base_path", str(mixed_sizes), "--max_steps", "3", "--output_path", str(out), *FAST) == 0
    return out


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "comfyui"])
def test_a_run_from_a_lora_checkpoint_starts_at_its_weights(first_run, mixed_sizes, tmp_path, fmt):
    """A learning rate of 1e-30 moves no fp32 weight of this size (the step is below its last bit),
    so the LoRA the run writes is its starting point: the file's weights, bit for bit."""
    start = first_run / "lora.safetensors"
    if fmt != "diffusers":
        start = tmp_path / f"start_{fmt}.safetensors"
        assert (
            main(
                [
                    "convert-lora",
                    str(first_run / "lora.safetensors"),
                    str(start),
                    "--pipeline",
                    "qwen_image",
                    "--to",
                    fmt,
                ]
            )
            == 0
        )
    out = tmp_path / "continued"
    assert (
        run(
            "--dataset_base_path",
            str(mixed_sizes),
            "--max_steps",
            "1",
            "--output_path",
            str(out),
            "--lora_checkpoint",
            str(start),
            "--learning_rate",
            "1e-30",
            *FAST,
        )
        == 0
    )
    a, b = load_file(first_run / "lora.safetensors"), load_file(out / "lora.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # a trained start, not a fresh one


def test_a_lora_checkpoint_of_another_rank_fails_before_stage_1(first_run, mixed_sizes, tmp_path, capsys):
    out = tmp_path / "o"
    line = run_error(
        capsys,
        "--dataset_base_path",
        str(mixed_sizes),
        "--output_path",
        str(out),
        "--lora_checkpoint",
        str(first_run / "lora.safetensors"),
        "--lora_rank",
        "8",
    )
    assert line.endswith("has rank 4, this run trains rank 8; pass --lora_rank 4")
    assert not (out / "cache").exists()


def test_lora_format_writes_the_other_format_beside_the_diffusers_file(mixed_sizes, tmp_path, tiny_model):
    out = tmp_path / "out"
    assert (
        run(
            "--dataset_base_path",
            str(mixed_sizes),
            "--max_steps",
            "1",
            "--output_path",
            str(out),
            "--lora_format",
            "comfyui",
            *FAST,
        )
        == 0
    )
    assert (out / "lora.safetensors").is_file()
    assert any(k.startswith("diffusion_model.") for k in load_file(out / "lora_comfyui.safetensors"))
