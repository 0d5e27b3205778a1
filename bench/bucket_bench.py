"""Aspect-ratio buckets (issue 14), measured in one run on one generated dataset.

A folder of NUM_IMAGES noise images with random sizes (areas of 64² to 256² pixels) and aspect
ratios (log-uniform from 1:4 to 4:1), each with a .txt caption, is read at --max_pixels
MAX_PIXELS without buckets (`data.buckets = "none"`: each image scaled down and cropped to
multiples of 16) and with them (`"aspect"`, `data.bucket_step = STEP`). Reported:

- the number of shape buckets (distinct training sizes) each way;
- the fraction of samples that land in full batches of 4, by the loader's own batching
  (`epoch_batches`, mean over 3 epochs); the same two numbers for the same shapes 8x larger at
  1024² with the default `data.bucket_step = 64` (sizes only: no image is written);
- stage-2 samples/s of the tiny built-in Qwen-Image pipeline, split, with buckets, at batch 4 and
  at batch 1 (one cache, written once; the same number of samples trained each way).

    python bench/bucket_bench.py                       # ~1-2 min on 2 CPU cores
    python bench/bucket_bench.py --num_images 40 --train_samples 40   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

from autosplit import load_config, run
from autosplit.data import aspect_buckets, nearest_bucket, read_dataset, train_size
from autosplit.storage.loader import epoch_batches

MULTIPLE = 16  # Qwen-Image's pixel factor


def random_sizes(num_images: int, *, seed: int, scale: int = 1) -> list[tuple[int, int]]:
    """(width, height) of random areas ((64 scale)² .. (256 scale)²) and aspect ratios (1:4 .. 4:1)."""
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(num_images):
        area = rng.uniform((64 * scale) ** 2, (256 * scale) ** 2)
        aspect = float(np.exp(rng.uniform(np.log(1 / 4), np.log(4))))
        sizes.append((max(16, round((area * aspect) ** 0.5)), max(16, round((area / aspect) ** 0.5))))
    return sizes


def write_dataset(root: Path, *, num_images: int, seed: int) -> Path:
    """Noise images of `random_sizes`, each with a .txt caption."""
    rng = np.random.default_rng(seed + 1)
    root.mkdir(parents=True, exist_ok=True)
    for i, (width, height) in enumerate(random_sizes(num_images, seed=seed)):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(f"noise picture {i}, {width}x{height}", encoding="utf-8")
    return root


def batch_fill(sizes: list[tuple[int, int]], *, batch_size: int, epochs: int = 3) -> float:
    """The fraction of samples in full batches, as the loader forms them (mean over `epochs`)."""
    fills = []
    for epoch in range(epochs):
        batches = epoch_batches(sizes, batch_size=batch_size, seed=0, epoch=epoch)
        fills.append(sum(len(b) for b in batches if len(b) == batch_size) / len(sizes))
    return float(np.mean(fills))


def stage2_rate(data: Path, work: Path, *, batch_size: int, samples: int, step: int, max_pixels: int) -> dict:
    """Stage-2 samples/s at `batch_size` with buckets (the cache at work/cache, shared by every call)."""
    out = work / f"b{batch_size}"
    trace = out / "trace"
    os.environ["AUTOSPLIT_TRACE_SAMPLES"] = str(trace)
    config = load_config(
        toml_path=None,
        sets=["data.buckets=aspect", f"data.bucket_step={step}", f"cache.path={work / 'cache'}", "lora.rank=4"],
        flags={
            "dataset_base_path": str(data),
            "output_path": str(out),
            "batch_size": str(batch_size),
            "max_pixels": str(max_pixels),
            "max_steps": str(-(-samples // batch_size)),
            "num_epochs": "100",
        },
    )
    tick = time.perf_counter()
    result = run(config)
    wall = time.perf_counter() - tick
    del os.environ["AUTOSPLIT_TRACE_SAMPLES"]
    trained = sum(len(json.loads(line)["samples"]) for line in (trace / "rank-0.jsonl").read_text().splitlines())
    assert result.training is not None
    return {
        "batch_size": batch_size,
        "steps": result.training.steps,
        "samples": trained,
        "stage2_s": round(result.training.seconds, 2),
        "samples_per_s": round(trained / result.training.seconds, 2),
        "stage1_skipped": result.stage1_skipped,
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--max_pixels", type=int, default=128 * 128)
    parser.add_argument("--bucket_step", type=int, default=16)
    parser.add_argument("--train_samples", type=int, default=400, help="samples stage 2 trains at each batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the dataset and runs (default: a temp dir)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bucket_bench_"))
    os.environ.setdefault("AUTOSPLIT_HOME", str(work / "home"))
    data = write_dataset(work / "photos", num_images=args.num_images, seed=args.seed)
    own = [s.size for s in read_dataset(data, max_pixels=args.max_pixels, multiple=MULTIPLE)]
    buckets = aspect_buckets(max_pixels=args.max_pixels, step=args.bucket_step, max_aspect=4.0)
    bucketed = [s.size for s in read_dataset(data, max_pixels=args.max_pixels, multiple=MULTIPLE, buckets=buckets)]
    report = {
        "num_images": args.num_images,
        "max_pixels": args.max_pixels,
        "bucket_step": args.bucket_step,
        "num_buckets": {"none": len(set(own)), "aspect": len(set(bucketed)), "aspect_set": len(buckets)},
        "full_batch_fraction_b4": {
            "none": round(batch_fill(own, batch_size=4), 3),
            "aspect": round(batch_fill(bucketed, batch_size=4), 3),
        },
    }
    # the same shapes 8x larger at 1024² (sizes only, no files): what real photos do without buckets
    large = random_sizes(args.num_images, seed=args.seed, scale=8)
    own_1024 = [train_size(w, h, max_pixels=1024 * 1024, multiple=MULTIPLE) for w, h in large]
    full = aspect_buckets(max_pixels=1024 * 1024, step=64, max_aspect=4.0)
    bucketed_1024 = [nearest_bucket(w, h, full) for w, h in large]
    report["at_1024px_step_64"] = {
        "num_buckets": {"none": len(set(own_1024)), "aspect": len(set(bucketed_1024)), "aspect_set": len(full)},
        "full_batch_fraction_b4": {
            "none": round(batch_fill(own_1024, batch_size=4), 3),
            "aspect": round(batch_fill(bucketed_1024, batch_size=4), 3),
        },
    }
    rates = [
        stage2_rate(
            data, work, batch_size=b, samples=args.train_samples, step=args.bucket_step, max_pixels=args.max_pixels
        )
        for b in (1, 4)
    ]
    report["stage2"] = rates
    report["samples_per_s_b4_over_b1"] = round(rates[1]["samples_per_s"] / rates[0]["samples_per_s"], 2)
    print(json.dumps(report, indent=1))
    print(
        f"buckets: {report['num_buckets']['none']} sizes without, {report['num_buckets']['aspect']} with "
        f"(of {len(buckets)}); samples in full batches of 4: {report['full_batch_fraction_b4']['none']:.0%} -> "
        f"{report['full_batch_fraction_b4']['aspect']:.0%}; stage 2: {rates[0]['samples_per_s']} samples/s at "
        f"batch 1, {rates[1]['samples_per_s']} at batch 4 ({report['samples_per_s_b4_over_b1']}x)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
