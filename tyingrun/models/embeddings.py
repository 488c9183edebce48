"""Token embedding and output projection, tied (one matrix) or untied."""

from __future__ import annotations

from typing import List, cast

import torch
import torch.nn.functional as F
from torch import nn

from tyingrun.contracts import IGNORE_INDEX, LossResult

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


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, answer_only: bool = False) -> LossResult:
    """Mean next-token cross-entropy (in fp32) over the predicted tokens, and their number.

    ``answer_only``: the labels hold IGNORE_INDEX but at answer tokens; then also how many answer tokens are right
    and which examples have their whole answer right."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    if not answer_only:
        return LossResult(loss, labels.numel())
    answered = labels != IGNORE_INDEX
    right = logits.argmax(dim=-1) == labels
    return LossResult(loss, int(answered.sum()), (right & answered).sum(), (right | ~answered).all(dim=1))
