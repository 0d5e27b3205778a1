"""Datasets: a folder of images with `metadata.csv` or `metadata.jsonl` (columns `image`, `prompt`).

This is the layout DiffSynth-Studio and Hugging Face `imagefolder` use. Reading the built-in
synthetic dataset and a user's folder is the same code.
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


@dataclass(frozen=True)
class Sample:
    """One dataset row. `size` is the (width, height) the image is trained at."""

    index: int
    image_path: Path
    prompt: str
    size: tuple[int, int]
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def bucket(self) -> tuple[int, int]:
        return self.size


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


def read_dataset(base: Path, metadata: Path | None = None, *, max_pixels: int, multiple: int) -> list[Sample]:
    """Read the dataset's metadata and each image's header (not its pixels).

    Raises DatasetError naming the file, row or column at fault and the fix.
    """
    from PIL import Image, UnidentifiedImageError

    metadata = find_metadata(base, metadata)
    rows = _read_rows(metadata)
    if not rows:
        raise DatasetError(f"{metadata}: no rows; add at least one image,prompt row")
    samples = []
    for i, row in enumerate(rows):
        where = f"{metadata} row {i + 1}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object with image and prompt keys, got {type(row).__name__}")
        for column in ("image", "prompt"):
            if column not in row:
                kind = "column" if i == 0 else "key"
                raise DatasetError(f"{where}: no {column!r} {kind} (has {sorted(row)}); name it {column!r}")
        path = base / str(row["image"])
        if not path.is_file():
            raise DatasetError(f"{where}: image {path} does not exist; fix the path or remove the row")
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"{where}: image {path} is not a readable image ({exc}); replace or remove it") from exc
        try:
            size = train_size(w, h, max_pixels=max_pixels, multiple=multiple)
        except ValueError as exc:
            raise DatasetError(f"{where}: image {path} is {w}x{h}, {exc}; use a larger image") from exc
        extras = {k: v for k, v in row.items() if k not in ("image", "prompt")}
        samples.append(Sample(i, path, str(row["prompt"] or ""), size, extras))
    return samples


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Decode an image, resize to cover `size` (width, height), centre-crop; float32 CHW in [-1, 1]."""
    from PIL import Image

    width, height = size
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = max(width / im.width, height / im.height)
            im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))),
                           Image.BILINEAR)
            left, top = (im.width - width) // 2, (im.height - height) // 2
            im = im.crop((left, top, left + width, top + height))
            pixels = np.asarray(im, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"image {path} cannot be decoded ({exc}); replace or remove it") from exc
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def sample_fingerprint(sample: Sample) -> str:
    """sha256 of the image bytes, the prompt and the training size: what stage 1 depends on."""
    return source_digest(sample).source.hex()


@dataclass(frozen=True)
class SourceDigest:
    """What one sample's stage-1 outputs are made from: sha256 of the image file's bytes, of the
    prompt (UTF-8), the training size, and `source` = sha256(image bytes + [prompt, size] as JSON)."""

    image: bytes
    prompt: bytes
    size: tuple[int, int]
    source: bytes


def source_digest(sample: Sample) -> SourceDigest:
    data = sample.image_path.read_bytes()
    h = hashlib.sha256(data)
    h.update(json.dumps([sample.prompt, list(sample.size)]).encode())
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
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt"])
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
