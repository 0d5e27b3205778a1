"""VRAM regression gate (CPU part): re-profile each built-in tiny pipeline (fake tensors, and real
tensors on the CPU) and check every peak, FLOP count and placement against profiles/budgets.json.

pytest-benchmark times the profiling; the memory numbers go to `extra_info` and the budget is
asserted here explicitly (pytest-benchmark compares only times). `.ci/run` runs this file.
"""

from __future__ import annotations

import pytest
from conftest import PROFILES
from gate_cases import CASES, GATE_SETS, SWAP_CASES, SWAP_SETS, entry_key, swap_entry_key

from autosplit.planning.budget import check_budget, load_budgets
from autosplit.workflow.measure import measure_pipeline


@pytest.fixture(scope="module")
def budgets():
    return load_budgets(PROFILES / "budgets.json")


@pytest.mark.parametrize("pipeline, mode", CASES, ids=[entry_key(p, m) for p, m in CASES])
def test_memory_within_budget(benchmark, budgets, pipeline, mode):
    key = entry_key(pipeline, mode)
    profile, plan, inputs = benchmark.pedantic(
        measure_pipeline, args=(pipeline,), kwargs={"profile": mode, "sets": GATE_SETS}, rounds=1, iterations=1
    )
    budget = budgets["budgets"][key]
    predicted = plan.predicted
    benchmark.extra_info.update(
        {
            "budget_key": key,
            "tolerance": budgets["tolerance"],
            **{
                name: predicted[name]
                for name in (
                    "stage1_peak_bytes",
                    "stage2_peak_bytes",
                    "unsplit_peak_bytes",
                    "stage2_flops_per_step",
                    "cached_bytes_per_sample",
                )
            },
            "stage2_over_unsplit": round(predicted["stage2_peak_bytes"] / predicted["unsplit_peak_bytes"], 4),
            "stage2_peak_over_budget": round(predicted["stage2_peak_bytes"] / budget["stage2_peak_bytes"], 4),
            "grad_step_peak_bytes": profile.grad_step.peak_bytes,
            "unit_peak_bytes": {u.name: u.peak_bytes for u in profile.units},
            "unit_flops": {u.name: u.flops for u in profile.units},
        }
    )
    assert check_budget(profile, plan, budget, tolerance=budgets["tolerance"], inputs=inputs) == []


@pytest.mark.parametrize("pipeline, mode", SWAP_CASES, ids=[swap_entry_key(p, m) for p, m in SWAP_CASES])
def test_swapped_plan_within_budget(benchmark, budgets, pipeline, mode):
    """A plan that keeps one block in host memory: its placement's peaks and pinned bytes (and the
    profile's every number) stay within the budget, and it still swaps one block (at tiny size a
    block is smaller than the 512 B alignment it gains, so the peak does not drop: the budget is
    of the accounting)."""
    key = swap_entry_key(pipeline, mode)
    swap_budgets = load_budgets(PROFILES / "budgets-swap.json")
    profile, plan, inputs = benchmark.pedantic(
        measure_pipeline,
        args=(pipeline,),
        kwargs={"profile": mode, "sets": GATE_SETS + SWAP_SETS},
        rounds=1,
        iterations=1,
    )
    budget = swap_budgets["budgets"][key]
    placed = plan.predicted["placement"]
    benchmark.extra_info.update(
        {
            "budget_key": key,
            **{f"placement_{k}": placed[k] for k in ("blocks_to_swap", "stage2_peak_bytes", "host_pinned_bytes")},
        }
    )
    assert placed["blocks_to_swap"] == 1 and placed["host_pinned_bytes"] > 0
    assert check_budget(profile, plan, budget, tolerance=budgets["tolerance"], inputs=inputs) == []
