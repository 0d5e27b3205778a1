"""Wan 2.1 text-to-video keeps the adapter contract, on clips of two frame counts."""

from __future__ import annotations

from tests.adapters.contract import AdapterContract, Tester


class TestWan(AdapterContract):
    tester = Tester(pipeline="wan",
                    frozen_classes=("transformers:UMT5EncoderModel", "diffusers:AutoencoderKLWan"),
                    generate=dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0))


def test_clips_of_two_frame_counts_cache_in_two_buckets(tmp_path, autosplit_home):
    import zarr

    from autosplit.cli import main

    assert main(["run", "--pipeline", "wan", "--task", "sft:data_process", "--output_path", str(tmp_path)]) == 0
    group = zarr.open_group(str(tmp_path), mode="r")
    buckets = group.attrs["autosplit"]["buckets"]
    assert [(b["key"], b["num_samples"]) for b in buckets] == [([32, 32, 5], 3), ([32, 32, 9], 3)]
    assert group["buckets/0/image_latents"].shape == (3, 16, 2, 4, 4)  # 5 frames -> 2 latent frames
    assert group["buckets/1/image_latents"].shape == (3, 16, 3, 4, 4)  # 9 frames -> 3
