"""TiedStack: the one object that owns the tying map and makes the layer slots obey it.

Every slot keeps a block module so that a state dict always names every layer. What a slot's
parameters are depends on the map:

* an independent slot owns its Parameters (``requires_grad`` = its trainable flag);
* a tied slot's Parameters are aliases of its root's: other Parameter objects over the same storage,
  with ``requires_grad=False``, so the slot stores nothing, holds no ``.grad`` and the optimizer never
  sees it. Optimizer updates are in place, so an alias always reads the root's current values.

Gradient modes (METHOD.md §1):

* ``frozen_copy``: a tied slot runs its own module, whose aliased weights need no gradient: the root
  learns from its own position only, and no weight gradient is computed at the tied position, while
  the gradient with respect to the input still flows through to the layers below.
* ``shared``: a tied slot runs its root's module, so the root's gradient sums over every position.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from tyingrun.tying import maps

GRAD_MODES = ("frozen_copy", "shared")


def _set_parameter(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner_name), leaf, param)


class TiedStack(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module], grad_mode: str = "shared"):
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        self.blocks = nn.ModuleList(blocks)
        self.grad_mode = grad_mode
        self.src: List[int] = maps.identity(len(self.blocks))
        self.trainable: List[bool] = [True] * len(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        for slot, root in enumerate(self.src):
            runs = self.blocks[root] if self.grad_mode == "shared" else self.blocks[slot]
            x = runs(x, **kwargs)
        return x

    def apply_map(self, src: Sequence[int], trainable: Optional[Sequence[bool]] = None) -> None:
        """Make the slots obey ``src`` (chains are resolved) and the per-slot trainable flags.

        A slot that becomes independent gets its own copy of the weights it was computing with; a slot
        that becomes tied drops its own storage and aliases its root.
        """
        maps.validate(src, len(self))
        new_src = maps.resolve(src)
        flags = list(self.trainable if trainable is None else trainable)
        if len(flags) != len(self):
            raise ValueError(f"{len(flags)} trainable flags for {len(self)} layers")
        for slot, (old_root, new_root) in enumerate(zip(self.src, new_src, strict=True)):
            if new_root == slot and old_root != slot:
                self._give_own_copy(slot)
        self.src, self.trainable = new_src, [bool(f) for f in flags]
        self._bind()

    def set_trainable(self, trainable: Sequence[bool]) -> None:
        self.apply_map(self.src, trainable)

    def is_trainable(self, slot: int) -> bool:
        """A slot trains when it is independent and its flag is set (a tied slot never does)."""
        return self.src[slot] == slot and self.trainable[slot]

    @property
    def effective_trainable(self) -> List[bool]:
        return [self.is_trainable(slot) for slot in range(len(self))]

    @property
    def independent_layers(self) -> int:
        return len(maps.roots_of(self.src))

    @property
    def trainable_layers(self) -> int:
        return sum(self.effective_trainable)

    def slot_parameters(self, slot: int) -> Iterator[Tuple[str, nn.Parameter]]:
        return self.blocks[slot].named_parameters()

    def _give_own_copy(self, slot: int) -> None:
        for name, param in list(self.blocks[slot].named_parameters()):
            _set_parameter(self.blocks[slot], name, nn.Parameter(param.detach().clone()))

    def _bind(self) -> None:
        """Alias every tied slot to its root and set ``requires_grad`` from the trainable flags."""
        for slot, root in enumerate(self.src):
            if root != slot:
                root_params = dict(self.blocks[root].named_parameters())
                for name in [n for n, _ in self.blocks[slot].named_parameters()]:
                    alias = nn.Parameter(root_params[name].detach(), requires_grad=False)
                    _set_parameter(self.blocks[slot], name, alias)
                continue
            for param in self.blocks[slot].parameters():
                param.requires_grad_(self.trainable[slot])
                if not self.trainable[slot]:
                    param.grad = None

    def _apply(self, fn, recurse=True):
        # Moving or casting the module gives every Parameter a new tensor of its own; re-alias afterwards
        # so tied slots keep sharing their root's storage on the new device or dtype.
        super()._apply(fn, recurse)
        self._bind()
        return self
