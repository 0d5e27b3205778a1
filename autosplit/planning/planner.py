"""Plans: which units run in stage 1, which in stage 2, and which values cross the cut.

A plan is data. `autosplit run` executes a plan and nothing else decides (docs/algorithm.md).

Constraints: a unit may run in stage 1 only if it uses no trainable component, none of its
outputs needs gradients, it draws no per-step random numbers (randomness from a generator
seeded by the sample is deterministic and allowed), and everything it reads is available in
stage 1. With a profile these facts are measured; without one they come from the units'
declarations. Among valid cuts `autosplit.planning.cut` picks the lowest stage-2 memory, then the least
stage-2 compute, then the fewest cached bytes.

An unsplit plan (`split=False`) has the same placements; the trainer then computes the stage-1
values every step instead of reading them from a cache, which is the baseline split runs match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from autosplit.errors import PlanError
from autosplit.graph import Unit, UnitGraph
from autosplit.plan import MAX_TEXT_BYTES, SOURCE, CachedValue, Plan, UnitPlacement
from autosplit.planning.cut import CutProblem, solve_enumerate, solve_mincut
from autosplit.planning.fission import (
    MAX_GRAPH_BYTES,
    graph_name,
    replay_inputs,
    split_outputs,
)
from autosplit.planning.memory import MemoryRequest, place_memory, replace_predicted
from autosplit.planning.profile import PYTHON_KINDS, FissionProfile, Profile

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
        random_ops: tuple[str, ...] = ("declared",) if unit.draws_random else ()
        return _Facts(uses, bool(uses), random_ops, 0, 0, ())
    measured = profile.unit(unit.name)
    random_ops = measured.random_ops or (("declared",) if unit.draws_random else ())
    clean = tuple(v.name for v in measured.outputs if not v.random and not v.needs_grad)
    return _Facts(uses, measured.needs_grad or bool(uses), random_ops, measured.peak_bytes, measured.flops, clean)


def _forced_reason(
    facts: _Facts, unit: Unit, profile: Profile | None, split: bool, batch_size: int, refused: dict[str, str]
) -> str | None:
    if facts.uses_trainable:
        return f"stage 2: uses trainable {', '.join(facts.uses_trainable)} (outputs need grad)"
    if facts.needs_grad:
        note = _cacheable_note(facts, unit, profile, split, batch_size, refused) if profile is not None else ""
        return f"stage 2: outputs need grad{note}"
    if facts.random_ops:
        ops = "declared draws_random" if facts.random_ops == ("declared",) else ", ".join(facts.random_ops)
        note = _cacheable_note(facts, unit, profile, split, batch_size, refused)
        return f"stage 2: draws per-step random numbers ({ops}){note}"
    return None


def _cacheable_note(
    facts: _Facts, unit: Unit, profile: Profile | None, split: bool, batch_size: int, refused: dict[str, str]
) -> str:
    """What of a whole stage-2 unit would be cacheable on its own, and why it is not split."""
    partial = [v for v in facts.clean_outputs if v in unit.outputs]
    if not partial or len(partial) == len(unit.outputs):
        return ""
    f = profile.unit(unit.name).fission if profile is not None else None
    which = ", ".join(partial)
    if f is None and facts.needs_grad:
        return (
            f"; {which} alone would be cacheable, but its other outputs are computed from values that need grad "
            f"(a trained component's), which stage 1 cannot make stand-ins of: compute {which} in a unit of its own"
        )
    if f is None:
        return f"; {which} alone would be cacheable: split the unit to cache them"
    problem = f.problem or refused.get(unit.name)
    if problem is not None:
        return f"; {which} alone would be cacheable, but it cannot be split: {problem}"
    if split and batch_size != 1:
        return f"; {which} would be cached by splitting the unit, which needs --batch_size 1"
    return ""


def make_plan(
    graph: UnitGraph,
    *,
    pipeline: str,
    task: str,
    trainable: tuple[str, ...],
    split: bool = True,
    layouts: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    profile: Profile | None = None,
    batch_size: int = 1,
    solver: str = "auto",
    memory: MemoryRequest | None = None,
) -> Plan:
    """Place each unit of `graph` in stage 1 or 2 and list the values that cross the cut.

    `profile` supplies measured memory, FLOPs, gradients and randomness; `solver` is "auto",
    "enumerate" or "mincut". A unit with both random and cacheable outputs is offered to the
    solver as two parts (its clean part and the replay of its random part, autosplit.planning.fission)
    when the profile could record it and stage 2 trains with batch size 1. Raises PlanError if
    the profile does not match the graph.
    """
    if profile is not None and [u.name for u in profile.units] != list(graph.units):
        raise PlanError(
            f"profile units {[u.name for u in profile.units]} do not match the graph's "
            f"{list(graph.units)}; re-run `autosplit profile`"
        )
    layouts = dict(layouts or {})
    fissions, refused = _fissions(graph, profile, split, batch_size, trainable)
    parts = _planning_graph(graph, fissions)
    facts = {u.name: _facts(u, trainable, profile) for u in graph}
    forced = {u.name: _forced_reason(facts[u.name], u, profile, split, batch_size, refused) for u in graph}
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
    cached, absent = _cached_values(parts, stage1, layouts, profile, fissions)
    notes = {u.name: _cacheable_note(facts[u.name], u, profile, split, batch_size, refused) for u in graph}
    placements = tuple(
        _placement(
            u,
            stage1,
            forced.get(u.name) or forced.get(replay_name(u.name)),
            facts[u.name],
            parts,
            cached,
            profile,
            split,
            fissions.get(u.name),
            stand_ins=_stand_ins(graph, parts, stage1, fissions.get(u.name)),
            note=notes[u.name],
        )
        for u in graph
    )
    plan = Plan(
        pipeline=pipeline,
        task=task,
        split=split,
        trainable=tuple(trainable),
        units=placements,
        cached=tuple(cached),
        settings=dict(settings or {}),
        absent=absent,
    )
    if profile is not None:
        plan = replace_predicted(plan, predict(plan, profile, batch_size=batch_size))
    return plan if memory is None else place_memory(plan, memory)


@dataclass(frozen=True)
class _GraphLayout:
    """A split unit's recorded graph is cached as ragged JSON bytes."""

    ragged_axis: int = 0
    max_len: int = MAX_GRAPH_BYTES


