"""The plan as data: where each unit runs and why, which values cross the cut, and what was
predicted. Serialized as plan.json (docs/plan-format.md). Nothing here builds or runs a unit:
`autosplit.planning.stages` turns a plan and a graph into the units a stage executes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosplit.errors import PlanError

if TYPE_CHECKING:  # annotations only: the plan imports no torch
    from autosplit.graph import UnitGraph

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class UnitPlacement:
    """Where one unit runs and why."""

    name: str
    stage: int
    reason: str
    components: tuple[str, ...] = ()
    peak_bytes: int | None = None
    flops: int | None = None
    seconds: float | None = None
    needs_grad: bool | None = None
    random_ops: tuple[str, ...] = ()
    #: split inside (stage 1 caches its clean part; stage 2 replays these random outputs)
    replays: tuple[str, ...] = ()
    #: clean outputs the replay reads, and how many frontier tensors it reads (see autosplit.planning.fission)
    replay_reads: tuple[str, ...] = ()
    frontier: int = 0
    #: inputs stage 2 supplies to the replay (random values drawn upstream), and the stage-2 units
    #: stage 1 runs, on a throwaway generator, to make stand-ins of them while it records
    replay_late: tuple[str, ...] = ()
    stand_ins: tuple[str, ...] = ()

    @property
    def is_split(self) -> bool:
        """Split inside: stage 1 records it one sample at a time (a unit reading a supplied input only
        for its shape replays nothing in stage 2, but is recorded all the same)."""
        return self.stage == 1 and bool(self.replays or self.replay_late)


@dataclass(frozen=True)
class CachedValue:
    """A value stage 1 writes and stage 2 reads, per sample.

    `ragged_axis` is the per-sample axis padded in batches (text tokens); `max_len` caps it.
    `shape`/`dtype`/`bytes_per_sample` are filled in when a sample has been measured.
    """

    name: str
    producer: str
    ragged_axis: int | None = None
    max_len: int | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    bytes_per_sample: int | None = None
    #: "tensor", or a Python value per sample ("text", "int", "float", "ints"): cached as a
    #: dataset source is and handed to stage 2 as a list again
    kind: str = "tensor"


@dataclass(frozen=True)
class Plan:
    """The split of one pipeline + task. Serialized as plan.json (see docs/plan-format.md)."""

    pipeline: str
    task: str
    split: bool
    trainable: tuple[str, ...]
    units: tuple[UnitPlacement, ...]
    cached: tuple[CachedValue, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    #: predicted bytes and FLOPs (see `predict`); empty without a profile
    predicted: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_FORMAT_VERSION
    #: values that were None (an optional input the dataset does not have, and what a unit then
    #: left out): never cached; stage 2 reads None for them
    absent: tuple[str, ...] = ()

    def stage_units(self, stage: int) -> list[str]:
        """Units that run in `stage`, in order; a split unit is in both (its replay in stage 2)."""
        return [u.name for u in self.units if u.stage == stage or (stage == 2 and u.replays)]

    def components(self, stage: int) -> list[str]:
        """Components that `stage` must build, in first-use order (stage 1's include those of the
        stage-2 units it runs to make stand-ins while recording a split unit)."""
        by_name = {u.name: u for u in self.units}
        names: list[str] = []
        for unit in self.units:
            if unit.stage == stage:
                for used in [*(by_name[n] for n in unit.stand_ins if stage == 1), unit]:
                    names += [c for c in used.components if c not in names]
        return names

    def cut_signature(self) -> dict[str, Any]:
        """The decision alone (placements and cached values), without measurements or settings:
        what a cache made under this plan depends on."""
        return {
            "pipeline": self.pipeline,
            "task": self.task,
            "trainable": list(self.trainable),
            # a field added since format 1 is listed only where it is set, so older caches stay current
            "units": [
                [u.name, u.stage, list(u.components), list(u.replays), list(u.replay_reads), u.frontier]
                + ([list(u.replay_late), list(u.stand_ins)] if u.replay_late or u.stand_ins else [])
                for u in self.units
            ],
            "cached": [
                [v.name, v.producer, v.ragged_axis, v.max_len] + ([v.kind] if v.kind != "tensor" else [])
                for v in self.cached
            ],
            **({"absent": list(self.absent)} if self.absent else {}),
        }

    def python_values(self) -> list[str]:
        """Cached values that stage 2 reads as per-sample Python lists: the dataset sources and the
        Python values (strings, numbers) units return, which the cache holds as tensors."""
        return [v.name for v in self.cached if v.producer == SOURCE or v.kind != "tensor"]

    def cached_value(self, name: str) -> CachedValue:
        return next(v for v in self.cached if v.name == name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("version") != PLAN_FORMAT_VERSION:
            raise PlanError(
                f"plan format version {data.get('version')!r} is not {PLAN_FORMAT_VERSION}; re-run `autosplit plan`"
            )
        return cls(
            pipeline=data["pipeline"],
            task=data["task"],
            split=data["split"],
            trainable=tuple(data["trainable"]),
            units=tuple(
                UnitPlacement(
                    **{
                        **u,
                        "components": tuple(u["components"]),
                        "random_ops": tuple(u.get("random_ops", ())),
                        "replays": tuple(u.get("replays", ())),
                        "replay_reads": tuple(u.get("replay_reads", ())),
                        "replay_late": tuple(u.get("replay_late", ())),
                        "stand_ins": tuple(u.get("stand_ins", ())),
                    }
                )
                for u in data["units"]
            ),
            cached=tuple(
                CachedValue(**{**v, "shape": tuple(v["shape"]) if v.get("shape") else None}) for v in data["cached"]
            ),
            settings=data.get("settings", {}),
            predicted=data.get("predicted", {}),
            version=data["version"],
            absent=tuple(data.get("absent", ())),
        )

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PlanError(f"{path}: not a readable plan.json ({exc}); re-run `autosplit plan`") from exc

    def check_graph(self, graph: UnitGraph) -> None:
        """Raise PlanError if the plan was made for a different graph."""
        if [u.name for u in self.units] != list(graph.units):
            raise PlanError(
                f"plan units {[u.name for u in self.units]} do not match the graph's "
                f"{list(graph.units)}; re-run `autosplit plan`"
            )


#: cap of a text value (prompt, path) cached for stage 2, in UTF-8 bytes
MAX_TEXT_BYTES = 1 << 16

#: `CachedValue.producer` of a dataset source a stage-2 unit reads: stage 1 caches it as a tensor
#: (text as UTF-8 bytes, numbers as int64/float64) and stage 2 turns it back into Python values
SOURCE = "dataset"
