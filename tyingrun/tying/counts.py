"""Parameter and training-state counts that see through aliasing: every storage is counted once."""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn

from tyingrun.tying.stack import TiedStack
from tyingrun.tying.weights import local_view, storage_key


def unique_parameters(params: Iterable[nn.Parameter]) -> Dict[tuple, nn.Parameter]:
    """One parameter per storage; when several share a storage, a trainable one represents it."""
    unique: Dict[tuple, nn.Parameter] = {}
    for param in params:
        key = storage_key(param)
        if key not in unique or (param.requires_grad and not unique[key].requires_grad):
            unique[key] = param
    return unique


def trainable_parameters(model: nn.Module) -> list:
    """The tensors the optimizer must hold: each trainable storage exactly once."""
    return [p for p in unique_parameters(model.parameters()).values() if p.requires_grad]


def padding_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters in padded vocabulary rows (model.pad_vocab_to): storage, not part of the model they describe."""
    counters = [getattr(module, "padding_params", None) for module in model.modules()]
    return sum(counter(trainable_only) for counter in counters if callable(counter))


def stored_params(model: nn.Module) -> int:
    return sum(p.numel() for p in unique_parameters(model.parameters()).values()) - padding_params(model)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model)) - padding_params(model, trainable_only=True)


def total_params(model: nn.Module) -> int:
    """The parameter count of the same model with every layer slot independent (embedding tying kept; a looped
    stack's injection and per-loop scales count once, LoRA corrections not at all)."""
    stacks = [m for m in model.modules() if isinstance(m, TiedStack)]
    in_stacks = {id(p) for stack in stacks for p in [*stack.blocks.parameters(), *stack.lora.parameters()]}
    outside = unique_parameters(p for p in model.parameters() if id(p) not in in_stacks)
    per_slot = sum(p.numel() for stack in stacks for block in stack.blocks for p in block.parameters())
    return per_slot + sum(p.numel() for p in outside.values()) - padding_params(model)


def _nbytes(tensor: torch.Tensor) -> int:
    local = local_view(tensor)
    return local.numel() * local.element_size()


def train_state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Bytes of weights (each storage once), of the gradients of trainable tensors and of optimizer state, as this
    process holds them (under hardware=fsdp: its shards)."""
    params = unique_parameters(model.parameters()).values()
    weights = sum(local_view(p).untyped_storage().nbytes() for p in params)
    grads = sum(_nbytes(p) for p in params if p.requires_grad)
    state = 0
    if optimizer is not None:
        for per_param in optimizer.state.values():
            state += sum(_nbytes(v) for v in per_param.values() if torch.is_tensor(v))
    return weights + grads + state
