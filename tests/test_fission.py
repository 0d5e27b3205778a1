"""The fission recorder and replay: the replayed random part returns bit-identical outputs with the
same generator; what cannot be replayed is reported, not recorded wrongly."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLQwenImage

from autosplit.errors import CacheError
from autosplit.graph import Unit, UnitContext
from autosplit.planning.fission import Split, record, replay
from autosplit.planning.tracer import new_fake_mode


def ctx(seed=5, components=None):
    return UnitContext(components or {}, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(seed))


def record_and_replay(fn, outputs, values, components=None):
    unit = Unit("u", tuple(values), outputs, fn, components=tuple(components or ()))
    out, rec = record(unit, values, ctx(components=components))
    assert rec.problem is None, rec.problem
    graph = json.loads(rec.graph_bytes())  # what stage 2 gets back from the cache
    again = replay(graph, rec.frontier, {n: out[n] for n in rec.reads}, ctx(components=components))
    return out, rec, again


def test_flow_matching_noising_replays_bit_exactly():
    def fn(values, c):
        latents = values["image"] * 2
        noise = torch.randn(latents.shape, generator=c.generator)
        sigma = torch.rand((latents.shape[0],), generator=c.generator).view(-1, 1)
        return {"latents": latents, "noisy": (1 - sigma) * latents + sigma * noise, "target": noise - latents}

    out, rec, again = record_and_replay(fn, ("latents", "noisy", "target"), {"image": torch.randn(1, 4)})
    assert rec.dirty_outputs == ("noisy", "target") and rec.reads == ("latents",) and rec.frontier == []
    assert all(torch.equal(again[k], out[k]) for k in ("noisy", "target"))


def test_vae_posterior_sample_caches_mean_and_std_as_frontier():
    vae = (
        AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
        .eval()
        .requires_grad_(False)
    )

    def fn(values, c):
        dist = c.components["vae"].encode(values["image"]).latent_dist
        return {"latents": dist.mean + dist.std * torch.randn(dist.mean.shape, generator=c.generator)}

    image = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        out, rec, again = record_and_replay(fn, ("latents",), {"image": image}, {"vae": vae})
        dist = vae.encode(image).latent_dist
    assert [tuple(t.shape) for t in rec.frontier] == [tuple(dist.mean.shape)] * 2
    assert torch.equal(rec.frontier[0], dist.std) and torch.equal(rec.frontier[1], dist.mean)
    assert torch.equal(again["latents"], out["latents"])
    assert not any(op["op"].startswith("aten::conv") for op in rec.graph["ops"])  # the VAE is not replayed


def test_in_place_ops_and_views_replay():
    def fn(values, c):
        x = values["x"].clone()
        noise = torch.randn(2, 3, generator=c.generator)
        noise.mul_(x[:, :3])
        flat = noise.view(-1)
        flat.add_(1)
        return {"x2": x, "y": noise.t().contiguous(), "parts": torch.split(flat, 2)[1]}

    out, rec, again = record_and_replay(fn, ("x2", "y", "parts"), {"x": torch.randn(2, 4)})
    assert rec.dirty_outputs == ("y", "parts") and len(rec.frontier) == 1
    assert all(torch.equal(again[k], out[k]) for k in ("y", "parts"))


def test_a_frontier_tensor_is_captured_before_the_random_part_writes_into_it():
    def fn(values, c):
        x = values["x"] * 1
        y = torch.randn(4, generator=c.generator)
        x.add_(y)  # x becomes random; its clean value was read first
        return {"y": y, "x": x}

    out, rec = record(Unit("u", ("x",), ("y", "x"), fn), {"x": torch.ones(4)}, ctx())
    assert rec.dirty_outputs == ("y", "x") and torch.equal(rec.frontier[0], torch.ones(4))
    assert torch.equal(replay(rec.graph, rec.frontier, {}, ctx())["x"], out["x"])


@pytest.mark.parametrize(
    "fn, problem",
    [
        (
            lambda v, c: {
                "y": v["x"] * float(torch.rand((), generator=c.generator)) + torch.randn(4, generator=c.generator)
            },
            "reads a value into Python (_local_scalar_dense",
        ),
        (
            lambda v, c: {
                "y": torch.randn_like(
                    v["x"] + torch.randn(4, generator=c.generator), generator=torch.Generator().manual_seed(1)
                )
            },
            "passes aten::randn_like.generator a generator other than the step's",
        ),
    ],
)
def test_what_cannot_be_replayed_is_reported(fn, problem):
    _, rec = record(Unit("u", ("x",), ("y",), fn), {"x": torch.ones(4)}, ctx())
    assert rec.problem is not None and problem in rec.problem


def test_a_view_taken_before_random_numbers_were_written_is_reported():
    def fn(values, c):
        x = values["x"] * 1
        head = x[:2]  # a view of x, taken while x was clean
        x.add_(torch.randn(4, generator=c.generator))
        return {"y": head * 2}

    _, rec = record(Unit("u", ("x",), ("y",), fn), {"x": torch.ones(4)}, ctx())
    assert "reads a view of a tensor random numbers were written into" in rec.problem


def test_recording_works_on_fake_tensors():
    def fn(values, c):
        latents = c.components["net"](values["x"])
        return {"latents": latents, "noisy": latents + torch.randn(latents.shape, generator=c.generator)}

    with new_fake_mode():
        net = torch.nn.Linear(4, 4).requires_grad_(False)
        _, rec = record(
            Unit("u", ("x",), ("latents", "noisy"), fn, ("net",)), {"x": torch.ones(1, 4)}, ctx(components={"net": net})
        )
    assert rec.problem is None and rec.dirty_outputs == ("noisy",) and rec.reads == ("latents",)


def test_replay_refuses_foreign_or_stale_graphs():
    graph = {
        "version": 1,
        "ops": [{"op": "myns::evil", "args": {"list": []}, "kwargs": {"dict": {}}}],
        "outputs": {},
        "frontier": 0,
    }
    with pytest.raises(CacheError, match=r"fission graph: op 0 \(myns::evil\) is not an op the recorder emits"):
        replay(graph, [], {}, ctx())
    with pytest.raises(CacheError, match="fission graph version 0 is not 1; re-run stage 1"):
        replay({**graph, "version": 0}, [], {}, ctx())
    with pytest.raises(CacheError, match="reads 0 frontier tensors but 1 were cached"):
        replay(graph, [torch.ones(1)], {}, ctx())


def test_a_clean_tensor_written_in_place_after_the_random_part_read_it_is_read_again():
    def fn(values, c):
        latents = values["x"] * 1
        noise = torch.randn(4, generator=c.generator)
        noisy = latents + noise
        latents.mul_(0.5)  # clean, in place, after the random part read it
        return {"noisy": noisy, "target": noise - latents}

    out, rec, again = record_and_replay(fn, ("noisy", "target"), {"x": torch.ones(4)})
    assert len(rec.frontier) == 2  # both values of latents
    assert all(torch.equal(again[k], out[k]) for k in ("noisy", "target"))


def test_a_global_generator_passed_explicitly_is_random_not_cached():
    def fn(values, c):
        return {"z": values["x"] * 2, "noisy": values["x"] + torch.randn(4, generator=torch.default_generator)}

    _, rec = record(Unit("u", ("x",), ("z", "noisy"), fn), {"x": torch.ones(4)}, ctx())
    assert rec.dirty_outputs == ("noisy",)
    assert "a generator other than the step's" in rec.problem


def test_freed_random_storages_do_not_taint_later_clean_tensors():
    def fn(values, c):
        noise = torch.randn(64, generator=c.generator)
        for _ in range(50):  # random temporaries, freed: the allocator hands their memory out again
            noise = noise * 1.01
        clean = values["x"]
        for _ in range(50):
            clean = clean * 3
        return {"clean": clean, "noisy": noise}

    _, rec = record(Unit("u", ("x",), ("clean", "noisy"), fn), {"x": torch.ones(64)}, ctx())
    assert rec.problem is None and rec.dirty_outputs == ("noisy",)


def test_a_random_value_read_through_tolist_stops_stage1_before_anything_is_cached():
    from autosplit.planning.fission import recording_unit

    def fn(values, c):  # .tolist() does not dispatch: the recorder cannot see this read
        index = torch.randint(0, 4, (1,), generator=c.generator).tolist()[0]
        return {"sigma": values["x"][:, index] * 1, "noise": torch.randn(1, 4, generator=c.generator)}

    unit = Unit("u", ("x", "sample_id"), ("sigma", "noise"), fn)
    stage1 = recording_unit(unit, Split(("noise",), 0, ()))
    values = {"x": torch.arange(8.0).view(2, 4)[:1], "sample_id": [0]}
    with pytest.raises(CacheError, match="its deterministic part changed with the step's random numbers"):
        stage1(values, ctx())


def test_ops_that_reach_files_are_never_replayed():
    graph = {
        "version": 1,
        "ops": [{"op": "aten::from_file", "args": {"list": ["/etc/hostname", True, 4]}, "kwargs": {"dict": {}}}],
        "outputs": {},
        "frontier": 0,
    }
    with pytest.raises(CacheError, match=r"op 0 \(aten::from_file\) is not an op the recorder emits"):
        replay(graph, [], {}, ctx())


# A cached graph is untrusted input: a replay runs only what the recorder emits (REPLAYABLE_OPS,
# arguments of their schemas' kinds, bounded sizes), checked for the whole graph before any op runs.


def op(name, *args, **kwargs):
    return {"op": name, "args": {"list": list(args)}, "kwargs": {"dict": kwargs}}


def out(i, j=0):
    return {"t": ["o", i, j]}


def graph_of(*ops, outputs=None, frontier=0):
    return {"version": 1, "ops": list(ops), "outputs": outputs or {"noise": out(len(ops) - 1)}, "frontier": frontier}


def randn(*size):
    return op("aten::randn.generator", {"list": list(size)}, generator={"gen": "step"})


SPARSE_CHAIN = graph_of(  # writes out of bounds on the heap (SIGSEGV) when run
    op("aten::full", {"list": [2, 1]}, 1 << 40, dtype={"dtype": "int64"}),
    op("aten::full", {"list": [1]}, 1.0),
    op("aten::_sparse_coo_tensor_unsafe", out(0), out(1), {"list": [4, 4]}),
    op("aten::_to_dense", out(2)),
)


@pytest.mark.parametrize(
    "graph, reason",
    [
        (SPARSE_CHAIN, r"op 0 \(aten::full\) is not an op the recorder emits"),
        (graph_of(randn(1, 4), op("aten::zeros_like", out(0))), r"op 1 \(aten::zeros_like\) is not an op the recorder"),
        (
            graph_of(randn(1 << 20, 1 << 20)),
            r"op 0 \(aten::randn.generator\) argument 'size' asks for 1099511627776 "
            r"elements, above the replay's limit of 67108864",
        ),
        (
            graph_of(randn(4), op("aten::expand", out(0), {"list": [1 << 14, 1 << 14, 4]})),
            r"op 1 \(aten::expand\) argument 'size' asks for 1073741824 elements",
        ),
        (
            graph_of(randn(4), op("aten::repeat", out(0), {"list": [1 << 13, 1 << 13]})),  # 1 GiB, found by the dry run
            r"op 1 \(aten::repeat\) returns 268435456 elements .*above the replay's limit of 67108864 per op",
        ),
        (
            graph_of(randn(4), op("aten::add.Tensor", out(0), "/etc/passwd")),
            r"op 1 \(aten::add.Tensor\) argument 'other' is \"/etc/passwd\", not a Tensor",
        ),
        (graph_of(op("aten::from_file", "/etc/hostname", True, 4)), r"op 0 \(aten::from_file\) is not an op the"),
        (
            graph_of(randn(4), op("aten::div.Tensor_mode", out(0), out(0), rounding_mode="floor")),
            r"op 1 \(aten::div.Tensor_mode\) is not an op the recorder emits",
        ),
        (
            graph_of(randn(4), op("aten::_to_copy", out(0), layout={"layout": "sparse_coo"})),
            r"op 1 \(aten::_to_copy\) argument 'layout' is .*sparse_coo.*, not a Layout",
        ),
        (graph_of(randn(4), op("aten::_to_copy", out(0), dtype={"dtype": "float8_e4m3fn"})), r"argument 'dtype' is"),
        (graph_of(randn(4), op("aten::_to_copy", out(0), device={"device": "file:/tmp"})), r"argument 'device' is"),
        (graph_of(randn(4), op("aten::mul.Tensor", out(0), out(1))), r"op 1 \(aten::mul.Tensor\) argument 'other' is"),
        (graph_of(op("aten::mul.Tensor", {"t": ["f", 0]}, 2)), r"op 0 \(aten::mul.Tensor\) argument 'self' is"),
        (graph_of(op("aten::mul.Tensor", {"t": ["v", "secret"]}, 2)), r"argument 'self' is"),
        (graph_of(randn(4), op("aten::mul.Tensor", out(0), 2, 3)), r"takes 2 positional arguments, the graph passes 3"),
        (graph_of(randn(4), op("aten::mul.Tensor", out(0), 2, alpha=3)), r"takes no keyword argument 'alpha'"),
        (graph_of(*[randn(4)] * 4097), r"it holds 4097 ops, above the cap of 4096"),
        (graph_of(randn(4), outputs={"noise": "/etc/passwd"}), r"output 'noise' is not made of references"),
        (graph_of(randn(4), op("aten::view", out(0, 3), {"list": [4]})), r"op 1 \(aten::view\) fails"),
    ],
)
def test_a_crafted_graph_is_refused_before_any_op_runs(graph, reason):
    step = ctx()
    before = step.generator.get_state()
    with pytest.raises(CacheError, match=f"^fission graph: .*{reason}.*re-run stage 1") as error:
        replay(json.loads(json.dumps(graph)), [], {}, step)
    assert "\n" not in str(error.value)
    assert torch.equal(step.generator.get_state(), before)  # not even the allowed first draw ran


def test_the_size_limit_grows_with_the_tensors_the_replay_reads():
    from autosplit.planning.replay_check import ELEMENT_GROWTH, MIN_ELEMENT_LIMIT, element_limit

    assert element_limit([torch.ones(4), 3.0]) == MIN_ELEMENT_LIMIT
    big = torch.empty(MIN_ELEMENT_LIMIT // 4, dtype=torch.uint8)
    assert element_limit([big]) == ELEMENT_GROWTH * big.numel()


def test_every_replayable_op_is_in_this_torch_and_takes_only_checked_kinds():
    from autosplit.planning.replay_check import _KINDS, REPLAYABLE_OPS, _resolve

    for name in sorted(REPLAYABLE_OPS):
        schema = _resolve(name)._schema
        assert schema.name == name.split(".")[0] and "file" not in name, name
        for arg in schema.arguments:
            kind = str(arg.real_type).removeprefix("Optional[").removesuffix("]")
            kind = kind.removeprefix("List[").removeprefix("Optional[").removesuffix("]").removesuffix("]")
            assert kind in _KINDS, (name, arg.name, arg.real_type)  # never str, Dimname, Storage, ...


def test_the_recorder_refuses_an_op_a_replay_would_not_run_and_the_unit_stays_whole():
    def fn(values, c):
        noise = torch.randn(4, generator=c.generator)
        return {"x": values["x"] * 2, "noise": torch.zeros_like(noise) + noise}

    _, rec = record(Unit("u", ("x",), ("x", "noise"), fn), {"x": torch.ones(4)}, ctx())
    assert rec.problem == (
        "its random part calls aten::zeros_like, which a replay does not run (only the ops of "
        "replay_check.REPLAYABLE_OPS are replayed)"
    )


@pytest.mark.parametrize(
    "grow, problem",
    [
        (lambda t: t.expand(1 << 27), "op 1 (aten::expand) argument 'size' asks for 134217728 elements"),
        (lambda t: t.repeat(1 << 14, 1 << 13), "makes tensors of up to 134217728 elements"),
    ],
)
def test_the_recorder_refuses_what_the_replay_size_limit_would(grow, problem):
    def fn(values, c):
        return {"x": values["x"] * 2, "noise": grow(torch.randn(1, generator=c.generator))}

    with new_fake_mode():  # nothing allocated
        _, rec = record(Unit("u", ("x",), ("x", "noise"), fn), {"x": torch.ones(4)}, ctx())
    assert rec.problem is not None and problem in rec.problem


def sampled_latents_bf16(values, c):  # tasks.sample_latents in bfloat16: casts, a frontier of two
    mean, std = values["mean"] * 1, values["std"] * 1
    noise = torch.randn(mean.shape, generator=c.generator, dtype=torch.float32).to(mean.device, mean.dtype)
    return {"mean2": mean, "latents": mean + std * noise}


def noise_math(values, c):  # the elementwise math, reductions and views random numbers go through
    x = values["x"] * 1
    a = torch.randn_like(x, generator=c.generator)
    t = torch.sigmoid(torch.randn((1,), generator=c.generator)) * 0.9 + 0.05
    keep = torch.bernoulli(torch.full_like(x, 0.5), generator=c.generator)
    idx = torch.randint(0, 4, (1,), generator=c.generator)
    b = torch.where(keep > 0, a, -a).clamp(-3, 3)
    s = (a.exp() + b.abs().sqrt() + b.abs().log1p()).mean(dim=1, keepdim=True)
    d = x * torch.empty_like(x).bernoulli_(0.9, generator=c.generator) / 0.9 + a  # dropout, with the step's
    r = x[:, idx] * t.reshape(1, 1).expand(1, 4)
    return {
        "x": x,
        "s": s,
        "d": d,
        "r": r,
        "p": torch.cat([a, b]).flatten().unsqueeze(0).permute(1, 0).squeeze(),
        "h": (a.to(torch.bfloat16) * 2).float(),
    }


@pytest.mark.parametrize(
    "fn, outputs, values",
    [
        (
            sampled_latents_bf16,
            ("mean2", "latents"),
            {"mean": torch.randn(1, 4, 1, 8, 8).bfloat16(), "std": torch.rand(1, 4, 1, 8, 8).bfloat16()},
        ),
        (noise_math, ("x", "s", "d", "r", "p", "h"), {"x": torch.randn(1, 4)}),
    ],
)
def test_what_the_recorder_emits_passes_the_checks_and_replays_bit_exactly(fn, outputs, values):
    from autosplit.planning.replay_check import check_graph, element_limit

    result, rec, again = record_and_replay(fn, outputs, values)
    reads = {n: result[n] for n in rec.reads}
    check_graph(
        json.loads(rec.graph_bytes()),
        num_frontier=len(rec.frontier),
        reads=reads,
        limit=element_limit([*rec.frontier, *reads.values()]),
    )
    assert all(torch.equal(again[k], result[k]) for k in rec.dirty_outputs)


def test_an_input_stage2_supplies_is_replayed_from_what_stage2_gives():
    """DiffSynth's image unit: the encoding is clean, the noise passed through (and scaled) is not."""

    def fn(values, c):
        return {"latents": values["image"] * 2, "passed": values["noise"], "scaled": values["noise"] * 0.5}

    unit = Unit("u", ("image", "noise"), ("latents", "passed", "scaled"), fn)
    values = {"image": torch.ones(1, 4), "noise": torch.randn(1, 4)}
    _, rec = record(unit, values, ctx(), late=("noise",))
    assert rec.problem is None and rec.dirty_outputs == ("passed", "scaled") and rec.frontier == []
    graph = json.loads(rec.graph_bytes())
    assert graph["outputs"]["passed"] == {"t": ["i", "noise", 0]} and len(graph["ops"]) == 1
    other = torch.randn(1, 4)
    again = replay(graph, [], {}, ctx(), late={"noise": other})
    assert again["passed"] is other and torch.equal(again["scaled"], other * 0.5)


