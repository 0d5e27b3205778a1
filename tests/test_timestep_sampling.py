"""Timestep sampling and loss weighting of the shared sft units (autosplit/tasks.py): the default is
today's draw, bit for bit; each option's distribution has the moments it should and draws what
diffusers' (or musubi-tuner's, or DiffSynth-Studio's) formula draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autosplit.config import TrainConfig
from autosplit.errors import ConfigError
from autosplit.graph import UnitContext
from autosplit.tasks import (
    _set_sigmas,
    check_step_settings,
    denoise_loss,
    density_draw,
    loss_weights,
    sample_timestep,
    step_settings,
)

N = 200_000  # draws for the moments


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from autosplit.adapters.qwen_image import FULL_SIZE_SCHEDULER

    return FlowMatchEulerDiscreteScheduler(**FULL_SIZE_SCHEDULER)


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def context(scheduler, seed: int = 0, **settings) -> UnitContext:
    return UnitContext(
        {"scheduler": scheduler},
        torch.device("cpu"),
        torch.float32,
        generator=torch.Generator().manual_seed(seed),
        settings={"patch_size": 2, **settings},
    )


def latents(b: int, channels: int = 16, side: int = 32) -> torch.Tensor:
    """B latents of 256 tokens (2x2 patches of 32x32), as a view: the units read only the shape."""
    return torch.zeros(1, channels, side, side).expand(b, -1, -1, -1)


def test_default_is_todays_uniform_index_into_the_shifted_sigmas_bit_for_bit():
    scheduler = flow_scheduler()
    got = sample_timestep({"image_latents": latents(64)}, context(scheduler, seed=5))
    sigmas = _set_sigmas(scheduler, 1000, 256)[:-1]
    expected = sigmas[torch.randint(0, sigmas.numel(), (64,), generator=torch.Generator().manual_seed(5))]
    assert torch.equal(got["sigma"], expected) and torch.equal(got["timestep"], expected * 1000)
    # DDPM: a uniform integer timestep, as before
    got = sample_timestep({"image_latents": latents(64, 4, 8)}, context(ddpm_scheduler(), seed=5))
    assert torch.equal(got["timestep"], torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("kind, settings", [("logit_normal", dict(logit_mean=0.4, logit_std=0.7)), ("mode", {})])
def test_densities_draw_what_diffusers_draws(kind, settings):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    mine = density_draw(kind, 1000, context(None, seed=3, mode_scale=1.29, **settings))
    theirs = compute_density_for_timestep_sampling(
        kind,
        1000,
        logit_mean=settings.get("logit_mean"),
        logit_std=settings.get("logit_std"),
        mode_scale=1.29,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(mine, theirs)


def test_logit_normal_has_the_normals_moments_in_logit_space():
    u = density_draw("logit_normal", N, context(None, logit_mean=0.5, logit_std=0.8))
    logits = torch.logit(u.double())
    assert logits.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logits.std().item() == pytest.approx(0.8, abs=0.01)


def test_sigmoid_has_the_scaled_normals_moments_in_logit_space():
    u = density_draw("sigmoid", N, context(None, sigmoid_scale=1.5))
    logits = torch.logit(u.double())
    assert logits.mean().item() == pytest.approx(0.0, abs=0.01)
    assert logits.std().item() == pytest.approx(1.5, abs=0.01)


@pytest.mark.parametrize("scale", [-0.5, 0.0, 1.29])
def test_mode_has_the_moments_of_its_map(scale):
    u = density_draw("mode", N, context(None, mode_scale=scale)).double()
    grid = np.linspace(0, 1, 2_000_001)
    mapped = 1 - grid - scale * (np.cos(np.pi * grid / 2) ** 2 - 1 + grid)
    assert u.min() >= 0 and u.max() <= 1
    assert u.mean().item() == pytest.approx(mapped.mean(), abs=0.003)  # 1/2: the map is symmetric
    assert u.var().item() == pytest.approx(mapped.var(), abs=0.003)
    assert mapped.var() != pytest.approx(1 / 12, abs=0.003) or scale == 0.0  # the scale moves mass


def test_flow_densities_index_the_shifted_schedule_from_the_noisiest_end():
    scheduler = flow_scheduler()
    sigmas = _set_sigmas(scheduler, 1000, 256)[:-1]
    batch = {"image_latents": latents(4096)}
    got = sample_timestep(batch, context(scheduler, seed=2, timestep_sampling="logit_normal"))
    u = density_draw("logit_normal", 4096, context(None, seed=2))
    assert torch.equal(got["sigma"], sigmas[(u * 1000).long().clamp(max=999)])
    high = sample_timestep(batch, context(scheduler, timestep_sampling="logit_normal", logit_mean=3))
    assert high["sigma"].mean() < 0.2  # as in diffusers: a positive mean favours less noise


def test_sigmoid_draws_sigma_directly_unshifted():
    got = sample_timestep({"image_latents": latents(8)}, context(flow_scheduler(), seed=4, timestep_sampling="sigmoid"))
    expected = torch.sigmoid(torch.randn((8,), generator=torch.Generator().manual_seed(4)))
    assert torch.equal(got["sigma"], expected) and torch.equal(got["timestep"], expected * 1000)


def test_ddpm_maps_the_draws_to_integer_timesteps_noisiest_first():
    batch = {"image_latents": latents(4096, 4, 8)}
    low_noise = sample_timestep(batch, context(ddpm_scheduler(), timestep_sampling="logit_normal", logit_mean=3))
    assert low_noise["timestep"].dtype == torch.int64 and low_noise["timestep"].float().mean() < 200
    noisy = sample_timestep(batch, context(ddpm_scheduler(), timestep_sampling="sigmoid"))
    assert 0 <= noisy["timestep"].min() and noisy["timestep"].max() <= 999
    assert noisy["timestep"].float().mean().item() == pytest.approx(499.5, abs=15)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "none"])
def test_sd3_weights_are_diffusers(scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigma = torch.linspace(0.01, 1.0, 500)
    assert torch.allclose(loss_weights(scheme, sigma), compute_loss_weighting_for_sd3(scheme, sigma).float())


def diffsynth_reference(table: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """DiffSynth-Studio's FlowMatchScheduler.set_training_weight / training_weight, as its source
    computes them (1000 training timesteps): a weight per schedule entry, looked up by the nearest
    timestep."""
    x = table * 1000
    y = torch.exp(-2 * ((x - 500) / 1000) ** 2)
    shifted = y - y.min()
    weights = shifted * (1000 / shifted.sum())
    ids = torch.argmin((x[None, :] - sigma[:, None] * 1000).abs(), dim=1)
    return weights[ids]


def test_diffsynth_weights_are_diffsynths_on_its_schedule():
    table = _set_sigmas(flow_scheduler(), 1000, 4096)[:-1]
    picks = table[torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(0))]
    mine = loss_weights("diffsynth", picks, table)
    assert torch.allclose(mine, diffsynth_reference(table, picks), rtol=1e-4, atol=1e-6)
    everywhere = loss_weights("diffsynth", table, table)
    assert everywhere.mean().item() == pytest.approx(1.0, abs=1e-5)  # mean 1 under today's uniform index
    assert everywhere.argmax() == torch.argmin((table - 0.5).abs())  # heaviest at sigma 1/2
    assert everywhere[0] == everywhere.min() == 0  # sigma 1, the extreme farthest from 1/2, weighs nothing


def test_weighted_loss_is_the_batch_mean_of_weighted_per_sample_mse():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    values = {"model_pred": pred, "target": target, "sigma": sigma}
    plain = denoise_loss(values, context(None))["loss"]
    assert torch.equal(plain, torch.nn.functional.mse_loss(pred, target))  # "none": today's loss, bit for bit
    weighted = denoise_loss(values, context(None, weighting_scheme="cosmap"))["loss"]
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    cosmap = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    assert torch.allclose(weighted, (cosmap * per_sample).mean())


def test_settings_a_graph_cannot_use_are_refused_before_the_first_step():
    from autosplit.adapters.qwen_image import QwenImageAdapter
    from autosplit.tasks import build_graph

    distill = build_graph(QwenImageAdapter(), "direct_distill")
    settings = step_settings(TrainConfig(timestep_sampling="logit_normal"))
    with pytest.raises(ConfigError, match=r"--timestep_sampling logit_normal .*\(direct_distill .*drop them"):
        check_step_settings(distill, flow_scheduler(), settings)
    sft = build_graph(QwenImageAdapter(), "sft")
    check_step_settings(sft, flow_scheduler(), step_settings(TrainConfig(weighting_scheme="cosmap")))
    with pytest.raises(ConfigError, match=r"--weighting_scheme cosmap weights flow-matching sigmas.*epsilon"):
        check_step_settings(sft, ddpm_scheduler(), step_settings(TrainConfig(weighting_scheme="cosmap")))
