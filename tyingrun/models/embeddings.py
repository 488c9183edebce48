"""Token embedding and output projection, tied (one matrix) or untied."""

from __future__ import annotations

import torch
from torch import nn


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, tie: bool):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.wte.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def untie(self) -> None:
        """Give the head its own copy of the shared matrix (fine-tuning starts from the tied values)."""
        if self.tied:
            self.lm_head.weight = nn.Parameter(self.wte.weight.detach().clone())
