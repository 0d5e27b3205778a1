"""load_config: defaults, the built-in preset, TOML < --set < flags, and error reporting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from autosplit.config import BUILTIN_PRESET, SEED_FLAGS, RunConfig, all_keys, load_config
from autosplit.errors import ConfigError

DATASET = {"dataset_base_path": "/data/pets"}


def load(*, toml: str | None = None, tmp_path: Path | None = None, sets=(), flags=None) -> RunConfig:
    toml_path = None
    if toml is not None:
        toml_path = tmp_path / "run.toml"
        toml_path.write_text(toml)
    return load_config(toml_path=toml_path, sets=list(sets), flags=dict(flags or {}))


def error_of(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return str(info.value)


# --- defaults and the built-in preset ---------------------------------------------------------


def test_defaults_with_a_dataset_are_the_dataclass_defaults():
    config = load(flags=DATASET)
    expected = RunConfig()
    expected.data.base_path = "/data/pets"
    assert config == expected
    assert (config.train.num_epochs, config.data.repeat) == (1, 1)
    assert config.train.learning_rate == 1e-4 and config.lora.rank == 32
    assert config.train.mixed_precision == "no" and config.train.split is True
    assert config.lora.target_modules == ""  # the family's default list


def test_builtin_preset_applies_without_a_dataset():
    config = load()
    assert config.train.num_epochs == 8
    assert config.data.repeat == 8
    expected = RunConfig()
    expected.train.num_epochs, expected.data.repeat = 8, 8
    assert config == expected  # nothing else changes
    assert BUILTIN_PRESET == {"train.num_epochs": 8, "data.repeat": 8}  # not mutated by loading


@pytest.mark.parametrize("how", ["flag", "set", "toml"])
def test_builtin_preset_not_applied_when_a_dataset_is_given(how, tmp_path):
    if how == "flag":
        config = load(flags=DATASET)
    elif how == "set":
        config = load(sets=["data.base_path=/data/pets"])
    else:
        config = load(toml='[data]\nbase_path = "/data/pets"\n', tmp_path=tmp_path)
    assert config.data.base_path == "/data/pets"
    assert (config.train.num_epochs, config.data.repeat) == (1, 1)


def test_explicit_values_override_the_preset(tmp_path):
    assert load(flags={"num_epochs": "2"}).train.num_epochs == 2
    assert load(flags={"num_epochs": "2"}).data.repeat == 8  # the other preset key still applies
    assert load(flags={"dataset_repeat": "3"}).data.repeat == 3
    assert load(sets=["train.num_epochs=5"]).train.num_epochs == 5
    assert load(toml="[data]\nrepeat = 4\n", tmp_path=tmp_path).data.repeat == 4


def test_loading_twice_gives_equal_independent_configs():
    first, second = load(), load()
    assert first == second
    first.train.num_epochs = 99
    assert second.train.num_epochs == 8


# --- TOML < --set < flags ---------------------------------------------------------------------


def test_toml_nested_tables_set_typed_values(tmp_path):
    config = load(
        tmp_path=tmp_path,
        toml="""
output_path = "/runs/a"

[model]
path = "/models/qwen"
dtype = "bfloat16"

[data]
base_path = "/data/pets"
max_pixels = 65536

[train]
learning_rate = 1
batch_size = 2
split = false

