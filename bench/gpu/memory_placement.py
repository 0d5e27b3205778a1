"""Helpers of bench/gpu/memory_placement.sh: stage 2 of full-size Qwen-Image under VRAM caps, through
`autosplit run`, with block swapping planned by `--vram_budget` (issue 11; docs/memory.md).

    python bench/gpu/memory_placement.py build ROOT [--small]     # random-init model folder
    python bench/gpu/memory_placement.py dataset DIR               # synthetic 1024^2 images + captions
    python bench/gpu/memory_placement.py bandwidth OUT.json        # pinned/pageable host<->device copies
    python bench/gpu/memory_placement.py collect LOGS OUT.json     # one row per run: measured vs predicted

The folder holds the full-size DiT (QwenImageTransformer2DModel(), 20.4 B parameters) and VAE,
built on the GPU in bf16 and saved with save_pretrained. Its text encoder has the full
Qwen2.5-VL-7B width and vocabulary but 2 of its 28 layers (and 1 of 32 vision layers): it runs in
stage 1 only, where it writes prompt embeddings of the full shape ([tokens, 3584]); stage 2, which
is what this measures, reads only the cache and is the same as with the full encoder (the plan's
stage-1 numbers are of this encoder). The tokenizer and scheduler are the built-in tiny
pipeline's (ids < 300, valid for the full vocabulary). `--small` writes a CPU-sized folder of the
same layout, for a smoke test of the script here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

GIB = 1 << 30


def build(root: Path, *, small: bool) -> None:
    """Write the model folder to `root` (see the module docstring)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from autosplit.adapters.builtin import builtin_model_root
    from autosplit.adapters.qwen_image import FULL_SIZE_TEXT_ENCODER, QwenImageAdapter
    from autosplit.planning.tracer import default_dtype

    tiny = builtin_model_root(QwenImageAdapter())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name in ("tokenizer", "scheduler", "model_index.json"):
        (shutil.copytree if (tiny / name).is_dir() else shutil.copy)(tiny / name, root / name)
    device = torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    text = json.loads(json.dumps(FULL_SIZE_TEXT_ENCODER))
    text["text_config"]["num_hidden_layers"] = 2
    text["vision_config"].update(depth=1, fullatt_block_indexes=[0])
    dit: dict[str, Any] = {}
    if small:
        text["text_config"].update(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        )
        text["vision_config"].update(hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64)
        dit = dict(
            num_layers=6, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(4, 6, 6)
        )
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device), default_dtype(torch.bfloat16):
        models = {
            "transformer": QwenImageTransformer2DModel(**dit),
            "vae": AutoencoderKLQwenImage(**({"base_dim": 16} if small else {})),
            "text_encoder": Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**text)),
        }
    built = time.perf_counter() - start
    for name, model in models.items():
        model.save_pretrained(root / name, max_shard_size="10GB")
        del model
    models.clear()
    print(
        json.dumps(
            {
                "built_s": round(built, 1),
                "saved_s": round(time.perf_counter() - start - built, 1),
                "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
            }
        ),
        flush=True,
    )


def dataset(folder: Path, *, num: int, size: int, tokens: int) -> None:
    """`num` synthetic images of `size`^2 with a caption of about `tokens` tokens (tiny tokenizer)."""
    import csv

    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    from autosplit.adapters.builtin import builtin_model_root
    from autosplit.adapters.qwen_image import QwenImageAdapter
    from autosplit.workflow.profiling import prompt_with_tokens

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_root(QwenImageAdapter()) / "tokenizer")
    caption = prompt_with_tokens(tokenizer, tokens)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt"])
        for i in range(num):
            pixels = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}.png")
            writer.writerow([f"{i:03d}.png", caption])


def bandwidth(out: Path) -> None:
    """Host -> device and device -> host copies of 2 GiB, pinned (cudaHostRegister'ed, as the swapper
    uses) and pageable: GB/s, median of 5 after a warm-up."""
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bytes": 2 * GIB}
    device = torch.cuda.current_device()
    gpu = torch.empty(2 * GIB, dtype=torch.uint8, device=device)
    for kind in ("pinned", "pageable"):
        host = torch.empty(2 * GIB, dtype=torch.uint8)
        host.fill_(1)
        if kind == "pinned":
            assert int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 0)) == 0
        for direction in ("h2d", "d2h"):
            times = []
            for _ in range(6):
                torch.cuda.synchronize()
                start = time.perf_counter()
                (gpu.copy_(host, non_blocking=True) if direction == "h2d" else host.copy_(gpu, non_blocking=True))
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            result[f"{kind}_{direction}_gbps"] = round(2 * GIB / sorted(times[1:])[2] / 1e9, 2)
        if kind == "pinned":
            torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)


