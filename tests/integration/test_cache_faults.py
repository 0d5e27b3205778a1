"""A cache is untrusted input: a deleted, truncated or corrupted file of a cache is a one-line error
naming the array, its samples and the fix, from `inspect --verify` and from training; or, for a
bookkeeping file training does not read, training learns bit-identical weights. Never a
traceback, never zeros read in place of a missing file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autosplit.cli import main

# bit-identical weights across runs: on the CPU, on a GPU host too (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("on_the_cpu")

# one epoch in two steps (one batch per shape bucket): training reads every sample
TRAIN = ["--num_epochs", "1", "--dataset_repeat", "1", "--lora_rank", "4", "--set", "train.batch_size=16"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    """The built-in dataset at 4 samples a shard: 5 shards in 2 buckets, several files per array."""
    path = tmp_path_factory.mktemp("faults") / "cache"
    assert main(["run", "--task", "sft:data_process", "--output_path", str(path), "--set", "cache.shard_size=4"]) == 0
    return path


@pytest.fixture(scope="module")
def weights(cache, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The LoRA learned from the undamaged cache."""
    out = tmp_path_factory.mktemp("faults_ref") / "o"
    assert train(cache, out) == 0
    return load_file(out / "lora.safetensors")


def train(cache: Path, out: Path) -> int:
    return main(["run", "--task", "sft:train", "--dataset_base_path", str(cache), "--output_path", str(out), *TRAIN])


def damage(file: Path, how: str) -> None:
    if how == "delete":
        file.unlink()
    elif how == "truncate":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:  # flip every bit of the middle byte
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))


def damaged_copy(cache: Path, where: Path, rel: str, how: str) -> Path:
    copy = Path(shutil.copytree(cache, where))
    damage(copy / rel, how)
    return copy


