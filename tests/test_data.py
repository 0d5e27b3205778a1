"""Datasets: reading folders with metadata.csv/.jsonl, training sizes, decoding, fingerprints."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autosplit.data import (
    Sample,
    aspect_buckets,
    load_image,
    nearest_bucket,
    read_dataset,
    sample_fingerprint,
    train_size,
    write_synthetic_dataset,
)
from autosplit.errors import DatasetError

BIG = 1024 * 1024


def save_image(path: Path, width: int, height: int, color=(200, 30, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), color).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two images of different sizes, no metadata yet."""
    base = tmp_path / "ds"
    save_image(base / "a.png", 64, 64)
    save_image(base / "sub" / "b.png", 96, 64, color=(0, 0, 255))
    return base


# --- reading metadata -------------------------------------------------------------------------


def test_read_dataset_from_metadata_csv(folder):
    write_csv(
        folder / "metadata.csv",
        ["image", "prompt", "style"],
        [["a.png", "a red square", "flat"], ["sub/b.png", "a blue, wide square", "wide"]],
    )
    samples = read_dataset(folder, max_pixels=BIG, multiple=16)
    assert samples == [
        Sample(0, folder / "a.png", "a red square", (64, 64), {"style": "flat"}),
        Sample(1, folder / "sub" / "b.png", "a blue, wide square", (96, 64), {"style": "wide"}),
    ]
    assert [s.bucket for s in samples] == [(64, 64), (96, 64)]


def test_read_dataset_from_metadata_jsonl_skipping_blank_lines(folder):
    (folder / "metadata.jsonl").write_text(
        json.dumps({"image": "a.png", "prompt": "first"})
        + "\n\n"
        + json.dumps({"image": "sub/b.png", "prompt": "second", "seed": 3})
        + "\n",
        encoding="utf-8",
    )
    samples = read_dataset(folder, max_pixels=BIG, multiple=16)
    assert [(s.index, s.image_path, s.prompt, s.size, s.extras) for s in samples] == [
        (0, folder / "a.png", "first", (64, 64), {}),
        (1, folder / "sub" / "b.png", "second", (96, 64), {"seed": 3}),
    ]


def test_csv_is_preferred_over_jsonl(folder):
    write_csv(folder / "metadata.csv", ["image", "prompt"], [["a.png", "from csv"]])
    write_jsonl(folder / "metadata.jsonl", [{"image": "a.png", "prompt": "from jsonl"}])
    assert [s.prompt for s in read_dataset(folder, max_pixels=BIG, multiple=16)] == ["from csv"]


def test_read_dataset_from_metadata_json_a_list_of_objects(folder):
    (folder / "metadata.json").write_text(
        json.dumps(
            [{"image": "a.png", "prompt": "first"}, {"image": "sub/b.png", "prompt": "second", "seed": 3}], indent=2
        ),
        encoding="utf-8",
    )
    samples = read_dataset(folder, max_pixels=BIG, multiple=16)
    assert [(s.image_path, s.prompt, s.size, s.extras) for s in samples] == [
        (folder / "a.png", "first", (64, 64), {}),
        (folder / "sub" / "b.png", "second", (96, 64), {"seed": 3}),
    ]
    write_jsonl(folder / "metadata.jsonl", [{"image": "a.png", "prompt": "from jsonl"}])
    assert [s.prompt for s in read_dataset(folder, max_pixels=BIG, multiple=16)] == ["from jsonl"]  # jsonl first


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '{"image": "a.png", "prompt": "x"}',
            ': expected a JSON list of objects ([{"image": ..., "prompt": ...}, ...]), got an object',
        ),
        ('[\n  {"image": "a.png",\n   "prompt": }\n]', ":3: not valid JSON (Expecting value); fix that line"),
        ('[{"image": "a.png"}]', " item 1: no 'prompt' key (has ['image']); name it 'prompt'"),
        (
            '[{"image": "a.png", "prompt": "x"}, "b.png"]',
            " item 2: expected an object with image and prompt keys, got a string",
        ),
    ],
)
def test_metadata_json_errors_name_the_file_and_item(folder, text, expected):
    meta = folder / "metadata.json"
    meta.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        read_dataset(folder, max_pixels=BIG, multiple=16)
    assert str(info.value) == f"{meta}{expected}"


def test_metadata_json_that_is_not_utf8_names_the_line(folder):
    meta = folder / "metadata.json"
    meta.write_bytes('[{"image": "a.png",\n  "prompt": "a café"}]'.encode("cp1252"))
    with pytest.raises(
        DatasetError, match=re.escape(f"{meta}: line 2 is not UTF-8 text (byte 0xe9); save the file as UTF-8")
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)


# --- folders of images with .txt captions -----------------------------------------------------


@pytest.fixture
def captioned(tmp_path) -> Path:
    """Images in nested folders, each with NAME.txt beside it (the kohya-ss layout)."""
    base = tmp_path / "photos"
    for rel, size, caption in [
        ("b.png", (64, 64), "a cat\n"),
        ("a/z.jpg", (96, 64), "  a dog on grass  "),
        ("a/deeper/c.webp", (48, 80), "line one\nline two\n"),
        ("A.PNG", (32, 32), ""),
    ]:
        save_image(base / rel, *size)
        (base / rel).with_suffix(".txt").write_text(caption, encoding="utf-8")
    return base


def test_a_folder_without_metadata_reads_images_with_their_txt_captions(captioned):
    samples = read_dataset(captioned, max_pixels=BIG, multiple=16)
    assert [(s.image_path.relative_to(captioned).as_posix(), s.prompt, s.size) for s in samples] == [
        ("A.PNG", "", (32, 32)),  # an empty caption file: a deliberately empty prompt
        ("a/deeper/c.webp", "line one\nline two", (48, 80)),  # the whole file, whitespace around it dropped
        ("a/z.jpg", "a dog on grass", (96, 64)),
        ("b.png", "a cat", (64, 64)),
    ]  # sorted by path inside the folder, nested folders included
    assert [s.index for s in samples] == [0, 1, 2, 3] and all(s.extras == {} for s in samples)


