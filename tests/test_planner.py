"""The rule-based planner on the real Qwen-Image graph and on purpose-built graphs."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autosplit.adapters.qwen_image import QwenImageAdapter
from autosplit.errors import PlanError
from autosplit.graph import Unit, UnitGraph
from autosplit.plan import Plan
from autosplit.planning.planner import make_plan
from autosplit.tasks import build_graph


def nothing(values, ctx):
    return {}


def unit(name, inputs, outputs, **kw) -> Unit:
    return Unit(name, tuple(inputs), tuple(outputs), nothing, **kw)


def qwen_plan(**kw) -> Plan:
    adapter = QwenImageAdapter()
    return make_plan(
        build_graph(adapter, "sft"),
        pipeline="qwen_image",
        task="sft",
        trainable=("transformer",),
        layouts=adapter.value_layouts(),
        **kw,
    )


def test_qwen_image_sft_plan():
    plan = qwen_plan()
    assert plan.stage_units(1) == ["load_image", "encode_prompt", "encode_image"]
    assert set(plan.stage_units(2)) == {"sample_noise", "sample_timestep", "add_noise", "denoise", "denoise_loss"}
    assert [v.name for v in plan.cached] == ["prompt_embeds", "prompt_embeds_mask", "image_latents"]
    assert plan.cached_value("prompt_embeds").ragged_axis == 0
    assert plan.cached_value("image_latents").ragged_axis is None
    assert plan.components(1) == ["tokenizer", "text_encoder", "vae"]
    assert plan.components(2) == ["scheduler", "transformer"]
    reasons = {u.name: u.reason for u in plan.units}
    assert reasons["sample_noise"] == "stage 2: draws per-step random numbers (declared draws_random)"
    assert reasons["denoise"].startswith("stage 2: uses trainable transformer")
    assert reasons["add_noise"] == "stage 2: reads noise, sigma, timestep from stage 2"
    assert reasons["encode_image"].endswith("caches image_latents")


def test_unsplit_plan_keeps_the_placements():
    split, unsplit = qwen_plan(), qwen_plan(split=False)
    assert not unsplit.split
    assert [(u.name, u.stage) for u in split.units] == [(u.name, u.stage) for u in unsplit.units]
    assert "every step" in unsplit.units[0].reason


def test_trainable_component_moves_its_unit_and_everything_downstream():
    graph = UnitGraph(
        [
            unit("encode_text", ["prompt"], ["text"], components=("text_encoder",)),
            unit("encode_image", ["image"], ["latents"], components=("vae",)),
            unit("project", ["text"], ["cond"]),
            unit("loss", ["cond", "latents"], ["loss"], components=("transformer",)),
        ],
        sources=("prompt", "image"),
    )
    plan = make_plan(graph, pipeline="t", task="sft", trainable=("text_encoder", "transformer"))
    assert plan.stage_units(1) == ["encode_image"]
    assert plan.stage_units(2) == ["encode_text", "project", "loss"]
    assert [v.name for v in plan.cached] == ["prompt", "latents"]  # stage 2 reads the prompt from the cache
    assert plan.cached_value("prompt").producer == "dataset"
    assert plan.units[0].reason.startswith("stage 2: uses trainable text_encoder")


def test_random_unit_and_its_consumers_stay_in_stage2_and_nothing_random_is_cached():
    graph = UnitGraph(
        [
            unit("crop", ["image"], ["cropped"], draws_random=True),
            unit("encode", ["cropped"], ["latents"], components=("vae",)),
            unit("loss", ["latents"], ["loss"], components=("transformer",)),
        ],
        sources=("image",),
    )
    plan = make_plan(graph, pipeline="t", task="sft", trainable=("transformer",))
    assert plan.stage_units(1) == []
    assert [(v.name, v.producer) for v in plan.cached] == [("image", "dataset")]  # nothing computed is cached
    assert plan.units[1].reason == "stage 2: reads cropped from stage 2"


def test_stage1_values_used_only_in_stage1_are_not_cached():
    plan = qwen_plan()
    assert "image" not in [v.name for v in plan.cached]


def test_plan_json_round_trip(tmp_path):
    plan = qwen_plan(settings={"train": {"seed": 3}})
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    assert Plan.load(path) == plan


def test_plan_load_errors(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match=r"plan\.json: not a readable plan\.json"):
        Plan.load(bad)
    bad.write_text('{"version": 99}')
    with pytest.raises(PlanError, match="plan format version 99"):
        Plan.load(bad)


def test_plan_checks_its_graph():
    plan = qwen_plan()
    other = UnitGraph([unit("loss", ["x"], ["loss"])], sources=("x",))
    with pytest.raises(PlanError, match="do not match the graph"):
        plan.check_graph(other)
    plan.check_graph(build_graph(QwenImageAdapter(), "sft"))


# --- with measured profiles -------------------------------------------------------------------

import torch  # noqa: E402

from autosplit.graph import UnitContext  # noqa: E402
from autosplit.planning.tracer import profile_graph  # noqa: E402


def profiled_plan(units, sources, batch, components, trainable=("net",)):
    graph = UnitGraph(units, sources=sources)
    ctx = UnitContext(components, torch.device("cpu"), torch.float32, generator=torch.Generator().manual_seed(0))
    profile = profile_graph(graph, batch, ctx, pipeline="t", task="sft")
    return make_plan(graph, pipeline="t", task="sft", trainable=trainable, profile=profile), profile


def net_loss(values, ctx):
    return {"loss": ctx.components["net"](values["z"]).pow(2).mean()}


def test_seeded_noise_is_cached_and_step_noise_is_not():
    def seeded(values, ctx):  # declared deterministic, and it is: seeded by the sample
        g = torch.Generator().manual_seed(int(values["seed"][0]))
        return {"init": torch.randn(1, 4, generator=g)}

    def step_noise(values, ctx):  # undeclared, but the profiler sees the draw
        return {"noise": torch.randn(1, 4, generator=ctx.generator)}

    def combine(values, ctx):
        return {"z": values["init"] + values["noise"]}

    net = torch.nn.Linear(4, 4)
    plan, profile = profiled_plan(
        [
            Unit("seeded_noise", ("seed",), ("init",), seeded),
            Unit("step_noise", ("x",), ("noise",), step_noise),
            Unit("combine", ("init", "noise"), ("z",), combine),
            Unit("loss", ("z",), ("loss",), net_loss, components=("net",)),
        ],
        ("seed", "x"),
        {"seed": [5], "x": torch.zeros(1)},
        {"net": net},
    )
    assert profile.unit("seeded_noise").seeded_random_ops == ("randn.generator",)
    assert plan.stage_units(1) == ["seeded_noise"]
    assert [v.name for v in plan.cached] == ["x", "init"]
    assert (
        dict((u.name, u.reason) for u in plan.units)["step_noise"]
        == "stage 2: draws per-step random numbers (randn.generator)"
    )


def test_undeclared_random_crop_is_measured_and_kept_out_of_stage1():
    def random_crop(values, ctx):
        top = int(torch.randint(0, 4, (1,)))  # global RNG, nothing declared
        return {"crop": values["image"][:, top : top + 4]}

    def encode(values, ctx):
        return {"z": values["crop"].sum(dim=1, keepdim=True).repeat(1, 4)}

    plan, _ = profiled_plan(
        [
            Unit("random_crop", ("image",), ("crop",), random_crop),
            Unit("encode", ("crop",), ("z",), encode),
            Unit("loss", ("z",), ("loss",), net_loss, components=("net",)),
        ],
        ("image",),
        {"image": torch.randn(1, 8)},
        {"net": torch.nn.Linear(4, 4)},
    )
    assert plan.stage_units(1) == []
    assert plan.units[0].reason == "stage 2: draws per-step random numbers (randint.low)"
    assert plan.units[1].reason == "stage 2: reads crop from stage 2"


def test_a_unit_with_one_random_output_is_split_and_its_encoder_stays_in_stage1():
    def encode_and_noise(values, ctx):  # the example: encoded image + noise-derived latents
        latents = ctx.components["vae"](values["image"])
        return {"latents": latents, "noisy": latents + torch.randn(latents.shape, generator=ctx.generator)}

    vae = torch.nn.Linear(4, 4).requires_grad_(False)
    plan, profile = profiled_plan(
        [
            Unit("encode_and_noise", ("image",), ("latents", "noisy"), encode_and_noise, components=("vae",)),
            Unit(
                "loss",
                ("noisy",),
                ("loss",),
                lambda v, c: {"loss": c.components["net"](v["noisy"]).mean()},
                components=("net",),
            ),
        ],
        ("image",),
        {"image": torch.ones(1, 4)},
        {"net": torch.nn.Linear(4, 4), "vae": vae},
    )
    assert [v.random for v in profile.unit("encode_and_noise").outputs] == [False, True]
    unit = plan.units[0]
    assert (unit.stage, unit.replays, unit.replay_reads, unit.frontier) == (1, ("noisy",), ("latents",), 0)
    assert unit.reason.startswith("split: stage 1 caches latents and the recorded graph")
    assert unit.reason.endswith("stage 2 replays the random part (randn.generator, 2 ops) without vae")
    assert plan.components(2) == ["net"] and plan.stage_units(2) == ["encode_and_noise", "loss"]
    assert [v.name for v in plan.cached] == ["latents", "encode_and_noise.graph"]
    assert plan.predicted["stage2_resident_bytes"] == 80  # the net's weights; not the vae's
    graph = UnitGraph(
        [
            Unit("encode_and_noise", ("image",), ("latents", "noisy"), encode_and_noise, components=("vae",)),
            Unit("loss", ("noisy",), ("loss",), lambda v, c: None, components=("net",)),
        ],
        sources=("image",),
    )
    by_mincut = make_plan(graph, pipeline="t", task="sft", trainable=("net",), profile=profile, solver="mincut")
    assert by_mincut.units == plan.units and by_mincut.cached == plan.cached  # the two solvers agree on parts


def test_a_unit_on_a_trainable_component_is_never_split_even_from_a_profile_made_frozen():
    def encode_and_noise(values, ctx):
        latents = ctx.components["vae"](values["image"])
        return {"latents": latents, "noisy": latents + torch.randn(latents.shape, generator=ctx.generator)}

    vae = torch.nn.Linear(4, 4).requires_grad_(False)
    units = [
        Unit("encode_and_noise", ("image",), ("latents", "noisy"), encode_and_noise, components=("vae",)),
        Unit(
            "loss",
            ("noisy",),
            ("loss",),
            lambda v, c: {"loss": c.components["net"](v["noisy"]).mean()},
            components=("net",),
        ),
    ]
    _, profile = profiled_plan(
        units, ("image",), {"image": torch.ones(1, 4)}, {"net": torch.nn.Linear(4, 4), "vae": vae}
    )
    plan = make_plan(
        UnitGraph(units, sources=("image",)), pipeline="t", task="sft", trainable=("net", "vae"), profile=profile
    )
    assert plan.units[0].stage == 2 and not plan.units[0].replays
    assert plan.units[0].reason.startswith("stage 2: uses trainable vae")


def test_a_unit_whose_random_part_reads_into_python_stays_whole_and_says_why():
    def encode_and_noise(values, ctx):
        latents = ctx.components["vae"](values["image"])
        scale = float(torch.rand((), generator=ctx.generator))  # a random value read into Python
        return {"latents": latents, "noisy": latents + scale * torch.randn(4, generator=ctx.generator)}

    plan, _ = profiled_plan(
        [
            Unit("encode_and_noise", ("image",), ("latents", "noisy"), encode_and_noise, components=("vae",)),
            Unit(
                "loss",
                ("noisy",),
                ("loss",),
                lambda v, c: {"loss": c.components["net"](v["noisy"]).mean()},
                components=("net",),
            ),
        ],
        ("image",),
        {"image": torch.ones(1, 4)},
        {"net": torch.nn.Linear(4, 4), "vae": torch.nn.Linear(4, 4).requires_grad_(False)},
    )
    assert plan.units[0].stage == 2 and "vae" in plan.components(2)
    assert plan.units[0].reason == (
        "stage 2: draws per-step random numbers (rand.generator, randn.generator); latents alone would be "
        "cacheable, but it cannot be "
        "split: its random part reads a value into Python (_local_scalar_dense, e.g. .item() or a branch "
        "on a random tensor)"
    )


def test_lora_on_the_text_encoder_moves_text_encoding_to_stage2():
    adapter = QwenImageAdapter()
    plan = make_plan(
        build_graph(adapter, "sft"),
        pipeline="qwen_image",
        task="sft",
        trainable=("transformer", "text_encoder"),
        layouts=adapter.value_layouts(),
    )
    assert plan.stage_units(1) == ["load_image", "encode_image"]
    assert [v.name for v in plan.cached] == ["prompt", "image_latents"]
    assert "text_encoder" in plan.components(2) and "vae" not in plan.components(2)


@pytest.mark.parametrize(
    "mode, stage1, cached",
    [
        (
            "sample",
            ["load_image", "encode_prompt", "encode_image_dist"],
            ["prompt_embeds", "prompt_embeds_mask", "latent_mean", "latent_std"],
        ),
        (
            "frozen_sample",
            ["load_image", "encode_prompt", "encode_image_dist", "sample_latents"],
            ["prompt_embeds", "prompt_embeds_mask", "image_latents"],
        ),
    ],
)
def test_vae_posterior_sampling(mode, stage1, cached):
    adapter = QwenImageAdapter()
    plan = make_plan(
        build_graph(adapter, "sft", vae_latents=mode),
        pipeline="qwen_image",
        task="sft",
        trainable=("transformer",),
        layouts=adapter.value_layouts(),
    )
    assert plan.stage_units(1) == stage1
    assert [v.name for v in plan.cached] == cached


@pytest.mark.parametrize(
    "variants, stage1",
    [
        (0, ["load_image", "encode_prompt"]),  # the decoded pixels may be cached, the flip may not
        (3, ["load_image", "random_flip", "encode_prompt", "encode_image"]),
    ],
)
def test_random_flip_stays_in_stage2_unless_cached_as_variants(variants, stage1):
    adapter = QwenImageAdapter()
    graph = build_graph(adapter, "sft", random_flip_p=0.5, variants=variants)
    plan = make_plan(
        graph, pipeline="qwen_image", task="sft", trainable=("transformer",), layouts=adapter.value_layouts()
    )
    assert plan.stage_units(1) == stage1
    # without variants the flip draws every step, so the VAE runs (and is resident) in stage 2
    assert ("vae" in plan.components(2)) == (variants == 0)


# --- stage 2's weight placement: block swapping and fp8 (place_memory) -------------------------

GIB = 1 << 30
BLOCK = {
    "component": "transformer",
    "module_list": "transformer_blocks",
    "count": 60,
    "frozen_bytes": 681 << 20,
    "slot_bytes": 681 << 20,
    "fp8_frozen_bytes": 341 << 20,
    "fp8_slot_bytes": 342 << 20,
    "linear_weight_elements": 340_000_000,
    "max_linear_weight_bytes": 72 << 20,
    "forward_flops": 1_190 * 10**9,
    "step_flops": 3_900 * 10**9,
    "flops_from": "traced 1 and 2 blocks",
}


def placed_plan(*, split: bool = True, **request) -> dict:
    """`place_memory` on a plan predicted like full-size Qwen-Image's stage 2 (43.25 GiB)."""
    from autosplit.planning.memory import MemoryRequest, place_memory

    predicted = {
        "stage2_peak_bytes": int(43.25 * GIB),
        "unsplit_peak_bytes": int(58.93 * GIB),
        "stage2_flops_per_step": 234_908 * 10**9,
        "denoiser_frozen_bytes": int(38.05 * GIB),
        "blocks": [BLOCK],
    }
    plan = Plan(
        pipeline="qwen_image",
        task="sft",
        split=split,
        trainable=("transformer",),
        units=(),
        cached=(),
        predicted=predicted,
    )
    request.setdefault("gradient_checkpointing", True)
    return place_memory(plan, MemoryRequest(**request)).predicted["placement"]