def test_a_graph_naming_an_input_stage2_does_not_supply_is_refused():
    graph = {"version": 1, "ops": [], "outputs": {"x": {"t": ["i", "secret", 0]}}, "frontier": 0, "devices": {}}
    with pytest.raises(CacheError, match="output 'x' is not made of references"):
        replay(graph, [], {}, ctx(), late={"noise": torch.zeros(1)})
    graph["outputs"]["x"] = {"t": ["i", "noise", 5]}  # a leaf the input does not have
    with pytest.raises(CacheError, match="its outputs name a tensor no op returned"):
        replay(graph, [], {}, ctx(), late={"noise": torch.zeros(1)})


def test_a_branch_on_a_supplied_random_input_keeps_the_unit_whole():
    def fn(values, c):
        scale = 2.0 if float(values["noise"].mean()) > 0 else 1.0
        return {"latents": values["image"] * 2, "noisy": values["noise"] * scale}

    unit = Unit("u", ("image", "noise"), ("latents", "noisy"), fn)
    _, rec = record(unit, {"image": torch.ones(1, 4), "noise": torch.randn(1, 4)}, ctx(), late=("noise",))
    assert rec.problem is not None and "reads a value into Python" in rec.problem


def test_writing_into_a_supplied_input_keeps_the_unit_whole_and_a_crafted_write_is_refused():
    def fn(values, c):
        return {"latents": values["image"] * 2, "noisy": values["noise"].mul_(2)}

    unit = Unit("u", ("image", "noise"), ("latents", "noisy"), fn)
    _, rec = record(unit, {"image": torch.ones(1, 4), "noise": torch.randn(1, 4)}, ctx(), late=("noise",))
    assert rec.problem == "it writes in place into noise, an input stage 2 supplies (mul_); compute a new tensor"
    noise = torch.randn(1, 4)
    crafted = {
        "version": 1,
        "ops": [{"op": "aten::mul_.Scalar", "args": {"list": [{"t": ["i", "noise", 0]}, 0]}, "kwargs": {"dict": {}}}],
        "outputs": {"noisy": {"t": ["o", 0, 0]}},
        "frontier": 0,
        "devices": {},
    }
    before = noise.clone()
    with pytest.raises(CacheError, match=r"writes in place into an input stage 2 supplies \('noise'\)"):
        replay(crafted, [], {}, ctx(), late={"noise": noise})
    assert torch.equal(noise, before)