def fp8_difference(root: Path | None, out: Path) -> None:
    """The DiT's output with its blocks' frozen Linear weights in fp8 against bf16, on one random
    1024^2 batch (4096 image tokens, 141 text tokens): relative L2 difference, and of the weights.
    `root` None: the full-size DiT built in memory (random init, seed 0), no folder needed."""
    from diffusers import QwenImageTransformer2DModel

    from autosplit.planning.tracer import default_dtype
    from autosplit.training.precision import frozen_linears, quantize, store_fp8, upcast

    cuda = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if root is None:
        with torch.device(cuda), default_dtype(torch.bfloat16):
            model = QwenImageTransformer2DModel()
    else:
        model = QwenImageTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.bfloat16).to(cuda)
    model = model.requires_grad_(False).eval()
    side = 64 if cuda.type == "cuda" else 8
    g = torch.Generator(device=cuda).manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 64, generator=g, device=cuda, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(
            1, 141, model.config.joint_attention_dim, generator=g, device=cuda, dtype=torch.bfloat16
        ),
        encoder_hidden_states_mask=torch.ones(1, 141, dtype=torch.long, device=cuda),
        timestep=torch.tensor([0.5], device=cuda, dtype=torch.bfloat16),
        img_shapes=[[(1, side, side)]],
        return_dict=False,
    )
    with torch.no_grad():
        reference = model(**inputs)[0].float()
        error = norm = 0.0
        for block in model.transformer_blocks:
            for layer in frozen_linears(block):  # one layer's float32 copy at a time
                w = layer.weight.float()
                error += float((upcast(*quantize(w), torch.float32) - w).norm() ** 2)
                norm += float(w.norm() ** 2)
            store_fp8(block, work=cuda, keep_on=cuda)
        fp8 = model(**inputs)[0].float()
    result = {
        "device": torch.cuda.get_device_name() if cuda.type == "cuda" else "cpu",
        "tokens": side * side,
        "output_relative_l2": float((fp8 - reference).norm() / reference.norm()),
        "output_max_abs_diff": float((fp8 - reference).abs().max()),
        "output_reference_max_abs": float(reference.abs().max()),
        "weights_relative_l2": (error / norm) ** 0.5,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)


def collect(logs: Path, out: Path, *, base_name: str | None = None) -> None:
    """One row per run log `LOGS/<name>.log` (its output folder `LOGS/<name>/` holds plan.json);
    step times and weights compared with the run `base_name` (default: the first whose name starts
    with 0)."""
    rows = []
    for log in sorted(logs.glob("*.log")):
        text = log.read_text(errors="replace")
        stats = [
            json.loads(line.split("stage 2 stats ", 1)[1]) for line in text.splitlines() if "stage 2 stats " in line
        ]
        errors = [line for line in text.splitlines() if line.startswith("autosplit: error:")]
        plan_path = logs / log.stem / "plan.json"
        placed = json.loads(plan_path.read_text())["predicted"].get("placement", {}) if plan_path.is_file() else {}
        row: dict[str, Any] = {"run": log.stem, "error": errors[0] if errors else None}
        train_log = logs / log.stem / "train_log.jsonl"
        if train_log.is_file():
            row["losses"] = [json.loads(line)["loss"] for line in train_log.read_text().splitlines()]
        if placed:
            row.update(
                {
                    f"predicted_{k}": placed.get(k)
                    for k in (
                        "blocks_to_swap",
                        "base_precision",
                        "judged_peak_bytes",
                        "host_pinned_bytes",
                        "host_peak_bytes",
                        "step_s",
                        "resident_step_s",
                        "fits",
                        "reason",
                    )
                }
            )
        if stats:
            s = stats[-1]
            row.update(
                {
                    k: s.get(k)
                    for k in (
                        "steps",
                        "step_s_median",
                        "step_s_mean_after_first",
                        "weights_sha256",
                        "peak_allocated_bytes",
                        "peak_reserved_bytes",
                        "alloc_retries",
                        "host_peak_rss_bytes",
                        "swap",
                    )
                }
            )
            if placed.get("judged_peak_bytes") and s.get("peak_allocated_bytes"):
                row["predicted_over_measured_peak"] = round(placed["judged_peak_bytes"] / s["peak_allocated_bytes"], 4)
        rows.append(row)
    base = next(
        (
            r
            for r in rows
            if (r["run"] == base_name if base_name else r["run"].startswith("0")) and r.get("step_s_median")
        ),
        None,
    )
    for r in rows:
        if base and r.get("step_s_median"):
            r["step_over_uncapped"] = round(r["step_s_median"] / base["step_s_median"], 3)
            r["weights_equal_uncapped"] = r.get("weights_sha256") == base.get("weights_sha256")
    out.write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__,
                "runs": rows,
            },
            indent=1,
        )
        + "\n"
    )
    for r in rows:
        gib = {
            k: round(r[k] / GIB, 2)
            for k in ("peak_allocated_bytes", "peak_reserved_bytes", "predicted_judged_peak_bytes")
            if r.get(k)
        }
        print(
            r["run"],
            r.get("predicted_blocks_to_swap"),
            gib,
            r.get("step_s_median"),
            r.get("step_over_uncapped"),
            r.get("predicted_over_measured_peak"),
            r.get("weights_equal_uncapped"),
            r.get("error"),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("build")
    p.add_argument("root", type=Path)
    p.add_argument("--small", action="store_true")
    p = sub.add_parser("dataset")
    p.add_argument("folder", type=Path)
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=128)
    p = sub.add_parser("bandwidth")
    p.add_argument("out", type=Path)
    p = sub.add_parser("collect")
    p.add_argument("logs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--base", default=None, help="the run the others are compared with")
    p = sub.add_parser("fp8diff")
    p.add_argument("root", type=Path, help="a model folder, or - for the full-size DiT built in memory")
    p.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.verb == "build":
        build(args.root, small=args.small)
    elif args.verb == "dataset":
        dataset(args.folder, num=args.num, size=args.size, tokens=args.tokens)
    elif args.verb == "bandwidth":
        bandwidth(args.out)
    elif args.verb == "fp8diff":
        fp8_difference(None if str(args.root) == "-" else args.root, args.out)
    else:
        collect(args.logs, args.out, base_name=args.base)


if __name__ == "__main__":
    main()
