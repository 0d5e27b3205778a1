"""Qwen-Image: Qwen2.5-VL text encoder, AutoencoderKLQwenImage, QwenImageTransformer2DModel.

Units follow what `diffusers.QwenImagePipeline` does at inference, so a LoRA trained here matches
how the pipeline conditions the transformer: the prompt goes through the pipeline's chat template,
the template's prefix tokens are dropped from the last hidden state, latents are normalized with
the VAE's `latents_mean`/`latents_std` and packed into 2x2 patches.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from autosplit.adapters.base import AdapterBase, LoraNaming, Sampling, ValueLayout, config_only, note_truncation
from autosplit.adapters.wan import decode_normalized, vae_scale_factor
from autosplit.graph import Unit, UnitContext

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: caption tokens the transformer sees: QwenImagePipeline encodes up to tokenizer_max_length (1024)
#: and keeps the first max_sequence_length (512 by default) of the states; the text encoder is
#: causal, so cutting the tokens to 512 before encoding gives those states at half the cost
MAX_PROMPT_TOKENS = 512

#: Qwen2.5-VL-7B-Instruct, the text encoder of Qwen-Image (the DiT and VAE defaults of diffusers'
#: classes are Qwen-Image's full-size configuration already)
FULL_SIZE_TEXT_ENCODER: dict[str, Any] = dict(
    text_config=dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    vision_config=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        fullatt_block_indexes=[7, 15, 23, 31],
        window_size=112,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_chans=3,
        hidden_act="silu",
    ),
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)
FULL_SIZE_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    shift=1.0,
    shift_terminal=0.02,
    use_dynamic_shifting=True,
    time_shift_type="exponential",
)

_TINY_CORPUS = [
    "a photo of a red cube on a blue table",
    "a green sphere beside a yellow cone in soft light",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background",
    "stripes, checkerboard, gradient, circles, noise, sunset, ocean, forest, city at night",
]


#: kohya (musubi-tuner) and ComfyUI key Qwen-Image LoRAs by diffusers' module names: kohya as
#: `lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight`, ComfyUI as
#: `diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight`
LORA_PREFIXES = {"kohya": "lora_unet_", "comfyui": "diffusion_model."}
#: the words of QwenImageTransformer2DModel's Linear module names that hold an underscore
LORA_WORDS = frozenset(
    {
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "img_mlp",
        "txt_mlp",
        "img_mod",
        "txt_mod",
        "img_in",
        "txt_in",
        "proj_out",
        "norm_out",
        "time_text_embed",
        "timestep_embedder",
        "linear_1",
        "linear_2",
    }
)


def _same_name(component: str, path: str) -> tuple[str, int]:
    return path, 0


def _same_names(component: str, path: str) -> tuple[str, ...]:
    return (path,)


def template_prefix_len(tokenizer: Any) -> int:
    """Number of tokens of the chat template before the prompt (34 for the real Qwen tokenizer)."""
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    return len(tokenizer(prefix).input_ids)


def encode_prompt(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    tokenizer, text_encoder = ctx.components["tokenizer"], ctx.components["text_encoder"]
    drop = template_prefix_len(tokenizer)
    texts = [PROMPT_TEMPLATE.format(p) for p in values["prompt"]]
    # token lists, not tensors: lengths stay Python ints, so fake-tensor profiling traces this too
    note_truncation(tokenizer, texts, max_length=MAX_PROMPT_TOKENS + drop, label="tokenizer", template_tokens=drop)
    tokens = tokenizer(texts, max_length=MAX_PROMPT_TOKENS + drop, truncation=True)
    lengths = [len(ids) for ids in tokens.input_ids]
    width = max(lengths)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in tokens.input_ids], device=ctx.device)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=ctx.device)
    hidden = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    per_sample = [h[:n][drop:] for h, n in zip(hidden, lengths)]  # right padding: valid tokens first
    longest = max(e.shape[0] for e in per_sample)
    embeds = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[0])) for e in per_sample])
    embeds_mask = torch.tensor([[1] * (n - drop) + [0] * (longest - n + drop) for n in lengths], device=ctx.device)
    return {"prompt_embeds": embeds.to(ctx.dtype), "prompt_embeds_mask": embeds_mask}


def _posterior(values: Mapping[str, Any], ctx: UnitContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE posterior, in normalized latent space (B,16,h,w)."""
    vae = ctx.components["vae"]
    image = values["image"].to(ctx.device, vae.dtype).unsqueeze(2)  # B,3,1,H,W (video VAE)
    dist = vae.encode(image).latent_dist
    cfg = vae.config
    shift = torch.tensor(cfg.latents_mean, device=dist.mean.device, dtype=dist.mean.dtype).view(1, -1, 1, 1, 1)
    scale = torch.tensor(cfg.latents_std, device=dist.mean.device, dtype=dist.mean.dtype).view(1, -1, 1, 1, 1)
    return ((dist.mean - shift) / scale)[:, :, 0], (dist.std / scale)[:, :, 0]


