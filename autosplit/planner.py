"""Plans: which units run in stage 1, which in stage 2, and which values cross the cut.

A plan is data. `autosplit run` executes a plan and nothing else decides (docs/algorithm.md).

Constraints: a unit may run in stage 1 only if it uses no trainable component, none of its
outputs needs gradients, it draws no per-step random numbers (randomness from a generator
seeded by the sample is deterministic and allowed), and everything it reads is available in
stage 1. With a profile these facts are measured; without one they come from the units'
declarations. Among valid cuts `autosplit.cut` picks the lowest stage-2 memory, then the least
stage-2 compute, then the fewest cached bytes.

An unsplit plan (`split=False`) has the same placements; the trainer then computes the stage-1
values every step instead of reading them from a cache, which is the baseline split runs match.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autosplit.cut import CutProblem, solve_enumerate, solve_mincut
from autosplit.errors import PlanError
from autosplit.graph import Unit, UnitGraph
from autosplit.fission import (MAX_GRAPH_BYTES, graph_name, recording_unit, replay_inputs, replay_unit,
                               split_outputs)
from autosplit.profiler import FissionProfile, Profile

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class UnitPlacement:
    """Where one unit runs and why."""

    name: str
    stage: int
    reason: str
    components: tuple[str, ...] = ()
    peak_bytes: int | None = None
    flops: int | None = None
    seconds: float | None = None
    needs_grad: bool | None = None
    random_ops: tuple[str, ...] = ()
    #: split inside (stage 1 caches its clean part; stage 2 replays these random outputs)
    replays: tuple[str, ...] = ()
    #: clean outputs the replay reads, and how many frontier tensors it reads (see autosplit.fission)
    replay_reads: tuple[str, ...] = ()
    frontier: int = 0


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
    #: predicted bytes and FLOPs (see `predict`); empty without a profile
    predicted: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_FORMAT_VERSION

    def stage_units(self, stage: int) -> list[str]:
        """Units that run in `stage`, in order; a split unit is in both (its replay in stage 2)."""
        return [u.name for u in self.units if u.stage == stage or (stage == 2 and u.replays)]

    def runnable_units(self, graph: UnitGraph, stage: int) -> list[Unit]:
        """The units `stage` runs, from `graph`: a split unit records (stage 1) or replays (stage 2)."""
        units = []
        for placement in self.units:
            unit = graph[placement.name]
            if placement.replays and placement.stage == 1:
                make = recording_unit if stage == 1 else replay_unit
                units.append(make(unit, placement.replays, placement.frontier, placement.replay_reads))
            elif placement.stage == stage:
                units.append(unit)
        return units

    def components(self, stage: int) -> list[str]:
        """Components that `stage` must build, in first-use order."""
        names: list[str] = []
        for unit in self.units:
            if unit.stage == stage:
                names += [c for c in unit.components if c not in names]
        return names

    def cut_signature(self) -> dict[str, Any]:
        """The decision alone (placements and cached values), without measurements or settings:
        what a cache made under this plan depends on."""
        return {"pipeline": self.pipeline, "task": self.task, "trainable": list(self.trainable),
                "units": [[u.name, u.stage, list(u.components), list(u.replays), list(u.replay_reads), u.frontier]
                          for u in self.units],
                "cached": [[v.name, v.producer, v.ragged_axis, v.max_len] for v in self.cached]}

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
            units=tuple(UnitPlacement(**{**u, "components": tuple(u["components"]),
                                         "random_ops": tuple(u.get("random_ops", ())),
                                         "replays": tuple(u.get("replays", ())),
                                         "replay_reads": tuple(u.get("replay_reads", ()))}) for u in data["units"]),
            cached=tuple(CachedValue(**{**v, "shape": tuple(v["shape"]) if v.get("shape") else None})
                         for v in data["cached"]),
            settings=data.get("settings", {}), predicted=data.get("predicted", {}), version=data["version"],
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


#: `CachedValue.producer` of a dataset source a stage-2 unit reads: stage 1 caches it as a tensor
#: (text as UTF-8 bytes, numbers as int64/float64) and stage 2 turns it back into Python values
SOURCE = "dataset"

ENUMERATION_LIMIT = 16  # eligible units up to which the exact search is used


@dataclass(frozen=True)
class _Facts:
    """What the planner knows of one unit: measured (profile) or declared."""

    uses_trainable: tuple[str, ...]
    needs_grad: bool
    random_ops: tuple[str, ...]
    peak_bytes: int
    flops: int
    #: outputs computed without per-step randomness or gradients (cacheable on their own)
    clean_outputs: tuple[str, ...]


def _facts(unit: Unit, trainable: tuple[str, ...], profile: Profile | None) -> _Facts:
    uses = tuple(c for c in unit.components if c in trainable)
    if profile is None:
        random_ops = ("declared",) if unit.draws_random else ()
        return _Facts(uses, bool(uses), random_ops, 0, 0, ())
    measured = profile.unit(unit.name)
    random_ops = measured.random_ops or (("declared",) if unit.draws_random else ())
    clean = tuple(v.name for v in measured.outputs if not v.random and not v.needs_grad)
    return _Facts(uses, measured.needs_grad or bool(uses), random_ops, measured.peak_bytes, measured.flops, clean)


def _forced_reason(facts: _Facts, unit: Unit, profile: Profile | None, split: bool, batch_size: int) -> str | None:
    if facts.uses_trainable:
        return f"stage 2: uses trainable {', '.join(facts.uses_trainable)} (outputs need grad)"
    if facts.needs_grad:
        return "stage 2: outputs need grad"
    if facts.random_ops:
        ops = "declared draws_random" if facts.random_ops == ("declared",) else ", ".join(facts.random_ops)
        note = ""
        partial = [v for v in facts.clean_outputs if v in unit.outputs]
        if partial and len(partial) < len(unit.outputs):
            f = profile.unit(unit.name).fission if profile is not None else None
            which = ", ".join(partial)
            if f is None:
                note = f"; {which} alone would be cacheable: split the unit to cache them"
            elif f.problem is not None:
                note = f"; {which} alone would be cacheable, but it cannot be split: {f.problem}"
            elif split and batch_size != 1:
                note = f"; {which} would be cached by splitting the unit, which needs --batch_size 1"
        return f"stage 2: draws per-step random numbers ({ops}){note}"
    return None


def make_plan(graph: UnitGraph, *, pipeline: str, task: str, trainable: tuple[str, ...], split: bool = True,
              layouts: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
              profile: Profile | None = None, batch_size: int = 1, solver: str = "auto") -> Plan:
    """Place each unit of `graph` in stage 1 or 2 and list the values that cross the cut.

    `profile` supplies measured memory, FLOPs, gradients and randomness; `solver` is "auto",
    "enumerate" or "mincut". A unit with both random and cacheable outputs is offered to the
    solver as two parts (its clean part and the replay of its random part, autosplit.fission)
    when the profile could record it and stage 2 trains with batch size 1. Raises PlanError if
    the profile does not match the graph.
    """
    if profile is not None and [u.name for u in profile.units] != list(graph.units):
        raise PlanError(f"profile units {[u.name for u in profile.units]} do not match the graph's "
                        f"{list(graph.units)}; re-run `autosplit profile`")
    layouts = dict(layouts or {})
    fissions = _fissions(graph, profile, split, batch_size, trainable)
    parts = _planning_graph(graph, fissions)
    facts = {u.name: _facts(u, trainable, profile) for u in graph}
    forced = {u.name: _forced_reason(facts[u.name], u, profile, split, batch_size) for u in graph}
    for name, f in fissions.items():
        facts[replay_name(name)] = dataclasses.replace(facts[name], peak_bytes=f.peak_bytes, flops=f.flops)
        forced[replay_name(name)] = forced.pop(name)
        facts[name] = dataclasses.replace(facts[name], random_ops=(), flops=max(facts[name].flops - f.flops, 0))
        forced[name] = None
        layouts[graph_name(name)] = _GraphLayout()
    problem = _problem(parts, facts, forced, profile, batch_size, fissions)
    eligible = len(parts.units) - len(problem.forced_stage2)
    if solver == "auto":
        solver = "enumerate" if eligible <= ENUMERATION_LIMIT else "mincut"
    stage1 = solve_enumerate(problem) if solver == "enumerate" else solve_mincut(problem)
    cached = _cached_values(parts, stage1, layouts, profile, fissions)
    placements = tuple(_placement(u, stage1, forced.get(u.name) or forced.get(replay_name(u.name)), facts[u.name],
                                  parts, cached, profile, split, fissions.get(u.name)) for u in graph)
    plan = Plan(pipeline=pipeline, task=task, split=split, trainable=tuple(trainable), units=placements,
                cached=tuple(cached), settings=dict(settings or {}))
    if profile is None:
        return plan
    return replace_predicted(plan, predict(plan, profile, batch_size=batch_size))


@dataclass(frozen=True)
class _GraphLayout:
    """A split unit's recorded graph is cached as ragged JSON bytes."""

    ragged_axis: int = 0
    max_len: int = MAX_GRAPH_BYTES


