"""FLUX.1 keeps the adapter contract (tests/adapters/contract.py)."""

from __future__ import annotations

from tests.adapters.contract import AdapterContract, Tester


class TestFlux(AdapterContract):
    tester = Tester(
        pipeline="flux",
        frozen_classes=("transformers:CLIPTextModel", "transformers:T5EncoderModel", "diffusers:AutoencoderKL"),
        generate=dict(height=64, width=64, num_inference_steps=2),
    )
