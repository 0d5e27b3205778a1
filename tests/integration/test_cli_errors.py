"""Bad input: one line on stderr naming the thing and the fix, exit code 2, no cache marked complete."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest

from autosplit.cli import main
from autosplit.storage.cache import cache_status


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_first_image(dataset: Path, name: str) -> None:
    rows = list(csv.reader((dataset / "metadata.csv").open()))
    rows[1][0] = name
    with (dataset / "metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def run_error(capsys, *args: str) -> str:
    code = main(["run", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err, "no error printed"
    assert err[-1].startswith("autosplit: error: ")
    return err[-1]


def assert_no_complete_cache(out: Path) -> None:
    assert cache_status(out / "cache") != "complete"
    assert cache_status(out) != "complete"
    assert not (out / "lora.safetensors").exists()


def test_missing_dataset_folder(capsys, tmp_path, tiny_model):
    line = run_error(capsys, "--dataset_base_path", str(tmp_path / "nope"), "--output_path", str(tmp_path / "o"))
    assert "--dataset_base_path" in line and "nope" in line and "no such folder" in line
    assert_no_complete_cache(tmp_path / "o")


def test_metadata_row_naming_a_missing_image(capsys, tmp_path, tiny_model, tiny_dataset):
    data = copy_dataset(tiny_dataset, tmp_path / "data")
    rewrite_first_image(data, "missing.png")
    line = run_error(capsys, "--dataset_base_path", str(data), "--output_path", str(tmp_path / "o"))
    assert "metadata.csv row 1" in line and "missing.png" in line and "does not exist" in line
    assert_no_complete_cache(tmp_path / "o")


def test_unreadable_image(capsys, tmp_path, tiny_model, tiny_dataset):
    data = copy_dataset(tiny_dataset, tmp_path / "data")
    (data / "0000.png").write_bytes(b"this is not a png")
    line = run_error(capsys, "--dataset_base_path", str(data), "--output_path", str(tmp_path / "o"))
    assert "0000.png" in line and "not a readable image" in line and "replace or remove" in line
    assert_no_complete_cache(tmp_path / "o")


def test_truncated_image_fails_in_stage1_and_leaves_cache_incomplete(capsys, tmp_path, tiny_model, tiny_dataset):
    data = copy_dataset(tiny_dataset, tmp_path / "data")
    png = (data / "0005.png").read_bytes()
    (data / "0005.png").write_bytes(png[: len(png) // 2])  # header intact, pixels cut off
    out = tmp_path / "o"
    line = run_error(capsys, "--dataset_base_path", str(data), "--output_path", str(out), "--set", "cache.shard_size=2")
    assert "0005.png" in line and "cannot be decoded" in line
    assert cache_status(out / "cache") == "incomplete"
    assert_no_complete_cache(out)
    # training from it is refused, naming the fix
    line = run_error(
        capsys, "--task", "sft:train", "--dataset_base_path", str(out / "cache"), "--output_path", str(tmp_path / "o2")
    )
    assert "incomplete" in line and "re-run stage 1" in line


def one_line_error(capsys, *args: str) -> str:
    """The run fails with exit 2 and stderr holds exactly one line, the error."""
    code = main(["run", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("autosplit: error: "), err
    return err[0]


def stage1_error(capsys, data: Path, out: Path) -> str:
    line = one_line_error(capsys, "--dataset_base_path", str(data), "--output_path", str(out))
    assert_no_complete_cache(out)
    return line


def test_csv_row_without_a_prompt_cell(capsys, tmp_path, tiny_model, tiny_dataset):
    data = copy_dataset(tiny_dataset, tmp_path / "data")
    lines = (data / "metadata.csv").read_text().splitlines()
    (data / "metadata.csv").write_text("\n".join([lines[0], "0000.png", *lines[2:]]) + "\n")
    line = stage1_error(capsys, data, tmp_path / "o")
    assert "metadata.csv row 1: 1 cells for the header's 2 columns, no value for ['prompt']" in line
    assert "deliberately empty prompt" in line


def test_jsonl_prompt_that_is_an_object(capsys, tmp_path, tiny_model, tiny_dataset):
    data = copy_dataset(tiny_dataset, tmp_path / "data")
    (data / "metadata.csv").unlink()
    (data / "metadata.jsonl").write_text(
        '{"image": "0000.png", "prompt": "ok"}\n{"image": "0001.png", "prompt": {"en": "a cat"}}\n'
    )
    line = stage1_error(capsys, data, tmp_path / "o")
    assert f"{data / 'metadata.jsonl'} line 2: prompt is an object" in line and "not a string" in line


def test_metadata_that_is_not_utf8(capsys, tmp_path, tiny_model, tiny_dataset):
    data = copy_dataset(tiny_dataset, tmp_path / "data")
    with (data / "metadata.csv").open("ab") as f:
        f.write("0001.png,a caf\u00e9\n".encode("cp1252"))
    line = stage1_error(capsys, data, tmp_path / "o")
    assert f"{data / 'metadata.csv'}: line 18 is not UTF-8 text (byte 0xe9); save the file as UTF-8" in line


def test_image_outside_the_dataset_folder(capsys, tmp_path, tiny_model, tiny_dataset):
    data = copy_dataset(tiny_dataset, tmp_path / "data")
    shutil.copy(data / "0000.png", tmp_path / "stray.png")
    rewrite_first_image(data, "../stray.png")
    line = stage1_error(capsys, data, tmp_path / "o")
    assert "metadata.csv row 1: image '../stray.png' is outside the dataset folder" in line
    assert "data.allow_outside_paths = true" in line


def test_image_whose_header_claims_20000x20000_pixels(capsys, tmp_path, tiny_model, tiny_dataset):
    import struct
    import zlib

    data = copy_dataset(tiny_dataset, tmp_path / "data")
    png = bytearray((data / "0003.png").read_bytes())
    png[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width, height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (data / "0003.png").write_bytes(bytes(png))
    line = stage1_error(capsys, data, tmp_path / "o")
    assert f"metadata.csv row 4: image {data / '0003.png'} is too large to decode" in line
    assert "(Image size (400000000 pixels) exceeds limit" in line
    assert line.endswith("scale it down")


def test_a_caption_longer_than_the_tokenizer_limit_warns_once(tmp_path, tiny_model, tiny_dataset, caplog):
    import logging

    from autosplit.adapters.base import truncation_report
    from autosplit.storage.cache import cache_status

    data = copy_dataset(tiny_dataset, tmp_path / "data")
    rows = list(csv.reader((data / "metadata.csv").open()))
    for row in rows[1:4]:
        row[1] = " ".join([row[1]] * 200)  # well over the 512 prompt tokens Qwen-Image keeps
    with (data / "metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    truncation_report()  # forget cuts of earlier tests in this process
    caplog.set_level(logging.WARNING, logger="autosplit")
    out = tmp_path / "c"
    assert main(["run", "--task", "sft:data_process", "--dataset_base_path", str(data), "--output_path", str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "autosplit.adapters.base"]
    assert len(warnings) == 1 and "longer than tokenizer's limit and are cut to 512 tokens" in warnings[0], warnings
    assert cache_status(out) == "complete"
    # stage 1 ends with the count: 3 in stage 1, and one more if the profile encoded the first row's prompt too
    (summary,) = [
        r.getMessage()
        for r in caplog.records
        if r.name == "autosplit.training.stage1" and "captions cut" in r.getMessage()
    ]
    assert re.match(r"stage 1: captions cut to the text encoders' limits: [34] by tokenizer to 512 tokens", summary)
    assert truncation_report() is None  # the summary reset the counts


def test_model_path_that_is_not_a_diffusers_folder(capsys, tmp_path, tiny_dataset):
    (tmp_path / "weights").mkdir()
    line = run_error(capsys, "--model_paths", str(tmp_path / "weights"), "--output_path", str(tmp_path / "o"))
    assert "--model_paths" in line and "model_index.json" in line and "save_pretrained" in line
    assert_no_complete_cache(tmp_path / "o")


def test_model_folder_missing_a_stage1_component(capsys, tmp_path, tiny_model, tiny_dataset):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model, partial, ignore=shutil.ignore_patterns("vae"))
    line = run_error(capsys, "--model_paths", str(partial), "--output_path", str(tmp_path / "o"))
    assert "lacks components ['vae']" in line
    assert not (tmp_path / "o" / "cache").exists()


def test_unknown_lora_target_module(capsys, tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "o"
    line = run_error(capsys, "--lora_target_modules", "to_q,to_qq", "--output_path", str(out))
    assert "--lora_target_modules" in line and "'to_qq'" in line and "to_q" in line
    assert not out.exists()  # checked before stage 1 starts


@pytest.mark.parametrize("task, expected", [("sfx", "--task 'sfx' is unknown"), ("sft:cache", "unknown stage 'cache'")])
def test_unknown_task(capsys, tmp_path, tiny_model, task, expected):
    line = run_error(capsys, "--task", task, "--output_path", str(tmp_path / "o"))
    assert expected in line and "sft:data_process" in line
    assert not (tmp_path / "o").exists()


def test_unknown_config_key_suggests_the_right_one(capsys, tmp_path):
    line = run_error(capsys, "--set", "train.learning_rte=1e-3", "--output_path", str(tmp_path / "o"))
    assert "did you mean 'train.learning_rate'" in line


def test_sft_train_without_a_cache_path(capsys, tmp_path, tiny_model):
    line = run_error(capsys, "--task", "sft:train", "--output_path", str(tmp_path / "o"))
    assert "--dataset_base_path" in line


def test_sft_train_on_a_dataset_folder_instead_of_a_cache(capsys, tmp_path, tiny_model, tiny_dataset):
    line = run_error(
        capsys, "--task", "sft:train", "--dataset_base_path", str(tiny_dataset), "--output_path", str(tmp_path / "o")
    )
    assert "not an autosplit cache" in line and "sft:data_process" in line


def test_stage1_refuses_to_overwrite_a_cache_made_with_other_settings(capsys, tmp_path, tiny_model):
    cache = tmp_path / "c"
    assert main(["run", "--task", "sft:data_process", "--output_path", str(cache)]) == 0
    line = run_error(capsys, "--task", "sft:data_process", "--output_path", str(cache), "--max_pixels", "2048")
    assert "other settings" in line and "max_pixels" in line
    assert cache_status(cache) == "complete"  # the existing cache is untouched


def test_stage1_refuses_a_non_empty_foreign_folder(capsys, tmp_path, tiny_model):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    line = run_error(capsys, "--task", "sft:data_process", "--output_path", str(tmp_path / "c"))
    assert "not an autosplit cache" in line
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "argv, expected", [([], True), (["--find_unused_parameters"], True), (["--find_unused_parameters", "false"], False)]
)
def test_find_unused_parameters_flag_sets_the_config_key(argv, expected):
    from autosplit.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", *argv])
    assert config_from_args(args).train.find_unused_parameters is expected


def test_run_says_before_any_work_when_stage2_will_not_fit_the_budget(tmp_path, tiny_model, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="autosplit")
    assert main(["run", "--output_path", str(tmp_path / "o"), "--max_steps", "1", "--vram_budget", "0.001"]) == 0
    assert "budget 1.02 MiB: stage 2 does NOT fit" in caplog.text
    caplog.clear()
    assert main(["run", "--output_path", str(tmp_path / "o"), "--max_steps", "1", "--vram_budget", "48"]) == 0
    assert "budget 48.00 GiB: stage 2 fits with" in caplog.text