def replay_name(unit: str) -> str:
    return f"{unit}@replay"


def _fissions(graph: UnitGraph, profile: Profile | None, split: bool, batch_size: int,
              trainable: tuple[str, ...]) -> dict[str, FissionProfile]:
    """Units the solver may split: recorded without a problem, in a split run with batch size 1, and
    with a deterministic part worth caching (a cacheable output, or weights it uses)."""
    if profile is None or not split or batch_size != 1:
        return {}
    found = {}
    for unit in graph:
        measured = profile.unit(unit.name)
        f = measured.fission
        if f is None or f.problem is not None or any(c in trainable for c in unit.components):
            continue  # a trainable component's outputs need grad: the unit is not cacheable at all
        if not {v.name for v in measured.outputs if v.random} <= set(f.dirty_outputs):
            continue  # the recorder missed a random output the tracer saw: never cache it
        # worth splitting only if the deterministic part yields an output or uses weights
        if len(f.dirty_outputs) < len(unit.outputs) or any(profile.component(c) is not None for c in unit.components):
            found[unit.name] = f
    return found


def _planning_graph(graph: UnitGraph, fissions: dict[str, FissionProfile]) -> UnitGraph:
    """`graph` with each unit in `fissions` as two: its clean part and the replay of its random part."""
    if not fissions:
        return graph
    units: list[Unit] = []
    for unit in graph:
        f = fissions.get(unit.name)
        if f is None:
            units.append(unit)
            continue
        n = len(f.frontier)
        units.append(Unit(unit.name, unit.inputs, split_outputs(unit, f.dirty_outputs, n), unit.fn, unit.components))
        units.append(Unit(replay_name(unit.name), replay_inputs(unit.name, f.reads, n), f.dirty_outputs, unit.fn))
    return UnitGraph(units, sources=graph.sources, loss=graph.loss)


