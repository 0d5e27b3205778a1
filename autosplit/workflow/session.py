"""Resolving a run config into what the stages need: family adapter, model folder, device, dtype,
unit graph, trained components, dataset and plan. The stages never see a `Session` or the config
as a whole: `autosplit.workflow.run` hands each one the parts it reads."""

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
from autosplit.adapters.builtin import (
    builtin_dataset_root,
    builtin_distill_root,
    builtin_model_root,
)
from autosplit.adapters.components import fingerprint_component
from autosplit.config import RunConfig
from autosplit.data import Sample, aspect_buckets, read_dataset
from autosplit.errors import ConfigError
from autosplit.graph import UnitGraph
from autosplit.plan import Plan
from autosplit.planning.planner import (
    DEFAULT_H2D_BYTES_PER_S,
    DEFAULT_TRAIN_FLOPS_PER_S,
    MemoryRequest,
    make_plan,
)
from autosplit.planning.profile import Profile
from autosplit.tasks import TASK_COLUMNS, build_graph, graph_layouts
from autosplit.training.placement import ComponentSource
from autosplit.training.stage1 import Stage1Job

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

    @property
    def models(self) -> ComponentSource:
        """Where this run's components come from: the model folder, on the run's device and dtype."""
        return ComponentSource(self.adapter, self.model_root, self.device, self.dtype)

    def plan(self, profile: Profile | None) -> Plan:
        """The plan of this run from `profile` (None: from the units' declarations). To profile as
        `plan.profile` says first, use `autosplit.workflow.profiling.plan_run`."""
        return make_plan(
            self.graph,
            pipeline=self.adapter.name,
            task=self.task,
            trainable=self.trainable,
            split=self.config.train.split,
            layouts=graph_layouts(self.adapter),
            settings=self.config.to_dict(),
            profile=profile,
            batch_size=self.config.train.batch_size,
            solver=self.config.plan.solver,
            memory=self.memory_request(),
        )

    def memory_request(self) -> MemoryRequest:
        """What this run asks of stage 2's weight placement (docs/memory.md). Raises ConfigError for
        `--blocks_to_swap N` on a family whose denoiser has no repeated-block lists."""
        cfg, plan = self.config, self.config.plan
        swap, precision = cfg.train.blocks_to_swap, cfg.train.base_precision
        if (swap not in ("0", "auto") or precision == "fp8") and not self.adapter.block_lists.get(self.trainable[0]):
            flag = f"--blocks_to_swap {swap}" if swap not in ("0", "auto") else "--base_precision fp8"
            raise ConfigError(
                f"{flag}: the {self.adapter.name} family's {self.trainable[0]} has no repeated-block "
                f"lists (block swapping and fp8 storage cover Qwen-Image, FLUX and Wan); drop the flag"
            )
        return MemoryRequest(
            blocks_to_swap=swap,
            base_precision=precision,
            vram_budget_bytes=int(plan.vram_budget_gib * (1 << 30)),
            host_ram_bytes=int(plan.host_ram_gib * (1 << 30)) or host_ram_bytes(),
            h2d_bytes_per_s=plan.host_to_device_gbps * 1e9 or DEFAULT_H2D_BYTES_PER_S,
            train_flops_per_s=plan.train_tflops * 1e12 or DEFAULT_TRAIN_FLOPS_PER_S,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
        )

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
        samples = read_dataset(
            base,
            metadata,
            max_pixels=data.max_pixels,
            multiple=self.adapter.image_multiple,
            media=self.adapter.media,
            columns=TASK_COLUMNS[self.task],
            max_frames=data.max_frames,
            allow_outside_paths=data.allow_outside_paths,
            missing_caption=data.missing_caption,
            buckets=training_buckets(self.config, self.adapter),
        )
        return expand_variants(samples, self.config.cache.variants)

    def stage1_job(self, plan: Plan, samples: list[Sample]) -> Stage1Job:
        """What stage 1 reads to cache `samples` under `plan`."""
        from autosplit.data import source_digest

        data = self.config.data
        dataset = {
            "base_path": str(self.dataset_folder().resolve()),
            "metadata_path": str(Path(data.metadata_path).resolve()) if data.metadata_path else "",
        }
        digests = [source_digest(s) for s in samples]
        key = self.stage1_key(plan, samples, [d.source for d in digests])
        return Stage1Job(
            plan, self.graph, samples, digests, self.models, self.config.cache, key, self.settings, dataset
        )

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
            # only when on, so that caches made before buckets existed keep their key
            **({"buckets": bucket_key(self.config)} if self.config.data.buckets != "none" else {}),
            "dataset_sha256": hashlib.sha256(b"".join(sample_sha)).hexdigest(),
            "num_samples": len(samples),
            "versions": {
                "torch": torch.__version__.split("+")[0],
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
        }


