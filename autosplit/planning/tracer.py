"""The measuring profiler: one traced run of every unit of a graph.

For each unit it records peak memory above the unit's inputs, FLOPs, wall seconds, its outputs
(shape, dtype, bytes), whether they need gradients, which ops drew random numbers (from the
per-step generator or the global RNG, versus generators seeded from the sample), and which of
the unit's inputs each output was computed from. It also traces one training step (forward and
backward) of the units that need gradients.

Three modes, one code path:
- real CUDA: `torch.cuda` allocator statistics (allocated and reserved peaks);
- real CPU and fake: a storage-lifetime tracker in a `TorchDispatchMode` that counts each new
  storage once, rounded to 512 bytes like the CUDA caching allocator, and frees it through a
  weakref callback (see shared/FACTS.md). Under `FakeTensorMode` with fake CPU tensors it sees
  the same allocations with no memory behind them, so a 20 B-parameter model is profiled on a
  laptop.
FLOPs come from torch's FLOP formulas (`torch.utils.flop_counter`), with the CPU flash-attention
kernels registered (torch counts 0 for them otherwise). `FlopCounterMode` itself is not used: its
module tracker keeps activation checkpointing's recomputed tensors alive and inflates the
backward peak (seen here: +0.87 GiB per Qwen-Image block).
"""

from __future__ import annotations

import gc
import numbers
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

from autosplit.graph import Unit, UnitContext, UnitGraph
from autosplit.planning.profile import (
    ComponentProfile,
    FissionProfile,
    Profile,
    StepProfile,
    UnitProfile,
    ValueProfile,
)

RANDOM = "@random"  # taint label: derived from a per-step random draw
ALIGN = 512  # the CUDA caching allocator rounds every block to 512 bytes


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _dropout_p(func: Any, args: tuple, kwargs: Mapping[str, Any]) -> float:
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            return kwargs.get("dropout_p", args[i] if i < len(args) else 0.0)
    return 0.0


class _Tracer(TorchDispatchMode):
    """Tracks live storages (memory), random draws and which inputs each tensor derives from."""

    def __init__(self, step_generator: torch.Generator | None, track_memory: bool):
        super().__init__()
        self.track_memory = track_memory
        # generators that change every step: the step generator and the global default ones
        # (`_cdata` identifies a generator object; torch has no public id for it)
        self.global_generators = {torch.default_generator._cdata}  # type: ignore[attr-defined]
        if step_generator is not None:
            self.global_generators.add(step_generator._cdata)  # type: ignore[attr-defined]
        if torch.cuda.is_available():
            self.global_generators |= {g._cdata for g in torch.cuda.default_generators}  # type: ignore[attr-defined]
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}
        self.taint: dict[int, frozenset[str]] = {}
        self.random_ops: list[str] = []
        self.seeded_ops: list[str] = []
        self.flops = 0

    def _watch(self, storage: Any, key: int) -> None:
        if key not in self.sizes and key not in self.taint:
            weakref.finalize(storage, self._free, key)

    def label(self, t: torch.Tensor, name: str) -> None:
        storage = t.untyped_storage()
        self._watch(storage, storage._cdata)
        self.taint[storage._cdata] = self.taint.get(storage._cdata, frozenset()) | {name}

    def labels(self, t: torch.Tensor) -> frozenset[str]:
        return self.taint.get(_storage_key(t), frozenset())

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)
        self.taint.pop(key, None)

    def _track(self, t: torch.Tensor, label: frozenset[str], input_keys: set[int]) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        new = self.track_memory and key not in input_keys and key not in self.sizes  # views alias inputs
        if new or label:
            self._watch(storage, key)
        if label:
            self.taint[key] = self.taint.get(key, frozenset()) | label
        if new:
            self.sizes[key] = _aligned(storage.nbytes())
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        label: frozenset[str] = frozenset()
        input_keys = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                input_keys.add(key)
                label |= self.taint.get(key, frozenset())
        if torch.Tag.nondeterministic_seeded in func.tags and (
            "scaled_dot_product" not in func.__name__ or _dropout_p(func, args, kwargs) > 0
        ):
            generator = kwargs.get("generator")
            if generator is None or generator._cdata in self.global_generators:
                self.random_ops.append(func.__name__)
                label |= {RANDOM}
            else:
                self.seeded_ops.append(func.__name__)
        out = func(*args, **kwargs)
        formula = _FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += _count_flops(func, formula, args, kwargs, out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, label, input_keys)
        return out


