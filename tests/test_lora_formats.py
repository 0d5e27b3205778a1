"""LoRA files for every consumer: kohya / ComfyUI key formats per family, checked against diffusers'
own readers of those formats; conversion there and back; starting a run from a LoRA file.

For every family, on its tiny pipeline (CPU fp32, fixed seed): our kohya and ComfyUI files, loaded
through diffusers' `load_lora_weights` (its non-diffusers conversion path), give the pipeline the
same LoRA weights, bit for bit, as our diffusers-format file, and the same output to 1e-6 (the
output is compared to 1e-6, not bit for bit, because the BLAS kernel a matmul takes depends on the
memory alignment of its weights; re-allocated, the outputs are identical).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from autosplit.adapters.base import get_adapter, rename_table
from autosplit.adapters.builtin import builtin_model_root
from autosplit.cli import main
from autosplit.config import LoraConfig
from autosplit.errors import ConfigError
from autosplit.training.lora import (
    LORA_WEIGHT_NAME,
    LoraLayer,
    check_trainable_early,
    convert_lora_file,
    load_lora_file,
    make_trainable,
    save_lora_file,
    save_trained,
    unflatten,
)

FAMILIES = ("qwen_image", "flux", "sd", "sdxl", "wan")
GENERATE = {
    "qwen_image": dict(height=32, width=32, num_inference_steps=2),
    "flux": dict(height=32, width=32, num_inference_steps=2),
    "sd": dict(height=64, width=64, num_inference_steps=2),
    "sdxl": dict(height=64, width=64, num_inference_steps=2),
    "wan": dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0),
}
#: the text encoders whose LoRA goes into the file (the others' go to PEFT folders)
TEXT_ENCODERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"), "flux": ("text_encoder",)}
#: FLUX's default targets reach its top-level `proj_out`, whose kohya key diffusers 0.42 reads into a
#: key without the `transformer.` prefix and drops (docs/lora-formats.md); and its single blocks'
#: q/k/v/MLP, fused into `linear1`, which diffusers splits at the full-size widths only (checked
#: below at those widths). So FLUX's tiny pipeline trains every double-block layer and the single
#: blocks' output here.
FLUX_TARGETS = ",".join(
    [
        *(
            f"transformer_blocks.0.attn.{m}"
            for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
        ),
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "norm1.linear",
        "norm1_context.linear",
        "single_transformer_blocks.0.proj_out",
        "single_transformer_blocks.0.norm.linear",
    ]
)
#: beyond the default attention targets: resnets (convs), transformer projections, feed-forwards,
#: the time embedding and the downsampler, each mapped to its own name in the original UNet for SDXL
UNET_TARGETS = ",".join(
    [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
        "time_emb_proj",
        "conv_shortcut",
        "downsamplers.0.conv",
        "conv_in",
        "conv_out",
        "linear_1",
        "linear_2",
    ]
)
TARGETS = {"flux": FLUX_TARGETS, "sd": UNET_TARGETS, "sdxl": UNET_TARGETS}


def pipeline(family: str):
    import diffusers

    adapter = get_adapter(family)
    pipe = getattr(diffusers, adapter.pipeline_class).from_pretrained(builtin_model_root(adapter))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_components(family: str) -> tuple[str, ...]:
    return (get_adapter(family).base_model_aliases["dit"], *TEXT_ENCODERS.get(family, ()))


def attach_random_lora(pipe, family: str, lora: LoraConfig, *, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Our LoRA (make_trainable) on the trained components, every weight drawn at random (a fresh
    LoRA's up weights are zero and would change nothing)."""
    adapter = get_adapter(family)
    models = {name: getattr(pipe, name) for name in trained_components(family)}
    generator = torch.Generator().manual_seed(seed)
    for name, model in models.items():
        params = make_trainable(
            model,
            name,
            lora=lora,
            adapter=adapter,
            denoiser=name == trained_components(family)[0],
            seed=seed,
            gradient_checkpointing=False,
        )
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return models


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    """family -> a folder with our random LoRA as lora.safetensors (diffusers, written by
    save_trained), lora_kohya.safetensors (save_trained's lora_format) and lora_comfyui.safetensors."""
    folders = {}
    for family in FAMILIES:
        adapter, pipe = get_adapter(family), pipeline(family)
        folder = tmp_path_factory.mktemp(family)
        models = attach_random_lora(pipe, family, LoraConfig(rank=4, target_modules=TARGETS.get(family, "")))
        save_trained(models, folder, adapter=adapter, full_finetune=False, write=True, lora_format="kohya")
        config = models[trained_components(family)[0]].config
        convert_lora_file(
            folder / LORA_WEIGHT_NAME,
            folder / "lora_comfyui.safetensors",
            adapter=adapter,
            to="comfyui",
            denoiser_config=config,
        )
        folders[family] = folder
    return folders