REPLAY_SUFFIX = "@replay"


def replay_name(unit: str) -> str:
    return f"{unit}{REPLAY_SUFFIX}"


def _fissions(
    graph: UnitGraph, profile: Profile | None, split: bool, batch_size: int, trainable: tuple[str, ...]
) -> tuple[dict[str, FissionProfile], dict[str, str]]:
    """Units the solver may split: recorded without a problem, in a split run with batch size 1, and
    with a deterministic part worth caching (a cacheable output, or weights it uses); and, by name,
    why a recorded unit may not be (the inputs stage 2 supplies it cannot be made in stage 1)."""
    if profile is None or not split or batch_size != 1:
        return {}, {}
    found, refused = {}, {}
    for unit in graph:
        measured = profile.unit(unit.name)
        f = measured.fission
        if f is None or f.problem is not None or any(c in trainable for c in unit.components):
            continue  # a trainable component's outputs need grad: the unit is not cacheable at all
        if not {v.name for v in measured.outputs if v.random} <= set(f.dirty_outputs):
            continue  # the recorder missed a random output the tracer saw: never cache it
        problem = _stand_in_problem(graph, f.late, profile, trainable)
        if problem is not None:
            refused[unit.name] = problem
            continue
        # worth splitting only if the deterministic part yields an output or uses weights
        if len(f.dirty_outputs) < len(unit.outputs) or any(profile.component(c) is not None for c in unit.components):
            found[unit.name] = f
    return found, refused


def _stand_in_problem(
    graph: UnitGraph, late: tuple[str, ...], profile: Profile, trainable: tuple[str, ...]
) -> str | None:
    """Why stage 1 cannot compute stand-ins of the inputs `late` (what computes them trains), or None."""
    for value in late:
        producer = graph.producer[value]
        for name in [producer, *sorted(graph.upstream_units(producer))]:
            uses = [c for c in graph[name].components if c in trainable]
            if uses or profile.unit(name).needs_grad:
                what = f"trainable {', '.join(uses)}" if uses else "values that need grad"
                return (
                    f"it reads {value}, which unit {name!r} computes from {what}: stage 1 cannot make a "
                    f"stand-in of it to record what the unit does with it"
                )
    return None


