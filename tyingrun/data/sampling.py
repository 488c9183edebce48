"""Resumable training samplers shared by every kind of data: shuffled epochs, and random per-batch transforms."""

from __future__ import annotations

from typing import Callable

import torch

from tyingrun.contracts import Batch
from tyingrun.seeding import derive_seed


class ShuffledSampler:
    """Shuffled training batches, one permutation of the items per epoch, resumable at any batch.

    Epoch ``e`` uses the permutation drawn from ``derive_seed(seed, "epoch", e)``, so no epoch of one seed is an
    epoch of another (``seed + e`` would make seed 1's order seed 0's next epoch). Batch ``k`` of the epoch is
    its ``k``-th slice of ``batch_size`` (an incomplete last slice is dropped). With fewer items than
    ``batch_size`` the permutation wraps around, so a batch is always full and each batch is one epoch. ``take``
    turns item indices into a batch.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, take: Callable[[torch.Tensor], Batch]):
        self.n_items = n_items
        self.batch_size = batch_size
        self.take = take
        self.batches_per_epoch = max(1, n_items // batch_size)
        self._start(seed=seed, epoch=0, position=0)

    def next_batch(self) -> Batch:
        if self.position == self.batches_per_epoch:
            self._start(seed=self.seed, epoch=self.epoch + 1, position=0)
        offsets = self.position * self.batch_size + torch.arange(self.batch_size)
        indices = self._order[offsets % self.n_items]
        self.position += 1
        return self.take(indices)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self._start(seed=int(state["seed"]), epoch=int(state["epoch"]), position=int(state["position"]))

    def _start(self, seed: int, epoch: int, position: int) -> None:
        self.seed, self.epoch, self.position = seed, epoch, position
        generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
        self._order = torch.randperm(self.n_items, generator=generator)


class TransformedSampler:
    """Another sampler's batches passed through a random transform (masking, augmentation).

    The transform draws only from this sampler's own generator, seeded by ``seed``; its state travels in
    ``state_dict``, so a resumed run sees the same batches.
    """

    def __init__(self, sampler, transform: Callable[[Batch, torch.Generator], Batch], seed: int):
        self.sampler = sampler
        self.transform = transform
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> Batch:
        return self.transform(self.sampler.next_batch(), self.generator)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
