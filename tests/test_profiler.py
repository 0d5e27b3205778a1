"""The profiler measures what runs: memory, FLOPs (CPU attention too), randomness, gradients and
which inputs each output depends on; fake mode matches real mode on the tiny pipeline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.utils.flop_counter import sdpa_flop_count

from autosplit.config import load_config
from autosplit.graph import Unit, UnitContext
from autosplit.planning.profile import Profile
from autosplit.planning.tracer import profile_unit
from autosplit.workflow.profiling import profile_fake, profile_real
from autosplit.workflow.session import open_session

CPU = torch.device("cpu")


def ctx(generator=None, **components) -> UnitContext:
    return UnitContext(components, CPU, torch.float32, generator=generator)


def test_peak_memory_counts_new_storages_rounded_to_512_bytes():
    def fn(values, ctx):
        kept = torch.ones(1000)  # 4000 B -> 4096
        temp = torch.ones(2000)  # 8000 B -> 8192, freed before returning
        out = kept * temp[:1000]  # 4096
        del temp
        view = out.view(10, 100)  # a view allocates nothing
        return {"y": view}

    profile, _ = profile_unit(Unit("u", (), ("y",), fn), {}, ctx(), set())
    assert profile.peak_bytes == 4096 + 8192 + 4096
    assert profile.outputs[0].bytes == 4000 and profile.outputs[0].shape == (10, 100)


def test_cpu_attention_flops_are_counted():
    q = torch.randn(2, 4, 64, 16)

    def fn(values, ctx):
        return {"y": torch.nn.functional.scaled_dot_product_attention(values["q"], values["q"], values["q"])}

    profile, _ = profile_unit(Unit("attn", ("q",), ("y",), fn), {"q": q}, ctx(), set())
    assert profile.flops == sdpa_flop_count(q.shape, q.shape, q.shape) > 0


def test_random_draws_are_classified_by_generator():
    step = torch.Generator().manual_seed(0)

    def fn(values, ctx):
        seeded = torch.Generator().manual_seed(int(values["seed"]))
        return {"a": torch.randn(4, generator=ctx.generator), "b": torch.rand(4), "c": torch.randn(4, generator=seeded)}

    profile, _ = profile_unit(Unit("u", ("seed",), ("a", "b", "c"), fn), {"seed": 3}, ctx(step), set())
    assert profile.random_ops == ("rand.default", "randn.generator")
    assert profile.seeded_random_ops == ("randn.generator",)
    assert [v.random for v in profile.outputs] == [True, True, False]


def test_per_output_dependencies_and_gradients():
    linear = torch.nn.Linear(4, 4)

    def fn(values, ctx):
        encoded = values["image"] * 2
        return {"encoded": encoded, "noisy": encoded + values["noise"], "pred": ctx.components["net"](encoded)}

    unit = Unit("u", ("image", "noise"), ("encoded", "noisy", "pred"), fn, components=("net",))
    values = {"image": torch.ones(4), "noise": torch.randn(4)}
    profile, _ = profile_unit(unit, values, ctx(net=linear), random_inputs={"noise"})
    by_name = {v.name: v for v in profile.outputs}
    assert by_name["encoded"].depends_on == ("image",) and not by_name["encoded"].random
    assert by_name["noisy"].depends_on == ("image", "noise") and by_name["noisy"].random
    assert by_name["pred"].needs_grad and not by_name["encoded"].needs_grad
    assert profile.needs_grad


@pytest.fixture(scope="module")
def tiny_session(tiny_model, tiny_dataset):
    return open_session(load_config(toml_path=None, sets=["model.device=cpu"], flags={}))


def test_fake_profile_matches_real_on_the_tiny_pipeline(tiny_session):
    real, fake = profile_real(tiny_session), profile_fake(tiny_session, full_size=False)
    assert (real.mode, fake.mode) == ("cpu", "fake")
    assert real.components == fake.components
    for r, f in zip(real.units, fake.units, strict=True):
        assert r.name == f.name
        assert r.flops == f.flops, r.name
        assert (r.needs_grad, r.random_ops, r.seeded_random_ops) == (f.needs_grad, f.random_ops, f.seeded_random_ops)
        for a, b in zip(r.outputs, f.outputs, strict=True):
            assert (a.shape, a.dtype, a.bytes, a.needs_grad, a.random, a.depends_on) == (
                b.shape,
                b.dtype,
                b.bytes,
                b.needs_grad,
                b.random,
                b.depends_on,
            )
        assert abs(r.peak_bytes - f.peak_bytes) <= max(0.02 * r.peak_bytes, 8192), r.name
    assert real.grad_step.flops == fake.grad_step.flops > 0
    assert abs(real.grad_step.peak_bytes - fake.grad_step.peak_bytes) <= 0.02 * real.grad_step.peak_bytes
    assert real.unit("denoise").flops > 0 and real.unit("encode_image").flops > 0


def test_profile_json_round_trip(tiny_session, tmp_path):
    profile = profile_fake(tiny_session, full_size=False)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile.to_dict()))
    assert Profile.from_dict(json.loads(path.read_text())) == profile


def test_block_extrapolation_matches_a_full_trace(tiny_model, tiny_dataset, tmp_path):
    deep = tmp_path / "deep"
    shutil.copytree(tiny_model, deep)
    config_path = deep / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"] = 5
    config_path.write_text(json.dumps(config))
    session = open_session(
        load_config(
            toml_path=None,
            sets=["train.gradient_checkpointing=true", "model.device=cpu"],
            flags={"model_paths": str(deep)},
        )
    )
    traced = profile_fake(session, full_size=False, extrapolate=False)
    estimated = profile_fake(session, full_size=False)
    assert estimated.notes["extrapolated"]["transformer"] == {"config_key": "num_layers", "traced": [1, 2], "to": 5}
    assert estimated.unit("denoise").flops == traced.unit("denoise").flops
    assert estimated.grad_step.flops == traced.grad_step.flops
    assert estimated.component("transformer") == traced.component("transformer")
    # linear in the block count up to the 512-byte rounding of tiny tensors: within 2%, never under
    assert 0 <= estimated.grad_step.peak_bytes - traced.grad_step.peak_bytes <= 0.02 * traced.grad_step.peak_bytes
    assert (
        abs(estimated.unit("denoise").peak_bytes - traced.unit("denoise").peak_bytes)
        <= 0.01 * traced.unit("denoise").peak_bytes
    )