def error_line(capsys) -> str:
    """The one line of stderr, which must be an autosplit error."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("autosplit: error: "), err
    return lines[0]


def node(rel: str) -> str:
    """The zarr node a cache file belongs to: an array or group path, or the file itself at the top."""
    if "/c/" in rel:
        return rel[: rel.index("/c/")]
    return rel.removesuffix("/zarr.json") if "/" in rel else rel


def kind(cache: Path, rel: str) -> str:
    """manifest, group zarr.json, or <index|length|value> <zarr.json|chunk>."""
    if "/" not in rel:
        return {"zarr.json": "manifest"}.get(rel, rel)
    if rel.endswith("zarr.json") and json.loads((cache / rel).read_text())["node_type"] == "group":
        return "group zarr.json"
    array = node(rel)
    what = "index" if array.startswith("index/") else "length" if array.endswith(".length") else "value"
    return f"{what} {'zarr.json' if rel.endswith('zarr.json') else 'chunk'}"


def cases(cache: Path) -> list[tuple[str, str]]:
    """Every file deleted; the middle file of each kind (and every per-sample digest) truncated and
    flipped."""
    files = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    by_kind: dict[str, list[str]] = {}
    for rel in files:
        by_kind.setdefault(kind(cache, rel), []).append(rel)
    assert set(by_kind) == {
        "manifest",
        "group zarr.json",
        "index zarr.json",
        "index chunk",
        "length zarr.json",
        "length chunk",
        "value zarr.json",
        "value chunk",
    }
    some = sorted(
        {group[len(group) // 2] for group in by_kind.values()} | {rel for rel in files if "_sha256/c/" in rel}
    )
    return [(rel, "delete") for rel in files] + [(rel, how) for rel in some for how in ("truncate", "flip")]


def check_case(cache: Path, tmp: Path, rel: str, how: str, weights: dict[str, torch.Tensor], capsys) -> None:
    copy = damaged_copy(cache, tmp / "cache", rel, how)
    capsys.readouterr()
    verified = main(["inspect", str(copy), "--verify"])
    verify_line = error_line(capsys) if verified else None
    assert verified in (0, 2)
    trained = train(copy, tmp / "o")
    if trained:
        line = error_line(capsys)
        assert trained == 2 and verify_line is not None, "training failed, --verify did not"
        assert node(rel) in line and node(rel) in verify_line, (line, verify_line)
        assert not (tmp / "o/lora.safetensors").exists()
        return
    capsys.readouterr()
    got = load_file(tmp / "o/lora.safetensors")  # a bookkeeping file, or damage training did not read
    assert sorted(got) == sorted(weights) and all(torch.equal(got[k], weights[k]) for k in weights), (
        "other weights than from the undamaged cache"
    )


@pytest.mark.slow
def test_every_damaged_file_is_a_one_line_error_or_changes_nothing(cache, weights, tmp_path, capsys):
    failures, outcomes = [], {}
    for n, (rel, how) in enumerate(cases(cache)):
        try:
            check_case(cache, tmp_path / str(n), rel, how, weights, capsys)
            outcomes[(rel, how)] = "ok"
        except BaseException as exc:  # a traceback from main() is a failure to report, too
            failures.append(f"{how} {rel}: {type(exc).__name__}: {exc}"[:600])
        shutil.rmtree(tmp_path / str(n), ignore_errors=True)
    assert not failures, "\n".join(failures)
    assert len(outcomes) > 60


# --- the holes of issue 18, one by one --------------------------------------------------------------


def test_a_deleted_shard_is_refused_naming_its_samples_then_stage1_writes_only_it(
    cache, tmp_path, capsys, caplog, tiny_dataset
):
    copy = damaged_copy(cache, tmp_path / "c", "buckets/1/image_latents/c/1/0/0/0", "delete")
    assert main(["inspect", str(copy), "--verify"]) == 2
    line = error_line(capsys)
    assert "array buckets/1/image_latents: its file c/1/0/0/0 is missing" in line
    assert "samples 7, 8, 10, 11 (rows 4-7)" in line and "which writes only the missing shards again" in line
    for reader in ("direct", "tensorstore", "zarr"):  # never trains on the zeros zarr reads for a missing file
        assert train(copy, tmp_path / f"o-{reader}") == 2
        assert "array buckets/1/image_latents: its file c/1/0/0/0 is missing" in error_line(capsys)
    caplog.set_level("INFO", logger="autosplit")
    assert main(["run", "--task", "sft:data_process", "--output_path", str(copy), "--set", "cache.shard_size=4"]) == 0
    assert "shards [3] lost files" in caplog.text and "1 shards to write" in caplog.text
    capsys.readouterr()
    assert main(["inspect", str(copy), "--verify"]) == 0
    assert (copy / "zarr.json").read_bytes() == (cache / "zarr.json").read_bytes()  # the same file sizes
    assert (copy / "buckets/1/image_latents/c/1/0/0/0").read_bytes() == (
        cache / "buckets/1/image_latents/c/1/0/0/0"
    ).read_bytes()


@pytest.mark.parametrize("array", ["buckets/1/image_latents", "index/image_sha256", "buckets/0/prompt_embeds.length"])
def test_a_shrunken_shape_is_refused(cache, tmp_path, capsys, array):
    copy = Path(shutil.copytree(cache, tmp_path / "c"))
    meta = json.loads((copy / array / "zarr.json").read_text())
    full = list(meta["shape"])
    meta["shape"][0] -= 2
    (copy / array / "zarr.json").write_text(json.dumps(meta))
    assert main(["inspect", str(copy), "--verify"]) == 2
    line = error_line(capsys)
    assert f"array {array} is" in line and f"{meta['shape']} but stage 1 wrote" in line and str(full) in line
    assert train(copy, tmp_path / "o") == 2
    assert f"array {array} is" in error_line(capsys)


def test_a_flipped_digest_byte_is_a_checksum_error(cache, tmp_path, capsys):
    copy = damaged_copy(cache, tmp_path / "c", "index/image_sha256/c/0/0", "flip")
    assert main(["inspect", str(copy), "--verify"]) == 2
    line = error_line(capsys)
    assert "array index/image_sha256 of samples 0-15 fails its checksum" in line and "re-run stage 1" in line
    assert train(copy, tmp_path / "o") == 2  # checked when the cache is opened, before the dataset's digests
    assert "array index/image_sha256 of samples 0-15 fails its checksum" in error_line(capsys)


@pytest.mark.parametrize("reader", ["direct", "tensorstore", "zarr"])
@pytest.mark.parametrize(
    ("rel", "how", "message"),
    [
        (
            "buckets/0/prompt_embeds.length/c/1",
            "delete",
            "array buckets/0/prompt_embeds.length: its file c/1 is missing",
        ),
        (
            "buckets/0/prompt_embeds.length/c/0",
            "flip",
            "array buckets/0/prompt_embeds.length of samples 0, 3, 6, 9 (rows 0-3) fails its checksum",
        ),
        ("index/row/c/0", "flip", "array index/row of samples 0-15 fails its checksum"),
        ("buckets/1/prompt_embeds/c/2/0/0", "flip", "cannot read array buckets/1/prompt_embeds of sample 14 (row 9)"),
    ],
)
def test_training_on_a_damaged_cache_is_one_line(cache, tmp_path, capsys, reader, rel, how, message):
    copy = damaged_copy(cache, tmp_path / "c", rel, how)
    code = main(
        [
            "run",
            "--task",
            "sft:train",
            "--dataset_base_path",
            str(copy),
            "--output_path",
            str(tmp_path / "o"),
            *TRAIN,
            "--set",
            f"cache.reader={reader}",
        ]
    )
    line = error_line(capsys)
    assert code == 2 and message in line and "re-run stage 1" in line
