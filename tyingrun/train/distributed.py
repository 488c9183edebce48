"""Data parallelism under torchrun: the ranks, each rank's share of the work, and what they exchange.

The set of trainable tensors changes at every tying decision, which a DistributedDataParallel wrapper
cannot follow (its buckets and hooks are fixed at construction). Instead every rank computes its share of
the global batch, and under hardware=ddp the gradients of exactly the trainable tensors are averaged in buckets
during the backward (tyingrun.train.grad_sync; hardware=fsdp shards the model instead and FSDP reduce-scatters
them; see tyingrun.train.fsdp). Rank 0 takes every map decision and broadcasts it, so ranks never disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from tyingrun.errors import BadInput
from tyingrun.train.launch import launched_by_torchrun

T = TypeVar("T")


@dataclass(frozen=True)
class Mesh:
    """This process's place among the ranks (world_size 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Mesh()


def mesh_for(data_parallel: bool, device: str, preset: str = "ddp") -> Mesh:
    """The mesh of this run: data parallel exactly when ``hardware.data_parallel`` and torchrun launched the
    processes (``preset``, ddp or fsdp, is the hardware preset the error messages name)."""
    if data_parallel and not launched_by_torchrun():
        raise BadInput(f"hardware={preset} needs several processes: torchrun --nproc_per_node=N -m tyingrun.cli "
                       f"hardware={preset} ... (or use hardware=auto for one process)")
    if launched_by_torchrun() and not data_parallel:
        raise BadInput(f"torchrun started {os.environ['WORLD_SIZE']} processes; add hardware=ddp (or hardware=fsdp "
                       f"to shard the training state) to train them as one data-parallel run")
    mesh = init_from_env()
    if mesh.distributed and device == "cpu" and dist.get_backend() == "nccl":
        raise BadInput("hardware.device=cpu under torchrun on a machine with GPUs: data parallelism uses NCCL "
                       "on the GPUs; drop hardware.device=cpu")
    return mesh


def init_from_env() -> Mesh:
    """Join the process group torchrun describes in the environment (idempotent): NCCL when the machine
    has GPUs, gloo otherwise."""
    if not launched_by_torchrun():
        return SINGLE
    mesh = Mesh(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(mesh.local_rank)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return mesh


def local_rows(batch: Dict[str, torch.Tensor], mesh: Mesh) -> Dict[str, torch.Tensor]:
    """This rank's equal share of a global batch (every rank draws the same global batch; the preflight has
    checked that it splits evenly)."""
    if not mesh.distributed:
        return batch
    share = next(iter(batch.values())).shape[0] // mesh.world_size
    return {k: v[mesh.rank * share:(mesh.rank + 1) * share] for k, v in batch.items()}


def rank_share(items: Iterable[T], mesh: Mesh) -> Iterator[Tuple[T, bool]]:
    """This rank's share of ``items``, each with whether it counts: every world_size-th item. Where the last round
    holds fewer items than ranks, the ranks left over repeat that round's first item without counting it, so that
    every rank runs as many forwards as the others (under FSDP each forward gathers weights from every rank)."""
    if not mesh.distributed:
        yield from ((item, True) for item in items)
        return
    round_items: List[T] = []
    for item in items:
        round_items.append(item)
        if len(round_items) == mesh.world_size:
            yield round_items[mesh.rank], True
            round_items = []
    if round_items:
        mine = mesh.rank < len(round_items)
        yield round_items[mesh.rank if mine else 0], mine


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the ranks (one all-reduce; the tensor stays on its device)."""
    total = values.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def values_of_ranks(value: float, device: torch.device) -> List[float]:
    """Each rank's ``value``, in rank order, on every rank."""
    values = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(values, torch.tensor([value], dtype=torch.float64, device=device))
    return [v.item() for v in values]


def objects_of_ranks(obj: object) -> List[object]:
    """Each rank's ``obj`` (picklable), in rank order, on every rank."""
    gathered: List[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Optional[object], device: torch.device) -> Optional[object]:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def agreed_stop_signal(signum: Optional[int], device: torch.device) -> Optional[int]:
    """The stop signal any rank has received (the highest number when several have), on every rank: a signal to
    any one rank stops them all at the same step."""
    value = torch.tensor([signum or 0], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item()) or None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
