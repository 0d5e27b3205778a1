"""What the profiler measured, as plain data: per value, per unit, per component and for the
training step (see docs/profile-format.md). No tracing code: the planner and the VRAM gate read
these without importing torch's dispatch machinery."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

PROFILE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ValueProfile:
    """One output of a unit, per batch as profiled."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    needs_grad: bool
    #: computed from a per-step random draw (in this unit or upstream)
    random: bool
    #: the unit's inputs this output was computed from (traced through tensor ops; non-tensor
    #: inputs such as strings are assumed to reach every output)
    depends_on: tuple[str, ...]
    #: what the value is, per sample (`value_kind`): "tensor", "tensors" (a list of them), "text",
    #: "int", "float", "ints" (int tuples), "none" (absent), or "object NAME" (nothing a cache holds)
    kind: str = "tensor"


#: value kinds the cache holds besides tensors: Python values, cached as a dataset source is
#: (autosplit.storage.codec.encode_source) and turned back into per-sample lists in stage 2
PYTHON_KINDS = ("text", "int", "float", "ints")


@dataclass(frozen=True)
class FissionProfile:
    """The random part of a unit whose other outputs are cacheable (see autosplit.planning.fission).

    `frontier` are the clean tensors the random part reads (cached per sample if the unit is
    split), `reads` the clean outputs it reads; peak, FLOPs and seconds are of its replay.
    `problem` says why it cannot be replayed (the unit then stays whole in stage 2).
    """

    dirty_outputs: tuple[str, ...]
    reads: tuple[str, ...]
    frontier: tuple[ValueProfile, ...]
    graph_bytes: int
    ops: int
    peak_bytes: int
    flops: int
    seconds: float
    problem: str | None = None
    #: the unit's inputs that are random (drawn upstream): stage 2 supplies them to the replay
    late: tuple[str, ...] = ()


@dataclass(frozen=True)
class UnitProfile:
    name: str
    components: tuple[str, ...]
    #: peak bytes allocated while the unit ran, above what existed before it (its inputs)
    peak_bytes: int
    flops: int
    seconds: float
    outputs: tuple[ValueProfile, ...]
    needs_grad: bool
    #: ops that drew from the per-step generator or the global RNG
    random_ops: tuple[str, ...]
    #: ops that drew from another generator (seeded from the sample): deterministic
    seeded_random_ops: tuple[str, ...]
    #: set when some outputs are random and others are not
    fission: FissionProfile | None = None

    @property
    def draws_random(self) -> bool:
        return bool(self.random_ops)


@dataclass(frozen=True)
class ComponentProfile:
    name: str
    frozen_bytes: int
    trainable_bytes: int
    num_params: int


@dataclass(frozen=True)
class StepProfile:
    """One training step (forward + backward) of the units that need gradients."""

    units: tuple[str, ...]
    peak_bytes: int
    flops: int
    seconds: float
    reserved_peak_bytes: int | None = None


@dataclass(frozen=True)
class BlockProfile:
    """One list of the denoiser's repeated blocks (Qwen-Image's 60 `transformer_blocks`), the unit
    of block swapping and fp8 storage. Bytes and FLOPs are of one block (the largest, if they
    differ); `slot_bytes` lays its frozen tensors out in one buffer, each aligned to 512 B, as the
    swapper copies them (`fp8_slot_bytes`: with its frozen Linear weights in fp8 plus per-channel
    scales)."""

    component: str
    module_list: str
    count: int
    frozen_bytes: int
    slot_bytes: int
    fp8_frozen_bytes: int
    fp8_slot_bytes: int
    #: elements of one block's frozen nn.Linear weights (what fp8 storage keeps in one byte each), and
    #: the largest such weight in the run's dtype (fp8 upcasts one layer at a time)
    linear_weight_elements: int
    max_linear_weight_bytes: int
    #: one block's forward, and its share of the training step (forward, recompute, backward)
    forward_flops: int
    step_flops: int
    #: "traced 1 and 2 blocks" (the difference of the two traces), or "weight share" (the
    #: component's FLOPs times the block's share of its frozen bytes: an estimate)
    flops_from: str


@dataclass(frozen=True)
class Profile:
    pipeline: str
    task: str
    mode: str  # "cpu", "cuda" or "fake"
    batch_size: int
    units: tuple[UnitProfile, ...]
    components: tuple[ComponentProfile, ...]
    grad_step: StepProfile
    notes: dict[str, Any] = field(default_factory=dict)
    version: int = PROFILE_FORMAT_VERSION
    #: the trained denoiser's repeated blocks, in execution order (empty for families without)
    blocks: tuple[BlockProfile, ...] = ()

    def unit(self, name: str) -> UnitProfile:
        return next(u for u in self.units if u.name == name)

    def component(self, name: str) -> ComponentProfile | None:
        return next((c for c in self.components if c.name == name), None)

    def value(self, name: str) -> ValueProfile:
        """An output of a unit, or a frontier tensor of a unit's random part."""
        return next(
            v for u in self.units for v in (*u.outputs, *(u.fission.frontier if u.fission else ())) if v.name == name
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        def unit(u: Mapping[str, Any]) -> UnitProfile:
            outputs = tuple(value(v) for v in u["outputs"])
            return UnitProfile(
                **{
                    **u,
                    "components": tuple(u["components"]),
                    "outputs": outputs,
                    "random_ops": tuple(u["random_ops"]),
                    "seeded_random_ops": tuple(u["seeded_random_ops"]),
                    "fission": fission(u.get("fission")),
                }
            )

        def value(v: Mapping[str, Any]) -> ValueProfile:
            return ValueProfile(**{**v, "shape": tuple(v["shape"]), "depends_on": tuple(v["depends_on"])})

        def fission(f: Mapping[str, Any] | None) -> FissionProfile | None:
            if f is None:
                return None
            return FissionProfile(
                **{
                    **f,
                    "dirty_outputs": tuple(f["dirty_outputs"]),
                    "reads": tuple(f["reads"]),
                    "frontier": tuple(value(v) for v in f["frontier"]),
                    "late": tuple(f.get("late", ())),
                }
            )

        step = data["grad_step"]
        return cls(
            pipeline=data["pipeline"],
            task=data["task"],
            mode=data["mode"],
            batch_size=data["batch_size"],
            units=tuple(unit(u) for u in data["units"]),
            components=tuple(ComponentProfile(**c) for c in data["components"]),
            grad_step=StepProfile(**{**step, "units": tuple(step["units"])}),
            notes=dict(data.get("notes", {})),
            version=data["version"],
            blocks=tuple(BlockProfile(**b) for b in data.get("blocks", ())),
        )
