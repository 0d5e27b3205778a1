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


def _sdxl_copy(tmp_path, edit_file: str, change: dict):
    """The tiny SDXL folder with one config file changed."""
    import json
    import shutil

    from autosplit.adapters.builtin import builtin_model_root

    root = tmp_path / "sdxl"
    shutil.copytree(builtin_model_root(get_adapter("sdxl")), root)
    path = root / edit_file
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return root


def test_sdxl_vae_runs_in_float32_when_its_config_says_force_upcast(tmp_path, autosplit_home):
    from autosplit.adapters.builtin import builtin_model_root

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    sdxl, sd = get_adapter("sdxl"), get_adapter("sd")
    root = builtin_model_root(sdxl)
    vae = sdxl.load_component(root, "vae", device=cpu, dtype=bf16)
    assert vae.config.force_upcast and vae.dtype == torch.float32  # as StableDiffusionXLPipeline upcasts it
    assert sd.load_component(builtin_model_root(sd), "vae", device=cpu, dtype=bf16).dtype == bf16  # SD 1.5: no
    kept = _sdxl_copy(tmp_path, "vae/config.json", {"force_upcast": False})
    assert sdxl.load_component(kept, "vae", device=cpu, dtype=bf16).dtype == bf16
    assert sdxl.component_from_config(root, "vae").dtype == torch.float32  # fake profiles plan it so
    from autosplit.adapters.sd import encode_image

    ctx = UnitContext({"vae": vae}, cpu, bf16)
    latents = encode_image({"image": torch.rand(1, 3, 64, 64) * 2 - 1}, ctx)["image_latents"]
    assert latents.dtype == bf16 and torch.isfinite(latents.float()).all()  # cached in the run's dtype


def test_a_playground_style_sdxl_folder_is_refused_in_one_line(tmp_path, capsys, autosplit_home):
    from autosplit.cli import main

    vae = _sdxl_copy(tmp_path / "a", "vae/config.json", {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    out = ["--output_path", str(tmp_path / "o"), "--device", "cpu"]
    assert main(["plan", "--pipeline", "sdxl", "--model_paths", str(vae), *out]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"autosplit: error: {vae / 'vae/config.json'} sets latents_mean/latents_std")
    assert line.endswith("use a folder whose VAE has no latents_mean/latents_std (a standard SD or SDXL one)")
    edm = _sdxl_copy(
        tmp_path / "b", "scheduler/scheduler_config.json", {"_class_name": "EDMDPMSolverMultistepScheduler"}
    )
    assert main(["run", "--pipeline", "sdxl", "--model_paths", str(edm), *out]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{edm / 'scheduler/scheduler_config.json'}: _class_name 'EDMDPMSolverMultistepScheduler' is an EDM" in line
    assert "with a DDPM-family scheduler" in line