def generate(family: str, folder: Path | None, weight: str | None) -> tuple[torch.Tensor, dict]:
    """(the pipeline's latent output, its LoRA weights) with the LoRA file `weight` loaded."""
    pipe = pipeline(family)
    if weight is not None:
        pipe.load_lora_weights(folder, weight_name=weight)
    out = pipe(
        "a red circle",
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        return_dict=False,
        **GENERATE[family],
    )[0]
    weights = {
        f"{c}.{k}": v
        for c in trained_components(family)
        for k, v in getattr(pipe, c).state_dict().items()
        if "lora_" in k
    }
    return out, weights


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_and_comfyui_files_load_in_diffusers_as_our_diffusers_file_does(lora_files, family):
    folder = lora_files[family]
    base, _ = generate(family, None, None)
    ours, ours_weights = generate(family, folder, LORA_WEIGHT_NAME)
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the output, so equal outputs mean something
    components = {k.split(".")[0] for k in ours_weights}
    assert components == set(trained_components(family))  # every trained component's LoRA was loaded
    back = folder / "back_from_kohya.safetensors"  # our diffusers writer, read by diffusers
    convert_lora_file(
        folder / "lora_kohya.safetensors",
        back,
        adapter=get_adapter(family),
        to="diffusers",
        denoiser_config=pipeline_config(family),
    )
    for name in ("lora_kohya.safetensors", "lora_comfyui.safetensors", back.name):
        theirs, theirs_weights = generate(family, folder, name)
        assert sorted(theirs_weights) == sorted(ours_weights), name
        for key, value in ours_weights.items():
            assert torch.equal(theirs_weights[key], value), (name, key)
        torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_converting_there_and_back_is_the_identity(lora_files, family, fmt, tmp_path):
    adapter, folder = get_adapter(family), lora_files[family]
    config = pipeline_config(family)
    there, back = tmp_path / f"{fmt}.safetensors", tmp_path / "back.safetensors"
    assert (
        convert_lora_file(folder / LORA_WEIGHT_NAME, there, adapter=adapter, to=fmt, denoiser_config=config)[0]
        == "diffusers"
    )
    assert convert_lora_file(there, back, adapter=adapter, to="diffusers", denoiser_config=config)[0] in (fmt, "kohya")
    assert_same_tensors(folder / LORA_WEIGHT_NAME, back)
    again = tmp_path / "again.safetensors"
    convert_lora_file(back, again, adapter=adapter, to=fmt, denoiser_config=config)
    assert_same_tensors(there, again)
    # the alphas too, and the peft config diffusers reads from the header
    _, original = load_lora_file(folder / LORA_WEIGHT_NAME, adapter, flag="test", denoiser_config=config)
    _, returned = load_lora_file(back, adapter, flag="test", denoiser_config=config)
    assert {c: {m: x.alpha for m, x in layers.items()} for c, layers in original.items()} == {
        c: {m: x.alpha for m, x in layers.items()} for c, layers in returned.items()
    }


def pipeline_config(family: str) -> dict:
    adapter = get_adapter(family)
    denoiser = adapter.base_model_aliases["dit"]
    return json.loads((builtin_model_root(adapter) / denoiser / "config.json").read_text())


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert sorted(x) == sorted(y)
    for key in x:
        assert torch.equal(x[key], y[key]) and x[key].dtype == y[key].dtype, key