def _cpu_attention_flops() -> dict[Any, Any]:
    aten = torch.ops.aten

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(forward),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(backward),
    }


_FLOP_FORMULAS = {**flop_registry, **_cpu_attention_flops()}


def _count_flops(func: Any, formula: Any, args: tuple, kwargs: Mapping[str, Any], out: Any) -> int:
    try:
        return int(formula(*args, **kwargs, out_val=out))
    except AssertionError:
        if "scaled_dot_product" not in func.__name__:
            raise
    # grouped-query attention (fewer key/value heads than query heads, `enable_gqa`): torch's
    # formula asserts equal heads. Count as if keys and values were repeated to the query's heads.
    backward = "backward" in func.__name__
    q, k, v = (args[1], args[2], args[3]) if backward else (args[0], args[1], args[2])
    b, h, s_q, d = q.shape
    s_k, d_v = k.shape[-2], v.shape[-1]
    forward_flops = 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v
    return int(forward_flops * 2.5) if backward else forward_flops


@dataclass
class _Measure:
    peak_bytes: int = 0
    reserved_peak_bytes: int | None = None
    flops: int = 0
    seconds: float = 0.0
    tracer: _Tracer | None = None


@contextmanager
def _measure(device: torch.device, step_generator: torch.Generator | None) -> Iterator[_Measure]:
    """Measure what runs inside: memory peak above the start, FLOPs, seconds, random draws."""
    result = _Measure()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        base_reserved = torch.cuda.memory_reserved(device)
    tracer = _Tracer(step_generator, track_memory=not cuda)
    start = time.perf_counter()
    with tracer:
        result.tracer = tracer
        yield result
    if cuda:
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start
    result.flops = tracer.flops
    if cuda:
        result.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        result.reserved_peak_bytes = torch.cuda.memory_stats(device)["reserved_bytes.all.peak"] - base_reserved
    else:
        result.peak_bytes = tracer.peak


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def value_kind(value: Any) -> str:
    """What a unit output is (see `ValueProfile.kind`): a tensor with a batch axis, or a list of
    per-sample values, all of one kind."""
    if value is None:
        return "none"
    if isinstance(value, torch.Tensor):
        return "tensor"
    if not isinstance(value, (list, tuple)):
        return f"object {type(value).__module__}.{type(value).__qualname__}"

    def one(x: Any) -> str:  # what comes back from the cache must be what went in (split == unsplit)
        if x is None:
            return "none"
        if isinstance(x, torch.Tensor):
            return "tensors"
        if isinstance(x, str):
            return "text"
        if isinstance(x, Path):
            return "object pathlib.Path (stage 2 would read a str: return str(path))"
        if isinstance(x, bool):
            return "object bool (stage 2 would read an int: return int(flag))"
        if isinstance(x, numbers.Integral):
            return "int"
        if isinstance(x, numbers.Real):
            return "float"
        if isinstance(x, tuple) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x):
            return "ints"
        if isinstance(x, list) and all(isinstance(v, numbers.Integral) for v in x):
            return "object list of ints (stage 2 would read a tuple: return tuple(values))"
        return f"object {type(x).__module__}.{type(x).__qualname__}"

    kinds = {one(x) for x in value} or {"none"}
    if kinds == {"int", "float"}:
        return "float"
    return kinds.pop() if len(kinds) == 1 else f"mixed {' and '.join(sorted(kinds))}"


def _value_profile(name: str, value: Any, tracer: _Tracer, unit: Unit, values: Mapping[str, Any]) -> ValueProfile:
    tensors = _tensors(value)
    labels = frozenset().union(*(tracer.labels(t) for t in tensors)) if tensors else frozenset()
    non_tensor_inputs = {n for n in unit.inputs if values.get(n) is not None and not _tensors(values[n])}
    depends = sorted((labels - {RANDOM}) & set(unit.inputs) | non_tensor_inputs)
    first = tensors[0] if tensors else None
    return ValueProfile(
        name=name,
        shape=tuple(first.shape) if first is not None else (),
        dtype=str(first.dtype).removeprefix("torch.") if first is not None else type(value).__name__,
        bytes=sum(t.numel() * t.element_size() for t in tensors),
        needs_grad=any(t.requires_grad for t in tensors),
        random=RANDOM in labels,
        depends_on=tuple(depends),
        kind=value_kind(value),
    )


