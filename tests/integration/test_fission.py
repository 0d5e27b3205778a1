"""A unit with both cacheable and random outputs is split inside (autosplit.planning.fission), end to end on
the tiny Qwen-Image pipeline: stage 1 caches its deterministic part, stage 2 replays the random
part without building the VAE, and the weights equal those of unsplit training, which runs the
unit as written every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from safetensors.torch import load_file

import autosplit.workflow.session
from autosplit.adapters.qwen_image import encode_image, encode_image_dist
from autosplit.cli import main
from autosplit.graph import Unit, UnitContext, UnitGraph
from autosplit.planning.fission import frontier_name, graph_name, replay
from autosplit.planning.replay_check import check_graph, element_limit
from autosplit.storage.cache import CacheReader
from autosplit.tasks import build_graph, sample_latents

STEPS = ["--num_epochs", "1", "--dataset_repeat", "1", "--lora_rank", "4", "--seed", "3"]


def encode_image_and_noise(values, ctx):
    """DiffSynth-style: the encoded image and the noise in one unit."""
    latents = encode_image(values, ctx)["image_latents"]
    noise = torch.randn(latents.shape, generator=ctx.generator, dtype=torch.float32).to(latents.device, latents.dtype)
    return {"image_latents": latents, "noise": noise}


def encode_image_sampled(values, ctx):
    """VAE encoding with a fresh posterior sample every step, written as one unit."""
    return sample_latents(encode_image_dist(values, ctx), ctx)


def fused_graph(kind):
    def build(adapter, task, **kwargs):
        units = list(build_graph(adapter, task, **kwargs))
        encode = next(u for u in units if u.name == "encode_image")
        if kind == "noise":
            fused = Unit(
                "encode_image",
                encode.inputs,
                ("image_latents", "noise"),
                encode_image_and_noise,
                components=encode.components,
            )
            units = [u for u in units if u.name != "sample_noise"]
        else:
            fused = Unit(
                "encode_image", encode.inputs, ("image_latents",), encode_image_sampled, components=encode.components
            )
        units[units.index(encode)] = fused
        return UnitGraph(units, sources=build_graph(adapter, task).sources)

    return build


def assert_graphs_pass_the_replay_checks(cache: Path, unit: str = "encode_image") -> None:
    """Every graph the recorder wrote for `unit` passes the checks a replay makes of an untrusted one."""
    reader = CacheReader(cache)
    placement = next(u for u in reader.plan.units if u.name == unit)
    for i in range(len(reader)):
        values = reader.read(i)
        graph = json.loads(bytes(values[graph_name(unit)].numpy()))
        frontier = [values[frontier_name(unit, k)] for k in range(placement.frontier)]
        reads = {n: values[n].unsqueeze(0) for n in placement.replay_reads}  # batched, as stage 2 hands them over
        check_graph(graph, num_frontier=len(frontier), reads=reads, limit=element_limit([*frontier, *reads.values()]))
        replay(graph, frontier, reads, UnitContext({}, torch.device("cpu"), torch.float32, torch.Generator()))


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(params=["noise", "posterior_sample"])
def fused(request, monkeypatch, tiny_model, tiny_dataset):
    monkeypatch.setattr(autosplit.workflow.session, "build_graph", fused_graph(request.param))
    return request.param


def test_split_unit_caches_its_deterministic_part_and_matches_unsplit(fused, tmp_path, monkeypatch):
    cache, split, unsplit = tmp_path / "cache", tmp_path / "split", tmp_path / "unsplit"
    assert main(["run", "--task", "sft:data_process", "--output_path", str(cache), *STEPS]) == 0
    assert_graphs_pass_the_replay_checks(cache)

    def refuse(self, *args, **kwargs):
        raise AssertionError("stage 2 built the VAE")

    with monkeypatch.context() as patch:
        patch.setattr(AutoencoderKLQwenImage, "__init__", refuse)
        assert (
            main(["run", "--task", "sft:train", "--dataset_base_path", str(cache), "--output_path", str(split), *STEPS])
            == 0
        )
    assert main(["run", "--no-split", "--output_path", str(unsplit), *STEPS]) == 0

    a, b = load_file(split / "lora.safetensors"), load_file(unsplit / "lora.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(split) == losses(unsplit) and len(losses(split)) == 16

    plan = json.loads((split / "plan.json").read_text())
    unit = next(u for u in plan["units"] if u["name"] == "encode_image")
    cached = {v["name"] for v in plan["cached"]}
    assert unit["stage"] == 1 and unit["reason"].startswith("split: stage 1 caches")
    assert "without vae" in unit["reason"]
    assert "vae" not in {c for u in plan["units"] if u["stage"] == 2 for c in u["components"]}
    if fused == "noise":
        assert unit["replays"] == ["noise"] and unit["frontier"] == 0
        assert {"image_latents", "encode_image.graph"} <= cached and "noise" not in cached
    else:  # the posterior's mean and std are what the sampling reads: they are cached, the sample is not
        assert unit["replays"] == ["image_latents"] and unit["frontier"] == 2
        assert {"encode_image.frontier0", "encode_image.frontier1"} <= cached and "image_latents" not in cached
    unsplit_plan = json.loads((unsplit / "plan.json").read_text())
    assert next(u for u in unsplit_plan["units"] if u["name"] == "encode_image")["stage"] == 2


def test_with_batches_the_unit_stays_whole_and_the_plan_says_why(fused, tmp_path, capsys):
    assert main(["plan", "--batch_size", "2", "--output_path", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    unit = next(u for u in plan["units"] if u["name"] == "encode_image")
    assert unit["stage"] == 2 and not unit["replays"]
    if fused == "noise":
        assert "image_latents would be cached by splitting the unit, which needs --batch_size 1" in unit["reason"]


def test_the_cache_is_small_and_names_the_device_its_graphs_were_recorded_on(fused, tmp_path, capsys):
    import zarr

    cache = tmp_path / "cache"
    assert main(["run", "--task", "sft:data_process", "--output_path", str(cache), *STEPS]) == 0
    graphs = sum(f.stat().st_size for f in cache.glob("buckets/*/encode_image.graph/**/*") if f.is_file())
    assert graphs < 16 * 2048  # 16 graphs of ~0.3-0.5 KB, not a dense index of a 1 MiB cap per sample
    group = zarr.open_group(str(cache), mode="r+")
    manifest = dict(group.attrs["autosplit"])
    assert manifest["key"]["replay_device"] == "cpu"
    manifest["key"] = {**manifest["key"], "replay_device": "cuda"}  # as if stage 1 had run on a GPU
    group.attrs["autosplit"] = manifest
    assert (
        main(
            [
                "run",
                "--task",
                "sft:train",
                "--dataset_base_path",
                str(cache),
                "--output_path",
                str(tmp_path / "out"),
                *STEPS,
            ]
        )
        == 2
    )
    assert "recorded on cuda; their replay needs the same device type, this run is on cpu" in capsys.readouterr().err
