"""TiedStack: the one object that owns the tying map and makes the layer slots obey it.

Every slot keeps a block module so that a state dict always names every layer. What a slot's
parameters are depends on the map:

* an independent slot owns its Parameters (``requires_grad`` = its trainable flag);
* a tied slot's shared Parameters are aliases of its root's: other Parameter objects over the same storage,
  with ``requires_grad=False``, so the slot stores nothing of them, holds no ``.grad`` for them and the
  optimizer never sees them (under ``policy.share=block`` that is every tensor of the slot; under ``attention``
  or ``mlp`` the other sublayer stays the slot's own). Optimizer updates are in place, so an alias always reads
  the root's current values.

Gradient modes (docs/method.md#gradient-modes):

* ``frozen_copy``: a tied slot runs its own module, whose aliased weights need no gradient: the root
  learns from its own position only, and no weight gradient is computed at the tied position, while
  the gradient with respect to the input still flows through to the layers below.
* ``shared``: a tied slot runs its root's module, so the root's gradient sums over every position.

What a tie shares (docs/method.md#what-a-tie-shares) is the stack's ``share``: the whole block (``block``, the
default), or only one sublayer (``attention`` or ``mlp``, with its layer norm when ``share_norms``). The map
stays one entry per slot; ``shared`` is the set of a block's parameter names that a tie applies to, derived
from the block's structure by ``shared_names``. A tied slot's other tensors are its own: they train under its
trainable flag and are copied, stored and optimized like an independent slot's. Under partial sharing a tied
slot always runs its own module; under ``shared`` its shared Parameters ARE the root's Parameter objects (so
the root's gradient sums over every position), under ``frozen_copy`` they are aliases with
``requires_grad=False`` as for whole blocks.

Where a slot's own tensors live is the stack's ``storage`` (``SlotStorage``): whole tensors in this process by
default; under hardware=fsdp, the slot's shards (tyingrun.train.fsdp).

A looped model (policy=looped) gives the stack a ``LoopControl`` (``looping``): the stack then runs its plan at the
control's loop count instead of every slot once (tyingrun.tying.loops).
"""

from __future__ import annotations

import contextlib
from typing import Dict, FrozenSet, Iterator, List, MutableMapping, Optional, Sequence, Tuple, cast

import torch
from torch import nn

from tyingrun.config import CHOICES
from tyingrun.tying import maps
from tyingrun.tying.loops import LoopControl

GRAD_MODES = CHOICES["policy.grad"]
# Internal modes: "matrices" (policy=recursive with LoRA): ties share every weight matrix, biases and norms stay per
# slot; "all_but_norms" (policy=looped with loop_params=adaln): ties share everything but the block's own norms.
SHARE_MODES = (*CHOICES["policy.share"], "matrices", "all_but_norms")


def shared_names(block: nn.Module, share: str = "block", share_norms: bool = False) -> FrozenSet[str]:
    """The parameter names of ``block`` that a tie shares under ``share``.

    ``block``: every tensor. ``attention`` / ``mlp``: the tensors of that sublayer, as the block names it in its
    ``sublayers`` mapping (part -> (module name, the name of its layer norm)), and the norm's too when
    ``share_norms``.
    """
    if share not in SHARE_MODES:
        raise ValueError(f"share must be one of {SHARE_MODES}, got {share!r}")
    names = [name for name, _ in block.named_parameters()]
    if share == "block":
        return frozenset(names)
    if share == "matrices":
        return frozenset(name for name, param in block.named_parameters() if param.dim() >= 2)
    sublayers = getattr(block, "sublayers", None)
    if share == "all_but_norms" and sublayers:
        norms = tuple(f"{norm}." for _, norm in sublayers.values())
        return frozenset(name for name in names if not name.startswith(norms))
    if not sublayers or share not in sublayers:
        raise ValueError(f"{type(block).__name__} does not name its {share} sublayer; it can only be shared whole")
    module, norm = sublayers[share]
    prefixes = (f"{module}.", f"{norm}.") if share_norms else (f"{module}.",)
    return frozenset(name for name in names if name.startswith(prefixes))


