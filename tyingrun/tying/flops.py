"""Training compute per token, counted per slot: a looped block counts every time it runs (docs/method.md#compute).

Only matrix products are counted (as ``torch.utils.flop_counter`` counts them); norms, activations, softmax and
the optimizer are left out. For every linear map of ``w`` weights that a position runs: 2w FLOPs forward, 2w for
the gradient with respect to its input, and 2w for its weight gradient when that position computes one (its
weight trains there: not a frozen layer, not a ``frozen_copy`` tied slot). Every attention sublayer adds its
score and value products, ``attention_flops_per_token`` forward (4 * seq_len * width, the whole sequence, as
the kernels compute it), three times that for forward and backward. A patch embedding (Conv2d) counts like a
linear map per patch. Embedding lookups cost nothing; the output head (a tied LM head is the embedding matrix)
is counted at every position.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from tyingrun.tying.stack import TiedStack


def _matmul_flops(module: nn.Module, seq_len: int, skip: Optional[set] = None) -> int:
    flops = 0
    for sub in module.modules():
        if skip is not None and id(sub) in skip:
            continue
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            weights = sub.weight.numel()
            flops += (6 if sub.weight.requires_grad else 4) * weights
        attention = getattr(sub, "attention_flops_per_token", None)
        if callable(attention):
            flops += 3 * attention(seq_len)
    return flops


def sequence_length(model: nn.Module, block_size: int) -> int:
    """Tokens per training sequence: ``block_size`` for language models; patches + class token for a ViT (its
    learned ``positions`` table is [1, tokens, width])."""
    positions = getattr(model, "positions", None)
    return int(positions.shape[1]) if isinstance(positions, nn.Parameter) else int(block_size)


def train_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Forward + backward FLOPs of one training token under the stack's current map, gradient mode and flags."""
    stacks = [m for m in model.modules() if isinstance(m, TiedStack)]
    flops, inside = 0, set()
    for stack in stacks:
        inside |= {id(m) for m in stack.modules()}
        flops += sum(_matmul_flops(stack.runs(slot), seq_len) for slot in range(len(stack)))
    return flops + _matmul_flops(model, seq_len, skip=inside)


def unique_blocks(model: nn.Module) -> int:
    """Distinct blocks the map names (its roots), over every TiedStack of the model."""
    return sum(stack.independent_layers for stack in model.modules() if isinstance(stack, TiedStack))
