"""Stage 1 at GPU speed (issue 15), measured in one process on one GPU.

For each model: `run_stage1` (the pipeline `autosplit run --task sft:data_process` runs, models
loaded once and kept) at `cache.batch_size` 1, 4 and 8 into a fresh cache each, its samples/s
(whole run and after the first shard) and its per-phase breakdown (the "stage 1 stats" line); then
the encode-only time of the same batches on device-resident inputs (the stage-1 units after
decoding, run back to back on images and sources already on the GPU, synchronized per batch):
the limit that stage 1 approaches when decoding, copies and writes are hidden.

Models, random init, written to WORK (default /dev/shm) by this script:
- qwen: Qwen-Image with its full-size stage-1 components (Qwen2.5-VL-7B text encoder,
  AutoencoderKLQwenImage) and a 1-layer DiT (stage 1 never runs the DiT); 1024² images;
- sd: Stable Diffusion 1.5 at full size (CLIP ViT-L text encoder, the SD VAE, the UNet); 512².
Data: N smooth synthetic PNGs with ~100-word captions. `--tiny` runs the same on the built-in
tiny pipelines at 64² (a check of the script on a CPU).

    python bench/gpu/stage1_throughput.py --out "$OUT"                 # H200: ~5-7 min
    python bench/gpu/stage1_throughput.py --tiny --num-images 24 --out /tmp/s1   # CPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from synthetic import make_dataset, write_qwen_folder  # bench/gpu/, beside this script

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "a quiet harbour at dawn with fishing boats painted red and blue, gulls over the water, rope coiled "
    "on a wooden pier, mist on the hills behind the town, soft light on the roofs, a lighthouse at the "
    "end of the breakwater, nets drying on a rail, a cat asleep on a crate, reflections of masts in calm "
    "water, a bicycle leaning on a lamp post, flower boxes under the windows, and a church tower"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--work", type=Path, default=Path("/dev/shm/autosplit-stage1"))
    p.add_argument("--models", default="qwen,sd", help="which models, in order: qwen, sd")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--limit-samples", type=int, default=64, help="samples per batch size in the encode-only timing")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what would not fit in this wall time")
    p.add_argument("--tiny", action="store_true", help="the built-in tiny pipelines at 64², on any device")
    return p.parse_args(argv)


# --- inputs -------------------------------------------------------------------------------------


def make_qwen(root: Path, *, tiny: bool) -> None:
    from autosplit.adapters.qwen_image import QwenImageAdapter

    if tiny:
        QwenImageAdapter().write_tiny(root, seed=0)
        return
    write_qwen_folder(root, text_layers=None, dit_layers=1, device="cuda")


def make_sd(root: Path, *, tiny: bool) -> None:
    import torch

    from autosplit.adapters import full_size
    from autosplit.adapters import tiny as tiny_parts
    from autosplit.adapters.sd import SD15_COMPONENTS, SD15_SCHEDULER, StableDiffusionAdapter

    if tiny:
        StableDiffusionAdapter().write_tiny(root, seed=0)
        return
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        parts = {name: full_size.build(SD15_COMPONENTS, "sd", name) for name in ("unet", "vae", "text_encoder")}
    StableDiffusionPipeline(
        **parts,
        tokenizer=tiny_parts.clip_tokenizer(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(root)
    torch.set_default_dtype(torch.float32)


def _prompt(i: int, _waves: tuple[float, float, float]) -> str:
    """A long prompt (100 words), so text encoding costs what a real caption's does."""
    return f"sample {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(100))


# --- measuring ----------------------------------------------------------------------------------


