"""The built-in default: a tiny random-init pipeline and a synthetic dataset, written on first use.

Both are deterministic (seeded) and live under $AUTOSPLIT_HOME (default ~/.cache/autosplit), so
`autosplit run` with no arguments has real files to read and nothing is downloaded. Video families
get a synthetic clip dataset; `--task direct_distill` gets a dataset the tiny pipeline generates
itself with many inference steps (see docs/direct-distill.md).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from autosplit.adapters.base import Adapter
from autosplit.config import autosplit_home
from autosplit.data import write_synthetic_dataset, write_synthetic_videos

log = logging.getLogger(__name__)

BUILTIN_VERSION = "v1"
#: the built-in direct-distillation example: the teacher's steps, the student's steps, the prompts
TEACHER_STEPS, STUDENT_STEPS = 16, 2
DISTILL_PROMPTS = ("a red circle on a blue background", "green stripes", "a yellow checkerboard", "a sunset")


def _materialize(root: Path, marker: str, write: Callable[[Path], object]) -> Path:
    if (root / marker).is_file():
        return root
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    try:
        tmp.rename(root)
        log.info("wrote %s", root)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def builtin_model_root(adapter: Adapter) -> Path:
    """The built-in tiny pipeline folder of `adapter`'s family (diffusers layout)."""
    root = autosplit_home() / "builtin" / f"{adapter.name}-tiny-{BUILTIN_VERSION}"
    return _materialize(root, "model_index.json", lambda p: adapter.write_tiny(p, seed=0))


def builtin_dataset_root(media: str = "image") -> Path:
    """The built-in synthetic dataset folder: PNG images (or frame folders) + metadata.csv."""
    if media == "video":
        root = autosplit_home() / "builtin" / f"synthetic-video-{BUILTIN_VERSION}"
        return _materialize(root, "metadata.csv", lambda p: write_synthetic_videos(p, num_samples=6, seed=0))
    root = autosplit_home() / "builtin" / f"synthetic-{BUILTIN_VERSION}"
    return _materialize(root, "metadata.csv", lambda p: write_synthetic_dataset(p, num_samples=16, seed=0))


def builtin_distill_root(adapter: Adapter, model_root: Path) -> Path:
    """The built-in direct-distillation dataset of `adapter`'s tiny pipeline (written on first use)."""
    root = autosplit_home() / "builtin" / f"distill-{adapter.name}-{BUILTIN_VERSION}"
    return _materialize(
        root, "metadata.csv", lambda p: write_distill_dataset(p, adapter=adapter, model_root=model_root)
    )


def write_distill_dataset(root: Path, *, adapter: Adapter, model_root: Path, size: int = 64) -> Path:
    """Generate a direct-distillation dataset with the pipeline's own `TEACHER_STEPS`-step inference.

    Each row: image, prompt, seed, rand_device, num_inference_steps (the student's), cfg_scale (the
    student's guidance, 1: none). Deterministic: the images depend only on the model and the seeds.
    """
    import csv

    import diffusers
    import torch

    pipe = getattr(diffusers, adapter.pipeline_class).from_pretrained(model_root)
    pipe.set_progress_bar_config(disable=True)
    root.mkdir(parents=True, exist_ok=True)
    guidance = {"guidance_scale": 1.0} if getattr(pipe.transformer.config, "guidance_embeds", False) else {}
    rows = []
    for seed, prompt in enumerate(DISTILL_PROMPTS):
        image = pipe(
            prompt,
            height=size,
            width=size,
            num_inference_steps=TEACHER_STEPS,
            output_type="pil",
            generator=torch.Generator("cpu").manual_seed(seed),
            **guidance,
        ).images[0]
        image.save(root / f"{seed:04d}.png")
        rows.append((f"{seed:04d}.png", prompt, seed, "cpu", STUDENT_STEPS, 1.0))
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt", "seed", "rand_device", "num_inference_steps", "cfg_scale"])
        writer.writerows(rows)
    return root
