"""AdamW over exactly the trainable tensors, kept in sync with the tying map and the trainable flags.

Three kinds of tensor, each tensor of exactly one kind (a tied head is the embedding tensor itself, so it is
decayed at most once): matrices (weight-decayed), embedding tables (decayed when train.decay_embeddings) and
vectors (biases and LayerNorm gains, never decayed). The first three parameter groups are these kinds at the full
learning rate. Under train.tied_lr=linear|sqrt (docs/method.md#learning-rate-of-shared-weights) a tensor that n > 1
layer slots use moves to a group of its kind and n, after the first three, whose ``lr_scale`` is 1/n or 1/sqrt(n);
set_learning_rate multiplies each step's learning rate by it. The layout is a function of the model's current map, so a
resumed run, whose map is restored before its optimizer state, finds the groups it saved.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from tyingrun.config import HardwareConfig, TrainConfig
from tyingrun.models.embeddings import embedding_tables
from tyingrun.tying.counts import trainable_parameters
from tyingrun.tying.stack import TiedStack
from tyingrun.tying.weights import storage_key

KINDS = ("matrices", "embeddings", "vectors")
LR_SCALES = {"none": lambda n: 1.0, "linear": lambda n: 1.0 / n, "sqrt": lambda n: 1.0 / math.sqrt(n)}


def _split_by_decay(params: List[nn.Parameter], model: nn.Module):
    """Matrices, embedding tables and vectors, in the order of KINDS."""
    tables = {storage_key(table) for table in embedding_tables(model)}
    embeddings = [p for p in params if storage_key(p) in tables]
    matrices = [p for p in params if p.dim() >= 2 and storage_key(p) not in tables]
    return matrices, embeddings, [p for p in params if p.dim() < 2]


def slots_using(model: nn.Module) -> Counter:
    """For each tensor of the model's tied stacks (by storage), how many layer slots add their gradient to it: every
    slot that reads it, under policy.grad=shared. Under frozen_copy a root learns from its own slot only, so its
    stacks add no entries (a tensor without one counts as used once)."""
    counts: Counter = Counter()
    for stack in (module for module in model.modules() if isinstance(module, TiedStack)):
        if stack.grad_mode != "shared":
            continue
        for slot in range(len(stack)):
            for name, owner in stack.reads(slot).items():
                counts[storage_key(stack.blocks[owner].get_parameter(name))] += 1
    return counts


def _layout(params: List[nn.Parameter], model: nn.Module, tied_lr: str) -> List[Tuple[int, int, List[nn.Parameter]]]:
    """(kind, n, tensors) per parameter group: each kind at n = 1 first (always, even when empty), then each
    (kind, n > 1) that some tensor has, in that order. Tensors outside a tied stack count as n = 1."""
    counts = slots_using(model) if tied_lr != "none" else Counter()
    by_group: Dict[Tuple[int, int], List[nn.Parameter]] = {(kind, 1): [] for kind in range(len(KINDS))}
    for kind, tensors in enumerate(_split_by_decay(params, model)):
        for param in tensors:
            by_group.setdefault((kind, max(1, counts[storage_key(param)])), []).append(param)
    order = sorted(by_group, key=lambda group: (group[1] > 1, group))
    return [(kind, n, by_group[(kind, n)]) for kind, n in order]


def _tags(tied_lr: str, n: int) -> Dict[str, Any]:
    """What a group says of its tensors' slot count; nothing under train.tied_lr=none (the plain three groups)."""
    if tied_lr == "none":
        return {}
    return {"tied_lr": tied_lr, "slots": n, "lr_scale": LR_SCALES[tied_lr](n)}


def build_optimizer(model: nn.Module, train: TrainConfig, hardware: HardwareConfig, device: torch.device):
    decay = (train.weight_decay, train.weight_decay if train.decay_embeddings else 0.0, 0.0)
    groups = [{"params": params, "weight_decay": decay[kind], **_tags(train.tied_lr, n)}
              for kind, n, params in _layout(trainable_parameters(model), model, train.tied_lr)]
    fused = hardware.fused_adamw and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=fused or None)


def sync_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Make the optimizer hold exactly the model's trainable tensors, each in the group of its kind and slot count.

    Tensors that left (tied or frozen) lose their state at once; tensors that joined (untied or unfrozen)
    start with fresh state, because AdamW creates state lazily for tensors it has none for. A tensor that moves
    between groups (its slot count changed) keeps its state.
    """
    wanted = trainable_parameters(model)
    wanted_ids = {id(p) for p in wanted}
    for param in optimizer_parameters(optimizer):
        if id(param) not in wanted_ids:
            optimizer.state.pop(param, None)
    kinds = optimizer.param_groups[:len(KINDS)]
    tied_lr = kinds[0].get("tied_lr", "none")
    optimizer.param_groups[:] = [
        {**{key: value for key, value in kinds[kind].items() if key != "params"}, "params": params,
         **_tags(tied_lr, n)}
        for kind, n, params in _layout(wanted, model, tied_lr)
    ]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """This step's learning rate: ``lr`` for every group, times the group's train.tied_lr scale where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> List[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]