@pytest.mark.parametrize("budget", [48, 24, 16, 12, 8])
def test_auto_swaps_the_fewest_blocks_that_fit_and_is_the_fastest_that_fits(budget):
    from autosplit.planning.memory import MemoryRequest, _estimate, reserved_bytes

    placed = placed_plan(blocks_to_swap="auto", vram_budget_bytes=budget * GIB)
    predicted = {
        "stage2_peak_bytes": int(43.25 * GIB),
        "unsplit_peak_bytes": int(58.93 * GIB),
        "stage2_flops_per_step": 234_908 * 10**9,
        "denoiser_frozen_bytes": int(38.05 * GIB),
    }
    request = MemoryRequest(blocks_to_swap="auto", vram_budget_bytes=budget * GIB, gradient_checkpointing=True)
    every = [_estimate(predicted, [BLOCK], "dtype", n, request) for n in range(61)]  # brute force
    fitting = [e for e in every if reserved_bytes(e["stage2_peak_bytes"]) <= budget * GIB]
    assert placed["fits"] is bool(fitting)
    if fitting:
        assert placed["step_s"] == min(e["step_s"] for e in fitting)
        assert placed["blocks_to_swap"] == min(
            e["blocks_to_swap"] for e in fitting if round(e["step_s"], 4) == round(placed["step_s"], 4)
        )
        assert reserved_bytes(placed["stage2_peak_bytes"]) <= budget * GIB
    else:
        assert placed["blocks_to_swap"] == 60 and "does NOT fit" in placed["reason"]
    assert placed["swapped"] == sorted(placed["swapped"]) and len(placed["swapped"]) == placed["blocks_to_swap"]


