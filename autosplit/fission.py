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

Nothing is unpickled: the graph is JSON and only ops of the `aten` namespace are looked up.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autosplit.errors import CacheError
from autosplit.graph import Unit, UnitContext

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
_METADATA_OPS = {"prim::device", "prim::layout", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
                 "aten::sym_storage_offset", "aten::is_contiguous", "aten::dim", "aten::is_non_overlapping_and_dense"}


def _replayable(func: Any) -> bool:
    """Ops a cached graph may name: aten, no file access, no string arguments (a crafted graph
    must not reach the file system, e.g. through `aten::from_file`)."""
    schema = func._schema
    return "file" not in schema.name and not any("str" in str(a.type) for a in schema.arguments)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda:0` is the run's device `cuda`: recorded as "the run's device", so a replay on another
    rank's GPU lands there."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


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
    def __init__(self, generator: torch.Generator | None, device: torch.device):
        super().__init__()
        self.generator, self.device = generator, device
        # draws that change every step: the step generator's and the global RNGs', passed or not
        self.step_generators = {torch.default_generator._cdata}
        if torch.cuda.is_available():
            self.step_generators |= {g._cdata for g in torch.cuda.default_generators}
        if generator is not None:
            self.step_generators.add(generator._cdata)
        self.dirty: set[int] = set()  # storages random numbers reached
        self.refs: dict[int, list[Any]] = {}  # id(tensor) -> ["o", op, leaf] for live dirty-op outputs
        self.ops: list[dict[str, Any]] = []
        #: (the tensor read, its value then, its version counter then)
        self.frontier: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.frontier_ids: dict[int, int] = {}
        self.problem: str | None = None

    def _random(self, func: Any, args: tuple, kwargs: Mapping[str, Any]) -> bool:
        if not _draws_random(func, args, kwargs):
            return False
        generator = kwargs.get("generator")
        # another generator was seeded by the unit (from the sample): deterministic, clean
        return generator is None or generator._cdata in self.step_generators

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in _METADATA_OPS:
            return func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not (self._random(func, args, kwargs) or any(_storage_key(t) in self.dirty for t in tensors)):
            return func(*args, **kwargs)
        encoded = None
        if self.problem is None:
            try:
                name = func.name()
                if not name.startswith("aten::") or not _replayable(func):
                    raise Unsplittable(f"its random part calls {name}, which is not replayed (only aten ops "
                                       f"without file or string arguments are)")
                encoded = {"op": name, "args": self._encode(list(args), name),
                           "kwargs": self._encode(dict(kwargs), name)}
            except Unsplittable as exc:
                self.problem = str(exc)
        out = func(*args, **kwargs)
        index = len(self.ops)
        for j, leaf in enumerate(tree_flatten(out)[0]):
            if isinstance(leaf, torch.Tensor):
                self._mark_dirty(leaf)
                self._remember(leaf, ["o", index, j])
            elif self.problem is None:
                self.problem = (f"its random part reads a value into Python ({func._overloadpacket.__name__}, e.g. .item() or a "
                                f"branch on a random tensor)")
        for arg, value in zip(func._schema.arguments, args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                self._mark_dirty(value)
        if encoded is not None:
            self.ops.append(encoded)
        return out

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
            if self.generator is not None and x._cdata == self.generator._cdata:
                return {"gen": "step"}
            raise Unsplittable(f"its random part passes {op} a generator other than the step's (one created in "
                               f"the unit, or a global one passed explicitly: use ctx.generator)")
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


def record(unit: Unit, values: Mapping[str, Any], ctx: UnitContext) -> tuple[dict[str, Any], Recording]:
    """Run `unit` once under the recorder; return its outputs and the recording."""
    recorder = _Recorder(ctx.generator, ctx.device)
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
    where = lambda t: "ctx" if _same_device(t.device, ctx.device) else str(t.device)  # noqa: E731
    # where each tensor the replay reads lived: the cache hands them over on the run's device
    devices = {"frontier": [where(t) for t in frontier], "reads": {n: where(clean[n]) for n in reads}}
    graph = {"version": GRAPH_FORMAT_VERSION, "ops": recorder.ops, "outputs": encoded, "frontier": len(frontier),
             "devices": devices}
    recording = Recording(graph, frontier, tuple(dirty_outputs), reads, problem)
    if problem is None and len(recording.graph_bytes()) > MAX_GRAPH_BYTES:
        recording.problem = f"its random part records {len(recorder.ops)} ops, above the {MAX_GRAPH_BYTES} B cap"
    return out, recording


def _reuse_clean_outputs(recorder: _Recorder, clean: Mapping[str, Any],
                         encoded: dict[str, Any]) -> tuple[list[torch.Tensor], tuple[str, ...]]:
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
    encoded.update(rewrite(encoded))
    return frontier, tuple(reads)


def _resolve(name: str) -> Any:
    namespace, _, rest = name.partition("::")
    op, _, overload = rest.partition(".")
    if namespace != "aten":
        raise CacheError(f"fission graph names op {name!r}; only aten ops are replayed")
    try:
        func = getattr(getattr(torch.ops.aten, op), overload or "default")
    except AttributeError as exc:
        raise CacheError(f"fission graph names op {name!r}, which this torch does not have; "
                         f"re-run stage 1 with this torch") from exc
    if not _replayable(func):
        raise CacheError(f"fission graph names op {name!r}, which is never replayed (file or string arguments); "
                         f"the cache was not written by autosplit")
    return func


def replay(graph: Mapping[str, Any], frontier: list[torch.Tensor], reads: Mapping[str, Any],
           ctx: UnitContext) -> dict[str, Any]:
    """Run a recorded random part: the same ops, on the frontier tensors and clean outputs `reads`,
    drawing from `ctx.generator`; returns the unit's random outputs."""
    if graph.get("version") != GRAPH_FORMAT_VERSION:
        raise CacheError(f"fission graph version {graph.get('version')!r} is not {GRAPH_FORMAT_VERSION}; "
                         f"re-run stage 1")
    if graph["frontier"] != len(frontier):
        raise CacheError(f"fission graph reads {graph['frontier']} frontier tensors but {len(frontier)} were cached")
    results: list[list[Any]] = []
    devices = graph.get("devices", {})

    def placed(t: torch.Tensor, where: str | None) -> torch.Tensor:
        return t.to(ctx.device if where in (None, "ctx") else torch.device(where))

    frontier = [placed(t, w) for t, w in zip(frontier, devices.get("frontier", [None] * len(frontier)))]
    reads = {n: placed(v, devices.get("reads", {}).get(n)) for n, v in reads.items()}

    def decode(x: Any) -> Any:
        if isinstance(x, dict):
            kind, value = next(iter(x.items()))
            if kind == "t":
                where = value[0]
                if where == "f":
                    return frontier[value[1]]
                if where == "v":
                    return reads[value[1]]
                return results[value[1]][value[2]]
            if kind == "gen":
                return ctx.generator
            if kind == "float":
                return float(value)
            if kind == "dtype":
                return getattr(torch, value)
            if kind == "device":
                return ctx.device if value == "ctx" else torch.device(value)
            if kind in ("layout", "memory_format"):
                return getattr(torch, value)
            if kind in ("list", "tuple"):
                items = [decode(v) for v in value]
                return items if kind == "list" else tuple(items)
            if kind == "dict":
                return {k: decode(v) for k, v in value.items()}
            raise CacheError(f"fission graph holds an unknown entry {kind!r}; re-run stage 1")
        return x

    try:
        for op in graph["ops"]:
            out = _resolve(op["op"])(*decode(op["args"]), **decode(op["kwargs"]))
            results.append(tree_flatten(out)[0])
        return {name: decode(value) for name, value in graph["outputs"].items()}
    except (KeyError, IndexError, TypeError, StopIteration) as exc:
        raise CacheError(f"fission graph is malformed ({type(exc).__name__}: {exc}); re-run stage 1") from exc


def split_outputs(unit: Unit, dirty: tuple[str, ...], frontier_count: int) -> tuple[str, ...]:
    """What the stage-1 form of a split unit outputs: its clean outputs, the frontier, the graph."""
    return (*[v for v in unit.outputs if v not in dirty],
            *[frontier_name(unit.name, k) for k in range(frontier_count)], graph_name(unit.name))


def replay_inputs(unit: str, reads: tuple[str, ...], frontier_count: int) -> tuple[str, ...]:
    """What the stage-2 form of a split unit reads: the frontier, clean outputs, the graph."""
    return (*[frontier_name(unit, k) for k in range(frontier_count)], *reads, graph_name(unit))


def recording_unit(unit: Unit, dirty: tuple[str, ...], frontier_count: int, reads: tuple[str, ...]) -> Unit:
    """The stage-1 form of a split unit, one sample per call (batch 1). Its random part runs on a
    throwaway generator and its random outputs are dropped.

    The first sample is recorded twice, with two generators: a random value that reached Python
    without an op the recorder sees (`.tolist()`, `.numpy()`) would change the clean part or the
    graph, and nothing is cached then."""
    checked = []

    def fn(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
        first = next((v for v in values.values() if isinstance(v, list)), None)
        if first is not None and len(first) != 1:
            raise CacheError(f"unit {unit.name!r} is split inside and records one sample at a time; "
                             f"got a batch of {len(first)}")
        def run(seed: int) -> tuple[dict[str, Any], Recording]:
            generator = torch.Generator().manual_seed(seed)  # a CPU generator, like the trainer's step generator
            return record(unit, values, UnitContext(ctx.components, ctx.device, ctx.dtype, generator, ctx.settings))

        out, rec = run(0)
        if not checked and rec.problem is None:
            other_out, other = run(1)
            same = rec.graph_bytes() == other.graph_bytes() and len(rec.frontier) == len(other.frontier) and all(
                torch.equal(a, b) for a, b in zip(rec.frontier, other.frontier)) and all(
                torch.equal(out[n], other_out[n]) for n in unit.outputs
                if n not in dirty and isinstance(out[n], torch.Tensor))
            if not same:
                raise CacheError(f"unit {unit.name!r}: its deterministic part changed with the step's random "
                                 f"numbers (a random value read into Python without a tensor op, e.g. .tolist() "
                                 f"or .numpy()), so it cannot be split; keep random values in tensors, or plan "
                                 f"with --profile none to keep it whole in stage 2")
            checked.append(True)
        if rec.problem is not None:
            raise CacheError(f"unit {unit.name!r} cannot be split for this sample: {rec.problem}; "
                             f"plan with --profile none to keep it whole in stage 2")
        if rec.dirty_outputs != dirty or len(rec.frontier) != frontier_count or rec.reads != reads:
            raise CacheError(f"unit {unit.name!r}: its random part differs from the profiled one for this sample "
                             f"(random outputs {list(rec.dirty_outputs)}, {len(rec.frontier)} frontier tensors, "
                             f"reads {list(rec.reads)}; profiled {list(dirty)}, {frontier_count}, {list(reads)}); "
                             f"plan with --profile none to keep it whole in stage 2")
        result = {name: out[name] for name in unit.outputs if name not in dirty}
        result.update({frontier_name(unit.name, k): t.unsqueeze(0) for k, t in enumerate(rec.frontier)})
        result[graph_name(unit.name)] = torch.frombuffer(bytearray(rec.graph_bytes()), dtype=torch.uint8).unsqueeze(0)
        return result

    return Unit(unit.name, unit.inputs, split_outputs(unit, dirty, frontier_count), fn, unit.components,
                doc=unit.doc)


def replay_unit(unit: Unit, dirty: tuple[str, ...], frontier_count: int, reads: tuple[str, ...]) -> Unit:
    """The stage-2 form of a split unit: replays the recorded random part of the (single) sample
    of the batch from the cache, with the step's generator. Uses no component."""
    parsed: dict[bytes, dict[str, Any]] = {}

    def fn(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
        graphs = values[graph_name(unit.name)]
        if graphs.shape[0] != 1:
            raise CacheError(f"unit {unit.name!r} is split inside and replays one sample per step; "
                             f"got a batch of {graphs.shape[0]} (use --batch_size 1)")
        raw = bytes(graphs[0].cpu().numpy().tobytes()).rstrip(b"\0")
        graph = parsed.get(raw)
        if graph is None:
            graph = parsed[raw] = json.loads(raw)
            if len(parsed) > 64:
                parsed.pop(next(iter(parsed)))
        frontier = [values[frontier_name(unit.name, k)][0] for k in range(frontier_count)]
        out = replay(graph, frontier, {name: values[name] for name in reads}, ctx)
        if tuple(out) != dirty:
            raise CacheError(f"unit {unit.name!r}: the cached graph returns {list(out)}, not {list(dirty)}; "
                             f"re-run stage 1")
        return out

    return Unit(unit.name, replay_inputs(unit.name, reads, frontier_count), dirty, fn, (), draws_random=True,
                doc=f"replays the random part of {unit.name}")
