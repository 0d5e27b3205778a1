"""Choosing the cut: which units run once per sample (stage 1) and which every step (stage 2).

The problem is data (`CutProblem`); two solvers give the same answer. `solve_enumerate` tries
every valid stage-1 set (small graphs); `solve_mincut` solves it as a minimum s-t cut in the
style of AOTAutograd's partitioner (large graphs). Costs, compared in this order:

1. stage-2 memory: bytes of the components stage-2 units use, plus the peak bytes of each
   frozen unit left in stage 2, plus the bytes per batch of every value that crosses the cut
   (it is loaded into stage 2 with the batch);
2. stage-2 compute: FLOPs of the units in stage 2;
3. bytes cached per sample.

Each term is a sum over units, components or values, so the whole cost is modular and a
minimum cut finds its optimum exactly. Among optimal stage-1 sets both solvers return the
largest (optimal sets are closed under union, so it is unique).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from itertools import count

INF = float("inf")


@dataclass(frozen=True)
class CutProblem:
    """`units` in topological order; `producers[u]` are the units whose outputs `u` reads."""

    units: tuple[str, ...]
    forced_stage2: frozenset[str]
    producers: dict[str, frozenset[str]]
    #: unit -> (memory bytes, FLOPs) it costs when it runs in stage 2
    unit_cost: dict[str, tuple[int, int]]
    #: component -> (bytes, units using it)
    components: dict[str, tuple[int, frozenset[str]]]
    #: value -> (producer, consumers, memory bytes per batch if cached, bytes per sample cached)
    values: dict[str, tuple[str, frozenset[str], int, int]]

    def is_valid(self, stage1: frozenset[str]) -> bool:
        return not (stage1 & self.forced_stage2) and all(self.producers[u] <= stage1 for u in stage1)

    def cost(self, stage1: frozenset[str]) -> tuple[int, int, int]:
        stage2 = set(self.units) - stage1
        memory = sum(self.unit_cost[u][0] for u in stage2)
        memory += sum(b for b, users in self.components.values() if users & stage2)
        flops = sum(self.unit_cost[u][1] for u in stage2)
        disk = 0
        for producer, consumers, batch_bytes, sample_bytes in self.values.values():
            if producer in stage1 and consumers & stage2:
                memory += batch_bytes
                disk += sample_bytes
        return memory, flops, disk


def solve_enumerate(problem: CutProblem) -> frozenset[str]:
    """Exact search over every valid stage-1 set; returns the largest optimal one."""
    eligible = [u for u in problem.units if u not in problem.forced_stage2]
    best: tuple | None = None
    best_set: frozenset[str] = frozenset()

    def visit(i: int, chosen: frozenset[str]) -> None:
        nonlocal best, best_set
        if i == len(eligible):
            key = (*problem.cost(chosen), -len(chosen))
            if best is None or key < best:
                best, best_set = key, chosen
            return
        unit = eligible[i]
        visit(i + 1, chosen)
        if problem.producers[unit] <= chosen:  # topological order: producers were decided already
            visit(i + 1, chosen | {unit})

    visit(0, frozenset())
    return best_set


def _weights(problem: CutProblem) -> tuple[int, int]:
    """Integer weights that make (memory, flops, disk) compare lexicographically as one sum."""
    disk_total = sum(v[3] for v in problem.values.values()) + 1
    flops_total = sum(c[1] for c in problem.unit_cost.values()) + 1
    w_flops = disk_total
    return w_flops * flops_total, w_flops


class _FlowGraph:
    def __init__(self) -> None:
        self.adj: dict[object, list[list]] = {}

    def add(self, a: object, b: object, capacity: float) -> None:
        forward, backward = [b, capacity, None], [a, 0, None]
        forward[2], backward[2] = backward, forward
        self.adj.setdefault(a, []).append(forward)
        self.adj.setdefault(b, []).append(backward)

    def max_flow(self, s: object, t: object) -> None:
        """Dinic's algorithm; leaves the residual capacities in place."""
        while True:
            level = self._levels(s)
            if t not in level:
                return
            progress = {node: 0 for node in self.adj}
            while self._push(s, t, INF, level, progress) > 0:
                pass

    def _levels(self, s: object) -> dict[object, int]:
        level = {s: 0}
        queue = deque([s])
        while queue:
            node = queue.popleft()
            for to, capacity, _ in self.adj.get(node, []):
                if capacity > 0 and to not in level:
                    level[to] = level[node] + 1
                    queue.append(to)
        return level

    def _push(self, node: object, t: object, limit: float, level: dict, progress: dict) -> float:
        if node == t:
            return limit
        edges = self.adj[node]
        while progress[node] < len(edges):
            edge = edges[progress[node]]
            to, capacity, reverse = edge
            if capacity > 0 and level.get(to) == level[node] + 1:
                pushed = self._push(to, t, min(limit, capacity), level, progress)
                if pushed > 0:
                    edge[1] -= pushed
                    reverse[1] += pushed
                    return pushed
            progress[node] += 1
        return 0

    def can_reach(self, t: object) -> set[object]:
        """Nodes with a residual path to `t`."""
        reverse: dict[object, list[object]] = {}
        for node, edges in self.adj.items():
            for to, capacity, _ in edges:
                if capacity > 0:
                    reverse.setdefault(to, []).append(node)
        seen, queue = {t}, deque([t])
        while queue:
            for prev in reverse.get(queue.popleft(), []):
                if prev not in seen:
                    seen.add(prev)
                    queue.append(prev)
        return seen


