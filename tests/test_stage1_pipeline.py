"""Stage 1's pipeline (training/stage1_pipeline.py): which units decode ahead, how decoded samples
make a batch, the writer thread's order, bound and errors, and the per-phase stats line."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from autosplit.cli import main
from autosplit.data import Sample
from autosplit.graph import Unit, UnitContext
from autosplit.training.stage1_pipeline import Batch, Decoder, PhaseTimes, Writer, combine, split_host_units

SOURCES = {"image_path": ["a.png"], "image_size": [(4, 4)], "prompt": ["p"]}


def unit(name, inputs, outputs, components=()):
    return Unit(name, inputs, outputs, lambda v, ctx: {o: None for o in outputs}, components=components)


def test_host_units_use_no_component_and_read_only_dataset_values_or_each_other():
    load = unit("load_image", ("image_path", "image_size"), ("image",))
    flip = unit("random_flip", ("image",), ("flipped",))
    text = unit("encode_prompt", ("prompt",), ("prompt_embeds",), components=("text_encoder",))
    image = unit("encode_image", ("flipped",), ("image_latents",), components=("vae",))
    after = unit("scale", ("image_latents",), ("scaled",))  # no component, but reads an encoder's output
    host, rest = split_host_units([load, text, flip, image, after], SOURCES)
    assert [u.name for u in host] == ["load_image", "random_flip"]
    assert [u.name for u in rest] == ["encode_prompt", "encode_image", "scale"]


def test_decoded_samples_combine_as_the_units_would_have_made_the_batch():
    one = {"prompt": ["a"], "image": torch.ones(1, 3, 2, 2)}
    two = {"prompt": ["b"], "image": torch.zeros(1, 3, 2, 2)}
    assert combine([one]) is one
    batch = combine([one, two])
    assert batch["prompt"] == ["a", "b"]
    assert torch.equal(batch["image"], torch.stack([one["image"][0], two["image"][0]]))
    assert combine([one, {**two, "image": torch.zeros(1, 3, 4, 4)}]) is None  # shapes differ: run on the batch
    assert combine([{**one, "n": 3}, {**two, "n": 4}]) is None  # not a list or a batch of one


def test_the_decoder_keeps_order_and_raises_a_units_error_where_its_sample_is_taken():
    def load(values, ctx):
        if values["prompt"] == ["bad"]:
            raise ValueError("cannot decode")
        time.sleep(0.01 * (3 - len(values["prompt"][0])))  # later samples finish first
        return {"image": torch.tensor([[len(values["prompt"][0])]])}

    samples = [Sample(i, f"{i}.png", p, (4, 4)) for i, p in enumerate(["abc", "ab", "a", "bad"])]
    decoder = Decoder(
        [Unit("load", ("prompt",), ("image",), load)],
        UnitContext({}, torch.device("cpu"), torch.float32),
        samples,
        workers=3,
        lookahead=3,
        times=PhaseTimes(),
    )
    try:
        assert [decoder.next()["image"].item() for _ in range(3)] == [3, 2, 1]
        with pytest.raises(ValueError, match="cannot decode"):
            decoder.next()
    finally:
        decoder.close()


def _writer(write, *, depth=2, times=None):
    return Writer(
        sizes={"s0": 2, "s1": 1},
        split=lambda b: [{"x": torch.tensor(v)} for v in b.values["x"]],
        write=write,
        on_samples=lambda n: None,
        times=times or PhaseTimes(),
        depth=depth,
    )


def test_the_writer_writes_each_shard_once_it_is_whole_in_order():
    written = []
    out = _writer(lambda shard, outputs: written.append((shard, [o["x"].item() for o in outputs])))
    out.put(Batch("s0", [1], [], values={"x": [20]}))
    out.put(Batch("s1", [0], [], values={"x": [30]}))
    out.put(Batch("s0", [0], [], values={"x": [10]}))
    out.close()
    assert written == [("s1", [30]), ("s0", [10, 20])] and out.first_shard_s is not None


def test_a_write_error_is_raised_in_the_callers_thread_and_puts_block_while_the_queue_is_full():
    release = threading.Event()

    def write(shard, outputs):
        release.wait(5)
        raise OSError(28, "No space left on device")

    times = PhaseTimes()
    out = _writer(write, depth=1, times=times)
    out.put(Batch("s1", [0], [], values={"x": [30]}))  # written first: blocks in write
    out.put(Batch("s0", [0], [], values={"x": [10]}))  # fills the queue
    threading.Timer(0.3, release.set).start()
    with pytest.raises(OSError, match="No space left"):
        out.put(Batch("s0", [1], [], values={"x": [20]}))  # waits for room, then sees the error
        out.close()
    assert times.as_dict()["wait_for_writer"] >= 0.2


def test_the_stats_line_says_where_stage1_time_went(tmp_path, tiny_model, tiny_dataset, caplog):
    caplog.set_level("INFO", logger="autosplit")
    cache = tmp_path / "c"
    assert main(["run", "--task", "sft:data_process", "--output_path", str(cache), "--set", "cache.batch_size=4"]) == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage 1 stats ")]
    stats = json.loads(line.removeprefix("stage 1 stats "))
    assert stats["samples"] == stats["encoded"] == 16 and stats["batch_size"] == 4
    assert {"decode", "wait_for_decode", "encode", "pack", "checksum_compress", "write"} <= set(stats["phases_s"])
    assert all(v >= 0 for v in stats["phases_s"].values()) and stats["phases_s"]["encode"] > 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(" samples in " in line and "samples/s); " in line and "encode" in line for line in lines)