def test_the_caption_order_does_not_depend_on_the_file_system(captioned, monkeypatch):
    first = read_dataset(captioned, max_pixels=BIG, multiple=16)
    original = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(original(self, pattern))))
    assert read_dataset(captioned, max_pixels=BIG, multiple=16) == first


def test_hidden_files_and_folders_are_skipped(captioned):
    save_image(captioned / ".ipynb_checkpoints" / "b.png", 8, 8)
    (captioned / "._b.png").write_bytes(b"AppleDouble junk")
    assert len(read_dataset(captioned, max_pixels=BIG, multiple=16)) == 4


def test_a_missing_caption_is_an_error_naming_the_image_unless_empty_is_asked(captioned):
    (captioned / "a/z.txt").unlink()
    (captioned / "b.txt").unlink()
    with pytest.raises(DatasetError) as info:
        read_dataset(captioned, max_pixels=BIG, multiple=16)
    assert str(info.value) == (
        f"{captioned / 'a/z.jpg'}: no caption file z.txt beside it (and 1 more images lack "
        f"theirs); write one (an empty file for a deliberately empty prompt), or set "
        f'data.missing_caption = "empty" to train captionless images on the empty prompt'
    )
    samples = read_dataset(captioned, max_pixels=BIG, multiple=16, missing_caption="empty")
    assert [s.prompt for s in samples] == ["", "line one\nline two", "", ""]


def test_a_caption_that_is_not_utf8_names_the_file_and_line(captioned):
    (captioned / "a/z.txt").write_bytes("a dog\nin a café".encode("latin-1"))
    with pytest.raises(
        DatasetError,
        match=re.escape(f"{captioned / 'a/z.txt'}: line 2 is not UTF-8 text (byte 0xe9); save the caption as UTF-8"),
    ):
        read_dataset(captioned, max_pixels=BIG, multiple=16)


def test_a_caption_with_a_bom_is_read(captioned):
    (captioned / "b.txt").write_text("a cat", encoding="utf-8-sig")
    assert read_dataset(captioned, max_pixels=BIG, multiple=16)[3].prompt == "a cat"


def test_two_images_sharing_one_caption_file_are_an_error(captioned):
    save_image(captioned / "b.jpg", 64, 64)
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{captioned / 'b.jpg'} and {captioned / 'b.png'} share the caption file {captioned / 'b.txt'}"
        ),
    ):
        read_dataset(captioned, max_pixels=BIG, multiple=16)


def test_a_caption_folder_cannot_hold_the_columns_a_task_needs(captioned):
    with pytest.raises(
        DatasetError,
        match=re.escape(
            "this task needs the columns ['seed'], which a folder of images "
            "with .txt captions cannot hold; add a metadata.csv with columns "
            "image,prompt,seed"
        ),
    ):
        read_dataset(captioned, max_pixels=BIG, multiple=16, columns=("seed",))


def test_a_caption_symlink_out_of_the_folder_is_refused_like_a_metadata_path(captioned, tmp_path):
    outside = save_image(tmp_path / "elsewhere" / "x.png", 32, 32)
    (captioned / "x.png").symlink_to(outside)
    (captioned / "x.txt").write_text("outside")
    with pytest.raises(DatasetError, match="is outside the dataset folder"):
        read_dataset(captioned, max_pixels=BIG, multiple=16)
    assert len(read_dataset(captioned, max_pixels=BIG, multiple=16, allow_outside_paths=True)) == 5


def test_video_folders_without_metadata_read_clip_files_with_captions(tmp_path):
    from PIL import Image

    base = tmp_path / "clips"
    base.mkdir()
    frames = [Image.new("RGB", (48, 32), (i * 20, 0, 0)) for i in range(6)]
    frames[0].save(base / "one.gif", save_all=True, append_images=frames[1:], duration=40)
    (base / "one.txt").write_text("a red fade")
    save_image(base / "still.png", 32, 32)  # not a clip: not read for a video family
    samples = read_dataset(base, max_pixels=BIG, multiple=16, media="video")
    assert [(s.image_path.name, s.prompt, s.bucket) for s in samples] == [("one.gif", "a red fade", (48, 32, 5))]


# --- a metadata file and .txt captions together -----------------------------------------------


def test_a_metadata_prompt_and_a_txt_caption_that_disagree_are_an_error(captioned):
    meta = write_csv(captioned / "metadata.csv", ["image", "prompt"], [["b.png", "a cat"], ["a/z.jpg", "a wolf"]])
    with pytest.raises(DatasetError) as info:
        read_dataset(captioned, max_pixels=BIG, multiple=16)
    assert str(info.value) == (
        f"{meta} row 2: the prompt 'a wolf' disagrees with the caption file "
        f"{captioned / 'a/z.txt'} ('a dog on grass'); a dataset takes its captions from the "
        f"metadata file or from .txt files, not both: make them agree or delete one"
    )


def test_a_metadata_file_that_agrees_with_the_captions_decides_what_trains(captioned, caplog):
    write_csv(captioned / "metadata.csv", ["image", "prompt"], [["b.png", "a cat"], ["a/z.jpg", "a dog on grass"]])
    with caplog.at_level("WARNING"):
        samples = read_dataset(captioned, max_pixels=BIG, multiple=16)
    assert [s.prompt for s in samples] == ["a cat", "a dog on grass"]
    assert f"2 image file(s) in {captioned} have .txt captions but are not in metadata.csv" in caplog.text


