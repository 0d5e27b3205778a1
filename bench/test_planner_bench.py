"""Planner speed: the min-cut solver plans a random 64-unit graph in < 100 ms (2-core CPU).

The random problem is autosplit.cut.random_problem, shared with tests/test_cut.py (~30% edge density, 25% forced
units, up to 4 shared components); the enumeration solver would need up to 2^48 visits here.
"""

from __future__ import annotations

import random

from autosplit.planning.cut import random_problem, solve_mincut

BOUND_S = 0.100


def test_mincut_64_units_under_100ms(benchmark):
    problems = [random_problem(random.Random(seed), 64) for seed in range(8)]
    state = {"i": 0}

    def solve():  # a different problem each round, so no round is a lucky one
        problem = problems[state["i"] % len(problems)]
        state["i"] += 1
        return problem, solve_mincut(problem)

    problem, stage1 = benchmark.pedantic(solve, rounds=40, iterations=1, warmup_rounds=2)
    assert problem.is_valid(stage1)
    stats = benchmark.stats.stats
    benchmark.extra_info.update(
        {
            "num_units": 64,
            "num_problems": len(problems),
            "bound_s": BOUND_S,
            "median_s": stats.median,
            "max_s": stats.max,
            "median_over_bound": round(stats.median / BOUND_S, 4),
            "num_edges": sum(len(p) for p in problem.producers.values()),
        }
    )
    assert stats.max < BOUND_S, f"min-cut on 64 units took {stats.max * 1000:.1f} ms (bound {BOUND_S * 1000:.0f} ms)"
