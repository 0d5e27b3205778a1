"""The pipelines and modes the VRAM gate covers, shared by bench/test_vram_gate.py and
bench/update_budgets.py (which writes profiles/ from one measurement)."""

from __future__ import annotations

#: (pipeline, profile mode of `measure_pipeline`, budget entry's mode)
#: the budgets are of the built-in tiny pipelines on the CPU in float32, on any machine
GATE_SETS = ("model.device=cpu", "model.dtype=float32")
CASES = [(p, m) for m in ("fake", "real") for p in ("qwen_image", "flux", "sd", "sdxl", "wan")]


def entry_key(pipeline: str, profile_mode: str) -> str:
    from autosplit.planning.budget import budget_key

    return budget_key(pipeline, "tiny", "fake" if profile_mode == "fake" else "cpu")


#: a swapped plan of the tiny pipelines with repeated-block lists: one of their two blocks in host
#: memory (entries `<pipeline>-tiny-<mode>-swap1` of profiles/budgets-swap.json, written with `autosplit bench`,
#: docs/benchmarks.md)
SWAP_SETS = ("train.blocks_to_swap=1", "train.gradient_checkpointing=true")
SWAP_CASES = [(p, m) for m in ("fake", "real") for p in ("qwen_image", "wan")]


def swap_entry_key(pipeline: str, profile_mode: str) -> str:
    return entry_key(pipeline, profile_mode) + "-swap1"