def test_explicit_metadata_path_wins_and_images_resolve_against_the_base(folder, tmp_path):
    write_csv(folder / "metadata.csv", ["image", "prompt"], [["a.png", "ignored"]])
    (tmp_path / "elsewhere").mkdir()
    meta = write_jsonl(tmp_path / "elsewhere" / "captions.jsonl", [{"image": "sub/b.png", "prompt": "explicit"}])
    samples = read_dataset(folder, meta, max_pixels=BIG, multiple=16)
    assert [(s.image_path, s.prompt) for s in samples] == [(folder / "sub" / "b.png", "explicit")]


def test_empty_prompt_cell_becomes_empty_string(folder):
    write_csv(folder / "metadata.csv", ["image", "prompt"], [["a.png", ""]])
    assert read_dataset(folder, max_pixels=BIG, multiple=16)[0].prompt == ""


# --- errors -----------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=f"--dataset_base_path {re.escape(str(missing))}: no such folder"):
        read_dataset(missing, max_pixels=BIG, multiple=16)


def test_folder_without_metadata_or_images(tmp_path):
    (tmp_path / "ds" / "notes").mkdir(parents=True)
    (tmp_path / "ds" / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"--dataset_base_path {tmp_path / 'ds'} has no metadata file (metadata.csv, metadata.jsonl, metadata.json) "
            "and no image files (.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff); add images with a NAME.txt caption "
            "beside each, or a metadata.csv with columns image,prompt"
        ),
    ):
        read_dataset(tmp_path / "ds", max_pixels=BIG, multiple=16)


def test_explicit_metadata_path_missing(folder):
    meta = folder / "captions.csv"
    with pytest.raises(DatasetError, match=re.escape(f"--dataset_metadata_path {meta}: no such file")):
        read_dataset(folder, meta, max_pixels=BIG, multiple=16)


def test_explicit_metadata_with_unknown_suffix(folder):
    meta = folder / "captions.txt"
    meta.write_text("image,prompt\na.png,x\n")
    with pytest.raises(DatasetError, match=re.escape(f"{meta}: use a .csv, .jsonl or .json file")):
        read_dataset(folder, meta, max_pixels=BIG, multiple=16)


def test_metadata_without_rows(folder):
    meta = write_csv(folder / "metadata.csv", ["image", "prompt"], [])
    with pytest.raises(DatasetError, match=re.escape(f"{meta}: no rows")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


@pytest.mark.parametrize("header, missing", [(["image", "text"], "prompt"), (["file_name", "prompt"], "image")])
def test_metadata_missing_a_column(folder, header, missing):
    meta = write_csv(folder / "metadata.csv", header, [["a.png", "x"]])
    with pytest.raises(DatasetError, match=re.escape(f"{meta} row 1: no {missing!r} column (has {sorted(header)})")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_row_naming_a_missing_image(folder):
    meta = write_csv(folder / "metadata.csv", ["image", "prompt"], [["a.png", "ok"], ["gone.png", "lost"]])
    with pytest.raises(DatasetError, match=re.escape(f"{meta} row 2: image {folder / 'gone.png'} does not exist")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_row_naming_a_file_that_is_not_an_image(folder):
    (folder / "notes.png").write_bytes(b"these are notes, not pixels\n" * 10)
    meta = write_csv(folder / "metadata.csv", ["image", "prompt"], [["notes.png", "x"]])
    with pytest.raises(
        DatasetError, match=re.escape(f"{meta} row 1: image {folder / 'notes.png'} is not a readable image")
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_row_naming_an_image_too_small_for_the_multiple(folder):
    save_image(folder / "tiny.png", 8, 40)
    meta = write_csv(folder / "metadata.csv", ["image", "prompt"], [["tiny.png", "x"]])
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{meta} row 1: image {folder / 'tiny.png'} is 8x40, image smaller than 16x16 pixels; use a larger image"
        ),
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_invalid_jsonl_line_names_the_line_number(folder):
    meta = folder / "metadata.jsonl"
    meta.write_text('{"image": "a.png", "prompt": "ok"}\n{"image": "a.png", "prompt": \n', encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(f"{meta}:2: not valid JSON")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


@pytest.mark.parametrize("bad_row, key", [({"image": "a.png"}, "prompt"), ({"prompt": "no image"}, "image")])
def test_later_jsonl_row_missing_a_key_names_the_line(folder, bad_row, key):
    meta = folder / "metadata.jsonl"
    meta.write_text(json.dumps({"image": "a.png", "prompt": "ok"}) + "\n\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{meta} line 3: no {key!r} key (has {sorted(bad_row)})")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_csv_with_utf8_bom_is_read(folder):
    (folder / "metadata.csv").write_text("image,prompt\na.png,a red square\n", encoding="utf-8-sig")
    assert [s.prompt for s in read_dataset(folder, max_pixels=BIG, multiple=16)] == ["a red square"]


# --- rows that used to be read as something else ---------------------------------------------


def test_csv_row_without_a_prompt_cell_is_an_error(folder):
    # `a.png` alone has no prompt cell (it trained on "" before); `a.png,` is a deliberate empty prompt
    meta = folder / "metadata.csv"
    meta.write_text("image,prompt\na.png,\nsub/b.png\n", encoding="utf-8")
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{meta} row 2: 1 cells for the header's 2 columns, no value for ['prompt']; add the cells (end the "
            "row with a comma for a deliberately empty prompt)"
        ),
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)
    meta.write_text("image,prompt\na.png,\n", encoding="utf-8")
    assert read_dataset(folder, max_pixels=BIG, multiple=16)[0].prompt == ""


def test_csv_row_missing_a_later_column_names_it(folder):
    meta = write_csv(folder / "metadata.csv", ["image", "prompt", "seed"], [["a.png", "x", "1"], ["a.png", "y"]])
    with pytest.raises(
        DatasetError, match=re.escape(f"{meta} row 2: 2 cells for the header's 3 columns, no value for ['seed']")
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_csv_row_with_an_unquoted_comma_is_an_error_but_trailing_empty_cells_are_not(folder):
    meta = folder / "metadata.csv"
    meta.write_text("image,prompt\na.png,a red, round ball\n", encoding="utf-8")
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{meta} row 1: 3 cells for the header's 2 columns ['image', 'prompt']; quote a value that holds a comma"
        ),
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)
    meta.write_text('image,prompt\na.png,"a red, round ball",,\n', encoding="utf-8")
    [sample] = read_dataset(folder, max_pixels=BIG, multiple=16)
    assert (sample.prompt, sample.extras) == ("a red, round ball", {})


def test_csv_header_naming_a_column_twice_is_an_error(folder):
    meta = write_csv(folder / "metadata.csv", ["image", "prompt", "prompt"], [["a.png", "x", "y"]])
    with pytest.raises(DatasetError, match=re.escape(f"{meta}: column(s) ['prompt'] appear more than once")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_jsonl_empty_prompt_is_kept_and_null_prompt_is_an_error(folder):
    meta = write_jsonl(folder / "metadata.jsonl", [{"image": "a.png", "prompt": ""}])
    assert read_dataset(folder, max_pixels=BIG, multiple=16)[0].prompt == ""
    write_jsonl(meta, [{"image": "a.png", "prompt": ""}, {"image": "a.png", "prompt": None}])
    with pytest.raises(
        DatasetError,
        match=re.escape(f'{meta} line 2: prompt is null; write the caption, or "" for a deliberately empty prompt'),
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)


@pytest.mark.parametrize(
    "prompt, kind, shown",
    [
        ({"en": "a cat"}, "an object", '{"en": "a cat"}'),
        (["a", "cat"], "an array", '["a", "cat"]'),
        (3, "a number", "3"),
        (1.5, "a number", "1.5"),
        (True, "a boolean", "true"),
        ({"text": "x" * 100}, "an object", '{"text": "' + "x" * 27 + "..."),
    ],
)
def test_jsonl_prompt_that_is_not_a_string_names_line_and_type(folder, prompt, kind, shown):
    meta = folder / "metadata.jsonl"
    meta.write_text('{"image": "a.png", "prompt": "ok"}\n\n' + json.dumps({"image": "a.png", "prompt": prompt}) + "\n")
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{meta} line 3: prompt is {kind} ({shown}), not a string; write the caption as one JSON string"
        ),
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)


