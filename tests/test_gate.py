"""The memory regression gate: it passes on the committed budgets, fails when a budget is lowered
below the measurement, when FLOPs change or when the cut moves, and `autosplit bench` says so in
its exit code. (The full gate over every built-in pipeline is bench/test_vram_gate.py.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from autosplit.cli import main
from autosplit.planning.budget import check_budget, load_budgets, make_budget, write_budget
from autosplit.planning.profile import Profile
from autosplit.workflow.measure import measure_pipeline

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
BUDGETS = PROFILES / "budgets.json"
KEY = "flux-tiny-fake"


@pytest.fixture(scope="module")
def measured(autosplit_home):
    return measure_pipeline("flux", profile="fake", sets=("model.device=cpu", "model.dtype=float32"))


@pytest.fixture()
def budget():
    return copy.deepcopy(load_budgets(BUDGETS)["budgets"][KEY])


def test_gate_passes_on_the_committed_budget(measured, budget):
    profile, plan, inputs = measured
    assert check_budget(profile, plan, budget, inputs=inputs) == []


def test_committed_budgets_match_the_committed_profiles(autosplit_home):
    from autosplit.config import load_config
    from autosplit.workflow.session import open_session

    budgets = load_budgets(BUDGETS)
    assert budgets["tolerance"] == {"memory": 0.02, "flops": 0.0}
    assert len(budgets["budgets"]) == 10  # qwen_image, flux, sd, sdxl, wan x fake, cpu
    for key, entry in budgets["budgets"].items():
        profile = Profile.from_dict(json.loads((PROFILES / f"{key}.json").read_text()))
        session = open_session(load_config(toml_path=None, sets=[], flags={"pipeline": entry["pipeline"]}))
        assert make_budget(profile, session.plan(profile), inputs=entry["inputs"]) == entry, key


@pytest.mark.parametrize(
    "path",
    [
        ("stage2_peak_bytes",),
        ("unsplit_peak_bytes",),
        ("grad_step", "peak_bytes"),
        ("units", "encode_prompt", "peak_bytes"),
    ],
)
def test_gate_fails_when_a_budget_is_lowered_below_the_measurement(measured, budget, path):
    profile, plan, _ = measured
    *parents, last = path
    holder = budget
    for key in parents:
        holder = holder[key]
    holder[last] = int(holder[last] / 1.03)  # 3% below: beyond the 2% tolerance
    problems = check_budget(profile, plan, budget)
    assert len(problems) == 1
    assert problems[0].startswith(".".join(path[1:] if path[0] == "units" else path) + ":")
    assert "exceeds the budget" in problems[0]


def test_peaks_within_tolerance_or_below_budget_pass(measured, budget):
    profile, plan, _ = measured
    budget["stage2_peak_bytes"] = int(budget["stage2_peak_bytes"] / 1.015)  # measurement 1.5% above budget
    budget["unsplit_peak_bytes"] *= 2  # far below budget
    assert check_budget(profile, plan, budget) == []
    assert check_budget(profile, plan, budget, tolerance={"memory": 0.01}) != []


@pytest.mark.parametrize("delta", [1, -1])
def test_gate_fails_when_flops_change_either_way(measured, budget, delta):
    profile, plan, _ = measured
    budget["units"]["denoise"]["flops"] += delta
    budget["grad_step"]["flops"] += delta
    problems = check_budget(profile, plan, budget)
    assert [p.split(":")[0] for p in problems] == ["grad_step.flops", "denoise.flops"]
    assert all("FLOPs changed" in p for p in problems)


def test_gate_fails_when_the_cut_moves_or_a_unit_appears(measured, budget):
    profile, plan, _ = measured
    budget["units"]["encode_image"]["stage"] = 2
    del budget["units"]["add_noise"]
    problems = check_budget(profile, plan, budget)
    assert any(p.startswith("units ['add_noise'] have no budget") for p in problems)
    assert any(p.startswith("encode_image.stage: the planner moved it to stage 1") for p in problems)


def test_gate_fails_on_other_inputs(measured, budget):
    profile, plan, inputs = measured
    assert check_budget(profile, plan, budget, inputs={**inputs, "dtype": "bfloat16"})[0].startswith("inputs:")


def test_cli_bench_exit_codes(tmp_path, measured, capsys):
    cpu = ["--device", "cpu", "--dtype", "float32"]  # the budgets' machine and dtype, on a GPU host too
    assert main(["bench", "--pipeline", "flux", "--baseline", str(BUDGETS), *cpu]) == 0
    out = capsys.readouterr().out
    assert "stage2_peak_bytes" in out and "no regression" in out

    data = load_budgets(BUDGETS)
    data["budgets"][KEY]["stage2_peak_bytes"] //= 2
    lowered = tmp_path / "lowered.json"
    lowered.write_text(json.dumps(data))
    assert main(["bench", "--pipeline", "flux", "--baseline", str(lowered), *cpu]) == 1
    captured = capsys.readouterr()
    assert "OVER" in captured.out
    assert "autosplit: regression: stage2_peak_bytes:" in captured.err


def test_cli_bench_writes_a_baseline_that_then_passes(tmp_path, measured, capsys):
    path = tmp_path / "mine.json"
    cpu = ["--device", "cpu", "--dtype", "float32"]  # as `measured`, on a GPU host too
    assert main(["bench", "--pipeline", "flux", "--write-baseline", str(path), *cpu]) == 0
    profile, plan, inputs = measured
    assert load_budgets(path)["budgets"] == {KEY: make_budget(profile, plan, inputs=inputs)}
    assert main(["bench", "--pipeline", "flux", "--baseline", str(path), *cpu]) == 0
    write_budget(path, "other", {"pipeline": "sd"})  # other entries are kept
    assert set(load_budgets(path)["budgets"]) == {KEY, "other"}


def test_cli_bench_user_errors_exit_2(tmp_path, capsys):
    assert main(["bench", "--pipeline", "flux"]) == 2
    assert "--baseline FILE" in capsys.readouterr().err
    assert main(["bench", "--pipeline", "sd", "--baseline", str(tmp_path / "missing.json")]) == 2
    assert "not a readable budget file" in capsys.readouterr().err
    path = tmp_path / "flux-only.json"
    write_budget(path, KEY, {"pipeline": "flux"})
    assert main(["bench", "--pipeline", "sd", "--baseline", str(path)]) == 2
    assert "has no budget 'sd-tiny-fake'" in capsys.readouterr().err
