"""Docs stay true to the code: every config key is documented, the CLI's flags change only on
purpose, and the cache-format example runs against a real cache."""

from __future__ import annotations

import re
from pathlib import Path

from autosplit.cli import build_parser, main
from autosplit.config import SEED_FLAGS, all_keys

DOCS = Path(__file__).resolve().parents[1] / "docs"

RUN_FLAGS = {
    "--config",
    "--set",
    "--use_gradient_checkpointing",
    "--no-split",
    "--full_finetune",
    "--resume",
    "--model_id_with_origin_paths",
    "--remove_prefix_in_ckpt",
    "--find_unused_parameters",
    "-h",
    "--help",
    "--blocks_to_swap",
    "--base_precision",
    "--lora_format",
    "--lora_checkpoint",
    *(f"--{flag}" for flag in SEED_FLAGS),
    # diffusers' training-script spellings (docs/training.md)
    "--optimizer",
    "--adam_beta1",
    "--adam_beta2",
    "--adam_weight_decay",
    "--adam_epsilon",
    "--lr_scheduler",
    "--lr_warmup_steps",
    "--lr_num_cycles",
    "--lr_power",
    "--max_grad_norm",
    "--timestep_sampling",
    "--logit_mean",
    "--logit_std",
    "--mode_scale",
    "--sigmoid_scale",
    "--weighting_scheme",
    "--guidance_scale",
    "--report_to",
    "--validation_prompt",
    "--validation_prompts_file",
    "--validation_steps",
    "--num_validation_images",
}


def test_every_config_key_is_documented():
    table = (DOCS / "config.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_.0-9]+)` \|", table, flags=re.M))
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
    blocks = BLOCK.findall(text)
    assert len(blocks) == 7
    for _, flags, table, _ in blocks:
        assert same_table(table_for(flags), table), f"autosplit plan{flags}: run docs/scripts/update_family_plans.py"


def same_table(made: str, documented: str) -> bool:
    """Equal tables, except that a printed number may differ by one in its last digit: torch
    releases move a decomposition's FLOP count or a workspace by a few units (the docs say which
    torch made them), and no such change moves a cut, a reason or a cached value."""
    made_lines, doc_lines = made.splitlines(), documented.splitlines()
    if len(made_lines) != len(doc_lines):
        return False
    for a, b in zip(made_lines, doc_lines, strict=True):
        a_cells, b_cells = a.split(), b.split()
        if len(a_cells) != len(b_cells):
            return False
        for i, (x, y) in enumerate(zip(a_cells, b_cells, strict=True)):
            unit = a_cells[i + 1] if i + 1 < len(a_cells) else ""
            measured = bool(re.match(r"^[KMGTP]?(i?B|FLOP)$", unit)) and unit == b_cells[i + 1]
            if x != y and not (measured and _last_digit_apart(x, y)):
                return False
    return True


def _last_digit_apart(x: str, y: str) -> bool:
    number = re.compile(r"^(\d+)(?:\.(\d+))?$")
    mx, my = number.match(x), number.match(y)
    if not (mx and my) or len(mx.group(2) or "") != len(my.group(2) or ""):
        return False
    decimals = len(mx.group(2) or "")
    return abs(float(x) - float(y)) <= 1.01 * 10**-decimals


def test_same_table_allows_only_a_last_digit():
    assert same_table("encode  1  11.86 MFLOP  yes", "encode  1  11.87 MFLOP  yes")
    assert not same_table("encode  1  11.86 MFLOP  yes", "encode  1  11.88 MFLOP  yes")
    assert not same_table("encode  1  11.86 MFLOP  yes", "encode  2  11.86 MFLOP  yes")
    assert not same_table("encode  1  11.86 MFLOP  yes", "encode  1  11.86 GFLOP  yes")
    assert not same_table("a\nb", "a")


def test_profile_format_documents_every_field():
    import dataclasses

    from autosplit.planning import profile as profiler

    text = (DOCS / "profile-format.md").read_text()
    for cls in (
        profiler.Profile,
        profiler.UnitProfile,
        profiler.ValueProfile,
        profiler.ComponentProfile,
        profiler.StepProfile,
        profiler.FissionProfile,
    ):
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in text or f'"{field.name}"' in text, f"{cls.__name__}.{field.name}"


def test_readme_python_example_runs(tmp_path, tiny_model, tiny_dataset, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (DOCS.parent / "README.md").read_text()
    code = next(block.split("```")[0] for block in text.split("```python\n")[1:] if "from autosplit import" in block)
    scope: dict = {}
    exec(code, scope)
    result = scope["result"]
    assert result.training.steps == 4 and len(result.training.losses) == 4
    assert (tmp_path / "out/py/lora.safetensors").is_file()
    assert result.cache == "out/py/cache" and result.num_cached == 16 and not result.stage1_skipped