@pytest.mark.parametrize("image, shown", [(7, "7"), (None, "null"), ("", '""'), ("  ", '"  "')])
def test_jsonl_image_that_is_not_a_path_is_an_error(folder, image, shown):
    meta = write_jsonl(folder / "metadata.jsonl", [{"image": image, "prompt": "x"}])
    with pytest.raises(
        DatasetError,
        match=re.escape(f"{meta} line 1: image is {shown}; give the image's path relative to the dataset folder"),
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_image_column_naming_a_folder_is_an_error(folder):
    meta = write_csv(folder / "metadata.csv", ["image", "prompt"], [["sub", "x"]])
    with pytest.raises(DatasetError, match=re.escape(f"{meta} row 1: image {folder / 'sub'} is a folder")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


@pytest.mark.parametrize("name, encoding", [("metadata.csv", "cp1252"), ("metadata.jsonl", "latin-1")])
def test_metadata_that_is_not_utf8_says_to_save_it_as_utf8(folder, name, encoding):
    meta = folder / name
    first = "image,prompt\na.png,a cafe\n" if name.endswith("csv") else '{"image": "a.png", "prompt": "a cafe"}\n'
    meta.write_bytes(first.encode() + first.splitlines()[-1].replace("cafe", "café").encode(encoding) + b"\n")
    line = 3 if name.endswith("csv") else 2
    with pytest.raises(
        DatasetError, match=re.escape(f"{meta}: line {line} is not UTF-8 text (byte 0xe9); save the file as UTF-8")
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_jsonl_with_utf8_bom_is_read(folder):
    (folder / "metadata.jsonl").write_text('{"image": "a.png", "prompt": "café"}\n', encoding="utf-8-sig")
    assert [s.prompt for s in read_dataset(folder, max_pixels=BIG, multiple=16)] == ["café"]


# --- paths outside the dataset folder ---------------------------------------------------------


@pytest.fixture
def outside(folder, tmp_path) -> Path:
    """An image next to the dataset folder, and a symlink inside the folder that leads to it."""
    image = save_image(tmp_path / "elsewhere" / "x.png", 32, 32)
    (folder / "link.png").symlink_to(image)
    (folder / "inner.png").symlink_to(folder / "a.png")  # a symlink that stays inside is fine
    return image


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_image_outside_the_dataset_folder_is_an_error_unless_allowed(folder, outside, kind):
    value = {"dotdot": "../elsewhere/x.png", "absolute": str(outside), "symlink": "link.png"}[kind]
    meta = write_csv(folder / "metadata.csv", ["image", "prompt"], [["inner.png", "ok"], [value, "x"]])
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{meta} row 2: image {value!r} is outside the dataset folder {folder} (it is {outside.resolve()}); "
            "move it into the folder, or set data.allow_outside_paths = true"
        ),
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)
    samples = read_dataset(folder, max_pixels=BIG, multiple=16, allow_outside_paths=True)
    assert [(s.image_path, s.size) for s in samples] == [(folder / "inner.png", (64, 64)), (folder / value, (32, 32))]


def test_allow_outside_paths_is_a_data_config_key_off_by_default():
    from autosplit.config import DataConfig

    assert DataConfig().allow_outside_paths is False


def test_a_dataset_folder_given_through_a_symlink_is_inside_itself(folder, tmp_path):
    write_csv(folder / "metadata.csv", ["image", "prompt"], [["sub/b.png", "x"]])
    (tmp_path / "alias").symlink_to(folder)
    assert read_dataset(tmp_path / "alias", max_pixels=BIG, multiple=16)[0].size == (96, 64)


# --- training sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, max_pixels, multiple, expected",
    [
        (64, 64, BIG, 16, (64, 64)),
        (100, 70, BIG, 16, (96, 64)),
        (100, 70, BIG, 1, (100, 70)),
        (127, 129, BIG, 32, (96, 128)),
        (200, 100, 5000, 16, (96, 48)),  # scaled to 100x50, then rounded down
        (2000, 1000, BIG, 16, (1440, 720)),  # scaled to 1448x724
        (1024, 1024, BIG, 16, (1024, 1024)),  # exactly at the limit: not scaled
        (100, 210, 20000, 1, (97, 204)),  # scaled to 97.6x204.9: rounding down keeps it under the limit
    ],
)
def test_train_size_scales_to_max_pixels_then_rounds_down_to_multiples(width, height, max_pixels, multiple, expected):
    size = train_size(width, height, max_pixels=max_pixels, multiple=multiple)
    assert size == expected
    assert size[0] * size[1] <= max_pixels
    assert size[0] % multiple == 0 and size[1] % multiple == 0


