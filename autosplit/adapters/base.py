"""What an adapter (one model family) provides, and the registry of families."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
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


class Adapter(Protocol):
    """One model family: how to load its components and which units it contributes."""

    name: str
    pipeline_class: str
    #: components that hold trainable weights, by the seed's `--lora_base_model` name
    base_model_aliases: dict[str, str]
    #: pixel sizes must be multiples of this (VAE downsampling x patch size)
    image_multiple: int
    #: LoRA target modules when `--lora_target_modules` is not given
    default_lora_targets: tuple[str, ...]
    #: tasks the family supports ("sft", "direct_distill")
    tasks: tuple[str, ...]
    #: "image", or "video" for families trained on clips (column `video` in the dataset)
    media: str

    def load_component(self, root: Path, name: str, *, device: torch.device, dtype: torch.dtype) -> Any: ...

    def family_units(self) -> list[Unit]: ...

    def value_layouts(self) -> dict[str, ValueLayout]: ...

    def write_tiny(self, root: Path, *, seed: int) -> None: ...


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


def component_from_config(adapter: Adapter, root: Path | None, name: str, *,
                          overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """Build a component from its config alone (random init, in the current default dtype, device
    and mode): from `root/name/config.json` (the class model_index.json names), or with `root` None
    from the adapter's built-in full-size table `full_size_components` (or its own
    `component_from_config`, as Qwen-Image's)."""
    own = getattr(adapter, "component_from_config", None)
    if own is not None:
        return own(root, name, overrides=overrides)
    if root is not None:
        return config_only(root, name, overrides=overrides)
    table = getattr(adapter, "full_size_components", None)
    if table is None:
        raise ModelError(f"the {adapter.name} family has no built-in full-size configuration; "
                         f"pass --model_paths with a diffusers folder (its configs are enough, no weights)")
    from autosplit.adapters import full_size

    return full_size.build(table, adapter.name, name, overrides=overrides)


def save_lora(adapter: Adapter, output_dir: Path, layers: dict[str, tuple[dict[str, torch.Tensor], Any]], *,
              weight_name: str) -> list[str]:
    """Save the LoRA of each trained component (name -> (state dict, adapter metadata)) into one
    file with the family's diffusers pipeline class, so the same pipeline's `load_lora_weights`
    reads it. Returns the components that pipeline cannot save (for the caller to save apart)."""
    import inspect

    import diffusers

    pipeline = getattr(diffusers, adapter.pipeline_class)
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


def config_only(root: Path, name: str, *, overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    cls = component_class(root, name)
    overrides = dict(overrides or {})
    if hasattr(cls, "load_config"):  # diffusers
        return cls.from_config({**dict(cls.load_config(root / name)), **overrides})
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(root / name)
    for key, value in overrides.items():
        setattr(config, key, value)
    return cls._from_config(config)


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
