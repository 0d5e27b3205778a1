"""Stage 2's training step of a full-size denoiser with LoRA r32 at 1024^2 (issue 16): where the
time goes, and what cuDNN attention, dropping an all-ones text mask and regional compilation of the
repeated blocks buy.

    python bench/gpu/step_speed.py OUT.json [--family qwen_image|flux] [--steps 6] [--small]

One process, the denoiser built in memory (random init, seed 0, bf16; 4096 image tokens; Qwen-Image
with 141 text tokens, FLUX.1-dev with T5's 512 and guidance), LoRA attached by autosplit's own
`make_trainable` (the trainer's code: fp32 LoRA weights on the family's default modules, gradient
checkpointing), AdamW as the trainer makes it. Variants, in this order (compilation cannot be
undone, so the eager ones come first), each from the same LoRA start and the same inputs:

- `eager`: cuDNN attention off (`train.cudnn_attention = false`, the default), the text
  mask passed as diffusers' pipeline passes it (all ones: Qwen-Image's processor then builds a
  joint boolean mask, and SDPA cannot take its flash kernel);
- `eager_cudnn`: cuDNN attention on;
- `eager_nomask`, `eager_nomask_cudnn`: without the all-ones mask (what autosplit's Qwen-Image
  adapter passes since issue 16), flash or cuDNN attention;
- `compiled*`: the same after `compile_repeated_blocks` (torch.compile of each transformer block).
  Dynamo does not guard on the SDPA backend flags (the backend is fixed when a graph is traced),
  so a compiled variant whose cuDNN setting differs from the last one's compiles again
  (`torch._dynamo.reset()`); its first step includes that.

FLUX has no text mask, so its `*nomask*` variants are left out. For each: the first step's seconds
(compilation included), the median of the others, the achieved TFLOP/s (the step's FLOPs counted by
torch's FlopCounterMode over one forward, times 3 for forward + backward, before the recompute), the
losses (compared with `eager`'s: the largest relative difference) and whether every gradient was
finite. A torch-profiler breakdown of one eager step by kind of CUDA kernel comes first (and one of
`eager_nomask` for Qwen-Image), with the CUDA time of the LoRA matmuls (a rank-32 operand).
`--small` runs a 6-block DiT on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

SMALL_QWEN = dict(
    num_layers=6, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(4, 6, 6)
)
SMALL_FLUX = dict(
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=[4, 6, 6],
)


def build(device: torch.device, small: bool, family: str) -> tuple[Any, list[torch.nn.Parameter], dict[str, Any]]:
    from autosplit.config import LoraConfig
    from autosplit.planning.tracer import default_dtype
    from autosplit.training.lora import make_trainable

    bf16 = dict(device=device, dtype=torch.bfloat16)
    side = 8 if small else 64  # 2x2-packed latent side: 4096 image tokens at 1024^2
    torch.manual_seed(0)
    if family == "flux":
        from diffusers import FluxTransformer2DModel

        from autosplit.adapters.flux import FULL_SIZE_TRANSFORMER, T5_TOKENS, FluxAdapter, image_ids

        adapter: Any = FluxAdapter()
        with torch.device(device), default_dtype(torch.bfloat16):
            model = FluxTransformer2DModel(**(SMALL_FLUX if small else FULL_SIZE_TRANSFORMER)).requires_grad_(False)
        text_tokens = 16 if small else T5_TOKENS
    else:
        from diffusers import QwenImageTransformer2DModel

        from autosplit.adapters.qwen_image import QwenImageAdapter

        adapter = QwenImageAdapter()
        with torch.device(device), default_dtype(torch.bfloat16):
            model = QwenImageTransformer2DModel(**(SMALL_QWEN if small else {})).requires_grad_(False)
        text_tokens = 141
    params = make_trainable(
        model,
        "transformer",
        lora=LoraConfig(rank=32),
        adapter=adapter,
        denoiser=True,
        seed=0,
        gradient_checkpointing=True,
    )
    g = torch.Generator(device=device).manual_seed(0)
    cfg = model.config
    text = torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g, **bf16)
    inputs: dict[str, Any] = dict(
        hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=g, **bf16),
        encoder_hidden_states=text,
        timestep=torch.tensor([0.5], **bf16),
        return_dict=False,
    )
    if family == "flux":
        inputs.update(
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g, **bf16),
            guidance=torch.full((1,), 3.5, device=device),
            txt_ids=torch.zeros(text_tokens, 3, **bf16),
            img_ids=image_ids(side, side, device, torch.bfloat16),
        )
    else:
        inputs.update(
            encoder_hidden_states_mask=torch.ones(1, text_tokens, dtype=torch.long, device=device),
            img_shapes=[[(1, side, side)]],
        )
    inputs["target"] = torch.randn(1, side * side, cfg.in_channels, generator=g, **bf16)
    return model, params, inputs


def step_flops(model: Any, inputs: dict[str, Any]) -> float:
    """FLOPs of one training step before the recompute: 3x one forward's (the backward is two
    matmuls for each of the forward's), as the fake profile counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    args = {k: v for k, v in inputs.items() if k != "target"}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**args)
    return 3.0 * counter.get_total_flops()


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
    flops: float,
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
        "tflops": round(flops / median / 1e12, 1),
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
    """CUDA time of one eager step by kind of kernel, and of the LoRA matmuls (the aten mm/addmm
    calls with a rank-32 operand, forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step(model, optimizer, inputs)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step(model, optimizer, inputs)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type.name != "CUDA":
            continue
        kinds[kind_of(event.key)] = kinds.get(kind_of(event.key), 0.0) + event.self_device_time_total / 1e6
    lora = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in ("aten::mm", "aten::addmm"):
            if any(isinstance(s, list) and 32 in s for s in event.input_shapes):
                lora += event.device_time_total / 1e6
    total = sum(kinds.values())
    return {
        "cuda_s": round(total, 4),
        "by_kind_s": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "by_kind_share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "lora_matmul_s": round(lora, 4),
        "lora_matmul_share": round(lora / total, 3),
    }


VARIANTS = (  # name, cuDNN attention, compiled, without the all-ones text mask
    ("eager", False, False, False),
    ("eager_cudnn", True, False, False),
    ("eager_nomask", False, False, True),
    ("eager_nomask_cudnn", True, False, True),
    ("compiled", False, True, False),
    ("compiled_cudnn", True, True, False),
    ("compiled_nomask", False, True, True),
    ("compiled_nomask_cudnn", True, True, True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=("qwen_image", "flux"), default="qwen_image")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--no-breakdown", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    tick = time.perf_counter()
    model, params, inputs = build(device, args.small, args.family)
    start = [p.detach().clone() for p in params]
    flops = step_flops(model, inputs)
    masked = "encoder_hidden_states_mask" in inputs
    unmasked = {**inputs, "encoder_hidden_states_mask": None} if masked else inputs
    result: dict[str, Any] = {
        "family": args.family,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "build_s": round(time.perf_counter() - tick, 1),
        "step_tflop": round(flops / 1e12, 1),
    }
    cudnn = torch.backends.cuda.enable_cudnn_sdp
    if device.type == "cuda" and not args.no_breakdown:
        cudnn(False)
        result["breakdown_eager"] = breakdown(model, params, inputs)
        print(json.dumps({"breakdown_eager": result["breakdown_eager"]}), flush=True)
        if masked:
            result["breakdown_eager_nomask"] = breakdown(model, params, unmasked)
            print(json.dumps({"breakdown_eager_nomask": result["breakdown_eager_nomask"]}), flush=True)
    variants: dict[str, Any] = {}
    traced_with: bool | None = None  # the cuDNN setting the compiled graphs were traced with
    for name, use_cudnn, compiled, nomask in VARIANTS:
        if (args.only and name not in args.only.split(",")) or (nomask and not masked):
            continue
        if compiled and "compiled" not in result:
            model.compile_repeated_blocks(fullgraph=False)
            result["compiled"] = True
        if compiled and traced_with is not None and traced_with != use_cudnn:
            torch._dynamo.reset()  # trace again: the graphs hold the backend chosen when traced
        if compiled:
            traced_with = use_cudnn
        if device.type == "cuda":
            cudnn(use_cudnn)
            torch.cuda.reset_peak_memory_stats()
        given = unmasked if nomask else inputs
        variants[name] = run_variant(model, params, start, given, steps=args.steps, device=device, flops=flops)
        print(json.dumps({name: variants[name]}), flush=True)
    base = variants[next(iter(variants))]
    for v in variants.values():
        v["max_rel_loss_diff_vs_first"] = max(abs(a - b) / abs(b) for a, b in zip(v["losses"], base["losses"]))
        v["speedup_vs_first"] = round(base["step_s_median"] / v["step_s_median"], 3)
    result["variants"] = variants
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in variants.items()}), flush=True)


if __name__ == "__main__":
    main()