@pytest.mark.parametrize("width, height", [(15, 64), (64, 15), (4000, 10)])
def test_train_size_too_small_raises_value_error(width, height):
    with pytest.raises(ValueError, match="image smaller than 16x16 pixels"):
        train_size(width, height, max_pixels=BIG, multiple=16)


def test_read_dataset_applies_max_pixels_and_multiple(tmp_path):
    base = tmp_path / "ds"
    save_image(base / "big.png", 200, 100)
    write_csv(base / "metadata.csv", ["image", "prompt"], [["big.png", "x"]])
    assert read_dataset(base, max_pixels=5000, multiple=16)[0].size == (96, 48)
    assert read_dataset(base, max_pixels=BIG, multiple=16)[0].size == (192, 96)


# --- aspect-ratio buckets ---------------------------------------------------------------------


def test_aspect_buckets_golden_set():
    # frozen: a change here changes the training size of every bucketed image (and so every cache)
    assert aspect_buckets(max_pixels=128 * 128, step=16, max_aspect=4) == [
        (64, 256),
        (80, 192),
        (96, 160),
        (112, 144),
        (128, 128),
        (144, 112),
        (160, 96),
        (192, 80),
        (256, 64),
    ]
    assert aspect_buckets(max_pixels=1024 * 1024, step=64, max_aspect=4) == [
        (512, 2048),
        (576, 1792),
        (640, 1600),
        (704, 1472),
        (768, 1344),
        (832, 1216),
        (896, 1152),
        (960, 1088),
        (1024, 1024),
        (1088, 960),
        (1152, 896),
        (1216, 832),
        (1344, 768),
        (1472, 704),
        (1600, 640),
        (1792, 576),
        (2048, 512),
    ]


@pytest.mark.parametrize(
    "max_pixels, step, max_aspect",
    [(128 * 128, 16, 4.0), (1024 * 1024, 64, 4.0), (1024 * 1024, 16, 2.0), (512 * 768, 32, 3.0), (4096, 16, 4.0)],
)
def test_aspect_buckets_properties(max_pixels, step, max_aspect):
    buckets = aspect_buckets(max_pixels=max_pixels, step=step, max_aspect=max_aspect)
    assert len(buckets) == len(set(buckets)) > 0
    assert set(buckets) == {(h, w) for w, h in buckets}  # symmetric: a portrait bucket for every landscape one
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= max_pixels
        assert 1 / max_aspect <= w / h <= max_aspect
        assert w * (h + step) > max_pixels or (w + step) * h > max_pixels  # as large as the limit allows
        assert not any(o != (w, h) and o[0] >= w and o[1] >= h for o in buckets)  # none inside another
    assert [w / h for w, h in buckets] == sorted(w / h for w, h in buckets)


def test_aspect_buckets_that_cannot_fit_raise_value_error():
    with pytest.raises(ValueError, match="no bucket of sides that are multiples of 64 fits 1000 pixels"):
        aspect_buckets(max_pixels=1000, step=64, max_aspect=4)


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (1000, 1000, (128, 128)),
        (64, 64, (128, 128)),  # square, whatever the size (small images are scaled up)
        (300, 200, (160, 96)),  # 1.5: 160/96 = 1.67 is nearer on a log scale than 144/112 = 1.29
        (200, 300, (96, 160)),  # the mirror image gets the mirror bucket
        (4000, 100, (256, 64)),  # beyond 4:1: the widest bucket
        (100, 4000, (64, 256)),
        (1920, 1080, (160, 96)),
    ],
)
def test_nearest_bucket_by_aspect_ratio(width, height, expected):
    buckets = aspect_buckets(max_pixels=128 * 128, step=16, max_aspect=4)
    assert nearest_bucket(width, height, buckets) == expected


def test_nearest_bucket_ties_go_to_the_larger_then_the_wider_bucket():
    assert nearest_bucket(100, 100, [(32, 32), (64, 64), (48, 48)]) == (64, 64)
    assert nearest_bucket(100, 100, [(32, 64), (64, 32)]) == (64, 32)  # equally far on a log scale