def profile_unit(
    unit: Unit, values: Mapping[str, Any], ctx: UnitContext, random_inputs: set[str]
) -> tuple[UnitProfile, dict[str, Any]]:
    """Run `unit` once, measured. `random_inputs` are input names already derived from per-step
    random draws (their randomness propagates to outputs computed from them)."""
    with _measure(ctx.device, ctx.generator) as m:
        tracing = m.tracer
        assert tracing is not None  # _measure always traces
        for name in unit.inputs:
            for t in _tensors(values.get(name)):
                tracing.label(t, name)
                if name in random_inputs:
                    tracing.label(t, RANDOM)
        out = unit(values, ctx)
    tracer = m.tracer
    assert tracer is not None  # _measure always traces
    outputs = tuple(_value_profile(name, out[name], tracer, unit, values) for name in unit.outputs)
    random = [v for v in outputs if v.random]
    split = None
    reads_random = bool(random_inputs & set(unit.inputs))  # it may use them for shapes only
    if (random or reads_random) and not any(v.needs_grad for v in outputs):
        split = _profile_fission(unit, values, ctx, tuple(n for n in unit.inputs if n in random_inputs))
    profile = UnitProfile(
        name=unit.name,
        components=unit.components,
        peak_bytes=m.peak_bytes,
        flops=m.flops,
        seconds=m.seconds,
        outputs=outputs,
        needs_grad=any(v.needs_grad for v in outputs),
        random_ops=tuple(sorted(set(tracer.random_ops))),
        seeded_random_ops=tuple(sorted(set(tracer.seeded_ops))),
        fission=split,
    )
    return profile, out


def _profile_fission(unit: Unit, values: Mapping[str, Any], ctx: UnitContext, late: tuple[str, ...]) -> FissionProfile:
    """Run `unit` again under the fission recorder, then measure the replay of its random part
    (what it computes from its own draws and from the random inputs `late`)."""
    from autosplit.planning.fission import frontier_name, record, replay

    batch = next((len(v) for v in values.values() if isinstance(v, list)), 1)
    out, rec = record(unit, values, ctx, late=late)
    frontier = tuple(
        ValueProfile(
            frontier_name(unit.name, k),
            (1, *t.shape),
            str(t.dtype).removeprefix("torch."),
            t.numel() * t.element_size() * batch,
            False,
            False,
            unit.inputs,
        )
        for k, t in enumerate(rec.frontier)
    )
    peak = flops = 0
    seconds = 0.0
    if rec.problem is None:
        with _measure(ctx.device, ctx.generator) as m:
            replay(rec.graph, rec.frontier, {n: out[n] for n in rec.reads}, ctx, late={n: values[n] for n in late})
        peak, flops, seconds = m.peak_bytes, m.flops, m.seconds
    return FissionProfile(
        rec.dirty_outputs,
        rec.reads,
        frontier,
        len(rec.graph_bytes()),
        len(rec.graph["ops"]),
        peak,
        flops,
        seconds,
        rec.problem,
        late,
    )


def component_profiles(components: Mapping[str, Any]) -> tuple[ComponentProfile, ...]:
    profiles = []
    for name, component in components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        params = list(component.parameters()) + list(component.buffers())
        trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        total = sum(p.numel() * p.element_size() for p in params)
        profiles.append(ComponentProfile(name, total - trainable, trainable, sum(p.numel() for p in params)))
    return tuple(profiles)


def profile_graph(
    graph: UnitGraph, batch: Mapping[str, Any], ctx: UnitContext, *, pipeline: str, task: str, fake_mode: Any = None
) -> Profile:
    """Profile every unit of `graph` on `batch`, then one forward+backward step of the units
    whose outputs need gradients. Components in `ctx` must already be on `ctx.device` (fake ones
    built inside `fake_mode`), with trainable parameters marked `requires_grad`."""
    with fake_mode if fake_mode is not None else nullcontext():
        profile, _ = trace_graph(
            graph, batch, ctx, pipeline=pipeline, task=task, mode="fake" if fake_mode is not None else ctx.device.type
        )
    return profile