def _stand_ins(
    graph: UnitGraph, parts: UnitGraph, stage1: frozenset[str], fission: FissionProfile | None
) -> tuple[str, ...]:
    """The units stage 1 runs to make stand-ins of the inputs a split unit's replay reads from stage 2:
    those computing them from what stage 1 has (dataset sources and the clean outputs it computes)."""
    if fission is None or not fission.late:
        return ()

    def unit_of(value: str) -> str | None:
        producer = parts.producer.get(value)
        if producer is None or producer in stage1:
            return None  # a source, or a value stage 1 computes
        return producer.removesuffix(REPLAY_SUFFIX)

    chain: set[str] = set()
    stack = [u for v in fission.late if (u := unit_of(v)) is not None]
    while stack:
        name = stack.pop()
        if name not in chain:
            chain.add(name)
            stack += [u for v in graph[name].inputs if (u := unit_of(v)) is not None]
    return tuple(n for n in graph.units if n in chain)


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
        clean_inputs = tuple(v for v in unit.inputs if v not in f.late)  # what stage 2 supplies goes to the replay
        outputs = split_outputs(unit, f.dirty_outputs, n)
        units.append(Unit(unit.name, clean_inputs, outputs, unit.fn, unit.components))
        inputs = replay_inputs(unit.name, f.reads, n, f.late)
        units.append(Unit(replay_name(unit.name), inputs, f.dirty_outputs, unit.fn))
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


def _problem(
    graph: UnitGraph,
    facts: dict[str, _Facts],
    forced: dict[str, str | None],
    profile: Profile | None,
    batch_size: int,
    fissions: dict[str, FissionProfile],
) -> CutProblem:
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


def _cached_values(
    graph: UnitGraph,
    stage1: frozenset[str],
    layouts: dict[str, Any],
    profile: Profile | None,
    fissions: dict[str, FissionProfile],
) -> tuple[list[CachedValue], tuple[str, ...]]:
    """The values that cross the cut, and those of them that were None when profiled (absent: not
    cached). Raises PlanError for a value the cache cannot hold."""
    cached, absent = [], []
    missing = profile.notes.get("absent_sources", ()) if profile is not None else ()
    for source in graph.sources:  # dataset values a stage-2 unit reads (the prompt, when text encoding trains)
        if any(c not in stage1 for c in graph.consumers(source)):
            if source in missing:  # an optional column the profiled dataset does not have
                absent.append(source)
                continue
            layout = layouts.get(source)
            cached.append(
                CachedValue(
                    source,
                    SOURCE,
                    ragged_axis=getattr(layout, "ragged_axis", None),
                    max_len=getattr(layout, "max_len", None),
                )
            )
    for unit in graph:
        if unit.name not in stage1:
            continue
        for value in unit.outputs:
            if not any(c not in stage1 for c in graph.consumers(value)):
                continue
            kind = _kind(profile, value, fissions, unit.name)
            if kind == "none":
                absent.append(value)
                continue
            layout = layouts.get(value) or (_TextLayout() if kind == "text" else None)
            shape: tuple[int, ...] | None = None
            dtype: str | None = None
            nbytes: int | None = None
            if profile is not None and _graph_of(value, fissions) is not None:
                nbytes = _per_sample(profile, value, fissions)
                shape, dtype = (nbytes,), "uint8"
            elif profile is not None and kind == "tensor":
                measured = profile.value(value)
                shape, dtype = measured.shape[1:], measured.dtype
                nbytes = _per_sample(profile, value, fissions)
            cached.append(
                CachedValue(
                    value,
                    unit.name,
                    ragged_axis=getattr(layout, "ragged_axis", None),
                    max_len=getattr(layout, "max_len", None),
                    shape=shape,
                    dtype=dtype,
                    bytes_per_sample=nbytes,
                    kind=kind if kind in PYTHON_KINDS else "tensor",
                )
            )
    return cached, tuple(absent)


@dataclass(frozen=True)
class _TextLayout:
    """A cached string is ragged UTF-8 bytes, as a text source is."""

    ragged_axis: int = 0
    max_len: int = MAX_TEXT_BYTES


def _kind(profile: Profile | None, value: str, fissions: dict[str, FissionProfile], producer: str) -> str:
    """What a value crossing the cut is per sample (a tensor without a profile); raises PlanError
    for one the cache cannot hold."""
    if profile is None or _graph_of(value, fissions) is not None:
        return "tensor"
    try:
        kind = profile.value(value).kind
    except StopIteration:  # a frontier tensor
        return "tensor"
    if kind in ("tensor", "tensors", "none", *PYTHON_KINDS):
        return kind
    raise PlanError(
        f"value {value!r} (from unit {producer!r}) would be cached, but it is a {kind.removeprefix('object ')} "
        f"per sample and the cache holds only tensors, numbers, strings and tuples of ints (None where an input "
        f"is optional): return a tensor from {producer!r} (e.g. torchvision's pil_to_tensor for an image), or "
        f"compute the value in the unit that reads it"
    )


