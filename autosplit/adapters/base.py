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

    def empty_component(self, root: Path, name: str) -> torch.nn.Module: ...

    def family_units(self) -> list[Unit]: ...

    def value_layouts(self) -> dict[str, ValueLayout]: ...

    def write_tiny(self, root: Path, *, seed: int) -> None: ...

    def save_lora(self, output_dir: Path, state_dict: dict[str, torch.Tensor], *, weight_name: str,
                  metadata: dict[str, Any] | None = None) -> Path: ...


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
