"""The random numbers of a training step: one generator per micro-step and rank."""

from __future__ import annotations

import numpy as np
import torch


def step_generator(seed: int, micro_step: int, rank: int = 0) -> torch.Generator:
    """The RNG of one micro-step on one rank: a pure function of (seed, step, rank), so resumes and
    split/unsplit runs draw the same noise and timesteps, and ranks draw different ones."""
    entropy = [seed, micro_step] if rank == 0 else [seed, micro_step, rank]  # rank 0: as one-process runs
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
