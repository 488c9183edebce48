"""hardware=fsdp: the model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) so that ties stay ties.

FSDP groups, each sharded once: every layer slot's block (sharded while every slot is independent), the token
embedding with its head (a tied head is the embedding matrix: one tensor in one group), then the model root
(positions, final norm, ...). No Parameter is in two groups.

A tied slot holds no shard of its own. As in one process, its Parameters are aliases of its root's: DTensors over
the root's local shards, with ``requires_grad=False``. FSDP's own Parameters of the slot stay with its group, which
never runs while the slot is tied, and their storage is freed; when the slot unties they get that storage back
with a copy of the root's local shard (every block has the same shapes, so every rank's shard of the root is the
rank's shard of the copy: tying and untying need no communication). The optimizer follows the trainable tensors as
in one process (tyingrun.train.optim.sync_optimizer).

* ``shared``: a tied slot runs its root's block, so that group runs at several depths per step; its gradient of
  every position is reduce-scattered into the root's shards.
* ``frozen_copy``: a tied slot gathers its root's weights without gradient and runs them through a copy of the
  block's structure on the meta device (outside FSDP, whose hooks would gather the slot's own, freed, shards).
  With ``hardware.fsdp_reshard_after_forward`` the gathered weights are not kept for the backward: the position is
  recomputed there (activation checkpointing), gathering them again.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from tyingrun.config import HardwareConfig
from tyingrun.contracts import TiedModule
from tyingrun.models.embeddings import TokenEmbedding
from tyingrun.tying import maps
from tyingrun.tying.stack import SlotStorage, TiedStack
from tyingrun.tying.weights import local_view, placed_like

# The methods through which a model calls its TokenEmbedding: each gathers the group like a forward.
TOKEN_METHODS = ("embed", "project")


def mixed_precision(hardware: HardwareConfig, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 gathered weights and fp32 gradient reduction on CUDA under hardware.precision=bf16; fp32 otherwise."""
    if device.type == "cuda" and hardware.precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: TiedModule, hardware: HardwareConfig, device: torch.device) -> None:
    """Shard ``model`` in place over every rank of the process group; its map and trainable flags stay."""
    stack = model.stack
    src, trainable = list(stack.src), list(stack.trainable)
    # Every block is sharded as an independent, trainable group; the map is applied again below.
    stack.apply_map(maps.identity(len(stack)), [True] * len(stack))
    template = copy.deepcopy(stack.blocks[0]).to("meta")
    policy = mixed_precision(hardware, device)
    options = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),)), "mp_policy": policy}
    for block in stack.blocks:
        fully_shard(block, reshard_after_forward=hardware.fsdp_reshard_after_forward, **options)
    for tokens in [module for module in model.modules() if isinstance(module, TokenEmbedding)]:
        fully_shard(tokens, reshard_after_forward=hardware.fsdp_reshard_after_forward, **options)
        for method in TOKEN_METHODS:
            register_fsdp_forward_method(tokens, method)
    fully_shard(model, **options)
    # FSDP settles each group at its first forward: which Parameters are its own, and the dtypes it reduces
    # gradients in, from the tensors that train then. Settle it now, while every slot holds its own tensors and all
    # train: later ties replace a slot's Parameters by aliases, and a group frozen at that point would reduce in bf16
    # once it trains (pytorch/pytorch#186998; calling the root's lazy init early is the workaround it gives).
    model._get_fsdp_state()._lazy_init()
    stack.storage = ShardedSlots(stack, template, policy.param_dtype, hardware.fsdp_reshard_after_forward)
    stack.apply_map(src, trainable)


def reshard(model: nn.Module) -> None:
    """Free the weights FSDP gathered for forwards without a backward (evaluation, reward scoring), which it keeps
    where it does not reshard after the forward (the model root, or every group under
    hardware.fsdp_reshard_after_forward=false): afterwards each Parameter is its shard again, which is what ties,
    counts, checkpoints and the optimizer read. Nothing to do for a model without FSDP."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class ShardedSlots(SlotStorage):
    """A TiedStack's slots under FSDP: each slot keeps FSDP's Parameters of its block, stored while it is
    independent, freed while it is tied; a tied slot under frozen_copy computes with its root's gathered weights."""

    def __init__(self, stack: TiedStack, template: nn.Module, gather_dtype: Optional[torch.dtype], regather: bool):
        self.own: List[Dict[str, nn.Parameter]] = [dict(block.named_parameters()) for block in stack.blocks]
        self.nbytes = [{name: local_view(param).untyped_storage().nbytes() for name, param in params.items()}
                       for params in self.own]
        self.template, self.gather_dtype, self.regather = template, gather_dtype, regather

    def own_copy(self, slot: int, name: str, shared: nn.Parameter) -> nn.Parameter:
        own = self.own[slot][name]
        local = local_view(own)
        local.untyped_storage().resize_(self.nbytes[slot][name])
        with torch.no_grad():
            local.copy_(local_view(shared))
        return own

    def release(self, slot: int, name: str, own: nn.Parameter) -> None:
        own.grad = None
        local_view(own).untyped_storage().resize_(0)

    def holds(self, slot: int) -> int:
        """Bytes of slot ``slot``'s own shards on this rank (0 while it is tied)."""
        return sum(local_view(param).untyped_storage().nbytes() for param in self.own[slot].values())

    def call_aliased(self, block: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.regather and torch.is_grad_enabled():
            return checkpoint(self._run_gathered, block, x, use_reentrant=False, **kwargs)
        return self._run_gathered(block, x, **kwargs)

    def _run_gathered(self, block: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # The aliases do not require grad, so neither do the gathered weights: no weight gradient at this position.
        weights = {name: self._gathered(param) for name, param in block.named_parameters()}
        self.template.train(block.training)
        return functional_call(self.template, weights, (x,), kwargs, strict=True)

    def _gathered(self, param: nn.Parameter) -> torch.Tensor:
        return (param if self.gather_dtype is None else param.to(self.gather_dtype)).full_tensor()


def whole_tensors(obj: Any, keep: bool) -> Any:
    """``obj`` (dicts, lists and tuples of tensors and plain values: a model's unique weights, a trainer's state)
    with every DTensor replaced by its whole tensor on the CPU. Every rank must call it on the same structure (each
    gather takes every rank); a rank that does not ``keep`` drops each gathered tensor at once (it gets None)."""
    if isinstance(obj, DTensor):
        whole = obj.full_tensor()
        return whole.cpu() if keep else None
    if isinstance(obj, dict):
        return {key: whole_tensors(value, keep) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(whole_tensors(value, keep) for value in obj)
    return obj


def placed_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> Dict[str, Any]:
    """``state``, an optimizer state dict of whole tensors (as checkpoints hold it), with each tensor shaped like
    its parameter placed as that parameter is (this rank's shard of a sharded one)."""
    params = {saved: param for saved_group, group in zip(state["param_groups"], optimizer.param_groups, strict=True)
              for saved, param in zip(saved_group["params"], group["params"], strict=True)}
    placed = {}
    for index, per_param in state["state"].items():
        param = params[index]
        placed[index] = {key: placed_like(param, value) if torch.is_tensor(value) and value.shape == param.shape
                         else value for key, value in per_param.items()}
    return {**state, "state": placed}