def trace_graph(
    graph: UnitGraph,
    batch: Mapping[str, Any],
    ctx: UnitContext,
    *,
    pipeline: str,
    task: str,
    mode: str,
    reuse: tuple[Profile, Mapping[str, Any]] | None = None,
    retrace: set[str] | None = None,
) -> tuple[Profile, dict[str, Any]]:
    """`profile_graph` inside an active (fake) mode. With `reuse` (an earlier trace and its values),
    only the units in `retrace` and the gradient step are traced again; the others keep their
    profiles and outputs."""
    with _gc_paused():
        values = dict(reuse[1]) if reuse else dict(batch)
        random_values: set[str] = set()
        units = []
        for unit in graph:
            if reuse and unit.name not in (retrace or set()):
                profile = reuse[0].unit(unit.name)
            else:
                profile, out = profile_unit(unit, values, ctx, random_values)
                values.update(out)
            units.append(profile)
            random_values |= {v.name for v in profile.outputs if v.random}
        grad_units = [u for u in graph if _unit_needs_grad(u.name, units)]
        step = _profile_grad_step(graph, grad_units, values, ctx)
        components = component_profiles(ctx.components)
    batch_size = next((len(v) for v in batch.values() if isinstance(v, list)), 1)
    absent = [name for name in graph.sources if batch.get(name) is None]  # optional columns the dataset lacks
    whole = Profile(
        pipeline=pipeline,
        task=task,
        mode=mode,
        batch_size=batch_size,
        units=tuple(units),
        components=components,
        grad_step=step,
        notes={"absent_sources": absent} if absent else {},
    )
    return whole, values


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Collect once, then keep the cycle collector off: a collection in the middle of a unit would
    free (or not) by chance, and one per unit costs ~0.2 s with a 20 B-parameter model built."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _unit_needs_grad(name: str, units: list[UnitProfile]) -> bool:
    return next(u for u in units if u.name == name).needs_grad


def _profile_grad_step(
    graph: UnitGraph, grad_units: list[Unit], values: dict[str, Any], ctx: UnitContext
) -> StepProfile:
    """Forward + backward of the gradient-carrying units, inputs detached as a cache would give them."""
    produced = {v for u in grad_units for v in u.outputs}
    inputs = {}
    for unit in grad_units:
        for name in unit.inputs:
            if name not in produced:
                value = values.get(name)  # an optional input the dataset lacks is None
                inputs[name] = value.detach() if isinstance(value, torch.Tensor) else value
    if not grad_units:
        return StepProfile((), 0, 0, 0.0)
    with _measure(ctx.device, ctx.generator) as m:
        out = dict(inputs)
        for unit in grad_units:
            out.update(unit(out, ctx))
        loss: Any = out[graph.loss]
        loss.backward()
        del out, loss
    for component in ctx.components.values():
        if isinstance(component, torch.nn.Module):
            component.zero_grad(set_to_none=True)
    return StepProfile(tuple(u.name for u in grad_units), m.peak_bytes, m.flops, m.seconds, m.reserved_peak_bytes)


@contextmanager
def fake_safe_module_to() -> Iterator[None]:
    """`nn.Module.to` that works on modules of fake tensors (pytorch#170781: swapping fails there):
    converted tensors are assigned instead of swapped. Use only while building fake models."""
    original = torch.nn.Module.to

    def to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        for module in self.modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in list(store.items()):
                    if tensor is None:
                        continue
                    converted = tensor.to(*args, **kwargs)
                    if converted is tensor:
                        continue
                    if isinstance(tensor, torch.nn.Parameter):
                        converted = torch.nn.Parameter(converted, requires_grad=tensor.requires_grad)
                    store[name] = converted  # type: ignore[assignment]
        return self

    torch.nn.Module.to = to  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.to = original  # type: ignore[method-assign]


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def new_fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_build(fake_mode: Any, dtype: torch.dtype) -> ExitStack:
    """Context for building models as fake CPU tensors in `dtype` (see shared/FACTS.md)."""
    stack = ExitStack()
    stack.enter_context(fake_mode)
    stack.enter_context(fake_safe_module_to())
    stack.enter_context(default_dtype(dtype))
    return stack
