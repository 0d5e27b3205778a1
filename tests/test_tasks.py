"""Tasks: where the planner puts each task's noise, and that direct distillation's student rollout
is the diffusers pipeline's own sampler started from the noise the sample's seed determines."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from autosplit.adapters.base import get_adapter
from autosplit.adapters.builtin import builtin_distill_root
from autosplit.cli import main
from autosplit.graph import UnitContext
from autosplit.planning.planner import make_plan
from autosplit.storage.cache import CacheReader
from autosplit.tasks import build_graph, initial_noise, make_rollout, sample_noise


def plan_of(task: str):
    adapter = get_adapter("qwen_image")
    return make_plan(
        build_graph(adapter, task),
        pipeline="qwen_image",
        task=task,
        trainable=("transformer",),
        layouts=adapter.value_layouts(),
    )


def test_sft_noise_is_drawn_every_step_and_distill_noise_is_cached():
    sft, distill = plan_of("sft"), plan_of("direct_distill")
    assert "sample_noise" in sft.stage_units(2) and "noise" not in [v.name for v in sft.cached]
    assert distill.stage_units(1) == [
        "load_image",
        "encode_prompt",
        "encode_image",
        "initial_noise",
        "distill_settings",
    ]
    assert distill.stage_units(2) == ["rollout", "distill_loss"]
    assert {v.name for v in distill.cached} == {
        "prompt_embeds",
        "prompt_embeds_mask",
        "image_latents",
        "initial_noise",
        "num_steps",
        "guidance_scale",
    }
    assert distill.components(2) == ["transformer", "scheduler"]


def test_initial_noise_ignores_the_step_generator_and_the_global_rng():
    values = {"image_latents": torch.zeros(2, 16, 4, 6), "seed": ["5", 6], "rand_device": ["cpu", "cpu"]}
    outs = []
    for step_seed in (0, 1):
        torch.manual_seed(100 + step_seed)
        ctx = UnitContext({}, torch.device("cpu"), torch.float32, generator=torch.Generator().manual_seed(step_seed))
        outs.append(initial_noise(values, ctx)["initial_noise"])
        assert not torch.equal(
            *[
                sample_noise(
                    values,
                    UnitContext({}, torch.device("cpu"), torch.float32, generator=torch.Generator().manual_seed(s)),
                )["noise"]
                for s in (0, 1)
            ]
        )
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][1], torch.randn(16, 4, 6, generator=torch.Generator().manual_seed(6)))


def test_cached_initial_noise_is_randn_under_each_samples_seed(tmp_path, tiny_model):
    cache = tmp_path / "cache"
    assert main(["run", "--task", "direct_distill:data_process", "--output_path", str(cache), "--device", "cpu"]) == 0
    reader = CacheReader(cache)
    rows = list(csv.DictReader((builtin_distill_root(get_adapter("qwen_image"), tiny_model) / "metadata.csv").open()))
    assert len(rows) == len(reader) == 4
    for i, row in enumerate(rows):
        sample = reader.read(i)
        shape = tuple(sample["image_latents"].shape)
        expected = torch.randn(shape, generator=torch.Generator(row["rand_device"]).manual_seed(int(row["seed"])))
        assert torch.equal(sample["initial_noise"], expected), i
        assert sample["num_steps"].tolist() == [int(row["num_inference_steps"])]


@pytest.mark.parametrize("steps", [2, 3])
def test_rollout_is_the_pipelines_sampler(tiny_model, steps):
    from diffusers import QwenImagePipeline

    from autosplit.adapters.qwen_image import encode_prompt, template_prefix_len, unpack_latents

    pipe = QwenImagePipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    pipe.prompt_template_encode_start_idx = template_prefix_len(pipe.tokenizer)
    ctx = UnitContext(
        {
            "tokenizer": pipe.tokenizer,
            "text_encoder": pipe.text_encoder,
            "transformer": pipe.transformer,
            "scheduler": pipe.scheduler,
        },
        torch.device("cpu"),
        torch.float32,
    )
    values = encode_prompt({"prompt": ["a red circle"]}, ctx)
    values.update(image_latents=torch.zeros(1, 16, 8, 8), seed=[3], rand_device=["cpu"])
    values.update(initial_noise(values, ctx), num_steps=torch.tensor([[steps]]), guidance_scale=torch.ones(1, 1))
    rollout = make_rollout(next(u for u in get_adapter("qwen_image").family_units() if u.name == "denoise"))
    with torch.no_grad():
        ours = rollout(values, ctx)["final_latents"]
        theirs = pipe(
            "a red circle",
            height=64,
            width=64,
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator().manual_seed(3),
        ).images
    torch.testing.assert_close(ours, unpack_latents(theirs, 8, 8), rtol=0, atol=1e-5)
    assert np.isfinite(ours.numpy()).all()


def dropout_values():
    torch.manual_seed(0)
    return {
        "caption.prompt_embeds": torch.randn(4, 5, 3),
        "caption.prompt_embeds_mask": torch.ones(4, 5),
        "empty_caption.prompt_embeds": torch.randn(4, 2, 3),
        "empty_caption.prompt_embeds_mask": torch.ones(4, 2),
        "sample_id": [0, 1, 2, 3],
        "variant": [0, 0, 0, 0],
    }


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_caption_dropout_chooses_the_caption_or_the_empty_prompt_per_sample(p):
    from autosplit.tasks import caption_dropout

    values = dropout_values()
    ctx = UnitContext(
        {}, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(1), settings={"caption_dropout": p}
    )
    out = caption_dropout(values, ctx)
    assert out["prompt_embeds"].shape == (4, 5, 3) and out["prompt_embeds_mask"].shape == (4, 5)
    full = values["caption.prompt_embeds"]
    empty = torch.nn.functional.pad(values["empty_caption.prompt_embeds"], (0, 0, 0, 3))  # zeros past its end
    dropped = [torch.equal(row, e) for row, e in zip(out["prompt_embeds"], empty)]
    assert all(d or torch.equal(row, f) for d, row, f in zip(dropped, out["prompt_embeds"], full))
    masks = [int(m.sum()) for m in out["prompt_embeds_mask"]]
    assert masks == [2 if d else 5 for d in dropped]  # the mask follows the embeddings
    assert sum(dropped) == {0.0: 0, 1.0: 4}.get(p, sum(dropped))
    if p == 0.5:
        assert 0 < sum(dropped) < 4  # seed 1 drops some samples, not all


def test_caption_dropout_keeps_the_text_encoder_out_of_stage2_and_caches_variants():
    adapter = get_adapter("qwen_image")
    from autosplit.tasks import graph_layouts

    for variants, stage in ((0, 2), (2, 1)):
        graph = build_graph(adapter, "sft", caption_dropout_p=0.1, variants=variants)
        plan = make_plan(
            graph, pipeline="qwen_image", task="sft", trainable=("transformer",), layouts=graph_layouts(adapter)
        )
        placed = {u.name: u.stage for u in plan.units}
        assert placed["encode_prompt"] == placed["encode_empty_prompt"] == 1
        assert placed["caption_dropout"] == stage
        assert "text_encoder" not in plan.components(2)
        cached = {v.name for v in plan.cached}
        if stage == 2:
            assert {"caption.prompt_embeds", "empty_caption.prompt_embeds", "sample_id", "variant"} <= cached
            assert plan.cached_value("caption.prompt_embeds").ragged_axis == 0
        else:
            assert "prompt_embeds" in cached and "caption.prompt_embeds" not in cached