def _graph_of(value: str, fissions: dict[str, FissionProfile]) -> FissionProfile | None:
    """The split unit whose recorded graph `value` is, if it is one."""
    return next((f for name, f in fissions.items() if graph_name(name) == value), None)


def _per_sample(profile: Profile | None, value: str, fissions: dict[str, FissionProfile]) -> int:
    if profile is None:
        return 0
    recorded = _graph_of(value, fissions)
    if recorded is not None:
        return recorded.graph_bytes
    return profile.value(value).bytes // max(profile.batch_size, 1)


def _problem(graph: UnitGraph, facts: dict[str, _Facts], forced: dict[str, str | None], profile: Profile | None,
             batch_size: int, fissions: dict[str, FissionProfile]) -> CutProblem:
    component_bytes = {c.name: c.frozen_bytes + c.trainable_bytes for c in (profile.components if profile else ())}
    users: dict[str, set[str]] = {}
    for unit in graph:
        for c in unit.components:
            users.setdefault(c, set()).add(unit.name)
    values = {}
    for unit in graph:
        for value in unit.outputs:
            consumers = frozenset(graph.consumers(value))
            if consumers:
                sample = _per_sample(profile, value, fissions)
                values[value] = (unit.name, consumers, sample * batch_size, sample)
    return CutProblem(
        units=tuple(graph.units),
        forced_stage2=frozenset(n for n, reason in forced.items() if reason),
        producers={u.name: frozenset(graph.producer[v] for v in u.inputs if v in graph.producer) for u in graph},
        unit_cost={n: (0 if forced[n] else f.peak_bytes, f.flops) for n, f in facts.items()},
        components={c: (component_bytes.get(c, 0), frozenset(u)) for c, u in users.items()},
        values=values,
    )


