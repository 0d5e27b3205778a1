"""Fission: cache the deterministic part of a unit whose other outputs draw per-step random numbers.

A unit such as "encode the image and noise it" returns a cacheable value (the latents) and a value
computed from random numbers (the noisy latents). Kept whole it would pull the VAE into stage 2.
Instead, stage 1 runs the unit under a `TorchDispatchMode` that sorts every op into *clean*
(computed only from the unit's inputs and frozen weights) or *dirty* (a draw from the per-step or
global generator, or an op reading a dirty tensor). It records the dirty ops, in order, as an op
graph (plain JSON: op names such as `aten::randn.generator`, constants, and references), and keeps
the *frontier*: each clean tensor a dirty op reads, as it was when read. Stage 1 caches the clean
outputs, the frontier tensors and the graph; stage 2 replays the graph on them with the step's
generator. The replay calls the same aten ops with the same arguments in the same order as the
unit did, so it draws the same numbers and returns bit-identical outputs, with no component built.

A unit cannot be split when its random part feeds a value back into Python (`.item()`, a branch on
a random tensor), reads a view of a tensor that random numbers were written into, or uses a
generator created inside the unit; the recorder then reports why and the unit stays whole in
stage 2. A graph records one batch; the planner splits units only when stage 2 trains with batch
size 1 and stage 1 records one sample at a time (docs/algorithm.md).

Nothing is unpickled: the graph is JSON, and a cached graph is untrusted input. A replay runs only
the ops of `REPLAYABLE_OPS` (what the recorder emits for random draws and the math applied to
them), each argument of the kind its schema names, with bounded sizes: `check_graph` checks the
whole graph and a dry run on fake tensors checks every op's output size before any op runs. The
recorder refuses what a replay would refuse, so a unit it records always replays.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autosplit.errors import CacheError
from autosplit.graph import Unit, UnitContext, run_units
from autosplit.planning.replay_check import (
    REPLAYABLE_OPS,
    TOTAL_GROWTH,
    GraphRejected,
    _resolve,
    check_graph,
    element_limit,
)

GRAPH_FORMAT_VERSION = 1
#: cap on a recorded graph's JSON bytes (a cached ragged value)
MAX_GRAPH_BYTES = 1 << 20


def frontier_name(unit: str, k: int) -> str:
    return f"{unit}.frontier{k}"


def graph_name(unit: str) -> str:
    return f"{unit}.graph"


class Unsplittable(Exception):
    """Why a unit's random part cannot be replayed without the unit (the message is the reason)."""


@dataclass
class Recording:
    """One run of a unit under the recorder."""

    #: JSON-able: {"version", "ops": [{"op", "args", "kwargs"}], "outputs": {name: encoded}, "frontier": n}
    graph: dict[str, Any]
    #: the clean tensors the random part read, in first-read order
    frontier: list[torch.Tensor]
    #: outputs computed from random numbers (replayed in stage 2)
    dirty_outputs: tuple[str, ...]
    #: clean outputs the random part reads directly (not copied into the frontier)
    reads: tuple[str, ...]
    #: the first reason the unit cannot be split, or None
    problem: str | None

    def graph_bytes(self) -> bytes:
        return json.dumps(self.graph, sort_keys=True, separators=(",", ":")).encode()


#: ops that read a tensor's metadata, not its values (fake tensors dispatch them): not recorded
_METADATA_OPS = {
    "prim::device",
    "prim::layout",
    "aten::sym_size",
    "aten::sym_stride",
    "aten::sym_numel",
    "aten::sym_storage_offset",
    "aten::is_contiguous",
    "aten::dim",
    "aten::is_non_overlapping_and_dense",
}


