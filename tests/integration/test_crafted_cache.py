"""A cache is untrusted input (issue 18): `--task sft:train` executes only the plan it makes itself,
and replays only graphs the fission recorder could have written. A crafted cache is refused with one
line and exit code 2, never run, on the tiny Qwen-Image pipeline with a fused encode + noise unit
split inside (as in tests/integration/test_fission.py). Crafted caches are written through the
cache writer, as stage 1 writes one."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import autosplit.workflow.session
from autosplit.cli import main
from autosplit.plan import CachedValue, Plan
from autosplit.storage.cache import Bucket, CacheReader, CacheWriter
from tests.integration.test_fission import STEPS, fused_graph

REPO = Path(__file__).resolve().parents[2]
GRAPH = "encode_image.graph"
#: `python -m autosplit` with the fused unit in the graph, so that a crash fails the test, not pytest
DRIVER = (
    "import sys; import autosplit.workflow.session as session; "
    "from tests.integration.test_fission import fused_graph; session.build_graph = fused_graph('noise'); "
    "from autosplit.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def split_cache(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    cache = tmp_path_factory.mktemp("crafted") / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autosplit.workflow.session, "build_graph", fused_graph("noise"))
        assert main(["run", "--task", "sft:data_process", "--output_path", str(cache), *STEPS]) == 0
    return cache


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    monkeypatch.setattr(autosplit.workflow.session, "build_graph", fused_graph("noise"))


def rewrite(
    source: Path,
    target: Path,
    *,
    plan: Plan | None = None,
    edit: Callable[[dict[str, Any]], dict[str, Any]] = lambda values: values,
) -> Path:
    """A copy of the cache `source` written through CacheWriter, with `plan` for its plan and each
    sample's values passed through `edit`."""
    reader = CacheReader(source)
    manifest, index = reader.manifest, reader.group["index"]
    rows: dict[int, list[tuple[int, int]]] = {}
    for i, (bucket, row) in enumerate(zip(reader.bucket_of.tolist(), reader.row_of.tolist())):
        rows.setdefault(bucket, []).append((row, i))
    buckets = [
        Bucket(b["id"], tuple(b["key"]), tuple(i for _, i in sorted(rows[b["id"]]))) for b in manifest["buckets"]
    ]
    writer = CacheWriter(
        target,
        plan=plan or reader.plan,
        buckets=buckets,
        key=manifest["key"],
        shard_size=manifest["shard_size"],
        zstd_level=3,
        source_sha256=[bytes(r) for r in index["source_sha256"][...]],
        extra_index={n: index[n][...] for n in ("image_sha256", "prompt_sha256", "size")},
        info={"dataset": manifest["dataset"]},
    )
    for bucket in buckets:
        for shard, (lo, hi) in enumerate(bucket.shards(writer.shard_size)):
            writer.write_shard(bucket, shard, [edit(reader.read(i)) for i in bucket.samples[lo:hi]])
    writer.finish()
    return target


def with_graph(graph: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    raw = json.dumps(graph).encode()
    return lambda values: {**values, GRAPH: torch.frombuffer(bytearray(raw), dtype=torch.uint8)}


def train(cache: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "run",
            "--task",
            "sft:train",
            "--dataset_base_path",
            str(cache),
            "--output_path",
            str(out),
            *STEPS,
            "--max_steps",
            "1",
            *extra,
        ]
    )


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("autosplit: error: ")
    return line


def op(name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"op": name, "args": {"list": list(args)}, "kwargs": {"dict": kwargs}}


def out(i: int) -> dict[str, Any]:
    return {"t": ["o", i, 0]}


def noise_graph(*ops: dict[str, Any]) -> dict[str, Any]:
    """A graph returning the unit's random output `noise` from its last op."""
    return {
        "version": 1,
        "ops": list(ops),
        "outputs": {"noise": out(len(ops) - 1)},
        "frontier": 0,
        "devices": {"frontier": [], "reads": {}},
    }


def randn(*size: int) -> dict[str, Any]:
    return op("aten::randn.generator", {"list": list(size)}, generator={"gen": "step"})


#: writes out of bounds on the heap when replayed as it is (a SIGSEGV before these checks)
SPARSE_CHAIN = noise_graph(
    op("aten::full", {"list": [2, 1]}, 1 << 40, dtype={"dtype": "int64"}),
    op("aten::full", {"list": [1]}, 1.0),
    op("aten::_sparse_coo_tensor_unsafe", out(0), out(1), {"list": [4, 4]}),
    op("aten::_to_dense", out(2)),
)


def test_a_cache_as_stage1_wrote_it_trains_checked_against_this_runs_own_plan(split_cache, tmp_path, caplog):
    cache = rewrite(split_cache, tmp_path / "copy")
    with caplog.at_level(logging.INFO):
        assert train(cache, tmp_path / "o") == 0
    assert "cannot make its own plan" not in caplog.text
    assert (tmp_path / "o" / "lora.safetensors").is_file()


def moved_to_stage1(plan: Plan) -> Plan:
    """sample_timestep in stage 1: the timestep (and sigma) would come from the cache."""
    units = tuple(dataclasses.replace(u, stage=1) if u.name == "sample_timestep" else u for u in plan.units)
    return dataclasses.replace(
        plan,
        units=units,
        cached=(*plan.cached, CachedValue("sigma", "sample_timestep"), CachedValue("timestep", "sample_timestep")),
    )


