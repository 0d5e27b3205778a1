"""The fission recorder and replay: the replayed random part returns bit-identical outputs with the
same generator; what cannot be replayed is reported, not recorded wrongly."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLQwenImage

from autosplit.errors import CacheError
from autosplit.fission import record, replay
from autosplit.graph import Unit, UnitContext
from autosplit.profiler import new_fake_mode


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
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False]).eval().requires_grad_(False)

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


@pytest.mark.parametrize("fn, problem", [
    (lambda v, c: {"y": v["x"] * float(torch.rand((), generator=c.generator)) + torch.randn(4, generator=c.generator)},
     "reads a value into Python (_local_scalar_dense"),
    (lambda v, c: {"y": torch.randn_like(v["x"] + torch.randn(4, generator=c.generator),
                                         generator=torch.Generator().manual_seed(1))},
     "passes aten::randn_like.generator a generator other than the step's"),
])
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
        _, rec = record(Unit("u", ("x",), ("latents", "noisy"), fn, ("net",)), {"x": torch.ones(1, 4)},
                        ctx(components={"net": net}))
    assert rec.problem is None and rec.dirty_outputs == ("noisy",) and rec.reads == ("latents",)


def test_replay_refuses_foreign_or_stale_graphs():
    graph = {"version": 1, "ops": [{"op": "myns::evil", "args": {"list": []}, "kwargs": {"dict": {}}}],
             "outputs": {}, "frontier": 0}
    with pytest.raises(CacheError, match="fission graph names op 'myns::evil'; only aten ops are replayed"):
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
    from autosplit.fission import recording_unit

    def fn(values, c):  # .tolist() does not dispatch: the recorder cannot see this read
        index = torch.randint(0, 4, (1,), generator=c.generator).tolist()[0]
        return {"sigma": values["x"][:, index] * 1, "noise": torch.randn(1, 4, generator=c.generator)}

    unit = Unit("u", ("x", "sample_id"), ("sigma", "noise"), fn)
    stage1 = recording_unit(unit, ("noise",), 0, ())
    values = {"x": torch.arange(8.0).view(2, 4)[:1], "sample_id": [0]}
    with pytest.raises(CacheError, match="its deterministic part changed with the step's random numbers"):
        stage1(values, ctx())


def test_ops_that_reach_files_are_never_replayed():
    graph = {"version": 1, "ops": [{"op": "aten::from_file", "args": {"list": ["/etc/hostname", True, 4]},
                                    "kwargs": {"dict": {}}}], "outputs": {}, "frontier": 0}
    with pytest.raises(CacheError, match="'aten::from_file', which is never replayed"):
        replay(graph, [], {}, ctx())