class _Stats(logging.Handler):
    """Keeps the "stage 1 stats" lines the stage logs."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("stage 1 stats "):
            self.found.append(json.loads(text.removeprefix("stage 1 stats ")))


def open_job(model: Path, data: Path, out: Path, *, side: int, pipeline: str):
    """The Stage1Job of `autosplit run --task sft:data_process` on `model` and `data`, its models
    loaded once (kept for every run), and the session."""
    from autosplit.config import load_config
    from autosplit.training.placement import BuiltComponents
    from autosplit.workflow.profiling import plan_run
    from autosplit.workflow.session import open_session

    flags = {
        "task": "sft:data_process",
        "pipeline": pipeline,
        "model_paths": str(model),
        "dataset_base_path": str(data),
        "output_path": str(out),
        "max_pixels": str(side * side),
    }
    config = load_config(toml_path=None, sets=[], flags=flags)
    session = open_session(config)
    plan = plan_run(session)
    job = session.stage1_job(plan, session.samples())
    m = job.models
    built = BuiltComponents(m.adapter, m.root, m.device, m.dtype, modules=m.load(plan.components(1)))
    return dataclasses.replace(job, models=built), session


def stage1_rate(job, cache: Path, batch_size: int) -> dict:
    """One `run_stage1` into a fresh `cache` at `batch_size`: its stats line and wall time."""
    from autosplit.training.stage1 import run_stage1

    shutil.rmtree(cache, ignore_errors=True)
    handler = _Stats()
    logging.getLogger("autosplit").addHandler(handler)
    try:
        tick = time.perf_counter()
        run_stage1(dataclasses.replace(job, cache=dataclasses.replace(job.cache, batch_size=batch_size)), cache)
        wall = time.perf_counter() - tick
    finally:
        logging.getLogger("autosplit").removeHandler(handler)
    (stats,) = handler.found
    steady = stats["seconds"] - stats["first_shard_seconds"] if stats["samples"] > stats["first_shard_samples"] else 0
    shutil.rmtree(cache, ignore_errors=True)
    return {
        **stats,
        "wall_s": round(wall, 2),
        "samples_per_s": round(stats["samples"] / stats["seconds"], 2),
        "steady_samples_per_s": round((stats["samples"] - stats["first_shard_samples"]) / steady, 2)
        if steady > 0
        else None,
    }


def encode_only(job, session, batch_size: int, num: int) -> dict:
    """Seconds per sample of the stage-1 units after decoding, on device-resident inputs, at
    `batch_size` (one warm-up batch, then `num` samples, synchronized after each batch)."""
    import torch

    from autosplit.graph import run_units
    from autosplit.training.stage1 import stage_context
    from autosplit.training.stage1_pipeline import combine, split_host_units

    units, ctx = stage_context(job.plan, job.graph, models=job.models, unit_settings=job.unit_settings)
    host, rest = split_host_units(units, job.samples[0].sources())
    device = job.models.device
    take = [job.samples[i % len(job.samples)] for i in range(num + batch_size)]
    with torch.no_grad():
        decoded = [run_units(host, s.sources(), ctx) for s in take]
        resident = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()} for d in decoded]
        batches = [combine(resident[i : i + batch_size]) for i in range(0, len(resident), batch_size)]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        run_units(rest, batches[0], ctx)
        sync()
        tick = time.perf_counter()
        for batch in batches[1:]:
            run_units(rest, batch, ctx)
            sync()
        seconds = time.perf_counter() - tick
    n = batch_size * (len(batches) - 1)
    return {"samples": n, "seconds": round(seconds, 3), "samples_per_s": round(n / seconds, 2)}


def measure(name: str, args: argparse.Namespace, results: dict, save, start: float) -> None:
    import torch

    side = 64 if args.tiny else {"qwen": 1024, "sd": 512}[name]
    root, data = args.work / f"{name}-model", args.work / f"{name}-data-{side}"
    mine = results.setdefault(name, {"image_side": side, "num_images": args.num_images})
    tick = time.perf_counter()
    (make_qwen if name == "qwen" else make_sd)(root, tiny=args.tiny)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    make_dataset(data, num_samples=args.num_images, side=side, prompt=_prompt)
    pipeline = {"qwen": "qwen_image", "sd": "sd"}[name]
    job, session = open_job(root, data, args.work / f"{name}-cache", side=side, pipeline=pipeline)
    mine["setup_s"] = round(time.perf_counter() - tick, 1)
    mine["device"] = torch.cuda.get_device_name() if job.models.device.type == "cuda" else "cpu"
    save()
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            mine[f"batch_{bs}"] = {"skipped": f"{left:.0f} s of budget left"}
            continue
        run = stage1_rate(job, args.work / f"{name}-cache", bs)
        run["encode_only"] = encode_only(job, session, bs, args.limit_samples)
        rate = run["steady_samples_per_s"] or run["samples_per_s"]  # after the first shard (the warm-up)
        run["of_limit"] = round(rate / run["encode_only"]["samples_per_s"], 3)
        mine[f"batch_{bs}"] = run
        print(f"[{name}] batch {bs}: {json.dumps(run)}", flush=True)
        save()
    del job, session
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    os.environ.setdefault("AUTOSPLIT_HOME", str(args.work / "home"))
    results: dict = {"tiny": args.tiny, "batch_sizes": args.batch_sizes}

    def save() -> None:
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        (args.out / "stage1_throughput.json").write_text(json.dumps(results, indent=1) + "\n")

    failed = False
    for name in args.models.split(","):
        if args.budget_s - (time.perf_counter() - start) < 60:
            results[name] = {"skipped": "out of budget"}
            continue
        try:
            measure(name, args, results, save, start)
        except Exception as exc:  # keep what the other model measured
            failed = True
            results.setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            logging.exception("%s failed", name)
        save()
    shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