def noise_cached(plan: Plan) -> Plan:
    """The noise, a per-step draw, cached: every step would train on the same (here zero) noise."""
    return dataclasses.replace(plan, cached=(*plan.cached, CachedValue("noise", "encode_image")))


ZEROS = {"sigma": torch.zeros(()), "timestep": torch.zeros(()), "noise": torch.zeros(16, 1, 8, 12)}


@pytest.mark.parametrize(
    "craft, difference",
    [
        (moved_to_stage1, "unit 'sample_timestep': stage 1 in the cache, 2 in this run's plan"),
        (noise_cached, "value 'noise' is cached in the cache, not in this run's plan"),
    ],
)
def test_a_plan_this_run_would_not_make_is_refused_naming_the_difference(
    split_cache, tmp_path, capsys, craft, difference
):
    plan = craft(CacheReader(split_cache).plan)
    extra = {v.name for v in plan.cached} - {v.name for v in CacheReader(split_cache).plan.cached}
    cache = rewrite(
        split_cache, tmp_path / "crafted", plan=plan, edit=lambda values: {**values, **{n: ZEROS[n] for n in extra}}
    )
    assert train(cache, tmp_path / "o") == 2
    line = error_line(capsys)
    assert f"{cache}: its plan is not the plan this run makes ({difference})" in line
    assert line.endswith("re-run stage 1 (--task sft:data_process) with this run's settings")
    assert not (tmp_path / "o" / "lora.safetensors").exists()


def test_without_the_stage1_models_the_cut_is_checked_against_the_planners_rules(
    split_cache, tiny_model, tmp_path, capsys, caplog
):
    dit_only = tmp_path / "dit_only"  # a stage-2 machine: this run cannot profile the VAE to make its own plan
    shutil.copytree(tiny_model, dit_only, ignore=shutil.ignore_patterns("text_encoder", "vae", "tokenizer"))
    with caplog.at_level(logging.INFO):
        assert train(split_cache, tmp_path / "ok", "--model_paths", str(dit_only)) == 0
    assert "this run cannot make its own plan" in caplog.text and "lacks components" in caplog.text
    capsys.readouterr()
    cache = rewrite(
        split_cache,
        tmp_path / "crafted",
        plan=moved_to_stage1(CacheReader(split_cache).plan),
        edit=lambda values: {**values, "sigma": ZEROS["sigma"], "timestep": ZEROS["timestep"]},
    )
    assert train(cache, tmp_path / "o", "--model_paths", str(dit_only)) == 2
    assert "(unit 'sample_timestep' runs in stage 1 but draws per-step random numbers)" in error_line(capsys)


def test_the_sparse_heap_write_chain_is_refused_not_run(split_cache, tmp_path):
    cache = rewrite(split_cache, tmp_path / "crafted", edit=with_graph(SPARSE_CHAIN))
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            DRIVER,
            "run",
            "--task",
            "sft:train",
            "--dataset_base_path",
            str(cache),
            "--output_path",
            str(tmp_path / "o"),
            *STEPS,
            "--max_steps",
            "1",
        ],
        cwd=REPO,
        env={**os.environ, "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 2, run.stderr[-2000:]  # -11 would be the segfault
    assert "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line == (
        f"autosplit: error: cache {cache}, value {GRAPH}: op 0 (aten::full) is not an op the recorder "
        f"emits (autosplit.planning.replay_check.REPLAYABLE_OPS); it is not what autosplit's stage 1 records "
        f"(the cache was "
        f"altered or made elsewhere): re-run stage 1 (--task sft:data_process)"
    )
    assert not (tmp_path / "o" / "lora.safetensors").exists()


@pytest.mark.parametrize(
    "graph, reason",
    [
        # the noise swapped for zeros: by an op the recorder never emits, or by a size the replay never makes
        (
            noise_graph(randn(1, 16, 1, 8, 12), op("aten::zeros_like", out(0))),
            "op 1 (aten::zeros_like) is not an op the recorder emits",
        ),
        (
            noise_graph(randn(1 << 20, 1 << 20)),
            "op 0 (aten::randn.generator) argument 'size' asks for 1099511627776 elements, above the replay's limit",
        ),
        # an op with a file or string argument, and a string where an allowed op takes a tensor
        (noise_graph(op("aten::from_file", "/etc/hostname", True, 4)), "op 0 (aten::from_file) is not an op the"),
        (
            noise_graph(randn(1, 16, 1, 8, 12), op("aten::add.Tensor", out(0), "/etc/passwd")),
            "op 1 (aten::add.Tensor) argument 'other' is \"/etc/passwd\", not a Tensor the recorder writes",
        ),
    ],
)
def test_a_graph_the_recorder_would_not_write_is_refused(split_cache, tmp_path, capsys, graph, reason):
    cache = rewrite(split_cache, tmp_path / "crafted", edit=with_graph(graph))
    assert train(cache, tmp_path / "o") == 2
    line = error_line(capsys)
    assert line.startswith(f"autosplit: error: cache {cache}, value {GRAPH}: {reason}")
    assert line.endswith("re-run stage 1 (--task sft:data_process)")
    assert not (tmp_path / "o" / "lora.safetensors").exists()
