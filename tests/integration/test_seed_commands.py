"""The three commands of DiffSynth-Studio's "Two-Stage Split Training" document, run as written
(paths, repeat and epoch counts shrunk), through `accelerate launch` and the seed's script path.

`Qwen/Qwen-Image` resolves from a local Hugging Face cache that holds the tiny pipeline under
that id: the same resolution a user's downloaded model takes, with no network access.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
MODEL_SPEC = (
    "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,"
    "Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors"
)
COMMON = """--max_pixels 1048576 --learning_rate 1e-4 --num_epochs 1 --remove_prefix_in_ckpt "pipe.dit." \
 --lora_base_model "dit" \
 --lora_target_modules "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1" \
 --lora_rank 32 --use_gradient_checkpointing --dataset_num_workers 8 --find_unused_parameters"""


def fake_hub_cache(root: Path, model: Path) -> Path:
    repo = root / "models--Qwen--Qwen-Image"
    commit = "0" * 40
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def launch(args: str, env: dict[str, str]) -> None:
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "examples/qwen_image/model_training/train.py",
        *shlex.split(args),
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_seed_commands(tmp_path, tiny_model, tiny_dataset):
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(fake_hub_cache(tmp_path / "hub", tiny_model)),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    data = f"--dataset_base_path {tiny_dataset} --dataset_metadata_path {tiny_dataset}/metadata.csv"
    unsplit, cache, split = tmp_path / "unsplit", tmp_path / "cache", tmp_path / "split"
    launch(
        f'{data} --dataset_repeat 2 --model_id_with_origin_paths "{MODEL_SPEC}" {COMMON} '
        f'--output_path "{unsplit}" --no-split',
        env,
    )
    text_and_vae = ",".join(MODEL_SPEC.split(",")[1:])
    launch(
        f'{data} --dataset_repeat 1 --model_id_with_origin_paths "{text_and_vae}" {COMMON} '
        f'--output_path "{cache}" --task "sft:data_process"',
        env,
    )
    dit = MODEL_SPEC.split(",")[0]
    launch(
        f'--dataset_base_path "{cache}" --dataset_repeat 2 --model_id_with_origin_paths "{dit}" {COMMON} '
        f'--output_path "{split}" --task "sft:train"',
        env,
    )
    a, b = load_file(unsplit / "lora.safetensors"), load_file(split / "lora.safetensors")
    assert len(a) == 48 and all(torch.equal(a[k], b[k]) for k in a)