def test_a_swapped_block_costs_its_bytes_and_the_slots_hold_two():
    resident, swapped = placed_plan(), placed_plan(blocks_to_swap="10")
    assert resident["stage2_peak_bytes"] == int(43.25 * GIB) and resident["host_pinned_bytes"] == 0
    assert (
        swapped["stage2_peak_bytes"]
        == resident["stage2_peak_bytes"] - 10 * BLOCK["frozen_bytes"] + 2 * BLOCK["slot_bytes"]
    )
    assert swapped["host_pinned_bytes"] == 10 * BLOCK["slot_bytes"] and swapped["slots"] == 2
    assert swapped["host_peak_bytes"] > int(38.05 * GIB) + swapped["host_pinned_bytes"]
    assert "--blocks_to_swap 10: 10 of 60 blocks in pinned host memory" in swapped["reason"]


def test_no_split_is_judged_by_its_own_peak():
    split, unsplit = (placed_plan(split=s, blocks_to_swap="auto", vram_budget_bytes=48 * GIB) for s in (True, False))
    assert split["judged"] == "stage 2" and split["blocks_to_swap"] == 0  # 43.25 GiB fits 48
    assert unsplit["judged"] == "unsplit" and unsplit["blocks_to_swap"] > 0  # 58.93 GiB does not
    assert unsplit["judged_peak_bytes"] == unsplit["unsplit_peak_bytes"]


