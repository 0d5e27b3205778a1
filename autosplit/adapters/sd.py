"""Stable Diffusion 1.5 and SDXL: CLIP text encoder(s), AutoencoderKL, UNet2DConditionModel.

Units follow `StableDiffusionPipeline` / `StableDiffusionXLPipeline`: 77-token CLIP states (SDXL:
the penultimate states of both encoders, concatenated, plus the second encoder's pooled
projection and the six size/crop time ids), latents scaled by the VAE's `scaling_factor`. The
objective (epsilon or v-prediction) comes from the scheduler config; training noises with
`DDPMScheduler` built from that config, as diffusers' training scripts do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from autosplit.adapters import tiny
from autosplit.adapters import full_size
from autosplit.adapters.base import ValueLayout
from autosplit.graph import Unit, UnitContext

#: stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (860 M parameters)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
                 layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
                 norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
#: stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDM, epsilon; training noises with DDPM from it)
SD15_SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                      clip_sample=False, trained_betas=None)
SD15_COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel", SD15_UNET),
    "vae": ("diffusers", "AutoencoderKL", full_size.SD_VAE),
    "text_encoder": ("transformers", "CLIPTextModel", full_size.CLIP_L_TEXT),
}
#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.57 B parameters)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 block_out_channels=[320, 640, 1280], layers_per_block=2, act_fn="silu", norm_num_groups=32,
                 norm_eps=1e-5, cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
#: stable-diffusion-xl-base-1.0 vae/config.json
SDXL_VAE = {**full_size.SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
#: stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (Euler, epsilon)
SDXL_SCHEDULER = dict(_class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", num_train_timesteps=1000, prediction_type="epsilon",
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      use_karras_sigmas=False, trained_betas=None)
SDXL_COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel", SDXL_UNET),
    "vae": ("diffusers", "AutoencoderKL", SDXL_VAE),
    "text_encoder": ("transformers", "CLIPTextModel", full_size.CLIP_L_TEXT),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", full_size.CLIP_BIGG_TEXT),
}


def _clip_states(tokenizer: Any, encoder: Any, prompts: list[str], ctx: UnitContext) -> Any:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(ctx.device)
    return encoder(ids, output_hidden_states=True)


def encode_prompt(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    out = _clip_states(ctx.components["tokenizer"], ctx.components["text_encoder"], list(values["prompt"]), ctx)
    return {"prompt_embeds": out[0].to(ctx.dtype)}


def encode_prompt_xl(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    c, prompts = ctx.components, list(values["prompt"])
    first = _clip_states(c["tokenizer"], c["text_encoder"], prompts, ctx)
    second = _clip_states(c["tokenizer_2"], c["text_encoder_2"], prompts, ctx)
    embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return {"prompt_embeds": embeds.to(ctx.dtype), "pooled_prompt_embeds": second[0].to(ctx.dtype)}


def time_ids(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """original size, crop top-left, target size as (h, w) pairs: the image is trained uncropped."""
    ids = [[h, w, 0, 0, h, w] for w, h in values["image_size"]]
    return {"add_time_ids": torch.tensor(ids, dtype=torch.float32, device=ctx.device)}


def encode_image(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    vae = ctx.components["vae"]
    z = vae.encode(values["image"].to(ctx.device, vae.dtype)).latent_dist.mode()
    return {"image_latents": (z * vae.config.scaling_factor).to(ctx.dtype)}


def denoise(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    added = None
    if "add_time_ids" in values:
        added = {"text_embeds": values["pooled_prompt_embeds"].to(ctx.dtype),
                 "time_ids": values["add_time_ids"].to(ctx.dtype)}
    pred = ctx.components["unet"](values["noisy_latents"].to(ctx.dtype), values["timestep"],
                                  encoder_hidden_states=values["prompt_embeds"].to(ctx.dtype),
                                  added_cond_kwargs=added, return_dict=False)[0]
    return {"model_pred": pred}


class StableDiffusionAdapter:
    """Stable Diffusion 1.x/2.x (`StableDiffusionPipeline` folders)."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    base_model_aliases = {"dit": "unet", "unet": "unet"}
    image_multiple = 8  # VAE /8, no patches
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    tasks = ("sft",)
    media = "image"
    xl = False

    def family_units(self) -> list[Unit]:
        encoders = ("tokenizer", "text_encoder") + (("tokenizer_2", "text_encoder_2") if self.xl else ())
        cond = ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids") if self.xl else ("prompt_embeds",)
        units = [
            Unit("encode_prompt", ("prompt",), cond[:2] if self.xl else cond,
                 encode_prompt_xl if self.xl else encode_prompt, components=encoders,
                 doc="77-token CLIP states" + (" of both encoders + pooled projection" if self.xl else "")),
            Unit("encode_image", ("image",), ("image_latents",), encode_image, components=("vae",),
                 doc="VAE posterior mode x scaling_factor"),
            Unit("denoise", ("noisy_latents", "timestep", *cond), ("model_pred",), denoise, components=("unet",),
                 doc="UNet noise (epsilon) or velocity (v) prediction"),
        ]
        if self.xl:
            units.insert(1, Unit("time_ids", ("image_size",), ("add_time_ids",), time_ids,
                                 doc="SDXL size/crop conditioning"))
        return units

    def value_layouts(self) -> dict[str, ValueLayout]:
        return {}

    def load_component(self, root: Path, name: str, *, device: torch.device, dtype: torch.dtype) -> Any:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        if name in ("tokenizer", "tokenizer_2"):
            return CLIPTokenizer.from_pretrained(root / name)
        if name == "scheduler":  # training noises with DDPM whatever sampler the folder ships
            return DDPMScheduler.from_config(DDPMScheduler.load_config(root / name))
        classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                   "text_encoder_2": CLIPTextModelWithProjection}
        return classes[name].from_pretrained(root / name, torch_dtype=dtype).to(device)

    # the UNet's blocks differ in width per resolution: no single repeated-block key, traced in full
    full_size_scheduler = SD15_SCHEDULER
    full_size_components = SD15_COMPONENTS

    def write_tiny(self, root: Path, *, seed: int) -> None:
        """Write a tiny random-init pipeline: SD 1.5 layout (PNDM, epsilon) or SDXL (Euler, v-prediction)."""
        import diffusers
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel

        tokenizer = tiny.clip_tokenizer()
        torch.manual_seed(seed)
        unet = dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=8,
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), cross_attention_dim=32)
        if self.xl:
            unet.update(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
        schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
        parts = dict(
            vae=AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                              layers_per_block=1, scaling_factor=0.13025 if self.xl else 0.18215),
            text_encoder=tiny.clip_text_encoder(tokenizer), tokenizer=tokenizer, unet=UNet2DConditionModel(**unet),
        )
        if self.xl:
            parts.update(text_encoder_2=tiny.clip_text_encoder(tokenizer, with_projection=True), tokenizer_2=tokenizer,
                         scheduler=EulerDiscreteScheduler(**schedule, prediction_type="v_prediction"))
        else:
            parts.update(scheduler=PNDMScheduler(**schedule, skip_prk_steps=True), safety_checker=None,
                         feature_extractor=None, requires_safety_checker=False)
        getattr(diffusers, self.pipeline_class)(**parts).save_pretrained(root)


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """SDXL (`StableDiffusionXLPipeline` folders)."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    xl = True
    full_size_scheduler = SDXL_SCHEDULER
    full_size_components = SDXL_COMPONENTS
