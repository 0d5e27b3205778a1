"""The Qwen-Image adapter matches what diffusers' QwenImagePipeline computes at inference."""

from __future__ import annotations

import hashlib

import pytest
import torch

from autosplit.adapters.base import get_adapter, read_model_index
from autosplit.adapters.qwen_image import (
    QwenImageAdapter,
    denoise,
    encode_image,
    encode_prompt,
    pack_latents,
    template_prefix_len,
    text_mask,
    unpack_latents,
)
from autosplit.errors import ConfigError, ModelError
from autosplit.graph import UnitContext
from tests.adapters.contract import AdapterContract, Tester


class TestQwenImage(AdapterContract):
    tester = Tester(
        pipeline="qwen_image",
        frozen_classes=("transformers:Qwen2_5_VLForConditionalGeneration", "diffusers:AutoencoderKLQwenImage"),
        generate=dict(height=64, width=64, num_inference_steps=2),
    )


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(tiny_model)


def ctx_for(pipe) -> UnitContext:
    components = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    return UnitContext(components, torch.device("cpu"), torch.float32)


def test_pack_unpack_match_diffusers_and_invert(pipe):
    x = torch.randn(2, 16, 8, 12)
    packed = pack_latents(x)
    assert torch.equal(packed, pipe._pack_latents(x, 2, 16, 8, 12))
    assert torch.equal(unpack_latents(packed, 8, 12), x)


def test_encode_prompt_matches_the_pipeline(pipe):
    prompts = ["a red circle on a blue background", "stripes"]
    pipe.prompt_template_encode_start_idx = template_prefix_len(pipe.tokenizer)
    expected, expected_mask = pipe._get_qwen_prompt_embeds(prompts, device=torch.device("cpu"))
    out = encode_prompt({"prompt": prompts}, ctx_for(pipe))
    assert torch.equal(out["prompt_embeds"], expected)
    assert torch.equal(out["prompt_embeds_mask"], expected_mask)
    assert out["prompt_embeds_mask"][1].sum() < out["prompt_embeds_mask"][0].sum()  # padded, masked


def test_encode_image_is_the_normalized_posterior_mode(pipe):
    image = torch.rand(1, 3, 64, 96) * 2 - 1
    out = encode_image({"image": image}, ctx_for(pipe))["image_latents"]
    mean = pipe.vae.encode(image.unsqueeze(2)).latent_dist.mean[:, :, 0]
    cfg = pipe.vae.config
    expected = (mean - torch.tensor(cfg.latents_mean).view(1, -1, 1, 1)) / torch.tensor(cfg.latents_std).view(
        1, -1, 1, 1
    )
    assert out.shape == (1, 16, 8, 12)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_tiny_pipeline_is_deterministic(tmp_path, tiny_model):
    QwenImageAdapter().write_tiny(tmp_path / "again", seed=0)
    for part in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
    ):
        digest = [hashlib.sha256((root / part).read_bytes()).hexdigest() for root in (tiny_model, tmp_path / "again")]
        assert digest[0] == digest[1], part


def test_tiny_pipeline_is_small_and_real(pipe):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert isinstance(pipe.transformer, QwenImageTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKLQwenImage)
    assert isinstance(pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 200_000


def test_registry_and_model_index_checks(tiny_model, tmp_path):
    adapter = get_adapter("qwen-image")
    assert adapter.name == "qwen_image"
    with pytest.raises(ConfigError, match="--pipeline 'sd9' is unknown; choose one of"):
        get_adapter("sd9")
    assert read_model_index(tiny_model, adapter=adapter, components=["vae"])["_class_name"] == "QwenImagePipeline"
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelError, match="expected 'QwenImagePipeline'"):
        read_model_index(tmp_path, adapter=adapter, components=[])


def test_prompts_keep_the_512_tokens_qwen_image_pipeline_keeps(pipe):
    """QwenImagePipeline encodes up to 1024 caption tokens and keeps the first 512 states (its
    max_sequence_length default); encode_prompt cuts the tokens to 512 first: the same states, as
    the text encoder is causal."""
    from autosplit.adapters.qwen_image import MAX_PROMPT_TOKENS

    pipe.prompt_template_encode_start_idx = template_prefix_len(pipe.tokenizer)
    prompt = "a photo of a red cube on a blue table, " * 30  # over 512 tokens, under 1024
    assert 512 < len(pipe.tokenizer(prompt).input_ids) < 1024
    theirs, theirs_mask = pipe.encode_prompt(prompt=[prompt], device=torch.device("cpu"), max_sequence_length=512)
    mine = encode_prompt({"prompt": [prompt]}, ctx_for(pipe))
    assert MAX_PROMPT_TOKENS == 512 and mine["prompt_embeds"].shape == theirs.shape == (1, 512, 32)
    torch.testing.assert_close(mine["prompt_embeds"], theirs, rtol=1e-4, atol=1e-5)
    assert mine["prompt_embeds_mask"].all()  # diffusers returns no mask when it is all ones
    assert theirs_mask is None or theirs_mask.all()


def test_an_all_ones_text_mask_is_dropped_so_attention_may_take_flash(pipe):
    """The transformer gets no mask when no token is padded (its processor then builds none and
    SDPA may take the flash kernel); a padded row keeps it, and so does a fake tensor (planning)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    ones = torch.ones(2, 5, dtype=torch.long)
    padded = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert text_mask(ones) is None and text_mask(None) is None
    assert text_mask(padded) is padded
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(ones)
        assert text_mask(fake) is fake
    with TorchDispatchMode():  # a profiler tracing the unit: it sees the unit as written
        assert text_mask(ones) is ones

    transformer = pipe.transformer
    g = torch.Generator().manual_seed(0)
    values = {
        "noisy_latents": torch.randn(2, 16, 4, 4, generator=g),
        "timestep": torch.tensor([500.0, 250.0]),
        "prompt_embeds": torch.randn(2, 5, transformer.config.joint_attention_dim, generator=g),
    }
    ctx = UnitContext({"transformer": transformer}, torch.device("cpu"), torch.float32)
    given = []
    spy = transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: given.append(kwargs["encoder_hidden_states_mask"]), with_kwargs=True
    )
    try:
        dropped = denoise({**values, "prompt_embeds_mask": ones}, ctx)["model_pred"]
        kept = denoise({**values, "prompt_embeds_mask": padded}, ctx)["model_pred"]
    finally:
        spy.remove()
    assert given[0] is None and given[1] is padded
    masked = transformer(  # what the pipeline computes with the mask given
        hidden_states=pack_latents(values["noisy_latents"]),
        timestep=values["timestep"] / 1000,
        encoder_hidden_states=values["prompt_embeds"],
        encoder_hidden_states_mask=ones,
        img_shapes=[[(1, 2, 2)]] * 2,
        return_dict=False,
    )[0]
    assert torch.allclose(dropped, unpack_latents(masked, 4, 4), atol=1e-5, rtol=1e-4)
    # with a padded row the mask is still applied: that row changes, the full one does not
    assert torch.allclose(kept[0], dropped[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(kept[1], dropped[1], atol=1e-4)
