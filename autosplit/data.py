"""Datasets: a folder of images with `metadata.csv`, `metadata.jsonl` or `metadata.json` (columns
`image`, `prompt`), or of video clips (column `video`: a folder of frame images, an animated
GIF/WebP file, or an mp4/mov/mkv/webm/avi file, decoded with PyAV, the `video` extra); or, with no
metadata file, images (or clip files) in nested folders with their captions in `NAME.txt` beside
them, the layout kohya-ss and most captioning tools write.

These are the layouts DiffSynth-Studio, Hugging Face `imagefolder` and kohya-ss use. Reading the
built-in synthetic dataset and a user's folder is the same code. Other columns are kept per sample
(`Sample.extras`) and offered to the unit graph as sources (`seed`, `num_inference_steps`, ...).

Rows are checked, not guessed at: a missing prompt (no CSV cell, no JSON key, JSON null, no .txt
file) is an error while an empty string is a deliberately empty prompt; a JSON prompt must be a
string; media paths must stay inside the dataset folder (unless `data.allow_outside_paths`);
metadata and captions must be UTF-8; a metadata prompt and a `.txt` caption beside the same image
must agree. 16-bit greyscale images are reduced to 8 bits, not clipped.

Training sizes: each image is scaled down to `max_pixels` and cropped to multiples of the family's
factor (`train_size`), or, with aspect-ratio buckets (`aspect_buckets`), resized and centre-cropped
to the bucket nearest its aspect ratio (`nearest_bucket`), so that a batch fills from images of
different sizes.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosplit.errors import DatasetError

log = logging.getLogger(__name__)

#: metadata files looked for in a dataset folder, in this order (the first one found is read)
METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.json")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: clip files decoded with PyAV (`pip install "autosplit[video]"`)
CONTAINER_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
#: files a folder without metadata is read as: images, or for video families clip files and GIFs
#: (a clip given as a folder of frames needs a metadata file)
IMAGE_SUFFIXES = (*FRAME_SUFFIXES, ".tif", ".tiff")
CLIP_SUFFIXES = (*CONTAINER_SUFFIXES, ".gif")
#: a caption file beside its image: `photo.png` -> `photo.txt`
CAPTION_SUFFIX = ".txt"
#: `data.missing_caption`: an image without a caption file is an error, or trains on the empty prompt
MISSING_CAPTION = ("error", "empty")
#: `data.buckets`: "none" (each image at its own size, `train_size`) or "aspect" (aspect-ratio buckets)
BUCKET_MODES = ("none", "aspect")

Size = tuple[int, int]  # (width, height) in pixels


def _open_container(path: Path, where: str) -> Any:
    try:
        import av
    except ImportError:
        raise DatasetError(
            f"{where}: {path} is a {path.suffix} clip, which needs PyAV: pip install "
            f'"autosplit[video]" (or give a folder of frames or a GIF)'
        ) from None
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise DatasetError(f"{where}: video {path} cannot be opened ({exc}); replace or remove it") from exc


def _container_header(path: Path, where: str) -> tuple[tuple[int, int], int]:
    """((width, height), frames) of a clip file; frames counted from its packets when the container
    does not say."""
    with _open_container(path, where) as container:
        if not container.streams.video:
            raise DatasetError(f"{where}: {path} has no video stream; replace or remove it")
        stream = container.streams.video[0]
        size = (stream.codec_context.width, stream.codec_context.height)
        count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    return size, count


def _container_frames(path: Path, size: tuple[int, int], num_frames: int) -> list[torch.Tensor]:
    import av

    frames: list[torch.Tensor] = []
    with _open_container(path, f"video {path}") as container:
        try:
            for frame in container.decode(video=0):
                if len(frames) == num_frames:
                    break
                frames.append(_to_tensor(frame.to_image(), size))
        except av.error.FFmpegError as exc:
            raise DatasetError(f"video {path} cannot be decoded ({exc}); replace or remove it") from exc
    return frames


@dataclass(frozen=True)
class Sample:
    """One dataset row. `size` is the (width, height) the image is trained at; `image_path` is the
    image, or the clip of a video dataset, whose `num_frames` (0 for images) are trained."""

    index: int
    image_path: Path
    prompt: str
    size: tuple[int, int]
    extras: dict[str, Any] = field(default_factory=dict)
    num_frames: int = 0

    @property
    def bucket(self) -> tuple[int, ...]:
        return self.size if not self.num_frames else (*self.size, self.num_frames)

    def sources(self) -> dict[str, list[Any]]:
        """The sample's values for the unit graph, as a batch of one (lists)."""
        return {
            "variant": [0],
            **{k: [v] for k, v in self.extras.items()},
            "image_path": [self.image_path],
            "image_size": [self.size],
            "num_frames": [self.num_frames],
            "prompt": [self.prompt],
            "sample_id": [self.index],
        }


