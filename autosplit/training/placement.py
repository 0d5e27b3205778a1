"""Where a stage's components live: which model folder they come from, on which device, in which
dtype, and, for stage 2's denoiser, which of its repeated blocks keep their frozen weights in host
memory between uses (block swapping, autosplit.training.swap; docs/memory.md). The plan decides
(`plan.predicted["placement"]`); this module carries it out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autosplit.adapters.base import Adapter, read_model_index
from autosplit.adapters.components import load_components
from autosplit.errors import ConfigError
from autosplit.plan import Plan
from autosplit.planning.memory import SWAP_SLOTS, spread_blocks
from autosplit.training.precision import store_fp8
from autosplit.training.swap import BlockSwapper


@dataclass(frozen=True)
class WeightPlacement:
    """How stage 2 stores the denoiser's frozen weights: how many of its repeated blocks (over
    `block_lists`, the denoiser's ModuleLists, in execution order) live in host memory between
    uses, and which (`swapped`; None: spread evenly, `spread_blocks`); and whether the blocks'
    frozen Linear weights are stored in fp8 ("fp8") or the run's dtype ("dtype")."""

    blocks_to_swap: int = 0
    swapped: tuple[int, ...] | None = None
    block_lists: tuple[str, ...] = ()
    base_precision: str = "dtype"
    #: swapped blocks on the device at once (the one in use, and the next copied ahead)
    slots: int = SWAP_SLOTS

    @property
    def on_host_first(self) -> bool:
        """The denoiser is loaded on the host and placed block by block (it may not fit on the device whole)."""
        return self.blocks_to_swap > 0 or self.base_precision == "fp8"


def weight_placement(plan: Plan, adapter: Adapter, denoiser: str) -> WeightPlacement:
    """The placement `plan` decided for `denoiser` (nothing swapped if it decided none). Raises
    ConfigError when it swaps blocks of a family whose denoiser has no repeated-block lists."""
    decided = plan.predicted.get("placement") or {}
    count = int(decided.get("blocks_to_swap") or 0)
    precision = decided.get("base_precision", "dtype")
    lists = tuple(adapter.block_lists.get(denoiser, ()))
    if not count and precision == "dtype":
        return WeightPlacement(block_lists=lists)
    if not lists:
        raise ConfigError(
            f"--blocks_to_swap {count} / --base_precision {precision}: the {adapter.name} family's "
            f"{denoiser} has no repeated-block lists (Qwen-Image, FLUX and Wan have); drop the flag"
        )
    swapped = decided.get("swapped")  # None in a plan made without a profile of the blocks
    return WeightPlacement(
        count, tuple(swapped) if swapped else None, lists, precision, int(decided.get("slots") or SWAP_SLOTS)
    )


def repeated_blocks(model: torch.nn.Module, lists: tuple[str, ...]) -> list[torch.nn.Module]:
    """The blocks of `model`'s ModuleLists named `lists`, in execution order."""
    return [block for name in lists for block in getattr(model, name)]


def place_denoiser(
    model: torch.nn.Module,
    placement: WeightPlacement,
    *,
    device: torch.device,
    record: bool = False,
    poison: bool = False,
) -> BlockSwapper | None:
    """Move `model` (loaded on the host, LoRA attached) to `device`, except the frozen tensors of the
    swapped blocks, which go to host buffers and come to the device only for their uses; with fp8,
    the blocks' frozen Linear weights are stored in fp8 first. Returns the swapper (None when
    nothing is swapped). Multi-process runs: DDP is told to leave the
    host-resident tensors alone (their values are the same on every rank: the same folder).
    Raises ConfigError for more swapped blocks than the model has."""
    if not placement.on_host_first:
        return None
    blocks = repeated_blocks(model, placement.block_lists)
    if placement.blocks_to_swap > len(blocks):
        raise ConfigError(
            f"--blocks_to_swap {placement.blocks_to_swap}: the denoiser has {len(blocks)} repeated "
            f"blocks; pass at most {len(blocks)}"
        )
    swapped = placement.swapped or spread_blocks(len(blocks), placement.blocks_to_swap)
    if placement.base_precision == "fp8":  # quantized on the device, kept where the block will live
        for i, block in enumerate(blocks):
            store_fp8(block, work=device, keep_on=torch.device("cpu") if i in swapped else device)
    swapper = (
        BlockSwapper(blocks, swapped, device=device, slots=max(placement.slots, 1), record=record, poison=poison)
        if swapped
        else None
    )
    on_host = swapper.host_tensor_ids() if swapper is not None else set()
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in on_host:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and id(b) not in on_host:
                module._buffers[name] = b.to(device)
    if swapper is not None:
        ignored = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if id(t) in on_host]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return swapper


@dataclass(frozen=True)
class ComponentSource:
    """The components of one run: the family's adapter loads them from `root` onto `device`."""

    adapter: Adapter
    root: Path
    device: torch.device
    dtype: torch.dtype

    def check_present(self, names: list[str]) -> None:
        """Raise ModelError unless the model folder holds every component in `names`."""
        read_model_index(self.root, adapter=self.adapter, components=names)

    def load(
        self, names: list[str], *, device: torch.device | None = None, on_host: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The named components, frozen and in eval mode, on `device` (default: the run's); those in
        `on_host` on the CPU, for `place_denoiser` to place after the LoRA is attached."""
        self.check_present(names)
        device = device or self.device
        cpu = torch.device("cpu")
        loaded: Mapping[str, Any] = {}
        groups = ([n for n in names if n not in on_host], device), ([n for n in names if n in on_host], cpu)
        for group, where in groups:
            if group:
                loaded = {**loaded, **load_components(self.adapter, self.root, group, device=where, dtype=self.dtype)}
        return {name: loaded[name] for name in names}


@dataclass(frozen=True)
class BuiltComponents(ComponentSource):
    """The components of a pipeline written in code (`autosplit.Pipeline`): built by the caller,
    handed to the stages as they are (frozen, in eval mode, moved to the device; `root` unused)."""

    modules: Mapping[str, Any] = field(default_factory=dict)

    def check_present(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.modules]
        if missing:
            raise ConfigError(
                f"components {missing} are used by the plan's units but were not given: pass them in "
                f"Pipeline(components={{...}}) (given: {sorted(self.modules)})"
            )

    def load(
        self, names: list[str], *, device: torch.device | None = None, on_host: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        self.check_present(names)
        loaded = {}
        for name in names:
            component = self.modules[name]
            if isinstance(component, torch.nn.Module):
                where = torch.device("cpu") if name in on_host else (device or self.device)
                component = component.to(where).requires_grad_(False).eval()
            loaded[name] = component
        return loaded