def test_the_budget_verdict_is_of_the_run_about_to_be_done():
    from autosplit.planning.memory import MemoryRequest, place_memory
    from autosplit.planning.report import plan_summary, with_budget

    predicted = {
        "stage2_peak_bytes": int(43.25 * GIB),
        "unsplit_peak_bytes": int(58.93 * GIB),
        "stage2_flops_per_step": 234_908 * 10**9,
        "denoiser_frozen_bytes": int(38.05 * GIB),
        "blocks": [BLOCK],
        "profile_mode": "fake",
        "batch_size": 1,
        "stage1_peak_bytes": 0,
        "stage2_resident_bytes": 0,
        "optimizer_bytes": 0,
        "cached_batch_bytes": 0,
        "stage2_activation_bytes": 0,
    }
    for split, verdict in ((True, "stage 2 fits"), (False, "unsplit does NOT fit")):
        plan = Plan(
            pipeline="qwen_image",
            task="sft",
            split=split,
            trainable=("transformer",),
            units=(),
            cached=(),
            predicted=predicted,
        )
        plan = place_memory(plan, MemoryRequest(vram_budget_bytes=48 * GIB))  # nothing swapped: asked for 0
        plan = Plan(**{**plan.__dict__, "predicted": with_budget(plan.predicted, 48)})
        assert plan.predicted["fits_budget"] is split
        assert plan_summary(plan)[-1].startswith(f"budget 48.00 GiB: {verdict}")