def _utf8_text(path: Path, *, fix: str) -> str:
    """The file's text (a UTF-8 BOM dropped); raises DatasetError naming the file, the line and
    the byte when it is not UTF-8, ending with `fix`."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # Excel and Notepad write a BOM
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); {fix}") from None


def _read_rows(metadata: Path) -> list[tuple[str, Any]]:
    """The metadata's rows, each with where it is for messages: "FILE row N" (csv, N counts data
    rows), "FILE line N" (jsonl) or "FILE item N" (json, a list of objects). Raises DatasetError
    for a file that is not UTF-8, CSV or JSON."""
    if metadata.suffix not in (".csv", ".jsonl", ".json"):
        raise DatasetError(f"--dataset_metadata_path {metadata}: use a .csv, .jsonl or .json file")
    text = _utf8_text(metadata, fix="save the file as UTF-8 (Excel: Save As > CSV UTF-8)")
    readers = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".json": _json_rows}
    return readers[metadata.suffix](metadata, text)


def _csv_rows(metadata: Path, text: str) -> list[tuple[str, Any]]:
    """Rows as dicts of the header's columns. Every row has a cell for every column: a row with
    fewer cells (a missing prompt) or with more non-empty ones (an unquoted comma) is an error."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        duplicate = sorted({c for c in header if header.count(c) > 1})
        if duplicate:
            raise DatasetError(f"{metadata}: column(s) {duplicate} appear more than once in the header; rename them")
        rows: list[tuple[str, Any]] = []
        for cells in reader:
            if not cells:
                continue  # a blank line
            where = f"{metadata} row {len(rows) + 1}"
            if len(cells) < len(header):
                raise DatasetError(
                    f"{where}: {len(cells)} cells for the header's {len(header)} columns, no value "
                    f"for {header[len(cells) :]}; add the cells (end the row with a comma for a "
                    f"deliberately empty prompt)"
                )
            if any(c.strip() for c in cells[len(header) :]):
                raise DatasetError(
                    f"{where}: {len(cells)} cells for the header's {len(header)} columns "
                    f'{header}; quote a value that holds a comma ("a red, round ball")'
                )
            rows.append((where, dict(zip(header, cells))))
    except csv.Error as exc:
        raise DatasetError(f"{metadata}:{reader.line_num}: not valid CSV ({exc}); fix that line") from exc
    return rows


