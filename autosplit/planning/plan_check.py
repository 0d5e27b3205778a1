"""Checking a plan read from a cache against the one this run makes, or, when this run cannot
make one, against the planner's rules for the graph (docs/algorithm.md, "Trust"): stage 2
executes only a cut it could have chosen itself."""

from __future__ import annotations

from typing import Any

from autosplit.graph import UnitGraph
from autosplit.plan import SOURCE, Plan, UnitPlacement
from autosplit.planning.fission import MAX_GRAPH_BYTES, graph_name, replay_inputs, split_outputs


def cut_difference(cached: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """The first decision in which the cut signature `cached` differs from `mine`, in words."""
    for key in ("pipeline", "task", "trainable"):
        if cached[key] != mine[key]:
            return f"{key} {cached[key]} in the cache, {mine[key]} in this run"
    placed = {u[0]: u[1:] for u in cached["units"]}
    for name, *decided in mine["units"]:
        for field, a, b in zip(
            ("stage", "components", "replays", "replay_reads", "frontier"), placed.get(name, [None] * 5), decided
        ):
            if a != b:
                return f"unit {name!r}: {field} {a!r} in the cache, {b!r} in this run's plan"
    theirs, ours = {v[0]: v[1:] for v in cached["cached"]}, {v[0]: v[1:] for v in mine["cached"]}
    for name in [*theirs, *ours]:
        if name not in ours or name not in theirs:
            return (
                f"value {name!r} is {'' if name in theirs else 'not '}cached in the cache, "
                f"{'' if name in ours else 'not '}in this run's plan"
            )
        for field, a, b in zip(("producer", "ragged_axis", "max_len"), theirs[name], ours[name]):
            if a != b:
                return f"value {name!r}: {field} {a!r} in the cache, {b!r} in this run's plan"
    return None if cached == mine else "its units or cached values are listed in another order"


def cut_rule_problem(plan: Plan, graph: UnitGraph, *, trained: tuple[str, ...], layouts: dict[str, Any]) -> str | None:
    """Without this run's own plan: the first way `plan`'s cut breaks the planner's rules for
    `graph` (docs/algorithm.md), or None. A stage-1 unit uses no trained component, reads only
    stage-1 values and, unless split, declares no per-step random draws; a split unit replays some
    of its outputs and caches something; the cached values are exactly those crossing the cut.
    Costs are not checked: they need the profile."""
    stage1 = {u.name for u in plan.units if u.stage == 1}
    for placement in plan.units:
        problem = _placement_problem(placement, graph, stage1, set(trained), max_frontier=len(plan.cached))
        if problem is not None:
            return f"unit {placement.name!r} {problem}"
    crossing = _crossing_values(plan, graph, layouts)
    cached = [[v.name, v.producer, v.ragged_axis, v.max_len] for v in plan.cached]
    if cached != crossing:
        return f"it caches {[v[0] for v in cached]}, its cut needs {[v[0] for v in crossing]} (in this layout)"
    return None


def _placement_problem(
    u: UnitPlacement, graph: UnitGraph, stage1: set[str], trained: set[str], *, max_frontier: int
) -> str | None:
    unit = graph[u.name]
    split = (u.replays, u.replay_reads, u.frontier) != ((), (), 0)
    if u.stage not in (1, 2) or tuple(u.components) != unit.components:
        return f"runs in stage {u.stage!r} with {list(u.components)}; the graph's unit uses {list(unit.components)}"
    if u.stage == 2:
        return "is split inside but runs in stage 2" if split else None
    late = [v for v in unit.inputs if v in graph.producer and graph.producer[v] not in stage1]
    if set(unit.components) & trained or late:
        return f"runs in stage 1, using trained {sorted(set(unit.components) & trained)} or reading {late} from stage 2"
    if not split:
        return "runs in stage 1 but draws per-step random numbers" if unit.draws_random else None
    clean = [v for v in unit.outputs if v not in u.replays]
    outputs_ok = bool(u.replays) and [v for v in unit.outputs if v in u.replays] == list(u.replays)
    if not outputs_ok or not set(u.replay_reads) <= set(clean):
        return f"is split inside, replaying {list(u.replays)} and reading {list(u.replay_reads)} of its outputs"
    if not isinstance(u.frontier, int) or not 0 <= u.frontier <= max_frontier:  # each one a cached value
        return f"is split inside with {u.frontier!r} frontier tensors"
    if not clean and not unit.components:
        return "is split inside, though its deterministic part yields nothing and uses no weights"
    return None


def _crossing_values(plan: Plan, graph: UnitGraph, layouts: dict[str, Any]) -> list[list[Any]]:
    """The values a stage-2 unit (or replay) reads from stage 1 under `plan`'s placements, as the
    planner lists them: [name, producer, ragged_axis, max_len]."""
    read: set[str] = set()
    for u in plan.units:
        read |= set(graph[u.name].inputs) if u.stage == 2 else set()
        read |= set(replay_inputs(u.name, u.replay_reads, u.frontier)) if u.replays else set()

    def row(name: str, producer: str, split: str | None = None) -> list[Any]:
        if split is not None and name == graph_name(split):
            return [name, producer, 0, MAX_GRAPH_BYTES]
        layout = layouts.get(name)
        return [name, producer, getattr(layout, "ragged_axis", None), getattr(layout, "max_len", None)]

    rows = [row(s, SOURCE) for s in graph.sources if s in read]
    for u in plan.units:
        if u.stage == 1:
            unit = graph[u.name]
            outputs = split_outputs(unit, u.replays, u.frontier) if u.replays else unit.outputs
            rows += [row(v, u.name, u.name if u.replays else None) for v in outputs if v in read]
    return rows
