"""Training tasks: the units shared by every family, and the graph of a family + task.

`sft` is supervised fine-tuning. The objective comes from the family's scheduler config, not from
a copy of the graph per family: flow-matching schedulers (Qwen-Image, FLUX, Wan) draw a sigma from
the shifted sigma schedule and the model predicts the velocity `noise - latents` of
`noisy = (1 - sigma) * latents + sigma * noise`; DDPM-style schedulers (SD 1.5, SDXL) draw an
integer timestep, noise with the scheduler's `alphas_cumprod`, and the model predicts the noise
(`prediction_type = "epsilon"`) or the velocity (`"v_prediction"`). Noise and timestep are drawn
from the per-step generator every step, never cached.

`direct_distill` is the seed's direct distillation: the student runs `num_inference_steps` Euler
steps from the initial noise the sample's `seed` determines, and the loss is the MSE between its
final latents and the latents of the image the full model made with many steps. That initial noise
is drawn from a generator seeded by the sample, so it is deterministic and the planner's rules put
it in stage 1 with the prompt embeddings and target latents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from autosplit.adapters.base import Adapter
from autosplit.config import TIMESTEP_SAMPLING, TrainConfig
from autosplit.data import load_image, load_video
from autosplit.errors import ConfigError, DatasetError
from autosplit.graph import Unit, UnitContext, UnitGraph

TASKS = ("sft", "direct_distill")
#: how image latents come from the VAE posterior: its mode (deterministic, as DiffSynth-Studio
#: trains), a fresh sample every step (the distribution is cached, sampling runs in stage 2), or
#: one frozen sample per image (seeded by the sample, so it is cached)
VAE_LATENTS = ("mode", "sample", "frozen_sample")
SOURCES = (
    "image_path",
    "image_size",
    "num_frames",
    "prompt",
    "sample_id",
    "variant",
    "seed",
    "rand_device",
    "num_inference_steps",
    "cfg_scale",
)
#: sources that are text: cached as ragged UTF-8 bytes when a stage-2 unit reads them
TEXT_SOURCES = ("image_path", "prompt", "rand_device")
#: dataset columns each task needs besides the image (or video) and the prompt
TASK_COLUMNS = {"sft": (), "direct_distill": ("seed", "rand_device", "num_inference_steps", "cfg_scale")}


def load_images(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    images = [load_image(p, s) for p, s in zip(values["image_path"], values["image_size"])]
    return {"image": torch.stack(images)}


def load_videos(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    clips = [load_video(p, s, n) for p, s, n in zip(values["image_path"], values["image_size"], values["num_frames"])]
    return {"video": torch.stack(clips)}  # B,3,F,H,W


def objective(scheduler: Any) -> str:
    """'flow', 'epsilon' or 'v_prediction', read from the scheduler's class and config."""
    cfg = scheduler.config
    if (
        type(scheduler).__name__.startswith("FlowMatch")
        or cfg.get("use_flow_sigmas")
        or cfg.get("prediction_type") == "flow_prediction"
    ):
        return "flow"
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise ConfigError(f"scheduler prediction_type {kind!r} is not supported; use epsilon or v_prediction")
    return kind


def _seq_len(latents: torch.Tensor, patch: int) -> int:
    """Tokens the transformer sees: frames x (h / patch) x (w / patch)."""
    frames = int(np.prod(latents.shape[2:-2])) if latents.dim() > 4 else 1
    return frames * (latents.shape[-2] // patch) * (latents.shape[-1] // patch)


def _shift_mu(scheduler: Any, image_seq_len: int) -> float:
    cfg = scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def _set_sigmas(scheduler: Any, num_steps: int, seq_len: int, **kwargs: Any) -> torch.Tensor:
    if scheduler.config.get("use_dynamic_shifting", False):
        kwargs["mu"] = _shift_mu(scheduler, seq_len)
    scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
    return torch.as_tensor(scheduler.sigmas).float()


def step_settings(train: TrainConfig) -> dict[str, Any]:
    """The training settings the shared sft units and the families' denoise units read from their
    context (`ctx.settings`), besides the session's."""
    keys = ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "sigmoid_scale", "weighting_scheme")
    return {**{k: getattr(train, k) for k in keys}, "guidance_scale": train.guidance_scale}