def _placement(
    unit: Unit,
    stage1: frozenset[str],
    forced: str | None,
    facts: _Facts,
    graph: UnitGraph,
    cached: list[CachedValue],
    profile: Profile | None,
    split: bool,
    fission: FissionProfile | None,
    *,
    stand_ins: tuple[str, ...] = (),
    note: str = "",
) -> UnitPlacement:
    measured = profile.unit(unit.name) if profile else None
    if fission is not None:
        assert measured is not None  # a unit is split only from a profile
    if fission is not None and measured is not None and unit.name in stage1:
        names = [v for v in cached if v.producer == unit.name]
        size = sum(v.bytes_per_sample or 0 for v in names)
        kept = [v.name for v in names if not v.name.startswith(unit.name + ".")]
        ops = ", ".join(measured.random_ops)
        parts = [
            *kept,
            *([f"{len(fission.frontier)} frontier tensors"] if fission.frontier else []),
            "the recorded graph",
        ]
        replayed = [
            *([f"the random part ({ops}, {fission.ops} ops)"] if ops else []),
            *(
                [f"what it computes from {', '.join(fission.late)} ({fission.ops} ops)"]
                if fission.late and not ops
                else []
            ),
            *([f"what it computes from {', '.join(fission.late)}"] if fission.late and ops else []),
        ]
        made = f"; stage 1 runs {', '.join(stand_ins)} to record it" if stand_ins else ""
        reason = (
            f"split: stage 1 caches {', '.join(parts[:-1])} and {parts[-1]}, {_kib(size)} per sample; "
            f"stage 2 replays {' and '.join(replayed)} without "
            f"{', '.join(unit.components) or 'the unit'}{made}"
        )
        return UnitPlacement(
            unit.name,
            1,
            reason,
            unit.components,
            peak_bytes=measured.peak_bytes,
            flops=measured.flops,
            seconds=measured.seconds,
            needs_grad=False,
            random_ops=measured.random_ops,
            replays=fission.dirty_outputs,
            replay_reads=fission.reads,
            frontier=len(fission.frontier),
            replay_late=fission.late,
            stand_ins=stand_ins,
        )
    if fission is not None and measured is not None:
        facts = dataclasses.replace(facts, random_ops=measured.random_ops)
        late = [v for v in unit.inputs if graph.producer.get(v) and graph.producer[v] not in stage1]
        why = f"reads {', '.join(late)} from stage 2" if late else "is cheaper to recompute than to cache"
        forced = f"{forced}; its deterministic part {why}, so it is not split"
    if unit.name in stage1:
        names = [v for v in cached if v.producer == unit.name]
        caches = ""
        if names:
            parts = [
                f"{v.name}" + (f" {_kib(v.bytes_per_sample)}" if v.bytes_per_sample is not None else "") for v in names
            ]
            caches = "; caches " + ", ".join(parts) + (" per sample" if profile else "")
        reason = (
            "stage 1: frozen and deterministic, runs once per sample"
            if split
            else "stage 1 part: frozen and deterministic; unsplit run computes it every step"
        ) + caches
        stage = 1
    else:
        late = [v for v in unit.inputs if graph.producer.get(v) and graph.producer[v] not in stage1]
        reason = forced or (
            f"stage 2: reads {', '.join(late)} from stage 2{note}"
            if late
            else "stage 2: cheaper to run every step than to cache (lower stage-2 memory)"
        )
        stage = 2
    return UnitPlacement(
        unit.name,
        stage,
        reason,
        unit.components,
        peak_bytes=measured.peak_bytes if measured else None,
        flops=measured.flops if measured else None,
        seconds=measured.seconds if measured else None,
        needs_grad=facts.needs_grad if measured else None,
        random_ops=facts.random_ops,
    )


def _kib(nbytes: int) -> str:
    return f"{nbytes / 1024:.1f} KiB" if nbytes < 1 << 20 else f"{nbytes / (1 << 20):.2f} MiB"


