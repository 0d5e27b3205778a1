"""What an adapter (one model family) provides, and the registry of families."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import torch

from autosplit.errors import ConfigError, ModelError
from autosplit.graph import Unit


@dataclass(frozen=True)
class ValueLayout:
    """How a per-sample value is stored and batched.

    `ragged_axis` is the per-sample axis whose length varies between samples (text tokens);
    batches pad it with zeros to the longest sample. `max_len` caps that axis in the cache.
    """

    ragged_axis: int | None = None
    max_len: int | None = None


@dataclass(frozen=True)
class Sampling:
    """How a family's diffusers pipeline samples an image, as validation images during training do
    it (`autosplit.training.validation`: the trained `denoise` unit in a diffusers scheduler's
    loop). Pixel sizes are multiples of the family's `image_multiple`."""

    #: a unit function of the VAE: {"latents": B x latent_shape, normalized as the family's
    #: encode_image leaves them} -> {"image": B,3,H,W in [-1, 1], the VAE's dtype}, as the pipeline decodes
    decode: Callable[..., dict[str, Any]]
    #: (VAE config, width, height) -> one image's latent shape (channels first)
    latent_shape: Callable[[Any, int, int], tuple[int, ...]]
    #: the VAE config's pixels per latent pixel
    scale_factor: Callable[[Any], int]
    #: "cfg" (classifier-free guidance with the negative prompt, at a scale above 1) or "embedded"
    #: (the transformer's guidance input, when its config has `guidance_embeds`: FLUX.1-dev)
    guidance: str
    #: the pipeline's default guidance scale
    default_guidance: float
    #: (conditional, unconditional, scale) -> the guided prediction; None: the usual
    #: unconditional + scale x (conditional - unconditional)
    combine: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
    #: an empty negative prompt conditions on zeros (SDXL's `force_zeros_for_empty_prompt`)
    zero_empty_negative: bool = False


@dataclass(frozen=True)
class LoraNaming:
    """How one LoRA file format other than diffusers' names a family's LoRA layers (one per
    family and format: `Adapter.lora_naming`; the file itself is written by
    `autosplit.training.lora`, the same code for every family; docs/lora-formats.md).

    `style` "kohya": keys `<prefix><module, its dots as _>.lora_down.weight`, `.lora_up.weight`
    and `.alpha`; "comfyui": `<prefix><module>.lora_A.weight`, `.lora_B.weight` (and `.alpha` when
    it is not the rank). A native module may fuse several diffusers modules (FLUX's qkv): their
    down weights are stacked and their up weights placed block-diagonally, so nothing is lost.
    """

    style: str
    #: component -> the key prefix of its layers ("lora_unet_", "lora_te1_", "diffusion_model.")
    prefixes: Mapping[str, str]
    #: (component, diffusers module path) -> (the format's module path, index of this part in a
    #: fused module, else 0); raises KeyError for a module the format cannot name
    to_native: Callable[[str, str], tuple[str, int]]
    #: (component, the format's module path) -> the diffusers module paths of its parts, in order;
    #: raises KeyError for a name the family does not have
    to_diffusers: Callable[[str, str], tuple[str, ...]]
    #: (fused module path, in_features, out_features) -> output rows of each of its parts
    split_rows: Callable[[str, int, int], list[int]] | None = None
    #: words of the format's module names that hold an underscore ("to_q", "double_blocks"): how a
    #: kohya key's flattened name is read back
    words: frozenset[str] = frozenset()