def test_fp8_is_chosen_only_when_allowed_and_named_in_the_plan():
    bf16 = placed_plan(blocks_to_swap="auto", vram_budget_bytes=24 * GIB)
    assert bf16["base_precision"] == "dtype"
    fp8 = placed_plan(blocks_to_swap="0", base_precision="fp8")
    assert fp8["base_precision"] == "fp8" and "fp8 (lossy)" in fp8["reason"]
    saved = 60 * (BLOCK["frozen_bytes"] - BLOCK["fp8_frozen_bytes"]) - BLOCK["max_linear_weight_bytes"]
    assert fp8["stage2_peak_bytes"] == int(43.25 * GIB) - saved
    assert fp8["step_s"] > fp8["resident_step_s"]  # the upcasts cost time
    auto = placed_plan(blocks_to_swap="auto", base_precision="auto", vram_budget_bytes=30 * GIB)
    assert auto["base_precision"] in ("dtype", "fp8") and auto["fits"]


def test_swapping_needs_gradient_checkpointing_and_at_most_the_blocks_there_are():
    from autosplit.errors import ConfigError

    placed = placed_plan(blocks_to_swap="auto", vram_budget_bytes=24 * GIB, gradient_checkpointing=False)
    assert placed["blocks_to_swap"] == 0 and "needs --use_gradient_checkpointing" in placed["reason"]
    with pytest.raises(ConfigError, match="has 60 repeated blocks; pass at most 60"):
        placed_plan(blocks_to_swap="61")


