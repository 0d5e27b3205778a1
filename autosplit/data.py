"""Datasets: a folder of images with `metadata.csv` or `metadata.jsonl` (columns `image`, `prompt`),
or of video clips (column `video`: a folder of frame images, an animated GIF/WebP file, or an
mp4/mov/mkv/webm/avi file, decoded with PyAV, the `video` extra).

This is the layout DiffSynth-Studio and Hugging Face `imagefolder` use. Reading the built-in
synthetic dataset and a user's folder is the same code. Other columns are kept per sample
(`Sample.extras`) and offered to the unit graph as sources (`seed`, `num_inference_steps`, ...).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosplit.errors import DatasetError

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: clip files decoded with PyAV (`pip install "autosplit[video]"`)
CONTAINER_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


def _open_container(path: Path, where: str) -> Any:
    try:
        import av
    except ImportError:
        raise DatasetError(f"{where}: {path} is a {path.suffix} clip, which needs PyAV: pip install "
                           f"\"autosplit[video]\" (or give a folder of frames or a GIF)") from None
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

    frames = []
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
        return {"variant": [0], **{k: [v] for k, v in self.extras.items()}, "image_path": [self.image_path],
                "image_size": [self.size], "num_frames": [self.num_frames], "prompt": [self.prompt],
                "sample_id": [self.index]}


def _read_rows(metadata: Path) -> list[dict[str, Any]]:
    if metadata.suffix == ".csv":
        with metadata.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
            return list(csv.DictReader(f))
    if metadata.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{metadata}:{line_no}: not valid JSON ({exc.msg}); fix that line") from exc
        return rows
    raise DatasetError(f"--dataset_metadata_path {metadata}: use a .csv or .jsonl file")


def find_metadata(base: Path, metadata: Path | None) -> Path:
    if not base.is_dir():
        raise DatasetError(f"--dataset_base_path {base}: no such folder; point it at the dataset folder")
    if metadata is not None:
        if not metadata.is_file():
            raise DatasetError(f"--dataset_metadata_path {metadata}: no such file")
        return metadata
    for name in METADATA_NAMES:
        if (base / name).is_file():
            return base / name
    raise DatasetError(
        f"--dataset_base_path {base} has no metadata.csv or metadata.jsonl; add one with columns image,prompt "
        f"or pass --dataset_metadata_path"
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


def read_dataset(base: Path, metadata: Path | None = None, *, max_pixels: int, multiple: int,
                 media: str = "image", columns: tuple[str, ...] = (), max_frames: int = 81,
                 frame_step: int = 4) -> list[Sample]:
    """Read the dataset's metadata and each image's (or clip's first frame's) header, not pixels.

    `media` is "image" (column `image`) or "video" (column `video`; clips keep the largest frame
    count of the form k * frame_step + 1 up to `max_frames`). `columns` are further columns every
    row must have. Raises DatasetError naming the file, row or column at fault and the fix.
    """
    metadata = find_metadata(base, metadata)
    rows = _read_rows(metadata)
    if not rows:
        raise DatasetError(f"{metadata}: no rows; add at least one {media},prompt row")
    samples = []
    for i, row in enumerate(rows):
        where = f"{metadata} row {i + 1}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object with {media} and prompt keys, got {type(row).__name__}")
        for column in (media, "prompt", *columns):
            if column not in row:
                kind = "column" if i == 0 else "key"
                raise DatasetError(f"{where}: no {column!r} {kind} (has {sorted(row)}); name it {column!r}")
        path = base / str(row[media])
        if not path.exists():
            raise DatasetError(f"{where}: {media} {path} does not exist; fix the path or remove the row")
        (w, h), frames = _media_header(path, where=where, media=media)
        try:
            size = train_size(w, h, max_pixels=max_pixels, multiple=multiple)
        except ValueError as exc:
            raise DatasetError(f"{where}: {media} {path} is {w}x{h}, {exc}; use a larger {media}") from exc
        num_frames = 0
        if media == "video":
            num_frames = (min(frames, max_frames) - 1) // frame_step * frame_step + 1
        extras = {k: v for k, v in row.items() if k not in (media, "prompt")}
        samples.append(Sample(i, path, str(row["prompt"] or ""), size, extras, num_frames))
    return samples


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
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"{where}: {media} {first} is not a readable image ({exc}); replace or remove it") from exc


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Decode an image, resize to cover `size` (width, height), centre-crop; float32 CHW in [-1, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _to_tensor(im, size)
    except OSError as exc:
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
    except OSError as exc:
        raise DatasetError(f"video {path} cannot be decoded ({exc}); replace or remove it") from exc
    if len(frames) < num_frames:
        raise DatasetError(f"video {path} has {len(frames)} frames, {num_frames} expected; re-read the dataset")
    return torch.stack(frames, dim=1)


def _to_tensor(im: Any, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    width, height = size
    im = im.convert("RGB")
    scale = max(width / im.width, height / im.height)
    im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.BILINEAR)
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
    return SourceDigest(hashlib.sha256(data).digest(), hashlib.sha256(sample.prompt.encode()).digest(),
                        tuple(sample.size), h.digest())


_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (15, 15, 15)}
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
            pixels[12:20, x:x + 8] = _COLORS[names[fg]]
            Image.fromarray(pixels).save(clip / f"{f:04d}.png")
        rows.append((clip.name, f"a {names[fg]} square moving right on a {names[bg]} background"))
    return _write_metadata(root, "video", rows)
