"""Wan 2.1 text-to-video: UMT5 text encoder, AutoencoderKLWan, WanTransformer3DModel.

Units follow `diffusers.WanPipeline`: the cleaned prompt's UMT5 states up to its length, zero-
padded to 512 tokens (cached ragged, padded in the denoiser); clips of 4k + 1 frames encoded to
(k + 1) latent frames normalized with the VAE's `latents_mean`/`latents_std`. Clips with other
frame counts form other shape buckets.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from autosplit.adapters import full_size, tiny
from autosplit.adapters.base import AdapterBase, LoraNaming, Sampling, ValueLayout, note_truncation, rename_table
from autosplit.graph import Unit, UnitContext

TEXT_TOKENS = 512  # WanPipeline's max_sequence_length

#: Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json (1.42 B parameters)
FULL_SIZE_TRANSFORMER = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
#: Wan2.1-T2V-1.3B-Diffusers vae/config.json (the Wan 2.1 VAE; latents_mean/std are the class defaults,
#: which are the published values)
FULL_SIZE_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)
#: Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (UniPC with flow sigmas, shift 3)
FULL_SIZE_SCHEDULER = dict(
    _class_name="UniPCMultistepScheduler",
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
)
FULL_SIZE_COMPONENTS = {
    "transformer": ("diffusers", "WanTransformer3DModel", FULL_SIZE_TRANSFORMER),
    "vae": ("diffusers", "AutoencoderKLWan", FULL_SIZE_VAE),
    "text_encoder": ("transformers", "UMT5EncoderModel", full_size.UMT5_XXL),
}


#: diffusers' WanTransformer3DModel module -> Wan 2.1's original name, which ComfyUI
#: (`diffusion_model.blocks.0.self_attn.q.lora_A.weight`) and musubi-tuner (kohya style,
#: `lora_unet_blocks_0_self_attn_q.lora_down.weight`) key LoRAs by
LORA_NAMES = rename_table(
    [
        *(
            (f"blocks.{{i}}.attn{n}.{d}", f"blocks.{{i}}.{attn}.{w}")
            for n, attn in ((1, "self_attn"), (2, "cross_attn"))
            for d, w in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
        ),
        ("blocks.{i}.attn2.add_k_proj", "blocks.{i}.cross_attn.k_img"),
        ("blocks.{i}.attn2.add_v_proj", "blocks.{i}.cross_attn.v_img"),
        ("blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.0"),
        ("blocks.{i}.ffn.net.2", "blocks.{i}.ffn.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("proj_out", "head.head"),
    ]
)
LORA_PREFIXES = {"kohya": "lora_unet_", "comfyui": "diffusion_model."}
LORA_WORDS = frozenset(
    {"self_attn", "cross_attn", "k_img", "v_img", "time_projection", "text_embedding", "time_embedding"}
)


def _native_name(component: str, path: str) -> tuple[str, int]:
    return LORA_NAMES[0](path)


def _diffusers_names(component: str, path: str) -> tuple[str, ...]:
    return LORA_NAMES[1](path)


def encode_prompt(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    texts = [prompt_clean(p) for p in values["prompt"]]
    note_truncation(
        ctx.components["tokenizer"], texts, max_length=TEXT_TOKENS, label="tokenizer", add_special_tokens=True
    )
    tokens = ctx.components["tokenizer"](
        texts,
        padding="max_length",
        max_length=TEXT_TOKENS,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
    )
    # lengths from the token lists, as Python ints: fake-tensor profiling traces this too
    longest = max(sum(m) for m in tokens.attention_mask)
    input_ids = torch.tensor(tokens.input_ids, device=ctx.device)
    mask = torch.tensor(tokens.attention_mask, device=ctx.device)
    states = ctx.components["text_encoder"](input_ids, mask).last_hidden_state
    embeds = states[:, :longest] * mask[:, :longest, None]  # zeros past each prompt's end
    return {"prompt_embeds": embeds.to(ctx.dtype)}


def encode_video(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    vae = ctx.components["vae"]
    z = vae.encode(values["video"].to(ctx.device, vae.dtype)).latent_dist.mode()
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(shape)
    return {"image_latents": ((z - mean) / std).to(ctx.dtype)}  # B,16,F',h,w


def decode_normalized(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Normalized latents (B,16,F',h,w) -> the decoded clip in [-1, 1] (B,3,F,H,W), the VAE's
    latents_mean/std undone as WanPipeline does (and QwenImagePipeline: the same video VAE)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return vae.decode(latents / inverse_std + mean, return_dict=False)[0]


def decode_image(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """Normalized latents (B,16,F',h,w) -> the first frame of the clip in [-1, 1], as WanPipeline
    decodes them."""
    vae = ctx.components["vae"]
    return {"image": decode_normalized(vae, values["latents"].to(ctx.device, vae.dtype))[:, :, 0]}


def vae_scale_factor(vae_config: Any) -> int:
    return 2 ** len(vae_config["temperal_downsample"])


def latent_shape(vae_config: Any, width: int, height: int) -> tuple[int, ...]:
    """One frame: Wan's clips of 4k + 1 frames have k + 1 latent frames."""
    factor = vae_scale_factor(vae_config)
    return (vae_config["z_dim"], 1, height // factor, width // factor)


#: WanPipeline's sampling: CFG 5 with the negative prompt; validation samples one frame, a still image
SAMPLING = Sampling(decode_image, latent_shape, vae_scale_factor, guidance="cfg", default_guidance=5.0)


def denoise(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    embeds = values["prompt_embeds"].to(ctx.dtype)
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, TEXT_TOKENS - embeds.shape[1]))  # as the pipeline pads
    pred = ctx.components["transformer"](
        hidden_states=values["noisy_latents"].to(ctx.dtype),
        timestep=values["timestep"],
        encoder_hidden_states=embeds,
        return_dict=False,
    )[0]
    return {"model_pred": pred}


class WanAdapter(AdapterBase):
    """Wan 2.1 text-to-video (`WanPipeline` folders)."""

    name = "wan"
    pipeline_class = "WanPipeline"
    sampling = SAMPLING
    base_model_aliases = {"dit": "transformer", "transformer": "transformer"}
    image_multiple = 16  # VAE /8, then 2x2 patches
    patch_size = 2  # 2x2 latent patches per token
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    tasks = ("sft",)
    media = "video"

    def family_units(self) -> list[Unit]:
        return [
            Unit(
                "encode_prompt",
                ("prompt",),
                ("prompt_embeds",),
                encode_prompt,
                components=("tokenizer", "text_encoder"),
                doc="UMT5 states of the cleaned prompt, up to its length",
            ),
            Unit(
                "encode_video",
                ("video",),
                ("image_latents",),
                encode_video,
                components=("vae",),
                doc="video VAE posterior mode, normalized with latents_mean/std",
            ),
            Unit(
                "denoise",
                ("noisy_latents", "timestep", "prompt_embeds"),
                ("model_pred",),
                denoise,
                components=("transformer",),
                doc="transformer velocity prediction, text zero-padded to 512",
            ),
        ]

    def value_layouts(self) -> dict[str, ValueLayout]:
        return {"prompt_embeds": ValueLayout(ragged_axis=0, max_len=TEXT_TOKENS)}

    def lora_naming(self, fmt: str, *, denoiser_config: Mapping[str, Any] | None = None) -> LoraNaming:
        """comfyui and kohya (musubi-tuner): Wan's original module names (`LORA_NAMES`); the text
        encoder's LoRA is a PEFT folder, in no format's file."""
        if fmt not in LORA_PREFIXES:
            return super().lora_naming(fmt)
        return LoraNaming(
            style=fmt,
            prefixes={"transformer": LORA_PREFIXES[fmt]},
            to_native=_native_name,
            to_diffusers=_diffusers_names,
            words=LORA_WORDS,
        )

    def load_component(self, root: Path, name: str, *, device: torch.device, dtype: torch.dtype) -> Any:
        import diffusers
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        if name == "tokenizer":
            return AutoTokenizer.from_pretrained(root / name)
        if name == "scheduler":  # UniPC (flow sigmas) in Wan's folders; FlowMatchEuler in others
            config = diffusers.FlowMatchEulerDiscreteScheduler.load_config(root / name)
            return getattr(diffusers, config["_class_name"]).from_config(config)
        classes = {"transformer": WanTransformer3DModel, "vae": AutoencoderKLWan, "text_encoder": UMT5EncoderModel}
        return classes[name].from_pretrained(root / name, torch_dtype=dtype).to(device)

    #: blocks that repeat, by component: config key of their count (for profiling by extrapolation)
    repeated_blocks = {"transformer": "num_layers"}
    #: the repeated blocks' ModuleLists, in execution order (block swapping)
    block_lists = MappingProxyType({"transformer": ("blocks",)})
    full_size_scheduler = FULL_SIZE_SCHEDULER
    full_size_components = FULL_SIZE_COMPONENTS

    def write_tiny(self, root: Path, *, seed: int) -> None:
        """Write a tiny random-init Wan 2.1 T2V pipeline (UniPC flow scheduler, shift 3) to `root`."""
        from diffusers import (
            AutoencoderKLWan,
            UniPCMultistepScheduler,
            WanPipeline,
            WanTransformer3DModel,
        )
        from transformers import UMT5Config, UMT5EncoderModel

        tokenizer = tiny.t5_tokenizer(TEXT_TOKENS)
        torch.manual_seed(seed)
        WanPipeline(
            tokenizer=tokenizer,
            text_encoder=UMT5EncoderModel(UMT5Config(**tiny.t5_config(tokenizer))),
            vae=AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
            scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
            transformer=WanTransformer3DModel(
                num_attention_heads=2,
                attention_head_dim=12,
                text_dim=32,
                freq_dim=16,
                ffn_dim=32,
                num_layers=2,
                rope_max_seq_len=32,
            ),
        ).save_pretrained(root)  # type: ignore[attr-defined]  # (a DiffusionPipeline method)