def rename_table(
    rows: Sequence[tuple[Any, ...]],
) -> tuple[Callable[[str], tuple[str, int]], Callable[[str], tuple[str, ...]]]:
    """The two directions of a family's LoRA name table: rows of (diffusers module, the format's
    module[, part of a fused module]) where `{i}` stands for a block number. Each direction raises
    KeyError for a name no row matches."""
    compiled = [(_pattern(row[0]), row[0], _pattern(row[1]), row[1], row[2] if len(row) > 2 else 0) for row in rows]

    def to_native(path: str) -> tuple[str, int]:
        for diffusers, _, _, native, part in compiled:
            if match := diffusers.fullmatch(path):
                return native.format(i=match.group(1)) if "{i}" in native else native, part
        raise KeyError(path)

    def to_diffusers(path: str) -> tuple[str, ...]:
        parts = sorted(
            (part, template.format(i=m.group(1)) if "{i}" in template else template)
            for _, template, native, _, part in compiled
            if (m := native.fullmatch(path))
        )
        if not parts:
            raise KeyError(path)
        return tuple(name for _, name in parts)

    return to_native, to_diffusers


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


class Adapter(Protocol):
    """One model family: how to load its components and which units it contributes. Every hook
    the rest of autosplit calls is here; `AdapterBase` gives the optional ones their defaults."""

    name: str
    pipeline_class: str
    #: components that hold trainable weights, by the seed's `--lora_base_model` name
    base_model_aliases: dict[str, str]
    #: pixel sizes must be multiples of this (VAE downsampling x patch size)
    image_multiple: int
    #: latent pixels per token side: the image sequence length flow-matching shift is computed from
    patch_size: int
    #: LoRA target modules when `--lora_target_modules` is not given
    default_lora_targets: tuple[str, ...]
    #: tasks the family supports ("sft", "direct_distill")
    tasks: tuple[str, ...]
    #: "image", or "video" for families trained on clips (column `video` in the dataset)
    media: str
    #: blocks that repeat, by component: the config key of their count (fake full-size profiles
    #: trace 1 and 2 of them and extrapolate)
    repeated_blocks: Mapping[str, str]
    #: the ModuleLists of repeated blocks, by component, in execution order: the units of block
    #: swapping (`--blocks_to_swap`, docs/memory.md); empty for a family that has none (a UNet)
    block_lists: Mapping[str, tuple[str, ...]]
    #: the published full-size scheduler config (`autosplit plan --fake` without a folder), or None
    full_size_scheduler: Mapping[str, Any] | None
    #: component -> (library, class, published config) of the full-size model, or None
    full_size_components: Mapping[str, Any] | None
    #: a unit function giving the VAE posterior's mean and std (`data.vae_latents` sample and
    #: frozen_sample), or None when the family supports only the posterior mode
    encode_image_dist: Callable[..., dict[str, Any]] | None
    #: how the family's pipeline samples an image (validation images), or None when it cannot
    sampling: Sampling | None

    def load_component(self, root: Path, name: str, *, device: torch.device, dtype: torch.dtype) -> Any: ...

    def component_from_config(
        self, root: Path | None, name: str, *, overrides: Mapping[str, Any] | None = None
    ) -> torch.nn.Module: ...

    def family_units(self) -> list[Unit]: ...

    def value_layouts(self) -> dict[str, ValueLayout]: ...

    def write_tiny(self, root: Path, *, seed: int) -> None: ...

    def lora_naming(self, fmt: str, *, denoiser_config: Mapping[str, Any] | None = None) -> LoraNaming:
        """How LoRA format `fmt` ("kohya", "comfyui") names this family's layers; `denoiser_config`
        is the trained denoiser's config (None: the family's full-size one), for formats whose
        names depend on it (SDXL's block numbers). Raises ConfigError when the family has no such
        format."""
        ...


