"""Wan 2.1 text-to-video keeps the adapter contract, on clips of two frame counts."""

from __future__ import annotations

from tests.adapters.contract import AdapterContract, Tester


class TestWan(AdapterContract):
    tester = Tester(
        pipeline="wan",
        frozen_classes=("transformers:UMT5EncoderModel", "diffusers:AutoencoderKLWan"),
        generate=dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0),
    )


def test_clips_of_two_frame_counts_cache_in_two_buckets(tmp_path, autosplit_home):
    import zarr

    from autosplit.cli import main

    assert main(["run", "--pipeline", "wan", "--task", "sft:data_process", "--output_path", str(tmp_path)]) == 0
    group = zarr.open_group(str(tmp_path), mode="r")
    buckets = group.attrs["autosplit"]["buckets"]
    assert [(b["key"], b["num_samples"]) for b in buckets] == [([32, 32, 5], 3), ([32, 32, 9], 3)]
    assert group["buckets/0/image_latents"].shape == (3, 16, 2, 4, 4)  # 5 frames -> 2 latent frames
    assert group["buckets/1/image_latents"].shape == (3, 16, 3, 4, 4)  # 9 frames -> 3


def test_mp4_clips_train_like_their_frame_folders(tmp_path, autosplit_home):
    """The built-in clips re-encoded losslessly (FFV1 in .mkv) train to the same LoRA as the frame
    folders; an .mp4 (MPEG-4) dataset trains too."""
    import numpy as np
    import pytest
    import torch
    from PIL import Image

    pytest.importorskip("av")  # the `video` extra; `.[test]` installs it
    from safetensors.torch import load_file

    from autosplit.adapters.builtin import builtin_dataset_root
    from autosplit.cli import main
    from tests.test_data import write_clip

    source = builtin_dataset_root("video")
    lines = (source / "metadata.csv").read_text().splitlines()
    for suffix, codec, pix_fmt in ((".mkv", "ffv1", "bgr0"), (".mp4", "mpeg4", "yuv420p")):
        root = tmp_path / suffix.strip(".")
        root.mkdir()
        rows = [lines[0]]
        for line in lines[1:]:
            folder, prompt = line.split(",", 1)
            frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((source / folder).iterdir())]
            write_clip(root / f"{folder}{suffix}", frames, codec, pix_fmt)
            rows.append(f"{folder}{suffix},{prompt}")
        (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    steps = ["--pipeline", "wan", "--max_steps", "3", "--lora_rank", "4"]
    for name, base in (("frames", source), ("mkv", tmp_path / "mkv"), ("mp4", tmp_path / "mp4")):
        assert (
            main(
                [
                    "run",
                    *steps,
                    "--dataset_base_path",
                    str(base),
                    "--output_path",
                    str(tmp_path / f"out_{name}"),
                    "--cache_path",
                    str(tmp_path / f"cache_{name}"),
                ]
            )
            == 0
        )
    frames, mkv = (load_file(tmp_path / f"out_{n}/lora.safetensors") for n in ("frames", "mkv"))
    assert all(torch.equal(frames[k], mkv[k]) for k in frames)
    assert (tmp_path / "out_mp4/lora.safetensors").is_file()
