"""FLUX.1: CLIP (pooled) + T5 text encoders, AutoencoderKL, FluxTransformer2DModel.

Units follow `diffusers.FluxPipeline`: the CLIP pooled output and the T5 last hidden state padded
to 512 tokens condition the transformer; latents are shifted and scaled by the VAE config and
packed into 2x2 patches; dev-style checkpoints (`guidance_embeds`) get a guidance value.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from autosplit.adapters import full_size, tiny
from autosplit.adapters.base import AdapterBase, LoraNaming, Sampling, ValueLayout, note_truncation, rename_table
from autosplit.adapters.qwen_image import pack_latents, unpack_latents
from autosplit.adapters.sd import CLIP_LORA_WORDS, clip_module_name, clip_native_name, kl_latent_shape, kl_scale_factor
from autosplit.graph import Unit, UnitContext

T5_TOKENS = 512  # FluxPipeline's max_sequence_length
#: guidance of dev-style checkpoints in training when `train.guidance_scale` is not given: diffusers'
#: train_dreambooth_lora_flux.py's default (DiffSynth-Studio trains FLUX.1-dev with 1)
TRAIN_GUIDANCE = 3.5

#: black-forest-labs/FLUX.1-dev, transformer/config.json (11.9 B parameters)
FULL_SIZE_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
#: FLUX.1-dev vae/config.json: 16 latent channels, no quant convs
FULL_SIZE_VAE = {
    **full_size.SD_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
#: FLUX.1-dev scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
FULL_SIZE_SCHEDULER = dict(
    _class_name="FlowMatchEulerDiscreteScheduler",
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)
FULL_SIZE_COMPONENTS = {
    "transformer": ("diffusers", "FluxTransformer2DModel", FULL_SIZE_TRANSFORMER),
    "vae": ("diffusers", "AutoencoderKL", FULL_SIZE_VAE),
    "text_encoder": ("transformers", "CLIPTextModel", full_size.CLIP_L_TEXT),
    "text_encoder_2": ("transformers", "T5EncoderModel", full_size.T5_XXL),
}


#: diffusers' FluxTransformer2DModel module -> Black Forest Labs' name, which kohya-ss (sd-scripts)
#: and ComfyUI key FLUX LoRAs by (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`): one
#: fused `qkv` (double blocks) or `linear1` (single blocks: q, k, v and the MLP input) holds the
#: LoRAs of several diffusers modules, the third entry of a row saying which part. The final
#: AdaLN (`norm_out.linear`) stores its halves the other way round there and is not mapped.
LORA_NAMES = rename_table(
    [
        *(
            (f"transformer_blocks.{{i}}.attn.{d}", "double_blocks.{i}.img_attn.qkv", k)
            for k, d in enumerate(("to_q", "to_k", "to_v"))
        ),
        *(
            (f"transformer_blocks.{{i}}.attn.{d}", "double_blocks.{i}.txt_attn.qkv", k)
            for k, d in enumerate(("add_q_proj", "add_k_proj", "add_v_proj"))
        ),
        ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj"),
        ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj"),
        ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0"),
        ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2"),
        ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0"),
        ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2"),
        ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin"),
        ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin"),
        *(
            (f"single_transformer_blocks.{{i}}.{d}", "single_blocks.{i}.linear1", k)
            for k, d in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
        ),
        ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2"),
        ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin"),
        ("x_embedder", "img_in"),
        ("context_embedder", "txt_in"),
        *(
            (f"time_text_embed.{d}.linear_{n}", f"{w}.{layer}")
            for d, w in (
                ("timestep_embedder", "time_in"),
                ("text_embedder", "vector_in"),
                ("guidance_embedder", "guidance_in"),
            )
            for n, layer in ((1, "in_layer"), (2, "out_layer"))
        ),
        ("proj_out", "final_layer.linear"),
    ]
)
#: kohya's key prefixes: the transformer, and CLIP (text_encoder) as kohya's first text encoder
LORA_PREFIXES = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}
LORA_WORDS = frozenset(
    {
        "double_blocks",
        "single_blocks",
        "img_attn",
        "txt_attn",
        "img_mlp",
        "txt_mlp",
        "img_mod",
        "txt_mod",
        "img_in",
        "txt_in",
        "time_in",
        "vector_in",
        "guidance_in",
        "in_layer",
        "out_layer",
        "final_layer",
        *CLIP_LORA_WORDS,
    }
)


def _native_name(component: str, path: str) -> tuple[str, int]:
    return LORA_NAMES[0](path) if component == "transformer" else (clip_native_name(path), 0)


def _diffusers_names(component: str, path: str) -> tuple[str, ...]:
    return LORA_NAMES[1](path) if component == "transformer" else (clip_module_name(path),)


def _split_rows(path: str, in_features: int, out_features: int) -> list[int]:
    """Output rows of each part of a fused layer: q, k, v (qkv), or q, k, v of the block's width
    and the MLP's input (linear1)."""
    if path.endswith(".linear1"):
        return [in_features] * 3 + [out_features - 3 * in_features]
    return [out_features // 3] * 3


def encode_prompt(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    c = ctx.components
    prompts = list(values["prompt"])
    note_truncation(c["tokenizer"], prompts, max_length=c["tokenizer"].model_max_length, label="tokenizer")
    note_truncation(c["tokenizer_2"], prompts, max_length=T5_TOKENS, label="tokenizer_2")
    clip_ids = c["tokenizer"](
        prompts, padding="max_length", max_length=c["tokenizer"].model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(ctx.device)
    pooled = c["text_encoder"](clip_ids, output_hidden_states=False).pooler_output
    t5_ids = c["tokenizer_2"](
        prompts, padding="max_length", max_length=T5_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids.to(ctx.device)
    embeds = c["text_encoder_2"](t5_ids, output_hidden_states=False)[0]
    return {"prompt_embeds": embeds.to(ctx.dtype), "pooled_prompt_embeds": pooled.to(ctx.dtype)}


def encode_image(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    vae = ctx.components["vae"]
    z = vae.encode(values["image"].to(ctx.device, vae.dtype)).latent_dist.mode()
    return {"image_latents": ((z - vae.config.shift_factor) * vae.config.scaling_factor).to(ctx.dtype)}


def decode_image(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """Shifted and scaled latents -> images in [-1, 1], as FluxPipeline decodes them."""
    vae = ctx.components["vae"]
    latents = values["latents"].to(ctx.device, vae.dtype)
    latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
    return {"image": vae.decode(latents, return_dict=False)[0]}


#: FluxPipeline's sampling: dev-style checkpoints get guidance 3.5 through their guidance embedding
#: (no negative prompt; schnell has neither)
SAMPLING = Sampling(decode_image, kl_latent_shape, kl_scale_factor, guidance="embedded", default_guidance=3.5)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device, dtype)


def denoise(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    transformer = ctx.components["transformer"]
    noisy, embeds = values["noisy_latents"], values["prompt_embeds"].to(ctx.dtype)
    b, _, h, w = noisy.shape
    guidance = None
    if transformer.config.guidance_embeds:  # a rollout passes the row's cfg_scale; sft, train.guidance_scale
        given = values.get("guidance")
        train_guidance = float(ctx.settings.get("guidance_scale", TRAIN_GUIDANCE))
        guidance = given.flatten() if given is not None else torch.full((b,), train_guidance)
        guidance = guidance.to(ctx.device, torch.float32)
    pred = transformer(
        hidden_states=pack_latents(noisy).to(ctx.dtype),
        timestep=values["timestep"].to(ctx.dtype) / 1000,
        guidance=guidance,
        pooled_projections=values["pooled_prompt_embeds"].to(ctx.dtype),
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3, device=ctx.device, dtype=ctx.dtype),
        img_ids=image_ids(h // 2, w // 2, ctx.device, ctx.dtype),
        return_dict=False,
    )[0]
    return {"model_pred": unpack_latents(pred, h, w)}


class FluxAdapter(AdapterBase):
    """The FLUX.1 family (`FluxPipeline` folders: dev, schnell and fine-tunes)."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    #: train.compile=auto compiles the transformer's blocks: full-size FLUX.1-dev LoRA at 1024^2 on an
    #: H200 stepped 1.35x faster (docs/benchmarks.md); cuDNN attention failed in its backward there
    compile_blocks = True
    sampling = SAMPLING
    base_model_aliases = {"dit": "transformer", "transformer": "transformer"}
    image_multiple = 16  # VAE /8, then 2x2 patches
    patch_size = 2  # 2x2 latent patches per token
    default_lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.net.2",
        "ff_context.net.2",
        "proj_mlp",
        "proj_out",
    )
    tasks = ("sft", "direct_distill")
    media = "image"

    def family_units(self) -> list[Unit]:
        return [
            Unit(
                "encode_prompt",
                ("prompt",),
                ("prompt_embeds", "pooled_prompt_embeds"),
                encode_prompt,
                components=("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
                doc="CLIP pooled output + T5 last hidden state (512 tokens)",
            ),
            Unit(
                "encode_image",
                ("image",),
                ("image_latents",),
                encode_image,
                components=("vae",),
                doc="VAE posterior mode, shifted and scaled",
            ),
            Unit(
                "denoise",
                ("noisy_latents", "timestep", "prompt_embeds", "pooled_prompt_embeds"),
                ("model_pred",),
                denoise,
                components=("transformer",),
                doc="transformer velocity prediction on 2x2-packed latents",
            ),
        ]

    def value_layouts(self) -> dict[str, ValueLayout]:
        return {}

    def lora_naming(self, fmt: str, *, denoiser_config: Mapping[str, Any] | None = None) -> LoraNaming:
        """kohya, which is also what ComfyUI reads: Black Forest Labs' names (`LORA_NAMES`), fused
        q/k/v; CLIP's LoRA as `lora_te1_`. The T5 encoder's LoRA is a PEFT folder, in neither."""
        if fmt not in ("kohya", "comfyui"):
            return super().lora_naming(fmt)
        return LoraNaming(
            style="kohya",
            prefixes=LORA_PREFIXES,
            to_native=_native_name,
            to_diffusers=_diffusers_names,
            split_rows=_split_rows,
            words=LORA_WORDS,
        )

    def load_component(self, root: Path, name: str, *, device: torch.device, dtype: torch.dtype) -> Any:
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            FluxTransformer2DModel,
        )
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        if name in ("tokenizer", "tokenizer_2"):
            return AutoTokenizer.from_pretrained(root / name)
        if name == "scheduler":
            return FlowMatchEulerDiscreteScheduler.from_pretrained(root / name)
        classes = {
            "transformer": FluxTransformer2DModel,
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel,
            "text_encoder_2": T5EncoderModel,
        }
        return classes[name].from_pretrained(root / name, torch_dtype=dtype).to(device)

    # two kinds of repeated blocks (num_layers, num_single_layers): not extrapolated, traced in full
    #: the repeated blocks' ModuleLists, in execution order (block swapping): double, then single blocks
    block_lists = MappingProxyType({"transformer": ("transformer_blocks", "single_transformer_blocks")})
    full_size_scheduler = FULL_SIZE_SCHEDULER
    full_size_components = FULL_SIZE_COMPONENTS

    def write_tiny(self, root: Path, *, seed: int) -> None:
        """Write a tiny random-init dev-style FLUX pipeline (guidance embedding on) to `root`."""
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            FluxPipeline,
            FluxTransformer2DModel,
        )
        from transformers import T5Config, T5EncoderModel

        tokenizer, tokenizer_2 = tiny.clip_tokenizer(), tiny.t5_tokenizer(T5_TOKENS)
        torch.manual_seed(seed)
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(FULL_SIZE_SCHEDULER),
            vae=AutoencoderKL(
                block_out_channels=(8, 8, 8, 8),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                norm_num_groups=4,
                layers_per_block=1,
                use_quant_conv=False,
                use_post_quant_conv=False,
                shift_factor=0.1159,
                scaling_factor=0.3611,
            ),
            text_encoder=tiny.clip_text_encoder(tokenizer),
            tokenizer=tokenizer,
            text_encoder_2=T5EncoderModel(T5Config(**tiny.t5_config(tokenizer_2))),
            tokenizer_2=tokenizer_2,
            transformer=FluxTransformer2DModel(
                patch_size=1,
                in_channels=16,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),
            ),
        )
        pipe.save_pretrained(root)  # type: ignore[attr-defined]  # (a DiffusionPipeline method)
