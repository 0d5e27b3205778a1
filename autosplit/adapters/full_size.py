"""Published full-size configurations shared by several families, and the builder that turns a
family's `FULL_SIZE_COMPONENTS` table into a weightless module (`autosplit plan --fake` without
`--model_paths`).

Sources: the `config.json` files of the diffusers/transformers folders on the Hugging Face Hub
(openai/clip-vit-large-patch14 text tower as shipped in stable-diffusion-v1-5, FLUX.1-dev and
SDXL's `text_encoder`; laion CLIP ViT-bigG/14 text tower as SDXL's `text_encoder_2`; google/t5-v1_1-xxl
encoder as FLUX.1's `text_encoder_2`; google/umt5-xxl encoder as Wan 2.1's `text_encoder`). The
parameter counts are checked in tests/adapters/test_full_size_configs.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

#: CLIP ViT-L/14 text tower (123 M parameters)
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
#: OpenCLIP ViT-bigG/14 text tower with its projection (695 M parameters), SDXL's second encoder
CLIP_BIGG_TEXT = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1280,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
#: T5 v1.1 XXL, encoder only (4.76 B parameters)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
#: UMT5 XXL, encoder only (5.68 B parameters)
UMT5_XXL = {**T5_XXL, "vocab_size": 256384}
#: the KL autoencoder of Stable Diffusion 1.x (FLUX.1 and SDXL change latent channels, size, scaling)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)


def build(
    table: Mapping[str, tuple[str, str, Mapping[str, Any]]],
    family: str,
    name: str,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Build component `name` from `table` (name -> (library, class, config)), random init in the
    current default dtype, device and mode, `overrides` applied on top of the config."""
    from autosplit.errors import ModelError

    if name not in table:
        raise ModelError(
            f"the {family} family has no full-size configuration of component {name!r}; it has {sorted(table)}"
        )
    library, class_name, config = table[name]
    cls = getattr(importlib.import_module(library), class_name)
    merged = {**config, **dict(overrides or {})}
    if library == "diffusers":
        return cls.from_config(merged)
    return cls._from_config(cls.config_class(**merged))
