"""Token embedding and output projection, tied (one matrix) or untied, with the vocabulary optionally padded.

``model.pad_vocab_to=n`` rounds the rows of the embedding and the head up to a multiple of n (64 turns GPT-2's
50,257 into 50,304), the shapes matrix kernels run fastest on. The padding rows are never looked up (no token id
reaches them) and their logits are -inf, so they take no probability mass and receive no gradient from the loss;
parameter counts leave them out (``padding_params``) and tyingrun-export trims them.
"""

from __future__ import annotations

from typing import List, cast

import torch
import torch.nn.functional as F
from torch import nn

from tyingrun.contracts import IGNORE_INDEX, LossResult

# The state-dict names of the LM head and the token embedding in tyingrun's language models (each keeps its
# TokenEmbedding as ``tokens``).
LM_HEAD_WEIGHT = "tokens.lm_head.weight"
WTE_WEIGHT = "tokens.wte.weight"


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, tie: bool, pad_to: int = 1):
        super().__init__()
        self.vocab_size = vocab_size
        rows = -(-vocab_size // pad_to) * pad_to
        self.wte = nn.Embedding(rows, d_model)
        self.lm_head = nn.Linear(d_model, rows, bias=False)
        if tie:
            self.tie()

    @property
    def padding_rows(self) -> int:
        return self.wte.num_embeddings - self.vocab_size

    def padding_params(self, trainable_only: bool = False) -> int:
        """Parameters in the padding rows (of the embedding, and of an untied head too)."""
        weights = [self.wte.weight] if self.tied else [self.wte.weight, self.lm_head.weight]
        return sum(self.padding_rows * w.shape[1] for w in weights if w.requires_grad or not trainable_only)

    def without_padding(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, the model's state entry ``name``, without the padding rows if it is the embedding or the head
        (what an export writes)."""
        return tensor[:self.vocab_size] if name in (WTE_WEIGHT, LM_HEAD_WEIGHT) else tensor

    def with_padding(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """An exported ``tensor`` (the state entry ``name``) with padding rows again (zeros: no token reaches them),
        in the shape this model stores it."""
        if name not in (WTE_WEIGHT, LM_HEAD_WEIGHT) or len(tensor) != self.vocab_size or not self.padding_rows:
            return tensor
        return torch.cat([tensor, tensor.new_zeros(self.padding_rows, *tensor.shape[1:])])

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.wte.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if not self.padding_rows:
            return logits
        padding = torch.arange(logits.shape[-1], device=logits.device) >= self.vocab_size
        return logits.masked_fill(padding, float("-inf"))

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
