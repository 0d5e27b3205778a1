"""The memory regression gate: a measured profile and its plan against a committed budget.

A budget file (JSON, e.g. `profiles/budgets.json`) holds one entry per pipeline + model + mode:
the predicted stage-1, stage-2 and unsplit peaks, the training step's peak and FLOPs, each
unit's peak bytes and FLOPs and the stage the planner chose for it, and the inputs it was
measured with. It states its tolerance: a peak may exceed its budget by `memory` (a fraction,
0.02 = +2%); FLOPs (`flops`, default 0) and the chosen cut must match exactly.

`check_budget` returns one line per violation; an empty list means the gate passes. Peaks below
budget pass (the table marks them so the budget can be lowered with the measurement that
justifies it). `autosplit bench --baseline FILE` runs the same check from the command line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autosplit.errors import ConfigError
from autosplit.plan import Plan
from autosplit.planning.profile import Profile

BUDGET_FORMAT_VERSION = 1
DEFAULT_TOLERANCE = {"memory": 0.02, "flops": 0.0}
#: the plan's predictions that are budgeted (bytes), in table order
PREDICTED_PEAKS = ("stage1_peak_bytes", "stage2_peak_bytes", "unsplit_peak_bytes")


@dataclass(frozen=True)
class Check:
    """One budgeted number: `kind` is "memory" (bytes, may shrink), "flops" or "stage" (exact)."""

    name: str
    kind: str
    budget: int
    measured: int | None
    limit: float

    @property
    def ok(self) -> bool:
        if self.measured is None:
            return False
        if self.kind == "memory":
            return self.measured <= self.limit
        return abs(self.measured - self.budget) <= self.limit - self.budget  # FLOPs and stage: both ways

    @property
    def status(self) -> str:
        if not self.ok:
            return "MISSING" if self.measured is None else ("OVER" if self.kind == "memory" else "CHANGED")
        if self.kind == "flops" and self.measured != self.budget:
            return "ok (within tolerance)"
        return "below budget" if self.measured is not None and self.measured < self.budget else "ok"


def budget_key(pipeline: str, model: str, mode: str, task: str = "sft") -> str:
    """The entry name of a measurement: `qwen_image-tiny-fake`, `flux-tiny-cpu-direct_distill`."""
    return "-".join([pipeline, model, mode] + ([task] if task != "sft" else []))


def make_budget(profile: Profile, plan: Plan, *, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A budget entry holding exactly what `profile` and `plan` measured and predicted."""
    return {
        "pipeline": profile.pipeline,
        "task": profile.task,
        "mode": profile.mode,
        "batch_size": profile.batch_size,
        "inputs": dict(inputs or {}),
        **{name: int(plan.predicted[name]) for name in PREDICTED_PEAKS},
        "stage2_flops_per_step": int(plan.predicted["stage2_flops_per_step"]),
        "grad_step": {"peak_bytes": profile.grad_step.peak_bytes, "flops": profile.grad_step.flops},
        "units": {
            u.name: {
                "peak_bytes": u.peak_bytes,
                "flops": u.flops,
                "stage": next(p.stage for p in plan.units if p.name == u.name),
            }
            for u in profile.units
        },
        **placement_budget(plan),
    }


#: a weight placement's budgeted numbers (bytes), when blocks are swapped or stored in fp8
PLACEMENT_PEAKS = ("stage2_peak_bytes", "unsplit_peak_bytes", "host_pinned_bytes")


def placement_budget(plan: Plan) -> dict[str, Any]:
    """The part of a budget entry that a swapping (or fp8) plan adds: its predicted peaks, pinned
    host bytes and how many blocks it swaps (empty when every block is resident in the run's dtype)."""
    placed = plan.predicted.get("placement") or {}
    if not placed.get("predicted") or (not placed["blocks_to_swap"] and placed["base_precision"] == "dtype"):
        return {}
    return {
        "placement": {
            "blocks_to_swap": placed["blocks_to_swap"],
            "base_precision": placed["base_precision"],
            **{name: int(placed[name]) for name in PLACEMENT_PEAKS},
        }
    }


def compare_budget(
    profile: Profile, plan: Plan, budget: dict[str, Any], *, tolerance: dict[str, float] | None = None
) -> list[Check]:
    """Every budgeted number of `budget` next to its measurement in `profile`/`plan`."""
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    measured = make_budget(profile, plan)

    def check(name: str, kind: str, budget_value: int, value: int | None) -> Check:
        slack = tol.get(kind, 0.0)  # "stage" has none
        limit = budget_value * (1 + slack)
        return Check(name, kind, int(budget_value), None if value is None else int(value), limit)

    checks = [check(name, "memory", budget[name], measured[name]) for name in PREDICTED_PEAKS if name in budget]
    if "stage2_flops_per_step" in budget:
        checks.append(
            check("stage2_flops_per_step", "flops", budget["stage2_flops_per_step"], measured["stage2_flops_per_step"])
        )
    step = budget.get("grad_step", {})
    checks += [
        check(f"grad_step.{key}", kind, step[key], measured["grad_step"][key])
        for key, kind in (("peak_bytes", "memory"), ("flops", "flops"))
        if key in step
    ]
    if "placement" in budget:
        mine_placed = measured.get("placement", {})
        checks += [
            check(f"placement.{name}", "memory", budget["placement"][name], mine_placed.get(name))
            for name in PLACEMENT_PEAKS
        ]
        checks.append(
            check(
                "placement.blocks_to_swap",
                "stage",
                budget["placement"]["blocks_to_swap"],
                mine_placed.get("blocks_to_swap"),
            )
        )
    for unit, numbers in budget.get("units", {}).items():
        mine = measured["units"].get(unit, {})
        checks += [
            check(f"{unit}.{key}", kind, numbers[key], mine.get(key))
            for key, kind in (("peak_bytes", "memory"), ("flops", "flops"), ("stage", "stage"))
            if key in numbers
        ]
    return checks


