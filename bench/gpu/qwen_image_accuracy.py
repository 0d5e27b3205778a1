"""How well does a fake-tensor plan predict GPU memory? Full-size Qwen-Image LoRA training.

Plans full-size Qwen-Image (random weights, LoRA r32 on the seed's 12 modules, gradient
checkpointing, bf16, one 1024x1024 image, ~128 prompt tokens) from a fake-tensor profile on the
CPU, then builds the same models on the GPU and measures `torch.cuda.max_memory_allocated` over
training steps (forward, backward, AdamW step) of

- unsplit training: text encoder, VAE and DiT resident, every unit every step;
- stage 2: the DiT alone, fed the values stage 1 computed.

It also writes the real-CUDA profile of every unit. Results go to $OUT (or --out):
accuracy.json, fake_profile.json, cuda_profile.json, plan.json.

With --fused, image encoding draws a fresh posterior sample in the same unit (VAE encode +
sample, as one function), which the planner splits inside (autosplit.planning.fission): it measures stage 2
of that split plan (VAE freed, the sampling replayed) and stage 2 with the unit kept whole (VAE
resident, as an unsplit placement of it would need), each against its prediction. Results go to
fused_accuracy.json.

    python bench/gpu/qwen_image_accuracy.py --out "$OUT"              # GPU host, ~5 min
    python bench/gpu/qwen_image_accuracy.py --tiny --device cpu --out /tmp/acc   # smoke test here
    python bench/gpu/qwen_image_accuracy.py --fused --out "$OUT"      # the split-inside unit
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from autosplit.adapters.components import load_components
from autosplit.adapters.qwen_image import encode_image_dist
from autosplit.config import load_config
from autosplit.graph import Unit, UnitContext, UnitGraph, run_units
from autosplit.planning.planner import make_plan
from autosplit.planning.stages import stage_units
from autosplit.planning.tracer import default_dtype, profile_graph
from autosplit.tasks import sample_latents
from autosplit.training.lora import make_trainable
from autosplit.training.rng import step_generator
from autosplit.workflow.profiling import profile_batch, profile_fake, prompt_with_tokens
from autosplit.workflow.session import Session, open_session

GIB = 1 << 30


def session_for(device: str, tiny: bool) -> Session:
    sets = ["model.dtype=bfloat16", "train.gradient_checkpointing=true", f"model.device={device}", "plan.profile=none"]
    return open_session(load_config(toml_path=None, sets=sets, flags={}))


def fused_session(session: Session) -> Session:
    """The session with `encode_image` replaced by one unit that encodes and samples the posterior."""

    def encode_and_sample(values: dict[str, Any], ctx: UnitContext) -> dict[str, Any]:
        return sample_latents(encode_image_dist(values, ctx), ctx)

    units = [
        Unit(u.name, u.inputs, u.outputs, encode_and_sample, u.components) if u.name == "encode_image" else u
        for u in session.graph
    ]
    return dataclasses.replace(session, graph=UnitGraph(units, sources=session.graph.sources))


def build_models(session: Session, root: Path | None, device: torch.device) -> dict[str, Any]:
    """Random-init components on the device, in bf16, from configs (full size when root is None)."""
    adapter = session.adapter
    components = load_components(
        adapter, session.model_root, ["tokenizer", "scheduler"], device=device, dtype=session.dtype
    )
    with torch.device(device), default_dtype(torch.bfloat16):
        for name in ("text_encoder", "vae", "transformer"):
            components[name] = adapter.component_from_config(root, name).requires_grad_(False).eval()
    return components


def peak_of_steps(
    units: list,
    batch: dict[str, Any],
    ctx: UnitContext,
    optimizer: torch.optim.Optimizer,
    stage1: list,
    device: torch.device,
    steps: int,
) -> dict[str, float]:
    """Run `steps` training steps after one warm-up step; peak allocated/reserved bytes and seconds."""
    cuda = device.type == "cuda"

    def step(i: int) -> None:
        values = dict(batch)
        if stage1:
            with torch.no_grad():
                values = run_units(stage1, values, ctx)
        ctx.generator = step_generator(0, i)
        loss = run_units(units, values, ctx)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    if not cuda:
        return {"seconds_per_step": seconds}
    stats = torch.cuda.memory_stats(device)
    return {
        "allocated_peak_bytes": torch.cuda.max_memory_allocated(device),
        "reserved_peak_bytes": stats["reserved_bytes.all.peak"],
        "seconds_per_step": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "accuracy_out")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny built-in configs (a smoke test)")
    parser.add_argument("--image", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fused", action="store_true", help="encode + posterior sample in one unit, split inside")
    args = parser.parse_args()
    if args.fused:
        return fused_main(args)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    session = session_for(args.device, args.tiny)
    root = session.model_root if args.tiny else None
    size = (args.image, args.image)

    # 1. the prediction: fake tensors on the CPU, no weights
    start = time.perf_counter()
    fake = profile_fake(session, full_size=not args.tiny, image_size=size, prompt_tokens=args.tokens)
    fake_seconds = time.perf_counter() - start
    plan = make_plan(
        session.graph,
        pipeline="qwen_image",
        task="sft",
        trainable=session.trainable,
        layouts=session.adapter.value_layouts(),
        profile=fake,
        settings=session.config.to_dict(),
    )
    (args.out / "fake_profile.json").write_text(json.dumps(fake.to_dict(), indent=1))
    (args.out / "plan.json").write_text(plan.to_json())
    print("predicted", {k: v / GIB for k, v in plan.predicted.items() if k.endswith("bytes")}, flush=True)

    # 2. the same models on the device
    start = time.perf_counter()
    components = build_models(session, root, device)
    params = make_trainable(
        components["transformer"],
        "transformer",
        lora=session.config.lora,
        adapter=session.adapter,
        denoiser=True,
        seed=0,
        gradient_checkpointing=session.config.train.gradient_checkpointing,
    )
    build_seconds = time.perf_counter() - start
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ctx = UnitContext(components, device, torch.bfloat16, generator=step_generator(0, 0), settings=session.settings)
    prompt = prompt_with_tokens(components["tokenizer"], args.tokens)
    sources = profile_batch(session, image_size=size, prompt=prompt, workdir=args.out)
    stage1 = [session.graph[n] for n in plan.stage_units(1)]
    stage2 = [session.graph[n] for n in plan.stage_units(2)]

    # 3. the real CUDA profile of every unit (allocator statistics)
    cuda_profile = profile_graph(session.graph, sources, ctx, pipeline="qwen_image", task="sft")
    (args.out / "cuda_profile.json").write_text(json.dumps(cuda_profile.to_dict(), indent=1))
    optimizer.zero_grad(set_to_none=True)

    # 4. unsplit: everything resident, stage-1 units inline every step
    unsplit = peak_of_steps(stage2, sources, ctx, optimizer, stage1, device, args.steps)
    print("unsplit", unsplit, flush=True)

    # 5. stage 2: stage-1 values computed once, text encoder and VAE freed
    with torch.no_grad():
        values = run_units(stage1, sources, ctx)
    cached = {v.name: values[v.name].detach() for v in plan.cached}
    batch = {**{k: v for k, v in sources.items()}, **cached}
    for name in ("text_encoder", "vae"):
        del components[name]
    del values, cuda_profile
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ctx = dataclasses.replace(ctx, components=components)
    split = peak_of_steps(stage2, batch, ctx, optimizer, [], device, args.steps)
    print("stage 2", split, flush=True)

    predicted = plan.predicted
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "image": size,
        "prompt_tokens": args.tokens,
        "fake_profile_seconds": fake_seconds,
        "build_seconds": build_seconds,
        "predicted": predicted,
        "measured": {"unsplit": unsplit, "stage2": split},
    }
    if device.type == "cuda":
        result["ratio_predicted_over_measured"] = {
            "stage2": predicted["stage2_peak_bytes"] / split["allocated_peak_bytes"],
            "unsplit": predicted["unsplit_peak_bytes"] / unsplit["allocated_peak_bytes"],
            "measured_stage2_over_unsplit": split["allocated_peak_bytes"] / unsplit["allocated_peak_bytes"],
        }
    (args.out / "accuracy.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result.get("ratio_predicted_over_measured", {}), indent=1))


def fused_main(args: argparse.Namespace) -> None:
    """Stage 2 of a plan that splits the fused encode + sample unit vs keeping it whole."""
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    session = fused_session(session_for(args.device, args.tiny))
    root = session.model_root if args.tiny else None
    size = (args.image, args.image)
    fake = profile_fake(session, full_size=not args.tiny, image_size=size, prompt_tokens=args.tokens)
    plans = {
        split: make_plan(
            session.graph,
            pipeline="qwen_image",
            task="sft",
            trainable=session.trainable,
            layouts=session.adapter.value_layouts(),
            profile=fake,
            split=split,
        )
        for split in (True, False)
    }  # split=False keeps the unit whole (its unsplit placement)
    (args.out / "fused_plan.json").write_text(plans[True].to_json())
    components = build_models(session, root, device)
    params = make_trainable(
        components["transformer"],
        "transformer",
        lora=session.config.lora,
        adapter=session.adapter,
        denoiser=True,
        seed=0,
        gradient_checkpointing=session.config.train.gradient_checkpointing,
    )
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ctx = UnitContext(components, device, torch.bfloat16, generator=step_generator(0, 0), settings=session.settings)
    sources = profile_batch(
        session, image_size=size, prompt=prompt_with_tokens(components["tokenizer"], args.tokens), workdir=args.out
    )
    batches = {}
    for split in (False, True):  # stage 1 of both plans while every component is there
        with torch.no_grad():
            values = run_units(stage_units(plans[split], session.graph, 1), sources, ctx)
        batches[split] = {**sources, **{v.name: values[v.name] for v in plans[split].cached if v.name in values}}
        del values
    measured = {}
    for name, split, freed in (("whole", False, "text_encoder"), ("split", True, "vae")):
        del components[freed]  # whole: the VAE stays resident; split: it goes too
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        step_ctx = dataclasses.replace(ctx, components=components)
        measured[name] = peak_of_steps(
            stage_units(plans[split], session.graph, 2), batches.pop(split), step_ctx, optimizer, [], device, args.steps
        )
        print(name, measured[name], flush=True)
        del step_ctx
    unit = next(u for u in plans[True].units if u.name == "encode_image")
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "image": size,
        "prompt_tokens": args.tokens,
        "split_unit": {"stage": unit.stage, "replays": unit.replays, "reason": unit.reason},
        "predicted_stage2_bytes": {
            "split": plans[True].predicted["stage2_peak_bytes"],
            "whole": plans[False].predicted["stage2_peak_bytes"],
        },
        "measured": measured,
    }
    if device.type == "cuda":
        result["ratio_predicted_over_measured"] = {
            k: result["predicted_stage2_bytes"][k] / measured[k]["allocated_peak_bytes"] for k in measured
        }
        result["measured_split_over_whole"] = (
            measured["split"]["allocated_peak_bytes"] / measured["whole"]["allocated_peak_bytes"]
        )
    (args.out / "fused_accuracy.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("measured",)}, indent=1))


if __name__ == "__main__":
    main()
