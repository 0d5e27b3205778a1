"""Stage 2's weight placement (docs/memory.md): which of the denoiser's repeated blocks live in
pinned host memory and are copied in ahead of use, and whether its frozen weights are stored in
fp8, chosen for a VRAM and a host-RAM budget from the profile's per-block measurements.
`place_memory` records the choice and its predictions (peak, host memory, step time) in the
plan; the swap schedule (`block_uses`, `swap_window`) is the one training/swap.py executes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autosplit.errors import ConfigError
from autosplit.plan import Plan


def replace_predicted(plan: Plan, predicted: dict[str, Any]) -> Plan:
    return dataclasses.replace(plan, predicted=predicted)


#: pinned host -> device copies when `plan.host_to_device_gbps` is 0: measured on the H200 host, 55 GB/s each
#: way (pageable: 19.5 GB/s; shared/gpu/README.md)
DEFAULT_H2D_BYTES_PER_S = 55e9
#: stage 2's effective FLOP rate when `plan.train_tflops` is 0: full-size Qwen-Image LoRA r32 at
#: 1024^2 with gradient checkpointing ran its 234.9 TFLOP step in 1.49 s on the H200 (issue 11)
DEFAULT_TRAIN_FLOPS_PER_S = 234.9e12 / 1.49
#: fp8 -> bf16 upcast of a frozen weight, seconds per element (340 M weights in 1.5 ms on the H200)
FP8_UPCAST_S_PER_ELEMENT = 1.5e-3 / 340e6
#: swapped blocks on the device at once: the one in use and the next, copied ahead on a side stream
#: (the planner may take 1 where a block's memory matters more than hiding its copy)
SWAP_SLOTS = 2
#: the CUDA caching allocator reserves more than is allocated (fragmentation): 44.8 / 43.3 GiB for
#: full-size Qwen-Image stage 2 on the H200 (issue 11). A budget caps what the allocator reserves.
RESERVED_OVER_ALLOCATED = 1.035
#: and in-kernel temporaries no profile sees (38-84 MB for the DiT step, shared/FACTS.md)
RESERVED_HEADROOM_BYTES = 128 << 20


#: host memory of the training process besides the model (CUDA context, libraries), for host-peak
#: predictions; measured peaks were 0.80-0.99 of denoiser + pinned + this (docs/memory.md)
HOST_PROCESS_BYTES = 2 << 30


def reserved_bytes(allocated: int) -> int:
    """What the allocator is predicted to reserve at an allocated peak of `allocated` bytes."""
    return int(allocated * RESERVED_OVER_ALLOCATED) + RESERVED_HEADROOM_BYTES


@dataclass(frozen=True)
class MemoryRequest:
    """What a run asks of stage 2's weight placement (`train.blocks_to_swap`, `train.base_precision`,
    `plan.*`). `blocks_to_swap` is "auto" (the planner chooses under `vram_budget_bytes`) or a count;
    `base_precision` is "dtype" (the run's), "fp8" or "auto" (the planner may choose fp8). Bytes
    (0: no budget), bytes/s and FLOP/s."""

    blocks_to_swap: str = "auto"
    base_precision: str = "dtype"
    vram_budget_bytes: int = 0
    host_ram_bytes: int = 0
    h2d_bytes_per_s: float = DEFAULT_H2D_BYTES_PER_S
    train_flops_per_s: float = DEFAULT_TRAIN_FLOPS_PER_S
    gradient_checkpointing: bool = False


def spread_blocks(num_blocks: int, count: int) -> tuple[int, ...]:
    """Which `count` of `num_blocks` blocks to swap: evenly spread, so that the resident blocks
    between two swapped ones give the copy time; block 0 (needed first) only when all are."""
    return tuple((k * num_blocks) // (count + 1) for k in range(1, count + 1))


def block_uses(num_blocks: int, *, backward: bool = True) -> list[tuple[str, int]]:
    """One step's uses of the repeated blocks, in order: the forward, then the backward (under
    gradient checkpointing each block's recompute and backward), the last block first."""
    forward = [("forward", i) for i in range(num_blocks)]
    return forward + ([("backward", i) for i in reversed(range(num_blocks))] if backward else [])


def swap_window(uses: Sequence[tuple[str, int]], position: int, swapped: frozenset[int], slots: int) -> tuple[int, ...]:
    """The swapped blocks to have on the device from use `position` on: the next `slots` distinct
    ones in use order (uses repeat: the next step follows the last backward)."""
    window: list[int] = []
    for k in range(len(uses)):
        block = uses[(position + k) % len(uses)][1]
        if block in swapped and block not in window:
            window.append(block)
            if len(window) == slots:
                break
    return tuple(window)


def swap_step_seconds(
    uses: Sequence[tuple[str, int]],
    durations: Sequence[float],
    other_s: float,
    swapped: frozenset[int],
    copy_s: dict[int, float],
    slots: int,
) -> float:
    """Seconds of a steady-state step on one compute stream and one copy engine, as the swapper
    schedules it: at each use the blocks outside `swap_window` leave their slots (free once compute
    gets there), the window's missing blocks are copied in order into free slots, and a use of a
    swapped block waits for its copy. `durations` are the uses' compute seconds, `other_s` the rest
    of the step."""
    held: list[int | None] = [None] * slots
    ready, free = [0.0] * slots, [0.0] * slots
    now = engine = 0.0
    ends = []
    for _ in range(3):  # the first step starts cold; the third is the steady state
        for position, (_, block) in enumerate(uses):
            window = swap_window(uses, position, swapped, slots)
            for i, b in enumerate(held):
                if b is not None and b not in window:
                    held[i], free[i] = None, now
            for b in window:
                if b not in held:
                    i = held.index(None)
                    engine = ready[i] = max(engine, free[i]) + copy_s[b]
                    held[i] = b
            if block in swapped:
                now = max(now, ready[held.index(block)])
            now += durations[position]
        now += other_s
        ends.append(now)
    return ends[2] - ends[1]


def _estimate(
    predicted: dict[str, Any],
    blocks: list[dict[str, Any]],
    precision: str,
    count: int,
    request: MemoryRequest,
    slots: int = SWAP_SLOTS,
) -> dict[str, Any]:
    """Peaks (bytes), host memory (bytes) and step seconds of stage 2 with `count` blocks swapped
    through `slots` device slots."""
    each = [b for b in blocks for _ in range(b["count"])]
    fp8 = precision == "fp8"
    stored = [b["fp8_frozen_bytes"] if fp8 else b["frozen_bytes"] for b in each]
    slot = [b["fp8_slot_bytes"] if fp8 else b["slot_bytes"] for b in each]
    swapped = spread_blocks(len(each), count)
    slots = min(slots, count)
    change = (
        sum(stored)
        - sum(b["frozen_bytes"] for b in each)
        - sum(stored[i] for i in swapped)
        + slots * max((slot[i] for i in swapped), default=0)
        + (max(b["max_linear_weight_bytes"] for b in each) if fp8 else 0)
    )  # one layer upcast at a time
    rate = request.train_flops_per_s
    uses = block_uses(len(each))
    compute = [
        (each[i]["forward_flops"] if phase == "forward" else each[i]["step_flops"] - each[i]["forward_flops"]) / rate
        for phase, i in uses
    ]
    other = max(predicted["stage2_flops_per_step"] / rate - sum(compute), 0.0)  # embeddings, loss, ...
    # fp8 upcasts each frozen Linear weight once in the forward, twice in the backward (recompute, grad)
    durations = [
        c
        + (
            each[i]["linear_weight_elements"] * FP8_UPCAST_S_PER_ELEMENT * (1 if phase == "forward" else 2)
            if fp8
            else 0.0
        )
        for c, (phase, i) in zip(compute, uses)
    ]
    copies = {i: slot[i] / request.h2d_bytes_per_s for i in swapped}
    resident = predicted["stage2_flops_per_step"] / rate
    step = (
        swap_step_seconds(uses, durations, other, frozenset(swapped), copies, slots)
        if count
        else resident + sum(durations) - sum(compute)
    )  # fp8's upcasts, if any
    on_host = count > 0 or fp8  # the denoiser is loaded on the host, then placed block by block
    return {
        "blocks_to_swap": count,
        "num_blocks": len(each),
        "swapped": list(swapped),
        "base_precision": precision,
        "slots": slots,
        "stage2_peak_bytes": predicted["stage2_peak_bytes"] + change,
        "unsplit_peak_bytes": predicted["unsplit_peak_bytes"] + change,
        "host_pinned_bytes": sum(slot[i] for i in swapped),
        # loading: the denoiser on the host, and the swapped blocks' pinned copies made before it is released
        "host_peak_bytes": (
            predicted.get("denoiser_frozen_bytes", 0) + sum(slot[i] for i in swapped) + HOST_PROCESS_BYTES
        )
        if on_host
        else 0,
        "step_s": step,
        "resident_step_s": resident,
        "copy_s_per_step": 2 * sum(copies.values()),
    }


def place_memory(plan: Plan, request: MemoryRequest) -> Plan:
    """`plan` with `predicted["placement"]`: how many of the denoiser's repeated blocks stage 2 keeps
    in pinned host memory (copied to the GPU ahead of use) and the precision of their frozen Linear
    weights, the predicted peaks, host memory and step time, and the reason. Under "auto" it is
    the fastest predicted choice whose peak (stage 2's, or unsplit's for --no-split) fits
    `vram_budget_bytes` and whose host memory fits `host_ram_bytes`; lossless wins ties. Raises
    ConfigError for more blocks than the model has."""
    blocks = plan.predicted.get("blocks") or []
    num_blocks = sum(b["count"] for b in blocks)
    asked = request.blocks_to_swap
    if asked != "auto" and blocks and int(asked) > num_blocks:
        raise ConfigError(
            f"--blocks_to_swap {asked}: {plan.trainable[0]} has {num_blocks} repeated blocks; "
            f"pass at most {num_blocks} (or auto)"
        )
    if not blocks or "stage2_peak_bytes" not in plan.predicted:
        return replace_predicted(plan, {**plan.predicted, "placement": _unmeasured_placement(plan, request)})
    precisions = ("dtype", "fp8") if request.base_precision == "auto" else (request.base_precision,)
    counts = ([0] if not request.gradient_checkpointing else range(num_blocks + 1)) if asked == "auto" else [int(asked)]
    options = [
        _estimate(plan.predicted, blocks, p, n, request, k)
        for p in precisions
        for n in counts
        for k in sorted({min(k, n) for k in (1, SWAP_SLOTS)})
    ]
    judged = "stage2_peak_bytes" if plan.split else "unsplit_peak_bytes"
    budget, host = request.vram_budget_bytes, request.host_ram_bytes
    fitting = [
        o
        for o in options
        if (not budget or reserved_bytes(o[judged]) <= budget) and (not host or o["host_peak_bytes"] <= host)
    ]
    if fitting:
        best = min(
            fitting,
            key=lambda o: (round(o["step_s"], 4), o["base_precision"] != "dtype", o["blocks_to_swap"], -o["slots"]),
        )
    else:  # the smallest GPU peak; among those under the budget (the host is short), the fewest blocks
        best = min(
            options,
            key=lambda o: (max(reserved_bytes(o[judged]), budget), o["blocks_to_swap"], o["step_s"], -o["slots"]),
        )
    best = {
        **best,
        "judged": "stage 2" if plan.split else "unsplit",
        "judged_peak_bytes": best[judged],
        "judged_reserved_bytes": reserved_bytes(best[judged]),
        "fits": bool(fitting),
        "vram_budget_bytes": budget,
        "host_ram_bytes": host,
        "h2d_bytes_per_s": request.h2d_bytes_per_s,
        "train_flops_per_s": request.train_flops_per_s,
        "predicted": True,
    }
    best["reason"] = _placement_reason(best, plan, request)
    return replace_predicted(plan, {**plan.predicted, "placement": best})


def _unmeasured_placement(plan: Plan, request: MemoryRequest) -> dict[str, Any]:
    """The placement of a plan without block measurements: what was asked, nothing predicted."""
    count = 0 if request.blocks_to_swap == "auto" else int(request.blocks_to_swap)
    precision = "dtype" if request.base_precision == "auto" else request.base_precision
    if request.blocks_to_swap == "auto" and request.vram_budget_bytes:
        reason = (
            "nothing swapped: no profile of the denoiser's repeated blocks to plan from (plan with "
            "--profile fake, or pass --blocks_to_swap N)"
        )
    else:
        reason = f"--blocks_to_swap {count}" if count else "every block resident"
    return {
        "blocks_to_swap": count,
        "swapped": None,
        "base_precision": precision,
        "slots": min(SWAP_SLOTS, count),
        "predicted": False,
        "reason": reason,
    }


def _placement_reason(p: dict[str, Any], plan: Plan, request: MemoryRequest) -> str:
    n, total, budget = p["blocks_to_swap"], p["num_blocks"], p["vram_budget_bytes"]
    gib = 1 << 30
    fp8 = "; frozen Linear weights of the blocks stored in fp8 (lossy)" if p["base_precision"] == "fp8" else ""
    cost = (
        (
            f"copies {p['copy_s_per_step']:.2f} s per step on a side stream, predicted step "
            f"{p['step_s'] / p['resident_step_s']:.2f}x the resident one"
        )
        if n
        else ""
    )
    if request.blocks_to_swap != "auto":
        head = f"--blocks_to_swap {n}: {n} of {total} blocks in pinned host memory" if n else "every block resident"
        return "; ".join(x for x in (head + fp8, cost) if x)
    if not budget:
        return "no --vram_budget: every block resident" + fp8
    if not p["fits"]:
        if not request.gradient_checkpointing:
            why = "block swapping needs --use_gradient_checkpointing"
        elif p["judged_reserved_bytes"] <= budget:
            why = (
                f"with {n} of {total} blocks swapped the GPU fits, but loading needs "
                f"{p['host_peak_bytes'] / gib:.1f} GiB of host memory, more than the "
                f"{request.host_ram_bytes / gib:.1f} GiB here (--set plan.host_ram_gib=G: the training machine's)"
            )
        else:
            why = (
                f"even {n} of {total} blocks swapped{' and fp8' if p['base_precision'] == 'fp8' else ''} leave "
                f"{p['judged_peak_bytes'] / gib:.2f} GiB allocated, {p['judged_reserved_bytes'] / gib:.2f} GiB "
                f"reserved"
            )
        allow = "" if request.base_precision != "dtype" else ", allow fp8 (--base_precision auto)"
        return (
            f"does NOT fit --vram_budget {budget / gib:g} GiB: {why}; lower --batch_size or the image "
            f"size{allow}, or raise the budget"
        )
    if not n:
        return f"--vram_budget {budget / gib:g} GiB: every block resident fits" + fp8
    return (
        f"--vram_budget {budget / gib:g} GiB: {n} of {total} blocks in pinned host memory, the fastest "
        f"choice that fits" + fp8 + "; " + cost
    )
