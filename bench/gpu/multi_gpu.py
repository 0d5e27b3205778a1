"""Multi-GPU benchmark of both stages on one host with 2 GPUs (issue 6).

Measures, in one run, on a random-init Qwen-Image pipeline built from configs (nothing is
downloaded):
- stage-1 throughput (samples/s) on 2 GPUs ÷ 1 GPU (goal ≥ 1.8), from each rank's encode+write
  time (models loaded, first shard excluded as warm-up) and from the whole command's wall time;
- whether the 2-process cache is identical to the 1-process one, array by array;
- stage-2 step time and peak memory per GPU under DDP (`torch.cuda.max_memory_allocated` per rank),
  and the same on 1 GPU for comparison.

Results go to OUT/results.json (rewritten after every phase, so a timeout keeps what finished) and
each command's log to OUT/<phase>.log. `--cpu --size tiny` runs the same phases on CPU (gloo) in a
minute, as a check of the script itself. Run through bench/gpu/multi_gpu.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from synthetic import make_dataset, write_qwen_folder  # bench/gpu/, beside this script

#: name: (text-encoder layers, DiT layers, samples, image side, shard size, stage-2 steps)
SIZES = {
    "tiny": (None, None, 24, 64, 2, 4),  # the built-in tiny pipeline
    "width": (1, 1, 4, 256, 2, 2),  # full-width configs, one layer each: checks mid/full on CPU
    "mid": (14, 20, 384, 1024, 16, 20),  # ~4.3 B text encoder, ~7 B DiT, full-size VAE
    "full": (28, 60, 256, 1024, 16, 10),  # Qwen-Image's full size (7 B + 20 B)
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--work", type=Path, default=Path("/tmp/autosplit-multi-gpu"), help="scratch folder")
    p.add_argument("--size", choices=sorted(SIZES), default="mid")
    p.add_argument("--cpu", action="store_true", help="run on CPU (gloo), to check the script")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget of the whole run")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--stage2-steps", type=int, default=None)
    p.add_argument("--cache-batch-size", type=int, default=1, help="stage-1 batch (cache.batch_size)")
    p.add_argument("--make-model", type=Path, default=None, help=argparse.SUPPRESS)  # internal: subprocess
    return p.parse_args(argv)


# --- inputs: model folder and dataset ------------------------------------------------------------


def make_model(root: Path, size: str, *, cpu: bool) -> None:
    """Write a random-init Qwen-Image pipeline folder (diffusers layout) of `size` to `root`."""
    from autosplit.adapters.qwen_image import QwenImageAdapter

    text_layers, dit_layers = SIZES[size][:2]
    if text_layers is None:
        QwenImageAdapter().write_tiny(root, seed=0)
        return
    write_qwen_folder(root, text_layers=text_layers, dit_layers=dit_layers, device="cpu" if cpu else "cuda")


def _prompt(i: int, waves: tuple[float, float, float]) -> str:
    a, b, c = waves
    return f"sample {i}: waves {a:.1f} {b:.1f} {c:.1f} in red, green and blue"


# --- running commands ----------------------------------------------------------------------------


class Runner:
    """Runs phases within the budget, keeping results.json current."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.start = args, time.monotonic()
        self.results: dict = {"size": args.size, "cpu": args.cpu, "budget_s": args.budget_s, "phases": {}}
        args.out.mkdir(parents=True, exist_ok=True)

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        (self.args.out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")

    def run(self, phase: str, cmd: list[str], *, need_s: float, env: dict | None = None) -> str | None:
        """Run `cmd`, its output to OUT/<phase>.log; returns the output, or None if skipped or failed."""
        left = self.left_s()
        if left < need_s:
            print(f"[{phase}] skipped: {left:.0f} s left, needs ~{need_s:.0f} s", flush=True)
            self.results["phases"][phase] = {"status": "skipped", "left_s": round(left, 1)}
            self.save()
            return None
        print(f"[{phase}] {' '.join(cmd)}", flush=True)
        tick = time.monotonic()
        log = self.args.out / f"{phase}.log"
        try:
            proc = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, **(env or {})},
                timeout=max(left - 5, 10),
            )
            output, status = proc.stdout, "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as exc:
            output, status = (
                (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or "",
                "timeout",
            )
        wall = time.monotonic() - tick
        log.write_text(output)
        print(f"[{phase}] {status} in {wall:.1f} s ({self.left_s():.0f} s of budget left)", flush=True)
        if status != "ok":
            print("\n".join(output.splitlines()[-25:]), flush=True)
        self.results["phases"][phase] = {"status": status, "wall_s": round(wall, 2)}
        self.save()
        return output if status == "ok" else None


def stats(output: str, kind: str) -> list[dict]:
    marker = f"{kind} stats "
    found = [json.loads(line.split(marker, 1)[1]) for line in output.splitlines() if marker in line]
    return sorted(found, key=lambda s: s["rank"])


def stage1_summary(ranks: list[dict], wall_s: float) -> dict:
    samples = sum(r["samples"] for r in ranks)
    steady = sum(r["samples"] - r["first_shard_samples"] for r in ranks)
    slowest = max(r["seconds"] for r in ranks)
    slowest_steady = max(r["seconds"] - r["first_shard_seconds"] for r in ranks)
    return {
        "ranks": ranks,
        "samples": samples,
        "samples_per_s": samples / slowest,
        "steady_samples_per_s": steady / slowest_steady if slowest_steady > 0 else None,
        "command_wall_s": wall_s,
        "end_to_end_samples_per_s": samples / wall_s,
    }


def caches_identical(a: Path, b: Path) -> bool:
    import numpy as np
    import zarr

    def arrays(group, prefix=""):
        for name, arr in group.arrays():
            yield prefix + name, arr
        for name, sub in group.groups():
            yield from arrays(sub, f"{prefix}{name}/")

    ga, gb = dict(arrays(zarr.open_group(str(a), mode="r"))), dict(arrays(zarr.open_group(str(b), mode="r")))
    return sorted(ga) == sorted(gb) and all(np.array_equal(ga[n][...], gb[n][...]) for n in ga)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_model is not None:
        make_model(args.make_model, args.size, cpu=args.cpu)
        return 0
    _, _, num_samples, side, shard_size, steps = SIZES[args.size]
    num_samples, side = args.num_samples or num_samples, args.image_size or side
    steps = args.stage2_steps or steps
    r = Runner(args)
    r.results.update(
        num_samples=num_samples,
        image_size=side,
        shard_size=shard_size,
        stage2_steps=steps,
        cache_batch_size=args.cache_batch_size,
    )
    if not args.cpu:
        import torch

        r.results["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.device_count() < 2:
            raise SystemExit(f"needs 2 GPUs, found {torch.cuda.device_count()}; use --cpu to check the script")
    shutil.rmtree(args.work, ignore_errors=True)
    model, data = args.work / "model", args.work / "data"
    env = {
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        **({"CUDA_VISIBLE_DEVICES": ""} if args.cpu else {}),
    }
    me = [sys.executable, str(Path(__file__).resolve()), "--size", args.size, *(["--cpu"] if args.cpu else [])]
    if r.run("make_model", [*me, "--make-model", str(model)], need_s=30, env=env) is None:
        return 1
    tick = time.monotonic()
    make_dataset(data, num_samples=num_samples, side=side, prompt=_prompt)
    r.results["phases"]["make_dataset"] = {"status": "ok", "wall_s": round(time.monotonic() - tick, 2)}
    common = [
        "--model_paths",
        str(model),
        "--dataset_base_path",
        str(data),
        "--max_pixels",
        str(side * side),
        "--set",
        f"cache.shard_size={shard_size}",
        "--set",
        f"cache.batch_size={args.cache_batch_size}",
        *(["--device", "cpu"] if args.cpu else []),
    ]
    one = [sys.executable, "-m", "autosplit"]
    two = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "autosplit",
    ]
    caches = {n: args.work / f"cache{n}" for n in (1, 2)}
    for n, launch in ((1, one), (2, two)):
        phase = f"stage1_{n}proc"
        out = r.run(
            phase,
            [*launch, "run", "--task", "sft:data_process", "--output_path", str(caches[n]), *common],
            need_s=60,
            env=env,
        )
        if out is not None:
            r.results[phase] = stage1_summary(stats(out, "stage 1"), r.results["phases"][phase]["wall_s"])
            r.save()
    s1, s2 = r.results.get("stage1_1proc"), r.results.get("stage1_2proc")
    if s1 and s2:
        r.results["stage1_speedup_2_over_1"] = s2["samples_per_s"] / s1["samples_per_s"]
        if s1["steady_samples_per_s"] and s2["steady_samples_per_s"]:
            r.results["stage1_steady_speedup_2_over_1"] = s2["steady_samples_per_s"] / s1["steady_samples_per_s"]
        r.results["stage1_end_to_end_speedup_2_over_1"] = (
            s2["end_to_end_samples_per_s"] / s1["end_to_end_samples_per_s"]
        )
        r.results["caches_identical"] = caches_identical(caches[1], caches[2])
        r.save()
    cache = caches[2] if s2 else caches[1]
    train = [
        "run",
        "--task",
        "sft:train",
        "--dataset_base_path",
        str(cache),
        "--model_paths",
        str(model),
        "--max_steps",
        str(steps),
        "--max_pixels",
        str(side * side),
        "--num_epochs",
        "1000",
        "--lora_rank",
        "32",
        "--use_gradient_checkpointing",
        "--set",  # eager, as the step times before train.compile defaulted to auto were measured
        "train.compile=none",
        *(["--device", "cpu"] if args.cpu else []),
    ]
    for n, launch in ((2, two), (1, one)):
        phase = f"stage2_{n}proc"
        out = r.run(phase, [*launch, *train, "--output_path", str(args.work / f"train{n}")], need_s=45, env=env)
        if out is not None:
            ranks = stats(out, "stage 2")
            r.results[phase] = {"ranks": ranks, "weights_identical": len({x["weights_sha256"] for x in ranks}) == 1}
            r.save()
    r.save()
    print(json.dumps({k: v for k, v in r.results.items() if not isinstance(v, dict)}, indent=1))
    failed = [name for name, phase in r.results["phases"].items() if phase["status"] not in ("ok", "skipped")]
    if failed:
        print(f"failed phases: {failed} (their logs are in {args.out})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
