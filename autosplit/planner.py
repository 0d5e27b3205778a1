"""Plans: which units run in stage 1, which in stage 2, and which values cross the cut.

A plan is data. `autosplit run` executes a plan and nothing else decides. This first planner
places units by rule (the measuring planner replaces the rules with profiles and keeps the
format): a unit runs in stage 2 if it uses a trainable component, draws per-step random numbers,
or reads a value a stage-2 unit produces; every other unit is frozen and deterministic and runs
once per sample in stage 1. The values stage-1 units produce and stage-2 units read are cached.
An unsplit plan (`split=False`) has the same placements; the trainer then computes the stage-1
values every step instead of reading them from a cache, which is the baseline split runs match.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autosplit.errors import PlanError
from autosplit.graph import UnitGraph

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class UnitPlacement:
    """Where one unit runs and why."""

    name: str
    stage: int
    reason: str
    components: tuple[str, ...] = ()


@dataclass(frozen=True)
class CachedValue:
    """A value stage 1 writes and stage 2 reads, per sample.

    `ragged_axis` is the per-sample axis padded in batches (text tokens); `max_len` caps it.
    `shape`/`dtype`/`bytes_per_sample` are filled in when a sample has been measured.
    """

    name: str
    producer: str
    ragged_axis: int | None = None
    max_len: int | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    bytes_per_sample: int | None = None


@dataclass(frozen=True)
class Plan:
    """The split of one pipeline + task. Serialized as plan.json (see docs/plan-format.md)."""

    pipeline: str
    task: str
    split: bool
    trainable: tuple[str, ...]
    units: tuple[UnitPlacement, ...]
    cached: tuple[CachedValue, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_FORMAT_VERSION

    def stage_units(self, stage: int) -> list[str]:
        return [u.name for u in self.units if u.stage == stage]

    def components(self, stage: int) -> list[str]:
        """Components that `stage` must build, in first-use order."""
        names: list[str] = []
        for unit in self.units:
            if unit.stage == stage:
                names += [c for c in unit.components if c not in names]
        return names

    def cached_value(self, name: str) -> CachedValue:
        return next(v for v in self.cached if v.name == name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if data.get("version") != PLAN_FORMAT_VERSION:
            raise PlanError(f"plan format version {data.get('version')!r} is not {PLAN_FORMAT_VERSION}; "
                            f"re-run `autosplit plan`")
        return cls(
            pipeline=data["pipeline"], task=data["task"], split=data["split"],
            trainable=tuple(data["trainable"]),
            units=tuple(UnitPlacement(u["name"], u["stage"], u["reason"], tuple(u["components"]))
                        for u in data["units"]),
            cached=tuple(CachedValue(**{**v, "shape": tuple(v["shape"]) if v.get("shape") else None})
                         for v in data["cached"]),
            settings=data.get("settings", {}), version=data["version"],
        )

    @classmethod
    def load(cls, path: Path) -> "Plan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PlanError(f"{path}: not a readable plan.json ({exc}); re-run `autosplit plan`") from exc

    def check_graph(self, graph: UnitGraph) -> None:
        """Raise PlanError if the plan was made for a different graph."""
        if [u.name for u in self.units] != list(graph.units):
            raise PlanError(f"plan units {[u.name for u in self.units]} do not match the graph's "
                            f"{list(graph.units)}; re-run `autosplit plan`")


def make_plan(graph: UnitGraph, *, pipeline: str, task: str, trainable: tuple[str, ...], split: bool = True,
              layouts: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> Plan:
    """Place each unit of `graph` in stage 1 or 2 and list the values that cross the cut."""
    layouts = layouts or {}
    stage: dict[str, int] = {}
    placements = []
    for unit in graph:  # topological order: producers are placed before consumers
        uses_trainable = [c for c in unit.components if c in trainable]
        late_inputs = [v for v in unit.inputs if stage.get(graph.producer.get(v, ""), 1) == 2]
        if uses_trainable:
            where, reason = 2, f"stage 2: uses trainable {', '.join(uses_trainable)} (outputs need grad)"
        elif unit.draws_random:
            where, reason = 2, "stage 2: draws per-step random numbers"
        elif late_inputs:
            where, reason = 2, f"stage 2: reads {', '.join(late_inputs)} from stage 2"
        else:
            where, reason = 1, ("stage 1: frozen and deterministic, runs once per sample" if split else
                                "stage 1 part: frozen and deterministic; unsplit run computes it every step")
        stage[unit.name] = where
        placements.append(UnitPlacement(unit.name, where, reason, unit.components))

    cached = []
    for unit in graph:
        if stage[unit.name] != 1:
            continue
        for value in unit.outputs:
            if any(stage[c] == 2 for c in graph.consumers(value)):
                layout = layouts.get(value)
                cached.append(CachedValue(value, unit.name,
                                          ragged_axis=getattr(layout, "ragged_axis", None),
                                          max_len=getattr(layout, "max_len", None)))
    placements = [
        UnitPlacement(p.name, p.stage, p.reason + _caches_note(p, cached), p.components) for p in placements
    ]
    return Plan(pipeline=pipeline, task=task, split=split, trainable=tuple(trainable), units=tuple(placements),
                cached=tuple(cached), settings=dict(settings or {}))


def _caches_note(placement: UnitPlacement, cached: list[CachedValue]) -> str:
    names = [v.name for v in cached if v.producer == placement.name]
    return f"; caches {', '.join(names)}" if names else ""


def with_measured_values(plan: Plan, measured: dict[str, tuple[tuple[int, ...], str, int]]) -> Plan:
    """Return `plan` with shape, dtype and bytes per sample filled in for each cached value."""
    cached = []
    for v in plan.cached:
        if v.name in measured:
            shape, dtype, nbytes = measured[v.name]
            v = CachedValue(v.name, v.producer, v.ragged_axis, v.max_len, tuple(shape), dtype, nbytes)
        cached.append(v)
    return Plan(plan.pipeline, plan.task, plan.split, plan.trainable, plan.units, tuple(cached),
                plan.settings, plan.version)
