"""What a replay graph may hold: the allow-list of aten ops the fission recorder emits, the kinds
of argument each may take, and bounds on sizes. A graph read from a cache is untrusted input
(docs/algorithm.md, "Trust"): `check_graph` refuses, before any op runs, a graph this module does
not allow, so a crafted cache cannot run arbitrary ops or allocate without bound."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import torch

#: cap on a replayed graph's ops
MAX_REPLAY_OPS = 4096
#: elements one replayed op may return: this floor, or ELEMENT_GROWTH x the largest tensor the
#: replay reads if larger; all its ops together at most TOTAL_GROWTH x that
MIN_ELEMENT_LIMIT = 1 << 26
ELEMENT_GROWTH = 16
TOTAL_GROWTH = 16

# What a replay may call (`aten::name.overload`, the default overload unsuffixed): per-step draws,
# then the elementwise math, reductions, views, casts and copies applied to random numbers. Not in
# it: ops that make a tensor from a size and a value alone (`full`, `zeros_like`, `empty*`: never
# recorded, or a way to swap the noise for constants), sparse and `as_strided` constructors,
# scatter and `index_put`, `set_`/`resize_`, and every op taking a string or a file.
_DRAWS = (
    "randn randn.generator randn_like randn_like.generator rand rand.generator rand_like rand_like.generator "
    "randint randint.generator randint.low randint.low_generator randint_like randint_like.generator "
    "randint_like.low_dtype randint_like.low_generator_dtype randint_like.Tensor randperm randperm.generator "
    "normal_ normal.Tensor_float normal.float_Tensor normal.Tensor_Tensor normal.float_float uniform_ "
    "bernoulli bernoulli.p bernoulli_.float bernoulli_.Tensor exponential_ log_normal_ cauchy_ geometric_ "
    "random_ random_.from random_.to multinomial poisson native_dropout"
)
_MATH = (
    "add.Tensor add.Scalar add_.Tensor add_.Scalar sub.Tensor sub.Scalar sub_.Tensor sub_.Scalar rsub.Tensor "
    "rsub.Scalar mul.Tensor mul.Scalar mul_.Tensor mul_.Scalar div.Tensor div.Scalar div_.Tensor div_.Scalar "
    "neg neg_ abs sqrt rsqrt exp exp2 expm1 log log2 log1p sigmoid tanh sin cos erf erfinv reciprocal "
    "pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar floor ceil round trunc sign clamp clamp.Tensor clamp_ "
    "clamp_min clamp_max minimum maximum lerp.Scalar lerp.Tensor addcmul addcdiv where.self where.ScalarSelf "
    "where.ScalarOther where.Scalar masked_fill.Scalar masked_fill.Tensor lt.Tensor lt.Scalar le.Tensor "
    "le.Scalar gt.Tensor gt.Scalar ge.Tensor ge.Scalar eq.Tensor eq.Scalar ne.Tensor ne.Scalar logical_not "
    "logical_and logical_or remainder.Tensor remainder.Scalar sum sum.dim_IntList mean mean.dim amax amin "
    "std.correction var.correction linalg_vector_norm cumsum"
)
_SHAPES = (
    "view _unsafe_view expand permute transpose.int t unsqueeze squeeze squeeze.dim squeeze.dims select.int "
    "slice.Tensor split.Tensor split_with_sizes unbind.int alias detach flip roll repeat cat stack "
    "index.Tensor index_select gather _to_copy clone copy_"
)
#: the aten ops a replay may call; the recorder refuses any other (the unit then stays whole)
REPLAYABLE_OPS = frozenset(f"aten::{name}" for name in f"{_DRAWS} {_MATH} {_SHAPES}".split())
_DTYPES = frozenset("bool uint8 int8 int16 int32 int64 float16 bfloat16 float32 float64".split())
_MEMORY_FORMATS = frozenset("contiguous_format preserve_format channels_last channels_last_3d".split())
_DEVICE = re.compile(r"(cpu|cuda|mps)(:[0-9]{1,3})?")
_MAX_LIST = 1024  # items of one list argument
_INT64 = 1 << 63


class GraphRejected(Exception):
    """Why a graph may not be replayed (the message is the reason)."""


@dataclass(frozen=True)
class _Scope:
    """What a graph's tensor references may name: the ops before, the frontier, the clean outputs read."""

    num_ops: int
    num_frontier: int
    reads: frozenset[str]
    limit: int
    #: the inputs stage 2 supplies (a random draw or a trained output, read by name)
    late: frozenset[str] = frozenset()


