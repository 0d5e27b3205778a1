"""Stage 2's training step of full-size Qwen-Image LoRA r32 at 1024^2 (issue 16): where the time
goes, and what cuDNN attention and regional compilation of the repeated blocks buy.

    python bench/gpu/step_speed.py OUT.json [--steps 6] [--small]

One process, the DiT built in memory (random init, seed 0, bf16; 4096 image tokens, 141 text
tokens), LoRA attached by autosplit's own `make_trainable` (the trainer's code: fp32 LoRA weights,
gradient checkpointing), AdamW as the trainer makes it. Variants, in this order (compilation
cannot be undone, so the eager ones come first), each from the same LoRA start and the same
inputs:

- `eager`: cuDNN attention off (the trainer's default, `train.cudnn_attention = false`);
- `eager_cudnn`: cuDNN attention on;
- `compiled`: `compile_repeated_blocks` (torch.compile of each transformer block), cuDNN off;
- `compiled_cudnn`: compiled, cuDNN on;
- `eager_nomask`, `compiled_nomask`: without the all-ones text mask, so the attention processor
  builds no attention mask and SDPA may take its flash kernel.

For each: the first step's seconds (compilation included), the median of the others, the
achieved TFLOP/s (the fake profile's 234.9 TFLOP of a step, before the recompute), the losses
(compared with `eager`'s: the largest relative difference) and whether every gradient was finite.
A torch-profiler breakdown of one eager step by kind of CUDA kernel comes first. `--small` runs a
6-block DiT on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

#: FLOPs of one full-size step (forward + backward, before the recompute) from the fake profile
#: (profiles/gpu/qwen_image-full-fake-profile.json, grad_step.flops)
STEP_FLOPS = 234.9e12


def build(device: torch.device, small: bool) -> tuple[Any, list[torch.nn.Parameter], dict[str, Any]]:
    from diffusers import QwenImageTransformer2DModel

    from autosplit.adapters.qwen_image import QwenImageAdapter
    from autosplit.config import LoraConfig
    from autosplit.planning.tracer import default_dtype
    from autosplit.training.lora import make_trainable

    small_dit = dict(
        num_layers=6, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(4, 6, 6)
    )
    torch.manual_seed(0)
    with torch.device(device), default_dtype(torch.bfloat16):
        model = QwenImageTransformer2DModel(**(small_dit if small else {})).requires_grad_(False)
    params = make_trainable(
        model,
        "transformer",
        lora=LoraConfig(rank=32),
        adapter=QwenImageAdapter(),
        denoiser=True,
        seed=0,
        gradient_checkpointing=True,
    )
    side = 8 if small else 64
    g = torch.Generator(device=device).manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 64, generator=g, device=device, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(
            1, 141, model.config.joint_attention_dim, generator=g, device=device, dtype=torch.bfloat16
        ),
        encoder_hidden_states_mask=torch.ones(1, 141, dtype=torch.long, device=device),
        timestep=torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        img_shapes=[[(1, side, side)]],
        return_dict=False,
    )
    inputs["target"] = torch.randn(1, side * side, 64, generator=g, device=device, dtype=torch.bfloat16)
    return model, params, inputs


def step(model: Any, optimizer: torch.optim.Optimizer, inputs: dict[str, Any]) -> tuple[float, bool]:
    args = {k: v for k, v in inputs.items() if k != "target"}
    out = model(**args)[0]
    loss = torch.nn.functional.mse_loss(out.float(), inputs["target"].float())
    loss.backward()
    finite = all(
        p.grad is None or bool(torch.isfinite(p.grad).all()) for g in optimizer.param_groups for p in g["params"]
    )
    optimizer.step()
    optimizer.zero_grad()
    return float(loss), finite


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(
    model: Any,
    params: list[torch.nn.Parameter],
    start: list[torch.Tensor],
    inputs: dict[str, Any],
    *,
    steps: int,
    device: torch.device,
) -> dict[str, Any]:
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    seconds, losses, finite = [], [], True
    for _ in range(steps):
        sync(device)
        tick = time.perf_counter()
        loss, ok = step(model, optimizer, inputs)
        sync(device)
        seconds.append(time.perf_counter() - tick)
        losses.append(loss)
        finite = finite and ok
    median = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return {
        "first_step_s": round(seconds[0], 3),
        "step_s_median": round(median, 4),
        "tflops": round(STEP_FLOPS / median / 1e12, 1),
        "losses": losses,
        "grads_finite": finite,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def kind_of(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90")):
        return "matmul"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    if "norm" in n:
        return "norm"
    return "elementwise/other"


def breakdown(model: Any, params: list[torch.nn.Parameter], inputs: dict[str, Any]) -> dict[str, Any]:
    """CUDA time of one eager step by kind of kernel, and of the LoRA matmuls (an input of width 32)."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step(model, optimizer, inputs)
    with profile(activities=[ProfilerActivity.CUDA], record_shapes=True) as prof:
        step(model, optimizer, inputs)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type.name != "CUDA":
            continue
        us = event.self_device_time_total
        kinds[kind_of(event.key)] = kinds.get(kind_of(event.key), 0.0) + us / 1e6
    lora = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in ("aten::mm", "aten::addmm", "aten::linear") and "32" in str(event.input_shapes):
            shapes = event.input_shapes
            if any(32 in s for s in shapes if isinstance(s, list)):
                lora += event.device_time_total / 1e6
    total = sum(kinds.values())
    return {
        "cuda_s": round(total, 4),
        "by_kind_s": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "by_kind_share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "lora_matmul_s": round(lora, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--no-breakdown", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    tick = time.perf_counter()
    model, params, inputs = build(device, args.small)
    start = [p.detach().clone() for p in params]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "build_s": round(time.perf_counter() - tick, 1),
    }
    cudnn = torch.backends.cuda.enable_cudnn_sdp
    if device.type == "cuda" and not args.no_breakdown:
        cudnn(False)
        result["breakdown_eager"] = breakdown(model, params, inputs)
        print(json.dumps({"breakdown_eager": result["breakdown_eager"]}), flush=True)
    variants: dict[str, Any] = {}
    unmasked = {**inputs, "encoder_hidden_states_mask": None}  # all ones: the processor then builds no mask
    for name, use_cudnn, compiled in (
        ("eager", False, False),
        ("eager_cudnn", True, False),
        ("eager_nomask", False, False),
        ("compiled", False, True),
        ("compiled_cudnn", True, True),
        ("compiled_nomask", False, True),
    ):
        if args.only and name not in args.only.split(","):
            continue
        if compiled and "compiled" not in result:
            tick = time.perf_counter()
            model.compile_repeated_blocks(fullgraph=False)
            result["compiled"] = True
        if device.type == "cuda":
            cudnn(use_cudnn)
            torch.cuda.reset_peak_memory_stats()
        given = unmasked if name.endswith("nomask") else inputs
        variants[name] = run_variant(model, params, start, given, steps=args.steps, device=device)
        print(json.dumps({name: variants[name]}), flush=True)
    base = variants["eager"]["losses"]
    for v in variants.values():
        v["max_rel_loss_diff_vs_eager"] = max(abs(a - b) / abs(b) for a, b in zip(v["losses"], base))
        v["speedup_vs_eager"] = round(variants["eager"]["step_s_median"] / v["step_s_median"], 3)
    result["variants"] = variants
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in variants.items()}), flush=True)


if __name__ == "__main__":
    main()
