"""UnitGraph and Unit: graph validation errors, execution order, queries and running units."""

from __future__ import annotations

import re

import pytest
import torch

from autosplit.errors import GraphError
from autosplit.graph import Unit, UnitContext, UnitGraph, run_units


def _sum_fn(outputs: tuple[str, ...]):
    """A unit function writing the sum of its inputs (or 0) to every output."""

    def fn(values, ctx):
        total = sum(values.values()) if values else 0
        return {name: total for name in outputs}

    return fn


def unit(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], **kwargs) -> Unit:
    return Unit(name, tuple(inputs), tuple(outputs), kwargs.pop("fn", _sum_fn(tuple(outputs))), **kwargs)


def ctx(**settings) -> UnitContext:
    return UnitContext(components={}, device=torch.device("cpu"), dtype=torch.float32, settings=settings)


def names(graph: UnitGraph) -> list[str]:
    return [u.name for u in graph]


# --- validation errors ------------------------------------------------------------------------


def test_unit_reading_a_value_nobody_produces_is_an_error_naming_unit_and_value():
    units = [unit("encode", ("image",), ("latents",)), unit("loss", ("latents", "noise"), ("loss",))]
    with pytest.raises(GraphError, match=r"unit 'loss' reads 'noise', which no unit produces") as info:
        UnitGraph(units, sources=("image",))
    assert "sources: ['image']" in str(info.value)


def test_two_producers_of_one_value_is_an_error_naming_both():
    units = [unit("a", ("src",), ("x",)), unit("b", ("src",), ("x",)), unit("l", ("x",), ("loss",))]
    with pytest.raises(GraphError, match=r"value 'x' is produced by both 'a' and 'b'"):
        UnitGraph(units, sources=("src",))


def test_duplicate_unit_names_are_an_error():
    units = [unit("a", ("src",), ("x",)), unit("a", ("src",), ("y",)), unit("l", ("x",), ("loss",))]
    with pytest.raises(GraphError, match=r"two units are named 'a'; unit names must be unique"):
        UnitGraph(units, sources=("src",))


def test_cycle_is_an_error_showing_the_cycle_path_only():
    # start -> a -> c -> b -> a: the cycle is a, c, b; `start` leads into it but is not part of it
    units = [
        unit("start", ("p",), ("loss",)),
        unit("a", ("r",), ("p",)),
        unit("b", ("p",), ("q",)),
        unit("c", ("q",), ("r",)),
    ]
    with pytest.raises(GraphError, match=re.escape("the unit graph has a cycle: a -> c -> b -> a")) as info:
        UnitGraph(units, sources=())
    assert "start" not in str(info.value)


def test_unit_reading_its_own_output_is_a_cycle():
    units = [unit("self_loop", ("x",), ("x", "loss"))]
    with pytest.raises(GraphError, match=re.escape("cycle: self_loop -> self_loop")):
        UnitGraph(units, sources=())


def test_missing_loss_producer_is_an_error_naming_the_loss_value():
    units = [unit("a", ("src",), ("x",))]
    with pytest.raises(GraphError, match=r"no unit produces the loss value 'loss'"):
        UnitGraph(units, sources=("src",))
    with pytest.raises(GraphError, match=r"no unit produces the loss value 'mse'"):
        UnitGraph([unit("a", ("src",), ("loss",))], sources=("src",), loss="mse")


def test_loss_that_is_only_a_source_is_not_produced():
    with pytest.raises(GraphError, match=r"no unit produces the loss value 'loss'"):
        UnitGraph([unit("a", ("loss",), ("x",))], sources=("loss",))


def test_unit_output_colliding_with_a_source_is_an_error():
    units = [unit("a", ("prompt",), ("image",)), unit("l", ("image",), ("loss",))]
    with pytest.raises(GraphError, match=r"unit 'a' outputs 'image', which is a dataset source"):
        UnitGraph(units, sources=("image", "prompt"))


# --- order ------------------------------------------------------------------------------------


def _pipeline(order: list[str]) -> list[Unit]:
    """A small diffusion-like graph; `order` is the declaration order of its units."""
    by_name = {
        "loss": unit("loss", ("pred", "target"), ("loss",)),
        "denoise": unit("denoise", ("noisy", "prompt_embeds"), ("pred",)),
        "noise": unit("noise", ("latents",), ("noisy", "target")),
        "encode_image": unit("encode_image", ("image",), ("latents",)),
        "encode_prompt": unit("encode_prompt", ("prompt",), ("prompt_embeds",)),
    }
    return [by_name[n] for n in order]


def test_topological_order_puts_producers_first_and_keeps_declaration_order_for_ties():
    graph = UnitGraph(
        _pipeline(["loss", "denoise", "noise", "encode_image", "encode_prompt"]), sources=("image", "prompt")
    )
    # depth-first from the first declared unit, inputs visited in declaration order
    assert names(graph) == ["encode_image", "noise", "encode_prompt", "denoise", "loss"]


