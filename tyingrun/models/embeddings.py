"""Token embedding and output projection, tied (one matrix) or untied."""

from __future__ import annotations

from typing import List, cast

import torch
from torch import nn

# The state-dict name of the LM head in tyingrun's language models (each keeps its TokenEmbedding as ``tokens``).
LM_HEAD_WEIGHT = "tokens.lm_head.weight"


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, tie: bool):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie:
            self.tie()

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.wte.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def tie(self) -> None:
        """Make the head the embedding matrix itself (the head's own values are dropped)."""
        self.lm_head.weight = self.wte.weight

    def untie(self) -> None:
        """Give the head its own copy of the shared matrix (fine-tuning starts from the tied values)."""
        if self.tied:
            self.lm_head.weight = nn.Parameter(self.wte.weight.detach().clone())


def embedding_tables(model: nn.Module) -> List[nn.Parameter]:
    """The weights of every nn.Embedding (token, position, token type); a tied LM head is one of them."""
    return [cast(nn.Parameter, module.weight) for module in model.modules() if isinstance(module, nn.Embedding)]