def encode_image(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    mean, _ = _posterior(values, ctx)  # the posterior mode, deterministic
    return {"image_latents": mean.to(ctx.dtype)}


def encode_image_dist(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    mean, std = _posterior(values, ctx)
    return {"latent_mean": mean.to(ctx.dtype), "latent_std": std.to(ctx.dtype)}


def decode_image(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    """Normalized latents (B,16,h,w) -> images in [-1, 1], as QwenImagePipeline decodes them."""
    vae = ctx.components["vae"]
    latents = values["latents"].to(ctx.device, vae.dtype).unsqueeze(2)  # B,16,1,h,w (video VAE)
    return {"image": decode_normalized(vae, latents)[:, :, 0]}


def latent_shape(vae_config: Any, width: int, height: int) -> tuple[int, ...]:
    factor = vae_scale_factor(vae_config)
    return (vae_config["z_dim"], height // factor, width // factor)


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """QwenImagePipeline's guidance: CFG, then each token's prediction rescaled to the norm of the
    conditional one (norms over the 2x2-packed channels, B,16,h,w in and out)."""
    cond_packed, uncond_packed = pack_latents(cond), pack_latents(uncond)
    combined = uncond_packed + scale * (cond_packed - uncond_packed)
    cond_norm = torch.norm(cond_packed, dim=-1, keepdim=True)
    noise_norm = torch.norm(combined, dim=-1, keepdim=True)
    return unpack_latents(combined * (cond_norm / noise_norm), cond.shape[-2], cond.shape[-1])


#: QwenImagePipeline's sampling: true CFG 4 with the negative prompt, rescaled to the conditional norm
SAMPLING = Sampling(
    decode_image, latent_shape, vae_scale_factor, guidance="cfg", default_guidance=4.0, combine=true_cfg
)


def pack_latents(latents_bchw: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents_bchw.shape
    x = latents_bchw.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = packed.shape
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def denoise(values: Mapping[str, Any], ctx: UnitContext) -> dict[str, Any]:
    transformer = ctx.components["transformer"]
    noisy = values["noisy_latents"]
    b, _, h, w = noisy.shape
    pred = transformer(
        hidden_states=pack_latents(noisy).to(ctx.dtype),
        timestep=values["timestep"].to(ctx.dtype) / 1000,
        encoder_hidden_states=values["prompt_embeds"].to(ctx.dtype),
        encoder_hidden_states_mask=text_mask(values["prompt_embeds_mask"]),
        img_shapes=[[(1, h // 2, w // 2)]] * b,
        return_dict=False,
    )[0]
    return {"model_pred": unpack_latents(pred, h, w)}


def text_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The text mask to give the transformer: None when every token is valid (batch 1, or prompts
    of one length), so the attention processor builds no joint mask and SDPA may take its flash
    kernel (docs/benchmarks.md: 1.04x faster eager, 1.23x compiled on an H200); the mask itself
    when a row is padded. While a dispatch mode traces the unit (profiling, fake or real tensors)
    the mask is kept, so every profile describes the unit as written and its inputs."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if mask is None or mask.is_meta or isinstance(mask, FakeTensor) or _get_current_dispatch_mode() is not None:
        return mask
    return None if bool(mask.all()) else mask


class QwenImageAdapter(AdapterBase):
    """The Qwen-Image family (`QwenImagePipeline` folders)."""

    encode_image_dist = staticmethod(encode_image_dist)
    sampling = SAMPLING

    name = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    base_model_aliases = {"dit": "transformer", "transformer": "transformer"}
    image_multiple = 16  # VAE /8, then 2x2 patches
    patch_size = 2  # 2x2 latent patches per token
    default_lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_out.0",
        "to_add_out",
        "img_mlp.net.2",
        "img_mod.1",
        "txt_mlp.net.2",
        "txt_mod.1",
    )
    tasks = ("sft", "direct_distill")
    media = "image"
    #: train.cudnn_attention=auto turns cuDNN attention on: full-size, 1024^2 on an H200 (torch 2.11)
    #: its gradients were finite and its step 1.25x faster eager, 1.27x compiled (docs/benchmarks.md)
    cudnn_attention = True
    #: train.compile=auto compiles the transformer's blocks: measured 1.43-1.75x (docs/benchmarks.md)
    compile_blocks = True

    def family_units(self) -> list[Unit]:
        return [
            Unit(
                "encode_prompt",
                ("prompt",),
                ("prompt_embeds", "prompt_embeds_mask"),
                encode_prompt,
                components=("tokenizer", "text_encoder"),
                doc="chat template -> Qwen2.5-VL last hidden state, template prefix dropped",
            ),
            Unit(
                "encode_image",
                ("image",),
                ("image_latents",),
                encode_image,
                components=("vae",),
                doc="VAE posterior mode, normalized with latents_mean/std",
            ),
            Unit(
                "denoise",
                ("noisy_latents", "timestep", "prompt_embeds", "prompt_embeds_mask"),
                ("model_pred",),
                denoise,
                components=("transformer",),
                doc="transformer velocity prediction on 2x2-packed latents",
            ),
        ]

    def value_layouts(self) -> dict[str, ValueLayout]:
        text = ValueLayout(ragged_axis=0, max_len=MAX_PROMPT_TOKENS)
        return {"prompt_embeds": text, "prompt_embeds_mask": text}

    def lora_naming(self, fmt: str, *, denoiser_config: Mapping[str, Any] | None = None) -> LoraNaming:
        """kohya (musubi-tuner) and comfyui: diffusers' module names of the transformer, flattened
        with `_` for kohya; the text encoder's LoRA is a PEFT folder, in no format's file."""
        if fmt not in LORA_PREFIXES:
            return super().lora_naming(fmt)
        return LoraNaming(
            style=fmt,
            prefixes={"transformer": LORA_PREFIXES[fmt]},
            to_native=_same_name,
            to_diffusers=_same_names,
            words=LORA_WORDS,
        )

    def load_component(self, root: Path, name: str, *, device: torch.device, dtype: torch.dtype) -> Any:
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImageTransformer2DModel,
        )
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        if name == "tokenizer":
            return AutoTokenizer.from_pretrained(root / "tokenizer")
        if name == "scheduler":
            return FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
        classes = {
            "transformer": QwenImageTransformer2DModel,
            "vae": AutoencoderKLQwenImage,
            "text_encoder": Qwen2_5_VLForConditionalGeneration,
        }
        model = classes[name].from_pretrained(root / name, torch_dtype=dtype)
        return model.to(device)

    #: blocks that repeat, by component: config key of their count (for profiling by extrapolation)
    repeated_blocks = {"transformer": "num_layers"}
    #: the repeated blocks' ModuleLists, in execution order (block swapping)
    block_lists = MappingProxyType({"transformer": ("transformer_blocks",)})

    def component_from_config(
        self, root: Path | None, name: str, *, overrides: Mapping[str, Any] | None = None
    ) -> torch.nn.Module:
        """Build a component from its config alone (random init, default dtype and device).

        `root` None means the full-size Qwen-Image configuration. Call it inside
        `accelerate.init_empty_weights()` for a weightless tree, or inside a FakeTensorMode.
        """
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        if root is not None:
            return config_only(root, name, overrides=overrides)
        if name == "text_encoder":
            return Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**FULL_SIZE_TEXT_ENCODER))
        cls = {"transformer": QwenImageTransformer2DModel, "vae": AutoencoderKLQwenImage}[name]
        return cls.from_config(dict(overrides or {}))

    def write_tiny(self, root: Path, *, seed: int) -> None:
        """Write a tiny random-init Qwen-Image pipeline folder (diffusers layout) to `root`.

        Real classes, real configs shrunk to ~1 M parameters, a byte-level BPE tokenizer trained on
        the spot: nothing is downloaded. The same seed writes the same weights.
        """
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImagePipeline,
            QwenImageTransformer2DModel,
        )
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        tokenizer = _tiny_tokenizer()
        vocab = len(tokenizer)
        pad, eos = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
                bos_token_id=pad,
                eos_token_id=eos,
                pad_token_id=pad,
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=32,
                fullatt_block_indexes=[0],
            ),
            image_token_id=vocab - 1,
            video_token_id=vocab - 1,
            vision_start_token_id=vocab - 1,
            vision_end_token_id=vocab - 1,
        )
        torch.manual_seed(seed)
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FULL_SIZE_SCHEDULER),
            vae=AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
            text_encoder=Qwen2_5_VLForConditionalGeneration(config),
            tokenizer=tokenizer,
            transformer=QwenImageTransformer2DModel(
                patch_size=2,
                in_channels=64,
                out_channels=16,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                axes_dims_rope=(4, 6, 6),
            ),
        )
        pipe.save_pretrained(root)  # type: ignore[attr-defined]  # (a DiffusionPipeline method)


def _tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]  # (a lazy export)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_TINY_CORPUS * 4, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )
