"""Docs stay true to the code: every config key is documented, the CLI's flags change only on
purpose, and the cache-format example runs against a real cache."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from autosplit.cli import build_parser, main
from autosplit.config import SEED_FLAGS, all_keys

DOCS = Path(__file__).resolve().parents[1] / "docs"

RUN_FLAGS = {
    "--config", "--set", "--use_gradient_checkpointing", "--no-split", "--full_finetune", "--resume",
    "--model_id_with_origin_paths", "--remove_prefix_in_ckpt", "--find_unused_parameters", "-h", "--help",
    *(f"--{flag}" for flag in SEED_FLAGS),
}


def test_every_config_key_is_documented():
    table = (DOCS / "config.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", table, flags=re.M))
    assert documented == set(all_keys())


def test_run_flags_are_frozen():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    flags = {s for action in run._actions for s in action.option_strings}
    assert flags == RUN_FLAGS


def test_cache_format_example_runs(tmp_path, tiny_model, tiny_dataset, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--max_steps", "1"]) == 0
    text = (DOCS / "cache-format.md").read_text()
    code = text.split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(code, scope)
    assert scope["latents"].shape[0] == 16
    assert scope["embeds"].shape == (scope["n"], 32)


def test_family_plans_in_the_docs_are_current(autosplit_home):
    import sys

    sys.path.insert(0, str(DOCS / "scripts"))
    from update_family_plans import BLOCK, table_for

    text = (DOCS / "families.md").read_text()
    made_with = re.search(r"`autosplit plan` \(torch (\d+\.\d+\.\d+)\)", text).group(1)
    if torch.__version__.split("+")[0] != made_with:  # FLOP formulas and decompositions move between releases
        pytest.skip(f"families.md was generated with torch {made_with}, this is {torch.__version__}")
    blocks = BLOCK.findall(text)
    assert len(blocks) == 7
    for _, flags, table, _ in blocks:
        assert table_for(flags) == table, f"autosplit plan{flags}: run docs/scripts/update_family_plans.py"


def test_profile_format_documents_every_field():
    import dataclasses

    from autosplit import profiler

    text = (DOCS / "profile-format.md").read_text()
    for cls in (profiler.Profile, profiler.UnitProfile, profiler.ValueProfile, profiler.ComponentProfile,
                profiler.StepProfile, profiler.FissionProfile):
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in text or f'"{field.name}"' in text, f"{cls.__name__}.{field.name}"