def test_save_trained_writes_the_requested_format_beside_the_diffusers_file(lora_files, tmp_path):
    folder = lora_files["qwen_image"]
    assert (folder / LORA_WEIGHT_NAME).is_file()
    convert_lora_file(
        folder / LORA_WEIGHT_NAME, tmp_path / "k.safetensors", adapter=get_adapter("qwen_image"), to="kohya"
    )
    assert_same_tensors(folder / "lora_kohya.safetensors", tmp_path / "k.safetensors")
    keys = sorted(load_file(folder / "lora_kohya.safetensors"))
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in keys
    assert "lora_unet_transformer_blocks_0_img_mlp_net_2.alpha" in keys
    comfy = sorted(load_file(folder / "lora_comfyui.safetensors"))
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight" in comfy
    assert not any(k.endswith(".alpha") for k in comfy)  # alpha = rank: left out, as every reader assumes


def test_each_family_writes_the_key_names_its_consumers_read(lora_files):
    expected = {
        "sd": [
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        ],
        "sdxl": [
            "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight",  # 1 layer per block
            "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight",
            "lora_unet_input_blocks_2_0_op.alpha",
            "lora_unet_middle_block_1_proj_in.lora_down.weight",
            "lora_unet_out_2.lora_down.weight",
            "lora_unet_label_emb_0_0.lora_down.weight",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha",
            "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight",
        ],
        "flux": [
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
            "lora_unet_double_blocks_0_txt_attn_qkv.alpha",
            "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight",
            "lora_unet_single_blocks_0_linear2.lora_down.weight",
            "lora_te1_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight",
        ],
        "wan": [
            "lora_unet_blocks_0_self_attn_q.lora_down.weight",
            "lora_unet_blocks_1_cross_attn_o.alpha",
            "lora_unet_blocks_0_ffn_0.lora_up.weight",
        ],
    }
    for family, keys in expected.items():
        written = set(load_file(lora_files[family] / "lora_kohya.safetensors"))
        assert set(keys) <= written, (family, sorted(written)[:6])
    comfy = set(load_file(lora_files["wan"] / "lora_comfyui.safetensors"))
    assert "diffusion_model.blocks.0.cross_attn.k.lora_B.weight" in comfy