def training_buckets(config: RunConfig, adapter: Adapter) -> list[tuple[int, int]] | None:
    """The aspect-ratio buckets of `data.buckets = "aspect"` (None: each image at its own size).
    Raises ConfigError when `data.bucket_step` is no multiple of the family's pixel factor or no
    bucket fits `data.max_pixels`."""
    data = config.data
    if data.buckets == "none":
        return None
    if data.bucket_step % adapter.image_multiple:
        raise ConfigError(
            f"data.bucket_step={data.bucket_step} must be a multiple of {adapter.image_multiple} for "
            f"{adapter.name} (its VAE x patch factor); e.g. --set data.bucket_step="
            f"{max(1, data.bucket_step // adapter.image_multiple) * adapter.image_multiple}"
        )
    try:
        return aspect_buckets(max_pixels=data.max_pixels, step=data.bucket_step, max_aspect=data.bucket_max_aspect)
    except ValueError as exc:
        raise ConfigError(
            f"data.buckets=aspect: {exc} (--max_pixels {data.max_pixels}, data.bucket_step="
            f"{data.bucket_step}); raise --max_pixels or lower data.bucket_step"
        ) from exc


def bucket_key(config: RunConfig) -> dict[str, Any]:
    """The bucket settings stage-1 outputs depend on (part of the cache's key)."""
    data = config.data
    return {"mode": data.buckets, "step": data.bucket_step, "max_aspect": data.bucket_max_aspect}


def host_ram_bytes() -> int:
    """This machine's physical memory (0 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return 0


def expand_variants(samples: list[Sample], variants: int) -> list[Sample]:
    """With K cached augmentation variants, each sample becomes K consecutive samples that differ
    in their `variant` column (K*i + k is variant k of sample i); stage 2 picks one per epoch."""
    if variants <= 0:
        return samples
    return [dataclasses.replace(s, extras={**s.extras, "variant": k}) for s in samples for k in range(variants)]


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
    graph = build_graph(
        adapter,
        task,
        vae_latents=config.data.vae_latents,
        random_flip_p=config.data.random_flip,
        caption_dropout_p=config.data.caption_dropout,
        variants=config.cache.variants,
    )
    device = resolve_device(config.model.device)
    dtype_name = config.model.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    trainable = trainable_components(adapter, graph, config.lora.base_model)
    training_buckets(config, adapter)  # a bad bucket setting fails before anything runs
    root = Path(config.model.path) if config.model.path else builtin_model_root(adapter)
    read_model_index(root, adapter=adapter, components=[])
    return Session(
        config=config,
        adapter=adapter,
        task=task,
        mode=mode,
        model_root=root,
        device=device,
        dtype=_DTYPES[dtype_name],
        graph=graph,
        trainable=trainable,
        settings={
            "patch_size": adapter.patch_size,
            "seed": config.train.seed,
            "random_flip": config.data.random_flip,
            "caption_dropout": config.data.caption_dropout,
            "variants": config.cache.variants,
        },
    )


def trainable_components(adapter: Adapter, graph: UnitGraph, base_model: str) -> tuple[str, ...]:
    """The components `--lora_base_model` names (comma-separated): the denoiser by its alias, and
    any text encoder of the family by its component name. The denoiser comes first."""
    used = {c for unit in graph for c in unit.components}
    aliases = {**adapter.base_model_aliases, **{c: c for c in used if c.startswith("text_encoder")}}
    names = [n.strip() for n in base_model.split(",") if n.strip()]
    unknown = [n for n in names if n not in aliases]
    if unknown or not names:
        raise ConfigError(
            f"--lora_base_model {base_model!r}: {unknown or 'nothing'} is unknown for {adapter.name}; "
            f"choose from {sorted(aliases)}, comma-separated"
        )
    chosen = list(dict.fromkeys(aliases[n] for n in names))
    denoiser = adapter.base_model_aliases["dit"]
    if denoiser not in chosen:
        raise ConfigError(
            f"--lora_base_model {base_model!r}: the denoiser is always trained; use dit,{','.join(chosen)}"
        )
    return (denoiser, *[c for c in chosen if c != denoiser])