def test_a_plan_without_block_measurements_keeps_the_count_it_was_given():
    placements = make_plan(
        UnitGraph([unit("a", ["x"], ["y"])], sources=("x",), loss="y"),
        pipeline="p",
        task="sft",
        trainable=("transformer",),
        memory=__import__("autosplit.planning.memory", fromlist=["MemoryRequest"]).MemoryRequest(blocks_to_swap="3"),
    ).predicted["placement"]
    assert placements["blocks_to_swap"] == 3 and placements["swapped"] is None and placements["predicted"] is False


def test_the_step_model_hides_copies_behind_compute_until_bandwidth_is_short():
    from autosplit.planning.memory import block_uses, swap_step_seconds

    uses = block_uses(4)
    compute = [1.0] * len(uses)
    assert swap_step_seconds(uses, compute, 0.0, frozenset(), {}, 2) == 8.0
    hidden = swap_step_seconds(uses, compute, 0.0, frozenset({1, 3}), {1: 0.9, 3: 0.9}, 2)
    assert hidden == 8.0  # each copy runs behind the block before it
    short = swap_step_seconds(uses, compute, 0.0, frozenset({0, 1, 2, 3}), {i: 3.0 for i in range(4)}, 2)
    assert short > 8.0


def random_units(rng: random.Random, num_units: int) -> tuple[list[Unit], dict]:
    """A random graph of units in DiffSynth-Studio's style over (1, 4) tensors: encoders (a frozen
    Linear), step-noise draws, units that encode one input and pass a random one through, and
    sums; then a loss on the trained net reading every value no unit reads."""
    components: dict = {"net": torch.nn.Linear(4, 4)}
    values, units, read = ["x"], [], set()
    for i in range(num_units):
        kind = rng.choice(["encode", "noise", "mixed", "sum"])
        a, b = rng.choice(values), rng.choice(values)
        name = f"u{i}"
        if kind == "encode":
            components[f"enc{i}"] = torch.nn.Linear(4, 4).requires_grad_(False)
            fn = lambda v, c, a=a, i=i, n=name: {f"{n}.out": c.components[f"enc{i}"](v[a])}
            units.append(Unit(name, (a,), (f"{name}.out",), fn, (f"enc{i}",)))
            outs = [f"{name}.out"]
        elif kind == "noise":
            fn = lambda v, c, a=a, n=name: {f"{n}.out": torch.randn(v[a].shape, generator=c.generator)}
            units.append(Unit(name, (a,), (f"{name}.out",), fn))
            outs = [f"{name}.out"]
        elif kind == "mixed":  # encodes `a`, passes `b` through (or a draw, when a == b)
            components[f"enc{i}"] = torch.nn.Linear(4, 4).requires_grad_(False)

            def fn(v, c, a=a, b=b, i=i, n=name):
                passed = v[b] * 1 if a != b else torch.randn(v[a].shape, generator=c.generator)
                return {f"{n}.enc": c.components[f"enc{i}"](v[a]), f"{n}.pass": passed}

            units.append(Unit(name, tuple(dict.fromkeys((a, b))), (f"{name}.enc", f"{name}.pass"), fn, (f"enc{i}",)))
            outs = [f"{name}.enc", f"{name}.pass"]
        else:
            fn = lambda v, c, a=a, b=b, n=name: {f"{n}.out": v[a] + v[b]}
            units.append(Unit(name, tuple(dict.fromkeys((a, b))), (f"{name}.out",), fn))
            outs = [f"{name}.out"]
        read |= set(units[-1].inputs)
        values += outs
    leaves = tuple(v for v in values if v not in read) or ("x",)

    def loss(v, c):
        return {"loss": c.components["net"](sum(v[n] for n in leaves)).pow(2).mean()}

    units.append(Unit("loss", leaves, ("loss",), loss, ("net",)))
    return units, components


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_units=st.integers(1, 7))
def test_mincut_and_enumeration_agree_with_per_output_placement(seed, num_units):
    units, components = random_units(random.Random(seed), num_units)
    graph = UnitGraph(units, sources=("x",))
    ctx = UnitContext(components, torch.device("cpu"), torch.float32, generator=torch.Generator().manual_seed(0))
    profile = profile_graph(graph, {"x": torch.ones(1, 4)}, ctx, pipeline="t", task="sft")
    plans = [
        make_plan(graph, pipeline="t", task="sft", trainable=("net",), profile=profile, solver=solver)
        for solver in ("enumerate", "mincut")
    ]
    assert plans[0].units == plans[1].units and plans[0].cached == plans[1].cached
    random_values = {v.name for u in profile.units for v in u.outputs if v.random}
    assert not random_values & {v.name for v in plans[0].cached}  # never a per-step random value
    for placement in plans[0].units:
        if placement.replays:  # a split unit replays exactly its random outputs, from what stage 2 supplies
            assert set(placement.replays) == {v.name for v in profile.unit(placement.name).outputs if v.random}
            assert set(placement.replay_late) <= random_values


