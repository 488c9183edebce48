"""Independent random streams, and their state: every source of randomness in a run derives its seed from
``(train.seed, stream name, rank, ...)`` through ``numpy.random.SeedSequence``.

Deriving by hashing rather than by adding offsets (``seed + 1``, ``seed + epoch``) keeps the streams of one
seed apart from each other and from every stream of every other seed: seed 1's data order is not seed 0's
next epoch, and a run's reward batches are not another seed's training batches.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Dict, List, Optional, Tuple, cast

import numpy as np

# The named streams of a run; each is derived independently from the run's seed.
STREAMS = ("init", "data_order", "reward_batches", "dropout", "exploration", "q_init", "masking", "augmentation",
           "val_instances", "test_instances", "loop_counts")


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def derive_seed(seed: int, name: str, *keys: int) -> int:
    """A 63-bit seed for the stream ``name`` of ``seed``, further keyed by ``keys`` (a rank, an epoch...).

    Fits ``torch.Generator.manual_seed`` and ``random.Random``; equal arguments give equal seeds on every
    machine, different arguments give unrelated ones.
    """
    sequence = np.random.SeedSequence(entropy=int(seed), spawn_key=(_name_key(name), *map(int, keys)))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def rng_state(generator: Optional[random.Random] = None) -> Dict[str, Any]:
    """The state of random generators as a checkpoint stores it (lists, numbers and tensors; nothing pickled).

    With ``generator`` (a policy's own exploration stream): that generator alone, as ``{"python": ...}``. Without
    it: every global generator a run draws from, Python's, numpy's, torch's and each visible CUDA device's.
    """
    if generator is not None:
        return {"python": _python_state(generator)}
    import torch  # only here: layer 0 stays importable without torch

    _, keys, position, has_gauss, gauss = cast(Tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {
        "python": _python_state(random), "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any], generator: Optional[random.Random] = None) -> None:
    """Put back what rng_state saved: the Python state into ``generator`` (or Python's global generator), and the
    global numpy, torch and CUDA states where ``state`` holds them."""
    saved = state["python"]
    # Checkpoints written before this format kept the global generator's state without its version.
    version, internal, gauss = saved if len(saved) == 3 else (random.Random.VERSION, *saved)
    (random if generator is None else generator).setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import torch

        keys, position, has_gauss, gauss_value = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, gauss_value))
        torch.set_rng_state(state["torch"])
        if state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])


def _python_state(generator: Any) -> List[Any]:
    """A Python generator's (or the ``random`` module's) state as lists: [version, internal state, next gauss]."""
    version, internal, gauss = generator.getstate()
    return [version, list(internal), gauss]
