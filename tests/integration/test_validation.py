"""Validation images during training (issue 13, item 3) on the tiny built-in pipelines, CPU fp32:
stage 2 samples without ever building the text encoder, the images follow the LoRA as it trains,
split and unsplit draw the same pixels, validation leaves the trained weights untouched, the images
are what the family's diffusers pipeline makes from the same LoRA, the plan counts the decoder, and
stale caches and bad settings are one-line errors."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from autosplit.cli import main

CPU = ["--device", "cpu", "--dtype", "float32"]
BASE = [
    *("--num_epochs", "1", "--dataset_repeat", "1", "--lora_rank", "4", "--seed", "5", "--max_steps", "4"),
    *("--learning_rate", "3e-2", *CPU),
]
PROMPTS = ["a red circle", "green stripes"]
VALIDATION = [
    *(arg for p in PROMPTS for arg in ("--validation_prompt", p)),
    *("--validation_steps", "2", "--set", "train.validation_num_inference_steps=4"),
]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def samples_of(output: Path) -> dict[str, np.ndarray]:
    return {f"{p.parent.name}/{p.name}": pixels(p) for p in sorted((output / "samples").glob("step-*/*.png"))}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "lora.safetensors"), load_file(b / "lora.safetensors")
    return sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model, tiny_dataset) -> list[str]:
    """The built-in dataset's first 4 samples (96x64 first, then 64x64): a quick stage 1."""
    import shutil

    root = tmp_path_factory.mktemp("dataset")
    rows = (tiny_dataset / "metadata.csv").read_text().splitlines()[:5]
    for row in rows[1:]:
        shutil.copy(tiny_dataset / row.split(",")[0], root)
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return ["--dataset_base_path", str(root)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, dataset) -> Path:
    path = tmp_path_factory.mktemp("validation") / "cache"
    args = ["run", "--task", "sft:data_process", "--output_path", str(path), *dataset, *BASE, *VALIDATION]
    assert main(args) == 0
    return path


def train(cache: Path, out: Path, *extra: str) -> int:
    return main(["run", "--task", "sft:train", "--dataset_base_path", str(cache), "--output_path", str(out), *extra])


