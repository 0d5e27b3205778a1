"""The units a stage executes, from a plan (data) and the graph (code): a unit split inside
records its random part in stage 1 and replays it in stage 2 (autosplit.planning.fission)."""

from __future__ import annotations

from autosplit.graph import Unit, UnitGraph
from autosplit.plan import Plan
from autosplit.planning.fission import recording_unit, replay_unit


def stage_units(plan: Plan, graph: UnitGraph, stage: int) -> list[Unit]:
    """The units `stage` runs, from `graph`: a split unit records (stage 1) or replays (stage 2)."""
    units = []
    for placement in plan.units:
        unit = graph[placement.name]
        if placement.replays and placement.stage == 1:
            make = recording_unit if stage == 1 else replay_unit
            units.append(make(unit, placement.replays, placement.frontier, placement.replay_reads))
        elif placement.stage == stage:
            units.append(unit)
    return units
