"""``model.freeze``: parts of the model that never train, whatever the policy decides (config.check_freeze
has validated the list)."""

from __future__ import annotations

from typing import Any, FrozenSet, Sequence

from torch import nn

from tyingrun.models.embeddings import embedding_tables


def freeze_tensors(model: nn.Module, freeze: Sequence[Any]) -> None:
    """Freeze the embedding tables (a tied head with them) and/or an untied LM head."""
    frozen = embedding_tables(model) if "embeddings" in freeze else []
    if "head" in freeze:
        frozen.append(model.tokens.lm_head.weight)
    for tensor in frozen:
        tensor.requires_grad_(False)


def frozen_layers(freeze: Sequence[Any]) -> FrozenSet[int]:
    """The layer slots frozen by config; the trainer clears their trainable flag in every decision."""
    return frozenset(part for part in freeze if isinstance(part, int))
