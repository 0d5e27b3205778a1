"""Resolving a run config into what the stages need: family adapter, model folder, device, dtype,
unit graph, trainable components, dataset and plan."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autosplit.adapters.base import Adapter, get_adapter, read_model_index
from autosplit.builtin import builtin_dataset_root, builtin_distill_root, builtin_model_root
from autosplit.config import RunConfig
from autosplit.data import Sample, read_dataset
from autosplit.errors import ConfigError
from autosplit.graph import UnitGraph
from autosplit.models import fingerprint_component
from autosplit.planner import Plan, make_plan
from autosplit.profiler import Profile
from autosplit.tasks import TASK_COLUMNS, build_graph, graph_layouts

log = logging.getLogger(__name__)

MODES = ("", "data_process", "train")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Session:
    config: RunConfig
    adapter: Adapter
    task: str
    #: "" (plan + both stages), "data_process" (stage 1 only), "train" (stage 2 from a cache)
    mode: str
    model_root: Path
    device: torch.device
    dtype: torch.dtype
    graph: UnitGraph
    trainable: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def plan(self, profile: Profile | None = None) -> Plan:
        """The plan of this run: from `profile` if given, else from a profile made as
        `plan.profile` says ("fake": configs only, no weights; "real": the weights on the device;
        "none": the units' declarations)."""
        if profile is None and self.config.plan.profile != "none":
            from autosplit.profiling import plan_profile

            check_components_present(self, sorted({c for u in self.graph for c in u.components}))
            profile = plan_profile(self)
        return make_plan(self.graph, pipeline=self.adapter.name, task=self.task, trainable=self.trainable,
                         split=self.config.train.split, layouts=graph_layouts(self.adapter),
                         settings=self.config.to_dict(), profile=profile,
                         batch_size=self.config.train.batch_size, solver=self.config.plan.solver)

    def dataset_folder(self) -> Path:
        """The dataset folder: the configured one, or this family's and task's built-in one."""
        if self.config.data.base_path:
            return Path(self.config.data.base_path)
        if self.task == "direct_distill":
            return builtin_distill_root(self.adapter, self.model_root)
        return builtin_dataset_root(self.adapter.media)

    def samples(self, base: Path | None = None, metadata: Path | None = None) -> list[Sample]:
        """The dataset's samples (of `base`/`metadata` if given, else of the configured dataset)."""
        data = self.config.data
        if base is None:
            base = self.dataset_folder()
            metadata = Path(data.metadata_path) if data.metadata_path else None
        samples = read_dataset(base, metadata, max_pixels=data.max_pixels, multiple=self.adapter.image_multiple,
                               media=self.adapter.media, columns=TASK_COLUMNS[self.task], max_frames=data.max_frames)
        return expand_variants(samples, self.config.cache.variants)

    def stage1_key(self, plan: Plan, samples: list[Sample], sample_sha: list[bytes]) -> dict[str, Any]:
        """Everything stage-1 outputs depend on; a cache made under another key is stale."""
        import diffusers
        import transformers

        stage1 = [u for u in plan.units if u.stage == 1]
        return {
            "plan": plan.cut_signature(),
            "stage1_units": [[u.name, list(u.components)] for u in stage1],
            "components": {c: fingerprint_component(self.model_root, c) for c in plan.components(1)},
            "dtype": str(self.dtype).removeprefix("torch."),
            # a split unit's graph records the ops of stage 1's device (a CPU run skips `.to(cpu)`)
            **({"replay_device": self.device.type} if any(u.replays for u in plan.units) else {}),
            "max_pixels": self.config.data.max_pixels,
            "dataset_sha256": hashlib.sha256(b"".join(sample_sha)).hexdigest(),
            "num_samples": len(samples),
            "versions": {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
        }


def expand_variants(samples: list[Sample], variants: int) -> list[Sample]:
    """With K cached augmentation variants, each sample becomes K consecutive samples that differ
    in their `variant` column (K*i + k is variant k of sample i); stage 2 picks one per epoch."""
    if variants <= 0:
        return samples
    return [dataclasses.replace(s, extras={**s.extras, "variant": k}) for s in samples for k in range(variants)]


#: key entries that depend on which samples the dataset holds; a cache differing only in these can
#: be updated sample by sample instead of rebuilt
DATASET_KEYS = ("dataset_sha256", "num_samples")


def parse_task(task: str) -> tuple[str, str]:
    base, _, mode = task.partition(":")
    if mode not in MODES:
        raise ConfigError(f"--task {task!r}: unknown stage {mode!r}; use {base}, {base}:data_process or {base}:train")
    return base, mode


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        # `accelerate launch --cpu` asks for the CPU on a GPU machine too
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def open_session(config: RunConfig) -> Session:
    """Resolve `config`; raises ConfigError/ModelError naming the flag at fault."""
    adapter = get_adapter(config.model.pipeline)
    task, mode = parse_task(config.train.task)
    graph = build_graph(adapter, task, vae_latents=config.data.vae_latents, random_flip_p=config.data.random_flip,
                        caption_dropout_p=config.data.caption_dropout,
                        variants=config.cache.variants)
    device = resolve_device(config.model.device)
    dtype_name = config.model.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    trainable = trainable_components(adapter, graph, config.lora.base_model)
    root = Path(config.model.path) if config.model.path else builtin_model_root(adapter)
    read_model_index(root, adapter=adapter, components=[])
    return Session(config=config, adapter=adapter, task=task, mode=mode, model_root=root, device=device,
                   dtype=_DTYPES[dtype_name], graph=graph, trainable=trainable,
                   settings={"patch_size": 2, "seed": config.train.seed, "random_flip": config.data.random_flip,
                             "caption_dropout": config.data.caption_dropout,
                             "variants": config.cache.variants})


def trainable_components(adapter: Adapter, graph: UnitGraph, base_model: str) -> tuple[str, ...]:
    """The components `--lora_base_model` names (comma-separated): the denoiser by its alias, and
    any text encoder of the family by its component name. The denoiser comes first."""
    used = {c for unit in graph for c in unit.components}
    aliases = {**adapter.base_model_aliases, **{c: c for c in used if c.startswith("text_encoder")}}
    names = [n.strip() for n in base_model.split(",") if n.strip()]
    unknown = [n for n in names if n not in aliases]
    if unknown or not names:
        raise ConfigError(f"--lora_base_model {base_model!r}: {unknown or 'nothing'} is unknown for {adapter.name}; "
                          f"choose from {sorted(aliases)}, comma-separated")
    chosen = list(dict.fromkeys(aliases[n] for n in names))
    denoiser = adapter.base_model_aliases["dit"]
    if denoiser not in chosen:
        raise ConfigError(f"--lora_base_model {base_model!r}: the denoiser is always trained; "
                          f"use dit,{','.join(chosen)}")
    return (denoiser, *[c for c in chosen if c != denoiser])


def check_components_present(session: Session, names: list[str]) -> None:
    """Raise ModelError unless the model folder holds every component in `names`."""
    read_model_index(session.model_root, adapter=session.adapter, components=names)
