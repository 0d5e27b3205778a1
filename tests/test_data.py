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

from autosplit.data import (Sample, load_image, read_dataset, sample_fingerprint, train_size,
                            write_synthetic_dataset)
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
    write_csv(folder / "metadata.csv", ["image", "prompt", "style"],
              [["a.png", "a red square", "flat"], ["sub/b.png", "a blue, wide square", "wide"]])
    samples = read_dataset(folder, max_pixels=BIG, multiple=16)
    assert samples == [
        Sample(0, folder / "a.png", "a red square", (64, 64), {"style": "flat"}),
        Sample(1, folder / "sub" / "b.png", "a blue, wide square", (96, 64), {"style": "wide"}),
    ]
    assert [s.bucket for s in samples] == [(64, 64), (96, 64)]


def test_read_dataset_from_metadata_jsonl_skipping_blank_lines(folder):
    (folder / "metadata.jsonl").write_text(
        json.dumps({"image": "a.png", "prompt": "first"}) + "\n\n"
        + json.dumps({"image": "sub/b.png", "prompt": "second", "seed": 3}) + "\n",
        encoding="utf-8")
    samples = read_dataset(folder, max_pixels=BIG, multiple=16)
    assert [(s.index, s.image_path, s.prompt, s.size, s.extras) for s in samples] == [
        (0, folder / "a.png", "first", (64, 64), {}),
        (1, folder / "sub" / "b.png", "second", (96, 64), {"seed": 3}),
    ]


def test_csv_is_preferred_over_jsonl(folder):
    write_csv(folder / "metadata.csv", ["image", "prompt"], [["a.png", "from csv"]])
    write_jsonl(folder / "metadata.jsonl", [{"image": "a.png", "prompt": "from jsonl"}])
    assert [s.prompt for s in read_dataset(folder, max_pixels=BIG, multiple=16)] == ["from csv"]


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


def test_folder_without_metadata(folder):
    with pytest.raises(DatasetError, match=re.escape(f"{folder} has no metadata.csv or metadata.jsonl")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_explicit_metadata_path_missing(folder):
    meta = folder / "captions.csv"
    with pytest.raises(DatasetError, match=re.escape(f"--dataset_metadata_path {meta}: no such file")):
        read_dataset(folder, meta, max_pixels=BIG, multiple=16)


def test_explicit_metadata_with_unknown_suffix(folder):
    meta = folder / "captions.txt"
    meta.write_text("image,prompt\na.png,x\n")
    with pytest.raises(DatasetError, match=re.escape(f"{meta}: use a .csv or .jsonl file")):
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
    with pytest.raises(DatasetError,
                       match=re.escape(f"{meta} row 2: image {folder / 'gone.png'} does not exist")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_row_naming_a_file_that_is_not_an_image(folder):
    (folder / "notes.png").write_bytes(b"these are notes, not pixels\n" * 10)
    meta = write_csv(folder / "metadata.csv", ["image", "prompt"], [["notes.png", "x"]])
    with pytest.raises(DatasetError,
                       match=re.escape(f"{meta} row 1: image {folder / 'notes.png'} is not a readable image")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_row_naming_an_image_too_small_for_the_multiple(folder):
    save_image(folder / "tiny.png", 8, 40)
    meta = write_csv(folder / "metadata.csv", ["image", "prompt"], [["tiny.png", "x"]])
    with pytest.raises(DatasetError, match=re.escape(f"{meta} row 1: image {folder / 'tiny.png'} is 8x40, "
                                                     "image smaller than 16x16 pixels; use a larger image")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_invalid_jsonl_line_names_the_line_number(folder):
    meta = folder / "metadata.jsonl"
    meta.write_text('{"image": "a.png", "prompt": "ok"}\n{"image": "a.png", "prompt": \n', encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(f"{meta}:2: not valid JSON")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


@pytest.mark.parametrize("bad_row", [{"image": "a.png"}, {"prompt": "no image"}])
def test_later_jsonl_row_missing_a_key_names_the_row(folder, bad_row):
    meta = write_jsonl(folder / "metadata.jsonl", [{"image": "a.png", "prompt": "ok"}, bad_row])
    with pytest.raises(DatasetError, match=re.escape(f"{meta} row 2")):
        read_dataset(folder, max_pixels=BIG, multiple=16)


def test_csv_with_utf8_bom_is_read(folder):
    (folder / "metadata.csv").write_text("image,prompt\na.png,a red square\n", encoding="utf-8-sig")
    assert [s.prompt for s in read_dataset(folder, max_pixels=BIG, multiple=16)] == ["a red square"]


# --- training sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("width, height, max_pixels, multiple, expected", [
    (64, 64, BIG, 16, (64, 64)),
    (100, 70, BIG, 16, (96, 64)),
    (100, 70, BIG, 1, (100, 70)),
    (127, 129, BIG, 32, (96, 128)),
    (200, 100, 5000, 16, (96, 48)),      # scaled to 100x50, then rounded down
    (2000, 1000, BIG, 16, (1440, 720)),  # scaled to 1448x724
    (1024, 1024, BIG, 16, (1024, 1024)),  # exactly at the limit: not scaled
    (100, 210, 20000, 1, (97, 204)),     # scaled to 97.6x204.9: rounding down keeps it under the limit
])
def test_train_size_scales_to_max_pixels_then_rounds_down_to_multiples(width, height, max_pixels, multiple,
                                                                      expected):
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


@pytest.mark.parametrize("color, expected", [((0, 0, 0), (-1.0, -1.0, -1.0)), ((255, 255, 255), (1.0, 1.0, 1.0)),
                                             ((255, 0, 255), (1.0, -1.0, 1.0))])
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


# --- the synthetic dataset --------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_write_synthetic_dataset_is_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", num_samples=6, seed=1)
    b = write_synthetic_dataset(tmp_path / "b", num_samples=6, seed=1)
    assert a == tmp_path / "a"
    assert _files(a) == _files(b)
    assert sorted(_files(a)) == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png", "0005.png",
                                 "metadata.csv"]
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
        ("frames", (64, 48), 9), ("lossless.mkv", (64, 48), 9), ("clip.mp4", (64, 48), 5)]  # 4k+1 of 7
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
    with pytest.raises(DatasetError, match=r'broken.mp4 is a .mp4 clip, which needs PyAV: pip install "autosplit\[video\]"'):
        read_dataset(tmp_path, max_pixels=1 << 20, multiple=16, media="video")
