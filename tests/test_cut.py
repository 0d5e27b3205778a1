"""The two cut solvers agree, respect the constraints, and min-cut is fast on large graphs."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from autosplit.planning.cut import CutProblem, random_problem, solve_enumerate, solve_mincut


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_units=st.integers(1, 10))
def test_mincut_equals_enumeration(seed, num_units):
    problem = random_problem(random.Random(seed), num_units)
    exact, cut = solve_enumerate(problem), solve_mincut(problem)
    assert problem.is_valid(exact) and problem.is_valid(cut)
    assert problem.cost(cut) == problem.cost(exact)
    assert cut == exact  # both return the largest optimal stage-1 set


def test_brute_force_over_all_subsets_agrees_with_enumeration():
    from itertools import chain, combinations

    for seed in range(30):
        problem = random_problem(random.Random(seed), 7)
        subsets = chain.from_iterable(combinations(problem.units, k) for k in range(len(problem.units) + 1))
        valid = [frozenset(s) for s in subsets if problem.is_valid(frozenset(s))]
        best = min(problem.cost(s) for s in valid)
        assert problem.cost(solve_enumerate(problem)) == best


def test_forced_units_and_their_consumers_stay_in_stage2():
    units = ("a", "b", "c")
    problem = CutProblem(
        units,
        frozenset({"b"}),
        {"a": frozenset(), "b": frozenset({"a"}), "c": frozenset({"b"})},
        {u: (100, 0) for u in units},
        {},
        {},
    )
    assert solve_enumerate(problem) == solve_mincut(problem) == frozenset({"a"})


def test_a_huge_cheap_output_is_recomputed_in_stage2():
    # b expands a's small output 1000x for free: caching a's output beats caching b's
    units = ("a", "b", "loss")
    problem = CutProblem(
        units,
        frozenset({"loss"}),
        {"a": frozenset(), "b": frozenset({"a"}), "loss": frozenset({"b"})},
        {"a": (0, 100), "b": (0, 1), "loss": (0, 0)},
        {"enc": (10_000, frozenset({"a"}))},
        {"a.out": ("a", frozenset({"b"}), 2 * 100, 100), "b.out": ("b", frozenset({"loss"}), 2 * 100_000, 100_000)},
    )
    assert solve_mincut(problem) == solve_enumerate(problem) == frozenset({"a"})


def test_mincut_handles_64_units():
    # its speed (< 100 ms) is checked in bench/test_planner_bench.py, not here
    problem = random_problem(random.Random(0), 64)
    stage1 = solve_mincut(problem)
    assert problem.is_valid(stage1)
    assert stage1  # some units are free to cache