def test_topological_order_is_already_sorted_input_unchanged():
    order = ["encode_prompt", "encode_image", "noise", "denoise", "loss"]
    graph = UnitGraph(_pipeline(order), sources=("image", "prompt"))
    assert names(graph) == order


def test_independent_units_keep_declaration_order():
    a = [unit("pa", ("s",), ("x",)), unit("pb", ("s",), ("y",)), unit("l", ("x", "y"), ("loss",))]
    b = [unit("pb", ("s",), ("y",)), unit("pa", ("s",), ("x",)), unit("l", ("x", "y"), ("loss",))]
    assert names(UnitGraph(a, sources=("s",))) == ["pa", "pb", "l"]
    assert names(UnitGraph(b, sources=("s",))) == ["pb", "pa", "l"]


@pytest.mark.parametrize(
    "order",
    [
        ["loss", "denoise", "noise", "encode_image", "encode_prompt"],
        ["encode_prompt", "loss", "encode_image", "denoise", "noise"],
        ["denoise", "encode_image", "loss", "encode_prompt", "noise"],
    ],
)
def test_every_unit_comes_after_the_producers_of_its_inputs_and_order_is_repeatable(order):
    graph = UnitGraph(_pipeline(order), sources=("image", "prompt"))
    position = {name: i for i, name in enumerate(names(graph))}
    for u in graph:
        for value in u.inputs:
            if value in graph.producer:
                assert position[graph.producer[value]] < position[u.name], (u.name, value)
    assert names(UnitGraph(_pipeline(order), sources=("image", "prompt"))) == names(graph)
    assert sorted(names(graph)) == sorted(order)


# --- queries ----------------------------------------------------------------------------------


@pytest.fixture
def pipeline() -> UnitGraph:
    return UnitGraph(
        _pipeline(["encode_prompt", "encode_image", "noise", "denoise", "loss"]), sources=("image", "prompt")
    )


def test_producer_maps_every_output_to_its_unit(pipeline):
    assert pipeline.producer == {
        "prompt_embeds": "encode_prompt",
        "latents": "encode_image",
        "noisy": "noise",
        "target": "noise",
        "pred": "denoise",
        "loss": "loss",
    }


def test_upstream_units_are_the_transitive_producers(pipeline):
    assert pipeline.upstream_units("loss") == {"denoise", "noise", "encode_image", "encode_prompt"}
    assert pipeline.upstream_units("denoise") == {"noise", "encode_image", "encode_prompt"}
    assert pipeline.upstream_units("noise") == {"encode_image"}
    assert pipeline.upstream_units("encode_image") == set()


def test_consumers_lists_units_reading_a_value_in_execution_order(pipeline):
    assert pipeline.consumers("latents") == ["noise"]
    assert pipeline.consumers("prompt") == ["encode_prompt"]
    assert pipeline.consumers("loss") == []
    graph = UnitGraph(
        [unit("l", ("a", "b"), ("loss",)), unit("pa", ("s",), ("a",)), unit("pb", ("s",), ("b",))], sources=("s",)
    )
    assert graph.consumers("s") == ["pa", "pb"]


def test_getitem_returns_the_unit(pipeline):
    assert pipeline["noise"].outputs == ("noisy", "target")
    with pytest.raises(KeyError):
        pipeline["nope"]


# --- Unit.__call__ and run_units --------------------------------------------------------------


def test_unit_call_rejects_missing_inputs_naming_them():
    u = unit("denoise", ("noisy", "prompt_embeds", "timestep"), ("pred",))
    with pytest.raises(GraphError, match=re.escape("unit 'denoise' is missing inputs ['prompt_embeds', 'timestep']")):
        u({"noisy": 1}, ctx())


@pytest.mark.parametrize(
    "returned, seen",
    [
        ({"wrong": 1}, "['wrong']"),
        ({"pred": 1, "extra": 2}, "['extra', 'pred']"),
        ({}, "[]"),
    ],
)
def test_unit_call_rejects_wrong_returned_keys(returned, seen):
    u = unit("denoise", ("x",), ("pred",), fn=lambda values, c: dict(returned))
    with pytest.raises(GraphError, match=re.escape(f"unit 'denoise' returned {seen} but declares outputs ['pred']")):
        u({"x": 1}, ctx())


def test_unit_call_passes_only_declared_inputs_and_the_context():
    seen = {}

    def fn(values, c):
        seen.update(values)
        return {"y": values["x"] * c.settings["scale"]}

    u = unit("scale", ("x",), ("y",), fn=fn)
    assert u({"x": 3, "other": 99}, ctx(scale=2)) == {"y": 6}
    assert seen == {"x": 3}