def test_flux_fuses_q_k_v_into_one_block_diagonal_layer(lora_files):
    ours = load_file(lora_files["flux"] / LORA_WEIGHT_NAME)
    kohya = load_file(lora_files["flux"] / "lora_kohya.safetensors")
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up, alpha = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"], kohya[f"{key}.alpha"]
    assert down.shape[0] == 12 and float(alpha) == 12.0  # 3 x rank 4, alpha 3 x 4: the same scale
    parts = [f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    assert torch.equal(up @ down, torch.cat([ours[f"{p}.lora_B.weight"] @ ours[f"{p}.lora_A.weight"] for p in parts]))


def test_flux_single_block_linear1_matches_diffusers_at_full_size_widths(tmp_path):
    """diffusers' kohya FLUX reader splits linear1 at FLUX.1's widths (3072 x 3 + 12288); our
    fused layer of random full-width LoRAs reads back through it to exactly those LoRAs."""
    from diffusers import FluxPipeline

    adapter, generator = get_adapter("flux"), torch.Generator().manual_seed(0)
    widths = {"attn.to_q": 3072, "attn.to_k": 3072, "attn.to_v": 3072, "proj_mlp": 12288, "proj_out": 3072}
    inputs = {"proj_out": 3072 + 12288}
    layers = {
        "transformer": {
            f"single_transformer_blocks.0.{m}": LoraLayer(
                torch.randn(2, inputs.get(m, 3072), generator=generator), torch.randn(w, 2, generator=generator), 2.0
            )
            for m, w in widths.items()
        }
    }
    save_lora_file(tmp_path / "k.safetensors", layers, fmt="kohya", adapter=adapter)
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in load_file(tmp_path / "k.safetensors")
    read = FluxPipeline.lora_state_dict(tmp_path / "k.safetensors")
    assert sorted(read) == sorted(f"transformer.{m}.lora_{x}.weight" for m in layers["transformer"] for x in "AB")
    for module, layer in layers["transformer"].items():
        assert torch.equal(read[f"transformer.{module}.lora_A.weight"], layer.down)
        assert torch.equal(read[f"transformer.{module}.lora_B.weight"], layer.up)


def test_a_fused_layer_that_is_not_block_diagonal_splits_with_a_shared_down_weight(tmp_path):
    """A kohya FLUX LoRA trained fused (not by autosplit) gives each part the whole down weight."""
    generator = torch.Generator().manual_seed(1)
    down, up = torch.randn(6, 32, generator=generator), torch.randn(96, 6, generator=generator)
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(3.0),
        },
        tmp_path / "k.safetensors",
    )
    fmt, layers = load_lora_file(tmp_path / "k.safetensors", get_adapter("flux"), flag="test")
    parts = [layers["transformer"][f"transformer_blocks.0.attn.to_{x}"] for x in "qkv"]
    assert fmt == "kohya" and all(p.rank == 6 and p.alpha == 3.0 for p in parts)
    assert torch.equal(torch.cat([p.up @ p.down for p in parts]), up @ down)
    assert convert_lora_file(
        tmp_path / "k.safetensors", tmp_path / "d.safetensors", adapter=get_adapter("flux"), to="diffusers"
    ) == ("kohya", 3)  # the shared down weight is written once per part
    header = json.loads(load_metadata(tmp_path / "d.safetensors")["lora_adapter_metadata"])
    assert header["transformer.r"] == 6 and header["transformer.lora_alpha"] == 3.0


def load_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_unflatten_reads_kohya_names_back_with_the_family_words():
    from autosplit.adapters.qwen_image import LORA_WORDS

    assert unflatten("transformer_blocks_0_attn_to_add_out", LORA_WORDS) == "transformer_blocks.0.attn.to_add_out"
    assert (
        unflatten("transformer_blocks_12_img_mlp_net_0_proj", LORA_WORDS) == "transformer_blocks.12.img_mlp.net.0.proj"
    )
    assert (
        unflatten("time_text_embed_timestep_embedder_linear_1", LORA_WORDS)
        == "time_text_embed.timestep_embedder.linear_1"
    )
    assert unflatten("a_b_c", frozenset()) == "a.b.c"


def test_rename_tables_go_both_ways():
    to_native, to_diffusers = rename_table(
        [("blocks.{i}.attn1.to_q", "blocks.{i}.self_attn.q"), ("x.{i}.q", "f.{i}.qkv", 0), ("x.{i}.k", "f.{i}.qkv", 1)]
    )
    assert to_native("blocks.12.attn1.to_q") == ("blocks.12.self_attn.q", 0)
    assert to_native("x.3.k") == ("f.3.qkv", 1) and to_diffusers("f.3.qkv") == ("x.3.q", "x.3.k")
    with pytest.raises(KeyError):
        to_native("blocks.1.attn1.to_k")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_module_of_the_full_size_denoiser_has_a_name_or_a_clear_error(family):
    """Every Linear/Conv2d of the full-size denoiser round-trips through the family's names (and
    kohya's flattening), except the few documented ones, which are errors before any work."""
    from autosplit.adapters.base import empty_component
    from autosplit.training.lora import native_groups

    adapter = get_adapter(family)
    denoiser = adapter.base_model_aliases["dit"]
    model = empty_component(adapter, None, denoiser)
    modules = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for fmt in ("kohya", "comfyui"):
        naming = adapter.lora_naming(fmt, denoiser_config=model.config)
        unmapped = []
        for module in modules:
            try:
                native, part = naming.to_native(denoiser, module)
            except KeyError:
                unmapped.append(module)
                continue
            assert naming.to_diffusers(denoiser, native)[part] == module, (fmt, module)
            if naming.prefixes[denoiser].endswith("_"):
                assert unflatten(native.replace(".", "_"), naming.words) == native, (fmt, native)
        mapped = [m for m in modules if m not in unmapped]
        assert len(native_groups({denoiser: mapped}, naming, flag="f", family=family)) > 0
        for module in unmapped:
            with pytest.raises(ConfigError, match="has no name in that format"):
                native_groups({denoiser: [module]}, naming, flag="f", family=family)
        assert set(unmapped) == UNMAPPED.get(family, set()), (fmt, sorted(set(unmapped) ^ UNMAPPED.get(family, set())))


