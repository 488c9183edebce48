"""BERT: token + position + token-type embeddings, post-LN encoder blocks in a TiedStack, the MLM head.

Trained with masked-LM (the data masks the batches), or, with ``model.causal``, as a causal LM (the official
code's variant): the same network with causal attention on next-token batches. Either way the loss is the
cross-entropy over the labelled positions only, so ``exp(val_loss)`` is the MLM perplexity.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tyingrun.config import ModelConfig
from tyingrun.contracts import IGNORE_INDEX, LossResult, TiedModule
from tyingrun.models.blocks import PostLNBlock, init_normal
from tyingrun.models.embeddings import TokenEmbedding
from tyingrun.tying.stack import TiedStack

# Segment A and segment B; single-segment batches use type 0 throughout.
TOKEN_TYPES = 2


class BERT(TiedModule):
    task = "lm"

    def __init__(self, cfg: ModelConfig, vocab_size: int, grad_mode: str = "shared"):
        super().__init__()
        self.tokens = TokenEmbedding(vocab_size, cfg.d_model, cfg.tie_embeddings, cfg.pad_vocab_to)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.wtt = nn.Embedding(TOKEN_TYPES, cfg.d_model)
        self.ln_embed = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        blocks = [
            PostLNBlock(cfg.d_model, cfg.n_head, cfg.dropout, cfg.bias, causal=cfg.causal) for _ in range(cfg.n_layer)
        ]
        self.stack = TiedStack(blocks, grad_mode)
        # The MLM head's transform; its projection is the token embedding (tied) plus an output bias.
        self.head_dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.head_ln = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head_bias = nn.Parameter(torch.zeros(self.tokens.wte.num_embeddings))
        init_normal(self)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        types = torch.zeros_like(input_ids)
        x = self.tokens.embed(input_ids) + self.wpe(positions) + self.wtt(types)
        return self.stack(self.drop(self.ln_embed(x)))

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token logits from final hidden states."""
        return self.tokens.project(self.head_ln(F.gelu(self.head_dense(hidden)))) + self.head_bias

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token logits at every position, or only at ``positions`` (a boolean mask shaped like ``input_ids``)."""
        hidden = self.encode(input_ids)
        return self.predict(hidden if positions is None else hidden[positions])

    def loss(self, batch: Dict[str, torch.Tensor]) -> LossResult:
        """Mean cross-entropy over the labelled positions (the masked ones in MLM), and their number."""
        labels = batch["labels"]
        targets = labels != IGNORE_INDEX
        # Only the labelled positions go through the head: the others cannot touch the loss, and cost nothing.
        logits = self(batch["input_ids"], targets)
        return LossResult(F.cross_entropy(logits.float(), labels[targets]), int(targets.sum()))
