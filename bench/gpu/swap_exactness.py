"""Is block swapping lossless on the GPU? Train a Qwen-Image DiT of full width (3072, 24 heads) but
`--layers` blocks, LoRA r32, gradient checkpointing, AdamW, for `--steps` steps with every block
resident, twice (the baseline's own determinism), and with `--swap` blocks swapped (side stream,
events), then compare the LoRA weights' sha256. torch's deterministic algorithms are on and SDPA
uses its math backend: the flash backward is not deterministic run to run (two unswapped
full-size runs through `autosplit run` gave different weights), which would hide the comparison.

    python bench/gpu/swap_exactness.py --out "$OUT/swap_exactness.json"
    python bench/gpu/swap_exactness.py --timing --layers 60 --swap 47 --image_tokens 4096 --steps 6 \
        --out "$OUT/swap_timing.json"     # full size, flash attention: step time resident vs swapped
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch


def train(layers: int, swap: int, steps: int, image_tokens: int) -> dict:
    from diffusers import QwenImageTransformer2DModel

    from autosplit.adapters.qwen_image import QwenImageAdapter
    from autosplit.config import LoraConfig
    from autosplit.planning.tracer import default_dtype
    from autosplit.training.lora import make_trainable, weights_digest
    from autosplit.training.placement import WeightPlacement, place_denoiser

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(cuda), default_dtype(torch.bfloat16):
        model = QwenImageTransformer2DModel(num_layers=layers).requires_grad_(False)
    if swap:
        model = model.to("cpu")  # loaded on the host, as `autosplit run` loads a swapping denoiser
    params = make_trainable(
        model,
        "transformer",
        lora=LoraConfig(rank=32),
        adapter=QwenImageAdapter(),
        denoiser=True,
        seed=0,
        gradient_checkpointing=True,
    )
    swapper = place_denoiser(model, WeightPlacement(swap, None, ("transformer_blocks",)), device=cuda) if swap else None
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side = int(image_tokens**0.5)
    g = torch.Generator(device=cuda).manual_seed(1)
    x = torch.randn(1, side * side, 64, generator=g, device=cuda, dtype=torch.bfloat16)
    text = torch.randn(1, 141, 3584, generator=g, device=cuda, dtype=torch.bfloat16)
    target = torch.randn(1, side * side, 64, generator=g, device=cuda)
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        start = time.perf_counter()
        out = model(
            hidden_states=x,
            timestep=torch.tensor([0.5], device=cuda, dtype=torch.bfloat16),
            encoder_hidden_states=text,
            encoder_hidden_states_mask=torch.ones(1, 141, dtype=torch.long, device=cuda),
            img_shapes=[[(1, side, side)]],
            return_dict=False,
        )[0]
        loss = (out.float() - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes
        times.append(time.perf_counter() - start)
    seconds = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]  # median after the first
    digest = weights_digest({n: p for n, p in model.named_parameters() if p.requires_grad})
    result = {
        "layers": layers,
        "swapped": swap,
        "steps": steps,
        "losses": losses,
        "weights_sha256": digest,
        "s_per_step": seconds,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "copies": swapper.stats.copies if swapper else 0,
    }
    if swapper is not None:
        swapper.close()
    del model, optimizer, params
    torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--swap", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--image_tokens", type=int, default=1024)
    parser.add_argument(
        "--timing", action="store_true", help="flash attention, no determinism: time resident vs swapped"
    )
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(False)  # autosplit's default (train.cudnn_attention=false)
    if args.timing:
        runs = [train(args.layers, n, args.steps, args.image_tokens) for n in (0, args.swap)]
        result = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "runs": runs,
            "swapped_over_resident_step": runs[1]["s_per_step"] / runs[0]["s_per_step"],
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    runs = [train(args.layers, n, args.steps, args.image_tokens) for n in (0, 0, args.swap, args.layers)]
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "runs": runs,
        "baseline_deterministic": runs[0]["weights_sha256"] == runs[1]["weights_sha256"],
        "swapped_equals_resident": all(r["weights_sha256"] == runs[0]["weights_sha256"] for r in runs[2:]),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)


if __name__ == "__main__":
    main()