def test_read_dataset_with_buckets_trains_each_image_at_its_nearest_bucket(tmp_path):
    base = tmp_path / "ds"
    sizes = {"wide.png": (300, 200), "tall.png": (200, 300), "tiny.png": (12, 12), "pano.png": (900, 100)}
    for name, size in sizes.items():
        save_image(base / name, *size)
    write_csv(base / "metadata.csv", ["image", "prompt"], [[n, n] for n in sizes])
    buckets = aspect_buckets(max_pixels=128 * 128, step=16, max_aspect=4)
    samples = read_dataset(base, max_pixels=128 * 128, multiple=16, buckets=buckets)
    assert [s.size for s in samples] == [(160, 96), (96, 160), (128, 128), (256, 64)]
    assert read_dataset(base, max_pixels=128 * 128, multiple=16, buckets=buckets) == samples  # deterministic
    with pytest.raises(DatasetError, match="image smaller than 16x16"):
        read_dataset(base, max_pixels=128 * 128, multiple=16)  # without buckets the 12x12 image is too small
    image = load_image(base / "wide.png", samples[0].size)  # resized to cover the bucket, centre-cropped
    assert image.shape == (3, 96, 160)


def test_bucketing_changes_the_sample_fingerprint(folder):
    base = Sample(0, folder / "a.png", "x", (64, 64))
    assert sample_fingerprint(base) != sample_fingerprint(dataclasses.replace(base, size=(80, 48)))


# --- decoding ---------------------------------------------------------------------------------


def test_load_image_shape_dtype_and_range(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    pixels[0, 0] = 0
    pixels[0, 1] = 255
    path = tmp_path / "noise.png"
    Image.fromarray(pixels).save(path)
    t = load_image(path, (64, 48))
    assert t.shape == (3, 48, 64)
    assert t.dtype == torch.float32
    assert t.min().item() >= -1.0 and t.max().item() <= 1.0


@pytest.mark.parametrize(
    "color, expected",
    [((0, 0, 0), (-1.0, -1.0, -1.0)), ((255, 255, 255), (1.0, 1.0, 1.0)), ((255, 0, 255), (1.0, -1.0, 1.0))],
)
def test_load_image_maps_0_255_to_minus_one_one(tmp_path, color, expected):
    path = save_image(tmp_path / "solid.png", 32, 32, color=color)
    t = load_image(path, (32, 32))
    assert torch.equal(t, torch.tensor(expected).view(3, 1, 1).expand(3, 32, 32))


def test_load_image_centre_crops_in_rgb_order(tmp_path):
    # 96x64 image: left third red, middle third green, right third blue; a 32x64 crop is the middle
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[:, :32, 0] = pixels[:, 32:64, 1] = pixels[:, 64:, 2] = 255
    path = tmp_path / "thirds.png"
    Image.fromarray(pixels).save(path)
    t = load_image(path, (32, 64))
    assert t.shape == (3, 64, 32)
    assert torch.equal(t, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 64, 32))


def test_load_image_resizes_to_cover_the_target(tmp_path):
    path = save_image(tmp_path / "small.png", 16, 8, color=(255, 255, 255))
    t = load_image(path, (64, 64))  # upscaled to 128x64, then cropped
    assert t.shape == (3, 64, 64)
    assert torch.equal(t, torch.ones(3, 64, 64))


@pytest.mark.parametrize("mode, color", [("L", 255), ("RGBA", (255, 255, 255, 128)), ("P", 3)])
def test_load_image_converts_other_modes_to_three_channels(tmp_path, mode, color):
    path = save_image(tmp_path / f"{mode}.png", 16, 16, color=color, mode=mode)
    assert load_image(path, (16, 16)).shape == (3, 16, 16)


def _png_bytes(seed: int = 0) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "corrupt_body"])
def test_load_image_of_a_damaged_png_raises_dataset_error_naming_the_path(tmp_path, damage):
    data = bytearray(_png_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[200:400] = bytes(b ^ 0xFF for b in data[200:400])
    path = tmp_path / f"{damage}.png"
    path.write_bytes(bytes(data))
    # the header is intact: reading the dataset (headers only) succeeds, decoding fails
    with Image.open(path) as im:
        assert im.size == (64, 64)
    with pytest.raises(DatasetError, match=re.escape(f"image {path} cannot be decoded")):
        load_image(path, (64, 64))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(
    path: Path, pixels: np.ndarray, *, color_type: int, bit_depth: int = 16, header_size: tuple[int, int] | None = None
) -> Path:
    """A PNG written by hand (PIL cannot write 16-bit RGB); `header_size` (width, height) makes the
    IHDR claim another size than the pixels have."""
    import struct
    import zlib

    height, width = pixels.shape[:2]
    dtype = ">u2" if bit_depth == 16 else np.uint8
    raw = b"".join(b"\0" + row.astype(dtype).tobytes() for row in pixels)
    w, h = header_size or (width, height)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )
    return path


GREY16 = np.array([[0, 255, 256, 257, 32767, 32768, 65280, 65534, 65535]] * 2, dtype=np.uint16)