def element_limit(tensors: Iterable[Any]) -> int:
    """Elements one op of a replay reading `tensors` may return (see MIN_ELEMENT_LIMIT)."""
    return max([MIN_ELEMENT_LIMIT, *(ELEMENT_GROWTH * t.numel() for t in tensors if isinstance(t, torch.Tensor))])


def check_graph(
    graph: Any, *, num_frontier: int, reads: Collection[str], limit: int, late: Collection[str] = ()
) -> None:
    """Raise GraphRejected unless `graph` is what the recorder writes: at most MAX_REPLAY_OPS ops,
    each in REPLAYABLE_OPS, each argument of the kind its schema names (a reference to an earlier
    op's output, one of the `num_frontier` frontier tensors, a clean output in `reads` or a tensor
    of an input in `late`, which stage 2 supplies; a number,
    bool or None; a dtype, the strided layout, a memory format, a device, the step generator; a
    list of those, with int lists of at most `limit` elements). Runs nothing."""
    if (
        not isinstance(graph, dict)
        or not isinstance(graph.get("ops"), list)
        or not isinstance(graph.get("outputs"), dict)
    ):
        raise GraphRejected("it is not a graph of ops and outputs")
    ops = graph["ops"]
    if len(ops) > MAX_REPLAY_OPS:
        raise GraphRejected(f"it holds {len(ops)} ops, above the cap of {MAX_REPLAY_OPS}")
    names, supplied = frozenset(reads), frozenset(late)
    for i, op in enumerate(ops):
        try:
            _check_op(op, _Scope(i, num_frontier, names, limit, supplied))
        except GraphRejected as exc:
            name = op.get("op") if isinstance(op, dict) else None
            raise GraphRejected(f"op {i} ({name[:80] if isinstance(name, str) else '?'}) {exc}") from None
    scope = _Scope(len(ops), num_frontier, names, limit, supplied)
    for name, value in graph["outputs"].items():
        if not _is_output(value, scope, depth=0):
            raise GraphRejected(f"output {name!r} is not made of references to the replay's tensors")
    _check_devices(graph.get("devices", {}), num_frontier, names)


def _check_op(op: Any, scope: _Scope) -> None:
    if not isinstance(op, dict) or set(op) != {"op", "args", "kwargs"}:
        raise GraphRejected("is not an {op, args, kwargs} entry")
    schema = _resolve(op["op"])._schema.arguments
    args, kwargs = _tag(op["args"], "list"), _tag(op["kwargs"], "dict")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise GraphRejected("has no argument list")
    positional = [a for a in schema if not a.kwarg_only]
    if len(args) > len(positional):
        raise GraphRejected(f"takes {len(positional)} positional arguments, the graph passes {len(args)}")
    named, given = {a.name: a for a in schema}, {a.name for a in positional[: len(args)]}
    unknown = [k for k in kwargs if k not in named or k in given]
    if unknown:
        raise GraphRejected(f"takes no keyword argument {unknown[0][:80]!r} (or it is passed twice)")
    for arg, value in [*zip(positional, args), *((named[k], v) for k, v in kwargs.items())]:
        reason = _value_problem(value, str(arg.real_type), arg.name, scope)
        if reason is not None:
            raise GraphRejected(f"argument {arg.name!r} {reason}")
        ref = _tag(value, "t")
        if arg.alias_info is not None and arg.alias_info.is_write and isinstance(ref, list) and ref[0] in ("i", "v"):
            what = "an input stage 2 supplies" if ref[0] == "i" else "a cached clean output"
            raise GraphRejected(f"writes in place into {what} ({ref[1]!r}), which a recording never does")


def _value_problem(x: Any, kind: str, arg: str, scope: _Scope) -> str | None:
    """Why `x` is not an encoded value of the schema type `kind`, or None."""
    if kind.startswith("Optional["):
        if x is None:
            return None
        kind = kind[len("Optional[") : -1]
    if kind.startswith("List["):
        inner = kind[len("List[") : -1]
        items = _tag(x, "list") if isinstance(x, dict) and "list" in x else _tag(x, "tuple")
        if not isinstance(items, list) or len(items) > _MAX_LIST:
            return f"is not a list of at most {_MAX_LIST} {inner}"
        reason = next((r for r in (_value_problem(v, inner, arg, scope) for v in items) if r is not None), None)
        if reason is None and inner == "int" and arg == "size" and math.prod(max(v, 1) for v in items) > scope.limit:
            return f"asks for {math.prod(max(v, 1) for v in items)} elements, above the replay's limit of {scope.limit}"
        if reason is None and inner == "int" and max(map(abs, items), default=0) > scope.limit:
            return f"holds {max(map(abs, items))}, above the replay's limit of {scope.limit} elements"
        return reason
    check = _KINDS.get(kind)
    if check is None:
        return f"has type {kind}, which a replay never passes"
    return None if check(x, scope) else f"is {json.dumps(x)[:80]}, not a {kind} the recorder writes"