def _jsonl_rows(metadata: Path, text: str) -> list[tuple[str, Any]]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((f"{metadata} line {line_no}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{metadata}:{line_no}: not valid JSON ({exc.msg}); fix that line") from exc
    return rows


def _json_rows(metadata: Path, text: str) -> list[tuple[str, Any]]:
    """metadata.json (as DiffSynth-Studio reads it): one JSON list of objects."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{metadata}:{exc.lineno}: not valid JSON ({exc.msg}); fix that line") from exc
    if not isinstance(data, list):
        raise DatasetError(
            f'{metadata}: expected a JSON list of objects ([{{"image": ..., "prompt": ...}}, ...]), '
            f"got {_json_type(data)}"
        )
    return [(f"{metadata} item {i}", row) for i, row in enumerate(data, start=1)]


def find_metadata(base: Path, metadata: Path | None) -> Path | None:
    """The metadata file: `metadata` if given, else the first of METADATA_NAMES in `base`, else
    None (the folder is read as media files with .txt captions). Raises DatasetError for a
    missing folder or a missing explicit file."""
    if not base.is_dir():
        raise DatasetError(f"--dataset_base_path {base}: no such folder; point it at the dataset folder")
    if metadata is not None:
        if not metadata.is_file():
            raise DatasetError(f"--dataset_metadata_path {metadata}: no such file")
        return metadata
    return next((base / name for name in METADATA_NAMES if (base / name).is_file()), None)


def _hidden(relative: Path) -> bool:
    """Dot-files and anything in a dot-folder (.ipynb_checkpoints, macOS's ._NAME copies)."""
    return any(part.startswith(".") for part in relative.parts)


def media_files(base: Path, media: str) -> list[Path]:
    """The images (or clip files) under `base`, recursively, in sorted order of their path relative
    to `base` (so the same folder gives the same order on every machine); hidden ones skipped."""
    suffixes = IMAGE_SUFFIXES if media == "image" else CLIP_SUFFIXES
    found = [
        p for p in base.rglob("*") if p.suffix.lower() in suffixes and not _hidden(p.relative_to(base)) and p.is_file()
    ]
    return sorted(found, key=lambda p: p.relative_to(base).as_posix())


def read_caption(path: Path) -> str:
    """A `.txt` caption: the whole file (every line), surrounding whitespace and a BOM dropped.
    Raises DatasetError naming the file when it is not UTF-8."""
    return _utf8_text(path, fix="save the caption as UTF-8").strip()


def _caption_rows(base: Path, *, media: str, missing_caption: str) -> list[tuple[str, Any]]:
    """Rows of a folder without metadata: each media file with the caption of its `.txt` file."""
    files = media_files(base, media)
    if not files:
        suffixes = IMAGE_SUFFIXES if media == "image" else CLIP_SUFFIXES
        raise DatasetError(
            f"--dataset_base_path {base} has no metadata file ({', '.join(METADATA_NAMES)}) and no "
            f"{media} files ({', '.join(suffixes)}); add {media}s with a NAME.txt caption beside each, "
            f"or a metadata.csv with columns {media},prompt (or pass --dataset_metadata_path)"
        )
    _check_shared_captions(files)
    missing = [p for p in files if not p.with_suffix(CAPTION_SUFFIX).is_file()]
    if missing and missing_caption != "empty":
        more = f" (and {len(missing) - 1} more {media}s lack theirs)" if len(missing) > 1 else ""
        raise DatasetError(
            f"{missing[0]}: no caption file {missing[0].with_suffix(CAPTION_SUFFIX).name} beside "
            f"it{more}; write one (an empty file for a deliberately empty prompt), or set "
            f'data.missing_caption = "empty" to train captionless {media}s on the empty prompt'
        )
    rows = []
    for path in files:
        caption = path.with_suffix(CAPTION_SUFFIX)
        prompt = read_caption(caption) if caption.is_file() else ""
        rows.append(
            (str(caption if caption.is_file() else path), {media: path.relative_to(base).as_posix(), "prompt": prompt})
        )
    return rows


def _check_shared_captions(files: list[Path]) -> None:
    """Two media files of one name (`a.png`, `a.jpg`) would share the caption `a.txt`: an error."""
    seen: dict[Path, Path] = {}
    for path in files:
        caption = path.with_suffix(CAPTION_SUFFIX)
        if caption in seen:
            raise DatasetError(
                f"{seen[caption]} and {path} share the caption file {caption}; rename one of them "
                f"(with its own .txt) or remove the duplicate"
            )
        seen[caption] = path


def _check_caption_agrees(path: Path, prompt: str, *, where: str) -> None:
    """A metadata row's prompt and a `.txt` caption beside its file must agree (after stripping
    whitespace): otherwise which one trains is a guess."""
    caption = path.with_suffix(CAPTION_SUFFIX)
    if not caption.is_file() or caption == path:
        return
    text = read_caption(caption)
    if text != prompt.strip():
        raise DatasetError(
            f"{where}: the prompt {_shorten(prompt)!r} disagrees with the caption file {caption} "
            f"({_shorten(text)!r}); a dataset takes its captions from the metadata file or from "
            f".txt files, not both: make them agree or delete one"
        )


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _warn_unlisted(base: Path, metadata: Path, listed: set[Path], media: str) -> None:
    """Say when a metadata file leaves out media files that have .txt captions (a mixed layout:
    the metadata file decides what trains)."""
    unlisted = [
        p for p in media_files(base, media) if p.with_suffix(CAPTION_SUFFIX).is_file() and p.resolve() not in listed
    ]
    if unlisted:
        log.warning(
            "%d %s file(s) in %s have .txt captions but are not in %s (e.g. %s) and are not trained; "
            "the metadata file decides what a dataset holds",
            len(unlisted),
            media,
            base,
            metadata.name,
            unlisted[0].relative_to(base),
        )


def train_size(width: int, height: int, *, max_pixels: int, multiple: int) -> tuple[int, int]:
    """The (width, height) an image is trained at: scaled down to at most `max_pixels`, then
    rounded down to multiples of `multiple` (the family's VAE x patch factor)."""
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
    width, height = width // multiple * multiple, height // multiple * multiple
    if width == 0 or height == 0:
        raise ValueError(f"image smaller than {multiple}x{multiple} pixels")
    return width, height


def aspect_buckets(*, max_pixels: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """The aspect-ratio bucket resolutions (width, height), sides multiples of `step` pixels.

    For every width, the tallest height keeping width x height <= `max_pixels`, and the same with
    the sides swapped (so the set is symmetric); kept when the aspect ratio lies within
    1/`max_aspect` .. `max_aspect`, and dropped when another bucket is at least as large on both
    sides. Sorted by aspect ratio (width / height). Raises ValueError when no bucket fits.
    """
    candidates = set()
    for width in range(step, max_pixels // step + 1, step):
        height = max_pixels // width // step * step
        if height:
            candidates |= {(width, height), (height, width)}
    within = [b for b in candidates if 1 / max_aspect <= b[0] / b[1] <= max_aspect]
    buckets = [b for b in within if not any(o != b and o[0] >= b[0] and o[1] >= b[1] for o in within)]
    if not buckets:
        raise ValueError(f"no bucket of sides that are multiples of {step} fits {max_pixels} pixels")
    return sorted(buckets, key=lambda b: (b[0] / b[1], b))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (on a log scale, so 2:1 and 1:2 are
    as far from 1:1); ties go to the larger bucket, then the wider. An image is resized to cover
    its bucket and centre-cropped (`load_image`), up or down."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1], -b[0]))


def read_dataset(
    base: Path,
    metadata: Path | None = None,
    *,
    max_pixels: int,
    multiple: int,
    media: str = "image",
    columns: tuple[str, ...] = (),
    max_frames: int = 81,
    frame_step: int = 4,
    allow_outside_paths: bool = False,
    missing_caption: str = "error",
    buckets: list[tuple[int, int]] | None = None,
) -> list[Sample]:
    """Read the dataset's metadata (or captions) and each image's (or clip's first frame's)
    header, not pixels.

    `media` is "image" (column `image`) or "video" (column `video`; clips keep the largest frame
    count of the form k * frame_step + 1 up to `max_frames`). `columns` are further columns every
    row must have. Every row needs a prompt: a missing one (csv: no cell; json/jsonl: no key, or
    null; a folder without metadata: no `.txt` file, unless `missing_caption` is "empty") is an
    error, an empty string is a deliberately empty prompt. Media paths must lie inside `base`
    (after following symlinks) unless `allow_outside_paths`. With `buckets`, each sample trains
    at the bucket nearest its aspect ratio, else at `train_size`. Raises DatasetError naming the
    file, row or column at fault and the fix.
    """
    found = find_metadata(base, metadata)
    if found is None:
        if columns:
            raise DatasetError(
                f"--dataset_base_path {base}: this task needs the columns {list(columns)}, which a "
                f"folder of {media}s with .txt captions cannot hold; add a metadata.csv with columns "
                f"{media},prompt,{','.join(columns)}"
            )
        rows = _caption_rows(base, media=media, missing_caption=missing_caption)
    else:
        rows = _read_rows(found)
        if not rows:
            raise DatasetError(f"{found}: no rows; add at least one {media},prompt row")
    samples = [
        _sample(
            i,
            where,
            row,
            base=base,
            metadata=found,
            media=media,
            columns=columns,
            allow_outside=allow_outside_paths,
            size_of=_sizer(max_pixels, multiple, buckets),
            frames=(max_frames, frame_step),
        )
        for i, (where, row) in enumerate(rows)
    ]
    if found is not None and found.parent == base:
        _warn_unlisted(base, found, {s.image_path.resolve() for s in samples}, media)
    return samples


def _sizer(max_pixels: int, multiple: int, buckets: list[tuple[int, int]] | None) -> Callable[[int, int], Size]:
    """(width, height) -> training size: the nearest bucket, or `train_size` (ValueError when too small)."""
    if buckets is not None:
        return lambda w, h: nearest_bucket(w, h, buckets)
    return lambda w, h: train_size(w, h, max_pixels=max_pixels, multiple=multiple)


def _sample(
    i: int,
    where: str,
    row: Any,
    *,
    base: Path,
    metadata: Path | None,
    media: str,
    columns: tuple[str, ...],
    allow_outside: bool,
    size_of: Callable[[int, int], Size],
    frames: tuple[int, int],
) -> Sample:
    """One row, checked, as a Sample (its media file's header read for the size)."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with {media} and prompt keys, got {_json_type(row)}")
    for column in (media, "prompt", *columns):
        if column not in row:
            kind = "column" if metadata is not None and metadata.suffix == ".csv" else "key"
            raise DatasetError(f"{where}: no {column!r} {kind} (has {sorted(row)}); name it {column!r}")
    prompt = _prompt(row["prompt"], where=where)
    path = _media_path(base, row[media], where=where, media=media, allow_outside=allow_outside)
    if metadata is not None:
        _check_caption_agrees(path, prompt, where=where)
    (w, h), count = _media_header(path, where=where, media=media)
    try:
        size = size_of(w, h)
    except ValueError as exc:
        raise DatasetError(f"{where}: {media} {path} is {w}x{h}, {exc}; use a larger {media}") from exc
    num_frames = 0
    if media == "video":
        max_frames, frame_step = frames
        num_frames = (min(count, max_frames) - 1) // frame_step * frame_step + 1
    extras = {k: v for k, v in row.items() if k not in (media, "prompt")}
    return Sample(i, path, prompt, size, extras, num_frames)


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
        str: "a string",
    }
    return names.get(type(value), type(value).__name__)


def _prompt(value: Any, *, where: str) -> str:
    if value is None:
        raise DatasetError(f'{where}: prompt is null; write the caption, or "" for a deliberately empty prompt')
    if not isinstance(value, str):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise DatasetError(
            f"{where}: prompt is {_json_type(value)} ({shown}), not a string; write the caption as one JSON string"
        )
    return value


def _media_path(base: Path, value: Any, *, where: str, media: str, allow_outside: bool) -> Path:
    """`base / value`, checked: it exists and (unless `allow_outside`) lies inside `base` after
    `..` and symlinks are resolved."""
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(
            f"{where}: {media} is {json.dumps(value)}; give the {media}'s path relative to the dataset folder"
        )
    path = base / value
    if not path.exists():
        raise DatasetError(f"{where}: {media} {path} does not exist; fix the path or remove the row")
    if not allow_outside and not path.resolve().is_relative_to(base.resolve()):
        raise DatasetError(
            f"{where}: {media} {value!r} is outside the dataset folder {base} (it is "
            f"{path.resolve()}); move it into the folder, or set data.allow_outside_paths = true"
        )
    if media == "image" and path.is_dir():
        raise DatasetError(f"{where}: image {path} is a folder; name an image file")
    return path


def _frame_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)


def _media_header(path: Path, *, where: str, media: str) -> tuple[tuple[int, int], int]:
    """((width, height), number of frames) of an image, a folder of frames or an animated file."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() in CONTAINER_SUFFIXES and media == "video":
        return _container_header(path, where)
    first = path
    if path.is_dir():
        frames = _frame_files(path)
        if not frames:
            raise DatasetError(f"{where}: {media} folder {path} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        first = frames[0]
    try:
        with Image.open(first) as im:
            count = len(frames) if path.is_dir() else getattr(im, "n_frames", 1)
            return im.size, count
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{where}: {media} {first} is too large to decode ({exc}); scale it down") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # PIL raises SyntaxError for a broken header
        raise DatasetError(f"{where}: {media} {first} is not a readable image ({exc}); replace or remove it") from exc


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Decode an image, resize to cover `size` (width, height), centre-crop; float32 CHW in [-1, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _to_tensor(im, size)
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"image {path} is too large to decode ({exc}); scale it down") from exc
    except (OSError, SyntaxError) as exc:
        raise DatasetError(f"image {path} cannot be decoded ({exc}); replace or remove it") from exc


def load_video(path: Path, size: tuple[int, int], num_frames: int) -> torch.Tensor:
    """The first `num_frames` frames of a clip (frame folder, animated GIF/WebP, or an mp4/mov/mkv/
    webm/avi file through PyAV), each resized and cropped like `load_image`; float32 C,F,H,W in [-1, 1]."""
    from PIL import Image, ImageSequence

    try:
        if Path(path).is_dir():
            frames = [load_image(p, size) for p in _frame_files(Path(path))[:num_frames]]
        elif Path(path).suffix.lower() in CONTAINER_SUFFIXES:
            frames = _container_frames(Path(path), size, num_frames)
        else:
            with Image.open(path) as im:
                frames = [_to_tensor(f, size) for f, _ in zip(ImageSequence.Iterator(im), range(num_frames))]
    except (OSError, SyntaxError) as exc:
        raise DatasetError(f"video {path} cannot be decoded ({exc}); replace or remove it") from exc
    if len(frames) < num_frames:
        raise DatasetError(f"video {path} has {len(frames)} frames, {num_frames} expected; re-read the dataset")
    return torch.stack(frames, dim=1)


#: greyscale modes of more than 8 bits: 16-bit PNGs and TIFFs open as "I;16*", "I" (32-bit) comes
#: from 16-bit files in older Pillow and is read as 16-bit too
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_rgb(im: Any) -> Any:
    """An 8-bit RGB copy of a PIL image. 16-bit greyscale keeps its high byte (value >> 8, as Pillow
    itself reduces 16-bit RGB and grey+alpha PNGs), where PIL's convert would clip it to white;
    "I" values are clipped to 0..65535 first. Other modes convert as PIL does: palette through the
    palette, grey+alpha and RGBA drop alpha (as DiffSynth-Studio's `convert("RGB")`), CMYK by PIL's
    profile-free formula."""
    from PIL import Image

    if im.mode in WIDE_GREY_MODES:
        wide = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        im = Image.fromarray((wide >> 8).astype(np.uint8))
    return im.convert("RGB")


def _to_tensor(im: Any, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    width, height = size
    im = _to_rgb(im)
    scale = max(width / im.width, height / im.height)
    im = im.resize(
        (max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.Resampling.BILINEAR
    )
    left, top = (im.width - width) // 2, (im.height - height) // 2
    im = im.crop((left, top, left + width, top + height))
    pixels = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def sample_fingerprint(sample: Sample) -> str:
    """sha256 of the image (or clip's frame) bytes, the prompt, the training size and any other
    columns and frame count: what stage 1 depends on."""
    return source_digest(sample).source.hex()


@dataclass(frozen=True)
class SourceDigest:
    """What one sample's stage-1 outputs are made from: sha256 of the image file's (or the clip's
    frames') bytes, of the prompt (UTF-8), the training size, and `source` = sha256(those bytes +
    [prompt, size, other columns, frame count] as JSON)."""

    image: bytes
    prompt: bytes
    size: tuple[int, int]
    source: bytes


def source_digest(sample: Sample) -> SourceDigest:
    path = sample.image_path
    data = b"".join(f.read_bytes() for f in (_frame_files(path) if path.is_dir() else [path]))
    extra = [sample.extras, sample.num_frames] if sample.extras or sample.num_frames else []
    h = hashlib.sha256(data)
    h.update(json.dumps([sample.prompt, list(sample.size), *extra], default=str).encode())
    width, height = sample.size
    return SourceDigest(
        hashlib.sha256(data).digest(), hashlib.sha256(sample.prompt.encode()).digest(), (width, height), h.digest()
    )


_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 190),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
_PATTERNS = ("stripes", "checkerboard", "gradient", "circle")


def write_synthetic_dataset(root: Path, *, num_samples: int = 16, seed: int = 0) -> Path:
    """Write a deterministic image+caption dataset (PNG files + metadata.csv) to `root`.

    Two image sizes (64x64 and 96x64) so that shape buckets are exercised. Returns `root`.
    """
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(_COLORS)
    rows = []
    for i in range(num_samples):
        fg, bg = rng.choice(len(names), size=2, replace=False)
        pattern = _PATTERNS[i % len(_PATTERNS)]
        width, height = (64, 64) if i % 3 else (96, 64)
        pixels = _draw(pattern, width, height, _COLORS[names[fg]], _COLORS[names[bg]])
        file = f"{i:04d}.png"
        Image.fromarray(pixels).save(root / file)
        rows.append((file, f"a {names[fg]} {pattern} on a {names[bg]} background"))
    return _write_metadata(root, "image", rows)


def _write_metadata(root: Path, media: str, rows: list[tuple[str, str]]) -> Path:
    """metadata.csv of a synthetic dataset: a `media` column (image or video) and `prompt`."""
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([media, "prompt"])
        writer.writerows(rows)
    return root


def _draw(pattern: str, width: int, height: int, fg: tuple, bg: tuple) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    if pattern == "stripes":
        on = (x // 8) % 2 == 0
    elif pattern == "checkerboard":
        on = ((x // 16) + (y // 16)) % 2 == 0
    elif pattern == "circle":
        on = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2
    else:
        t = (x / max(width - 1, 1))[..., None]
        return (np.array(bg) * (1 - t) + np.array(fg) * t).astype(np.uint8)
    return np.where(on[..., None], np.array(fg), np.array(bg)).astype(np.uint8)


def write_synthetic_videos(root: Path, *, num_samples: int = 6, seed: int = 0) -> Path:
    """Write a deterministic clip+caption dataset (one folder of PNG frames per clip +
    metadata.csv, column `video`) to `root`: a square moving across a background, 5 or 9 frames
    (two frame-count buckets) of 32x32. Returns `root`."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(_COLORS)
    rows = []
    for i in range(num_samples):
        fg, bg = rng.choice(len(names), size=2, replace=False)
        num_frames, clip = (9 if i % 2 else 5), root / f"{i:04d}"
        clip.mkdir()
        for f in range(num_frames):
            pixels = np.empty((32, 32, 3), np.uint8)
            pixels[:] = _COLORS[names[bg]]
            x = 2 + 2 * f
            pixels[12:20, x : x + 8] = _COLORS[names[fg]]
            Image.fromarray(pixels).save(clip / f"{f:04d}.png")
        rows.append((clip.name, f"a {names[fg]} square moving right on a {names[bg]} background"))
    return _write_metadata(root, "video", rows)
