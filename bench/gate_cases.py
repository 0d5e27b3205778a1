"""The pipelines and modes the VRAM gate covers, shared by bench/test_vram_gate.py and
bench/update_budgets.py (which writes profiles/ from one measurement)."""

from __future__ import annotations

#: (pipeline, profile mode of `measure_pipeline`, budget entry's mode)
#: the budgets are of the built-in tiny pipelines on the CPU in float32, on any machine
GATE_SETS = ("model.device=cpu", "model.dtype=float32")
CASES = [(p, m) for m in ("fake", "real") for p in ("qwen_image", "flux", "sd", "sdxl", "wan")]


def entry_key(pipeline: str, profile_mode: str) -> str:
    from autosplit.gate import budget_key

    return budget_key(pipeline, "tiny", "fake" if profile_mode == "fake" else "cpu")
