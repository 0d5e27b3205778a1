"""The adapter of a pipeline written in code (`autosplit.Pipeline`, docs/units.md): no model
folder and no family units; what the trainer asks of a family (LoRA targets, the pipeline class
whose `save_lora_weights` writes the LoRA file, the denoiser's repeated blocks) as given."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from autosplit.adapters.base import AdapterBase, ValueLayout
from autosplit.errors import ConfigError
from autosplit.graph import Unit


class CodeAdapter(AdapterBase):
    """A family made of what `autosplit.Pipeline` was given. `pipeline_class` names a diffusers
    pipeline (e.g. "QwenImagePipeline") whose `load_lora_weights` should read the LoRA file; ""
    saves each trained component as a PEFT adapter folder instead."""

    media = "image"
    tasks: tuple[str, ...] = ("sft",)

    def __init__(
        self,
        *,
        name: str,
        denoiser: str,
        lora_targets: tuple[str, ...],
        pipeline_class: str = "",
        image_multiple: int = 16,
        block_lists: Mapping[str, tuple[str, ...]] | None = None,
        layouts: Mapping[str, ValueLayout] | None = None,
    ):
        self.name = name
        self.pipeline_class = pipeline_class
        self.base_model_aliases = {"dit": denoiser}
        self.default_lora_targets = tuple(lora_targets)
        self.image_multiple = image_multiple
        self.block_lists = MappingProxyType(dict(block_lists or {}))
        self._layouts = dict(layouts or {})

    def load_component(self, root: Path, name: str, *, device: torch.device, dtype: torch.dtype) -> Any:
        raise ConfigError(f"component {name!r}: a pipeline written in code has no model folder; pass it built")

    def family_units(self) -> list[Unit]:
        return []

    def value_layouts(self) -> dict[str, ValueLayout]:
        return dict(self._layouts)

    def write_tiny(self, root: Path, *, seed: int) -> None:
        raise ConfigError("a pipeline written in code has no built-in tiny model")
