"""End to end on the built-in tiny Qwen-Image pipeline: split == unsplit, the LoRA loads in
diffusers, stage 2 never builds the stage-1 models, and the seed's manual commands work."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import zarr
from safetensors.torch import load_file

from autosplit.cli import main
from autosplit.storage.cache import cache_status

STEPS = ["--num_epochs", "1", "--dataset_repeat", "2", "--lora_rank", "4", "--seed", "7"]


def run(*args: str) -> int:
    return main(["run", *args])


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    out = tmp_path_factory.mktemp("unsplit")
    assert run("--no-split", "--output_path", str(out), *STEPS) == 0
    return out


@pytest.fixture(scope="module")
def manual_split(tmp_path_factory, tiny_model, tiny_dataset) -> tuple[Path, Path]:
    cache, out = tmp_path_factory.mktemp("cache") / "c", tmp_path_factory.mktemp("split")
    assert run("--task", "sft:data_process", "--output_path", str(cache), *STEPS) == 0
    assert run("--task", "sft:train", "--dataset_base_path", str(cache), "--output_path", str(out), *STEPS) == 0
    return cache, out


def test_manual_split_learns_exactly_what_unsplit_learns(unsplit, manual_split):
    _, split = manual_split
    a, b = load_file(unsplit / "lora.safetensors"), load_file(split / "lora.safetensors")
    assert sorted(a) == sorted(b) and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(unsplit) == losses(split)
    assert len(losses(split)) == 32  # 16 samples x repeat 2, batch 1


def test_training_moves_the_lora(manual_split):
    _, split = manual_split
    weights = load_file(split / "lora.safetensors")
    still_zero = sorted(k for k, w in weights.items() if "lora_B" in k and w.abs().max() == 0)  # B starts at 0
    # only the last block's text-query/text-output path gets no gradient: its text stream is discarded
    assert still_zero == [
        f"transformer.transformer_blocks.1.{m}.lora_B.weight"
        for m in ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.2")
    ]


def test_one_command_split_with_batches_matches_unsplit(tmp_path, tiny_model, tiny_dataset):
    args = [*STEPS, "--batch_size", "3", "--gradient_accumulation_steps", "2"]
    assert run("--output_path", str(tmp_path / "split"), *args) == 0
    assert run("--no-split", "--output_path", str(tmp_path / "unsplit"), *args) == 0
    a, b = load_file(tmp_path / "split/lora.safetensors"), load_file(tmp_path / "unsplit/lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cache_status(tmp_path / "split/cache") == "complete"
    assert not (tmp_path / "unsplit/cache").exists()


def test_second_run_reuses_the_complete_cache(tmp_path, tiny_model, tiny_dataset, caplog):
    assert run("--output_path", str(tmp_path), "--max_steps", "2") == 0
    shard = next((tmp_path / "cache/buckets/0").rglob("c/*/*/*"))
    before = shard.stat().st_mtime_ns
    caplog.clear()
    caplog.set_level(logging.INFO, logger="autosplit")
    assert run("--output_path", str(tmp_path), "--max_steps", "2") == 0
    assert "stage 1 skipped" in caplog.text
    assert shard.stat().st_mtime_ns == before


def test_diffusers_pipeline_loads_the_lora_and_changes_its_output(manual_split, tiny_model):
    from diffusers import QwenImagePipeline

    _, split = manual_split
    pipe = QwenImagePipeline.from_pretrained(tiny_model)

    def generate() -> torch.Tensor:
        return pipe(
            "a red circle",
            height=64,
            width=64,
            num_inference_steps=2,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    before = generate()
    pipe.load_lora_weights(split, weight_name="lora.safetensors")
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if "lora_B" in k}
    saved = load_file(split / "lora.safetensors")
    assert len(loaded) == sum("lora_B" in k for k in saved)
    after = generate()
    assert not torch.equal(before, after)


def test_stage2_never_builds_text_encoder_or_vae(manual_split, tmp_path, monkeypatch):
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLForConditionalGeneration

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"stage 2 built {type(self).__name__}")

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "__init__", refuse)
    monkeypatch.setattr(AutoencoderKLQwenImage, "__init__", refuse)
    cache, _ = manual_split
    assert (
        run(
            "--task",
            "sft:train",
            "--dataset_base_path",
            str(cache),
            "--output_path",
            str(tmp_path / "o"),
            *STEPS,
            "--max_steps",
            "2",
        )
        == 0
    )
    # the guard works: stage 1 does build them
    with pytest.raises(AssertionError, match="stage 2 built"):
        run("--task", "sft:data_process", "--output_path", str(tmp_path / "c2"), *STEPS)


def test_stage2_runs_from_a_model_folder_without_stage1_components(manual_split, tiny_model, tmp_path):
    import shutil

    dit_only = tmp_path / "dit_only"
    shutil.copytree(tiny_model, dit_only, ignore=shutil.ignore_patterns("text_encoder", "vae", "tokenizer"))
    cache, _ = manual_split
    assert (
        run(
            "--task",
            "sft:train",
            "--dataset_base_path",
            str(cache),
            "--model_paths",
            str(dit_only),
            "--output_path",
            str(tmp_path / "o"),
            *STEPS,
            "--max_steps",
            "2",
        )
        == 0
    )


def test_cache_is_plain_zarr_v3(manual_split):
    cache, _ = manual_split
    group = zarr.open_group(str(cache), mode="r")
    assert group.metadata.zarr_format == 3
    manifest = group.attrs["autosplit"]
    assert manifest["complete"] is True and manifest["num_samples"] == 16
    bucket, row = int(group["index/bucket"][0]), int(group["index/row"][0])
    latents = group[f"buckets/{bucket}/image_latents"]
    auto_dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # --dtype auto
    assert latents.attrs["dtype"] == auto_dtype and latents.shape[1] == 16
    length = int(group[f"buckets/{bucket}/prompt_embeds.length"][row])
    embeds = group[f"buckets/{bucket}/prompt_embeds"][row, :length]
    assert embeds.shape == (length, 32) and abs(embeds).sum() > 0
    assert not group[f"buckets/{bucket}/prompt_embeds"][row, length:].any()  # padding is zeros
    assert group.attrs["autosplit"]["plan"]["cached"][0]["name"] == "prompt_embeds"  # the plan is in the manifest
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain zarr sees nothing in the cache it does not know (no stray files)
        assert sorted(zarr.open_group(str(cache), mode="r").group_keys()) == ["buckets", "index"]


def test_bf16_cache_round_trips_bit_exactly(tmp_path, tiny_model, tiny_dataset):
    from autosplit.config import load_config
    from autosplit.storage.cache import CacheReader
    from autosplit.training.stage1 import compute_sample, stage_context
    from autosplit.workflow.profiling import plan_run
    from autosplit.workflow.session import open_session

    cache = tmp_path / "bf16"
    assert run("--task", "sft:data_process", "--dtype", "bfloat16", "--output_path", str(cache)) == 0
    reader = CacheReader(cache)
    assert zarr.open_group(str(cache))["buckets/0/image_latents"].dtype == "uint16"
    session = open_session(load_config(toml_path=None, sets=[], flags={"dtype": "bfloat16"}))
    plan = plan_run(session)
    units, ctx = stage_context(plan, session.graph, models=session.models, unit_settings=session.settings)
    samples = session.samples()
    for i in (0, 5):
        fresh = compute_sample(units, samples[i], ctx, [v.name for v in plan.cached], to_cpu=True)
        stored = reader.read(i)
        for name, value in fresh.items():
            assert stored[name].dtype == value.dtype
            if value.dtype == torch.bfloat16:
                assert torch.equal(stored[name].view(torch.uint16), value.view(torch.uint16)), name
            else:
                assert torch.equal(stored[name], value), name


def test_python_m_autosplit_and_accelerate_launch(tmp_path, tiny_model, tiny_dataset):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    help_text = subprocess.run(
        [sys.executable, "-m", "autosplit", "run", "--help"], capture_output=True, text=True, env=env, check=True
    ).stdout
    for flag in ("--dataset_base_path", "--lora_target_modules", "--use_gradient_checkpointing", "--no-split"):
        assert flag in help_text
    launcher = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [
            str(launcher),
            "launch",
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "autosplit",
            "run",
            "--output_path",
            str(tmp_path),
            "--max_steps",
            "3",
            "--use_gradient_checkpointing",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "lora.safetensors").is_file()
    assert len(losses(tmp_path)) == 3


@pytest.mark.parametrize("mode", ["sample", "frozen_sample"])
def test_vae_posterior_sampling_split_matches_unsplit(tmp_path, tiny_model, tiny_dataset, mode):
    args = [*STEPS, "--max_steps", "6", "--set", f"data.vae_latents={mode}"]
    assert run("--output_path", str(tmp_path / "split"), *args) == 0
    assert run("--no-split", "--output_path", str(tmp_path / "unsplit"), *args) == 0
    a, b = load_file(tmp_path / "split/lora.safetensors"), load_file(tmp_path / "unsplit/lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    cached = [v["name"] for v in json.loads((tmp_path / "split/plan.json").read_text())["cached"]]
    assert ("latent_std" in cached) == (mode == "sample")


def test_cached_augmentation_variants_match_unsplit_and_vary_by_epoch(tmp_path, tiny_model, tiny_dataset):
    from autosplit.storage.cache import CacheReader

    args = [
        "--num_epochs",
        "3",
        "--dataset_repeat",
        "1",
        "--lora_rank",
        "4",
        "--seed",
        "7",
        "--cache_variants",
        "2",
        "--set",
        "data.random_flip=0.5",
    ]
    assert run("--output_path", str(tmp_path / "split"), *args) == 0
    assert run("--no-split", "--output_path", str(tmp_path / "unsplit"), *args) == 0
    a, b = load_file(tmp_path / "split/lora.safetensors"), load_file(tmp_path / "unsplit/lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "split") == losses(tmp_path / "unsplit") and len(losses(tmp_path / "split")) == 48
    plan = json.loads((tmp_path / "split/plan.json").read_text())
    assert [u["name"] for u in plan["units"] if u["stage"] == 1][:2] == ["load_image", "random_flip"]
    reader = CacheReader(tmp_path / "split/cache")
    assert len(reader) == 32  # 16 samples x 2 variants
    flips = [
        not torch.equal(reader.read(2 * i)["image_latents"], reader.read(2 * i + 1)["image_latents"]) for i in range(16)
    ]
    assert 0 < sum(flips) < 16  # some variants flipped, some not (p = 0.5)


def test_a_flip_drawn_every_step_reads_its_sources_from_the_cache_and_matches_unsplit(
    tmp_path, tiny_model, tiny_dataset
):
    args = [*STEPS, "--set", "data.random_flip=0.5"]
    assert run("--output_path", str(tmp_path / "split"), *args) == 0
    assert run("--no-split", "--output_path", str(tmp_path / "unsplit"), *args) == 0
    a, b = load_file(tmp_path / "split/lora.safetensors"), load_file(tmp_path / "unsplit/lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "split") == losses(tmp_path / "unsplit")
    plan = json.loads((tmp_path / "split/plan.json").read_text())
    assert {u["name"]: u["stage"] for u in plan["units"]}["random_flip"] == 2
    sources = [v["name"] for v in plan["cached"] if v["producer"] == "dataset"]
    assert sources == ["sample_id", "variant"]  # the flip reads them in stage 2


def test_caption_dropout_matches_unsplit_and_changes_what_is_learned(tmp_path, tiny_model, tiny_dataset):
    def train(name: str, p: float, *extra: str) -> dict[str, torch.Tensor]:
        assert run("--output_path", str(tmp_path / name), *STEPS, "--set", f"data.caption_dropout={p}", *extra) == 0
        return load_file(tmp_path / name / "lora.safetensors")

    split, unsplit = train("split", 0.5), train("unsplit", 0.5, "--no-split")
    assert all(torch.equal(split[k], unsplit[k]) for k in split)
    assert losses(tmp_path / "split") == losses(tmp_path / "unsplit")
    # p = 1e-9 and p = 1 draw the same numbers (one rand per sample, then the noise): only dropping differs
    never, always = train("never", 1e-9), train("always", 1.0)
    assert not all(torch.equal(never[k], always[k]) for k in never)
    plan = json.loads((tmp_path / "split/plan.json").read_text())
    assert {u["name"]: u["stage"] for u in plan["units"]}["caption_dropout"] == 2
    assert "text_encoder" not in {c for u in plan["units"] if u["stage"] == 2 for c in u["components"]}


def test_variant_choice_is_a_pure_function_of_seed_epoch_and_sample():
    from autosplit.training.trainer import _VariantPicker

    class Epoch:
        epoch = 0

    pick = _VariantPicker(4, seed=7)
    pick.loader = Epoch()
    first = [pick(i) for i in range(50)]
    assert first == [pick(i) for i in range(50)]
    assert all(4 * i <= row < 4 * i + 4 for i, row in enumerate(first))
    Epoch.epoch = 1
    assert [pick(i) for i in range(50)] != first
