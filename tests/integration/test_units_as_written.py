"""Units written the way DiffSynth-Studio writes its pipeline units, planned per output and trained
through `autosplit.Pipeline` (docs/units.md): an image unit that VAE-encodes the image and passes
the step's noise through, a text unit that also forwards the step's timestep, a unit that rounds
`height`/`width` in place, and a unit that returns nothing when the dataset has no `edit_image`.
The encoded image and the prompt embeddings are cached, the noise is not, stage 2 builds neither
the VAE nor the text encoder, and split training equals unsplit training bit for bit."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel

from autosplit import Pipeline
from autosplit.adapters import tiny
from autosplit.config import CacheConfig, LoraConfig, TrainConfig
from autosplit.data import load_image
from autosplit.errors import CacheError, PlanError
from autosplit.graph import Unit
from autosplit.storage.cache import CacheReader, read_manifest

SOURCES = ("image_path", "prompt", "height", "width", "edit_image", "sample_id")


# --- the units, as DiffSynth-Studio writes them -------------------------------------------------


def round_size(values, ctx):  # rewrites the values it reads
    return {k: [-(-v // 16) * 16 for v in values[k]] for k in ("height", "width")}


def draw_noise(values, ctx):
    shape = (len(values["height"]), 4, values["height"][0] // 8, values["width"][0] // 8)
    return {"noise": torch.randn(shape, generator=ctx.generator)}


def seeded_noise(values, ctx):  # direct distillation: the initial noise is the sample's
    draws = []
    for i, h, w in zip(values["sample_id"], values["height"], values["width"]):
        generator = torch.Generator().manual_seed(1000 + int(i))
        draws.append(torch.randn(4, h // 8, w // 8, generator=generator))
    return {"noise": torch.stack(draws)}


def draw_timestep(values, ctx):
    return {"timestep": torch.rand(values["noise"].shape[0], generator=ctx.generator)}


def input_image(values, ctx):  # encodes the image and passes the noise through as `latents`
    vae = ctx.components["vae"]
    images = torch.stack(
        [load_image(p, (w, h)) for p, h, w in zip(values["image_path"], values["height"], values["width"])]
    )
    latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
    return {"input_latents": latents, "latents": values["noise"]}


def encode_prompt(values, ctx):  # encodes the prompt and forwards the step's timestep
    tokens = ctx.components["tokenizer"](
        values["prompt"], padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    embeddings = ctx.components["text_encoder"](tokens.input_ids).last_hidden_state
    return {"prompt_emb": embeddings, "timestep": values["timestep"]}


def edit_image(values, ctx):  # nothing when the dataset has no edit image
    if values["edit_image"] is None:
        return {}
    images = torch.stack([load_image(p, (64, 64)) for p in values["edit_image"]])
    return {"edit_latents": ctx.components["vae"].encode(images).latent_dist.mode()}


def flow_loss(values, ctx):
    x, noise, t = values["input_latents"], values["latents"], values["timestep"]
    noisy = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    if values["edit_latents"] is not None:
        noisy = noisy + values["edit_latents"]
    pred = ctx.components["unet"](noisy, t * 1000, values["prompt_emb"]).sample
    return {"loss": torch.nn.functional.mse_loss(pred, noise - x)}


def units(noise=draw_noise) -> list[Unit]:
    return [
        Unit("round_size", ("height", "width"), ("height", "width"), round_size),
        Unit("noise", ("height", "width", "sample_id"), ("noise",), noise),
        Unit("timestep", ("noise",), ("timestep",), draw_timestep),
        Unit(
            "input_image",
            ("image_path", "height", "width", "noise"),
            ("input_latents", "latents"),
            input_image,
            ("vae",),
        ),
        Unit(
            "prompt", ("prompt", "timestep"), ("prompt_emb", "timestep"), encode_prompt, ("text_encoder", "tokenizer")
        ),
        Unit("edit_image", ("edit_image",), ("edit_latents",), edit_image, ("vae",), optional=("edit_image",)),
        Unit(
            "loss",
            ("input_latents", "latents", "timestep", "prompt_emb", "edit_latents"),
            ("loss",),
            flow_loss,
            ("unet",),
            optional=("edit_latents",),
        ),
    ]


# --- tiny real models and a dataset -------------------------------------------------------------


def vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )


def text_encoder(tokenizer) -> CLIPTextModel:
    torch.manual_seed(2)
    return tiny.clip_text_encoder(tokenizer)


def unet() -> UNet2DConditionModel:
    torch.manual_seed(3)
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        cross_attention_dim=32,
    )


@functools.cache
def clip_tokenizer():
    return tiny.clip_tokenizer()  # one for the module: BPE training is not bit-stable between calls


def pipeline(*, stage1: bool = True, trainable=("unet",), noise=draw_noise) -> Pipeline:
    """The pipeline with every component (stage1), or with only what stage 2 needs: the unet."""
    tokenizer = clip_tokenizer()
    components = {"unet": unet()}
    if stage1 or "text_encoder" in trainable:
        components.update(text_encoder=text_encoder(tokenizer), tokenizer=tokenizer)
    if stage1:
        components["vae"] = vae()
    return Pipeline(units(noise), SOURCES, components, trainable, lora_targets=("to_q", "to_k", "to_v"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four 60x60 images (rounded up to 64x64 by `round_size`) with height and width columns."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": f"a red cube {i}", "height": 60, "width": 60})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def refuse(name):
    def init(self, *args, **kwargs):
        raise AssertionError(f"stage 2 built the {name}")

    return init


STEPS = TrainConfig(num_epochs=1, seed=3)
LORA = LoraConfig(rank=4)


def test_the_plan_caches_per_output_and_stage2_builds_neither_encoder(dataset, tmp_path, monkeypatch):
    pipe = pipeline()
    samples = pipe.read_dataset(dataset, max_pixels=64 * 64)
    plan = pipe.plan(pipe.profile(samples, lora=LORA))
    by_name = {u.name: u for u in plan.units}

    image = by_name["input_image"]
    assert (image.stage, image.replays, image.replay_late, image.stand_ins) == (1, ("latents",), ("noise",), ("noise",))
    assert image.reason.startswith("split: stage 1 caches input_latents and the recorded graph")
    assert "stage 2 replays what it computes from noise (0 ops) without vae; stage 1 runs noise" in image.reason
    text = by_name["prompt"]
    assert (text.stage, text.replays, text.replay_late) == (1, ("timestep.v2",), ("timestep",))
    assert text.stand_ins == ("noise", "timestep")
    # the rewrite: both versions are in the plan, and the new one is what stage 2 reads
    assert by_name["round_size"].stage == 1 and pipe.graph.versions == {
        "height": ("height", "height.v2"),
        "width": ("width", "width.v2"),
        "timestep": ("timestep", "timestep.v2"),
    }
    cached = {v.name: v for v in plan.cached}
    assert {"input_latents", "prompt_emb", "height.v2", "width.v2"} <= set(cached)
    assert cached["height.v2"].kind == "int" and cached["input_latents"].kind == "tensor"
    assert not {"noise", "latents", "timestep", "timestep.v2", "edit_latents"} & set(cached)
    assert plan.absent == ("edit_latents",)
    assert by_name["noise"].stage == 2 and by_name["timestep"].stage == 2
    assert plan.components(2) == ["unet"]
    assert plan.components(1) == ["vae", "text_encoder", "tokenizer"]

    cache = tmp_path / "cache"
    pipe.cache(plan, samples, cache)
    reader = CacheReader(cache)
    first = reader.read(0)
    assert first["height.v2"].item() == 64 and first["input_latents"].shape == (4, 8, 8)

    with monkeypatch.context() as patch:
        patch.setattr(AutoencoderKL, "__init__", refuse("VAE"))
        patch.setattr(CLIPTextModel, "__init__", refuse("text encoder"))
        trainer = pipeline(stage1=False)
        result = trainer.train(plan, tmp_path / "split", cache=cache, train=STEPS, lora=LORA)
    assert result.steps == 4 and all(np.isfinite(result.losses))


def test_split_equals_unsplit_bit_for_bit(dataset, tmp_path):
    pipe = pipeline()
    samples = pipe.read_dataset(dataset, max_pixels=64 * 64)
    profile = pipe.profile(samples, lora=LORA)
    plan = pipe.plan(profile)
    pipe.cache(plan, samples, tmp_path / "cache")
    split = pipeline(stage1=False).train(plan, tmp_path / "split", cache=tmp_path / "cache", train=STEPS, lora=LORA)
    unsplit = pipeline().train(
        pipe.plan(profile, split=False), tmp_path / "unsplit", samples=samples, train=STEPS, lora=LORA
    )
    assert split.losses == unsplit.losses and len(split.losses) == 4
    a, b = (
        load_file(tmp_path / "split" / "unet_lora" / "adapter_model.safetensors"),
        load_file(tmp_path / "unsplit" / "unet_lora" / "adapter_model.safetensors"),
    )
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_with_a_text_encoder_lora_text_encoding_moves_to_stage2_and_the_vae_does_not(dataset, tmp_path):
    pipe = pipeline(trainable=("unet", "text_encoder"))
    samples = pipe.read_dataset(dataset, max_pixels=64 * 64)
    plan = pipe.plan(pipe.profile(samples, lora=LORA))
    by_name = {u.name: u for u in plan.units}
    assert by_name["prompt"].stage == 2 and by_name["prompt"].reason.startswith("stage 2: uses trainable text_encoder")
    assert by_name["input_image"].stage == 1 and by_name["input_image"].replays == ("latents",)
    assert "vae" not in plan.components(2) and "text_encoder" in plan.components(2)
    assert "prompt" in {v.name for v in plan.cached}  # the caption, for stage 2's text encoder
    pipe.cache(plan, samples, tmp_path / "cache")
    result = pipeline(stage1=False, trainable=("unet", "text_encoder")).train(
        plan, tmp_path / "out", cache=tmp_path / "cache", train=STEPS, lora=LORA
    )
    assert result.steps == 4


def test_direct_distillation_with_a_per_sample_seed_caches_the_noise(dataset, tmp_path):
    pipe = pipeline(noise=seeded_noise)
    samples = pipe.read_dataset(dataset, max_pixels=64 * 64)
    plan = pipe.plan(pipe.profile(samples, lora=LORA))
    by_name = {u.name: u for u in plan.units}
    assert by_name["noise"].stage == 1 and by_name["input_image"].stage == 1 and not by_name["input_image"].replays
    cached = {v.name for v in plan.cached}
    assert {"noise", "latents", "input_latents"} <= cached  # the seeded noise, and what passes it through


def test_a_value_the_cache_cannot_hold_is_an_error_at_plan_time(dataset):
    def pil_image(values, ctx):
        return {"pixels": [Image.open(p) for p in values["image_path"]]}

    def loss(values, ctx):
        return {"loss": ctx.components["unet"].conv_in.weight.sum() * len(values["pixels"])}

    tokenizer = clip_tokenizer()
    pipe = Pipeline(
        [
            Unit("open_image", ("image_path",), ("pixels",), pil_image),
            Unit("loss", ("pixels", "noise"), ("loss",), loss, ("unet",)),
            Unit("noise", ("image_path",), ("noise",), lambda v, c: {"noise": torch.randn(1, generator=c.generator)}),
        ],
        ("image_path",),
        {"unet": unet(), "tokenizer": tokenizer},
        ("unet",),
    )
    samples = pipe.read_dataset(dataset, max_pixels=64 * 64)
    with pytest.raises(PlanError) as caught:
        pipe.plan(pipe.profile(samples))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("value 'pixels' (from unit 'open_image') would be cached, but it is a PIL.PngImagePlugin")
    assert "return a tensor from 'open_image'" in message


def test_an_optional_column_some_samples_lack_stops_stage1_naming_the_sample(tmp_path):
    """Profiled on a sample without `edit_image`, the plan has `edit_latents` absent; a later sample
    with one is a one-line error, and the cache is not marked complete."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": "a cube", "height": 64, "width": 64})
    rows[2]["edit_image"] = str(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe = pipeline()
    samples = pipe.read_dataset(tmp_path, max_pixels=64 * 64, allow_outside_paths=True)
    plan = pipe.plan(pipe.profile(samples, lora=LORA))
    assert plan.absent == ("edit_latents",)
    with pytest.raises(CacheError) as caught:
        pipe.cache(plan, samples, tmp_path / "cache", cache=CacheConfig(shard_size=1))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("value 'edit_latents' is there for sample 2 (")
    assert "it was absent (None) when the plan was made" in message
    assert read_manifest(tmp_path / "cache")["complete"] is False