def test_a_unit_that_branches_on_a_supplied_noise_stays_whole_and_says_why():
    def noise(values, ctx):
        return {"noise": torch.randn(1, 4, generator=ctx.generator)}

    def encode_and_pass(values, ctx):
        scale = 2.0 if float(values["noise"].mean()) > 0 else 1.0  # a branch on the stage-2 value
        return {"latents": ctx.components["vae"](values["image"]), "passed": values["noise"] * scale}

    plan, _ = profiled_plan(
        [
            Unit("noise", ("image",), ("noise",), noise),
            Unit("encode", ("image", "noise"), ("latents", "passed"), encode_and_pass, components=("vae",)),
            Unit(
                "loss",
                ("latents", "passed"),
                ("loss",),
                lambda v, c: {"loss": c.components["net"](v["latents"] + v["passed"]).mean()},
                components=("net",),
            ),
        ],
        ("image",),
        {"image": torch.ones(1, 4)},
        {"net": torch.nn.Linear(4, 4), "vae": torch.nn.Linear(4, 4).requires_grad_(False)},
    )
    encode = plan.units[1]
    assert encode.stage == 2 and "vae" in plan.components(2)
    assert encode.reason == (
        "stage 2: reads noise from stage 2; latents alone would be cacheable, but it cannot be split: its random "
        "part reads a value into Python (_local_scalar_dense, e.g. .item() or a branch on a random tensor)"
    )


def test_a_supplied_input_computed_by_a_trained_component_keeps_the_unit_whole():
    def trained_noise(values, ctx):  # random, and from the trained net: stage 1 could not make a stand-in
        return {"noise": ctx.components["net"](torch.randn(1, 4, generator=ctx.generator))}

    def encode_and_pass(values, ctx):
        return {"latents": ctx.components["vae"](values["image"]), "passed": values["noise"] * 1}

    plan, _ = profiled_plan(
        [
            Unit("noise", ("image",), ("noise",), trained_noise, components=("net",)),
            Unit("encode", ("image", "noise"), ("latents", "passed"), encode_and_pass, components=("vae",)),
            Unit("loss", ("latents", "passed"), ("loss",), lambda v, c: {"loss": (v["latents"] + v["passed"]).mean()}),
        ],
        ("image",),
        {"image": torch.ones(1, 4)},
        {"net": torch.nn.Linear(4, 4), "vae": torch.nn.Linear(4, 4).requires_grad_(False)},
    )
    assert plan.units[1].stage == 2 and not plan.units[1].replays
    assert plan.units[1].reason == (
        "stage 2: outputs need grad; latents alone would be cacheable, but its other outputs are computed from "
        "values that need grad (a trained component's), which stage 1 cannot make stand-ins of: compute latents "
        "in a unit of its own"
    )
