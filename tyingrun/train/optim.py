"""AdamW over exactly the trainable tensors, kept in sync with the tying map and the trainable flags."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from tyingrun.config import HardwareConfig, TrainConfig
from tyingrun.tying.counts import trainable_parameters


def _split_by_decay(params: List[nn.Parameter]):
    """Matrices (and embeddings) are weight-decayed; biases and LayerNorm gains are not."""
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def build_optimizer(model: nn.Module, train: TrainConfig, hardware: HardwareConfig, device: torch.device):
    decay, no_decay = _split_by_decay(trainable_parameters(model))
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
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
    decay, no_decay = _split_by_decay(wanted)
    optimizer.param_groups[0]["params"] = decay
    optimizer.param_groups[1]["params"] = no_decay


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> List[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]
