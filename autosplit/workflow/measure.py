"""Measure a configured pipeline for the VRAM regression gate: profile and plan it as
`autosplit bench` does (autosplit.planning.budget compares the result with a budget file)."""

from __future__ import annotations

from typing import Any

from autosplit.config import load_config
from autosplit.errors import ConfigError
from autosplit.plan import Plan
from autosplit.planning.budget import profile_inputs
from autosplit.planning.profile import Profile
from autosplit.workflow.profiling import profile_fake, profile_real
from autosplit.workflow.session import open_session


def measure_pipeline(
    pipeline: str = "qwen_image", *, profile: str = "fake", task: str = "sft", sets: tuple[str, ...] = ()
) -> tuple[Profile, Plan, dict[str, Any]]:
    """Profile and plan a pipeline as `autosplit bench --pipeline PIPELINE --profile PROFILE` does
    (the built-in tiny pipeline unless `sets` names a model folder): the profile, plan and
    inputs that `check_budget` and `make_budget` take.

    `profile` is "fake" (configs only) or "real" (weights, on `model.device`). For a pytest gate
    of your own pipeline: `profile, plan, inputs = measure_pipeline(...)`, then
    `assert check_budget(profile, plan, entry, inputs=inputs) == []`.
    """
    if profile not in ("fake", "real"):
        raise ConfigError(f"profile {profile!r}: the gate measures with 'fake' or 'real'")
    config = load_config(
        toml_path=None, sets=list(sets), flags={"pipeline": pipeline, "task": task, "profile": profile}
    )
    session = open_session(config)
    measured = profile_fake(session, full_size=False) if profile == "fake" else profile_real(session)
    return measured, session.plan(measured), profile_inputs(session.dtype)