def test_run_units_threads_values_through_in_order():
    units = [
        unit("inc", ("src",), ("x",), fn=lambda v, c: {"x": v["src"] + 1}),
        unit("dbl", ("x",), ("y",), fn=lambda v, c: {"y": v["x"] * 2}),
        unit("l", ("x", "y"), ("loss",), fn=lambda v, c: {"loss": v["x"] * 10 + v["y"]}),
    ]
    values = {"src": 1}
    out = run_units(units, values, ctx())
    assert out == {"src": 1, "x": 2, "y": 4, "loss": 24}
    assert values == {"src": 1}  # the caller's dict is not modified


def test_run_units_on_a_graph_subset_needs_earlier_values():
    units = [unit("dbl", ("x",), ("y",), fn=lambda v, c: {"y": v["x"] * 2})]
    assert run_units(units, {"x": 5}, ctx()) == {"x": 5, "y": 10}
    with pytest.raises(GraphError, match=r"unit 'dbl' is missing inputs \['x'\]"):
        run_units(units, {"src": 5}, ctx())


def test_run_units_draws_from_the_context_generator_reproducibly():
    u = unit(
        "noise",
        ("x",),
        ("n",),
        draws_random=True,
        fn=lambda v, c: {"n": v["x"] + torch.randn(4, generator=c.generator)},
    )

    def run(seed):
        c = ctx()
        c.generator = torch.Generator().manual_seed(seed)
        return run_units([u], {"x": torch.zeros(4)}, c)["n"]

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


# --- units as other frameworks write them -------------------------------------------------------


def test_a_unit_that_rewrites_a_value_makes_a_new_version_that_later_units_read():
    def round_up(values, ctx):
        return {"height": [-(-h // 16) * 16 for h in values["height"]]}

    seen = {}

    def early(values, ctx):
        seen["early"] = values["height"]
        return {"a": 0}

    def late(values, ctx):
        seen["late"] = values["height"]
        return {"loss": torch.tensor(float(values["height"][0]))}

    graph = UnitGraph(
        [
            Unit("early", ("height",), ("a",), early),
            Unit("round", ("height",), ("height",), round_up),
            Unit("late", ("height", "a"), ("loss",), late),
        ],
        sources=("height",),
    )
    assert graph.versions == {"height": ("height", "height.v2")}
    assert graph["round"].inputs == ("height",) and graph["round"].outputs == ("height.v2",)
    assert graph["late"].inputs == ("height.v2", "a") and graph["early"].inputs == ("height",)
    out = run_units(list(graph), {"height": [60]}, ctx())
    assert seen == {"early": [60], "late": [64]} and out["height"] == [60] and out["height.v2"] == [64]


def test_outputting_a_source_without_reading_it_says_how_to_rewrite_it():
    with pytest.raises(GraphError, match=re.escape("to rewrite it, list 'height' among the unit's inputs too")):
        UnitGraph([unit("a", (), ("height",)), unit("loss", ("height",), ("loss",))], sources=("height",))


def test_an_optional_input_may_be_absent_and_the_unit_may_then_leave_outputs_out():
    def edit(values, ctx):
        return {} if values["edit_image"] is None else {"edit": values["edit_image"] * 2}

    u = Unit("edit", ("edit_image",), ("edit",), edit, optional=("edit_image",))
    assert u({}, ctx()) == {"edit": None}
    assert u({"edit_image": 3}, ctx()) == {"edit": 6}
    strict = Unit("edit", ("edit_image",), ("edit",), edit)
    with pytest.raises(GraphError, match=re.escape("is missing inputs ['edit_image']")):
        strict({}, ctx())
    with pytest.raises(GraphError, match=re.escape("returned [] but declares outputs ['edit']")):
        strict({"edit_image": None}, ctx())


def test_the_unit_decorator_reads_inputs_and_optional_ones_from_the_signature():
    from autosplit.graph import unit as as_unit

    @as_unit(outputs=("latents", "edit"), components=("vae",))
    def encode(ctx, image, edit_image=None, tiled=False):
        """Encodes the image (and the edit image, if any)."""
        assert tiled is False  # an absent input with a default gets it
        return {"latents": image * 2} | ({} if edit_image is None else {"edit": edit_image + 1})

    assert (encode.name, encode.inputs, encode.optional, encode.components) == (
        "encode",
        ("image", "edit_image", "tiled"),
        ("edit_image", "tiled"),
        ("vae",),
    )
    assert encode.doc == "Encodes the image (and the edit image, if any)."
    assert encode({"image": 3}, ctx()) == {"latents": 6, "edit": None}
    assert encode({"image": 3, "edit_image": 1}, ctx()) == {"latents": 6, "edit": 2}

    def bad(*values):
        return {}

    with pytest.raises(GraphError, match=re.escape("@unit bad: take the context first")):
        as_unit(outputs=("x",))(bad)
