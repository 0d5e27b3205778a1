"""autosplit: split diffusion fine-tuning into a cached preprocessing stage and a training stage.

From Python::

    from autosplit import load_config, run

    result = run(load_config(toml_path=None, sets=["train.num_epochs=2"], flags={"pipeline": "flux"}))
    print(result.training.losses[-1], result.training.output)

`run` and `Pipeline` (a pipeline written in code, docs/units.md) are imported on first use, so
`import autosplit` (and `autosplit --help`) import no torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Pipeline", "__version__", "load_config", "run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from autosplit.workflow.run import run

        return run
    if name == "Pipeline":
        from autosplit.workflow.pipeline import Pipeline

        return Pipeline
    if name == "load_config":
        from autosplit.config import load_config

        return load_config
    raise AttributeError(f"module 'autosplit' has no attribute {name!r}")
