"""What every model's ``loss(batch)`` returns, whatever its task."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# The label of a position that is not predicted (masked-LM batches); torch's cross_entropy skips it by default.
IGNORE_INDEX = -100


class LossResult(NamedTuple):
    loss: torch.Tensor  # mean over the predicted items, with a graph in training
    n_items: int  # predicted tokens (language models) or samples (classifiers)
    n_correct: Optional[torch.Tensor] = None  # correct predictions, for models that report accuracy