def check_step_settings(graph: UnitGraph, scheduler: Any, settings: Mapping[str, Any]) -> None:
    """Raise ConfigError, before the first step, for timestep or weighting settings this graph does
    not use: any on a task without `sample_timestep`, loss weights on a DDPM objective."""
    sampling, weighting = settings.get("timestep_sampling", "uniform"), settings.get("weighting_scheme", "none")
    if "sample_timestep" not in graph.units and (sampling, weighting) != ("uniform", "none"):
        raise ConfigError(
            f"--timestep_sampling {sampling} --weighting_scheme {weighting}: the task draws no training "
            f"timesteps (direct_distill runs the student's fixed steps); drop them"
        )
    if weighting != "none" and scheduler is not None and objective(scheduler) != "flow":
        raise ConfigError(
            f"--weighting_scheme {weighting} weights flow-matching sigmas, and this family trains the "
            f"{objective(scheduler)} objective of a DDPM scheduler; use --weighting_scheme none"
        )


def density_draw(kind: str, b: int, ctx: UnitContext) -> torch.Tensor:
    """B numbers in [0, 1]: diffusers' `compute_density_for_timestep_sampling` ("logit_normal":
    sigmoid of N(logit_mean, logit_std); "mode": the mode map of a uniform draw, mode_scale) or
    musubi-tuner's "sigmoid" (sigmoid of sigmoid_scale x N(0, 1)); float32, on the CPU."""
    s = ctx.settings
    if kind == "logit_normal":
        mean, std = float(s.get("logit_mean", 0.0)), float(s.get("logit_std", 1.0))
        return torch.sigmoid(torch.normal(mean, std, size=(b,), generator=ctx.generator))
    if kind == "mode":
        u, scale = torch.rand((b,), generator=ctx.generator), float(s.get("mode_scale", 1.29))
        return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if kind == "sigmoid":
        return torch.sigmoid(float(s.get("sigmoid_scale", 1.0)) * torch.randn((b,), generator=ctx.generator))
    raise ConfigError(f"--timestep_sampling {kind!r} is unknown; choose one of {list(TIMESTEP_SAMPLING)}")


def _schedule_index(u: torch.Tensor, n: int) -> torch.Tensor:
    """u in [0, 1] -> an index into a schedule of n entries, as diffusers' scripts index theirs
    (`(u * n).long()`), kept inside it when u is exactly 1."""
    return (u * n).long().clamp(max=n - 1)


