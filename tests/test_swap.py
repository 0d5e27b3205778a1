"""Block swapping on the CPU (autosplit.training.swap): the schedule (which block is where at every
block use of the forward, the backward's recompute and the next step), that a computing block
always reads its weights from a device slot and never an evicted copy, and that gradients equal
those of the same model with every block resident, bit for bit."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from autosplit.adapters.qwen_image import QwenImageAdapter
from autosplit.config import LoraConfig
from autosplit.planning.memory import block_uses, spread_blocks, swap_window
from autosplit.training.lora import make_trainable
from autosplit.training.placement import WeightPlacement, place_denoiser, repeated_blocks
from autosplit.training.swap import BlockSwapper, SwapEvent, frozen_tensors

NUM_BLOCKS = 5
CPU = torch.device("cpu")


def tiny_dit(seed: int = 0) -> torch.nn.Module:
    """A random-init Qwen-Image DiT of 5 blocks, LoRA r4 on the family's modules, checkpointing on."""
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=NUM_BLOCKS,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    ).requires_grad_(False)
    make_trainable(
        model,
        "transformer",
        lora=LoraConfig(rank=4),
        adapter=QwenImageAdapter(),
        denoiser=True,
        seed=0,
        gradient_checkpointing=True,
    )
    return model


def step(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One forward + backward on fixed inputs; the trainable parameters' gradients."""
    g = torch.Generator().manual_seed(1)
    out = model(
        hidden_states=torch.randn(1, 16, 16, generator=g),
        timestep=torch.tensor([0.3]),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )[0]
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def expected_events(swapped: tuple[int, ...], slots: int, steps: int) -> list[SwapEvent]:
    """The schedule the planner's `swap_window` prescribes, one event per block use."""
    uses = block_uses(NUM_BLOCKS)
    return [
        SwapEvent(phase, block, tuple(sorted(swap_window(uses, position, frozenset(swapped), slots))))
        for _ in range(steps)
        for position, (phase, block) in enumerate(uses)
    ]


@pytest.mark.parametrize("swapped", [(1, 3, 4), (0, 1, 2, 3, 4), (2,)], ids=["three", "all", "one"])
def test_schedule_forward_recompute_backward(swapped):
    model = tiny_dit()
    swapper = place_denoiser(
        model, WeightPlacement(len(swapped), swapped, ("transformer_blocks",)), device=CPU, record=True
    )
    for _ in range(2):
        step(model)
    slots = min(2, len(swapped))
    assert swapper.events == expected_events(swapped, slots, steps=2)
    # every swapped block in use is on the device; at most `slots` swapped blocks ever are
    assert all(e.block in e.on_device for e in swapper.events if e.block in swapped)
    assert max(len(e.on_device) for e in swapper.events) == slots
    # the uses: forward 0..4, then the backward recomputes 4..0 (each block's pre-hook runs again)
    assert [(e.phase, e.block) for e in swapper.events[: 2 * NUM_BLOCKS]] == block_uses(NUM_BLOCKS)


def test_a_computing_block_reads_only_slot_memory():
    model = tiny_dit()
    swapped = (1, 3, 4)
    swapper = place_denoiser(model, WeightPlacement(3, swapped, ("transformer_blocks",)), device=CPU)
    slots = [(s.buffer.data_ptr(), s.buffer.data_ptr() + s.buffer.numel()) for s in swapper.slots]
    seen = []

    def check(index: int, module: torch.nn.Module, *args) -> None:
        inside = [any(lo <= t.data_ptr() < hi for lo, hi in slots) for *_, t in frozen_tensors(module)]
        seen.append((index, all(inside) if index in swapped else not any(inside)))

    for i, block in enumerate(repeated_blocks(model, ("transformer_blocks",))):
        block.register_forward_pre_hook(lambda m, a, i=i: check(i, m))  # after the swapper's own pre-hook
        block.register_forward_hook(lambda m, a, o, i=i: check(i, m))
    step(model)
    # forward: before and after each block; recompute: before (it stops once the saved tensors are back)
    assert len(seen) == 3 * NUM_BLOCKS
    assert all(ok for _, ok in seen), seen


def test_swapped_gradients_equal_resident_ones_bit_for_bit():
    resident = step(tiny_dit())
    model = tiny_dit()
    place_denoiser(model, WeightPlacement(3, (1, 3, 4), ("transformer_blocks",)), device=CPU, poison=True)
    for _ in range(2):  # the second step starts with blocks left in slots by the first
        swapped = step(model)
        assert sorted(swapped) == sorted(resident)
        assert all(torch.equal(resident[n], swapped[n]) for n in resident)  # evicted copies are NaN: never read


def test_lora_stays_on_the_device_and_frozen_weights_go_to_host_buffers():
    model = tiny_dit()
    swapper = place_denoiser(model, WeightPlacement(2, None, ("transformer_blocks",)), device=CPU)
    assert swapper.swapped == frozenset(spread_blocks(NUM_BLOCKS, 2)) == {1, 3}
    block = model.transformer_blocks[1]
    host = (swapper._held[1].host.data_ptr(), swapper._held[1].host.data_ptr() + swapper.host_bytes // 2)
    assert all(host[0] <= t.data_ptr() < host[1] for *_, t in frozen_tensors(block))  # evicted: host copy
    lora = [p for n, p in block.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert not any(host[0] <= p.data_ptr() < host[1] for p in lora)
    assert set(model._ddp_params_and_buffers_to_ignore) == {
        f"transformer_blocks.{i}.{n}"
        for i in (1, 3)
        for n, p in model.transformer_blocks[i].named_parameters()
        if not p.requires_grad
    }
    swapper.close()
    assert not block._forward_pre_hooks


def test_spread_blocks_takes_block_zero_last():
    assert spread_blocks(60, 0) == ()
    assert spread_blocks(60, 60) == tuple(range(60))
    assert 0 not in spread_blocks(60, 59) and len(set(spread_blocks(60, 59))) == 59
    for n in range(1, 12):
        for k in range(n + 1):
            chosen = spread_blocks(n, k)
            assert len(set(chosen)) == k and all(0 <= i < n for i in chosen)


def test_a_swapper_needs_a_swapped_block():
    with pytest.raises(ValueError):
        BlockSwapper([torch.nn.Linear(2, 2)], (), device=CPU)
