"""User-facing errors. Each message says what is wrong, the value seen and the fix.

The CLI prints them as one line on stderr and exits 2; any other exception keeps its traceback.
"""

from __future__ import annotations


class AutosplitError(Exception):
    """Base class for errors caused by user input (config, data, models, caches)."""


class ConfigError(AutosplitError):
    """A flag, config key or value is invalid."""


class DatasetError(AutosplitError):
    """The dataset folder or its metadata is missing or malformed."""


class ModelError(AutosplitError):
    """A model folder is missing, not a diffusers layout, or does not fit the request."""


class GraphError(AutosplitError):
    """A unit graph is inconsistent (unknown input, duplicate producer, cycle)."""


class PlanError(AutosplitError):
    """A plan cannot be made or does not fit the graph it is used with."""


class CacheError(AutosplitError):
    """A cache is missing, incomplete, corrupt or stale."""


class CheckpointError(AutosplitError):
    """A stage-2 checkpoint cannot be resumed (other settings, other weights)."""


class TrainingError(AutosplitError):
    """Training cannot go on (the loss is no longer a number)."""
