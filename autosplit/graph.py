"""Units and the graph they form.

A unit is one named computation of a training step. It declares the values it reads (`inputs`),
the values it writes (`outputs`) and the pipeline components it uses; its function maps a dict of
input values to a dict of output values and never reaches into global state. Random numbers come
from `ctx.generator`, which the trainer seeds per step, so a run is reproducible and split and
unsplit runs draw the same numbers.

Units may be written as other frameworks write them (docs/units.md): an input listed in
`optional` may be absent (the unit reads None; a dataset may or may not have the column), and a
unit with optional inputs may then return only some of its outputs (the others are None). A unit
that lists a value among both its inputs and its outputs rewrites it (rounds `height` up, resizes
`edit_image`): the graph names the new version `height.v2`, and units declared after it read that
version, units declared before it the one before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from autosplit.errors import GraphError


@dataclass
class UnitContext:
    """What a unit may use besides its inputs.

    `components` maps component names (`vae`, `text_encoder`, ...) to loaded objects; only the
    components the unit declares are guaranteed to be present. `generator` is the per-step RNG.
    """

    components: Mapping[str, Any]
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


UnitFn = Callable[[Mapping[str, Any], UnitContext], dict[str, Any]]


@dataclass(frozen=True)
class Unit:
    """One computation of a training step.

    `draws_random` declares that the unit consumes `ctx.generator` (per-step randomness);
    the profiler checks declarations against what the unit really does. `optional` names inputs
    that may be absent: the unit then reads None for them, and may leave out outputs (None).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fn: UnitFn
    components: tuple[str, ...] = ()
    draws_random: bool = False
    doc: str = ""
    optional: tuple[str, ...] = ()

    def __call__(self, values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
        missing = [name for name in self.inputs if name not in values and name not in self.optional]
        if missing:
            raise GraphError(f"unit {self.name!r} is missing inputs {missing}")
        out = self.fn({name: values.get(name) for name in self.inputs}, ctx)
        if not isinstance(out, dict):
            raise GraphError(f"unit {self.name!r} returned a {type(out).__name__}, not a dict of its outputs")
        extra = sorted(set(out) - set(self.outputs))
        left_out = [name for name in self.outputs if name not in out]
        if extra or (left_out and not self.optional):
            raise GraphError(f"unit {self.name!r} returned {sorted(out)} but declares outputs {sorted(self.outputs)}")
        return {name: out.get(name) for name in self.outputs}


class UnitGraph:
    """The units of one pipeline and task, in a valid execution order.

    `sources` are the values a dataset sample provides (`image_path`, `prompt`, ...). The graph
    checks that every input is produced by exactly one unit or is a source, and that there is no
    cycle; it raises GraphError naming the unit and value otherwise.
    """

    def __init__(self, units: list[Unit], *, sources: tuple[str, ...], loss: str = "loss"):
        self.sources = tuple(sources)
        self.producer: dict[str, str] = {}
        #: value -> its versions, oldest first, when units rewrite it (`height`, `height.v2`)
        self.versions: dict[str, tuple[str, ...]] = {}
        units = self._versioned(units)
        self.loss = self.versions.get(loss, (loss,))[-1]
        loss = self.loss
        by_name: dict[str, Unit] = {}
        for unit in units:
            if unit.name in by_name:
                raise GraphError(f"two units are named {unit.name!r}; unit names must be unique")
            by_name[unit.name] = unit
            for value in unit.outputs:
                if value in self.sources:
                    raise GraphError(
                        f"unit {unit.name!r} outputs {value!r}, which is a dataset source; to rewrite it, "
                        f"list {value!r} among the unit's inputs too"
                    )
                if value in self.producer:
                    raise GraphError(
                        f"value {value!r} is produced by both {self.producer[value]!r} and {unit.name!r}; a unit "
                        f"that rewrites it lists it among its inputs too and is declared after the unit that makes it"
                    )
                self.producer[value] = unit.name
        for unit in units:
            for value in unit.inputs:
                if value not in self.producer and value not in self.sources:
                    raise GraphError(
                        f"unit {unit.name!r} reads {value!r}, which no unit produces and the dataset "
                        f"does not provide (sources: {list(self.sources)})"
                    )
        if loss not in self.producer:
            raise GraphError(f"no unit produces the loss value {loss!r}")
        self.units: dict[str, Unit] = {name: by_name[name] for name in self._topological_order(by_name)}

    def _versioned(self, units: list[Unit]) -> list[Unit]:
        """`units` with rewritten values renamed: a unit reading and writing `v` that a source or a
        unit declared before it provides writes `v.v2` (then `v.v3`, ...), and units declared after
        it read the newest version. (Reading and writing a value nothing provides before is a cycle.)"""
        known = set(self.sources)
        current: dict[str, str] = {}
        out = []
        for unit in units:
            reads = {v: current[v] for v in unit.inputs if v in current}
            writes = {}
            for v in unit.outputs:
                if v in unit.inputs and v in known:
                    versions = self.versions.get(v, (v,))
                    self.versions[v] = (*versions, f"{v}.v{len(versions) + 1}")
                    current[v] = writes[v] = self.versions[v][-1]
            known |= set(unit.outputs)
            out.append(_renamed(unit, reads, writes) if reads or writes else unit)
        return out

    def _topological_order(self, by_name: dict[str, Unit]) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join(path[path.index(name) :] + [name])
                raise GraphError(f"the unit graph has a cycle: {cycle}")
            state[name] = 1
            for value in by_name[name].inputs:
                if value in self.producer:
                    visit(self.producer[value], path + [name])
            state[name] = 2
            order.append(name)

        for name in by_name:  # declaration order breaks ties, so the order is stable
            visit(name, [])
        return order

    def __iter__(self):
        return iter(self.units.values())

    def __getitem__(self, name: str) -> Unit:
        return self.units[name]

    def consumers(self, value: str) -> list[str]:
        return [u.name for u in self.units.values() if value in u.inputs]

    def upstream_units(self, name: str) -> set[str]:
        """Names of all units whose outputs `name` depends on, transitively."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            for value in self.units[stack.pop()].inputs:
                producer = self.producer.get(value)
                if producer is not None and producer not in seen:
                    seen.add(producer)
                    stack.append(producer)
        return seen


def unit(
    *, outputs: tuple[str, ...], components: tuple[str, ...] = (), name: str | None = None, doc: str = ""
) -> Callable[[Callable[..., dict[str, Any]]], Unit]:
    """Make a Unit of a function that takes the step context and then its inputs by name, the way
    DiffSynth-Studio's units take theirs (`process(self, pipe, input_image, noise, edit_image=None)`):
    the parameters after the first are the unit's inputs, and those with a default are optional (an
    absent one gets its default).

        @unit(outputs=("input_latents", "latents"), components=("vae",))
        def input_image(ctx, image, noise):
            return {"input_latents": ctx.components["vae"].encode(image).latent_dist.mode(), "latents": noise}

    Raises GraphError for a function with `*args`/`**kwargs` or without the context parameter."""
    import inspect

    def make(fn: Callable[..., dict[str, Any]]) -> Unit:
        params = list(inspect.signature(fn).parameters.values())
        if not params or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            raise GraphError(
                f"@unit {fn.__name__}: take the context first and then each input by name (no *args or **kwargs)"
            )
        inputs = tuple(p.name for p in params[1:])
        optional = tuple(p.name for p in params[1:] if p.default is not p.empty)

        def call(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
            given = {k: v for k, v in values.items() if v is not None or k not in optional}
            return fn(ctx, **given)  # an absent optional input gets the function's default

        return Unit(
            name or fn.__name__,
            inputs,
            tuple(outputs),
            call,
            tuple(components),
            doc=doc or (fn.__doc__ or "").strip(),
            optional=optional,
        )

    return make


def _renamed(unit: Unit, reads: dict[str, str], writes: dict[str, str]) -> Unit:
    """`unit` reading the value versions `reads` maps its inputs to and writing the versions `writes`
    maps its outputs to; its function still sees the names it was written with."""
    inputs = {v: reads.get(v, v) for v in unit.inputs}
    outputs = {v: writes.get(v, v) for v in unit.outputs}
    if inputs == {v: v for v in inputs} and outputs == {v: v for v in outputs}:
        return unit

    def fn(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
        out = unit.fn({v: values[inputs[v]] for v in unit.inputs}, ctx)
        return {outputs.get(k, k): value for k, value in out.items()} if isinstance(out, dict) else out

    return Unit(
        unit.name,
        tuple(inputs.values()),
        tuple(outputs.values()),
        fn,
        unit.components,
        unit.draws_random,
        unit.doc,
        tuple(inputs[v] for v in unit.optional if v in inputs),
    )


def run_units(units: list[Unit], values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """Run `units` in order on `values`, returning the values dict extended with their outputs."""
    out = dict(values)
    for unit in units:
        out.update(unit(out, ctx))
    return out