[lora]
rank = 4
target_modules = ["to_q", "to_k"]
""",
    )
    assert config.output_path == "/runs/a"
    assert (config.model.path, config.model.dtype) == ("/models/qwen", "bfloat16")
    assert (config.data.base_path, config.data.max_pixels) == ("/data/pets", 65536)
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
    assert config.train.batch_size == 2
    assert config.train.split is False
    assert config.lora.rank == 4
    assert config.lora.target_modules == "to_q,to_k"
    assert config.train.num_epochs == 1  # untouched keys keep their defaults


@pytest.mark.parametrize(
    "use_set, use_flag, expected",
    [
        (False, False, 0.1),
        (True, False, 0.2),
        (False, True, 0.3),
        (True, True, 0.3),
    ],
)
def test_precedence_toml_then_set_then_flags(tmp_path, use_set, use_flag, expected):
    sets = ["train.learning_rate=0.2"] if use_set else []
    flags = {**DATASET, **({"learning_rate": "0.3"} if use_flag else {})}
    config = load(toml="[train]\nlearning_rate = 0.1\nseed = 7\n", tmp_path=tmp_path, sets=sets, flags=flags)
    assert config.train.learning_rate == expected
    assert config.train.seed == 7  # keys not overridden keep the TOML value


def test_later_set_of_the_same_key_wins():
    assert load(sets=["train.seed=1", "train.seed=2"], flags=DATASET).train.seed == 2


def test_set_value_may_contain_equals_signs():
    assert load(sets=["model.path=/m/a=b"], flags=DATASET).model.path == "/m/a=b"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("off", False),
    ],
)
def test_bool_values_from_strings(text, expected):
    assert load(sets=[f"train.split={text}"], flags=DATASET).train.split is expected


def test_string_numbers_are_coerced():
    config = load(sets=["train.learning_rate=5e-5", "lora.rank= 8 ", "lora.alpha=16"], flags=DATASET)
    assert config.train.learning_rate == 5e-5
    assert config.lora.rank == 8
    assert config.lora.alpha == 16.0 and isinstance(config.lora.alpha, float)


# --- errors -----------------------------------------------------------------------------------


def test_unknown_set_key_suggests_the_closest_key():
    message = error_of(sets=["train.learning_rte=1e-3"], flags=DATASET)
    assert message == "--set: unknown key 'train.learning_rte'; did you mean 'train.learning_rate'?"


def test_unknown_toml_key_names_the_file_and_suggests(tmp_path):
    message = error_of(toml="[lora]\nrnak = 4\n", tmp_path=tmp_path, flags=DATASET)
    assert message == f"{tmp_path / 'run.toml'}: unknown key 'lora.rnak'; did you mean 'lora.rank'?"


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    message = error_of(sets=["zzzzzz=1"], flags=DATASET)
    assert message.startswith("--set: unknown key 'zzzzzz'; valid keys: output_path, model.pipeline,")
    assert "train.learning_rate" in message


@pytest.mark.parametrize(
    "item, expected",
    [
        ("train.learning_rate=abc", "--set: train.learning_rate='abc': expected float"),
        ("train.batch_size=2.5", "--set: train.batch_size='2.5': expected int"),
        ("train.split=maybe", "--set: train.split='maybe': expected true or false"),
        ("lora.rank=0", "lora.rank=0 must be at least 1"),
        ("train.mixed_precision=fp8", "train.mixed_precision='fp8' must be no, bf16 or fp16"),
        ("train.learning_rate=-1", "train.learning_rate=-1.0 must be positive"),
        ("data.max_pixels=100", "data.max_pixels=100 must be at least 256"),
        ("model.dtype=float8", "model.dtype='float8' must be auto, float32, bfloat16 or float16"),
        ("cache.zstd_level=23", "cache.zstd_level=23 must be between -7 and 22"),
        ("data.missing_caption=skip", "data.missing_caption='skip' must be error or empty"),
        ("data.buckets=kohya", "data.buckets='kohya' must be none or aspect"),
        ("data.bucket_step=0", "data.bucket_step=0 must be at least 1 (pixels)"),
        (
            "data.bucket_max_aspect=0.5",
            "data.bucket_max_aspect=0.5 must be at least 1 (the widest width:height ratio, e.g. 4 for 1:4 to 4:1)",
        ),
        ("lora.format=a1111", "lora.format='a1111' must be diffusers, kohya or comfyui"),
        ("train.seed", "--set 'train.seed': expected key=value"),
    ],
)
def test_bad_values_are_config_errors_naming_key_and_value(item, expected):
    assert error_of(sets=[item], flags=DATASET) == expected


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('[lora]\nrank = "four"\n', "lora.rank='four': expected int"),
        ("[lora]\nrank = true\n", "lora.rank=True: expected int"),
        ("[lora]\nrank = 4.0\n", "lora.rank=4.0: expected int"),
        ("[train]\nsplit = 1\n", "train.split=1: expected bool"),
    ],
)
def test_wrong_toml_types_are_config_errors(tmp_path, toml, expected):
    assert error_of(toml=toml, tmp_path=tmp_path, flags=DATASET) == f"{tmp_path / 'run.toml'}: {expected}"


def test_bad_flag_value_names_the_flag_origin():
    assert error_of(flags={**DATASET, "lora_rank": "big"}) == "flag: lora.rank='big': expected int"


def test_unreadable_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .*run\.toml: cannot read"):
        load(toml="[train\nseed = 1\n", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"--config .*absent\.toml: cannot read"):
        load_config(toml_path=tmp_path / "absent.toml", sets=[], flags={})


def test_several_parse_problems_are_reported_in_one_error(tmp_path):
    message = error_of(
        toml="[train]\nlearning_rte = 1\n",
        tmp_path=tmp_path,
        sets=["lora.rank=x", "nope"],
        flags={**DATASET, "seed": "s"},
    )
    assert message.split("; ") == [
        f"{tmp_path / 'run.toml'}: unknown key 'train.learning_rte'",
        "did you mean 'train.learning_rate'?",
        "--set 'nope': expected key=value",
        "--set: lora.rank='x': expected int",
        "flag: train.seed='s': expected int",
    ]


def test_several_value_problems_are_reported_in_one_error():
    message = error_of(sets=["lora.rank=0", "train.mixed_precision=fp8", "train.batch_size=0"], flags=DATASET)
    assert message.split("; ") == [
        "train.batch_size=0 must be at least 1",
        "train.mixed_precision='fp8' must be no, bf16 or fp16",
        "lora.rank=0 must be at least 1",
    ]


def test_parse_and_value_problems_are_reported_together():
    message = error_of(sets=["train.learning_rte=1e-3", "lora.rank=0"], flags=DATASET)
    assert "unknown key 'train.learning_rte'" in message
    assert "lora.rank=0 must be at least 1" in message


# --- seed flags -------------------------------------------------------------------------------


def test_seed_flag_set_is_frozen():
    # the CLI accepts exactly these seed (DiffSynth-Studio) flags; change this list on purpose
    assert sorted(SEED_FLAGS) == sorted(
        [
            "dataset_base_path",
            "dataset_metadata_path",
            "dataset_repeat",
            "dataset_num_workers",
            "max_pixels",
            "learning_rate",
            "num_epochs",
            "task",
            "seed",
            "batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "mixed_precision",
            "output_path",
            "lora_base_model",
            "lora_target_modules",
            "lora_rank",
            "model_paths",
            "pipeline",
            "device",
            "dtype",
            "cache_path",
            "profile",
            "vram_budget",
            "cache_variants",
        ]
    )


def test_every_seed_flag_maps_to_a_valid_key():
    assert set(SEED_FLAGS.values()) <= set(all_keys())
    assert len(set(SEED_FLAGS.values())) == len(SEED_FLAGS)  # no two flags set the same key


def test_seed_flags_set_the_right_keys():
    flags = {
        "dataset_base_path": "/data",
        "dataset_metadata_path": "/data/meta.jsonl",
        "dataset_repeat": "3",
        "dataset_num_workers": "5",
        "max_pixels": "262144",
        "learning_rate": "5e-5",
        "num_epochs": "2",
        "task": "sft:train",
        "seed": "11",
        "batch_size": "4",
        "gradient_accumulation_steps": "2",
        "max_steps": "100",
        "mixed_precision": "bf16",
        "output_path": "/out",
        "lora_base_model": "transformer",
        "lora_target_modules": "to_q,to_v",
        "lora_rank": "16",
        "model_paths": "/models/qwen",
        "pipeline": "qwen_image",
        "device": "cuda:1",
        "dtype": "float16",
        "cache_path": "/cache",
        "profile": "real",
        "vram_budget": "48",
        "cache_variants": "3",
    }
    c = load(flags=flags)
    assert c.to_dict() == {
        "output_path": "/out",
        "model": {"pipeline": "qwen_image", "path": "/models/qwen", "device": "cuda:1", "dtype": "float16"},
        "data": {
            "base_path": "/data",
            "metadata_path": "/data/meta.jsonl",
            "max_pixels": 262144,
            "max_frames": 81,
            "repeat": 3,
            "num_workers": 5,
            "prefetch": 4,
            "vae_latents": "mode",
            "random_flip": 0.0,
            "caption_dropout": 0.0,
            "shuffle_window": 4,
            "allow_outside_paths": False,
            "missing_caption": "error",
            "buckets": "none",
            "bucket_step": 64,
            "bucket_max_aspect": 4.0,
        },
        "train": {
            "task": "sft:train",
            "split": True,
            "learning_rate": 5e-5,
            "num_epochs": 2,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "max_steps": 100,
            "seed": 11,
            "gradient_checkpointing": False,
            "mixed_precision": "bf16",
            "checkpoint_every": 0,
            "checkpoints_kept": 2,
            "resume": "no",
            "find_unused_parameters": True,
            "cudnn_attention": "false",
            "compile": "auto",
            "log_every_s": 30.0,
            "blocks_to_swap": "auto",
            "base_precision": "dtype",
            "optimizer": "adamw",
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "adam_weight_decay": 0.01,
            "adam_epsilon": 1e-8,
            "lr_scheduler": "constant",
            "lr_warmup_steps": 0,
            "lr_num_cycles": 1,
            "lr_power": 1.0,
            "max_grad_norm": 0.0,
            "timestep_sampling": "uniform",
            "logit_mean": 0.0,
            "logit_std": 1.0,
            "mode_scale": 1.29,
            "sigmoid_scale": 1.0,
            "weighting_scheme": "none",
            "guidance_scale": 3.5,
            "report_to": "none",
            "validation_prompts": [],
            "validation_prompts_file": "",
            "validation_steps": 0,
            "num_validation_images": 1,
            "validation_num_inference_steps": 20,
            "validation_guidance_scale": 0.0,
            "validation_negative_prompt": "",
            "validation_seed": 0,
            "validation_width": 0,
            "validation_height": 0,
            "validation_decoder_device": "auto",
        },
        "lora": {
            "base_model": "transformer",
            "target_modules": "to_q,to_v",
            "text_encoder_target_modules": "",
            "rank": 16,
            "alpha": 0.0,
            "full_finetune": False,
            "format": "diffusers",
            "checkpoint": "",
        },
        "cache": {
            "path": "/cache",
            "shard_size": 64,
            "zstd_level": 0,
            "batch_size": 1,
            "reader": "direct",
            "variants": 3,
            "log_every_s": 30.0,
        },
        "plan": {
            "profile": "real",
            "solver": "auto",
            "vram_budget_gib": 48.0,
            "host_ram_gib": 0.0,
            "host_to_device_gbps": 0.0,
            "train_tflops": 0.0,
        },
    }


def test_all_keys_lists_top_level_and_nested_keys():
    keys = all_keys()
    assert keys[0] == "output_path"
    assert {"model.path", "data.base_path", "train.learning_rate", "lora.rank", "cache.zstd_level"} <= set(keys)
    assert not {"model", "data", "train", "lora", "cache"} & set(keys)
    # train: 19, 18 of the optimizer, the schedule, the objective and the trackers, 11 of validation images
    assert len(keys) == len(set(keys)) == 1 + 4 + 16 + (19 + 18 + 11) + 8 + 7 + 6
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)?", k) for k in keys)
