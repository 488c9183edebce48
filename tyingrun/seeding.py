"""Independent random streams: every source of randomness in a run derives its seed from
``(train.seed, stream name, rank, ...)`` through ``numpy.random.SeedSequence``.

Deriving by hashing rather than by adding offsets (``seed + 1``, ``seed + epoch``) keeps the streams of one
seed apart from each other and from every stream of every other seed: seed 1's data order is not seed 0's
next epoch, and a run's reward batches are not another seed's training batches.
"""

from __future__ import annotations

import hashlib

import numpy as np

# The named streams of a run; each is derived independently from the run's seed.
STREAMS = ("init", "data_order", "reward_batches", "dropout", "exploration", "q_init", "masking", "augmentation",
           "val_instances", "test_instances")


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def derive_seed(seed: int, name: str, *keys: int) -> int:
    """A 63-bit seed for the stream ``name`` of ``seed``, further keyed by ``keys`` (a rank, an epoch...).

    Fits ``torch.Generator.manual_seed`` and ``random.Random``; equal arguments give equal seeds on every
    machine, different arguments give unrelated ones.
    """
    sequence = np.random.SeedSequence(entropy=int(seed), spawn_key=(_name_key(name), *map(int, keys)))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))
