"""Stable Diffusion 1.5 and SDXL: CLIP text encoder(s), AutoencoderKL, UNet2DConditionModel.

Units follow `StableDiffusionPipeline` / `StableDiffusionXLPipeline`: 77-token CLIP states (SDXL:
the penultimate states of both encoders, concatenated, plus the second encoder's pooled
projection and the six size/crop time ids), latents scaled by the VAE's `scaling_factor`. The
objective (epsilon or v-prediction) comes from the scheduler config; training noises with
`DDPMScheduler` built from that config, as diffusers' training scripts do. SDXL's VAE runs in
float32 when its config says `force_upcast` (StableDiffusionXLPipeline upcasts it to avoid NaN
latents in float16). A folder whose VAE normalizes latents with `latents_mean`/`latents_std` or
whose scheduler is EDM-style (Playground v2.5) is refused: these units would train it on wrongly
scaled latents with the wrong objective.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from autosplit.adapters import full_size, tiny
from autosplit.adapters.base import AdapterBase, LoraNaming, Sampling, ValueLayout, config_only, note_truncation
from autosplit.errors import ModelError
from autosplit.graph import Unit, UnitContext

#: stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (860 M parameters)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
#: stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDM, epsilon; training noises with DDPM from it)
SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
    trained_betas=None,
)
SD15_COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel", SD15_UNET),
    "vae": ("diffusers", "AutoencoderKL", full_size.SD_VAE),
    "text_encoder": ("transformers", "CLIPTextModel", full_size.CLIP_L_TEXT),
}
#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.57 B parameters)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
#: stable-diffusion-xl-base-1.0 vae/config.json
SDXL_VAE = {**full_size.SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
#: stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (Euler, epsilon)
SDXL_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    trained_betas=None,
)
SDXL_COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel", SDXL_UNET),
    "vae": ("diffusers", "AutoencoderKL", SDXL_VAE),
    "text_encoder": ("transformers", "CLIPTextModel", full_size.CLIP_L_TEXT),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", full_size.CLIP_BIGG_TEXT),
}


#: the words of CLIP text encoders' Linear module names that hold an underscore
#: (`text_model.encoder.layers.0.self_attn.q_proj`), as kohya's `lora_te_` keys flatten them
CLIP_LORA_WORDS = frozenset({"text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection"})
#: the same for diffusers' UNet2DConditionModel (SD 1.x keys keep diffusers' names)
UNET_LORA_WORDS = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "conv_in",
        "conv_out",
        "conv_shortcut",
        "time_emb_proj",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
    }
)
#: and for the original (LDM/sgm) UNet, whose names SDXL's kohya keys use
LDM_LORA_WORDS = frozenset(
    {
        "input_blocks",
        "middle_block",
        "output_blocks",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
    }
)
#: resnet layers: diffusers' name -> the original UNet's
_LDM_RESNET = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_LDM_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def ldm_name(path: str, *, layers_per_block: int) -> str:
    """The original (LDM) UNet's name of a diffusers UNet2DConditionModel module, as SDXL's
    kohya LoRAs key it: down block i's layer j is input block i * (n + 1) + j + 1 (n layers per
    block), up block i's is output block i * (n + 1) + j; in a block, 0 is the resnet, 1 the
    transformer. Raises KeyError for upsamplers (whose index depends on the block type) and for
    names of no known place."""
    if path in _LDM_TOP:
        return _LDM_TOP[path]
    parts, step = path.split("."), layers_per_block + 1
    kind = parts[0] if parts[0] in ("down_blocks", "up_blocks", "mid_block") else None
    if kind is None or (kind != "mid_block" and len(parts) < 5) or (kind == "mid_block" and len(parts) < 4):
        raise KeyError(path)
    if kind == "mid_block":
        inner, j, rest = parts[1], int(parts[2]), parts[3:]
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(inner, j)]
        return ".".join(["middle_block", str(index), *_ldm_inner(inner, rest)])
    i, inner, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if kind == "down_blocks" and inner == "downsamplers" and rest == ["conv"]:
        return f"input_blocks.{(i + 1) * step}.0.op"
    if inner not in ("resnets", "attentions"):
        raise KeyError(path)
    block = f"input_blocks.{i * step + j + 1}" if kind == "down_blocks" else f"output_blocks.{i * step + j}"
    return ".".join([block, "0" if inner == "resnets" else "1", *_ldm_inner(inner, rest)])


def _ldm_inner(inner: str, rest: list[str]) -> list[str]:
    if inner == "attentions":
        return rest
    if len(rest) != 1 or rest[0] not in _LDM_RESNET:
        raise KeyError(".".join(rest))
    return _LDM_RESNET[rest[0]].split(".")


def diffusers_unet_name(path: str, *, layers_per_block: int) -> str:
    """The inverse of `ldm_name`."""
    top = {v: k for k, v in _LDM_TOP.items()}
    if path in top:
        return top[path]
    parts, step = path.split("."), layers_per_block + 1
    if len(parts) < 3 or parts[0] not in ("input_blocks", "middle_block", "output_blocks"):
        raise KeyError(path)
    if parts[0] == "middle_block":
        inner, j = {"0": ("resnets", 0), "1": ("attentions", 0), "2": ("resnets", 1)}[parts[1]]
        return ".".join(["mid_block", inner, str(j), *_diffusers_inner(inner, parts[2:])])
    n, slot, rest = int(parts[1]), parts[2], parts[3:]
    if parts[0] == "input_blocks" and slot == "0" and rest == ["op"]:
        return f"down_blocks.{n // step - 1}.downsamplers.0.conv"
    inner = {"0": "resnets", "1": "attentions"}[slot]
    i, j = ((n - 1) // step, (n - 1) % step) if parts[0] == "input_blocks" else (n // step, n % step)
    kind = "down_blocks" if parts[0] == "input_blocks" else "up_blocks"
    return ".".join([kind, str(i), inner, str(j), *_diffusers_inner(inner, rest)])


def _diffusers_inner(inner: str, rest: list[str]) -> list[str]:
    if inner == "attentions":
        return rest
    back = {v: k for k, v in _LDM_RESNET.items()}
    joined = ".".join(rest)
    if joined not in back:
        raise KeyError(joined)
    return [back[joined]]


@functools.cache
def _clip_is_flat(with_projection: bool) -> bool:
    """transformers 5 lays CLIPTextModel out without the `text_model.` level of 4.x (which kohya's,
    ComfyUI's and AUTOMATIC1111's CLIP LoRA keys keep); CLIPTextModelWithProjection keeps it."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return not hasattr(model, "text_model")