def solve_mincut(problem: CutProblem) -> frozenset[str]:
    """Minimum s-t cut; source side = stage 1. Returns the largest optimal stage-1 set."""
    w_mem, w_flops = _weights(problem)
    g = _FlowGraph()
    s, t = "source", "sink"
    for unit in problem.units:
        node = ("unit", unit)
        g.add(s, node, 0)
        memory, flops = problem.unit_cost[unit]
        if unit in problem.forced_stage2:
            g.add(node, t, INF)
        elif memory or flops:
            g.add(s, node, w_mem * memory + w_flops * flops)  # cut when the unit is in stage 2
        for producer in problem.producers[unit]:
            g.add(node, ("unit", producer), INF)  # a stage-1 unit's producers are stage 1
    for name, (nbytes, users) in problem.components.items():
        g.add(s, ("component", name), w_mem * nbytes)  # cut when resident in stage 2
        for user in users:
            g.add(("component", name), ("unit", user), INF)  # a stage-2 user makes it resident
    ids = count()
    for producer, consumers, batch_bytes, sample_bytes in problem.values.values():
        value_node: object = ("value", next(ids))
        g.add(("unit", producer), value_node, w_mem * batch_bytes + sample_bytes)  # cut when it crosses
        for consumer in consumers:
            g.add(value_node, ("unit", consumer), INF)
    g.max_flow(s, t)
    stage2 = g.can_reach(t)
    return frozenset(u for u in problem.units if ("unit", u) not in stage2)


def random_problem(rng: random.Random, num_units: int) -> CutProblem:
    """A random DAG problem (~30% edge density, 25% forced units, up to 4 shared components) for
    the solver tests and the planner benchmark."""
    units = tuple(f"u{i}" for i in range(num_units))
    producers = {u: frozenset(units[j] for j in range(i) if rng.random() < 0.3) for i, u in enumerate(units)}
    forced = frozenset(u for u in units if rng.random() < 0.25)
    unit_cost = {u: (rng.choice([0, 10, 1000, 50_000]), rng.choice([0, 5, 500])) for u in units}
    components = {}
    for c in range(rng.randint(0, 4)):
        users = frozenset(u for u in units if rng.random() < 0.3)
        if users:
            components[f"c{c}"] = (rng.choice([100, 10_000, 1_000_000]), users)
    values = {}
    for u in units:
        consumers = frozenset(v for v in units if u in producers[v])
        if consumers:
            sample = rng.choice([0, 64, 4096, 2_000_000])
            values[f"{u}.out"] = (u, consumers, sample * 2, sample)
    return CutProblem(units, forced, producers, unit_cost, components, values)
