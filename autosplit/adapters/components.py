"""Finding model folders, fingerprinting their weights, and loading components.

A model folder is a diffusers pipeline folder (`model_index.json` + one subfolder per component).
Nothing is downloaded: a hub id is resolved only from the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from autosplit.adapters.base import Adapter
from autosplit.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

_SAMPLE_BYTES = 1 << 20  # bytes hashed at each of the start, middle and end of a large file


def resolve_hub_id(spec: str) -> Path:
    """Resolve `--model_id_with_origin_paths` ("Qwen/Qwen-Image:transformer/...,...") from the local
    Hugging Face cache, without network access."""
    repo_ids = sorted({item.split(":", 1)[0].strip() for item in spec.split(",") if item.strip()})
    if len(repo_ids) != 1:
        raise ConfigError(
            f"--model_id_with_origin_paths names {repo_ids}; autosplit loads one pipeline folder, "
            f"pass it with --model_paths"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_ids[0], local_files_only=True))
    except Exception as exc:
        raise ModelError(
            f"--model_id_with_origin_paths: {repo_ids[0]} is not in the local Hugging Face cache "
            f"and autosplit never downloads; download it first or pass --model_paths DIR"
        ) from exc


def fingerprint_component(root: Path, name: str) -> str:
    """sha256 over a component folder's file names, sizes and contents.

    Files up to 3 MiB are hashed whole; larger weight files are hashed by size plus 1 MiB at the
    start, middle and end, which detects a replaced or edited file (safetensors headers, shapes and
    sizes change) without reading 40 GB on every start.
    """
    folder = root / name
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(folder)}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= 3 * _SAMPLE_BYTES:
                h.update(f.read())
            else:
                for offset in (0, size // 2, size - _SAMPLE_BYTES):
                    f.seek(offset)
                    h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def quiet_library_progress() -> None:
    """Our progress bars are the ones that matter; diffusers' and transformers' per-file loading
    bars would interleave with them (and clutter logs and one-line errors)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_components(
    adapter: Adapter, root: Path, names: list[str], *, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Load the named components, frozen (requires_grad off) and in eval mode."""
    quiet_library_progress()
    components = {}
    for name in names:
        try:
            component = adapter.load_component(root, name, device=device, dtype=dtype)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise ModelError(f"{root / name}: cannot load {name} ({exc}); re-save the pipeline folder") from exc
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
        components[name] = component
    return components
