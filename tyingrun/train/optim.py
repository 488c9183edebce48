"""AdamW over exactly the trainable tensors, kept in sync with the tying map and the trainable flags.

Three parameter groups, each tensor in exactly one (a tied head is the embedding tensor itself, so it is
decayed at most once): matrices (weight-decayed), embedding tables (decayed when train.decay_embeddings)
and vectors (biases and LayerNorm gains, never decayed).
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from tyingrun.config import HardwareConfig, TrainConfig
from tyingrun.models.embeddings import embedding_tables
from tyingrun.tying.counts import trainable_parameters
from tyingrun.tying.weights import storage_key


def _split_by_decay(params: List[nn.Parameter], model: nn.Module):
    """Matrices, embedding tables and vectors, in the order of the optimizer's groups."""
    tables = {storage_key(table) for table in embedding_tables(model)}
    embeddings = [p for p in params if storage_key(p) in tables]
    matrices = [p for p in params if p.dim() >= 2 and storage_key(p) not in tables]
    return matrices, embeddings, [p for p in params if p.dim() < 2]


def build_optimizer(model: nn.Module, train: TrainConfig, hardware: HardwareConfig, device: torch.device):
    matrices, embeddings, vectors = _split_by_decay(trainable_parameters(model), model)
    groups = [
        {"params": matrices, "weight_decay": train.weight_decay},
        {"params": embeddings, "weight_decay": train.weight_decay if train.decay_embeddings else 0.0},
        {"params": vectors, "weight_decay": 0.0},
    ]
    fused = hardware.fused_adamw and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=fused or None)


def sync_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Make the optimizer hold exactly the model's trainable tensors.

    Tensors that left (tied or frozen) lose their state at once; tensors that joined (untied or unfrozen)
    start with fresh state, because AdamW creates state lazily for tensors it has none for.
    """
    wanted = trainable_parameters(model)
    wanted_ids = {id(p) for p in wanted}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in wanted_ids:
                optimizer.state.pop(param, None)
    for group, params in zip(optimizer.param_groups, _split_by_decay(wanted, model), strict=True):
        group["params"] = params


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> List[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]
