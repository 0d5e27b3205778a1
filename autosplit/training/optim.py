"""Stage 2's optimizer, learning-rate schedule and gradient norm (docs/training.md).

The optimizers: torch's AdamW (the default, and what stage 2 ran before the choice existed),
bitsandbytes' 8-bit AdamW (CUDA only), transformers' Adafactor with a fixed rate (the settings
kohya-ss' and musubi-tuner's Adafactor recipes use, so `--learning_rate` and the schedule apply) and
Prodigy (prodigyopt, with diffusers' scripts' bias correction and safeguarded warm-up). The
schedules are diffusers' `get_scheduler`, over the run's optimizer steps, stepped once per
optimizer step (not through accelerate, which would step it once per process).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from autosplit.config import TrainConfig
from autosplit.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

#: schedules whose rate at a step does not depend on the run's length
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def check_optimizer_device(train: TrainConfig, device: torch.device) -> None:
    """Raise ConfigError when the optimizer cannot run on `device` (8-bit AdamW off CUDA): the
    config's check covers `--device cpu` and "auto" on a machine without a GPU; this one the device
    a launcher chose (`accelerate launch --cpu`)."""
    if train.optimizer == "adamw8bit" and device.type != "cuda":
        raise ConfigError(
            f"--optimizer adamw8bit: bitsandbytes' 8-bit AdamW runs on CUDA GPUs only and stage 2 runs on "
            f"{device}; use --optimizer adamw here (or --optimizer adafactor for less optimizer memory)"
        )


def make_optimizer(params: Sequence[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names over `params`, with the run's rate, betas, epsilon and
    weight decay (Adafactor: rate and weight decay; it keeps no first moment)."""
    lr, betas, eps, decay = (
        train.learning_rate,
        (train.adam_beta1, train.adam_beta2),
        train.adam_epsilon,
        train.adam_weight_decay,
    )
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=decay)
    if train.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=decay)
    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, weight_decay=decay, scale_parameter=False, relative_step=False, warmup_init=False
        )
    if train.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if lr < 0.1:
            log.warning(
                "--optimizer prodigy with --learning_rate %g: Prodigy estimates the step size itself and "
                "--learning_rate scales it; 1.0 is the usual value",
                lr,
            )
        return Prodigy(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=decay,
            decouple=True,
            use_bias_correction=True,
            safeguard_warmup=True,
        )
    raise ConfigError(f"--optimizer {train.optimizer!r} is unknown")  # the config validated it


class LrSchedule:
    """diffusers' schedule `name` over `num_training_steps` optimizer steps, whose state goes into
    checkpoints (`state_dict`) so a resumed run continues at the same rate."""

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, *, num_training_steps: int):
        from diffusers.optimization import get_scheduler

        self.name, self.num_training_steps, self.optimizer = train.lr_scheduler, num_training_steps, optimizer
        self.scheduler = get_scheduler(
            train.lr_scheduler,
            optimizer,
            num_warmup_steps=train.lr_warmup_steps,
            num_training_steps=max(num_training_steps, 1),
            num_cycles=train.lr_num_cycles,
            power=train.lr_power,
        )

    def step(self) -> None:
        self.scheduler.step()

    @property
    def lr(self) -> float:
        """The rate of the next optimizer step (of the first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_training_steps": self.num_training_steps, "state": self.scheduler.state_dict()}

    def load_state_dict(self, saved: dict[str, Any] | None, *, path: Any) -> None:
        """Continue from `saved` (None: a checkpoint from before schedules were saved, which only a
        constant rate can continue). Raises CheckpointError when the schedule depends on the run's
        length and this run's differs from the checkpoint's."""
        if saved is None:
            if self.name != "constant":
                raise CheckpointError(f"{path} holds no learning-rate schedule; resume with --lr_scheduler constant")
            return
        if self.name not in LENGTH_FREE_SCHEDULES and saved["num_training_steps"] != self.num_training_steps:
            raise CheckpointError(
                f"{path}: its --lr_scheduler {self.name} was planned over {saved['num_training_steps']} optimizer "
                f"steps, this run has {self.num_training_steps}; resume with the --max_steps and --num_epochs "
                f"it started with, or drop --resume"
            )
        self.scheduler.load_state_dict(saved["state"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the schedule's constructor had reset it to the rate of step 0


def grad_norm(params: Sequence[torch.nn.Parameter], *, scale: float = 1.0) -> float:
    """The total L2 norm of `params`' gradients, in float32, divided by `scale` (a loss scaler's
    factor); reads the gradients only."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).to(grads[0].device) for g in grads])
    return float(torch.linalg.vector_norm(norms)) / scale
