"""Pipelines written in code: declare units and components, then profile, plan, cache stage 1 and
train stage 2 from Python, without a config, a `Session` or the CLI (docs/units.md).

`Pipeline` holds what a model family and a config hold for `autosplit run`: the units, the dataset
values they read (`sources`), the built components, which of them train, and the device. Each
method is one step of `autosplit run`, on the same code: `profile` (the tracer, on the first
samples), `plan` (the planner), `cache` (stage 1 into a Zarr cache) and `train` (stage 2 from it,
or unsplit from the samples), with LoRA set up as the trainer sets it up for a family.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autosplit import __version__
from autosplit.adapters.base import ValueLayout
from autosplit.adapters.code import CodeAdapter
from autosplit.config import CacheConfig, DataConfig, LoraConfig, TrainConfig
from autosplit.data import Sample, read_dataset, source_digest
from autosplit.errors import CacheError, ConfigError
from autosplit.graph import Unit, UnitContext, UnitGraph
from autosplit.plan import Plan
from autosplit.planning.plan_check import cut_difference
from autosplit.planning.planner import make_plan
from autosplit.planning.profile import Profile
from autosplit.planning.tracer import profile_graph
from autosplit.storage.cache import CacheReader
from autosplit.training.lora import make_trainable, weights_digest
from autosplit.training.placement import BuiltComponents
from autosplit.training.rng import step_generator
from autosplit.training.stage1 import Stage1Job, Stage1Result, run_stage1, sample_sources
from autosplit.training.trainer import TrainResult, cache_inputs, inline_inputs
from autosplit.training.trainer import train as run_stage2


@dataclass
class Pipeline:
    """Units and built components, trained as autosplit trains a family.

    `trainable` names the trained components, the denoiser first; `lora_targets` its LoRA target
    modules (override per run with `LoraConfig.target_modules`); `pipeline_class` the diffusers
    pipeline whose `save_lora_weights` writes `lora.safetensors` ("": PEFT adapter folders);
    `layouts` how ragged values (text tokens) are cached; `settings` reach the units as
    `ctx.settings`. Raises GraphError (from `graph`) for units that do not form a graph."""

    units: Sequence[Unit]
    sources: tuple[str, ...]
    components: Mapping[str, Any]
    trainable: tuple[str, ...]
    loss: str = "loss"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    pipeline_class: str = ""
    name: str = "code"
    image_multiple: int = 16
    layouts: Mapping[str, ValueLayout] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.graph = UnitGraph(list(self.units), sources=self.sources, loss=self.loss)
        if not self.trainable or self.trainable[0] not in self.components:
            raise ConfigError(
                f"Pipeline(trainable={self.trainable!r}): name the trained components, the denoiser first, "
                f"each one of components {sorted(self.components)}"
            )
        self.adapter = CodeAdapter(
            name=self.name,
            denoiser=self.trainable[0],
            lora_targets=self.lora_targets,
            pipeline_class=self.pipeline_class,
            image_multiple=self.image_multiple,
            layouts=self.layouts,
        )
        self.models = BuiltComponents(
            self.adapter, Path("."), torch.device(self.device), self.dtype, modules=dict(self.components)
        )

    def read_dataset(self, folder: str | Path, *, max_pixels: int = 1024 * 1024, **kwargs: Any) -> list[Sample]:
        """The samples of a dataset folder, as `autosplit run` reads it (`autosplit.data.read_dataset`)."""
        return read_dataset(Path(folder), max_pixels=max_pixels, multiple=self.image_multiple, **kwargs)

    def profile(self, samples: list[Sample], *, lora: LoraConfig | None = None, seed: int = 0) -> Profile:
        """One measured run of every unit on the first of `samples` (their sources), on the device,
        with the trained components as training will have them (LoRA attached to copies)."""
        lora = lora or LoraConfig()
        components = dict(self.models.load(_used(self.graph)))
        for name in self.trainable:
            components[name] = copy.deepcopy(components[name])
            self._make_trainable(components[name], name, lora=lora, seed=seed, checkpointing=False)
        ctx = UnitContext(
            components, self.models.device, self.dtype, generator=step_generator(seed, 0), settings=self.settings
        )
        return profile_graph(self.graph, sample_sources(samples[:1]), ctx, pipeline=self.name, task="sft")

    def plan(self, profile: Profile | None = None, *, split: bool = True, batch_size: int = 1) -> Plan:
        """The cut (`autosplit.planning.planner.make_plan`): measured with `profile`, declared without."""
        return make_plan(
            self.graph,
            pipeline=self.name,
            task="sft",
            trainable=self.trainable,
            split=split,
            layouts=dict(self.layouts),
            settings={"unit_settings": dict(self.settings)},
            profile=profile,
            batch_size=batch_size,
        )

    def cache(
        self, plan: Plan, samples: list[Sample], path: str | Path, *, cache: CacheConfig | None = None
    ) -> Stage1Result:
        """Stage 1: the plan's stage-1 units over `samples`, into the Zarr cache at `path`
        (resumable; a cache of another plan, other stage-1 weights or other samples is rebuilt)."""
        digests = [source_digest(s) for s in samples]
        stage1 = [u.name for u in plan.units if u.stage == 1] + [n for u in plan.units for n in u.stand_ins]
        key = {
            "plan": plan.cut_signature(),
            # the code of what stage 1 runs, and its settings: an edited unit makes the cache stale
            "units": {name: _code_digest(self.graph[name].fn) for name in dict.fromkeys(stage1)},
            "settings": json.dumps(dict(self.settings), sort_keys=True, default=str),
            "versions": {"torch": torch.__version__.split("+")[0], "autosplit": __version__},
            "components": {n: _digest(self.components[n]) for n in plan.components(1)},
            "dtype": str(self.dtype).removeprefix("torch."),
            **({"replay_device": self.models.device.type} if any(u.replays for u in plan.units) else {}),
            "dataset_sha256": hashlib.sha256(b"".join(d.source for d in digests)).hexdigest(),
            "num_samples": len(samples),
        }
        job = Stage1Job(
            plan,
            self.graph,
            samples,
            digests,
            self.models,
            cache or CacheConfig(),
            key,
            dict(self.settings),
            {"pipeline": self.name},
        )
        return run_stage1(job, Path(path), replace_stale=True)

    def train(
        self,
        plan: Plan,
        output: str | Path,
        *,
        cache: str | Path | None = None,
        samples: list[Sample] | None = None,
        train: TrainConfig | None = None,
        lora: LoraConfig | None = None,
        data: DataConfig | None = None,
    ) -> TrainResult:
        """Stage 2 from the cache at `cache` (a split plan), or unsplit from `samples`; writes the LoRA
        (or full weights) to `output` as `autosplit run` does."""
        train_cfg, data_cfg = train or TrainConfig(), data or DataConfig()
        lora = lora or LoraConfig()
        settings = dict(self.settings)
        if plan.split:
            if cache is None:
                raise ConfigError("Pipeline.train: a split plan trains from a cache; pass cache=<the path of cache()>")
            settings["cache_path"] = str(cache)
            problem = cut_difference(CacheReader(Path(cache)).plan.cut_signature(), plan.cut_signature())
            if problem is not None:
                raise CacheError(f"{cache}: its plan is not this plan ({problem}); run Pipeline.cache with this plan")
            inputs = cache_inputs(plan, Path(cache), reader_kind="zarr")
        else:
            if samples is None:
                raise ConfigError("Pipeline.train: an unsplit plan trains from the samples; pass samples=...")
            inputs = inline_inputs(
                plan,
                self.graph,
                samples,
                models=self.models,
                unit_settings=settings,
                shard_size=CacheConfig().shard_size,
            )
        return run_stage2(
            plan,
            self.graph,
            inputs,
            Path(output),
            models=self.models,
            trained=self.trainable,
            train=train_cfg,
            lora=lora,
            data=data_cfg,
            variants=0,
            unit_settings=settings,
        )

    def _make_trainable(self, module: Any, name: str, *, lora: LoraConfig, seed: int, checkpointing: bool) -> None:
        make_trainable(
            module,
            name,
            lora=lora,
            adapter=self.adapter,
            denoiser=name == self.trainable[0],
            seed=seed,
            gradient_checkpointing=checkpointing,
        )


def _used(graph: UnitGraph) -> list[str]:
    return list(dict.fromkeys(c for unit in graph for c in unit.components))


def _code_digest(fn: Any) -> str:
    """A unit function's code: its bytecode, constants, names and defaults, the plain values it closes
    over, and the same of the functions it closes over (a unit made with `@unit` or by renaming wraps
    the written one), recursively. Not what it reaches through globals or objects."""
    h = hashlib.sha256()
    seen: set[int] = set()

    def add(f: Any) -> None:
        code = getattr(f, "__code__", None)
        if code is None or id(code) in seen:
            return
        seen.add(id(code))
        h.update(code.co_code + repr((code.co_consts, code.co_names, getattr(f, "__qualname__", ""))).encode())
        h.update(repr(getattr(f, "__defaults__", None)).encode())
        for cell in getattr(f, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                value = cell.cell_contents
                if isinstance(value, (int, float, str, bytes, tuple, frozenset)) or value is None:
                    h.update(repr(value).encode())  # a setting the function closes over
                else:
                    add(value)

    add(fn)
    return h.hexdigest()


def _digest(component: Any) -> str:
    """A built component's fingerprint: its weights (a module), or its class and config."""
    if isinstance(component, torch.nn.Module):
        return weights_digest(component.state_dict())
    config = getattr(component, "config", None)
    return hashlib.sha256(f"{type(component).__qualname__}:{dict(config) if config else ''}".encode()).hexdigest()
