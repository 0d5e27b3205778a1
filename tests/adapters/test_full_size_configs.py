"""The built-in full-size configurations (`autosplit plan --fake` without --model_paths) are the
published ones: each component, built on the meta device, has the published parameter count.

Published figures: FLUX.1 transformer 12 B (black-forest-labs model card; 11.9 B in diffusers),
CLIP ViT-L/14 text 123 M and OpenCLIP bigG/14 text 695 M (SDXL report, Podell et al. 2023, and the
OpenCLIP model zoo), T5 v1.1 XXL encoder 4.76 B and UMT5-XXL encoder 5.68 B (the Hub's
safetensors metadata of FLUX.1-dev text_encoder_2 and google/umt5-xxl), SD 1.5 UNet 860 M
(CompVis model card), SDXL UNet 2.6 B (SDXL report), SD VAE 83.7 M, Wan 2.1 T2V "1.3B"
transformer 1.42 B and Wan 2.1 VAE 127 M (Wan-AI model card / diffusers folder). The exact counts
below were computed once from these configs and match those figures; a wrong config key fails.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights

from autosplit.adapters.base import component_from_config, empty_component, get_adapter

CLIP_L, CLIP_BIGG, SD_VAE = 123_060_480, 694_659_840, 83_653_863
# transformers 5 builds T5/UMT5 encoders with `encoder.embed_tokens` untied from `shared` when the
# published config says tie_word_embeddings=false (FLUX.1, Wan): the module holds the vocabulary
# embedding twice, one copy more than the published (unique-parameter) count.
T5_XXL = 4_762_310_656 + 32128 * 4096
UMT5_XXL = 5_680_910_336 + 256384 * 4096

EXPECTED = {
    ("flux", "transformer"): 11_901_408_320,
    ("flux", "vae"): 83_819_683,
    ("flux", "text_encoder"): CLIP_L,
    ("flux", "text_encoder_2"): T5_XXL,
    ("sd", "unet"): 859_520_964,
    ("sd", "vae"): SD_VAE,
    ("sd", "text_encoder"): CLIP_L,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): SD_VAE,
    ("sdxl", "text_encoder"): CLIP_L,
    ("sdxl", "text_encoder_2"): CLIP_BIGG,
    ("wan", "transformer"): 1_418_996_800,
    ("wan", "vae"): 126_892_531,
    ("wan", "text_encoder"): UMT5_XXL,
}


@pytest.mark.parametrize("family,name", sorted(EXPECTED))
def test_full_size_parameter_count(family, name):
    module = empty_component(get_adapter(family), None, name)
    assert all(p.device.type == "meta" for p in module.parameters())
    assert sum(p.numel() for p in module.parameters()) == EXPECTED[family, name]


def test_every_module_component_has_a_full_size_config():
    for family in {f for f, _ in EXPECTED}:
        adapter = get_adapter(family)
        trained = set(adapter.base_model_aliases.values())
        units = adapter.family_units()
        needed = {c for u in units for c in u.components if not c.startswith(("tokenizer", "scheduler"))}
        assert needed | trained == {n for f, n in EXPECTED if f == family}


@pytest.mark.parametrize(
    "family,objective", [("flux", "flow"), ("sd", "epsilon"), ("sdxl", "epsilon"), ("wan", "flow")]
)
def test_full_size_schedulers_are_the_published_objective(family, objective, tmp_path):
    from autosplit.tasks import objective as objective_of
    from autosplit.workflow.profiling import _full_size_scheduler_folder

    adapter = get_adapter(family)
    scheduler = adapter.load_component(
        _full_size_scheduler_folder(adapter), "scheduler", device=torch.device("cpu"), dtype=torch.float32
    )
    assert objective_of(scheduler) == objective


def test_overrides_apply_to_full_size_configs():
    with init_empty_weights():
        module = component_from_config(get_adapter("wan"), None, "transformer", overrides={"num_layers": 1})
    assert len(module.blocks) == 1