class LoRA(nn.Module):
    """One slot's low-rank correction of one weight matrix: ``W + scale * B @ A`` (docs/method.md, recursive)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out_features, in_features = weight.shape
        self.A = nn.Parameter(torch.zeros(rank, in_features, device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=weight.dtype))
        self.scale = alpha / rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


def lora_key(name: str) -> str:
    """A parameter name as a ModuleDict key (no dots)."""
    return name.replace(".", "__")


def _set_parameter(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner_name), leaf, param)


class SlotStorage:
    """Where a slot's own tensors come from when it unties, what becomes of them when it ties, and how a tied slot
    computes with aliases of its root's tensors. This default keeps whole tensors in this process; hardware=fsdp
    replaces it with one that keeps each slot's shards (tyingrun.train.fsdp)."""

    def own_copy(self, slot: int, name: str, shared: nn.Parameter) -> nn.Parameter:
        """Slot ``slot``'s own copy of ``shared``, the root's tensor ``name`` that it computed with until now."""
        return nn.Parameter(shared.detach().clone())

    def release(self, slot: int, name: str, own: nn.Parameter) -> None:
        """Slot ``slot`` ties: an alias of its root's tensor replaces ``own``, which is freed once nothing uses it."""

    def call_aliased(self, block: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Run a tied slot's own ``block``, whose tensors are aliases of its root's (whole-block frozen_copy ties)."""
        return block(x, **kwargs)


class TiedStack(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module], grad_mode: str = "shared", share: str = "block",
                 share_norms: bool = False):
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        self.blocks = nn.ModuleList(blocks)
        self.grad_mode = grad_mode
        self.src: List[int] = maps.identity(len(self.blocks))
        self.trainable: List[bool] = [True] * len(self.blocks)
        self.share, self.share_norms = share, bool(share_norms)
        self._set_shared(shared_names(self.blocks[0], share, share_norms))
        # policy=recursive: per-slot LoRA corrections of the shared weight matrices (empty dicts: none).
        self.lora = nn.ModuleList([nn.ModuleDict() for _ in self.blocks])
        self.storage = SlotStorage()
        self.looping: Optional[LoopControl] = None

    def _set_shared(self, shared: FrozenSet[str]) -> None:
        self.shared = shared
        # Whether a tie shares every tensor of the block (then a tied slot stores nothing of its own).
        self.whole_block = shared == frozenset(name for name, _ in self.blocks[0].named_parameters())

    @property
    def sharing(self) -> Dict[str, object]:
        """What a tie shares, as the config names it (saved in checkpoints, read back by set_sharing)."""
        return {"share": self.share, "share_norms": self.share_norms}

    def set_sharing(self, share: str = "block", share_norms: bool = False) -> None:
        """Change what a tie shares, keeping the map: every slot first gets its own copy of what it computes
        with, then the map is applied again under the new choice (tied slots drop what they now share)."""
        new_shared = shared_names(self.blocks[0], share, share_norms)
        if new_shared == self.shared and (share, bool(share_norms)) == (self.share, self.share_norms):
            return
        src, trainable = list(self.src), list(self.trainable)
        self.apply_map(maps.identity(len(self)), trainable)
        self.share, self.share_norms = share, bool(share_norms)
        self._set_shared(new_shared)
        self.apply_map(src, trainable)

    def runs(self, slot: int) -> nn.Module:
        """The module that computes slot ``slot``: its root's under ``shared`` whole-block ties, else its own."""
        root = self.src[slot]
        return self.blocks[root] if self.grad_mode == "shared" and self.whole_block else self.blocks[slot]

    def reads(self, slot: int) -> Dict[str, int]:
        """For each tensor of slot ``slot``, the slot whose storage it reads (itself, or its root)."""
        root = self.src[slot]
        return {name: root if name in self.shared else slot for name, _ in self.blocks[slot].named_parameters()}

    def __len__(self) -> int:
        return len(self.blocks)

    def corrections(self, slot: int) -> MutableMapping[str, LoRA]:
        """Slot ``slot``'s LoRA corrections (a ModuleDict), by the lora_key of the weight each corrects."""
        return cast(MutableMapping[str, LoRA], self.lora[slot])

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.looping is not None:
            return self._run_loops(self.looping, x, **kwargs)
        for slot in range(len(self.blocks)):
            x = self._run(slot, x, **kwargs)
        return x

    def _run_loops(self, control: LoopControl, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """The prelude, the core at ``control.loops_now`` loops (the early ones without a graph under truncated
        backprop; each later loop's input injected with the prelude's output), then the coda."""
        parts = control.plan.parts()
        for slot in parts["prelude"]:
            x = self._run(slot, x, **kwargs)
        prelude_output = x
        for loop, (grad, slots) in enumerate(control.core_runs(self.training)):
            with contextlib.nullcontext() if grad else torch.no_grad():
                if loop > 0 and control.injection is not None:
                    x = control.injection(x, prelude_output)
                for slot in slots:
                    x = self._run(slot, x, **kwargs)
                    scale = control.scale(slot)
                    if scale is not None:
                        x = x * scale
        for slot in parts["coda"]:
            x = self._run(slot, x, **kwargs)
        return x

    def executed_slots(self) -> List[Tuple[int, bool]]:
        """The slots a training forward runs, in order, each with whether its backward runs (tying.loops)."""
        if self.looping is not None:
            return self.looping.executed_slots()
        return [(slot, True) for slot in range(len(self))]

    def _run(self, slot: int, x: torch.Tensor, **kwargs) -> torch.Tensor:
        block = self.runs(slot)
        corrections = self.corrections(slot)
        if len(corrections):
            params = dict(block.named_parameters())
            relaxed = {name: params[name] + corrections[lora_key(name)].delta()
                       for name in params if lora_key(name) in corrections}
            return torch.func.functional_call(block, relaxed, (x,), kwargs)
        if self.whole_block and self.src[slot] != slot and block is self.blocks[slot]:
            return self.storage.call_aliased(block, x, **kwargs)
        return block(x, **kwargs)

    def add_lora(self, slots: Sequence[int], rank: int, alpha: float) -> None:
        """Give each of ``slots`` a rank-``rank`` LoRA (zeros until set) on every shared weight matrix."""
        for slot in slots:
            for name, param in self.blocks[slot].named_parameters():
                if name in self.shared and param.dim() == 2:
                    self.corrections(slot)[lora_key(name)] = LoRA(param, rank, alpha)

    @property
    def has_lora(self) -> bool:
        return any(len(self.corrections(slot)) for slot in range(len(self)))

    def merge_lora(self) -> None:
        """Every slot independent with ``W + scale * B @ A`` as its own weights; the LoRA tensors go."""
        self.apply_map(maps.identity(len(self)), [True] * len(self))
        with torch.no_grad():
            for slot in range(len(self)):
                corrections = self.corrections(slot)
                for name, param in self.blocks[slot].named_parameters():
                    if lora_key(name) in corrections:
                        param.add_(corrections[lora_key(name)].delta())
        self.lora = nn.ModuleList([nn.ModuleDict() for _ in self.blocks])

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
        changes = list(enumerate(zip(self.src, new_src, strict=True)))
        for slot, (old_root, new_root) in changes:
            if new_root == slot and old_root != slot:
                self._give_own_copy(slot)
        # After every copy: a slot that unties may copy from a root that ties in this same change.
        for slot, (old_root, new_root) in changes:
            if old_root == slot and new_root != slot:
                self._release_own(slot)
        self.src, self.trainable = new_src, [bool(f) for f in flags]
        self._bind()

    def is_trainable(self, slot: int) -> bool:
        """A slot trains when its flag is set and it owns tensors: it is independent, or the tie shares only part
        of its block (then its own part trains). A slot tied as a whole block never does."""
        return self.trainable[slot] and (self.src[slot] == slot or not self.whole_block)

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
        """Copies of the shared tensors a slot computed with (its own tensors are already its own)."""
        for name, param in list(self.blocks[slot].named_parameters()):
            if name in self.shared:
                _set_parameter(self.blocks[slot], name, self.storage.own_copy(slot, name, param))

    def _release_own(self, slot: int) -> None:
        """A slot that ties gives up its own copies of the tensors a tie shares."""
        for name, param in list(self.blocks[slot].named_parameters()):
            if name in self.shared:
                self.storage.release(slot, name, param)

    def _bind(self) -> None:
        """Alias every tied slot's shared tensors to its root and set ``requires_grad`` of the slot's own tensors and
        LoRA corrections from the trainable flags.

        Roots come before the slots tied to them (``src[i] <= i``), so a root's flags are set before it is shared.
        Under ``shared`` partial sharing a tied slot holds the root's Parameter objects themselves (its own module
        runs, and the gradient of every position lands in the root's tensor); otherwise a tied slot holds
        aliases: other Parameter objects over the root's storage, with ``requires_grad=False``.
        """
        same_objects = self.grad_mode == "shared" and not self.whole_block
        for slot, root in enumerate(self.src):
            block = self.blocks[slot]
            if root != slot:
                root_params = dict(self.blocks[root].named_parameters())
                for name in [n for n, _ in block.named_parameters() if n in self.shared]:
                    shared = root_params[name] if same_objects else nn.Parameter(root_params[name].detach(),
                                                                                 requires_grad=False)
                    _set_parameter(block, name, shared)
            own = [param for name, param in block.named_parameters() if root == slot or name not in self.shared]
            for param in [*own, *self.lora[slot].parameters()]:
                param.requires_grad_(self.trainable[slot])
                if not self.trainable[slot]:
                    param.grad = None

    def _apply(self, fn, recurse=True):
        # Moving or casting the module gives every Parameter a new tensor of its own; re-alias afterwards
        # so tied slots keep sharing their root's storage on the new device or dtype.
        super()._apply(fn, recurse)
        self._bind()
        return self
