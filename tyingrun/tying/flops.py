"""Training compute per token, counted per slot: a looped block counts every time it runs (docs/method.md#compute).

Only matrix products are counted (as ``torch.utils.flop_counter`` counts them); norms, activations, softmax and
the optimizer are left out. For every linear map of ``w`` weights that a position runs: 2w FLOPs forward, 2w for
the gradient with respect to its input, and 2w for its weight gradient when that position computes one (its
weight trains there: not a frozen layer, not a ``frozen_copy`` tied slot). Every attention sublayer adds its
score and value products, ``attention_flops_per_token`` forward (4 * seq_len * width, the whole sequence, as
the kernels compute it), three times that for forward and backward. A patch embedding (Conv2d) counts like a
linear map per patch. Embedding lookups cost nothing; the output head (a tied LM head is the embedding matrix)
is counted at every position.

A looped stack (policy=looped) counts the slots its forward runs at the current loop count, each as often as it runs:
a loop that truncated backprop runs without a graph counts its forward only (2w, and the attention products once),
as does the prelude when nothing with a graph reads its output; the input injection's matrix counts at every loop
after the first.

A slot with LoRA corrections (policy=recursive) computes with ``W + scale * B @ A``: its weight gradient is computed
wherever the corrections train (they learn through it), and the products ``B @ A`` and their two gradients
(6 * r * w, or 2 * r * w forward only when the corrections are frozen) run once per step, so they are spread over
the step's ``batch_size * seq_len`` tokens.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from tyingrun.tying.stack import TiedStack, lora_key


def _matmul_flops(module: nn.Module, seq_len: int, skip: Optional[set] = None, backward: bool = True) -> int:
    flops = 0
    for sub in module.modules():
        if skip is not None and id(sub) in skip:
            continue
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            weights = sub.weight.numel()
            flops += (2 if not backward else 6 if sub.weight.requires_grad else 4) * weights
        attention = getattr(sub, "attention_flops_per_token", None)
        if callable(attention):
            flops += (3 if backward else 1) * attention(seq_len)
    return flops


def _slot_flops(stack: TiedStack, slot: int, seq_len: int, tokens_per_step: int, backward: bool = True) -> float:
    """One run of ``slot``; ``backward``: whether its backward runs (not in a loop that truncated backprop skips)."""
    module, corrections = stack.runs(slot), stack.corrections(slot)
    flops = float(_matmul_flops(module, seq_len, backward=backward))
    for name, sub in module.named_modules():
        key = lora_key(f"{name}.weight")
        if not isinstance(sub, nn.Linear) or key not in corrections:
            continue
        weights, rank = sub.weight.numel(), corrections[key].A.shape[0]
        trains = backward and corrections[key].A.requires_grad
        if trains and not sub.weight.requires_grad:
            flops += 2 * weights
        flops += (6 if trains else 2) * rank * weights / tokens_per_step
    return flops


def _injection_flops(stack: TiedStack, seq_len: int) -> int:
    """The input injection's projection (policy.inject=concat), at every loop after the first."""
    control = stack.looping
    if control is None or control.injection is None:
        return 0
    grads = control.loop_grads(training=True)[1:]
    return sum(_matmul_flops(control.injection, seq_len, backward=grad) for grad in grads)


def sequence_length(model: nn.Module, block_size: int) -> int:
    """Tokens per training sequence: ``block_size`` for language models; patches + class token for a ViT (its
    learned ``positions`` table is [1, tokens, width])."""
    positions = getattr(model, "positions", None)
    return int(positions.shape[1]) if isinstance(positions, nn.Parameter) else int(block_size)


def train_flops_per_token(model: nn.Module, seq_len: int, batch_size: int) -> int:
    """Forward + backward FLOPs of one training token under the stack's current map, gradient mode and flags, for
    steps of ``batch_size`` sequences."""
    stacks = [m for m in model.modules() if isinstance(m, TiedStack)]
    flops, inside = 0.0, set()
    for stack in stacks:
        inside |= {id(m) for m in stack.modules()}
        flops += sum(_slot_flops(stack, slot, seq_len, batch_size * seq_len, backward)
                     for slot, backward in stack.executed_slots())
        flops += _injection_flops(stack, seq_len)
    return round(flops + _matmul_flops(model, seq_len, skip=inside))


def unique_blocks(model: nn.Module) -> int:
    """Distinct blocks the map names (its roots), over every TiedStack of the model."""
    return sum(stack.independent_layers for stack in model.modules() if isinstance(stack, TiedStack))