def _tag(x: Any, key: str) -> Any:
    """The value of an encoded `{key: value}` (None for anything else)."""
    return x[key] if isinstance(x, dict) and len(x) == 1 and key in x else None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and -_INT64 <= x < _INT64


def _is_float(x: Any) -> bool:
    return _is_int(x) or isinstance(x, float) or _tag(x, "float") in ("inf", "-inf", "nan")


def _is_name(x: Any, names: Collection[str]) -> bool:
    return isinstance(x, str) and x in names


def _is_device(x: Any) -> bool:
    return isinstance(x, str) and (x == "ctx" or _DEVICE.fullmatch(x) is not None)


def _is_ref(x: Any, scope: _Scope) -> bool:
    ref = _tag(x, "t")
    if not isinstance(ref, list) or not ref:
        return False
    if ref[0] == "f":
        return len(ref) == 2 and _is_int(ref[1]) and 0 <= ref[1] < scope.num_frontier
    if ref[0] == "v":
        return len(ref) == 2 and _is_name(ref[1], scope.reads)
    if ref[0] == "i":
        return len(ref) == 3 and _is_name(ref[1], scope.late) and _is_int(ref[2]) and 0 <= ref[2] < _MAX_LIST
    return (
        ref[0] == "o"
        and len(ref) == 3
        and _is_int(ref[1])
        and 0 <= ref[1] < scope.num_ops
        and _is_int(ref[2])
        and 0 <= ref[2] < _MAX_LIST
    )


_KINDS: dict[str, Callable[[Any, _Scope], bool]] = {
    "Tensor": lambda x, scope: _is_ref(x, scope) or isinstance(x, bool) or _is_float(x),  # a number: wrapped
    "int": lambda x, _: _is_int(x),
    "float": lambda x, _: _is_float(x),
    "number": lambda x, _: isinstance(x, bool) or _is_float(x),
    "bool": lambda x, _: isinstance(x, bool),
    "ScalarType": lambda x, _: _is_name(_tag(x, "dtype"), _DTYPES),
    "Layout": lambda x, _: _tag(x, "layout") == "strided",
    "MemoryFormat": lambda x, _: _is_name(_tag(x, "memory_format"), _MEMORY_FORMATS),
    "Device": lambda x, _: _is_device(_tag(x, "device")),
    "Generator": lambda x, _: x == {"gen": "step"},
}


def _is_output(x: Any, scope: _Scope, *, depth: int) -> bool:
    if x is None or isinstance(x, bool) or _is_float(x) or _is_ref(x, scope):
        return True
    items = next((_tag(x, k) for k in ("list", "tuple", "dict") if _tag(x, k) is not None), None)
    values = list(items.values()) if isinstance(items, dict) else items
    return (
        depth < 4
        and isinstance(values, list)
        and len(values) <= _MAX_LIST
        and all(_is_output(v, scope, depth=depth + 1) for v in values)
    )


def _check_devices(devices: Any, num_frontier: int, reads: frozenset[str]) -> None:
    frontier = devices.get("frontier", ["ctx"] * num_frontier) if isinstance(devices, dict) else None
    placed = devices.get("reads", {}) if isinstance(devices, dict) else None
    if not (
        isinstance(frontier, list)
        and len(frontier) == num_frontier
        and all(map(_is_device, frontier))
        and isinstance(placed, dict)
        and all(_is_name(n, reads) and _is_device(w) for n, w in placed.items())
        and set(devices) <= {"frontier", "reads"}
    ):
        raise GraphRejected("its devices entry is not one device per frontier tensor and clean output read")


def _resolve(name: Any) -> Any:
    if not _is_name(name, REPLAYABLE_OPS):
        raise GraphRejected("is not an op the recorder emits (autosplit.planning.replay_check.REPLAYABLE_OPS)")
    op, _, overload = name.removeprefix("aten::").partition(".")
    try:
        return getattr(getattr(torch.ops.aten, op), overload or "default")
    except AttributeError:
        raise GraphRejected("is not in this torch; re-run stage 1 with this torch") from None
