"""Resolving a run config into what the stages need: family adapter, model folder, device, dtype,
unit graph, trained components, dataset and plan. The stages never see a `Session` or the config
as a whole: `autosplit.workflow.run` hands each one the parts it reads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
from autosplit.config import RunConfig, autosplit_home, validation_prompts
from autosplit.data import Sample, aspect_buckets, read_dataset
from autosplit.errors import ConfigError
from autosplit.graph import UnitGraph
from autosplit.plan import Plan
from autosplit.planning.memory import (
    DEFAULT_H2D_BYTES_PER_S,
    DEFAULT_TRAIN_FLOPS_PER_S,
    MemoryRequest,
    place_memory,
    replace_predicted,
    reserved_bytes,
)
from autosplit.planning.planner import add_validation, make_plan
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
        `plan.profile` says first, use `autosplit.workflow.profiling.plan_run`. With validation
        images, the prediction counts a round's decode (`validation_note`) where the VAE decoder
        runs: `train.validation_decoder_device`, whose "auto" is the GPU when the placement chosen
        for training still fits the budget with it, else the CPU."""
        if profile is None or not validation_prompts(self.config.train):
            return self._plan(profile)
        note = self.validation_note(profile)
        return self._with_decoder(lambda device: self._plan(_noted(profile, note, device)))

    def place_cached(self, plan: Plan, *, validation_size: tuple[int, int] | None) -> Plan:
        """A cache's `plan` placed for this run (`--task sft:train`): this run's budget, the cache's
        measurements, and with validation images of `validation_size` (width, height), a round's
        decode counted as `plan` does it (`add_validation`)."""
        request = self.memory_request()
        if validation_size is None or "stage2_peak_bytes" not in plan.predicted:
            return place_memory(plan, request)
        note = self.validation_note(None, size=validation_size)

        def placed(device: str) -> Plan:
            predicted = add_validation(
                plan.predicted,
                decoder_bytes=note["decoder_bytes"],
                decode_peak_bytes=note["decode_peak_bytes"],
                device=device,
                vae_in_stage2="vae" in plan.components(2),
            )
            return place_memory(replace_predicted(plan, predicted), request)

        return self._with_decoder(placed)

    def _with_decoder(self, plan_for: Any) -> Plan:
        """`plan_for(device)` for the device validation's VAE decoder runs on: the CPU on a CPU run
        or when asked; "auto": the GPU when `decoder_fits`."""
        asked = self.config.train.validation_decoder_device
        if self.device.type != "cuda" or asked == "cpu":
            return plan_for("cpu")
        gpu = plan_for("cuda")
        if asked == "cuda":
            return gpu
        cpu = plan_for("cpu")
        return gpu if decoder_fits(gpu, cpu, budget_bytes=self.memory_request().vram_budget_bytes) else cpu

    def validation_note(self, profile: Profile | None, *, size: tuple[int, int] | None = None) -> dict[str, Any]:
        """What a validation round decodes, for the prediction: the latent shape at the validation
        size (`train.validation_width/height`, else `size`, else the profiled training latents'),
        the decoder's bytes and the decode's peak bytes, measured on a fake VAE of the profiled
        model (of the model folder, in this run's dtype, without a profile); memoized under
        $AUTOSPLIT_HOME/profiles."""
        from autosplit.planning.tracer import new_fake_mode
        from autosplit.training.validation import measure_decode_peak, sampling_of

        sampling, train = sampling_of(self.adapter), self.config.train
        fake_mode = new_fake_mode()
        root, vae = self._fake_vae(profile, fake_mode)
        if train.validation_width:
            size = (train.validation_width, train.validation_height)
        if size is not None:
            shape = sampling.latent_shape(vae.config, *size)
        else:
            assert profile is not None  # without a profile the caller gives the size
            trained = profile.value("image_latents").shape[1:]
            shape = (trained[0], 1, *trained[-2:]) if len(trained) == 4 else tuple(trained)
        key = _decode_key(self.adapter.name, root, vae, shape)
        path = autosplit_home() / "profiles" / f"decode-{key}.json"
        if path.is_file():
            return dict(json.loads(path.read_text()))
        with fake_mode:
            peak = measure_decode_peak(self.adapter, vae, tuple(shape))
        tensors = [*vae.parameters(), *vae.buffers()]
        note = {
            "decode_peak_bytes": peak,
            "decoder_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "latent_shape": list(shape),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(note))
        return note

    def _fake_vae(self, profile: Profile | None, fake_mode: Any) -> tuple[Path | None, Any]:
        """The VAE the profile measured, built fake: from the model folder, or (a full-size fake
        profile of no folder) the family's full-size configuration, in the profile's dtype; without
        a profile, the model folder's in this run's dtype."""
        from autosplit.adapters.base import component_from_config
        from autosplit.planning.tracer import fake_build

        measured = profile.component("vae") if profile is not None else None
        if profile is not None and measured is None:
            raise ConfigError(f"--validation_prompt: the {self.adapter.name} graph has no vae to decode with")
        dtype = self.dtype
        if measured is not None:
            dtype = _DTYPES_BY_SIZE.get(measured.frozen_bytes // max(measured.num_params, 1), self.dtype)
        vae = None
        for root in (self.model_root, None) if measured else (self.model_root,):
            with fake_build(fake_mode, dtype):
                vae = component_from_config(self.adapter, root, "vae").requires_grad_(False).eval()
            if measured is None or sum(t.numel() for t in [*vae.parameters(), *vae.buffers()]) == measured.num_params:
                return root, vae
        return self.model_root, vae

    def _plan(self, profile: Profile | None) -> Plan:
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


_DTYPES_BY_SIZE = {4: torch.float32, 2: torch.bfloat16}


def _noted(profile: Profile, note: dict[str, Any], device: str) -> Profile:
    """`profile` with a validation round's decode in its notes, decoding on `device`, for `predict`."""
    return dataclasses.replace(profile, notes={**profile.notes, "validation": {**note, "device": device}})


def decoder_fits(gpu: Plan, cpu: Plan, *, budget_bytes: int) -> bool:
    """Whether validation may decode on the GPU: with no budget, yes; else when the plan decoding on
    the GPU keeps the weight placement the CPU-decoding one chose for training and still fits."""
    if not budget_bytes:
        return True
    placed, alone = gpu.predicted.get("placement") or {}, cpu.predicted.get("placement") or {}
    if placed.get("predicted"):
        same = all(placed.get(k) == alone.get(k) for k in ("blocks_to_swap", "base_precision", "slots"))
        return same and bool(placed.get("fits"))
    judged = "stage2_peak_bytes" if gpu.split else "unsplit_peak_bytes"
    return reserved_bytes(gpu.predicted[judged]) <= budget_bytes


def _decode_key(family: str, root: Path | None, vae: Any, shape: tuple[int, ...]) -> str:
    """What a decode's measured peak depends on: the VAE's config and dtype, the latent shape."""
    import autosplit

    dtype = str(next(vae.parameters()).dtype)
    config = json.dumps(dict(vae.config), sort_keys=True, default=str)
    parts = [autosplit.__version__, torch.__version__, family, str(root is None), config, dtype, list(shape)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


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
