"""LoRA on the text encoder as well as the denoiser (`--lora_base_model dit,text_encoder`), end to end
on the tiny Qwen-Image pipeline: text encoding moves to stage 2 with the prompt read from the cache,
image encoding stays cached, split equals unsplit, resume is exact, and the text encoder's LoRA
loads with PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from safetensors.torch import load_file

from autosplit.cli import main

BOTH = [
    "--lora_base_model",
    "dit,text_encoder",
    "--num_epochs",
    "1",
    "--dataset_repeat",
    "1",
    "--lora_rank",
    "4",
    "--seed",
    "5",
]


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


def weights(output: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(output / "lora.safetensors"),
        **{f"te.{k}": v for k, v in load_file(output / "text_encoder_lora/adapter_model.safetensors").items()},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, tiny_dataset) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("te")
    assert main(["run", "--output_path", str(root / "split"), *BOTH]) == 0
    assert main(["run", "--no-split", "--output_path", str(root / "unsplit"), *BOTH]) == 0
    return {"split": root / "split", "unsplit": root / "unsplit", "root": root}


def test_split_equals_unsplit_for_both_loras(runs):
    a, b = weights(runs["split"]), weights(runs["unsplit"])
    assert sorted(a) == sorted(b) and any(k.startswith("te.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(runs["split"]) == losses(runs["unsplit"]) and len(losses(runs["split"])) == 16
    trained = [k for k, w in a.items() if k.startswith("te.") and "lora_B" in k and w.abs().max() > 0]
    assert trained  # the text encoder's LoRA moved


def test_text_encoding_runs_in_stage2_from_the_cached_prompt(runs, tmp_path, monkeypatch):
    plan = json.loads((runs["split"] / "plan.json").read_text())
    stage = {u["name"]: u["stage"] for u in plan["units"]}
    assert stage["encode_prompt"] == 2 and stage["encode_image"] == 1
    assert [v["name"] for v in plan["cached"]] == ["prompt", "image_latents"]
    assert plan["trainable"] == ["transformer", "text_encoder"]

    def refuse(self, *args, **kwargs):
        raise AssertionError("stage 2 built the VAE")

    monkeypatch.setattr(AutoencoderKLQwenImage, "__init__", refuse)
    assert (
        main(
            [
                "run",
                "--task",
                "sft:train",
                "--dataset_base_path",
                str(runs["split"] / "cache"),
                "--output_path",
                str(tmp_path),
                *BOTH,
            ]
        )
        == 0
    )
    assert all(torch.equal(v, weights(runs["split"])[k]) for k, v in weights(tmp_path).items())


def test_resume_is_exact_with_two_trained_components(runs, tmp_path):
    cache = str(runs["split"] / "cache")
    args = [
        "run",
        "--task",
        "sft:train",
        "--dataset_base_path",
        cache,
        "--output_path",
        str(tmp_path),
        *BOTH,
        "--set",
        "train.checkpoint_every=3",
    ]
    assert main([*args, "--max_steps", "7"]) == 0
    assert main([*args, "--resume"]) == 0
    assert losses(tmp_path) == losses(runs["split"])
    assert all(torch.equal(v, weights(runs["split"])[k]) for k, v in weights(tmp_path).items())


def test_the_text_encoder_lora_loads_with_peft(runs, tiny_model):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model / "text_encoder").eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    before = base(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    loaded = PeftModel.from_pretrained(base, runs["split"] / "text_encoder_lora").eval()
    after = loaded(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    saved = load_file(runs["split"] / "text_encoder_lora/adapter_model.safetensors")
    state = loaded.state_dict()
    assert all(torch.equal(state[k.replace(".weight", ".default.weight")], v) for k, v in saved.items())
    assert not torch.allclose(before, after)


def test_a_text_encoder_alone_or_an_unknown_component_is_refused(capsys, tmp_path, tiny_model):
    assert main(["run", "--lora_base_model", "text_encoder", "--output_path", str(tmp_path)]) == 2
    assert "the denoiser is always trained; use dit,text_encoder" in capsys.readouterr().err
    assert main(["run", "--lora_base_model", "dit,vae", "--output_path", str(tmp_path)]) == 2
    assert "--lora_base_model 'dit,vae': ['vae'] is unknown for qwen_image" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_sd_saves_both_loras_in_one_file_that_diffusers_loads(tmp_path, autosplit_home):
    from diffusers import StableDiffusionPipeline

    from autosplit.adapters.builtin import builtin_model_root
    from autosplit.adapters.sd import StableDiffusionAdapter

    assert (
        main(
            [
                "run",
                "--pipeline",
                "sd",
                "--lora_base_model",
                "dit,text_encoder",
                "--max_steps",
                "3",
                "--output_path",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert {k.split(".")[0] for k in load_file(tmp_path / "lora.safetensors")} == {"unet", "text_encoder"}
    assert not (tmp_path / "text_encoder_lora").exists()
    pipe = StableDiffusionPipeline.from_pretrained(builtin_model_root(StableDiffusionAdapter()), safety_checker=None)
    ids = pipe.tokenizer(["a red circle"], return_tensors="pt").input_ids
    before = pipe.text_encoder(ids)[0]
    pipe.load_lora_weights(tmp_path, weight_name="lora.safetensors")
    assert not torch.allclose(before, pipe.text_encoder(ids)[0])


def test_stage1_batches_keep_the_cached_prompt_whole(tmp_path, tiny_model, tiny_dataset):
    from autosplit.storage.cache import CacheReader

    assert (
        main(
            [
                "run",
                "--task",
                "sft:data_process",
                "--output_path",
                str(tmp_path / "c"),
                *BOTH,
                "--set",
                "cache.batch_size=3",
            ]
        )
        == 0
    )
    reader = CacheReader(tmp_path / "c")
    prompts = [bytes(reader.read(i)["prompt"].numpy().tobytes()).decode() for i in range(len(reader))]
    assert all(p.startswith("a ") and " on a " in p for p in prompts)  # whole captions, not token-trimmed