def _cached_values(graph: UnitGraph, stage1: frozenset[str], layouts: dict[str, Any],
                   profile: Profile | None, fissions: dict[str, FissionProfile]) -> list[CachedValue]:
    cached = []
    for source in graph.sources:  # dataset values a stage-2 unit reads (the prompt, when text encoding trains)
        if any(c not in stage1 for c in graph.consumers(source)):
            layout = layouts.get(source)
            cached.append(CachedValue(source, SOURCE, ragged_axis=getattr(layout, "ragged_axis", None),
                                      max_len=getattr(layout, "max_len", None)))
    for unit in graph:
        if unit.name not in stage1:
            continue
        for value in unit.outputs:
            if any(c not in stage1 for c in graph.consumers(value)):
                layout = layouts.get(value)
                shape = dtype = nbytes = None
                if profile is not None and _graph_of(value, fissions) is not None:
                    nbytes = _per_sample(profile, value, fissions)
                    shape, dtype = (nbytes,), "uint8"
                elif profile is not None:
                    measured = profile.value(value)
                    shape, dtype = measured.shape[1:], measured.dtype
                    nbytes = _per_sample(profile, value, fissions)
                cached.append(CachedValue(value, unit.name, ragged_axis=getattr(layout, "ragged_axis", None),
                                          max_len=getattr(layout, "max_len", None), shape=shape, dtype=dtype,
                                          bytes_per_sample=nbytes))
    return cached


def _placement(unit: Unit, stage1: frozenset[str], forced: str | None, facts: _Facts, graph: UnitGraph,
               cached: list[CachedValue], profile: Profile | None, split: bool,
               fission: FissionProfile | None) -> UnitPlacement:
    measured = profile.unit(unit.name) if profile else None
    if fission is not None and unit.name in stage1:
        names = [v for v in cached if v.producer == unit.name]
        size = sum(v.bytes_per_sample or 0 for v in names)
        kept = [v.name for v in names if not v.name.startswith(unit.name + ".")]
        ops = ", ".join(measured.random_ops)
        parts = [*kept, *([f"{len(fission.frontier)} frontier tensors"] if fission.frontier else []),
                 "the recorded graph"]
        reason = (f"split: stage 1 caches {', '.join(parts[:-1])} and {parts[-1]}, {_kib(size)} per sample; "
                  f"stage 2 replays the random part ({ops}, {fission.ops} ops) without "
                  f"{', '.join(unit.components) or 'the unit'}")
        return UnitPlacement(unit.name, 1, reason, unit.components, peak_bytes=measured.peak_bytes,
                             flops=measured.flops, seconds=measured.seconds, needs_grad=False,
                             random_ops=measured.random_ops, replays=fission.dirty_outputs,
                             replay_reads=fission.reads, frontier=len(fission.frontier))
    if fission is not None:
        facts = dataclasses.replace(facts, random_ops=measured.random_ops)
        late = [v for v in unit.inputs if graph.producer.get(v) and graph.producer[v] not in stage1]
        why = f"reads {', '.join(late)} from stage 2" if late else "is cheaper to recompute than to cache"
        forced = f"{forced}; its deterministic part {why}, so it is not split"
    if unit.name in stage1:
        names = [v for v in cached if v.producer == unit.name]
        caches = ""
        if names:
            parts = [f"{v.name}" + (f" {_kib(v.bytes_per_sample)}" if v.bytes_per_sample is not None else "")
                     for v in names]
            caches = "; caches " + ", ".join(parts) + (" per sample" if profile else "")
        reason = ("stage 1: frozen and deterministic, runs once per sample" if split else
                  "stage 1 part: frozen and deterministic; unsplit run computes it every step") + caches
        stage = 1
    else:
        late = [v for v in unit.inputs if graph.producer.get(v) and graph.producer[v] not in stage1]
        reason = forced or (f"stage 2: reads {', '.join(late)} from stage 2" if late else
                            "stage 2: cheaper to run every step than to cache (lower stage-2 memory)")
        stage = 2
    return UnitPlacement(unit.name, stage, reason, unit.components,
                         peak_bytes=measured.peak_bytes if measured else None,
                         flops=measured.flops if measured else None,
                         seconds=measured.seconds if measured else None,
                         needs_grad=facts.needs_grad if measured else None, random_ops=facts.random_ops)


