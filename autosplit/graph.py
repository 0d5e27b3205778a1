"""Units and the graph they form.

A unit is one named computation of a training step. It declares the values it reads (`inputs`),
the values it writes (`outputs`) and the pipeline components it uses; its function maps a dict of
input values to a dict of output values and never reaches into global state. Random numbers come
from `ctx.generator`, which the trainer seeds per step, so a run is reproducible and split and
unsplit runs draw the same numbers.
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
    the profiler checks declarations against what the unit really does.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fn: UnitFn
    components: tuple[str, ...] = ()
    draws_random: bool = False
    doc: str = ""

    def __call__(self, values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
        missing = [name for name in self.inputs if name not in values]
        if missing:
            raise GraphError(f"unit {self.name!r} is missing inputs {missing}")
        out = self.fn({name: values[name] for name in self.inputs}, ctx)
        if set(out) != set(self.outputs):
            raise GraphError(f"unit {self.name!r} returned {sorted(out)} but declares outputs {sorted(self.outputs)}")
        return out


class UnitGraph:
    """The units of one pipeline and task, in a valid execution order.

    `sources` are the values a dataset sample provides (`image_path`, `prompt`, ...). The graph
    checks that every input is produced by exactly one unit or is a source, and that there is no
    cycle; it raises GraphError naming the unit and value otherwise.
    """

    def __init__(self, units: list[Unit], *, sources: tuple[str, ...], loss: str = "loss"):
        self.sources = tuple(sources)
        self.loss = loss
        self.producer: dict[str, str] = {}
        by_name: dict[str, Unit] = {}
        for unit in units:
            if unit.name in by_name:
                raise GraphError(f"two units are named {unit.name!r}; unit names must be unique")
            by_name[unit.name] = unit
            for value in unit.outputs:
                if value in self.sources:
                    raise GraphError(f"unit {unit.name!r} outputs {value!r}, which is a dataset source")
                if value in self.producer:
                    raise GraphError(f"value {value!r} is produced by both {self.producer[value]!r} and {unit.name!r}")
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


def run_units(units: list[Unit], values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """Run `units` in order on `values`, returning the values dict extended with their outputs."""
    out = dict(values)
    for unit in units:
        out.update(unit(out, ctx))
    return out