def clip_native_name(path: str) -> str:
    """A CLIP text encoder module's name in kohya keys: under `text_model.`, as in transformers 4."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def clip_module_name(path: str, *, with_projection: bool = False) -> str:
    """The inverse of `clip_native_name` for the installed transformers' CLIPTextModel (or, with
    `with_projection`, CLIPTextModelWithProjection: SDXL's second text encoder)."""
    return path.removeprefix("text_model.") if _clip_is_flat(with_projection) else path


def _same_name(component: str, path: str) -> tuple[str, int]:
    return (path if component == "unet" else clip_native_name(path)), 0


def _same_names(component: str, path: str) -> tuple[str, ...]:
    return ((path if component == "unet" else clip_module_name(path)),)


def _clip_states(tokenizer: Any, encoder: Any, prompts: list[str], ctx: UnitContext, *, label: str) -> Any:
    note_truncation(tokenizer, prompts, max_length=tokenizer.model_max_length, label=label)
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(ctx.device)
    return encoder(ids, output_hidden_states=True)


def encode_prompt(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    out = _clip_states(
        ctx.components["tokenizer"], ctx.components["text_encoder"], list(values["prompt"]), ctx, label="tokenizer"
    )
    return {"prompt_embeds": out[0].to(ctx.dtype)}


def encode_prompt_xl(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    c, prompts = ctx.components, list(values["prompt"])
    first = _clip_states(c["tokenizer"], c["text_encoder"], prompts, ctx, label="tokenizer")
    second = _clip_states(c["tokenizer_2"], c["text_encoder_2"], prompts, ctx, label="tokenizer_2")
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


def decode_image(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """Scaled latents -> images in [-1, 1], as StableDiffusion(XL)Pipeline decodes them (SDXL's
    upcast VAE in float32)."""
    vae = ctx.components["vae"]
    latents = values["latents"].to(ctx.device, vae.dtype)
    return {"image": vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]}


def kl_scale_factor(vae_config: Any) -> int:
    """AutoencoderKL's pixels per latent pixel: 2 ** (number of blocks - 1)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def kl_latent_shape(vae_config: Any, width: int, height: int) -> tuple[int, ...]:
    factor = kl_scale_factor(vae_config)
    return (vae_config["latent_channels"], height // factor, width // factor)


#: StableDiffusionPipeline's sampling: CFG 7.5 with the negative prompt (sampled with Euler here)
SD_SAMPLING = Sampling(decode_image, kl_latent_shape, kl_scale_factor, guidance="cfg", default_guidance=7.5)
#: StableDiffusionXLPipeline's: CFG 5, and an empty negative prompt conditions on zeros
SDXL_SAMPLING = Sampling(
    decode_image, kl_latent_shape, kl_scale_factor, guidance="cfg", default_guidance=5.0, zero_empty_negative=True
)


def denoise(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    added = None
    if "add_time_ids" in values:
        added = {
            "text_embeds": values["pooled_prompt_embeds"].to(ctx.dtype),
            "time_ids": values["add_time_ids"].to(ctx.dtype),
        }
    pred = ctx.components["unet"](
        values["noisy_latents"].to(ctx.dtype),
        values["timestep"],
        encoder_hidden_states=values["prompt_embeds"].to(ctx.dtype),
        added_cond_kwargs=added,
        return_dict=False,
    )[0]
    return {"model_pred": pred}


def refuse_unsupported(root: Path, name: str) -> dict[str, Any]:
    """The config of component `name` ("vae" or "scheduler") of the folder `root`; raises ModelError,
    naming the file and key, for a VAE with `latents_mean`/`latents_std` or an EDM scheduler."""
    import json

    file = root / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{file}: cannot read ({exc}); re-save the pipeline folder") from exc
    fix = "these units scale SD/SDXL latents by scaling_factor and train DDPM's epsilon or v objective; use a folder "
    if name == "vae":
        keys = [k for k in ("latents_mean", "latents_std") if config.get(k) is not None]
        if keys:
            raise ModelError(
                f"{file} sets {'/'.join(keys)} (a Playground v2.5-style VAE that normalizes latents per channel): "
                f"{fix}whose VAE has no latents_mean/latents_std (a standard SD or SDXL one)"
            )
    if name == "scheduler" and (str(config.get("_class_name", "")).startswith("EDM") or "sigma_data" in config):
        raise ModelError(
            f"{file}: _class_name {config.get('_class_name')!r} is an EDM scheduler (Playground v2.5's objective): "
            f"{fix}with a DDPM-family scheduler (DDPM, Euler, PNDM, DPM-Solver without EDM)"
        )
    return config


class StableDiffusionAdapter(AdapterBase):
    """Stable Diffusion 1.x/2.x (`StableDiffusionPipeline` folders)."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    base_model_aliases = {"dit": "unet", "unet": "unet"}
    image_multiple = 8  # VAE /8, no patches
    patch_size = 2  # unused: the UNet has no tokens and DDPM no sequence-length shift
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    tasks = ("sft",)
    media = "image"
    xl = False
    sampling = SD_SAMPLING

    def family_units(self) -> list[Unit]:
        encoders = ("tokenizer", "text_encoder") + (("tokenizer_2", "text_encoder_2") if self.xl else ())
        cond = ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids") if self.xl else ("prompt_embeds",)
        units = [
            Unit(
                "encode_prompt",
                ("prompt",),
                cond[:2] if self.xl else cond,
                encode_prompt_xl if self.xl else encode_prompt,
                components=encoders,
                doc="77-token CLIP states" + (" of both encoders + pooled projection" if self.xl else ""),
            ),
            Unit(
                "encode_image",
                ("image",),
                ("image_latents",),
                encode_image,
                components=("vae",),
                doc="VAE posterior mode x scaling_factor",
            ),
            Unit(
                "denoise",
                ("noisy_latents", "timestep", *cond),
                ("model_pred",),
                denoise,
                components=("unet",),
                doc="UNet noise (epsilon) or velocity (v) prediction",
            ),
        ]
        if self.xl:
            units.insert(
                1, Unit("time_ids", ("image_size",), ("add_time_ids",), time_ids, doc="SDXL size/crop conditioning")
            )
        return units

    def value_layouts(self) -> dict[str, ValueLayout]:
        return {}

    def lora_naming(self, fmt: str, *, denoiser_config: Mapping[str, Any] | None = None) -> LoraNaming:
        """kohya, which is also what ComfyUI and AUTOMATIC1111 read: `lora_unet_` keys with diffusers'
        UNet names (SD 1.x, as kohya-ss trains it) or the original UNet's (SDXL, `ldm_name`), and
        `lora_te_` (SDXL: `lora_te1_`, `lora_te2_`) keys with CLIP's names."""
        if fmt not in ("kohya", "comfyui"):
            return super().lora_naming(fmt)
        if not self.xl:
            return LoraNaming(
                style="kohya",
                prefixes={"unet": "lora_unet_", "text_encoder": "lora_te_"},
                to_native=_same_name,
                to_diffusers=_same_names,
                words=UNET_LORA_WORDS | CLIP_LORA_WORDS,
            )
        config: Mapping[str, Any] = SDXL_UNET if denoiser_config is None else denoiser_config
        per_block = int(config.get("layers_per_block", 2))

        def to_native(component: str, path: str) -> tuple[str, int]:
            return (ldm_name(path, layers_per_block=per_block) if component == "unet" else clip_native_name(path)), 0

        def to_diffusers(component: str, path: str) -> tuple[str, ...]:
            if component == "unet":
                return (diffusers_unet_name(path, layers_per_block=per_block),)
            return (clip_module_name(path, with_projection=component == "text_encoder_2"),)

        return LoraNaming(
            style="kohya",
            prefixes={"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
            to_native=to_native,
            to_diffusers=to_diffusers,
            words=LDM_LORA_WORDS | CLIP_LORA_WORDS,
        )

    def load_component(self, root: Path, name: str, *, device: torch.device, dtype: torch.dtype) -> Any:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import (
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
        )

        if name in ("tokenizer", "tokenizer_2"):
            return CLIPTokenizer.from_pretrained(root / name)
        if name in ("vae", "scheduler"):
            config = refuse_unsupported(root, name)
            if name == "vae" and self.xl and config.get("force_upcast", True):
                dtype = torch.float32  # as StableDiffusionXLPipeline upcasts it; encode_image casts the latents
        if name == "scheduler":  # training noises with DDPM whatever sampler the folder ships
            return DDPMScheduler.from_config(DDPMScheduler.load_config(root / name))
        classes = {
            "unet": UNet2DConditionModel,
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection,
        }
        return classes[name].from_pretrained(root / name, torch_dtype=dtype).to(device)

    def component_from_config(
        self, root: Path | None, name: str, *, overrides: Mapping[str, Any] | None = None
    ) -> torch.nn.Module:
        """As `AdapterBase.component_from_config`; a folder's VAE is refused as `load_component`
        refuses it, and SDXL's upcast VAE is built in float32 like the loaded one."""
        if root is not None and name == "vae":
            refuse_unsupported(root, name)
        module = (
            config_only(root, name, overrides=overrides)
            if root is not None
            else super().component_from_config(root, name, overrides=overrides)
        )
        if name == "vae" and self.xl and getattr(module.config, "force_upcast", False):
            module = module.to(torch.float32)
        return module

    # the UNet's blocks differ in width per resolution: no single repeated-block key, traced in full
    full_size_scheduler = SD15_SCHEDULER
    full_size_components = SD15_COMPONENTS

    def write_tiny(self, root: Path, *, seed: int) -> None:
        """Write a tiny random-init pipeline: SD 1.5 layout (PNDM, epsilon) or SDXL (Euler, v-prediction)."""
        import diffusers
        from diffusers import (
            AutoencoderKL,
            EulerDiscreteScheduler,
            PNDMScheduler,
            UNet2DConditionModel,
        )

        tokenizer = tiny.clip_tokenizer()
        torch.manual_seed(seed)
        unet = dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            norm_num_groups=8,
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            cross_attention_dim=32,
        )
        if self.xl:
            unet.update(
                cross_attention_dim=64,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,
                use_linear_projection=True,
            )
        schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
        parts = dict(
            vae=AutoencoderKL(
                block_out_channels=(8, 8, 8, 8),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                norm_num_groups=4,
                layers_per_block=1,
                scaling_factor=0.13025 if self.xl else 0.18215,
            ),
            text_encoder=tiny.clip_text_encoder(tokenizer),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**unet),
        )
        if self.xl:
            parts.update(
                text_encoder_2=tiny.clip_text_encoder(tokenizer, with_projection=True),
                tokenizer_2=tokenizer,
                scheduler=EulerDiscreteScheduler(**schedule, prediction_type="v_prediction"),
            )
        else:
            parts.update(
                scheduler=PNDMScheduler(**schedule, skip_prk_steps=True),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        getattr(diffusers, self.pipeline_class)(**parts).save_pretrained(root)


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """SDXL (`StableDiffusionXLPipeline` folders)."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    xl = True
    sampling = SDXL_SAMPLING
    full_size_scheduler = SDXL_SCHEDULER
    full_size_components = SDXL_COMPONENTS