def expected_from_8bit(grey8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(grey8.astype(np.float32)).div(127.5).sub(1).expand(3, *grey8.shape)


def test_16bit_greyscale_png_is_scaled_to_8bit_not_clipped_to_white(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(GREY16).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"  # what PIL reads a 16-bit greyscale PNG as
        assert np.asarray(im.convert("RGB"))[0, 1:, 0].tolist() == [255] * 8  # PIL's own convert clips
    t = load_image(path, (9, 2))
    assert torch.equal(t, expected_from_8bit(np.array([[0, 0, 1, 1, 127, 128, 255, 255, 255]] * 2)))  # value >> 8
    assert torch.equal(t, expected_from_8bit((GREY16 >> 8).astype(np.uint8)))


def test_16bit_grey_and_16bit_rgb_pngs_of_one_picture_load_alike(tmp_path):
    # PIL reads a 16-bit RGB PNG as 8-bit RGB by keeping each value's high byte: grey does the same
    grey = write_png(tmp_path / "grey.png", GREY16, color_type=0)
    rgb = write_png(tmp_path / "rgb.png", np.repeat(GREY16[..., None], 3, axis=2), color_type=2)
    with Image.open(rgb) as im:
        assert im.mode == "RGB"
    assert torch.equal(load_image(grey, (9, 2)), load_image(rgb, (9, 2)))


def test_32bit_integer_greyscale_is_read_as_16bit(tmp_path):
    # mode "I": what older Pillow opened 16-bit PNGs as, and 32-bit TIFFs; clipped to 0..65535, then >> 8
    values = np.array([[-5, 0, 256, 32768, 65535, 70000]], dtype=np.int32)
    path = tmp_path / "grey32.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode == "I"
    assert torch.equal(load_image(path, (6, 1)), expected_from_8bit(np.array([[0, 0, 1, 128, 255, 255]])))


def test_16bit_image_header_is_read_like_any_other(tmp_path):
    Image.fromarray(np.zeros((48, 80), np.uint16)).save(tmp_path / "g.png")
    write_csv(tmp_path / "metadata.csv", ["image", "prompt"], [["g.png", "x"]])
    assert read_dataset(tmp_path, max_pixels=BIG, multiple=16)[0].size == (80, 48)


@pytest.mark.parametrize(
    "mode, color, rgb",
    [
        ("L", 77, (77, 77, 77)),
        ("LA", (77, 0), (77, 77, 77)),  # alpha dropped
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha dropped, not composited (as DiffSynth-Studio reads)
        ("CMYK", (0, 255, 0, 0), (255, 0, 255)),  # magenta ink: PIL's profile-free formula
        ("1", 1, (255, 255, 255)),
        ("I;16", 40000, (156, 156, 156)),  # 40000 >> 8
    ],
)
def test_load_image_converts_each_mode_to_the_rgb_it_shows(tmp_path, mode, color, rgb):
    path = tmp_path / f"{mode.replace(';', '_')}.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (4, 4), color).save(path, **({"quality": 100} if mode == "CMYK" else {}))
    t = load_image(path, (4, 4))
    assert torch.allclose(
        t,
        torch.tensor(rgb, dtype=torch.float32).div(127.5).sub(1).view(3, 1, 1).expand(3, 4, 4),
        atol=2 / 127.5 if mode == "CMYK" else 0,
    )  # JPEG: off by a level at most


def test_load_image_reads_a_palette_image_through_its_palette(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    im.save(tmp_path / "p.png")
    assert torch.equal(load_image(tmp_path / "p.png", (4, 4))[:, 0, 0], torch.tensor([200, 100, 50]).div(127.5).sub(1))


def test_image_whose_header_claims_20000x20000_is_a_dataset_error(folder):
    # a 1x1 PNG whose IHDR says 20000x20000: PIL refuses it as a decompression bomb on open
    bomb = write_png(
        folder / "bomb.png", np.zeros((1, 1), np.uint8), color_type=0, bit_depth=8, header_size=(20000, 20000)
    )
    meta = write_csv(folder / "metadata.csv", ["image", "prompt"], [["a.png", "ok"], ["bomb.png", "x"]])
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{meta} row 2: image {bomb} is too large to decode (Image size (400000000 pixels) exceeds limit of"
        ),
    ) as info:
        read_dataset(folder, max_pixels=BIG, multiple=16)
    assert str(info.value).endswith("; scale it down")
    with pytest.raises(DatasetError, match=re.escape(f"image {bomb} is too large to decode")):
        load_image(bomb, (64, 64))


@pytest.mark.parametrize("content", [b"", b"GIF89a" + b"\0" * 10, b"\x89PNG\r\n\x1a\n" + b"\0" * 30])
def test_empty_or_headless_image_files_are_not_readable_images(folder, content):
    (folder / "bad.png").write_bytes(content)
    meta = write_csv(folder / "metadata.csv", ["image", "prompt"], [["bad.png", "x"]])
    with pytest.raises(
        DatasetError, match=re.escape(f"{meta} row 1: image {folder / 'bad.png'} is not a readable image")
    ):
        read_dataset(folder, max_pixels=BIG, multiple=16)


# --- captions longer than the tokenizer's limit -------------------------------------------------


def test_note_truncation_counts_cut_captions_and_warns_once_per_tokenizer(caplog):
    import logging

    from autosplit.adapters import tiny
    from autosplit.adapters.base import note_truncation, truncation_report

    tokenizer = tiny.clip_tokenizer(77)
    long = " ".join(["a photo of a red cube on a blue table"] * 12)
    num_tokens = len(tokenizer(long, verbose=False).input_ids)
    assert num_tokens > 77
    truncation_report()  # forget cuts of earlier tests
    with caplog.at_level(logging.WARNING, logger="autosplit.adapters.base"):
        assert note_truncation(tokenizer, ["a red cube", long, long], max_length=77, label="tokenizer") == 2
        assert note_truncation(tokenizer, [long], max_length=77, label="tokenizer") == 1
        assert note_truncation(tokenizer, ["a red cube"], max_length=77, label="tokenizer") == 0
        assert note_truncation(tokenizer, [long], max_length=num_tokens, label="tokenizer") == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"2 of 3 captions in a batch are longer than tokenizer's limit and are cut to 77 tokens (the longest has "
        f"{num_tokens}); shorten them to keep their ends (further cuts by tokenizer are counted, not logged)"
    ]
    assert truncation_report() == (
        f"captions cut to the text encoders' limits: 3 by tokenizer to 77 tokens (the "
        f"longest had {num_tokens}); shorten them to keep their ends"
    )
    assert truncation_report() is None


# --- the synthetic dataset --------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_write_synthetic_dataset_is_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", num_samples=6, seed=1)
    b = write_synthetic_dataset(tmp_path / "b", num_samples=6, seed=1)
    assert a == tmp_path / "a"
    assert _files(a) == _files(b)
    assert sorted(_files(a)) == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png", "0005.png", "metadata.csv"]
    c = write_synthetic_dataset(tmp_path / "c", num_samples=6, seed=2)
    assert _files(c)["metadata.csv"] != _files(a)["metadata.csv"]


def test_write_synthetic_dataset_has_two_sizes_and_readable_captions(tmp_path):
    root = write_synthetic_dataset(tmp_path / "syn")
    samples = read_dataset(root, max_pixels=BIG, multiple=16)
    assert len(samples) == 16
    assert {s.size for s in samples} == {(64, 64), (96, 64)}
    assert [s.size for s in samples[:4]] == [(96, 64), (64, 64), (64, 64), (96, 64)]
    for s in samples:
        assert re.fullmatch(r"a \w+ (stripes|checkerboard|gradient|circle) on a \w+ background", s.prompt), s.prompt
        fg, bg = s.prompt.split()[1], s.prompt.split()[-2]
        assert fg != bg
        assert load_image(s.image_path, s.size).shape == (3, s.size[1], s.size[0])


# --- fingerprints -----------------------------------------------------------------------------


def test_sample_fingerprint_depends_on_content_prompt_and_size(folder, tmp_path):
    sample = Sample(0, folder / "a.png", "a red square", (64, 64))
    base = sample_fingerprint(sample)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert sample_fingerprint(dataclasses.replace(sample)) == base
    assert sample_fingerprint(dataclasses.replace(sample, prompt="a red square.")) != base
    assert sample_fingerprint(dataclasses.replace(sample, size=(48, 64))) != base
    assert sample_fingerprint(dataclasses.replace(sample, index=5)) == base  # position does not matter

    copy = tmp_path / "copy.png"
    copy.write_bytes(sample.image_path.read_bytes())
    assert sample_fingerprint(dataclasses.replace(sample, image_path=copy)) == base  # bytes, not the path

    save_image(folder / "a.png", 64, 64, color=(200, 30, 31))  # one channel value changes
    assert sample_fingerprint(sample) != base


def test_video_datasets_read_frame_folders_and_animated_files(tmp_path):
    from PIL import Image

    from autosplit.data import load_video, read_dataset, write_synthetic_videos

    root = write_synthetic_videos(tmp_path / "v", num_samples=2)
    frames = [Image.new("RGB", (48, 32), (i * 20, 0, 0)) for i in range(7)]
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=40)
    with (root / "metadata.csv").open("a") as f:
        f.write("clip.gif,a gif\n")
    samples = read_dataset(root, max_pixels=1 << 20, multiple=16, media="video", max_frames=81)
    assert [(s.bucket, s.num_frames) for s in samples] == [((32, 32, 5), 5), ((32, 32, 9), 9), ((48, 32, 5), 5)]
    clip = load_video(samples[2].image_path, samples[2].size, samples[2].num_frames)
    assert clip.shape == (3, 5, 32, 48)
    assert torch.equal(clip[0, :, 0, 0], torch.tensor([i * 20.0 for i in range(5)]).div(127.5).sub(1))
    capped = read_dataset(root, max_pixels=1 << 20, multiple=16, media="video", max_frames=8)
    assert [s.num_frames for s in capped] == [5, 5, 5]
    assert load_video(samples[1].image_path, samples[1].size, 9).shape == (3, 9, 32, 32)