@pytest.fixture(scope="module")
def split(cache, tmp_path_factory) -> Path:
    """Stage 2 with validation images, the text encoder's constructor patched to raise."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    def refuse(self, *args, **kwargs):
        raise AssertionError("stage 2 built the text encoder")

    out = tmp_path_factory.mktemp("split") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Qwen2_5_VLForConditionalGeneration, "__init__", refuse)
        assert train(cache, out, *BASE, *VALIDATION, "--report_to", "tensorboard") == 0
    return out


def test_stage2_samples_without_building_the_text_encoder(cache, split):
    from safetensors import safe_open
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with safe_open(str(cache / "validation.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["prompts"]) == PROMPTS and meta["pipeline"] == "qwen_image"
    assert set(json.loads(meta["components"])) == {"tokenizer", "text_encoder"}
    images = samples_of(split)
    assert sorted(images) == ["step-2/00.png", "step-2/01.png", "step-4/00.png", "step-4/01.png"]
    assert {a.shape for a in images.values()} == {(64, 96, 3)}  # the first sample's training size (W 96, H 64)
    board = EventAccumulator(str(next((split / "logs/autosplit").glob("events.out.tfevents.*"))))
    board.Reload()
    logged = board.Images("validation")
    assert [i.step for i in logged] == [2, 4] and (logged[0].width, logged[0].height) == (2 * 96, 64)
    tiled = np.asarray(Image.open(io.BytesIO(logged[-1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(tiled[:, :96], images["step-4/00.png"])


def test_the_images_change_as_the_lora_trains(split):
    images = samples_of(split)
    for i in ("00", "01"):
        first, last = images[f"step-2/{i}.png"].astype(int), images[f"step-4/{i}.png"].astype(int)
        assert np.abs(first - last).max() > 4, i


def test_the_same_seed_gives_the_same_pixels_split_and_unsplit(dataset, split, tmp_path):
    unsplit = tmp_path / "unsplit"
    assert main(["run", "--no-split", "--output_path", str(unsplit), *dataset, *BASE, *VALIDATION]) == 0
    a, b = samples_of(split), samples_of(unsplit)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert same_weights(split, unsplit)


def test_validation_leaves_the_trained_weights_as_they_are(cache, split, tmp_path):
    plain = tmp_path / "plain"
    assert train(cache, plain, *BASE) == 0
    assert not (plain / "samples").exists()
    assert same_weights(split, plain) and losses(split) == losses(plain)


def test_the_images_are_what_qwen_image_pipeline_makes_with_the_lora(cache, split):
    from diffusers import QwenImagePipeline

    from autosplit.adapters.builtin import builtin_model_root
    from autosplit.adapters.qwen_image import QwenImageAdapter

    pipe = QwenImagePipeline.from_pretrained(builtin_model_root(QwenImageAdapter()))
    pipe.load_lora_weights(split, weight_name="lora.safetensors")
    pipe.set_progress_bar_config(disable=True)
    encoded = load_file(
        cache / "validation.safetensors"
    )  # the pipeline's fixed 34-token template cut fits only Qwen's tokenizer

    def row(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(encoded["prompt_embeds_mask"][i].sum())
        return encoded["prompt_embeds"][i : i + 1, :n], encoded["prompt_embeds_mask"][i : i + 1, :n]

    (negative, negative_mask) = row(len(PROMPTS))
    for i in range(len(PROMPTS)):
        embeds, mask = row(i)
        image = pipe(
            prompt_embeds=embeds,
            prompt_embeds_mask=mask,
            negative_prompt_embeds=negative,
            negative_prompt_embeds_mask=negative_mask,
            true_cfg_scale=4.0,
            num_inference_steps=4,
            width=96,
            height=64,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        ours = pixels(split / f"samples/step-4/{i:02d}.png").astype(int)
        assert np.abs(np.asarray(image).astype(int) - ours).max() <= 1  # float rounding, no more


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_flux_and_sd_images_are_what_their_pipelines_make(family, dataset, tmp_path):
    """FLUX.1-dev: guidance through its embedding, no negative prompt; SD: CFG 7.5 with Euler."""
    import diffusers

    from autosplit.adapters.base import get_adapter
    from autosplit.adapters.builtin import builtin_model_root

    out = tmp_path / family
    size = ["--set", "train.validation_width=64", "--set", "train.validation_height=64"]
    assert main(["run", "--pipeline", family, "--output_path", str(out), *dataset, *BASE, *VALIDATION, *size]) == 0
    adapter = get_adapter(family)
    pipe = getattr(diffusers, adapter.pipeline_class).from_pretrained(builtin_model_root(adapter))
    pipe.load_lora_weights(out, weight_name="lora.safetensors")
    pipe.set_progress_bar_config(disable=True)
    encoded = load_file(out / "cache/validation.safetensors")
    if family == "sd":
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        kwargs = {"guidance_scale": 7.5, "negative_prompt_embeds": encoded["prompt_embeds"][-1:]}
    else:
        kwargs = {"guidance_scale": 3.5}
    for i in range(len(PROMPTS)):
        conditioning = {f"{k}": v[i : i + 1] for k, v in encoded.items()}
        image = pipe(
            **conditioning,
            **kwargs,
            num_inference_steps=4,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        ours = pixels(out / f"samples/step-4/{i:02d}.png").astype(int)
        assert np.abs(np.asarray(image).astype(int) - ours).max() <= 1


@pytest.mark.parametrize("family", ["sdxl", "wan"])
def test_sdxl_and_wan_sample_their_validation_images(family, dataset, tmp_path):
    out = tmp_path / family
    data = dataset if family != "wan" else []  # Wan trains on the built-in clips
    args = ["run", "--pipeline", family, "--output_path", str(out), *data, *BASE, "--max_steps", "2", *VALIDATION]
    assert main(args) == 0
    images = samples_of(out)
    assert sorted(images) == ["step-2/00.png", "step-2/01.png"]
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.std() > 0 for a in images.values())


def test_a_trained_text_encoder_encodes_the_prompts_in_stage2_every_round(dataset, tmp_path):
    out = tmp_path / "te"
    args = ["run", "--lora_base_model", "dit,text_encoder", "--output_path", str(out), *dataset, *BASE, *VALIDATION]
    assert main(args) == 0
    assert not (out / "cache/validation.safetensors").exists()  # nothing to cache: the encoder trains
    images = samples_of(out)
    assert len(images) == 4 and not np.array_equal(images["step-2/00.png"], images["step-4/00.png"])


def test_a_stale_or_missing_validation_cache_is_refused_with_one_line(cache, tmp_path, capsys):
    import shutil

    capsys.readouterr()
    assert train(cache, tmp_path / "o", *BASE, "--validation_prompt", "a blue square") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "validation.safetensors" in err and "sft:data_process" in err
    assert "made for prompts ['a red circle', 'green stripes'], this run has ['a blue square']" in err
    bare = tmp_path / "bare"  # a cache stage 1 made without validation prompts
    shutil.copytree(cache, bare)
    (bare / "validation.safetensors").unlink()
    assert train(bare, tmp_path / "o", *BASE, *VALIDATION) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "stage 1 encoded none (no such file)" in err
    assert not (tmp_path / "o/lora.safetensors").exists()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--validation_prompt", "x", "--validation_steps", "-1"], "train.validation_steps=-1"),
        (["--validation_steps", "2"], "without a prompt"),
        (["--validation_prompt", "x", "--num_validation_images", "0"], "train.num_validation_images=0"),
        (["--validation_prompt", "x", "--set", "train.validation_decoder_device=gpu"], "auto, cpu, cuda"),
        (["--validation_prompt", "x", "--set", "train.validation_decoder_device=cuda"], "this run is on cpu"),
        (["--validation_prompt", "x", "--set", "train.validation_width=64"], "give both, or neither"),
        (
            ["--validation_prompt", "x", "--set", "train.validation_width=72", "--set", "train.validation_height=64"],
            "multiples of 16",
        ),
        (["--validation_prompts_file", "/nonexistent/prompts.txt"], "cannot read it"),
    ],
)
def test_bad_validation_settings_are_one_line_errors(args, says, tmp_path, capsys, tiny_model, tiny_dataset):
    capsys.readouterr()
    assert main(["run", "--output_path", str(tmp_path / "o"), *CPU, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and says in err, err
    assert not (tmp_path / "o").exists()


def test_a_prompts_file_adds_its_lines(tmp_path):
    from autosplit.config import TrainConfig, validation_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na cat\n\n  a dog  \n", encoding="utf-8")
    train = TrainConfig(validation_prompts=["first"], validation_prompts_file=str(path))
    assert validation_prompts(train) == ["first", "a cat", "a dog"]


def test_the_plan_counts_the_decoder_where_it_runs(tiny_model, tiny_dataset):
    from autosplit.config import load_config
    from autosplit.planning.memory import reserved_bytes
    from autosplit.workflow.profiling import plan_profile
    from autosplit.workflow.session import open_session

    def session_of(*args: str):
        return open_session(
            load_config(toml_path=None, sets=[], flags={"device": "cpu", "dtype": "float32"} | dict(args))
        )

    plain = session_of()
    profile = plan_profile(plain)
    without = plain.plan(profile).predicted
    validating = session_of(("validation_prompt", ["a red circle"]))
    note = validating.validation_note(profile)
    vae = profile.component("vae").frozen_bytes
    assert note["decoder_bytes"] == vae and note["decode_peak_bytes"] > 0
    on_cpu = validating.plan(profile).predicted  # a CPU run decodes on the CPU: recorded, not counted
    assert on_cpu["validation_decoder_device"] == "cpu"
    assert on_cpu["stage2_peak_bytes"] == without["stage2_peak_bytes"]
    held = without["stage2_resident_bytes"] + without["optimizer_bytes"] + without["cached_batch_bytes"]
    assert on_cpu["validation_peak_bytes"] == held + vae + note["decode_peak_bytes"]

    # a GPU run: the decode joins stage 2's peak, and "auto" decodes on the GPU only where the budget allows it
    gpu = dataclasses.replace(validating, device=torch.device("cuda"))
    counted = gpu.plan(profile).predicted
    assert counted["validation_decoder_device"] == "cuda"
    assert counted["stage2_peak_bytes"] == max(without["stage2_peak_bytes"], held + vae + note["decode_peak_bytes"])
    assert counted["stage2_peak_bytes"] > without["stage2_peak_bytes"]
    for budget, device in ((reserved_bytes(without["stage2_peak_bytes"]) + 1024, "cpu"), (1 << 34, "cuda")):
        config = dataclasses.replace(
            validating.config, plan=dataclasses.replace(validating.config.plan, vram_budget_gib=budget / (1 << 30))
        )
        chosen = dataclasses.replace(gpu, config=config).plan(profile).predicted
        assert chosen["validation_decoder_device"] == device
        assert chosen["placement"]["fits"]
    unsplit_without = without["unsplit_peak_bytes"]
    assert counted["unsplit_peak_bytes"] >= unsplit_without
