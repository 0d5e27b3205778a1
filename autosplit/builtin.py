"""The built-in default: a tiny random-init pipeline and a synthetic dataset, written on first use.

Both are deterministic (seeded) and live under $AUTOSPLIT_HOME (default ~/.cache/autosplit), so
`autosplit run` with no arguments has real files to read and nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from autosplit.adapters.base import Adapter
from autosplit.data import write_synthetic_dataset

log = logging.getLogger(__name__)

BUILTIN_VERSION = "v1"


def autosplit_home() -> Path:
    return Path(os.environ.get("AUTOSPLIT_HOME", Path.home() / ".cache" / "autosplit"))


def _materialize(root: Path, marker: str, write: Callable[[Path], object]) -> Path:
    if (root / marker).is_file():
        return root
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    try:
        tmp.rename(root)
        log.info("wrote %s", root)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def builtin_model_root(adapter: Adapter) -> Path:
    """The built-in tiny pipeline folder of `adapter`'s family (diffusers layout)."""
    root = autosplit_home() / "builtin" / f"{adapter.name}-tiny-{BUILTIN_VERSION}"
    return _materialize(root, "model_index.json", lambda p: adapter.write_tiny(p, seed=0))


def builtin_dataset_root() -> Path:
    """The built-in synthetic image+caption dataset folder (PNG files + metadata.csv)."""
    root = autosplit_home() / "builtin" / f"synthetic-{BUILTIN_VERSION}"
    return _materialize(root, "metadata.csv", lambda p: write_synthetic_dataset(p, num_samples=16, seed=0))
