"""Training tasks: the units shared by every family, and the graph of a family + task.

`sft` is flow-matching supervised fine-tuning as Qwen-Image (and FLUX) train: a timestep is drawn
from the scheduler's shifted sigma schedule, noise from a standard normal, the model predicts the
velocity `noise - latents` of `noisy = (1 - sigma) * latents + sigma * noise`, loss is the MSE.
Noise and timestep are drawn from the per-step generator every step, never cached.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from autosplit.adapters.base import Adapter
from autosplit.data import load_image
from autosplit.errors import ConfigError
from autosplit.graph import Unit, UnitContext, UnitGraph

TASKS = ("sft",)
SOURCES = ("image_path", "image_size", "prompt", "sample_id")
#: how image latents come from the VAE posterior: its mode (deterministic, as DiffSynth-Studio
#: trains), a fresh sample every step (the distribution is cached, sampling runs in stage 2), or
#: one frozen sample per image (seeded by the sample, so it is cached)
VAE_LATENTS = ("mode", "sample", "frozen_sample")


def load_images(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    images = [load_image(p, s) for p, s in zip(values["image_path"], values["image_size"])]
    return {"image": torch.stack(images)}


def _shift_mu(scheduler: Any, image_seq_len: int) -> float:
    cfg = scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def sample_timestep(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    scheduler = ctx.components["scheduler"]
    latents = values["image_latents"]
    b, _, h, w = latents.shape
    patch = ctx.settings.get("patch_size", 2)
    steps = scheduler.config.num_train_timesteps
    if scheduler.config.get("use_dynamic_shifting", False):
        scheduler.set_timesteps(steps, device="cpu", mu=_shift_mu(scheduler, (h // patch) * (w // patch)))
    else:
        scheduler.set_timesteps(steps, device="cpu")
    sigmas = scheduler.sigmas[:-1].float()  # the last entry is the terminal sigma 0
    index = torch.randint(0, sigmas.numel(), (b,), generator=ctx.generator)
    sigma = sigmas[index]
    return {"sigma": sigma.to(ctx.device), "timestep": (sigma * 1000).to(ctx.device)}


def sample_noise(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    latents = values["image_latents"]
    noise = torch.randn(latents.shape, generator=ctx.generator, dtype=torch.float32)
    return {"noise": noise.to(ctx.device, latents.dtype)}


def add_noise(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    latents, noise = values["image_latents"], values["noise"]
    sigma = values["sigma"].view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return {"noisy_latents": (1 - sigma) * latents + sigma * noise, "target": noise - latents}


def sample_latents(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    mean, std = values["latent_mean"], values["latent_std"]
    noise = torch.randn(mean.shape, generator=ctx.generator, dtype=torch.float32).to(mean.device, mean.dtype)
    return {"image_latents": mean + std * noise}


def sample_latents_frozen(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """One posterior sample per image, from a generator seeded by (seed, sample id): the same
    draw every epoch, so it may be cached."""
    mean, std = values["latent_mean"], values["latent_std"]
    draws = []
    for i, sample_id in enumerate(values["sample_id"]):
        generator = torch.Generator().manual_seed(ctx.settings.get("seed", 0) * 1_000_003 + int(sample_id))
        draws.append(torch.randn(mean.shape[1:], generator=generator, dtype=torch.float32))
    noise = torch.stack(draws).to(mean.device, mean.dtype)
    return {"image_latents": mean + std * noise}


def _latent_units(adapter: Adapter, units: list[Unit], vae_latents: str) -> list[Unit]:
    """Replace the family's `encode_image` by the posterior + sampling units `vae_latents` asks for."""
    if vae_latents == "mode":
        return units
    if vae_latents not in VAE_LATENTS:
        raise ConfigError(f"data.vae_latents={vae_latents!r} is unknown; choose one of {list(VAE_LATENTS)}")
    encode = next(u for u in units if u.name == "encode_image")
    dist = Unit("encode_image_dist", encode.inputs, ("latent_mean", "latent_std"), adapter.encode_image_dist,
                components=encode.components, doc="VAE posterior mean and std, normalized")
    if vae_latents == "sample":
        sample = Unit("sample_latents", ("latent_mean", "latent_std"), ("image_latents",), sample_latents,
                      draws_random=True, doc="a fresh posterior sample every step")
    else:
        sample = Unit("sample_latents", ("latent_mean", "latent_std", "sample_id"), ("image_latents",),
                      sample_latents_frozen, doc="one posterior sample per image, seeded by the sample")
    index = units.index(encode)
    return units[:index] + [dist, sample] + units[index + 1:]


def flow_matching_loss(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    pred, target = values["model_pred"].float(), values["target"].float()
    return {"loss": torch.nn.functional.mse_loss(pred, target)}


def build_graph(adapter: Adapter, task: str, *, vae_latents: str = "mode") -> UnitGraph:
    """The unit graph of `task` on `adapter`'s family (raises ConfigError for an unknown task)."""
    if task not in TASKS:
        forms = ", ".join(f"{t}, {t}:data_process, {t}:train" for t in TASKS)
        raise ConfigError(f"--task {task!r} is unknown; choose one of {forms}")
    shared_head = [
        Unit("load_image", ("image_path", "image_size"), ("image",), load_images,
             doc="decode, resize to cover, centre-crop to the training size"),
    ]
    shared_tail = [
        Unit("sample_timestep", ("image_latents",), ("sigma", "timestep"), sample_timestep,
             components=("scheduler",), draws_random=True, doc="uniform index into the shifted sigmas"),
        Unit("sample_noise", ("image_latents",), ("noise",), sample_noise, draws_random=True,
             doc="standard normal noise, fresh every step"),
        Unit("add_noise", ("image_latents", "noise", "sigma"), ("noisy_latents", "target"), add_noise,
             doc="flow-matching interpolation and velocity target"),
        Unit("flow_matching_loss", ("model_pred", "target"), ("loss",), flow_matching_loss, doc="MSE in fp32"),
    ]
    family = _latent_units(adapter, adapter.family_units(), vae_latents)
    return UnitGraph(shared_head + family + shared_tail, sources=SOURCES)
