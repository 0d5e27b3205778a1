"""Stable Diffusion 1.5 (epsilon) and SDXL (v-prediction) keep the adapter contract."""

from __future__ import annotations

import torch

from autosplit.adapters.base import get_adapter
from autosplit.graph import UnitContext
from autosplit.tasks import add_noise, objective
from tests.adapters.contract import AdapterContract, Tester

CLIP = "transformers:CLIPTextModel"


class TestStableDiffusion(AdapterContract):
    tester = Tester(
        pipeline="sd",
        frozen_classes=(CLIP, "diffusers:AutoencoderKL"),
        generate=dict(height=64, width=64, num_inference_steps=2),
    )


class TestStableDiffusionXL(AdapterContract):
    tester = Tester(
        pipeline="sdxl",
        frozen_classes=(CLIP, "transformers:CLIPTextModelWithProjection", "diffusers:AutoencoderKL"),
        generate=dict(height=64, width=64, num_inference_steps=2),
    )


def test_objective_comes_from_the_scheduler_config(tmp_path):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    assert objective(FlowMatchEulerDiscreteScheduler()) == "flow"
    assert objective(DDPMScheduler()) == "epsilon"
    v = DDPMScheduler(prediction_type="v_prediction")
    assert objective(v) == "v_prediction"
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    out = add_noise(
        {"image_latents": latents, "noise": noise, "sigma": None, "timestep": t},
        UnitContext({"scheduler": v}, torch.device("cpu"), torch.float32),
    )
    a = v.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - v.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(out["noisy_latents"], a * latents + s * noise)
    torch.testing.assert_close(out["target"], a * noise - s * latents)


def test_sdxl_plan_caches_pooled_embeddings_and_time_ids():
    from autosplit.planning.planner import make_plan
    from autosplit.tasks import build_graph

    adapter = get_adapter("sdxl")
    plan = make_plan(build_graph(adapter, "sft"), pipeline="sdxl", task="sft", trainable=("unet",))
    assert {v.name for v in plan.cached} == {"add_time_ids", "prompt_embeds", "pooled_prompt_embeds", "image_latents"}
    assert plan.components(2) == ["scheduler", "unet"]
