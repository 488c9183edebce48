"""Vision Transformer: patch embedding, class token, learned positions, pre-LN blocks in a TiedStack,
final LayerNorm and a linear classifier on the class token."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from tyingrun.config import ModelConfig
from tyingrun.contracts import LossResult, TiedModule
from tyingrun.models.blocks import PreLNBlock, init_normal
from tyingrun.tying.stack import TiedStack


class ViT(TiedModule):
    task = "vision"

    def __init__(self, cfg: ModelConfig, image_size: int, channels: int, n_classes: int, grad_mode: str = "shared"):
        super().__init__()
        n_patches = (image_size // cfg.patch_size) ** 2
        self.patches = nn.Conv2d(channels, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.positions = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        blocks = [PreLNBlock(cfg.d_model, cfg.n_head, cfg.dropout, cfg.bias, causal=False) for _ in range(cfg.n_layer)]
        self.stack = TiedStack(blocks, grad_mode)
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, n_classes)
        init_normal(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of images [batch, channels, height, width]."""
        x = self.patches(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.positions
        return self.head(self.ln_f(self.stack(self.drop(x)))[:, 0])

    def loss(self, batch: Dict[str, torch.Tensor]) -> LossResult:
        """Mean cross-entropy over the images, their number, and how many are classified correctly."""
        logits = self(batch["images"])
        labels = batch["labels"]
        correct = (logits.argmax(dim=-1) == labels).sum()
        return LossResult(F.cross_entropy(logits.float(), labels), len(labels), correct)
