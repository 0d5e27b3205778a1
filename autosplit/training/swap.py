"""Block swapping: the frozen weights of some of the denoiser's repeated blocks live in host memory
and are copied to the device ahead of use, then evicted (docs/memory.md).

Each swapped block's frozen parameters and buffers are laid out in one host buffer (pinned with
`cudaHostRegister` on CUDA, so a copy is one DMA at full bandwidth and no power-of-two rounding of
torch's pinned allocator doubles the host RAM). The device holds a fixed number of slots, each the
size of the largest swapped block. A forward pre-hook on every repeated block drives the schedule
of `autosplit.planning.memory.swap_window`: at each block use (the forward, and the backward's
recompute under gradient checkpointing) the swapped blocks outside the window give up their slots,
and the window's missing blocks are copied into free slots on a side CUDA stream. Events order
the two streams: a copy waits until compute has left the slot's previous block (`free`), compute
waits for the copy only when it is not done yet (`ready`). Trainable parameters (LoRA) never move.

Gradient checkpointing is required: without it autograd keeps every block's weights referenced
from the forward to the backward (config validation refuses the combination). Under it the
forward saves nothing of a block, and its recompute in the backward runs the block's pre-hook
again, so the weights are on the device exactly when a block computes.

On the CPU there is no side stream: copies are synchronous, into slots on the "device" (also the
CPU), by the same schedule; `events` records it for tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from autosplit.planning.memory import SWAP_SLOTS, block_uses, swap_window

log = logging.getLogger(__name__)

#: offset alignment of each tensor in a block's buffer (the CUDA caching allocator's rounding)
ALIGN = 512


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class SwapEvent:
    """One block use as the swapper saw it: phase ("forward" or "backward", the latter the
    recompute that starts a block's backward), the block, and the swapped blocks then in slots."""

    phase: str
    block: int
    on_device: tuple[int, ...]


@dataclass
class _Tensor:
    """A frozen tensor of a block: where it is registered and its place in the block's buffer."""

    owner: torch.nn.Module
    name: str
    is_param: bool
    offset: int
    shape: torch.Size
    dtype: torch.dtype

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        size = self.dtype.itemsize * self.shape.numel()
        return buffer[self.offset : self.offset + size].view(self.dtype).view(self.shape)

    def point_to(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = tensor  # type: ignore[union-attr]
        else:
            self.owner._buffers[self.name] = tensor


def frozen_tensors(block: torch.nn.Module) -> list[tuple[torch.nn.Module, str, bool, torch.Tensor]]:
    """A block's frozen parameters (requires_grad off) and buffers: (owner, name, is_param, tensor),
    each storage once."""
    seen: set[int] = set()
    found: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None and not p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                found.append((module, name, True, p))
        for name, b in module._buffers.items():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                found.append((module, name, False, b))
    return found


def layout_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of one buffer holding `tensors`, each at an ALIGN-aligned offset."""
    return sum(_aligned(t.nbytes) for t in tensors)


class _Block:
    """A swapped block: its frozen tensors moved into one host buffer."""

    def __init__(self, block: torch.nn.Module, *, pin: bool, poison: bool):
        found, tensors, offset = frozen_tensors(block), [], 0
        for owner, name, is_param, t in found:
            tensors.append(_Tensor(owner, name, is_param, offset, t.shape, t.dtype))
            offset += _aligned(t.nbytes)
        self.tensors, self.nbytes = tensors, offset
        self.host = _page_aligned(offset) if pin else torch.empty(offset, dtype=torch.uint8)
        self.registered = pin and _register(self.host)
        if pin and not self.registered:  # torch's pinned allocator: rounds each buffer up to a power of two
            self.host = self.host.pin_memory()
        self.pinned = pin
        for entry, (_, _, _, t) in zip(tensors, found):
            entry.view(self.host).copy_(t.detach().to("cpu"))
        del found
        #: where evicted tensors point: their host copy, or (tests) NaN, so a use of an evicted block shows
        self.evicted = [self._poisoned(e) if poison else e.view(self.host) for e in tensors]
        self.point_to_host()

    @staticmethod
    def _poisoned(entry: _Tensor) -> torch.Tensor:
        fill = float("nan") if entry.dtype.is_floating_point else 0
        return torch.full(entry.shape, fill, dtype=entry.dtype)

    def point_to_host(self) -> None:
        for entry, tensor in zip(self.tensors, self.evicted):
            entry.point_to(tensor)

    def point_to(self, slot: torch.Tensor) -> None:
        for entry in self.tensors:
            entry.point_to(entry.view(slot))

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            self.registered = False


def _page_aligned(nbytes: int) -> torch.Tensor:
    """A host buffer starting on a page boundary (what cudaHostRegister locks)."""
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
    start = -raw.data_ptr() % 4096
    return raw[start : start + nbytes]


_warned = False


def _register(buffer: torch.Tensor) -> bool:
    """Page-lock `buffer` in place (cudaHostRegister: no copy, no rounding); false, with a warning, if
    that fails (the caller then copies it into torch's pinned memory)."""
    if buffer.numel() == 0:
        return False
    try:
        result = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
        ok = int(result) == 0
    except (AttributeError, TypeError, RuntimeError) as exc:
        ok, result = False, exc
    global _warned
    if not ok and not _warned:
        _warned = True
        log.warning(
            "cudaHostRegister of %d bytes failed (%s): using torch's pinned memory, which rounds each block's "
            "buffer up to a power of two of host RAM",
            buffer.numel(),
            result,
        )
    return ok


@dataclass
class _Slot:
    buffer: torch.Tensor
    block: int | None = None
    ready: Any = None
    free: Any = None


@dataclass
class SwapStats:
    """Copies made (host -> device) and their bytes, since the swapper was made."""

    copies: int = 0
    bytes: int = 0
    uses: int = 0


class BlockSwapper:
    """Keeps the frozen tensors of `blocks[i]` for i in `swapped` in host memory and copies them to
    `device` ahead of each use (see the module docstring). `blocks` are in execution order.
    `record` keeps a `SwapEvent` per block use in `events`; `poison` (tests) points evicted
    tensors at NaN instead of their host copy."""

    def __init__(
        self,
        blocks: list[torch.nn.Module],
        swapped: tuple[int, ...],
        *,
        device: torch.device,
        slots: int = SWAP_SLOTS,
        record: bool = False,
        poison: bool = False,
    ):
        if not swapped:
            raise ValueError("BlockSwapper needs at least one swapped block")
        self.blocks, self.swapped, self.device = blocks, frozenset(swapped), device
        self.cuda = device.type == "cuda"
        self._held = {i: _Block(blocks[i], pin=self.cuda, poison=poison) for i in sorted(self.swapped)}
        size = max(b.nbytes for b in self._held.values())
        self.slots = [
            _Slot(torch.empty(size, dtype=torch.uint8, device=device)) for _ in range(min(slots, len(swapped)))
        ]
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            for slot in self.slots:
                slot.ready, slot.free = torch.cuda.Event(), torch.cuda.Event()
        self._uses = {True: block_uses(len(blocks)), False: block_uses(len(blocks), backward=False)}
        self.events: list[SwapEvent] | None = [] if record else None
        self.stats = SwapStats()
        self._hooks = [b.register_forward_pre_hook(partial(self._before, i)) for i, b in enumerate(blocks)]

    @property
    def host_bytes(self) -> int:
        """Host memory of the swapped blocks' buffers (pinned on CUDA)."""
        return sum(b.nbytes for b in self._held.values())

    @property
    def slot_bytes(self) -> int:
        """Device memory of the slots."""
        return sum(s.buffer.numel() for s in self.slots)

    def host_tensor_ids(self) -> set[int]:
        """ids of the Parameter objects (and current buffers) that live on the host between uses."""
        ids = set()
        for held in self._held.values():
            for e in held.tensors:
                store = e.owner._parameters if e.is_param else e.owner._buffers
                ids.add(id(store[e.name]))
        return ids

    def _before(self, index: int, module: torch.nn.Module, args: Any) -> None:
        backward = torch._C._current_graph_task_id() != -1  # the recompute of a block, in the backward
        grad = torch.is_grad_enabled()
        uses = self._uses[grad]
        position = len(self.blocks) * 2 - 1 - index if backward else index
        window = swap_window(uses, position, self.swapped, len(self.slots))
        for slot in self.slots:
            if slot.block is not None and slot.block not in window:
                self._evict(slot)
        for block in window:
            if all(s.block != block for s in self.slots):
                self._load(block, next(s for s in self.slots if s.block is None))
        self.stats.uses += 1
        if index in self.swapped and self.cuda:
            slot = next(s for s in self.slots if s.block == index)
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        if self.events is not None:
            on_device = tuple(sorted(s.block for s in self.slots if s.block is not None))
            self.events.append(SwapEvent("backward" if backward else "forward", index, on_device))

    def _load(self, block: int, slot: _Slot) -> None:
        held = self._held[block]
        target = slot.buffer[: held.nbytes]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(slot.free)  # compute has left the slot's last block
                target.copy_(held.host, non_blocking=held.pinned)
                slot.ready.record(self.copy_stream)
        else:
            target.copy_(held.host)
        held.point_to(slot.buffer)
        slot.block = block
        self.stats.copies += 1
        self.stats.bytes += held.nbytes

    def _evict(self, slot: _Slot) -> None:
        assert slot.block is not None
        if self.cuda:
            slot.free.record(torch.cuda.current_stream(self.device))
        self._held[slot.block].point_to_host()
        slot.block = None

    def close(self) -> None:
        """Remove the hooks, point every swapped tensor at its host copy, unpin the host buffers."""
        for hook in self._hooks:
            hook.remove()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for slot in self.slots:
            if slot.block is not None:
                self._held[slot.block].point_to_host()
                slot.block = None
        for held in self._held.values():
            held.close()