def test_image_samples_keep_their_bucket_and_need_task_columns(tmp_path):
    from autosplit.data import read_dataset, write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "d", num_samples=3)
    samples = read_dataset(root, max_pixels=1 << 20, multiple=16)
    assert [s.bucket for s in samples] == [(96, 64), (64, 64), (64, 64)] and samples[0].num_frames == 0
    with pytest.raises(DatasetError, match="no 'seed' column"):
        read_dataset(root, max_pixels=1 << 20, multiple=16, columns=("seed",))


def write_clip(path, frames, codec: str, pix_fmt: str) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_clip_files_decode_through_pyav_like_frame_folders(tmp_path):
    pytest.importorskip("av")  # the `video` extra; `.[test]` installs it
    from PIL import Image

    from autosplit.data import load_video, read_dataset

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(9)]
    (tmp_path / "frames").mkdir()
    for i, pixels in enumerate(frames):
        Image.fromarray(pixels).save(tmp_path / "frames" / f"{i:03d}.png")
    write_clip(tmp_path / "lossless.mkv", frames, "ffv1", "bgr0")
    write_clip(tmp_path / "clip.mp4", frames[:7], "mpeg4", "yuv420p")
    (tmp_path / "metadata.csv").write_text("video,prompt\nframes,a\nlossless.mkv,b\nclip.mp4,c\n")
    samples = read_dataset(tmp_path, max_pixels=1 << 20, multiple=16, media="video", max_frames=81)
    assert [(s.image_path.name, s.size, s.num_frames) for s in samples] == [
        ("frames", (64, 48), 9),
        ("lossless.mkv", (64, 48), 9),
        ("clip.mp4", (64, 48), 5),
    ]  # 4k+1 of 7
    folder, mkv, mp4 = (load_video(s.image_path, s.size, s.num_frames) for s in samples)
    assert torch.equal(folder, mkv)  # a lossless clip decodes to exactly the frames
    assert mp4.shape == (3, 5, 48, 64) and (mp4 - folder[:, :5]).abs().mean() < 0.5  # lossy, same frames


def test_a_clip_without_pyav_or_broken_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from autosplit.data import read_dataset

    pytest.importorskip("av")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "metadata.csv").write_text("video,prompt\nbroken.mp4,a\n")
    with pytest.raises(DatasetError, match=r"video .*broken.mp4 cannot be opened"):
        read_dataset(tmp_path, max_pixels=1 << 20, multiple=16, media="video")
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(
        DatasetError, match=r'broken.mp4 is a .mp4 clip, which needs PyAV: pip install "autosplit\[video\]"'
    ):
        read_dataset(tmp_path, max_pixels=1 << 20, multiple=16, media="video")