def predict(plan: Plan, profile: Profile, *, batch_size: int = 1) -> dict[str, Any]:
    """Predicted peak memory (bytes) of stage 1, stage 2 and unsplit training, and stage-2 FLOPs.

    stage 2 = components its units use + AdamW state (2x the trainable bytes) + the cached batch +
    the larger of the gradient step's peak and any frozen stage-2 unit's peak. Unsplit = every
    component + AdamW state + the larger of any stage-1 unit's peak and the stage-2 activations.
    With validation images (`profile.notes["validation"]`: the decode's peak and the decoder's
    device, autosplit.training.validation), see `add_validation`; unsplit holds the VAE already,
    so a decode on the GPU adds its peak only.
    """
    comp = {c.name: c for c in profile.components}
    stage1 = {u.name for u in plan.units if u.stage == 1}
    grad_units = set(profile.grad_step.units)

    def resident(names: list[str]) -> int:
        return sum(comp[n].frozen_bytes + comp[n].trainable_bytes for n in names if n in comp)

    optimizer = 2 * sum(c.trainable_bytes for c in profile.components)
    batch = sum(v.bytes_per_sample or 0 for v in plan.cached) * batch_size
    frozen2 = [profile.unit(u.name).peak_bytes for u in plan.units if u.stage == 2 and u.name not in grad_units]
    replayed = [f for u in plan.units if u.replays and (f := profile.unit(u.name).fission) is not None]
    frozen2 += [f.peak_bytes for f in replayed]
    activations2 = max([profile.grad_step.peak_bytes, *frozen2])
    stage1_peaks = [profile.unit(n).peak_bytes for n in stage1] or [0]
    all_components = plan.components(1) + [c for c in plan.components(2) if c not in plan.components(1)]
    predicted = {
        "profile_mode": profile.mode,
        "batch_size": batch_size,
        "stage1_peak_bytes": resident(plan.components(1)) + max(stage1_peaks),
        "stage2_peak_bytes": resident(plan.components(2)) + optimizer + batch + activations2,
        "unsplit_peak_bytes": resident(all_components) + optimizer + max(max(stage1_peaks), batch + activations2),
        "stage2_resident_bytes": resident(plan.components(2)),
        "denoiser_frozen_bytes": comp[plan.trainable[0]].frozen_bytes if plan.trainable[0] in comp else 0,
        "optimizer_bytes": optimizer,
        "cached_batch_bytes": batch,
        "stage2_activation_bytes": activations2,
        "cached_bytes_per_sample": sum(v.bytes_per_sample or 0 for v in plan.cached),
        "stage2_flops_per_step": profile.grad_step.flops
        + sum(profile.unit(u.name).flops for u in plan.units if u.stage == 2 and u.name not in grad_units)
        + sum(f.flops for f in replayed),
        # what `place_memory` plans from: the denoiser's repeated blocks (bytes and FLOPs of one)
        "blocks": [dataclasses.asdict(b) for b in profile.blocks],
    }
    validation = profile.notes.get("validation")
    if not validation:
        return predicted
    decode, device = int(validation["decode_peak_bytes"]), validation["device"]
    if device != "cpu":
        working = max(max(stage1_peaks), batch + activations2, batch + decode)
        predicted["unsplit_peak_bytes"] = resident(all_components) + optimizer + working
    vae = comp["vae"].frozen_bytes if "vae" in comp else 0
    return add_validation(
        predicted, decoder_bytes=vae, decode_peak_bytes=decode, device=device, vae_in_stage2="vae" in plan.components(2)
    )


def add_validation(
    predicted: dict[str, Any], *, decoder_bytes: int, decode_peak_bytes: int, device: str, vae_in_stage2: bool
) -> dict[str, Any]:
    """`predicted` with stage 2's validation rounds (docs/algorithm.md, section 6): a round holds stage
    2's components, the optimizer state and the cached batch, and decodes with the VAE, whose bytes
    (`decoder_bytes`, unless stage 2 holds the VAE already) and decode peak come on top. Decoding on
    the GPU (`device` "cuda"), that round's peak joins stage 2's, so the budget check counts it;
    on "cpu" it is recorded, not counted. Idempotent: stage 2's peak without validation is kept in
    `stage2_train_peak_bytes`."""
    train_peak = predicted.get("stage2_train_peak_bytes", predicted["stage2_peak_bytes"])
    base = predicted["stage2_resident_bytes"] + predicted["optimizer_bytes"] + predicted["cached_batch_bytes"]
    peak = base + decode_peak_bytes + (0 if vae_in_stage2 else decoder_bytes)
    return {
        **predicted,
        "stage2_train_peak_bytes": train_peak,
        "stage2_peak_bytes": max(train_peak, peak) if device != "cpu" else train_peak,
        "validation_peak_bytes": peak,
        "validation_decoder_bytes": decoder_bytes,
        "validation_decode_peak_bytes": decode_peak_bytes,
        "validation_decoder_device": device,
    }
