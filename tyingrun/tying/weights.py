"""Weight files and storage identity: each weight storage once (tied layer slots and a tied LM head share one),
saved as safetensors and copied back into a model, whole tensors or, under hardware=fsdp, DTensor shards."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from tyingrun.errors import BadInput


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process stores: a DTensor's local shard (hardware=fsdp), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def storage_key(tensor: torch.Tensor) -> Tuple[int, torch.device]:
    """What tensors that share one storage (tied layer slots, a tied LM head) have in common."""
    local = local_view(tensor)
    return local.untyped_storage().data_ptr(), local.device


def placed_like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value``, a whole tensor, placed as ``target`` is: sharded the same way when ``target`` is a DTensor (each
    rank cuts its own shard, no communication), else ``value`` itself."""
    if not isinstance(target, DTensor):
        return value
    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


def unique_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Each weight storage once, under the first name that uses it (a root before its tied slots)."""
    seen, weights = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            weights[name] = tensor.detach()
    return weights


def save_weights(weights: Dict[str, torch.Tensor], path: Path) -> None:
    """``weights`` (whole tensors, each storage once, as unique_weights names them) as a safetensors file."""
    save_file({name: t.cpu().contiguous() for name, t in weights.items()}, str(path))


def copy_weights(model: nn.Module, stored: Dict[str, torch.Tensor], source: str) -> None:
    """Copy ``stored`` (one tensor per storage, named as unique_weights names them) into ``model`` in place."""
    expected = unique_weights(model)
    missing = sorted(set(expected) - set(stored))
    if missing:
        if _loop_tensor(missing[0]):
            raise BadInput(f"{source} lacks {missing[0]}: it was trained without this run's {LOOP_KEYS}; give "
                           f"this run the source's")
        raise BadInput(f"{source} lacks {missing[0]} (and {len(missing) - 1} more); it is not of this model "
                       f"(or was saved with other model.* settings, e.g. model.tie_embeddings)")
    targets = model.state_dict(keep_vars=True)
    for name, value in stored.items():
        if name in targets and name not in expected:
            partner = next(n for n, t in expected.items() if storage_key(t) == storage_key(targets[name]))
            raise BadInput(
                f"{source} stores {name} apart from {partner} but this model ties the two into one tensor; "
                f"two trained matrices cannot be merged - untie them (model.tie_embeddings=false)"
            )
        if name not in targets and _loop_tensor(name):
            raise BadInput(f"{source} holds {name}, a tensor of its {LOOP_KEYS} that this run does not have; give "
                           f"this run the source's (its learned per-loop tensors cannot be dropped silently)")
        if name not in targets or targets[name].shape != value.shape:
            shape = tuple(targets[name].shape) if name in targets else "absent"
            raise BadInput(
                f"{source} holds {name} of shape {tuple(value.shape)} but the model's is {shape}; "
                f"it was saved from a different model shape - use the same model.* settings"
            )
    with torch.no_grad():
        for name, value in stored.items():
            local_view(targets[name]).copy_(local_view(placed_like(targets[name], value)))


# policy=looped's own tensors (the stack's LoopControl, tyingrun.tying.loops): the input injection and per-loop scales.
LOOP_KEYS = "policy.inject and policy.loop_params (policy=looped)"


def _loop_tensor(name: str) -> bool:
    return ".looping." in f".{name}"


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``path``; BadInput when it is missing, truncated or corrupt."""
    if not path.is_file():
        raise BadInput(f"checkpoint file {path} is missing; pick another checkpoint or start afresh")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BadInput(f"checkpoint file {path} is truncated or corrupt ({err}); pick another checkpoint") from None