class AdapterBase:
    """Defaults of the optional `Adapter` hooks; each family's class derives from it."""

    patch_size: int = 2
    repeated_blocks: Mapping[str, str] = MappingProxyType({})
    block_lists: Mapping[str, tuple[str, ...]] = MappingProxyType({})
    full_size_scheduler: Mapping[str, Any] | None = None
    full_size_components: Mapping[str, Any] | None = None
    encode_image_dist: Callable[..., dict[str, Any]] | None = None
    sampling: Sampling | None = None

    def component_from_config(
        self, root: Path | None, name: str, *, overrides: Mapping[str, Any] | None = None
    ) -> torch.nn.Module:
        """Build a component from its config alone (random init, in the current default dtype,
        device and mode): from `root/name/config.json` (the class model_index.json names), or with
        `root` None from the family's built-in full-size table `full_size_components`."""
        if root is not None:
            return config_only(root, name, overrides=overrides)
        if self.full_size_components is None:
            raise ModelError(
                f"the {getattr(self, 'name', type(self).__name__)} family has no built-in full-size "
                f"configuration; pass --model_paths with a diffusers folder (its configs are enough, "
                f"no weights)"
            )
        from autosplit.adapters import full_size

        return full_size.build(self.full_size_components, getattr(self, "name", ""), name, overrides=overrides)

    def lora_naming(self, fmt: str, *, denoiser_config: Mapping[str, Any] | None = None) -> LoraNaming:
        """No LoRA format but diffusers' by default: raises ConfigError."""
        family = getattr(self, "name", type(self).__name__)
        raise ConfigError(
            f"--lora_format {fmt}: format {fmt!r} is not available for family {family}; use "
            f"--lora_format diffusers (docs/lora-formats.md lists each family's formats)"
        )


def read_model_index(root: Path, *, adapter: Adapter, components: list[str]) -> dict[str, Any]:
    """Check that `root` is a diffusers folder of the adapter's family holding `components`.

    Raises ModelError naming the folder, what is missing and how to fix it.
    """
    index_path = root / "model_index.json"
    if not root.is_dir():
        raise ModelError(f"--model_paths {root}: no such folder; point it at a diffusers pipeline folder")
    if not index_path.is_file():
        raise ModelError(
            f"--model_paths {root} is not a diffusers folder (no model_index.json); point it at a folder "
            f"written by {adapter.pipeline_class}.save_pretrained"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_path}: not valid JSON ({exc}); re-save the pipeline") from exc
    if index.get("_class_name") != adapter.pipeline_class:
        raise ModelError(
            f"{index_path}: _class_name is {index.get('_class_name')!r}, expected {adapter.pipeline_class!r}; "
            f"choose the matching --pipeline or model folder"
        )
    missing = [name for name in components if name not in index or not (root / name).is_dir()]
    if missing:
        raise ModelError(f"--model_paths {root} lacks components {missing}; it needs {components}")
    return index


def component_class(root: Path, name: str) -> type:
    """The class `model_index.json` names for component `name` (diffusers or transformers)."""
    import importlib

    library, class_name = json.loads((root / "model_index.json").read_text())[name]
    return getattr(importlib.import_module(library), class_name)


def is_module_component(root: Path, name: str) -> bool:
    """False for tokenizers and schedulers (small, weight-free: profiles load them for real)."""
    return issubclass(component_class(root, name), torch.nn.Module)


def component_from_config(
    adapter: Adapter, root: Path | None, name: str, *, overrides: Mapping[str, Any] | None = None
) -> torch.nn.Module:
    """`adapter.component_from_config` (see `AdapterBase.component_from_config`)."""
    return adapter.component_from_config(root, name, overrides=overrides)


def save_lora(
    adapter: Adapter, output_dir: Path, layers: dict[str, tuple[dict[str, torch.Tensor], Any]], *, weight_name: str
) -> list[str]:
    """Save the LoRA of each trained component (name -> (state dict, adapter metadata)) into one
    file with the family's diffusers pipeline class, so the same pipeline's `load_lora_weights`
    reads it. Returns the components that pipeline cannot save (for the caller to save apart)."""
    import inspect

    import diffusers

    pipeline = getattr(diffusers, adapter.pipeline_class, None) if adapter.pipeline_class else None
    if pipeline is None or not hasattr(pipeline, "save_lora_weights"):
        return list(layers)  # no diffusers pipeline to write the file (a pipeline written in code)
    accepted = inspect.signature(pipeline.save_lora_weights).parameters
    kwargs, left = {}, []
    for name, (state, metadata) in layers.items():
        if f"{name}_lora_layers" not in accepted:
            left.append(name)
            continue
        kwargs[f"{name}_lora_layers"] = state
        if f"{name}_lora_adapter_metadata" in accepted:
            kwargs[f"{name}_lora_adapter_metadata"] = metadata
    pipeline.save_lora_weights(output_dir, weight_name=weight_name, **kwargs)
    return left


