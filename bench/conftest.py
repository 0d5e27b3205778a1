"""Fixtures of the benchmark suites: one temporary AUTOSPLIT_HOME per session, so the built-in tiny
pipelines are written once from the real diffusers/transformers classes (seeded), offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"


@pytest.fixture(scope="session", autouse=True)
def autosplit_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("autosplit_home")
    os.environ["AUTOSPLIT_HOME"] = str(home)
    return home