def sample_timestep(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """Flow matching: sigma from the shifted schedule (`uniform`: a uniform index; `logit_normal`,
    `mode`: diffusers' densities over the index, whose 0 is the noisiest end) or, for `sigmoid`,
    drawn directly and unshifted; timestep = 1000 sigma. DDPM: an integer timestep (the densities'
    draws map to the same end: u = 0 is the noisiest)."""
    scheduler = ctx.components["scheduler"]
    latents = values["image_latents"]
    b = latents.shape[0]
    steps = scheduler.config.num_train_timesteps
    kind = ctx.settings.get("timestep_sampling", "uniform")
    if objective(scheduler) == "flow":
        if kind == "sigmoid":
            sigma = density_draw(kind, b, ctx)
        else:
            sigmas = _set_sigmas(scheduler, steps, _seq_len(latents, ctx.settings.get("patch_size", 2)))[:-1]
            if kind == "uniform":  # the index is a temporary, as the measured VRAM budgets have it
                sigma = sigmas[torch.randint(0, sigmas.numel(), (b,), generator=ctx.generator)]  # last sigma is 0
            else:
                sigma = sigmas[_schedule_index(density_draw(kind, b, ctx), sigmas.numel())]
        timestep = sigma * 1000
    else:
        if kind == "uniform":
            timestep = torch.randint(0, steps, (b,), generator=ctx.generator)
        elif kind == "sigmoid":
            timestep = _schedule_index(density_draw(kind, b, ctx), steps)
        else:
            timestep = steps - 1 - _schedule_index(density_draw(kind, b, ctx), steps)
        sigma = (1 - scheduler.alphas_cumprod[timestep]).sqrt()  # the noise's standard deviation
    return {"sigma": sigma.to(ctx.device), "timestep": timestep.to(ctx.device)}


def loss_weights(scheme: str, sigma: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss weights of flow-matching `sigma` (float32): SD3's "sigma_sqrt" (1 / sigma^2)
    and "cosmap" (2 / (pi (1 - 2 sigma + 2 sigma^2))), as diffusers' `compute_loss_weighting_for_sd3`;
    "diffsynth", DiffSynth-Studio's FlowMatchScheduler training weight: y = exp(-2 (sigma - 1/2)^2)
    less its minimum over the schedule `table`, divided by its mean there (so a uniform index into
    the table has mean weight 1 and the extremes weigh least); "none", ones."""
    sigma = sigma.float()
    if scheme == "sigma_sqrt":
        return sigma**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    if scheme == "diffsynth":
        assert table is not None, "diffsynth weights are normalized over the schedule"

        def bell(s: torch.Tensor) -> torch.Tensor:
            return torch.exp(-2 * (s.float() * 1000 - 500) ** 2 / 1000**2)

        shifted = bell(table) - bell(table).min()
        return (bell(sigma) - bell(table).min().to(sigma.device)) / shifted.mean().to(sigma.device)
    return torch.ones_like(sigma)


def sample_noise(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    latents = values["image_latents"]
    noise = torch.randn(latents.shape, generator=ctx.generator, dtype=torch.float32)
    return {"noise": noise.to(ctx.device, latents.dtype)}


def add_noise(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    scheduler = ctx.components["scheduler"]
    latents, noise, timestep = values["image_latents"], values["noise"], values["timestep"]
    kind = objective(scheduler)
    if kind == "flow":
        sigma = values["sigma"].view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
        return {"noisy_latents": (1 - sigma) * latents + sigma * noise, "target": noise - latents}
    noisy = scheduler.add_noise(latents, noise, timestep)
    target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, timestep)
    return {"noisy_latents": noisy, "target": target}


def sample_latents(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    mean, std = values["latent_mean"], values["latent_std"]
    noise = torch.randn(mean.shape, generator=ctx.generator, dtype=torch.float32).to(mean.device, mean.dtype)
    return {"image_latents": mean + std * noise}


def sample_latents_frozen(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """One posterior sample per image, from a generator seeded by (seed, sample id): the same
    draw every epoch, so it may be cached."""
    mean, std = values["latent_mean"], values["latent_std"]
    draws = []
    for sample_id in values["sample_id"]:
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
    encode = next((u for u in units if u.name == "encode_image"), None)
    if encode is None or adapter.encode_image_dist is None:
        raise ConfigError(f"data.vae_latents={vae_latents!r}: the {adapter.name} family supports only 'mode'")
    dist = Unit(
        "encode_image_dist",
        encode.inputs,
        ("latent_mean", "latent_std"),
        adapter.encode_image_dist,
        components=encode.components,
        doc="VAE posterior mean and std, normalized",
    )
    if vae_latents == "sample":
        sample = Unit(
            "sample_latents",
            ("latent_mean", "latent_std"),
            ("image_latents",),
            sample_latents,
            draws_random=True,
            doc="a fresh posterior sample every step",
        )
    else:
        sample = Unit(
            "sample_latents",
            ("latent_mean", "latent_std", "sample_id"),
            ("image_latents",),
            sample_latents_frozen,
            doc="one posterior sample per image, seeded by the sample",
        )
    index = units.index(encode)
    return units[:index] + [dist, sample] + units[index + 1 :]


def denoise_loss(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """MSE in float32; with `weighting_scheme`, the batch mean of each sample's MSE times its weight."""
    pred, target = values["model_pred"].float(), values["target"].float()
    scheme = ctx.settings.get("weighting_scheme", "none")
    if scheme == "none":
        return {"loss": torch.nn.functional.mse_loss(pred, target)}
    table = None
    if scheme == "diffsynth":  # the schedule sample_timestep drew from (its scheduler: always in stage 2)
        scheduler = ctx.components["scheduler"]
        steps = scheduler.config.num_train_timesteps
        table = _set_sigmas(scheduler, steps, _seq_len(pred, ctx.settings.get("patch_size", 2)))[:-1]
    weights = loss_weights(scheme, values["sigma"], table).to(pred.device)
    per_sample = ((pred - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
    return {"loss": (weights * per_sample).mean()}


def initial_noise(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """The noise the sample's own `seed` determines, as diffusers pipelines draw it with
    `generator=torch.Generator(rand_device).manual_seed(seed)`; never ctx.generator."""
    latents = values["image_latents"]
    noise = []
    for seed, device in zip(values["seed"], values["rand_device"]):
        generator = torch.Generator(device=str(device)).manual_seed(int(seed))
        noise.append(torch.randn(latents.shape[1:], generator=generator, device=str(device), dtype=torch.float32))
    return {"initial_noise": torch.stack(noise).to(ctx.device, latents.dtype)}


def distill_settings(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    steps = torch.tensor([[int(n)] for n in values["num_inference_steps"]], dtype=torch.int64)
    cfg = torch.tensor([[float(c)] for c in values["cfg_scale"]], dtype=torch.float32)
    if (steps < 1).any():
        raise DatasetError(f"num_inference_steps {steps.flatten().tolist()}: each must be at least 1")
    return {"num_steps": steps.to(ctx.device), "guidance_scale": cfg.to(ctx.device)}


def make_rollout(denoise: Unit) -> Unit:
    """The student's few-step Euler rollout, calling the family's `denoise` unit at each step.

    Each step is checkpointed: backward keeps one latent per step and recomputes one step's
    activations at a time, so memory grows with steps x latent size, not steps x activations.
    """
    cond = tuple(v for v in denoise.inputs if v not in ("noisy_latents", "timestep"))
    trained = denoise.components[0]

    def rollout(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
        steps, guidance = values["num_steps"].flatten(), values["guidance_scale"].flatten()
        if not (steps == steps[0]).all():
            raise DatasetError(f"a batch mixes num_inference_steps {steps.tolist()}; use --batch_size 1 or one value")
        if not getattr(ctx.components[trained].config, "guidance_embeds", False) and (guidance != 1).any():
            raise DatasetError(
                f"cfg_scale {guidance.tolist()}: this family's student runs without guidance "
                f"(as the seed's direct distillation); set cfg_scale to 1"
            )
        latents = values["initial_noise"]
        n = int(steps[0])
        sigmas = _set_sigmas(
            ctx.components["scheduler"],
            n,
            _seq_len(latents, ctx.settings.get("patch_size", 2)),
            sigmas=np.linspace(1.0, 1 / n, n),
        )
        sigmas = sigmas.to(latents.device)
        fixed = {name: values[name] for name in cond}

        def step(x: torch.Tensor, i: int) -> torch.Tensor:
            t = (sigmas[i] * 1000).expand(x.shape[0])
            pred = denoise.fn({**fixed, "noisy_latents": x, "timestep": t, "guidance": guidance}, ctx)["model_pred"]
            return (x.float() + (sigmas[i + 1] - sigmas[i]) * pred.float()).to(x.dtype)  # FlowMatchEuler step

        for i in range(n):
            latents = checkpoint(step, latents, i, use_reentrant=False)
        return {"final_latents": latents}

    return Unit(
        "rollout",
        ("initial_noise", "num_steps", "guidance_scale", *cond),
        ("final_latents",),
        rollout,
        components=(*denoise.components, "scheduler"),
        doc="student's num_inference_steps Euler steps, each checkpointed",
    )


def distill_loss(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    return {"loss": torch.nn.functional.mse_loss(values["final_latents"].float(), values["image_latents"].float())}


def _sft_units() -> list[Unit]:
    return [
        Unit(
            "sample_timestep",
            ("image_latents",),
            ("sigma", "timestep"),
            sample_timestep,
            components=("scheduler",),
            draws_random=True,
            doc="flow: an index into the shifted sigmas (train.timestep_sampling); DDPM: an integer timestep",
        ),
        Unit(
            "sample_noise",
            ("image_latents",),
            ("noise",),
            sample_noise,
            draws_random=True,
            doc="standard normal noise, fresh every step",
        ),
        Unit(
            "add_noise",
            ("image_latents", "noise", "sigma", "timestep"),
            ("noisy_latents", "target"),
            add_noise,
            components=("scheduler",),
            doc="noising and target of the scheduler's objective",
        ),
        Unit(
            "denoise_loss",
            ("model_pred", "target", "sigma"),
            ("loss",),
            denoise_loss,
            doc="MSE in fp32, weighted by sigma with train.weighting_scheme",
        ),
    ]


def _distill_units(denoise: Unit) -> list[Unit]:
    return [
        # randomness seeded by the sample itself is deterministic: draws_random stays False
        Unit(
            "initial_noise",
            ("image_latents", "seed", "rand_device"),
            ("initial_noise",),
            initial_noise,
            doc="randn from torch.Generator(rand_device).manual_seed(seed), per sample",
        ),
        Unit(
            "distill_settings",
            ("num_inference_steps", "cfg_scale"),
            ("num_steps", "guidance_scale"),
            distill_settings,
            doc="the row's student steps and guidance, as tensors",
        ),
        make_rollout(denoise),
        Unit(
            "distill_loss",
            ("final_latents", "image_latents"),
            ("loss",),
            distill_loss,
            doc="MSE between the student's final latents and the target's latents, fp32",
        ),
    ]


def variant_generator(ctx: UnitContext, sample_id: int, variant: int, stream: int = 0) -> torch.Generator:
    """The generator of one cached augmentation variant: a pure function of (seed, sample, variant);
    each augmentation draws from its own `stream` so their draws are independent."""
    entropy = [ctx.settings.get("seed", 0), int(sample_id), int(variant)] + ([stream] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def random_flip(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """Flip each image horizontally with probability `random_flip`: from the step's generator, or,
    when augmentations are cached as variants, from the variant's own seeded generator."""
    images, flipped = values["decoded_image"], []
    cached = ctx.settings.get("variants", 0) > 0
    for image, sample_id, variant in zip(images, values["sample_id"], values["variant"]):
        generator = variant_generator(ctx, sample_id, variant) if cached else ctx.generator
        draw = torch.rand((), generator=generator) < ctx.settings.get("random_flip", 0.0)
        flipped.append(torch.where(draw.to(image.device), image.flip(-1), image))  # no Python branch: fake-safe
    return {"image": torch.stack(flipped)}


def _augment(head: list[Unit], random_flip_p: float, variants: int) -> list[Unit]:
    """Insert the random flip between decoding and encoding when asked for."""
    if not random_flip_p or head[0].name != "load_image":
        return head
    load = head[0]
    decode = Unit(load.name, load.inputs, ("decoded_image",), load.fn, doc=load.doc)
    flip = Unit(
        "random_flip",
        ("decoded_image", "sample_id", "variant"),
        ("image",),
        random_flip,
        draws_random=variants == 0,
        doc="random horizontal flip (cached as variants with cache.variants)",
    )
    return [_renamed(decode), flip, *head[1:]]


def _renamed(unit: Unit) -> Unit:
    def fn(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
        return {"decoded_image": unit.fn(values, ctx)["image"]}

    return Unit(unit.name, unit.inputs, unit.outputs, fn, doc=unit.doc)


def source_layouts() -> dict[str, Any]:
    """How text sources are cached if a stage-2 unit reads them (ragged bytes, capped)."""
    from autosplit.adapters.base import ValueLayout
    from autosplit.storage.codec import MAX_SOURCE_BYTES

    return {name: ValueLayout(ragged_axis=0, max_len=MAX_SOURCE_BYTES) for name in TEXT_SOURCES}


#: prefixes of the text values a caption-dropout graph caches twice: for the caption and for ""
CAPTION, EMPTY_CAPTION = "caption.", "empty_caption."


def caption_dropout(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """Replace each sample's text conditioning by that of the empty prompt with probability
    `caption_dropout`: from the step's generator, or a cached variant's own generator. Ragged text
    values (tokens along axis 1) are zero-padded to the longer of the two before choosing."""
    cached = ctx.settings.get("variants", 0) > 0
    p = ctx.settings.get("caption_dropout", 0.0)
    draws = [
        torch.rand((), generator=variant_generator(ctx, i, v, stream=1) if cached else ctx.generator) < p
        for i, v in zip(values["sample_id"], values["variant"])
    ]
    out = {}
    for name in values:
        if not name.startswith(CAPTION):
            continue
        full, empty = values[name], values[EMPTY_CAPTION + name.removeprefix(CAPTION)]
        if full.dim() > 1 and full.shape[1] != empty.shape[1]:
            longest = max(full.shape[1], empty.shape[1])
            full, empty = (
                torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1])) for t in (full, empty)
            )
        drop = torch.stack(draws).to(full.device).view(-1, *([1] * (full.dim() - 1)))
        out[name.removeprefix(CAPTION)] = torch.where(drop, empty, full)  # no Python branch: fake-safe
    return out


def _with_outputs(unit: Unit, name: str, prefix: str, *, empty: bool = False) -> Unit:
    """`unit` with its outputs renamed `prefix + name`; with `empty`, run on the empty prompt."""

    def fn(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
        if empty:
            values = {**values, "prompt": [""] * len(values["prompt"])}
        return {prefix + k: v for k, v in unit.fn(values, ctx).items()}

    return Unit(
        name,
        unit.inputs,
        tuple(prefix + o for o in unit.outputs),
        fn,
        unit.components,
        doc=f"{unit.doc} ({'the empty prompt' if empty else 'the caption'}, for caption dropout)",
    )


def _caption_dropout(family: list[Unit], p: float, variants: int) -> list[Unit]:
    """Encode the caption and the empty prompt (both cacheable), then choose per sample."""
    encode = next((u for u in family if u.inputs == ("prompt",)), None)
    if not p or encode is None:
        return family
    full = _with_outputs(encode, encode.name, CAPTION)
    empty = _with_outputs(encode, "encode_empty_prompt", EMPTY_CAPTION, empty=True)
    choose = Unit(
        "caption_dropout",
        (*full.outputs, *empty.outputs, "sample_id", "variant"),
        encode.outputs,
        caption_dropout,
        draws_random=variants == 0,
        doc="the empty prompt's conditioning with probability data.caption_dropout",
    )
    index = family.index(encode)
    return family[:index] + [full, empty, choose] + family[index + 1 :]


def graph_layouts(adapter: Adapter) -> dict[str, Any]:
    """How the values of a graph are cached: text sources, the family's layouts, and the same
    layouts for the caption-dropout copies of its text values."""
    family = adapter.value_layouts()
    return {
        **source_layouts(),
        **family,
        **{prefix + k: v for k, v in family.items() for prefix in (CAPTION, EMPTY_CAPTION)},
    }


def build_graph(
    adapter: Adapter,
    task: str,
    *,
    vae_latents: str = "mode",
    random_flip_p: float = 0.0,
    variants: int = 0,
    caption_dropout_p: float = 0.0,
) -> UnitGraph:
    """The unit graph of `task` on `adapter`'s family (raises ConfigError for an unknown task)."""
    if task not in TASKS:
        forms = ", ".join(f"{t}, {t}:data_process, {t}:train" for t in TASKS)
        raise ConfigError(f"--task {task!r} is unknown; choose one of {forms}")
    if adapter.media == "video":
        head = [
            Unit(
                "load_video",
                ("image_path", "image_size", "num_frames"),
                ("video",),
                load_videos,
                doc="decode frames, resize to cover, centre-crop",
            )
        ]
    else:
        head = [
            Unit(
                "load_image",
                ("image_path", "image_size"),
                ("image",),
                load_images,
                doc="decode, resize to cover, centre-crop to the training size",
            )
        ]
    head = _augment(head, random_flip_p, variants)
    family = _caption_dropout(_latent_units(adapter, adapter.family_units(), vae_latents), caption_dropout_p, variants)
    if task == "sft":
        return UnitGraph(head + family + _sft_units(), sources=SOURCES)
    if task not in adapter.tasks:
        raise ConfigError(f"--task {task}: the {adapter.name} family supports {list(adapter.tasks)}")
    denoise = next(u for u in family if u.name == "denoise")
    rest = [u for u in family if u.name != "denoise"]
    return UnitGraph(head + rest + _distill_units(denoise), sources=SOURCES)
