"""Stage-2 checkpoints: `OUTPUT/checkpoints/step-N/`, safetensors and JSON only (never pickle).

A checkpoint holds what a resumed run needs to continue the exact sequence of an uninterrupted
one: the trainable weights (`weights.safetensors`), the optimizer's tensors
(`optimizer.safetensors`), its hyper-parameters and the learning-rate schedule's state
(`optimizer.json`), the RNG states (`rng.safetensors`), and
`state.json` (optimizer steps, micro-steps, loader state, the loss log so far, and the settings
that must not change across a resume; the number of processes may, see `loader.remaining_batches`).
Per-step noise and timesteps are a pure function of (seed, micro-step, rank), so the micro-step count
is most of the RNG state. A checkpoint is written to
`step-N.partial/` and renamed into place, so a kill never leaves a half-written one that looks
complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from autosplit.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class TrainState:
    """Counters and logs of a stage-2 run at an optimizer-step boundary."""

    step: int
    micro_step: int
    epoch: int
    loader: dict[str, int]
    log: list[dict[str, Any]]
    settings: dict[str, Any]


def checkpoint_root(output: Path) -> Path:
    return Path(output) / CHECKPOINT_DIR


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint under `output/checkpoints`, or None."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()
    ]
    return max(found)[1] if found else None


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{i}"] = s
    return states


def save_checkpoint(
    output: Path, *, model: torch.nn.Module, optimizer: Any, state: TrainState, keep: int, lr_schedule: Any = None
) -> Path:
    """Write `output/checkpoints/step-<state.step>/` atomically; keep the newest `keep` checkpoints.
    `lr_schedule` (with `state_dict()`, JSON data) is saved beside the optimizer's hyper-parameters."""
    root = checkpoint_root(output)
    final = root / f"step-{state.step}"
    tmp = root / f"step-{state.step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable(model), tmp / "weights.safetensors")
    tensors, meta = _optimizer_tensors(optimizer)
    if lr_schedule is not None:
        meta["lr_scheduler"] = lr_schedule.state_dict()
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file(_rng_tensors(), tmp / "rng.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / "state.json").write_text(json.dumps(asdict(state)))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: Path, *, model: torch.nn.Module, optimizer: Any, settings: dict[str, Any], lr_schedule: Any = None
) -> TrainState:
    """Restore weights, optimizer, learning-rate schedule (`lr_schedule.load_state_dict(saved or
    None, path=path)`) and RNG from `path`; return its TrainState.

    Raises CheckpointError if the checkpoint was made with other settings or other weights.
    """
    state = TrainState(**json.loads((path / "state.json").read_text()))
    saved = {k: v for k, v in state.settings.items() if k != "world_size"}  # older checkpoints pinned it
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        raise CheckpointError(
            f"{path} was saved with other settings (changed: {', '.join(changed)}); "
            f"resume with the same settings or drop --resume and use a new --output_path"
        )
    _load_weights(path / "weights.safetensors", model)
    tensors = load_file(path / "optimizer.safetensors")
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_state(tensors, meta))
    if lr_schedule is not None:
        lr_schedule.load_state_dict(meta.get("lr_scheduler"), path=path)
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return state


def _load_weights(file: Path, model: torch.nn.Module) -> None:
    saved = load_file(file)
    params = dict(model.named_parameters())
    mine = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != mine:
        diff = sorted(set(saved) ^ mine)[:3]
        raise CheckpointError(
            f"{file} holds other trainable weights than this run (e.g. {diff}); resume with the "
            f"same --lora_* settings or drop --resume"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
