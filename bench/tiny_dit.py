"""A tiny DiT for the loader benchmark: joint attention over patchified latents [B,16,64,64] (1024
image tokens) and projected text states [B,L,3584], flow-matching loss, AdamW. Its training
step takes ~20 ms on the 2-core CPU (see bench/README.md), like a small stage 2 that the loader
must keep up with."""

from __future__ import annotations

import torch
from torch import nn


class TinyDiT(nn.Module):
    def __init__(
        self,
        *,
        channels: int = 16,
        text_dim: int = 3584,
        hidden: int = 64,
        depth: int = 3,
        heads: int = 4,
        patch: int = 4,
    ):
        super().__init__()
        self.patch_size = patch
        self.patch = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)
        self.text = nn.Linear(text_dim, hidden)
        self.time = nn.Linear(1, hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=2 * hidden, batch_first=True, dropout=0.0, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.ConvTranspose2d(hidden, channels, kernel_size=patch, stride=patch)

    def forward(self, noisy_bchw: torch.Tensor, text_bld: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
        b, _, h, w = noisy_bchw.shape
        image = self.patch(noisy_bchw).flatten(2).transpose(1, 2)  # [B, h*w/patch², hidden]
        tokens = torch.cat([self.text(text_bld), image + self.time(t_b[:, None])[:, None]], dim=1)
        image = self.blocks(tokens)[:, text_bld.shape[1] :]
        return self.out(image.transpose(1, 2).reshape(b, -1, h // self.patch_size, w // self.patch_size))


def train_step(
    model: TinyDiT, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], generator: torch.Generator
) -> float:
    """One flow-matching step on a cached batch (bf16 latents and text, as the cache stores them)."""
    latents = batch["latents"].float()
    text = batch["prompt_embeds"].float()
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.rand(latents.shape[0], generator=generator)
    noisy = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise
    loss = nn.functional.mse_loss(model(noisy, text, t), noise - latents)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
