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
from autosplit.profiler import Profile

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
        return [u.name for u in self.units if u.stage == stage]

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
                "units": [[u.name, u.stage, list(u.components)] for u in self.units],
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
                                         "random_ops": tuple(u.get("random_ops", ()))}) for u in data["units"]),
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


def _forced_reason(facts: _Facts, unit: Unit) -> str | None:
    if facts.uses_trainable:
        return f"stage 2: uses trainable {', '.join(facts.uses_trainable)} (outputs need grad)"
    if facts.needs_grad:
        return "stage 2: outputs need grad"
    if facts.random_ops:
        ops = "declared draws_random" if facts.random_ops == ("declared",) else ", ".join(facts.random_ops)
        note = ""
        partial = [v for v in facts.clean_outputs if v in unit.outputs]
        if partial and len(partial) < len(unit.outputs):
            note = f"; {', '.join(partial)} alone would be cacheable: split the unit to cache them"
        return f"stage 2: draws per-step random numbers ({ops}){note}"
    return None


def make_plan(graph: UnitGraph, *, pipeline: str, task: str, trainable: tuple[str, ...], split: bool = True,
              layouts: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
              profile: Profile | None = None, batch_size: int = 1, solver: str = "auto") -> Plan:
    """Place each unit of `graph` in stage 1 or 2 and list the values that cross the cut.

    `profile` supplies measured memory, FLOPs, gradients and randomness; `solver` is "auto",
    "enumerate" or "mincut". Raises PlanError if the profile does not match the graph.
    """
    if profile is not None and [u.name for u in profile.units] != list(graph.units):
        raise PlanError(f"profile units {[u.name for u in profile.units]} do not match the graph's "
                        f"{list(graph.units)}; re-run `autosplit profile`")
    layouts = layouts or {}
    facts = {u.name: _facts(u, trainable, profile) for u in graph}
    forced = {u.name: _forced_reason(facts[u.name], u) for u in graph}
    problem = _problem(graph, facts, forced, profile, batch_size)
    eligible = len(graph.units) - len(problem.forced_stage2)
    if solver == "auto":
        solver = "enumerate" if eligible <= ENUMERATION_LIMIT else "mincut"
    stage1 = solve_enumerate(problem) if solver == "enumerate" else solve_mincut(problem)
    cached = _cached_values(graph, stage1, layouts, profile)
    placements = tuple(_placement(u, stage1, forced[u.name], facts[u.name], graph, cached, profile, split)
                       for u in graph)
    plan = Plan(pipeline=pipeline, task=task, split=split, trainable=tuple(trainable), units=placements,
                cached=tuple(cached), settings=dict(settings or {}))
    if profile is None:
        return plan
    return replace_predicted(plan, predict(plan, profile, batch_size=batch_size))


def _per_sample(profile: Profile | None, value: str) -> int:
    if profile is None:
        return 0
    return profile.value(value).bytes // max(profile.batch_size, 1)


def _problem(graph: UnitGraph, facts: dict[str, _Facts], forced: dict[str, str | None], profile: Profile | None,
             batch_size: int) -> CutProblem:
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
                sample = _per_sample(profile, value)
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
                   profile: Profile | None) -> list[CachedValue]:
    cached = []
    for unit in graph:
        if unit.name not in stage1:
            continue
        for value in unit.outputs:
            if any(c not in stage1 for c in graph.consumers(value)):
                layout = layouts.get(value)
                shape = dtype = nbytes = None
                if profile is not None:
                    measured = profile.value(value)
                    shape, dtype, nbytes = measured.shape[1:], measured.dtype, _per_sample(profile, value)
                cached.append(CachedValue(value, unit.name, ragged_axis=getattr(layout, "ragged_axis", None),
                                          max_len=getattr(layout, "max_len", None), shape=shape, dtype=dtype,
                                          bytes_per_sample=nbytes))
    return cached


def _placement(unit: Unit, stage1: frozenset[str], forced: str | None, facts: _Facts, graph: UnitGraph,
               cached: list[CachedValue], profile: Profile | None, split: bool) -> UnitPlacement:
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
    measured = profile.unit(unit.name) if profile else None
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
            profile.unit(u.name).flops for u in plan.units if u.stage == 2 and u.name not in grad_units),
    }


def replace_predicted(plan: Plan, predicted: dict[str, Any]) -> Plan:
    return dataclasses.replace(plan, predicted=predicted)
