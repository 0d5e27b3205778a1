"""Shared fixtures: one AUTOSPLIT_HOME per test session, so the built-in tiny pipeline and
synthetic dataset are written once (from the real diffusers/transformers classes, seeded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def autosplit_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("autosplit_home")
    os.environ["AUTOSPLIT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_model(autosplit_home) -> Path:
    from autosplit.adapters.builtin import builtin_model_root
    from autosplit.adapters.qwen_image import QwenImageAdapter

    return builtin_model_root(QwenImageAdapter())


@pytest.fixture(scope="session")
def tiny_dataset(autosplit_home) -> Path:
    from autosplit.adapters.builtin import builtin_dataset_root

    return builtin_dataset_root()


@pytest.fixture(scope="module")
def on_the_cpu():
    """For modules that compare caches and weights bit for bit across processes: device "auto"
    resolves to the CPU (ACCELERATE_USE_CPU, as under `accelerate launch --cpu`), also on a GPU
    host. Module scope, so the module's shared caches are made on the CPU too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")
        yield
