"""The pipelines and modes the VRAM gate covers, shared by bench/test_vram_gate.py and
bench/update_budgets.py (which writes profiles/ from one measurement)."""

from __future__ import annotations

#: (pipeline, profile mode of `measure_pipeline`, budget entry's mode); Wan is left out: fake tracing
#: cannot follow its data-dependent ops (the planner falls back to its declarations)
CASES = [(p, m) for m in ("fake", "real") for p in ("qwen_image", "flux", "sd", "sdxl")]


def entry_key(pipeline: str, profile_mode: str) -> str:
    from autosplit.gate import budget_key

    return budget_key(pipeline, "tiny", "fake" if profile_mode == "fake" else "cpu")