def _same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda:0` is the run's device `cuda`: recorded as "the run's device", so a replay on another
    rank's GPU lands there."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _generator_key(g: torch.Generator) -> int:
    return int(g._cdata)  # type: ignore[attr-defined]  # the C generator's address: one per generator


def _draws_random(func: Any, args: tuple, kwargs: Mapping[str, Any]) -> bool:
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    if "scaled_dot_product" in func.__name__:
        schema = func._schema.arguments
        index = next((i for i, a in enumerate(schema) if a.name == "dropout_p"), None)
        p = kwargs.get("dropout_p", args[index] if index is not None and index < len(args) else 0.0)
        return p > 0
    return True


class _Recorder(TorchDispatchMode):
    def __init__(self, generator: torch.Generator | None, device: torch.device, late: Mapping[str, Any]):
        super().__init__()
        self.generator, self.device = generator, device
        # draws that change every step: the step generator's and the global RNGs', passed or not
        self.step_generators = {_generator_key(torch.default_generator)}
        if torch.cuda.is_available():
            self.step_generators |= {_generator_key(g) for g in torch.cuda.default_generators}
        if generator is not None:
            self.step_generators.add(_generator_key(generator))
        self.dirty: set[int] = set()  # storages random numbers reached
        self.refs: dict[int, list[Any]] = {}  # id(tensor) -> ["o", op, leaf] for live dirty-op outputs
        self.ops: list[dict[str, Any]] = []
        #: (the tensor read, its value then, its version counter then)
        self.frontier: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.frontier_ids: dict[int, int] = {}
        self.problem: str | None = None
        self.largest = self.total = 0  # elements of the recorded ops' outputs: the most of one op, all
        # inputs stage 2 supplies (a random or trained value): dirty from the start, referenced by name
        for name, value in late.items():
            for j, leaf in enumerate(_tensor_leaves(value)):
                self._mark_dirty(leaf)
                self._remember(leaf, ["i", name, j])

    def _random(self, func: Any, args: tuple, kwargs: Mapping[str, Any]) -> bool:
        if not _draws_random(func, args, kwargs):
            return False
        generator = kwargs.get("generator")
        # another generator was seeded by the unit (from the sample): deterministic, clean
        return generator is None or _generator_key(generator) in self.step_generators

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in _METADATA_OPS:
            return func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not (self._random(func, args, kwargs) or any(_storage_key(t) in self.dirty for t in tensors)):
            return func(*args, **kwargs)
        encoded = refused = None
        if self.problem is None:
            try:
                name = func.name()
                if name not in REPLAYABLE_OPS:  # said after the call, unless it reads a value into Python
                    refused = (
                        f"its random part calls {name}, which a replay does not run (only the ops of "
                        f"replay_check.REPLAYABLE_OPS are replayed)"
                    )
                else:
                    encoded = {
                        "op": name,
                        "args": self._encode(list(args), name),
                        "kwargs": self._encode(dict(kwargs), name),
                    }
            except Unsplittable as exc:
                self.problem = str(exc)
        self._refuse_writes_to_supplied(func, args)
        out = func(*args, **kwargs)
        index = len(self.ops)
        for j, leaf in enumerate(tree_flatten(out)[0]):
            if isinstance(leaf, torch.Tensor):
                self._mark_dirty(leaf)
                self._remember(leaf, ["o", index, j])
            elif self.problem is None:
                self.problem = (
                    f"its random part reads a value into Python ({func._overloadpacket.__name__}, "
                    f"e.g. .item() or a branch on a random tensor)"
                )
        for arg, value in zip(func._schema.arguments, args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                self._mark_dirty(value)
        if self.problem is None:
            self.problem = refused
        if encoded is not None:
            self.ops.append(encoded)
            sizes = [leaf.numel() for leaf in tree_flatten(out)[0] if isinstance(leaf, torch.Tensor)]
            self.largest, self.total = max([self.largest, *sizes]), self.total + sum(sizes)
        return out

    def _refuse_writes_to_supplied(self, func: Any, args: tuple) -> None:
        """An op writing in place into an input stage 2 supplies keeps the unit whole (the replay would
        change a value other units read)."""
        for arg, value in zip(func._schema.arguments, args):
            ref = self.refs.get(id(value)) if isinstance(value, torch.Tensor) else None
            write = arg.alias_info is not None and arg.alias_info.is_write
            if write and ref is not None and ref[0] == "i" and self.problem is None:
                op = func._overloadpacket.__name__
                self.problem = (
                    f"it writes in place into {ref[1]}, an input stage 2 supplies ({op}); compute a new tensor"
                )

    def _mark_dirty(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.dirty:  # forget it when freed: the allocator reuses the address
            self.dirty.add(key)
            weakref.finalize(storage, self.dirty.discard, key)

    def _remember(self, t: torch.Tensor, ref: list[Any]) -> None:
        key = id(t)
        if key not in self.refs:
            weakref.finalize(t, self.refs.pop, key, None)
        self.refs[key] = ref

    def _encode(self, x: Any, op: str) -> Any:
        if isinstance(x, torch.Tensor):
            return {"t": self._tensor_ref(x, op)}
        if isinstance(x, torch.Generator):
            if self.generator is not None and _generator_key(x) == _generator_key(self.generator):
                return {"gen": "step"}
            raise Unsplittable(
                f"its random part passes {op} a generator other than the step's (one created in "
                f"the unit, or a global one passed explicitly: use ctx.generator)"
            )
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"float": repr(x)}
        if isinstance(x, torch.dtype):
            return {"dtype": str(x).removeprefix("torch.")}
        if isinstance(x, torch.device):
            return {"device": "ctx" if _same_device(x, self.device) else str(x)}
        if isinstance(x, torch.layout):
            return {"layout": str(x).removeprefix("torch.")}
        if isinstance(x, torch.memory_format):
            return {"memory_format": str(x).removeprefix("torch.")}
        if isinstance(x, (list, tuple)):
            return {"list" if isinstance(x, list) else "tuple": [self._encode(v, op) for v in x]}
        if isinstance(x, dict):
            return {"dict": {k: self._encode(v, op) for k, v in x.items()}}
        raise Unsplittable(f"its random part passes {op} a {type(x).__name__} argument")

    def _tensor_ref(self, t: torch.Tensor, op: str) -> list[Any]:
        ref = self.refs.get(id(t))
        if ref is not None:
            return ref
        if _storage_key(t) in self.dirty:
            raise Unsplittable(f"its random part ({op}) reads a view of a tensor random numbers were written into")
        k = self.frontier_ids.get(id(t))
        if k is None or self.frontier[k][2] != t._version:  # new, or written to since it was read
            k = self.frontier_ids[id(t)] = len(self.frontier)
            self.frontier.append((t, t.detach().clone(), t._version))
        return ["f", k]


def record(
    unit: Unit, values: Mapping[str, Any], ctx: UnitContext, *, late: tuple[str, ...] = ()
) -> tuple[dict[str, Any], Recording]:
    """Run `unit` once under the recorder; return its outputs and the recording. `late` are inputs
    stage 2 supplies (random or trained values): what is computed from them is replayed in stage 2,
    like what is computed from the unit's own random draws."""
    recorder = _Recorder(ctx.generator, ctx.device, {name: values[name] for name in late})
    with recorder:
        out = unit(values, ctx)
    dirty_outputs, encoded = [], {}
    problem = recorder.problem
    for name in unit.outputs:
        leaves = [t for t in tree_flatten(out[name])[0] if isinstance(t, torch.Tensor)]
        if not any(_storage_key(t) in recorder.dirty for t in leaves):
            continue
        dirty_outputs.append(name)
        if problem is None:
            try:
                encoded[name] = recorder._encode(out[name], f"output {name!r}")
            except Unsplittable as exc:
                problem = str(exc)
    clean = {name: out[name] for name in unit.outputs if name not in dirty_outputs}
    frontier, reads = _reuse_clean_outputs(recorder, clean, encoded)
    where = lambda t: "ctx" if _same_device(t.device, ctx.device) else str(t.device)
    # where each tensor the replay reads lived: the cache hands them over on the run's device
    devices = {"frontier": [where(t) for t in frontier], "reads": {n: where(clean[n]) for n in reads}}
    graph = {
        "version": GRAPH_FORMAT_VERSION,
        "ops": recorder.ops,
        "outputs": encoded,
        "frontier": len(frontier),
        "devices": devices,
    }
    if problem is None:
        problem = _trained_frontier(unit, [original for original, _, _ in recorder.frontier])
    recording = Recording(graph, frontier, tuple(dirty_outputs), reads, problem)
    if problem is None and len(recording.graph_bytes()) > MAX_GRAPH_BYTES:
        recording.problem = f"its random part records {len(recorder.ops)} ops, above the {MAX_GRAPH_BYTES} B cap"
    elif problem is None:
        late_values = {n: values[n] for n in late}
        recording.problem = _replay_problem(recorder, graph, frontier, {n: clean[n] for n in reads}, late_values)
    return out, recording


def _trained_frontier(unit: Unit, frontier: list[torch.Tensor]) -> str | None:
    """Why a replay would be wrong because it reads trained weights (cached copies would not train)."""
    if any(t.requires_grad for t in frontier):
        return (
            f"its part that stage 2 recomputes reads trained weights ({', '.join(unit.components) or 'a parameter'}); "
            f"a replay would read cached copies of them"
        )
    return None


def _replay_problem(
    recorder: _Recorder,
    graph: dict[str, Any],
    frontier: list[torch.Tensor],
    reads: Mapping[str, Any],
    late: Mapping[str, Any],
) -> str | None:
    """Why a replay would refuse this recording (the unit then stays whole), or None."""
    limit = element_limit([*frontier, *reads.values(), *_leaves(late)])
    try:
        check_graph(graph, num_frontier=len(frontier), reads=reads.keys(), limit=limit, late=late.keys())
    except GraphRejected as exc:
        return f"its recorded random part would not pass the replay's checks: {exc}"
    if recorder.largest > limit or recorder.total > TOTAL_GROWTH * limit:
        return (
            f"its random part makes tensors of up to {recorder.largest} elements ({recorder.total} in all), "
            f"above the replay's limit of {limit} per op ({TOTAL_GROWTH * limit} in all)"
        )
    return None


def _reuse_clean_outputs(
    recorder: _Recorder, clean: Mapping[str, Any], encoded: dict[str, Any]
) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    """Frontier tensors that are clean outputs of the unit (unchanged since read) are referenced by
    the output's name instead of being cached twice; the others are renumbered."""
    by_id = {id(v): name for name, v in clean.items() if isinstance(v, torch.Tensor)}
    remap: dict[int, list[Any]] = {}
    frontier: list[torch.Tensor] = []
    reads: list[str] = []
    for k, (original, value, version) in enumerate(recorder.frontier):
        name = by_id.get(id(original))
        if name is not None and original._version == version:  # not written to since it was read
            remap[k] = ["v", name]
            reads += [name] if name not in reads else []
        else:
            remap[k] = ["f", len(frontier)]
            frontier.append(value)

    def rewrite(x: Any) -> Any:
        if isinstance(x, dict):
            if "t" in x and x["t"][0] == "f":
                return {"t": remap[x["t"][1]]}
            return {k: rewrite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rewrite(v) for v in x]
        return x

    recorder.ops[:] = rewrite(recorder.ops)
    encoded.update({name: rewrite(value) for name, value in encoded.items()})  # a name may be "t"
    return frontier, tuple(reads)


def _leaves(values: Mapping[str, Any]) -> list[torch.Tensor]:
    return [t for v in values.values() for t in _tensor_leaves(v)]


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of a value, in order: what `["i", name, k]` references count."""
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _decoder(
    frontier: list[torch.Tensor],
    reads: Mapping[str, Any],
    results: list[list[Any]],
    ctx: UnitContext,
    late: Mapping[str, list[Any]],
) -> Callable[[Any], Any]:
    """Decodes a checked graph's encoded values (see `_Recorder._encode`); `late` holds the leaves
    of each input stage 2 supplies."""

    def decode(x: Any) -> Any:
        if not isinstance(x, dict):
            return x
        kind, value = next(iter(x.items()))
        if kind == "t":
            if value[0] == "f":
                return frontier[value[1]]
            if value[0] == "i":
                return late[value[1]][value[2]]
            return reads[value[1]] if value[0] == "v" else results[value[1]][value[2]]
        if kind == "gen":
            return ctx.generator
        if kind == "float":
            return float(value)
        if kind == "device":
            return ctx.device if value == "ctx" else torch.device(value)
        if kind in ("dtype", "layout", "memory_format"):
            return getattr(torch, value)
        if kind in ("list", "tuple"):
            items = [decode(v) for v in value]
            return items if kind == "list" else tuple(items)
        return {k: decode(v) for k, v in value.items()}  # "dict"

    return decode


def _execute(
    graph: Mapping[str, Any],
    frontier: list[torch.Tensor],
    reads: Mapping[str, Any],
    ctx: UnitContext,
    *,
    late: Mapping[str, Any],
    limit: int | None = None,
) -> dict[str, Any]:
    """Run the ops of a checked graph; with `limit`, refuse an op whose outputs exceed it (a dry run)."""
    results: list[list[Any]] = []
    supplied = {name: _tensor_leaves(value) for name, value in late.items()}
    decode = _decoder(frontier, reads, results, ctx, supplied)
    total = 0
    for i, op in enumerate(graph["ops"]):
        try:
            out = _resolve(op["op"])(*decode(op["args"]), **decode(op["kwargs"]))
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as exc:
            raise GraphRejected(f"op {i} ({op['op']}) fails ({type(exc).__name__}: {_first_line(exc)})") from exc
        leaves = tree_flatten(out)[0]
        if limit is not None:
            sizes = [t.numel() for t in leaves if isinstance(t, torch.Tensor)]
            total += sum(sizes)
            if max(sizes, default=0) > limit or total > TOTAL_GROWTH * limit:
                raise GraphRejected(
                    f"op {i} ({op['op']}) returns {max(sizes)} elements ({total} by all ops so far), "
                    f"above the replay's limit of {limit} per op ({TOTAL_GROWTH * limit} in all)"
                )
        results.append(leaves)
    try:
        return {name: decode(value) for name, value in graph["outputs"].items()}
    except (IndexError, KeyError) as exc:
        raise GraphRejected(f"its outputs name a tensor no op returned ({_first_line(exc)})") from exc


def _dry_run(
    graph: Mapping[str, Any],
    frontier: list[torch.Tensor],
    reads: Mapping[str, Any],
    ctx: UnitContext,
    limit: int,
    late: Mapping[str, Any],
) -> None:
    """Run a checked graph on fake tensors of the inputs' shapes: it must run, and every op return at
    most `limit` elements. Allocates and draws nothing (a throwaway generator stands in for the step's)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():  # unseen by a mode around the replay (the profiler's)
        mode = FakeTensorMode()
        fake_frontier: list[torch.Tensor] = [mode.from_tensor(t) for t in frontier]
        fake_reads = {n: mode.from_tensor(v) for n, v in reads.items()}
        fake_late = {n: [mode.from_tensor(t) for t in _tensor_leaves(v)] for n, v in late.items()}
        generator = None if ctx.generator is None else torch.Generator(ctx.generator.device)
        try:
            with mode:
                _execute(
                    graph,
                    fake_frontier,
                    fake_reads,
                    UnitContext({}, ctx.device, ctx.dtype, generator, {}),
                    late=fake_late,
                    limit=limit,
                )
        except GraphRejected:
            raise
        except Exception as exc:  # a fake kernel's own refusal of what no recording holds
            raise GraphRejected(
                f"fails on tensors of the cached shapes ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc


def _on_fake_tensors(tensors: Iterable[Any]) -> bool:
    """Whether a replay runs on fake tensors (a fake profile): then it is its own dry run."""
    from torch._subclasses.fake_tensor import FakeTensor

    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None or any(
        isinstance(t, FakeTensor) for t in tensors
    )


def _placed(
    graph: Mapping[str, Any], frontier: list[torch.Tensor], reads: Mapping[str, Any], ctx: UnitContext
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The tensors a replay reads, on the devices they were recorded on ("ctx": the run's)."""
    devices = graph.get("devices", {})

    def placed(t: torch.Tensor, where: str | None) -> torch.Tensor:
        return t.to(ctx.device if where in (None, "ctx") else torch.device(where))

    return (
        [placed(t, w) for t, w in zip(frontier, devices.get("frontier", [None] * len(frontier)))],
        {n: placed(v, devices.get("reads", {}).get(n)) for n, v in reads.items()},
    )


def replay(
    graph: Any,
    frontier: list[torch.Tensor],
    reads: Mapping[str, Any],
    ctx: UnitContext,
    *,
    late: Mapping[str, Any] | None = None,
    source: str = "fission graph",
) -> dict[str, Any]:
    """Run a recorded random part: the same ops, on the frontier tensors, the clean outputs `reads`
    and the inputs stage 2 supplies (`late`), drawing from `ctx.generator`; returns the unit's
    random outputs.

    Runs nothing from the graph until all of it passed `check_graph` and a dry run on fake tensors
    (every op's outputs within `element_limit` of the tensors read); raises CacheError, naming
    `source` (where the graph came from), the op and why, otherwise."""
    return _replay(graph, frontier, reads, ctx, late=late or {}, source=source, dry_run=True)


def _replay(
    graph: Any,
    frontier: list[torch.Tensor],
    reads: Mapping[str, Any],
    ctx: UnitContext,
    *,
    late: Mapping[str, Any],
    source: str,
    dry_run: bool,
) -> dict[str, Any]:
    version = graph.get("version") if isinstance(graph, dict) else None
    if version != GRAPH_FORMAT_VERSION:
        raise CacheError(f"{source} version {version!r} is not {GRAPH_FORMAT_VERSION}; re-run stage 1")
    if graph.get("frontier") != len(frontier):
        raise CacheError(
            f"{source} reads {graph.get('frontier')!r} frontier tensors but {len(frontier)} were cached; re-run stage 1"
        )
    try:
        limit = element_limit([*frontier, *reads.values(), *_leaves(late)])
        check_graph(graph, num_frontier=len(frontier), reads=reads.keys(), limit=limit, late=late.keys())
        frontier, placed = _placed(graph, frontier, reads, ctx)
        if dry_run and not _on_fake_tensors([*frontier, *placed.values(), *_leaves(late)]):
            _dry_run(graph, frontier, placed, ctx, limit, late)
        return _execute(graph, frontier, placed, ctx, late=late)
    except GraphRejected as exc:
        raise CacheError(
            f"{source}: {exc}; it is not what autosplit's stage 1 records (the cache was altered or "
            f"made elsewhere): re-run stage 1 (--task sft:data_process)"
        ) from None


def split_outputs(unit: Unit, dirty: tuple[str, ...], frontier_count: int) -> tuple[str, ...]:
    """What the stage-1 form of a split unit outputs: its clean outputs, the frontier, the graph."""
    return (
        *[v for v in unit.outputs if v not in dirty],
        *[frontier_name(unit.name, k) for k in range(frontier_count)],
        graph_name(unit.name),
    )


def replay_inputs(
    unit: str, reads: tuple[str, ...], frontier_count: int, late: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """What the stage-2 form of a split unit reads: the frontier, clean outputs, the graph, and the
    inputs stage 2 supplies."""
    return (*[frontier_name(unit, k) for k in range(frontier_count)], *reads, graph_name(unit), *late)


@dataclass(frozen=True)
class Split:
    """How a unit is split (a plan's `UnitPlacement` says it): the outputs stage 2 replays, the
    frontier tensors and clean outputs the replay reads, and the inputs stage 2 supplies (`late`)."""

    dirty: tuple[str, ...]
    frontier: int
    reads: tuple[str, ...]
    late: tuple[str, ...] = ()


def recording_unit(unit: Unit, split: Split, stand_ins: list[Unit] | None = None) -> Unit:
    """The stage-1 form of a split unit, one sample per call (batch 1). Its random part runs on a
    throwaway generator and its random outputs are dropped. The inputs stage 2 supplies are made
    by running `stand_ins` (the stage-2 units that compute them, in order) on that generator first:
    stand-ins with the shapes of the real ones, whose values never reach the cache.

    The first sample is recorded twice, with two generators: a random value that reached Python
    without an op the recorder sees (`.tolist()`, `.numpy()`) would change the clean part or the
    graph, and nothing is cached then."""
    checked: list[bool] = []
    stand_ins = stand_ins or []
    made = {v for u in stand_ins for v in u.outputs}
    needs = [v for u in stand_ins for v in u.inputs if v not in made]
    inputs = tuple(dict.fromkeys([*(v for v in unit.inputs if v not in split.late), *needs]))

    def fn(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
        first = next((v for v in values.values() if isinstance(v, list)), None)
        if first is not None and len(first) != 1:
            raise CacheError(
                f"unit {unit.name!r} is split inside and records one sample at a time; got a batch of {len(first)}"
            )

        def run(seed: int) -> tuple[dict[str, Any], Recording]:
            generator = torch.Generator().manual_seed(seed)  # a CPU generator, like the trainer's step generator
            seeded = UnitContext(ctx.components, ctx.device, ctx.dtype, generator, ctx.settings)
            given = run_units(stand_ins, values, seeded) if stand_ins else values
            return record(unit, given, seeded, late=split.late)

        out, rec = run(0)
        if not checked and rec.problem is None:
            other_out, other = run(1)
            _check_same(unit, split, (out, rec), (other_out, other))
            checked.append(True)
        if rec.problem is not None:
            raise CacheError(
                f"unit {unit.name!r} cannot be split for this sample: {rec.problem}; "
                f"plan with --profile none to keep it whole in stage 2"
            )
        if rec.dirty_outputs != split.dirty or len(rec.frontier) != split.frontier or rec.reads != split.reads:
            raise CacheError(
                f"unit {unit.name!r}: its random part differs from the profiled one for this sample "
                f"(random outputs {list(rec.dirty_outputs)}, {len(rec.frontier)} frontier tensors, "
                f"reads {list(rec.reads)}; profiled {list(split.dirty)}, {split.frontier}, {list(split.reads)}); "
                f"plan with --profile none to keep it whole in stage 2"
            )
        result = {name: out[name] for name in unit.outputs if name not in split.dirty}
        result.update({frontier_name(unit.name, k): t.unsqueeze(0) for k, t in enumerate(rec.frontier)})
        result[graph_name(unit.name)] = torch.frombuffer(bytearray(rec.graph_bytes()), dtype=torch.uint8).unsqueeze(0)
        return result

    outputs = split_outputs(unit, split.dirty, split.frontier)
    optional = tuple(v for v in inputs if v in unit.optional or any(v in u.optional for u in stand_ins))
    return Unit(unit.name, inputs, outputs, fn, unit.components, doc=unit.doc, optional=optional)


def _check_same(
    unit: Unit, split: Split, a: tuple[dict[str, Any], Recording], b: tuple[dict[str, Any], Recording]
) -> None:
    """Raise CacheError unless two recordings with different random numbers agree on the clean part."""
    (out, rec), (other_out, other) = a, b
    same = (
        rec.graph_bytes() == other.graph_bytes()
        and len(rec.frontier) == len(other.frontier)
        and all(torch.equal(x, y) for x, y in zip(rec.frontier, other.frontier))
        and all(
            torch.equal(out[n], other_out[n]) if isinstance(out[n], torch.Tensor) else out[n] == other_out[n]
            for n in unit.outputs
            if n not in split.dirty
        )
    )
    if not same:
        raise CacheError(
            f"unit {unit.name!r}: its deterministic part changed with the step's random "
            f"numbers (a random value read into Python without a tensor op, e.g. .tolist() "
            f"or .numpy()), so it cannot be split; keep random values in tensors, or plan "
            f"with --profile none to keep it whole in stage 2"
        )


def replay_unit(unit: Unit, split: Split) -> Unit:
    """The stage-2 form of a split unit: replays the recorded random part of the (single) sample
    of the batch from the cache, with the step's generator and the inputs stage 2 supplies. Uses no
    component. Each graph is checked (`replay`) before it first runs; the cache is named in errors
    if `ctx.settings` has its `cache_path`."""
    checked: dict[tuple[Any, ...], Any] = {}  # graphs that passed the dry run, by bytes and the inputs' shapes

    def fn(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
        graphs = values[graph_name(unit.name)]
        if graphs.shape[0] != 1:
            raise CacheError(
                f"unit {unit.name!r} is split inside and replays one sample per step; "
                f"got a batch of {graphs.shape[0]} (use --batch_size 1)"
            )
        cache = ctx.settings.get("cache_path")
        source = f"cache {cache}, value {graph_name(unit.name)}" if cache else f"cached {graph_name(unit.name)}"
        raw = bytes(graphs[0].cpu().numpy().tobytes()).rstrip(b"\0")
        frontier = [values[frontier_name(unit.name, k)][0] for k in range(split.frontier)]
        read = {name: values[name] for name in split.reads}
        late = {name: values[name] for name in split.late}
        shapes = [(tuple(t.shape), t.dtype, t.stride()) for t in [*frontier, *_leaves(read), *_leaves(late)]]
        key = (raw, *shapes)
        graph = checked.get(key)
        if graph is not None:
            out = _replay(graph, frontier, read, ctx, late=late, source=source, dry_run=False)
        else:
            graph = _parse(raw, source)
            out = _replay(graph, frontier, read, ctx, late=late, source=source, dry_run=True)
            checked[key] = graph
            if len(checked) > 64:
                checked.pop(next(iter(checked)))
        if tuple(out) != split.dirty:
            raise CacheError(f"{source}: the graph returns {list(out)}, not {list(split.dirty)}; re-run stage 1")
        return out

    return Unit(
        unit.name,
        replay_inputs(unit.name, split.reads, split.frontier, split.late),
        split.dirty,
        fn,
        (),
        draws_random=True,
        doc=f"replays the part of {unit.name} that stage 2 supplies or draws",
    )


def _parse(raw: bytes, source: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested past the parser
        raise CacheError(
            f"{source}: not a recorded graph ({type(exc).__name__}); re-run stage 1 (--task sft:data_process)"
        ) from None
