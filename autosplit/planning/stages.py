"""The units a stage executes, from a plan (data) and the graph (code): a unit split inside
records its random part in stage 1 and replays it in stage 2 (autosplit.planning.fission)."""

from __future__ import annotations

from autosplit.graph import Unit, UnitGraph
from autosplit.plan import Plan
from autosplit.planning.fission import Split, recording_unit, replay_unit


def stage_units(plan: Plan, graph: UnitGraph, stage: int) -> list[Unit]:
    """The units `stage` runs, from `graph`: a split unit records (stage 1, after making stand-ins
    of the inputs stage 2 supplies) or replays (stage 2)."""
    units = []
    for placement in plan.units:
        unit = graph[placement.name]
        if placement.is_split:
            split = Split(placement.replays, placement.frontier, placement.replay_reads, placement.replay_late)
            if stage == 1:
                units.append(recording_unit(unit, split, [graph[n] for n in placement.stand_ins]))
            elif placement.replays:  # a unit that reads a supplied input only for its shape replays nothing
                units.append(replay_unit(unit, split))
        elif placement.stage == stage:
            units.append(unit)
    if stage == 2 and plan.absent:
        units.insert(0, _absent_values(plan.absent))
    return units


def _absent_values(names: tuple[str, ...]) -> Unit:
    """Stage 2's first unit when the plan has absent values: None for each (what stage 1 would give)."""
    return Unit("absent values", (), names, lambda values, ctx: dict.fromkeys(names), doc="values that are None")
