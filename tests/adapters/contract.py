"""The contract every adapter keeps, as a mixin: a family's test module subclasses
`AdapterContract` with one `Tester` (its tiny "tester config") and gets every test below.

For each task the family supports, on its tiny built-in pipeline, CPU fp32, fixed seed:
the tiny folder loads through the family's diffusers pipeline; split training (`:data_process`
then `:train`) learns bit for bit the LoRA unsplit training (`--no-split`) learns; the LoRA loads
in the diffusers pipeline with `load_lora_weights` and changes its output; stage 2 never
instantiates the family's text encoders or VAE.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from autosplit.adapters.base import get_adapter
from autosplit.adapters.builtin import builtin_model_root
from autosplit.cli import main

STEPS = ["--num_epochs", "1", "--dataset_repeat", "1", "--max_steps", "4", "--lora_rank", "4", "--seed", "7"]


@dataclass(frozen=True)
class Tester:
    """What the contract needs to know about one family (its "tester config")."""

    __test__ = False

    pipeline: str
    #: "module:Class" of every stage-1 model (text encoders, VAE); stage 2 must build none of them
    frozen_classes: tuple[str, ...]
    #: keyword arguments of one short, seeded diffusers pipeline call
    generate: dict[str, Any] = field(default_factory=dict)
    #: the built-in tiny trained component stays below this many parameters
    max_params: int = 500_000
    #: extra run flags (e.g. a smaller max_pixels)
    flags: tuple[str, ...] = ()


def _class(spec: str) -> type:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


class AdapterContract:
    tester: Tester

    def pytest_generate_tests(self, metafunc):
        if "task" in metafunc.fixturenames:
            metafunc.parametrize("task", get_adapter(self.tester.pipeline).tasks, scope="class")

    @pytest.fixture(scope="class")
    def model(self, autosplit_home) -> Path:
        return builtin_model_root(get_adapter(self.tester.pipeline))

    @pytest.fixture(scope="class")
    def pipe_class(self) -> type:
        import diffusers

        return getattr(diffusers, get_adapter(self.tester.pipeline).pipeline_class)

    def run(self, *args: str) -> None:
        assert main(["run", "--pipeline", self.tester.pipeline, *self.tester.flags, *STEPS, *args]) == 0

    @pytest.fixture(scope="class")
    def trained(self, model, task, tmp_path_factory) -> dict[str, Path]:
        """Split (the seed's two manual stages) and unsplit runs of `task`."""
        root = tmp_path_factory.mktemp(f"{self.tester.pipeline}-{task}")
        out = {"cache": root / "cache", "split": root / "split", "unsplit": root / "unsplit"}
        self.run("--task", f"{task}:data_process", "--output_path", str(out["cache"]))
        self.run(
            "--task", f"{task}:train", "--dataset_base_path", str(out["cache"]), "--output_path", str(out["split"])
        )
        self.run("--task", task, "--no-split", "--output_path", str(out["unsplit"]))
        return out

    def test_tiny_pipeline_loads_in_diffusers(self, model, pipe_class):
        pipe = pipe_class.from_pretrained(model)
        trained = get_adapter(self.tester.pipeline).base_model_aliases["dit"]
        assert 0 < sum(p.numel() for p in getattr(pipe, trained).parameters()) < self.tester.max_params
        for spec in self.tester.frozen_classes:
            assert any(isinstance(c, _class(spec)) for c in pipe.components.values()), spec

    def test_split_learns_exactly_what_unsplit_learns(self, trained):
        a, b = load_file(trained["split"] / "lora.safetensors"), load_file(trained["unsplit"] / "lora.safetensors")
        assert sorted(a) == sorted(b) and len(a) > 0
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert losses(trained["split"]) == losses(trained["unsplit"]) and len(losses(trained["split"])) == 4
        assert any(w.abs().max() > 0 for k, w in a.items() if "lora_B" in k)  # it trained

    def test_lora_loads_in_diffusers_and_changes_its_output(self, trained, model, pipe_class):
        pipe = pipe_class.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)

        def generate() -> torch.Tensor:
            return pipe(
                "a red circle", output_type="pt", generator=torch.Generator().manual_seed(0), **self.tester.generate
            )[0]

        before = generate()
        pipe.load_lora_weights(trained["split"], weight_name="lora.safetensors")
        saved = load_file(trained["split"] / "lora.safetensors")
        trained_name = get_adapter(self.tester.pipeline).base_model_aliases["dit"]
        loaded = [k for k in getattr(pipe, trained_name).state_dict() if "lora_B" in k]
        assert len(loaded) == sum("lora_B" in k for k in saved)
        assert not torch.equal(before, generate())

    def test_stage2_never_builds_text_encoders_or_vae(self, trained, task, tmp_path, monkeypatch):
        def refuse(self, *args, **kwargs):
            raise AssertionError(f"stage 2 built {type(self).__name__}")

        for spec in self.tester.frozen_classes:
            monkeypatch.setattr(_class(spec), "__init__", refuse)
        self.run(
            "--task",
            f"{task}:train",
            "--dataset_base_path",
            str(trained["cache"]),
            "--output_path",
            str(tmp_path / "again"),
        )
        assert (
            load_file(tmp_path / "again/lora.safetensors").keys()
            == load_file(trained["split"] / "lora.safetensors").keys()
        )
        with pytest.raises(AssertionError, match="stage 2 built"):  # the guard works: stage 1 builds them
            self.run("--task", f"{task}:data_process", "--output_path", str(tmp_path / "cache2"))

    def test_plan_caches_stage1_values_and_keeps_per_step_noise_in_stage2(self, trained, task):
        plan = json.loads((trained["split"] / "plan.json").read_text())
        stage = {u["name"]: u["stage"] for u in plan["units"]}
        cached = {v["name"] for v in plan["cached"]}
        assert "image_latents" in cached and "prompt_embeds" in cached
        if task == "sft":
            assert stage["sample_noise"] == stage["sample_timestep"] == stage["denoise"] == 2
            assert "noise" not in cached
        else:
            assert stage["initial_noise"] == 1 and stage["rollout"] == 2 and "initial_noise" in cached
