"""Synthetic inputs of the GPU benchmarks (stage1_throughput.py, multi_gpu.py): random-init
Qwen-Image pipeline folders, and image datasets of smooth seeded waves (they PNG-decode fast),
written by a process pool, with a metadata.csv whose prompts each script chooses."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

#: what a prompt is made from: the sample's index and its waves' three frequencies
Prompt = Callable[[int, tuple[float, float, float]], str]


def write_image(args: tuple[Path, int, int]) -> tuple[str, tuple[float, float, float]]:
    """Image `i` (side x side RGB, seeded by i) as ROOT/{i:05d}.png; returns its name and waves."""
    import numpy as np
    from PIL import Image

    root, i, side = args
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:side, 0:side] / side
    a, b, c = rng.uniform(1, 12, size=3)
    channels = [np.sin(a * x + b * y + k) * np.cos(c * x * y - k) for k in range(3)]
    pixels = ((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8)
    name = f"{i:05d}.png"
    Image.fromarray(pixels).save(root / name, compress_level=1)
    return name, (float(a), float(b), float(c))


def make_dataset(root: Path, *, num_samples: int, side: int, prompt: Prompt) -> None:
    """ROOT/00000.png... and ROOT/metadata.csv (image, prompt(i, waves))."""
    import csv

    root.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        written = list(pool.map(write_image, [(root, i, side) for i in range(num_samples)]))
    rows = [(name, prompt(i, waves)) for i, (name, waves) in enumerate(written)]
    with (root / "metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("image", "prompt"), *rows])


def write_qwen_folder(root: Path, *, text_layers: int | None, dit_layers: int, device: str) -> None:
    """A random-init Qwen-Image pipeline folder (diffusers layout, bf16, seed 0): the full-size VAE,
    the full-size Qwen2.5-VL text encoder (`text_layers` of its layers; None: all) and a DiT of
    `dit_layers` blocks, built on `device` (the GPU: seconds, not minutes)."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from autosplit.adapters.qwen_image import FULL_SIZE_SCHEDULER, FULL_SIZE_TEXT_ENCODER, _tiny_tokenizer

    config = dict(FULL_SIZE_TEXT_ENCODER)
    if text_layers is not None:
        config["text_config"] = {**config["text_config"], "num_hidden_layers": text_layers}
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            pipe = QwenImagePipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(**FULL_SIZE_SCHEDULER),
                vae=AutoencoderKLQwenImage(),
                text_encoder=Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)),
                tokenizer=_tiny_tokenizer(),
                transformer=QwenImageTransformer2DModel(num_layers=dit_layers),
            )
    finally:
        torch.set_default_dtype(before)
    pipe.save_pretrained(root)