def check_budget(
    profile: Profile,
    plan: Plan,
    budget: dict[str, Any],
    *,
    tolerance: dict[str, float] | None = None,
    inputs: dict[str, Any] | None = None,
) -> list[str]:
    """One line per violation of `budget` (see module docstring); empty when the gate passes.

    Memory is in bytes, FLOPs per training step of the profiled batch. Units the profile has and
    the budget lacks (or the reverse) are violations, as are other profiling `inputs` (when given).
    """
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    problems = []
    if inputs is not None and "inputs" in budget and budget["inputs"] != inputs:
        problems.append(f"inputs: budget measured {budget['inputs']}, this run {inputs}; compare like with like")
    for key in ("pipeline", "task", "mode", "batch_size"):
        if key in budget and budget[key] != getattr(profile, key):
            problems.append(f"{key}: budget measured {budget[key]!r}, this profile has {getattr(profile, key)!r}")
    new_units = sorted({u.name for u in profile.units} - set(budget.get("units", {})))
    if new_units:
        problems.append(f"units {new_units} have no budget; write a new baseline if they are meant to be there")
    for c in compare_budget(profile, plan, budget, tolerance=tolerance):
        if c.ok:
            continue
        if c.measured is None:
            problems.append(f"{c.name}: budgeted ({c.budget}) but not measured (unit removed?)")
        elif c.kind == "memory":
            problems.append(
                f"{c.name}: {c.measured} bytes exceeds the budget {c.budget} by "
                f"{(c.measured / c.budget - 1) * 100 if c.budget else float('inf'):.2f}% "
                f"(limit {int(c.limit)})"
            )
        elif c.kind == "flops":
            problems.append(
                f"{c.name}: {c.measured} FLOPs, budget {c.budget}: FLOPs changed (tolerance {tol['flops'] * 100:g}%)"
            )
        elif c.name == "placement.blocks_to_swap":
            problems.append(f"{c.name}: the planner now swaps {c.measured} blocks, the budget {c.budget}")
        else:
            problems.append(f"{c.name}: the planner moved it to stage {c.measured}, budget has stage {c.budget}")
    return problems


def load_budgets(path: Path) -> dict[str, Any]:
    """Read a budget file; raises ConfigError naming the file if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--baseline {path}: not a readable budget file ({exc}); write one with "
            f"`autosplit bench --write-baseline {path}`"
        ) from exc
    if not isinstance(data, dict) or data.get("format_version") != BUDGET_FORMAT_VERSION:
        raise ConfigError(
            f"--baseline {path}: budget format {data.get('format_version') if isinstance(data, dict) else None!r}"
            f" is not {BUDGET_FORMAT_VERSION}; write a new one with --write-baseline"
        )
    data.setdefault("tolerance", dict(DEFAULT_TOLERANCE))
    data.setdefault("budgets", {})
    return data


def budget_entry(budgets: dict[str, Any], key: str, path: Path | str) -> dict[str, Any]:
    """The entry `key` of a loaded budget file; raises ConfigError listing the entries it has."""
    if key not in budgets["budgets"]:
        raise ConfigError(
            f"--baseline {path} has no budget {key!r} (it has {sorted(budgets['budgets'])}); "
            f"add one with `autosplit bench ... --write-baseline {path}`"
        )
    return budgets["budgets"][key]


def write_budget(path: Path, key: str, entry: dict[str, Any], *, tolerance: dict[str, float] | None = None) -> None:
    """Add or replace `key` in the budget file at `path` (created if missing), keeping other entries."""
    path = Path(path)
    data: dict[str, Any] = (
        load_budgets(path)
        if path.exists()
        else {"format_version": BUDGET_FORMAT_VERSION, "tolerance": dict(tolerance or DEFAULT_TOLERANCE), "budgets": {}}
    )
    data["budgets"][key] = entry
    data["budgets"] = dict(sorted(data["budgets"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def profile_inputs(
    dtype: Any, *, image_size: str | None = None, prompt_tokens: int | None = None, num_frames: int | None = None
) -> dict[str, Any]:
    """What a budget records of how the profile was made (the batch and dtype change every number)."""
    inputs = {"image_size": image_size, "prompt_tokens": prompt_tokens, "dtype": str(dtype).removeprefix("torch.")}
    if num_frames is not None:
        inputs["num_frames"] = num_frames
    return inputs
