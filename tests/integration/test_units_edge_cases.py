"""Edge cases of per-output planning found in review, on small pipelines written in code: a unit that
reads the step's noise only for its shape, a split unit with an optional input the dataset lacks,
a random value read into Python through `.tolist()`, and a cache made by an edited unit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autosplit import Pipeline
from autosplit.config import CacheConfig, LoraConfig, TrainConfig
from autosplit.errors import CacheError
from autosplit.graph import Unit, unit
from autosplit.storage.cache import CacheReader

STEPS, LORA = TrainConfig(num_epochs=1, seed=0), LoraConfig(rank=2)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_q = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.to_q(x)


def encoder() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Linear(3, 4)


def path_features(paths, scale=1.0) -> torch.Tensor:
    return torch.stack([torch.tensor([float(len(str(p)))] * 3) for p in paths]) * scale


def noise(values, ctx):
    return {"noise": torch.randn(len(values["image_path"]), 4, generator=ctx.generator)}


def loss(values, ctx):
    return {"loss": (ctx.components["net"](values["feat"]) - values["noise"]).pow(2).mean()}


@pytest.fixture
def dataset(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "prompt": f"prompt {i}"} for i in range(3)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def pipeline(units) -> Pipeline:
    return Pipeline(
        units,
        ("image_path", "prompt", "edit_image"),
        {"net": Net(), "enc": encoder()},
        ("net",),
        lora_targets=("to_q",),
    )


def split_and_unsplit(units, dataset: Path, tmp_path: Path):
    pipe = pipeline(units)
    samples = pipe.read_dataset(dataset, max_pixels=16 * 16)
    profile = pipe.profile(samples, lora=LORA)
    plan = pipe.plan(profile)
    pipe.cache(plan, samples, tmp_path / "cache")
    split = pipeline(units).train(plan, tmp_path / "split", cache=tmp_path / "cache", train=STEPS, lora=LORA)
    other = pipeline(units)
    unsplit = other.train(
        other.plan(profile, split=False), tmp_path / "unsplit", samples=samples, train=STEPS, lora=LORA
    )
    return plan, split, unsplit


def test_a_unit_reading_the_noise_only_for_its_shape_is_cached_and_trains_as_unsplit(dataset, tmp_path):
    def encode(values, ctx):
        assert values["noise"].shape[-1] == 4  # read for its shape alone
        return {"feat": ctx.components["enc"](path_features(values["image_path"]))}

    units = [
        Unit("noise", ("image_path",), ("noise",), noise),
        Unit("encode", ("image_path", "noise"), ("feat",), encode, ("enc",)),
        Unit("loss", ("feat", "noise"), ("loss",), loss, ("net",)),
    ]
    plan, split, unsplit = split_and_unsplit(units, dataset, tmp_path)
    encode_placement = plan.units[1]
    assert (encode_placement.stage, encode_placement.replays, encode_placement.stand_ins) == (1, (), ("noise",))
    assert "feat" in {v.name for v in plan.cached} and plan.components(2) == ["net"]
    assert split.losses == unsplit.losses and len(split.losses) == 3


def test_a_split_unit_with_an_optional_input_the_dataset_lacks(dataset, tmp_path):
    @unit(outputs=("feat", "latents"), components=("enc",))
    def input_image(ctx, image_path, noise, edit_image=None):
        return {"feat": ctx.components["enc"](path_features(image_path)), "latents": noise * 2}

    def loss_on_latents(values, ctx):
        return {"loss": (ctx.components["net"](values["feat"]) - values["latents"]).pow(2).mean()}

    units = [
        Unit("noise", ("image_path",), ("noise",), noise),
        input_image,
        Unit("loss", ("feat", "latents"), ("loss",), loss_on_latents, ("net",)),
    ]
    plan, split, unsplit = split_and_unsplit(units, dataset, tmp_path)
    assert plan.units[1].replays == ("latents",) and "(1 ops)" in plan.units[1].reason
    assert split.losses == unsplit.losses


def test_a_random_value_read_into_python_stops_stage1_before_anything_is_cached(dataset, tmp_path):
    def prompt(values, ctx):
        feat = ctx.components["enc"](path_features(values["prompt"]))
        return {"feat": feat, "tt": values["noise"], "t_list": values["noise"][:, 0].tolist()}

    def loss_on_list(values, ctx):
        return {"loss": ctx.components["net"](values["feat"]).pow(2).mean() * values["t_list"][0]}

    units = [
        Unit("noise", ("image_path",), ("noise",), noise),
        Unit("prompt", ("prompt", "noise"), ("feat", "tt", "t_list"), prompt, ("enc",)),
        Unit("loss", ("feat", "tt", "t_list"), ("loss",), loss_on_list, ("net",)),
    ]
    pipe = pipeline(units)
    samples = pipe.read_dataset(dataset, max_pixels=16 * 16)
    plan = pipe.plan(pipe.profile(samples, lora=LORA))
    with pytest.raises(CacheError, match=r"unit 'prompt': its deterministic part changed with the step's random"):
        pipe.cache(plan, samples, tmp_path / "cache")


def test_a_cache_made_by_an_edited_unit_is_made_again(dataset, tmp_path):
    def units(scale):
        def encode(values, ctx):
            return {"feat": ctx.components["enc"](path_features(values["image_path"], scale))}

        return [
            Unit("noise", ("image_path",), ("noise",), noise),
            Unit("encode", ("image_path",), ("feat",), encode, ("enc",)),
            Unit("loss", ("feat", "noise"), ("loss",), loss, ("net",)),
        ]

    read = []
    for scale in (1.0, 100.0):
        pipe = pipeline(units(scale))
        samples = pipe.read_dataset(dataset, max_pixels=16 * 16)
        plan = pipe.plan(pipe.profile(samples))
        pipe.cache(plan, samples, tmp_path / "cache")
        read.append(CacheReader(tmp_path / "cache").read(0)["feat"])
    assert not torch.equal(read[0], read[1])


def test_a_unit_reading_the_noise_only_for_its_shape_is_recorded_one_sample_at_a_time(dataset, tmp_path):
    def encode(values, ctx):
        assert values["noise"].shape[-1] == 4
        return {"feat": ctx.components["enc"](path_features(values["image_path"]))}

    units = [
        Unit("noise", ("image_path",), ("noise",), noise),
        Unit("encode", ("image_path", "noise"), ("feat",), encode, ("enc",)),
        Unit("loss", ("feat", "noise"), ("loss",), loss, ("net",)),
    ]
    pipe = pipeline(units)
    samples = pipe.read_dataset(dataset, max_pixels=16 * 16)
    plan = pipe.plan(pipe.profile(samples, lora=LORA))
    assert plan.units[1].is_split and not plan.units[1].replays
    pipe.cache(plan, samples, tmp_path / "cache", cache=CacheConfig(batch_size=3))  # recorded per sample
    assert len(CacheReader(tmp_path / "cache")) == 3
