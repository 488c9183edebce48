"""GPT-2 (nanoGPT-style): learned positions, pre-LN blocks in a TiedStack, final LayerNorm, tied LM head."""

from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from tyingrun.config import ModelConfig
from tyingrun.contracts import DIFFICULTY, LossResult, TiedModule
from tyingrun.models.blocks import PreLNBlock, init_normal
from tyingrun.models.embeddings import TokenEmbedding, next_token_loss
from tyingrun.tying.stack import TiedStack


class GPT2(TiedModule):
    task = "lm"

    def __init__(self, cfg: ModelConfig, vocab_size: int, grad_mode: str = "shared"):
        super().__init__()
        self.tokens = TokenEmbedding(vocab_size, cfg.d_model, cfg.tie_embeddings, cfg.pad_vocab_to)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        blocks = [PreLNBlock(cfg.d_model, cfg.n_head, cfg.dropout, cfg.bias, causal=True) for _ in range(cfg.n_layer)]
        self.stack = TiedStack(blocks, grad_mode)
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self._init_weights(blocks)

    def _init_weights(self, blocks: List[PreLNBlock]) -> None:
        init_normal(self)
        for block in blocks:
            for weight in block.residual_projections():
                nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * len(blocks)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.tokens.embed(input_ids) + self.wpe(positions))
        return self.tokens.project(self.ln_f(self.stack(x)))

    def loss(self, batch: Dict[str, torch.Tensor]) -> LossResult:
        """Mean next-token cross-entropy over the predicted tokens, and their number; an answer-only batch (it
        carries DIFFICULTY) also reports how many answer tokens are right and which examples are wholly right."""
        return next_token_loss(self(batch["input_ids"]), batch["labels"], answer_only=DIFFICULTY in batch)