#: the full-size denoisers' Linear/Conv2d modules with no name in the family's kohya/ComfyUI format:
#: FLUX's final AdaLN (its halves are stored swapped there), SDXL's upsamplers (their index in the
#: original UNet depends on the block type)
UNMAPPED = {
    "flux": {"norm_out.linear"},
    "sdxl": {"up_blocks.0.upsamplers.0.conv", "up_blocks.1.upsamplers.0.conv"},
    "sd": set(),
}


def test_a_module_the_format_cannot_name_fails_before_any_work(tmp_path):
    root = builtin_model_root(get_adapter("sdxl"))
    lora = LoraConfig(rank=4, target_modules="to_q,upsamplers.0.conv", format="kohya")
    with pytest.raises(
        ConfigError,
        match=r"--lora_format kohya: sdxl's unet module "
        r"'up_blocks\.0\.upsamplers\.0\.conv' has no name in that format",
    ):
        check_trainable_early(lora, get_adapter("sdxl"), root, ("unet",))
    lora = LoraConfig(rank=4, target_modules="transformer_blocks.0.attn.to_q", format="kohya")
    with pytest.raises(
        ConfigError,
        match=r"flux stores .*to_q.*to_k.*to_v.* as one layer \(double_blocks\.0\.img_attn"
        r"\.qkv\) in that format; train all of them or none",
    ):
        check_trainable_early(lora, get_adapter("flux"), builtin_model_root(get_adapter("flux")), ("transformer",))
    check_trainable_early(
        LoraConfig(rank=4, format="comfyui"),
        get_adapter("qwen_image"),
        builtin_model_root(get_adapter("qwen_image")),
        ("transformer", "text_encoder"),
    )


def test_a_family_without_the_format_says_so():
    from autosplit.adapters.base import AdapterBase

    class Plain(AdapterBase):
        name = "plain"

    with pytest.raises(ConfigError, match="--lora_format kohya: format 'kohya' is not available for family plain"):
        Plain().lora_naming("kohya")


# --- convert-lora -----------------------------------------------------------------------------