def empty_component(adapter: Adapter, root: Path | None, name: str) -> torch.nn.Module:
    """The component's module tree without weights (meta device): cheap even at 20 B parameters."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return component_from_config(adapter, root, name)


def config_only(root: Path, name: str, *, overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    cls: Any = component_class(root, name)  # a diffusers or transformers model class
    overrides = dict(overrides or {})
    if hasattr(cls, "load_config"):  # diffusers
        return cls.from_config({**dict(cls.load_config(root / name)), **overrides})
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(root / name)
    for key, value in overrides.items():
        setattr(config, key, value)
    return cls._from_config(config)


#: (tokenizer label, caption token limit) -> [captions cut, most tokens seen] since `truncation_report()`
_TRUNCATED: dict[tuple[str, int], list[int]] = {}


def note_truncation(
    tokenizer: Any, texts: list[str], *, max_length: int, label: str, template_tokens: int = 0, **kwargs: Any
) -> int:
    """Count the `texts` longer than `max_length` tokens, which the caller's own truncating call
    cuts (`tokenizer` runs here untruncated, with `kwargs`; the encoding is untouched). The first
    cut of each `label` and limit logs one warning per process, later ones are counted for
    `truncation_report()`. `template_tokens` of `max_length` are the caller's template, not the
    caption. Returns the number of texts cut."""
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False, **kwargs).input_ids]
    cut = [n for n in lengths if n > max_length]
    if cut:
        limit = max_length - template_tokens
        key = (label, limit)
        if key not in _TRUNCATED:
            logging.getLogger(__name__).warning(
                "%d of %d captions in a batch are longer than %s's limit and are cut to %d tokens (the longest has "
                "%d); shorten them to keep their ends (further cuts by %s are counted, not logged)",
                len(cut),
                len(texts),
                label,
                limit,
                max(cut) - template_tokens,
                label,
            )
        total = _TRUNCATED.setdefault(key, [0, 0])
        total[0], total[1] = total[0] + len(cut), max(total[1], max(cut) - template_tokens)
    return len(cut)


def truncation_report() -> str | None:
    """One line on the captions cut since the last call (None if none were), e.g. for the end of
    stage 1; resets the counts, so the next cut logs its warning again."""
    if not _TRUNCATED:
        return None
    parts = [
        f"{n} by {label} to {limit} tokens (the longest had {longest})"
        for (label, limit), (n, longest) in sorted(_TRUNCATED.items())
    ]
    _TRUNCATED.clear()
    return f"captions cut to the text encoders' limits: {'; '.join(parts)}; shorten them to keep their ends"


_REGISTRY: dict[str, str] = {
    "qwen_image": "autosplit.adapters.qwen_image:QwenImageAdapter",
    "flux": "autosplit.adapters.flux:FluxAdapter",
    "sd": "autosplit.adapters.sd:StableDiffusionAdapter",
    "sdxl": "autosplit.adapters.sd:StableDiffusionXLAdapter",
    "wan": "autosplit.adapters.wan:WanAdapter",
}


def get_adapter(name: str) -> Adapter:
    """Return the adapter registered under `name` (raises ConfigError listing the known ones)."""
    key = name.replace("-", "_").lower()
    if key not in _REGISTRY:
        raise ConfigError(f"--pipeline {name!r} is unknown; choose one of {sorted(_REGISTRY)}")
    module_name, _, class_name = _REGISTRY[key].partition(":")
    module = __import__(module_name, fromlist=[class_name])
    return getattr(module, class_name)()