def _kib(nbytes: int) -> str:
    return f"{nbytes / 1024:.1f} KiB" if nbytes < 1 << 20 else f"{nbytes / (1 << 20):.2f} MiB"


def predict(plan: Plan, profile: Profile, *, batch_size: int = 1) -> dict[str, Any]:
    """Predicted peak memory (bytes) of stage 1, stage 2 and unsplit training, and stage-2 FLOPs.

    stage 2 = components its units use + AdamW state (2x the trainable bytes) + the cached batch +
    the larger of the gradient step's peak and any frozen stage-2 unit's peak. Unsplit = every
    component + AdamW state + the larger of any stage-1 unit's peak and the stage-2 activations.
    """
    comp = {c.name: c for c in profile.components}
    stage1 = {u.name for u in plan.units if u.stage == 1}
    grad_units = set(profile.grad_step.units)

    def resident(names: list[str]) -> int:
        return sum(comp[n].frozen_bytes + comp[n].trainable_bytes for n in names if n in comp)

    optimizer = 2 * sum(c.trainable_bytes for c in profile.components)
    batch = sum(v.bytes_per_sample or 0 for v in plan.cached) * batch_size
    frozen2 = [profile.unit(u.name).peak_bytes for u in plan.units if u.stage == 2 and u.name not in grad_units]
    frozen2 += [profile.unit(u.name).fission.peak_bytes for u in plan.units if u.replays]
    activations2 = max([profile.grad_step.peak_bytes, *frozen2])
    stage1_peaks = [profile.unit(n).peak_bytes for n in stage1] or [0]
    all_components = plan.components(1) + [c for c in plan.components(2) if c not in plan.components(1)]
    return {
        "profile_mode": profile.mode,
        "batch_size": batch_size,
        "stage1_peak_bytes": resident(plan.components(1)) + max(stage1_peaks),
        "stage2_peak_bytes": resident(plan.components(2)) + optimizer + batch + activations2,
        "unsplit_peak_bytes": resident(all_components) + optimizer + max(max(stage1_peaks), batch + activations2),
        "stage2_resident_bytes": resident(plan.components(2)),
        "optimizer_bytes": optimizer,
        "cached_batch_bytes": batch,
        "stage2_activation_bytes": activations2,
        "cached_bytes_per_sample": sum(v.bytes_per_sample or 0 for v in plan.cached),
        "stage2_flops_per_step": profile.grad_step.flops + sum(
            profile.unit(u.name).flops for u in plan.units if u.stage == 2 and u.name not in grad_units) + sum(
            profile.unit(u.name).fission.flops for u in plan.units if u.replays),
    }


def replace_predicted(plan: Plan, predicted: dict[str, Any]) -> Plan:
    return dataclasses.replace(plan, predicted=predicted)