def test_convert_lora_command_round_trips(lora_files, tmp_path, capsys):
    src = lora_files["sdxl"] / LORA_WEIGHT_NAME
    model = builtin_model_root(get_adapter("sdxl"))
    assert (
        main(
            [
                "convert-lora",
                str(src),
                str(tmp_path / "k.safetensors"),
                "--pipeline",
                "sdxl",
                "--to",
                "kohya",
                "--model_paths",
                str(model),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "convert-lora",
                str(tmp_path / "k.safetensors"),
                str(tmp_path / "d.safetensors"),
                "--pipeline",
                "sdxl",
                "--to",
                "diffusers",
                "--model_paths",
                str(model),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    layers = sum(len(m) for m in load_lora_file(src, get_adapter("sdxl"), flag="test")[1].values())
    assert out == [
        f"{src} (diffusers, {layers} LoRA layers) -> {tmp_path / 'k.safetensors'} (kohya)",
        f"{tmp_path / 'k.safetensors'} (kohya, {layers} LoRA layers) -> {tmp_path / 'd.safetensors'} (diffusers)",
    ]
    assert_same_tensors(src, tmp_path / "d.safetensors")
    assert_same_tensors(tmp_path / "k.safetensors", lora_files["sdxl"] / "lora_kohya.safetensors")


def test_convert_lora_of_another_family_is_a_one_line_error(lora_files, tmp_path, capsys):
    code = main(
        [
            "convert-lora",
            str(lora_files["flux"] / "lora_kohya.safetensors"),
            str(tmp_path / "x.safetensors"),
            "--pipeline",
            "qwen_image",
            "--to",
            "diffusers",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("autosplit: error: convert-lora ") and "are no qwen_image LoRA" in err[0]
    assert "pass the --pipeline of the family it was trained for" in err[0]
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_lora_refuses_to_overwrite_its_input(lora_files, capsys):
    src = lora_files["wan"] / LORA_WEIGHT_NAME
    assert main(["convert-lora", str(src), str(src), "--pipeline", "wan", "--to", "kohya"]) == 2
    assert "IN and OUT are the same file" in capsys.readouterr().err


# --- --lora_checkpoint ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "comfyui"])
@pytest.mark.parametrize("family", ["flux", "sdxl", "wan"])
def test_a_lora_checkpoint_in_any_format_is_exactly_the_starting_point(lora_files, family, fmt):
    """The weights make_trainable starts from are the file's, bit for bit (FLUX's fused kohya layers
    split back, SDXL's original-UNet names mapped back); nothing else (optimizer, data order) is in
    a LoRA file: `--resume` restores those from a checkpoint."""
    name = LORA_WEIGHT_NAME if fmt == "diffusers" else f"lora_{fmt}.safetensors"
    path = lora_files[family] / name
    saved = load_file(lora_files[family] / LORA_WEIGHT_NAME)
    pipe = pipeline(family)
    lora = LoraConfig(rank=4, target_modules=TARGETS.get(family, ""), checkpoint=str(path))
    models = attach_random_lora_from_file(pipe, family, lora)
    for component, model in models.items():
        state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert state
        for key, value in state.items():
            module, _, rest = key.rpartition(".lora_")
            kind = "lora_A" if rest.startswith("A") else "lora_B"
            assert torch.equal(value, saved[f"{component}.{module}.{kind}.weight"]), key


def attach_random_lora_from_file(pipe, family: str, lora: LoraConfig) -> dict[str, torch.nn.Module]:
    adapter = get_adapter(family)
    models = {name: getattr(pipe, name) for name in trained_components(family)}
    for name, model in models.items():
        make_trainable(
            model,
            name,
            lora=lora,
            adapter=adapter,
            denoiser=name == trained_components(family)[0],
            seed=5,
            gradient_checkpointing=False,
        )
    return models


def test_a_lora_checkpoint_that_does_not_fit_the_run_fails_before_any_work(lora_files):
    adapter, root = get_adapter("qwen_image"), builtin_model_root(get_adapter("qwen_image"))
    path = str(lora_files["qwen_image"] / "lora_kohya.safetensors")
    check_trainable_early(LoraConfig(rank=4, checkpoint=path), adapter, root, ("transformer",))
    with pytest.raises(ConfigError, match=r"has rank 4, this run trains rank 8; pass --lora_rank 4"):
        check_trainable_early(LoraConfig(rank=8, checkpoint=path), adapter, root, ("transformer",))
    with pytest.raises(ConfigError, match=r"has alpha 4, this run 8 \(rank 4\); pass --set lora.alpha=4"):
        check_trainable_early(LoraConfig(rank=4, alpha=8, checkpoint=path), adapter, root, ("transformer",))
    with pytest.raises(ConfigError, match=r"its transformer LoRA has \[.*\], which this run does not train"):
        check_trainable_early(
            LoraConfig(rank=4, target_modules="to_q", checkpoint=path), adapter, root, ("transformer",)
        )
    with pytest.raises(ConfigError, match=r"holds no LoRA of text_encoder"):
        check_trainable_early(LoraConfig(rank=4, checkpoint=path), adapter, root, ("transformer", "text_encoder"))
    with pytest.raises(ConfigError, match=r"--lora_checkpoint .*nope\.safetensors: not a readable safetensors file"):
        check_trainable_early(
            LoraConfig(rank=4, checkpoint=path + ".nope.safetensors"), adapter, root, ("transformer",)
        )
