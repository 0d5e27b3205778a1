"""What stage 2 records: `OUTPUT/train_log.jsonl` always, and through accelerate's trackers
(`--report_to tensorboard|wandb|all`) the same numbers as scalars under `OUTPUT/logs/`, plus
images (`RunLog.log_images`, the entry point validation images are logged through).

Only the main process writes. W&B runs offline unless the environment's WANDB_MODE says
otherwise, so nothing leaves the machine by default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: accelerate's tracker names of each --report_to value
TRACKERS = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}
#: the project (TensorBoard: the folder under OUTPUT/logs) every tracker logs to
PROJECT = "autosplit"


def logging_dir(output: Path) -> Path:
    return Path(output) / "logs"


def tracker_kwargs(report_to: str, output: Path) -> dict[str, Any]:
    """The Accelerator arguments of `report_to`: its trackers and where they write."""
    names = TRACKERS[report_to]
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    config = ProjectConfiguration(project_dir=str(output), logging_dir=str(logging_dir(output)))
    return {"log_with": names, "project_config": config}


class RunLog:
    """The run's records. `entries` are the log lines of the steps already done (a resumed run's,
    from its checkpoint): train_log.jsonl is rewritten to hold exactly those, then grows a line per
    optimizer step."""

    def __init__(
        self,
        accelerator: Any,
        output: Path,
        entries: list[dict[str, Any]],
        *,
        report_to: str,
        hparams: dict[str, Any],
    ):
        self.accelerator, self.write = accelerator, accelerator.is_main_process
        self.trackers = TRACKERS[report_to] if self.write else []
        self.file = (Path(output) / "train_log.jsonl").open("w") if self.write else open(os.devnull, "w")
        for entry in entries:
            self.file.write(json.dumps(entry) + "\n")
        if self.trackers:
            wandb_dir = Path(output) / "logs"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            init = {"wandb": {"mode": os.environ.get("WANDB_MODE", "offline"), "dir": str(wandb_dir)}}
            accelerator.init_trackers(PROJECT, config=_flat_scalars(hparams), init_kwargs=init)

    def log_step(self, entry: dict[str, Any], scalars: dict[str, float]) -> None:
        """One optimizer step: `entry` goes to train_log.jsonl, `scalars` (name -> number) to the
        trackers at step `entry["step"]`."""
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.trackers:
            self.accelerator.log(scalars, step=entry["step"])

    def log_images(self, tag: str, images: Sequence[Any], *, step: int, captions: Sequence[str] = ()) -> None:
        """Images (PIL images, or H x W x C arrays or tensors: uint8, or floats in [0, 1])
        to every tracker at `step`, under `tag`: TensorBoard as one batch, W&B as captioned images."""
        arrays = [_to_uint8_hwc(image) for image in images]
        for name in self.trackers:
            tracker = self.accelerator.get_tracker(name, unwrap=False)
            if name == "tensorboard":
                tracker.log_images({tag: np.stack(arrays)}, step=step, dataformats="NHWC")
            else:
                import wandb

                captioned = [wandb.Image(a, caption=c) for a, c in zip(arrays, [*captions, *[""] * len(arrays)])]
                tracker.log({tag: captioned}, step=step)

    def close(self) -> None:
        self.file.close()
        for name in self.trackers:
            self.accelerator.get_tracker(name, unwrap=False).finish()
        self.trackers = []


def _to_uint8_hwc(image: Any) -> np.ndarray:
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return array if array.ndim == 3 else array[..., None]


def _flat_scalars(values: dict[str, Any]) -> dict[str, Any]:
    """Settings as trackers store hyper-parameters: numbers, strings and booleans only."""
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}
